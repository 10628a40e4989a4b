"""Step caching (--cache): skip most transformer blocks in steps where the first block says little changed.

DBCache in its published HiDream setting (first block computed, no tail blocks): in every step the first
double-stream block runs; its image-stream residual is compared with the one of the last computed step,
as the relative L1 difference sum|r - r_prev| / sum|r_prev|. Below the threshold the other blocks are
skipped and the residual those blocks added at the last computed step is added instead ("dbcache"), or
that residual extrapolated to this step from the last two computed steps, first-order TaylorSeer
("taylorseer"). Warm-up steps, the first step of each stage and a cap on consecutive cached steps are
always computed.

Under --cfg-parallel each rank holds some of the branches, so the numerator and the denominator are summed
over the guidance group before the comparison: every rank makes the decision one process would make on the
whole batch. A rank without a share this step (or one that failed before deciding) still joins that sum.
The edit and the refine stage keep separate state, and every edit starts clean (also after a Stop or an
error). Why our own policy on diffusers' hook machinery rather than cache-dit: docs/ARCHITECTURE.md section 3.8.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hidream_edit.errors import GroupPeerFailed, UserError

CACHE_MODES = ("off", "dbcache", "taylorseer")
# cache-dit's published HiDream-I1-Full setting: DBCache F1B0, 8 warm-up steps, threshold 0.08 (1.9x).
DEFAULT_THRESHOLD = 0.08
DEFAULT_WARMUP = 8
MAX_THRESHOLD = 1e6
MAX_COUNT = 1000
HOOK_NAME = "hidream_step_cache"

# (a few numbers, where in the edit) -> their sum over the ranks that share this edit.
SumAcross = Callable[[torch.Tensor, str], torch.Tensor]


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def check_cache_values(mode: str, threshold: float, warmup: int, max_skip: int) -> None:
    """A UserError in words (no flag names) for a value the cache cannot use."""
    if mode not in CACHE_MODES:
        raise UserError(f"unknown step cache {mode!r}; use one of: {', '.join(CACHE_MODES)}")
    number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    if not number or not 0 <= threshold <= MAX_THRESHOLD:  # also false for nan
        raise UserError(f"the cache threshold must be a number from 0 to {MAX_THRESHOLD:g}, got {threshold!r}")
    if not _whole(warmup):
        raise UserError(f"the cache warm-up must be a whole number of steps from 0 to {MAX_COUNT}, got {warmup!r}")
    if not _whole(max_skip):
        raise UserError(f"the cache max-skip must be a whole number of steps from 0 to {MAX_COUNT}, got {max_skip!r}")


@dataclass(frozen=True)
class CacheSettings:
    """One edit's step cache. `max_skip` 0: no limit on consecutive cached steps."""

    mode: str = "off"
    threshold: float = DEFAULT_THRESHOLD
    warmup: int = DEFAULT_WARMUP
    max_skip: int = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def as_dict(self) -> dict[str, Any]:
        """The settings as the result's JSON records them (all None but the mode when off)."""
        if not self.enabled:
            return {"mode": "off", "threshold": None, "warmup": None, "max_skip": None}
        return {"mode": self.mode, "threshold": self.threshold, "warmup": self.warmup, "max_skip": self.max_skip}


@dataclass
class StageRecord:
    """What the cache did in one stage: steps by index, block forwards run on this rank, decisions' diffs."""

    steps: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    block_forwards: int = 0
    diffs: dict[str, float | None] = field(default_factory=dict)  # None: nothing to compare with

    def as_dict(self) -> dict[str, Any]:
        return {"steps": len(self.steps), "computed_steps": len(self.steps) - len(self.cached),
                "cached_steps": len(self.cached), "cached": list(self.cached), "block_forwards": self.block_forwards,
                "diffs": dict(self.diffs)}


def cache_record(settings: CacheSettings, stages: dict[str, StageRecord]) -> dict[str, Any]:
    """The result's "cache" entry: settings, totals and per-stage counts (stages that ran)."""
    per_stage = {name: stage.as_dict() for name, stage in stages.items() if stage.steps}
    totals = {key: sum(stage[key] for stage in per_stage.values())
              for key in ("steps", "computed_steps", "cached_steps", "block_forwards")}
    return {**settings.as_dict(), **totals, "per_stage": per_stage}


def uncached_record(settings: CacheSettings, steps_per_stage: dict[str, int], blocks: int) -> dict[str, Any]:
    """The record of an edit that ran every block of every step (--cache off)."""
    stages: dict[str, StageRecord] = {}
    start = 0
    for name, count in steps_per_stage.items():
        stages[name] = StageRecord(steps=list(range(start, start + count)), block_forwards=count * blocks)
        start += count
    return cache_record(settings, stages)


@dataclass
class _Stage:
    """Per-stage state on this rank; replaced at every stage start, so stages never share residuals."""

    record: StageRecord = field(default_factory=StageRecord)
    head_residual: torch.Tensor | None = None  # first block's image-stream residual at the last computed step
    head_output: torch.Tensor | None = None  # first block's image-stream output in the step being computed
    tail_residual: torch.Tensor | None = None  # what the other blocks added at the last computed step
    tail_slope: torch.Tensor | None = None  # its change per step (taylorseer)
    tail_step: int = 0  # step index of tail_residual
    consecutive: int = 0  # cached steps since the last computed one


class StepCache:
    """Decides, per step, whether the blocks after the first run; hooks on the transformer's blocks apply it.

    Installed once per transformer; between edits (and with the cache off) every hook passes straight through.
    """

    def __init__(self) -> None:
        self.settings: CacheSettings | None = None
        self.sum_across: SumAcross | None = None
        self.stages: dict[str, StageRecord] = {}
        self._stage: _Stage | None = None
        self._step = 0
        self._where = ""
        self._pending = False  # this step still needs its decision
        self.cached = False  # the decision of the current step

    @classmethod
    def install(cls, transformer: torch.nn.Module) -> StepCache:
        """Hook the transformer's blocks (the inner block of each, inside any offload hook of its wrapper)."""
        from diffusers.hooks import HookRegistry  # diffusers only once torch_npu is settled (config.py)

        blocks = [wrapper.block for wrapper in (*transformer.double_stream_blocks, *transformer.single_stream_blocks)]
        if len(blocks) < 2:
            raise ValueError("step caching needs a transformer with at least two blocks")
        cache = cls()
        forwards = [cache.head_forward, *(cache.middle_forward for _ in blocks[1:-1]), cache.tail_forward]
        for block, forward in zip(blocks, forwards, strict=True):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_hook_class()(forward), HOOK_NAME)
        return cache

    @property
    def active(self) -> bool:
        return self.settings is not None and self._stage is not None

    def begin_edit(self, settings: CacheSettings, sum_across: SumAcross | None) -> None:
        """Start an edit from a clean state."""
        self.end_edit()
        self.settings = settings
        self.sum_across = sum_across

    def end_edit(self) -> None:
        """Drop every buffer (called after each edit, finished, stopped or failed)."""
        self.settings = None
        self.sum_across = None
        self.stages = {}
        self._stage = None
        self._pending = False
        self.cached = False

    def begin_step(self, stage: str, step: int, where: str) -> None:
        """Called by the pipeline before every step on every rank, with or without a share of the branches."""
        assert self.settings is not None
        self._where = where
        if stage not in self.stages:
            self.stages[stage] = StageRecord()
            self._stage = _Stage(self.stages[stage])
        state = self._current
        self._step = step
        state.record.steps.append(step)
        in_stage = len(state.record.steps) - 1
        cap = self.settings.max_skip
        self._pending = in_stage >= max(1, self.settings.warmup) and (cap == 0 or state.consecutive < cap)
        if not self._pending:  # computed without asking: a run of cached steps ends here
            state.consecutive = 0
        self.cached = False

    @property
    def _current(self) -> _Stage:
        assert self._stage is not None
        return self._stage

    def settle(self, failed: bool) -> None:
        """After this rank's share (or without one): join the group's sum if this rank has not decided yet."""
        if not self._pending:
            return
        totals = self._sum(torch.zeros(2, dtype=torch.float64), failed)
        if not failed and totals[2] == 0:
            self._decide(totals)

    def _sum(self, local: torch.Tensor, failed: bool) -> torch.Tensor:
        self._pending = False
        values = torch.cat([local.double().cpu(), torch.tensor([1.0 if failed else 0.0], dtype=torch.float64)])
        return values if self.sum_across is None else self.sum_across(values, self._where).double().cpu()

    def _decide(self, totals: torch.Tensor) -> None:
        assert self.settings is not None
        state = self._current
        numerator, denominator = float(totals[0]), float(totals[1])
        diff = numerator / denominator if denominator > 0 else math.inf
        state.record.diffs[str(self._step)] = round(diff, 6) if math.isfinite(diff) else None
        self.cached = diff < self.settings.threshold
        if self.cached:
            state.record.cached.append(self._step)
            state.consecutive += 1
        else:
            state.consecutive = 0

    def _head(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        """The first block ran: decide this step from its image-stream residual (summed over the group)."""
        state = self._current
        state.record.block_forwards += 1
        residual = output - inputs
        if self._pending:
            previous = state.head_residual
            assert previous is not None  # a stage's first step is always computed
            # fp32 sums: fp64 is not a given on every device; the ratio needs no more
            local = torch.stack([(residual - previous).abs().sum(dtype=torch.float32),
                                 previous.abs().sum(dtype=torch.float32)])
            totals = self._sum(local, failed=False)
            if totals[2] > 0:
                raise GroupPeerFailed("another rank of the guidance group failed in this step")
            self._decide(totals)
        if not self.cached:
            state.head_residual = residual
            state.head_output = output

    def _tail_computed(self, output: torch.Tensor) -> None:
        """The last block ran: keep what the blocks after the first added (and its slope for taylorseer)."""
        assert self.settings is not None
        state = self._current
        assert state.head_output is not None
        residual = output[:, : state.head_output.shape[1]] - state.head_output
        state.head_output = None
        if self.settings.mode == "taylorseer" and state.tail_residual is not None:
            state.tail_slope = (residual - state.tail_residual) / (self._step - state.tail_step)
        state.tail_residual = residual
        state.tail_step = self._step

    def _tail_estimate(self) -> torch.Tensor:
        """What the skipped blocks would have added in this step."""
        state = self._current
        assert state.tail_residual is not None
        if state.tail_slope is None:
            return state.tail_residual
        return state.tail_residual + state.tail_slope * (self._step - state.tail_step)

    def _count_block(self) -> None:
        self._current.record.block_forwards += 1

    def head_forward(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """First block: always runs; its residual decides the step."""
        output = original(*args, **kwargs)
        if self.active:
            self._head(_hidden_states(args, kwargs), output[0] if isinstance(output, tuple) else output)
        return output

    def middle_forward(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A block between the first and the last: runs unless the step is cached."""
        if not self.active:
            return original(*args, **kwargs)
        if self.cached:
            return _passthrough(args, kwargs)
        self._count_block()
        return original(*args, **kwargs)

    def tail_forward(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Last block: in a cached step, its input plus the estimated residual of the skipped blocks."""
        if not self.active:
            return original(*args, **kwargs)
        if not self.cached:
            self._count_block()
            output = original(*args, **kwargs)
            self._tail_computed(output[0] if isinstance(output, tuple) else output)
            return output
        passed = _passthrough(args, kwargs)
        hidden = passed[0] if isinstance(passed, tuple) else passed
        estimate = self._tail_estimate()
        image_tokens = estimate.shape[1]
        hidden = torch.cat([hidden[:, :image_tokens] + estimate, hidden[:, image_tokens:]], dim=1)
        return (hidden, passed[1]) if isinstance(passed, tuple) else hidden

    def record(self) -> dict[str, Any]:
        assert self.settings is not None
        return cache_record(self.settings, self.stages)


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _passthrough(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A skipped block's output: its inputs unchanged (the transformer's own loop slices the text tokens)."""
    hidden = _hidden_states(args, kwargs)
    encoder = kwargs.get("encoder_hidden_states")
    return hidden if encoder is None else (hidden, encoder)


# (the block's own forward, its positional and keyword arguments) -> its output
BlockForward = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


@functools.cache
def _hook_class() -> type:
    """A diffusers ModelHook that hands a block's call to one of StepCache's *_forward methods."""
    from diffusers.hooks import ModelHook

    class StepCacheHook(ModelHook):
        def __init__(self, forward: BlockForward) -> None:
            super().__init__()
            self.forward = forward

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self.forward(self.fn_ref.original_forward, args, kwargs)

    return StepCacheHook
