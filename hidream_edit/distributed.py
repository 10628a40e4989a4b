"""Joining torchrun's process group, the little coordination a batch needs across ranks, and the edit
groups: the --cfg-parallel x --tensor-parallel ranks that edit one image together, whose first rank (the
leader) claims the work, tells the others and saves (guidance_parallel.py and tensor_split.py do the
per-step sharing).

The group is joined with the device's backend (hccl on Ascend, nccl on CUDA, gloo on CPU). Handing out
items and collecting per-rank results go through the rendezvous store (a TCPStore on the master that
torchrun or rank 0 hosts), not through device collectives: a counter there is atomic for every rank on
every node, and small text results need no device buffers. No model facts here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist

from hidream_edit.config import DistributedEnvironment
from hidream_edit.errors import GuidanceGroupError, UserError, first_line

if TYPE_CHECKING:
    from device_utils import DeviceManager
    from hidream_edit.guidance_parallel import GuidanceGroup

logger = logging.getLogger(__name__)


def master_address(env: DistributedEnvironment) -> str:
    """MASTER_ADDR:MASTER_PORT, an IPv6 address in brackets (given with or without them)."""
    host = (env.master_addr or "").removeprefix("[").removesuffix("]")
    return f"[{host}]:{env.master_port}" if ":" in host else f"{host}:{env.master_port}"


def rendezvous_url(env: DistributedEnvironment) -> str:
    """tcp://MASTER_ADDR:MASTER_PORT with this process's rank and the world size."""
    return f"tcp://{master_address(env)}?rank={env.rank}&world_size={env.world_size}"


@dataclass
class RankGroup:
    """This process's place in the group plus the store the ranks share (keys already per attempt)."""

    env: DistributedEnvironment
    store: dist.Store
    timeout: timedelta
    backend: str

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def _key(self, name: str) -> str:
        return f"batch/{name}"

    def _lost(self, exc: RuntimeError) -> GuidanceGroupError:
        """The store's host (torchrun's agent, or rank 0 without one) is gone: no rank can go on."""
        return GuidanceGroupError.store_lost(self.rank, first_line(exc), master_address(self.env))

    def take_number(self, counter: str) -> int:
        """The next number (0, 1, 2, ...) of a counter all ranks share; no two calls get the same one."""
        return self.add(counter, 1) - 1

    def add(self, counter: str, amount: int) -> int:
        """Add to a shared counter and return its new value (amount 0 reads it)."""
        try:
            return int(self.store.add(self._key(counter), amount))
        except RuntimeError as exc:  # DistNetworkError: the store's host went away
            raise self._lost(exc) from exc

    def publish(self, name: str, text: str) -> None:
        """Leave this rank's text under `name` for rank 0 to collect."""
        try:
            self.store.set(self._key(f"{name}/{self.rank}"), text)
        except RuntimeError as exc:
            raise self._lost(exc) from exc

    def collect(self, name: str) -> list[str]:
        """Every rank's text under `name`, in rank order; waits up to the group timeout for each."""
        keys = [self._key(f"{name}/{rank}") for rank in range(self.world_size)]
        try:
            self.store.wait(keys, self.timeout)
        except dist.DistNetworkError as exc:
            raise self._lost(exc) from exc
        except RuntimeError as exc:
            raise UserError(
                f"rank 0 waited {self.timeout.total_seconds():g} s for the other ranks' results "
                f"({first_line(exc)}); see --dist-timeout"
            ) from exc
        return [self.store.get(key).decode() for key in keys]

    def collect_present(self, name: str) -> dict[int, str]:
        """The texts under `name` that ranks have left so far, by rank; waits for none (after `collect` failed)."""
        keys = {rank: self._key(f"{name}/{rank}") for rank in range(self.world_size)}
        return {rank: self.store.get(key).decode() for rank, key in keys.items() if self.store.check([key])}

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def join_process_group(env: DistributedEnvironment, backend: str, timeout_s: float) -> RankGroup:
    """Rendezvous at MASTER_ADDR:MASTER_PORT and join the default process group with `backend`.

    Under torchrun the store is the agent's (TORCHELASTIC_USE_AGENT_STORE, read by torch); otherwise
    rank 0 hosts it. The agent's store outlives a restart (--max-restarts), so everything, the process
    group's own keys included, goes under a prefix per attempt: a restarted group never reads the
    addresses or counters of the attempt before. Waits at most `timeout_s`, then fails with one line.
    """
    timeout = timedelta(seconds=timeout_s)
    where = master_address(env)
    try:
        shared, rank, world_size = next(dist.rendezvous(rendezvous_url(env), timeout=timeout))
        store = dist.PrefixStore(f"hidream_edit/attempt{env.attempt}/", shared)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    except (RuntimeError, ValueError) as exc:  # DistStoreError and DistNetworkError are RuntimeErrors
        raise UserError(
            f"rank {env.rank} of {env.world_size} cannot join the {backend} process group at {where}: "
            f"{first_line(exc)}"
        ) from exc
    logger.info("rank %d of %d joined the %s process group at %s", rank, world_size, backend, where)
    return RankGroup(env, store, timeout, backend)


@dataclass(frozen=True)
class EditGroup:
    """The ranks that edit one image together (--cfg-parallel x --tensor-parallel of them, consecutive):
    the first, the leader, decides what the group edits and saves it; the others only share the denoising.
    Agreement goes through the rendezvous store, so it needs no device and no collective."""

    ranks: list[int]
    member: int
    index: int
    store: dist.Store | None
    timeout_s: float

    @classmethod
    def consecutive(cls, rank: int, size: int, store: dist.Store | None, timeout_s: float) -> EditGroup:
        """Rank `rank`'s group among groups of `size` consecutive ranks (0..size-1, size..2*size-1, ...)."""
        first = rank - rank % size
        return cls(list(range(first, first + size)), rank % size, rank // size, store, timeout_s)

    @property
    def rank(self) -> int:
        return self.ranks[self.member]

    @property
    def leader(self) -> bool:
        """The rank that decodes and saves; the others only share the denoising."""
        return self.member == 0

    def agree(self, name: str, compute: Callable[[], str]) -> str:
        """A text the leader computes once and every rank of the group uses (e.g. a VLM-rewritten prompt,
        which could differ between two asks, or the next batch item). A failure on the leader ends the
        members' wait at once."""
        key = f"agree/group{self.index}/{name}"
        if self.store is None:
            return compute()
        if self.leader:
            try:
                text = compute()
            except BaseException as exc:
                with contextlib.suppress(RuntimeError):  # a lost store: the members find out themselves
                    self.store.set(key, b"\0" + first_line(exc).encode())
                raise
            try:
                self.store.set(key, text.encode())
            except RuntimeError as exc:
                raise GuidanceGroupError.store_lost(self.rank, first_line(exc)) from exc
            return text
        try:
            self.store.wait([key], timedelta(seconds=self.timeout_s))
            value = self.store.get(key)
        except dist.DistNetworkError as exc:
            raise GuidanceGroupError.store_lost(self.rank, first_line(exc)) from exc
        except RuntimeError as exc:
            raise GuidanceGroupError(
                f"rank {self.rank} waited {self.timeout_s:g} s for the {name} from rank {self.ranks[0]} "
                f"({first_line(exc)}); see --dist-timeout"
            ) from exc
        if value.startswith(b"\0"):
            raise GuidanceGroupError(f"rank {self.ranks[0]} (the group's leader) stopped before the edit: "
                                     f"{value[1:].decode(errors='replace')}")
        return value.decode()


@dataclass
class CardGroup:
    """What a rank under torchrun holds: its device, the joined process group, its guidance group and
    its edit group."""

    dm: DeviceManager
    ranks: RankGroup
    guidance: GuidanceGroup | None  # None with --cfg-parallel 1
    edit: EditGroup | None = None  # None when every rank edits alone (--cfg-parallel 1 --tensor-parallel 1)

    @classmethod
    def join(cls, dm: DeviceManager, env: DistributedEnvironment, cfg_parallel: int, timeout_s: float) -> CardGroup:
        """Join the world with the backend of this rank's card and form the groups of `cfg_parallel` ranks."""
        from hidream_edit.guidance_parallel import form_guidance_group

        ranks = join_process_group(env, dm.distributed_backend, timeout_s)
        if cfg_parallel == 1:
            return cls(dm, ranks, None)
        try:
            guidance = form_guidance_group(
                env.rank, env.world_size, cfg_parallel, dm.device, timeout_s, ranks.store, dm.synchronize
            )
        except RuntimeError as exc:  # a rank that never reaches new_group: DistStoreError after the timeout
            ranks.close()
            raise GuidanceGroupError(
                f"rank {env.rank} cannot form its guidance group of {cfg_parallel}: {first_line(exc)}; "
                "see --dist-timeout"
            ) from exc
        except BaseException:
            ranks.close()
            raise
        return cls(dm, ranks, guidance, EditGroup.consecutive(env.rank, cfg_parallel, ranks.store, timeout_s))

    def close(self) -> None:
        self.ranks.close()
