"""Tensor parallel (--tensor-parallel K) at launch: the layout of all parallel modes and joining it.

One `DeviceMesh` (`ParallelLayout`) describes a launch: data-parallel replicas x guidance groups
(--cfg-parallel) x tensor-parallel groups, in that order, so a tensor-parallel group is K consecutive
ranks (on one server, where the interconnect is fastest). All ranks of a tensor-parallel group run the
same inputs and get the same (replicated) output, so the editing loop, guidance rule and scheduler are
untouched; only the group's first rank decodes and saves. How the transformer is split: tensor_split.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from device_utils import DeviceManager
from hidream_edit.config import DistributedEnvironment
from hidream_edit.distributed import CardGroup, EditGroup, join_process_group
from hidream_edit.errors import GuidanceGroupError, UserError, first_line
from hidream_edit.guidance_parallel import GuidanceGroup, check_cfg_parallel
from hidream_edit.models import ModelSources
from hidream_edit.spec import CFG_PARALLEL_SIZES, I1_TRANSFORMER_CONFIG
from hidream_edit.tensor_split import (
    TensorParallelGroup,
    check_fuse_lora,
    check_head_split,
    check_refine_weights,
)

logger = logging.getLogger(__name__)

MESH_DIMS = ("dp", "cfg", "tp")


@dataclass(frozen=True)
class ParallelLayout:
    """How a launch's ranks are shared out: `dp` replicas x `cfg` guidance ranks x `tp` tensor ranks."""

    world_size: int
    cfg: int = 1
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // self.group_size

    @property
    def group_size(self) -> int:
        """The ranks that edit one image together; the first of them saves it."""
        return self.cfg * self.tp

    def check(self, one_group: str | None) -> None:
        """Refuse a layout this launch cannot form (before anything loads); `one_group` as in
        check_cfg_parallel: the name of a run that edits with a single group, None for batches."""
        if self.tp == 1:
            check_cfg_parallel(self.cfg, self.world_size, one_group)
            return
        if self.cfg not in CFG_PARALLEL_SIZES:
            raise UserError(f"--cfg-parallel must be 1, 2 or 3 (the guidance branches of a step), got {self.cfg}")
        group = self.group_size
        flags = f"--tensor-parallel {self.tp}" + (f" --cfg-parallel {self.cfg}" if self.cfg > 1 else "")
        if self.world_size == 1:
            raise UserError(f"{flags} runs under torchrun: torchrun --nproc-per-node {group} ...")
        if self.world_size % group:
            raise UserError(f"{flags} needs a number of processes that is a multiple of {group}, got {self.world_size}")
        if one_group is not None and self.world_size != group:
            raise UserError(
                f"{one_group} needs --cfg-parallel x --tensor-parallel equal to the number of processes "
                f"({self.world_size}); more processes than that are for batches (--input-dir or --manifest)"
            )

    def mesh(self, device_type: str, timeout_s: float) -> Any:
        """The one DeviceMesh of this launch, dimensions named dp, cfg, tp (every rank must call this).

        The groups along each dimension are made here with `timeout_s` (init_device_mesh would give them
        the backend's default of 30 minutes, so a hung rank would not end its group within --dist-timeout).
        """
        from torch.distributed.device_mesh import DeviceMesh

        ranks = torch.arange(self.world_size).reshape(self.dp, self.cfg, self.tp)
        timeout, mine = timedelta(seconds=timeout_s), []
        for dim in range(len(MESH_DIMS)):
            rows = ranks.movedim(dim, -1).reshape(-1, ranks.shape[dim]).tolist()
            groups = [dist.new_group(row, timeout=timeout) for row in rows]  # every rank makes every group
            mine.append(next(g for g, row in zip(groups, rows, strict=True) if dist.get_rank() in row))
        return DeviceMesh.from_group(mine, device_type, mesh=ranks, mesh_dim_names=MESH_DIMS)


def check_tensor_split(sources: ModelSources, refine_weights: str, tp: int, fuse_lora: bool) -> None:
    """Everything about --tensor-parallel K that can be refused before loading: the refine weights,
    --fuse-lora and whether K divides the head count (from the I1 transformer's config.json, no weights read)."""
    from hidream_edit.models import locate

    if tp == 1:
        return
    check_refine_weights(refine_weights, tp)
    check_fuse_lora(fuse_lora, tp)
    config = locate(sources.i1, "i1", sources.offline, I1_TRANSFORMER_CONFIG) / "transformer" / "config.json"
    if config.is_file():  # a missing file is the loader's to report, with the others
        check_head_split(int(json.loads(config.read_text())["num_attention_heads"]), tp)


def join_layout(
    dm: DeviceManager, env: DistributedEnvironment, layout: ParallelLayout, timeout_s: float
) -> tuple[CardGroup, TensorParallelGroup | None]:
    """Join the world and build the launch's mesh: the guidance group is its cfg dimension (the ranks
    with this rank's dp and tp coordinates), the tensor-parallel group its tp dimension, the edit group
    the cfg x tp ranks of this rank's dp coordinate."""
    if layout.tp == 1:
        return CardGroup.join(dm, env, layout.cfg, timeout_s), None
    ranks = join_process_group(env, dm.distributed_backend, timeout_s)
    try:
        mesh = layout.mesh(dm.device_type, timeout_s)
    except RuntimeError as exc:  # a rank that never reaches new_group: DistStoreError after the timeout
        ranks.close()
        raise GuidanceGroupError(
            f"rank {env.rank} cannot form its tensor-parallel group of {layout.tp}: {first_line(exc)}; "
            "see --dist-timeout"
        ) from exc
    guidance = None
    if layout.cfg > 1:
        cfg = mesh["cfg"]
        dp_index, _, tp_index = mesh.get_coordinate()
        guidance = GuidanceGroup(
            cfg.size(), cfg.get_local_rank(), dp_index * layout.tp + tp_index,
            [int(rank) for rank in cfg.mesh.flatten().tolist()], cfg.get_group(), dm.device, timeout_s, ranks.store,
            dm.synchronize,
        )
    logger.info("rank %d: mesh %s, tensor-parallel ranks %s", env.rank, dict(zip(MESH_DIMS, mesh.mesh.shape,
                strict=True)), mesh["tp"].mesh.flatten().tolist())
    edit = EditGroup.consecutive(env.rank, layout.group_size, ranks.store, timeout_s)
    return CardGroup(dm, ranks, guidance, edit), TensorParallelGroup(mesh["tp"], timeout_s)
