"""The web editor's service: everything the web UI does, without gradio.

Everything a button does is a plain method of `WebEditor` that takes plain values (file paths,
strings, numbers) and returns plain values, so tests call them directly with the tiny model;
`hidream_edit.web.layout` only wires gradio components to those methods. The model is loaded once,
by the caller, before the app is built; importing this module loads nothing and reads no
environment (the entry script hands its environment in).

Safety defaults: the server binds 127.0.0.1, auth is optional (flag or HIDREAM_GRADIO_AUTH),
uploads are limited in bytes and pixels, texts in characters, zip archives are read entry by entry
with limits (never extracted to disk), results are written only under the results directory with
unique names and only files the app wrote are published for download, a stopped, cancelled or
abandoned job saves nothing, and every failure reaches the browser as one readable line
(tracebacks go to the server log only).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import os
import pwd
import re
import secrets
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from stat import S_ISDIR
from typing import Any, TypeVar

import torch
from PIL import Image

import hidream_edit
from hidream_edit.editor import USER_ERRORS, EditCancelled, Editor, EditRequest, EditResult, save_result
from hidream_edit.errors import UserError
from hidream_edit.images import open_image
from hidream_edit.instructions import InstructionRewriteError, VLMSettings, compose_e1_full_prompt
from hidream_edit.spec import MAX_PROMPT_CHARS
from hidream_edit.step_cache import CacheSettings

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ZIP_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
RANDOM_SEED_LIMIT = 2**31  # stays exact in the browser's numbers, so a random seed can be typed back in
DEVICE_BUSY = "waiting for the device (another edit is running)"
PREVIEW_SIDE = 1024
LISTED_PROBLEMS = 20  # problems the page lists one per line; a zip of 20,000 text files must not send them all
LISTED_SKIPPED_ENTRIES = 3  # non-image zip entries named one by one; more are summarised in one line
CODE_DIR = Path(hidream_edit.__file__).resolve().parent.parent  # the repository (or site-packages) holding the code

T = TypeVar("T")


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
    vlm: VLMSettings | None = None  # E1-Full: the endpoint that may rewrite instructions
    vlm_fallback: bool = False  # a failed rewrite goes on with the bare instruction (as the CLI's flag)
    max_results_gb: float = 10.0  # the app's results are pruned, oldest first, beyond this many GiB (0: no bound)
    keep_results_hours: float = 168.0  # and once older than this (0: kept however old)
    cache: CacheSettings = CacheSettings()  # the step cache the advanced settings start from (--cache flags)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 2**20

    @property
    def max_results_bytes(self) -> int | None:
        return int(self.max_results_gb * 2**30) if self.max_results_gb > 0 else None

    @property
    def keep_results_s(self) -> float | None:
        return self.keep_results_hours * 3600 if self.keep_results_hours > 0 else None


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


def check_results_dir(path: Path, homes: Iterable[Path], code_dir: Path = CODE_DIR) -> None:
    """Refuse a results dir that would put results beside (and next to served) files that are not ours.

    A filesystem root, a home directory (or a folder holding one) and a folder holding the code
    are refused; a folder inside any of them is fine.
    """
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise UserError(f"--results-dir {path} is a filesystem root; give the results a folder of their own")
    for home in homes:
        if home.resolve().is_relative_to(resolved):
            raise UserError(f"--results-dir {path} is or holds the home directory {home}; "
                            f"give the results a folder of their own, e.g. {home / 'hidream-results'}")
    if code_dir.resolve().is_relative_to(resolved):
        raise UserError(f"--results-dir {path} holds the code ({code_dir}); "
                        f"give the results a folder of their own, e.g. {code_dir / 'results'}")


def home_dirs(env: Mapping[str, str]) -> list[Path]:
    """The home directories to keep results out of: $HOME and this user's entry in the password database."""
    homes = [Path(env["HOME"])] if env.get("HOME") else []
    with contextlib.suppress(KeyError):  # a uid without an entry (some containers)
        homes.append(Path(pwd.getpwuid(os.getuid()).pw_dir))
    return homes


def check_text_length(name: str, text: str | None, limit: int = MAX_PROMPT_CHARS) -> None:
    """Refuse a text the encoders would cut anyway, before it costs decoding, encoding or disk."""
    if text is not None and len(text) > limit:
        raise UserError(f"the {name} is {len(text)} characters long; the limit is {limit}")


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


# What unique_result_path and the batch name: <kind>-<date>-<time>-<8 hex> (then -<stem>.png, .png.json or .zip).
_RESULT_NAME = re.compile(r"^((?:edit|batch)-\d{8}-\d{6}-[0-9a-f]{8})(?:-.*|\.zip)?$")


def _size_and_time(path: Path) -> tuple[int, float]:
    """Bytes of the files at or under `path` (links not followed) and its modification time."""
    stat = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return stat.st_size, stat.st_mtime
    files = (child.lstat() for child in path.rglob("*"))
    return sum(child.st_size for child in files if not S_ISDIR(child.st_mode)), stat.st_mtime


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def prune_results(
    results_dir: Path, max_bytes: int | None, max_age_s: float | None, keep: Iterable[str] = (),
    now: float | None = None,
) -> list[str]:
    """Remove the app's results beyond an age and, oldest first, beyond a total size; returns what went.

    Only names the app gives its results count (an edit's image and JSON, a batch's folder and zip, each
    group removed together); other files in the folder are never touched. `keep` names results in use.
    """
    now = time.time() if now is None else now
    groups: dict[str, list[Path]] = {}
    with contextlib.suppress(OSError):
        for path in results_dir.iterdir():
            match = _RESULT_NAME.match(path.name)
            if match:
                groups.setdefault(match.group(1), []).append(path)
    sized: list[tuple[float, int, str]] = []
    for name, paths in groups.items():
        try:
            measured = [_size_and_time(path) for path in paths]
        except OSError:  # removed meanwhile
            continue
        sized.append((max(when for _, when in measured), sum(size for size, _ in measured), name))
    sized.sort()
    total = sum(size for _, size, _ in sized)
    removed: list[str] = []
    for when, size, name in sized:
        too_old = max_age_s is not None and now - when > max_age_s
        too_big = max_bytes is not None and total > max_bytes
        if name in keep or not (too_old or too_big):
            continue
        try:
            for path in groups[name]:
                _remove(path)
        except OSError as exc:
            logger.warning("cannot remove the old result %s: %s", name, exc)
            continue
        total -= size
        removed.append(name)
    if removed:
        logger.info("removed %d old results from %s", len(removed), results_dir)
    return removed


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


def cache_label(cache: Mapping[str, Any]) -> str:
    """'dbcache (threshold 0.08, warm-up 8, no max-skip)' or 'off'."""
    if cache.get("mode", "off") == "off":
        return "off"
    max_skip = f"max-skip {cache['max_skip']}" if cache.get("max_skip") else "no max-skip"
    return f"{cache['mode']} (threshold {cache['threshold']:g}, warm-up {cache['warmup']}, {max_skip})"


def cache_outcome(metadata: Mapping[str, Any]) -> str:
    """', dbcache cached 9 of 28 steps' for a status line; nothing when the edit ran uncached."""
    cache = metadata.get("cache") or {}
    if cache.get("mode", "off") == "off":
        return ""
    return f", {cache['mode']} cached {cache['cached_steps']} of {cache['steps']} steps"


def device_panel_markdown(
    report: Mapping[str, Any], last: Mapping[str, Any] | None, activity: str, load_s: float | None = None,
    cache: CacheSettings | None = None,
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
        f"**Device memory** {device_memory} · **Host memory** {_gib(memory['host_rss'])} "
        f"{'at peak (psutil missing) for' if memory.get('host_rss_is_peak') else 'used by'} this server "
        f"of {_gib(memory['host_total'])}",
        f"**Now** {activity}",
    ]
    placement = report.get("placement")
    if placement:
        peaks = ", ".join(f"{where} {_gib(peak)}" for where, peak in placement["predicted_peak_bytes"].items())
        lines.insert(1, f"**Memory plan** {placement['name']} (asked {placement['asked']}) · predicted peak {peaks}")
    layout = report.get("layout")
    if not layout:
        lines.insert(1, "**Layout** one process")
    else:
        groups = [f"guidance ranks {layout['guidance_ranks']}" if layout["guidance_ranks"] else "",
                  f"tensor-parallel ranks {layout['tensor_ranks']}" if layout["tensor_ranks"] else ""]
        lines.insert(1, f"**Layout** cfg {layout['cfg_parallel']} x tp {layout['tensor_parallel']} under torchrun · "
                        f"this server edits with {' and '.join(group for group in groups if group)} · "
                        f"text encoders here: {', '.join(layout['text_encoders_here']) or 'none'}")
    if cache is not None:
        lines.append(f"**Step cache** {cache_label(cache.as_dict())} by default (Advanced settings change it per edit)")
    if last:
        lines.append(f"**Last edit** {timing_summary(last)}{cache_outcome(last)}")
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
# Stop requests and cancelled jobs

EDIT_JOBS = "edit"
BATCH_JOBS = "batch"


def stop_key(session_hash: str | None, kind: str) -> str:
    """The stop-registry key of one kind of job (edit or batch) of one browser session."""
    return f"{session_hash}:{kind}"


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


async def run_cancellable(work: Callable[[Callable[[], bool]], T], should_stop: Callable[[], bool]) -> T:
    """Run a blocking job in a worker thread, stoppable by `should_stop` and by cancelling this task.

    A thread cannot be killed, and a server that cancels the task awaiting it (a client's cancel)
    would otherwise let the job run to the end and save its result. Here the cancellation turns the
    job's stop check true, so it stops at its next step and saves nothing; the task ends at once.
    """
    cancelled = threading.Event()

    def stop() -> bool:
        return cancelled.is_set() or should_stop()

    try:
        return await asyncio.to_thread(work, stop)
    except asyncio.CancelledError:
        cancelled.set()
        logger.info("a job was cancelled by its client; it stops at its next step and saves nothing")
        raise


# ---------------------------------------------------------------------------------------------
# Results of the callbacks (plain values the Gradio layer maps to components)


@dataclass
class EditOutcome:
    status: str
    image_path: Path | None = None
    json_path: Path | None = None
    seed: int | None = None
    metadata: dict[str, Any] | None = None
    prompt: str | None = None  # what the model was given (E1-Full: the composed or rewritten form)

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
        """The problems for the page: the first LISTED_PROBLEMS, then a count (the batch's errors.txt has all)."""
        lines = [f"{name}: {message}" for name, message in self.errors[:LISTED_PROBLEMS]]
        if len(self.errors) > LISTED_PROBLEMS:
            lines.append(f"... and {len(self.errors) - LISTED_PROBLEMS} more")
        return "\n".join(lines)


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
    rewrite: bool = False
    cache: str | None = None  # None or "": the server's default (WebSettings.cache), as are the three below
    cache_threshold: float | None = None
    cache_warmup: float | int | None = None
    cache_max_skip: float | int | None = None


ProgressFn = Callable[[float, str], None]
PublishFn = Callable[[list[Path]], None]


# ---------------------------------------------------------------------------------------------
# The callbacks


class WebEditor:
    """The app's state: one Editor, the limits, the device lock, stop requests and what runs now.

    `publish` is told every file the app writes for download (and nothing else); the layout makes
    exactly those files downloadable, so a file someone else put in the results dir never is.
    """

    def __init__(self, editor: Editor, settings: WebSettings, publish: PublishFn | None = None) -> None:
        self.editor = editor
        self.settings = settings
        self.model = editor.settings.model
        self.spec = editor.settings.spec
        self.stops = StopRegistry()
        self._publish = publish or (lambda paths: None)
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
        self._results_lock = threading.Lock()
        self._results_in_use: set[str] = set()
        self.prune_results()

    def prune_results(self) -> list[str]:
        """Keep the results folder within --max-results-gb and --keep-results-hours (results in use stay)."""
        with self._results_lock:
            return prune_results(self.settings.results_dir, self.settings.max_results_bytes,
                                 self.settings.keep_results_s, set(self._results_in_use))

    @contextlib.contextmanager
    def _result_in_use(self, path: Path) -> Iterator[None]:
        """While a job writes or hands out a result, pruning leaves it alone."""
        match = _RESULT_NAME.match(path.name)
        name = match.group(1) if match else path.name
        with self._results_lock:
            self._results_in_use.add(name)
        try:
            yield
        finally:
            with self._results_lock:
                self._results_in_use.discard(name)

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
        return device_panel_markdown(report, self.editor.last_metadata, self.activity, self.editor.load_s,
                                     self.settings.cache)

    def stop_session(self, session_hash: str | None) -> None:
        """The page went away (tab closed or reloaded): its running and waiting jobs stop, saving nothing."""
        for kind in (EDIT_JOBS, BATCH_JOBS):
            self.stops.request(stop_key(session_hash, kind))

    # --- checks and requests ---------------------------------------------------------------------

    @staticmethod
    def check_texts(instructions: Iterable[str], params: EditParams) -> None:
        """Refuse overlong texts first, before any upload is decoded or the device is waited for."""
        for instruction in instructions:
            check_text_length("instruction", instruction)
        check_text_length("negative instruction", params.negative)
        check_text_length("target image description", params.target_description)

    def preview(self, path: str | Path | None) -> tuple[Image.Image | None, str]:
        """The source preview: the upload opened with the app's own checks and shrunk for the page, or why not."""
        if not path:
            return None, ""
        name = _display_name(path)
        try:
            image = self._open(Path(path), name)
        except Exception as exc:
            return None, f"Error: {error_message(exc)}"
        size = f"{image.width}x{image.height}"
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        return image, f"{name}: {size} pixels, ready to edit"

    def _prompt(
        self, image: Image.Image, instruction: str, params: EditParams, progress: ProgressFn | None
    ) -> tuple[str, str | None]:
        """(prompt for the model, note for the status). E1-Full builds its prompt form, maybe with the VLM.

        Precedence and failure as in the CLI: a prompt already in form is kept, a target description
        builds the form, else the VLM writes it when asked; a failed rewrite is an error, or with
        the fallback flag the bare instruction (and the note says so).
        """
        if not self.spec.prompt_form:
            return instruction, None
        target = (params.target_description or "").strip() or None
        vlm = None
        if params.rewrite:
            vlm = self.settings.vlm
            if vlm is None:
                raise UserError("the instruction rewrite needs a server started with --vlm-url and --vlm-model")
            if target is None and progress is not None:
                progress(0.0, f"rewriting the instruction with {vlm.model}")
        try:
            return compose_e1_full_prompt(instruction, image, target, vlm), None
        except InstructionRewriteError as exc:
            if vlm is None or not self.settings.vlm_fallback:
                raise
            logger.warning("instruction rewrite failed (%s); going on with the bare instruction", exc)
            return instruction, f"the instruction rewrite failed ({exc}); edited with the bare instruction"

    def _request(self, image: Image.Image, prompt: str, params: EditParams, seed: int) -> EditRequest:
        return EditRequest(
            image=image,
            instruction=prompt,
            negative=params.negative,
            steps=_as_int(params.steps, "steps"),
            guidance=_as_float(params.guidance, "guidance"),
            image_guidance=_as_float(params.image_guidance, "image guidance"),
            refine_strength=_as_float(params.refine_strength, "refine strength"),
            clip_cfg_norm=params.clip_cfg_norm,
            seed=seed,
            keep_aspect=bool(params.keep_aspect),
            **self._cache_fields(params),
        )

    def _cache_fields(self, params: EditParams) -> dict[str, Any]:
        """The request's step cache: the page's values, the server's default where the page leaves one empty."""
        default = self.settings.cache
        threshold = _as_float(params.cache_threshold, "cache threshold")
        warmup = _as_int(params.cache_warmup, "cache warm-up")
        max_skip = _as_int(params.cache_max_skip, "cache max-skip")
        return {
            "cache": params.cache or default.mode,
            "cache_threshold": default.threshold if threshold is None else threshold,
            "cache_warmup": default.warmup if warmup is None else warmup,
            "cache_max_skip": default.max_skip if max_skip is None else max_skip,
        }

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
        """Validate, then wait for the device and edit; checks Stop before starting, between steps and after."""
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
            result = self.editor.edit(request, on_step=on_step, should_stop=should_stop)
        finally:
            self._set_activity("idle")
            self._device.release()
        if should_stop():  # a stop that came during the last step still means "save nothing"
            raise EditCancelled("stopped after the last step")
        return result

    # --- one edit ------------------------------------------------------------------------------------

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
        prompt: str | None = None
        try:
            self.check_texts([instruction or ""], params)
            if not image_path:
                raise UserError("upload an image first")
            instruction = (instruction or "").strip()
            if not instruction:
                raise UserError("the instruction is empty")
            name = _display_name(image_path)
            source = self._open(Path(image_path), name)
            seed = self.choose_seed(params)
            self.editor.resolve(self._request(source, instruction, params, seed))  # before the VLM is asked
            prompt, note = self._prompt(source, instruction, params, progress)
            request = self._request(source, prompt, params, seed)

            def on_step(done: int, total: int) -> None:
                self._set_activity(f"editing {name}: step {done} of {total}{_then(done, total)}")
                if progress is not None:
                    progress(done / total, f"step {done} of {total}")

            def on_start() -> None:
                if progress is not None:
                    progress(0.0, "encoding the instruction and the image")

            result = self._run(request, should_stop, on_step, name, progress, on_start)
            target = unique_result_path(self.settings.results_dir, "edit", name)
            with self._result_in_use(target):
                image_path_out, json_path = save_result(result, target)
                self._publish([image_path_out, json_path])
                self.prune_results()
        except EditCancelled as exc:
            return EditOutcome(f"{_sentence(str(exc))}; nothing was saved.", seed=seed, prompt=prompt)
        except Exception as exc:
            return EditOutcome(f"Error: {error_message(exc)}", seed=seed, prompt=prompt)
        elapsed = time.perf_counter() - started
        status = (
            f"Done in {_fmt_seconds(elapsed)} with seed {seed}: {timing_summary(result.metadata)}"
            f"{cache_outcome(result.metadata)}. Saved {image_path_out.name}"
        )
        if note:
            status += f" ({note})"
        return EditOutcome(status, image_path_out, json_path, seed, result.metadata, prompt)

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
        not_images: list[str] = []
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
                        not_images.append(entry)
                        continue
                    if len(items) >= self.settings.max_batch:
                        raise UserError(f"holds more than {self.settings.max_batch} images, the batch limit")
                    if info.file_size > limit:
                        errors.append((label, f"skipped: {info.file_size / 2**20:.1f} MiB is over the "
                                              f"{self.settings.max_upload_mb} MiB limit"))
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
        if len(not_images) <= LISTED_SKIPPED_ENTRIES:
            errors.extend((f"{name}/{entry}", "skipped: not an image file") for entry in not_images)
        else:
            first = ", ".join(not_images[:LISTED_SKIPPED_ENTRIES])
            errors.append((name, f"skipped {len(not_images)} entries that are not image files ({first}, "
                                 f"and {len(not_images) - LISTED_SKIPPED_ENTRIES} more)"))
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
        errors: list[tuple[str, str]] = []
        try:
            # one line per image at most: a longer text is refused before it is even split
            check_text_length("instruction text", instructions, self.settings.max_batch * (MAX_PROMPT_CHARS + 1))
            self.check_texts((instructions or "").splitlines(), params)
            items, errors = self.collect_batch(paths)
            if not items:
                reasons = "; ".join(f"{name}: {message}" for name, message in errors[:3])
                raise UserError(f"no images to edit ({reasons})" if reasons else "no images to edit")
            lines = self.instructions_for(instructions, len(items))
            # settings wrong for every image fail once, here, not once per image (the VLM is not asked here)
            probe = Image.new("RGB", (16, 16))
            first, _ = self._prompt(probe, lines[0], replace(params, rewrite=False), None)
            self.editor.resolve(self._request(probe, first, params, self.choose_seed(params)))
            batch_dir = _inside(self.settings.results_dir, self.settings.results_dir / f"batch-{_token()}")
            batch_dir.mkdir()
        except Exception as exc:
            return BatchOutcome(f"Error: {error_message(exc)}", errors=errors)

        with self._result_in_use(batch_dir):
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
                    prompt, note = self._prompt(image, instruction, params, progress)
                    entry["prompt"] = prompt
                    if note:
                        entry["note"] = note
                    request = self._request(image, prompt, params, seed)

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
                    self._publish([image_path])
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
            zip_path, no_zip = None, "no zip (nothing was edited)"
            if gallery:
                try:
                    zip_path = self._zip(batch_dir)
                except OSError as exc:  # the edited images stay in the gallery and the batch folder
                    no_zip = f"no zip (cannot write it: {exc.strerror or exc})"
                else:
                    self._publish([zip_path])

            elapsed = time.perf_counter() - started
            parts = [f"{len(gallery)} of {count} images edited in {_fmt_seconds(elapsed)}"]
            if errors:
                parts.append(f"{len(errors)} problem{'s' if len(errors) != 1 else ''} (listed below)")
            if stopped is not None:
                parts.append(f"stopped at {stopped}")
            parts.append(f"zip: {zip_path.name}" if zip_path else no_zip)
            self.prune_results()
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
