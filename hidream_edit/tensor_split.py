"""How the HiDream transformer's weights are split over the K ranks of a tensor-parallel group.

Every block's attention heads and feed-forward hidden widths (each routed expert, the shared expert, the
text feed-forward) are split with torch's DTensor tensor parallelism: the projections that widen
(`to_q/to_k/to_v`, their `_t` twins, `w1/w3`) are column-parallel, the ones that narrow back (`to_out`,
`to_out_t`, `w2`) row-parallel: one all-reduce of the output per attention and per feed-forward call
(each routed expert that gets tokens, the shared expert, the text feed-forward). HiDream's q/k RMS norms
span all heads together, so after a head split each rank holds part of the vector being normalised:
`HeadSplitRMSNorm` all-reduces the sum of squares. The MoE gate, embedders, adaLN modulation and final
layer stay whole on every rank (18% of the real transformer): every rank then routes the same tokens to
the same experts, which keeps the collectives of all ranks in step. Here too: the slices a rank reads
from disk, its share in the memory plan, and its group (the models, the planner and the Editor use
this module; the launch layout lives in tensor_parallel.py).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hidream_edit.errors import GuidanceGroupError, UserError, first_line
from hidream_edit.placement import Budgets, ModelSizes, Plan, plan_placement, working_set
from hidream_edit.spec import REAL_PARAMETERS, REAL_TRANSFORMER_SPLIT, TEXT_ENCODERS, ModelSpec

logger = logging.getLogger(__name__)

# memory plans that keep the transformer on its card (a split transformer cannot be moved in and out)
RESIDENT_PLACEMENTS = ("none", "split", "encoders")
REAL_SPLIT_FRACTION = REAL_TRANSFORMER_SPLIT / REAL_PARAMETERS["transformer"]

# The split of one HiDream block, by module name inside `double_stream_blocks.N.block` or
# `single_stream_blocks.N.block`: "colwise" splits the output features (heads, hidden width), "rowwise"
# the input features (its output is all-reduced), "norm" is a q/k RMS norm over a head-split width.
BLOCK_PLAN: dict[str, str] = {
    "attn1.to_q": "colwise",
    "attn1.to_k": "colwise",
    "attn1.to_v": "colwise",
    "attn1.to_out": "rowwise",
    "attn1.q_rms_norm": "norm",
    "attn1.k_rms_norm": "norm",
    "attn1.to_q_t": "colwise",
    "attn1.to_k_t": "colwise",
    "attn1.to_v_t": "colwise",
    "attn1.to_out_t": "rowwise",
    "attn1.q_rms_norm_t": "norm",
    "attn1.k_rms_norm_t": "norm",
    "ff_i.experts.*.w1": "colwise",
    "ff_i.experts.*.w3": "colwise",
    "ff_i.experts.*.w2": "rowwise",
    "ff_i.shared_experts.w1": "colwise",
    "ff_i.shared_experts.w3": "colwise",
    "ff_i.shared_experts.w2": "rowwise",
    "ff_t.w1": "colwise",
    "ff_t.w3": "colwise",
    "ff_t.w2": "rowwise",
}
BLOCK_PREFIXES = ("double_stream_blocks.*.block.", "single_stream_blocks.*.block.")
ATTENTION_SUFFIX = ".attn1"

def resident_error(placement: str, card: str = "this card") -> str | None:
    """Why a plan cannot hold a split transformer: one that streams or moves it (None: it stays resident)."""
    if placement in RESIDENT_PLACEMENTS:
        return None
    return (f"with --tensor-parallel each card keeps its share of the transformer resident, but {card} "
            f"only fits the '{placement}' plan, which moves it between host and card; use a larger "
            "--tensor-parallel or cards with more free memory (--plan shows each card's plan)")


def config_split_fraction(i1_dir: Path | None) -> float:
    """The split share of the transformer described by I1's config.json (built on the meta device, no
    weights), or of the real model without one."""
    from diffusers import HiDreamImageTransformer2DModel

    if i1_dir is None or not (i1_dir / "transformer" / "config.json").is_file():
        return REAL_SPLIT_FRACTION
    config = HiDreamImageTransformer2DModel.load_config(i1_dir / "transformer")
    with torch.device("meta"):
        return split_fraction(HiDreamImageTransformer2DModel.from_config(config))


def tensor_share(sizes: ModelSizes, i1_dir: Path | None, tp: int) -> ModelSizes:
    """The sizes as one rank of a tensor-parallel group sees them: its slice of the split weights plus the
    whole rest of the transformer, and the working set of heads / K heads and feed-forward width / K."""
    if tp == 1:
        return sizes
    fraction = config_split_fraction(i1_dir)

    def share(size: int) -> int:
        return int(size * (1 - fraction) + size * fraction / tp)

    components = {**sizes.components, "transformer": share(sizes.components["transformer"])}
    dims = replace(sizes.dims, heads=sizes.dims.heads // tp, ffn_width=sizes.dims.ffn_width // tp)
    return replace(sizes, components=components, largest_block=share(sizes.largest_block), dims=dims)


@dataclass(frozen=True)
class GroupPlan:
    """The memory plan of a tensor-parallel group: which member holds each text encoder (each on one card,
    loaded once for the group, its embeddings broadcast to the others) and each member's own plan (its
    share of the transformer, the VAE, the encoders it holds, resident where its card has room)."""

    owners: dict[str, int]
    plans: tuple[Plan, ...]

    @property
    def error(self) -> str | None:
        """The first member that cannot run: its plan's error, or a plan that would move its share."""
        for member, plan in enumerate(self.plans):
            card = f"card {member + 1} of the group"
            if plan.error:
                return f"{card}: {plan.error}"
            error = resident_error(plan.placement, card)
            if error:
                return error
        return None

    def held_by(self, member: int) -> tuple[str, ...]:
        return tuple(name for name in TEXT_ENCODERS if self.owners[name] == member)

    def as_dict(self) -> dict[str, Any]:
        return {"tensor_parallel": len(self.plans), "encoder_owners": self.owners, "error": self.error,
                "members": [plan.as_dict() for plan in self.plans]}

    def summary(self) -> str:
        lines = [f"tensor parallel {len(self.plans)}: the plan of each card of a group; its transformer is this "
                 "card's share (its slices of the split weights, the rest whole); each text encoder is held by "
                 "one card of the group, which shares its embeddings with the others"]
        for member, plan in enumerate(self.plans):
            lines.append(f"--- card {member + 1} of {len(self.plans)} (group rank {member}) ---")
            lines.append(plan.summary())
        return "\n".join(lines)


def _room(budgets: Budgets) -> int:
    """What a member may fill: its card, or host memory on the CPU (unknown: as much as any other member)."""
    if budgets.cards:
        return budgets.edit.budget
    return budgets.host if budgets.host is not None else 0


def plan_tensor_group(
    spec: ModelSpec, sizes: ModelSizes, members: list[Budgets], asked: str = "auto", attention: str = "sdpa",
    encoder_device: str | None = None,
) -> GroupPlan:
    """Place each text encoder on one member of a tensor-parallel group and plan every member.

    `sizes` as tensor_share gives them; `members[i]` the budgets of the group's i-th rank (its own card and
    the host). The largest encoder goes first, each to the member with the most room left after its share,
    the VAE, the working set and the encoders already given to it, so an encoder stays resident wherever
    one card of the group has room for it, and visits its card from host memory otherwise. Every rank of a
    group computes the same plan from the same gathered budgets, so they agree on the owners.
    """
    reserve = working_set(spec, sizes.dtype, attention, sizes.dims)
    resident = sizes.components["transformer"] + sizes.components["vae"] + reserve.total
    room = [_room(budgets) - resident for budgets in members]
    owners: dict[str, int] = {}
    for name in sorted(TEXT_ENCODERS, key=lambda encoder: -sizes.components[encoder]):
        member = max(range(len(members)), key=lambda index: (room[index], -index))
        owners[name] = member
        room[member] -= sizes.components[name]
    plans = []
    for member, budgets in enumerate(members):
        elsewhere = [name for name in TEXT_ENCODERS if owners[name] != member]
        own_sizes = replace(sizes, components={**sizes.components, **dict.fromkeys(elsewhere, 0)})
        plan = plan_placement(spec, own_sizes, budgets, asked, attention, encoder_device)  # its own card only
        homes = {**plan.chosen.homes, **{name: _home_of(members, owners[name]) for name in elsewhere}}
        devices = tuple(replace(peak, components=tuple(c for c in peak.components if c not in elsewhere))
                        for peak in plan.chosen.devices)
        host = replace(plan.chosen.host, components=tuple(c for c in plan.chosen.host.components if c not in elsewhere))
        plans.append(replace(plan, sizes=sizes, chosen=replace(plan.chosen, homes=homes, devices=devices, host=host)))
    return GroupPlan(owners, tuple(plans))


def _home_of(members: list[Budgets], owner: int) -> str:
    card = members[owner].edit.name if members[owner].cards else "host"
    return f"{card} (group rank {owner})"


def member_budgets(budgets: Budgets, size: int) -> list[Budgets]:
    """The budgets of the `size` members of a group whose first card is the budgets' edit card (a described
    host, or --plan on this machine): each member's own card and the shared host."""
    if not budgets.cards:
        return [budgets] * size
    first = budgets.edit_card
    if first + size > len(budgets.cards):
        raise UserError(f"a tensor-parallel group of {size} starting at {budgets.edit.name} needs {size} cards, "
                        f"but only {len(budgets.cards) - first} are there from that card on")
    return [replace(budgets, cards=(budgets.cards[first + member],), edit_card=0) for member in range(size)]


def check_head_split(heads: int, tp: int) -> None:
    """K must divide the attention heads (20 in the real model: 2 or 4 in practice)."""
    if tp > 1 and heads % tp:
        raise UserError(
            f"--tensor-parallel {tp} must divide the transformer's {heads} attention heads "
            f"(use one of {', '.join(str(k) for k in range(2, heads + 1) if heads % k == 0)})"
        )


def check_refine_weights(refine_weights: str, tp: int) -> None:
    """--refine-weights base swaps whole tensors in and out for the refine steps; a split holds slices."""
    if tp > 1 and refine_weights == "base":
        raise UserError(
            "refining with the base weights swaps whole tensors, which a tensor-parallel split does not hold; "
            "use the default refine weights (edit) with --tensor-parallel"
        )


def check_fuse_lora(fuse_lora: bool, tp: int) -> None:
    """PEFT's merge multiplies lora_B by lora_A, and under a split one of them is a DTensor slice and the
    other a whole plain tensor, which torch refuses to mix."""
    if tp > 1 and fuse_lora:
        raise UserError(
            "--fuse-lora cannot merge a LoRA that a tensor-parallel split holds in slices; "
            "leave it off with --tensor-parallel (the LoRA then runs unfused)"
        )


class HeadSplitRMSNorm(nn.Module):
    """An RMS norm over a width split across the ranks of `group`: the sum of squares is all-reduced, so
    each rank normalises its slice exactly as the whole vector would be normalised in one process."""

    def __init__(self, norm: nn.RMSNorm, group: Any, member: int, size: int,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__()
        (self.full_width,) = norm.normalized_shape
        width = self.full_width // size
        self.group = group
        self.eps = norm.eps
        if weight is None and norm.weight is not None:
            weight = norm.weight.detach()[member * width:(member + 1) * width].clone()
        self.weight = None if weight is None else nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        squares = x32.pow(2).sum(dim=-1, keepdim=True)
        dist.all_reduce(squares, group=self.group)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        out = (x32 * torch.rsqrt(squares / self.full_width + eps)).to(x.dtype)
        return out if self.weight is None else out * self.weight


# (kind, parameter) -> the dimension split: a column-parallel linear splits its output features (weight
# rows, bias), a row-parallel one its input features (weight columns; its bias is added once, whole).
SLICE_DIMS: dict[tuple[str, str], int] = {("colwise", "weight"): 0, ("colwise", "bias"): 0,
                                          ("rowwise", "weight"): 1, ("norm", "weight"): 0}


def _style(kind: str) -> Any:
    """torch's style for `kind`; src_data_rank None: every rank slices the tensor it holds (no scatter)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    style = ColwiseParallel() if kind == "colwise" else RowwiseParallel()
    style.src_data_rank = None
    return style


def _split_targets(module: nn.Module, name: str, kind: str) -> list[tuple[str, nn.Module]]:
    """The linears split with `kind` for the planned linear `name`, by state-dict prefix: the linear itself,
    or for a PEFT LoRA layer its base and the adapters that match it: column-parallel base -> lora_B
    column-parallel (lora_A whole); row-parallel base -> lora_A row-parallel (its partial sums reduced),
    lora_B whole."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return [(name, module)]
    part = "lora_B" if kind == "colwise" else "lora_A"
    adapters = getattr(module, part)
    return [(f"{name}.base_layer", base), *((f"{name}.{part}.{adapter}", adapters[adapter]) for adapter in adapters)]


def _split_linear(module: nn.Module, name: str, kind: str, mesh: Any) -> None:
    """Split one linear (with a PEFT LoRA: its base and matching adapters, see _split_targets)."""
    from torch.distributed.tensor.parallel import parallelize_module

    for _, target in _split_targets(module, name, kind):
        parallelize_module(target, mesh, _style(kind))
        _own_storage(target)


def _own_storage(module: nn.Module) -> None:
    """Give each local shard its own storage: a row slice of a whole tensor is a view that would keep the
    whole tensor alive, and the point of the split is that a rank holds only its share."""
    from torch.distributed.tensor import DTensor

    for name, parameter in list(module.named_parameters(recurse=False)):
        local = parameter.to_local() if isinstance(parameter, DTensor) else None
        if local is not None and local.untyped_storage().nbytes() > local.numel() * local.element_size():
            shard = DTensor.from_local(local.clone(), parameter.device_mesh, parameter.placements, run_check=False)
            module.register_parameter(name, nn.Parameter(shard, requires_grad=parameter.requires_grad))


def _plan_for(transformer: nn.Module) -> dict[str, str]:
    """The concrete module names of BLOCK_PLAN in this transformer."""
    patterns = {prefix + name: kind for prefix in BLOCK_PREFIXES for name, kind in BLOCK_PLAN.items()}
    plan = {}
    for name, _ in transformer.named_modules():
        for pattern, kind in patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                plan[name] = kind
    return plan


def shard_slices(transformer: nn.Module, size: int, member: int) -> dict[str, tuple[int, int, int]]:
    """State-dict key -> (dim, start, stop) of this rank's slice of every split tensor (shapes only: the
    transformer may be on the meta device), for reading just those bytes from the safetensors files. With
    a PEFT LoRA added the keys are PEFT's (`...to_q.base_layer.weight`) and cover its split adapters."""
    slices = {}
    for name, kind in _plan_for(transformer).items():
        module = transformer.get_submodule(name)
        for prefix, target in [(name, module)] if kind == "norm" else _split_targets(module, name, kind):
            for parameter_name, parameter in target.named_parameters(recurse=False):
                dim = SLICE_DIMS.get((kind, parameter_name))
                if dim is not None:
                    width = parameter.shape[dim] // size
                    slices[f"{prefix}.{parameter_name}"] = (dim, member * width, (member + 1) * width)
    return slices


def split_fraction(transformer: nn.Module) -> float:
    """The share of the transformer's parameters that the plan splits (the rest is whole on every rank)."""
    split = sum(transformer.get_submodule(name).get_parameter(key.rsplit(".", 1)[1]).numel()
                for key in shard_slices(transformer, 1, 0) for name in [key.rsplit(".", 1)[0]])
    return split / sum(parameter.numel() for parameter in transformer.parameters())


def _from_shards(module: nn.Module, name: str, kind: str, mesh: Any, shards: dict[str, torch.Tensor]) -> None:
    """Give a (meta) linear its parameters as DTensors made from this rank's slices (and whole biases);
    a PEFT LoRA layer's base and split adapters likewise (its whole adapters stay for load_state_dict)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    for prefix, target in _split_targets(module, name, kind):
        for parameter_name in [n for n, _ in target.named_parameters(recurse=False)]:
            dim = SLICE_DIMS.get((kind, parameter_name))
            placement = Replicate() if dim is None else Shard(dim)
            local = shards.pop(f"{prefix}.{parameter_name}")
            target.register_parameter(parameter_name, nn.Parameter(
                DTensor.from_local(local, mesh, [placement], run_check=False), requires_grad=False))


def parallelize_transformer(transformer: nn.Module, mesh: Any, shards: dict[str, torch.Tensor] | None = None) -> int:
    """Split `transformer` in place over the 1-D mesh `mesh` (the tensor-parallel group); returns the
    number of modules split. Attention modules then hold heads / K heads.

    Without `shards` every rank holds the whole weights and keeps its slices. With `shards` (this rank's
    slices as read from disk, keyed as in the state dict, see shard_slices) the split modules may be on
    the meta device; the shards they use are taken out of the dict, the rest stay for the caller.
    """
    size, member, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    heads = transformer.config.num_attention_heads
    check_head_split(heads, size)
    plan = _plan_for(transformer)
    for name, kind in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        module = getattr(parent, child)
        if kind == "norm":
            weight = shards.pop(f"{name}.weight") if shards is not None else None
            setattr(parent, child, HeadSplitRMSNorm(module, group, member, size, weight))
            continue
        if shards is not None:
            _from_shards(module, name, kind, mesh, shards)
        _split_linear(module, name, kind, mesh)
    for name, module in transformer.named_modules():
        if name.endswith(ATTENTION_SUFFIX):
            module.heads = heads // size
    logger.info("tensor parallel: %d modules split over %d ranks (%d heads each)", len(plan), size, heads // size)
    return len(plan)


def gather_budgets(own: Budgets, mesh: Any) -> list[Budgets]:
    """Every member's budgets, in group order: each rank measures its own card, and all of them plan the
    group from the same list, so they agree on which member holds which encoder."""
    members: list[Any] = [None] * mesh.size()
    try:
        dist.all_gather_object(members, own, group=mesh.get_group())
    except RuntimeError as exc:  # a rank that failed before planning (or died) never joins: the timeout
        ranks = [int(rank) for rank in mesh.mesh.flatten().tolist()]
        raise GuidanceGroupError(
            f"rank {dist.get_rank()} could not plan with its tensor-parallel group (ranks {ranks}): "
            f"{first_line(exc)}; another rank failed while loading or took longer than --dist-timeout"
        ) from exc
    return members


class SharedEncoders:
    """The embeddings of a tensor-parallel group's text encoders: each encoder is loaded by one member
    (GroupPlan.owners), which encodes and broadcasts; the others receive. Every rank calls `share` for the
    same encoders in the same order (the pipeline's prompt encoding is the same code on every rank)."""

    def __init__(self, owners: dict[str, int], mesh: Any) -> None:
        self.owners = owners
        self.group = mesh.get_group()
        self.member = int(mesh.get_local_rank())

    def share(self, name: str, encode: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        owner = self.owners[name]
        tensor = encode().contiguous() if owner == self.member else None
        header: list[Any] = [None if tensor is None else (tuple(tensor.shape), tensor.dtype)]
        dist.broadcast_object_list(header, group=self.group, group_src=owner, device=device)
        shape, dtype = header[0]
        if tensor is None:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, group=self.group, group_src=owner)
        return tensor


@dataclass
class TensorParallelGroup:
    """This rank's place in its tensor-parallel group: the 1-D mesh the transformer is split over."""

    mesh: Any
    timeout_s: float

    @property
    def size(self) -> int:
        return int(self.mesh.size())

    @property
    def member(self) -> int:
        return int(self.mesh.get_local_rank())

    @property
    def ranks(self) -> list[int]:
        return [int(rank) for rank in self.mesh.mesh.flatten().tolist()]

    @property
    def leader(self) -> bool:
        return self.member == 0

    def agreed_stop(self, should_stop: Callable[[], bool] | None, device: torch.device) -> Callable[[], bool]:
        """`should_stop` (the web UI's Stop, asked on the rank that serves) as every rank of the group sees
        it: each call all-reduces the ranks' answers, so all ranks stop at the same step instead of the
        others waiting out the timeout in their next all-reduce. Every rank calls it at the same points."""

        def any_rank() -> bool:
            flag = torch.tensor([1.0 if should_stop is not None and should_stop() else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.mesh.get_group())
            return bool(flag.item())

        return any_rank

    @contextmanager
    def collectives(self) -> Any:
        """A rank that fails, dies or hangs ends the edit on every rank of the group with one line.

        The failing rank raises its own error here; the others wait in their next all-reduce until the
        group's timeout (gloo, nccl and hccl report it, and a lost peer, as a RuntimeError like any other).
        """
        try:
            yield
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise
            raise GuidanceGroupError(
                f"rank {dist.get_rank()} stopped with its tensor-parallel group (ranks {self.ranks}): "
                f"{first_line(exc)}; a rank that fails, dies or takes longer than --dist-timeout "
                f"{self.timeout_s:g} s ends the edit on every rank; nothing was saved"
            ) from exc
