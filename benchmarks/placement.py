"""Seconds per edit and peak host RSS for each memory placement with the tiny set, as ratios to `none`.

Each placement runs in a fresh child process on the CPU: load the tiny E1.1 editor with `--offload <p>`,
then one warm-up edit and `--edits` timed edits (2 steps, a small model input). On the CPU the card and
the host are the same memory, so this measures what each placement's hooks cost (moves, group and
offload hooks), not memory saved; the memory saved on a card is what `--plan` predicts.

    python benchmarks/placement.py [--edits 3] [--placements none encoders group]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def child(placement: str, edits: int) -> None:
    """Load and edit with one placement; print JSON: checkpoint bytes, RSS growth at peak, seconds."""
    from PIL import Image

    from hidream_edit.config import resolve_model_sources
    from hidream_edit.editor import Editor, EditorSettings, EditRequest
    from hidream_edit.spec import MODELS

    sources = resolve_model_sources(MODELS["e1.1"], tiny=True)
    source = Image.new("RGB", (40, 30), (30, 120, 200))
    baseline = rss_bytes()
    started = time.perf_counter()
    editor = Editor.load(EditorSettings(sources=sources, device="cpu", dtype="fp32", offload=placement))
    load_s = time.perf_counter() - started
    editor.prepare_image = lambda request: (source, source.resize((32, 32)))
    request = EditRequest(image=source, instruction="make it green", steps=2)
    editor.edit(request)
    started = time.perf_counter()
    for _ in range(edits):
        editor.edit(request)
    edit_s = (time.perf_counter() - started) / edits
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plan = editor.loaded.plan
    assert plan is not None and plan.placement == placement
    print(json.dumps({"checkpoint": plan.sizes.total, "rss_growth": peak - baseline, "load_s": load_s,
                      "edit_s": edit_s}))


def main() -> int:
    from hidream_edit.placement import PLACEMENTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=3, help="timed edits per placement (default 3)")
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.edits)
        return 0
    placements = ["none", *[p for p in args.placements if p != "none"]]
    results = {}
    for placement in placements:
        command = [sys.executable, __file__, "--child", placement, "--edits", str(args.edits)]
        output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
        results[placement] = json.loads(output.strip().splitlines()[-1])
    base = results["none"]
    print(f"tiny E1.1 on the CPU, {args.edits} timed edits of 2 steps each; ratios to none")
    print(f"{'placement':<11} {'s/edit':>8} {'ratio':>6} {'load s':>7} {'RSS growth/ckpt':>16} {'ratio':>6}")
    for placement, r in results.items():
        per_checkpoint = r["rss_growth"] / r["checkpoint"]
        print(f"{placement:<11} {r['edit_s']:8.2f} {r['edit_s'] / base['edit_s']:6.2f} {r['load_s']:7.2f} "
              f"{per_checkpoint:16.1f} {r['rss_growth'] / base['rss_growth']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
