"""A save interrupted by a signal leaves no hidden temp file; one killed outright is swept by the next save.

The child processes stall inside the image encoder (after writing some bytes to the temp file) until
the parent has signalled them, so "mid-save" is a fact, not a timing guess.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from npu_standin import REPO
from PIL import Image

from hidream_edit.editor import _HOST_TAG, STALE_TEMP_AGE_S, EditResult, save_result, sweep_stale_temp_files
from hidream_edit.errors import UserError

CHILD = r"""
import signal, sys
from PIL import Image
from hidream_edit.editor import EditResult, save_result

signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
real_save = Image.Image.save

def stalling_save(self, stream, *args, **kwargs):
    stream.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 4096)
    stream.flush()
    print("writing", flush=True)
    sys.stdin.readline()  # until the parent says go on (or signals us)
    stream.seek(0)
    stream.truncate()
    real_save(self, stream, *args, **kwargs)

Image.Image.save = stalling_save
try:
    save_result(EditResult(Image.new("RGB", (8, 8), (1, 2, 3)), {}), sys.argv[1])
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
print("saved", flush=True)
"""

TEMP_NAME = re.compile(r"\.child\.png\.\d+-[0-9a-f]{8}\.[0-9a-f]{8}\.tmp")


def start_child_mid_save(output: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(output)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line == "writing\n", (line, child.stderr.read() if child.stderr else "")
    return child


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def another_save(folder: Path, name: str) -> None:
    save_result(EditResult(Image.new("RGB", (4, 4)), {}), folder / name)


@pytest.mark.parametrize(("sig", "returncode", "said"), [(signal.SIGTERM, -signal.SIGTERM, ""),
                                                         (signal.SIGINT, 130, "interrupted\n")])
def test_sigterm_or_ctrl_c_mid_save_leave_no_temp_file(
    tmp_path: Path, sig: signal.Signals, returncode: int, said: str
) -> None:
    child = start_child_mid_save(tmp_path / "child.png")
    (temp,) = temp_files(tmp_path)
    assert TEMP_NAME.fullmatch(temp) and str(child.pid) in temp
    child.send_signal(sig)
    out, err = child.communicate(timeout=120)
    assert child.returncode == returncode, err
    assert out == said and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_savers_temp_file_is_swept_by_the_next_save_but_a_live_ones_is_not(tmp_path: Path) -> None:
    child = start_child_mid_save(tmp_path / "child.png")
    (live_temp,) = temp_files(tmp_path)
    another_save(tmp_path, "mine.png")  # the child is alive and saving: its temp file stays
    assert temp_files(tmp_path) == [live_temp]
    child.kill()
    child.communicate(timeout=120)
    assert temp_files(tmp_path) == [live_temp]  # SIGKILL cannot be cleaned up after...
    another_save(tmp_path, "mine2.png")  # ...so the next save into the folder does it
    assert temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png", "mine.png.json", "mine2.png", "mine2.png.json"]


def test_a_concurrent_saver_finishes_although_another_save_swept_the_folder(tmp_path: Path) -> None:
    child = start_child_mid_save(tmp_path / "child.png")
    another_save(tmp_path, "mine.png")
    out, err = child.communicate("go on\n", timeout=120)
    assert child.returncode == 0 and out == "saved\n", err
    assert Image.open(tmp_path / "child.png").getpixel((0, 0)) == (1, 2, 3)
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("fails", [False, True])
def test_after_a_save_sigterm_kills_as_before(tmp_path: Path, fails: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The save's own SIGTERM handler is gone once it returns or fails: a later SIGTERM is no traceback."""
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    if fails:
        monkeypatch.setattr(Image.Image, "save", full_disk)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        if fails:
            with pytest.raises(UserError, match="disk full"):
                another_save(tmp_path, "out.png")
        else:
            another_save(tmp_path, "out.png")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if fails else ["out.png", "out.png.json"])


def test_a_temp_file_is_stale_after_an_hour_as_readme_npu_says(tmp_path: Path) -> None:
    now = float(int(time.time()))  # whole seconds: the ages below are exact, also the hour itself
    ages = {".old.png.abcd_123.tmp": 3600.5, ".hour.png.abcd_123.tmp": 3600.0, ".young.png.abcd_123.tmp": 3599.5}
    for name, age in ages.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (now - age,) * 2)
    assert [p.name for p in sweep_stale_temp_files(tmp_path, now=now)] == [".old.png.abcd_123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hour.png.abcd_123.tmp", ".young.png.abcd_123.tmp"]


def test_a_fresh_temp_file_of_this_process_or_of_one_we_cannot_signal_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread of this process may be saving (the web UI saves concurrently), and a pid we may not signal is
    another user's live process: neither writer is gone, so only age can make their temp files stale."""
    other_users_pid = 4194301
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid == other_users_pid:
            raise PermissionError(1, "Operation not permitted")
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    names = [f".mine.png.{os.getpid():07d}-{_HOST_TAG}.0a1b2c3d.tmp",
             f".theirs.png.json.{other_users_pid:07d}-{_HOST_TAG}.0a1b2c3d.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert sweep_stale_temp_files(tmp_path) == []
    assert temp_files(tmp_path) == sorted(names)


def test_sweep_removes_only_our_old_or_orphaned_names(tmp_path: Path) -> None:
    now = time.time()
    names = {
        ".out.png.abcd_123.tmp": True,  # the mkstemp naming of earlier versions, old
        ".out.png.json.k2j4h5g6.tmp": True,
        ".out.jpg.4194302-00000000.0a1b2c3d.tmp": True,  # our naming from another host, old
        ".notes.txt.abcd_123.tmp": False,  # not an output name of ours
        ".out.png.abcd_123.tmp.keep": False,
        "out.png.abcd_123.tmp": False,  # not hidden
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (now - STALE_TEMP_AGE_S - 10,) * 2)
    fresh = tmp_path / ".fresh.png.abcd_123.tmp"
    fresh.write_bytes(b"x")
    link = tmp_path / ".link.png.abcd_123.tmp"  # our name, but saves never create links: not ours
    link.symlink_to(tmp_path / ".notes.txt.abcd_123.tmp")
    os.utime(link, (now - STALE_TEMP_AGE_S - 10,) * 2, follow_symlinks=False)
    removed = sweep_stale_temp_files(tmp_path, now=now)
    assert sorted(p.name for p in removed) == sorted(name for name, stale in names.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".fresh.png.abcd_123.tmp", link.name, *(name for name, stale in names.items() if not stale)]
    )
