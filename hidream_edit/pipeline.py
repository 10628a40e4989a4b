"""HiDreamImageEditingPipeline: diffusers' HiDreamImagePipeline plus the HiDream-E1 editing loop.

Prompt encoding, the VAE and the scheduler are diffusers'; this module adds the image-conditioned
edit stage, the optional text-only refine stage and their guidance rules (docs/ARCHITECTURE.md section 3).
The small pure functions below are the algorithm's pieces, kept separate so they can be tested alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers import HiDreamImagePipeline
from diffusers.pipelines.hidream_image.pipeline_hidream_image import calculate_shift, retrieve_timesteps
from diffusers.schedulers import UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from device_utils import dtype_name, synchronize_device
from hidream_edit.errors import NonFiniteError
from hidream_edit.guidance_parallel import GuidanceGroup
from hidream_edit.spec import refine_prompt_from
from hidream_edit.step_cache import CacheSettings, StepCache, uncached_record

logger = logging.getLogger(__name__)

NORM_EPS = 1e-8


class RefineSwitch(Protocol):
    """Switches the transformer between the weights of the edit stage and those of the refine stage."""

    name: str

    def use_refine(self) -> None: ...

    def use_edit(self) -> None: ...


@dataclass(frozen=True)
class PromptEmbeddings:
    """One prompt's embeddings: T5 [B, L, D], Llama hidden states [layers, B, L, D], pooled CLIP [B, D]."""

    t5: torch.Tensor
    llama: torch.Tensor
    pooled: torch.Tensor

    @staticmethod
    def batch(parts: list[PromptEmbeddings]) -> PromptEmbeddings:
        """Concatenate along the batch axis (dim 1 for the stacked Llama states)."""
        return PromptEmbeddings(
            torch.cat([p.t5 for p in parts], dim=0),
            torch.cat([p.llama for p in parts], dim=1),
            torch.cat([p.pooled for p in parts], dim=0),
        )

    def select(self, start: int, stop: int) -> PromptEmbeddings:
        """Branches start..stop-1 of a batch (one rank's share under guidance parallel)."""
        return PromptEmbeddings(self.t5[start:stop], self.llama[:, start:stop], self.pooled[start:stop])


@dataclass
class EditOutput:
    """Images plus what the run measured: seconds per stage and whether the decode produced NaN/inf."""

    images: list[Image.Image] | torch.Tensor
    timings: dict[str, Any] = field(default_factory=dict)
    non_finite: bool = False
    refine_start_step: int = 0
    cache: dict[str, Any] = field(default_factory=dict)  # the step cache's record (step_cache.cache_record)


def refine_start_step(num_inference_steps: int, refine_strength: float) -> int:
    """Index of the first refine step; equal to num_inference_steps when there is no refine stage."""
    return int(num_inference_steps * (1.0 - refine_strength))


def edit_text_batch(cond: PromptEmbeddings, negative: PromptEmbeddings, clip_cfg_norm: bool) -> PromptEmbeddings:
    """Text for the three edit-stage branches: [cond, neg, cond] with clip_cfg_norm, else [neg, neg, cond]."""
    first = cond if clip_cfg_norm else negative
    return PromptEmbeddings.batch([first, negative, cond])


def concat_image_latents(latents: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
    """One copy of the noisy latents per image-latent branch (3 guided, 1 without guidance), each with
    its image latents appended along the width axis."""
    copies = torch.cat([latents] * image_latents.shape[0], dim=0)
    return torch.cat([copies, image_latents.to(latents.dtype)], dim=-1)


def crop_and_negate(model_output: torch.Tensor, width: int) -> torch.Tensor:
    """Keep the first `width` latent columns (the edited image) and negate, as HiDream predicts -velocity."""
    return -model_output[..., :width]


def combine_edit_guidance(
    prediction: torch.Tensor, guidance_scale: float, image_guidance_scale: float, clip_cfg_norm: bool
) -> torch.Tensor:
    """Mix the three edit-stage predictions (a, b, c) into one."""
    a, b, c = prediction.chunk(3)
    if clip_cfg_norm:
        text_guided = b + guidance_scale * (c - b)
        ratio = torch.norm(c, dim=1, keepdim=True) / (torch.norm(text_guided, dim=1, keepdim=True) + NORM_EPS)
        text_guided = text_guided * ratio.clamp(min=0.0, max=1.0)
        return a + image_guidance_scale * (text_guided - a)
    return a + image_guidance_scale * (b - a) + guidance_scale * (c - b)


def combine_refine_guidance(prediction: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance for the refine stage: u + g * (c - u)."""
    uncond, cond = prediction.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


# (prompt, negative, max sequence length, guided) -> (prompt embeddings, negative embeddings or None)
PromptKey = tuple[str, str, int, bool]
EncodedPrompts = tuple[PromptEmbeddings, PromptEmbeddings | None]


class PromptCache(Protocol):
    """Keeps recent (prompt, negative) embeddings so a repeated prompt skips the four text encoders."""

    def lookup(self, key: PromptKey) -> EncodedPrompts | None: ...

    def store(self, key: PromptKey, value: EncodedPrompts) -> None: ...


class EncoderSharing(Protocol):
    """Under --tensor-parallel each text encoder is loaded by one rank of the group (tensor_split.SharedEncoders):
    that rank runs `encode`, the others receive its result."""

    def share(self, name: str, encode: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor: ...


class HiDreamImageEditingPipeline(HiDreamImagePipeline):
    """Instruction-based image editing with HiDream-E1.1 / E1-Full transformers."""

    # Set by the Editor; None encodes every prompt every time.
    prompt_cache: PromptCache | None = None
    edit_device: torch.device | None = None  # set by a memory placement (placement.py) that spreads components
    guidance_group: GuidanceGroup | None = None  # set by the Editor under --cfg-parallel: ranks share the branches
    step_cache: StepCache | None = None  # hooked into the transformer by the first edit that caches
    shared_encoders: EncoderSharing | None = None  # set by the loader under --tensor-parallel

    @property
    def _execution_device(self) -> torch.device:
        """The edit card when a placement names it: with text encoders on another card, diffusers' own guess
        (the first non-CPU component by name) would be the encoders' card."""
        return self.edit_device if self.edit_device is not None else super()._execution_device

    def _shared(self, name: str, encode: Callable[[], torch.Tensor], device: torch.device | None) -> torch.Tensor:
        if self.shared_encoders is None:
            return encode()
        return self.shared_encoders.share(name, encode, device or self._execution_device)

    def _get_clip_prompt_embeds(  # type: ignore[override]
        self, tokenizer: Any, text_encoder: Any, prompt: str | list[str], max_sequence_length: int = 128,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        encode = super()._get_clip_prompt_embeds
        name = "clip_l" if tokenizer is self.tokenizer else "clip_g"  # a rank without the encoder holds None
        return self._shared(
            name, lambda: encode(tokenizer, text_encoder, prompt, max_sequence_length, device, dtype), device)

    def _get_t5_prompt_embeds(  # type: ignore[override]
        self, prompt: str | list[str] | None = None, max_sequence_length: int = 128,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        encode = super()._get_t5_prompt_embeds
        return self._shared("t5", lambda: encode(prompt, max_sequence_length, device, dtype), device)

    def _get_llama3_prompt_embeds(  # type: ignore[override]
        self, prompt: str | list[str] | None = None, max_sequence_length: int = 128,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        encode = super()._get_llama3_prompt_embeds
        return self._shared("llama", lambda: encode(prompt, max_sequence_length, device, dtype), device)

    def _encode(
        self, prompt: str, negative_prompt: str, device: torch.device, max_sequence_length: int, guided: bool
    ) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
        """(prompt, negative) embeddings; without guidance the negative is neither encoded nor returned."""
        key = (prompt, negative_prompt, max_sequence_length, guided)
        cached = self.prompt_cache.lookup(key) if self.prompt_cache is not None else None
        if cached is not None:
            return cached
        t5, neg_t5, llama, neg_llama, pooled, neg_pooled = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            device=device,
            do_classifier_free_guidance=guided,
            max_sequence_length=max_sequence_length,
        )
        negative = PromptEmbeddings(neg_t5, neg_llama, neg_pooled) if guided else None
        encoded = PromptEmbeddings(t5, llama, pooled), negative
        if self.prompt_cache is not None:
            self.prompt_cache.store(key, encoded)
        return encoded

    def encode_image(self, image: Image.Image, device: torch.device) -> torch.Tensor:
        """Source image -> VAE latents (distribution mode, shifted and scaled)."""
        pixels = self.image_processor.preprocess(image).to(device=device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def _timesteps(self, num_inference_steps: int, device: torch.device) -> torch.Tensor:
        if isinstance(self.scheduler, UniPCMultistepScheduler):
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            return self.scheduler.timesteps
        mu = calculate_shift(self.transformer.max_seq)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, mu=mu)
        return timesteps

    def _predict(self, latents: torch.Tensor, t: torch.Tensor, text: PromptEmbeddings) -> torch.Tensor:
        return self.transformer(
            hidden_states=latents,
            timesteps=t.expand(latents.shape[0]),
            encoder_hidden_states_t5=text.t5,
            encoder_hidden_states_llama3=text.llama,
            pooled_embeds=text.pooled,
            return_dict=False,
        )[0]

    def _branch_predictions(
        self, model_input: torch.Tensor, t: torch.Tensor, text: PromptEmbeddings, width: int, where: str
    ) -> torch.Tensor:
        """The negated, cropped prediction of every branch; shared among a guidance group's ranks if set."""

        def compute(start: int, stop: int) -> torch.Tensor:
            return crop_and_negate(self._predict(model_input[start:stop], t, text.select(start, stop)), width)

        branches = model_input.shape[0]
        if self.guidance_group is None:
            return compute(0, branches)
        shape = (*model_input.shape[1:-1], width)
        cache = self.step_cache if self.step_cache is not None and self.step_cache.active else None
        return self.guidance_group.predictions(branches, compute, shape, self.transformer.dtype, where,
                                               settle=cache.settle if cache is not None else None)

    def _start_step_cache(self, settings: CacheSettings) -> StepCache:
        if self.step_cache is None:
            self.step_cache = StepCache.install(self.transformer)
        group = self.guidance_group
        self.step_cache.begin_edit(settings, group.sum_across if group is not None else None)
        return self.step_cache

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str,
        negative_prompt: str,
        image: Image.Image,
        guidance_scale: float = 5.0,
        image_guidance_scale: float = 4.0,
        num_inference_steps: int = 28,
        generator: torch.Generator | None = None,
        refine_strength: float = 0.0,
        clip_cfg_norm: bool = True,
        output_type: str = "pil",
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict] | None = None,
        refine_switch: RefineSwitch | None = None,
        max_sequence_length: int = 128,
        cache: CacheSettings | None = None,
    ) -> EditOutput:
        """Edit `image` (sides multiples of 16) following `prompt`; see docs/ARCHITECTURE.md section 3.

        With guidance_scale <= 1 guidance is off, as upstream: one branch per step, conditioned on the
        instruction and the image latents (edit stage) or on the refine prompt (refine stage).
        `cache` skips blocks in steps that change little (docs/ARCHITECTURE.md section 3.8); None or mode off
        runs them all.
        """
        if not 0.0 <= refine_strength <= 1.0:
            raise ValueError(f"refine_strength must be in [0, 1], got {refine_strength}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        device = self._execution_device
        timings: dict[str, Any] = {}
        started = time.perf_counter()

        guided = guidance_scale > 1.0
        length = max_sequence_length
        cond, negative = self._encode(prompt, negative_prompt, device, length, guided)
        refine_text = refine_prompt_from(prompt)
        if refine_text is not None:
            refine_cond, refine_negative = self._encode(refine_text, negative_prompt, device, length, guided)
        else:
            refine_cond, refine_negative = cond, negative
        image_latents = self.encode_image(image, device)
        if guided and negative is not None and refine_negative is not None:
            edit_text = edit_text_batch(cond, negative, clip_cfg_norm)
            refine_batch = PromptEmbeddings.batch([refine_negative, refine_cond])
            image_latents = torch.cat([torch.zeros_like(image_latents), image_latents, image_latents], dim=0)
        else:
            edit_text, refine_batch = cond, refine_cond
        latents = randn_tensor(
            (1, self.transformer.config.in_channels, *image_latents.shape[-2:]),
            generator=generator,
            device=device,
            dtype=cond.pooled.dtype,
        )
        timesteps = self._timesteps(num_inference_steps, device)
        synchronize_device(latents.device)  # on an accelerator the encoders' work may still be queued
        timings["encode_s"] = time.perf_counter() - started

        refine_start = refine_start_step(len(timesteps), refine_strength)
        width = latents.shape[-1]
        step_seconds: list[float] = []
        if refine_switch is not None:
            refine_switch.use_edit()  # an earlier edit that failed while switching back may have left refine weights
        cache = cache or CacheSettings()
        stages = {"edit": min(refine_start, len(timesteps)), "refine": max(0, len(timesteps) - refine_start)}
        blocks = len(self.transformer.double_stream_blocks) + len(self.transformer.single_stream_blocks)
        cache_record = uncached_record(cache, stages, blocks)
        step_cache = self._start_step_cache(cache) if cache.enabled else None
        try:
            with self.progress_bar(total=len(timesteps)) as progress:
                for i, t in enumerate(timesteps):
                    step_started = time.perf_counter()
                    if i == refine_start and refine_switch is not None:
                        refine_switch.use_refine()
                    where = f"denoising step {i + 1} of {len(timesteps)}"
                    if step_cache is not None:
                        step_cache.begin_step("edit" if i < refine_start else "refine", i, where)
                    if i < refine_start:
                        model_input = concat_image_latents(latents, image_latents)
                        prediction = self._branch_predictions(model_input, t, edit_text, width, where)
                        if guided:
                            prediction = combine_edit_guidance(
                                prediction, guidance_scale, image_guidance_scale, clip_cfg_norm
                            )
                    else:
                        model_input = torch.cat([latents] * (2 if guided else 1))
                        prediction = self._branch_predictions(model_input, t, refine_batch, width, where)
                        if guided:
                            prediction = combine_refine_guidance(prediction, guidance_scale)
                    latents = self.scheduler.step(prediction.to(latents.dtype), t, latents, return_dict=False)[0]
                    if not bool(torch.isfinite(latents).all()):
                        raise NonFiniteError(where, dtype_name(latents.dtype))
                    step_seconds.append(time.perf_counter() - step_started)
                    if callback_on_step_end is not None:
                        returned = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                        latents = returned.get("latents", latents)
                    progress.update()
            if step_cache is not None:
                cache_record = step_cache.record()
        finally:
            if step_cache is not None:
                step_cache.end_edit()  # the next edit starts clean, also after a Stop or an error
            if refine_switch is not None and refine_start < len(timesteps):
                refine_switch.use_edit()
        timings["step_s"] = step_seconds

        decode_started = time.perf_counter()
        if output_type == "latent":
            images: list[Image.Image] | torch.Tensor = latents
            non_finite = not bool(torch.isfinite(latents).all())
        else:
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            decoded = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            non_finite = not bool(torch.isfinite(decoded).all())
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        timings["decode_s"] = time.perf_counter() - decode_started
        self.maybe_free_model_hooks()
        return EditOutput(images, timings, non_finite, refine_start, cache_record)
