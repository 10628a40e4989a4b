"""Editor: load a HiDream-E1 model once, edit many images, save results atomically.

Every front end (the two CLIs, the web UI, the environment doctor's smoke test) goes through this
class, so defaults, validation, metadata and saving exist once.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from device_utils import DeviceManager
from hidream_edit.errors import UserError
from hidream_edit.images import ImageSource, open_image, resize_for_e1_1, resize_for_e1_full, resize_to
from hidream_edit.models import LoadedPipeline, ModelSources, load_pipeline
from hidream_edit.spec import ModelSpec, is_e1_full_form

logger = logging.getLogger(__name__)

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}  # fmt: skip
MAX_STEPS = 1000


class EditCancelled(Exception):
    """Raised between denoising steps when the caller asked to stop."""


@dataclass(frozen=True)
class EditorSettings:
    """How to load: which model from where, on which device, in which memory and attention mode."""

    sources: ModelSources
    device: str | None = None
    dtype: str | None = None
    attention: str | None = None
    offload: str = "auto"
    max_memory: int | None = None
    host_memory: int | None = None
    encoder_device: str | None = None
    rng: str = "device"
    refine_weights: str = "edit"
    fuse_lora: bool = False
    vae_tiling: bool = False

    @property
    def model(self) -> str:
        return self.sources.model

    @property
    def spec(self) -> ModelSpec:
        return self.sources.spec


@dataclass(frozen=True)
class EditRequest:
    """One edit. None means "the model's default"."""

    image: ImageSource
    instruction: str
    negative: str | None = None
    steps: int | None = None
    guidance: float | None = None
    image_guidance: float | None = None
    refine_strength: float | None = None
    clip_cfg_norm: bool | None = None
    seed: int | None = None
    keep_aspect: bool = False


@dataclass
class EditResult:
    """The edited image (source size) and everything needed to reproduce and judge it."""

    image: Image.Image
    metadata: dict[str, Any] = field(default_factory=dict)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UserError(f"{name} must be between {low:g} and {high:g}, got {value:g}")


def resolve_request(request: EditRequest, spec: ModelSpec, lora_fused: bool = False) -> EditRequest:
    """Fill a request's defaults for the model and validate it; a bad value is a UserError naming it."""
    d = spec.defaults
    resolved = replace(
        request,
        instruction=request.instruction.strip(),
        negative=d.negative if request.negative is None else request.negative,
        steps=d.steps if request.steps is None else request.steps,
        guidance=d.guidance if request.guidance is None else request.guidance,
        image_guidance=d.image_guidance if request.image_guidance is None else request.image_guidance,
        refine_strength=d.refine_strength if request.refine_strength is None else request.refine_strength,
        clip_cfg_norm=d.clip_cfg_norm if request.clip_cfg_norm is None else request.clip_cfg_norm,
        seed=d.seed if request.seed is None else request.seed,
    )
    if not resolved.instruction:
        raise UserError("the instruction is empty")
    if not 1 <= resolved.steps <= MAX_STEPS:
        raise UserError(f"steps must be between 1 and {MAX_STEPS}, got {resolved.steps}")
    _check_range("guidance", resolved.guidance, 0.0, 50.0)
    _check_range("image guidance", resolved.image_guidance, 0.0, 50.0)
    _check_range("refine strength", resolved.refine_strength, 0.0, 1.0)
    if not 0 <= resolved.seed < 2**63:
        raise UserError(f"seed must be between 0 and 2**63-1, got {resolved.seed}")
    if lora_fused and resolved.refine_strength > 0:
        raise UserError("--fuse-lora needs --refine-strength 0 (the refine stage runs without the LoRA)")
    return resolved


class Editor:
    """Holds one loaded pipeline; `edit` runs under torch.inference_mode()."""

    def __init__(self, settings: EditorSettings, dm: DeviceManager, loaded: LoadedPipeline, load_s: float) -> None:
        self.settings = settings
        self.dm = dm
        self.loaded = loaded
        self.load_s = load_s
        self.defaults = settings.spec.defaults
        self.last_metadata: dict[str, Any] | None = None

    @classmethod
    def load(cls, settings: EditorSettings) -> Editor:
        """Choose the device and load the model; raises UserError/DeviceError on bad settings."""
        if settings.rng not in ("device", "cpu"):
            raise UserError(f"unknown rng placement {settings.rng!r}; use device or cpu")
        started = time.perf_counter()
        dm = DeviceManager(settings.device, settings.dtype)
        loaded = load_pipeline(
            settings.sources,
            dm,
            offload=settings.offload,
            attention=settings.attention,
            refine_weights=settings.refine_weights,
            fuse_lora=settings.fuse_lora,
            vae_tiling=settings.vae_tiling,
            max_memory=settings.max_memory,
            host_memory=settings.host_memory,
            encoder_device=settings.encoder_device,
        )
        load_s = time.perf_counter() - started
        logger.info("loaded %s in %.1f s", settings.model, load_s)
        return cls(settings, dm, loaded, load_s)

    def resolve(self, request: EditRequest) -> EditRequest:
        """Fill defaults and validate against this editor's model and loading options."""
        return resolve_request(request, self.settings.spec, self.loaded.lora_fused)

    def prepare_image(self, request: EditRequest) -> tuple[Image.Image, Image.Image]:
        """(source as opened, model input at the model's working size)."""
        source = open_image(request.image)
        if self.settings.spec.resize == "area":
            return source, resize_for_e1_1(source)
        return source, resize_for_e1_full(source, keep_aspect=request.keep_aspect)

    def edit(
        self,
        request: EditRequest,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> EditResult:
        """Run one edit. `on_step(done, total)` reports progress; `should_stop()` cancels between steps."""
        request = self.resolve(request)
        if self.settings.spec.prompt_form and not is_e1_full_form(request.instruction):
            logger.warning(
                "E1-Full expects 'Editing Instruction: ... Target Image Description: ...'; "
                "using the bare instruction (see --target-description or --refine-instruction)"
            )
        source, model_input = self.prepare_image(request)
        generator = self.dm.create_generator(request.seed, on="cpu" if self.settings.rng == "cpu" else "device")
        steps = request.steps

        def step_callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(index + 1, steps)
            if should_stop is not None and should_stop():
                raise EditCancelled(f"stopped after step {index + 1} of {steps}")
            return tensors

        self.dm.reset_peak_memory_stats()
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.loaded.pipe(
                prompt=request.instruction,
                negative_prompt=request.negative,
                image=model_input,
                guidance_scale=request.guidance,
                image_guidance_scale=request.image_guidance,
                num_inference_steps=steps,
                generator=generator,
                refine_strength=request.refine_strength,
                clip_cfg_norm=request.clip_cfg_norm,
                callback_on_step_end=step_callback,
                refine_weights=self.loaded.refine_weights,
            )
        self.dm.synchronize()
        total_s = time.perf_counter() - started
        image = resize_to(output.images[0], source.size)
        if output.non_finite:
            logger.warning(
                "the decoded image contains NaN/inf (black or broken output); fp16 VAE decodes can overflow: "
                "try --dtype bf16 or --dtype fp32"
            )
        memory = self.dm.memory_stats(log=False)
        metadata = {
            "model": self.settings.model,
            "instruction": request.instruction,
            "negative": request.negative,
            "steps": steps,
            "guidance": request.guidance,
            "image_guidance": request.image_guidance,
            "refine_strength": request.refine_strength,
            "refine_start_step": output.refine_start_step,
            "clip_cfg_norm": request.clip_cfg_norm,
            "seed": request.seed,
            "rng": self.settings.rng,
            "generator_device": str(generator.device),
            "keep_aspect": request.keep_aspect,
            "source_size": list(source.size),
            "model_input_size": list(model_input.size),
            "device": str(self.dm.device),
            "device_name": self.dm.device_name,
            "dtype": self.dm.dtype_name,
            "attention": self.loaded.attention,
            "offload": self.settings.offload,
            "placement": self.placement(),
            "memory_actions": self.loaded.memory_actions,
            "refine_weights": self.settings.refine_weights,
            "lora_fused": self.loaded.lora_fused,
            "model_sources": self.settings.sources.as_dict(),
            "non_finite_output": output.non_finite,
            "timings": {
                "load_s": round(self.load_s, 4),
                "encode_s": round(output.timings["encode_s"], 4),
                "step_s": [round(s, 4) for s in output.timings["step_s"]],
                "decode_s": round(output.timings["decode_s"], 4),
                "total_s": round(total_s, 4),
            },
            "memory": memory.as_dict(),
        }
        self.last_metadata = metadata
        return EditResult(image, metadata)

    def device_report(self) -> dict[str, Any]:
        """Device, dtype, attention and memory now; for status panels."""
        return {
            "device": str(self.dm.device),
            "device_name": self.dm.device_name,
            "dtype": self.dm.dtype_name,
            "attention": self.loaded.attention,
            "offload": self.settings.offload,
            "placement": self.placement(),
            "memory": self.dm.memory_stats(log=False).as_dict(),
        }

    def placement(self) -> dict[str, Any] | None:
        """The memory plan's placement and predicted peak bytes per device (and host), as plain data."""
        plan = self.loaded.plan
        if plan is None:
            return None
        return {"name": plan.placement, "asked": plan.asked, "fits": plan.fits, "predicted_peak_bytes": plan.peaks(),
                "encoder_device": plan.encoder_device}  # fmt: skip


def image_format_for(path: Path) -> str:
    """The PIL format an output path asks for by its extension."""
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown image extension; use one of {', '.join(sorted(IMAGE_FORMATS))}")
    return fmt


def _write_atomically(path: Path, write: Callable[[Any], None], overwrite: bool) -> None:
    """Write to a temp file beside `path`, then link/rename it into place (never a half-written file)."""
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        if overwrite:
            os.replace(temp_name, path)
        else:
            try:
                os.link(temp_name, path)
            except FileExistsError as exc:
                raise UserError(f"{path} already exists; choose another --output or pass --overwrite") from exc
            except OSError:  # a filesystem without hard links: check, then rename (not race-free)
                if path.exists():
                    raise UserError(f"{path} already exists; choose another --output or pass --overwrite") from None
                os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


def save_result(result: EditResult, output: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Save the image and `<output>.json` metadata; refuses to replace existing files unless asked."""
    path = Path(output).expanduser()
    fmt = image_format_for(path)
    json_path = path.with_suffix(path.suffix + ".json")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} is not a directory")
    if not overwrite:
        existing = [str(p) for p in (path, json_path) if p.exists()]
        if existing:
            raise UserError(f"{', '.join(existing)} already exists; choose another --output or pass --overwrite")
    image = result.image.convert("RGB") if fmt == "JPEG" else result.image
    metadata = {**result.metadata, "output": str(path)}
    try:
        _write_atomically(path, lambda stream: image.save(stream, format=fmt), overwrite)
        try:
            _write_atomically(
                json_path, lambda stream: stream.write(json.dumps(metadata, indent=2).encode()), overwrite
            )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path, json_path
