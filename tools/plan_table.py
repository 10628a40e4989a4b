"""Print README_NPU.md's plan tables from real `--plan --plan-host ... --json` runs of both CLIs.

    python tools/plan_table.py                       # the README's hosts, 512 GiB of host memory
    python tools/plan_table.py --hosts 1x48GiB 4x32GiB --host-memory 256GiB
    python tools/plan_table.py --servers             # the whole-server layouts of common Ascend servers

Each row is one run of the CLI (a subprocess, as a user would run it); nothing here computes a plan itself.
Sizes come from the spec's table of real sizes when the weights are not on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"HiDream-E1.1": "inference_e1_1_npu.py", "HiDream-E1-Full": "inference_npu.py"}
HOSTS = ("1x24GiB", "1x32GiB", "1x64GiB", "2x64GiB", "8x64GiB")
# (server, --plan-host, --dtype): Atlas 300I cards run fp16 only
SERVERS = (("Atlas 800I A2 (8 x 910B4)", "8x32GiB", "bf16"), ("Atlas 800T A2 (8 x 910B)", "8x64GiB", "bf16"),
           ("one 910B", "1x64GiB", "bf16"), ("two 910B", "2x64GiB", "bf16"),
           ("Atlas 300I Duo (2 x 24 GB)", "2x24GiB", "fp16"))


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def run_plan(script: str, host: str, host_memory: str, dtype: str | None = None) -> dict:
    command = [sys.executable, script, "--plan", "--plan-host", host, "--host-memory", host_memory, "--json",
               *(["--dtype", dtype] if dtype else [])]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(result.stdout)


def row(model: str, host: str, plan: dict) -> str:
    cards = ", ".join(f"{d['device']} {gib(d['peak_bytes'])} of {gib(d['budget_bytes'])}" for d in plan["devices"])
    host_peak = f"{gib(plan['host']['peak_bytes'])} of {gib(plan['host']['budget_bytes'])}"
    rejected = "; ".join(f"{r['placement']}: {r['why']}" for r in plan["rejected"]) or "-"
    placement = plan["placement"] if plan["fits"] else f"does not fit: {plan['error']}"
    return f"| {model} | {host} | {placement} | {cards} | {host_peak} | {rejected} |"


def layout_cell(layout: dict) -> str:
    predicted = layout["predicted"]
    group = layout["card_peaks"] if layout["split"] else layout["card_peaks"][:layout["tensor_parallel"]]
    peaks = ", ".join(gib(peak["peak_bytes"]) for peak in group)  # every group's cards plan the same here
    cards = f"{layout['cards']} card{'s' if layout['cards'] > 1 else ''}"
    return (f"{layout['layout']}, {cards}, {'/'.join(sorted(set(layout['placements'])))}; "
            f"{predicted['relative_speed']:.2f}x per edit, {predicted['relative_throughput']:.2f}x edits/h; "
            f"card peaks {peaks} GiB{' per group' if len(group) < len(layout['card_peaks']) else ''}: "
            f"`{layout['command']}`")


def server_rows(host_memory: str) -> list[str]:
    rows = ["| server | model | fastest single edit | most edits per hour |", "| --- | --- | --- | --- |"]
    for server, host, dtype in SERVERS:
        for model, script in SCRIPTS.items():
            layouts = run_plan(script, host, host_memory, dtype if dtype != "bf16" else None)["host_layouts"]
            rows.append(f"| {server}, {dtype} | {model} | {layout_cell(layouts['latency'])} | "
                        f"{layout_cell(layouts['throughput'])} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", nargs="+", default=list(HOSTS), help="NxSIZE hosts (default: the README's)")
    parser.add_argument("--host-memory", default="512GiB", help="host memory of every host (default 512GiB)")
    parser.add_argument("--servers", action="store_true", help="the whole-server layouts table instead")
    args = parser.parse_args(argv)
    if args.servers:
        print("\n".join(server_rows(args.host_memory)))
        return 0
    print("| model | host | placement | predicted peak per card, GiB (of budget) | host peak, GiB | rejected |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, script in SCRIPTS.items():
        for host in args.hosts:
            print(row(model, host, run_plan(script, host, args.host_memory)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
