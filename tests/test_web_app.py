"""The web editor's gradio app (hidream_edit.web.layout), served in this process and driven over HTTP.

Each test starts its own server on a free port (choosing again if the port was taken meanwhile) and
talks to it like a client would: gradio_client for the API, plain HTTP for file downloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from web_helpers import GOOD_PROMPT, files_under, png, running_fake_vlm, stub_editor

from hidream_edit.editor import Editor
from hidream_edit.images import open_image, resize_for_e1_1, resize_for_e1_full
from hidream_edit.instructions import VLMSettings
from hidream_edit.web.layout import build_app, launch, main
from hidream_edit.web.service import EditParams, WebSettings


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served(editor: Any, results: Path, **overrides: Any) -> Iterator[tuple[gr.Blocks, str]]:
    """The app over `editor`, listening on 127.0.0.1 until the block ends."""
    for _ in range(5):
        settings = WebSettings(results_dir=results, port=_free_port(), **overrides)
        demo = build_app(editor, settings)
        try:
            launch(demo, settings, block=False)
        except OSError:  # the port was taken between choosing and binding it: choose another
            continue
        try:
            yield demo, f"http://127.0.0.1:{settings.port}"
        finally:
            demo.close()
        return
    pytest.fail("no free port to serve on after 5 tries")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def _file_url(base: str, path: Path | str) -> str:
    return f"{base}/gradio_api/file={urllib.parse.quote(str(path))}"


class GatedEditor:
    """A real Editor that pauses after its first step until released, and records how its edit ended."""

    def __init__(self, editor: Editor) -> None:
        self._editor = editor
        self.reached = threading.Event()
        self.release = threading.Event()
        self.ended = threading.Event()
        self.outcome: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._editor, name)

    def edit(self, request: Any, on_step: Any = None, should_stop: Any = None) -> Any:
        def step(done: int, total: int) -> None:
            if on_step is not None:
                on_step(done, total)
            if done == 1:
                self.reached.set()
                self.release.wait(60)

        try:
            result = self._editor.edit(request, on_step=step, should_stop=should_stop)
        except BaseException as exc:
            self.outcome = type(exc).__name__
            raise
        else:
            self.outcome = "finished"
            return result
        finally:
            self.ended.set()


# --- the page's wiring (no server) -----------------------------------------------------------------------


@pytest.mark.parametrize(("model", "with_vlm"), [("e1.1", False), ("e1-full", False), ("e1-full", True)])
def test_app_wiring(model: str, with_vlm: bool, tmp_path: Path) -> None:
    vlm = VLMSettings("http://127.0.0.1:9/v1", "test-vlm") if with_vlm else None
    settings = WebSettings(results_dir=tmp_path / "r", concurrency=2, max_queue=3, vlm=vlm)
    demo = build_app(stub_editor(model), settings)
    assert demo._queue.max_size == 3
    fns = {fn.name: fn for fn in demo.fns.values()}
    # edits and batches share one device slot; Stop, the submit stamp and the panel refresh skip the queue
    for name in ("run_edit", "run_batch"):
        assert fns[name].concurrency_id == "device" and fns[name].concurrency_limit == 2 and fns[name].queue
    for name in ("stop_edit", "stop_batch", "submitted", "device_panel"):
        assert fns[name].queue is False
    assert fns["preview"].concurrency_id == "preview" and fns["preview"].concurrency_limit == 1
    assert [target[1] for target in fns["stop_session"].targets] == ["unload"]  # closing the tab stops its jobs
    # each component feeds the parameter of the same name (the API names parameters after the function)
    e1_full = model == "e1-full"
    expected = ["source", "instruction", "edit-negative", "edit-steps", "edit-guidance", "edit-image-guidance",
                "edit-refine", "edit-clip", "edit-seed", "edit-random-seed", "edit-target" if e1_full else None,
                "edit-keep-aspect" if e1_full else None, "edit-rewrite" if with_vlm else None, "edit-cache",
                "edit-cache-threshold", "edit-cache-warmup", "edit-cache-max-skip", None]
    assert [getattr(block, "elem_id", None) for block in fns["run_edit"].inputs] == expected
    assert list(inspect.signature(fns["run_edit"].fn).parameters)[: len(expected)] == [
        "source", "instruction", "negative", "steps", "guidance", "image_guidance", "refine", "clip", "seed",
        "random_seed", "target", "keep_aspect", "rewrite", "cache", "cache_threshold", "cache_warmup", "cache_max_skip",
        "submitted_at"]
    assert [getattr(block, "elem_id", None) for block in fns["run_batch"].inputs][2:] == [
        name.replace("edit-", "batch-") if name else None for name in expected[2:]]
    outputs = [block.elem_id for block in fns["run_edit"].outputs]
    assert outputs == ["result", "downloads", "status", "edit-seed", *(["edit-prompt"] if e1_full else [])]
    elem_ids = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"source", "source-preview", "result", "edit-button", "edit-stop", "status", "downloads", "device-panel",
            "batch-files", "batch-gallery", "batch-zip", "batch-errors", "edit-seed"} <= set(elem_ids)
    assert isinstance(elem_ids["source"], gr.File)  # gradio must not decode uploads before the app's own checks
    assert ("edit-target" in elem_ids) == e1_full
    assert (tmp_path / "r").is_dir()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--auth", "nopassword"], "error: --auth must look like user:password (both non-empty)\n"),
        (["--e1-path", "/nonexistent/e1", "--llama-path", "/nonexistent/l", "--i1-path", "/nonexistent/i1"],
         "does not exist"),
        (["--model", "e1.2"], "invalid choice: 'e1.2'"),
        (["--e1-path", "x", "--model", "e1-full"], "unrecognized arguments: --e1-path"),
        (["--results-dir", "/"], "error: --results-dir / is a filesystem root"),
    ],
)
def test_start_up_mistakes_exit_2_with_one_line(argv, expected, tmp_path: Path, capsys) -> None:
    try:
        code = main(["--results-dir", str(tmp_path), *argv], env={})
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err
    lines = [line for line in err.splitlines() if not line.startswith("loading ")]
    assert "Traceback" not in err and len(lines) == 1, err


# --- served over HTTP -----------------------------------------------------------------------------------


def test_only_files_the_app_wrote_are_served(e1_1_editor: Editor, tmp_path: Path) -> None:
    results = tmp_path / "results"
    with served(e1_1_editor, results) as (demo, url):
        outcome = demo.web_editor.edit(png(tmp_path / "a.png"), "make it red", EditParams(steps=1, seed=1))
        assert outcome.status.startswith("Done in "), outcome.status
        for written in (outcome.image_path, outcome.json_path):
            assert _get(_file_url(url, written)) == (200, written.read_bytes())
        # someone else's files in the results dir, the dir itself and the rest of the disk are not served
        (results / "notes.txt").write_text("private")
        (results / "edit-planted.png").write_bytes(outcome.image_path.read_bytes())
        for path in (results / "notes.txt", results / "edit-planted.png", results, Path("/etc/passwd"),
                     Path(__file__)):
            assert _get(_file_url(url, path))[0] == 403, path


def test_a_client_cancel_stops_the_running_edit_and_saves_nothing(e1_1_editor: Editor, tmp_path: Path) -> None:
    gate = GatedEditor(e1_1_editor)
    results = tmp_path / "results"
    with served(gate, results) as (_, url):
        client = Client(url, verbose=False)
        job = client.submit(handle_file(str(png(tmp_path / "a.png"))), "make it red", steps=3, seed=1,
                            api_name="/edit")
        assert gate.reached.wait(120), "the edit never reached its first step"
        job.cancel()  # returns once the server has cancelled the job's task
        gate.release.set()
        assert gate.ended.wait(120)
        assert gate.outcome == "EditCancelled"  # stopped at the next step, not run to the end
        assert files_under(results) == []


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_every_setting_of_the_page_reaches_the_pipeline(
    model: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    editor: Editor = request.getfixturevalue("e1_1_editor" if model == "e1.1" else "e1_full_editor")
    calls: list[dict[str, Any]] = []
    pipe = editor.loaded.pipe

    def spy(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return pipe(**kwargs)

    monkeypatch.setattr(editor, "loaded", dataclasses.replace(editor.loaded, pipe=spy))
    source = tmp_path / "thirds.png"
    thirds = np.zeros((48, 96, 3), np.uint8)
    thirds[:, :32, 0] = thirds[:, 32:64, 1] = thirds[:, 64:, 2] = 255  # red | green | blue: cropping shows
    Image.fromarray(thirds).save(source)
    settings = {"negative": "spy negative", "steps": 2, "guidance": 2.5, "image_guidance": 1.25, "refine": 0.5,
                "clip": False, "seed": 11}
    if model == "e1-full":
        settings.update(target="a red square", keep_aspect=True)
    with served(editor, tmp_path / "results") as (_, url):
        client = Client(url, verbose=False)
        result = client.predict(handle_file(str(source)), "make it red", **settings, api_name="/edit")
    assert result[2].startswith("Done in ") and result[3] == 11, result
    (call,) = calls
    assert call["negative_prompt"] == "spy negative" and call["num_inference_steps"] == 2
    assert call["guidance_scale"] == 2.5 and call["image_guidance_scale"] == 1.25
    assert call["refine_strength"] == 0.5 and call["clip_cfg_norm"] is False
    assert call["generator"].initial_seed() == 11
    opened = open_image(source)
    if model == "e1-full":
        assert call["prompt"] == "Editing Instruction: make it red. Target Image Description: a red square"
        assert result[4] == call["prompt"]  # the page shows the prompt the model got
        assert np.array_equal(np.asarray(call["image"]), np.asarray(resize_for_e1_full(opened, keep_aspect=True)))
    else:
        assert call["prompt"] == "make it red"
        assert np.array_equal(np.asarray(call["image"]), np.asarray(resize_for_e1_1(opened)))


def test_the_rewrite_option_reaches_the_vlm_and_the_page_shows_its_prompt(e1_full_editor: Editor,
                                                                          tmp_path: Path) -> None:
    with running_fake_vlm() as vlm, served(e1_full_editor, tmp_path / "results", vlm=vlm.settings()) as (_, url):
        client = Client(url, verbose=False)
        result = client.predict(handle_file(str(png(tmp_path / "a.png"))), "make it blue", steps=1, rewrite=True,
                                api_name="/edit")
    assert result[2].startswith("Done in "), result
    assert result[4] == GOOD_PROMPT and len(vlm.requests) == 1
