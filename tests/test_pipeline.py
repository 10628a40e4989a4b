"""The editing algorithm: its pieces against hand-computed values, then the loop on the tiny model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.hidream_image.pipeline_hidream_image import calculate_shift
from PIL import Image

from hidream_edit.pipeline import (
    PromptEmbeddings,
    combine_edit_guidance,
    combine_refine_guidance,
    concat_image_latents,
    crop_and_negate,
    edit_text_batch,
    refine_start_step,
)


def embeddings(value: float, batch: int = 1) -> PromptEmbeddings:
    return PromptEmbeddings(
        t5=torch.full((batch, 3, 4), value),
        llama=torch.full((2, batch, 3, 5), value),
        pooled=torch.full((batch, 6), value),
    )


@pytest.mark.parametrize(
    "steps,strength,expected", [(28, 0.3, 19), (28, 0.0, 28), (28, 1.0, 0), (10, 0.25, 7), (3, 0.5, 1)]
)
def test_refine_start_step(steps: int, strength: float, expected: int) -> None:
    assert refine_start_step(steps, strength) == expected


def test_edit_text_batches_and_llama_batch_axis() -> None:
    cond, negative = embeddings(1.0), embeddings(-1.0)
    on = edit_text_batch(cond, negative, clip_cfg_norm=True)
    off = edit_text_batch(cond, negative, clip_cfg_norm=False)
    assert on.t5[:, 0, 0].tolist() == [1.0, -1.0, 1.0] and off.t5[:, 0, 0].tolist() == [-1.0, -1.0, 1.0]
    assert on.llama.shape == (2, 3, 3, 5) and on.llama[0, :, 0, 0].tolist() == [1.0, -1.0, 1.0]
    assert on.pooled[:, 0].tolist() == [1.0, -1.0, 1.0]


def test_width_concat_crop_and_negation() -> None:
    latents = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(1, 2, 2, 3)
    image = torch.stack([torch.zeros(2, 2, 3), torch.ones(2, 2, 3), torch.ones(2, 2, 3) * 2])
    joined = concat_image_latents(latents, image)
    assert joined.shape == (3, 2, 2, 6)
    assert torch.equal(joined[1, :, :, :3], latents[0]) and torch.equal(joined[2, :, :, 3:], image[2])
    cropped = crop_and_negate(joined, 3)
    assert torch.equal(cropped, -torch.cat([latents] * 3))


def test_guidance_without_norm_clipping() -> None:
    a, b, c = torch.full((1, 2, 1, 1), 1.0), torch.full((1, 2, 1, 1), 2.0), torch.full((1, 2, 1, 1), 4.0)
    out = combine_edit_guidance(torch.cat([a, b, c]), guidance_scale=3.0, image_guidance_scale=1.5, clip_cfg_norm=False)
    assert torch.allclose(out, torch.full((1, 2, 1, 1), 1.0 + 1.5 * 1.0 + 3.0 * 2.0))


def test_guidance_with_norm_clipping() -> None:
    # per-pixel vectors over the channel axis (dim 1)
    a = torch.tensor([[[[0.0]], [[0.0]]]])
    b = torch.tensor([[[[1.0]], [[0.0]]]])
    c = torch.tensor([[[[0.0]], [[1.0]]]])
    out = combine_edit_guidance(torch.cat([a, b, c]), guidance_scale=2.0, image_guidance_scale=1.0, clip_cfg_norm=True)
    p = torch.tensor([-1.0, 2.0])  # b + 2 (c - b)
    expected = p * (1.0 / (p.norm() + 1e-8))  # |c| = 1 < |p|: scaled down to norm 1
    assert torch.allclose(out.flatten(), expected, atol=1e-6)
    small = combine_edit_guidance(torch.cat([a, b, b * 0.5]), 0.5, 2.0, True)
    p_small = b + 0.5 * (b * 0.5 - b)  # norm 0.75 > |c| = 0.5: scaled by 2/3
    assert torch.allclose(small, 2.0 * p_small * (0.5 / 0.75), atol=1e-6)
    no_clip = combine_edit_guidance(torch.cat([a, b * 0.1, b]), 1.0, 1.0, True)
    assert torch.allclose(no_clip, b)  # p = c exactly, ratio 1


def test_refine_guidance() -> None:
    out = combine_refine_guidance(torch.cat([torch.ones(1, 2), torch.full((1, 2), 3.0)]), 2.5)
    assert torch.allclose(out, torch.full((1, 2), 1.0 + 2.5 * 2.0))


# ---------------------------------------------------------------- the loop on the tiny model


class TransformerSpy:
    """Records each transformer call's batch, latent width and T5 text while the real forward runs."""

    def __init__(self, transformer: Any) -> None:
        self.transformer = transformer
        self.calls: list[dict[str, Any]] = []
        self.original = transformer.forward

    def __enter__(self) -> TransformerSpy:
        def forward(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(
                {
                    "batch": kwargs["hidden_states"].shape[0],
                    "width": kwargs["hidden_states"].shape[-1],
                    "t5": kwargs["encoder_hidden_states_t5"].clone(),
                }
            )
            return self.original(*args, **kwargs)

        self.transformer.forward = forward
        return self

    def __exit__(self, *exc: object) -> None:
        del self.transformer.forward


@torch.no_grad()
def t5_of(pipe: Any, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative "blurry") T5 embeddings from diffusers' encode_prompt, for one batch entry each."""
    t5, negative_t5, *_ = pipe.encode_prompt(prompt=prompt, negative_prompt="blurry", device=torch.device("cpu"),
                                             do_classifier_free_guidance=True, max_sequence_length=128)
    return t5[0], negative_t5[0]


def small_image() -> Image.Image:
    return Image.new("RGB", (64, 48), (200, 40, 40))


def run(pipe: Any, prompt: str, steps: int = 4, refine: float = 0.5, **kwargs: Any) -> Any:
    return pipe(prompt, "blurry", small_image(), 3.0, 1.5, steps, torch.Generator().manual_seed(0), refine, **kwargs)


def test_stages_batches_widths_and_refine_prompt(e1_1_editor: Any) -> None:
    pipe = e1_1_editor.loaded.pipe
    with TransformerSpy(pipe.transformer) as spy:
        output = run(pipe, "Editing Instruction: make it blue. Target Image Description: a blue square")
    latent_width = 64 // pipe.vae_scale_factor
    assert [c["batch"] for c in spy.calls] == [3, 3, 2, 2]
    assert [c["width"] for c in spy.calls] == [2 * latent_width] * 2 + [latent_width] * 2
    assert output.refine_start_step == 2 and len(output.timings["step_s"]) == 4
    edit_cond, negative = t5_of(pipe, "Editing Instruction: make it blue. Target Image Description: a blue square")
    refine_cond, _ = t5_of(pipe, "a blue square")  # the refine stage encodes the target description only
    assert torch.equal(spy.calls[0]["t5"][0], edit_cond) and torch.equal(spy.calls[2]["t5"][1], refine_cond)
    assert torch.equal(spy.calls[0]["t5"][1], negative) and torch.equal(spy.calls[2]["t5"][0], negative)
    assert output.images[0].size == (64, 48) and not output.non_finite


def test_without_target_description_refine_reuses_main_embeddings(e1_1_editor: Any) -> None:
    pipe = e1_1_editor.loaded.pipe
    with TransformerSpy(pipe.transformer) as spy:
        run(pipe, "make it blue")
    assert torch.equal(spy.calls[0]["t5"][0], spy.calls[2]["t5"][1])


def test_clip_cfg_norm_off_changes_first_branch_text(e1_1_editor: Any) -> None:
    pipe = e1_1_editor.loaded.pipe
    with TransformerSpy(pipe.transformer) as spy:
        run(pipe, "make it blue", steps=1, refine=0.0, clip_cfg_norm=False)
    text = spy.calls[0]["t5"]
    cond, negative = t5_of(pipe, "make it blue")
    assert torch.equal(text[0], negative) and torch.equal(text[1], negative) and torch.equal(text[2], cond)


def test_scheduler_kinds(e1_1_editor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = e1_1_editor.loaded.pipe
    seen: list[dict[str, Any]] = []
    unipc = pipe.scheduler
    original = type(unipc).set_timesteps
    monkeypatch.setattr(type(unipc), "set_timesteps", lambda self, *a, **k: seen.append(k) or original(self, *a, **k))
    run(pipe, "x", steps=2, refine=0.0)
    assert "mu" not in seen[-1]
    euler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    recorded: list[dict[str, Any]] = []
    euler_set = type(euler).set_timesteps
    monkeypatch.setattr(
        type(euler), "set_timesteps", lambda self, *a, **k: recorded.append(k) or euler_set(self, *a, **k)
    )
    pipe.scheduler = euler
    try:
        run(pipe, "x", steps=2, refine=0.0)
    finally:
        pipe.scheduler = unipc
    assert recorded[-1]["mu"] == pytest.approx(calculate_shift(8192))


def test_max_seq_is_the_e1_1_value(e1_1_editor: Any) -> None:
    assert e1_1_editor.loaded.pipe.transformer.max_seq == 8192


def test_bad_arguments(e1_1_editor: Any) -> None:
    with pytest.raises(ValueError, match="refine_strength"):
        run(e1_1_editor.loaded.pipe, "x", refine=1.5)
