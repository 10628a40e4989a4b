"""The web UI's edit group (guidance and/or tensor parallel) hands edits from its leader to its members
through the store.

The hand-over is store logic, not a collective, so it is tested in one process with an in-memory store;
tests/test_guidance_parallel.py runs the real web UI under torchrun.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch.distributed as dist
from PIL import Image

from hidream_edit.distributed import EditGroup
from hidream_edit.editor import EditCancelled, EditRequest
from hidream_edit.errors import GuidanceGroupError, UserError
from hidream_edit.group_jobs import GroupJobs, follow_leader

RED = EditRequest(image="in.png", instruction="make it red", negative="blurry", steps=3, guidance=4.5,
                  image_guidance=2.0, refine_strength=0.25, clip_cfg_norm=False, seed=7, keep_aspect=True)
BLUE = EditRequest(image="other.png", instruction="make it blue")


def jobs(store: Any, member: int, index: int = 1) -> GroupJobs:
    return GroupJobs(store, EditGroup(ranks=[2, 3], member=member, index=index, store=store, timeout_s=5.0))


def noise(width: int, height: int) -> Image.Image:
    return Image.frombytes("RGB", (width, height), bytes(range(256)) * (width * height * 3 // 256 + 1))


class AnnouncedStore(dist.HashStore):
    """For a member reading what its leader has already announced: one look per job finds it, so a look
    that finds nothing, or a member that keeps looking, fails at once (a real member would wait forever)."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def check(self, keys: list[str]) -> bool:
        self.looks += 1
        if self.looks > 10 or not super().check(keys):
            raise RuntimeError(f"look {self.looks} at {keys}: a member waiting for a job already announced")
        return True


def test_members_get_each_announced_edit_in_order_then_the_end() -> None:
    store = AnnouncedStore()
    leader, member = jobs(store, 0), jobs(store, 1)
    leader.announce(RED, noise(32, 16), (64, 48))
    leader.announce(BLUE, noise(8, 8), (9, 7))
    leader.close()
    request, image, size = member.next_job()
    assert request == EditRequest(**{**RED.__dict__, "image": ""}) and size == (64, 48)
    assert image.size == (32, 16) and image.tobytes() == noise(32, 16).tobytes()
    request, image, size = member.next_job()
    assert request == EditRequest(image="", instruction="make it blue") and size == (9, 7)
    assert image.tobytes() == noise(8, 8).tobytes()
    assert member.next_job() is None


def test_a_waiting_member_polls_the_store_calmly() -> None:
    """Members wait for the leader's next edit for as long as the web UI is idle: without a pause between
    looks they would keep a CPU core busy for hours."""
    import threading

    class CountingStore(dist.HashStore):
        looks = 0

        def check(self, keys: list[str]) -> bool:
            CountingStore.looks += 1
            return super().check(keys)

    store = CountingStore()
    leader, member = jobs(store, 0), jobs(store, 1)
    threading.Timer(0.8, leader.close).start()
    assert member.next_job() is None
    assert 3 <= CountingStore.looks <= 20  # about one look every 0.1 s (a spinning member: thousands)


def test_groups_do_not_read_each_others_jobs() -> None:
    store = dist.HashStore()
    jobs(store, 0, index=0).announce(RED, noise(4, 4), (4, 4))
    jobs(store, 0, index=1).close()
    assert jobs(store, 1, index=1).next_job() is None
    assert jobs(store, 1, index=0).next_job()[0].instruction == "make it red"


class RecordingEditor:
    """Runs nothing: records each prepared edit and raises what `outcomes` says for it."""

    def __init__(self, *outcomes: BaseException | None) -> None:
        self.outcomes = list(outcomes)
        self.edits: list[tuple[str, tuple[int, int]]] = []

    def edit_prepared(self, request: EditRequest, model_input: Image.Image, source_size: tuple[int, int]) -> None:
        self.edits.append((request.instruction, source_size))
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome


def test_a_member_follows_through_stops_and_user_errors_until_the_leader_closes() -> None:
    store = dist.HashStore()
    leader = jobs(store, 0)
    for number in range(3):
        leader.announce(EditRequest(image="x", instruction=f"edit {number}"), noise(4, 4), (number + 1, 1))
    leader.close()
    editor = RecordingEditor(EditCancelled("stopped at denoising step 1 of 2"), UserError("bad"), None)
    follow_leader(editor, jobs(store, 1))
    assert editor.edits == [("edit 0", (1, 1)), ("edit 1", (2, 1)), ("edit 2", (3, 1))]


def test_a_group_failure_during_an_edit_ends_the_member() -> None:
    store = dist.HashStore()
    leader = jobs(store, 0)
    leader.announce(RED, noise(4, 4), (4, 4))
    leader.close()
    editor = RecordingEditor(GuidanceGroupError("rank 2 failed"), None)
    with pytest.raises(GuidanceGroupError, match="rank 2 failed"):
        follow_leader(editor, jobs(store, 1))
    assert len(editor.edits) == 1


class LostStore:
    """A store whose server has gone away (the leader's process died)."""

    def check(self, keys: list[str]) -> bool:
        raise RuntimeError("Connection reset by peer\nC++ frames follow")


def test_a_lost_leader_is_one_line_naming_both_ranks() -> None:
    with pytest.raises(GuidanceGroupError) as error:
        jobs(LostStore(), 1).next_job()
    assert str(error.value) == "rank 3 lost the leader of its edit group (rank 2): Connection reset by peer"


def test_edit_groups_are_consecutive_ranks_whose_first_leads() -> None:
    group = EditGroup.consecutive(5, 4, None, 1.0)  # e.g. --cfg-parallel 2 --tensor-parallel 2 on 8 ranks
    assert (group.ranks, group.member, group.index, group.rank, group.leader) == ([4, 5, 6, 7], 1, 1, 5, False)
    assert EditGroup.consecutive(4, 4, None, 1.0).leader


def test_the_leader_computes_what_the_group_agrees_on_once_and_its_failure_ends_the_members_wait() -> None:
    store = dist.HashStore()
    leader, member = (EditGroup([2, 3], rank, 1, store, 5.0) for rank in (0, 1))
    assert leader.agree("item1", lambda: "7") == "7"
    assert member.agree("item1", lambda: pytest.fail("a member computed")) == "7"

    def no_vlm() -> str:
        raise UserError("the VLM did not answer")

    with pytest.raises(UserError):
        leader.agree("instruction", no_vlm)
    with pytest.raises(GuidanceGroupError, match=r"^rank 2 \(the group's leader\) stopped before the edit: the VLM"):
        member.agree("instruction", lambda: pytest.fail("a member computed"))
