"""Serving with an edit group (--cfg-parallel and/or --tensor-parallel): the web UI runs on the group's
leader, the members follow its edits.

Before each edit the leader's Editor announces it: the resolved request and the model-size input image
(PNG, lossless) go into the rendezvous store under the next job number. Members poll for that number,
run the same edit with `Editor.edit_prepared` and so take their share of every step. Stop reaches them
through the per-step gather (guidance_parallel.py) or the per-step all-reduce of a tensor-parallel group
(tensor_split.py); an empty job means the server has shut down.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import fields

import torch.distributed as dist
from PIL import Image

from hidream_edit.distributed import EditGroup
from hidream_edit.editor import USER_ERRORS, EditCancelled, Editor, EditRequest
from hidream_edit.errors import GuidanceGroupError, first_line

logger = logging.getLogger(__name__)

POLL_S = 0.1


class GroupJobs:
    """Numbered edit jobs from a group's leader to its members, through the store."""

    def __init__(self, store: dist.Store, group: EditGroup) -> None:
        self.store = store
        self.group = group
        self.count = 0

    def _key(self, number: int) -> str:
        return f"jobs/group{self.group.index}/{number}"

    def announce(self, request: EditRequest, model_input: Image.Image, source_size: tuple[int, int]) -> None:
        """Leader: hand this edit to the members (called by the Editor just before it edits)."""
        settings = {field.name: getattr(request, field.name) for field in fields(request) if field.name != "image"}
        header = json.dumps({"request": settings, "source_size": list(source_size)}).encode()
        png = io.BytesIO()
        model_input.save(png, format="PNG")
        self.count += 1
        self.store.set(self._key(self.count), header + b"\n" + png.getvalue())

    def close(self) -> None:
        """Leader: no more edits; members return from `follow`."""
        self.count += 1
        self.store.set(self._key(self.count), b"")

    def next_job(self) -> tuple[EditRequest, Image.Image, tuple[int, int]] | None:
        """Member: wait for the leader's next edit; None once the leader has closed."""
        self.count += 1
        key = self._key(self.count)
        try:
            while not self.store.check([key]):
                time.sleep(POLL_S)
            payload = self.store.get(key)
        except RuntimeError as exc:
            raise GuidanceGroupError(
                f"rank {self.group.rank} lost the leader of its edit group (rank {self.group.ranks[0]}): "
                f"{first_line(exc)}"
            ) from exc
        if not payload:
            return None
        header, png = payload.split(b"\n", 1)
        job = json.loads(header)
        image = Image.open(io.BytesIO(png))
        image.load()
        return EditRequest(image="", **job["request"]), image, (job["source_size"][0], job["source_size"][1])


def follow_leader(editor: Editor, jobs: GroupJobs) -> None:
    """Member: run every edit the leader announces until it closes; a lost group raises GuidanceGroupError."""
    logger.info("rank %d: following the edits of rank %d", jobs.group.rank, jobs.group.ranks[0])
    while (job := jobs.next_job()) is not None:
        request, model_input, source_size = job
        try:
            editor.edit_prepared(request, model_input, source_size)
        except EditCancelled:
            logger.info("rank %d: the leader stopped the edit", jobs.group.rank)
        except USER_ERRORS as exc:  # the leader met the same error and shows it to the user
            logger.info("rank %d: edit failed: %s", jobs.group.rank, exc)
