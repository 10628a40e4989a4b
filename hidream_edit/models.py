"""Locating HiDream weights and turning them into an editing pipeline on the chosen device.

Where the weights come from is decided by config.py (flags and environment); this module finds the
files (local folders, or hub ids through the local cache with only the files each model needs),
checks them, and loads. Loading keeps one copy of the transformer weights in host memory: the
transformer is created on the meta device from I1's config (E1-Full's LoRA added there by PEFT) and its
tensors (E1.1's; or I1's, the LoRA's and the LoRA file's full tensors) are assigned straight in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from device_utils import CheckpointError, DeviceManager, dtype_name, load_safetensors
from hidream_edit.attention import install_attention
from hidream_edit.errors import ModelFilesError, UserError
from hidream_edit.placement import (
    ENCODER_ATTRIBUTES,
    ModelSizes,
    Plan,
    apply_plan,
    machine_budgets,
    model_sizes,
    plan_for_machine,
)
from hidream_edit.spec import (
    LLAMA_ALLOW_PATTERNS,
    LLAMA_UNUSED_PREFIXES,
    MODELS,
    REFINE_WEIGHTS,
    TEXT_ENCODERS,
    LoraLayout,
    ModelSpec,
)

logger = logging.getLogger(__name__)

PIPELINE_PARTS = ("scheduler", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_PARTS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def lora_config(layout: LoraLayout) -> Any:
    """The PEFT LoraConfig of a model's LoRA layout (E1-Full: docs/ARCHITECTURE.md section 3.5)."""
    from peft import LoraConfig

    return LoraConfig(r=layout.rank, lora_alpha=layout.alpha, target_modules=list(layout.target_modules))


@dataclass(frozen=True)
class ModelSources:
    """Where each model comes from: a local path or a hub id. `edit` is E1.1's repo or E1-Full's LoRA."""

    model: str
    llama: str
    i1: str
    edit: str
    tiny: bool = False
    offline: bool = False

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "llama": self.llama, "i1": self.i1, "edit": self.edit, "tiny": self.tiny}


def is_hub_id(source: str) -> bool:
    """`owner/name` that is not a path on this machine."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not Path(source).exists()


ROLE_NAMES = {"llama": "Llama-3.1-8B-Instruct", "i1": "HiDream-I1-Full", "edit": "edit weights"}


def locate(source: str, role: str, offline: bool, allow_patterns: tuple[str, ...] | None = None) -> Path:
    """A local path as given, or a hub id resolved through the local HF cache (downloaded unless offline).

    For a hub id only the files matching `allow_patterns` are fetched (the spec says which a run loads).
    """
    what = ROLE_NAMES[role]
    if not is_hub_id(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelFilesError(f"{what}: {path} does not exist", role=role)
        return path
    from huggingface_hub import snapshot_download

    patterns = list(allow_patterns) if allow_patterns is not None else None
    try:
        return Path(snapshot_download(source, local_files_only=offline, allow_patterns=patterns))
    except Exception as exc:  # hub errors come in many types; all mean "not available here"
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFilesError(f"{what}: cannot get {source} ({cause})", role=role) from exc


def _weight_problems(folder: Path) -> list[str]:
    """Missing weight files of a model folder (index.json shards, or any weights file at all)."""
    if not folder.is_dir():
        return [f"{folder}/ is missing"]
    indexes = sorted(folder.glob("*.index.json"))
    if indexes:
        try:
            shards = set(json.loads(indexes[0].read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError):
            return [f"{indexes[0]} is not a valid index"]
        return [f"{folder / name} (listed in {indexes[0].name})" for name in sorted(shards)
                if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return [f"{folder}/ has no weight files"]
    return []


def _folder_problems(folder: Path, files: tuple[str, ...]) -> list[str]:
    return [f"{folder / name}" for name in files if not (folder / name).exists()]


def check_model_files(sources: ModelSources, locate_hub: bool = False) -> list[str]:
    """Problems with the local model folders (empty when complete). Hub ids not on disk are one problem each."""
    problems: list[str] = []
    for role, source in (("llama", sources.llama), ("i1", sources.i1), ("edit", sources.edit)):
        try:
            path = locate(source, role, offline=True) if (locate_hub or not is_hub_id(source)) else None
        except ModelFilesError as exc:
            problems.append(str(exc))
            continue
        if path is None:
            problems.append(f"{role}: {source} is a hub id; it is fetched at load time unless HF_HUB_OFFLINE=1")
            continue
        problems.extend(_problems_for(role, sources.spec, path))
    return problems


def _problems_for(role: str, spec: ModelSpec, path: Path, base_refine_weights: bool = False) -> list[str]:
    if role == "llama":
        problems = _folder_problems(path, ("config.json",))
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
            problems.append(f"{path / 'tokenizer.json'}")
        return problems + _weight_problems(path)
    if role == "i1":
        problems = _folder_problems(path, ("model_index.json", "transformer/config.json"))
        problems += _folder_problems(path, tuple(f"{part}/config.json" for part in PIPELINE_PARTS[1:]))
        problems += _folder_problems(path, ("scheduler/scheduler_config.json",) + TOKENIZER_PARTS)
        for part in PIPELINE_PARTS[1:]:
            problems += _weight_problems(path / part)
        if spec.needs_i1_transformer_weights(base_refine_weights):
            problems += _weight_problems(path / "transformer")
        return problems
    if spec.lora is None:
        return _weight_problems(path / "transformer")
    lora = path / spec.lora.file if path.is_dir() else path
    return [] if lora.is_file() else [f"{lora}"]


def _raise_if_incomplete(problems: list[str]) -> None:
    if problems:
        listed = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ModelFilesError(f"model files missing or incomplete: {listed}")


def _describe_keys(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")


def _meta_i1_transformer(i1_dir: Path) -> Any:
    """I1's transformer built from its config on the meta device: shapes and names, no weights."""
    from diffusers import HiDreamImageTransformer2DModel

    config = HiDreamImageTransformer2DModel.load_config(i1_dir / "transformer")
    with torch.device("meta"):
        return HiDreamImageTransformer2DModel.from_config(config)


def _rank_slices(transformer: Any, split: Any) -> dict[str, tuple[int, int, int]] | None:
    """This rank's slices of the split tensors of `transformer` (None without a split: read whole)."""
    from hidream_edit.tensor_split import shard_slices

    return shard_slices(transformer, split.size(), split.get_local_rank()) if split is not None else None


def _read_weights(path: Path, device: str | None, slices: dict[str, tuple[int, int, int]] | None) -> dict:
    try:
        return load_safetensors(path, device, slices)
    except CheckpointError as exc:
        raise ModelFilesError(str(exc)) from exc


def _check_same_keys(state: dict, expected: set[str], folder: Path) -> None:
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelFilesError(
            f"{folder} does not match the I1 transformer config: "
            f"missing {_describe_keys(missing) or 'none'}; unexpected {_describe_keys(unexpected) or 'none'}"
        )


def _assign(transformer: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, split: Any) -> None:
    """Assign `state` (whole tensors, or this rank's slices of the split ones) into the meta-device
    `transformer` in `dtype`; with `split` the model is split over it first."""
    from hidream_edit.tensor_split import parallelize_transformer

    for key in list(state):
        if state[key].is_floating_point():
            state[key] = state[key].to(dtype)
    if split is not None:
        parallelize_transformer(transformer, split, state)  # takes the split tensors out of `state`
    transformer.load_state_dict(state, strict=split is None, assign=True)


def load_e1_1_transformer(
    i1_dir: Path, e1_dir: Path, dtype: torch.dtype, device: str | None = None, split: Any = None
) -> Any:
    """I1's transformer config with E1.1's sharded weights, built without materialising I1's weights;
    read straight onto `device` when given (no host copy), else into host memory. With `split` (a
    tensor-parallel mesh) only this rank's slices of the split weights are read, and the model is split."""
    transformer = _meta_i1_transformer(i1_dir)
    state = _read_weights(e1_dir / "transformer", device, _rank_slices(transformer, split))
    _check_same_keys(state, set(transformer.state_dict()), e1_dir / "transformer")
    _assign(transformer, state, dtype, split)
    del state
    transformer.max_seq = MODELS["e1.1"].max_seq
    return transformer.eval()


class SameWeights:
    """Refine with the edit weights (the measured upstream E1.1 behaviour): nothing to switch."""

    name = "edit"

    def use_refine(self) -> None:
        return None

    def use_edit(self) -> None:
        return None


class WeightSwapError(RuntimeError):
    """A refine-weight swap failed and could not be undone: the transformer would run on mixed weights."""


class TensorSwap:
    """Keeps base values of some transformer tensors on the CPU and swaps them in for the refine steps.

    Swapping exchanges the `.data` of each tensor with the stored copy, so exactly one copy of each
    tensor is on the device and the other waits on the CPU; swapping twice restores everything.
    A swap is all or nothing: when moving a tensor fails (out of memory, say) the tensors already
    exchanged are exchanged back before the error propagates. Under sequential CPU offload the
    parameters wait on the meta device and the offload hook's CPU copies are the ones exchanged.
    """

    def __init__(self, transformer: torch.nn.Module, base: dict[str, torch.Tensor]) -> None:
        self.transformer = transformer
        self.stash = base
        self.refining = False
        self.broken = False

    def _holder(self, key: str) -> torch.Tensor:
        """The tensor that holds `key`'s values between forward passes."""
        parameter = self.transformer.get_parameter(key)
        if parameter.device.type != "meta":
            return parameter
        module_name, _, name = key.rpartition(".")
        hook = getattr(self.transformer.get_submodule(module_name), "_hf_hook", None)
        for part in getattr(hook, "hooks", (hook,)):
            weights_map = getattr(part, "weights_map", None)
            if weights_map is not None and name in weights_map:
                return weights_map[name]
        raise WeightSwapError(f"{key} is on the meta device and no offload hook holds its values")

    def _exchange(self, key: str) -> None:
        """Swap one tensor; if a copy fails, this tensor is left as it was."""
        holder = self._holder(key)
        live = holder.data
        incoming = self.stash[key].to(device=live.device, dtype=live.dtype)
        outgoing = live.to("cpu", copy=live.device.type == "cpu")
        holder.data = incoming
        self.stash[key] = outgoing

    def _swap(self) -> None:
        done: list[str] = []
        with torch.no_grad():
            try:
                for key in list(self.stash):
                    self._exchange(key)
                    done.append(key)
            except BaseException:
                try:
                    for key in reversed(done):
                        self._exchange(key)
                except BaseException as exc:
                    self.broken = True
                    raise WeightSwapError(
                        f"a refine-weight swap failed and {len(done)} tensors could not be restored; reload the model"
                    ) from exc
                raise

    def _refuse_if_broken(self) -> None:
        if self.broken:
            raise WeightSwapError("an earlier refine-weight swap failed and left mixed weights; reload the model")

    def use_refine(self) -> None:
        self._refuse_if_broken()
        if not self.refining:
            self._swap()
            self.refining = True

    def use_edit(self) -> None:
        self._refuse_if_broken()
        if self.refining:
            self._swap()
            self.refining = False


class BaseWeightsE1_1(TensorSwap):
    """Refine E1.1 with true I1 weights: keeps the I1 tensors that differ from E1.1."""

    name = "base"


class AdaptersOff:
    """E1-Full refine: LoRA adapters disabled; with `swap`, the full tensors also go back to I1's values."""

    def __init__(self, transformer: Any, swap: TensorSwap | None = None) -> None:
        self.transformer = transformer
        self.swap = swap
        self.name = "base" if swap else "edit"

    def use_refine(self) -> None:
        if self.swap:
            self.swap.use_refine()  # first: if it fails (rolled back), the adapters stay on
        self.transformer.disable_adapters()

    def use_edit(self) -> None:
        if self.swap:
            self.swap.use_edit()
        self.transformer.enable_adapters()


def differing_base_tensors(transformer: torch.nn.Module, i1_dir: Path) -> dict[str, torch.Tensor]:
    """I1 tensors whose values differ from the loaded transformer's, read shard by shard to the CPU."""
    try:
        base = load_safetensors(i1_dir / "transformer")
    except CheckpointError as exc:
        raise ModelFilesError(str(exc)) from exc
    live = dict(transformer.named_parameters())
    kept: dict[str, torch.Tensor] = {}
    for key in list(base):
        tensor = base.pop(key)
        if key in live and not torch.equal(tensor.to(live[key].dtype), live[key].detach().cpu()):
            kept[key] = tensor.to(live[key].dtype)
    logger.info("refine weights: keeping %d base tensors that differ from the edit weights", len(kept))
    return kept


def load_e1_full_transformer(
    i1_dir: Path, lora_file: Path, dtype: torch.dtype, refine_weights: str, device: str | None = None,
    split: Any = None,
) -> tuple[Any, Any]:
    """I1 transformer + E1-Full LoRA adapter and full tensors; returns (transformer, refine switch).

    Built on the meta device like E1.1's, the adapter added there by PEFT, every tensor read once, straight
    onto `device` when given. With `split` (a tensor-parallel mesh) only this rank's slices of the split
    tensors are read, from I1's files and from the LoRA file alike, and the model is split.
    """
    spec = MODELS["e1-full"]
    assert spec.lora is not None
    transformer = _meta_i1_transformer(i1_dir)
    base = _read_weights(i1_dir / "transformer", device, _rank_slices(transformer, split))
    _check_same_keys(base, set(transformer.state_dict()), i1_dir / "transformer")
    transformer.add_adapter(lora_config(spec.lora))
    model_state = transformer.state_dict()  # meta tensors: PEFT's names and the whole shapes
    peft_names = {key.replace(".base_layer.", "."): key for key in model_state if ".base_layer." in key}
    state = {peft_names.get(key, key): tensor for key, tensor in base.items()}
    del base
    slices = _rank_slices(transformer, split)
    checkpoint = _read_weights(lora_file, device, slices)
    unexpected = sorted(set(checkpoint) - set(model_state))
    if unexpected:
        layout = "does not fit the E1-Full LoRA layout"
        raise ModelFilesError(f"{lora_file} {layout}: unexpected {_describe_keys(unexpected)}")
    full_keys = [k for k in checkpoint if ".lora_" not in k]
    lora_keys = [k for k in model_state if ".lora_" in k]
    missing = sorted(k for k in lora_keys if k not in checkpoint)
    if missing:
        # PEFT starts lora_A random: a missing A (or B) is set to zero so its layer gets no LoRA change at all.
        logger.warning(
            "%s lacks %d of the %d LoRA tensors of the E1-Full adapter (%s); they are set to zero, "
            "so those layers run without the LoRA",
            lora_file, len(missing), len(lora_keys), _describe_keys(missing),
        )
        for key in missing:
            shape = list(model_state[key].shape)
            if slices is not None and key in slices:
                dim, begin, stop = slices[key]
                shape[dim] = stop - begin
            checkpoint[key] = torch.zeros(shape, dtype=dtype, device=device)
    swap = None
    if refine_weights == "base":
        swap = TensorSwap(transformer, {k: state[k].to("cpu", dtype, copy=True) for k in full_keys})
    state.update(checkpoint)
    del checkpoint
    _assign(transformer, state, dtype, split)
    del state
    transformer.max_seq = spec.max_seq
    logger.info("E1-Full: LoRA loaded with %d full tensors", len(full_keys))
    return transformer.eval(), AdaptersOff(transformer, swap)


def table_sizes(spec: ModelSpec, dtype: str) -> ModelSizes:
    """The real model's component sizes as this loader loads them, from the spec's table alone."""
    return model_sizes(spec, dtype, None, None, None, LLAMA_UNUSED_PREFIXES)


def sizes_on_disk(sources: ModelSources, dtype: str, refine_weights: str = "edit") -> ModelSizes:
    """Component sizes for a plan made before anything is fetched: the headers of the files on this machine,
    the spec's table of real sizes for hub ids not downloaded (or not completely) yet.

    A local path must exist and be complete, as loading would require.
    """
    spec = sources.spec
    base_refine = refine_weights == "base"
    located: dict[str, Path | None] = {}
    for role, source, patterns in (("llama", sources.llama, LLAMA_ALLOW_PATTERNS),
                                   ("i1", sources.i1, spec.i1_allow_patterns(base_refine)),
                                   ("edit", sources.edit, spec.edit_allow_patterns())):
        if not is_hub_id(source):
            located[role] = locate(source, role, offline=True)
            _raise_if_incomplete(_problems_for(role, spec, located[role], base_refine))
            continue
        try:
            path: Path | None = locate(source, role, offline=True, allow_patterns=patterns)
        except ModelFilesError:
            path = None
        located[role] = path if path is not None and not _problems_for(role, spec, path, base_refine) else None
    edit = located["edit"]
    if edit is not None and spec.lora is not None and edit.is_dir():
        edit = edit / spec.lora.file
    return model_sizes(spec, dtype, located["llama"], located["i1"], edit, LLAMA_UNUSED_PREFIXES, base_refine)


@dataclass
class LoadedPipeline:
    """A placed editing pipeline and what loading did."""

    pipe: Any
    refine_switch: Any
    attention: str
    memory_actions: list[str]
    sources: ModelSources
    lora_fused: bool = False
    vae_dtype: str = ""
    plan: Plan | None = None
    placement_hooks: Any = None


def load_pipeline(
    sources: ModelSources,
    dm: DeviceManager,
    offload: str = "none",
    attention: str | None = None,
    refine_weights: str = "edit",
    fuse_lora: bool = False,
    vae_tiling: bool = False,
    max_memory: int | None = None,
    host_memory: int | None = None,
    encoder_device: str | None = None,
    tensor_mesh: Any = None,
) -> LoadedPipeline:
    """Build the E1.1 or E1-Full editing pipeline in the manager's dtype, placed per the memory plan.

    The plan is made from the files' headers before any weight is read; `offload` "auto" takes the fastest
    placement that fits, and a plan that cannot run refuses here, before loading. With `tensor_mesh`
    (--tensor-parallel) the transformer is split over it: the plan counts this rank's share, and each rank
    reads only its slices of the split tensors from disk (E1-Full's LoRA file too).
    """
    from transformers import AutoTokenizer, LlamaModel

    from hidream_edit.pipeline import HiDreamImageEditingPipeline
    from hidream_edit.tensor_split import (
        SharedEncoders,
        check_fuse_lora,
        gather_budgets,
        plan_tensor_group,
        tensor_share,
    )

    spec = sources.spec
    if refine_weights not in REFINE_WEIGHTS:
        raise UserError(f"unknown refine weights {refine_weights!r}; use one of: {', '.join(REFINE_WEIGHTS)}")
    if fuse_lora and not spec.uses_lora:
        raise UserError(f"{spec.title} has no LoRA to fuse")
    if tensor_mesh is not None:
        check_fuse_lora(fuse_lora, tensor_mesh.size())
    attention = dm.resolve_attention_backend(attention)
    base_refine = refine_weights == "base"
    plan_args = (dm.device_type, dm.index, offload, attention, encoder_device, max_memory, host_memory)
    if any(is_hub_id(source) for source in (sources.llama, sources.i1, sources.edit)):
        # refuse before a download of tens of GB when even the real sizes (spec's table) cannot fit
        early = plan_for_machine(spec, sizes_on_disk(sources, dm.dtype_name, refine_weights), *plan_args)
        if early.error:
            raise UserError(early.error)
    llama_dir = locate(sources.llama, "llama", sources.offline, LLAMA_ALLOW_PATTERNS)
    i1_dir = locate(sources.i1, "i1", sources.offline, spec.i1_allow_patterns(base_refine))
    edit_path = locate(sources.edit, "edit", sources.offline, spec.edit_allow_patterns())
    problems = _problems_for("llama", spec, llama_dir) + _problems_for("i1", spec, i1_dir, base_refine)
    _raise_if_incomplete(problems + _problems_for("edit", spec, edit_path))
    lora_path = edit_path / spec.lora.file if spec.lora is not None and edit_path.is_dir() else edit_path
    sizes = model_sizes(spec, dm.dtype_name, llama_dir, i1_dir, lora_path, LLAMA_UNUSED_PREFIXES, base_refine)
    held = TEXT_ENCODERS
    shared_encoders = None
    if tensor_mesh is None:
        plan = plan_for_machine(spec, sizes, *plan_args)
    else:
        sizes = tensor_share(sizes, i1_dir, tensor_mesh.size())
        own = machine_budgets(dm.device_type, dm.index, max_memory, host_memory, all_cards=False)
        group_plan = plan_tensor_group(spec, sizes, gather_budgets(own, tensor_mesh), offload, attention,
                                       encoder_device)
        if group_plan.error:
            raise UserError(group_plan.error)
        member = tensor_mesh.get_local_rank()
        plan, held = group_plan.plans[member], group_plan.held_by(member)
        shared_encoders = SharedEncoders(group_plan.owners, tensor_mesh)
    if plan.error:
        raise UserError(plan.error)
    if plan.warning:
        logger.warning("memory plan: %s", plan.warning)
    logger.info("memory plan: %s", plan.reason)

    dtype = dm.dtype
    switch: Any
    if spec.lora is None:
        transformer = load_e1_1_transformer(i1_dir, edit_path, dtype, plan.load_device("transformer"), tensor_mesh)
        switch = SameWeights()
        if base_refine:
            switch = BaseWeightsE1_1(transformer, differing_base_tensors(transformer, i1_dir))
    else:
        lora_file = edit_path / spec.lora.file if edit_path.is_dir() else edit_path
        transformer, switch = load_e1_full_transformer(
            i1_dir, lora_file, dtype, refine_weights, plan.load_device("transformer"), tensor_mesh
        )
        if fuse_lora:  # refused with a split (tensor_split.check_fuse_lora)
            transformer.fuse_lora(lora_scale=1.0)
    tokenizer_4 = AutoTokenizer.from_pretrained(llama_dir)
    # the base model: prompt encoding reads hidden states only, the lm_head would be 1 GiB never used
    text_encoder_4 = LlamaModel.from_pretrained(
        llama_dir, dtype=dtype, attn_implementation="eager", device_map=plan.load_device("llama")
    ) if "llama" in held else None
    # under --tensor-parallel another rank of the group holds the encoders this one does not load
    elsewhere = {ENCODER_ATTRIBUTES[name]: None for name in TEXT_ENCODERS if name not in held and name != "llama"}
    pipe = HiDreamImageEditingPipeline.from_pretrained(
        i1_dir, transformer=transformer, tokenizer_4=tokenizer_4, text_encoder_4=text_encoder_4, dtype=dtype,
        **elsewhere,
    )
    pipe.shared_encoders = shared_encoders
    placed = place_pipeline(pipe, dm, plan, attention, vae_tiling)
    return LoadedPipeline(
        pipe, switch, placed.attention, placed.actions, sources, lora_fused=fuse_lora, vae_dtype=placed.vae_dtype,
        plan=plan, placement_hooks=placed.hooks,
    )


@dataclass(frozen=True)
class Placed:
    """What `place_pipeline` did: the attention kernel installed, the placement's actions and hooks, the VAE dtype."""

    attention: str
    actions: list[str]
    hooks: Any
    vae_dtype: str


def place_pipeline(pipe: Any, dm: DeviceManager, plan: Plan, attention: str, vae_tiling: bool = False) -> Placed:
    """The last steps of building any editing pipeline (real weights or full-size random ones): VAE dtype,
    attention kernel, placement per the memory plan, VAE tiling."""
    pipe.set_progress_bar_config(disable=True)
    if dm.dtype == torch.float16:  # fp16 VAE decodes overflow into black images; the VAE is small in fp32
        pipe.vae.to(dtype=torch.float32)
        logger.info("VAE in fp32 (the model runs in fp16)")
    vae_dtype = dtype_name(pipe.vae.dtype)
    attention = install_attention(pipe.transformer, dm, attention)
    actions, hooks = apply_plan(pipe, plan, dm.device)
    if vae_tiling:
        pipe.vae.enable_tiling()
        actions.append("VAE tiling")
    return Placed(attention, actions, hooks, vae_dtype)
