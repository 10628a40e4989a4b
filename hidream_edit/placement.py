"""The memory plan: component sizes and memory budgets in, the fastest placement that fits out.

Why: the full pipeline is 57.4 GiB in bf16 and Ascend cards hold 24 to 64 GiB, so where each component
lives must be decided before a byte is loaded, with numbers a user can check. Three parts:

- sizes: the bytes each component takes in the run dtype, read from the safetensors headers of the files
  that will be loaded (8-byte length + JSON; no tensor data), or from the spec's table of real sizes for
  hub ids not on disk;
- budgets: per card the free memory the device reports, capped by --max-memory; host memory likewise;
- `plan_placement`, a pure function of sizes, budgets, the placement asked and the attention kernel,
  returning a `Plan` that says where everything lives and the predicted peak per device.

`apply_plan` then places a loaded pipeline as planned. Importing this module imports no torch (config.py
reads `PLACEMENTS` from it to build parsers on a machine where torch is broken).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from hidream_edit.errors import ModelFilesError, UserError
from hidream_edit.spec import (
    EDIT_BRANCHES,
    I1_COMPONENT_FOLDERS,
    KEEP_FP32_IN_FP16,
    REAL_E1_FULL_LORA,
    REAL_LLAMA_LM_HEAD,
    REAL_PARAMETERS,
    REAL_T5_WO,
    REAL_TRANSFORMER_LARGEST_BLOCK,
    REAL_TRANSFORMER_UNBLOCKED,
    TEXT_ENCODERS,
    TEXT_TOKENS,
    TRANSFORMER_FFN_WIDTH,
    TRANSFORMER_HEADS,
    TRANSFORMER_WIDTH,
    VAE_DECODER_WIDTH,
    ModelSpec,
)

logger = logging.getLogger(__name__)

GIB = 2**30
# Fastest first. `auto` takes the first that fits; an explicit one is used even when the plan warns.
PLACEMENTS: tuple[str, ...] = ("none", "split", "encoders", "model", "group", "sequential")
OFFLOAD_CHOICES: tuple[str, ...] = ("auto", *PLACEMENTS)
PLACEMENT_HELP = {
    "none": "everything resident on one card",
    "split": "transformer + VAE on the edit card, text encoders resident on a second card",
    "encoders": "transformer + VAE resident; text encoders in host memory, visiting the card one at a time",
    "model": "diffusers model CPU offload: each component visits the card when it runs",
    "group": "transformer streamed block by block from host memory (diffusers group offloading)",
    "sequential": "diffusers sequential CPU offload: every layer visits the card when it runs (slowest)",
}
COMPONENTS: tuple[str, ...] = ("transformer", "vae", *TEXT_ENCODERS)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Working-set constants of the reserve formula (see `Reserve`). Which are measured, where and how, and which
# are still estimates: docs/ARCHITECTURE.md section 5.2 (real-width blocks and a full-size run on the CPU).
LIVE_WIDTHS, LIVE_FFN_WIDTHS = 8, 4  # per token alive in one block: 8 model-wide and 4 SwiGLU-wide values
ACTIVATION_BYTES = 4  # per live value in any dtype: bf16 measured as many bytes as fp32 (fp32 rope, int64 indices)
DECODE_LIVE_TENSORS = 8  # full-resolution VAE decoder tensors alive at once
FIXED_RESERVE = 1 * GIB  # allocator fragmentation, kernel workspaces, embeddings and latents
ENCODE_RESERVE = 1 * GIB  # a text encoder's own working set (128 tokens) on the card that runs it
HOST_OVERHEAD = 3 * GIB  # Python, torch, the device runtime and tokenizers in host memory
GROUPS_ON_CARD = 2  # group offload keeps the running block and prefetches the next one

_STORED_BYTES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses longer headers too
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
# Decimal units (GB) as written on spec sheets, binary units (GiB) as the runtimes report memory.
_UNITS = {"": 1, "b": 1, **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate("kmgt")},
          **{f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgt")}}


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def gib_or_unknown(value: float | None) -> str:
    return "unknown" if value is None else gib(value)


# ---------------------------------------------------------------------------------------------- sizes


def parse_size(text: str) -> int:
    """Bytes from `40GiB`, `64GB`, `512MiB`, `1.5TiB` or a plain byte count; ValueError with the accepted forms."""
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 40GiB, 64GB or 512MiB")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return value


def parse_host(text: str) -> tuple[int, int]:
    """(card count, bytes per card) from `2x64GiB` or `1x32GiB`."""
    count, sep, size = text.strip().partition("x")
    if not sep or not count.strip().isdigit() or not 1 <= int(count) <= 64:
        raise ValueError(f"{text!r} is not a host; write cards x size per card, e.g. 2x64GiB or 1x32GiB")
    return int(count), parse_size(size)


def read_safetensors_header(path: Path) -> dict[str, tuple[str, int]]:
    """Tensor name -> (stored dtype, element count), from the header alone (no tensor data is read)."""
    try:
        with path.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise ModelFilesError(f"{path}: too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise ModelFilesError(f"{path}: not a safetensors file (header length {length})")
            text = stream.read(length)
            if len(text) < length:
                raise ModelFilesError(f"{path}: truncated (header of {length} bytes, file ends after {len(text)})")
            header = json.loads(text)
    except OSError as exc:
        raise ModelFilesError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ModelFilesError(f"{path}: corrupt safetensors header ({exc})") from exc
    tensors: dict[str, tuple[str, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        tensors[name] = (str(info["dtype"]), count)
    return tensors


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files a loader reads for `path`: a file, an index's shards, or a folder's files."""
    if path.is_file():
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFilesError(f"{indexes[0]}: not a valid safetensors index ({exc})") from exc
        return [path / name for name in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFilesError(f"{path}: no safetensors files to size")
    return files


def tensor_bytes(stored: str, count: int, dtype: str, keep_fp32: bool = False) -> int:
    """Bytes one tensor takes once loaded: floating tensors in the run dtype (or fp32 where kept), others as stored."""
    if stored in _FLOAT_DTYPES:
        return count * (4 if keep_fp32 else DTYPE_BYTES[dtype])
    return count * _STORED_BYTES.get(stored, 8)


def _block_of(name: str) -> str | None:
    """`double_stream_blocks.3` for a tensor inside a ModuleList entry (a group-offload unit), else None."""
    parts = name.split(".")
    return f"{parts[0]}.{parts[1]}" if len(parts) > 2 and parts[1].isdigit() else None


def swiglu_width(width: int, multiple_of: int = 256) -> int:
    """The hidden width of HiDream's SwiGLU experts for a model width (diffusers' rule: 2/3 of 4x, rounded up)."""
    hidden = int(2 * 4 * width / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class Dims:
    """The widths the working set scales with: the real model's (spec), or those in the configs on disk."""

    width: int = TRANSFORMER_WIDTH
    heads: int = TRANSFORMER_HEADS
    ffn_width: int = TRANSFORMER_FFN_WIDTH
    vae_width: int = VAE_DECODER_WIDTH


def dims_from_configs(i1_dir: Path) -> Dims:
    """Dims from I1's transformer and VAE config.json (the E1.1 transformer uses I1's config too)."""
    try:
        transformer = json.loads((i1_dir / "transformer" / "config.json").read_text())
        vae = json.loads((i1_dir / "vae" / "config.json").read_text())
        heads = int(transformer["num_attention_heads"])
        width = heads * int(transformer["attention_head_dim"])
        return Dims(width, heads, swiglu_width(width), int(vae["block_out_channels"][0]))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelFilesError(f"{i1_dir}: cannot read the transformer / VAE config ({exc})", role="i1") from exc


@dataclass(frozen=True)
class ModelSizes:
    """Bytes per component in the run dtype, plus what the offload placements need to know.

    `largest_block` / `transformer_unblocked`: the transformer's largest ModuleList entry and what lies
    outside its ModuleLists (group offload streams the first and keeps the second for a whole forward).
    `largest_tensor` bounds sequential offload's unit. `refine_copy`: host bytes --refine-weights base keeps.
    `sources[component]` says "headers" (read from the files) or "table" (the spec's real sizes).
    """

    dtype: str
    components: dict[str, int]
    largest_block: int
    transformer_unblocked: int
    largest_tensor: int
    sources: dict[str, str]
    refine_copy: int = 0
    dims: Dims = field(default_factory=Dims)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def encoders(self) -> int:
        return sum(self.components[name] for name in TEXT_ENCODERS)

    @property
    def largest_encoder(self) -> int:
        return max(self.components[name] for name in TEXT_ENCODERS)


@dataclass
class _Tally:
    bytes: int = 0
    largest_tensor: int = 0
    blocks: dict[str, int] = field(default_factory=dict)
    unblocked: int = 0

    def add(self, name: str, size: int) -> None:
        self.bytes += size
        self.largest_tensor = max(self.largest_tensor, size)
        block = _block_of(name)
        if block is None:
            self.unblocked += size
        else:
            self.blocks[block] = self.blocks.get(block, 0) + size


def _tally_files(
    files: Iterable[Path], dtype: str, component: str, keep: Callable[[str], bool] = lambda name: True,
    skip: tuple[str, ...] = (),
) -> _Tally:
    tally = _Tally()
    fp32_names = KEEP_FP32_IN_FP16.get(component, ()) if dtype == "fp16" else ()
    for file in files:
        for name, (stored, count) in read_safetensors_header(file).items():
            if not keep(name) or name.startswith(skip):
                continue
            keep_fp32 = any(part in name for part in fp32_names)
            tally.add(name, tensor_bytes(stored, count, dtype, keep_fp32))
    return tally


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def model_sizes(
    spec: ModelSpec,
    dtype: str,
    llama_dir: Path | None,
    i1_dir: Path | None,
    edit_path: Path | None,
    llama_skip: tuple[str, ...] = (),
    base_refine_weights: bool = False,
) -> ModelSizes:
    """Sizes from the headers of the files each component loads; a source given as None uses the spec's table.

    `edit_path` is E1.1's repository folder or E1-Full's LoRA file (its LoRA tensors add to the I1
    transformer; its full tensors replace existing ones). `llama_skip`: tensor-name prefixes the Llama loader
    leaves out (e.g. `lm_head.`).
    """
    per_byte = DTYPE_BYTES[dtype]
    components: dict[str, int] = {}
    sources: dict[str, str] = {}
    largest = 0
    if llama_dir is not None:
        tally = _tally_files(checkpoint_files(llama_dir), dtype, "llama", skip=llama_skip)
        components["llama"], sources["llama"], largest = tally.bytes, "headers", tally.largest_tensor
    else:
        lm_head = REAL_LLAMA_LM_HEAD if llama_skip else 0
        components["llama"], sources["llama"] = (REAL_PARAMETERS["llama"] - lm_head) * per_byte, "table"
        largest = REAL_LLAMA_LM_HEAD * per_byte
    for name, folder in I1_COMPONENT_FOLDERS.items():
        if i1_dir is not None:
            tally = _tally_files(checkpoint_files(i1_dir / folder), dtype, name)
            components[name], sources[name] = tally.bytes, "headers"
            largest = max(largest, tally.largest_tensor)
        else:
            kept_fp32 = REAL_T5_WO * 2 if name == "t5" and dtype == "fp16" else 0  # fp32 `wo`: 2 bytes more each
            components[name], sources[name] = REAL_PARAMETERS[name] * per_byte + kept_fp32, "table"

    base_dir = i1_dir if spec.uses_lora else edit_path  # where the transformer's own weights are read from
    if base_dir is not None:
        transformer = _tally_files(checkpoint_files(base_dir / "transformer"), dtype, "transformer")
        sources["transformer"] = "headers"
    else:
        transformer = _Tally(REAL_PARAMETERS["transformer"] * per_byte, 0,
                             {"block": REAL_TRANSFORMER_LARGEST_BLOCK * per_byte},
                             REAL_TRANSFORMER_UNBLOCKED * per_byte)
        sources["transformer"] = "table"
    refine_copy = 0
    if spec.uses_lora:
        if edit_path is not None:
            lora = _tally_files(checkpoint_files(edit_path), dtype, "transformer", keep=_is_lora)
            full = _tally_files(checkpoint_files(edit_path), dtype, "transformer", keep=lambda n: not _is_lora(n))
            transformer.bytes += lora.bytes
            for block, size in lora.blocks.items():
                transformer.blocks[block] = transformer.blocks.get(block, 0) + size
            refine_copy = full.bytes if base_refine_weights else 0
        else:
            transformer.bytes += REAL_E1_FULL_LORA * per_byte
            sources["transformer"] = "table" if base_dir is None else "headers + table (LoRA)"
    elif base_refine_weights:
        refine_copy = transformer.bytes  # worst case: every I1 tensor differs from E1.1's
    components["transformer"] = transformer.bytes
    largest = max(largest, transformer.largest_tensor)
    return ModelSizes(
        dtype=dtype,
        components={name: components[name] for name in COMPONENTS},
        largest_block=max(transformer.blocks.values(), default=0),
        transformer_unblocked=transformer.unblocked,
        largest_tensor=largest,
        sources={name: sources[name] for name in COMPONENTS},
        refine_copy=refine_copy,
        dims=dims_from_configs(i1_dir) if i1_dir is not None else Dims(),
    )


# ---------------------------------------------------------------------------------------------- reserve


@dataclass(frozen=True)
class Reserve:
    """The edit's working set on the edit card, on top of the weights resident there.

    reserve = max(activations + attention, decode) + fixed, where for the model's largest input
      tokens      = 3 branches x (max_seq image tokens + 384 text tokens)   (E1.1 8192, E1-Full 4608)
      activations = tokens x (8 x 2560 + 4 x 6912) values alive in one transformer block x 4 bytes
      attention   = sdpa / npu_fused: 0 (no score matrix is kept);
                    math: what device_utils.math_attention_workspace says the kernel allocates: one query
                    chunk's fp32 scores and softmax (at most 1 GiB) + fp32 copies of key and value
                    (E1.1 in bf16: 1.5 GiB)
      decode      = pixels x 128 channels x 8 live tensors x dtype bytes (the VAE decoder at full size)
      fixed       = 1 GiB (fragmentation, workspaces, embeddings, latents)
    """

    activations: int
    attention: int
    decode: int
    fixed: int
    tokens: int

    @property
    def total(self) -> int:
        return max(self.activations + self.attention, self.decode) + self.fixed

    def as_dict(self) -> dict[str, int]:
        return {"bytes": self.total, "activations": self.activations, "attention": self.attention,
                "decode": self.decode, "fixed": self.fixed, "tokens_per_branch": self.tokens}


def working_set(spec: ModelSpec, dtype: str, attention: str, dims: Dims | None = None) -> Reserve:
    """The reserve formula (see `Reserve`) for a model at its largest input, a dtype and an attention kernel.

    `dims` default to the real model's widths; the tiny set passes its own (read from its configs).
    """
    dims = dims or Dims()
    per_branch = spec.max_seq + TEXT_TOKENS
    tokens = EDIT_BRANCHES * per_branch
    activations = tokens * (LIVE_WIDTHS * dims.width + LIVE_FFN_WIDTHS * dims.ffn_width) * ACTIVATION_BYTES
    scores = 0
    if attention == "math":
        from device_utils import math_attention_workspace

        query_shape = (EDIT_BRANCHES, dims.heads, per_branch, dims.width // dims.heads)
        scores = math_attention_workspace(query_shape, per_branch, DTYPE_BYTES[dtype])
    decode = spec.max_pixels * dims.vae_width * DECODE_LIVE_TENSORS * DTYPE_BYTES[dtype]
    return Reserve(activations, scores, decode, FIXED_RESERVE, per_branch)


# ---------------------------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Card:
    """One accelerator: what it has free, and the --max-memory cap if any."""

    name: str
    free: int
    total: int | None = None
    cap: int | None = None

    @property
    def budget(self) -> int:
        return self.free if self.cap is None else min(self.free, self.cap)


@dataclass(frozen=True)
class Budgets:
    """The memory a plan may use: the cards of the edit device's type, which one edits, and host memory.

    `cards` is empty when the device is the CPU. `described` is the --plan-host text for a host
    described on the command line (None: this machine).
    """

    device_type: str
    cards: tuple[Card, ...]
    edit_card: int
    host: int | None
    host_source: str = "this machine"
    described: str | None = None

    @property
    def edit(self) -> Card:
        return self.cards[self.edit_card]


def described_budgets(
    host: str, device: str | None = None, max_memory: int | None = None, host_memory: int | None = None
) -> Budgets:
    """Budgets of a host given as `NxSIZE` (e.g. 2x64GiB): N cards with SIZE free each.

    `device` (npu, npu:N, cuda, cuda:N) names the type and the edit card (default npu:0). Host memory is
    --host-memory; without it the host's need is reported but not checked (the host is not described).
    """
    count, per_card = parse_host(host)
    device_type, _, index_text = (device or "npu").strip().lower().partition(":")
    device_type = "npu" if device_type == "auto" else device_type
    if device_type not in ("npu", "cuda") or (index_text and not index_text.isdigit()):
        raise UserError(f"--plan-host describes accelerator cards; --device {device} is not npu[:N] or cuda[:N]")
    index = int(index_text or 0)
    if index >= count:
        raise UserError(f"--device {device} selects card {index}, but --plan-host {host} has {count} card(s)")
    cards = tuple(Card(f"{device_type}:{i}", per_card, per_card, max_memory) for i in range(count))
    if host_memory is not None:
        return Budgets(device_type, cards, index, host_memory, "--host-memory", host)
    return Budgets(device_type, cards, index, None, "not described (pass --host-memory to check it)", host)


def machine_budgets(
    device_type: str, edit_index: int, max_memory: int | None = None, host_memory: int | None = None,
    all_cards: bool = True,
) -> Budgets:
    """Budgets of this machine: free memory per card as the device reports it, host memory available now.

    `all_cards` False asks only the edit card (asking another card may create a runtime context on it).
    """
    from device_utils import device_count, device_memory, host_available_memory

    if host_memory is not None:
        host, source = host_memory, "--host-memory"
    else:
        host, source = host_available_memory(), "this machine"
    if device_type == "cpu":
        return Budgets("cpu", (), 0, host, source)
    indexes = range(device_count(device_type)) if all_cards else [edit_index]
    cards = []
    for index in indexes:
        free, total = device_memory(device_type, index) or (0, 0)
        cards.append(Card(f"{device_type}:{index}", free, total, max_memory))
    return Budgets(device_type, tuple(cards), list(indexes).index(edit_index), host, source)


def plan_for_machine(
    spec: ModelSpec, sizes: ModelSizes, device_type: str, edit_index: int, asked: str = "auto",
    attention: str = "sdpa", encoder_device: str | None = None, max_memory: int | None = None,
    host_memory: int | None = None,
) -> Plan:
    """Plan on this machine's memory; other cards are asked only when the edit card alone is not enough."""
    budgets = machine_budgets(device_type, edit_index, max_memory, host_memory, all_cards=False)
    plan = plan_placement(spec, sizes, budgets, asked, attention, encoder_device)
    wants_second_card = encoder_device is not None or asked == "split" or (asked == "auto" and plan.placement != "none")
    if device_type != "cpu" and wants_second_card:
        budgets = machine_budgets(device_type, edit_index, max_memory, host_memory, all_cards=True)
        if len(budgets.cards) > 1:
            plan = plan_placement(spec, sizes, budgets, asked, attention, encoder_device)
    return plan


# ---------------------------------------------------------------------------------------------- planner


@dataclass(frozen=True)
class Peak:
    """One device (or the host): what lives there, the predicted peak and the budget."""

    device: str
    components: tuple[str, ...]
    peak_bytes: int
    budget_bytes: int | None  # None: not known (a described host without --host-memory), so not checked

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.peak_bytes <= self.budget_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "components": list(self.components), "peak_bytes": self.peak_bytes,
                "budget_bytes": self.budget_bytes, "fits": self.fits}

    def describe(self) -> str:
        return f"{self.device} needs {gib(self.peak_bytes)} of {gib_or_unknown(self.budget_bytes)}"


@dataclass(frozen=True)
class Candidate:
    """One placement worked out: peaks per card and for the host, or why it cannot run here at all."""

    placement: str
    devices: tuple[Peak, ...]
    host: Peak
    homes: dict[str, str]
    impossible: str | None = None
    encoder_device: str | None = None

    @property
    def fits(self) -> bool:
        return self.impossible is None and self.host.fits and all(peak.fits for peak in self.devices)

    def why_not(self) -> str:
        if self.impossible:
            return self.impossible
        over = [peak.describe() for peak in (*self.devices, self.host) if not peak.fits]
        return "; ".join(over)


@dataclass(frozen=True)
class Plan:
    """The outcome of `plan_placement`: the chosen candidate, the rejected faster ones, and why."""

    model: str
    dtype: str
    attention: str
    asked: str
    chosen: Candidate
    rejected: tuple[Candidate, ...]
    reserve: Reserve
    sizes: ModelSizes
    budgets: Budgets
    reason: str
    error: str | None = None  # set when the edit cannot run at all: loading refuses with this line
    warning: str | None = None  # an explicit placement the plan says will not fit

    @property
    def placement(self) -> str:
        return self.chosen.placement

    @property
    def fits(self) -> bool:
        return self.error is None and self.chosen.fits

    @property
    def encoder_device(self) -> str | None:
        return self.chosen.encoder_device

    def load_device(self, component: str) -> str | None:
        """The card a component is read straight onto while loading, or None (it is read into host memory)."""
        if component not in DIRECT_LOADS.get(self.placement, ()) or not self.chosen.devices:
            return None
        return self.chosen.homes[component]

    def peaks(self) -> dict[str, int]:
        """Predicted peak bytes per device (and "host"), for logs and result metadata."""
        return {**{peak.device: peak.peak_bytes for peak in self.chosen.devices}, "host": self.chosen.host.peak_bytes}

    def as_dict(self) -> dict[str, Any]:
        """Plain data for --plan --json, result metadata and the web UI's device panel."""
        return {
            "model": self.model,
            "dtype": self.dtype,
            "attention": self.attention,
            "asked": self.asked,
            "placement": self.placement,
            "fits": self.fits,
            "reason": self.reason,
            "error": self.error,
            "warning": self.warning,
            "encoder_device": self.encoder_device,
            "described_host": self.budgets.described,
            "components": [
                {
                    "name": name,
                    "bytes": self.sizes.components[name],
                    "where": self.chosen.homes[name],
                    "source": self.sizes.sources[name],
                }
                for name in COMPONENTS
            ],
            "devices": [peak.as_dict() for peak in self.chosen.devices],
            "host": {**self.chosen.host.as_dict(), "source": self.budgets.host_source},
            "reserve": self.reserve.as_dict(),
            "rejected": [{"placement": c.placement, "why": c.why_not()} for c in self.rejected],
        }

    def summary(self) -> str:
        """The plan as text: components, devices, placement and why faster ones were rejected."""
        where = self.budgets.described or "this machine"
        cards = f"{len(self.budgets.cards)} {self.budgets.device_type} card(s)" if self.budgets.cards else "CPU"
        lines = [f"memory plan: {self.model} in {self.dtype}, attention {self.attention}, on {where} ({cards})"]
        lines.append("components:")
        for name in COMPONENTS:
            lines.append(f"  {name:<12} {gib(self.sizes.components[name]):>10}  {self.chosen.homes[name]:<18} "
                         f"({self.sizes.sources[name]})")
        r = self.reserve
        lines.append(
            f"working-set reserve {gib(r.total)}: activations {gib(r.activations)} "
            f"({EDIT_BRANCHES} x {r.tokens} tokens), attention {gib(r.attention)}, decode {gib(r.decode)}, "
            f"fixed {gib(r.fixed)}"
        )
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"placement: {self.placement} ({verdict}; asked {self.asked}): {self.reason}")
        for peak in (*self.chosen.devices, self.chosen.host):
            mark = "ok" if peak.fits else "over"
            budget = gib_or_unknown(peak.budget_bytes)
            lines.append(f"  {peak.device:<8} peak {gib(peak.peak_bytes):>10} of {budget:>10} budget  {mark}  "
                         f"[{', '.join(peak.components) or '-'}]")
        for candidate in self.rejected:
            lines.append(f"  rejected {candidate.placement}: {candidate.why_not()}")
        if self.warning:
            lines.append(f"warning: {self.warning}")
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


# Components the loader reads straight onto the card they live on (no host copy), per placement.
DIRECT_LOADS: dict[str, tuple[str, ...]] = {"none": ("transformer", "llama"), "split": ("transformer", "llama"),
                                            "encoders": ("transformer",)}


def _host_peak(sizes: ModelSizes, budgets: Budgets, placement: str, resident: tuple[str, ...], extra: int = 0) -> Peak:
    """Host memory at its peak, while loading: every weight except those read straight onto a card
    (DIRECT_LOADS) passes through or stays in host memory; + base refine weights kept aside + the runtime."""
    direct = sum(sizes.components[name] for name in DIRECT_LOADS.get(placement, ())) if budgets.cards else 0
    peak = sizes.total - direct + sizes.refine_copy + HOST_OVERHEAD + extra
    return Peak("host", resident, peak, budgets.host)


def _candidate(
    placement: str, sizes: ModelSizes, budgets: Budgets, reserve: Reserve, encoder_device: str | None
) -> Candidate:
    c = sizes.components
    encoders = TEXT_ENCODERS
    if not budgets.cards:  # the CPU: every placement keeps everything in host memory
        homes = dict.fromkeys(COMPONENTS, "host")
        return Candidate(placement, (), _host_peak(sizes, budgets, placement, COMPONENTS, reserve.total), homes)
    edit = budgets.edit
    if placement == "none":
        homes = dict.fromkeys(COMPONENTS, edit.name)
        card = Peak(edit.name, COMPONENTS, sizes.total + reserve.total, edit.budget)
        return Candidate(placement, (card,), _host_peak(sizes, budgets, placement, ()), homes)
    if placement == "split":
        others = [card for i, card in enumerate(budgets.cards) if i != budgets.edit_card]
        if encoder_device is not None:
            others = [card for card in others if card.name == encoder_device]
        homes = {"transformer": edit.name, "vae": edit.name, **dict.fromkeys(encoders, "-")}
        if not others:
            why = (f"--encoder-device {encoder_device} is not another visible {budgets.device_type} card"
                   if encoder_device else f"needs a second {budgets.device_type} card")
            return Candidate(placement, (), _host_peak(sizes, budgets, placement, ()), homes, impossible=why)
        second = max(others, key=lambda card: card.budget)
        homes.update(dict.fromkeys(encoders, second.name))
        main = Peak(edit.name, ("transformer", "vae"), c["transformer"] + c["vae"] + reserve.total, edit.budget)
        helper = Peak(second.name, encoders, sizes.encoders + ENCODE_RESERVE, second.budget)
        host = _host_peak(sizes, budgets, placement, ())
        return Candidate(placement, (main, helper), host, homes, encoder_device=second.name)
    if placement == "encoders":
        homes = {"transformer": edit.name, "vae": edit.name, **dict.fromkeys(encoders, f"host -> {edit.name}")}
        peak = c["transformer"] + c["vae"] + sizes.largest_encoder + reserve.total
        card = Peak(edit.name, ("transformer", "vae"), peak, edit.budget)
        return Candidate(placement, (card,), _host_peak(sizes, budgets, placement, encoders), homes)
    if placement == "model":
        homes = dict.fromkeys(COMPONENTS, f"host -> {edit.name}")
        card = Peak(edit.name, (), max(c.values()) + reserve.total, edit.budget)
        return Candidate(placement, (card,), _host_peak(sizes, budgets, placement, COMPONENTS), homes)
    if placement == "group":
        homes = {"transformer": f"host -> {edit.name} (blocks)", "vae": edit.name,
                 **dict.fromkeys(encoders, f"host -> {edit.name}")}
        streamed = sizes.transformer_unblocked + GROUPS_ON_CARD * sizes.largest_block
        card = Peak(edit.name, ("vae",), c["vae"] + max(streamed, sizes.largest_encoder) + reserve.total, edit.budget)
        return Candidate(placement, (card,), _host_peak(sizes, budgets, placement, ("transformer", *encoders)), homes)
    if placement == "sequential":
        homes = dict.fromkeys(COMPONENTS, f"host -> {edit.name} (layers)")
        card = Peak(edit.name, (), sizes.largest_tensor + reserve.total, edit.budget)
        return Candidate(placement, (card,), _host_peak(sizes, budgets, placement, COMPONENTS), homes)
    raise UserError(f"unknown placement {placement!r}; use one of: {', '.join(OFFLOAD_CHOICES)}")


def plan_placement(
    spec: ModelSpec,
    sizes: ModelSizes,
    budgets: Budgets,
    asked: str = "auto",
    attention: str = "sdpa",
    encoder_device: str | None = None,
) -> Plan:
    """Choose where each component lives: `auto` takes the fastest placement that fits.

    Pure: sizes and budgets in, a Plan out. `plan.error` is set (and `fits` false) when the edit cannot run
    (nothing fits under auto, an impossible explicit placement); an explicit placement that merely does not
    fit keeps its name, with `plan.warning` giving the numbers.
    `encoder_device` (e.g. npu:1) fixes the second card of `split`.
    """
    if asked not in OFFLOAD_CHOICES:
        raise UserError(f"unknown offload placement {asked!r}; use one of: {', '.join(OFFLOAD_CHOICES)}")
    if encoder_device is not None:
        encoder_device = encoder_device.strip().lower()
        if asked not in ("auto", "split"):
            raise UserError(f"--encoder-device goes with --offload split (or auto), not --offload {asked}")
    reserve = working_set(spec, sizes.dtype, attention, sizes.dims)
    base = {"model": spec.name, "dtype": sizes.dtype, "attention": attention, "asked": asked, "reserve": reserve,
            "sizes": sizes, "budgets": budgets}
    candidates = [_candidate(name, sizes, budgets, reserve, encoder_device) for name in PLACEMENTS]
    if not budgets.cards:
        chosen = candidates[PLACEMENTS.index("none" if asked == "auto" else asked)]
        reason = "the CPU runs everything from host memory"
        if chosen.placement != "none":
            reason += f"; {chosen.placement} only exercises its hooks there (cpu is both card and host)"
        error = None if chosen.fits else _nothing_fits(spec, sizes, budgets, [chosen])
        return Plan(chosen=chosen, rejected=(), reason=reason, error=error, **base)
    if asked != "auto":
        chosen = candidates[PLACEMENTS.index(asked)]
        rejected = tuple(c for c in candidates[: PLACEMENTS.index(asked)] if not c.fits)
        error = chosen.impossible
        warning = None
        if error is None and not chosen.fits:
            warning = f"--offload {asked} is not predicted to fit: {chosen.why_not()}"
            fastest = next((c.placement for c in candidates if c.fits), None)
            if fastest:
                warning += f"; {fastest} would fit"
        reason = "asked for" + (f"; the fastest that fits is {_fastest(candidates)}" if _fastest(candidates) else "")
        return Plan(chosen=chosen, rejected=rejected, reason=reason, error=error, warning=warning, **base)
    if encoder_device is not None:
        candidates = [c for c in candidates if c.placement != "none"]
    fitting = [c for c in candidates if c.fits]
    if fitting:
        chosen = fitting[0]
        rejected = tuple(candidates[: candidates.index(chosen)])
        peaks = "; ".join(peak.describe() for peak in (*chosen.devices, chosen.host))
        reason = f"the fastest placement that fits ({peaks})"
        return Plan(chosen=chosen, rejected=rejected, reason=reason, **base)
    slowest = candidates[-1]
    error = _nothing_fits(spec, sizes, budgets, candidates)
    return Plan(chosen=slowest, rejected=tuple(candidates[:-1]), reason="nothing fits", error=error, **base)


def _fastest(candidates: list[Candidate]) -> str | None:
    return next((c.placement for c in candidates if c.fits), None)


def _nothing_fits(spec: ModelSpec, sizes: ModelSizes, budgets: Budgets, candidates: list[Candidate]) -> str:
    """One line: what the least demanding placement needs, what is there, and what would make it fit.

    Host memory short only: the placement needing the least host memory among those whose cards fit.
    Otherwise the placement needing the least card memory (the last one). A second card never rescues a
    plan here: `split` needs more on the edit card than `model` does.
    """
    possible = [c for c in candidates if c.impossible is None]
    cards_fit = [c for c in possible if all(peak.fits for peak in c.devices)]
    least = min(cards_fit, key=lambda c: c.host.peak_bytes) if cards_fit else possible[-1]
    needs = "; ".join(peak.describe() for peak in (*least.devices, least.host) if not peak.fits)
    fixes: list[str] = []
    card_need = max((peak.peak_bytes for peak in least.devices if not peak.fits), default=None)
    if card_need is not None:
        edit = budgets.edit
        if edit.cap is not None and card_need <= edit.free:
            fixes.append(f"--max-memory of at least {gib(card_need)}")
        else:
            fixes.append(f"a card with at least {gib(card_need)} free")
    if not least.host.fits:
        fixes.append(f"at least {gib(least.host.peak_bytes)} of host memory")
    where = f"with placement {least.placement}" if budgets.cards else "on the CPU"
    return f"{spec.title} in {sizes.dtype} does not fit: {where}, {needs}; it needs {' and '.join(fixes)}"


# ---------------------------------------------------------------------------------------------- applying


ENCODER_ATTRIBUTES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3",
                      "llama": "text_encoder_4"}


class EncoderVisits:
    """Text encoders live in host memory and visit the edit card one at a time.

    An encoder moves onto the card when it is called and stays while it is called again (the prompt, then
    the negative prompt); it leaves when another encoder arrives or when the transformer starts, so at most
    one encoder is on the card, each moves on and off once per prompt encoding, and the transformer (which
    these hooks never move) stays resident across edits. `moves` records every move, in order.
    """

    def __init__(self, encoders: dict[str, Any], transformer: Any, card: Any, host: Any) -> None:
        self.encoders = encoders
        self.card = card
        self.host = host
        self.visitor: str | None = None
        self.moves: list[tuple[str, str]] = []
        self.handles = [module.register_forward_pre_hook(partial(self._arrive, name))
                        for name, module in encoders.items()]
        self.handles.append(transformer.register_forward_pre_hook(self._evict))

    def move(self, name: str, where: str) -> None:
        """Move one encoder to "card" or "host"."""
        self.encoders[name].to(self.card if where == "card" else self.host)
        self.moves.append((name, where))

    def _arrive(self, name: str, module: Any, args: Any) -> None:
        if self.visitor != name:
            self._evict()
            self.move(name, "card")
            self.visitor = name

    def _evict(self, *hook_args: Any) -> None:
        if self.visitor is not None:
            self.move(self.visitor, "host")
            self.visitor = None


class EncodersElsewhere:
    """`split`: text encoders resident on another card; their inputs go there, their outputs come back."""

    def __init__(self, encoders: dict[str, Any], encoder_card: Any, edit_card: Any) -> None:
        from accelerate.utils import send_to_device

        self.send = send_to_device
        self.encoder_card = encoder_card
        self.edit_card = edit_card
        self.handles: list[Any] = []
        for module in encoders.values():
            module.to(encoder_card)
            self.handles.append(module.register_forward_pre_hook(self._inputs, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._outputs))

    def _inputs(self, module: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
        return self.send(args, self.encoder_card), self.send(kwargs, self.encoder_card)

    def _outputs(self, module: Any, args: Any, output: Any) -> Any:
        return self.send(output, self.edit_card)


def _streams_available(device: Any) -> bool:
    if device.type == "cpu":
        return False
    import torch

    return hasattr(torch.get_device_module(device.type), "Stream")


def apply_plan(pipe: Any, plan: Plan, card: Any, host: Any = "cpu") -> tuple[list[str], Any]:
    """Place a loaded pipeline as planned; returns (what was done, the hook object of encoders/split or None).

    On the CPU every placement still installs its hooks (card and host are both the CPU, so nothing
    moves), which lets tests run each placement's code path with the tiny set.
    """
    import torch

    card = torch.device(card)
    host = torch.device(host)
    placement = plan.placement
    encoders = {name: getattr(pipe, attribute) for name, attribute in ENCODER_ATTRIBUTES.items()
                if getattr(pipe, attribute) is not None}  # under --tensor-parallel a rank holds some
    hooks: Any = None
    pipe.edit_device = card
    if placement == "none":
        pipe.to(card)
        actions = [f"all components on {card}"]
    elif placement == "split":
        encoder_card = torch.device(plan.encoder_device or card)
        pipe.transformer.to(card)
        pipe.vae.to(card)
        hooks = EncodersElsewhere(encoders, encoder_card, card)
        actions = [f"transformer and VAE on {card}; text encoders on {encoder_card}"]
    elif placement == "encoders":
        pipe.transformer.to(card)
        pipe.vae.to(card)
        for module in encoders.values():
            module.to(host)
        hooks = EncoderVisits(encoders, pipe.transformer, card, host)
        actions = [f"transformer and VAE on {card}; text encoders in host memory, visiting {card} one at a time"]
    elif placement == "model":
        pipe.edit_device = None
        pipe.enable_model_cpu_offload(device=card)
        actions = [f"model CPU offload onto {card}"]
    elif placement == "group":
        stream = _streams_available(card)
        pipe.vae.to(card)
        for module in encoders.values():
            module.to(host)
        hooks = EncoderVisits(encoders, pipe.transformer, card, host)
        pipe.transformer.enable_group_offload(
            onload_device=card, offload_device=host, offload_type="block_level", num_blocks_per_group=1,
            use_stream=stream, non_blocking=stream,
        )
        actions = [f"transformer group offload onto {card} ({'overlapping stream' if stream else 'no stream'}); "
                   f"VAE on {card}; text encoders visiting {card}"]
    elif placement == "sequential" and card.type == "cpu":
        # accelerate's per-layer hooks break when a layer's home and execution device are both the CPU
        pipe.to(card)
        actions = ["sequential offload skipped: it needs an accelerator (the CPU holds everything anyway)"]
    elif placement == "sequential":
        pipe.edit_device = None
        pipe.enable_sequential_cpu_offload(device=card)
        actions = [f"sequential CPU offload onto {card}"]
    else:
        raise UserError(f"unknown placement {placement!r}")
    peaks = ", ".join(f"{device} {gib(peak)}" for device, peak in plan.peaks().items())
    actions.append(f"placement {placement}: predicted peak {peaks}")
    for action in actions:
        logger.info("memory plan: %s", action)
    return actions, hooks
