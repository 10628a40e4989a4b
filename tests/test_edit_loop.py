"""The editing loop's numbers: a fake transformer with a known output, inside the real pipeline.

The fake's output is a fixed function of every input it gets (latents with the appended image
latents, timesteps, T5, Llama and pooled text) and of which weights are active, and it records each
call. So every step's inputs, and the guided prediction that reaches the scheduler, can be recomputed
here from docs/ARCHITECTURE.md section 3 and compared with what the pipeline really did. The tiny
checkpoints provide the real text encoders, VAE and scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from PIL import Image

from hidream_edit.errors import NonFiniteError
from hidream_edit.pipeline import HiDreamImageEditingPipeline

GUIDANCE = 3.0
IMAGE_GUIDANCE = 1.5
SEED = 0
PROMPT = "Editing Instruction: make it blue. Target Image Description: a blue square"
DESCRIPTION = "a blue square"
NEGATIVE = "blurry"


def fake_output(
    hidden: torch.Tensor, timesteps: torch.Tensor, t5: torch.Tensor, llama: torch.Tensor, pooled: torch.Tensor,
    refining: bool,
) -> torch.Tensor:
    """Every output column mixes in its mirror column (so the kept columns see the image latents);
    each text input and the timestep add a per-sample offset that varies by channel; refine weights
    change the whole output."""
    batch, channels = hidden.shape[:2]
    text = t5.mean(dim=(1, 2)) + 2.0 * llama.mean(dim=(0, 2, 3)) + 3.0 * pooled.mean(dim=1)
    channel_weight = torch.linspace(-1.0, 1.5, channels).view(1, channels, 1, 1)
    out = hidden + 0.5 * hidden.flip(-1) + 0.3 * text.view(batch, 1, 1, 1) * channel_weight
    out = out + (timesteps.view(batch, 1, 1, 1) / 1000.0)
    return 2.0 * out - 0.25 if refining else out


@dataclass
class Forward:
    """One transformer call as the fake saw it, with the weights active during the call."""

    hidden: torch.Tensor
    timesteps: torch.Tensor
    t5: torch.Tensor
    llama: torch.Tensor
    pooled: torch.Tensor
    refining: bool


class FakeTransformer(torch.nn.Module):
    """Stands in for HiDreamImageTransformer2DModel: same call, known output, records every call."""

    def __init__(self, in_channels: int, poison: bool = False) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives diffusers a device to find
        self.config = SimpleNamespace(in_channels=in_channels)
        self.max_seq = 8192
        self.refining = False
        self.poison = poison
        self.forwards: list[Forward] = []
        self.double_stream_blocks = torch.nn.ModuleList()  # no blocks: the step cache has nothing to count
        self.single_stream_blocks = torch.nn.ModuleList()

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(
        self, hidden_states: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states_t5: torch.Tensor,
        encoder_hidden_states_llama3: torch.Tensor, pooled_embeds: torch.Tensor, return_dict: bool = True,
    ) -> tuple[torch.Tensor]:
        inputs = (hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3, pooled_embeds)
        self.forwards.append(Forward(*(t.clone() for t in inputs), refining=self.refining))
        out = fake_output(*inputs, refining=self.refining)
        if self.poison:
            out = out + float("nan")
        return (out,)


class FakeRefineWeights:
    """A refine-weights switch that flips the fake transformer's weights and logs each switch."""

    name = "fake"

    def __init__(self, transformer: FakeTransformer) -> None:
        self.transformer = transformer
        self.calls: list[str] = []

    def use_refine(self) -> None:
        self.calls.append("refine")
        self.transformer.refining = True

    def use_edit(self) -> None:
        self.calls.append("edit")
        self.transformer.refining = False


@dataclass
class Step:
    model_output: torch.Tensor
    timestep: torch.Tensor
    sample: torch.Tensor
    result: torch.Tensor


@dataclass
class Rig:
    pipe: HiDreamImageEditingPipeline
    transformer: FakeTransformer
    switch: FakeRefineWeights
    steps: list[Step]


def make_rig(editor: Any, poison: bool = False) -> Rig:
    real = editor.loaded.pipe
    transformer = FakeTransformer(real.transformer.config.in_channels, poison=poison)
    components = {**real.components, "transformer": transformer}
    components["scheduler"] = UniPCMultistepScheduler.from_config(real.scheduler.config)
    pipe = HiDreamImageEditingPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    steps: list[Step] = []
    real_step = pipe.scheduler.step

    def step(model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, **kwargs: Any) -> Any:
        result = real_step(model_output, timestep, sample, **kwargs)
        steps.append(Step(model_output.clone(), timestep.clone(), sample.clone(), result[0].clone()))
        return result

    pipe.scheduler.step = step
    return Rig(pipe, transformer, FakeRefineWeights(transformer), steps)


@pytest.fixture()
def rig(e1_1_editor: Any) -> Rig:
    return make_rig(e1_1_editor)


def source_image() -> Image.Image:
    """64x48 with a horizontal and vertical gradient: flipping columns changes every value."""
    x = np.linspace(0, 255, 64)[None, :, None]
    y = np.linspace(0, 255, 48)[:, None, None]
    pixels = np.concatenate([np.broadcast_to(x, (48, 64, 1)), np.broadcast_to(y, (48, 64, 1)),
                             np.broadcast_to((x + y) / 2, (48, 64, 1))], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def run(rig: Rig, prompt: str = PROMPT, steps: int = 4, refine: float = 0.5, **kwargs: Any) -> Any:
    return rig.pipe(
        prompt, NEGATIVE, source_image(), GUIDANCE, IMAGE_GUIDANCE, steps, torch.Generator().manual_seed(SEED),
        refine, refine_switch=rig.switch, **kwargs,
    )


@torch.no_grad()  # as in the pipeline: T5 takes another kernel path with autograd on
def encoded(pipe: HiDreamImageEditingPipeline, prompt: str) -> tuple[tuple[torch.Tensor, ...], ...]:
    """(cond, negative) as (t5, llama, pooled), straight from diffusers' encode_prompt."""
    t5, neg_t5, llama, neg_llama, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompt, negative_prompt=NEGATIVE, device=torch.device("cpu"), do_classifier_free_guidance=True,
        max_sequence_length=128,
    )
    return (t5, llama, pooled), (neg_t5, neg_llama, neg_pooled)


def text_batch(*parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Batch prompts: T5 and pooled on dim 0, the stacked Llama states [layers, B, L, D] on dim 1."""
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1), torch.cat([p[2] for p in parts]))


@torch.no_grad()
def expected_image_latents(pipe: HiDreamImageEditingPipeline) -> torch.Tensor:
    """VAE mode of the source, shifted and scaled (docs/ARCHITECTURE.md section 3.1, item 3)."""
    config = pipe.vae.config
    assert config.shift_factor != 0 and config.scaling_factor != 1  # the check below has teeth
    pixels = pipe.image_processor.preprocess(source_image())
    assert pixels.min() < -0.9 and pixels.max() > 0.9  # in [-1, 1]
    mode = pipe.vae.encode(pixels).latent_dist.mode()
    return (mode - config.shift_factor) * config.scaling_factor


def clip_norm_ratio(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    p = b + GUIDANCE * (c - b)
    return c.norm(dim=1, keepdim=True) / (p.norm(dim=1, keepdim=True) + 1e-8)


def edit_predictions(latents: torch.Tensor, t: torch.Tensor, z: torch.Tensor, text: tuple[torch.Tensor, ...]) -> tuple:
    """(transformer input, (a, b, c)) of one edit step: image branches [0, z, z], first W columns, negated."""
    width = latents.shape[-1]
    hidden = torch.cat([torch.cat([latents] * 3), torch.cat([torch.zeros_like(z), z, z])], dim=-1)
    prediction = -fake_output(hidden, t.expand(3), *text, refining=False)[..., :width]
    return hidden, prediction.chunk(3)


def expected_edit_step(latents: torch.Tensor, t: torch.Tensor, z: torch.Tensor, text: tuple[torch.Tensor, ...],
                       clip_cfg_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(transformer input, guided prediction) of one edit step, restated from docs/ARCHITECTURE.md section 3.2."""
    hidden, (a, b, c) = edit_predictions(latents, t, z, text)
    if not clip_cfg_norm:
        return hidden, a + IMAGE_GUIDANCE * (b - a) + GUIDANCE * (c - b)
    p = (b + GUIDANCE * (c - b)) * clip_norm_ratio(b, c).clamp(max=1.0)
    return hidden, a + IMAGE_GUIDANCE * (p - a)


def expected_refine_step(latents: torch.Tensor, t: torch.Tensor, text: tuple[torch.Tensor, ...]) -> tuple:
    hidden = torch.cat([latents] * 2)
    prediction = -fake_output(hidden, t.expand(2), *text, refining=True)
    uncond, cond = prediction.chunk(2)
    return hidden, uncond + GUIDANCE * (cond - uncond)


def check_loop(rig: Rig, steps: int, refine_start: int, edit_text: tuple, refine_text: tuple, clip: bool) -> None:
    """Every forward's inputs and weights, and every guided prediction, against the restatement."""
    z = expected_image_latents(rig.pipe)
    forwards = rig.transformer.forwards
    assert len(forwards) == len(rig.steps) == steps
    shape = (1, rig.transformer.config.in_channels, *z.shape[-2:])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(rig.steps[0].sample, noise)
    for i, (forward, step) in enumerate(zip(forwards, rig.steps, strict=True)):
        if i > 0:
            assert torch.equal(step.sample, rig.steps[i - 1].result)  # the scheduler's output is the next input
        assert torch.equal(step.timestep, rig.pipe.scheduler.timesteps[i])
        if i < refine_start:
            hidden, guided = expected_edit_step(step.sample, step.timestep, z, edit_text, clip)
            text = edit_text
        else:
            hidden, guided = expected_refine_step(step.sample, step.timestep, refine_text)
            text = refine_text
        assert forward.refining is (i >= refine_start), f"step {i}: wrong weights active during the forward"
        torch.testing.assert_close(forward.hidden, hidden, rtol=0, atol=0)
        assert torch.equal(forward.timesteps, step.timestep.expand(hidden.shape[0]))
        for name, got, want in zip(("t5", "llama", "pooled"), (forward.t5, forward.llama, forward.pooled), text,
                                   strict=True):
            assert torch.equal(got, want), f"step {i}: {name} text batch differs"
        torch.testing.assert_close(step.model_output, guided, rtol=1e-6, atol=1e-6, msg=f"step {i} guided")


# ---------------------------------------------------------------- the tests


def test_encode_image_is_the_shifted_and_scaled_vae_mode(rig: Rig) -> None:
    latents = rig.pipe.encode_image(source_image(), torch.device("cpu"))
    torch.testing.assert_close(latents, expected_image_latents(rig.pipe), rtol=0, atol=0)
    assert latents.shape == (1, rig.transformer.config.in_channels, 6, 8)


def test_clip_norm_guidance_loop_exactly(rig: Rig) -> None:
    output = run(rig, output_type="latent")
    cond, negative = encoded(rig.pipe, PROMPT)
    refine_cond, refine_negative = encoded(rig.pipe, DESCRIPTION)
    assert not torch.equal(cond[0], refine_cond[0]) and not torch.equal(cond[0], negative[0])
    check_loop(rig, 4, 2, text_batch(cond, negative, cond), text_batch(refine_negative, refine_cond), clip=True)
    # the chosen inputs make the cap matter: some pixels would be scaled up without it, others are scaled down
    first = rig.steps[0]
    _, (_, b, c) = edit_predictions(first.sample, first.timestep, expected_image_latents(rig.pipe),
                                    text_batch(cond, negative, cond))
    ratio = clip_norm_ratio(b, c)
    assert (ratio > 1.05).any() and (ratio < 0.95).any()
    assert torch.equal(output.images, rig.steps[-1].result) and output.refine_start_step == 2
    assert not output.non_finite and rig.switch.calls == ["edit", "refine", "edit"]  # edit weights made sure first


def test_plain_two_scale_guidance_loop_exactly(rig: Rig) -> None:
    """clip_cfg_norm off: text batch [negative, negative, cond]; without the target marker the refine
    stage reuses the main prompt's embeddings."""
    run(rig, prompt="make it blue", steps=3, refine=1 / 3, clip_cfg_norm=False, output_type="latent")
    cond, negative = encoded(rig.pipe, "make it blue")
    check_loop(rig, 3, 2, text_batch(negative, negative, cond), text_batch(negative, cond), clip=False)


@pytest.mark.parametrize(
    "steps,refine,active,calls",
    [
        (4, 0.5, [False, False, True, True], ["edit", "refine", "edit"]),
        (4, 0.3, [False, False, True, True], ["edit", "refine", "edit"]),  # int(4 * 0.7) = 2
        (3, 0.0, [False, False, False], ["edit"]),
        (2, 1.0, [True, True], ["edit", "refine", "edit"]),
    ],
)
def test_refine_weights_are_active_exactly_during_refine_forwards(
    rig: Rig, steps: int, refine: float, active: list[bool], calls: list[str]
) -> None:
    output = run(rig, steps=steps, refine=refine, output_type="latent")
    assert [f.refining for f in rig.transformer.forwards] == active
    assert [f.hidden.shape[0] for f in rig.transformer.forwards] == [2 if a else 3 for a in active]
    assert rig.switch.calls == calls and rig.transformer.refining is False
    assert output.refine_start_step == active.count(False)


def test_edit_weights_are_restored_when_a_refine_step_fails(rig: Rig) -> None:
    def stop(pipe: Any, index: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if index == 2:
            raise KeyboardInterrupt
        return tensors

    with pytest.raises(KeyboardInterrupt):
        run(rig, steps=4, refine=0.5, callback_on_step_end=stop)
    assert [f.refining for f in rig.transformer.forwards] == [False, False, True]
    assert rig.switch.calls == ["edit", "refine", "edit"] and rig.transformer.refining is False


def test_decode_unscales_and_unshifts_the_final_latents(rig: Rig) -> None:
    decoded: list[torch.Tensor] = []
    real_decode = rig.pipe.vae.decode

    def decode(latents: torch.Tensor, **kwargs: Any) -> Any:
        decoded.append(latents.clone())
        return real_decode(latents, **kwargs)

    rig.pipe.vae.decode = decode
    try:
        output = run(rig, steps=2, refine=0.5)
    finally:
        del rig.pipe.vae.decode
    config = rig.pipe.vae.config
    torch.testing.assert_close(decoded[0], rig.steps[-1].result / config.scaling_factor + config.shift_factor,
                               rtol=0, atol=0)
    assert output.images[0].size == (64, 48) and not output.non_finite
    assert set(output.timings) == {"encode_s", "step_s", "decode_s"} and len(output.timings["step_s"]) == 2


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("output_type", ["latent", "pil"])
def test_non_finite_output_is_reported(e1_1_editor: Any, output_type: str) -> None:
    rig = make_rig(e1_1_editor, poison=True)
    with pytest.raises(NonFiniteError, match="denoising step 1 of 1 produced NaN/inf"):
        run(rig, steps=1, refine=0.0, output_type=output_type)


def test_noise_and_latents_follow_the_text_embeddings_dtype(rig: Rig) -> None:
    """On an NPU the encoders run in bf16; the noise, and so every transformer input, must too."""
    real_encode = rig.pipe._encode

    def encode_bf16(*args: Any, **kwargs: Any) -> Any:
        embeddings = real_encode(*args, **kwargs)
        return tuple(type(e)(e.t5.bfloat16(), e.llama.bfloat16(), e.pooled.bfloat16()) for e in embeddings)

    rig.pipe._encode = encode_bf16
    run(rig, steps=2, refine=0.5, output_type="latent")
    assert [f.hidden.dtype for f in rig.transformer.forwards] == [torch.bfloat16] * 2
    assert rig.steps[0].sample.dtype == torch.bfloat16


def test_too_few_steps_or_bad_refine_strength_are_refused(rig: Rig) -> None:
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1, got 0"):
        run(rig, steps=0)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"refine_strength must be in \\[0, 1\\], got {strength}"):
            run(rig, refine=strength)
    assert rig.transformer.forwards == []
    run(rig, steps=1, refine=1.0, output_type="latent")
    assert len(rig.transformer.forwards) == 1


def test_guidance_combines_each_image_of_a_batch_on_its_own() -> None:
    """Two images per prompt: chunks of batch 2; each image's result equals guiding it alone."""
    from hidream_edit.pipeline import combine_edit_guidance, combine_refine_guidance

    generator = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(2, 4, 3, 5, generator=generator) for _ in range(3))
    for clip in (True, False):
        together = combine_edit_guidance(torch.cat([a, b, c]), GUIDANCE, IMAGE_GUIDANCE, clip)
        alone = [combine_edit_guidance(torch.cat([a[i : i + 1], b[i : i + 1], c[i : i + 1]]), GUIDANCE, IMAGE_GUIDANCE,
                                       clip) for i in range(2)]
        torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=0)
    refined = combine_refine_guidance(torch.cat([a, c]), GUIDANCE)
    torch.testing.assert_close(refined, a + GUIDANCE * (c - a))


def test_flow_match_scheduler_gets_mu_from_the_transformers_max_seq(e1_1_editor: Any) -> None:
    """FlowMatchEuler: mu from the linear shift of max_seq (4608, E1-Full's); UniPC: plain steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.hidream_image.pipeline_hidream_image import calculate_shift

    rig = make_rig(e1_1_editor)
    rig.transformer.max_seq = 4608
    asked: list[dict[str, Any]] = []
    euler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    real_set = euler.set_timesteps
    euler.set_timesteps = lambda *args, **kwargs: asked.append(kwargs) or real_set(*args, **kwargs)
    rig.pipe.scheduler = euler
    run(rig, steps=3, refine=0.0, output_type="latent")
    assert asked[-1]["mu"] == pytest.approx(0.5 + (4608 - 256) * (1.15 - 0.5) / (4096 - 256))
    assert asked[-1]["mu"] == pytest.approx(calculate_shift(4608))
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    reference.set_timesteps(3, mu=calculate_shift(4608))
    seen = [forward.timesteps[0].item() for forward in rig.transformer.forwards]
    assert seen == pytest.approx(reference.timesteps.tolist())


def test_pipeline_defaults_are_e1_full_upstream_values(e1_1_editor: Any) -> None:
    """Called without settings: guidance 5.0, image guidance 4.0, 28 steps, no refine stage, clip-norm on."""
    defaults, explicit = make_rig(e1_1_editor), make_rig(e1_1_editor)
    image, generator = source_image(), torch.Generator().manual_seed(SEED)
    defaults.pipe(PROMPT, NEGATIVE, image, generator=generator, output_type="latent", refine_switch=defaults.switch)
    explicit.pipe(PROMPT, NEGATIVE, image, 5.0, 4.0, 28, torch.Generator().manual_seed(SEED), 0.0, True, "latent",
                  refine_switch=explicit.switch)
    assert len(defaults.steps) == 28 and defaults.switch.calls == ["edit"]
    for mine, theirs in zip(defaults.steps, explicit.steps, strict=True):
        assert torch.equal(mine.model_output, theirs.model_output)


def test_encode_image_feeds_the_vae_its_own_dtype(e1_1_editor: Any) -> None:
    """A bf16 VAE (NPU) must get bf16 pixels: the processor's fp32 output would not run through it."""
    import copy

    rig = make_rig(e1_1_editor)
    rig.pipe.vae = copy.deepcopy(rig.pipe.vae).to(torch.bfloat16)
    latents = rig.pipe.encode_image(source_image(), torch.device("cpu"))
    assert latents.dtype == torch.bfloat16 and latents.shape == (1, rig.transformer.config.in_channels, 6, 8)
