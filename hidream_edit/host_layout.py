"""The layout for a whole host: `--plan` on a host of several cards answers "which command do I run?".

An Ascend owner thinks in servers (an Atlas 800I A2 is 8 x 32 GB), while a memory plan is per process and
per card. This module tries every layout of replicas x --cfg-parallel x --tensor-parallel whose group size
divides the card count (and whose tensor-parallel degree divides the attention heads), plus one process
with its text encoders on a second card (`split`), plans each group's cards with the planners of
placement.py and tensor_split.py, predicts each layout's speed from the real sizes and the structure of
a step, and picks two: the fastest single edit (latency) and the most edits per hour (throughput), each
as the exact command to run. Host streaming is chosen only when no layout keeps the transformer on the
cards, and a layout with a card over 90% of its budget only when no other layout keeps every card under.

The speed model is arithmetic on paper, relative to one card holding everything: no NPU has run this
project. Its constants are marked below; only the sizes and the bytes per step are counted from the model.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hidream_edit.placement import DTYPE_BYTES, Budgets, ModelSizes, Plan, gib, plan_placement
from hidream_edit.spec import (
    EDIT_BRANCHES,
    TEXT_ENCODERS,
    TEXT_TOKENS,
    TRANSFORMER_HEADS,
    TRANSFORMER_WIDTH,
    ModelSpec,
)
from hidream_edit.tensor_split import (
    REAL_SPLIT_FRACTION,
    config_split_fraction,
    member_budgets,
    plan_tensor_group,
    tensor_share,
)

# Estimates (not measured: no device has run this project; README_NPU.md gives their sources).
STEP_SECONDS = 1.5  # one edit step (3 branches) on one card: 5e14 FLOP at a 910B's bf16 peak
CARD_LINK_BYTES_PER_S = 56e9  # one HCCS link between two cards of an A2 server (data sheets; unconfirmed)
HOST_LINK_BYTES_PER_S = 25e9  # host memory to card (PCIe 4.0 x16, effective; estimate)
# Counted from the structure: per token and block, the row-parallel outputs all-reduced: one attention, the
# shared expert and two routed experts; 48 blocks.
ALL_REDUCED_ROWS_PER_TOKEN = 4
BLOCKS = 48
COMFORT = 0.9  # a card planned above this share of its budget is a last resort
STREAMING = ("group", "sequential")
MOVING = ("model", *STREAMING)


@dataclass(frozen=True)
class StepCost:
    """Predicted seconds of one edit step on the busiest card, and what each edit moves once."""

    compute: float
    collectives: float
    host_transfers: float
    per_edit: float
    collective_bytes: int

    @property
    def step(self) -> float:
        return self.compute + self.collectives + self.host_transfers

    def edit_seconds(self, steps: int) -> float:
        return steps * self.step + self.per_edit


@dataclass(frozen=True)
class Layout:
    """One way to run on the host: `replicas` groups of cfg x tp processes (one card each), or one process
    on two cards (`split`). `plans`: the plan of every process the layout runs, in rank order."""

    replicas: int
    cfg: int
    tp: int
    plans: tuple[Plan, ...]
    cost: StepCost
    error: str | None = None
    split: bool = False

    @property
    def processes(self) -> int:
        return self.replicas * self.cfg * self.tp

    @property
    def cards(self) -> int:
        return 2 if self.split else self.processes

    @property
    def name(self) -> str:
        if self.split:
            return "1 process, text encoders on a second card (split)"
        return f"dp {self.replicas} x cfg {self.cfg} x tp {self.tp}"

    @property
    def placements(self) -> tuple[str, ...]:
        return tuple(plan.placement for plan in self.plans)

    @property
    def streams(self) -> bool:
        return any(placement in MOVING for placement in self.placements)

    @property
    def fullest(self) -> float:
        """The highest share of its budget any card of the layout is planned at."""
        return max((peak.peak_bytes / peak.budget_bytes for plan in self.plans for peak in plan.chosen.devices
                    if peak.budget_bytes), default=0.0)

    def card_peaks(self) -> list[dict[str, Any]]:
        """Each card the layout uses: its peak, budget, placement and what lives there."""
        peaks, seen = [], set()
        for plan in self.plans:
            for peak in plan.chosen.devices:
                if peak.device not in seen:
                    seen.add(peak.device)
                    peaks.append({**peak.as_dict(), "placement": plan.placement})
        return peaks


@dataclass(frozen=True)
class HostPlan:
    """Every layout tried on a host, the two chosen, and the baseline the speeds are relative to."""

    host: str
    model: str
    steps: int
    layouts: tuple[Layout, ...]
    latency: Layout | None
    throughput: Layout | None
    baseline_seconds: float

    def relative_speed(self, layout: Layout) -> float:
        """One edit's speed against one card holding everything (1.0)."""
        return self.baseline_seconds / layout.cost.edit_seconds(self.steps)

    def relative_throughput(self, layout: Layout) -> float:
        """Edits per hour against one card holding everything (1.0)."""
        return (1 if layout.split else layout.replicas) * self.relative_speed(layout)

    def why_not(self, layout: Layout, goal: str) -> str:
        chosen = self.latency if goal == "latency" else self.throughput
        if layout.error:
            return layout.error
        if chosen is None:
            return "nothing fits"
        measure = self.relative_speed if goal == "latency" else self.relative_throughput
        if layout.streams and not chosen.streams:
            return f"moves the transformer between host and card ({', '.join(sorted(set(layout.placements)))})"
        if layout.fullest > COMFORT >= chosen.fullest:
            return f"a card planned at {layout.fullest:.0%} of its budget"
        return f"predicted {measure(layout):.2f}x against {measure(chosen):.2f}x"


def _divisors(count: int) -> list[int]:
    return [value for value in range(1, count + 1) if count % value == 0]


def _share_fraction(i1_dir: Path | None) -> float:
    return config_split_fraction(i1_dir) if i1_dir is not None else REAL_SPLIT_FRACTION


def heads_of(i1_dir: Path | None) -> int:
    """The attention heads a tensor-parallel degree must divide: a local model's config, else the real one's."""
    config = i1_dir / "transformer" / "config.json" if i1_dir is not None else None
    if config is None or not config.is_file():
        return TRANSFORMER_HEADS
    return int(json.loads(config.read_text())["num_attention_heads"])


def step_cost(spec: ModelSpec, dtype: str, cfg: int, tp: int, split_fraction: float, streamed: int = 0,
              per_edit: int = 0) -> StepCost:
    """The speed model: compute shrinks with the branches a rank runs (cfg) and its share of the split
    weights (tp); each split block all-reduces its row-parallel outputs over the group's links (a ring moves
    2(K-1)/K of the bytes per card, over the K-1 links a card has in a full mesh); `streamed` bytes cross
    the host link at every step (group and sequential offload), `per_edit` bytes once per edit (components
    that visit the card)."""
    branches = math.ceil(EDIT_BRANCHES / cfg)
    compute = STEP_SECONDS * branches / EDIT_BRANCHES * ((1 - split_fraction) + split_fraction / tp)
    tokens = spec.max_seq + TEXT_TOKENS
    rows = branches * tokens * ALL_REDUCED_ROWS_PER_TOKEN * BLOCKS
    reduced = 0 if tp == 1 else rows * TRANSFORMER_WIDTH * DTYPE_BYTES[dtype]
    collectives = 0.0 if tp == 1 else reduced * 2 * (tp - 1) / tp / (CARD_LINK_BYTES_PER_S * (tp - 1))
    return StepCost(compute, collectives, streamed / HOST_LINK_BYTES_PER_S, per_edit / HOST_LINK_BYTES_PER_S,
                    reduced)


def moved_bytes(plan: Plan) -> tuple[int, int]:
    """(bytes streamed per step, bytes moved per edit) of a plan: what its placement keeps in host memory."""
    c = plan.sizes.components
    in_host = plan.chosen.host.components
    visiting = sum(c[name] for name in TEXT_ENCODERS if name in in_host)
    if plan.placement in STREAMING:
        return c["transformer"], visiting
    if plan.placement == "model":
        return 0, sum(c[name] for name in in_host)
    return 0, visiting


def plan_host(spec: ModelSpec, sizes: ModelSizes, budgets: Budgets, attention: str = "sdpa",
              i1_dir: Path | None = None, heads: int | None = None, steps: int | None = None) -> HostPlan:
    """Every layout of the host's cards, planned and costed; the latency and throughput choices."""
    count = len(budgets.cards)
    heads = heads or heads_of(i1_dir)
    fraction = _share_fraction(i1_dir)
    steps = steps or spec.defaults.steps
    layouts = []
    for group in _divisors(count):
        for tp in (value for value in _divisors(group) if heads % value == 0):
            cfg = group // tp
            if cfg > EDIT_BRANCHES:
                continue
            for replicas in sorted({1, count // group}):
                layouts.append(_layout(spec, sizes, budgets, replicas, cfg, tp, attention, i1_dir, fraction))
    if count >= 2:
        two = replace(budgets, cards=budgets.cards[:2], edit_card=0)
        plan = plan_placement(spec, sizes, two, "split", attention)
        cost = step_cost(spec, sizes.dtype, 1, 1, fraction)
        layouts.append(Layout(1, 1, 1, (plan,), cost, plan.error or _over(plan), split=True))
    baseline = steps * STEP_SECONDS
    draft = HostPlan(budgets.described or "this machine", spec.name, steps, tuple(layouts), None, None, baseline)
    fitting = [layout for layout in layouts if layout.error is None]
    latency = min(fitting, key=lambda layout: _rank(layout, draft.relative_speed(layout)), default=None)
    throughput = min(fitting, key=lambda layout: _rank(layout, draft.relative_throughput(layout)), default=None)
    return replace(draft, latency=latency, throughput=throughput)


def _rank(layout: Layout, speed: float) -> tuple[bool, bool, float, int]:
    """Resident before streaming, every card under COMFORT before a fuller one, then faster, then fewer cards."""
    return layout.streams, layout.fullest > COMFORT, -round(speed, 6), layout.cards


def _over(plan: Plan) -> str | None:
    return None if plan.fits else plan.chosen.why_not() or "does not fit"


def _layout(spec: ModelSpec, sizes: ModelSizes, budgets: Budgets, replicas: int, cfg: int, tp: int, attention: str,
            i1_dir: Path | None, fraction: float) -> Layout:
    """Plan every card the layout uses (cards 0 .. processes-1: each tensor-parallel group on consecutive
    cards, each other process on its own card), so a busy or smaller card is seen where it is."""
    plans: list[Plan] = []
    error = None
    share = tensor_share(sizes, i1_dir, tp) if tp > 1 else sizes
    for first in range(0, replicas * cfg * tp, tp):
        cards = replace(budgets, cards=budgets.cards[first:first + tp], edit_card=0)
        if tp == 1:
            plan = plan_placement(spec, sizes, cards, "auto", attention)
            plans.append(plan)
            error = error or (f"{cards.edit.name}: {plan.error}" if plan.error else None)
            continue
        group = plan_tensor_group(spec, share, member_budgets(cards, tp), "auto", attention)
        plans += group.plans
        error = error or (f"cards {cards.cards[0].name}-{cards.cards[-1].name}: {group.error}" if group.error
                          else None)
    streamed, per_edit = (max(values) for values in zip(*(moved_bytes(plan) for plan in plans), strict=True))
    cost = step_cost(spec, sizes.dtype, cfg, tp, fraction, streamed, per_edit)
    return Layout(replicas, cfg, tp, tuple(plans), cost, error)


def command(layout: Layout, script: str, goal: str, extra: tuple[str, ...] = ()) -> str:
    """The command to copy: python for one process, torchrun for several, with the planned flags."""
    flags = [*extra]
    if layout.cfg > 1:
        flags += ["--cfg-parallel", str(layout.cfg)]
    if layout.tp > 1:
        flags += ["--tensor-parallel", str(layout.tp)]
    if layout.tp == 1 and len(set(layout.placements)) == 1:  # cards planned alike; else each rank plans its own
        flags += ["--offload", layout.placements[0]]
    if layout.split:
        flags += ["--encoder-device", layout.plans[0].encoder_device or "npu:1"]
    if goal == "throughput":
        flags += ["--manifest", "edits.jsonl", "--output-dir", "results/"]
    else:
        flags += ["--image", "in.png", "--instruction", "make it winter", "--output", "out.png"]
    if layout.processes == 1:
        return shlex.join(["python", script, *flags])
    return shlex.join(["torchrun", "--standalone", "--nproc-per-node", str(layout.processes), script, *flags])


def layout_dict(host: HostPlan, layout: Layout, script: str, goal: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    cost = layout.cost
    return {
        "layout": layout.name, "replicas": layout.replicas, "cfg_parallel": layout.cfg, "tensor_parallel": layout.tp,
        "processes": layout.processes, "cards": layout.cards, "split": layout.split,
        "placements": list(layout.placements), "command": command(layout, script, goal, extra),
        "card_peaks": layout.card_peaks(), "fullest": round(layout.fullest, 4),
        "predicted": {"step_seconds": round(cost.step, 4), "compute_seconds": round(cost.compute, 4),
                      "collective_seconds": round(cost.collectives, 4),
                      "host_transfer_seconds": round(cost.host_transfers, 4),
                      "per_edit_transfer_seconds": round(cost.per_edit, 4),
                      "collective_bytes_per_step": cost.collective_bytes,
                      "edit_seconds": round(cost.edit_seconds(host.steps), 2),
                      "relative_speed": round(host.relative_speed(layout), 3),
                      "relative_throughput": round(host.relative_throughput(layout), 3)},
    }


def host_dict(host: HostPlan, script: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """--plan --json's `host_layouts`: the two choices and why each other layout lost."""
    return {
        "host": host.host, "model": host.model, "steps": host.steps,
        "estimates": {"step_seconds_one_card": STEP_SECONDS, "card_link_bytes_per_s": CARD_LINK_BYTES_PER_S,
                      "host_link_bytes_per_s": HOST_LINK_BYTES_PER_S, "measured": []},
        "latency": None if host.latency is None else layout_dict(host, host.latency, script, "latency", extra),
        "throughput": (None if host.throughput is None
                       else layout_dict(host, host.throughput, script, "throughput", extra)),
        "others": [{"layout": layout.name, "latency": host.why_not(layout, "latency"),
                    "throughput": host.why_not(layout, "throughput")}
                   for layout in host.layouts if layout not in (host.latency, host.throughput)],
    }


def host_summary(host: HostPlan, script: str, extra: tuple[str, ...] = ()) -> str:
    lines = [f"whole host ({host.host}, {host.model}, {host.steps} steps): speeds are predicted on paper "
             f"against one card holding everything (1.00x), from estimated constants (README_NPU.md)"]
    for goal, layout in (("fastest single edit", host.latency), ("most edits per hour", host.throughput)):
        if layout is None:
            lines.append(f"{goal}: nothing fits this host")
            continue
        key = "latency" if goal.startswith("fastest") else "throughput"
        data = layout_dict(host, layout, script, key, extra)["predicted"]
        cards = f"{layout.cards} card{'s' if layout.cards > 1 else ''}"
        lines.append(f"{goal}: {layout.name} ({cards}), {data['relative_speed']:.2f}x per edit, "
                     f"{data['relative_throughput']:.2f}x edits per hour; step {data['step_seconds']:.2f} s = "
                     f"compute {data['compute_seconds']:.2f} + collectives {data['collective_seconds']:.2f} "
                     f"({data['collective_bytes_per_step'] / 1e9:.1f} GB all-reduced) + "
                     f"host transfers {data['host_transfer_seconds']:.2f}")
        lines.append(f"  {command(layout, script, key, extra)}")
        for peak in layout.card_peaks():
            lines.append(f"  {peak['device']:<8} {gib(peak['peak_bytes']):>9} of {gib(peak['budget_bytes'] or 0):>9}"
                         f"  {peak['placement']:<9} [{', '.join(peak['components'])}]")
    for layout in host.layouts:
        if layout not in (host.latency, host.throughput):
            lines.append(f"  not chosen {layout.name}: {host.why_not(layout, 'latency')}")
    return "\n".join(lines)

