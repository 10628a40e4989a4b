"""Seconds per denoising step of one edit: one process against K processes sharing the guidance branches.

Runs the single-image CLI on the tiny random-weight model (CPU, one thread per process, so K processes
use K threads against the single process's one) with and without `torchrun --nproc-per-node K ...
--cfg-parallel K`, reads the per-step timings from the output metadata and prints, for the edit stage
(3 branches) and the refine stage (2 branches) separately: seconds per step, the ratio, and the share
of each step a rank spent waiting on the all_gather. Encoding seconds are printed too: every rank
encodes the prompts itself (no broadcast), so a group should encode in about the time one process does.

K processes also use up to K cores against the single process's one, so on a CPU the ratios show the
split working and what the gather costs, not what cards gain (up to 3x per edit step with K=3, 1.5x
with K=2, 2x per refine step: the arithmetic of the split, not measured on cards).

    python benchmarks/cfg_parallel.py [--model e1.1] [--steps 6] [--refine-strength 0.5] [--k 2 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"e1.1": "inference_e1_1_npu.py", "e1-full": "inference_npu.py"}
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def edit_metadata(
    launcher: list[str], extra: list[str], args: argparse.Namespace, image: Path, output: Path
) -> dict[str, Any]:
    """Run one edit and return its metadata JSON."""
    command = [*launcher, SCRIPTS[args.model], "--tiny", "--image", str(image), "--instruction", "make it snow",
               "--steps", str(args.steps), "--refine-strength", str(args.refine_strength), "--output", str(output),
               *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFERRED_DEVICE": "cpu"}
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(Path(f"{output}.json").read_text())


def stage_seconds(metadata: dict[str, Any], skip_first: bool = True) -> dict[str, float]:
    """Median seconds per step of each stage (the first step, which warms up, left out when there are more)."""
    steps = metadata["timings"]["step_s"]
    start = metadata["refine_start_step"]
    stages = {"edit": steps[:start], "refine": steps[start:]}
    return {name: statistics.median(values[1:] if skip_first and len(values) > 1 else values)
            for name, values in stages.items() if values}


def wait_shares(metadata: dict[str, Any]) -> list[float]:
    """Per rank: the fraction of its step time spent waiting on the collective."""
    shares = []
    for rank in metadata["timings"]["cfg_parallel"]["ranks"]:
        compute = sum(step["compute_s"] for step in rank["steps"])
        wait = sum(step["wait_s"] for step in rank["steps"])
        shares.append(wait / (compute + wait) if compute + wait else 0.0)
    return shares


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SCRIPTS), default="e1.1")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--refine-strength", type=float, default=0.5)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    args = parser.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "in.png"
        Image.new("RGB", (64, 48), (30, 120, 200)).save(image)
        single = edit_metadata([sys.executable], [], args, image, Path(folder) / "single.png")
        base = stage_seconds(single)
        print(f"{args.model}, tiny model, {args.steps} steps (refine strength {args.refine_strength}), CPU, "
              "one thread per process")
        print(f"1 process: encode {single['timings']['encode_s']:.2f} s, "
              + ", ".join(f"{stage} {seconds:.3f} s/step" for stage, seconds in base.items()))
        for k in args.k:
            launcher = [TORCHRUN, "--standalone", "--nproc-per-node", str(k), "--monitor-interval", "0.5"]
            grouped = edit_metadata(launcher, ["--cfg-parallel", str(k)], args, image, Path(folder) / f"k{k}.png")
            seconds = stage_seconds(grouped)
            ratios = ", ".join(f"{stage} {seconds[stage]:.3f} s/step ({base[stage] / seconds[stage]:.2f}x)"
                               for stage in seconds)
            shares = ", ".join(f"rank {rank} {share:.0%}" for rank, share in enumerate(wait_shares(grouped)))
            print(f"{k} processes: encode {grouped['timings']['encode_s']:.2f} s, {ratios}; "
                  f"waiting on all_gather: {shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
