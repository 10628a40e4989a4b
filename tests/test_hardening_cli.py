"""User mistakes the CLIs must catch before loading a model: one line, exit 2, nothing loaded or written.

Also the prompt length cap every front end gets from resolve_request, and the host RSS label.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from npu_standin import REPO
from PIL import Image

from hidream_edit import cli
from hidream_edit.editor import MAX_PROMPT_CHARS, EditRequest, resolve_request
from hidream_edit.errors import UserError
from hidream_edit.spec import MODELS
from hidream_edit.text import check_path_text, shown
from hidream_edit.web.service import device_panel_markdown


@pytest.fixture()
def source_png(tmp_path: Path) -> Path:
    path = tmp_path / "source.png"
    Image.new("RGB", (32, 24), (30, 120, 200)).save(path)
    return path


@pytest.fixture()
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model fails the test: the mistake must be found before."""

    def load(settings: Any) -> None:
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(cli.Editor, "load", load)


def run_cli(
    model: str, source: Path, output: Path, extra: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    argv = ["--tiny", "--image", str(source), "--instruction", "make it green", "--output", str(output), *extra]
    try:
        code = cli.run_edit_cli(argv, model, env=env)
    except SystemExit as exit_:  # argparse's own errors
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, expected: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err


def test_a_shape_e1_full_cannot_keep_is_refused_before_loading(
    tiny_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """--keep-aspect on a 60000x4 strip would make a side under 16 pixels: one line before the model loads;
    stretched to 768 x 768 (no --keep-aspect) the same strip goes on to load."""
    strip = tmp_path / "strip.png"
    Image.new("RGB", (60000, 4), (30, 120, 200)).save(strip)
    loads: list[Any] = []

    def load(settings: Any, *args: Any) -> None:
        loads.append(settings)
        raise UserError("stopped at the load")

    monkeypatch.setattr(cli.Editor, "load", load)
    code, err = run_cli("e1-full", strip, tmp_path / "out.png", ["--keep-aspect"], tiny_env, capsys)
    assert code == 2 and loads == []
    assert_one_error_line(err, "error: image of 60000x4 is too elongated to resize for E1-Full")
    code, err = run_cli("e1-full", strip, tmp_path / "out.png", [], tiny_env, capsys)
    assert code == 2 and len(loads) == 1 and "stopped at the load" in err


@pytest.mark.parametrize("directory", ["taken.png", "taken.png.json"])
def test_an_output_that_is_a_directory_is_refused_before_loading(
    directory: str, tiny_env: dict[str, str], source_png: Path, tmp_path: Path, no_loading: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / directory).mkdir()
    code, err = run_cli("e1.1", source_png, tmp_path / "taken.png", ["--overwrite"], tiny_env, capsys)
    assert code == 2
    assert_one_error_line(err, f"error: {tmp_path / directory} is a directory")


@pytest.mark.parametrize("flag", ["--instruction", "--negative"])
def test_a_non_utf8_byte_in_a_prompt_is_refused_before_loading(
    flag: str, tiny_env: dict[str, str], source_png: Path, tmp_path: Path, no_loading: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    undecodable = os.fsdecode(b"make it gr\xffen")  # what sys.argv holds for that byte
    code, err = run_cli("e1.1", source_png, tmp_path / "o.png", [flag, undecodable], tiny_env, capsys)
    assert code == 2
    assert_one_error_line(err, "is not valid UTF-8 text (undecodable byte at character 11)")
    assert list(tmp_path.iterdir()) == [source_png]


def test_a_non_utf8_argv_byte_is_one_line_exit_2_from_the_script(
    tiny_env: dict[str, str], source_png: Path, tmp_path: Path
) -> None:
    command = [sys.executable.encode(), b"inference_e1_1_npu.py", b"--tiny", b"--image", bytes(source_png),
               b"--instruction", b"make it \xff green", b"--output", bytes(tmp_path / "o.png")]
    env = {**os.environ, **tiny_env, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(command, capture_output=True, cwd=REPO, env=env)
    err = done.stderr.decode("utf-8", errors="replace")
    assert done.returncode == 2, err
    assert_one_error_line(err, "error: the instruction is not valid UTF-8 text")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    ("model", "extra", "expected"),
    [
        ("e1.1", ["--instruction", "x" * (MAX_PROMPT_CHARS + 1)], f"the instruction is {MAX_PROMPT_CHARS + 1} "),
        ("e1.1", ["--negative", "x" * 10_000], "the negative prompt is 10000 characters long; the limit is 2000"),
        ("e1-full", ["--target-description", "y" * (MAX_PROMPT_CHARS + 1)], "the target description is 2001 "),
        # checked before the VLM is asked (an unreachable endpoint would say "cannot reach" instead)
        ("e1-full", ["--instruction", "x" * 50_000, "--rewrite-instruction", "--vlm-url", "http://127.0.0.1:9/v1",
                     "--vlm-model", "m"], "the instruction is 50000 characters long"),
    ],
)
def test_overlong_prompts_are_refused_before_loading(
    model: str, extra: list[str], expected: str, tiny_env: dict[str, str], source_png: Path, tmp_path: Path,
    no_loading: None, capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = run_cli(model, source_png, tmp_path / "o.png", extra, tiny_env, capsys)
    assert code == 2
    assert_one_error_line(err, expected)


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_resolve_request_caps_every_prompt_part(model: str) -> None:
    at_limit = "x" * MAX_PROMPT_CHARS
    spec = MODELS[model]
    resolve_request(EditRequest(image="a.png", instruction=at_limit, negative=at_limit), spec)
    form = f"Editing Instruction: {at_limit}. Target Image Description: {at_limit}"
    resolve_request(EditRequest(image="a.png", instruction=form), spec)
    too_long = at_limit + "x"
    # only the leading marker is the form's; one the user's text repeats is counted as text
    quoting = "x" * (MAX_PROMPT_CHARS + 1 - len("Editing Instruction:")) + "Editing Instruction:"
    cases = [
        ("instruction", EditRequest(
            image="a.png", instruction=f"Editing Instruction: {quoting}. Target Image Description: y"
        )),
        ("instruction", EditRequest(image="a.png", instruction=too_long)),
        ("negative prompt", EditRequest(image="a.png", instruction="x", negative=too_long)),
        ("target description", EditRequest(
            image="a.png", instruction=f"Editing Instruction: x. Target Image Description: {too_long}"
        )),
    ]
    for name, request in cases:
        with pytest.raises(UserError, match=f"the {name} is {MAX_PROMPT_CHARS + 1} characters long"):
            resolve_request(request, spec)


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "-inf", "soon", "1e9"])
def test_vlm_timeout_is_validated(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_edit_parser(MODELS["e1-full"])
    argv = ["--image", "a.png", "--instruction", "x", "--output", "o.png", f"--vlm-timeout={value}"]
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    assert exit_.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "--vlm-timeout must be")


def test_vlm_timeout_accepts_seconds_and_documents_the_total_budget() -> None:
    parser = cli.build_edit_parser(MODELS["e1-full"])
    args = parser.parse_args(["--image", "a.png", "--instruction", "x", "--output", "o.png", "--vlm-timeout", "2.5"])
    assert args.vlm_timeout == 2.5
    assert parser.parse_args(["--image", "a", "--instruction", "x", "--output", "o.png"]).vlm_timeout == 60
    assert "retries included (default 60)" in " ".join(parser.format_help().split())


def summary_metadata(is_peak: bool | None) -> dict[str, Any]:
    memory: dict[str, Any] = {"peak": None, "host_rss": 3 * 2**30}
    if is_peak is not None:
        memory["host_rss_is_peak"] = is_peak
    timings = {"load_s": 1.0, "encode_s": 0.5, "step_s": [1.0], "decode_s": 0.2}
    return {"timings": timings, "memory": memory, "source_size": [8, 8], "device": "cpu", "dtype": "fp32"}


@pytest.mark.parametrize(("is_peak", "label"), [(True, "host peak RSS 3.00 GiB"), (False, "host RSS 3.00 GiB"),
                                                (None, "host RSS 3.00 GiB")])
def test_the_summary_line_says_when_the_rss_is_the_peak(is_peak: bool | None, label: str) -> None:
    line = cli.summary_line(summary_metadata(is_peak), Path("o.png"))
    assert line.endswith(label)


@pytest.mark.parametrize(("is_peak", "label"), [(True, "3.0 GiB at peak (psutil missing) for this server"),
                                                (False, "3.0 GiB used by this server")])
def test_the_web_device_panel_says_when_the_rss_is_the_peak(is_peak: bool, label: str) -> None:
    memory = {"allocated": None, "reserved": None, "peak": None, "free": None, "total": None,
              "host_rss": 3 * 2**30, "host_total": 2**34, "host_rss_is_peak": is_peak}
    report = {"device": "cpu", "device_name": "x86_64", "dtype": "fp32", "attention": "sdpa", "offload": "none",
              "memory": memory}
    assert label in device_panel_markdown(report, None, "idle")


# Outputs that cannot be saved, found before loading (issue 22)


@pytest.mark.parametrize("case", ["300-character name", "240-character name", "dangling link", "read-only folder"])
def test_an_output_that_cannot_be_saved_is_refused_before_loading(
    case: str, tiny_env: dict[str, str], source_png: Path, tmp_path: Path, no_loading: None,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    names = {"300-character name": "n" * 296 + ".png", "240-character name": "n" * 236 + ".png"}
    output = out / names.get(case, "o.png")
    expected = {"300-character name": "is 300 bytes long; at most ",
                "240-character name": "is 240 bytes long; at most ",
                "dangling link": f"{output} is a symbolic link (outputs are never written through links)",
                "read-only folder": f"cannot create files in {out}: Read-only file system"}[case]
    if case == "dangling link":
        output.symlink_to(tmp_path / "nowhere.png")
    if case == "read-only folder":
        real_open = os.open

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & os.O_CREAT and Path(path).parent == out:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_)
    code, err = run_cli("e1.1", source_png, output, ["--overwrite"], tiny_env, capsys)
    assert code == 2
    assert_one_error_line(err, expected)
    assert [path.name for path in out.iterdir()] == ([output.name] if case == "dangling link" else [])


def test_a_path_with_terminal_escapes_is_printed_escaped(
    tiny_env: dict[str, str], tmp_path: Path, no_loading: None, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "\x1b]0;owned\x07\x1b[2Jgone.png"
    code, err = run_cli("e1.1", source, tmp_path / "o.png", [], tiny_env, capsys)
    assert code == 2
    assert_one_error_line(err, "\\x1b]0;owned\\x07\\x1b[2Jgone.png: file not found")
    assert "\x1b" not in err and "\x07" not in err


def test_shown_escapes_what_a_terminal_would_obey_and_cuts_long_values() -> None:
    assert shown("caf\u00e9 \u732b.png") == "caf\u00e9 \u732b.png"  # printable text as it is
    assert shown("a\x1b[2Jb\0c\u202ed\udcffe\nf") == "a\\x1b[2Jb\\x00c\\u202ed\\udcffe\\nf"
    assert shown("x" * 300, 10) == "xxxxxxxxxx... (300 characters)"
    with pytest.raises(UserError, match="contains a NUL character"):
        check_path_text("output", "a\0.png")
    with pytest.raises(UserError, match=r"is not valid Unicode text \(a lone surrogate at character 2\)"):
        check_path_text("output", "a\ud800.png")
    check_path_text("output", os.fsdecode(b"caf\xe9.png"))  # an undecodable byte of a real file name is fine
