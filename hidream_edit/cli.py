"""The editing command lines: inference_e1_1_npu.py (E1.1) and inference_npu.py (E1-Full).

The flags themselves are defined once in config.py (shared with the web UI and the doctor); this module
builds the edit parser, checks what can be checked before loading, runs the edit and prints the outcome.
A user mistake ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from device_utils import CheckpointError, DeviceError, npu_status
from hidream_edit.config import (
    EXIT_USER_ERROR,
    OneLineArgumentParser,
    add_edit_arguments,
    add_model_arguments,
    add_plan_arguments,
    editor_settings_from_args,
    environment,
    model_spec,
    plan_dtype,
    source_flag,
    vlm_api_key,
)
from hidream_edit.editor import EditCancelled, Editor, EditRequest, image_format_for, resolve_request
from hidream_edit.errors import ModelFilesError, UserError
from hidream_edit.spec import ModelSpec

logger = logging.getLogger("hidream_edit")

USER_ERRORS = (UserError, DeviceError, CheckpointError)


def user_error_line(exc: BaseException, spec: ModelSpec) -> str:
    """The one line a CLI user sees for a library error, naming the flag that fixes it where there is one."""
    if isinstance(exc, ModelFilesError) and exc.role is not None:
        return f"{exc}; check {source_flag(spec, exc.role)} (or try --tiny)"
    return str(exc)


def build_edit_parser(spec: ModelSpec) -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        description=f"Edit an image with {spec.title} following a text instruction, on Ascend NPU, CUDA or CPU.",
        epilog="Example: %(prog)s --tiny --image in.png --instruction 'make the sky blue' --output out.png",
    )
    parser.add_argument("--image", help="input image (required unless --plan)")
    parser.add_argument("--instruction", help="what to change, in words (required unless --plan)")
    parser.add_argument("--output", help="output image; its extension picks the format (required unless --plan)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--verbose", action="store_true", help="log details (INFO)")
    if spec.prompt_form:
        group = parser.add_argument_group(f"{spec.title} prompt")
        group.add_argument("--keep-aspect", action="store_true",
                           help="resize to cover 768x768 and centre-crop instead of stretching")  # fmt: skip
        group.add_argument("--target-description", help="describe the edited image; builds E1-Full's prompt form")
        group.add_argument("--refine-instruction", action="store_true",
                           help="ask a vision-language model to write the E1-Full prompt")  # fmt: skip
        group.add_argument("--vlm-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
        group.add_argument("--vlm-model", help="model name at that endpoint (key from OPENAI_API_KEY)")
        group.add_argument("--vlm-timeout", type=float, default=60.0, help="seconds per request (default 60)")
        group.add_argument("--refine-fallback", action="store_true",
                           help="if refinement fails, go on with the bare instruction")  # fmt: skip
    add_edit_arguments(parser, spec)
    add_model_arguments(parser, spec)
    add_plan_arguments(parser)
    return parser


def run_plan(args: argparse.Namespace, spec: ModelSpec, env: Mapping[str, str]) -> int:
    """--plan: print the memory plan for this machine or a --plan-host one; reads headers, never weights."""
    from hidream_edit.models import sizes_on_disk
    from hidream_edit.placement import described_budgets, plan_for_machine, plan_placement

    settings = editor_settings_from_args(args, spec, env)
    attention = settings.attention or "sdpa"
    if args.plan_host:
        sizes = sizes_on_disk(settings.sources, plan_dtype(args, env), settings.refine_weights)
        budgets = described_budgets(args.plan_host, args.device, settings.max_memory, settings.host_memory)
        plan = plan_placement(spec, sizes, budgets, settings.offload, attention, settings.encoder_device)
    else:
        from device_utils import DeviceManager

        dm = DeviceManager(settings.device, settings.dtype)
        attention = dm.resolve_attention_backend(settings.attention)
        sizes = sizes_on_disk(settings.sources, dm.dtype_name, settings.refine_weights)
        plan = plan_for_machine(spec, sizes, dm.device_type, dm.index, settings.offload, attention,
                                settings.encoder_device, settings.max_memory, settings.host_memory)  # fmt: skip
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.summary())
    return 0


def _check_output(path: Path, overwrite: bool) -> None:
    """Fail before loading any model if the output cannot be written."""
    image_format_for(path)
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} is not a directory")
    json_path = path.with_suffix(path.suffix + ".json")
    if not overwrite:
        for candidate in (path, json_path):
            if candidate.exists():
                raise UserError(f"{candidate} already exists; choose another --output or pass --overwrite")


def _instruction_for(args: argparse.Namespace, spec: ModelSpec, env: Mapping[str, str]) -> str:
    """The prompt to edit with; for E1-Full possibly built from a target description or by a VLM."""
    if not spec.prompt_form:
        return args.instruction
    from hidream_edit.images import open_image
    from hidream_edit.instructions import VLMSettings, compose_e1_full_prompt

    vlm = None
    if args.refine_instruction:
        if not args.vlm_url or not args.vlm_model:
            raise UserError("--refine-instruction needs --vlm-url and --vlm-model")
        vlm = VLMSettings(args.vlm_url, args.vlm_model, vlm_api_key(env), timeout_s=args.vlm_timeout)
    image = open_image(args.image) if vlm is not None else None
    return compose_e1_full_prompt(args.instruction, image, args.target_description, vlm, args.refine_fallback)


def configure_logging(verbose: bool) -> None:
    """Script-level logging: our warnings always, details with --verbose; library progress bars off.

    Settles torch_npu first: diffusers and transformers, imported here, probe for it on their own.
    """
    npu_status()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    level = logging.INFO if verbose else logging.WARNING
    for name in ("hidream_edit", "device_utils"):
        logging.getLogger(name).setLevel(level)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def out_of_memory_hint(exc: BaseException) -> str:
    """One line for a device OOM (torch.OutOfMemoryError or torch_npu's RuntimeError) with what to try."""
    first = str(exc).strip().splitlines()[0][:160]
    return (
        f"out of device memory ({first}); the memory plan (--plan) underestimated this edit: try a slower "
        "placement (--offload model, group or sequential) or --vae-tiling"
    )


def summary_line(result_metadata: dict[str, Any], image_path: Path) -> str:
    t = result_metadata["timings"]
    memory = result_metadata["memory"]
    width, height = result_metadata["source_size"]
    steps = t["step_s"]
    per_step = sum(steps) / len(steps) if steps else 0.0
    device_peak = (
        f"peak device memory {memory['peak'] / 2**30:.2f} GiB" if memory.get("peak") is not None else "no device memory"
    )
    return (
        f"saved {image_path} ({width}x{height}) on {result_metadata['device']} {result_metadata['dtype']}: "
        f"load {t['load_s']:.1f}s, encode {t['encode_s']:.1f}s, "
        f"{len(steps)} steps {sum(steps):.1f}s ({per_step:.2f}s/step), decode {t['decode_s']:.1f}s; "
        f"{device_peak}, host RSS {memory['host_rss'] / 2**30:.2f} GiB"
    )


def run_edit_cli(argv: list[str] | None, model: str, env: Mapping[str, str] | None = None) -> int:
    """Parse, load, edit, save, print a summary. Exit 0 ok, 2 user mistake, 130 interrupted."""
    from tqdm import tqdm

    from hidream_edit.editor import save_result
    from hidream_edit.images import open_image

    env = environment(env)
    spec = model_spec(model)
    parser = build_edit_parser(spec)
    args = parser.parse_args(argv)
    if args.plan:
        try:
            return run_plan(args, spec, env)
        except USER_ERRORS as exc:
            print(f"error: {user_error_line(exc, spec)}", file=sys.stderr)
            return EXIT_USER_ERROR
    missing = [flag for flag in ("--image", "--instruction", "--output") if getattr(args, flag[2:]) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.plan_host or args.json:
        parser.error("--plan-host and --json go with --plan")
    configure_logging(args.verbose)
    output = Path(args.output).expanduser()
    try:
        _check_output(output, args.overwrite)
        open_image(args.image)
        instruction = _instruction_for(args, spec, env)
        settings = editor_settings_from_args(args, spec, env)
        request = EditRequest(
            image=args.image,
            instruction=instruction,
            negative=args.negative,
            steps=args.steps,
            guidance=args.guidance,
            image_guidance=args.image_guidance,
            refine_strength=args.refine_strength,
            clip_cfg_norm=args.clip_cfg_norm,
            seed=args.seed,
            keep_aspect=getattr(args, "keep_aspect", False),
        )
        resolve_request(request, spec, settings.fuse_lora)
        started = time.perf_counter()
        editor = Editor.load(settings)
        with tqdm(total=args.steps, desc="denoising", unit="step", file=sys.stderr) as bar:
            result = editor.edit(request, on_step=lambda done, total: bar.update(done - bar.n))
        image_path, _ = save_result(result, output, overwrite=args.overwrite)
    except USER_ERRORS as exc:
        print(f"error: {user_error_line(exc, spec)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except EditCancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; nothing was saved", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        print(f"error: {out_of_memory_hint(exc)}", file=sys.stderr)
        return 1
    print(summary_line(result.metadata, image_path))
    logger.info("total %.1f s", time.perf_counter() - started)
    return 0
