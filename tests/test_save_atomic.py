"""save_result: both files or neither, never a partial file, no overwrite without asking, the umask honoured.

Each test fails on a plausible bug: writing straight into the target, os.replace instead of os.link (the
no-overwrite check is no longer race-free), the image left behind when the JSON fails, the old image
lost when an --overwrite fails halfway, mkstemp's 0600 mode.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hidream_edit.editor import (
    EditResult,
    check_can_create,
    check_name_length,
    check_output_path,
    save_result,
    write_new_json,
)
from hidream_edit.errors import UserError

OLD_IMAGE = b"old image bytes"
OLD_JSON = b'{"old": true}'


def result(colour: tuple[int, int, int] = (10, 20, 30), **metadata: Any) -> EditResult:
    return EditResult(Image.new("RGB", (8, 8), colour), {"marker": "new", **metadata})


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture()
def old_output(tmp_path: Path) -> Path:
    """out.png and out.png.json from an earlier edit."""
    path = tmp_path / "out.png"
    path.write_bytes(OLD_IMAGE)
    Path(f"{path}.json").write_bytes(OLD_JSON)
    return path


def assert_old_output_intact(path: Path) -> None:
    assert path.read_bytes() == OLD_IMAGE and Path(f"{path}.json").read_bytes() == OLD_JSON
    assert listing(path.parent) == ["out.png", "out.png.json"]  # and no temp or backup file left


@pytest.fixture()
def file_size_limit() -> Iterator[Any]:
    """Set a per-file size limit (RLIMIT_FSIZE): a real "disk full" for any write past it, EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    @contextlib.contextmanager
    def limit(size: int) -> Iterator[None]:
        """Only around the write: pytest's own output file must not meet the limit while it reports."""
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_overwrite_keeps_both_old_files_when_the_json_target_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    path.write_bytes(OLD_IMAGE)
    Path(f"{path}.json").mkdir()
    with pytest.raises(UserError, match=r"out\.png\.json is a directory") as error:
        save_result(result(), path, overwrite=True)
    assert "out.png:" not in str(error.value)
    assert path.read_bytes() == OLD_IMAGE and Path(f"{path}.json").is_dir()
    assert listing(tmp_path) == ["out.png", "out.png.json"]


@pytest.mark.parametrize("overwrite", [True, False])
def test_disk_full_during_the_json_write_changes_nothing(
    tmp_path: Path, old_output: Path, file_size_limit: Any, overwrite: bool
) -> None:
    output = old_output if overwrite else tmp_path / "new.png"
    big = result(padding="x" * 200_000)  # the image is ~100 bytes, its JSON 200 kB
    too_large = rf"cannot write .*{output.name}\.json: File too large"
    with file_size_limit(64 * 1024), pytest.raises(UserError, match=too_large):
        save_result(big, output, overwrite=overwrite)
    assert_old_output_intact(old_output)


@pytest.mark.parametrize("hard_links", [True, False])
def test_overwrite_puts_the_old_image_back_when_the_json_cannot_be_moved_into_place(
    old_output: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    """Also where the filesystem has no hard links, so the old files are kept as copies (removed after)."""
    real_replace, real_link = os.replace, os.link
    json_path = Path(f"{old_output}.json")

    def link(src: Any, dst: Any) -> None:
        if Path(src) in (old_output, json_path):
            raise OSError(errno.EPERM, "Operation not permitted")
        real_link(src, dst)

    if not hard_links:
        monkeypatch.setattr(os, "link", link)

    def replace(src: Any, dst: Any) -> None:
        if Path(dst) == json_path:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError, match=r"cannot write .*out\.png\.json: Input/output error"):
        save_result(result(), old_output, overwrite=True)
    assert_old_output_intact(old_output)


def test_overwrite_replaces_both_files(old_output: Path) -> None:
    image_path, json_path = save_result(result((200, 0, 0)), old_output, overwrite=True)
    assert Image.open(image_path).getpixel((0, 0)) == (200, 0, 0)
    assert json.loads(json_path.read_text())["marker"] == "new"
    assert json_path.read_text().startswith('{\n  "marker": "new",\n  "output": ')  # indented for people
    assert listing(old_output.parent) == ["out.png", "out.png.json"]


@pytest.mark.parametrize("overwrite", [True, False])
def test_an_encoder_failing_midway_leaves_the_old_file(
    tmp_path: Path, old_output: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    def fails_after_some_bytes(self: Image.Image, stream: Any, *args: Any, **kwargs: Any) -> None:
        stream.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)
        stream.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", fails_after_some_bytes)
    output = old_output if overwrite else tmp_path / "new.png"
    with pytest.raises(UserError, match=rf"cannot write .*{output.name}: No space left on device"):
        save_result(result(), output, overwrite=overwrite)
    assert_old_output_intact(old_output)


def test_two_savers_racing_for_one_name_one_wins_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both savers pass the existence check before either links: only os.link's refusal can stop one."""
    both_checked = threading.Barrier(2)
    real_save = Image.Image.save

    def save_after_both_checked(self: Image.Image, *args: Any, **kwargs: Any) -> None:
        both_checked.wait(timeout=60)
        real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_after_both_checked)
    output = tmp_path / "race.png"
    outcomes: dict[str, BaseException | None] = {}

    def saver(name: str, colour: tuple[int, int, int]) -> None:
        try:
            save_result(result(colour, saver=name), output)
            outcomes[name] = None
        except BaseException as exc:  # recorded and checked below
            outcomes[name] = exc

    threads = [threading.Thread(target=saver, args=args) for args in (("red", (255, 0, 0)), ("blue", (0, 0, 255)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    winners = [name for name, outcome in outcomes.items() if outcome is None]
    losers = [outcome for outcome in outcomes.values() if outcome is not None]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert isinstance(losers[0], UserError) and "race.png already exists" in str(losers[0])
    winner = winners[0]
    assert Image.open(output).getpixel((0, 0)) == {"red": (255, 0, 0), "blue": (0, 0, 255)}[winner]
    assert json.loads(Path(f"{output}.json").read_text())["saver"] == winner
    assert listing(tmp_path) == ["race.png", "race.png.json"]


def test_the_image_is_not_left_behind_when_the_json_name_is_taken_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another program creates out.png.json after our check: ours must not replace it nor keep our image."""
    output = tmp_path / "out.png"
    rival_json = b'{"rival": true}'
    real_save = Image.Image.save

    def rival_appears(self: Image.Image, *args: Any, **kwargs: Any) -> None:
        Path(f"{output}.json").write_bytes(rival_json)
        real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", rival_appears)
    with pytest.raises(UserError, match=r"out\.png\.json already exists"):
        save_result(result(), output)
    assert listing(tmp_path) == ["out.png.json"] and Path(f"{output}.json").read_bytes() == rival_json


def no_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make os.link fail as it does on a filesystem without hard links (FAT, some network mounts)."""
    def link(src: Any, dst: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)


@pytest.mark.parametrize("hard_links", [True, False])
def test_an_image_created_meanwhile_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    """Also without hard links, where the last check before the rename is the existence test."""
    output = tmp_path / "out.png"
    real_save = Image.Image.save

    def rival_appears(self: Image.Image, *args: Any, **kwargs: Any) -> None:
        output.write_bytes(OLD_IMAGE)
        real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", rival_appears)
    if not hard_links:
        no_hard_links(monkeypatch)
    with pytest.raises(UserError, match=r"out\.png already exists") as refused:
        save_result(result(), output)
    assert refused.value.fix == "output_exists"  # the command line adds "choose another --output or pass --overwrite"
    assert listing(tmp_path) == ["out.png"] and output.read_bytes() == OLD_IMAGE


def test_a_filesystem_without_hard_links_still_gets_both_new_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_hard_links(monkeypatch)
    image_path, json_path = save_result(result((0, 200, 0)), tmp_path / "out.png")
    assert Image.open(image_path).getpixel((0, 0)) == (0, 200, 0)
    assert json.loads(json_path.read_text())["marker"] == "new"
    assert listing(tmp_path) == ["out.png", "out.png.json"]


def test_a_result_without_metadata_is_saved_with_the_output_and_its_checksum(tmp_path: Path) -> None:
    """A library caller may build EditResult(image) alone; the checksum is what a resumed batch compares."""
    image_path, json_path = save_result(EditResult(Image.new("RGB", (8, 8), (1, 2, 3))), tmp_path / "out.png")
    digest = hashlib.sha256(image_path.read_bytes()).hexdigest()
    assert json.loads(json_path.read_text()) == {"output": str(image_path), "output_sha256": digest}


def test_a_jpeg_output_drops_the_alpha_channel_and_a_png_keeps_it(tmp_path: Path) -> None:
    """JPEG has no alpha: the image is converted rather than refused; formats with alpha get it unchanged."""
    translucent = EditResult(Image.new("RGBA", (8, 8), (10, 20, 30, 128)), {})
    jpeg, _ = save_result(translucent, tmp_path / "out.jpg")
    png, _ = save_result(translucent, tmp_path / "out.png")
    assert Image.open(jpeg).mode == "RGB" and Image.open(png).getpixel((0, 0)) == (10, 20, 30, 128)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
@pytest.mark.parametrize("overwrite", [False, True])
def test_outputs_honour_the_umask(tmp_path: Path, umask: int, mode: int, overwrite: bool) -> None:
    output = tmp_path / "out.png"
    if overwrite:
        output.write_bytes(OLD_IMAGE)
    previous = os.umask(umask)
    try:
        paths = save_result(result(), output, overwrite=overwrite)
    finally:
        os.umask(previous)
    assert [oct(os.stat(p).st_mode & 0o777) for p in paths] == [oct(mode)] * 2


def test_a_non_regular_target_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"out\.png exists and is not a regular file") as refused:
        save_result(result(), fifo, overwrite=True)
    assert refused.value.fix == "output_name"  # the command line adds "choose another --output"
    assert listing(tmp_path) == ["out.png"] and fifo.is_fifo()


def open_descriptors() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def test_the_check_before_loading_refuses_an_extension_no_image_format_has(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"out\.gif: unknown image extension; use one of \.bmp, \.jpeg, \.jpg, \.png,"):
        check_output_path(tmp_path / "out.gif", overwrite=False)
    assert check_output_path(tmp_path / "out.PNG", overwrite=False) == (tmp_path / "out.PNG", tmp_path / "out.PNG.json")
    assert listing(tmp_path) == []


def test_the_check_before_loading_refuses_a_missing_folder_and_names_outputs_that_exist(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing is not a directory$"):
        check_output_path(tmp_path / "missing" / "out.png", overwrite=True)
    Path(f"{tmp_path / 'out.png'}.json").write_bytes(OLD_JSON)
    with pytest.raises(UserError, match=r"out\.png\.json already exists$") as refused:
        check_output_path(tmp_path / "out.png", overwrite=False)
    assert refused.value.fix == "output_exists"
    assert check_output_path(tmp_path / "out.png", overwrite=True) == (tmp_path / "out.png", tmp_path / "out.png.json")


@pytest.mark.parametrize(("name", "why"), [("o\0.png", "contains a NUL character"),
                                           ("o\ud800.png", "is not valid Unicode text")])
def test_the_check_before_loading_refuses_a_name_no_file_can_have(tmp_path: Path, name: str, why: str) -> None:
    """A user error in words, not the ValueError or UnicodeEncodeError of the first file operation."""
    with pytest.raises(UserError, match=f"^the output '.*' {why}"):
        check_output_path(tmp_path / name, overwrite=True)


def test_the_check_before_loading_creates_a_file_and_leaves_nothing_behind(tmp_path: Path) -> None:
    before = open_descriptors()
    check_can_create(tmp_path / "out.png")
    assert listing(tmp_path) == [] and open_descriptors() == before  # its temp file removed, its descriptor closed


def test_the_check_before_loading_refuses_a_folder_that_takes_no_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root ignores permission bits, so a read-only mount is what refuses here: creating any file fails."""
    real_open = os.open

    def read_only_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    with pytest.raises(UserError) as refused:
        check_can_create(tmp_path / "out.png")
    assert str(refused.value) == f"cannot create files in {tmp_path}: Read-only file system"
    assert listing(tmp_path) == []


def test_the_longest_name_a_255_byte_filesystem_takes_is_saved_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    """The temporary JSON name adds 36 bytes (".", ".json", ".", a pid padded to 7 digits, Linux's largest
    pid 4194304 has 7, "-", an 8-digit host tag, ".", an 8-digit token, ".tmp"): none more is refused."""
    if os.pathconf(tmp_path, "PC_NAME_MAX") != 255:
        pytest.skip("the temporary folder's filesystem does not take 255-byte names")
    longest = tmp_path / ("n" * 215 + ".png")
    check_name_length(longest)
    assert [p.name for p in save_result(result(), longest)] == [longest.name, f"{longest.name}.json"]
    with pytest.raises(UserError, match="is 220 bytes long; at most 219 fit in ") as refused:
        check_name_length(tmp_path / ("n" * 216 + ".png"))
    assert refused.value.fix == "output_name"  # the command line adds "choose another --output"


def test_a_filesystem_that_cannot_tell_its_name_limit_is_taken_to_allow_255_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Linux filesystems allow: the same longest name as on a 255-byte filesystem that says so."""
    def pathconf(path: Any, name: str) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pathconf", pathconf)
    check_name_length(tmp_path / ("n" * 215 + ".png"))
    with pytest.raises(UserError, match="is 220 bytes long; at most 219 fit in "):
        check_name_length(tmp_path / ("n" * 216 + ".png"))


def test_a_record_is_written_new_and_never_over_a_file_or_into_a_missing_folder(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    assert write_new_json(record, {"peak_gib": 1.5}) == record
    assert record.read_text() == '{\n  "peak_gib": 1.5\n}' and listing(tmp_path) == ["record.json"]  # for people too
    with pytest.raises(UserError, match="record.json already exists$"):
        write_new_json(record, {"peak_gib": 2.0})
    with pytest.raises(UserError, match="missing is not a directory$"):
        write_new_json(tmp_path / "missing" / "record.json", {})
    assert json.loads(record.read_text()) == {"peak_gib": 1.5} and listing(tmp_path) == ["record.json"]


def test_both_files_reach_the_disk_complete_before_they_take_their_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the fsync a power cut after the rename can leave an empty or torn file under the final name."""
    synced: set[tuple[int, int]] = set()
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        stat = os.fstat(fd)
        synced.add((stat.st_ino, stat.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    output = tmp_path / "out.png"
    save_result(result(), output)
    for path in (output, Path(f"{output}.json")):
        stat = path.stat()
        assert (stat.st_ino, stat.st_size) in synced, path.name


def test_a_record_whose_name_is_taken_while_it_is_written_is_refused_and_the_other_file_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check before a long run is not the last word: the record is linked, never renamed over a file."""
    record = tmp_path / "record.json"
    real_fsync = os.fsync

    def rival_appears(fd: int) -> None:
        record.write_bytes(OLD_JSON)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", rival_appears)
    with pytest.raises(UserError, match="record.json already exists$"):
        write_new_json(record, {"peak_gib": 1.5})
    assert record.read_bytes() == OLD_JSON and listing(tmp_path) == ["record.json"]
