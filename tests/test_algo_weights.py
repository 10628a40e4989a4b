"""Refine-weight switching: all-or-nothing swaps, and base weights under every offload mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import cpu_offload
from PIL import Image

from device_utils import DeviceManager, load_safetensors
from hidream_edit import models
from hidream_edit.config import resolve_model_sources
from hidream_edit.models import AdaptersOff, TensorSwap, WeightSwapError
from hidream_edit.spec import MODELS

# ------------------------------------------------------------------ all-or-nothing swaps on a toy module


def toy() -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A module with edit values, plus the base values of every parameter (all different)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    edit = {k: v.detach().clone() for k, v in module.named_parameters()}
    base = {k: v + 10.0 for k, v in edit.items()}
    return module, edit, base


def holds(module: torch.nn.Module, values: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p.detach(), values[k]) for k, p in module.named_parameters())


class Faults:
    """Makes chosen calls of Tensor.to raise out-of-memory, counted from the moment `fail` is called."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing: set[int] = set()

    def fail(self, *offsets: int) -> None:
        self.failing = {self.calls + offset for offset in offsets}

    def clear(self) -> None:
        self.failing = set()


@pytest.fixture()
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    state = Faults()
    original = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        number = state.calls
        state.calls += 1
        if number in state.failing:
            raise torch.OutOfMemoryError("out of memory (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    return state


@pytest.mark.parametrize("failing_call", range(8))  # 4 tensors, 2 moves each: every move of the swap fails once
def test_a_failed_swap_rolls_back_every_tensor(faults: Faults, failing_call: int) -> None:
    module, edit, base = toy()
    swap = TensorSwap(module, {k: v.clone() for k, v in base.items()})
    faults.fail(failing_call)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        swap.use_refine()
    assert not swap.refining and holds(module, edit)
    assert all(torch.equal(swap.stash[k], base[k]) for k in base)
    faults.clear()
    swap.use_refine()
    assert swap.refining and holds(module, base)
    swap.use_edit()
    assert not swap.refining and holds(module, edit)


def test_a_swap_puts_base_values_in_the_dtype_the_model_runs_in() -> None:
    """Base values kept in another dtype (a checkpoint's float64, say) arrive in the parameter's own dtype:
    a layer switched to another dtype mid-edit would fail in its matmul or silently run slower."""
    module, edit, base = toy()
    swap = TensorSwap(module, {k: v.double() for k, v in base.items()})
    swap.use_refine()
    assert {p.dtype for p in module.parameters()} == {torch.float32} and holds(module, base)
    swap.use_edit()
    assert {p.dtype for p in module.parameters()} == {torch.float32} and holds(module, edit)


def test_a_failed_swap_back_keeps_the_refine_weights_whole(faults: Faults) -> None:
    module, edit, base = toy()
    swap = TensorSwap(module, {k: v.clone() for k, v in base.items()})
    swap.use_refine()
    faults.fail(5)
    with pytest.raises(torch.OutOfMemoryError):
        swap.use_edit()
    assert swap.refining and holds(module, base)
    swap.use_edit()
    assert holds(module, edit)


def test_a_swap_that_cannot_be_undone_refuses_every_later_use(faults: Faults) -> None:
    module, _, base = toy()
    swap = TensorSwap(module, {k: v.clone() for k, v in base.items()})
    faults.fail(4, 6)  # the third tensor fails, then restoring the second fails too
    with pytest.raises(WeightSwapError, match="could not be restored; reload the model"):
        swap.use_refine()
    faults.clear()
    for use in (swap.use_refine, swap.use_edit):
        with pytest.raises(WeightSwapError, match="left mixed weights"):
            use()


def test_a_parameter_on_meta_that_no_offload_hook_holds_is_one_clear_error() -> None:
    """Weights waiting on the meta device are swapped in the offload hook's copy; without one (or with a hook
    that keeps no copies) there is nothing to swap, and the error says so instead of failing obscurely."""
    module, _, base = toy()
    module[0].to("meta")
    swap = TensorSwap(module, {k: v.clone() for k, v in base.items()})
    with pytest.raises(WeightSwapError, match="^0.weight is on the meta device and no offload hook holds its values$"):
        swap.use_refine()
    module[0]._hf_hook = type("HookWithoutCopies", (), {})()
    with pytest.raises(WeightSwapError, match="no offload hook holds its values"):
        swap.use_refine()


class Adapters:
    """Records adapter switching like PEFT's enable/disable_adapters."""

    def __init__(self) -> None:
        self.enabled = True

    def disable_adapters(self) -> None:
        self.enabled = False

    def enable_adapters(self) -> None:
        self.enabled = True


def test_e1_full_switch_keeps_adapters_on_when_the_swap_fails(faults: Faults) -> None:
    module, edit, base = toy()
    adapters = Adapters()
    switch = AdaptersOff(adapters, TensorSwap(module, {k: v.clone() for k, v in base.items()}))
    faults.fail(3)
    with pytest.raises(torch.OutOfMemoryError):
        switch.use_refine()
    assert adapters.enabled and holds(module, edit)
    faults.clear()
    switch.use_refine()
    assert not adapters.enabled and holds(module, base)
    faults.fail(5)  # the swap back fails: the refine state (adapters off, base tensors) stays whole
    with pytest.raises(torch.OutOfMemoryError):
        switch.use_edit()
    assert not adapters.enabled and holds(module, base)
    faults.clear()
    switch.use_edit()
    assert adapters.enabled and holds(module, edit)


def test_only_base_tensors_that_differ_are_kept_for_the_refine_stage(tmp_path: Path) -> None:
    """E1.1 --refine-weights base keeps in host memory only the I1 tensors whose values differ from E1.1's."""
    from safetensors.torch import save_file

    module, edit, _ = toy()
    base = {name: value.clone() for name, value in edit.items()}
    base["0.bias"] = base["0.bias"] + 1.0
    base["1.weight"] = base["1.weight"].double()  # same values, stored in another dtype: not kept
    base["unused.weight"] = torch.ones(2)  # a tensor the transformer does not have
    (tmp_path / "transformer").mkdir()
    save_file(base, str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    kept = models.differing_base_tensors(module, tmp_path)
    assert list(kept) == ["0.bias"] and torch.equal(kept["0.bias"], edit["0.bias"] + 1.0)
    assert kept["0.bias"].dtype == module[0].bias.dtype


# ------------------------------------------------------------------ base refine weights under offload (tiny E1.1)


@pytest.fixture(scope="module")
def sources(tiny_env: dict[str, str]) -> models.ModelSources:
    return resolve_model_sources(MODELS["e1.1"], tiny=True, env=tiny_env)


def load_base(sources: models.ModelSources) -> models.LoadedPipeline:
    return models.load_pipeline(sources, DeviceManager("cpu", "fp32"), refine_weights="base")


def edit_latents(loaded: models.LoadedPipeline, refine: float, switch: Any = "loaded") -> torch.Tensor:
    image = Image.new("RGB", (64, 48), (30, 120, 200))
    refine_switch = loaded.refine_switch if switch == "loaded" else switch
    output = loaded.pipe("make it green", "blurry", image, 3.0, 1.5, 2, torch.Generator().manual_seed(0), refine,
                         output_type="latent", refine_switch=refine_switch)
    return output.images


@pytest.fixture(scope="module")
def reference(sources: models.ModelSources) -> dict[str, torch.Tensor]:
    """Latents without offload: refine on base weights, refine on edit weights, no refine stage."""
    loaded = load_base(sources)
    return {
        "base": edit_latents(loaded, 0.5),
        "edit": edit_latents(loaded, 0.5, switch=None),
        "none": edit_latents(loaded, 0.0),
    }


def test_base_and_edit_refine_weights_give_different_results(reference: dict[str, torch.Tensor]) -> None:
    assert (reference["base"] - reference["edit"]).abs().max() > 1e-3


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_base_refine_weights_work_under_offload(
    sources: models.ModelSources, reference: dict[str, torch.Tensor], offload: str
) -> None:
    """Offload hooks work onto the CPU when attached directly. Sequential offload is accelerate's cpu_offload
    on the transformer, as diffusers' enable_sequential_cpu_offload attaches it per component (on the CPU
    that method fails in the CLIP text encoder, unrelated to the transformer); parameters then wait on meta."""
    loaded = load_base(sources)
    if offload == "model":
        loaded.pipe.enable_model_cpu_offload(device="cpu")
    else:
        cpu_offload(loaded.pipe.transformer, torch.device("cpu"), offload_buffers=False)
        assert loaded.pipe.transformer.get_parameter("x_embedder.proj.weight").device.type == "meta"
    torch.testing.assert_close(edit_latents(loaded, 0.5), reference["base"])
    torch.testing.assert_close(edit_latents(loaded, 0.0), reference["none"])  # edit weights are back
    torch.testing.assert_close(edit_latents(loaded, 0.5), reference["base"])


def test_e1_full_base_refine_weights_work_under_sequential_offload(tiny_env: dict[str, str]) -> None:
    """The LoRA layers are offloaded too; adapters switch off and the full tensors swap from the hooks' copies."""
    e1_full = resolve_model_sources(MODELS["e1-full"], tiny=True, env=tiny_env)
    prompt = "Editing Instruction: make it green. Target Image Description: a green square"
    plain, offloaded = load_base(e1_full), load_base(e1_full)
    cpu_offload(offloaded.pipe.transformer, torch.device("cpu"), offload_buffers=False)
    results = []
    for loaded in (plain, offloaded, offloaded):
        image = Image.new("RGB", (64, 64), (30, 120, 200))
        results.append(loaded.pipe(prompt, "blur", image, 5.0, 4.0, 2, torch.Generator().manual_seed(0), 0.5,
                                   output_type="latent", refine_switch=loaded.refine_switch).images)
    torch.testing.assert_close(results[1], results[0])
    torch.testing.assert_close(results[2], results[0])


def test_a_failed_switch_mid_edit_leaves_later_edits_exact(
    sources: models.ModelSources, reference: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_base(sources)
    swap = loaded.refine_switch
    exchange, calls = swap._exchange, [0]

    def failing_exchange(key: str) -> None:
        calls[0] += 1
        if calls[0] == 5:
            raise torch.OutOfMemoryError("out of memory (injected)")
        exchange(key)

    monkeypatch.setattr(swap, "_exchange", failing_exchange)
    with pytest.raises(torch.OutOfMemoryError):
        edit_latents(loaded, 0.5)
    assert calls[0] == 9  # 4 exchanged, the 5th failed, 4 exchanged back
    monkeypatch.undo()
    e1 = load_safetensors(Path(sources.edit) / "transformer")["x_embedder.proj.weight"]
    assert torch.equal(loaded.pipe.transformer.get_parameter("x_embedder.proj.weight").detach(), e1)
    torch.testing.assert_close(edit_latents(loaded, 0.0), reference["none"])
    torch.testing.assert_close(edit_latents(loaded, 0.5), reference["base"])
