"""Argument handling shared by inference_e1_1_npu.py, inference_npu.py and gradio_demo_npu.py.

Each flag exists once here; the entry scripts only pick the model. A user mistake ends in one line
on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from device_utils import ATTENTION_BACKENDS, MEMORY_MODES, CheckpointError, DeviceError, npu_status
from hidream_edit.editor import (
    DEFAULTS,
    EditCancelled,
    Editor,
    EditorSettings,
    EditRequest,
    image_format_for,
    resolve_request,
)
from hidream_edit.errors import UserError
from hidream_edit.models import REFINE_WEIGHTS, resolve_model_sources

logger = logging.getLogger("hidream_edit")

USER_ERRORS = (UserError, DeviceError, CheckpointError)
EXIT_USER_ERROR = 2


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (and exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def add_model_arguments(parser: argparse.ArgumentParser, model: str) -> None:
    """Where the weights come from and how they are placed: shared by the CLIs and the web UI."""
    group = parser.add_argument_group("model and device")
    group.add_argument("--tiny", action="store_true", help="use the built-in tiny random-weight checkpoints (noise)")
    group.add_argument("--llama-path", help="Llama-3.1-8B-Instruct dir or hub id (env HIDREAM_LLAMA_PATH)")
    group.add_argument("--i1-path", help="HiDream-I1-Full dir or hub id (env HIDREAM_I1_PATH)")
    if model == "e1.1":
        group.add_argument("--e1-path", help="HiDream-E1-1 dir or hub id (env HIDREAM_E1_PATH)")
    else:
        group.add_argument("--lora-path", help="HiDream-E1-Full LoRA file, dir or hub id (env HIDREAM_E1_FULL_PATH)")
        group.add_argument("--fuse-lora", action="store_true", help="merge the LoRA for speed (needs refine 0)")
    group.add_argument("--device", help="auto, npu, npu:N, cuda, cuda:N or cpu (env PREFERRED_DEVICE)")
    group.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), help="(env PREFERRED_DTYPE)")
    group.add_argument("--attention", choices=ATTENTION_BACKENDS, help="attention kernel (env HIDREAM_ATTENTION)")
    group.add_argument("--offload", choices=MEMORY_MODES, default="none", help="CPU offload mode (default: none)")
    group.add_argument("--vae-tiling", action="store_true", help="decode in tiles to save memory")
    group.add_argument("--rng", choices=("device", "cpu"), default="device",
                       help="where the seed's noise is drawn; cpu gives the same noise on every device")  # fmt: skip
    group.add_argument("--refine-weights", choices=REFINE_WEIGHTS, default="edit",
                       help="refine-stage weights: edit (upstream's measured behaviour) or base (true I1)")  # fmt: skip


def add_edit_arguments(parser: argparse.ArgumentParser, model: str) -> None:
    """Per-edit settings with the model's upstream defaults."""
    d = DEFAULTS[model]
    group = parser.add_argument_group("edit settings")
    group.add_argument("--negative", default=d.negative, help=f"negative prompt (default: {d.negative!r})")
    group.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps (default: {d.steps})")
    group.add_argument("--guidance", type=float, default=d.guidance, help=f"text guidance (default: {d.guidance})")
    group.add_argument("--image-guidance", type=float, default=d.image_guidance,
                       help=f"image guidance (default: {d.image_guidance})")  # fmt: skip
    group.add_argument("--refine-strength", type=float, default=d.refine_strength,
                       help=f"fraction of steps in the refine stage, 0..1 (default: {d.refine_strength})")  # fmt: skip
    group.add_argument("--no-clip-cfg-norm", dest="clip_cfg_norm", action="store_false",
                       help="use plain two-scale guidance instead of the norm-clipped one")  # fmt: skip
    group.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")


def settings_from_args(args: argparse.Namespace, model: str, env: Mapping[str, str] | None = None) -> EditorSettings:
    """EditorSettings from parsed flags; flags win over environment variables."""
    env = os.environ if env is None else env
    sources = resolve_model_sources(
        model,
        llama_path=args.llama_path,
        i1_path=args.i1_path,
        e1_path=getattr(args, "e1_path", None),
        lora_path=getattr(args, "lora_path", None),
        tiny=args.tiny,
        env=env,
    )
    return EditorSettings(
        sources=sources,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        offload=args.offload,
        rng=args.rng,
        refine_weights=args.refine_weights,
        fuse_lora=getattr(args, "fuse_lora", False),
        vae_tiling=args.vae_tiling,
    )


def build_edit_parser(model: str) -> OneLineArgumentParser:
    title = "HiDream-E1.1" if model == "e1.1" else "HiDream-E1-Full"
    parser = OneLineArgumentParser(
        description=f"Edit an image with {title} following a text instruction, on Ascend NPU, CUDA or CPU.",
        epilog="Example: %(prog)s --tiny --image in.png --instruction 'make the sky blue' --output out.png",
    )
    parser.add_argument("--image", required=True, help="input image")
    parser.add_argument("--instruction", required=True, help="what to change, in words")
    parser.add_argument("--output", required=True, help="output image; its extension picks the format")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--verbose", action="store_true", help="log details (INFO)")
    if model == "e1-full":
        group = parser.add_argument_group("E1-Full prompt")
        group.add_argument("--keep-aspect", action="store_true",
                           help="keep the aspect ratio: resize the whole image to about 768x768 pixels "
                                "(sides multiples of 16) instead of stretching it to 768x768")  # fmt: skip
        group.add_argument("--target-description", help="describe the edited image; builds E1-Full's prompt form")
        group.add_argument("--refine-instruction", action="store_true",
                           help="ask a vision-language model to write the E1-Full prompt")  # fmt: skip
        group.add_argument("--vlm-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
        group.add_argument("--vlm-model", help="model name at that endpoint (key from OPENAI_API_KEY)")
        group.add_argument("--vlm-timeout", type=float, default=60.0, help="seconds per request (default 60)")
        group.add_argument("--refine-fallback", action="store_true",
                           help="if refinement fails, go on with the bare instruction")  # fmt: skip
    add_edit_arguments(parser, model)
    add_model_arguments(parser, model)
    return parser


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


def _instruction_for(args: argparse.Namespace, model: str, env: Mapping[str, str]) -> str:
    """The prompt to edit with; for E1-Full possibly built from a target description or by a VLM."""
    if model != "e1-full":
        return args.instruction
    from hidream_edit.images import open_image
    from hidream_edit.instructions import VLMSettings, compose_e1_full_prompt

    vlm = None
    if args.refine_instruction:
        if not args.vlm_url or not args.vlm_model:
            raise UserError("--refine-instruction needs --vlm-url and --vlm-model")
        vlm = VLMSettings(args.vlm_url, args.vlm_model, env.get("OPENAI_API_KEY"), timeout_s=args.vlm_timeout)
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
    return f"out of device memory ({first}); try --offload model, then --offload sequential, and --vae-tiling"


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

    env = os.environ if env is None else env
    args = build_edit_parser(model).parse_args(argv)
    configure_logging(args.verbose)
    output = Path(args.output).expanduser()
    try:
        _check_output(output, args.overwrite)
        open_image(args.image)
        instruction = _instruction_for(args, model, env)
        settings = settings_from_args(args, model, env)
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
        resolve_request(request, model, settings.fuse_lora)
        started = time.perf_counter()
        editor = Editor.load(settings)
        with tqdm(total=args.steps, desc="denoising", unit="step", file=sys.stderr) as bar:
            result = editor.edit(request, on_step=lambda done, total: bar.update(done - bar.n))
        image_path, _ = save_result(result, output, overwrite=args.overwrite)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
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
