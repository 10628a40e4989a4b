"""Guidance parallel (--cfg-parallel K) with real torch.distributed: gloo on CPU, the tiny set, one thread
per process.

A group's edits must equal the same edits in one process: every rank computes its share of the branches
with a smaller batch than the single process does (3 or 2 branches at once there, 1 or 2 here), and CPU
kernels may round differently per batch size, so pixels may differ by 1/255 (8-bit rounding of a tiny
difference), never more. Metadata must be the same apart from what is measured (timings, memory).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from npu_standin import REPO
from PIL import Image
from test_batch_distributed import TORCHRUN, free_port, rank_process, run_env
from torch.distributed import DistNetworkError

from hidream_edit.config import DistributedEnvironment
from hidream_edit.distributed import EditGroup
from hidream_edit.errors import EditCancelled, GuidanceGroupError, UserError
from hidream_edit.guidance_parallel import GuidanceGroup, branch_shares, check_cfg_parallel, form_guidance_group

RUN_TIMEOUT_S = 900
E1_FULL_PROMPT = "Editing Instruction: add a red hat. Target Image Description: a cat wearing a red hat"
# name -> (model, request fields); 2 steps with refine strength 0.5 = one edit step and one refine step
EDITS: dict[str, tuple[str, dict[str, Any]]] = {
    "e1.1 edit+refine": ("e1.1", {"instruction": "make the sky purple", "refine_strength": 0.5, "seed": 1}),
    "e1.1 edit only": ("e1.1", {"instruction": "make the sky purple", "refine_strength": 0.0, "seed": 2}),
    "e1.1 guidance off": ("e1.1", {"instruction": "make it snow", "guidance": 1.0, "refine_strength": 0.5}),
    "e1-full edit+refine": ("e1-full", {"instruction": E1_FULL_PROMPT, "refine_strength": 0.5, "seed": 4}),
    "e1-full edit only": ("e1-full", {"instruction": E1_FULL_PROMPT, "refine_strength": 0.0, "seed": 5}),
}
MEASURED = ("timings", "memory")


class LostStore:
    """A store whose host is gone: every call fails as TCPStore's do once torchrun's agent was killed."""

    def __init__(self, reason: str = "Broken pipe") -> None:
        self.reason = reason

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            raise DistNetworkError(self.reason)

        return fail


def lost_group(member: int, reason: str = "Broken pipe") -> GuidanceGroup:
    return GuidanceGroup(size=2, member=member, index=0, ranks=[4, 5], process_group=None,
                         device=torch.device("cpu"), timeout_s=5.0, store=LostStore(reason))  # type: ignore[arg-type]


def lost_edit_group(member: int) -> EditGroup:
    return EditGroup([4, 5], member, 0, LostStore(), 5.0)  # type: ignore[arg-type]


def test_a_lost_store_ends_a_guidance_group_with_one_line_on_each_rank() -> None:
    lost = "lost the rendezvous store (torchrun's agent or rank 0 ended): Broken pipe"
    with pytest.raises(GuidanceGroupError, match=f"^rank 4 {re.escape(lost)}$"):
        lost_edit_group(0).agree("item1", lambda: "3")  # the leader cannot hand the number over
    with pytest.raises(GuidanceGroupError, match=f"^rank 5 {re.escape(lost)}$"):
        lost_edit_group(1).agree("item1", lambda: "3")  # the member cannot wait for it
    claim_failed = GuidanceGroupError("rank 4 lost the rendezvous store at a:1 (...): Broken pipe")

    def claim() -> str:
        raise claim_failed

    with pytest.raises(GuidanceGroupError) as error:
        lost_edit_group(0).agree("item1", claim)  # telling the members fails too: the claim's own error stands
    assert error.value is claim_failed
    with pytest.raises(GuidanceGroupError, match=f"^rank 5 {re.escape(lost)}$"):
        lost_group(1).finish_edit()
    with pytest.raises(GuidanceGroupError) as error:  # a long or many-line reason: its first 200 characters
        lost_group(1, "z" * 300 + "\nTraceback ...").finish_edit()
    assert str(error.value).endswith(": " + "z" * 200)
    with pytest.raises(GuidanceGroupError, match=f"^rank 5 {re.escape(lost[:-len('Broken pipe')])}DistNetworkError$"):
        lost_group(1, "  ").finish_edit()  # no reason given: its type


def test_the_leader_waits_the_groups_timeout_for_timings_not_the_stores(caplog: pytest.LogCaptureFixture) -> None:
    """A member that never posts its timings costs the leader the group's timeout (here 0.3 s), not the
    rendezvous store's own, which torchrun sets to minutes."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=60))
    group = GuidanceGroup(size=2, member=0, index=0, ranks=[0, 1], process_group=None,
                          device=torch.device("cpu"), timeout_s=0.3, store=store)
    group.begin_edit(None)
    started = time.monotonic()
    timings = group.finish_edit()
    assert time.monotonic() - started < 30
    assert timings == {"size": 2, "ranks": [{"rank": 0, "steps": []}]}
    assert "no per-rank timings from the guidance group" in caplog.text


def test_the_leader_collects_every_members_timings_through_the_store() -> None:
    """The edit's metadata lists each rank's steps: a member that did not post its own would leave the
    leader waiting out the timeout and the record with the leader's alone."""
    import torch.distributed as dist

    store = dist.HashStore()
    leader, member = (GuidanceGroup(size=2, member=m, index=0, ranks=[4, 5], process_group=None,
                                    device=torch.device("cpu"), timeout_s=1.0, store=store) for m in (0, 1))
    for group, branches in ((leader, [0, 2]), (member, [2, 3])):
        group.begin_edit(None)
        group.steps.append({"branches": branches, "compute_s": 0.1, "wait_s": 0.0})
    assert member.finish_edit() == {"size": 2, "ranks": [{"rank": 5, "steps": member.steps}]}
    timings = leader.finish_edit()
    assert [(r["rank"], [s["branches"] for s in r["steps"]]) for r in timings["ranks"]] == [(4, [[0, 2]]),
                                                                                         (5, [[2, 3]])]


def test_device_work_queued_by_the_share_counts_as_compute_not_as_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an accelerator the share's kernels are still queued when compute() returns, and the gather's when
    all_gather returns: the rank waits for each, so the record puts the first in compute_s, the second in wait_s."""
    import torch.distributed as dist

    queued = {"work": 0.0}
    all_gather = dist.all_gather

    def compute(start: int, stop: int) -> torch.Tensor:
        queued["work"] = 0.3  # what an accelerator would still be running
        return torch.ones(stop - start, 2)

    def gather(*args: Any, **kwargs: Any) -> Any:
        queued["work"] = 0.2  # the collective's transfer, still running on the card
        return all_gather(*args, **kwargs)

    def synchronize() -> None:
        time.sleep(queued["work"])
        queued["work"] = 0.0

    monkeypatch.setattr(dist, "all_gather", gather)

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = GuidanceGroup(1, 0, 0, [0], dist.group.WORLD, torch.device("cpu"), 30.0, synchronize=synchronize)
        group.begin_edit(None)
        started = time.perf_counter()
        predictions = group.predictions(3, compute, (2,), torch.float32, "step 1")
        took = time.perf_counter() - started
    finally:
        dist.destroy_process_group()
    assert torch.equal(predictions, torch.ones(3, 2))
    (step,) = group.steps
    assert took >= step["compute_s"] + step["wait_s"] and step["compute_s"] >= 0.3 > step["wait_s"] >= 0.2, step
    assert step["branches"] == [0, 3]


def test_the_groups_buffers_are_made_on_its_card_not_on_torchs_default_device(tmp_path: Path) -> None:
    """On an NPU a buffer made without device= would be a host tensor that HCCL refuses; here the default
    device is `meta`, so a buffer made anywhere but on the group's card (the CPU) cannot be gathered."""
    import torch.distributed as dist

    def compute(start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, dtype=torch.float32, device="cpu").repeat_interleave(2).view(-1, 2)

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = GuidanceGroup(1, 0, 0, [0], dist.group.WORLD, torch.device("cpu"), 30.0)
        group.begin_edit(None)
        torch.set_default_device("meta")
        try:
            predictions = group.predictions(3, compute, (2,), torch.float32, "step 1")
            total = group.sum_across(torch.tensor([2.0, 3.0], device="cpu"), "step 1")
        finally:
            torch.set_default_device(None)
    finally:
        dist.destroy_process_group()
    assert torch.equal(predictions, torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    assert torch.equal(total, torch.tensor([2.0, 3.0]))


def test_predictions_come_back_in_the_dtype_asked_for_at_its_precision(tmp_path: Path) -> None:
    """The shares travel in the model's dtype: a buffer in torch's default float32 would round a float64
    (or widen a bfloat16) prediction before the guidance rule sees it."""
    import torch.distributed as dist

    def compute(start: int, stop: int) -> torch.Tensor:
        return torch.full((stop - start, 2), 1 / 3, dtype=torch.float64)

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = GuidanceGroup(1, 0, 0, [0], dist.group.WORLD, torch.device("cpu"), 30.0)
        group.begin_edit(None)
        predictions = group.predictions(2, compute, (2,), torch.float64, "step 1")
    finally:
        dist.destroy_process_group()
    assert predictions.dtype == torch.float64
    assert torch.equal(predictions, torch.full((2, 2), 1 / 3, dtype=torch.float64))


def test_the_step_caches_numbers_are_summed_on_the_groups_card_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step cache hands over float64 host numbers; HCCL sums only on the card. The meta device plays the
    card (the fake collective records what it was given, then fails the way a lost peer would)."""
    import torch.distributed as dist

    given: list[tuple[str, torch.dtype]] = []

    def all_reduce(buffer: torch.Tensor, group: Any = None) -> None:
        given.append((buffer.device.type, buffer.dtype))
        raise RuntimeError("peer gone")

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    group = GuidanceGroup(2, 0, 0, [0, 1], None, torch.device("meta"), 30.0)
    with pytest.raises(GuidanceGroupError, match=r"^rank 0 lost its guidance group \(ranks \[0, 1\]\) at step 4: peer"):
        group.sum_across(torch.tensor([1.0, 2.0], dtype=torch.float64), "step 4")
    assert given == [("meta", torch.float32)]


def test_settle_is_told_whether_this_ranks_share_failed(tmp_path: Path) -> None:
    """The step cache joins the group's sum in settle(failed): a failed share must say so, or the other
    ranks would decide on a sum that lacks it."""
    import torch.distributed as dist

    settled: list[bool] = []

    def failing(start: int, stop: int) -> torch.Tensor:
        raise RuntimeError("out of memory")

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = GuidanceGroup(1, 0, 0, [0], dist.group.WORLD, torch.device("cpu"), 30.0)
        group.begin_edit(None)
        group.predictions(2, lambda start, stop: torch.ones(stop - start, 2), (2,), torch.float32, "step 1",
                          settle=settled.append)
        with pytest.raises(GuidanceGroupError, match="rank 0 failed at step 2: out of memory"):
            group.predictions(2, failing, (2,), torch.float32, "step 2", settle=settled.append)
    finally:
        dist.destroy_process_group()
    assert settled == [False, True]


@pytest.mark.parametrize(("share_fails", "message"), [
    (False, "rank 0 lost its guidance group (ranks [0]) at step 1: peer gone; a rank failed, died or took longer "
            "than --dist-timeout 30 s; nothing was saved"),
    (True, "rank 0 failed at step 1: out of memory; the other ranks of its guidance group (ranks [0]) stop too; "
           "nothing was saved"),
], ids=["gather fails", "share and gather fail"])
def test_a_failed_gather_names_this_ranks_own_failure_first(
    share_fails: bool, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the gather breaks (a peer died) the message says so, unless this rank's share failed first:
    then its own cause is the one worth reading."""
    import torch.distributed as dist

    def compute(start: int, stop: int) -> torch.Tensor:
        if share_fails:
            raise ValueError("out of memory")
        return torch.ones(stop - start, 2)

    def broken_gather(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("peer gone\nmore detail")

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = GuidanceGroup(1, 0, 0, [0], dist.group.WORLD, torch.device("cpu"), 30.0)
        group.begin_edit(None)
        monkeypatch.setattr(dist, "all_gather", broken_gather)
        with pytest.raises(GuidanceGroupError) as failed:
            group.predictions(2, compute, (2,), torch.float32, "step 1")
    finally:
        dist.destroy_process_group()
    assert str(failed.value) == message


def test_branches_are_shared_in_contiguous_runs_with_the_remainder_first() -> None:
    assert branch_shares(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert branch_shares(3, 2) == [range(0, 2), range(2, 3)]
    assert branch_shares(2, 2) == [range(0, 1), range(1, 2)]
    assert branch_shares(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]
    assert branch_shares(1, 3) == [range(0, 1), range(1, 1), range(1, 1)]


@pytest.mark.parametrize(
    "size,world,single,message",
    [
        (2, 1, True, "--cfg-parallel 2 runs under torchrun: torchrun --nproc-per-node 2"),
        (3, 4, False, "--cfg-parallel 3 needs a number of processes that is a multiple of 3, got 4"),
        (2, 4, True, "one edit needs --cfg-parallel equal to the number of processes (4)"),
        (1, 2, True, "one edit needs --cfg-parallel equal to the number of processes (2)"),
        (4, 4, False, "--cfg-parallel must be 1, 2 or 3"),
    ],
)
def test_launches_that_cannot_form_groups_are_refused(size: int, world: int, single: bool, message: str) -> None:
    with pytest.raises(UserError) as error:
        check_cfg_parallel(size, world, "one edit" if single else None)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("size,world,single", [(1, 1, True), (3, 3, True), (2, 2, True), (3, 6, False), (1, 4, False)])
def test_launches_that_form_groups_pass(size: int, world: int, single: bool) -> None:
    check_cfg_parallel(size, world, "one edit" if single else None)


def test_each_guidance_group_is_made_with_the_dist_timeout_not_the_worlds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dist-timeout bounds how long a rank waits for a hung peer of its group; a group made without it
    would wait the world's (minutes under torchrun; 99 s here) instead. The spawn's "hang" stage shows it live."""
    from datetime import timedelta

    import torch.distributed as dist

    made: list[tuple[list[int], timedelta | None]] = []
    new_group = dist.new_group

    def recording_new_group(ranks: list[int], **kwargs: Any) -> Any:
        made.append((ranks, kwargs.get("timeout")))
        return new_group(ranks, **kwargs)

    monkeypatch.setattr(dist, "new_group", recording_new_group)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            timeout=timedelta(seconds=99))
    try:
        group = form_guidance_group(0, 1, 1, torch.device("cpu"), 6.5)
    finally:
        dist.destroy_process_group()
    assert made == [([0], timedelta(seconds=6.5))]
    assert (group.ranks, group.member, group.index, group.timeout_s, group.leader) == ([0], 0, 0, 6.5, True)


# --- real process groups: one spawn of four ranks plays every scenario ---------------------------------
#
# Starting a process, importing torch and diffusers and loading the tiny editors costs more than most
# scenarios, so one spawn runs them all as stages, each rank writing `<stage>.<rank>.pkl` for the tests
# to assert on: two groups of two gathering apart (4 ranks, no model); the reference, every edit alone,
# spread over ranks 0-2; a world of 3 with one group of 3; a world of 2 with one group of 2 (the edits, a
# Stop, a failing rank) and then a group with a 6 s timeout and a hung rank. A stage that raises is
# recorded and ends that rank's part, so the tests of later stages fail with its message.

HANG_S = 60.0  # the hung rank sleeps until rank 0 has given up on it, or this long


def _two_groups_of_two(rank: int, port: int, items: int) -> dict[str, Any]:
    """4 ranks, --cfg-parallel 2: both groups gather only their own predictions and split a batch's items."""
    import torch

    from hidream_edit.batch import GroupQueue, claimed

    group = _join(rank, 4, port, 60.0, size=2)
    guidance = group.guidance
    try:
        def compute(start: int, stop: int) -> torch.Tensor:  # branch b of rank r holds 100 * r + b
            return torch.stack([torch.full((2, 3), 100.0 * rank + b) for b in range(start, stop)])

        gathered = guidance.predictions(3, compute, (2, 3), torch.float32, "a step")
        summed = guidance.sum_across(torch.tensor([float(rank)]), "a step")  # the step cache's group decision
        mine = list(claimed(GroupQueue(group.ranks, group.edit), items))
        return {"group": guidance.index, "leader": guidance.leader, "gathered": gathered[:, 0, 0].tolist(),
                "summed": summed.item(), "items": mine}
    finally:
        group.close()


def _editors(tiny_root: str, models: tuple[str, ...] = ("e1.1", "e1-full")) -> dict[str, Any]:
    """Tiny editors for `models`, loaded on CPU in fp32 with the sdpa kernel."""
    from hidream_edit.config import resolve_model_sources
    from hidream_edit.editor import Editor, EditorSettings
    from hidream_edit.spec import MODELS

    env = {"HIDREAM_TINY_DIR": tiny_root, "HF_HUB_OFFLINE": "1"}
    return {
        model: Editor.load(EditorSettings(resolve_model_sources(MODELS[model], tiny=True, env=env), device="cpu",
                                          dtype="fp32", attention="sdpa"))
        for model in models
    }


def _join(rank: int, world_size: int, port: int, timeout_s: float, size: int | None = None) -> Any:
    """Join a world of `world_size` ranks on CPU/gloo, in guidance groups of `size` (default: all of them)."""
    from device_utils import DeviceManager
    from hidream_edit.distributed import CardGroup

    env = DistributedEnvironment(world_size, rank, rank, "127.0.0.1", port)
    return CardGroup.join(DeviceManager("cpu", "fp32"), env, size or world_size, timeout_s)


def _edit_all(editors: dict[str, Any], image: str, names: list[str]) -> dict[str, Any]:
    """The named edits of EDITS; what this rank decodes (only a group's leader decodes)."""
    from hidream_edit.editor import EditRequest

    results = {}
    for name in names:
        model, fields = EDITS[name]
        result = editors[model].edit(EditRequest(image=image, steps=2, **fields))
        if result.image is not None:
            results[name] = (np.asarray(result.image), result.metadata)
    return results


def _use_group(editors: dict[str, Any], guidance: Any) -> None:
    for editor in editors.values():
        editor.use_guidance_group(guidance)


def _stop_then_edit(editor: Any, rank: int, image: str) -> dict[str, Any]:
    """The leader asks to stop during the first edit; every rank must stop at the same step, and the
    group must still work for the next edit."""
    from hidream_edit.editor import EditRequest

    asked: list[int] = []

    def stop_on_second_ask() -> bool:
        asked.append(1)
        return len(asked) == 2

    outcome: dict[str, Any] = {}
    request = EditRequest(image=image, instruction="make it snow", steps=4, refine_strength=0.5)
    try:
        editor.edit(request, should_stop=stop_on_second_ask if rank == 0 else None)
        outcome["first"] = "finished"
    except EditCancelled as exc:
        outcome["first"] = str(exc)
    result = editor.edit(request)
    outcome["second"] = None if result.image is None else np.asarray(result.image)
    return outcome


def _broken_edit(editor: Any, rank: int, image: str, mode: str, hung_until: Path | None = None) -> tuple[str, float]:
    """Rank 1 fails (raises) or hangs in its second forward; every rank reports how its edit ended.

    A hung rank sleeps until `hung_until` exists (rank 0 writes it once it has given up) or HANG_S passed.
    """
    from hidream_edit.editor import EditRequest

    pipe = editor.loaded.pipe
    calls = []
    predict = pipe._predict

    def broken_predict(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            if mode == "raise":
                raise RuntimeError("injected failure")
            deadline = time.monotonic() + HANG_S
            while not (hung_until is not None and hung_until.exists()) and time.monotonic() < deadline:
                time.sleep(0.1)
        return predict(*args, **kwargs)

    if rank == 1:
        pipe._predict = broken_predict
    started = time.perf_counter()
    try:
        editor.edit(EditRequest(image=image, instruction="make it snow", steps=3, refine_strength=0.0))
        return "finished", time.perf_counter() - started
    except GuidanceGroupError as exc:
        return str(exc), time.perf_counter() - started
    finally:
        pipe._predict = predict


def _scenarios(rank: int, ports: list[int], tiny_root: str, image: str, folder: str) -> None:
    """Every stage this rank takes part in, in order (see the comment above)."""
    import torch

    torch.set_num_threads(1)
    out = Path(folder)
    state: dict[str, Any] = {}

    def stage(name: str, run: Callable[[], Any]) -> bool:
        try:
            result = {"result": run()}
        except BaseException:  # recorded for the stage's test; this rank takes part in nothing more
            result = {"error": traceback.format_exc()}
        (out / f"{name}.{rank}.pkl").write_bytes(pickle.dumps(result))
        return "error" in result

    if stage("two groups", lambda: _two_groups_of_two(rank, ports[0], 12)) or rank == 3:
        return
    if stage("load", lambda: state.update(editors=_editors(tiny_root))):
        return
    editors = state["editors"]
    if stage("one process", lambda: _edit_all(editors, image, list(EDITS)[rank::3])):
        return

    def in_group(size: int, port: int, run: Callable[[], Any]) -> Any:
        group = _join(rank, size, port, 120.0)
        _use_group(editors, group.guidance)
        try:
            return run()
        finally:
            group.close()

    if stage("group of 3", lambda: in_group(3, ports[1], lambda: _edit_all(editors, image, list(EDITS)))) or rank == 2:
        return
    group = _join(rank, 2, ports[2], 120.0)
    try:
        _use_group(editors, group.guidance)
        e1_1 = editors["e1.1"]
        if (stage("group of 2", lambda: _edit_all(editors, image, list(EDITS)))
                or stage("stop", lambda: _stop_then_edit(e1_1, rank, image))
                or stage("raise", lambda: _broken_edit(e1_1, rank, image, "raise"))):
            return
        short = form_guidance_group(rank, 2, 2, torch.device("cpu"), 6.0, group.ranks.store)
        e1_1.use_guidance_group(short)
        stage("hang", lambda: _broken_edit(e1_1, rank, image, "hang", out / "hang.0.pkl"))
    finally:
        group.close()


@pytest.fixture(scope="module")
def source_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("source") / "source.png"
    ramp = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    Image.fromarray(ramp).save(path)
    return path


@pytest.fixture(scope="module")
def scenarios(tiny_checkpoints: Any, source_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of every stage's results, from one spawn of four ranks (one thread each)."""
    folder = tmp_path_factory.mktemp("scenarios")
    context = multiprocessing.get_context("spawn")
    args = ([free_port() for _ in range(3)], str(tiny_checkpoints.root), str(source_image), str(folder))
    processes = [context.Process(target=_scenarios, args=(rank, *args)) for rank in range(4)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for process in processes:
        process.join(timeout=max(1.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    return folder


def _stage(folder: Path, name: str, ranks: range | tuple[int, ...]) -> list[Any]:
    """Each rank's result of a stage; a failure names the stage and shows the rank's traceback."""
    results = []
    for rank in ranks:
        path = folder / f"{name}.{rank}.pkl"
        assert path.exists(), f"rank {rank} never finished the stage {name!r} (an earlier stage failed or hung)"
        recorded = pickle.loads(path.read_bytes())
        assert "error" not in recorded, f"rank {rank} failed in the stage {name!r}:\n{recorded['error']}"
        results.append(recorded["result"])
    return results


def test_four_ranks_form_two_groups_that_gather_apart_and_split_the_items(scenarios: Path) -> None:
    ranks = _stage(scenarios, "two groups", range(4))
    assert [(r["group"], r["leader"]) for r in ranks] == [(0, True), (0, False), (1, True), (1, False)]
    assert ranks[0]["gathered"] == ranks[1]["gathered"] == [0.0, 1.0, 102.0]  # rank 0 ran branches 0-1, rank 1 #2
    assert ranks[2]["gathered"] == ranks[3]["gathered"] == [200.0, 201.0, 302.0]
    assert [r["summed"] for r in ranks] == [1.0, 1.0, 5.0, 5.0]  # ranks 0+1 and 2+3: each group sums its own
    assert ranks[0]["items"] == ranks[1]["items"] and ranks[2]["items"] == ranks[3]["items"]
    assert sorted(ranks[0]["items"] + ranks[2]["items"]) == list(range(12))  # each item to exactly one group


def _without_measurements(metadata: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metadata.items() if key not in MEASURED}


@pytest.mark.parametrize("size", [3, 2])
def test_a_group_gives_the_image_and_metadata_of_one_process(size: int, scenarios: Path) -> None:
    one_process = {name: edit for share in _stage(scenarios, "one process", range(3)) for name, edit in share.items()}
    assert set(one_process) == set(EDITS)
    group = _stage(scenarios, f"group of {size}", range(size))
    assert all(member == {} for member in group[1:])  # only the leader decodes
    group = group[0]
    assert set(group) == set(EDITS)
    for name, (pixels, metadata) in group.items():
        reference_pixels, reference_metadata = one_process[name]
        difference = np.abs(pixels.astype(int) - reference_pixels.astype(int)).max()
        assert difference <= 1, (name, difference)
        assert _without_measurements(metadata) == _without_measurements(reference_metadata), name
        timings = metadata["timings"]["cfg_parallel"]
        assert timings["size"] == size and [r["rank"] for r in timings["ranks"]] == list(range(size))
        shares = [[step["branches"] for step in r["steps"]] for r in timings["ranks"]]
        guided = metadata["guidance"] > 1
        refine = metadata["refine_start_step"] < 2
        edit_share = [[s.start, s.stop] for s in branch_shares(3 if guided else 1, size)]
        refine_share = [[s.start, s.stop] for s in branch_shares(2 if guided else 1, size)]
        expected = [[edit_share[m], refine_share[m] if refine else edit_share[m]] for m in range(size)]
        assert shares == expected, name
        assert all(step["compute_s"] >= 0 and step["wait_s"] >= 0 for r in timings["ranks"] for step in r["steps"])
    assert "cfg_parallel" not in one_process["e1.1 edit only"][1]["timings"]


# --- failures, hangs and Stop ----------------------------------------------------------------------


def test_a_rank_that_fails_mid_edit_stops_its_whole_group_at_once(scenarios: Path) -> None:
    outcomes = _stage(scenarios, "raise", (0, 1))
    assert outcomes[1][0].startswith("rank 1 failed at denoising step 2 of 3: injected failure; ")
    assert outcomes[0][0].startswith("rank 1 of the guidance group (ranks [0, 1]) failed at denoising step 2 of 3")
    assert all("nothing was saved" in message and "\n" not in message for message, _ in outcomes)


def test_a_hung_rank_ends_the_others_within_the_collective_timeout(scenarios: Path) -> None:
    (message, seconds), hung = _stage(scenarios, "hang", (0, 1))
    assert message.startswith("rank 0 lost its guidance group (ranks [0, 1]) at denoising step 2 of 3: ")
    assert "--dist-timeout 6 s" in message
    assert seconds < HANG_S  # it did not wait for the hung rank to wake up
    assert hung[0] != "finished"


def test_stop_on_the_leader_stops_every_rank_at_the_same_step_and_the_group_goes_on(scenarios: Path) -> None:
    leader, member = _stage(scenarios, "stop", (0, 1))
    assert leader["first"] == member["first"] == "stopped at denoising step 2 of 4"
    assert leader["second"] is not None and leader["second"].shape == (48, 64, 3)
    assert member["second"] is None


# --- the command lines under torchrun ------------------------------------------------------------------


def _clis(runs: list[tuple[list[str], int]], tiny_env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Run (arguments, processes) command lines at the same time (a single process uses one of the cores)."""
    started = []
    for arguments, processes in runs:
        launcher = [sys.executable] if processes == 1 else [TORCHRUN, "--standalone", "--nproc-per-node",
                                                            str(processes), "--monitor-interval", "0.5"]
        started.append(subprocess.Popen([*launcher, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=REPO, env=run_env(tiny_env)))
    done = []
    for process in started:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done


def test_torchrun_cfg_parallel_3_writes_the_single_process_image(
    tiny_env: dict[str, str], source_image: Path, tmp_path: Path
) -> None:
    edit = ["inference_e1_1_npu.py", "--tiny", "--image", str(source_image), "--instruction", "make the sky purple",
            "--steps", "2", "--refine-strength", "0.5"]
    single, grouped = tmp_path / "single" / "out.png", tmp_path / "group" / "out.png"
    single.parent.mkdir()
    grouped.parent.mkdir()
    alone, done = _clis([([*edit, "--output", str(single)], 1),
                         ([*edit, "--cfg-parallel", "3", "--output", str(grouped)], 3)], tiny_env)
    assert alone.returncode == 0, alone.stderr
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("saved ") == 1  # one rank saves
    assert sorted(path.name for path in grouped.parent.iterdir()) == ["out.png", "out.png.json"]
    difference = np.abs(np.asarray(Image.open(single), dtype=int) - np.asarray(Image.open(grouped), dtype=int)).max()
    assert difference <= 1
    single_metadata, group_metadata = (json.loads(Path(f"{path}.json").read_text()) for path in (single, grouped))
    assert group_metadata["timings"]["cfg_parallel"]["size"] == 3
    ignore = (*MEASURED, "output", "output_sha256")  # the pixels may differ by 1 (checked above)
    assert {k: v for k, v in group_metadata.items() if k not in ignore} == {
        k: v for k, v in single_metadata.items() if k not in ignore
    }


def test_torchrun_one_edit_with_the_wrong_group_size_is_refused_before_loading(
    tiny_env: dict[str, str], source_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each rank of `torchrun --nproc-per-node 2` refuses on its own, before joining: so each rank's command line
    runs here, in this process, with the variables torchrun gives it."""
    from hidream_edit.cli import run_edit_cli
    from hidream_edit.distributed import CardGroup
    from hidream_edit.editor import Editor

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("joined or loaded before refusing")

    monkeypatch.setattr(Editor, "load", staticmethod(never))
    monkeypatch.setattr(CardGroup, "join", classmethod(never))
    output = tmp_path / "out.png"
    argv = ["--tiny", "--image", str(source_image), "--instruction", "x", "--output", str(output)]
    for rank in ("0", "1"):
        torchrun_env = {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}
        assert run_edit_cli(argv, "e1.1", env={**tiny_env, **torchrun_env}) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: one edit needs --cfg-parallel equal to the number of processes (2);"), err
        assert err.count("\n") == 1  # one line, no traceback
    assert not output.exists()


def test_torchrun_batch_with_cfg_parallel_2_writes_the_one_process_files(
    tiny_env: dict[str, str], source_image: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for number in range(2):
        Image.open(source_image).rotate(90 * number, expand=True).save(folder / f"p{number}.png")
    batch = ["inference_npu.py", "--tiny", "--input-dir", str(folder), "--instruction", "add a hat", "--steps", "2",
             "--refine-strength", "0.5"]
    alone, done = _clis([([*batch, "--output-dir", str(tmp_path / "one")], 1),
                         ([*batch, "--cfg-parallel", "2", "--output-dir", str(tmp_path / "two")], 2)], tiny_env)
    assert alone.returncode == 0, alone.stderr
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["cfg_parallel"] == 2 and summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
    assert [item["rank"] for item in summary["items"]] == [0, 0]  # the group's leader saves every item
    for number in range(2):
        one, two = (np.asarray(Image.open(tmp_path / run / f"p{number}.png"), dtype=int) for run in ("one", "two"))
        assert np.abs(one - two).max() <= 1


def serve_one_edit(
    flags: list[str], processes: int, e1_1_editor: Any, tiny_env: dict[str, str], source_image: Path, results: Path
) -> dict[str, Any]:
    """torchrun --nproc-per-node `processes` gradio_demo_npu.py --tiny `flags`: one edit through the server's
    API gives the one-process image (within 1/255), then Ctrl-C on rank 0 ends every rank cleanly (the
    followers are released, nobody waits out a timeout). Returns the saved edit's metadata."""
    from gradio_client import Client, handle_file

    from hidream_edit.editor import EditRequest

    port = free_port()
    command = [TORCHRUN, "--standalone", "--nproc-per-node", str(processes), "--monitor-interval", "0.5",
               "gradio_demo_npu.py", "--tiny", *flags, "--port", str(port), "--results-dir", str(results)]
    server = subprocess.Popen(command, cwd=REPO, env=run_env(tiny_env), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "the server never answered"
            try:
                client = Client(f"http://127.0.0.1:{port}", verbose=False)
                break
            except Exception:  # not listening yet: the model is loading
                time.sleep(1)
        answer = client.predict(handle_file(str(source_image)), "make it red", steps=2, seed=11, refine=0.5,
                                api_name="/edit")
        assert answer[2].startswith("Done in "), answer
        (saved,) = [path for path in results.rglob("*.png")]
        metadata = json.loads(Path(f"{saved}.json").read_text())
        alone = e1_1_editor.edit(EditRequest(image=source_image, instruction="make it red", steps=2, seed=11,
                                             refine_strength=0.5))
        difference = np.abs(np.asarray(Image.open(saved), dtype=int) - np.asarray(alone.image, dtype=int)).max()
        assert difference <= 1
        rank_process(server.pid, "0").send_signal(signal.SIGINT)  # Ctrl-C on the server
        assert server.wait(timeout=120) == 0  # the followers were released, nobody waits out a timeout
        assert "hidream_edit/" not in (server.stderr.read() if server.stderr else "")
        return metadata
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_web_ui_serves_edits_with_a_guidance_group_and_stops_cleanly(
    e1_1_editor: Any, tiny_env: dict[str, str], source_image: Path, tmp_path: Path
) -> None:
    """torchrun --nproc-per-node 2 gradio_demo_npu.py --cfg-parallel 2: rank 0 serves, rank 1 follows its edits."""
    metadata = serve_one_edit(["--cfg-parallel", "2"], 2, e1_1_editor, tiny_env, source_image, tmp_path / "results")
    assert [r["rank"] for r in metadata["timings"]["cfg_parallel"]["ranks"]] == [0, 1]
