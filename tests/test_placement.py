"""The memory planner as a pure function: real sizes, described hosts, caps, host memory, kernels; and sizing.

The table below is the project's promise for each Ascend card size; a change to the reserve formula or a
placement's peak that moves a row must be a decision, not an accident.
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from device_utils import math_attention, math_attention_workspace
from hidream_edit.errors import ModelFilesError, UserError
from hidream_edit.placement import (
    COMPONENTS,
    DTYPE_BYTES,
    ENCODER_ATTRIBUTES,
    GIB,
    PLACEMENTS,
    Budgets,
    Card,
    Dims,
    EncodersElsewhere,
    ModelSizes,
    apply_plan,
    checkpoint_files,
    described_budgets,
    dims_from_configs,
    model_sizes,
    parse_host,
    parse_size,
    plan_for_machine,
    plan_placement,
    read_safetensors_header,
    swiglu_width,
    tensor_bytes,
    working_set,
)
from hidream_edit.spec import (
    EDIT_BRANCHES,
    LLAMA_UNUSED_PREFIXES,
    MODELS,
    REAL_E1_FULL_LORA,
    REAL_PARAMETERS,
    REAL_T5_WO,
)

HOST = 512 * GIB


def real_sizes(model: str = "e1.1") -> ModelSizes:
    return model_sizes(MODELS[model], "bf16", None, None, None, LLAMA_UNUSED_PREFIXES)


def real_plan(
    model: str, host: str, attention: str = "sdpa", asked: str = "auto", encoder_device: str | None = None,
    **budget_args,
):
    spec = MODELS[model]
    sizes = real_sizes(model)
    budgets = described_budgets(host, host_memory=budget_args.pop("host_memory", HOST), **budget_args)
    return plan_placement(spec, sizes, budgets, asked, attention, encoder_device)


# (model, host, attention, --max-memory, expected placement); None: refused before loading.
CASES = [
    ("e1.1", "1x24GiB", "sdpa", None, "group"),
    ("e1.1", "1x32GiB", "sdpa", None, "group"),
    ("e1.1", "1x48GiB", "sdpa", None, "model"),
    ("e1.1", "1x64GiB", "sdpa", None, "none"),
    ("e1.1", "2x32GiB", "sdpa", None, "group"),
    ("e1.1", "2x64GiB", "sdpa", None, "none"),
    ("e1.1", "8x64GiB", "npu_fused", None, "none"),
    ("e1.1", "1x64GiB", "sdpa", 40 * GIB, "model"),
    ("e1.1", "2x64GiB", "sdpa", 56 * GIB, "split"),
    ("e1.1", "1x64GiB", "sdpa", 52 * GIB, "encoders"),
    ("e1.1", "1x64GiB", "sdpa", 20 * GIB, "group"),
    ("e1.1", "1x64GiB", "sdpa", 8 * GIB, "sequential"),
    ("e1.1", "1x64GiB", "sdpa", 4 * GIB, None),
    ("e1.1", "1x24GiB", "math", None, "group"),
    ("e1.1", "1x32GiB", "math", None, "group"),
    ("e1.1", "1x64GiB", "math", None, "none"),
    ("e1.1", "1x64GiB", "math", 60 * GIB, "encoders"),
    ("e1-full", "1x24GiB", "sdpa", None, "group"),
    ("e1-full", "1x32GiB", "npu_fused", None, "group"),
    ("e1-full", "1x48GiB", "sdpa", None, "model"),
    ("e1-full", "1x64GiB", "sdpa", None, "none"),
    ("e1-full", "2x32GiB", "sdpa", None, "group"),
    ("e1-full", "2x64GiB", "sdpa", None, "none"),
    ("e1-full", "2x64GiB", "sdpa", 56 * GIB, "split"),
    ("e1-full", "1x24GiB", "math", None, "group"),
    ("e1-full", "1x32GiB", "math", None, "group"),
    ("e1-full", "2x64GiB", "math", None, "none"),
]


@pytest.mark.parametrize("model,host,attention,cap,expected", CASES)
def test_plan_for_each_card_size(model: str, host: str, attention: str, cap: int | None, expected: str | None) -> None:
    plan = real_plan(model, host, attention, max_memory=cap)
    if expected is None:
        assert not plan.fits and plan.error
        return
    assert plan.fits and plan.error is None and plan.placement == expected
    for peak in (*plan.chosen.devices, plan.chosen.host):
        assert peak.peak_bytes <= peak.budget_bytes
    assert [c.placement for c in plan.rejected] == list(PLACEMENTS[: PLACEMENTS.index(expected)])
    assert not any(c.fits for c in plan.rejected)


def test_only_tensors_inside_a_module_list_entry_count_toward_its_block() -> None:
    """Group offload moves one ModuleList entry at a time: its largest one is what the card must hold."""
    from hidream_edit import placement

    tally = placement._Tally()
    for name, size in (("double_stream_blocks.3.block.attn1.to_q.weight", 10), ("double_stream_blocks.3.ff.w1.bias", 5),
                       ("double_stream_blocks.12.adaLN_modulation.1.weight", 7), ("x_embedder.proj.weight", 3),
                       ("scales.0", 2), ("bias", 1)):  # a ParameterList entry and a bare parameter: no block
        tally.add(name, size)
    assert tally.blocks == {"double_stream_blocks.3": 15, "double_stream_blocks.12": 7}
    assert (tally.unblocked, tally.bytes, tally.largest_tensor) == (6, 28, 10)


def test_none_puts_everything_on_the_edit_card_with_the_reserve() -> None:
    plan = real_plan("e1.1", "1x64GiB")
    [card] = plan.chosen.devices
    assert card.device == "npu:0" and set(card.components) == set(COMPONENTS)
    assert card.peak_bytes == plan.sizes.total + plan.reserve.total
    lm_head = 0.525e9 * 2  # the loader leaves the Llama's lm_head out
    assert plan.sizes.total == pytest.approx(57.4 * GIB - lm_head, rel=0.005)
    assert plan.chosen.host.peak_bytes == pytest.approx(plan.sizes.total - 31.9 * GIB - (15 * GIB - lm_head) + 3 * GIB,
                                                        rel=0.01)
    assert plan.load_device("transformer") == plan.load_device("llama") == "npu:0" and not plan.load_device("t5")
    c = plan.sizes.components  # to the byte: what is read onto the card never passes through host memory
    assert plan.chosen.host.peak_bytes == plan.sizes.total - c["transformer"] - c["llama"] + 3 * GIB


def test_split_puts_the_text_encoders_on_the_second_card() -> None:
    plan = real_plan("e1.1", "2x64GiB", max_memory=56 * GIB)
    main, second = plan.chosen.devices
    assert (main.device, second.device, plan.encoder_device) == ("npu:0", "npu:1", "npu:1")
    assert main.components == ("transformer", "vae") and set(second.components) == {"clip_l", "clip_g", "t5", "llama"}
    assert plan.chosen.homes["llama"] == "npu:1" and plan.chosen.homes["transformer"] == "npu:0"
    # the second card holds the four encoders and the working set of the one that runs (1 GiB)
    assert second.peak_bytes == real_sizes("e1.1").encoders + 1 * GIB
    c = plan.sizes.components
    assert main.peak_bytes == c["transformer"] + c["vae"] + plan.reserve.total


def test_split_uses_the_encoder_device_asked_for() -> None:
    plan = real_plan("e1.1", "4x64GiB", device="npu:2", encoder_device="npu:3")
    assert plan.placement == "split" and plan.encoder_device == "npu:3"
    assert [peak.device for peak in plan.chosen.devices] == ["npu:2", "npu:3"]


def test_encoder_device_is_checked() -> None:
    assert real_plan("e1.1", "2x64GiB", encoder_device="NPU:1").encoder_device == "npu:1"
    assert real_plan("e1.1", "2x64GiB", asked="split", encoder_device="npu:0").error == (
        "--encoder-device npu:0 is not another visible npu card"
    )
    with pytest.raises(UserError, match="--encoder-device goes with --offload split"):
        real_plan("e1.1", "2x64GiB", asked="model", encoder_device="npu:1")


def test_encoders_peak_is_transformer_vae_largest_encoder_and_reserve() -> None:
    plan = real_plan("e1.1", "1x64GiB", max_memory=52 * GIB)
    c = plan.sizes.components
    assert plan.chosen.devices[0].peak_bytes == c["transformer"] + c["vae"] + c["llama"] + plan.reserve.total
    assert plan.chosen.homes["t5"] == "host -> npu:0" and "t5" in plan.chosen.host.components


def test_group_peak_is_the_vae_the_larger_of_streamed_blocks_and_largest_encoder_and_reserve() -> None:
    spec, sizes = MODELS["e1.1"], real_sizes("e1.1")
    budgets = described_budgets("1x64GiB", host_memory=HOST)
    c = sizes.components
    real = plan_placement(spec, sizes, budgets, "group")
    assert real.chosen.devices[0].peak_bytes == c["vae"] + sizes.largest_encoder + real.reserve.total  # the Llama
    wide = replace(sizes, largest_block=10 * GIB)  # blocks that outweigh the Llama: the running and the next one
    plan = plan_placement(spec, wide, budgets, "group")
    streamed = sizes.transformer_unblocked + 2 * 10 * GIB
    assert plan.chosen.devices[0].peak_bytes == c["vae"] + streamed + plan.reserve.total


def test_explicit_placement_wins_with_a_warning_when_it_will_not_fit() -> None:
    plan = real_plan("e1.1", "1x32GiB", asked="none")
    assert plan.placement == "none" and not plan.fits and plan.error is None
    assert plan.warning.startswith("--offload none is not predicted to fit: npu:0 needs 62.0 GiB of 32.0 GiB")
    assert plan.warning.endswith("group would fit")


def test_an_explicit_placement_lists_only_the_faster_ones_that_do_not_fit() -> None:
    """The plan tells a user who asked for a slow placement which faster ones would not have fit."""
    plan = real_plan("e1.1", "1x64GiB", asked="sequential", max_memory=40 * GIB)
    assert plan.placement == "sequential" and plan.fits and plan.warning is None
    assert [c.placement for c in plan.rejected] == ["none", "split", "encoders"]  # model and group would fit
    assert plan.reason == "asked for; the fastest that fits is model"


def test_when_nothing_fits_the_plan_shows_the_slowest_placement_and_rejects_the_rest() -> None:
    plan = real_plan("e1.1", "1x64GiB", max_memory=4 * GIB)
    assert plan.placement == "sequential" and not plan.fits and plan.reason == "nothing fits"
    assert [c.placement for c in plan.rejected] == list(PLACEMENTS[:-1])


def test_explicit_split_without_a_second_card_is_refused() -> None:
    plan = real_plan("e1.1", "1x64GiB", asked="split")
    assert plan.error == "needs a second npu card"


def test_plan_text_shows_components_reserve_peaks_and_the_warning_or_error() -> None:
    """The --plan text is what a user checks before loading: every component, the reserve, each peak."""
    assert real_plan("e1.1", "1x64GiB", asked="none", max_memory=40 * GIB).summary().splitlines() == [
        "memory plan: e1.1 in bf16, attention sdpa, on 1x64GiB (1 npu card(s))",
        "components:",
        "  transformer    31.9 GiB  npu:0              (table)",
        "  vae             0.2 GiB  npu:0              (table)",
        "  clip_l          0.2 GiB  npu:0              (table)",
        "  clip_g          1.3 GiB  npu:0              (table)",
        "  t5              8.9 GiB  npu:0              (table)",
        "  llama          14.0 GiB  npu:0              (table)",
        "working-set reserve 5.6 GiB: activations 4.6 GiB (3 x 8576 tokens), attention 0.0 GiB, decode 2.0 GiB, "
        "fixed 1.0 GiB",
        "placement: none (DOES NOT FIT; asked none): asked for; the fastest that fits is model",
        "  npu:0    peak   62.0 GiB of   40.0 GiB budget  over  [transformer, vae, clip_l, clip_g, t5, llama]",
        "  host     peak   13.6 GiB of  512.0 GiB budget  ok  [-]",
        "warning: --offload none is not predicted to fit: npu:0 needs 62.0 GiB of 40.0 GiB; model would fit",
    ]
    refused = real_plan("e1.1", "1x64GiB", asked="split").summary().splitlines()
    assert refused[-1] == "error: needs a second npu card" and not any(line.startswith("warning") for line in refused)


def test_math_plans_the_kernels_chunk_not_the_whole_score_matrix() -> None:
    """The math kernel works in query chunks: a card that holds one chunk runs it; the whole matrix would not fit."""
    whole = 2 * EDIT_BRANCHES * 20 * 8576**2 * 4  # E1.1's fp32 scores and softmax at once: 32.9 GiB
    chunked = math_attention_workspace((EDIT_BRANCHES, 20, 8576, 128), 8576, DTYPE_BYTES["bf16"])
    assert whole > 24 * GIB and chunked < 2 * GIB
    sdpa, math = real_plan("e1.1", "1x24GiB"), real_plan("e1.1", "1x24GiB", "math")
    assert working_set(MODELS["e1.1"], "bf16", "sdpa").attention == 0 and math.reserve.attention == chunked
    assert math.fits and math.error is None and math.placement == sdpa.placement == "group"
    assert math.chosen.devices[0].peak_bytes == sdpa.chosen.devices[0].peak_bytes + chunked
    peak = real_plan("e1.1", "1x64GiB", "math", asked="none").chosen.devices[0].peak_bytes
    assert real_plan("e1.1", "1x64GiB", "math", asked="none", max_memory=peak).fits
    assert real_plan("e1.1", "1x64GiB", "math", asked="none", max_memory=peak - 1).warning


class LiveStorages(TorchDispatchMode):
    """Peak bytes of the tensor storages alive after each operation (those registered up front count too)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        for tensor in tensors:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        known = self.storages.get(storage._cdata)
        if known is None or known[0].expired():
            self.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        self.peak = max(self.peak, sum(size for ref, size in self.storages.values() if not ref.expired()))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_math_workspace_is_what_the_kernel_allocates(dtype: torch.dtype) -> None:
    """Measured: the storages math_attention creates beyond its inputs and output peak at the planned workspace."""
    query, key, value = (torch.randn(3, 2, 64, 8, dtype=dtype) for _ in range(3))
    budget = 2 * 4 * 64 * 6 * 16  # 16 query rows per chunk: four chunks
    live = LiveStorages(query, key, value)
    with live:
        out = math_attention(query, key, value, budget_bytes=budget)
    allocated = live.peak - 3 * query.untyped_storage().nbytes() - out.untyped_storage().nbytes()
    assert allocated == math_attention_workspace(query.shape, 64, query.element_size(), budget)


def test_base_refine_weights_are_a_second_transformer_copy_in_host_memory() -> None:
    """--refine-weights base keeps the I1 tensors aside while loading: 31.9 GiB more host memory for E1.1."""
    spec = MODELS["e1.1"]
    edit = model_sizes(spec, "bf16", None, None, None, LLAMA_UNUSED_PREFIXES)
    base = model_sizes(spec, "bf16", None, None, None, LLAMA_UNUSED_PREFIXES, base_refine_weights=True)
    assert base.refine_copy == base.components["transformer"] == pytest.approx(31.9 * GIB, rel=0.005)
    assert edit.refine_copy == 0  # the default keeps no second copy
    budgets = described_budgets("1x64GiB", host_memory=32 * GIB)
    fits = plan_placement(spec, edit, budgets)
    refused = plan_placement(spec, base, budgets)
    assert fits.placement == "none" and fits.fits
    assert refused.error == ("HiDream-E1.1 in bf16 does not fit: with placement none, host needs 45.4 GiB of "
                             "32.0 GiB; it needs at least 45.4 GiB of host memory")


def test_e1_full_base_refine_copy_is_the_full_tensors_of_its_file_not_the_lora(tmp_path: Path) -> None:
    """E1-Full's file holds LoRA tensors (added to I1's transformer) and full tensors (replacing I1's); only
    the replaced I1 tensors are kept aside for --refine-weights base."""
    file = write_checkpoint(tmp_path / "HiDream-E1-Full.safetensors", {
        "blocks.0.to_q.lora_A.weight": torch.zeros(4, 8), "blocks.0.to_q.lora_B.weight": torch.zeros(8, 4),
        "blocks.0.norm.weight": torch.zeros(16, 16),
    })
    spec = MODELS["e1-full"]
    edit = model_sizes(spec, "bf16", None, None, file, LLAMA_UNUSED_PREFIXES)
    base = model_sizes(spec, "bf16", None, None, file, LLAMA_UNUSED_PREFIXES, base_refine_weights=True)
    assert edit.refine_copy == 0 and base.refine_copy == 16 * 16 * 2
    assert base.components["transformer"] == edit.components["transformer"]


def test_split_takes_the_other_card_with_the_largest_budget() -> None:
    cards = tuple(Card(f"npu:{i}", free * GIB) for i, free in enumerate((30, 40, 60, 20, 45)))
    plan = plan_placement(MODELS["e1.1"], real_sizes(), Budgets("npu", cards, 1, HOST))
    assert plan.placement == "split" and plan.encoder_device == "npu:2"
    assert [(peak.device, peak.budget_bytes) for peak in plan.chosen.devices] == [("npu:1", 40 * GIB),
                                                                                 ("npu:2", 60 * GIB)]


@pytest.mark.parametrize("free,placement", [((10, 63, 20), "none"), ((20, 40, 60), "split")])
def test_plan_on_this_machine_edits_on_the_card_asked_for(
    free: tuple[int, ...], placement: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--device npu:1 or LOCAL_RANK 1: the plan is made for card 1, whether or not the other cards are asked."""
    import device_utils

    asked: list[int] = []

    def device_memory(device_type: str, index: int) -> tuple[int, int]:
        asked.append(index)
        return free[index] * GIB, 64 * GIB

    monkeypatch.setattr(device_utils, "device_count", lambda device_type: len(free))
    monkeypatch.setattr(device_utils, "device_memory", device_memory)
    plan = plan_for_machine(MODELS["e1.1"], real_sizes(), "npu", 1, host_memory=HOST)
    assert plan.placement == placement and plan.fits
    assert plan.budgets.edit.name == plan.chosen.devices[0].device == "npu:1"
    assert plan.chosen.devices[0].budget_bytes == free[1] * GIB
    assert (plan.chosen.host.budget_bytes, plan.budgets.host_source) == (HOST, "--host-memory")
    assert asked == ([1] if placement == "none" else [1, 0, 1, 2])
    if placement == "split":
        assert plan.encoder_device == "npu:2"


def test_host_memory_decides_between_placements() -> None:
    """Weights read straight onto the card need no host copy; offloaded ones live in host memory."""
    assert real_plan("e1.1", "1x48GiB", host_memory=32 * GIB).error == (
        "HiDream-E1.1 in bf16 does not fit: with placement model, host needs 59.4 GiB of 32.0 GiB; "
        "it needs at least 59.4 GiB of host memory"
    )
    assert real_plan("e1.1", "1x64GiB", host_memory=32 * GIB).placement == "none"
    small = real_plan("e1.1", "1x64GiB", host_memory=8 * GIB)
    assert small.error.endswith("with placement none, host needs 13.6 GiB of 8.0 GiB; it needs at least 13.6 GiB "
                                "of host memory")


def test_nothing_fits_says_what_would_make_it_fit() -> None:
    capped = real_plan("e1.1", "1x64GiB", max_memory=4 * GIB)
    assert capped.error == (
        "HiDream-E1.1 in bf16 does not fit: with placement sequential, npu:0 needs 6.6 GiB of 4.0 GiB; "
        "it needs --max-memory of at least 6.6 GiB"
    )
    small = real_plan("e1.1", "1x4GiB", host_memory=16 * GIB)
    assert small.error.endswith("it needs a card with at least 6.6 GiB free and at least 59.4 GiB of host memory")
    capped_and_small = real_plan("e1.1", "1x4GiB", max_memory=2 * GIB)  # raising the cap would not be enough
    assert capped_and_small.error.endswith("npu:0 needs 6.6 GiB of 2.0 GiB; it needs a card with at least 6.6 GiB free")


def test_the_cap_is_the_fix_when_the_card_has_exactly_the_bytes_needed() -> None:
    """Raising --max-memory is enough when the card's free memory equals the need: a peak equal to its budget fits."""
    need = real_plan("e1.1", "1x64GiB", max_memory=4 * GIB).chosen.devices[0].peak_bytes
    capped = plan_placement(MODELS["e1.1"], real_sizes(), Budgets("npu", (Card("npu:0", need, cap=4 * GIB),), 0, HOST))
    assert capped.error.endswith("it needs --max-memory of at least 6.6 GiB")


def test_a_peak_exactly_at_its_budget_fits() -> None:
    """Budgets are inclusive: a card (or host) with exactly the predicted peak free runs the placement."""
    spec, sizes = MODELS["e1.1"], real_sizes()
    exact = real_plan("e1.1", "1x64GiB")
    card_peak, host_peak = exact.chosen.devices[0].peak_bytes, exact.chosen.host.peak_bytes
    fits = plan_placement(spec, sizes, Budgets("npu", (Card("npu:0", card_peak),), 0, host_peak))
    assert fits.placement == "none" and fits.fits and fits.rejected == ()
    short = plan_placement(spec, sizes, Budgets("npu", (Card("npu:0", card_peak - 1),), 0, host_peak))
    assert short.placement != "none" and short.rejected[0].placement == "none"


def test_fp16_keeps_t5_wo_in_fp32_and_fp32_doubles() -> None:
    spec = MODELS["e1.1"]
    bf16 = model_sizes(spec, "bf16", None, None, None).components
    fp16 = model_sizes(spec, "fp16", None, None, None).components
    fp32 = model_sizes(spec, "fp32", None, None, None).components
    assert fp16["t5"] - bf16["t5"] == 2 * REAL_T5_WO  # the wo weights take 4 bytes each instead of 2
    assert fp16["llama"] == bf16["llama"] and bf16["t5"] == 2 * REAL_PARAMETERS["t5"]
    assert bf16["llama"] == 2 * REAL_PARAMETERS["llama"]  # without a skip list the lm_head counts too
    assert fp32["transformer"] == 2 * bf16["transformer"] == 4 * REAL_PARAMETERS["transformer"]


def test_the_reserve_scales_with_the_widths_of_the_checkpoint_on_disk() -> None:
    """A small model's plan reserves for its own widths (read from its configs), not the real model's."""
    spec = MODELS["e1.1"]
    tiny = working_set(spec, "fp32", "sdpa", Dims(32, 2, 256, 8))
    assert tiny.activations == 3 * 8576 * (8 * 32 + 4 * 256) * 4 and tiny.decode == 1024 * 1024 * 8 * 8 * 4


def test_activations_take_as_many_bytes_in_bf16_as_in_fp32() -> None:
    """Measured on real-width blocks (docs/ARCHITECTURE.md section 5.2): rope, RMS norms and MoE indices work in
    fp32 / int64, so a bf16 block needs about the bytes of an fp32 one; the VAE decode scales with the dtype."""
    spec = MODELS["e1.1"]
    bf16, fp32 = working_set(spec, "bf16", "sdpa"), working_set(spec, "fp32", "sdpa")
    assert bf16.activations == fp32.activations == 3 * 8576 * (8 * 2560 + 4 * 6912) * 4
    assert 2 * bf16.decode == fp32.decode == 1024 * 1024 * 128 * 8 * 4


def test_cpu_plans_everything_in_host_memory() -> None:
    spec = MODELS["e1.1"]
    sizes = model_sizes(spec, "fp32", None, None, None)
    plan = plan_placement(spec, sizes, Budgets("cpu", (), 0, 512 * GIB), "auto")
    assert plan.placement == "none" and plan.chosen.devices == () and plan.fits
    assert plan.chosen.host.peak_bytes == sizes.total + plan.reserve.total + 3 * GIB  # the CPU reads every weight
    assert plan_placement(spec, sizes, Budgets("cpu", (), 0, 64 * GIB), "auto").error
    assert plan.reason == "the CPU runs everything from host memory"
    group = plan_placement(spec, sizes, Budgets("cpu", (), 0, 512 * GIB), "group")
    assert group.placement == "group" and group.reason.endswith("; group only exercises its hooks there (cpu is both "
                                                                "card and host)")


def test_plan_json_has_the_fields_the_issue_names() -> None:
    data = json.loads(json.dumps(real_plan("e1.1", "2x64GiB", max_memory=56 * GIB).as_dict()))
    assert {"placement", "fits", "devices", "host", "reason", "components", "rejected"} <= set(data)
    assert {"components", "peak_bytes", "budget_bytes"} <= set(data["devices"][0])
    assert {"peak_bytes", "budget_bytes"} <= set(data["host"])
    assert data["devices"][1]["budget_bytes"] == 56 * GIB and data["host"]["budget_bytes"] == HOST


@pytest.mark.parametrize(
    "text,expected",
    [("40GiB", 40 * 2**30), ("64GB", 64 * 10**9), ("512MiB", 2**29), ("1.5TiB", int(1.5 * 2**40)), ("1024", 1024),
     ("1", 1), ("512B", 512)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "forty", "64G", "-1GiB", "0GiB", "64 GiBs"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_host() -> None:
    assert parse_host("2x64GiB") == (2, 64 * GIB)
    assert (parse_host("1x32GiB"), parse_host("64x1GiB")) == ((1, 32 * GIB), (64, GIB))  # 1 to 64 cards
    for bad in ("64GiB", "0x64GiB", "65x1GiB", "ax64GiB", "2x"):
        with pytest.raises(ValueError):
            parse_host(bad)


def test_described_host_checks_the_edit_card() -> None:
    with pytest.raises(UserError, match="selects card 2"):
        described_budgets("2x64GiB", "npu:2")
    assert described_budgets("2x64GiB").host is None
    for wrong in ("cpu", "npu:x"):  # the CPU has no cards to describe; a card index is a number
        with pytest.raises(UserError, match="is not npu\\[:N\\] or cuda\\[:N\\]"):
            described_budgets("2x64GiB", wrong)
    auto = described_budgets("2x64GiB", "auto")  # the CLI's default device plans Ascend cards
    assert [card.name for card in auto.cards] == ["npu:0", "npu:1"] and auto.edit_card == 0
    cuda = described_budgets("2x64GiB", "cuda:1")
    assert [card.name for card in cuda.cards] == ["cuda:0", "cuda:1"] and cuda.edit.name == "cuda:1"


# ---------------------------------------------------------------------------------------------- sizing


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_header_sizes_count_floats_in_the_run_dtype_and_ints_as_stored(tmp_path: Path) -> None:
    file = write_checkpoint(
        tmp_path / "a.safetensors",
        {"w": torch.zeros(3, 4, dtype=torch.float32), "ids": torch.zeros(5, dtype=torch.int64)},
    )
    assert read_safetensors_header(file) == {"w": ("F32", 12), "ids": ("I64", 5)}
    assert [tensor_bytes("F32", 12, "bf16"), tensor_bytes("F64", 12, "fp16"), tensor_bytes("BF16", 12, "fp32")] == [
        24, 24, 48]
    assert tensor_bytes("F32", 12, "bf16", keep_fp32=True) == 48  # T5's `wo` kept in fp32 under fp16
    integers = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL")
    assert [tensor_bytes(stored, 5, "bf16") for stored in integers] == [40, 20, 10, 5, 40, 20, 10, 5, 5]
    assert tensor_bytes("C64", 5, "bf16") == 40  # a stored dtype the planner does not know: the widest, to err large


def test_header_reader_rejects_corrupt_files(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    for path in (short, huge, garbage):
        with pytest.raises(ModelFilesError, match=path.name):
            read_safetensors_header(path)


def test_header_reader_takes_headers_up_to_the_safetensors_limit_and_no_longer(tmp_path: Path) -> None:
    """100,000,000 header bytes are the most the safetensors library loads; a cut-off header is named."""
    largest = tmp_path / "largest.safetensors"
    with largest.open("wb") as stream:
        stream.write(struct.pack("<Q", 100_000_000) + b"{}")
        stream.write(b" " * (100_000_000 - 2))  # JSON allows the trailing blanks
    assert read_safetensors_header(largest) == {}
    largest.unlink()
    too_long = tmp_path / "too_long.safetensors"
    too_long.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(ModelFilesError, match="not a safetensors file \\(header length 100000001\\)"):
        read_safetensors_header(too_long)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(struct.pack("<Q", 20) + b'{"w": {')
    with pytest.raises(ModelFilesError, match="truncated \\(header of 20 bytes, file ends after 7\\)"):
        read_safetensors_header(cut)


def test_checkpoint_files_follow_the_index(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m-1.safetensors", {"a": torch.zeros(1)})
    write_checkpoint(tmp_path / "stray.safetensors", {"b": torch.zeros(1)})
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors"}}))
    assert checkpoint_files(tmp_path) == [tmp_path / "m-1.safetensors"]


def parameter_bytes(module: torch.nn.Module) -> int:
    unique = {t.data_ptr(): t for t in module.state_dict().values()}  # what a checkpoint stores; tied once
    return sum(t.numel() * t.element_size() for t in unique.values())


def test_tiny_sizes_from_headers_match_the_loaded_modules(e1_1_editor) -> None:
    """The files sized are the files loaded: each component's header bytes equal its loaded state dict."""
    from hidream_edit.models import sizes_on_disk

    sizes = sizes_on_disk(e1_1_editor.settings.sources, "fp32")
    pipe = e1_1_editor.loaded.pipe
    modules = {"transformer": pipe.transformer, "vae": pipe.vae, "clip_l": pipe.text_encoder,
               "clip_g": pipe.text_encoder_2, "t5": pipe.text_encoder_3, "llama": pipe.text_encoder_4}
    assert set(sizes.sources.values()) == {"headers"}
    for name, module in modules.items():
        assert sizes.components[name] == parameter_bytes(module), name
    assert sizes.dims.width == 32 and sizes.dims.vae_width == 8


def test_the_real_i1_configs_give_the_spec_widths(tmp_path: Path) -> None:
    """The reserve of a checkpoint on disk scales with its configs; the real I1 configs must give the real widths."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"num_attention_heads": 20, "attention_head_dim": 128}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert dims_from_configs(tmp_path) == Dims() == Dims(2560, 20, 6912, 128)
    assert swiglu_width(96) == 256  # a width whose 8/3 is a whole multiple of 256 is not rounded up
    (tmp_path / "vae" / "config.json").unlink()
    with pytest.raises(ModelFilesError, match="cannot read the transformer / VAE config") as missing:
        dims_from_configs(tmp_path)
    assert missing.value.role == "i1"  # front ends name --i1-path


def test_fp16_sizes_from_headers_keep_t5_wo_in_fp32(tiny_checkpoints) -> None:
    """The loader keeps T5's `wo` weights in fp32 under fp16, so the plan counts 2 more bytes for each of them."""
    spec, llama, i1 = MODELS["e1.1"], tiny_checkpoints.llama, tiny_checkpoints.i1
    fp16 = model_sizes(spec, "fp16", llama, i1, tiny_checkpoints.e1_1).components
    bf16 = model_sizes(spec, "bf16", llama, i1, tiny_checkpoints.e1_1).components
    wo = sum(count for file in checkpoint_files(i1 / "text_encoder_3")
             for name, (_, count) in read_safetensors_header(file).items() if ".wo." in name)
    assert wo and fp16["t5"] - bf16["t5"] == 2 * wo
    assert {name: size for name, size in fp16.items() if name != "t5"} == {
        name: size for name, size in bf16.items() if name != "t5"}


def test_e1_full_without_its_lora_file_adds_the_tables_lora_to_the_i1_headers(tiny_checkpoints) -> None:
    sizes = model_sizes(MODELS["e1-full"], "bf16", tiny_checkpoints.llama, tiny_checkpoints.i1, None)
    plain = model_sizes(MODELS["e1.1"], "bf16", tiny_checkpoints.llama, tiny_checkpoints.i1, tiny_checkpoints.i1)
    assert sizes.sources["transformer"] == "headers + table (LoRA)"
    assert sizes.components["transformer"] == plain.components["transformer"] + 2 * REAL_E1_FULL_LORA


def test_tiny_e1_full_adds_the_lora_to_the_i1_transformer(tiny_checkpoints) -> None:
    spec = MODELS["e1-full"]
    plain = model_sizes(MODELS["e1.1"], "bf16", tiny_checkpoints.llama, tiny_checkpoints.i1, tiny_checkpoints.i1)
    with_lora = model_sizes(spec, "bf16", tiny_checkpoints.llama, tiny_checkpoints.i1, tiny_checkpoints.e1_full_lora)
    lora_values = sum(count for name, (_, count) in read_safetensors_header(tiny_checkpoints.e1_full_lora).items()
                      if ".lora_" in name)
    assert with_lora.components["transformer"] == plain.components["transformer"] + lora_values * DTYPE_BYTES["bf16"]


def test_lora_tensors_count_toward_the_block_group_offload_moves(tiny_checkpoints, tmp_path: Path) -> None:
    """A LoRA inside a transformer block travels with that block: group offload's card peak must include it."""
    plain = model_sizes(MODELS["e1.1"], "bf16", tiny_checkpoints.llama, tiny_checkpoints.i1, tiny_checkpoints.i1)
    lora = write_checkpoint(tmp_path / "lora.safetensors", {  # larger than any tiny block: this one becomes the largest
        "double_stream_blocks.0.block.attn1.to_q.lora_A.weight": torch.zeros(1024, 64)})
    with_lora = model_sizes(MODELS["e1-full"], "bf16", tiny_checkpoints.llama, tiny_checkpoints.i1, lora)
    assert with_lora.largest_block == plain.largest_block + 1024 * 64 * 2


def test_split_moves_each_encoder_to_its_card_and_carries_inputs_there_and_outputs_back() -> None:
    """On the CPU the "other card" is the meta device: whatever is not moved stays visibly on the CPU."""
    encoders = {"t5": torch.nn.Linear(2, 2), "llama": torch.nn.Linear(2, 2)}
    hooks = EncodersElsewhere(encoders, torch.device("meta"), torch.device("cpu"))
    assert {p.device.type for encoder in encoders.values() for p in encoder.parameters()} == {"meta"}
    args, kwargs = hooks._inputs(encoders["t5"], (torch.ones(2),), {"mask": torch.ones(2)})
    assert args[0].device.type == kwargs["mask"].device.type == "meta"
    back = EncodersElsewhere({}, torch.device("cpu"), torch.device("meta"))
    assert back._outputs(encoders["t5"], (), torch.ones(2)).device.type == "meta"


class _RecordsInputDevices(torch.nn.Module):
    """A text encoder stand-in: records where its inputs arrive and answers with a tensor on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[str] = []

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.devices += [ids.device.type, mask.device.type if mask is not None else "-"]
        return torch.zeros(2)


def test_split_encoders_get_their_inputs_on_their_card_and_give_outputs_to_the_edit_card() -> None:
    """Run through a real forward call: positional and keyword inputs reach the encoder card, outputs come back."""
    there = _RecordsInputDevices()
    EncodersElsewhere({"t5": there}, torch.device("meta"), torch.device("cpu"))
    there(torch.ones(2), mask=torch.ones(2))
    assert there.devices == ["meta", "meta"]
    back = _RecordsInputDevices()
    EncodersElsewhere({"t5": back}, torch.device("cpu"), torch.device("meta"))
    assert back(torch.ones(2)).device.type == "meta"


@pytest.mark.parametrize("placement", ["model", "sequential"])
def test_offload_placements_offload_onto_the_planned_card(placement: str) -> None:
    """diffusers' offload picks card 0 when no device is given; the plan's card (e.g. npu:1) must be passed."""
    from types import SimpleNamespace

    offloaded: dict[str, Any] = {}
    pipe = SimpleNamespace(
        enable_model_cpu_offload=lambda **kwargs: offloaded.update(model=kwargs),
        enable_sequential_cpu_offload=lambda **kwargs: offloaded.update(sequential=kwargs),
        **dict.fromkeys(ENCODER_ATTRIBUTES.values()))
    plan = SimpleNamespace(placement=placement, encoder_device=None, peaks=lambda: {"meta": GIB})
    actions, hooks = apply_plan(pipe, plan, "meta")
    assert offloaded == {placement: {"device": torch.device("meta")}} and hooks is None
    assert pipe.edit_device is None  # the offload hooks, not the caller, move each component
    assert actions[0] == f"{placement} CPU offload onto meta"


def test_group_offload_on_the_cpu_uses_no_stream() -> None:
    """The CPU has no device streams to overlap a block's copy with: group offload must not ask for one."""
    from types import SimpleNamespace

    pipe = SimpleNamespace(transformer=_StubTransformer(), vae=torch.nn.Linear(2, 2),
                           **dict.fromkeys(ENCODER_ATTRIBUTES.values()))
    plan = SimpleNamespace(placement="group", encoder_device=None, peaks=lambda: {"cpu": GIB})
    actions, _ = apply_plan(pipe, plan, "cpu")
    assert pipe.transformer.group_offload["use_stream"] is False is pipe.transformer.group_offload["non_blocking"]
    assert actions[0].startswith("transformer group offload onto cpu (no stream)")


@pytest.mark.parametrize("placement", ["none", "sequential"])
def test_whole_pipeline_placements_on_the_cpu_move_everything_to_the_card(placement: str) -> None:
    """`none`, and `sequential` where the card is the CPU (accelerate's hooks cannot run there), move the pipeline."""
    from types import SimpleNamespace

    moved: list[torch.device] = []
    pipe = SimpleNamespace(to=moved.append, **dict.fromkeys(ENCODER_ATTRIBUTES.values()))
    plan = SimpleNamespace(placement=placement, encoder_device=None, peaks=lambda: {"cpu": 3 * GIB})
    actions, hooks = apply_plan(pipe, plan, "cpu")
    assert moved == [torch.device("cpu")] and hooks is None and pipe.edit_device == torch.device("cpu")
    assert actions == [{"none": "all components on cpu", "sequential": (
        "sequential offload skipped: it needs an accelerator (the CPU holds everything anyway)")}[placement],
        f"placement {placement}: predicted peak cpu 3.0 GiB"]


class _StubTransformer(torch.nn.Linear):
    """A transformer stand-in that records how group offload was asked for."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.group_offload: dict[str, Any] = {}

    def enable_group_offload(self, **kwargs: Any) -> None:
        self.group_offload = kwargs


@pytest.mark.parametrize("placement", ["split", "encoders", "group"])
def test_card_placements_put_the_vae_on_the_card_and_the_encoders_where_planned(
    placement: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The meta device plays the edit card, so whatever stays on the CPU was not moved to the card."""
    from types import SimpleNamespace

    import hidream_edit.placement as placement_module

    monkeypatch.setattr(placement_module, "_streams_available", lambda card: True)  # as an NPU or CUDA card

    encoders = {attribute: torch.nn.Linear(2, 2) for attribute in ENCODER_ATTRIBUTES.values()}
    pipe = SimpleNamespace(transformer=_StubTransformer(), vae=torch.nn.Linear(2, 2), **encoders)
    plan = SimpleNamespace(placement=placement, encoder_device="cpu", peaks=lambda: {"meta": GIB})
    _, hooks = apply_plan(pipe, plan, "meta")
    assert pipe.edit_device == torch.device("meta") and pipe.vae.weight.device.type == "meta"
    assert {encoder.weight.device.type for encoder in encoders.values()} == {"cpu"}  # split's encoder card, or host
    transformer = pipe.transformer
    if placement == "group":
        assert transformer.weight.device.type == "cpu"  # group offload moves blocks itself, one at a time
        assert transformer.group_offload == {
            "onload_device": torch.device("meta"), "offload_device": torch.device("cpu"), "offload_type": "block_level",
            "num_blocks_per_group": 1, "use_stream": True, "non_blocking": True}  # one block ahead, overlapped
    else:
        assert transformer.weight.device.type == "meta" and transformer.group_offload == {}
    if placement != "split":
        hooks.move("t5", "card")
        assert hooks.encoders["t5"].weight.device.type == "meta"


def test_a_cached_hub_copy_is_sized_from_its_headers_only_when_complete(
    tiny_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id already in the local cache is sized from its files; one whose copy lacks a file the run loads
    (an interrupted download) from the spec's table, as if it were not there."""
    import shutil

    from hidream_edit import models
    from hidream_edit.spec import I1_HUB_ID, LLAMA_HUB_ID

    spec = MODELS["e1.1"]
    partial_i1 = Path(shutil.copytree(tiny_checkpoints.i1, tmp_path / "i1"))
    for weights in (partial_i1 / "vae").glob("*.safetensors"):
        weights.unlink()
    cache = {LLAMA_HUB_ID: tiny_checkpoints.llama, I1_HUB_ID: partial_i1, spec.edit_hub_id: tiny_checkpoints.e1_1}
    monkeypatch.setattr(models, "locate", lambda source, role, offline, allow_patterns=None: Path(cache[source]))
    sizes = models.sizes_on_disk(models.ModelSources("e1.1", LLAMA_HUB_ID, I1_HUB_ID, spec.edit_hub_id), "bf16")
    assert sizes.sources == {"transformer": "headers", "vae": "table", "clip_l": "table", "clip_g": "table",
                             "t5": "table", "llama": "headers"}
    from_files = model_sizes(spec, "bf16", tiny_checkpoints.llama, None, tiny_checkpoints.e1_1, LLAMA_UNUSED_PREFIXES)
    assert sizes.components == from_files.components
