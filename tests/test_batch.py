"""Batch editing in one process: reading and checking manifests and folders, resume, failures, summary, exit codes.

The runs that edit use the session's tiny E1-Full editor (its 768x768 working size is the cheapest) by
standing it in for `Editor.load`, which also lets each test count the loads a run does.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from hidream_edit import batch
from hidream_edit.batch import (
    BatchError,
    BatchItem,
    BatchProgress,
    ItemRecord,
    LocalQueue,
    OutputState,
    RunContext,
    check_outputs,
    expected_metadata,
    file_sha256,
    folder_items,
    manifest_items,
    run_items,
    summarize,
    summary_line,
    write_summary,
)
from hidream_edit.cli import run_edit_cli
from hidream_edit.config import distributed_environment
from hidream_edit.editor import Editor, EditRequest, EditResult, PromptEmbeddingCache
from hidream_edit.errors import UserError
from hidream_edit.spec import MODELS

E1_1, E1_FULL = MODELS["e1.1"], MODELS["e1-full"]
TEMPLATE = EditRequest(image="", instruction="", steps=2)
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (64, 48)) -> list[Path]:
    paths = []
    for number, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, COLOURS[number % len(COLOURS)]).save(path)
        paths.append(path)
    return paths


def write_manifest(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def problems_of(manifest: Path, output_dir: Path, spec: Any = E1_1) -> list[str]:
    with pytest.raises(BatchError) as caught:
        manifest_items(manifest, output_dir, TEMPLATE, spec, fuse_lora=False)
    return caught.value.problems


def test_a_long_list_of_problems_shows_the_first_twenty_and_counts_the_rest() -> None:
    error = BatchError([f"line {n}: bad" for n in range(1, 26)])
    assert str(error) == "line 1: bad (and 24 more)"
    assert error.lines() == [f"line {n}: bad" for n in range(1, 21)] + ["... and 5 more problems"]
    assert BatchError(["line 1: bad"]).lines() == ["line 1: bad"] and str(BatchError(["line 1: bad"])) == "line 1: bad"
    assert str(BatchError(["line 1: bad", "line 2: bad"])) == "line 1: bad (and 1 more)"


# Reading a manifest


def test_manifest_lines_become_requests_with_flag_defaults(tmp_path: Path) -> None:
    write_images(tmp_path / "pics", ["a.png", "b.jpg"])
    manifest = write_manifest(tmp_path / "edits.jsonl", [
        {"image": "pics/a.png", "instruction": " make it green ", "seed": 7, "guidance": 2},
        "",
        {"image": "pics/b.jpg", "instruction": "add snow", "output": "sub/b-snow.png", "negative": "dark",
         "steps": 3, "image_guidance": 1.0, "refine_strength": 0.0},
    ])
    first, second = manifest_items(manifest, tmp_path / "out", TEMPLATE, E1_1, fuse_lora=False)
    assert first.index == 0 and first.label == "edits.jsonl line 1"
    assert first.image == tmp_path / "pics" / "a.png" and first.output == tmp_path / "out" / "a.png"
    assert first.request.instruction == "make it green" and first.request.seed == 7 and first.request.guidance == 2
    assert first.request.steps == 2 and first.request.negative == E1_1.defaults.negative  # flag, then model default
    assert second.index == 1 and second.label == "edits.jsonl line 3"
    assert second.output == tmp_path / "out" / "sub" / "b-snow.png"
    assert (second.request.negative, second.request.steps, second.request.seed) == ("dark", 3, E1_1.defaults.seed)
    assert (second.request.image_guidance, second.request.refine_strength) == (1.0, 0.0)


def test_e1_full_lines_build_the_prompt_form_from_target_description(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png"])
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"image": "a.png", "instruction": "add a hat", "target_description": "a dog in a hat", "output": "1.png"},
        {"image": "a.png", "instruction": "add a hat", "output": "2.png"},
    ])
    with_form, bare = manifest_items(manifest, tmp_path / "out", TEMPLATE, E1_FULL, fuse_lora=False)
    assert with_form.request.instruction == "Editing Instruction: add a hat. Target Image Description: a dog in a hat"
    assert bare.request.instruction == "add a hat"
    assert with_form.request.guidance == E1_FULL.defaults.guidance


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"image": "a.png", "instruction": "x"', "not valid JSON (Expecting"),
        ('["a.png", "x"]', "expected a JSON object, got list"),
        ({"image": "a.png", "instruction": "x", "sed": 3}, "unknown key 'sed'; use image, instruction, output"),
        ({"image": "a.png", "instruction": "x", "target_description": "y"}, "unknown key 'target_description'"),
        ({"image": "a.png"}, "missing 'instruction'"),
        ({"instruction": "x"}, "missing 'image'"),
        ({"image": "a.png", "instruction": "x", "seed": "3"}, "'seed' must be an integer, got \"3\""),
        ({"image": "a.png", "instruction": "x", "steps": True}, "'steps' must be an integer, got true"),
        ({"image": "a.png", "instruction": "x", "guidance": "high"}, "'guidance' must be a number"),
        ({"image": "a.png", "instruction": 5}, "'instruction' must be a string, got 5"),
        ({"image": "gone.png", "instruction": "x"}, "image 'gone.png' ("),
        ({"image": "a.png", "instruction": "x", "output": "/tmp/o.png"}, "must be a relative path inside --output-dir"),
        ({"image": "a.png", "instruction": "x", "output": "../o.png"}, "must be a relative path inside --output-dir"),
        ({"image": "a.png", "instruction": "x", "output": "o.gif"}, "unknown image extension"),
        ({"image": "a.png", "instruction": "x", "steps": 0}, "steps must be between 1 and 1000, got 0"),
        ({"image": "a.png", "instruction": "x", "refine_strength": 2}, "refine strength must be between 0 and 1"),
        ({"image": "a.png", "instruction": "  "}, "the instruction is empty"),
    ],
)
def test_each_bad_line_is_reported_with_its_line_number(tmp_path: Path, line: Any, message: str) -> None:
    write_images(tmp_path, ["a.png"])
    good = {"image": "a.png", "instruction": "fine", "output": "good.png"}
    manifest = write_manifest(tmp_path / "m.jsonl", [good, "", line])
    problems = problems_of(manifest, tmp_path / "out")
    assert len(problems) == 1 and problems[0].startswith("m.jsonl line 3: ") and message in problems[0], problems


def test_every_problem_is_listed_and_duplicates_name_the_first_line(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png", "b.png"])
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"image": "a.png", "instruction": "x"},
        {"image": "b.png", "instruction": "y", "output": "a.png"},
        "not json",
        {"image": "b.png", "instruction": "z", "output": "../b.png"},
    ])
    problems = problems_of(manifest, tmp_path / "out")
    assert [p.split(":")[0] for p in problems] == ["m.jsonl line 2", "m.jsonl line 3", "m.jsonl line 4"]
    assert "is also the output of m.jsonl line 1" in problems[0]


def test_output_that_is_an_input_image_and_empty_manifest_are_rejected(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png", "b.png"])
    lines = [{"image": "a.png", "instruction": "x", "output": "b.png"}, {"image": "b.png", "instruction": "x"}]
    manifest = write_manifest(tmp_path / "m.jsonl", [*lines[:1], {**lines[1], "output": "c.png"}])
    problems = problems_of(manifest, tmp_path)  # --output-dir is the images' folder
    assert problems == [f"m.jsonl line 1: output {tmp_path / 'b.png'} is the input image of m.jsonl line 2"]
    assert problems_of(write_manifest(tmp_path / "empty.jsonl", ["", "  "]), tmp_path / "out") == [
        f"{tmp_path / 'empty.jsonl'}: no edits (the manifest is empty)"
    ]
    with pytest.raises(UserError, match="missing.jsonl: file not found"):
        manifest_items(tmp_path / "missing.jsonl", tmp_path / "out", TEMPLATE, E1_1, fuse_lora=False)


# Reading a folder


def test_folder_lists_supported_images_sorted_skipping_hidden_and_outputs(tmp_path: Path) -> None:
    source = tmp_path / "in"
    write_images(source, ["b.png", "a.JPG", ".hidden.png", "sub/c.png", "out/old.png"])
    (source / "notes.txt").write_text("not an image")
    flat = folder_items(source, source / "out", False, replace(TEMPLATE, instruction="x"), E1_1, False)
    assert [item.label for item in flat] == ["a.JPG", "b.png"] and [i.index for i in flat] == [0, 1]
    assert flat[0].output == source / "out" / "a.JPG" and flat[0].request.instruction == "x"
    assert flat[0].image == source / "a.JPG"  # each item edits its own image, not the template's
    deep = folder_items(source, source / "out", True, replace(TEMPLATE, instruction="x"), E1_1, False)
    assert [item.label for item in deep] == ["a.JPG", "b.png", "sub/c.png"]
    assert deep[2].output == source / "out" / "sub" / "c.png"


def test_folder_items_are_in_path_order_whatever_order_the_folder_lists(tmp_path: Path) -> None:
    """Item numbers, the ranks' shares and the summary's order follow the path, not the filesystem."""
    names = ["d.png", "b.png", "f.png", "a.png", "e.png", "c.png"]
    write_images(tmp_path / "in", names)
    items = folder_items(tmp_path / "in", tmp_path / "out", False, replace(TEMPLATE, instruction="x"), E1_1, False)
    assert [item.label for item in items] == sorted(names) and [item.index for item in items] == list(range(6))


def test_folder_mistakes(tmp_path: Path) -> None:
    request = replace(TEMPLATE, instruction="x")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    write_images(tmp_path / "empty" / "sub", ["a.png"])
    with pytest.raises(UserError, match=r"no images \(bmp, jpeg, jpg, png, tif, tiff, webp\) in .*sub-folders need"):
        folder_items(tmp_path / "empty", tmp_path / "out", False, request, E1_1, False)
    with pytest.raises(UserError, match="--output-dir must differ from --input-dir"):
        folder_items(tmp_path / "empty", tmp_path / "empty", True, request, E1_1, False)
    with pytest.raises(UserError, match="is not a folder"):
        folder_items(tmp_path / "nowhere", tmp_path / "out", False, request, E1_1, False)
    with pytest.raises(UserError, match="steps must be between"):
        folder_items(tmp_path / "empty", tmp_path / "out", True, replace(request, steps=0), E1_1, False)


# The command line


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--image", "a.png", "--manifest", "m.jsonl", "--output-dir", "o"], "--image is for one edit"),
        (["--input-dir", "d", "--manifest", "m.jsonl", "--output-dir", "o"], "use --input-dir or --manifest, not both"),
        (["--manifest", "m.jsonl"], "a batch needs --output-dir"),
        (["--manifest", "m.jsonl", "--output-dir", "o", "--output", "x.png"], "--output is for one edit"),
        (["--manifest", "m.jsonl", "--output-dir", "o", "--instruction", "x"], "not used with --manifest"),
        (["--input-dir", "d", "--output-dir", "o"], "--input-dir needs --instruction"),
        (["--image", "a.png", "--instruction", "x", "--output", "o.png", "--output-dir", "o"], "are for batches"),
        (["--image", "a.png", "--instruction", "x"], "missing --output: give --image, --instruction and --output"),
        ([], "missing --image, --instruction, --output"),
    ],
)
def test_wrong_flag_combinations_are_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_edit_cli(["--tiny", *argv], "e1.1")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--input-dir", "d", "--instruction", "x", "--output-dir", "o", "--rewrite-instruction"],
         "works on one image"),
        (["--manifest", "m.jsonl", "--output-dir", "o", "--target-description", "y"], "give each line a 'target_desc"),
    ],
)
def test_e1_full_batch_flag_mistakes(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_edit_cli(["--tiny", *argv], "e1-full")
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture()
def counted_loads(monkeypatch: pytest.MonkeyPatch, e1_full_editor: Editor) -> list[Any]:
    """Editor.load stands in the session's tiny E1-Full editor and records each call."""
    calls: list[Any] = []

    def load(settings: Any, dm: Any = None, tensor: Any = None) -> Editor:
        calls.append(settings)
        return e1_full_editor

    monkeypatch.setattr(Editor, "load", staticmethod(load))
    return calls


def run_cli(argv: list[str], env: dict[str, str]) -> int:
    return run_edit_cli(["--tiny", "--refine-weights", "base", "--steps", "2", *argv], "e1-full", env=env)


def test_bad_manifest_exits_2_before_loading_and_lists_each_problem(
    tmp_path: Path, tiny_env: dict[str, str], counted_loads: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path, ["a.png"])
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "instruction": "x", "seed": "1"},
                                                     {"image": "b.png", "instruction": "x"}])
    code = run_cli(["--manifest", str(manifest), "--output-dir", str(tmp_path / "out")], tiny_env)
    err = capsys.readouterr().err
    assert code == 2 and counted_loads == [] and not (tmp_path / "out").exists()
    assert err.splitlines() == [
        "error: m.jsonl line 1: 'seed' must be an integer, got \"1\"",
        f"error: m.jsonl line 2: image 'b.png' ({tmp_path / 'b.png'}): file not found",
    ]


def _stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


def test_failure_resume_skip_and_overwrite_through_the_cli(
    tmp_path: Path, tiny_env: dict[str, str], counted_loads: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path, ["a.png", "c.png"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    lines = [{"image": "a.png", "instruction": "make it green", "refine_strength": 0.0},
             {"image": "broken.png", "instruction": "x"},
             {"image": "c.png", "instruction": "make it blue", "seed": 4, "output": "c-blue.webp"}]
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    argv = ["--manifest", str(manifest), "--output-dir", str(out)]

    started = time.perf_counter()
    assert run_cli(argv, tiny_env) == 1  # one item failed, the others were made
    took = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["seconds"] <= took and sum(item["seconds"] for item in summary["items"]) <= took
    assert summary["counts"] == {"ok": 2, "failed": 1, "skipped": 0} and summary["items_total"] == 3
    assert [item["status"] for item in summary["items"]] == ["ok", "failed", "ok"]
    failed = summary["items"][1]
    assert failed["label"] == "m.jsonl line 2" and "broken.png: " in failed["error"] and failed["seconds"] >= 0
    assert summary["items"][2]["output"] == str(out / "c-blue.webp") and summary["images_per_minute"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a.png.json", "c-blue.webp", "c-blue.webp.json",
                                                     "summary.json"]
    metadata = json.loads((out / "a.png.json").read_text())
    assert metadata["source_sha256"] == file_sha256(tmp_path / "a.png") and metadata["refine_strength"] == 0.0
    first = {name: _stat(out / name) for name in ("a.png", "c-blue.webp")}
    captured = capsys.readouterr()
    assert captured.out.startswith("batch: 2 done, 1 failed, 0 skipped of 3 in ") and "images/min" in captured.out
    assert f"failed: m.jsonl line 2: {failed['error']}\n" in captured.err  # told when it happens, above the bar

    write_images(tmp_path, ["broken.png"])  # fixed: the rerun edits only this one
    assert run_cli(argv, tiny_env) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [item["status"] for item in summary["items"]] == ["skipped", "ok", "skipped"]
    assert [item["seconds"] > 0 for item in summary["items"]] == [False, True, False]  # skipping takes no edit time
    assert {name: _stat(out / name) for name in first} == first  # finished outputs untouched
    assert len(counted_loads) == 2

    assert run_cli(argv, tiny_env) == 0  # all done: nothing to load
    assert json.loads((out / "summary.json").read_text())["counts"] == {"ok": 0, "failed": 0, "skipped": 3}
    assert len(counted_loads) == 2

    lines[2]["steps"] = 1  # a different request for an existing output: refused before loading
    write_manifest(manifest, lines)
    capsys.readouterr()
    assert run_cli(argv, tiny_env) == 2 and len(counted_loads) == 2
    assert capsys.readouterr().err == (
        f"error: {out / 'c-blue.webp'} exists and was not made by this request (steps was 2, now 1); "
        "pass --overwrite to replace it or choose another --output-dir\n"
    )
    assert _stat(out / "c-blue.webp") == first["c-blue.webp"]
    assert run_cli([*argv, "--overwrite"], tiny_env) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [item["status"] for item in summary["items"]] == ["skipped", "skipped", "ok"]
    assert json.loads((out / "c-blue.webp.json").read_text())["steps"] == 1
    assert _stat(out / "a.png") == first["a.png"]


def test_folder_batch_through_the_cli_matches_single_image_edits(
    tmp_path: Path, tiny_env: dict[str, str], counted_loads: list[Any], e1_full_editor: Editor
) -> None:
    sources = write_images(tmp_path / "in", ["sub/x.png"])
    out = tmp_path / "out"
    argv = ["--input-dir", str(tmp_path / "in"), "--recursive", "--instruction", "add a hat",
            "--target-description", "a hat", "--output-dir", str(out), "--seed", "9"]
    assert run_cli(argv, tiny_env) == 0
    for source in sources:
        prompt = "Editing Instruction: add a hat. Target Image Description: a hat"
        expected = e1_full_editor.edit(EditRequest(image=source, instruction=prompt, steps=2, seed=9))
        assert np.array_equal(np.asarray(Image.open(out / "sub" / source.name)), np.asarray(expected.image))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_dir"] == str(tmp_path / "in") and summary["recursive"] is True
    assert summary["counts"]["ok"] == 1


# The item loop without a model


class FakeDeviceManager:
    def __init__(self) -> None:
        self.emptied = 0

    def empty_cache(self) -> None:
        self.emptied += 1


class FakeEditor:
    """Fails in the ways a real edit can: by raising, or by returning a non-finite image."""

    writes_outputs = True  # one process: no guidance group, so this editor saves

    def __init__(self, outcomes: dict[str, Any]) -> None:
        self.outcomes = outcomes
        self.dm = FakeDeviceManager()

    def edit(self, request: EditRequest, on_step: Any = None) -> EditResult:
        outcome = self.outcomes[Path(str(request.image)).name]
        if isinstance(outcome, BaseException):
            raise outcome
        return EditResult(Image.new("RGB", (8, 8)), {"non_finite_output": outcome == "nan"})


def test_item_failures_are_recorded_and_the_loop_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="hidream_edit.batch")  # --verbose: each failure's traceback in the log
    names = ["oom.png", "nan.png", "bug.png", "fine.png"]
    sources = write_images(tmp_path, names)
    items = [BatchItem(i, name, replace(TEMPLATE, image=path), tmp_path / "out" / name)
             for i, (name, path) in enumerate(zip(names, sources, strict=True))]
    editor = FakeEditor({"oom.png": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
                         "nan.png": "nan", "bug.png": KeyError("boom"), "fine.png": "ok"})
    records = run_items(items, [OutputState("absent")] * 4, lambda: editor, LocalQueue(), False,  # type: ignore
                        BatchProgress(4, enabled=False))
    assert [r.status for r in records] == ["failed", "failed", "failed", "ok"]
    assert records[0].error.startswith("out of device memory (CUDA out of memory. Tried to allocate 9 GiB)")
    assert records[1].error.startswith("the output contains NaN/inf (not saved)")
    assert records[2].error == "KeyError: 'boom'" and editor.dm.emptied == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fine.png", "fine.png.json"]
    tracebacks = {r.getMessage(): r.exc_info[0] for r in caplog.records if r.exc_info is not None}
    assert tracebacks["item bug.png failed"] is KeyError and tracebacks["item oom.png failed"] is torch.OutOfMemoryError


def test_an_item_error_is_one_line_and_only_out_of_memory_gets_the_memory_hint() -> None:
    assert batch.item_error_line(RuntimeError("NPU kernel failed\n  at op 7")) == "RuntimeError: NPU kernel failed"
    assert batch.item_error_line(RuntimeError("NPU out of memory")).startswith("out of device memory (NPU out of")
    assert batch.item_error_line(UserError("the output contains NaN")) == "the output contains NaN"
    assert batch.item_error_line(ValueError()) == "ValueError"


def test_each_edit_shows_its_steps_and_saves_into_folders_made_as_needed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output folder removed after the checks (or never made, outside run_batch) is made at save time."""
    sources = write_images(tmp_path, ["a.png", "b.png"])
    items = [BatchItem(i, p.name, replace(TEMPLATE, image=p), tmp_path / "out" / "deep" / p.name)
             for i, p in enumerate(sources)]

    class SteppingEditor(FakeEditor):
        def edit(self, request: EditRequest, on_step: Any = None) -> EditResult:
            on_step(1, 2)
            return super().edit(request, on_step)

    editor = SteppingEditor({"a.png": "ok", "b.png": "ok"})
    with BatchProgress(2, enabled=True) as progress:
        records = run_items(items, [OutputState("absent")] * 2, lambda: editor, LocalQueue(), False,  # type: ignore
                            progress)
    assert [r.status for r in records] == ["ok", "ok"]
    assert sorted(p.name for p in (tmp_path / "out" / "deep").iterdir()) == ["a.png", "a.png.json", "b.png",
                                                                            "b.png.json"]
    assert "step 1/2" in capsys.readouterr().err


def test_with_overwrite_a_different_output_is_replaced(tmp_path: Path) -> None:
    sources = write_images(tmp_path, ["a.png", "b.png"])
    items = [BatchItem(i, p.name, replace(TEMPLATE, image=p), tmp_path / "out" / p.name) for i, p in enumerate(sources)]
    (tmp_path / "out").mkdir()
    items[0].output.write_bytes(b"an earlier, different output")
    editor = FakeEditor({"a.png": "ok", "b.png": "ok"})
    states = [OutputState("different", "seed was 1, now 2"), OutputState("absent")]
    records = run_items(items, states, lambda: editor, LocalQueue(), True, BatchProgress(2, False))  # type: ignore
    assert [r.status for r in records] == ["ok", "ok"], records
    assert Image.open(items[0].output).size == (8, 8)


def test_repeated_editor_warnings_are_shown_once_per_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sources = write_images(tmp_path, ["a.png", "b.png"])
    items = [BatchItem(i, p.name, replace(TEMPLATE, image=p), tmp_path / "out" / p.name) for i, p in enumerate(sources)]

    class WarningEditor(FakeEditor):
        def edit(self, request: EditRequest, on_step: Any = None) -> EditResult:
            logging.getLogger("hidream_edit.editor").warning("E1-Full expects the prompt form")
            return super().edit(request, on_step)

    caplog.set_level("WARNING", logger="hidream_edit")
    editor = WarningEditor({"a.png": "ok", "b.png": "ok"})
    run_items(items, [OutputState("absent")] * 2, lambda: editor, LocalQueue(), False, BatchProgress(2, False))  # type: ignore
    assert caplog.text.count("E1-Full expects the prompt form") == 1
    editor.edit(items[0].request)  # outside a batch the editor warns every time again
    assert caplog.text.count("E1-Full expects the prompt form") == 2


# Resume decisions without a model


def test_output_states_compare_the_metadata_json(tmp_path: Path) -> None:
    (source,) = write_images(tmp_path, ["a.png"])
    item = BatchItem(0, "a.png", replace(TEMPLATE, image=source, instruction="x", negative="n", guidance=1.0,
                                         image_guidance=1.0, refine_strength=0.0, clip_cfg_norm=True, seed=1),
                     tmp_path / "out" / "a.png")
    context = RunContext("e1.1", {"model": "e1.1", "tiny": True}, "device", "edit", False, "fp32")
    (tmp_path / "out").mkdir()
    assert check_outputs([item], context, overwrite=False)[0].kind == "absent"
    Image.new("RGB", (4, 4)).save(item.output)
    with pytest.raises(BatchError, match="exists and was not made by this request \\(it has no metadata JSON\\)"):
        check_outputs([item], context, overwrite=False)
    metadata = {**expected_metadata(item, context, file_sha256(source)), "timings": {"load_s": 1.0},
                "output_sha256": file_sha256(item.output)}
    Path(f"{item.output}.json").write_text(json.dumps(metadata))
    assert check_outputs([item], context, overwrite=False)[0].kind == "done"
    assert check_outputs([item], replace(context, dtype="bf16"), overwrite=True)[0].reason == (
        'dtype was "fp32", now "bf16"'
    )
    write_images(tmp_path, ["a.png"], size=(5, 5))  # the source changed under the same name
    assert batch.output_state(item, context).reason.startswith("source_sha256 was ")
    item.output.unlink()
    assert batch.output_state(item, context).reason == "only its metadata a.png.json is there"


def test_summary_counts_and_throughput(tmp_path: Path) -> None:
    records = [ItemRecord(2, "c", "c.png", "o/c.png", "skipped", 0.0),
               ItemRecord(0, "a", "a.png", "o/a.png", "ok", 3.0),
               ItemRecord(1, "b", "b.png", "o/b.png", "failed", 1.0, "bad", rank=1)]
    summary = summarize(records, 3, 30.0, 2, {"manifest": "m.jsonl"}, "e1.1")
    assert summary["counts"] == {"ok": 1, "failed": 1, "skipped": 1} and summary["images_per_minute"] == 2.0
    assert [item["index"] for item in summary["items"]] == [0, 1, 2] and summary["items"][1]["rank"] == 1
    assert summary["manifest"] == "m.jsonl" and summary["world_size"] == 2 and summary["model"] == "e1.1"
    odd = summarize(records, 3, 7.123456, 1, {}, "e1.1")  # milliseconds, and images/min to 3 decimals
    assert (odd["seconds"], odd["images_per_minute"]) == (7.123, 8.423)
    assert summarize(records, 3, 0.0, 1, {}, "e1.1")["images_per_minute"] == 0.0
    assert summarize(records, 3, 0.5, 1, {}, "e1.1")["images_per_minute"] == 120.0  # a sub-second run has a rate
    assert summary_line(summary, Path("o/summary.json")) == (
        "batch: 1 done, 1 failed, 1 skipped of 3 on 2 ranks in 30.0 s (2.00 images/min); summary o/summary.json"
    )
    write_summary(tmp_path / "summary.json", {"counts": {"ok": 1}})  # indented for people reading it
    assert (tmp_path / "summary.json").read_text() == '{\n  "counts": {\n    "ok": 1\n  }\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o666 & ~umask  # like any file it writes
    assert summary_line(odd, None) == (
        "batch: 1 done, 1 failed, 1 skipped of 3 in 7.1 s (8.42 images/min); no summary written"
    )


# torchrun's variables


def test_distributed_environment() -> None:
    assert not distributed_environment({}).enabled
    assert not distributed_environment({"WORLD_SIZE": "1", "RANK": "0"}).enabled
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
           "TORCHELASTIC_RESTART_COUNT": "2"}
    found = distributed_environment(env)
    assert found.enabled and (found.rank, found.local_rank, found.master_addr, found.master_port) == (
        1, 1, "10.0.0.1", 29500
    ) and found.attempt == 2
    with pytest.raises(UserError, match="needs RANK between 0 and 1"):
        distributed_environment({**env, "RANK": "2"})
    with pytest.raises(UserError, match="needs MASTER_ADDR and MASTER_PORT"):
        distributed_environment({**env, "MASTER_ADDR": ""})
    with pytest.raises(UserError, match="WORLD_SIZE='two' is not a non-negative integer"):
        distributed_environment({**env, "WORLD_SIZE": "two"})


# Prompt-embedding cache


def test_the_progress_bar_counts_images_shows_the_step_and_writes_failures_above_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with BatchProgress(3, enabled=True) as progress:
        progress.step(2, 4)
        progress.finished(ItemRecord(0, "a", "a.png", "o/a.png", "ok", 1.0))
        progress.finished(ItemRecord(0, "a", "a.png", "o/a.png", "ok", 1.0), finished_everywhere=1)  # no news
        assert progress.bar.n == 1
        progress.finished(ItemRecord(1, "b", "b.png", "o/b.png", "failed", 1.0, "bad"), finished_everywhere=3)
    err = capsys.readouterr().err
    assert "failed: b: bad\n" in err and "step 2/4" in err
    assert err.rstrip().splitlines()[-1].split("\r")[-1].startswith("images: 100%") and "3/3" in err
    assert "image/s" in err or "s/image" in err  # the rate counts images, not tqdm's "it"


def test_prompt_cache_keeps_the_most_recent_entries() -> None:
    cache = PromptEmbeddingCache("e1.1", max_entries=2)
    for prompt in ("a", "b"):
        cache.store((prompt, "n", 128), prompt)  # type: ignore[arg-type]
    assert cache.lookup(("a", "n", 128)) == "a"  # "a" is now the most recent
    cache.store(("c", "n", 128), "c")  # type: ignore[arg-type]
    assert cache.lookup(("b", "n", 128)) is None and cache.lookup(("a", "n", 128)) == "a" and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 1)
    disabled = PromptEmbeddingCache("e1.1", max_entries=0)
    disabled.store(("a", "n", 128), "a")  # type: ignore[arg-type]
    assert disabled.lookup(("a", "n", 128)) is None
    single = PromptEmbeddingCache("e1.1", max_entries=1)
    for prompt in ("a", "b"):
        single.store((prompt, "n", 128), prompt)  # type: ignore[arg-type]
    assert single.lookup(("b", "n", 128)) == "b" and single.lookup(("a", "n", 128)) is None and len(single) == 1


def test_one_instruction_is_encoded_once_and_gives_the_same_image(
    e1_full_editor: Editor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pipe = e1_full_editor.loaded.pipe
    calls: list[str] = []
    encode = pipe.encode_prompt

    def counting_encode(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["prompt"])
        return encode(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", counting_encode)
    (source,) = write_images(tmp_path, ["a.png"])
    prompt = "Editing Instruction: add a hat. Target Image Description: a cat in a hat."
    request = EditRequest(source, prompt, steps=1, negative="a fresh negative for this test")
    first = e1_full_editor.edit(request)
    second = e1_full_editor.edit(replace(request, seed=5))
    assert calls == [prompt, "a cat in a hat."]  # the main and the refine prompt, each once
    e1_full_editor.edit(replace(request, negative="another negative"))
    assert len(calls) == 4  # a different negative is a different entry
    monkeypatch.setattr(pipe, "prompt_cache", None)
    uncached = e1_full_editor.edit(replace(request, seed=5))
    assert len(calls) == 6
    assert np.array_equal(np.asarray(second.image), np.asarray(uncached.image))
    assert not np.array_equal(np.asarray(first.image), np.asarray(second.image))
