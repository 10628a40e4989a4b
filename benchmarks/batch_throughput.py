"""Images per minute of batch editing against one CLI run per image, and the prompt-embedding cache, in one run.

With the tiny random-weight model on this machine (CPU):
  separate: N runs of the single-image CLI, each loading the model (what a shell loop does)
  batch:    one run of the same CLI with --manifest over the same N edits (one load)
  cache:    N edits with one instruction in one Editor, prompt-embedding cache on against off
and prints images per minute, the ratios, and the load and per-edit seconds the batch measured, so the
saving can be worked out for other load and edit times: N runs cost N*(load + edit), a batch load + N*edit.

    python benchmarks/batch_throughput.py [--model e1.1] [--images 8] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SCRIPTS = {"e1.1": "inference_e1_1_npu.py", "e1-full": "inference_npu.py"}
INSTRUCTION = "make the sky purple"


def write_inputs(folder: Path, count: int) -> Path:
    """`count` small images and a manifest editing each with one instruction and its own seed."""
    from PIL import Image

    lines = []
    for number in range(count):
        Image.new("RGB", (64, 48), (30 * number % 256, 120, 200)).save(folder / f"in{number}.png")
        lines.append(json.dumps({"image": f"in{number}.png", "instruction": INSTRUCTION, "seed": number}))
    manifest = folder / "edits.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def timed_run(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def per_minute(images: int, seconds: float) -> float:
    return images * 60.0 / seconds


def timed_edits(editor: Any, folder: Path, count: int, steps: int) -> tuple[float, int, float]:
    """Seconds for `count` one-instruction edits, and the calls to and seconds in the text encoders."""
    pipe = editor.loaded.pipe
    encode_prompt = pipe.encode_prompt
    spent = {"calls": 0, "seconds": 0.0}

    def timed_encode_prompt(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return encode_prompt(*args, **kwargs)
        finally:
            spent["calls"] += 1
            spent["seconds"] += time.perf_counter() - started

    from hidream_edit.editor import EditRequest

    # One untimed edit with another instruction first: the first edit of a process pays one-off costs.
    editor.edit(EditRequest(folder / "in0.png", "warm up", steps=steps))
    pipe.encode_prompt = timed_encode_prompt
    started = time.perf_counter()
    for number in range(count):
        editor.edit(EditRequest(folder / f"in{number}.png", INSTRUCTION, steps=steps, seed=number))
    return time.perf_counter() - started, int(spent["calls"]), spent["seconds"]


def cache_comparison(model: str, folder: Path, count: int, steps: int, env: dict[str, str]) -> None:
    """The same one-instruction edits in one Editor with the prompt-embedding cache on and off."""
    from hidream_edit.config import resolve_model_sources
    from hidream_edit.editor import Editor, EditorSettings
    from hidream_edit.spec import MODELS

    sources = resolve_model_sources(MODELS[model], tiny=True, env=env)
    measured = {}
    for label, entries in (("on", 4), ("off", 0)):
        editor = Editor.load(EditorSettings(sources=sources, device="cpu", dtype="fp32", prompt_cache_entries=entries))
        seconds, calls, text_s = measured[label] = timed_edits(editor, folder, count, steps)
        print(f"one instruction, cache {label + ':':4s} {seconds:7.1f} s {per_minute(count, seconds):6.2f} images/min; "
              f"text encoders called {calls} times, {text_s:.2f} s")
    on, off = measured["on"], measured["off"]
    print(f"cache on / off images per minute: {off[0] / on[0]:.2f}x; "
          f"text-encoder seconds off / on: {off[2] / on[2]:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(SCRIPTS), default="e1.1")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--parts", choices=("all", "cli", "cache"), default="all", help="what to measure")
    args = parser.parse_args()
    script = SCRIPTS[args.model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as temp:
        folder = Path(temp)
        manifest = write_inputs(folder, args.images)
        print(f"{args.images} tiny {args.model} edits, {args.steps} steps, CPU")
        if args.parts in ("all", "cli"):
            cli_comparison(script, folder, manifest, args.images, args.steps, env)
        if args.parts in ("all", "cache"):
            cache_comparison(args.model, folder, args.images, args.steps, env)


def cli_comparison(script: str, folder: Path, manifest: Path, count: int, steps: int, env: dict[str, str]) -> None:
    """N single-image CLI runs against one batch run of the same edits; prints both and the ratio."""
    common = ["--tiny", "--steps", str(steps)]
    timed_run([sys.executable, script, *common, "--image", str(folder / "in0.png"), "--instruction",
               INSTRUCTION, "--output", str(folder / "warm.png")], env)  # builds the tiny set once
    separate_s = sum(
        timed_run([sys.executable, script, *common, "--image", str(folder / f"in{n}.png"), "--instruction",
                   INSTRUCTION, "--seed", str(n), "--output", str(folder / f"single{n}.png")], env)
        for n in range(count)
    )
    batch_s = timed_run(
        [sys.executable, script, *common, "--manifest", str(manifest), "--output-dir", str(folder / "batch")], env
    )
    load_s = json.loads((folder / "batch" / "in0.png.json").read_text())["timings"]["load_s"]
    edit_s = [item["seconds"] for item in json.loads((folder / "batch" / "summary.json").read_text())["items"]]
    print(f"separate CLI runs: {separate_s:7.1f} s  {per_minute(count, separate_s):6.2f} images/min")
    print(f"one batch run:     {batch_s:7.1f} s  {per_minute(count, batch_s):6.2f} images/min")
    print(f"batch / separate images per minute: {separate_s / batch_s:.2f}x")
    print(f"per run outside the edits (start-up and load): {separate_s / count - sum(edit_s) / count:.1f} s; "
          f"batch load {load_s:.1f} s, edits {sum(edit_s) / count:.1f} s each")


if __name__ == "__main__":
    main()
