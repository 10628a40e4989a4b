"""Editor: load a HiDream-E1 model once, edit many images, save results atomically.

Every front end (the two CLIs, the web UI, the environment doctor's smoke test) goes through this
class, so defaults, validation, metadata and saving exist once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from device_utils import CheckpointError, DeviceError, DeviceManager
from hidream_edit.errors import EditCancelled, NonFiniteError, UserError
from hidream_edit.guidance_parallel import GuidanceGroup
from hidream_edit.images import ImageSource, open_image, resize_for_e1_1, resize_for_e1_full, resize_to
from hidream_edit.models import LoadedPipeline, ModelSources, load_pipeline
from hidream_edit.placement import ENCODER_ATTRIBUTES
from hidream_edit.spec import INSTRUCTION_MARKER, MAX_PROMPT_CHARS, TARGET_MARKER, ModelSpec, is_e1_full_form
from hidream_edit.step_cache import DEFAULT_THRESHOLD, DEFAULT_WARMUP, CacheSettings, check_cache_values
from hidream_edit.text import check_path_text, shown

if TYPE_CHECKING:  # the pipeline module imports diffusers, which must wait until torch_npu is settled
    from hidream_edit.pipeline import EncodedPrompts, PromptKey
    from hidream_edit.tensor_split import TensorParallelGroup

logger = logging.getLogger(__name__)

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}
MAX_STEPS = 1000


# Errors every front end shows as one line (CLIs: exit 2): the user's mistake, not a bug.
USER_ERRORS = (UserError, DeviceError, CheckpointError)

# Recent prompts whose embeddings an Editor keeps on the device; with the real Llama one entry (prompt
# and negative) is about 70 MB in bf16, so a few entries cost little and a one-instruction batch encodes once.
PROMPT_CACHE_ENTRIES = 4


@dataclass(frozen=True)
class EditorSettings:
    """How to load: which model from where, on which device, in which memory and attention mode."""

    sources: ModelSources
    device: str | None = None
    dtype: str | None = None
    device_origin: str = "device"  # where `device` came from, for messages: "--device", "PREFERRED_DEVICE", ...
    dtype_origin: str = "dtype"
    attention: str | None = None
    offload: str = "auto"
    max_memory: int | None = None
    host_memory: int | None = None
    encoder_device: str | None = None
    rng: str = "device"
    refine_weights: str = "edit"
    fuse_lora: bool = False
    vae_tiling: bool = False
    prompt_cache_entries: int = PROMPT_CACHE_ENTRIES

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
    cache: str | None = None  # step cache mode (step_cache.CACHE_MODES); None: off
    cache_threshold: float | None = None
    cache_warmup: int | None = None
    cache_max_skip: int | None = None  # most cached steps in a row; 0 (the default): no limit

    @property
    def cache_settings(self) -> CacheSettings:
        """The step cache this request asks for, defaults filled in."""
        threshold = DEFAULT_THRESHOLD if self.cache_threshold is None else self.cache_threshold
        warmup = DEFAULT_WARMUP if self.cache_warmup is None else self.cache_warmup
        return CacheSettings(self.cache or "off", threshold, warmup, self.cache_max_skip or 0)


@dataclass
class EditResult:
    """The edited image (source size) and everything needed to reproduce and judge it."""

    image: Image.Image | None  # None on a guidance-parallel rank that only helped denoise (not the leader)
    metadata: dict[str, Any] = field(default_factory=dict)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UserError(f"{name} must be between {low:g} and {high:g}, got {value:g}")


def check_prompt_text(name: str, text: str | None) -> None:
    """A UserError if `text` is longer than MAX_PROMPT_CHARS or holds bytes that are not UTF-8.

    Undecodable command-line bytes reach Python as lone surrogates, which no encoder can take.
    """
    if text is None:
        return
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(
            f"the {name} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS} "
            "(the text encoders read only the first 128 tokens)"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"the {name} is not valid UTF-8 text (undecodable byte at character {exc.start + 1})") from None


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
        cache=request.cache or "off",
        cache_threshold=DEFAULT_THRESHOLD if request.cache_threshold is None else request.cache_threshold,
        cache_warmup=DEFAULT_WARMUP if request.cache_warmup is None else request.cache_warmup,
        cache_max_skip=0 if request.cache_max_skip is None else request.cache_max_skip,
    )
    if not resolved.instruction:
        raise UserError("the instruction is empty")
    instruction, marker, target = resolved.instruction.partition(TARGET_MARKER)
    if marker:  # E1-Full's form: each part is capped, not the markers and separators around them
        instruction = instruction.replace(INSTRUCTION_MARKER, "", 1).strip().removesuffix(".")
    check_prompt_text("instruction", instruction)
    if marker:
        check_prompt_text("target description", target.strip())
    check_prompt_text("negative prompt", resolved.negative)
    if not 1 <= resolved.steps <= MAX_STEPS:
        raise UserError(f"steps must be between 1 and {MAX_STEPS}, got {resolved.steps}")
    _check_range("guidance", resolved.guidance, 0.0, 50.0)
    _check_range("image guidance", resolved.image_guidance, 0.0, 50.0)
    _check_range("refine strength", resolved.refine_strength, 0.0, 1.0)
    if not 0 <= resolved.seed < 2**63:
        raise UserError(f"seed must be between 0 and 2**63-1, got {resolved.seed}")
    check_cache_values(resolved.cache, resolved.cache_threshold, resolved.cache_warmup, resolved.cache_max_skip)
    if lora_fused and resolved.refine_strength > 0:
        raise UserError(
            "a fused LoRA cannot run the refine stage (it runs without the LoRA); set the refine strength to 0",
            fix="fused_lora_refine",
        )
    return resolved


class PromptEmbeddingCache:
    """The embeddings of the most recently used (prompt, negative) pairs of one model, oldest dropped first."""

    def __init__(self, model: str, max_entries: int) -> None:
        self.model = model
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str, str, int, bool], EncodedPrompts]
        self._entries = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: PromptKey) -> EncodedPrompts | None:
        full_key = (self.model, *key)
        found = self._entries.get(full_key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(full_key)
        return found

    def store(self, key: PromptKey, value: EncodedPrompts) -> None:
        if self.max_entries <= 0:
            return
        self._entries[(self.model, *key)] = value
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


# (resolved request, model input image, source size): an edit a guidance group's leader is about to run
AnnounceFn = Callable[["EditRequest", Image.Image, tuple[int, int]], None]


def device_manager_for(settings: EditorSettings) -> DeviceManager:
    """The device and dtype the settings ask for (LOCAL_RANK picks the card under torchrun)."""
    return DeviceManager(
        settings.device, settings.dtype, device_origin=settings.device_origin, dtype_origin=settings.dtype_origin
    )


class Editor:
    """Holds one loaded pipeline; `edit` runs under torch.inference_mode()."""

    def __init__(self, settings: EditorSettings, dm: DeviceManager, loaded: LoadedPipeline, load_s: float) -> None:
        self.settings = settings
        self.dm = dm
        self.loaded = loaded
        self.load_s = load_s
        self.defaults = settings.spec.defaults
        self.last_metadata: dict[str, Any] | None = None
        self.prompt_cache = PromptEmbeddingCache(settings.model, settings.prompt_cache_entries)
        loaded.pipe.prompt_cache = self.prompt_cache  # one of 0 entries keeps nothing
        self.guidance_group: GuidanceGroup | None = None
        self.tensor_group: TensorParallelGroup | None = None
        self.announce: AnnounceFn | None = None

    def use_guidance_group(self, group: GuidanceGroup) -> None:
        """Share every edit's guidance branches with the other ranks of `group` (--cfg-parallel)."""
        self.guidance_group = group
        self.loaded.pipe.guidance_group = group

    def announce_edits(self, announce: AnnounceFn) -> None:
        """On an edit group's leader: `announce(request, model_input, source_size)` before every edit tells
        the members that wait for work (the web UI's) which edit to join; command lines need none, as
        every rank reads the same flags."""
        self.announce = announce

    @property
    def writes_outputs(self) -> bool:
        """False on a guidance-parallel rank other than its group's leader, and on a tensor-parallel rank
        other than its group's first: it neither decodes nor saves."""
        guidance_leader = self.guidance_group is None or self.guidance_group.leader
        return guidance_leader and (self.tensor_group is None or self.tensor_group.leader)

    @classmethod
    def load(
        cls, settings: EditorSettings, dm: DeviceManager | None = None, tensor: TensorParallelGroup | None = None
    ) -> Editor:
        """Choose the device (or use `dm`) and load the model; raises UserError/DeviceError on bad settings.

        With `tensor` (--tensor-parallel) the transformer is split over that group: every rank of it runs
        every step on the same inputs, and only its first rank decodes and saves.
        """
        if settings.rng not in ("device", "cpu"):
            raise UserError(f"unknown rng placement {settings.rng!r}; use device or cpu")
        if tensor is not None:
            from hidream_edit.tensor_split import check_fuse_lora, check_refine_weights

            check_refine_weights(settings.refine_weights, tensor.size)
            check_fuse_lora(settings.fuse_lora, tensor.size)
        started = time.perf_counter()
        dm = dm or device_manager_for(settings)
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
            tensor_mesh=tensor.mesh if tensor is not None else None,
        )
        load_s = time.perf_counter() - started
        logger.info("loaded %s in %.1f s", settings.model, load_s)
        editor = cls(settings, dm, loaded, load_s)
        editor.tensor_group = tensor
        return editor

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
                "using the bare instruction (a target description or the instruction rewrite builds the form)"
            )
        source, model_input = self.prepare_image(request)
        if self.announce is not None:
            self.announce(request, model_input, source.size)
        return self.edit_prepared(request, model_input, source.size, on_step, should_stop)

    def edit_prepared(
        self,
        request: EditRequest,
        model_input: Image.Image,
        source_size: tuple[int, int],
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> EditResult:
        """The edit of a resolved request whose image is already at the model's size (`edit` does both)."""
        generator = self.dm.create_generator(request.seed, on="cpu" if self.settings.rng == "cpu" else "device")
        steps = request.steps

        tensor = self.tensor_group
        if tensor is not None:  # a Stop asked on any rank of the split reaches all of them at the same step
            should_stop = tensor.agreed_stop(should_stop, self.dm.device)
        group = self.guidance_group
        if group is not None:
            group.begin_edit(should_stop)  # the group stops all its ranks at the same step

        def step_callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(index + 1, steps)
            if group is None and should_stop is not None and should_stop():
                raise EditCancelled(f"stopped after step {index + 1} of {steps}")
            return tensors

        self.dm.reset_peak_memory_stats()
        started = time.perf_counter()
        with torch.inference_mode(), tensor.collectives() if tensor is not None else contextlib.nullcontext():
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
                refine_switch=self.loaded.refine_switch,
                output_type="pil" if self.writes_outputs else "latent",
                cache=request.cache_settings,
            )
        self.dm.synchronize()
        total_s = time.perf_counter() - started
        if output.non_finite:
            raise NonFiniteError("the VAE decode", self.loaded.vae_dtype)
        image = resize_to(output.images[0], source_size) if self.writes_outputs else None
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
            "source_size": list(source_size),
            "model_input_size": list(model_input.size),
            "device": str(self.dm.device),
            "device_name": self.dm.device_name,
            "dtype": self.dm.dtype_name,
            "vae_dtype": self.loaded.vae_dtype,
            "attention": self.loaded.attention,
            "offload": self.settings.offload,
            "vae_tiling": self.settings.vae_tiling,
            "placement": self.placement(),
            "memory_actions": self.loaded.memory_actions,
            "refine_weights": self.settings.refine_weights,
            "lora_fused": self.loaded.lora_fused,
            "model_sources": self.settings.sources.as_dict(),
            "non_finite_output": output.non_finite,
            "cache": output.cache,
            "timings": {
                "load_s": round(self.load_s, 4),
                "encode_s": round(output.timings["encode_s"], 4),
                "step_s": [round(s, 4) for s in output.timings["step_s"]],
                "decode_s": round(output.timings["decode_s"], 4),
                "total_s": round(total_s, 4),
                **({"cfg_parallel": group.finish_edit()} if group is not None else {}),
                **({"tensor_parallel": {"size": tensor.size, "ranks": tensor.ranks}} if tensor is not None else {}),
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
            "layout": self.layout(),
            "memory": self.dm.memory_stats(log=False).as_dict(),
        }

    def layout(self) -> dict[str, Any] | None:
        """The groups this process edits with under torchrun (None: it edits alone), and the text encoders
        it holds for its tensor-parallel group."""
        guidance, tensor = self.guidance_group, self.tensor_group
        if guidance is None and tensor is None:
            return None
        pipe = self.loaded.pipe
        return {
            "cfg_parallel": guidance.size if guidance is not None else 1,
            "guidance_ranks": guidance.ranks if guidance is not None else None,
            "tensor_parallel": tensor.size if tensor is not None else 1,
            "tensor_ranks": tensor.ranks if tensor is not None else None,
            "text_encoders_here": [name for name, attribute in ENCODER_ATTRIBUTES.items()
                                   if getattr(pipe, attribute, None) is not None],
        }

    def placement(self) -> dict[str, Any] | None:
        """The memory plan's placement and predicted peak bytes per device (and host), as plain data."""
        plan = self.loaded.plan
        if plan is None:
            return None
        return {"name": plan.placement, "asked": plan.asked, "fits": plan.fits, "predicted_peak_bytes": plan.peaks(),
                "encoder_device": plan.encoder_device}


def image_format_for(path: Path) -> str:
    """The PIL format an output path asks for by its extension."""
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{shown(path)}: unknown image extension; use one of {', '.join(sorted(IMAGE_FORMATS))}")
    return fmt


def metadata_path(output: Path) -> Path:
    """Where the metadata JSON of an output image goes: `<output>.json`."""
    return output.with_suffix(output.suffix + ".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


STALE_TEMP_AGE_S = 3600.0
"""A temp file of ours this old is abandoned whoever wrote it (another host on a shared folder, an old version)."""

_HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]
# .NAME.PID-HOST.TOKEN.tmp: the writer's pid and host let the next save tell a dead writer's leftovers
# from a live concurrent save; .NAME.XXXXXXXX.tmp is what earlier versions (tempfile.mkstemp) left.
_OUTPUT_NAME = r"\..+\.(?:" + "|".join(suffix[1:] for suffix in IMAGE_FORMATS) + r")(?:\.json)?"
_TEMP_NAME = re.compile(_OUTPUT_NAME + r"\.(?P<pid>\d{1,10})-(?P<host>[0-9a-f]{8})\.[0-9a-f]{8}\.tmp", re.IGNORECASE)
_LEGACY_TEMP_NAME = re.compile(_OUTPUT_NAME + r"\.[a-z0-9_]{8}\.tmp", re.IGNORECASE)


class _TargetWriteFailed(Exception):
    """An OSError while writing or publishing one target; carries the target for the message."""

    def __init__(self, target: Path, cause: OSError) -> None:
        super().__init__(f"cannot write {target}: {cause.strerror or cause}")
        self.target = target


class _Terminated(BaseException):
    """Raised by the temporary SIGTERM handler so a save unwinds and removes its temp files."""


NAME_MAX_FALLBACK = 255
"""Longest file name in bytes where the filesystem cannot say (Linux filesystems allow 255)."""

# A save writes `.<name>.<pid>-<host>.<token>.tmp` first; the pid is padded so the name's length is fixed.
_PID_DIGITS = 7


def _name_max(folder: Path) -> int:
    """The longest file name in bytes the filesystem of `folder` (or of its nearest existing parent) takes."""
    for candidate in (folder, *folder.parents):
        try:
            return int(os.pathconf(candidate, "PC_NAME_MAX"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            break
    return NAME_MAX_FALLBACK


def check_name_length(path: Path) -> None:
    """A UserError if saving `path` needs a file name longer than its folder's filesystem takes.

    A save writes the JSON's temporary name, the longest, first; a name that fits alone may not fit then.
    """
    name_bytes = len(os.fsencode(path.name))
    longest = len(os.fsencode(_temp_path_for(metadata_path(path)).name))
    limit = _name_max(path.parent)
    if longest > limit:
        raise UserError(
            f"the output file name {shown(path.name, 60)} is {name_bytes} bytes long; at most "
            f"{name_bytes - (longest - limit)} fit in {shown(path.parent)} (a save first writes a temporary "
            "file whose name is longer)",
            fix="output_name",
        )


def target_problem(path: Path) -> str | None:
    """Why `path` can never be a save target, --overwrite or not; None when it is absent or a regular file.

    lstat, not stat: a link is judged itself, so a dangling one is not taken for a free name.
    """
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{shown(path)} cannot be checked ({exc.strerror or exc})"
    if stat.S_ISLNK(status.st_mode):
        return f"{shown(path)} is a symbolic link (outputs are never written through links)"
    if stat.S_ISDIR(status.st_mode):
        return f"{shown(path)} is a directory"
    if not stat.S_ISREG(status.st_mode):
        return f"{shown(path)} exists and is not a regular file"
    return None


def check_output_path(output: str | Path, overwrite: bool) -> tuple[Path, Path]:
    """(image path, JSON path) for `output`, or a UserError if they cannot be written as asked.

    Cheap enough to call before loading a model; save_result calls it again just before writing.
    check_can_create adds the one check that needs a file created.
    """
    path = Path(output).expanduser()
    check_path_text("the output", str(path))
    image_format_for(path)
    json_path = metadata_path(path)
    try:
        parent_is_dir = stat.S_ISDIR(os.stat(path.parent).st_mode)
    except OSError:
        parent_is_dir = False
    if not parent_is_dir:
        raise UserError(f"{shown(path.parent)} is not a directory")
    check_name_length(path)
    for candidate in (path, json_path):
        problem = target_problem(candidate)
        if problem is not None:
            raise UserError(problem, fix="output_name")
    if not overwrite:
        existing = [shown(p) for p in (path, json_path) if os.path.lexists(p)]
        if existing:
            raise UserError(f"{', '.join(existing)} already exists", fix="output_exists")
    return path, json_path


def check_can_create(output: Path) -> None:
    """A UserError unless files can be created beside `output` now (a read-only folder, for one).

    Creates and removes the longest temporary name a save of `output` uses: the real operation, not a
    guess from permission bits, which root ignores and a read-only mount overrides.
    """
    temps: list[Path] = []
    try:
        os.close(_create_temp(metadata_path(output), temps))
    except OSError as exc:
        raise UserError(f"cannot create files in {shown(output.parent)}: {exc.strerror or exc}") from exc
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def _process_alive(pid: int) -> bool:
    """Whether a process with this pid exists here (a pid we cannot signal belongs to someone alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True
    return True


def sweep_stale_temp_files(folder: Path, now: float | None = None) -> list[Path]:
    """Remove temp files an interrupted save left in `folder`; returns what was removed.

    Only names of our own pattern are touched: those whose writer process on this host is gone, and
    any older than STALE_TEMP_AGE_S. A concurrent save's live temp file is never removed.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or not entry.name.endswith(".tmp"):
            continue
        ours = _TEMP_NAME.fullmatch(entry.name)
        if ours is None and _LEGACY_TEMP_NAME.fullmatch(entry.name) is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_AGE_S
            writer_gone = ours is not None and ours["host"] == _HOST_TAG and not _process_alive(int(ours["pid"]))
            if old or writer_gone:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError as exc:
            logger.debug("cannot remove stale temp file %s: %s", entry.path, exc)
    if removed:
        logger.info("removed %d temp file(s) left by an interrupted save in %s", len(removed), folder)
    return removed


def _temp_path_for(target: Path) -> Path:
    return target.parent / f".{target.name}.{os.getpid():0{_PID_DIGITS}d}-{_HOST_TAG}.{secrets.token_hex(4)}.tmp"


def _create_temp(target: Path, temps: list[Path]) -> int:
    """Create a new temp file beside `target` (mode 0666 less the umask, like any new file); records it."""
    for _ in range(100):
        temp = _temp_path_for(target)
        try:
            handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        temps.append(temp)
        return handle
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(target))


def _write_temp(target: Path, write: Callable[[Any], None], temps: list[Path]) -> Path:
    """Write a complete temp file for `target`; an OSError becomes _TargetWriteFailed naming `target`."""
    try:
        handle = _create_temp(target, temps)
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as exc:
        raise _TargetWriteFailed(target, exc) from exc
    return temps[-1]


def _backup_of(target: Path, temps: list[Path]) -> Path | None:
    """A second name for the existing `target` (hard link, else a copy), so it can be put back; None if absent."""
    if not target.exists():
        return None
    for _ in range(100):
        backup = _temp_path_for(target)
        try:
            os.link(target, backup)
        except FileExistsError:
            continue
        except OSError:  # no hard links here: copy instead
            temps.append(backup)
            shutil.copy2(target, backup)
            return backup
        temps.append(backup)
        return backup
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(target))


def _link_new(temp: Path, target: Path) -> None:
    """Give `temp` the name `target` only if nothing has that name: os.link fails rather than replace."""
    try:
        os.link(temp, target)
    except FileExistsError as exc:
        raise UserError(f"{target} already exists", fix="output_exists") from exc
    except OSError:  # a filesystem without hard links: check, then rename (not race-free)
        if os.path.lexists(target):
            raise UserError(f"{target} already exists", fix="output_exists") from None
        os.replace(temp, target)


def _same_file(path: Path, inode: tuple[int, int]) -> bool:
    try:
        status = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == inode


def _publish(pairs: list[tuple[Path, Path]], overwrite: bool, temps: list[Path]) -> None:
    """Move each complete temp file onto its target: all of them, or on any failure none.

    Without `overwrite`, targets are linked so an existing file (even one created a moment ago by a
    concurrent save) is never replaced. With it, the old targets get a backup name first and are put
    back if a later target fails, so there are never fewer or mixed files than before.
    """
    done: list[tuple[Path, Path | None, tuple[int, int]]] = []
    try:
        for temp, target in pairs:
            status = os.stat(temp)
            inode = (status.st_dev, status.st_ino)
            try:
                if overwrite:
                    backup = _backup_of(target, temps)
                    os.replace(temp, target)
                else:
                    backup = None
                    _link_new(temp, target)
            except OSError as exc:
                raise _TargetWriteFailed(target, exc) from exc
            done.append((target, backup, inode))
    except BaseException:
        for target, backup, inode in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, target)
                elif _same_file(target, inode):
                    os.unlink(target)
            except OSError as exc:
                logger.error("cannot restore %s after a failed save: %s", target, exc)
        raise


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration of a save, then die of it as before.

    Only when SIGTERM would otherwise kill the process outright (default handler, main thread): the
    save's cleanup runs, then the signal is re-sent with the default handler so the exit status is
    unchanged. A handler someone else installed (a web server's graceful shutdown) is left alone.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        if signal.getsignal(signal.SIGTERM) is raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def save_result(result: EditResult, output: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Save the image and `<output>.json` metadata: both files or neither, never a partial file.

    Refuses to replace existing files unless asked, race-free against a concurrent save. Both temp
    files are complete before either target changes; a failure, Ctrl-C or SIGTERM leaves the folder
    as it was, and temp files left by a killed save are swept on the next save into the folder.
    """
    path, json_path = check_output_path(output, overwrite)
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    if result.image is None:
        raise ValueError("this rank only helped denoise; the leader of its guidance group saves the edit")
    image = result.image.convert("RGB") if fmt == "JPEG" else result.image
    sweep_stale_temp_files(path.parent)
    temps: list[Path] = []
    try:
        with _sigterm_unwinds():
            try:
                image_temp = _write_temp(path, lambda stream: image.save(stream, format=fmt), temps)
                # the image's checksum lets a resumed batch tell a complete output from a damaged one
                try:
                    checksum = file_sha256(image_temp)
                except OSError as exc:
                    raise _TargetWriteFailed(path, exc) from exc
                metadata = {**result.metadata, "output": str(path), "output_sha256": checksum}
                json_temp = _write_temp(
                    json_path, lambda stream: stream.write(json.dumps(metadata, indent=2).encode()), temps
                )
                _publish([(image_temp, path), (json_temp, json_path)], overwrite, temps)
            finally:
                for temp in temps:
                    with contextlib.suppress(OSError):
                        os.unlink(temp)
    except _TargetWriteFailed as exc:
        raise UserError(str(exc)) from exc.__cause__
    return path, json_path


def check_new_file(path: str | Path) -> Path:
    """`path` as a file that can be created: its folder exists and nothing has its name (nothing is overwritten).

    Cheap enough to call before a long run whose record `write_new_json` writes at the end.
    """
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise UserError(f"{target.parent} is not a directory")
    if os.path.lexists(target):
        raise UserError(f"{target} already exists")
    return target


def write_new_json(path: str | Path, data: Any) -> Path:
    """Write `data` as JSON to a new file: complete or not at all, never replacing an existing file."""
    target = check_new_file(path)
    temps: list[Path] = []
    try:
        with _sigterm_unwinds():
            try:
                temp = _write_temp(target, lambda stream: stream.write(json.dumps(data, indent=2).encode()), temps)
                _publish([(temp, target)], False, temps)
            finally:
                for leftover in temps:
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)
    except _TargetWriteFailed as exc:
        raise UserError(str(exc)) from exc.__cause__
    return target
