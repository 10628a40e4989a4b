"""The whole host's layout (`--plan` on a host of several cards): which command to run, and why.

Pure planning on the real model's sizes (the spec's table), so each host is checked in milliseconds; the
commands the planner prints are parsed with the CLI's own parser, and the one-card command runs on the tiny
set here (the two-card torchrun command runs in test_tensor_parallel.py, beside its one-process reference).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from hidream_edit.cli import build_edit_parser, run_edit_cli
from hidream_edit.host_layout import (
    ALL_REDUCED_ROWS_PER_TOKEN,
    BLOCKS,
    COMFORT,
    HostPlan,
    Layout,
    plan_host,
    step_cost,
)
from hidream_edit.models import table_sizes
from hidream_edit.placement import GIB, described_budgets
from hidream_edit.spec import MODELS, TEXT_TOKENS

HOSTS = ("8x32GiB", "2x64GiB", "8x64GiB", "1x24GiB", "1x32GiB")


def _plan(host: str, model: str = "e1.1") -> HostPlan:
    spec = MODELS[model]
    return plan_host(spec, table_sizes(spec, "bf16"), described_budgets(host))


def _arguments(command: str, script: str) -> list[str]:
    words = shlex.split(command)
    return words[words.index(script) + 1:]


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
@pytest.mark.parametrize("host", HOSTS)
def test_each_host_gets_a_latency_and_a_throughput_layout_that_fit(host: str, model: str) -> None:
    plan = _plan(host, model)
    count = int(host.split("x")[0])
    fitting = [layout for layout in plan.layouts if layout.error is None]
    for layout in (plan.latency, plan.throughput):
        assert layout is not None and layout.error is None
        assert all(peak["peak_bytes"] <= peak["budget_bytes"] for peak in layout.card_peaks())
        # host streaming only when no layout keeps the transformer on the cards
        assert layout.streams == all(other.streams for other in fitting)
        # a card over 90% only when every layout that keeps it resident has one too
        resident = [other for other in fitting if not other.streams]
        assert layout.fullest <= COMFORT or all(other.fullest > COMFORT for other in resident)
    assert plan.throughput.split or plan.throughput.processes == count  # every card busy
    assert plan.relative_speed(plan.latency) >= max(plan.relative_speed(layout) for layout in fitting
                                                    if layout.streams == plan.latency.streams
                                                    and (layout.fullest > COMFORT) == (plan.latency.fullest > COMFORT))


def test_what_each_server_should_run() -> None:
    """The answers the README's table gives (E1.1, bf16)."""
    a2 = _plan("8x32GiB")  # Atlas 800I A2: the transformer no longer streams, no card idles for throughput
    assert (a2.latency.cfg, a2.latency.tp, a2.latency.replicas) == (2, 4, 1)
    assert (a2.throughput.cfg, a2.throughput.tp, a2.throughput.replicas) == (1, 4, 2)
    assert not a2.latency.streams and not a2.throughput.streams
    two = _plan("2x64GiB")  # both cards, each under 90%, instead of one card at 97% and one idle
    assert two.latency.cards == two.throughput.cards == 2
    assert two.latency.fullest <= COMFORT
    from hidream_edit.tensor_split import member_budgets, plan_tensor_group, tensor_share

    pair = plan_tensor_group(MODELS["e1.1"], tensor_share(table_sizes(MODELS["e1.1"], "bf16"), None, 2),
                             member_budgets(described_budgets("2x64GiB"), 2))  # each card holds its share
    assert [peak["peak_bytes"] for peak in two.latency.card_peaks()] == [
        plan.chosen.devices[0].peak_bytes for plan in pair.plans]
    one = _plan("1x32GiB")  # nothing else fits one 32 GiB card: streaming is right there
    assert one.latency.placements == ("group",) and one.latency is one.throughput
    sizes = table_sizes(MODELS["e1.1"], "bf16")  # the transformer crosses the host link every step, encoders per edit
    assert one.latency.cost.host_transfers == sizes.components["transformer"] / 25e9
    assert one.latency.cost.per_edit == sizes.encoders / 25e9
    assert one.relative_speed(one.latency) == pytest.approx(
        28 * 1.5 / (28 * (1.5 + sizes.components["transformer"] / 25e9) + sizes.encoders / 25e9))
    resident = a2.latency.cost  # the split transformer and the encoders stay on the cards: nothing moves
    assert resident.host_transfers == resident.per_edit == 0


@pytest.mark.parametrize("host", ["8x32GiB", "8x64GiB", "2x64GiB"])
def test_layouts_that_cannot_work_never_appear(host: str) -> None:
    count = int(host.split("x")[0])
    for layout in _plan(host).layouts:
        assert 20 % layout.tp == 0  # the real model's heads
        assert layout.cards <= count and count % (layout.cfg * layout.tp) == 0
        assert 1 <= layout.cfg <= 3
    assert {(layout.cfg, layout.tp) for layout in _plan(host).layouts} >= {(1, 1), (1, 2)}


def test_a_model_with_two_heads_is_never_split_four_ways(tiny_checkpoints: Any) -> None:
    """The heads come from the local model's config (the tiny set has 2), the real model's 20 otherwise."""
    spec = MODELS["e1.1"]
    i1_dir = tiny_checkpoints.root / "HiDream-I1-Full"
    plan = plan_host(spec, table_sizes(spec, "bf16"), described_budgets("4x64GiB"), i1_dir=i1_dir)
    assert {layout.tp for layout in plan.layouts} == {1, 2}
    assert {layout.tp for layout in _plan("4x64GiB").layouts} == {1, 2, 4}


@pytest.mark.parametrize("host", HOSTS)
def test_printed_commands_parse_with_the_cli_parser_and_carry_the_planned_flags(host: str) -> None:
    plan = _plan(host)
    spec = MODELS["e1.1"]
    parser = build_edit_parser(spec)
    for layout, goal in ((plan.latency, "latency"), (plan.throughput, "throughput")):
        command = _command(plan, layout, goal)
        args = parser.parse_args(_arguments(command, spec.script))
        assert (args.cfg_parallel, args.tensor_parallel) == (layout.cfg, layout.tp)
        words = shlex.split(command)
        if layout.processes > 1:
            assert words[:4] == ["torchrun", "--standalone", "--nproc-per-node", str(layout.processes)]
        else:
            assert words[0] == "python"
        if layout.tp == 1:
            assert args.offload == layout.placements[0]
        assert (args.manifest is not None) == (goal == "throughput")


def test_the_split_layout_is_one_process_with_its_encoders_on_the_second_card() -> None:
    (split,) = [layout for layout in _plan("2x64GiB").layouts if layout.split]
    assert (split.processes, split.cards) == (1, 2)
    assert _command(_plan("2x64GiB"), split, "latency").startswith(
        "python inference_e1_1_npu.py --offload split --encoder-device npu:1 --image ")
    assert [peak["device"] for peak in split.card_peaks()] == ["npu:0", "npu:1"]


def _command(plan: HostPlan, layout: Layout, goal: str) -> str:
    from hidream_edit.host_layout import command

    return command(layout, MODELS[plan.model].script, goal)


def test_the_bytes_all_reduced_per_step_are_the_readme_figure() -> None:
    """README_NPU: 8576 tokens x 4 rows x 48 blocks x 2560 values in bf16 per branch, 25 GB for 3 branches;
    a pair moves all of it per card over one 56 GB/s link (0.45 s), four cards 3/2 of it over three links."""
    spec = MODELS["e1.1"]
    pair = step_cost(spec, "bf16", 1, 2, 0.82)
    assert pair.collective_bytes == 3 * (spec.max_seq + TEXT_TOKENS) * ALL_REDUCED_ROWS_PER_TOKEN * BLOCKS * 2560 * 2
    assert 25e9 < pair.collective_bytes < 26e9
    assert pair.collectives == pytest.approx(0.45, abs=0.01)
    assert step_cost(spec, "bf16", 1, 4, 0.82).collectives == pytest.approx(pair.collectives / 2)
    assert step_cost(spec, "bf16", 3, 2, 0.82).collective_bytes == pair.collective_bytes / 3  # one branch a rank
    alone = step_cost(spec, "bf16", 1, 1, 0.82)
    assert alone.collectives == 0 and alone.compute == 1.5
    assert pair.compute == pytest.approx(1.5 * (0.18 + 0.41))
    streamed = step_cost(spec, "bf16", 1, 1, 0.82, streamed=25 * 10**9)
    assert streamed.step == pytest.approx(1.5 + 1.0)


def test_plan_json_and_text_name_the_same_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_edit_cli(["--plan", "--plan-host", "8x32GiB", "--json"], "e1.1", {"HF_HUB_OFFLINE": "1"}) == 0
    data = json.loads(capsys.readouterr().out)
    assert run_edit_cli(["--plan", "--plan-host", "8x32GiB"], "e1.1", {"HF_HUB_OFFLINE": "1"}) == 0
    text = capsys.readouterr().out
    host = data["host_layouts"]
    for goal in ("latency", "throughput"):
        layout = host[goal]
        assert layout["command"] in text
        assert f"{layout['layout']} ({layout['cards']} cards)" in text  # 8 cards: plural
        assert f"{layout['predicted']['relative_speed']:.2f}x per edit" in text
        for peak in layout["card_peaks"]:
            assert f"{peak['peak_bytes'] / GIB:.1f} GiB of" in text
    for other in host["others"]:
        assert f"not chosen {other['layout']}: {other['latency']}" in text
    assert data["placement"] == "group"  # the one-process plan is still the first part, unchanged


def test_the_planned_one_card_command_runs_on_the_tiny_set(
    tiny_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1x32GiB: the planner says `python inference_e1_1_npu.py --offload group ...`; run with the tiny set."""
    plan = _plan("1x32GiB")
    arguments = _arguments(_command(plan, plan.latency, "latency"), "inference_e1_1_npu.py")
    source = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 120, 200)).save(source)
    values = {"--image": str(source), "--output": str(tmp_path / "out.png")}
    arguments = [values.get(arguments[i - 1], word) if i else word for i, word in enumerate(arguments)]
    assert run_edit_cli([*arguments, "--tiny", "--steps", "2"], "e1.1", tiny_env) == 0
    assert (tmp_path / "out.png").is_file()
    assert json.loads((tmp_path / "out.png.json").read_text())["placement"]["name"] == "group"
