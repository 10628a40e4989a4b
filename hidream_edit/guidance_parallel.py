"""Guidance-parallel denoising: the K ranks of a group share the guidance branches of one edit.

In every step each rank runs the transformer on its share of the branches (edit stage 3, refine stage 2,
guidance off 1), the shares are gathered with the group's device collective (hccl on Ascend, nccl on
CUDA, gloo on CPU) and every rank applies the guidance rule and the scheduler step itself, so all ranks
hold identical latents without ever sending them. The gathered buffer carries one flag per rank as its
last element: "stop" (the web UI's Stop) or "failed" (an exception on that rank), so every rank leaves
the loop at the same step instead of waiting out the collective timeout.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hidream_edit.errors import EditCancelled, GroupPeerFailed, GuidanceGroupError, UserError, first_line
from hidream_edit.spec import CFG_PARALLEL_SIZES

logger = logging.getLogger(__name__)

FLAG_GO, FLAG_STOP, FLAG_FAILED = 0.0, 1.0, 2.0


def branch_shares(branches: int, size: int) -> list[range]:
    """Contiguous shares of `branches` over `size` ranks, earlier ranks taking the remainder.

    3 over 3: one each; 3 over 2: [0, 1] and [2]; 2 over 3: [0], [1] and nothing; 1 over K: rank 0 alone.
    """
    base, extra = divmod(branches, size)
    shares, start = [], 0
    for member in range(size):
        count = base + (1 if member < extra else 0)
        shares.append(range(start, start + count))
        start += count
    return shares


def check_cfg_parallel(size: int, world_size: int, one_group: str | None) -> None:
    """Refuse a --cfg-parallel that this launch cannot form groups for (before anything loads).

    `one_group` names a run that edits with a single group ("one edit", "the web UI"); None for batches.
    """
    if size not in CFG_PARALLEL_SIZES:
        raise UserError(f"--cfg-parallel must be 1, 2 or 3 (the guidance branches of a step), got {size}")
    if size > 1 and world_size == 1:
        raise UserError(f"--cfg-parallel {size} runs under torchrun: torchrun --nproc-per-node {size} ...")
    if world_size % size:
        raise UserError(
            f"--cfg-parallel {size} needs a number of processes that is a multiple of {size}, got {world_size}"
        )
    if one_group is not None and world_size != size:
        raise UserError(
            f"{one_group} needs --cfg-parallel equal to the number of processes ({world_size}); "
            "more processes than that are for batches (--input-dir or --manifest)"
        )


@dataclass
class GuidanceGroup:
    """This rank's place among the K ranks that edit together, and what it measured in the current edit.

    `should_stop` (set per edit by the Editor) is asked before every gather; `synchronize` waits for the
    device so that compute and waiting on the collective are timed apart.
    """

    size: int
    member: int
    index: int
    ranks: list[int]
    process_group: Any
    device: torch.device
    timeout_s: float
    store: dist.Store | None = None
    synchronize: Callable[[], None] = lambda: None
    should_stop: Callable[[], bool] | None = None
    edits: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.ranks[self.member]

    @property
    def leader(self) -> bool:
        """The rank that decodes and saves; the others only share the denoising."""
        return self.member == 0

    def begin_edit(self, should_stop: Callable[[], bool] | None) -> None:
        self.edits += 1
        self.should_stop = should_stop
        self.steps = []

    def predictions(
        self,
        branches: int,
        compute: Callable[[int, int], torch.Tensor],
        branch_shape: tuple[int, ...],
        dtype: torch.dtype,
        where: str,
        settle: Callable[[bool], None] | None = None,
    ) -> torch.Tensor:
        """All `branches` predictions [branches, *branch_shape], this rank computing `compute(start, stop)`.

        `settle(failed)` runs after this rank's share, or in its place, before the gather: the step cache
        joins there the group's sum that the other ranks make inside their share (step_cache.py).
        """
        shares = branch_shares(branches, self.size)
        mine = shares[self.member]
        numel = math.prod(branch_shape)
        send = torch.zeros(max(len(share) for share in shares) * numel + 1, dtype=dtype, device=self.device)
        started = time.perf_counter()
        failure: Exception | None = None
        try:
            if len(mine):
                send[: len(mine) * numel] = compute(mine.start, mine.stop).reshape(-1).to(dtype)
            flag = FLAG_STOP if self.should_stop is not None and self.should_stop() else FLAG_GO
        except GroupPeerFailed:  # the failed rank's own flag in this gather names it
            flag = FLAG_GO
        except Exception as exc:  # told to the other ranks in this very gather, then raised here
            failure, flag = exc, FLAG_FAILED
        if settle is not None:
            settle(failure is not None)
        send[-1] = flag
        self.synchronize()
        computed = time.perf_counter()
        received = [torch.empty_like(send) for _ in shares]
        try:
            dist.all_gather(received, send, group=self.process_group)
            self.synchronize()
        except RuntimeError as exc:  # gloo/nccl/hccl report timeouts and lost peers as RuntimeError
            if failure is not None:
                raise self._failed_here(failure, where) from failure
            raise GuidanceGroupError(
                f"rank {self.rank} lost its guidance group (ranks {self.ranks}) at {where}: {first_line(exc)}; "
                f"a rank failed, died or took longer than --dist-timeout {self.timeout_s:g} s; nothing was saved"
            ) from exc
        waited = time.perf_counter()
        if failure is not None:
            raise self._failed_here(failure, where) from failure
        flags = [float(buffer[-1]) for buffer in received]
        failed = [self.ranks[member] for member, value in enumerate(flags) if value == FLAG_FAILED]
        if failed:
            raise GuidanceGroupError(
                f"rank {failed[0]} of the guidance group (ranks {self.ranks}) failed at {where} "
                "(its own message says why); nothing was saved"
            )
        if FLAG_STOP in flags:
            raise EditCancelled(f"stopped at {where}")
        self.steps.append({"branches": [mine.start, mine.stop], "compute_s": round(computed - started, 4),
                           "wait_s": round(waited - computed, 4)})
        parts = [buffer[: len(share) * numel].view(len(share), *branch_shape)
                 for buffer, share in zip(received, shares, strict=True)]
        return torch.cat(parts)

    def sum_across(self, values: torch.Tensor, where: str) -> torch.Tensor:
        """`values` (a few numbers) summed over the ranks of the group, e.g. the step cache's decision."""
        buffer = values.to(device=self.device, dtype=torch.float32)
        try:
            dist.all_reduce(buffer, group=self.process_group)
        except RuntimeError as exc:
            raise GuidanceGroupError(
                f"rank {self.rank} lost its guidance group (ranks {self.ranks}) at {where}: {first_line(exc)}; "
                f"a rank failed, died or took longer than --dist-timeout {self.timeout_s:g} s; nothing was saved"
            ) from exc
        return buffer.cpu()

    def _failed_here(self, failure: Exception, where: str) -> GuidanceGroupError:
        return GuidanceGroupError(
            f"rank {self.rank} failed at {where}: {first_line(failure)}; "
            f"the other ranks of its guidance group (ranks {self.ranks}) stop too; nothing was saved"
        )

    def _timing_key(self, member: int) -> str:
        return f"cfg_parallel/group{self.index}/edit{self.edits}/member{member}"

    def finish_edit(self) -> dict[str, Any]:
        """Per-step compute and wait of every rank of the group (the leader collects them through the store)."""
        mine = {"rank": self.rank, "steps": self.steps}
        ranks = [mine]
        if self.store is not None:
            try:
                self.store.set(self._timing_key(self.member), json.dumps(mine))
            except RuntimeError as exc:
                raise GuidanceGroupError.store_lost(self.rank, first_line(exc)) from exc
            if self.leader:
                keys = [self._timing_key(member) for member in range(self.size)]
                try:
                    self.store.wait(keys, timedelta(seconds=self.timeout_s))
                    ranks = [json.loads(self.store.get(key).decode()) for key in keys]
                except RuntimeError as exc:
                    logger.warning("no per-rank timings from the guidance group: %s", first_line(exc))
        return {"size": self.size, "ranks": ranks}


def form_guidance_group(
    rank: int,
    world_size: int,
    size: int,
    device: torch.device,
    timeout_s: float,
    store: dist.Store | None = None,
    synchronize: Callable[[], None] = lambda: None,
) -> GuidanceGroup:
    """Split the joined world into groups of `size` consecutive ranks (every rank creates every group,
    as torch.distributed requires) and return this rank's."""
    timeout = timedelta(seconds=timeout_s)
    groups = [list(range(first, first + size)) for first in range(0, world_size, size)]
    handles = [dist.new_group(ranks, timeout=timeout) for ranks in groups]
    index = rank // size
    logger.info("rank %d: guidance group %d of %d, ranks %s", rank, index, len(groups), groups[index])
    return GuidanceGroup(size, rank % size, index, groups[index], handles[index], device, timeout_s, store,
                         synchronize)

