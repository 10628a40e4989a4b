"""The web editor's callbacks, called directly on CPU with the tiny model (no server, no browser)."""

from __future__ import annotations

import io
import json
import os
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from hidream_edit.cli import OneLineArgumentParser, add_model_arguments, settings_from_args
from hidream_edit.editor import DEFAULTS, Editor
from hidream_edit.errors import UserError
from hidream_edit.webui import (
    AUTH_ENV,
    DEVICE_BUSY,
    EditParams,
    StopRegistry,
    WebEditor,
    WebSettings,
    build_app,
    device_panel_markdown,
    error_message,
    main,
    parse_auth,
    parse_command_line,
    safe_stem,
    unique_result_path,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FAST = EditParams(steps=2, seed=5)


@pytest.fixture(scope="module")
def editor(tiny_checkpoints) -> Editor:
    """One tiny E1.1 editor for the whole module (loading is the slow part)."""
    parser = OneLineArgumentParser()
    add_model_arguments(parser, "e1.1")
    args = parser.parse_args(["--tiny"])
    env = {**os.environ, "HIDREAM_TINY_DIR": str(tiny_checkpoints.root)}
    return Editor.load(settings_from_args(args, "e1.1", env))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return tmp_path / "results"


@pytest.fixture
def web(editor: Editor, results: Path) -> WebEditor:
    return WebEditor(editor, WebSettings(results_dir=results, max_upload_mb=1, max_pixels=200_000, max_batch=4))


def _png(path: Path, size: tuple[int, int] = (48, 32), color: tuple[int, int, int] = (30, 120, 200)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _png_bytes(size: tuple[int, int] = (40, 40), color: tuple[int, int, int] = (200, 50, 50)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


class Recorder:
    """Stands in for gr.Progress: remembers (fraction, description) calls."""

    def __init__(self, on_call=None) -> None:
        self.calls: list[tuple[float, str]] = []
        self.on_call = on_call

    def __call__(self, fraction: float, desc: str) -> None:
        self.calls.append((fraction, desc))
        if self.on_call is not None:
            self.on_call(fraction, desc)


# --- one edit on the tiny model -------------------------------------------------------------------


def test_edit_saves_image_and_metadata_under_the_results_dir(web: WebEditor, results: Path, tmp_path: Path) -> None:
    source = _png(tmp_path / "holiday photo.png")
    progress = Recorder()
    outcome = web.edit(source, "  make the sky purple ", EditParams(steps=2, random_seed=True), progress=progress)

    assert outcome.status.startswith("Done in "), outcome.status
    assert f"seed {outcome.seed}" in outcome.status
    assert 0 <= outcome.seed < 2**31
    assert outcome.image_path.parent == results.resolve()
    assert outcome.image_path.name.startswith("edit-") and outcome.image_path.name.endswith("-holiday_photo.png")
    assert outcome.files == [str(outcome.image_path), str(outcome.json_path)]
    assert _files(results) == sorted([outcome.image_path, outcome.json_path])
    with Image.open(outcome.image_path) as image:
        assert image.size == (48, 32)  # back at the source size
    metadata = json.loads(outcome.json_path.read_text())
    assert metadata["instruction"] == "make the sky purple"
    assert metadata["steps"] == 2 and metadata["seed"] == outcome.seed
    assert metadata["negative"] == DEFAULTS["e1.1"].negative  # the CLI's defaults fill what the UI left out
    assert len(metadata["timings"]["step_s"]) == 2
    # per-step progress, ending at the last step
    assert progress.calls[-1] == (1.0, "step 2 of 2")
    assert (0.5, "step 1 of 2") in progress.calls
    # the device panel now shows this edit's timings
    panel = web.device_panel()
    assert "**Device** `cpu`" in panel and "**Last edit** 2 steps in" in panel and "**Now** idle" in panel


def test_stop_cancels_between_steps_and_saves_nothing(web: WebEditor, results: Path, tmp_path: Path) -> None:
    stops = StopRegistry()
    submitted = time.monotonic()

    def press_stop_after_first_step(fraction: float, desc: str) -> None:
        if desc == "step 1 of 2":
            stops.request("session-a")

    outcome = web.edit(_png(tmp_path / "a.png"), "make it red", FAST, stops.checker("session-a", submitted),
                       Recorder(press_stop_after_first_step))  # fmt: skip
    assert outcome.status == "Stopped after step 1 of 2; nothing was saved."
    assert outcome.image_path is None and outcome.files is None
    assert _files(results) == []
    assert web.activity == "idle"


# --- batch on the tiny model --------------------------------------------------------------------------


def test_batch_runs_every_image_lists_failures_and_zips_the_results(web: WebEditor, results: Path,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    archive = tmp_path / "holiday.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pics/b.png", _png_bytes(color=(10, 200, 10)))
        zf.writestr("pics/broken.png", b"this is not a png")
        zf.writestr("notes.txt", "not an image")
        zf.writestr("__MACOSX/pics/._b.png", b"resource fork")
        zf.writestr("../evil.png", _png_bytes())  # a hostile name is only a label: nothing is extracted
    first = _png(tmp_path / "first.png")
    progress = Recorder()
    lines = "make it red\nmake it green\nmake it blue\nmake it gold"
    outcome = web.batch([str(first), str(archive)], lines, EditParams(steps=1, seed=7), progress=progress)

    assert outcome.status.startswith("Batch 3 of 4 images edited in"), outcome.status
    assert "2 problems" in outcome.status
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
        summary = json.loads(zf.read(f"{outcome.batch_dir.name}/summary.json"))
        errors_txt = zf.read(f"{outcome.batch_dir.name}/errors.txt").decode()
    assert names == ["001-first.png", "001-first.png.json", "002-evil.png", "002-evil.png.json", "003-b.png",
                     "003-b.png.json", "errors.txt", "summary.json"]  # fmt: skip
    assert [entry["status"] for entry in summary] == ["ok", "ok", "ok", "failed"]
    assert summary[3]["instruction"] == "make it gold"
    assert "holiday.zip/notes.txt: skipped" in errors_txt
    metadata = json.loads((outcome.batch_dir / "003-b.png.json").read_text())
    assert metadata["instruction"] == "make it blue" and metadata["steps"] == 1 and metadata["seed"] == 7


# --- validation: refused before the model runs --------------------------------------------------------


@pytest.mark.parametrize(
    ("make_input", "instruction", "params", "expected"),
    [
        (lambda d: None, "x", FAST, "Error: upload an image first"),
        (lambda d: _png(d / "a.png"), "   ", FAST, "Error: the instruction is empty"),
        (lambda d: _png(d / "big.png", (600, 400)), "x", FAST,
         "Error: big.png: image is 600x400 (240000 pixels), more than the limit of 200000 pixels"),
        (lambda d: _png(d / "a.png"), "x", EditParams(steps=0), "Error: steps must be between 1 and 1000, got 0"),
        (lambda d: _png(d / "a.png"), "x", EditParams(steps=2.5), "Error: steps must be a whole number, got 2.5"),
        (lambda d: _png(d / "a.png"), "x", EditParams(guidance=99), "Error: guidance must be between 0 and 50, got 99"),
        (lambda d: (d / "notes.png").write_bytes(b"hello") and d / "notes.png", "x", FAST,
         "Error: notes.png: not a recognised image file"),
        (lambda d: (d / "huge.png").write_bytes(b"\0" * (1024 * 1024 + 1)) and d / "huge.png", "x", FAST,
         "Error: huge.png: 1.0 MiB is over the 1 MiB limit"),
    ],
)  # fmt: skip
def test_bad_input_gives_one_readable_line(web: WebEditor, results: Path, tmp_path: Path, make_input, instruction,
                                           params, expected) -> None:  # fmt: skip
    outcome = web.edit(make_input(tmp_path), instruction, params)
    assert outcome.status == expected
    assert "\n" not in outcome.status and "Traceback" not in outcome.status
    assert _files(results) == []


def test_batch_refuses_mismatched_instruction_lines_and_too_many_images(web: WebEditor, tmp_path: Path) -> None:
    images = [str(_png(tmp_path / f"{i}.png")) for i in range(3)]
    outcome = web.batch(images, "a\nb", FAST)
    assert outcome.status == ("Error: 2 instruction lines for 3 images: give one instruction for all, "
                              "or exactly one line per image")  # fmt: skip
    assert outcome.zip_path is None and outcome.gallery == []
    assert web.batch(images * 2, "a", FAST).status == "Error: more than 4 images; the limit is 4"
    assert web.batch([], "a", FAST).status == "Error: upload some images or a zip of images first"
    assert web.batch(images, "a", EditParams(steps=0)).status == "Error: steps must be between 1 and 1000, got 0"
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK not really")
    outcome = web.batch([str(bad_zip)], "a", FAST)
    assert outcome.status == "Error: no images to edit"


def test_zip_entries_over_the_size_limit_are_skipped(web: WebEditor, tmp_path: Path) -> None:
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("huge.png", b"\0" * (2 * 1024 * 1024))  # compresses to almost nothing
        zf.writestr("ok.png", _png_bytes())
    items, errors = web.collect_batch([str(archive)])
    assert [item.name for item in items] == ["big.zip/ok.png"]
    assert errors == [("big.zip/huge.png", "skipped: 2.0 MiB is over the 1 MiB limit")]


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
                web.edit(_png(tmp_path / "a.png"), "x", FAST, stops.checker("s", time.monotonic()), progress)
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
    assert _files(results) == []


def test_stop_only_affects_jobs_of_the_same_session_submitted_before_it() -> None:
    stops = StopRegistry()
    before = time.monotonic()
    stops.request("a")
    after = time.monotonic() + 1
    assert stops.checker("a", before)() is True
    assert stops.checker("a", after)() is False  # a later Edit is not stopped by an old Stop
    assert stops.checker("b", before)() is False  # nor another session's job


def test_unexpected_errors_are_one_line_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    message = error_message(RuntimeError("kernel exploded\n  at line 3"))
    assert message == "internal error (RuntimeError: kernel exploded at line 3); details are in the server log"
    assert "edit failed" in caplog.text  # the traceback goes to the server log
    assert "ran out of memory" in error_message(RuntimeError("NPU out of memory. Tried to allocate 2 GiB"))
    assert error_message(UserError("bad\nvalue")) == "bad value"


# --- names, auth, panel text ------------------------------------------------------------------------------


def test_result_names_are_unique_sanitised_and_inside_the_results_dir(tmp_path: Path) -> None:
    names = {unique_result_path(tmp_path, "edit", "../../etc/pass wd.png") for _ in range(50)}
    assert len(names) == 50
    for path in names:
        assert path.parent == tmp_path.resolve()
        assert path.name.startswith("edit-") and path.name.endswith("-pass_wd.png")
    assert safe_stem(".bashrc") == "bashrc" and safe_stem("") == "image" and safe_stem("日本.png") == "image"


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
                                               {AUTH_ENV: "env:pw"})  # fmt: skip
    assert model == "e1-full" and args.lora_path == "x" and settings.auth == ("a", "b")  # the flag wins
    assert parse_command_line([], {AUTH_ENV: "env:pw"})[2].auth == ("env", "pw")
    with pytest.raises(UserError, match="--max-queue must be at least 1"):
        parse_command_line(["--max-queue", "0"], {})
    with pytest.raises(UserError, match=AUTH_ENV):
        parse_command_line([], {AUTH_ENV: "nopassword"})


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--auth", "nopassword"], "error: --auth must look like user:password (both non-empty)\n"),
        (["--e1-path", "/nonexistent/e1", "--llama-path", "/nonexistent/l", "--i1-path", "/nonexistent/i1"],
         "does not exist"),
        (["--model", "e1.2"], "invalid choice: 'e1.2'"),
        (["--e1-path", "x", "--model", "e1-full"], "unrecognized arguments: --e1-path"),
    ],
)  # fmt: skip
def test_start_up_mistakes_exit_2_with_one_line(argv, expected, tmp_path: Path, capsys) -> None:
    try:
        code = main([*argv, "--results-dir", str(tmp_path)], env={})
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err
    lines = [line for line in err.splitlines() if not line.startswith("loading ")]
    assert "Traceback" not in err and len(lines) == 1, err


def test_device_panel_shows_device_memory_and_the_last_timings() -> None:
    gib = 2**30
    report = {"device": "npu:0", "device_name": "Ascend910B3", "dtype": "bf16", "attention": "npu_fused",
              "offload": "none", "memory": {"allocated": 30 * gib, "reserved": 32 * gib, "peak": 34 * gib,
                                            "free": 20 * gib, "total": 64 * gib, "host_rss": 5 * gib,
                                            "host_total": 512 * gib}}  # fmt: skip
    last = {"timings": {"load_s": 90.0, "encode_s": 0.8, "step_s": [1.0, 1.2], "decode_s": 0.5, "total_s": 3.5}}
    text = device_panel_markdown(report, last, "editing a.png: step 3 of 28")
    assert "`npu:0` (Ascend910B3)" in text and "bf16" in text and "npu_fused" in text
    assert "44.0 GiB used of 64.0 GiB" in text and "peak 34.0 GiB" in text
    assert "5.0 GiB used by this server of 512.0 GiB" in text
    assert "**Now** editing a.png: step 3 of 28" in text
    assert "**Last edit** 2 steps in 2.20 s (1.10 s/step), encode 0.80 s, decode 0.50 s, total 3.50 s" in text


# --- the Gradio app ------------------------------------------------------------------------------------


def _stub_editor(model: str) -> SimpleNamespace:
    report = {"device": "cpu", "device_name": "x86_64", "dtype": "fp32", "attention": "sdpa", "offload": "none",
              "memory": {"allocated": None, "reserved": None, "peak": None, "free": None, "total": None,
                         "host_rss": 2**30, "host_total": 2**34}}  # fmt: skip
    return SimpleNamespace(
        defaults=DEFAULTS[model], settings=SimpleNamespace(model=model, sources=SimpleNamespace(tiny=True)),
        device_report=lambda: report, last_metadata=None, load_s=1.5,
    )  # fmt: skip


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_app_wiring(model: str, tmp_path: Path) -> None:
    settings = WebSettings(results_dir=tmp_path / "r", concurrency=2, max_queue=3)
    demo = build_app(_stub_editor(model), settings)
    assert demo._queue.max_size == 3
    fns = {fn.name: fn for fn in demo.fns.values()}
    # edits and batches share one device slot; Stop, the submit stamp and the panel refresh skip the queue
    for name in ("run_edit", "run_batch"):
        assert fns[name].concurrency_id == "device" and fns[name].concurrency_limit == 2 and fns[name].queue
    for name in ("stop_edit", "stop_batch", "submitted", "device_panel"):
        assert fns[name].queue is False
    elem_ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"source", "result", "edit-button", "edit-stop", "status", "downloads", "device-panel", "batch-files",
            "batch-gallery", "batch-zip", "batch-errors", "edit-steps", "edit-seed"} <= elem_ids  # fmt: skip
    assert ("edit-target" in elem_ids) == (model == "e1-full")
    assert (tmp_path / "r").is_dir()


def test_e1_full_builds_its_prompt_form_from_the_target_description(tmp_path: Path) -> None:
    web = WebEditor(_stub_editor("e1-full"), WebSettings(results_dir=tmp_path))
    image = Image.new("RGB", (8, 8))
    request = web._request(image, "make it red", EditParams(target_description="a red square"), seed=1)
    assert request.instruction == "Editing Instruction: make it red. Target Image Description: a red square"
    assert web._request(image, "make it red", EditParams(), seed=1).instruction == "make it red"
