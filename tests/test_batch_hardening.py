"""Batches under hostile-but-realistic use (issue 22): everything that would fail after the model loaded is
found before, every value echoed is cut and escaped, resume reads only what it should, one batch per
output folder, and the run's end (exit code, counts, summary) stays honest when a rank or the disk fails.

The run-level tests stand a FakeEditor in for the model, so they load nothing; the torchrun rank is a
stand-in group in this process (the collectives are not the point here).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from test_batch import TEMPLATE, FakeEditor, problems_of, run_cli, write_images, write_manifest

from hidream_edit import batch
from hidream_edit.batch import (
    BatchItem,
    BatchProgress,
    LocalQueue,
    OutputState,
    RunContext,
    expected_metadata,
    folder_items,
    output_state,
    run_batch,
    run_items,
)
from hidream_edit.config import DistributedEnvironment
from hidream_edit.distributed import CardGroup
from hidream_edit.editor import Editor, EditRequest, EditResult, file_sha256, save_result
from hidream_edit.errors import GuidanceGroupError, UserError
from hidream_edit.spec import MODELS

CONTEXT = RunContext("e1.1", {"model": "e1.1", "tiny": True}, "device", "edit", False, "fp32")


@pytest.fixture()
def no_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: the mistake must be found before."""

    def load(settings: Any, dm: Any = None, tensor: Any = None) -> None:
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(Editor, "load", staticmethod(load))


def one_line_manifest(tmp_path: Path, **line: Any) -> Path:
    write_images(tmp_path, ["a.png"])
    return write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "instruction": "x", **line}])


def refuse_new_files_in(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Creating a file in `folder` fails as on a read-only mount (root ignores permission bits)."""
    real_open = os.open

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and Path(path).parent == folder:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


# Found before loading


@pytest.mark.parametrize("case", ["read-only sub-folder", "read-only output folder", "240-character name",
                                  "300-character name", "dangling link", "linked sub-folder"])
def test_outputs_that_cannot_be_saved_are_refused_before_loading(
    case: str, tmp_path: Path, tiny_env: dict[str, str], no_loads: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output = {"read-only sub-folder": "deep/sub/a.png", "read-only output folder": "a.png",
              "240-character name": "n" * 236 + ".png", "300-character name": "n" * 296 + ".png",
              "dangling link": "a.png", "linked sub-folder": "link/a.png"}[case]
    expected = {"read-only sub-folder": f"cannot create files in {out / 'deep' / 'sub'}: Read-only file system",
                "read-only output folder": f"cannot create files in --output-dir {out}: Read-only file system",
                "240-character name": "is 240 bytes long; at most ",
                "300-character name": "is 300 bytes long; at most ",
                "dangling link": f"{out / 'a.png'} is a symbolic link (outputs are never written through links)",
                "linked sub-folder": f"would be written to {elsewhere / 'a.png'}, outside --output-dir"}[case]
    if case == "read-only sub-folder":
        refuse_new_files_in(monkeypatch, out / "deep" / "sub")  # made, with its parent, before the check
    if case == "read-only output folder":
        refuse_new_files_in(monkeypatch, out)
    if case == "dangling link":
        (out / "a.png").symlink_to(tmp_path / "nowhere.png")
    if case == "linked sub-folder":
        (out / "link").symlink_to(elsewhere)
    manifest = one_line_manifest(tmp_path, output=output)
    code = run_cli(["--manifest", str(manifest), "--output-dir", str(out), "--overwrite"], tiny_env)
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert list(elsewhere.iterdir()) == []


def test_a_second_batch_on_a_locked_output_dir_names_the_holder_and_loads_nothing(
    tmp_path: Path, tiny_env: dict[str, str], no_loads: None, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = one_line_manifest(tmp_path)
    out = tmp_path / "out"
    umask = os.umask(0o022)
    os.umask(umask)
    with batch.output_dir_lock(out):
        assert run_cli(["--manifest", str(manifest), "--output-dir", str(out)], tiny_env) == 2
        # made with the permissions of any file the batch writes (0o666 less the umask), not private or open
        assert stat.S_IMODE((out / batch.LOCK_NAME).stat().st_mode) == 0o666 & ~umask
    assert capsys.readouterr().err == (
        f"error: --output-dir {out} is in use by another batch (process {os.getpid()} on this host); "
        "wait for it to finish or choose another --output-dir\n"
    )
    assert list(out.iterdir()) == []  # the holder removes the lock file
    with batch.output_dir_lock(out):  # free again
        pass


@pytest.mark.parametrize(("line", "holder"), [("4242 build-node-7\n", "process 4242 on build-node-7"),
                                             ("4242\n", "process 4242 on an unknown host"),
                                             ("", "another process")])
def test_the_lock_holder_is_named_from_its_line_when_it_runs_elsewhere(tmp_path: Path, line: str, holder: str) -> None:
    """A holder on another host of a shared folder (or one that has not written its line yet)."""
    out = tmp_path / "out"
    out.mkdir()
    with open(out / batch.LOCK_NAME, "w") as held:
        held.write(line)
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with (
            pytest.raises(UserError, match=rf"is in use by another batch \({holder}\); wait"),
            batch.output_dir_lock(out),
        ):
            pass


def test_a_lock_file_removed_while_it_was_being_locked_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder before removes its file as this batch opens it: this batch must lock a new file under the
    name, not the removed one (else the next batch would lock the name too)."""
    out = tmp_path / "out"
    lock = out / batch.LOCK_NAME
    real_stat = os.stat
    removed: list[Path] = []

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(path) == lock and not removed:
            os.unlink(lock)  # what the finishing holder does
            removed.append(lock)
            raise FileNotFoundError(2, "No such file or directory")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    with batch.output_dir_lock(out):
        assert removed and lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    assert not lock.exists()


def open_descriptors(folder: Path) -> int:
    """How many file descriptors this process holds on files in `folder` (Linux); counting only those
    keeps other threads' files out of the count."""
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            held += Path(os.readlink(f"/proc/self/fd/{fd}")).parent == folder
        except OSError:  # closed since the listing
            continue
    return held


def test_the_lock_makes_nested_output_folders_and_replaces_a_stale_holder_line(tmp_path: Path) -> None:
    """A holder killed without clean-up leaves its lock file (the flock goes with it): the next batch takes
    it, and the holder line then names only the new holder, with nothing of the old one's longer line."""
    out = tmp_path / "new" / "nested" / "out"
    out.mkdir(parents=True)
    (out / batch.LOCK_NAME).write_text("123456789 a-much-longer-host-name-of-the-killed-holder.example.org\n")
    with batch.output_dir_lock(out):
        assert (out / batch.LOCK_NAME).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    deeper = tmp_path / "made" / "by" / "the" / "lock"
    with batch.output_dir_lock(deeper):  # --output-dir may name folders that do not exist yet
        assert deeper.is_dir()


def test_the_lock_leaves_no_file_descriptor_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Taken, refused or retried, the lock closes every descriptor it opened (a long-lived process runs
    many batches)."""
    out = tmp_path / "out"
    before = open_descriptors(out)
    with batch.output_dir_lock(out):
        with pytest.raises(UserError, match="is in use by another batch"), batch.output_dir_lock(out):
            pass
        assert open_descriptors(out) == before + 1  # the holder's own
    assert open_descriptors(out) == before
    lock, real_stat = out / batch.LOCK_NAME, os.stat
    moved: list[bool] = []

    def stat_(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(path) == lock and not moved:  # the name now leads to another file: lock again
            moved.append(True)
            raise FileNotFoundError(2, "No such file or directory")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_)
    with batch.output_dir_lock(out):
        assert moved
    assert open_descriptors(out) == before


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"image": "i" * 300 + ".png"}, "cannot access file (File name too long)"),
        ({"output": "o\0.png"}, "contains a NUL character, which no file name can hold"),
        ({"output": "o\ud800.png"}, "is not valid Unicode text (a lone surrogate at character 2)"),
        ({"image": "a\0.png"}, "contains a NUL character"),
        ({"image": "pipe.png"}, "is a named pipe (FIFO), not an image file"),
        ({"image": "/dev/zero"}, "is a character device, not an image file"),
    ],
)
def test_manifest_paths_that_no_file_operation_takes_are_one_problem_line(
    tmp_path: Path, line: dict[str, str], message: str
) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    problems = problems_of(one_line_manifest(tmp_path, **line), tmp_path / "out")
    assert len(problems) == 1 and problems[0].startswith("m.jsonl line 1: ") and message in problems[0], problems


def test_a_manifest_line_nested_too_deeply_is_one_problem_line(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png"])
    deep = '{"image": "a.png", "instruction": "x", "seed": ' + "[" * 100_000 + "]" * 100_000 + "}"
    problems = problems_of(write_manifest(tmp_path / "m.jsonl", [deep]), tmp_path / "out")
    assert problems == ["m.jsonl line 1: not usable JSON (nested too deeply)"]


def test_echoed_values_are_cut_and_their_control_characters_escaped(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png"])
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"image": "a.png", "instruction": "x", "steps": "9" * 20_000_000},
        {"image": "\x1b]0;owned\x07\x1b[2Jgone.png", "instruction": "x"},
    ])
    steps, image = problems_of(manifest, tmp_path / "out")
    assert len(steps) < 400 and steps.endswith("... (20000002 characters)"), steps[:400]
    assert "\x1b" not in image and "\x07" not in image
    assert "image '\\x1b]0;owned\\x07\\x1b[2Jgone.png'" in image


def test_an_input_dir_inside_the_output_dir_says_so(tmp_path: Path) -> None:
    write_images(tmp_path / "out" / "in", ["a.png"])
    with pytest.raises(UserError, match=r"--input-dir .*in is inside --output-dir .*out, whose files are never read"):
        folder_items(tmp_path / "out" / "in", tmp_path / "out", False, replace(TEMPLATE, instruction="x"),
                     MODELS["e1.1"], False)


# Resume reads only regular files, bounded, and checks the image


def saved_item(tmp_path: Path, seed: int = 1) -> BatchItem:
    """An item whose output was saved by this request (image + metadata JSON with its checksum)."""
    (source,) = write_images(tmp_path, ["a.png"])
    item = BatchItem(0, "a.png", replace(TEMPLATE, image=source, instruction="x", negative="n", guidance=1.0,
                                         image_guidance=1.0, refine_strength=0.0, clip_cfg_norm=True, seed=seed),
                     tmp_path / "out" / "a.png")
    item.output.parent.mkdir(exist_ok=True)
    metadata = expected_metadata(item, CONTEXT, file_sha256(source))
    save_result(EditResult(Image.new("RGB", (64, 48), (9, 9, 9)), metadata), item.output)
    assert output_state(item, CONTEXT).kind == "done"
    return item


def test_a_rerun_with_another_seed_edits_again(tmp_path: Path) -> None:
    item = saved_item(tmp_path, seed=1)
    other_seed = replace(item, request=replace(item.request, seed=2))
    assert output_state(other_seed, CONTEXT) == OutputState("different", "seed was 1, now 2")


def test_a_truncated_output_image_is_not_taken_as_done(tmp_path: Path) -> None:
    item = saved_item(tmp_path)
    data = item.output.read_bytes()
    item.output.write_bytes(data[: len(data) // 2])
    assert output_state(item, CONTEXT) == OutputState(
        "different", "the image is not the one its metadata JSON describes (damaged or changed)"
    )


@pytest.mark.parametrize("kind", ["fifo", "dev-zero link", "17 MiB", "nested 100,000 deep"])
def test_resume_reads_only_a_bounded_regular_metadata_file(tmp_path: Path, kind: str) -> None:
    item = saved_item(tmp_path)
    json_path = Path(f"{item.output}.json")
    json_path.unlink()
    if kind == "fifo":
        os.mkfifo(json_path)
    elif kind == "dev-zero link":
        json_path.symlink_to("/dev/zero")
    elif kind == "17 MiB":
        json_path.write_bytes(b" " * (17 * 2**20))
    else:
        json_path.write_text("[" * 100_000 + "]" * 100_000)
    found: list[OutputState] = []
    reader = threading.Thread(target=lambda: found.append(output_state(item, CONTEXT)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert found, "resume hung on the metadata file"
    expected = {"fifo": OutputState("blocked", f"{json_path} exists and is not a regular file"),
                "dev-zero link": OutputState("blocked", f"{json_path} is a symbolic link (outputs are never "
                                                        "written through links)"),
                "17 MiB": OutputState("different", "its metadata JSON is 17825792 bytes; at most 16777216 are read"),
                "nested 100,000 deep": OutputState("different", "its metadata JSON is unreadable")}[kind]
    assert found == [expected]


# The item loop and the run's end


class CountingEditor(FakeEditor):
    def __init__(self, outcomes: dict[str, Any]) -> None:
        super().__init__(outcomes)
        self.edited: list[str] = []

    def edit(self, request: EditRequest, on_step: Any = None) -> EditResult:
        self.edited.append(Path(str(request.image)).name)
        return super().edit(request, on_step)


def items_of(tmp_path: Path, names: list[str]) -> list[BatchItem]:
    sources = write_images(tmp_path, names)
    return [BatchItem(i, p.name, replace(TEMPLATE, image=p), tmp_path / "out" / p.name) for i, p in enumerate(sources)]


def test_a_lost_guidance_group_stops_the_batch(tmp_path: Path) -> None:
    items = items_of(tmp_path, ["a.png", "b.png"])
    editor = CountingEditor({"a.png": GuidanceGroupError("rank 1 of the guidance group failed"), "b.png": "ok"})
    with pytest.raises(GuidanceGroupError):
        run_items(items, [OutputState("absent")] * 2, lambda: editor, LocalQueue(), False,  # type: ignore[arg-type]
                  BatchProgress(2, enabled=False))
    assert editor.edited == ["a.png"]


class FakeSettings:
    model = "e1.1"
    sources = SimpleNamespace(as_dict=lambda: {"model": "e1.1", "tiny": True})
    rng, refine_weights, fuse_lora = "device", "edit", False


class FakeRankGroup:
    """The rendezvous store of a torchrun group as seen by one rank; the other ranks' records are given."""

    def __init__(self, rank: int, world_size: int, claims: list[int], others: dict[int, list[dict[str, Any]]],
                 lost: bool = False) -> None:
        self.rank, self.world_size = rank, world_size
        self.claims = iter(claims)
        self.texts = {other: json.dumps(records) for other, records in others.items()}
        self.lost = lost
        self.counters: dict[str, int] = {}
        self.closed = False

    def take_number(self, counter: str) -> int:
        return next(self.claims)

    def add(self, counter: str, amount: int) -> int:
        self.counters[counter] = self.counters.get(counter, 0) + amount
        return self.counters[counter]

    def publish(self, name: str, text: str) -> None:
        self.texts[self.rank] = text

    def collect(self, name: str) -> list[str]:
        if self.lost:
            raise UserError("rank 0 waited 2 s for the other ranks' results (Socket Timeout); see --dist-timeout")
        return [self.texts[rank] for rank in range(self.world_size)]

    def collect_present(self, name: str) -> dict[int, str]:
        return dict(self.texts)

    def close(self) -> None:
        self.closed = True


def error_lines(err: str) -> list[str]:
    """stderr without the progress bar."""
    return [line for line in err.splitlines() if line.startswith("error: ")]


def run_as_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: FakeRankGroup, items: list[BatchItem], local_rank: int = 0
) -> int:
    editor = FakeEditor({item.image.name: "ok" for item in items})
    monkeypatch.setattr(Editor, "load", staticmethod(lambda settings, dm=None, tensor=None: editor))
    joined = SimpleNamespace(ranks=group, guidance=None, edit=None)
    monkeypatch.setattr(CardGroup, "join", staticmethod(lambda *args: joined))
    env = DistributedEnvironment(group.world_size, group.rank, local_rank, "127.0.0.1", 29500)
    dm = SimpleNamespace(dtype_name="fp32", empty_cache=lambda: None)
    return run_batch(items, FakeSettings(), tmp_path / "out", False, {"manifest": "m.jsonl"}, env, 2.0,  # type: ignore[arg-type]
                     dm=dm)  # type: ignore[arg-type]


def test_records_carry_the_global_rank_not_the_local_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second node's second card: RANK 3, LOCAL_RANK 1; summaries across nodes need the 3."""
    items = items_of(tmp_path, ["a.png", "b.png"])
    group = FakeRankGroup(3, 4, claims=[1, 2], others={})
    assert run_as_rank(tmp_path, monkeypatch, group, items, local_rank=1) == 0
    assert [(record["index"], record["rank"]) for record in json.loads(group.texts[3])] == [(1, 3)]


def test_rank_0_summarises_what_arrived_when_a_rank_never_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    items = items_of(tmp_path, ["a.png", "b.png", "c.png"])
    from_rank_1 = [{"index": 1, "label": "b.png", "image": "b.png", "output": "out/b.png", "status": "ok",
                    "seconds": 0.5, "rank": 1}]
    group = FakeRankGroup(0, 3, claims=[0, 3], others={1: from_rank_1}, lost=True)
    assert run_as_rank(tmp_path, monkeypatch, group, items) == 1
    out, err = capsys.readouterr()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0} and summary["items_reported"] == 2
    assert summary["lost_ranks"] == [2] and [item["rank"] for item in summary["items"]] == [0, 1]
    assert out.startswith("batch: 2 done, 0 failed, 0 skipped of 3 on 3 ranks in ")
    assert error_lines(err) == [
        "error: no records from rank(s) 2 (rank 0 waited 2 s for the other ranks' results (Socket Timeout); see "
        "--dist-timeout); their items are not in the summary; rerun the same command to finish them"
    ]


def test_a_rank_counts_each_finished_item_once_shows_no_bar_and_leaves_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rank 0's bar counts what every rank finished, from the shared counter; the other ranks draw none."""
    items = items_of(tmp_path, ["a.png", "b.png", "c.png"])
    group = FakeRankGroup(1, 2, claims=[0, 2, 3], others={})
    assert run_as_rank(tmp_path, monkeypatch, group, items) == 0
    assert group.counters["finished"] == 2 and group.closed
    assert "images:" not in capsys.readouterr().err


def test_rank_0_whose_wait_failed_but_got_every_record_reports_no_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    items = items_of(tmp_path, ["a.png", "b.png"])
    from_rank_1 = [{"index": 1, "label": "b.png", "image": "b.png", "output": "out/b.png", "status": "ok",
                    "seconds": 0.5, "rank": 1}]
    group = FakeRankGroup(0, 2, claims=[0, 2], others={1: from_rank_1}, lost=True)  # all there in the end
    started = time.perf_counter()
    assert run_as_rank(tmp_path, monkeypatch, group, items) == 0
    took = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert error_lines(err) == [] and "images:" in err and group.closed  # rank 0 draws the bar
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["ok"] == 2 and summary["lost_ranks"] == []
    assert 0 < summary["seconds"] <= took and 0 <= summary["items"][0]["seconds"] <= took  # durations, rank 0's own


@pytest.mark.parametrize("earlier", [True, False])
def test_a_summary_that_cannot_be_written_is_exit_1_with_the_counts_and_no_stale_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], earlier: bool
) -> None:
    items = items_of(tmp_path, ["a.png"])
    (tmp_path / "out").mkdir()
    if earlier:
        (tmp_path / "out" / "summary.json").write_text('{"counts": "of an earlier run"}')

    def disk_full(path: Path, summary: dict[str, Any]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch, "write_summary", disk_full)
    editor = FakeEditor({"a.png": "ok"})
    monkeypatch.setattr(Editor, "load", staticmethod(lambda settings, dm=None, tensor=None: editor))
    dm = SimpleNamespace(dtype_name="fp32", empty_cache=lambda: None)
    code = run_batch(items, FakeSettings(), tmp_path / "out", False, {}, dm=dm)  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    assert code == 1 and out.startswith("batch: 1 done, 0 failed, 0 skipped of 1 in ")
    assert out.rstrip().endswith("; no summary written")
    removed = "; the previous summary was removed" if earlier else ""
    assert error_lines(err) == [
        f"error: cannot write {tmp_path / 'out' / 'summary.json'} (No space left on device){removed}"
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "a.png.json"]


def test_a_summary_that_can_be_neither_written_nor_removed_is_said_to_be_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    items = items_of(tmp_path, ["a.png"])
    (tmp_path / "out" / "summary.json").mkdir(parents=True)  # a folder: neither replaced nor unlinked
    (tmp_path / "out" / "summary.json" / "kept").write_text("")
    editor = FakeEditor({"a.png": "ok"})
    monkeypatch.setattr(Editor, "load", staticmethod(lambda settings, dm=None, tensor=None: editor))
    dm = SimpleNamespace(dtype_name="fp32", empty_cache=lambda: None)
    code = run_batch(items, FakeSettings(), tmp_path / "out", False, {}, dm=dm)  # type: ignore[arg-type]
    (line,) = error_lines(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"error: cannot write {tmp_path / 'out' / 'summary.json'} (")
    assert line.endswith("; the previous summary is still there and describes an earlier run")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "a.png.json", "summary.json"]  # no temp


@pytest.mark.parametrize("kind", ["fifo", "dev-zero link", "link to a manifest"])
def test_the_manifest_is_read_only_if_it_is_a_regular_file(tmp_path: Path, kind: str) -> None:
    real = one_line_manifest(tmp_path)
    manifest = tmp_path / "given.jsonl"
    if kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to("/dev/zero" if kind == "dev-zero link" else real)
    found: list[Any] = []

    def read() -> None:
        try:
            found.append(batch.manifest_items(manifest, tmp_path / "out", TEMPLATE, MODELS["e1.1"], False))
        except UserError as exc:
            found.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert found, "reading the manifest hung"
    if kind == "link to a manifest":
        assert [item.label for item in found[0]] == ["given.jsonl line 1"]
    else:
        assert found == [f"--manifest {manifest}: is not a regular file"]


def test_a_file_is_read_up_to_its_limit_and_refused_beyond(tmp_path: Path) -> None:
    exact, over = tmp_path / "exact", tmp_path / "over"
    exact.write_bytes(b"12345")
    over.write_bytes(b"123456")
    assert batch.read_regular_file(exact, 5) == b"12345"
    with pytest.raises(UserError, match="^is 6 bytes; at most 5 are read$"):
        batch.read_regular_file(over, 5)


def test_a_manifest_over_256_mib_is_refused_unread(tmp_path: Path) -> None:
    manifest = tmp_path / "huge.jsonl"
    with manifest.open("wb") as stream:
        stream.truncate(256 * 2**20 + 1)  # sparse: nothing is written, and nothing may be read
    with pytest.raises(UserError, match=r": is 268435457 bytes; at most 268435456 are read$"):
        batch.manifest_items(manifest, tmp_path / "out", TEMPLATE, MODELS["e1.1"], False)


def test_an_output_dir_that_is_a_file_is_refused_for_manifests_and_folders(tmp_path: Path) -> None:
    manifest = one_line_manifest(tmp_path)
    out = tmp_path / "out"
    out.write_text("")
    with pytest.raises(UserError, match=f"^--output-dir {out} exists and is not a folder$"):
        batch.manifest_items(manifest, out, TEMPLATE, MODELS["e1.1"], False)
    with pytest.raises(UserError, match=f"^--output-dir {out} exists and is not a folder$"):
        folder_items(tmp_path, out, False, replace(TEMPLATE, instruction="x"), MODELS["e1.1"], False)


def test_a_manifest_output_name_too_long_to_save_is_a_problem_of_its_line(tmp_path: Path) -> None:
    problems = problems_of(one_line_manifest(tmp_path, output="n" * 296 + ".png"), tmp_path / "out")
    assert len(problems) == 1 and problems[0].startswith("m.jsonl line 1: the output file name "), problems
    assert "is 300 bytes long; at most " in problems[0]


def test_output_folders_that_cannot_be_made_and_outputs_that_are_links_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "file").write_text("")  # where a sub-folder is needed
    (out / "link.png").symlink_to(tmp_path / "nowhere.png")
    (out / "fine.png").write_text("")  # whether it may be replaced is check_outputs' business, not this check's
    template = replace(TEMPLATE, image=tmp_path / "in.png")
    outputs = [out / "file" / "a.png", out / "link.png", out / "fine.png"]
    items = [BatchItem(i, f"line {i + 1}", template, output) for i, output in enumerate(outputs)]
    with pytest.raises(batch.BatchError) as refused:
        batch.prepare_output_folders(items)
    assert refused.value.problems == [
        f"line 1: cannot create {out / 'file'}: File exists",
        f"line 2: {out / 'link.png'} is a symbolic link (outputs are never written through links)",
    ]


def test_each_output_folder_is_checked_once_with_its_longest_name_first_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The longest output name gives a folder's longest temporary name, the one a save there could fail on;
    among names as long, the first listed is the one the message names."""
    checked: list[str] = []

    def refuse(output: Path) -> None:
        checked.append(output.name)
        raise UserError(f"cannot write {output.name}")

    monkeypatch.setattr(batch, "check_can_create", refuse)
    template = replace(TEMPLATE, image=tmp_path / "in.png")
    outputs = ["a/b.png", "a/cc.png", "a/dd.png", "e/f.png"]
    items = [BatchItem(i, f"line {i + 1}", template, tmp_path / "out" / name) for i, name in enumerate(outputs)]
    with pytest.raises(batch.BatchError) as refused:
        batch.prepare_output_folders(items)
    assert checked == ["cc.png", "f.png"]
    assert refused.value.problems == ["line 2: cannot write cc.png", "line 4: cannot write f.png"]
