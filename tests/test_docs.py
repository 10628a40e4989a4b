"""The docs' commands work when copy-pasted on a fresh clone, and every flag the docs name exists.

Why: README commands that wrote into a missing `results/` folder, or named flags a script does not
have, fail for the very first reader. The fast `--tiny` commands (two steps) are run for real in a
fresh copy of the repository; the others are listed in NOT_RUN with the reason. Every `--flag` of a
documented command must appear in that script's own `--help`, and every `--flag` anywhere in the docs
in some script's `--help`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from npu_standin import REPO

DOCS = ("README.md", "README_NPU.md", "NPU_MIGRATION_GUIDE.md", "docs/ARCHITECTURE.md")
COMMAND_DOCS = ("README.md", "README_NPU.md")
PYTHONS = ("python", "python3", ".venv/bin/python")
MAX_FAST_STEPS = 2
# --tiny commands the test does not run, with why; a new one must be run or listed here.
NOT_RUN = {
    "python gradio_demo_npu.py --tiny": "starts a server that runs until stopped (tests/test_web_*.py cover it)",
}
# Flags of other programs that the docs show (hf download).
EXTERNAL_FLAGS = frozenset({"--local-dir", "--include", "--exclude",  # hf download
                            "--standalone", "--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint",
                            "--rdzv-id", "--max-restarts"})  # torchrun
# The --help runs whose flags each documented command is checked against.
HELP_RUNS: dict[str, list[str]] = {
    "inference_e1_1_npu.py": ["inference_e1_1_npu.py", "--help"],
    "inference_npu.py": ["inference_npu.py", "--help"],
    "gradio_demo_npu.py": ["gradio_demo_npu.py", "--help"],
    "gradio_demo_npu.py e1-full": ["gradio_demo_npu.py", "--model", "e1-full", "--help"],
    "test_npu_setup.py": ["test_npu_setup.py", "--help"],
    "device_utils.py": ["device_utils.py", "--help"],
    "tools/mutate.py": ["tools/mutate.py", "--help"],
    "benchmarks/full_size.py": ["benchmarks/full_size.py", "--help"],
    "benchmarks/block_working_set.py": ["benchmarks/block_working_set.py", "--help"],
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
CODE_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def code_blocks(doc: str) -> list[str]:
    """The shell code blocks of a Markdown file (python blocks are examples of the API, not commands)."""
    text = (REPO / doc).read_text(encoding="utf-8")
    return [body for language, body in CODE_BLOCK.findall(text) if language in ("", "bash", "sh", "shell")]


def commands(block: str) -> Iterator[str]:
    """One command per logical line (backslash continuations joined), comments dropped."""
    logical = re.sub(r"\\\n\s*", " ", block)
    for line in logical.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            yield shlex.join(words)


def script_of(words: list[str]) -> str | None:
    if len(words) > 1 and words[0] in PYTHONS and words[1].endswith(".py"):
        return words[1]
    return None


def help_key(words: list[str]) -> str | None:
    script = script_of(words)
    if script == "gradio_demo_npu.py" and "e1-full" in words:
        return "gradio_demo_npu.py e1-full"
    return script


def is_fast_tiny(words: list[str]) -> bool:
    if script_of(words) is None or "--tiny" not in words or "--steps" not in words:
        return False
    return int(words[words.index("--steps") + 1]) <= MAX_FAST_STEPS


def documented_commands() -> list[tuple[str, str]]:
    return [(doc, command) for doc in COMMAND_DOCS for block in code_blocks(doc) for command in commands(block)]


def flags_in(text: str) -> set[str]:
    return set(FLAG.findall(text))


@pytest.fixture(scope="module")
def help_flags() -> dict[str, set[str]]:
    """Flags of each --help, the runs started together (each imports torch, some gradio)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFERRED_DEVICE", "PREFERRED_DTYPE")}
    running = {
        key: subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        for key, argv in HELP_RUNS.items()
    }
    flags: dict[str, set[str]] = {}
    for key, process in running.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{key} --help: {err}"
        flags[key] = flags_in(out)
    return flags


def known(flag: str, available: set[str]) -> bool:
    return flag in available


def test_documented_commands_use_only_their_scripts_flags(help_flags: dict[str, set[str]]) -> None:
    checked = 0
    unknown: list[str] = []
    for doc, command in documented_commands():
        words = shlex.split(command)
        key = help_key(words)
        if key is None:
            continue
        checked += 1
        unknown += [f"{doc}: {flag} in `{command}`" for flag in flags_in(command) if not known(flag, help_flags[key])]
    assert checked >= 10, "the docs' commands were not found; did the code-block format change?"
    assert unknown == []


def test_every_flag_in_the_docs_exists_somewhere(help_flags: dict[str, set[str]]) -> None:
    available = set().union(*help_flags.values()) | EXTERNAL_FLAGS
    unknown = [
        f"{doc}: {flag}"
        for doc in DOCS
        for flag in sorted(flags_in((REPO / doc).read_text(encoding="utf-8")))
        if not known(flag, available)
    ]
    assert unknown == []


def test_every_tiny_command_is_run_or_listed() -> None:
    tiny = {command for _, command in documented_commands() if "--tiny" in shlex.split(command)}
    slow = {command for command in tiny if not is_fast_tiny(shlex.split(command))}
    assert slow == set(NOT_RUN)
    assert len(tiny - slow) >= 4  # two editors in README.md and README_NPU.md each


def fresh_copy(destination: Path) -> Path:
    """The repository as a fresh clone has it: no results/, no caches; `.venv/bin/python` runs this Python."""
    ignored = shutil.ignore_patterns(".git", ".venv", ".venv-refresh", "results", "__pycache__", "*.pyc",
                                     ".pytest_cache", ".ruff_cache", ".cache")
    clone = Path(shutil.copytree(REPO, destination, ignore=ignored))
    shims = clone / ".venv" / "bin"
    shims.mkdir(parents=True)
    for name in ("python", "python3"):
        shim = shims / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        shim.chmod(0o755)
    return clone


@pytest.mark.parametrize("doc", COMMAND_DOCS)
def test_fast_tiny_commands_run_on_a_fresh_copy(doc: str, tiny_env: dict[str, str], tmp_path: Path) -> None:
    blocks = [block for block in code_blocks(doc) if any(is_fast_tiny(shlex.split(c)) for c in commands(block))]
    assert blocks, f"{doc} shows no fast --tiny command"
    clone = fresh_copy(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFERRED_DEVICE", "PREFERRED_DTYPE")}
    env.update(tiny_env, PATH=f"{clone / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    for block in blocks:
        outputs = []
        for command in commands(block):
            words = shlex.split(command)
            assert is_fast_tiny(words) or words[:2] == ["mkdir", "-p"], f"{doc}: not run here: {command}"
            if "--output" in words:
                outputs.append(clone / words[words.index("--output") + 1])
        result = subprocess.run(["bash", "-e", "-c", block], cwd=clone, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{doc}:\n{block}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr
        for output in outputs:
            assert output.is_file() and Path(f"{output}.json").is_file(), output
