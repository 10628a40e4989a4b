"""The edit loop's options against upstream: guidance off (g <= 1) and the refine prompt's edge cases.

A fake transformer replaces the forward pass: its output depends on the noisy latents, the image
latents, the text and the timestep, so a wrong branch, text or image input changes what reaches the
scheduler, and each test compares that with the formula.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

PROMPT = "Editing Instruction: make it blue. Target Image Description: a blue square"


def fake_forward(calls: list[dict[str, Any]]) -> Any:
    """A stand-in transformer forward: output mixes every input (flip(-1) brings the image columns in)."""

    def forward(
        hidden_states: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states_t5: torch.Tensor,
        encoder_hidden_states_llama3: torch.Tensor,
        pooled_embeds: torch.Tensor,
        return_dict: bool = False,
        **_: Any,
    ) -> tuple[torch.Tensor]:
        batch = hidden_states.shape[0]
        text = (
            encoder_hidden_states_t5.float().mean(dim=(1, 2))
            + encoder_hidden_states_llama3.float().mean(dim=(0, 2, 3))
            + pooled_embeds.float().mean(dim=1)
        )
        per_item = (text + timesteps.float() / 1000.0).view(batch, 1, 1, 1)
        out = 0.5 * hidden_states + 0.25 * hidden_states.flip(-1) + per_item.to(hidden_states.dtype)
        calls.append(
            {"hidden": hidden_states.clone(), "t5": encoder_hidden_states_t5.clone(), "out": out.clone()}
        )
        return (out,)

    return forward


@pytest.fixture()
def traced(e1_1_editor: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[dict[str, Any]], list[torch.Tensor]]:
    """The tiny E1.1 pipeline with the fake transformer; records forwards and what reaches scheduler.step."""
    pipe = e1_1_editor.loaded.pipe
    calls: list[dict[str, Any]] = []
    stepped: list[torch.Tensor] = []
    monkeypatch.setattr(pipe.transformer, "forward", fake_forward(calls))
    original_step = pipe.scheduler.step

    def step(model_output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        stepped.append(model_output.clone())
        return original_step(model_output, *args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", step)
    return pipe, calls, stepped


def image() -> Image.Image:
    return Image.new("RGB", (64, 48), (200, 40, 40))


@torch.no_grad()
def t5_of(pipe: Any, text: str) -> torch.Tensor:
    return pipe.encode_prompt(prompt=text, device=torch.device("cpu"), do_classifier_free_guidance=False)[0]


@pytest.mark.parametrize("guidance", [1.0, 0.5, 0.0])
def test_guidance_off_runs_one_branch_with_image_and_instruction(traced: Any, guidance: float) -> None:
    pipe, calls, stepped = traced
    steps = 4
    pipe(PROMPT, "blurry", image(), guidance, 1.5, steps, torch.Generator().manual_seed(0), 0.5)
    assert len(calls) == steps and [c["hidden"].shape[0] for c in calls] == [1] * steps
    z = pipe.encode_image(image(), torch.device("cpu"))
    width = z.shape[-1]
    prompt_t5, refine_t5 = t5_of(pipe, PROMPT), t5_of(pipe, "a blue square")
    for call, guided in zip(calls[:2], stepped[:2], strict=True):  # edit stage: [x, z], instruction, -out[..., :W]
        assert call["hidden"].shape[-1] == 2 * width
        torch.testing.assert_close(call["hidden"][..., width:], z, rtol=0, atol=0)
        assert torch.equal(call["t5"], prompt_t5)
        assert torch.equal(guided, -call["out"][..., :width])
    for call, guided in zip(calls[2:], stepped[2:], strict=True):  # refine stage: x alone, refine prompt, -out
        assert call["hidden"].shape[-1] == width
        assert torch.equal(call["t5"], refine_t5)
        assert torch.equal(guided, -call["out"])


def test_guidance_just_above_one_keeps_three_and_two_branches(traced: Any) -> None:
    pipe, calls, stepped = traced
    pipe(PROMPT, "blurry", image(), 1.01, 1.5, 2, torch.Generator().manual_seed(0), 0.5)
    assert [c["hidden"].shape[0] for c in calls] == [3, 2]
    zero_branch = calls[0]["hidden"][0, ..., calls[0]["hidden"].shape[-1] // 2 :]
    assert not zero_branch.any()


@pytest.mark.parametrize(
    ("prompt", "refine_text"),
    [
        ("Editing Instruction: make it blue. Target Image Description:", ""),
        ("Editing Instruction: a. Target Image Description: a cat Target Image Description: a dog", "a cat"),
    ],
)
def test_refine_prompt_edge_cases_are_encoded_as_upstream(traced: Any, prompt: str, refine_text: str) -> None:
    pipe, calls, _ = traced
    pipe(prompt, "blurry", image(), 3.0, 1.5, 2, torch.Generator().manual_seed(0), 0.5)
    refine_cond = calls[1]["t5"][1]
    assert torch.equal(refine_cond, t5_of(pipe, refine_text)[0])
    assert not torch.equal(refine_cond, calls[0]["t5"][2])  # not the main prompt's embeddings
