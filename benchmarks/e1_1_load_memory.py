"""Host memory and time of loading an E1.1 transformer: our loader against the naive way, in one run.

Builds a synthetic sharded HiDream transformer checkpoint (a few hundred MB, random weights, the
real on-disk layout) in a temporary folder, then loads it in fresh child processes:
  ours:  hidream_edit.models.load_e1_1_transformer (meta-device model, E1.1 tensors assigned in)
  naive: build the I1 transformer with its weights, load the whole E1.1 sharded dict,
         load_state_dict, keep a state_dict() view (what the upstream script does)
and prints peak RSS growth divided by checkpoint bytes, and load seconds. Goal: ours <= 1.3x.

    python benchmarks/e1_1_load_memory.py [--layers 4 --single-layers 8 --heads 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_checkpoints(root: Path, layers: int, single_layers: int, heads: int) -> int:
    """I1 and E1.1 transformer folders with different random weights; returns E1.1 checkpoint bytes."""
    import torch
    from diffusers import HiDreamImageTransformer2DModel

    config = dict(
        patch_size=2, in_channels=16, num_layers=layers, num_single_layers=single_layers, attention_head_dim=64,
        num_attention_heads=heads, caption_channels=[256, 256], text_emb_dim=128, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(32, 16, 16), max_resolution=(128, 128),
        llama_layers=list(range(layers + single_layers)),
    )
    for name, seed in (("i1", 0), ("e1_1", 1)):
        torch.manual_seed(seed)
        model = HiDreamImageTransformer2DModel(**config)
        model.save_pretrained(root / name / "transformer", max_shard_size="100MB")
        del model
    return sum(p.stat().st_size for p in (root / "e1_1" / "transformer").glob("*.safetensors"))


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def child(mode: str, root: Path) -> None:
    """Load one way and print JSON: baseline RSS, peak RSS, seconds."""
    import torch
    from diffusers import HiDreamImageTransformer2DModel

    from device_utils import load_safetensors
    from hidream_edit.models import load_e1_1_transformer

    baseline = rss_bytes()
    started = time.perf_counter()
    if mode == "ours":
        model = load_e1_1_transformer(root / "i1", root / "e1_1", torch.float32)
        keep = None
    else:
        model = HiDreamImageTransformer2DModel.from_pretrained(root / "i1", subfolder="transformer")
        state = load_safetensors(root / "e1_1" / "transformer")
        model.load_state_dict(state, strict=True)
        keep = model.state_dict()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert model is not None and (keep is None or keep)
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--single-layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--child", choices=("ours", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root)
        return 0
    with tempfile.TemporaryDirectory(prefix="hidream-bench-") as tmp:
        root = Path(tmp)
        checkpoint = build_checkpoints(root, args.layers, args.single_layers, args.heads)
        print(f"synthetic E1.1 transformer checkpoint: {checkpoint / 2**20:.0f} MiB in sharded safetensors")
        results = {}
        for mode in ("ours", "naive"):
            env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--root", str(root)],
                capture_output=True, text=True, check=True, env=env,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        for mode, r in results.items():
            growth = r["peak"] - r["baseline"]
            print(
                f"{mode:>5}: peak RSS growth {growth / 2**20:7.0f} MiB = {growth / checkpoint:.2f}x checkpoint bytes, "
                f"load {r['seconds']:.2f} s"
            )
        ours = (results["ours"]["peak"] - results["ours"]["baseline"]) / checkpoint
        naive = (results["naive"]["peak"] - results["naive"]["baseline"]) / checkpoint
        verdict = "met" if ours <= 1.3 else "NOT met"
        print(f"naive / ours peak-memory ratio: {naive / ours:.2f}; goal ours <= 1.30x: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
