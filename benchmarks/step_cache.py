"""Step caching: block forwards, seconds per edit against --cache off, and PSNR against the uncached image.

Loads the model once and runs the same edit (same seed) under each cache setting, interleaving the repeats
so that a busy machine slows every setting alike; prints per setting the cached steps, the transformer
block forwards of one edit, the median seconds per edit (load and the first, warming edit left out), its
ratio to --cache off and the PSNR of the image against the uncached one.

On the tiny random-weight set (--tiny) the first block's residual changes 40-50% between steps, so the
published threshold (0.08) caches nothing there and only a forced one (e.g. dbcache:10:1) shows the
saving; quality can only be judged on real weights, pointed at like the CLIs (--llama-path, --i1-path,
--e1-path / --e1-full-path) with a real --image.

    python benchmarks/step_cache.py --tiny [--steps 8] [--setting off dbcache:0.08:8 dbcache:10:1 ...]
    python benchmarks/step_cache.py --image photo.jpg --instruction "..." --device npu --steps 28

A setting is MODE[:THRESHOLD[:WARMUP[:MAX_SKIP]]], e.g. taylorseer:0.08:8:3.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # as the entry scripts: survive a missing CANN
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hidream_edit.config import (  # noqa: E402 - the repository root is put on the path first
    add_device_arguments,
    add_model_choice_argument,
    add_model_source_arguments,
    configure_logging,
    edit_path_from_args,
    model_spec,
    resolve_model_sources,
)
from hidream_edit.errors import UserError  # noqa: E402
from hidream_edit.step_cache import (  # noqa: E402
    DEFAULT_THRESHOLD,
    DEFAULT_WARMUP,
    CacheSettings,
    check_cache_values,
)

DEFAULT_SETTINGS = ["off", "dbcache:0.08:8", "taylorseer:0.08:8", "dbcache:10:1", "taylorseer:10:2"]


def parse_setting(text: str) -> CacheSettings:
    """MODE[:THRESHOLD[:WARMUP[:MAX_SKIP]]] -> CacheSettings (defaults for what is left out)."""
    parts = text.split(":")
    try:
        threshold = float(parts[1]) if len(parts) > 1 else DEFAULT_THRESHOLD
        warmup = int(parts[2]) if len(parts) > 2 else DEFAULT_WARMUP
        max_skip = int(parts[3]) if len(parts) > 3 else 0
        check_cache_values(parts[0], threshold, warmup, max_skip)
    except (ValueError, UserError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}; use MODE[:THRESHOLD[:WARMUP[:MAX_SKIP]]]") from None
    return CacheSettings(parts[0], threshold, warmup, max_skip)


def psnr(image: Any, reference: Any) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images (inf when identical)."""
    import numpy as np

    error = np.mean((np.asarray(image, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) ** 2)
    return math.inf if error == 0 else 10 * math.log10(255.0**2 / error)


def label(settings: CacheSettings) -> str:
    if not settings.enabled:
        return "off"
    cap = f", max-skip {settings.max_skip}" if settings.max_skip else ""
    return f"{settings.mode} {settings.threshold:g}, warm-up {settings.warmup}{cap}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_choice_argument(parser, "model (default e1.1)")
    add_model_source_arguments(parser, None)
    add_device_arguments(parser)
    parser.add_argument("--image", help="source image (default: a generated 64x48 gradient, for --tiny)")
    parser.add_argument("--instruction", default="make the sky purple")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--refine-strength", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=2, help="timed edits per setting (default 2)")
    parser.add_argument("--setting", nargs="+", type=parse_setting, default=None,
                        help="cache settings to compare, MODE[:THRESHOLD[:WARMUP[:MAX_SKIP]]] (off is always run)")
    args = parser.parse_args()
    configure_logging(False)
    import numpy as np
    import torch
    from PIL import Image

    from hidream_edit.editor import Editor, EditorSettings, EditRequest

    if args.tiny:
        torch.set_num_threads(1)
    spec = model_spec(args.model)
    if args.image is None and not args.tiny:
        parser.error("real weights need a real --image to judge quality")
    sources = resolve_model_sources(spec, args.llama_path, args.i1_path, edit_path_from_args(args, spec), args.tiny)
    editor = Editor.load(EditorSettings(sources=sources, device=args.device, dtype=args.dtype))
    ramp = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    image = Image.open(args.image).convert("RGB") if args.image else Image.fromarray(ramp)
    settings = [CacheSettings(), *[s for s in (args.setting or map(parse_setting, DEFAULT_SETTINGS)) if s.enabled]]

    def edit(cache: CacheSettings) -> tuple[float, Any, dict[str, Any]]:
        request = EditRequest(image=image, instruction=args.instruction, steps=args.steps,
                              refine_strength=args.refine_strength, cache=cache.mode, cache_threshold=cache.threshold,
                              cache_warmup=cache.warmup, cache_max_skip=cache.max_skip)
        started = time.perf_counter()
        result = editor.edit(request)
        return time.perf_counter() - started, result.image, result.metadata["cache"]

    edit(settings[0])  # warms up kernels and caches
    seconds: dict[int, list[float]] = {index: [] for index in range(len(settings))}
    outcomes: dict[int, tuple[Any, dict[str, Any]]] = {}
    for _ in range(max(1, args.repeats)):
        for index, cache in enumerate(settings):
            took, result_image, record = edit(cache)
            seconds[index].append(took)
            outcomes[index] = (result_image, record)
    print(f"{spec.title}{' tiny' if args.tiny else ''}, {args.steps} steps (refine strength {args.refine_strength}), "
          f"{editor.dm.device} {editor.dm.dtype_name}, median of {max(1, args.repeats)} edits per setting")
    print(f"{'setting':<36} {'cached':>9} {'block forwards':>15} {'s/edit':>8} {'vs off':>7} {'PSNR dB':>8}")
    reference_time = statistics.median(seconds[0])
    reference_image = outcomes[0][0]
    for index, cache in enumerate(settings):
        result_image, record = outcomes[index]
        median = statistics.median(seconds[index])
        quality = psnr(result_image, reference_image)
        print(f"{label(cache):<36} {record['cached_steps']:>4} of {record['steps']:<2} {record['block_forwards']:>15} "
              f"{median:>8.2f} {reference_time / median:>6.2f}x {quality:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
