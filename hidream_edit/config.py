"""Configuration: the one place that reads the environment, and the one definition of each shared flag.

Front ends (the two CLIs, the web UI, the environment doctor) build their parsers from the `add_*`
functions here and turn parsed flags plus environment variables into fully resolved settings with the
`*_from_args` functions; nothing below this layer reads `os.environ`. The exceptions are documented in
docs/ARCHITECTURE.md section 1: device_utils keeps LOCAL_RANK (torchrun's contract) and the torch
autoload switch (TORCH_DEVICE_BACKEND_AUTOLOAD), and its own command line (`python device_utils.py`)
reads PREFERRED_DEVICE and PREFERRED_DTYPE, since that module imports nothing of ours. Flags win over
environment variables.

Importing this module imports no torch, so the doctor can build its parser on a machine where torch is
broken; the device choices are read from device_utils when a parser is built.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from hidream_edit.errors import UserError
from hidream_edit.placement import OFFLOAD_CHOICES, PLACEMENT_HELP, parse_host, parse_size
from hidream_edit.spec import (
    CFG_PARALLEL_SIZES,
    I1_HUB_ID,
    LLAMA_HUB_ID,
    MODEL_NAMES,
    MODELS,
    REFINE_WEIGHTS,
    SIDE_MULTIPLE,
    ModelSpec,
)
from hidream_edit.text import LINE_CHARS, shown

if TYPE_CHECKING:
    from hidream_edit.editor import EditorSettings, EditRequest
    from hidream_edit.full_size import FullSizeSettings
    from hidream_edit.images import ImageSource
    from hidream_edit.models import ModelSources

EXIT_USER_ERROR = 2

ENV_DEVICE = "PREFERRED_DEVICE"
ENV_DTYPE = "PREFERRED_DTYPE"
ENV_ATTENTION = "HIDREAM_ATTENTION"
ENV_LLAMA_PATH = "HIDREAM_LLAMA_PATH"
ENV_I1_PATH = "HIDREAM_I1_PATH"
ENV_TINY_DIR = "HIDREAM_TINY_DIR"
ENV_HUB_OFFLINE = "HF_HUB_OFFLINE"
ENV_VLM_KEY = "OPENAI_API_KEY"
ENV_WEB_AUTH = "HIDREAM_GRADIO_AUTH"
ENV_CACHE_HOME = "XDG_CACHE_HOME"
# torchrun's contract with its workers (https://pytorch.org/docs/stable/elastic/run.html).
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_RANK = "RANK"
ENV_LOCAL_RANK = "LOCAL_RANK"
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"

DEFAULT_DIST_TIMEOUT_S = 1800.0


RNG_PLACEMENTS = ("device", "cpu")
# Where each model source is set: the flag, its environment variable, and the words for messages.
SOURCE_FLAGS = {"llama": "--llama-path", "i1": "--i1-path"}


# How a command-line user fixes a library error (UserError.fix), in flags; the web UI shows the message alone.
CLI_FIXES = {
    "output_exists": "choose another --output or pass --overwrite",
    "output_name": "choose another --output",
    "fused_lora_refine": "--refine-strength 0, or drop --fuse-lora",
    "dtype_fp16": "rerun with --dtype bf16 where the device supports it, else --dtype fp32",
    "dtype_bf16": "rerun with --dtype fp32",
}


def cli_error_line(exc: BaseException, spec: ModelSpec) -> str:
    """The one line a command-line user sees for a library error, with the flag that fixes it if any."""
    fix = getattr(exc, "fix", None)
    role = getattr(exc, "role", None)
    if role is not None:
        line = f"{exc}; check {source_flag(spec, role)} (or try --tiny)"
    else:
        line = f"{exc}; {CLI_FIXES[fix]}" if fix in CLI_FIXES else str(exc)
    return shown(line, LINE_CHARS)


def environment(env: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """The process environment, or the mapping a caller (a test, an embedding app) passes instead."""
    return os.environ if env is None else env


def is_truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline(env: Mapping[str, str] | None = None) -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    return is_truthy(environment(env).get(ENV_HUB_OFFLINE))


def vlm_api_key(env: Mapping[str, str] | None = None) -> str | None:
    """The key for the OpenAI-compatible rewrite endpoint, if any."""
    return environment(env).get(ENV_VLM_KEY) or None


def web_auth_value(env: Mapping[str, str] | None = None) -> str | None:
    """HIDREAM_GRADIO_AUTH ("user:password"), used when --auth is not given."""
    return environment(env).get(ENV_WEB_AUTH) or None


def source_flag(spec: ModelSpec, role: str) -> str:
    """The flag that sets one model source ("llama", "i1" or "edit"), for messages to CLI users."""
    return spec.edit_flag if role == "edit" else SOURCE_FLAGS[role]


def default_tiny_dir(env: Mapping[str, str] | None = None) -> Path:
    """HIDREAM_TINY_DIR, else a per-user cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    env = environment(env)
    if env.get(ENV_TINY_DIR):
        return Path(env[ENV_TINY_DIR]).expanduser()
    cache = Path(env.get(ENV_CACHE_HOME) or Path.home() / ".cache")
    return cache / "hidream-e1-npu" / "tiny"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (and exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


@dataclass(frozen=True)
class DeviceChoices:
    """Names the device layer accepts, read from device_utils (None where torch cannot be imported)."""

    dtypes: tuple[str, ...] | None
    attention: tuple[str, ...] | None
    offload: tuple[str, ...] | None


def device_choices() -> DeviceChoices:
    try:
        from device_utils import ATTENTION_BACKENDS, DTYPES, MEMORY_MODES
    except Exception:  # torch missing or broken: the doctor still parses its flags and reports why
        return DeviceChoices(None, None, None)
    return DeviceChoices(("auto", *DTYPES), ATTENTION_BACKENDS, MEMORY_MODES)


def add_model_source_arguments(parser: argparse.ArgumentParser, spec: ModelSpec | None) -> None:
    """--tiny and where each model's weights come from. `spec` None: the edit flags of every model."""
    group = parser.add_argument_group("model files")
    group.add_argument("--tiny", action="store_true", help="use the built-in tiny random-weight checkpoints (noise)")
    group.add_argument("--llama-path", help=f"Llama-3.1-8B-Instruct dir or hub id (env {ENV_LLAMA_PATH})")
    group.add_argument("--i1-path", help=f"HiDream-I1-Full dir or hub id (env {ENV_I1_PATH})")
    for each in MODELS.values() if spec is None else (spec,):
        group.add_argument(each.edit_flag, help=f"{each.edit_help} (env {each.edit_env})")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype."""
    choices = device_choices()
    group = parser.add_argument_group("device")
    group.add_argument("--device", help=f"auto, npu, npu:N, cuda, cuda:N or cpu (env {ENV_DEVICE}, default auto)")
    group.add_argument("--dtype", choices=choices.dtypes, help=f"auto, bf16, fp16 or fp32 (env {ENV_DTYPE})")


def add_model_arguments(parser: argparse.ArgumentParser, spec: ModelSpec) -> None:
    """Where the weights come from and how they are placed: shared by the CLIs and the web UI."""
    add_model_source_arguments(parser, spec)
    add_device_arguments(parser)
    group = add_placement_arguments(parser)
    if spec.uses_lora:
        group.add_argument("--fuse-lora", action="store_true",
                           help="merge the LoRA into the weights (needs --refine-strength 0)")
    group.add_argument("--vae-tiling", action="store_true", help="decode in tiles to save memory")
    group.add_argument("--rng", choices=RNG_PLACEMENTS, default="device",
                       help="where the seed's noise is drawn; cpu gives the same noise on every device")
    group.add_argument("--refine-weights", choices=REFINE_WEIGHTS, default="edit",
                       help="refine-stage weights: edit (upstream's measured behaviour) or base (true I1)")


def add_placement_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--attention, --offload, --max-memory, --host-memory, --encoder-device: how the memory plan places a model;
    shared by the CLIs, the web UI and the doctor's full-size run. Returns the group for more flags."""
    choices = device_choices()
    group = parser.add_argument_group("placement and kernels")
    group.add_argument("--attention", choices=choices.attention, help=f"attention kernel (env {ENV_ATTENTION})")
    group.add_argument("--offload", choices=OFFLOAD_CHOICES, default="auto",
                       help="where components live: auto (default: the fastest placement the memory plan says fits), "
                       + "; ".join(f"{name}: {text}" for name, text in PLACEMENT_HELP.items()))
    group.add_argument("--max-memory", type=size_argument, metavar="SIZE",
                       help="use at most SIZE of each card (e.g. 40GiB), so a card can be shared")
    group.add_argument("--host-memory", type=size_argument, metavar="SIZE",
                       help="plan with SIZE of host memory instead of what this machine has available")
    group.add_argument("--encoder-device", metavar="DEVICE",
                       help="second card for the text encoders (split placement), e.g. npu:1")
    return group


def at_least_one(flag: str) -> Callable[[str], int]:
    """argparse type for a count that must be a whole number of at least 1 (a bad one is one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be a whole number of at least 1, got {text!r}")
        return value

    return parse


def source_side_argument(text: str) -> int:
    """argparse type for --size: the side of the full-size run's square source, a multiple of 16 up to 1024."""
    from hidream_edit.full_size import SPEC, largest_side

    largest = largest_side(SPEC)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value % SIDE_MULTIPLE or not SIDE_MULTIPLE <= value <= largest:
        raise argparse.ArgumentTypeError(
            f"--size must be a multiple of {SIDE_MULTIPLE} from {SIDE_MULTIPLE} to {largest} (pixels), got {text!r}")
    return value


def add_full_size_arguments(parser: argparse.ArgumentParser) -> None:
    """The doctor's full-size run: E1.1 at the real sizes with random weights (plus the placement flags)."""
    from hidream_edit.full_size import DEFAULT_STEPS, WARMUP_STEPS

    group = parser.add_argument_group("full-size run (E1.1 at the real sizes, random weights, nothing downloaded)")
    group.add_argument("--full-size", action="store_true",
                       help="build the real-size pipeline with random weights on this device, run one edit, and "
                            "print seconds per step and measured beside predicted peak memory")
    group.add_argument("--steps", type=at_least_one("--steps"), metavar="N",
                       help=f"timed steps per stage, edit and refine, after {WARMUP_STEPS} warm-up edit step "
                            f"(default {DEFAULT_STEPS})")
    group.add_argument("--blocks", type=at_least_one("--blocks"), metavar="N",
                       help="keep only N double- and N single-stream transformer blocks and N Llama / T5 layers "
                            "(for a smaller machine; the record says what was cut)")
    group.add_argument("--size", type=source_side_argument, metavar="PIXELS",
                       help="side of the square source (default 1024, E1.1's working size)")
    add_placement_arguments(parser)


# Flags that mean something only with --full-size; the value each has when not given.
FULL_SIZE_ONLY = {"steps": None, "blocks": None, "size": None, "attention": None, "offload": "auto",
                  "max_memory": None, "host_memory": None, "encoder_device": None}


def full_size_settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> FullSizeSettings:
    """FullSizeSettings from the doctor's flags (HIDREAM_ATTENTION when --attention is not given)."""
    from hidream_edit.full_size import FullSizeSettings

    given = {name: getattr(args, name) for name in ("steps", "blocks", "size") if getattr(args, name) is not None}
    return FullSizeSettings(
        **given,
        offload=args.offload,
        attention=args.attention or environment(env).get(ENV_ATTENTION) or None,
        max_memory=args.max_memory,
        host_memory=args.host_memory,
        encoder_device=args.encoder_device,
    )


def size_argument(text: str) -> int:
    """argparse type for memory sizes (40GiB, 64GB): a bad one is argparse's one-line error."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def host_argument(text: str) -> str:
    """argparse type for --plan-host NxSIZE: checked here, kept as text (the plan shows it)."""
    try:
        parse_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """--plan, --plan-host and --json: print the memory plan and exit, without loading weights."""
    group = parser.add_argument_group("memory plan")
    group.add_argument("--plan", action="store_true",
                       help="print where each component would live and the predicted peaks, then exit")
    group.add_argument("--plan-host", type=host_argument, metavar="NxSIZE",
                       help="plan for a host of N cards with SIZE free each (e.g. 2x64GiB), not this one")
    group.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")


def add_edit_arguments(parser: argparse.ArgumentParser, spec: ModelSpec) -> None:
    """Per-edit settings with the model's upstream defaults."""
    d = spec.defaults
    group = parser.add_argument_group("edit settings")
    group.add_argument("--negative", default=d.negative, help=f"negative prompt (default: {d.negative!r})")
    group.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps (default: {d.steps})")
    group.add_argument("--guidance", type=float, default=d.guidance, help=f"text guidance (default: {d.guidance})")
    group.add_argument("--image-guidance", type=float, default=d.image_guidance,
                       help=f"image guidance (default: {d.image_guidance})")
    group.add_argument("--refine-strength", type=float, default=d.refine_strength,
                       help=f"fraction of steps in the refine stage, 0..1 (default: {d.refine_strength})")
    group.add_argument("--no-clip-cfg-norm", dest="clip_cfg_norm", action="store_false",
                       help="use plain two-scale guidance instead of the norm-clipped one")
    group.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")


def _cache_threshold(text: str) -> float:
    """argparse type for --cache-threshold: a finite number, 0 or more."""
    from hidream_edit.step_cache import MAX_THRESHOLD

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cache-threshold must be a number, got {text!r}") from None
    if not 0 <= value <= MAX_THRESHOLD:  # also false for nan
        raise argparse.ArgumentTypeError(f"--cache-threshold must be from 0 to {MAX_THRESHOLD:g}, got {text!r}")
    return value


def _cache_steps(flag: str) -> Callable[[str], int]:
    """argparse type for a whole number of steps, 0 or more (--cache-warmup, --cache-max-skip)."""
    from hidream_edit.step_cache import MAX_COUNT

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a whole number of steps, got {text!r}") from None
        if not 0 <= value <= MAX_COUNT:
            raise argparse.ArgumentTypeError(f"{flag} must be from 0 to {MAX_COUNT} steps, got {text!r}")
        return value

    return parse


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """--cache and its settings (README_NPU.md, "Step caching"): shared by both CLIs, batches and the web UI."""
    from hidream_edit.step_cache import CACHE_MODES, DEFAULT_THRESHOLD, DEFAULT_WARMUP

    group = parser.add_argument_group("step caching (faster, changes pixels)")
    group.add_argument("--cache", choices=CACHE_MODES, default="off",
                       help="skip most transformer blocks in steps whose first block changed little: dbcache "
                            "reuses the last computed residual, taylorseer extrapolates it (default off)")
    group.add_argument("--cache-threshold", type=_cache_threshold, default=DEFAULT_THRESHOLD, metavar="F",
                       help="relative change of the first block's residual below which a step is cached "
                            f"(default {DEFAULT_THRESHOLD:g}, cache-dit's HiDream setting; 0 caches nothing)")
    group.add_argument("--cache-warmup", type=_cache_steps("--cache-warmup"), default=DEFAULT_WARMUP, metavar="N",
                       help=f"steps always computed at the start of each stage (default {DEFAULT_WARMUP})")
    group.add_argument("--cache-max-skip", type=_cache_steps("--cache-max-skip"), default=0, metavar="N",
                       help="most consecutive cached steps (default 0: no limit)")


class DeprecatedFlag(argparse.Action):
    """A store_true flag whose old spelling still works for one release, with a warning naming the new one."""

    def __init__(self, option_strings: list[str], dest: str, new_name: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)  # type: ignore[arg-type]
        self.new_name = new_name

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        if option_string != self.new_name:
            print(f"warning: {option_string} is deprecated; use {self.new_name}", file=sys.stderr)
        setattr(namespace, self.dest, True)


def vlm_timeout_seconds(value: str) -> float:
    """argparse type for --vlm-timeout: a finite number of seconds in (0, MAX_VLM_TIMEOUT_S]."""
    from hidream_edit.instructions import MAX_VLM_TIMEOUT_S

    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--vlm-timeout must be a number of seconds, got {value!r}") from None
    if not 0 < seconds <= MAX_VLM_TIMEOUT_S:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"--vlm-timeout must be more than 0 and at most {MAX_VLM_TIMEOUT_S:g} seconds, got {value!r}"
        )
    return seconds


def add_rewrite_arguments(parser: argparse.ArgumentParser, spec: ModelSpec, in_page: bool = False) -> None:
    """The VLM instruction rewrite (models with a prompt form). `in_page`: the web UI, where a checkbox asks."""
    from hidream_edit.instructions import VLM_TIMEOUT_S

    where = "offered in the page when --vlm-url and --vlm-model are given" if in_page else "asked with a flag"
    group = parser.add_argument_group(f"instruction rewrite ({spec.title}; {where})")
    if not in_page:
        group.add_argument("--rewrite-instruction", "--refine-instruction", action=DeprecatedFlag,
                           new_name="--rewrite-instruction", dest="rewrite_instruction",
                           help=f"ask a vision-language model to write the {spec.title} prompt "
                                "(--refine-instruction: deprecated old name)")
    group.add_argument("--vlm-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    group.add_argument("--vlm-model", help=f"model name at that endpoint (key from {ENV_VLM_KEY})")
    group.add_argument("--vlm-timeout", type=vlm_timeout_seconds, default=VLM_TIMEOUT_S,
                       help="seconds for the whole VLM call, retries included (default %(default)g)")
    group.add_argument("--rewrite-fallback", "--refine-fallback", action=DeprecatedFlag, new_name="--rewrite-fallback",
                       dest="rewrite_fallback",
                       help="if the rewrite fails, go on with the bare instruction "
                            "(--refine-fallback: deprecated old name)")


def add_model_choice_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--model", choices=MODEL_NAMES, default="e1.1", help=help_text)


def configure_logging(verbose: bool) -> None:
    """Script-level logging: our warnings always, details with --verbose; library progress bars off.

    Settles torch_npu first: diffusers and transformers, imported here, probe for it on their own.
    """
    from device_utils import npu_status

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


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; use one of: {', '.join(MODEL_NAMES)}") from None


def resolve_model_sources(
    spec: ModelSpec,
    llama_path: str | None = None,
    i1_path: str | None = None,
    edit_path: str | None = None,
    tiny: bool = False,
    env: Mapping[str, str] | None = None,
) -> ModelSources:
    """Flags win, then HIDREAM_*_PATH variables, then the real hub ids; `tiny` builds or reuses the tiny set."""
    from hidream_edit.models import ModelSources

    env = environment(env)
    if tiny:
        given = [flag for flag, value in (("--llama-path", llama_path), ("--i1-path", i1_path),
                                          (spec.edit_flag, edit_path)) if value]
        if given:
            raise UserError(f"--tiny uses the built-in tiny checkpoints; drop {', '.join(given)}")
        from hidream_edit.tiny import ensure_tiny_checkpoints

        folder = default_tiny_dir(env)
        try:
            tiny_set = ensure_tiny_checkpoints(folder)
        except OSError as exc:  # a read-only or foreign folder: say which one and how to choose another
            detail = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
            raise UserError(
                f"cannot build the tiny checkpoints in {folder}: {detail}; "
                f"set {ENV_TINY_DIR} to a writable folder of their own"
            ) from exc
        return ModelSources(
            spec.name, str(tiny_set.llama), str(tiny_set.i1), str(tiny_set.edit_source(spec)), tiny=True, offline=True
        )
    return ModelSources(
        model=spec.name,
        llama=llama_path or env.get(ENV_LLAMA_PATH) or LLAMA_HUB_ID,
        i1=i1_path or env.get(ENV_I1_PATH) or I1_HUB_ID,
        edit=edit_path or env.get(spec.edit_env) or spec.edit_hub_id,
        offline=hub_offline(env),
    )


def edit_path_from_args(args: argparse.Namespace, spec: ModelSpec) -> str | None:
    return getattr(args, spec.edit_flag.removeprefix("--").replace("-", "_"), None)


def model_sources_from_args(
    args: argparse.Namespace, spec: ModelSpec, env: Mapping[str, str] | None = None
) -> ModelSources:
    return resolve_model_sources(
        spec, args.llama_path, args.i1_path, edit_path_from_args(args, spec), tiny=args.tiny, env=env
    )


def plan_dtype(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> str:
    """The dtype to plan a described host in: --dtype, else PREFERRED_DTYPE, else bf16 (what a 910B runs)."""
    name = (args.dtype or environment(env).get(ENV_DTYPE) or "auto").strip().lower()
    return "bf16" if name == "auto" else name


def attention_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """HIDREAM_ATTENTION, checked here so that a bad value names the variable (the flag is checked by argparse)."""
    value = (environment(env).get(ENV_ATTENTION) or "").strip()
    if not value:
        return None
    choices = device_choices().attention
    if choices is not None and value.lower() not in choices:
        raise UserError(f"{ENV_ATTENTION}={value!r} is not an attention kernel; use one of: {', '.join(choices)}")
    return value.lower()


def editor_settings_from_args(
    args: argparse.Namespace, spec: ModelSpec, env: Mapping[str, str] | None = None
) -> EditorSettings:
    """EditorSettings from parsed model flags and the environment."""
    from device_utils import preferences_from
    from hidream_edit.editor import EditorSettings

    env = environment(env)
    device = preferences_from(env, args.device, args.dtype)
    return EditorSettings(
        sources=model_sources_from_args(args, spec, env),
        device=device.device,
        dtype=device.dtype,
        device_origin=device.device_origin,
        dtype_origin=device.dtype_origin,
        attention=args.attention or attention_from_env(env),
        offload=args.offload,
        max_memory=args.max_memory,
        host_memory=args.host_memory,
        encoder_device=args.encoder_device,
        rng=args.rng,
        refine_weights=args.refine_weights,
        fuse_lora=getattr(args, "fuse_lora", False),
        vae_tiling=args.vae_tiling,
    )


def edit_request_from_args(args: argparse.Namespace, image: ImageSource, instruction: str) -> EditRequest:
    """The per-edit settings of the command line (None where the model's default applies) as an EditRequest."""
    from hidream_edit.editor import EditRequest

    return EditRequest(
        image=image,
        instruction=instruction,
        negative=args.negative,
        steps=args.steps,
        guidance=args.guidance,
        image_guidance=args.image_guidance,
        refine_strength=args.refine_strength,
        clip_cfg_norm=args.clip_cfg_norm,
        seed=args.seed,
        keep_aspect=getattr(args, "keep_aspect", False),
        cache=args.cache,
        cache_threshold=args.cache_threshold,
        cache_warmup=args.cache_warmup,
        cache_max_skip=args.cache_max_skip,
    )


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """Batch input and output: a folder with one instruction, or a JSON Lines manifest; resumable."""
    group = parser.add_argument_group("batch (instead of --image/--output)")
    group.add_argument("--input-dir", help="edit every image in this folder with --instruction")
    group.add_argument("--recursive", action="store_true", help="with --input-dir: include sub-folders")
    group.add_argument("--manifest", help="JSON Lines file, one edit per line (image, instruction, output, ...)")
    group.add_argument("--output-dir", help="where batch outputs, their metadata and summary.json go")


def dist_timeout_seconds(value: str) -> float:
    """argparse type for --dist-timeout: a finite number of seconds, more than 0."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dist-timeout must be a number of seconds, got {value!r}") from None
    if not 0 < seconds < math.inf:  # also false for nan
        raise argparse.ArgumentTypeError(f"--dist-timeout must be a finite number of seconds above 0, got {value!r}")
    return seconds


def tensor_parallel_degree(value: str) -> int:
    """argparse type for --tensor-parallel: a whole number of processes, at least 1 (the model's head
    count, checked before loading, says which degrees split it)."""
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--tensor-parallel must be a whole number of processes, got {value!r}")
    return int(value)


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Several processes under torchrun: data parallel over images, guidance parallel within one edit."""
    group = parser.add_argument_group("several cards (under torchrun)")
    group.add_argument("--cfg-parallel", type=int, choices=CFG_PARALLEL_SIZES, default=1, metavar="K",
                       help="share each edit's guidance branches among K processes (1, 2 or 3; default 1): "
                            "one edit finishes sooner on K cards; the number of processes must be a multiple "
                            "of K (groups of K split a batch)")
    group.add_argument("--tensor-parallel", type=tensor_parallel_degree, default=1, metavar="K",
                       help="split the transformer's weights (attention heads, feed-forward widths) over K "
                            "processes (K divides the head count: 2 or 4 for the real model; default 1): "
                            "each card holds about 1/K of it; with --cfg-parallel C a group is C x K processes")
    group.add_argument("--dist-timeout", type=dist_timeout_seconds, default=DEFAULT_DIST_TIMEOUT_S,
                       help="seconds to wait for the other ranks, in joining and in every collective "
                            f"(default {DEFAULT_DIST_TIMEOUT_S:g})")


@dataclass(frozen=True)
class DistributedEnvironment:
    """What torchrun told this process: its rank among `world_size` and where the rendezvous store is.

    `attempt` is torchrun's restart count, so a restarted group does not read the previous attempt's keys.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    attempt: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _non_negative_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or not value.strip():
        return default
    text = value.strip()
    limit = sys.get_int_max_str_digits()  # 0: no limit (python -X int_max_str_digits=0)
    if not (text.isascii() and text.isdigit()) or 0 < limit < len(text):
        raise UserError(f"{name}={value[:40]!r} is not a non-negative integer")
    return int(text)


def distributed_environment(env: Mapping[str, str] | None = None) -> DistributedEnvironment:
    """WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT as torchrun sets them; one process when unset."""
    env = environment(env)
    world_size = _non_negative_int(env, ENV_WORLD_SIZE, 1)
    if world_size <= 1:
        return DistributedEnvironment()
    rank = _non_negative_int(env, ENV_RANK, -1)
    if not 0 <= rank < world_size:
        raise UserError(f"WORLD_SIZE={world_size} needs RANK between 0 and {world_size - 1} (start with torchrun)")
    master_addr = (env.get(ENV_MASTER_ADDR) or "").strip()
    port = _non_negative_int(env, ENV_MASTER_PORT, -1)
    if not master_addr or port < 0:
        raise UserError(f"WORLD_SIZE={world_size} needs MASTER_ADDR and MASTER_PORT (start with torchrun)")
    if not 0 < port < 2**16:
        raise UserError(f"{ENV_MASTER_PORT}={port} is out of range: a port is between 1 and 65535")
    return DistributedEnvironment(
        world_size=world_size,
        rank=rank,
        local_rank=_non_negative_int(env, ENV_LOCAL_RANK, 0),
        master_addr=master_addr,
        master_port=port,
        attempt=_non_negative_int(env, ENV_RESTART_COUNT, 0),
    )
