"""The web editor: a Gradio app over one loaded `Editor`, meant to be left running on a device server.

Everything a button does is a plain method of `WebEditor` that takes plain values (file paths,
strings, numbers) and returns plain values, so tests call them directly with the tiny model; the
Gradio layer in `build_app` only wires components to those methods. The model is loaded once, by
the caller, before `build_app`; importing this module loads nothing.

Safety defaults: the server binds 127.0.0.1, auth is optional (flag or HIDREAM_GRADIO_AUTH),
uploads are limited in bytes and pixels, zip archives are read entry by entry with limits (never
extracted to disk), results are written only under the results directory with unique names, and
every failure reaches the browser as one readable line (tracebacks go to the server log only).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from hidream_edit.cli import (
    EXIT_USER_ERROR,
    USER_ERRORS,
    OneLineArgumentParser,
    add_model_arguments,
    configure_logging,
    settings_from_args,
)
from hidream_edit.editor import MAX_STEPS, EditCancelled, Editor, EditorSettings, EditRequest, EditResult, save_result
from hidream_edit.errors import UserError
from hidream_edit.images import open_image
from hidream_edit.instructions import compose_e1_full_prompt

logger = logging.getLogger(__name__)

AUTH_ENV = "HIDREAM_GRADIO_AUTH"
MODELS = ("e1.1", "e1-full")
MODEL_TITLES = {"e1.1": "HiDream-E1.1", "e1-full": "HiDream-E1-Full"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ZIP_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
RANDOM_SEED_LIMIT = 2**31  # stays exact in the browser's numbers, so a random seed can be typed back in
DEVICE_BUSY = "waiting for the device (another edit is running)"


@dataclass(frozen=True)
class WebSettings:
    """Server-side limits and where results go; everything here comes from command-line flags."""

    results_dir: Path
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    concurrency: int = 1
    max_queue: int = 8
    max_upload_mb: int = 50
    max_pixels: int = 40_000_000
    max_batch: int = 32
    refresh_s: float = 5.0

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Small pure helpers


def parse_auth(value: str | None, source: str = "--auth") -> tuple[str, str] | None:
    """'user:password' -> (user, password); the password may contain ':'. Empty/None -> no auth."""
    if value is None or not value.strip():
        return None
    user, sep, password = value.strip().partition(":")
    if not sep or not user or not password:
        raise UserError(f"{source} must look like user:password (both non-empty)")
    return user, password


def safe_stem(name: str | None, default: str = "image", limit: int = 40) -> str:
    """A file-name stem made only of [A-Za-z0-9._-], never empty, never starting with a dot."""
    stem = Path(name).stem if name else ""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:limit]
    return stem or default


def _token() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def _inside(root: Path, path: Path) -> Path:
    """`path` resolved, refusing anything outside `root` (results are written only there)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UserError(f"refusing to write {path} outside the results directory {root}")
    return resolved


def unique_result_path(results_dir: Path, kind: str, original_name: str | None, suffix: str = ".png") -> Path:
    """results_dir/<kind>-<time>-<random>-<stem><suffix>, not existing yet (with its .json sidecar)."""
    for _ in range(100):
        path = results_dir / f"{kind}-{_token()}-{safe_stem(original_name)}{suffix}"
        if not path.exists() and not path.with_suffix(suffix + ".json").exists():
            return _inside(results_dir, path)
    raise UserError(f"cannot find a free result name in {results_dir}")  # pragma: no cover - 2**32 names a second


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.1f} GiB"


def _fmt_seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def timing_summary(metadata: Mapping[str, Any]) -> str:
    """'2 steps in 3.1 s (1.55 s/step), encode 1.9 s, decode 1.5 s, total 6.5 s'."""
    t = metadata["timings"]
    steps = t["step_s"]
    per_step = sum(steps) / len(steps) if steps else 0.0
    return (
        f"{len(steps)} step{'' if len(steps) == 1 else 's'} in {_fmt_seconds(sum(steps))} ({per_step:.2f} s/step), "
        f"encode {_fmt_seconds(t['encode_s'])}, decode {_fmt_seconds(t['decode_s'])}, "
        f"total {_fmt_seconds(t['total_s'])}"
    )


def device_panel_markdown(
    report: Mapping[str, Any], last: Mapping[str, Any] | None, activity: str, load_s: float | None = None
) -> str:
    """The device panel: device, dtype, attention, memory, what runs now and the last edit's timings."""
    memory = report["memory"]
    if memory.get("total") is not None:
        used = memory["total"] - memory["free"] if memory.get("free") is not None else memory.get("reserved")
        device_memory = (
            f"{_gib(used)} used of {_gib(memory['total'])} "
            f"(this server: allocated {_gib(memory.get('allocated'))}, reserved {_gib(memory.get('reserved'))}, "
            f"peak {_gib(memory.get('peak'))})"
        )
    else:
        device_memory = "n/a (the CPU has no separate device memory)"
    lines = [
        f"**Device** `{report['device']}` ({report['device_name']}) · **dtype** {report['dtype']} · "
        f"**attention** {report['attention']} · **offload** {report['offload']}",
        f"**Device memory** {device_memory} · **Host memory** {_gib(memory['host_rss'])} used by this server "
        f"of {_gib(memory['host_total'])}",
        f"**Now** {activity}",
    ]
    if last:
        lines.append(f"**Last edit** {timing_summary(last)}")
    elif load_s is not None:
        lines.append(f"**Last edit** none yet (model loaded in {_fmt_seconds(load_s)})")
    return "  \n".join(lines)


def error_message(exc: BaseException) -> str:
    """One readable line for any failure of an edit; the traceback goes to the server log only."""
    if isinstance(exc, USER_ERRORS):
        return " ".join(str(exc).split())
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "the device ran out of memory; try a smaller image, --offload or --vae-tiling when starting the server"
    logger.error("edit failed", exc_info=exc)
    text = " ".join(str(exc).split())[:300]
    return f"internal error ({type(exc).__name__}{': ' + text if text else ''}); details are in the server log"


def _then(done: int, total: int) -> str:
    return ", decoding" if done == total else ""


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _display_name(path: str | Path) -> str:
    """Uploads live at <gradio cache>/<hash>/<original name>; show the original name."""
    return Path(path).name


# ---------------------------------------------------------------------------------------------
# Stop requests


class StopRegistry:
    """Per-session stop requests: Stop cancels the session's jobs submitted before it was pressed.

    A job remembers when it was submitted; `should_stop` is true once a Stop of the same session
    comes later. So a Stop pressed while a job still waits in the queue stops it before it starts,
    and a later Edit is never stopped by an old Stop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped_at: dict[str, float] = {}

    def request(self, session: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._stopped_at[session] = now
            # forget sessions that have not pressed Stop for a day
            for key in [k for k, at in self._stopped_at.items() if now - at > 86400]:
                del self._stopped_at[key]

    def checker(self, session: str, submitted: float | None) -> Callable[[], bool]:
        submitted = time.monotonic() if submitted is None else submitted

        def should_stop() -> bool:
            with self._lock:
                at = self._stopped_at.get(session)
            return at is not None and at >= submitted

        return should_stop


# ---------------------------------------------------------------------------------------------
# Results of the callbacks (plain values the Gradio layer maps to components)


@dataclass
class EditOutcome:
    status: str
    image_path: Path | None = None
    json_path: Path | None = None
    seed: int | None = None
    metadata: dict[str, Any] | None = None

    @property
    def files(self) -> list[str] | None:
        if self.image_path is None or self.json_path is None:
            return None
        return [str(self.image_path), str(self.json_path)]


@dataclass
class BatchItem:
    name: str
    source: Path | bytes


@dataclass
class BatchOutcome:
    status: str
    gallery: list[tuple[str, str]] = field(default_factory=list)
    zip_path: Path | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)
    batch_dir: Path | None = None

    @property
    def errors_text(self) -> str:
        return "\n".join(f"{name}: {message}" for name, message in self.errors)


@dataclass(frozen=True)
class EditParams:
    """The advanced settings of one tab, as the browser sends them."""

    negative: str | None = None
    steps: float | int | None = None
    guidance: float | None = None
    image_guidance: float | None = None
    refine_strength: float | None = None
    clip_cfg_norm: bool | None = None
    seed: float | int | None = None
    random_seed: bool = False
    target_description: str | None = None
    keep_aspect: bool = False


ProgressFn = Callable[[float, str], None]


# ---------------------------------------------------------------------------------------------
# The callbacks


class WebEditor:
    """The app's state: one Editor, the limits, the device lock, stop requests and what runs now."""

    def __init__(self, editor: Editor, settings: WebSettings) -> None:
        self.editor = editor
        self.settings = settings
        self.model = editor.settings.model
        self.stops = StopRegistry()
        # The pipeline (its scheduler above all) holds per-run state: one edit at a time on it.
        self._device = threading.Lock()
        self._activity_lock = threading.Lock()
        self._activity = "idle"
        try:
            settings.results_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the results directory {settings.results_dir}: {exc.strerror}") from exc
        if not os.access(settings.results_dir, os.W_OK | os.X_OK):
            raise UserError(f"the results directory {settings.results_dir} is not writable")

    # --- panel -----------------------------------------------------------------------------------

    @property
    def activity(self) -> str:
        with self._activity_lock:
            return self._activity

    def _set_activity(self, text: str) -> None:
        with self._activity_lock:
            self._activity = text

    def device_panel(self) -> str:
        try:
            report = self.editor.device_report()
        except Exception as exc:  # a panel refresh must never raise into the page
            logger.warning("device report failed: %s", exc)
            return f"device report unavailable: {error_message(exc)}"
        return device_panel_markdown(report, self.editor.last_metadata, self.activity, self.editor.load_s)

    # --- one edit ------------------------------------------------------------------------------------

    def _request(self, image: Image.Image, instruction: str | None, params: EditParams, seed: int) -> EditRequest:
        instruction = (instruction or "").strip()
        if not instruction:
            raise UserError("the instruction is empty")
        if self.model == "e1-full":
            target = (params.target_description or "").strip() or None
            instruction = compose_e1_full_prompt(instruction, image, target)
        return EditRequest(
            image=image,
            instruction=instruction,
            negative=params.negative,
            steps=_as_int(params.steps, "steps"),
            guidance=_as_float(params.guidance, "guidance"),
            image_guidance=_as_float(params.image_guidance, "image guidance"),
            refine_strength=_as_float(params.refine_strength, "refine strength"),
            clip_cfg_norm=params.clip_cfg_norm,
            seed=seed,
            keep_aspect=bool(params.keep_aspect),
        )

    def choose_seed(self, params: EditParams) -> int:
        if params.random_seed or params.seed is None or (isinstance(params.seed, float) and math.isnan(params.seed)):
            return secrets.randbelow(RANDOM_SEED_LIMIT)
        return _as_int(params.seed, "seed")

    def _open(self, source: Path | bytes | str, name: str) -> Image.Image:
        if isinstance(source, (str, Path)):
            path = Path(source)
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise UserError(f"{name}: the upload is gone ({exc.strerror}); upload it again") from exc
            if size > self.settings.max_upload_bytes:
                raise UserError(f"{name}: {size / 2**20:.1f} MiB is over the {self.settings.max_upload_mb} MiB limit")
            try:
                source = path.read_bytes()
            except OSError as exc:
                raise UserError(f"{name}: cannot read the upload ({exc.strerror})") from exc
        stream = io.BytesIO(source)
        stream.name = name  # messages name the upload or zip entry, never the server's cache path
        image = open_image(stream, max_pixels=self.settings.max_pixels)
        image.filename = name
        return image

    def _run(
        self,
        request: EditRequest,
        should_stop: Callable[[], bool],
        on_step: Callable[[int, int], None],
        label: str,
        progress: ProgressFn | None,
        on_start: Callable[[], None],
    ) -> EditResult:
        """Validate, then wait for the device and edit; checks Stop before starting and between steps."""
        request = self.editor.resolve(request)  # bad values fail before waiting for the device
        if not self._device.acquire(blocking=False):
            if progress is not None:
                progress(0.0, DEVICE_BUSY)
            while not self._device.acquire(timeout=0.2):
                if should_stop():
                    raise EditCancelled("stopped before it started")
        try:
            if should_stop():
                raise EditCancelled("stopped before it started")
            self._set_activity(f"editing {label}: encoding")
            on_start()
            return self.editor.edit(request, on_step=on_step, should_stop=should_stop)
        finally:
            self._set_activity("idle")
            self._device.release()

    def edit(
        self,
        image_path: str | Path | None,
        instruction: str | None,
        params: EditParams,
        should_stop: Callable[[], bool] | None = None,
        progress: ProgressFn | None = None,
    ) -> EditOutcome:
        """The Edit button: edit one uploaded image and save it under the results dir."""
        should_stop = should_stop or (lambda: False)
        started = time.perf_counter()
        seed: int | None = None
        try:
            if not image_path:
                raise UserError("upload an image first")
            name = _display_name(image_path)
            source = self._open(Path(image_path), name)
            seed = self.choose_seed(params)
            request = self._request(source, instruction, params, seed)

            def on_step(done: int, total: int) -> None:
                self._set_activity(f"editing {name}: step {done} of {total}{_then(done, total)}")
                if progress is not None:
                    progress(done / total, f"step {done} of {total}")

            def on_start() -> None:
                if progress is not None:
                    progress(0.0, "encoding the instruction and the image")

            result = self._run(request, should_stop, on_step, name, progress, on_start)
            image_path_out, json_path = save_result(result, unique_result_path(self.settings.results_dir, "edit", name))
        except EditCancelled as exc:
            return EditOutcome(f"{_sentence(str(exc))}; nothing was saved.", seed=seed)
        except Exception as exc:
            return EditOutcome(f"Error: {error_message(exc)}", seed=seed)
        elapsed = time.perf_counter() - started
        status = (
            f"Done in {_fmt_seconds(elapsed)} with seed {seed}: {timing_summary(result.metadata)}. "
            f"Saved {image_path_out.name}"
        )
        return EditOutcome(status, image_path_out, json_path, seed, result.metadata)

    # --- batch -----------------------------------------------------------------------------------------

    def collect_batch(self, paths: Sequence[str | Path] | None) -> tuple[list[BatchItem], list[tuple[str, str]]]:
        """Uploaded images and zip archives -> items to edit (in upload order, zips by entry name) and errors."""
        if not paths:
            raise UserError("upload some images or a zip of images first")
        items: list[BatchItem] = []
        errors: list[tuple[str, str]] = []
        for raw in paths:
            path = Path(raw)
            name = _display_name(path)
            if path.suffix.lower() == ".zip":
                try:
                    items.extend(self._zip_items(path, name, errors))
                except UserError as exc:
                    errors.append((name, str(exc)))
            else:
                items.append(BatchItem(name, path))
            if len(items) > self.settings.max_batch:
                raise UserError(f"more than {self.settings.max_batch} images; the limit is {self.settings.max_batch}")
        return items, errors

    def _zip_items(self, path: Path, name: str, errors: list[tuple[str, str]]) -> list[BatchItem]:
        limit = self.settings.max_upload_bytes
        items: list[BatchItem] = []
        total = 0
        try:
            with zipfile.ZipFile(path) as archive:
                infos = sorted(archive.infolist(), key=lambda info: info.filename)
                for info in infos:
                    entry = info.filename
                    base = entry.rsplit("/", 1)[-1]
                    if info.is_dir() or entry.startswith("__MACOSX/") or base.startswith(".") or not base:
                        continue
                    label = f"{name}/{entry}"
                    if Path(base).suffix.lower() not in ZIP_IMAGE_SUFFIXES:
                        errors.append((label, "skipped: not an image file"))
                        continue
                    if len(items) >= self.settings.max_batch:
                        raise UserError(f"holds more than {self.settings.max_batch} images, the batch limit")
                    if info.file_size > limit:
                        errors.append((label, f"skipped: {info.file_size / 2**20:.1f} MiB is over the "
                                              f"{self.settings.max_upload_mb} MiB limit"))  # fmt: skip
                        continue
                    with archive.open(info) as stream:
                        data = stream.read(limit + 1)
                    if len(data) > limit:  # the header lied about the size
                        errors.append((label, f"skipped: over the {self.settings.max_upload_mb} MiB limit"))
                        continue
                    total += len(data)
                    if total > 4 * limit:
                        raise UserError(f"unpacks to more than {4 * self.settings.max_upload_mb} MiB of images")
                    items.append(BatchItem(label, data))
        except zipfile.BadZipFile as exc:
            raise UserError(f"not a readable zip archive ({exc})") from exc
        except (OSError, RuntimeError, NotImplementedError) as exc:  # encrypted, unsupported method, I/O
            raise UserError(f"cannot read the zip archive ({type(exc).__name__}: {exc})") from exc
        if not items:
            errors.append((name, "contains no images"))
        return items

    @staticmethod
    def instructions_for(text: str | None, count: int) -> list[str]:
        """One instruction for all images, or one per line (as many lines as images)."""
        lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if not lines:
            raise UserError("the instruction is empty")
        if len(lines) == 1:
            return lines * count
        if len(lines) != count:
            raise UserError(
                f"{len(lines)} instruction lines for {count} images: give one instruction for all, "
                "or exactly one line per image"
            )
        return lines

    def batch(
        self,
        paths: Sequence[str | Path] | None,
        instructions: str | None,
        params: EditParams,
        should_stop: Callable[[], bool] | None = None,
        progress: ProgressFn | None = None,
    ) -> BatchOutcome:
        """The Batch button: edit each image, keep going past failures, zip what was made."""
        should_stop = should_stop or (lambda: False)
        started = time.perf_counter()
        try:
            items, errors = self.collect_batch(paths)
            if not items:
                raise UserError("no images to edit")
            lines = self.instructions_for(instructions, len(items))
            # settings wrong for every image fail once, here, not once per image
            self.editor.resolve(self._request(Image.new("RGB", (16, 16)), lines[0], params, self.choose_seed(params)))
            batch_dir = _inside(self.settings.results_dir, self.settings.results_dir / f"batch-{_token()}")
            batch_dir.mkdir()
        except Exception as exc:
            return BatchOutcome(f"Error: {error_message(exc)}")

        gallery: list[tuple[str, str]] = []
        summary: list[dict[str, Any]] = []
        count = len(items)
        stopped: str | None = None
        for index, (item, instruction) in enumerate(zip(items, lines, strict=True)):
            entry: dict[str, Any] = {"input": item.name, "instruction": instruction}
            summary.append(entry)
            if stopped is not None:
                entry["status"] = "not run (stopped)"
                continue
            seed = None
            try:
                image = self._open(item.source, item.name)
                seed = self.choose_seed(params)
                request = self._request(image, instruction, params, seed)

                def on_step(done: int, total: int, index: int = index, name: str = item.name) -> None:
                    text = f"image {index + 1} of {count} ({name}): step {done} of {total}"
                    self._set_activity(f"batch {text}{_then(done, total)}")
                    if progress is not None:
                        progress((index + done / total) / count, text)

                def on_start(index: int = index) -> None:
                    if progress is not None:
                        progress(index / count, f"image {index + 1} of {count}: encoding")

                label = f"batch image {index + 1} of {count}"
                result = self._run(request, should_stop, on_step, label, progress, on_start)
                out = _inside(self.settings.results_dir, batch_dir / f"{index + 1:03d}-{safe_stem(item.name)}.png")
                image_path, _ = save_result(result, out)
            except EditCancelled as exc:
                stopped = f"image {index + 1} of {count}: {exc}"
                entry["status"] = f"stopped: {exc}"
                continue
            except Exception as exc:
                message = error_message(exc).removeprefix(f"{item.name}: ")
                errors.append((item.name, message))
                entry.update(status="failed", error=message, seed=seed)
                continue
            entry.update(status="ok", output=image_path.name, seed=seed, timings=result.metadata["timings"])
            gallery.append((str(image_path), f"{index + 1}. {item.name}: {instruction}"[:120]))

        if errors:
            (batch_dir / "errors.txt").write_text("".join(f"{n}: {m}\n" for n, m in errors), encoding="utf-8")
        (batch_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        zip_path = self._zip(batch_dir) if gallery else None

        elapsed = time.perf_counter() - started
        parts = [f"{len(gallery)} of {count} images edited in {_fmt_seconds(elapsed)}"]
        if errors:
            parts.append(f"{len(errors)} problem{'s' if len(errors) != 1 else ''} (listed below)")
        if stopped is not None:
            parts.append(f"stopped at {stopped}")
        parts.append(f"zip: {zip_path.name}" if zip_path else "no zip (nothing was edited)")
        return BatchOutcome("Batch " + "; ".join(parts) + ".", gallery, zip_path, errors, batch_dir)

    def _zip(self, batch_dir: Path) -> Path:
        """<batch dir>.zip beside it, holding the images, their metadata, summary.json and errors.txt."""
        zip_path = _inside(self.settings.results_dir, batch_dir.with_suffix(".zip"))
        temp = zip_path.with_name(f".{zip_path.name}.tmp")
        try:
            with zipfile.ZipFile(temp, "x", compression=zipfile.ZIP_DEFLATED) as archive:
                for file in sorted(batch_dir.iterdir()):
                    if file.is_file() and not file.name.startswith("."):
                        archive.write(file, f"{batch_dir.name}/{file.name}")
            os.link(temp, zip_path)  # never replaces an existing file
        finally:
            temp.unlink(missing_ok=True)
        return zip_path


def _as_int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} must be a whole number, got {value!r}") from exc
    if not math.isfinite(number) or number != int(number):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _as_float(value: Any, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return number


# ---------------------------------------------------------------------------------------------
# The Gradio app


CSS = """
#status textarea, #batch-status textarea {font-weight: 600}
#device-panel {font-size: 0.9em}
"""


def _progress_adapter(progress: Any) -> ProgressFn:
    def report(fraction: float, desc: str) -> None:
        progress(max(0.0, min(1.0, fraction)), desc=desc)

    return report


def _settings_panel(web: WebEditor, prefix: str) -> list[gr.components.Component]:
    """The advanced settings (defaults as the CLI's), returned in EditParams order."""
    d = web.editor.defaults
    with gr.Accordion("Advanced settings", open=False):
        negative = gr.Textbox(d.negative, label="Negative instruction", elem_id=f"{prefix}-negative")
        with gr.Row():
            steps = gr.Slider(1, min(MAX_STEPS, 100), value=d.steps, step=1, label="Steps", elem_id=f"{prefix}-steps")
            guidance = gr.Slider(0, 20, value=d.guidance, step=0.1, label="Guidance", elem_id=f"{prefix}-guidance")
            image_guidance = gr.Slider(0, 20, value=d.image_guidance, step=0.1, label="Image guidance",
                                       elem_id=f"{prefix}-image-guidance")  # fmt: skip
        with gr.Row():
            refine = gr.Slider(0, 1, value=d.refine_strength, step=0.05, label="Refine strength",
                               elem_id=f"{prefix}-refine")  # fmt: skip
            clip = gr.Checkbox(d.clip_cfg_norm, label="Norm-clipped guidance (clip_cfg_norm)", elem_id=f"{prefix}-clip")
        with gr.Row():
            seed = gr.Number(d.seed, label="Seed", precision=0, minimum=0, elem_id=f"{prefix}-seed")
            random_seed = gr.Checkbox(False, label="Random seed", elem_id=f"{prefix}-random-seed")
        if web.model == "e1-full":
            target = gr.Textbox(label="Target image description (builds E1-Full's prompt form)",
                                elem_id=f"{prefix}-target")  # fmt: skip
            keep_aspect = gr.Checkbox(False, label="Keep aspect ratio (instead of stretching to a square)",
                                      elem_id=f"{prefix}-keep-aspect")  # fmt: skip
        else:
            target = gr.State(None)
            keep_aspect = gr.State(False)
    return [negative, steps, guidance, image_guidance, refine, clip, seed, random_seed, target, keep_aspect]


def build_app(editor: Editor, settings: WebSettings) -> gr.Blocks:
    """The Blocks app with its queue configured; `launch(demo, settings)` serves it."""
    web = WebEditor(editor, settings)
    title = MODEL_TITLES[web.model]
    tiny_note = " — **tiny random-weight test model: results are noise**" if editor.settings.sources.tiny else ""

    def submitted() -> float:
        return time.monotonic()

    def stop_edit(request: gr.Request) -> str:
        web.stops.request(f"{request.session_hash}:edit")
        return "Stop requested: the edit stops after the current step."

    def stop_batch(request: gr.Request) -> str:
        web.stops.request(f"{request.session_hash}:batch")
        return "Stop requested: the batch stops after the current step."

    def run_edit(
        image, instruction, negative, steps, guidance, image_guidance, refine, clip, seed, random_seed, target,
        keep_aspect, submitted_at, request: gr.Request, progress=gr.Progress(),  # noqa: B008
    ):  # fmt: skip
        params = EditParams(negative, steps, guidance, image_guidance, refine, clip, seed, random_seed, target,
                            keep_aspect)  # fmt: skip
        should_stop = web.stops.checker(f"{request.session_hash}:edit", submitted_at)
        outcome = web.edit(image, instruction, params, should_stop, _progress_adapter(progress))
        seed_update = outcome.seed if outcome.seed is not None else gr.update()
        path = str(outcome.image_path) if outcome.image_path else None
        return path, outcome.files, outcome.status, seed_update

    def run_batch(
        files, instructions, negative, steps, guidance, image_guidance, refine, clip, seed, random_seed, target,
        keep_aspect, submitted_at, request: gr.Request, progress=gr.Progress(),  # noqa: B008
    ):  # fmt: skip
        params = EditParams(negative, steps, guidance, image_guidance, refine, clip, seed, random_seed, target,
                            keep_aspect)  # fmt: skip
        should_stop = web.stops.checker(f"{request.session_hash}:batch", submitted_at)
        outcome = web.batch(files, instructions, params, should_stop, _progress_adapter(progress))
        zip_file = str(outcome.zip_path) if outcome.zip_path else None
        return outcome.gallery, zip_file, outcome.status, outcome.errors_text

    with gr.Blocks(title=f"{title} editor", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## {title} image editor{tiny_note}")
        with gr.Accordion("Device", open=True):
            panel = gr.Markdown(web.device_panel(), elem_id="device-panel")
        with gr.Tabs():
            with gr.Tab("Edit", id="edit"):
                with gr.Row(equal_height=True):
                    source = gr.Image(label="Source", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                      height=420, elem_id="source")  # fmt: skip
                    result = gr.Image(label="Result", type="filepath", format="png", interactive=False, height=420,
                                      buttons=["download", "fullscreen"], elem_id="result")  # fmt: skip
                instruction = gr.Textbox(label="Instruction", placeholder="e.g. make the sky purple", lines=2,
                                         elem_id="instruction")  # fmt: skip
                edit_settings = _settings_panel(web, "edit")
                with gr.Row():
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                    edit_stop = gr.Button("Stop", variant="stop", elem_id="edit-stop")
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                downloads = gr.File(label="Download result and metadata", file_count="multiple", interactive=False,
                                    height=140, elem_id="downloads")  # fmt: skip
            with gr.Tab("Batch", id="batch"):
                batch_files = gr.File(
                    label=f"Images or one zip (up to {settings.max_batch} images)",
                    file_count="multiple",
                    file_types=["image", ".zip"],
                    elem_id="batch-files",
                )
                batch_instructions = gr.Textbox(
                    label="Instruction (one line for all images, or one line per image in upload order)",
                    lines=3, elem_id="batch-instructions",
                )  # fmt: skip
                batch_settings = _settings_panel(web, "batch")
                with gr.Row():
                    batch_button = gr.Button("Run batch", variant="primary", elem_id="batch-button")
                    batch_stop = gr.Button("Stop", variant="stop", elem_id="batch-stop")
                batch_status = gr.Textbox(label="Status", interactive=False, elem_id="batch-status")
                gallery = gr.Gallery(label="Results", columns=4, height=360, elem_id="batch-gallery")
                batch_zip = gr.File(label="All results (zip)", interactive=False, elem_id="batch-zip")
                batch_errors = gr.Textbox(label="Problems", interactive=False, lines=3, elem_id="batch-errors")

        edit_submitted = gr.State(None)
        batch_submitted = gr.State(None)
        # Recording the submit time needs no queue: a Stop pressed while the job waits still counts.
        edit_button.click(submitted, outputs=edit_submitted, queue=False, api_visibility="private").then(
            run_edit,
            inputs=[source, instruction, *edit_settings, edit_submitted],
            outputs=[result, downloads, status, edit_settings[6]],
            show_progress_on=result,
            concurrency_id="device",
            concurrency_limit=settings.concurrency,
            api_name="edit",
        )
        edit_stop.click(stop_edit, outputs=status, queue=False, api_visibility="private")
        batch_button.click(submitted, outputs=batch_submitted, queue=False, api_visibility="private").then(
            run_batch,
            inputs=[batch_files, batch_instructions, *batch_settings, batch_submitted],
            outputs=[gallery, batch_zip, batch_status, batch_errors],
            show_progress_on=gallery,
            concurrency_id="device",
            concurrency_limit=settings.concurrency,
            api_name="batch",
        )
        batch_stop.click(stop_batch, outputs=batch_status, queue=False,
                         api_visibility="private")  # fmt: skip
        timer = gr.Timer(settings.refresh_s)
        timer.tick(web.device_panel, outputs=panel, queue=False, show_progress="hidden", api_visibility="private")

    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.max_queue)
    demo.web_editor = web  # for tests and for launch()
    return demo


def launch(demo: gr.Blocks, settings: WebSettings, *, block: bool = True) -> None:
    """Serve the app with the safety settings (bind address, auth, upload limit, results dir)."""
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        auth=[settings.auth] if settings.auth else None,
        auth_message="HiDream editor: sign in" if settings.auth else None,
        max_file_size=settings.max_upload_bytes,
        allowed_paths=[str(settings.results_dir.resolve())],
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        quiet=False,
        prevent_thread_lock=not block,
        css=CSS,
    )


# ---------------------------------------------------------------------------------------------
# Command line (gradio_demo_npu.py)


def build_parser(model: str) -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="gradio_demo_npu.py",
        description="Web editor for HiDream-E1.1 / E1-Full on Ascend NPU, CUDA or CPU.",
        epilog="Example: %(prog)s --tiny --port 7860 (then open http://127.0.0.1:7860)",
    )
    parser.add_argument("--model", choices=MODELS, default="e1.1", help="which model to serve (default e1.1)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    server.add_argument("--auth", help=f"user:password required to use the app (env {AUTH_ENV})")
    server.add_argument("--results-dir", default="results", help="where results are written (default results)")
    server.add_argument("--concurrency", type=int, default=1,
                        help="jobs taken from the queue at once (default 1; the model runs one edit at a time "
                             "whatever this says, so more only overlaps decoding and saving)")  # fmt: skip
    server.add_argument("--max-queue", type=int, default=8, help="jobs that may wait; more get 'busy' (default 8)")
    server.add_argument("--max-upload-mb", type=int, default=50, help="largest upload in MiB (default 50)")
    server.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels (default 40M)")
    server.add_argument("--max-batch", type=int, default=32, help="most images in one batch (default 32)")
    server.add_argument("--refresh", type=float, default=5.0, help="device panel refresh in seconds (default 5)")
    server.add_argument("--verbose", action="store_true", help="log details (INFO)")
    add_model_arguments(parser, model)
    return parser


def web_settings_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> WebSettings:
    auth = parse_auth(args.auth, "--auth") if args.auth else parse_auth(env.get(AUTH_ENV), AUTH_ENV)
    for name, value, low in (("--concurrency", args.concurrency, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-upload-mb", args.max_upload_mb, 1), ("--max-pixels", args.max_pixels, 1),
                             ("--max-batch", args.max_batch, 1)):  # fmt: skip
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    if not 0.5 <= args.refresh <= 3600:
        raise UserError(f"--refresh must be between 0.5 and 3600 seconds, got {args.refresh:g}")
    results_dir = Path(args.results_dir).expanduser()
    if results_dir.exists() and not results_dir.is_dir():
        raise UserError(f"--results-dir {results_dir} is not a directory")
    return WebSettings(
        results_dir=results_dir.resolve(),
        host=args.host,
        port=args.port,
        auth=auth,
        concurrency=args.concurrency,
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_batch=args.max_batch,
        refresh_s=args.refresh,
    )


def parse_command_line(argv: Sequence[str], env: Mapping[str, str]) -> tuple[str, argparse.Namespace, WebSettings]:
    """(model, args, web settings); bad flags exit 2 with one line, bad values raise UserError."""
    pre = OneLineArgumentParser(prog="gradio_demo_npu.py", add_help=False)
    pre.add_argument("--model", choices=MODELS, default="e1.1")
    known, _ = pre.parse_known_args(argv)
    args = build_parser(known.model).parse_args(argv)
    return args.model, args, web_settings_from_args(args, env)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Parse, load the model once, build and serve. Exit 2 on a user mistake (one line), 130 on Ctrl-C."""
    env = os.environ if env is None else env
    argv = sys.argv[1:] if argv is None else list(argv)
    model, args, settings = (None, None, None)
    try:
        model, args, settings = parse_command_line(argv, env)
        configure_logging(args.verbose)
        editor_settings: EditorSettings = settings_from_args(args, model, env)
        if settings.host not in LOOPBACK_HOSTS and settings.auth is None:
            print(f"warning: serving on {settings.host} without --auth: anyone who can reach it can use the device",
                  file=sys.stderr)  # fmt: skip
        print(f"loading {MODEL_TITLES[model]}...", file=sys.stderr, flush=True)
        editor = Editor.load(editor_settings)
        demo = build_app(editor, settings)
        launch(demo, settings)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the port is taken or the address cannot be bound
        print(f"error: cannot serve on {settings.host}:{settings.port}: {exc}" if settings else f"error: {exc}",
              file=sys.stderr)  # fmt: skip
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    return 0
