"""Print README_NPU.md's per-card memory table from real `--plan --plan-host ... --json` runs of both CLIs.

    python tools/plan_table.py                       # the README's hosts, 512 GiB of host memory
    python tools/plan_table.py --hosts 1x48GiB 4x32GiB --host-memory 256GiB

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


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def run_plan(script: str, host: str, host_memory: str) -> dict:
    command = [sys.executable, script, "--plan", "--plan-host", host, "--host-memory", host_memory, "--json"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(result.stdout)


def row(model: str, host: str, plan: dict) -> str:
    cards = ", ".join(f"{d['device']} {gib(d['peak_bytes'])} of {gib(d['budget_bytes'])}" for d in plan["devices"])
    host_peak = f"{gib(plan['host']['peak_bytes'])} of {gib(plan['host']['budget_bytes'])}"
    rejected = "; ".join(f"{r['placement']}: {r['why']}" for r in plan["rejected"]) or "-"
    placement = plan["placement"] if plan["fits"] else f"does not fit: {plan['error']}"
    return f"| {model} | {host} | {placement} | {cards} | {host_peak} | {rejected} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", nargs="+", default=list(HOSTS), help="NxSIZE hosts (default: the README's)")
    parser.add_argument("--host-memory", default="512GiB", help="host memory of every host (default 512GiB)")
    args = parser.parse_args(argv)
    print("| model | host | placement | predicted peak per card, GiB (of budget) | host peak, GiB | rejected |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, script in SCRIPTS.items():
        for host in args.hosts:
            print(row(model, host, run_plan(script, host, args.host_memory)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
