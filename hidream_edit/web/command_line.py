"""The web UI's command line (gradio_demo_npu.py): its server flags, plus the shared model flags from config.

Turns flags and the environment (handed in by the caller, resolved by config) into the server's
`WebSettings` and the Editor's settings; a bad value is a UserError, a bad flag one line and exit 2.
"""

from __future__ import annotations

import argparse
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path

from hidream_edit.config import (
    ENV_WEB_AUTH,
    OneLineArgumentParser,
    add_cache_arguments,
    add_distributed_arguments,
    add_model_arguments,
    add_model_choice_argument,
    add_rewrite_arguments,
    configure_logging,
    model_spec,
    vlm_api_key,
    web_auth_value,
)
from hidream_edit.config import (
    editor_settings_from_args as shared_editor_settings,
)
from hidream_edit.editor import EditorSettings
from hidream_edit.errors import UserError
from hidream_edit.instructions import VLMSettings
from hidream_edit.step_cache import CacheSettings
from hidream_edit.web.service import WebSettings, check_results_dir, home_dirs, parse_auth


def build_parser(model: str) -> OneLineArgumentParser:
    spec = model_spec(model)
    parser = OneLineArgumentParser(
        prog="gradio_demo_npu.py",
        description="Web editor for HiDream-E1.1 / E1-Full on Ascend NPU, CUDA or CPU.",
        epilog="Example: %(prog)s --tiny --port 7860 (then open http://127.0.0.1:7860)",
    )
    add_model_choice_argument(parser, "which model to serve (default e1.1)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    server.add_argument("--auth", help=f"user:password required to use the app (env {ENV_WEB_AUTH})")
    server.add_argument("--results-dir", default="results",
                        help="where results are written, a folder of their own (default results)")
    server.add_argument("--max-results-gb", type=float, default=10.0,
                        help="remove the oldest results beyond this many GiB in all (default 10; 0: no bound)")
    server.add_argument("--keep-results-hours", type=float, default=168.0,
                        help="remove results older than this (default 168, a week; 0: keep them)")
    server.add_argument("--concurrency", type=int, default=1,
                        help="jobs taken from the queue at once (default 1; the model runs one edit at a time "
                             "whatever this says, so more only overlaps decoding and saving)")
    server.add_argument("--max-queue", type=int, default=8, help="jobs that may wait; more get 'busy' (default 8)")
    server.add_argument("--max-upload-mb", type=int, default=50, help="largest upload in MiB (default 50)")
    server.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels (default 40M)")
    server.add_argument("--max-batch", type=int, default=32, help="most images in one batch (default 32)")
    server.add_argument("--refresh", type=float, default=5.0, help="device panel refresh in seconds (default 5)")
    server.add_argument("--verbose", action="store_true", help="log details (INFO)")
    if spec.prompt_form:
        add_rewrite_arguments(parser, spec, in_page=True)
    add_model_arguments(parser, spec)
    add_cache_arguments(parser)
    add_distributed_arguments(parser)
    return parser


def _vlm_settings(args: argparse.Namespace, env: Mapping[str, str]) -> VLMSettings | None:
    url, model = getattr(args, "vlm_url", None), getattr(args, "vlm_model", None)
    if not url and not model:
        return None
    if not url or not model:
        raise UserError("--vlm-url and --vlm-model go together")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UserError(f"--vlm-url must be an http(s) URL, got {url!r}")
    return VLMSettings(url, model, vlm_api_key(env), timeout_s=args.vlm_timeout)


def _expand_home(text: str, env: Mapping[str, str]) -> Path:
    """`~` and `~/...` from the given environment's home (the process environment is not read here)."""
    if text == "~" or text.startswith("~/"):
        homes = home_dirs(env)
        if homes:
            return homes[0] / text[2:]
    return Path(text).expanduser() if text.startswith("~") else Path(text)


def web_settings_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> WebSettings:
    auth = parse_auth(args.auth, "--auth") if args.auth else parse_auth(web_auth_value(env), ENV_WEB_AUTH)
    for name, value, low in (("--concurrency", args.concurrency, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-upload-mb", args.max_upload_mb, 1), ("--max-pixels", args.max_pixels, 1),
                             ("--max-batch", args.max_batch, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    if not 0.5 <= args.refresh <= 3600:
        raise UserError(f"--refresh must be between 0.5 and 3600 seconds, got {args.refresh:g}")
    for name, value in (("--max-results-gb", args.max_results_gb), ("--keep-results-hours", args.keep_results_hours)):
        if not 0 <= value < math.inf:  # also false for nan
            raise UserError(f"{name} must be a finite number, 0 or more (0: no bound), got {value:g}")
    results_dir = _expand_home(args.results_dir, env)
    if results_dir.exists() and not results_dir.is_dir():
        raise UserError(f"--results-dir {results_dir} is not a directory")
    check_results_dir(results_dir, home_dirs(env))
    return WebSettings(
        results_dir=results_dir.resolve(),
        host=args.host,
        port=args.port,
        auth=auth,
        concurrency=args.concurrency,
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_batch=args.max_batch,
        refresh_s=args.refresh,
        vlm=_vlm_settings(args, env),
        vlm_fallback=getattr(args, "rewrite_fallback", False),
        max_results_gb=args.max_results_gb,
        keep_results_hours=args.keep_results_hours,
        cache=CacheSettings(args.cache, args.cache_threshold, args.cache_warmup, args.cache_max_skip),
    )


def parse_command_line(argv: Sequence[str], env: Mapping[str, str]) -> tuple[str, argparse.Namespace, WebSettings]:
    """(model, args, web settings); bad flags exit 2 with one line, bad values raise UserError."""
    pre = OneLineArgumentParser(prog="gradio_demo_npu.py", add_help=False)
    add_model_choice_argument(pre, "")
    known, _ = pre.parse_known_args(argv)
    args = build_parser(known.model).parse_args(argv)
    return args.model, args, web_settings_from_args(args, env)


def editor_settings_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> EditorSettings:
    """How to load the model, from the shared model/device flags (flags win over the environment)."""
    return shared_editor_settings(args, model_spec(args.model), env)


def start_logging(verbose: bool) -> None:
    """The scripts' logging setup, shared with the CLIs."""
    configure_logging(verbose)
