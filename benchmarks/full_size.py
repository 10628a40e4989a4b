"""Seconds per step and measured beside predicted peak memory of the full-size E1.1 run, per placement.

The run of `python test_npu_setup.py --full-size` (hidream_edit/full_size.py: the real sizes, random weights,
nothing downloaded), repeated in one process for each placement asked; each run makes its own weights on the
device its plan names and frees them before the next. A placement whose plan cannot fit is reported as refused.

    python benchmarks/full_size.py [--placements none model group] [--steps 2] [--blocks N] [--size 1024]
                                   [--device cuda] [--dtype bf16] [--attention sdpa] [--json PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hidream_edit.config import (  # noqa: E402  (after the path insert)
    OneLineArgumentParser,
    add_device_arguments,
    at_least_one,
    environment,
    source_side_argument,
)
from hidream_edit.placement import PLACEMENTS, gib  # noqa: E402


def peaks(record: dict) -> str:
    """Measured / predicted peak per card (max reserved) and for the host (peak RSS)."""
    memory = record["memory"]
    parts = [f"{d['device']} {gib(d['peak_reserved'])} / {gib(d['predicted'])} ({d['ratio_reserved']:.2f})"
             for d in memory["devices"]]
    host = memory["host"]
    parts.append(f"host {gib(host['peak_rss'])} / {gib(host['predicted'])} ({host['ratio']:.2f})")
    return "; ".join(parts)


def main() -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=["none", "model", "group"])
    parser.add_argument("--steps", type=at_least_one("--steps"), default=2, help="timed steps per stage")
    parser.add_argument("--blocks", type=at_least_one("--blocks"), help="keep N blocks (and N Llama / T5 layers)")
    parser.add_argument("--size", type=source_side_argument, default=1024, help="side of the square source")
    parser.add_argument("--attention", help="attention kernel (default sdpa)")
    parser.add_argument("--json", metavar="PATH", help="also write the records, one per placement, to PATH (new file)")
    add_device_arguments(parser)
    args = parser.parse_args()

    from device_utils import DeviceManager, preferences_from
    from hidream_edit.config import configure_logging
    from hidream_edit.editor import check_new_file, write_new_json
    from hidream_edit.full_size import FullSizeSettings, run_full_size

    configure_logging(verbose=False)
    path = check_new_file(args.json) if args.json else None
    dm = DeviceManager(**preferences_from(environment(), args.device, args.dtype).arguments())
    print(f"E1.1 full size, random weights, {dm.device} ({dm.device_name}), {dm.dtype_name}, {args.steps} timed "
          f"steps per stage after 1 warm-up" + (f", {args.blocks} block(s) of each kind" if args.blocks else ""))
    records = []
    for placement in args.placements:
        settings = FullSizeSettings(steps=args.steps, blocks=args.blocks, size=args.size, offload=placement,
                                    attention=args.attention)
        record = run_full_size(settings, dm, progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
        records.append(record)
        if record["status"] == "refused":
            print(f"{placement:<10} refused: {record['error']}", flush=True)
            continue
        seconds = record["seconds"]
        timed = (f"{seconds['edit_step']:.2f} s/edit step, {seconds['refine_step']:.2f} s/refine step"
                 if "edit_step" in seconds else f"{record['status']} in {record['failed_in']}")
        print(f"{placement:<10} {timed}; peak measured / predicted: {peaks(record)}", flush=True)
    if path is not None:
        write_new_json(path, records)
    return 0 if all(record["status"] == "ok" for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
