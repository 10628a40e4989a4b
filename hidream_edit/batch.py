"""Batch editing: many images from a folder or a JSON Lines manifest, resumable, shared across ranks.

The whole batch is read and checked before any model loads, so a bad manifest line stops the run with
its line number (exit 2) instead of an hour in. Then one Editor edits the items one by one; an image
that fails is recorded as failed and the batch goes on. An output whose metadata JSON says it was made
with the same request (settings, weights, dtype and the source file's SHA-256) and whose image still
has the checksum recorded there is skipped, so rerunning a killed batch finishes only what is missing;
a different existing file is never replaced without --overwrite. One batch at a time writes into an
output folder (a lock file there). Under torchrun every rank takes the next item number from a counter
in the rendezvous store, so a fast rank simply takes more items and a slow one holds nobody back; rank
0 holds the lock and merges every rank's records into summary.json.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hidream_edit.config import DistributedEnvironment
from hidream_edit.editor import (
    IMAGE_FORMATS,
    EditCancelled,
    EditRequest,
    check_can_create,
    check_name_length,
    check_output_path,
    file_sha256,
    image_format_for,
    metadata_path,
    resolve_request,
    target_problem,
)
from hidream_edit.errors import GuidanceGroupError, ImageInputError, UserError
from hidream_edit.images import check_image_file
from hidream_edit.spec import ModelSpec, is_e1_full_form
from hidream_edit.text import check_path_text, shown

if TYPE_CHECKING:
    from device_utils import DeviceManager
    from hidream_edit.distributed import EditGroup, RankGroup
    from hidream_edit.editor import Editor, EditorSettings
    from hidream_edit.tensor_parallel import ParallelLayout

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
LOCK_NAME = ".hidream-batch.lock"
MAX_MANIFEST_BYTES = 256 * 2**20
MAX_METADATA_BYTES = 16 * 2**20
"""An output's metadata JSON is a few kB; resume reads at most this much of one."""
MAX_LISTED_PROBLEMS = 20
OK, FAILED, SKIPPED = "ok", "failed", "skipped"

# Manifest keys and the JSON types each accepts; "target_description" only for models with a prompt form.
TEXT_KEYS = ("image", "instruction", "output", "negative", "target_description")
INTEGER_KEYS = ("seed", "steps")
NUMBER_KEYS = ("guidance", "image_guidance", "refine_strength")
REQUIRED_KEYS = ("image", "instruction")
COMMON_KEYS = ("image", "instruction", "output", "negative", *INTEGER_KEYS, *NUMBER_KEYS)


class BatchError(UserError):
    """Everything wrong with a batch, found before loading; each problem is one line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}")

    def lines(self) -> list[str]:
        shown = self.problems[:MAX_LISTED_PROBLEMS]
        hidden = len(self.problems) - len(shown)
        return shown + ([f"... and {hidden} more problems"] if hidden else [])


@dataclass(frozen=True)
class BatchItem:
    """One edit of the batch: a resolved request (its image is the source path) and where it goes."""

    index: int
    label: str  # "manifest.jsonl line 3" or the image's path below --input-dir, for messages
    request: EditRequest
    output: Path

    @property
    def image(self) -> Path:
        return Path(str(self.request.image))


@dataclass
class ItemRecord:
    """What happened to one item in this run."""

    index: int
    label: str
    image: str
    output: str
    status: str
    seconds: float  # measured for every item, a skipped one too, so it has no default
    error: str | None = None
    rank: int = 0


def supported_extensions() -> str:
    return ", ".join(sorted(ext.lstrip(".") for ext in IMAGE_FORMATS))


def e1_full_prompt(instruction: str, target_description: str | None) -> str:
    """E1-Full's prompt form from an instruction and a description (as given if already in form)."""
    from hidream_edit.instructions import format_e1_full_prompt

    if target_description is None or is_e1_full_form(instruction):
        return instruction
    return format_e1_full_prompt(instruction, target_description)


def _folder_exists(path: Path, flag: str) -> bool:
    """True for an existing folder, False when nothing is there; a UserError for anything else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:  # a name too long, a file where a folder is expected on the way, ...
        raise UserError(f"{flag} {shown(path)} cannot be used ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(mode):
        raise UserError(f"{flag} {shown(path)} exists and is not a folder")
    return True


def _check_output_dir(output_dir: Path) -> None:
    _folder_exists(output_dir, "--output-dir")


def real_path(path: Path) -> Path:
    """`path` with every symbolic link resolved as far as it exists (never raises, unlike Path.resolve)."""
    return Path(os.path.realpath(path))


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes; else a UserError saying what it is.

    Opened without blocking and judged by what was opened (links followed), so a named pipe cannot hang
    the run and a link to /dev/zero cannot fill the memory.
    """
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError("file not found") from None
    except OSError as exc:
        raise UserError(f"cannot read ({exc.strerror or exc})") from exc
    with os.fdopen(handle, "rb") as stream:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):
            raise UserError("is not a regular file")
        if status.st_size > limit:
            raise UserError(f"is {status.st_size} bytes; at most {limit} are read")
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"is more than {limit} bytes")
    return data


def folder_items(
    input_dir: Path, output_dir: Path, recursive: bool, template: EditRequest, spec: ModelSpec, fuse_lora: bool
) -> list[BatchItem]:
    """Every supported image in `input_dir` (sorted by path; sub-folders with `recursive`), one request.

    Outputs keep each image's path below the input folder. Hidden files and anything inside the output
    folder are left out, so outputs written into a sub-folder are never read back as inputs.
    """
    if not _folder_exists(input_dir, "--input-dir"):
        raise UserError(f"--input-dir {shown(input_dir)} is not a folder")
    _check_output_dir(output_dir)
    input_root, output_root = real_path(input_dir), real_path(output_dir)
    if output_root == input_root:
        raise UserError("--output-dir must differ from --input-dir (outputs keep the input file names)")
    if input_root.is_relative_to(output_root):
        raise UserError(
            f"--input-dir {shown(input_dir)} is inside --output-dir {shown(output_dir)}, whose files are never "
            "read as inputs; choose an --output-dir outside the input folder"
        )
    request = resolve_request(template, spec, fuse_lora)
    candidates = input_dir.rglob("*") if recursive else input_dir.iterdir()
    sources = []
    for path in candidates:
        relative = path.relative_to(input_dir)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() not in IMAGE_FORMATS:
            continue
        if not path.is_file() or real_path(path).is_relative_to(output_root):
            continue
        sources.append(relative)
    if not sources:
        hint = "" if recursive else " (sub-folders need --recursive)"
        raise UserError(f"no images ({supported_extensions()}) in {shown(input_dir)}{hint}")
    sources.sort(key=lambda relative: relative.as_posix())
    return [
        BatchItem(index, shown(relative.as_posix()), replace(request, image=input_dir / relative),
                  output_dir / relative)
        for index, relative in enumerate(sources)
    ]


def _json_shown(value: Any) -> str:
    """A JSON value for a message, cut to a line's worth."""
    try:
        return shown(json.dumps(value))
    except (TypeError, ValueError, RecursionError):
        return "<unprintable>"


def _check_line_keys(data: Any, spec: ModelSpec) -> dict[str, Any]:
    """A parsed manifest line's keys and value types; raises UserError naming the first problem."""
    if not isinstance(data, dict):
        raise UserError(f"expected a JSON object, got {type(data).__name__}")
    known = [key for key in (*TEXT_KEYS, *INTEGER_KEYS, *NUMBER_KEYS) if spec.prompt_form or key in COMMON_KEYS]
    for key in data:
        if key == "target_description" and not spec.prompt_form:
            raise UserError(f"unknown key 'target_description' (E1-Full's prompt form; {spec.title} has none)")
        if key not in known:
            raise UserError(f"unknown key '{shown(key)}'; use {', '.join(known)}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise UserError(f"missing {' and '.join(repr(key) for key in missing)}")
    for key, value in data.items():
        if key in TEXT_KEYS and not isinstance(value, str):
            raise UserError(f"{key!r} must be a string, got {_json_shown(value)}")
        if key in INTEGER_KEYS and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{key!r} must be an integer, got {_json_shown(value)}")
        if key in NUMBER_KEYS and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise UserError(f"{key!r} must be a number, got {_json_shown(value)}")
    return data


def _output_path(output_dir: Path, name: str) -> Path:
    check_path_text("output", name)
    relative = Path(name)
    if not name.strip() or relative.is_absolute() or ".." in relative.parts:
        raise UserError(f"output '{shown(name)}' must be a relative path inside --output-dir")
    image_format_for(relative)
    check_name_length(output_dir / relative)
    return output_dir / relative


def _manifest_item(
    line: bytes, label: str, base: Path, output_dir: Path, template: EditRequest, spec: ModelSpec, fuse_lora: bool
) -> BatchItem | None:
    """One manifest line as an item (index set later), None for a blank line; UserError if it is wrong."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text") from None
    if not text.strip():
        return None
    try:
        data = _check_line_keys(json.loads(text), spec)
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise UserError("not usable JSON (nested too deeply)") from None
    check_path_text("image", data["image"])
    image = base / Path(data["image"]).expanduser()
    try:
        check_image_file(image, f"image '{shown(data['image'])}' ({shown(image)})")
    except ImageInputError as exc:
        raise UserError(str(exc)) from None
    output = _output_path(output_dir, data.get("output", image.name))
    fields = {key: data[key] for key in (*INTEGER_KEYS, *NUMBER_KEYS, "negative") if key in data}
    prompt = e1_full_prompt(data["instruction"], data.get("target_description"))
    request = resolve_request(replace(template, image=image, instruction=prompt, **fields), spec, fuse_lora)
    return BatchItem(0, label, request, output)


def manifest_items(
    manifest: Path, output_dir: Path, template: EditRequest, spec: ModelSpec, fuse_lora: bool
) -> list[BatchItem]:
    """Read and check a whole JSON Lines manifest; raise BatchError listing every problem by line.

    Keys a line leaves out take the command line's values (its flags or the model's defaults). Image
    paths are relative to the manifest's folder, outputs relative to `output_dir`; an output defaults
    to the image's file name. Images are checked to be regular files; unreadable pixels fail that
    item later.
    """
    try:
        raw = read_regular_file(manifest, MAX_MANIFEST_BYTES)
    except UserError as exc:
        raise UserError(f"--manifest {shown(manifest)}: {exc}") from None
    _check_output_dir(output_dir)
    problems: list[str] = []
    items: list[BatchItem] = []
    output_lines: dict[str, str] = {}
    for number, line in enumerate(raw.splitlines(), 1):
        label = f"{shown(manifest.name)} line {number}"
        try:
            item = _manifest_item(line, label, manifest.parent, output_dir, template, spec, fuse_lora)
        except UserError as exc:
            problems.append(f"{label}: {exc}")
            continue
        if item is None:
            continue
        key = os.path.normcase(os.path.normpath(item.output))
        if key in output_lines:
            problems.append(f"{label}: output {shown(item.output)} is also the output of {output_lines[key]}")
            continue
        output_lines[key] = label
        items.append(replace(item, index=len(items)))
    inputs = {real_path(item.image): item.label for item in items}
    for item in items:
        if real_path(item.output) in inputs:
            problems.append(
                f"{item.label}: output {shown(item.output)} is the input image of {inputs[real_path(item.output)]}"
            )
    if not items and not problems:
        problems.append(f"{shown(manifest)}: no edits (the manifest is empty)")
    if problems:
        raise BatchError(problems)
    return items


def check_inside(items: list[BatchItem], output_dir: Path) -> None:
    """A BatchError for every output that a symbolic link below `output_dir` would put elsewhere.

    Read-only; run before any output is read or written, on every rank.
    """
    root = real_path(output_dir)
    problems = []
    for item in items:
        real = real_path(item.output.parent) / item.output.name
        if not real.is_relative_to(root):
            problems.append(
                f"{item.label}: output {shown(item.output)} would be written to {shown(real)}, outside "
                "--output-dir, through a symbolic link"
            )
    if problems:
        raise BatchError(problems)


def prepare_output_folders(items: list[BatchItem]) -> None:
    """Before loading: create every output's folder and check that each output can be saved there.

    Finds what would otherwise fail each save after its edit: a read-only folder, a file name whose
    temporary name is too long, an output that is a link or a folder.
    """
    problems = []
    longest: dict[Path, BatchItem] = {}
    for item in items:
        try:
            item.output.parent.mkdir(parents=True, exist_ok=True)
            check_output_path(item.output, overwrite=True)  # whether it exists is check_outputs' business
        except OSError as exc:
            problems.append(f"{item.label}: cannot create {shown(item.output.parent)}: {exc.strerror or exc}")
            continue
        except UserError as exc:
            problems.append(f"{item.label}: {exc}")
            continue
        folder = longest.setdefault(item.output.parent, item)
        if len(os.fsencode(item.output.name)) > len(os.fsencode(folder.output.name)):
            longest[item.output.parent] = item  # its temporary name is the longest a save there uses
    for item in longest.values():
        try:
            check_can_create(item.output)
        except UserError as exc:
            problems.append(f"{item.label}: {exc}")
    if problems:
        raise BatchError(problems)


@dataclass(frozen=True)
class RunContext:
    """What, besides each request, decides the pixels of this run's outputs."""

    model: str
    model_sources: dict[str, Any]
    rng: str
    refine_weights: str
    lora_fused: bool
    dtype: str

    @classmethod
    def of(cls, settings: EditorSettings, dtype: str) -> RunContext:
        return cls(
            settings.model, settings.sources.as_dict(), settings.rng, settings.refine_weights, settings.fuse_lora, dtype
        )


def expected_metadata(item: BatchItem, context: RunContext, source_sha256: str) -> dict[str, Any]:
    """What decides an output's pixels (not placement or kernels): the metadata fields resume compares."""
    r = item.request
    return {
        "model": context.model,
        "model_sources": context.model_sources,
        "instruction": r.instruction,
        "negative": r.negative,
        "steps": r.steps,
        "guidance": r.guidance,
        "image_guidance": r.image_guidance,
        "refine_strength": r.refine_strength,
        "clip_cfg_norm": r.clip_cfg_norm,
        "seed": r.seed,
        "rng": context.rng,
        "keep_aspect": r.keep_aspect,
        "refine_weights": context.refine_weights,
        "lora_fused": context.lora_fused,
        "dtype": context.dtype,
        "source_sha256": source_sha256,
        "cache": r.cache_settings.as_dict(),
    }


def _saved_cache_settings(saved: Any) -> dict[str, Any]:
    """The step cache settings of a saved "cache" record; outputs made before step caching ran uncached."""
    from hidream_edit.step_cache import CacheSettings

    if not isinstance(saved, dict):
        return CacheSettings().as_dict()
    return {key: saved.get(key) for key in CacheSettings().as_dict()}


@dataclass(frozen=True)
class OutputState:
    """Whether an item's output is absent, already made with the same request, something else, or unusable.

    "blocked" (a link, a folder, a special file where the image or its JSON goes) is refused even with
    --overwrite, which replaces files but never writes through links.
    """

    kind: str  # "absent" | "done" | "different" | "blocked"
    reason: str = ""


def output_state(item: BatchItem, context: RunContext) -> OutputState:
    """Compare an existing output's metadata JSON with what this run would write for the item.

    Only regular files are read, the JSON with a size bound; an output counts as done when its JSON
    matches and the image still has the checksum the JSON records (a truncated image does not).
    """
    json_path = metadata_path(item.output)
    problem = target_problem(item.output) or target_problem(json_path)
    if problem is not None:
        return OutputState("blocked", problem)
    image_there, json_there = os.path.lexists(item.output), os.path.lexists(json_path)
    if not image_there and not json_there:
        return OutputState("absent")
    if not json_there:
        return OutputState("different", "it has no metadata JSON")
    if not image_there:
        return OutputState("different", f"only its metadata {shown(json_path.name)} is there")
    try:
        saved = json.loads(read_regular_file(json_path, MAX_METADATA_BYTES))
    except UserError as exc:
        return OutputState("different", f"its metadata JSON {exc}")
    except (ValueError, RecursionError):
        return OutputState("different", "its metadata JSON is unreadable")
    if not isinstance(saved, dict):
        return OutputState("different", "its metadata JSON is not an object")
    try:
        expected = expected_metadata(item, context, file_sha256(item.image))
    except OSError as exc:
        return OutputState("different", f"the source cannot be read ({exc.strerror or exc})")
    for key, value in expected.items():
        was = _saved_cache_settings(saved.get(key)) if key == "cache" else saved.get(key)
        if was != value:
            return OutputState("different", f"{key} was {_json_shown(was)}, now {_json_shown(value)}")
    recorded = saved.get("output_sha256")
    if not isinstance(recorded, str):
        return OutputState("different", "its metadata JSON records no output_sha256: saved by an older version")
    try:
        checksum = file_sha256(item.output)
    except OSError as exc:
        return OutputState("different", f"the image cannot be read ({exc.strerror or exc})")
    if checksum != recorded:
        return OutputState("different", "the image is not the one its metadata JSON describes (damaged or changed)")
    return OutputState("done")


def check_outputs(items: list[BatchItem], context: RunContext, overwrite: bool) -> list[OutputState]:
    """The state of every item's output; any blocked one, and without `overwrite` any different one, is an error."""
    states = [output_state(item, context) for item in items]
    problems = [
        f"{item.label}: {state.reason}; choose another output or remove it"
        for item, state in zip(items, states, strict=True)
        if state.kind == "blocked"
    ]
    if not overwrite:
        problems += [
            f"{shown(item.output)} exists and was not made by this request ({state.reason}); "
            "pass --overwrite to replace it or choose another --output-dir"
            for item, state in zip(items, states, strict=True)
            if state.kind == "different"
        ]
    if problems:
        raise BatchError(problems)
    return states


class ItemQueue(Protocol):
    """Hands out item numbers; under torchrun shared by all ranks, so every number goes to one rank."""

    def claim(self) -> int: ...


class LocalQueue:
    """One process: items in order."""

    def __init__(self) -> None:
        self._next = 0

    def claim(self) -> int:
        self._next += 1
        return self._next - 1


class GroupQueue:
    """Edit groups: each group's leader claims from the shared counter and tells its members the number."""

    def __init__(self, group: RankGroup, edit: EditGroup) -> None:
        self.group = group
        self.edit = edit
        self.claims = 0

    def claim(self) -> int:
        self.claims += 1
        return int(self.edit.agree(f"item{self.claims}", lambda: str(self.group.take_number("next_item"))))


class SharedQueue:
    """Ranks of a group: each claim takes the next number of a counter in the rendezvous store."""

    def __init__(self, group: RankGroup) -> None:
        self.group = group

    def claim(self) -> int:
        return self.group.take_number("next_item")


def claimed(queue: ItemQueue, count: int) -> Iterator[int]:
    while (index := queue.claim()) < count:
        yield index


def item_error_line(exc: BaseException) -> str:
    """One line for an item that failed while editing."""
    if isinstance(exc, UserError):
        return shown(exc)
    lines = str(exc).strip().splitlines()
    first = shown(lines[0], 200) if lines else ""
    if isinstance(exc, RuntimeError) and "out of memory" in first.lower():
        return f"out of device memory ({first}); try --offload model or a smaller input"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class RepeatedMessageFilter(logging.Filter):
    """Lets each distinct log message through once, so a per-edit warning is not repeated per image."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@dataclass
class BatchProgress:
    """A progress bar over images (with the current step) on the rank that shows progress."""

    total: int
    enabled: bool
    bar: Any = None
    _shown: int = field(default=0, init=False)

    def __enter__(self) -> BatchProgress:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="images", unit="image", file=sys.stderr)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def step(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"step {done}/{total}")

    def finished(self, record: ItemRecord, finished_everywhere: int | None = None) -> None:
        if record.status == FAILED:
            message = f"failed: {record.label}: {record.error}"
            if self.bar is not None:
                self.bar.write(message, file=sys.stderr)
            else:
                logger.warning("%s", message)
        if self.bar is not None:
            target = finished_everywhere if finished_everywhere is not None else self._shown + 1
            self.bar.update(max(0, target - self._shown))
            self._shown = max(self._shown, target)


def edit_item(editor: Editor, item: BatchItem, overwrite: bool, progress: BatchProgress) -> None:
    """Edit and save one item; raises on failure (the caller records it)."""
    from hidream_edit.editor import save_result

    source_sha256 = file_sha256(item.image)
    result = editor.edit(item.request, on_step=progress.step)
    if not editor.writes_outputs:
        return
    if result.metadata.get("non_finite_output"):
        raise UserError("the output contains NaN/inf (not saved); try --dtype bf16 or --dtype fp32")
    result.metadata["source_image"] = str(item.image)
    result.metadata["source_sha256"] = source_sha256
    item.output.parent.mkdir(parents=True, exist_ok=True)
    save_result(result, item.output, overwrite=overwrite)


def run_items(
    items: list[BatchItem],
    states: list[OutputState],
    load_editor: Callable[[], Editor],
    queue: ItemQueue,
    overwrite: bool,
    progress: BatchProgress,
    rank: int = 0,
    on_finished: Callable[[], int | None] | None = None,
) -> list[ItemRecord]:
    """Edit the items this process claims; a failing item is recorded and the loop goes on.

    The model is loaded before the first claim, unless every output is already done, so a rank that
    loads slowly does not sit on an item another rank could edit.
    """
    editor = load_editor() if any(state.kind != "done" for state in states) else None
    records: list[ItemRecord] = []
    once = RepeatedMessageFilter()
    editor_logger = logging.getLogger("hidream_edit.editor")
    editor_logger.addFilter(once)
    try:
        for index in claimed(queue, len(items)):
            records.append(_run_item(items[index], states[index], editor, overwrite, progress, rank))
            progress.finished(records[-1], on_finished() if on_finished is not None else None)
    finally:
        editor_logger.removeFilter(once)
    return records


def _run_item(
    item: BatchItem, state: OutputState, editor: Editor | None, overwrite: bool, progress: BatchProgress, rank: int
) -> ItemRecord:
    """Skip, or edit and save, one claimed item; any failure of the edit becomes the record's error."""
    started = time.perf_counter()
    status = OK
    error: str | None = None
    if state.kind == "done":
        status = SKIPPED
    elif editor is not None:  # loaded whenever some state is not "done"
        try:
            edit_item(editor, item, overwrite and state.kind == "different", progress)
        except (EditCancelled, GuidanceGroupError, KeyboardInterrupt):
            raise  # a lost guidance group ends the run on every rank of the group
        except Exception as exc:  # one bad image must not end the batch; the record keeps why
            status, error = FAILED, item_error_line(exc)
            logger.debug("item %s failed", item.label, exc_info=True)
            if isinstance(exc, RuntimeError):
                editor.dm.empty_cache()
    seconds = round(time.perf_counter() - started, 3)
    record = ItemRecord(item.index, item.label, str(item.image), str(item.output), status, seconds, error, rank)
    logger.info("%s %s (%.1f s)", record.status, item.label, record.seconds)
    return record


def summarize(
    records: list[ItemRecord], total: int, seconds: float, world_size: int, source: dict[str, Any], model: str
) -> dict[str, Any]:
    """summary.json's content: counts, throughput and one entry per item in batch order."""
    records = sorted(records, key=lambda record: record.index)
    counts = {status: sum(1 for r in records if r.status == status) for status in (OK, FAILED, SKIPPED)}
    return {
        "model": model,
        **source,
        "world_size": world_size,
        "items_total": total,
        "items_reported": len(records),
        "counts": counts,
        "seconds": round(seconds, 3),
        "images_per_minute": round(counts[OK] * 60.0 / seconds, 3) if seconds > 0 else 0.0,
        "items": [asdict(record) for record in records],
    }


def summary_line(summary: dict[str, Any], path: Path | None) -> str:
    """The closing line: counts, time, throughput, and where the summary is (`path` None: not written)."""
    counts = summary["counts"]
    ranks = f" on {summary['world_size']} ranks" if summary["world_size"] > 1 else ""
    where = f"summary {shown(path)}" if path is not None else "no summary written"
    return (
        f"batch: {counts[OK]} done, {counts[FAILED]} failed, {counts[SKIPPED]} skipped of {summary['items_total']}"
        f"{ranks} in {summary['seconds']:.1f} s ({summary['images_per_minute']:.2f} images/min); {where}"
    )


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Replace summary.json atomically (it describes the latest run); permissions follow the umask."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "w") as stream:
            json.dump(summary, stream, indent=2)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _write_summary_or_say_why(path: Path, summary: dict[str, Any]) -> str | None:
    """Write summary.json; if that fails, remove the previous run's (it would describe another run) and say why."""
    try:
        write_summary(path, summary)
    except OSError as exc:
        reason = f"cannot write {shown(path)} ({exc.strerror or exc})"
        try:
            path.unlink()
        except FileNotFoundError:
            return reason
        except OSError:
            return f"{reason}; the previous summary is still there and describes an earlier run"
        return f"{reason}; the previous summary was removed"
    return None


def _lock_holder(handle: int) -> str:
    """Who holds the lock, from the line its holder wrote: "process 123 on host-a", or "another process"."""
    try:
        pid, _, host = os.pread(handle, 300, 0).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        return "another process"
    if not pid.isdigit():
        return "another process"
    where = "this host" if host == socket.gethostname() else shown(host or "an unknown host", 100)
    return f"process {pid} on {where}"


@contextlib.contextmanager
def output_dir_lock(output_dir: Path) -> Iterator[None]:
    """Hold `output_dir`'s batch lock (flock on LOCK_NAME) while a batch writes there; creates the folder.

    A second batch gets a UserError naming the holder, before it loads anything. The holder removes
    the file when done; a process that locked a file just removed (the name now leads elsewhere) tries
    again, so two holders never think they hold one name. Where the filesystem cannot lock, a warning.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --output-dir {shown(output_dir)}: {exc.strerror or exc}") from exc
    path = output_dir / LOCK_NAME
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise UserError(f"cannot create files in --output-dir {shown(output_dir)}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            os.close(handle)
            raise UserError(
                f"--output-dir {shown(output_dir)} is in use by another batch ({holder}); wait for it to finish "
                "or choose another --output-dir"
            ) from None
        except OSError as exc:
            logger.warning("cannot lock %s (%s): make sure no other batch writes there", shown(path), exc.strerror)
            break
        try:
            same = os.path.samestat(os.fstat(handle), os.stat(path, follow_symlinks=False))
        except OSError:
            same = False
        if same:
            break
        os.close(handle)
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(handle)


def gather_records(group: RankGroup, own: list[ItemRecord]) -> tuple[list[ItemRecord], list[int], str | None]:
    """Rank 0: every rank's records, or, when some never arrive (a rank died or hangs), those that did.

    Returns (records, ranks missing, why).
    """
    try:
        texts = dict(enumerate(group.collect("records")))
        problem = None
    except (UserError, RuntimeError) as exc:  # the wait timed out, or the store itself is gone
        try:
            texts = group.collect_present("records")
        except RuntimeError:
            texts = {}
        problem = shown(exc, 300)
    texts.pop(group.rank, None)
    records = list(own)
    for text in texts.values():
        records.extend(ItemRecord(**entry) for entry in json.loads(text))
    missing = [rank for rank in range(group.world_size) if rank not in texts and rank != group.rank]
    if problem is None or not missing:
        return records, [], None
    return records, missing, (
        f"no records from rank(s) {', '.join(map(str, missing))} ({problem}); their items are not in the "
        "summary; rerun the same command to finish them"
    )


def run_batch(
    items: list[BatchItem],
    settings: EditorSettings,
    output_dir: Path,
    overwrite: bool,
    source: dict[str, Any],
    dist_env: DistributedEnvironment | None = None,
    dist_timeout_s: float = 1800.0,
    dm: DeviceManager | None = None,
    layout: ParallelLayout | None = None,
) -> int:
    """Check and lock the output folder, join the group (under torchrun), edit this rank's share, write the summary.

    Rank 0 alone holds the output folder's lock and creates its folders; it takes the lock before it
    joins, so no rank of a second batch edits. With a `layout` of --cfg-parallel C x --tensor-parallel K
    above 1 the ranks form edit groups of C x K that edit one item at a time together (the group's leader
    claims the items and saves them); several groups (data parallel) split the items. Returns the
    exit code: 0 when every item is ok or skipped, 1 when some failed, a rank's records never came or
    the summary could not be written (the counts are printed anyway). Ranks other than 0 return 0 once
    their records are handed over, so torchrun does not stop rank 0 while it merges.
    """
    from hidream_edit.editor import device_manager_for
    from hidream_edit.tensor_parallel import ParallelLayout

    dist_env = dist_env or DistributedEnvironment()
    layout = layout or ParallelLayout(dist_env.world_size)
    started = time.perf_counter()
    dm = dm or device_manager_for(settings)
    check_inside(items, output_dir)
    holds_lock = dist_env.rank == 0
    with output_dir_lock(output_dir) if holds_lock else contextlib.nullcontext():
        states = check_outputs(items, RunContext.of(settings, dm.dtype_name), overwrite)
        if holds_lock:
            prepare_output_folders(items)
        records, lost, problem = _edit_share(items, states, settings, overwrite, dist_env, dist_timeout_s, dm,
                                             layout)
        if dist_env.rank != 0:
            return 0
        summary = summarize(records, len(items), time.perf_counter() - started, dist_env.world_size, source,
                            settings.model)
        summary["cfg_parallel"] = layout.cfg
        summary["tensor_parallel"] = layout.tp
        summary["lost_ranks"] = lost
        path = output_dir / SUMMARY_NAME
        unwritten = _write_summary_or_say_why(path, summary)
    print(summary_line(summary, None if unwritten else path))
    problems = [line for line in (problem, unwritten) if line]
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if summary["counts"][FAILED] or problems else 0


def _edit_share(
    items: list[BatchItem],
    states: list[OutputState],
    settings: EditorSettings,
    overwrite: bool,
    dist_env: DistributedEnvironment,
    dist_timeout_s: float,
    dm: DeviceManager,
    layout: ParallelLayout,
) -> tuple[list[ItemRecord], list[int], str | None]:
    """Join the group (under torchrun) and edit this rank's items; on rank 0, every rank's records.

    Returns (records, ranks whose records never came, why); other ranks return only their own.
    """
    from hidream_edit.editor import Editor
    from hidream_edit.tensor_parallel import join_layout

    group: RankGroup | None = None
    card_group, tensor = None, None
    if dist_env.enabled:
        card_group, tensor = join_layout(dm, dist_env, layout, dist_timeout_s)
        group = card_group.ranks
    edit = card_group.edit if card_group is not None else None

    def load_editor() -> Editor:
        editor = Editor.load(settings, dm, tensor)
        if card_group is not None and card_group.guidance is not None:
            editor.use_guidance_group(card_group.guidance)
        return editor

    try:
        queue: ItemQueue = LocalQueue()
        on_finished = None
        if group is not None:
            queue = SharedQueue(group) if edit is None else GroupQueue(group, edit)
            if edit is None or edit.leader:
                on_finished = functools.partial(group.add, "finished", 1)
        with BatchProgress(len(items), enabled=dist_env.rank == 0) as progress:
            records = run_items(items, states, load_editor, queue, overwrite, progress, dist_env.rank, on_finished)
        if edit is not None and not edit.leader:
            records = []  # the group's leader saved and recorded the items this rank helped with
        if group is None:
            return records, [], None
        group.publish("records", json.dumps([asdict(record) for record in records]))
        if dist_env.rank != 0:
            logger.info("rank %d: %d items handed to rank 0", dist_env.rank, len(records))
            return records, [], None
        return gather_records(group, records)
    finally:
        if group is not None:
            group.close()
