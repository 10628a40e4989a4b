"""The web editor's service (hidream_edit.web.service), called directly on CPU: no gradio, no server, no browser."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import pwd
import random
import re
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from web_helpers import GOOD_PROMPT, FakeVLM, files_under, png, png_bytes, running_fake_vlm, stub_editor

from hidream_edit.config import ENV_WEB_AUTH as AUTH_ENV
from hidream_edit.editor import Editor, EditResult
from hidream_edit.errors import EditCancelled, UserError
from hidream_edit.instructions import VLMSettings
from hidream_edit.spec import MODELS
from hidream_edit.step_cache import CacheSettings
from hidream_edit.web.command_line import parse_command_line
from hidream_edit.web.service import (
    CODE_DIR,
    DEVICE_BUSY,
    LISTED_PROBLEMS,
    MAX_PROMPT_CHARS,
    BatchOutcome,
    EditParams,
    StopRegistry,
    WebEditor,
    WebSettings,
    check_results_dir,
    check_text_length,
    device_panel_markdown,
    error_message,
    home_dirs,
    parse_auth,
    prune_results,
    run_cancellable,
    safe_stem,
    stop_key,
    timing_summary,
    unique_result_path,
)

FAST = EditParams(steps=2, seed=5)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return tmp_path / "results"


@pytest.fixture
def vlm() -> Iterator[FakeVLM]:
    with running_fake_vlm() as server:
        yield server


@pytest.fixture
def published() -> list[Path]:
    return []


@pytest.fixture
def web(e1_1_editor: Editor, results: Path, published: list[Path]) -> WebEditor:
    settings = WebSettings(results_dir=results, max_upload_mb=1, max_pixels=200_000, max_batch=4)
    return WebEditor(e1_1_editor, settings, publish=published.extend)


class Recorder:
    """Stands in for gr.Progress: remembers (fraction, description) calls."""

    def __init__(self, on_call=None) -> None:
        self.calls: list[tuple[float, str]] = []
        self.on_call = on_call

    def __call__(self, fraction: float, desc: str) -> None:
        self.calls.append((fraction, desc))
        if self.on_call is not None:
            self.on_call(fraction, desc)


class AfterEdit:
    """An Editor whose edit calls `hook` once the real edit returned (as if a stop came during the decode)."""

    def __init__(self, editor: Editor, hook) -> None:
        self._editor = editor
        self._hook = hook

    def __getattr__(self, name: str) -> Any:
        return getattr(self._editor, name)

    def edit(self, *args: Any, **kwargs: Any) -> Any:
        result = self._editor.edit(*args, **kwargs)
        self._hook()
        return result


# --- one edit on the tiny model -------------------------------------------------------------------


def test_edit_saves_image_and_metadata_under_the_results_dir(web: WebEditor, results: Path, tmp_path: Path,
                                                             published: list[Path],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    source = png(tmp_path / "holiday photo.png")
    progress = Recorder()
    outcome = web.edit(source, "  make the sky purple ", EditParams(steps=2, random_seed=True), progress=progress)

    assert outcome.status.startswith("Done in "), outcome.status
    assert f"seed {outcome.seed}" in outcome.status
    assert 0 <= outcome.seed < 2**31
    assert outcome.image_path.parent == results.resolve()
    assert outcome.image_path.name.startswith("edit-") and outcome.image_path.name.endswith("-holiday_photo.png")
    assert outcome.files == [str(outcome.image_path), str(outcome.json_path)]
    assert files_under(results) == sorted([outcome.image_path, outcome.json_path])
    assert published == [outcome.image_path, outcome.json_path]  # exactly what was written becomes downloadable
    with Image.open(outcome.image_path) as image:
        assert image.size == (48, 32)  # back at the source size
    metadata = json.loads(outcome.json_path.read_text())
    assert metadata["instruction"] == "make the sky purple"
    assert metadata["steps"] == 2 and metadata["seed"] == outcome.seed
    assert metadata["negative"] == MODELS["e1.1"].defaults.negative  # the CLI's defaults fill what the UI left out
    assert len(metadata["timings"]["step_s"]) == 2
    # per-step progress, ending at the last step
    assert progress.calls[-1] == (1.0, "step 2 of 2")
    assert (0.5, "step 1 of 2") in progress.calls
    # the device panel now shows this edit's timings
    caplog.clear()
    with caplog.at_level(logging.INFO):
        panel = web.device_panel()  # the page refreshes it every few seconds: it must not write to the log
    assert "**Device** `cpu`" in panel and "**Last edit** 2 steps in" in panel and "**Now** idle" in panel
    assert caplog.records == []


def test_stop_cancels_between_steps_and_saves_nothing(web: WebEditor, results: Path, tmp_path: Path) -> None:
    stops = StopRegistry()
    submitted = time.monotonic()

    def press_stop_after_first_step(fraction: float, desc: str) -> None:
        if desc == "step 1 of 2":
            stops.request("session-a")

    outcome = web.edit(png(tmp_path / "a.png"), "make it red", FAST, stops.checker("session-a", submitted),
                       Recorder(press_stop_after_first_step))
    assert outcome.status == "Stopped after step 1 of 2; nothing was saved."
    assert (outcome.seed, outcome.prompt) == (5, "make it red")  # still shown, to run it again
    assert outcome.image_path is None and outcome.files is None
    assert files_under(results) == []
    assert web.activity == "idle"


def test_a_stop_that_comes_during_the_decode_still_saves_nothing(e1_1_editor: Editor, results: Path,
                                                                tmp_path: Path) -> None:
    stops = StopRegistry()
    published: list[Path] = []
    web = WebEditor(AfterEdit(e1_1_editor, lambda: stops.request("s")), WebSettings(results_dir=results),
                    publish=published.extend)
    outcome = web.edit(png(tmp_path / "a.png"), "make it red", FAST, stops.checker("s", time.monotonic()))
    assert outcome.status == "Stopped after the last step; nothing was saved."
    assert files_under(results) == [] and published == []


def test_a_cancelled_task_stops_its_worker_at_the_next_check() -> None:
    """What a client's cancel does: the awaiting task is cancelled, the worker thread sees its stop check turn true."""
    entered = threading.Event()
    seen: list[bool] = []

    def work(stop) -> str:
        entered.set()
        for _ in range(600):  # 60 s at most, ends as soon as the stop check says so
            if stop():
                seen.append(True)
                return "stopped"
            time.sleep(0.1)
        return "ran to the end"

    async def scenario() -> None:
        task = asyncio.ensure_future(run_cancellable(work, lambda: False))
        await asyncio.to_thread(entered.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())  # returns once the worker thread has finished (asyncio.run waits for the executor)
    assert seen == [True]  # it returned because its stop check said so, not by running to the end


def test_run_cancellable_passes_the_result_and_the_registry_stop() -> None:
    assert asyncio.run(run_cancellable(lambda stop: stop(), lambda: True)) is True
    assert asyncio.run(run_cancellable(lambda stop: stop(), lambda: False)) is False


def test_closing_the_page_stops_both_kinds_of_jobs_of_that_session_only(web: WebEditor) -> None:
    before = time.monotonic()
    web.stop_session("closed")
    assert web.stops.checker(stop_key("closed", "edit"), before)()
    assert web.stops.checker(stop_key("closed", "batch"), before)()
    assert not web.stops.checker(stop_key("open", "edit"), before)()


# --- batch on the tiny model --------------------------------------------------------------------------


def test_batch_runs_every_image_lists_failures_and_zips_the_results(web: WebEditor, results: Path, tmp_path: Path,
                                                                   published: list[Path]) -> None:
    archive = tmp_path / "holiday.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pics/b.png", png_bytes(color=(10, 200, 10)))
        zf.writestr("pics/broken.png", b"this is not a png")
        zf.writestr("notes.txt", "not an image")
        zf.writestr("__MACOSX/pics/._b.png", b"resource fork")
        zf.writestr("../evil.png", png_bytes())  # a hostile name is only a label: nothing is extracted
    first = png(tmp_path / "first.png")
    progress = Recorder()
    lines = "make it red\nmake it green\nmake it blue\nmake it gold"
    outcome = web.batch([str(first), str(archive)], lines, EditParams(steps=1, seed=7), progress=progress)

    assert outcome.status.startswith("Batch 3 of 4 images edited in"), outcome.status
    assert "2 problems" in outcome.status and outcome.status.endswith(f"; zip: {outcome.zip_path.name}.")
    errors = dict(outcome.errors)
    assert errors["holiday.zip/notes.txt"] == "skipped: not an image file"
    assert "not a recognised image file" in errors["holiday.zip/pics/broken.png"]
    assert not errors["holiday.zip/pics/broken.png"].startswith("holiday.zip")  # the name is not repeated
    assert [caption for _, caption in outcome.gallery] == [
        "1. first.png: make it red",
        "2. holiday.zip/../evil.png: make it green",
        "3. holiday.zip/pics/b.png: make it blue",
    ]
    assert progress.calls[-1][0] == pytest.approx(0.75)  # image 3 of 4 finished; the broken one has no steps
    # everything written is inside the results dir: one batch folder and its zip
    assert {p.name for p in results.iterdir()} == {outcome.batch_dir.name, outcome.zip_path.name}
    assert not (tmp_path / "evil.png").exists()
    with zipfile.ZipFile(outcome.zip_path) as zf:
        names = sorted(name.split("/", 1)[1] for name in zf.namelist())
        assert all(name.split("/", 1)[0] == outcome.batch_dir.name for name in zf.namelist())
        summary_text = zf.read(f"{outcome.batch_dir.name}/summary.json").decode()
        summary = json.loads(summary_text)
        errors_txt = zf.read(f"{outcome.batch_dir.name}/errors.txt").decode()
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    assert names == ["001-first.png", "001-first.png.json", "002-evil.png", "002-evil.png.json", "003-b.png",
                     "003-b.png.json", "errors.txt", "summary.json"]
    assert [entry["status"] for entry in summary] == ["ok", "ok", "ok", "failed"]
    assert summary_text == json.dumps(summary, indent=2)  # one entry field per line, as the CLI writes its summary
    assert summary[3]["instruction"] == "make it gold"
    assert (summary[0]["output"], summary[0]["seed"]) == ("001-first.png", 7)  # what made each image, for a rerun
    assert len(summary[0]["timings"]["step_s"]) == 1
    assert summary[3]["error"] == errors["holiday.zip/pics/broken.png"]
    assert "holiday.zip/notes.txt: skipped" in errors_txt
    metadata = json.loads((outcome.batch_dir / "003-b.png.json").read_text())
    assert metadata["instruction"] == "make it blue" and metadata["steps"] == 1 and metadata["seed"] == 7
    assert published == [Path(path) for path, _ in outcome.gallery] + [outcome.zip_path]


# --- validation: refused before the model runs --------------------------------------------------------


@pytest.mark.parametrize(
    ("make_input", "instruction", "params", "expected"),
    [
        (lambda d: None, "x", FAST, "Error: upload an image first"),
        (lambda d: png(d / "a.png"), "   ", FAST, "Error: the instruction is empty"),
        (lambda d: png(d / "big.png", (600, 400)), "x", FAST,
         "Error: big.png: image is 600x400 (240000 pixels), more than the limit of 200000 pixels"),
        (lambda d: png(d / "a.png"), "x", EditParams(steps=0), "Error: steps must be between 1 and 1000, got 0"),
        (lambda d: png(d / "a.png"), "x", EditParams(steps=2.5), "Error: steps must be a whole number, got 2.5"),
        (lambda d: png(d / "a.png"), "x", EditParams(guidance=99), "Error: guidance must be between 0 and 50, got 99"),
        (lambda d: (d / "notes.png").write_bytes(b"hello") and d / "notes.png", "x", FAST,
         "Error: notes.png: not a recognised image file"),
        (lambda d: (d / "huge.png").write_bytes(b"\0" * (1024 * 1024 + 1)) and d / "huge.png", "x", FAST,
         "Error: huge.png: 1.0 MiB is over the 1 MiB limit"),
        # overlong texts are refused before the upload is even looked at (this one does not exist)
        (lambda d: d / "gone.png", "x" * 10_000_000, FAST,
         "Error: the instruction is 10000000 characters long; the limit is 2000"),
        (lambda d: d / "gone.png", "x", EditParams(negative="n" * 2001),
         "Error: the negative instruction is 2001 characters long; the limit is 2000"),
        (lambda d: d / "gone.png", "x", EditParams(target_description="t" * 2001),
         "Error: the target image description is 2001 characters long; the limit is 2000"),
    ],
)
def test_bad_input_gives_one_readable_line(web: WebEditor, results: Path, tmp_path: Path, make_input, instruction,
                                           params, expected) -> None:
    outcome = web.edit(make_input(tmp_path), instruction, params)
    assert outcome.status == expected
    assert "\n" not in outcome.status and "Traceback" not in outcome.status
    assert files_under(results) == []


def test_batch_refuses_mismatched_instruction_lines_and_too_many_images(web: WebEditor, tmp_path: Path) -> None:
    images = [str(png(tmp_path / f"{i}.png")) for i in range(3)]
    outcome = web.batch(images, "a\nb", FAST)
    assert outcome.status == ("Error: 2 instruction lines for 3 images: give one instruction for all, "
                              "or exactly one line per image")
    assert outcome.zip_path is None and outcome.gallery == []
    assert web.batch(images * 2, "a", FAST).status == "Error: more than 4 images; the limit is 4"
    assert web.batch([], "a", FAST).status == "Error: upload some images or a zip of images first"
    assert web.batch(images, "a", EditParams(steps=0)).status == "Error: steps must be between 1 and 1000, got 0"
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK not really")
    outcome = web.batch([str(bad_zip)], "a", FAST)
    assert outcome.status == "Error: no images to edit (bad.zip: not a readable zip archive (File is not a zip file))"
    assert web.batch(images, "a\n" + "b" * 2001 + "\nc", FAST).status == (
        "Error: the instruction is 2001 characters long; the limit is 2000")
    assert web.batch(images, "a" * 4 * 2001 + "a", FAST).status == (
        "Error: the instruction text is 8005 characters long; the limit is 8004")


def test_a_refused_zip_says_why_not_just_no_images(e1_1_editor: Editor, tmp_path: Path) -> None:
    web = WebEditor(e1_1_editor, WebSettings(results_dir=tmp_path / "r", max_upload_mb=1, max_batch=5))
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for index in range(6):
            zf.writestr(f"{index}.png", png_bytes())
    outcome = web.batch([str(many)], "a", FAST)
    assert outcome.status == "Error: no images to edit (many.zip: holds more than 5 images, the batch limit)"
    assert outcome.errors == [("many.zip", "holds more than 5 images, the batch limit")]
    heavy = tmp_path / "heavy.zip"
    with zipfile.ZipFile(heavy, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for index in range(5):  # 5 x 0.9 MiB, each under the 1 MiB limit, together over 4 MiB
            zf.writestr(f"{index}.png", b"\0" * (9 * 2**20 // 10))
    outcome = web.batch([str(heavy)], "a", FAST)
    assert outcome.status == "Error: no images to edit (heavy.zip: unpacks to more than 4 MiB of images)"
    assert files_under(tmp_path / "r") == []


def test_zip_entries_over_the_size_limit_are_skipped(web: WebEditor, tmp_path: Path) -> None:
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("huge.png", b"\0" * (2 * 1024 * 1024))  # compresses to almost nothing
        zf.writestr("ok.png", png_bytes())
    items, errors = web.collect_batch([str(archive)])
    assert [item.name for item in items] == ["big.zip/ok.png"]
    assert errors == [("big.zip/huge.png", "skipped: 2.0 MiB is over the 1 MiB limit")]


def test_a_zip_that_unpacks_to_exactly_four_uploads_is_accepted(tmp_path: Path) -> None:
    """The bound is "more than 4 x the upload limit": four entries each at the limit are still a batch."""
    web = WebEditor(stub_editor("e1.1"), WebSettings(results_dir=tmp_path / "r", max_upload_mb=1, max_batch=4))
    archive = tmp_path / "four.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for index in range(4):
            zf.writestr(f"{index}.png", b"\0" * 2**20)
    items, errors = web.collect_batch([str(archive)])
    assert [item.name for item in items] == [f"four.zip/{index}.png" for index in range(4)] and errors == []


def test_a_zip_without_images_says_so(tmp_path: Path) -> None:
    web = WebEditor(stub_editor("e1.1"), WebSettings(results_dir=tmp_path / "r"))
    archive = tmp_path / "mac.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("__MACOSX/._photo.png", b"resource fork")
        zf.writestr(".DS_Store", b"")
    assert web.collect_batch([str(archive)]) == ([], [("mac.zip", "contains no images")])
    outcome = web.batch([str(archive)], "make it red", FAST)
    assert outcome.status == "Error: no images to edit (mac.zip: contains no images)"


def test_instruction_lines() -> None:
    assert WebEditor.instructions_for("make it red\n\n", 3) == ["make it red"] * 3
    assert WebEditor.instructions_for(" a \n b ", 2) == ["a", "b"]
    with pytest.raises(UserError, match="the instruction is empty"):
        WebEditor.instructions_for(" \n ", 2)


def test_a_job_waiting_for_the_device_can_be_stopped(web: WebEditor, results: Path, tmp_path: Path) -> None:
    stops = StopRegistry()
    progress = Recorder()
    outcomes = []
    web._device.acquire()  # another edit holds the device
    try:
        job = threading.Thread(
            target=lambda: outcomes.append(
                web.edit(png(tmp_path / "a.png"), "x", FAST, stops.checker("s", time.monotonic()), progress)
            )
        )
        job.start()
        deadline = time.monotonic() + 30
        while (0.0, DEVICE_BUSY) not in progress.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        stops.request("s")
        job.join(timeout=30)
    finally:
        web._device.release()
    assert outcomes[0].status == "Stopped before it started; nothing was saved."
    assert (0.0, DEVICE_BUSY) in progress.calls
    assert files_under(results) == []


def test_stop_only_affects_jobs_of_the_same_session_submitted_before_it() -> None:
    stops = StopRegistry()
    before = time.monotonic()
    stops.request("a")
    after = time.monotonic() + 1
    assert stops.checker("a", before)() is True
    assert stops.checker("a", after)() is False  # a later Edit is not stopped by an old Stop
    assert stops.checker("b", before)() is False  # nor another session's job


def test_a_stop_in_the_same_clock_tick_as_the_submission_stops_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coarse monotonic clock can give the Edit and a Stop pressed right after it the same time."""
    from hidream_edit.web import service

    monkeypatch.setattr(service, "time", SimpleNamespace(monotonic=lambda: 1234.5))
    stops = StopRegistry()
    check = stops.checker("s", None)
    stops.request("s")
    assert check()


def test_stops_are_forgotten_a_day_after_the_sessions_last_stop_and_not_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that runs for weeks forgets sessions idle for a day; a forgotten one no longer stops anything."""
    from hidream_edit.web import service

    now = [5_000_000.0]  # time.monotonic() on a server up for weeks
    monkeypatch.setattr(service, "time", SimpleNamespace(monotonic=lambda: now[0]))
    stops = StopRegistry()
    stops.request("old")
    now[0] += 0.5
    stops.request("recent")
    now[0] += 86400.0  # "old" pressed Stop a day and half a second ago, "recent" exactly a day ago
    stops.request("new")
    assert [stops.checker(session, 0.0)() for session in ("old", "recent", "new")] == [False, True, True]


def test_unexpected_errors_are_one_line_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    message = error_message(RuntimeError("kernel exploded\n  at line 3"))
    assert message == "internal error (RuntimeError: kernel exploded at line 3); details are in the server log"
    (record,) = [record for record in caplog.records if record.getMessage() == "edit failed"]
    assert record.exc_info is not None and "kernel exploded" in caplog.text  # the traceback: in the server log
    assert "ran out of memory" in error_message(RuntimeError("NPU out of memory. Tried to allocate 2 GiB"))
    long = error_message(ValueError("v" * 5000))  # the page shows 300 characters; the log has the rest
    assert long == f"internal error (ValueError: {'v' * 300}); details are in the server log"
    assert error_message(UserError("bad\nvalue")) == "bad value"


# --- names, auth, panel text ------------------------------------------------------------------------------


def test_result_names_are_unique_sanitised_and_inside_the_results_dir(tmp_path: Path) -> None:
    names = {unique_result_path(tmp_path, "edit", "../../etc/pass wd.png") for _ in range(50)}
    assert len(names) == 50
    for path in names:
        assert path.parent == tmp_path.resolve()
        assert path.name.startswith("edit-") and path.name.endswith("-pass_wd.png")
    assert safe_stem(".bashrc") == "bashrc" and safe_stem("") == "image" and safe_stem("日本.png") == "image"
    assert safe_stem("a" * 300 + ".png") == "a" * 40  # a long upload name still makes a short result name


def test_a_name_whose_image_or_sidecar_exists_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hidream_edit.web import service

    tokens = iter(["taken-image", "taken-sidecar", "free"])
    monkeypatch.setattr(service, "_token", lambda: next(tokens))
    (tmp_path / "edit-taken-image-cat.png").write_bytes(b"an earlier result")
    (tmp_path / "edit-taken-sidecar-cat.png.json").write_text("{}")
    assert unique_result_path(tmp_path, "edit", "cat.png") == (tmp_path / "edit-free-cat.png").resolve()


def test_parse_auth() -> None:
    assert parse_auth("alice:s3:cret") == ("alice", "s3:cret")
    assert parse_auth(None) is None and parse_auth("  ") is None
    for bad in ("alice", "alice:", ":pw"):
        with pytest.raises(UserError, match="user:password"):
            parse_auth(bad)


def test_command_line(tmp_path: Path) -> None:
    model, args, settings = parse_command_line(["--tiny", "--results-dir", str(tmp_path / "r")], {})
    assert model == "e1.1" and args.tiny
    assert settings.host == "127.0.0.1" and settings.port == 7860 and settings.auth is None
    assert settings.results_dir == (tmp_path / "r").resolve() and settings.concurrency == 1
    model, args, settings = parse_command_line(["--model", "e1-full", "--lora-path", "x", "--auth", "a:b"],
                                               {AUTH_ENV: "env:pw"})
    assert model == "e1-full" and args.lora_path == "x" and settings.auth == ("a", "b")  # the flag wins
    assert parse_command_line([], {AUTH_ENV: "env:pw"})[2].auth == ("env", "pw")
    with pytest.raises(UserError, match="--max-queue must be at least 1"):
        parse_command_line(["--max-queue", "0"], {})
    with pytest.raises(UserError, match=AUTH_ENV):
        parse_command_line([], {AUTH_ENV: "nopassword"})


def test_a_server_started_without_flags_has_the_library_defaults(tmp_path: Path) -> None:
    """WebSettings' defaults (what a library user gets) and the command line's are written in two places;
    a server must not change with the way it was started."""
    _, _, settings = parse_command_line(["--results-dir", str(tmp_path / "r")], {})
    assert settings == WebSettings(results_dir=(tmp_path / "r").resolve())
    assert settings.max_upload_bytes == 50 * 2**20
    unbounded = WebSettings(results_dir=tmp_path, max_results_gb=0, keep_results_hours=0)
    assert (unbounded.max_results_bytes, unbounded.keep_results_s) == (None, None)


def test_the_results_folder_is_made_with_its_missing_parents(tmp_path: Path) -> None:
    results = tmp_path / "new" / "deeper" / "results"
    WebEditor(stub_editor("e1.1"), WebSettings(results_dir=results))
    assert results.is_dir()


def test_the_password_databases_home_is_kept_out_of_even_without_home_set(tmp_path: Path) -> None:
    """A service started with no $HOME (systemd, cron) must still refuse the user's home as the results dir."""
    try:
        pw_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        pytest.skip("this uid has no entry in the password database")
    assert home_dirs({}) == [pw_home]
    assert home_dirs({"HOME": str(tmp_path)}) == [tmp_path, pw_home]


def test_timings_keep_two_decimals_below_ten_seconds_and_one_from_ten() -> None:
    one = {"timings": {"step_s": [10.0], "encode_s": 9.99, "decode_s": 0.004, "total_s": 12.0}}
    assert timing_summary(one) == "1 step in 10.0 s (10.00 s/step), encode 9.99 s, decode 0.00 s, total 12.0 s"
    none = {"timings": {"step_s": [], "encode_s": 0.5, "decode_s": 0.0, "total_s": 0.5}}
    assert timing_summary(none) == "0 steps in 0.00 s (0.00 s/step), encode 0.50 s, decode 0.00 s, total 0.50 s"


def test_device_panel_shows_device_memory_and_the_last_timings() -> None:
    gib = 2**30
    report = {"device": "npu:0", "device_name": "Ascend910B3", "dtype": "bf16", "attention": "npu_fused",
              "offload": "none", "memory": {"allocated": 30 * gib, "reserved": 32 * gib, "peak": 34 * gib,
                                            "free": 20 * gib, "total": 64 * gib, "host_rss": 5 * gib,
                                            "host_total": 512 * gib}}
    last = {"timings": {"load_s": 90.0, "encode_s": 0.8, "step_s": [1.0, 1.2], "decode_s": 0.5, "total_s": 3.5}}
    text = device_panel_markdown(report, last, "editing a.png: step 3 of 28")
    assert "`npu:0` (Ascend910B3)" in text and "bf16" in text and "npu_fused" in text
    assert "44.0 GiB used of 64.0 GiB" in text and "peak 34.0 GiB" in text
    assert "5.0 GiB used by this server of 512.0 GiB" in text
    assert "**Now** editing a.png: step 3 of 28" in text
    assert "**Last edit** 2 steps in 2.20 s (1.10 s/step), encode 0.80 s, decode 0.50 s, total 3.50 s" in text
    assert "**Layout** one process" in text


def test_before_the_first_edit_the_panel_says_how_long_the_model_took_to_load(tmp_path: Path) -> None:
    panel = WebEditor(stub_editor("e1.1"), WebSettings(results_dir=tmp_path)).device_panel()
    assert panel.split("  \n")[-1] == "**Last edit** none yet (model loaded in 1.50 s)"


def test_device_panel_shows_the_layout_and_the_groups_under_torchrun() -> None:
    report = {"device": "npu:1", "device_name": "Ascend910B4", "dtype": "bf16", "attention": "sdpa", "offload": "auto",
              "memory": {"host_rss": 2**30, "host_total": 2**34},
              "layout": {"cfg_parallel": 2, "guidance_ranks": [1, 3], "tensor_parallel": 2, "tensor_ranks": [0, 1],
                         "text_encoders_here": ["t5", "clip_l"]}}
    lines = device_panel_markdown(report, None, "idle").split("  \n")
    assert lines[1] == ("**Layout** cfg 2 x tp 2 under torchrun · this server edits with guidance ranks [1, 3] and "
                        "tensor-parallel ranks [0, 1] · text encoders here: t5, clip_l")
    alone = {**report["layout"], "tensor_parallel": 1, "tensor_ranks": None, "text_encoders_here": []}
    assert ("**Layout** cfg 2 x tp 1 under torchrun · this server edits with guidance ranks [1, 3] · "
            "text encoders here: none") in device_panel_markdown({**report, "layout": alone}, None, "idle")


# --- E1-Full prompts and the VLM rewrite ---------------------------------------------------------------


def test_e1_full_builds_its_prompt_form_from_the_target_description(tmp_path: Path) -> None:
    web = WebEditor(stub_editor("e1-full"), WebSettings(results_dir=tmp_path))
    image = Image.new("RGB", (8, 8))
    prompt, note = web._prompt(image, "make it red", EditParams(target_description="a red square"), None)
    assert prompt == "Editing Instruction: make it red. Target Image Description: a red square" and note is None
    assert web._prompt(image, "make it red", EditParams(), None) == ("make it red", None)
    with pytest.raises(UserError, match="needs a server started with --vlm-url and --vlm-model"):
        web._prompt(image, "make it red", EditParams(rewrite=True), None)


def test_the_rewrite_asks_the_vlm_and_the_edit_uses_and_shows_its_prompt(e1_full_editor: Editor, vlm: FakeVLM,
                                                                         tmp_path: Path) -> None:
    web = WebEditor(e1_full_editor, WebSettings(results_dir=tmp_path / "r", vlm=vlm.settings()))
    progress = Recorder()
    outcome = web.edit(png(tmp_path / "a.png"), "make it blue", EditParams(steps=1, seed=2, rewrite=True),
                       progress=progress)
    assert outcome.status.startswith("Done in "), outcome.status
    assert progress.calls[0] == (0.0, "rewriting the instruction with test-vlm")  # the page says what it waits on
    assert outcome.prompt == GOOD_PROMPT
    assert json.loads(outcome.json_path.read_text())["instruction"] == GOOD_PROMPT
    (request,) = vlm.requests
    assert request["model"] == "test-vlm" and request["auth"] == "Bearer sk-test"
    assert "make it blue" in json.dumps(request["messages"])
    # without the option ticked the VLM is not asked and the bare instruction is what the model gets
    outcome = web.edit(png(tmp_path / "a.png"), "make it blue", EditParams(steps=1, seed=2))
    assert outcome.prompt == "make it blue" and len(vlm.requests) == 1


def test_settings_wrong_for_the_model_fail_before_the_vlm_is_asked(vlm: FakeVLM, tmp_path: Path) -> None:
    class RefusingEditor(ScriptedEditor):
        def resolve(self, request: Any) -> Any:
            raise UserError("steps must be between 1 and 1000, got 0")

    web = WebEditor(RefusingEditor("e1-full"), WebSettings(results_dir=tmp_path, vlm=vlm.settings()))  # type: ignore[arg-type]
    outcome = web.edit(png(tmp_path / "a.png"), "make it blue", EditParams(steps=0, rewrite=True))
    assert outcome.status == "Error: steps must be between 1 and 1000, got 0" and vlm.requests == []


def test_a_target_description_is_used_without_saying_the_vlm_rewrites(vlm: FakeVLM, tmp_path: Path) -> None:
    editor = ScriptedEditor("e1-full")
    web = WebEditor(editor, WebSettings(results_dir=tmp_path, vlm=vlm.settings()))  # type: ignore[arg-type]
    editor.web = web
    progress = Recorder()
    web.edit(png(tmp_path / "a.png"), "make it red", EditParams(rewrite=True, target_description="a red square"),
             progress=progress)
    assert vlm.requests == [] and progress.calls[0] == (0.0, "encoding the instruction and the image")


def test_a_failed_rewrite_is_an_error_or_with_the_fallback_the_bare_instruction(vlm: FakeVLM, tmp_path: Path) -> None:
    vlm.reply = (400, b'{"error": "no such model"}')
    image = Image.new("RGB", (8, 8))
    strict = WebEditor(stub_editor("e1-full"), WebSettings(results_dir=tmp_path, vlm=vlm.settings()))
    with pytest.raises(UserError, match=r"returned HTTP 400"):
        strict._prompt(image, "make it red", EditParams(rewrite=True), None)
    lenient = WebEditor(stub_editor("e1-full"), WebSettings(results_dir=tmp_path, vlm=vlm.settings(),
                                                           vlm_fallback=True))
    prompt, note = lenient._prompt(image, "make it red", EditParams(rewrite=True), None)
    assert prompt == "make it red"
    assert note.startswith("the instruction rewrite failed (VLM endpoint ") and note.endswith(
        "; edited with the bare instruction")
    # a target description wins over the rewrite, as in the CLI: the VLM is not asked
    asked = len(vlm.requests)
    prompt, _ = strict._prompt(image, "make it red", EditParams(rewrite=True, target_description="a red dot"), None)
    assert prompt == "Editing Instruction: make it red. Target Image Description: a red dot"
    assert len(vlm.requests) == asked


def test_the_vlm_flags_are_the_clis_and_only_for_e1_full(tmp_path: Path) -> None:
    results = ["--results-dir", str(tmp_path / "r")]
    _, _, settings = parse_command_line(["--model", "e1-full", "--vlm-url", "http://127.0.0.1:8000/v1", "--vlm-model",
                                         "qwen", "--vlm-timeout", "7", "--rewrite-fallback", *results],
                                        {"OPENAI_API_KEY": "sk-1"})
    assert settings.vlm == VLMSettings("http://127.0.0.1:8000/v1", "qwen", "sk-1", timeout_s=7.0)
    assert settings.vlm_fallback is True
    assert parse_command_line(["--model", "e1-full", *results], {})[2].vlm is None
    for argv, message in ((["--vlm-url", "http://x/v1"], "--vlm-url and --vlm-model go together"),
                          (["--vlm-url", "ftp://x", "--vlm-model", "m"], "--vlm-url must be an http")):
        with pytest.raises(UserError, match=message):
            parse_command_line(["--model", "e1-full", *argv, *results], {})
    with pytest.raises(SystemExit):  # the CLI's check: a finite number of seconds, one line, exit 2
        parse_command_line(["--model", "e1-full", "--vlm-url", "http://x", "--vlm-model", "m", "--vlm-timeout", "inf",
                            *results], {})
    with pytest.raises(SystemExit):
        parse_command_line(["--vlm-url", "http://x/v1", *results], {})  # E1.1 has no prompt form to write


# --- uploads: the app's own checks, before anything else sees them ----------------------------------------


def test_the_preview_opens_uploads_with_the_apps_checks(web: WebEditor, tmp_path: Path) -> None:
    image, status = web.preview(png(tmp_path / "photo.png", (400, 300)))
    assert status == "photo.png: 400x300 pixels, ready to edit" and image.size == (400, 300)
    (tmp_path / "notes.png").write_text("not an image")
    assert web.preview(tmp_path / "notes.png") == (None, "Error: notes.png: not a recognised image file")
    huge = tmp_path / "huge.png"
    Image.new("1", (16_000, 10_000)).save(huge)  # a few kB on disk, 160 M pixels
    assert web.preview(huge) == (None, "Error: huge.png: image is 16000x10000 (160000000 pixels), "
                                       "more than the limit of 200000 pixels")
    assert web.preview(None) == (None, "")


def test_the_preview_is_shrunk_for_the_page(e1_1_editor: Editor, tmp_path: Path) -> None:
    web = WebEditor(e1_1_editor, WebSettings(results_dir=tmp_path / "r"))
    image, status = web.preview(png(tmp_path / "wide.png", (3000, 1000)))
    assert image.size == (1024, 341) and status == "wide.png: 3000x1000 pixels, ready to edit"


# --- where results go ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("results_dir", "message"),
    [
        ("/", "is a filesystem root"),
        ("{home}", "is or holds the home directory"),
        ("~", "is or holds the home directory"),
        ("{home}/..", "is or holds the home directory"),
    ],
)
def test_results_dir_that_would_expose_other_files_is_refused(results_dir: str, message: str,
                                                              tmp_path: Path) -> None:
    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    with pytest.raises(UserError, match=message):
        parse_command_line(["--results-dir", results_dir.format(home=home)], {"HOME": str(home)})


@pytest.mark.parametrize("results_dir", ["code", "code/.."], ids=["the code's folder", "the folder above it"])
def test_results_dir_that_holds_the_code_is_refused(results_dir: str, tmp_path: Path) -> None:
    """Code and home laid out apart in tmp_path: a real checkout's parent may also hold pytest's temp folder."""
    code, home = tmp_path / "checkouts" / "code", tmp_path / "home" / "alice"
    with pytest.raises(UserError, match="holds the code"):
        check_results_dir(tmp_path / "checkouts" / results_dir, [home], code_dir=code)


def test_the_command_line_refuses_the_checkout_as_results_dir() -> None:
    """The server checks against its own code; no HOME, so only a home inside the checkout could interfere."""
    with pytest.raises(UserError, match=re.escape(f"holds the code ({CODE_DIR})")):
        parse_command_line(["--results-dir", str(CODE_DIR)], {})


def test_results_dir_inside_home_or_the_repo_is_fine(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert parse_command_line(["--results-dir", "~/results"], {"HOME": str(home)})[2].results_dir == home / "results"
    inside = CODE_DIR / "results"
    assert parse_command_line(["--results-dir", str(inside)], {"HOME": str(home)})[2].results_dir == inside


def test_text_limit_is_inclusive() -> None:
    check_text_length("instruction", "x" * MAX_PROMPT_CHARS)
    with pytest.raises(UserError, match="2001 characters long; the limit is 2000"):
        check_text_length("instruction", "x" * (MAX_PROMPT_CHARS + 1))


def test_the_device_panel_shows_the_memory_plan() -> None:
    report = {"device": "npu:0", "device_name": "Ascend910B", "dtype": "bf16", "attention": "sdpa", "offload": "auto",
              "memory": {"total": None, "host_rss": 2**30, "host_total": 2**34},
              "placement": {"name": "split", "asked": "auto", "fits": True, "encoder_device": "npu:1",
                            "predicted_peak_bytes": {"npu:0": 35 * 2**30, "npu:1": 25 * 2**30, "host": 2**30}}}
    panel = device_panel_markdown(report, None, "idle")
    lines = panel.split("  \n")  # what runs here first: the device, the layout, then the plan
    assert lines[2] == ("**Memory plan** split (asked auto) · predicted peak npu:0 35.0 GiB, npu:1 25.0 GiB, "
                        "host 1.0 GiB")
    assert lines[0].startswith("**Device**") and lines[1] == "**Layout** one process"
    assert "Memory plan" not in device_panel_markdown({**report, "placement": None}, None, "idle")


# --- limits that hostile use found ------------------------------------------------------------------


def test_the_upload_limit_is_in_mib_as_its_messages_say(tmp_path: Path) -> None:
    web = WebEditor(stub_editor("e1.1"), WebSettings(results_dir=tmp_path / "r", max_upload_mb=1))
    assert web.settings.max_upload_bytes == 2**20
    under = tmp_path / "under.png"
    under.write_bytes(b"\0" * 1_040_000)  # over 1 MB, under 1 MiB: judged by its content, not refused for size
    assert web.preview(under) == (None, "Error: under.png: not a recognised image file")
    exact = tmp_path / "exact.png"
    exact.write_bytes(b"\0" * 2**20)  # the limit itself is allowed
    assert web.preview(exact) == (None, "Error: exact.png: not a recognised image file")
    over = tmp_path / "over.png"
    over.write_bytes(b"\0" * (2**20 + 1))
    assert web.preview(over) == (None, "Error: over.png: 1.0 MiB is over the 1 MiB limit")
    archive = tmp_path / "sizes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("under.png", b"\0" * 1_040_000)
        zf.writestr("exact.png", b"\0" * 2**20)
        zf.writestr("over.png", b"\0" * (2**20 + 1))
    items, errors = web.collect_batch([str(archive)])
    assert [item.name for item in items] == ["sizes.zip/exact.png", "sizes.zip/under.png"]
    assert items[0].source == b"\0" * 2**20  # an entry at the limit is read whole, not cut short
    assert errors == [("sizes.zip/over.png", "skipped: 1.0 MiB is over the 1 MiB limit")]


class StoppingEditor:
    """An Editor without a model whose first edit is stopped by the user while it runs (Stop pressed)."""

    def __init__(self, model: str, press_stop) -> None:
        stub = stub_editor(model)
        self.settings, self.defaults = stub.settings, stub.defaults
        self.press_stop = press_stop
        self.edits = 0

    def resolve(self, request: Any) -> Any:
        return request

    def edit(self, request: Any, on_step=None, should_stop=None) -> Any:
        self.edits += 1
        self.press_stop()
        assert should_stop is not None and should_stop()
        raise EditCancelled("stopped at step 1 of 2")


class ScriptedEditor:
    """An Editor without a model: keeps each request, runs two steps noting the panel's "Now" line, then fails."""

    def __init__(self, model: str) -> None:
        stub = stub_editor(model)
        self.settings, self.defaults = stub.settings, stub.defaults
        self.requests: list[Any] = []
        self.activity: list[str] = []
        self.web: WebEditor | None = None
        self.result: EditResult | None = None  # what an edit returns after its steps; None: it fails

    def resolve(self, request: Any) -> Any:
        self.requests.append(request)
        return request

    def edit(self, request: Any, on_step=None, should_stop=None) -> Any:
        assert self.web is not None and on_step is not None
        self.activity.append(self.web.activity)
        for done in (1, 2):
            on_step(done, 2)
            self.activity.append(self.web.activity)
        if self.result is None:
            raise UserError("no model here")
        return self.result


def scripted_web(tmp_path: Path) -> tuple[WebEditor, ScriptedEditor]:
    editor = ScriptedEditor("e1.1")
    web = WebEditor(editor, WebSettings(results_dir=tmp_path / "r"))  # type: ignore[arg-type]
    editor.web = web
    return web, editor


def test_the_advanced_settings_reach_the_edit_request(tmp_path: Path) -> None:
    web, editor = scripted_web(tmp_path)
    params = EditParams(negative="blurry", steps=3.0, guidance=4.5, image_guidance=2.0, refine_strength=0.25,
                        clip_cfg_norm=False, seed=9.0, keep_aspect=True)  # the browser sends numbers as floats
    assert web.edit(png(tmp_path / "a.png"), "make it red", params).status == "Error: no model here"
    request = editor.requests[-1]
    assert (request.instruction, request.negative, request.steps, request.guidance, request.image_guidance,
            request.refine_strength, request.clip_cfg_norm, request.seed, request.keep_aspect) == (
        "make it red", "blurry", 3, 4.5, 2.0, 0.25, False, 9, True)
    assert request.image.size == (48, 32)
    outcome = web.edit(png(tmp_path / "a.png"), "make it red", params)
    assert (outcome.seed, outcome.prompt) == (9, "make it red")  # the page shows them even when the edit failed
    web.edit(png(tmp_path / "a.png"), "make it red", EditParams(seed=1))  # an untouched page: the model's defaults
    request = editor.requests[-1]
    assert (request.negative, request.steps, request.guidance, request.keep_aspect) == (None, None, None, False)


def test_the_step_cache_fields_the_page_leaves_empty_come_from_the_servers_flags(tmp_path: Path) -> None:
    editor = ScriptedEditor("e1.1")
    web = WebEditor(editor, WebSettings(results_dir=tmp_path / "r",  # type: ignore[arg-type]
                                        cache=CacheSettings("dbcache", 0.08, 8, 3)))
    editor.web = web
    web.edit(png(tmp_path / "a.png"), "make it red", EditParams(cache="", cache_threshold=""))
    request = editor.requests[-1]
    assert (request.cache, request.cache_threshold, request.cache_warmup, request.cache_max_skip) == (
        "dbcache", 0.08, 8, 3)
    web.edit(png(tmp_path / "a.png"), "make it red", EditParams(cache="taylorseer", cache_threshold=0.2,
                                                               cache_warmup=2.0, cache_max_skip=0))
    request = editor.requests[-1]
    assert (request.cache, request.cache_threshold, request.cache_warmup, request.cache_max_skip) == (
        "taylorseer", 0.2, 2, 0)  # the page's values win, a max-skip of 0 included


def test_random_seeds_stay_exact_in_the_browser_and_an_empty_seed_box_draws_one(tmp_path: Path) -> None:
    web = WebEditor(stub_editor("e1.1"), WebSettings(results_dir=tmp_path))
    seeds = {web.choose_seed(EditParams(seed=5, random_seed=True)) for _ in range(64)}
    assert len(seeds) > 1 and all(0 <= seed < 2**31 for seed in seeds)  # below 2**31: typed back, it is the same
    assert 0 <= web.choose_seed(EditParams(seed=float("nan"))) < 2**31  # what an emptied number box sends
    assert web.choose_seed(EditParams(seed=12.0)) == 12


def test_the_panels_now_line_follows_an_edit_step_by_step_and_says_when_it_decodes(tmp_path: Path) -> None:
    web, editor = scripted_web(tmp_path)
    progress = Recorder()
    web.edit(png(tmp_path / "a.png"), "make it red", EditParams(steps=2, seed=1), progress=progress)
    assert progress.calls == [(0.0, "encoding the instruction and the image"), (0.5, "step 1 of 2"),
                              (1.0, "step 2 of 2")]
    assert editor.activity == ["editing a.png: encoding", "editing a.png: step 1 of 2",
                               "editing a.png: step 2 of 2, decoding"]
    assert web.activity == "idle"


def test_batch_progress_counts_each_images_steps_as_its_share_of_the_batch(tmp_path: Path) -> None:
    web, editor = scripted_web(tmp_path)
    progress = Recorder()
    images = [str(png(tmp_path / f"{name}.png")) for name in ("a", "b")]
    web.batch(images, "make it red", EditParams(steps=2, seed=1), progress=progress)
    assert progress.calls == [(0.0, "image 1 of 2: encoding"), (0.25, "image 1 of 2 (a.png): step 1 of 2"),
                              (0.5, "image 1 of 2 (a.png): step 2 of 2"), (0.5, "image 2 of 2: encoding"),
                              (0.75, "image 2 of 2 (b.png): step 1 of 2"), (1.0, "image 2 of 2 (b.png): step 2 of 2")]
    assert editor.activity[-2:] == ["batch image 2 of 2 (b.png): step 1 of 2",
                                    "batch image 2 of 2 (b.png): step 2 of 2, decoding"]
    (batch_dir,) = (tmp_path / "r").iterdir()
    summary = json.loads((batch_dir / "summary.json").read_text())
    failed = [(entry["status"], entry["error"], entry["seed"]) for entry in summary]
    assert failed == [("failed", "no model here", 1)] * 2  # a failed image's seed is kept for a rerun


def test_the_status_says_how_long_the_edit_or_batch_took(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hidream_edit.web import service

    web, editor = scripted_web(tmp_path)
    editor.result = EditResult(Image.new("RGB", (48, 32)), {"timings": {"step_s": [1.0, 1.0], "encode_s": 0.5,
                                                                         "decode_s": 0.5, "total_s": 3.0}})
    clock = iter([100.0, 103.5, 200.0, 212.25])
    monkeypatch.setattr(service, "time", SimpleNamespace(perf_counter=lambda: next(clock), strftime=time.strftime,
                                                         monotonic=time.monotonic, time=time.time))
    outcome = web.edit(png(tmp_path / "a.png"), "make it red", EditParams(steps=2, seed=1))
    assert outcome.status.startswith("Done in 3.50 s with seed 1: 2 steps in 2.00 s"), outcome.status
    batch = web.batch([str(png(tmp_path / "b.png"))], "make it red", EditParams(steps=2, seed=1))
    assert batch.status.startswith("Batch 1 of 1 images edited in 12.2 s; zip: batch-"), batch.status


def test_a_stopped_batch_opens_and_rewrites_nothing_more(vlm: FakeVLM, tmp_path: Path) -> None:
    stops = StopRegistry()
    editor = StoppingEditor("e1-full", lambda: stops.request("s"))
    web = WebEditor(editor, WebSettings(results_dir=tmp_path / "r", vlm=vlm.settings()))  # type: ignore[arg-type]
    opened: list[str] = []
    open_upload = web._open
    web._open = lambda source, name: opened.append(name) or open_upload(source, name)  # type: ignore[method-assign]
    images = [str(png(tmp_path / f"{name}.png")) for name in ("a", "b", "c")]
    outcome = web.batch(images, "make it blue", EditParams(steps=2, seed=1, rewrite=True),
                        stops.checker("s", time.monotonic()))
    assert outcome.status.startswith("Batch 0 of 3 images edited in ")
    assert "stopped at image 1 of 3: stopped at step 1 of 2" in outcome.status
    assert opened == ["a.png"] and len(vlm.requests) == 1 and editor.edits == 1
    summary = json.loads((outcome.batch_dir / "summary.json").read_text())
    assert [entry["status"] for entry in summary] == ["stopped: stopped at step 1 of 2", "not run (stopped)",
                                                      "not run (stopped)"]


def test_a_batch_whose_zip_cannot_be_written_keeps_its_images_and_says_why(
    web: WebEditor, results: Path, tmp_path: Path, published: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hidream_edit.web.service.zipfile.ZipFile", disk_full)
    outcome = web.batch([str(png(tmp_path / "a.png"))], "make it red", EditParams(steps=1, seed=3))
    assert outcome.status.endswith("no zip (cannot write it: No space left on device)."), outcome.status
    assert outcome.zip_path is None and [Path(path) for path, _ in outcome.gallery] == published
    assert (outcome.batch_dir / "001-a.png").is_file()
    assert {p.name for p in results.iterdir()} == {outcome.batch_dir.name}  # no zip and no temporary file left


def test_a_zip_of_many_non_images_is_summarised_not_listed(tmp_path: Path) -> None:
    """20,000 text files once sent about 950 KB of problem lines to the page."""
    web = WebEditor(stub_editor("e1.1"), WebSettings(results_dir=tmp_path / "r"))
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for number in range(20_000):
            zf.writestr(f"note{number:05d}.txt", "")
        zf.writestr("photo.png", png_bytes())
    items, errors = web.collect_batch([str(archive)])
    assert [item.name for item in items] == ["notes.zip/photo.png"]
    assert errors == [("notes.zip", "skipped 20000 entries that are not image files "
                                    "(note00000.txt, note00001.txt, note00002.txt, and 19997 more)")]
    few = tmp_path / "few.zip"
    with zipfile.ZipFile(few, "w") as zf:
        for name in ("a.txt", "b.txt", "c.txt", "photo.png"):  # three: still named one by one
            zf.writestr(name, png_bytes() if name == "photo.png" else "")
    _, errors = web.collect_batch([str(few)])
    assert errors == [(f"few.zip/{name}", "skipped: not an image file") for name in ("a.txt", "b.txt", "c.txt")]


def test_the_page_lists_the_first_problems_and_counts_the_rest() -> None:
    outcome = BatchOutcome("Batch", errors=[(f"big{number}.png", "skipped: over the limit") for number in range(500)])
    lines = outcome.errors_text.splitlines()
    assert len(lines) == LISTED_PROBLEMS + 1 and lines[0] == "big0.png: skipped: over the limit"
    assert lines[-1] == f"... and {500 - LISTED_PROBLEMS} more"
    assert BatchOutcome("Batch", errors=[("a.png", "x")]).errors_text == "a.png: x"
    exactly = BatchOutcome("Batch", errors=[(f"{number}.png", "x") for number in range(LISTED_PROBLEMS)])
    assert exactly.errors_text.splitlines()[-1] == f"{LISTED_PROBLEMS - 1}.png: x"  # all listed: no "and 0 more"


def _result(folder: Path, name: str, size: int, age_s: float, now: float) -> Path:
    path = folder / name
    if name.startswith("batch-") and not name.endswith(".zip"):
        path.mkdir()
        (path / "001-a.png").write_bytes(b"x" * size)
    else:
        path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_old_and_excess_results_are_pruned_oldest_first_and_nothing_else(tmp_path: Path) -> None:
    now = float(int(time.time()))  # whole seconds: the file times below are exact, so the bounds are too
    edit_old = "edit-20240101-000000-0000000a"
    batch = "batch-20240102-000000-0000000b"
    edit_new = "edit-20240103-000000-0000000c"
    _result(tmp_path, f"{edit_old}-cat.png", 100, 10 * 3600, now)
    _result(tmp_path, f"{edit_old}-cat.png.json", 10, 10 * 3600, now)
    _result(tmp_path, batch, 300, 3 * 3600, now)
    _result(tmp_path, f"{batch}.zip", 300, 3 * 3600, now)
    _result(tmp_path, f"{edit_new}-dog.png", 100, 60, now)
    foreign = [_result(tmp_path, "notes.txt", 5000, 100 * 3600, now),
               _result(tmp_path, "edit-mine.png", 5000, 100 * 3600, now)]
    assert prune_results(tmp_path, None, None, now=now) == []
    assert prune_results(tmp_path, 810, 10 * 3600, now=now) == []  # exactly at both bounds is within them
    assert prune_results(tmp_path, None, 5 * 3600, now=now) == [edit_old]  # older than five hours
    assert not (tmp_path / f"{edit_old}-cat.png.json").exists()
    assert prune_results(tmp_path, 800, None, keep={batch}, now=now) == []  # in use: kept though oldest
    assert prune_results(tmp_path, 500, None, now=now) == [batch]  # 700 bytes of results: the oldest goes
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left == sorted([f"{edit_new}-dog.png", *(path.name for path in foreign)])


def test_the_size_bound_removes_the_oldest_results_whatever_order_the_folder_lists_them_in(tmp_path: Path) -> None:
    now = float(int(time.time()))
    ages = list(range(1, 11))
    random.Random(3).shuffle(ages)  # created in a shuffled order, names sorting opposite to age
    for age in ages:
        _result(tmp_path, f"edit-20240101-000000-{age:08x}-cat.png", 100, age * 60, now)
    removed = prune_results(tmp_path, 500, None, now=now)
    assert removed == [f"edit-20240101-000000-{age:08x}" for age in range(10, 5, -1)]  # the five oldest


def test_a_result_is_kept_while_its_edit_saves_it_and_pruned_like_any_other_after(
    e1_1_editor: Editor, results: Path, tmp_path: Path
) -> None:
    web = WebEditor(e1_1_editor, WebSettings(results_dir=results, max_results_gb=1e-9))  # a bound of one byte
    older = _result(results, "edit-20240101-000000-0000000a-cat.png", 10, 60, time.time())  # after the start's prune
    outcome = web.edit(png(tmp_path / "a.png"), "make it red", EditParams(steps=1))
    assert outcome.image_path is not None and outcome.image_path.exists(), outcome.status
    assert not older.exists()  # the edit's own prune removed the older result but not the one it saved
    assert web.prune_results() == [outcome.image_path.name.rsplit("-", 1)[0]]  # no longer in use once saved
    assert not outcome.image_path.exists() and not outcome.json_path.exists()


def test_the_results_bound_applies_from_the_start_and_is_a_flag(tmp_path: Path) -> None:
    results = tmp_path / "r"
    results.mkdir()
    old = _result(results, "edit-20240101-000000-0000000a-cat.png", 10, 200 * 3600, time.time())
    WebEditor(stub_editor("e1.1"), WebSettings(results_dir=results))  # the default keeps a week
    assert not old.exists()
    _, _, settings = parse_command_line(["--results-dir", str(results)], {})
    assert (settings.max_results_bytes, settings.keep_results_s) == (10 * 2**30, 168 * 3600.0)
    _, _, settings = parse_command_line(["--results-dir", str(results), "--max-results-gb", "0.5",
                                         "--keep-results-hours", "0"], {})
    assert (settings.max_results_bytes, settings.keep_results_s) == (2**29, None)
    _, _, settings = parse_command_line(["--results-dir", str(results), "--max-results-gb", "0"], {})
    assert settings.max_results_bytes is None  # 0: no size bound, not a bound of 0 bytes that removes everything
    with pytest.raises(UserError, match="--max-results-gb must be a finite number, 0 or more"):
        parse_command_line(["--max-results-gb", "-1"], {})
