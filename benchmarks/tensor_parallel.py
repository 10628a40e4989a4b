"""Seconds per denoising step of one edit with the transformer whole (K=1) and split over K=2 processes,
and the bytes a split all-reduces per step.

Runs the single-image CLI on the tiny random-weight model (CPU, one thread per process) alone and under
`torchrun --nproc-per-node 2 ... --tensor-parallel 2`, reads the per-step timings from the metadata and
prints seconds per step of the edit stage (3 branches) and the refine stage (2 branches). The bytes are
counted in this process on the same edit: every row-parallel output (all-reduced whole) and every q/k
norm's sum of squares (one fp32 value per token) of one step; a ring all-reduce then moves 2(K-1)/K of
them per rank. On a CPU the tiny model's steps are dominated by per-call overhead (DTensor's dispatch,
gloo), so the times show the split working and what it costs here, not what cards gain.

    python benchmarks/tensor_parallel.py [--model e1.1] [--steps 4] [--refine-strength 0.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cfg_parallel import TORCHRUN, edit_metadata, stage_seconds  # noqa: E402


def reduced_bytes_per_step(args: argparse.Namespace, image: Path) -> dict[str, float]:
    """Bytes the split all-reduces in one step of each stage, counted on a whole transformer in this process."""
    import torch

    from hidream_edit.config import resolve_model_sources
    from hidream_edit.editor import Editor, EditorSettings, EditRequest
    from hidream_edit.spec import MODELS
    from hidream_edit.tensor_split import _plan_for

    torch.set_num_threads(1)
    settings = EditorSettings(resolve_model_sources(MODELS[args.model], tiny=True, env=dict(os.environ)),
                              device="cpu", dtype="fp32", attention="sdpa", host_memory=64 * 2**30)
    editor = Editor.load(settings)
    transformer = editor.loaded.pipe.transformer
    per_step: list[int] = [0]

    def count(kind: str) -> Any:
        def hook(module: Any, inputs: Any, output: torch.Tensor) -> None:
            rows = output.numel() // output.shape[-1]
            per_step[-1] += rows * 4 if kind == "norm" else output.numel() * output.element_size()
        return hook

    for name, kind in _plan_for(transformer).items():
        if kind in ("rowwise", "norm"):
            transformer.get_submodule(name).register_forward_hook(count(kind))
    editor.edit(EditRequest(image=image, instruction="make it snow", steps=args.steps,
                            refine_strength=args.refine_strength),
                on_step=lambda done, total: per_step.append(0))
    steps = per_step[:-1]
    start = editor.last_metadata["refine_start_step"] if editor.last_metadata else len(steps)
    stages = {"edit": steps[:start], "refine": steps[start:]}
    return {name: statistics.median(values) for name, values in stages.items() if values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("e1.1", "e1-full"), default="e1.1")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--refine-strength", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        from PIL import Image

        image = Path(folder) / "in.png"
        Image.new("RGB", (64, 48), (120, 160, 200)).save(image)
        budget = ["--host-memory", "64GiB"]  # the tiny model needs little; a busy machine's free memory is no guide
        one = edit_metadata([sys.executable], budget, args, image, Path(folder) / "one.png")
        two = edit_metadata([TORCHRUN, "--standalone", "--nproc-per-node", "2"], [*budget, "--tensor-parallel", "2"],
                            args, image, Path(folder) / "two.png")
        reduced = reduced_bytes_per_step(args, image)
    single, split = stage_seconds(one), stage_seconds(two)
    print(f"tiny {args.model}, {args.steps} steps, refine strength {args.refine_strength}, one thread per process")
    print("| stage | K=1 s/step | K=2 s/step | all-reduced per step | per rank at K=2 (ring) |")
    print("| --- | --- | --- | --- | --- |")
    for stage in single:
        print(f"| {stage} | {single[stage]:.3f} | {split[stage]:.3f} ({single[stage] / split[stage]:.2f}x) | "
              f"{reduced[stage] / 2**20:.2f} MiB | {reduced[stage] / 2**20:.2f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
