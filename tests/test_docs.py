"""The docs' commands work when copy-pasted on a fresh clone, every flag the docs name exists, and the
claims the docs make about the code are what the code does.

Why: README commands that wrote into a missing `results/` folder, or named flags a script does not
have, fail for the very first reader. The fast `--tiny` commands (two steps) are run for real in a
fresh copy of the repository; the others are listed in NOT_RUN with the reason. Every `--flag` of a
documented command must appear in that script's own `--help`, and every `--flag` anywhere in the docs
in some script's `--help`. Docs also went stale while the code moved on (issue 22), so the claims that
can be checked mechanically are: the tables of real sizes, the `--plan` figures, the quoted error
lines, the image-shape limits, the section citations, the environment exceptions and the test
environment; retired claims stay out.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
    "tools/plan_table.py": ["tools/plan_table.py", "--help"],
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


def fast_tiny_blocks(doc: str) -> list[str]:
    return [block for block in code_blocks(doc) if any(is_fast_tiny(shlex.split(c)) for c in commands(block))]


def runs_here(command: str) -> bool:
    words = shlex.split(command)
    return is_fast_tiny(words) or words[:2] == ["mkdir", "-p"]


@pytest.fixture(scope="module")
def fast_tiny_runs(tiny_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """doc -> [(block, its run, its clone)]: each doc's fast blocks in order in a fresh copy of its own, the
    docs at the same time (one thread per command, so each uses one of the cores)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFERRED_DEVICE", "PREFERRED_DTYPE")}
    env.update(tiny_env, OMP_NUM_THREADS="1")

    def run_doc(doc: str) -> list[tuple[str, subprocess.CompletedProcess[str], Path]]:
        clone = fresh_copy(tmp_path_factory.mktemp("fresh") / "clone")
        doc_env = {**env, "PATH": f"{clone / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
        runs = []
        for block in fast_tiny_blocks(doc):
            if all(runs_here(command) for command in commands(block)):
                runs.append((block, subprocess.run(["bash", "-e", "-c", block], cwd=clone, env=doc_env,
                                                   capture_output=True, text=True), clone))
        return runs

    with ThreadPoolExecutor(len(COMMAND_DOCS)) as pool:
        return dict(zip(COMMAND_DOCS, pool.map(run_doc, COMMAND_DOCS), strict=True))


@pytest.mark.parametrize("doc", COMMAND_DOCS)
def test_fast_tiny_commands_run_on_a_fresh_copy(doc: str, fast_tiny_runs: dict[str, list]) -> None:
    blocks = fast_tiny_blocks(doc)
    assert blocks, f"{doc} shows no fast --tiny command"
    for command in (command for block in blocks for command in commands(block)):
        assert runs_here(command), f"{doc}: not run here: {command}"
    assert [block for block, _, _ in fast_tiny_runs[doc]] == blocks
    for block, result, clone in fast_tiny_runs[doc]:
        assert result.returncode == 0, f"{doc}:\n{block}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr
        for words in (shlex.split(command) for command in commands(block)):
            if "--output" in words:
                output = clone / words[words.index("--output") + 1]
                assert output.is_file() and Path(f"{output}.json").is_file(), output


# --- claims the docs make about the code, checked against the code ---------------------------------------


def read(doc: str) -> str:
    return (REPO / doc).read_text(encoding="utf-8")


def flat(text: str) -> str:
    """Text with every run of whitespace as one space, so a claim may wrap anywhere."""
    return " ".join(text.split())


def section_text(doc: str, number: str) -> str:
    """One numbered section of a Markdown file, from its heading to the next heading of its level or above."""
    text = read(doc)
    level = "##" if "." not in number else "###"
    start = re.search(rf"^{level} {re.escape(number)}\.? ", text, re.MULTILINE)
    assert start, f"{doc} has no section {number}"
    end = re.compile(rf"^#{{2,{len(level)}}} ", re.MULTILINE).search(text, start.end())
    return text[start.start(): end.start() if end else len(text)]


# Phrases that described what the code once did (issue 22), kept out of the docs for good: a merge of an
# older branch must not bring them back.
RETIRED_CLAIMS = {
    "Each request may take `--vlm-timeout` seconds": "--vlm-timeout bounds the whole rewrite",
    "seconds per VLM request": "--vlm-timeout bounds the whole rewrite",
    "materialises the scores": "the math kernel works in query chunks",
    "materialises the fp32 score matrix": "the math kernel works in query chunks",
    "17.6 GB in fp32": "3 x 20 x 8192^2 x 4 bytes is 16.1 GB",
    "the others wait for `placement.py`": "all six placements exist",
    "later: by a memory plan": "loading is placed by the memory plan",
    "the mode is skipped": "on the CPU only sequential is skipped",
    "not deep in the library": "placement.py, batch.py and guidance_parallel.py name flags",
    "resizes to cover 768 x 768": "--keep-aspect keeps the whole picture",
    "stretched (or cropped)": "--keep-aspect keeps the whole picture and refuses extreme shapes",
    "tested on CPU by killing a rank": "the torchrun restart is only simulated",
    "FAIL when nothing fits)": "the doctor's plan check is WARN on a CPU host",
    "Offload modes are diffusers' own": "encoders and split are the project's hooks",
}


def test_no_doc_repeats_a_retired_claim() -> None:
    found = [f"{doc}: {claim!r} ({why})" for doc in DOCS for claim, why in RETIRED_CLAIMS.items()
             if claim in flat(read(doc))]
    assert found == []


CITATION = re.compile(
    r"(?:(?P<before>[\w.]+\.md)(?:\]\([^)]*\))? )?section (?P<number>\d+(?:\.\d+)*)(?: of \[?(?P<after>[\w.]+\.md))?"
)
DOC_PATHS = {Path(doc).name: doc for doc in DOCS}


def repository_files(*patterns: str) -> list[Path]:
    skipped = {".git", ".venv", ".venv-refresh", "results", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return sorted(path for pattern in patterns for path in REPO.rglob(pattern)
                  if not skipped.intersection(path.relative_to(REPO).parts))


def numbered_sections(doc: str) -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", read(doc), re.MULTILINE))


def test_section_citations_point_at_existing_sections() -> None:
    """"docs/ARCHITECTURE.md section 3.4" in code, "section 5 of README_NPU.md" or a doc's own "section 2"."""
    sections = {doc: numbered_sections(doc) for doc in DOCS}
    wrong: list[str] = []
    cited = 0
    for path in repository_files("*.py", "*.md"):
        if path == Path(__file__):
            continue
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(REPO).as_posix()
        for match in CITATION.finditer(text):
            target = match["before"] or match["after"]
            doc = DOC_PATHS.get(target) if target else (name if name in DOCS else None)
            if doc is None:
                wrong.append(f"{name}: {match[0]!r} names no document of this repository")
            elif match["number"] not in sections[doc]:
                wrong.append(f"{name}: {match[0]!r}: {doc} has no section {match['number']}")
            cited += 1
    assert cited >= 10, "no citations found; did the pattern break?"
    assert wrong == []


def test_no_file_cites_the_design_notes_outside_the_repository() -> None:
    design = "DESIGN" + ".md"  # spelled apart so that this file does not cite it
    citing = [path.relative_to(REPO).as_posix() for path in repository_files("*.py", "*.md", "*.toml", "Makefile")
              if design in path.read_text(encoding="utf-8")]
    assert citing == []


def test_component_tables_match_the_specs_real_sizes() -> None:
    """Both tables of real sizes (parameters in B, bf16 GiB) as the spec counts them, to the digits shown."""
    from hidream_edit.spec import REAL_LLAMA_LM_HEAD, REAL_PARAMETERS

    rows_of = {"transformer": ("transformer",), "Llama": ("llama",), "T5": ("t5",), "CLIP": ("clip_l", "clip_g"),
               "VAE": ("vae",), "total": tuple(REAL_PARAMETERS)}
    table = re.compile(r"^\| component \| parameters \| bf16 \|\n\| --- .*\n((?:\|.*\n)+)", re.MULTILINE)
    wrong: list[str] = []
    totals: dict[str, str] = {}
    for doc in ("docs/ARCHITECTURE.md", "README_NPU.md"):
        (body,) = table.findall(section_text(doc, "5"))
        for line in body.splitlines():
            name, parameters, gib = (cell.strip() for cell in line.strip("|").split("|"))
            parts = next(parts for prefix, parts in rows_of.items() if name.startswith(prefix))
            lm_head = REAL_LLAMA_LM_HEAD if "without lm_head" in name or "as loaded" in name else 0
            counts = [REAL_PARAMETERS[part] - (lm_head if part == "llama" else 0) for part in parts]
            shown = parameters.split(" + ")
            values = counts if len(shown) > 1 else [sum(counts)]
            decimals = [len(number.split()[0].partition(".")[2]) for number in shown]
            expected = " + ".join(f"{value / 1e9:.{d}f} B" for value, d in zip(values, decimals, strict=True))
            gib_number = gib.split()[0]
            expected_gib = f"{2 * sum(counts) / 2**30:.{len(gib_number.partition('.')[2])}f} GiB"
            if (parameters, gib) != (expected, expected_gib):
                wrong.append(f"{doc}: {name}: {parameters} | {gib}, the spec says {expected} | {expected_gib}")
            if name.startswith("total"):
                totals[doc] = gib_number
    assert wrong == []
    assert "README_NPU.md" in totals, "README_NPU.md section 5's table has no total row"
    citing = [(doc, figure) for doc in DOCS
              for figure in re.findall(r"(\d+\.\d) GiB[^.(]*\(section 5 of README_NPU\.md", flat(read(doc)))]
    assert citing, "no doc cites README_NPU.md section 5's total any more; drop this check"
    assert [(doc, figure) for doc, figure in citing if figure != totals["README_NPU.md"]] == []


def elongation_limit(fits: Callable[[int], bool]) -> int:
    """The largest N for which an N x 1 picture is accepted (bisection; 1:1 always is)."""
    low, high = 1, 1 << 16
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def test_image_size_claims_are_what_the_resizers_do() -> None:
    """The elongation limits the docs state ("about 4096:1") and ARCHITECTURE's worked examples."""
    from PIL import Image

    from hidream_edit.errors import ImageInputError
    from hidream_edit.images import e1_1_target_size, resize_for_e1_full

    def accepts(resize: Callable[[int, int], object]) -> Callable[[int], bool]:
        def fits(ratio: int) -> bool:
            try:
                resize(ratio, 1)
            except ImageInputError:
                return False
            return True
        return fits

    def e1_full_keep_aspect(width: int, height: int) -> tuple[int, int]:
        return resize_for_e1_full(Image.new("RGB", (width, height)), keep_aspect=True).size

    limits = {"E1.1": elongation_limit(accepts(e1_1_target_size)),
              "E1-Full": elongation_limit(accepts(e1_full_keep_aspect))}
    shape_row = next(line for line in read("README_NPU.md").splitlines() if line.startswith("| shape |"))
    stated = {model: int(ratio) for model, ratio in
              re.findall(r"(E1\.1|E1-Full)\b[^|;]*?beyond about (\d+):1", shape_row)}
    assert stated.keys() == limits.keys(), shape_row
    sizes = section_text("docs/ARCHITECTURE.md", "3.7")
    for model, limit in limits.items():
        bullet = next(b for b in sizes.split("\n- ") if b.startswith(f"{model}:"))
        assert f"beyond about {stated[model]}:1" in flat(bullet)
        assert abs(stated[model] - limit) <= 0.01 * limit, (model, stated[model], limit)
    e1_full = next(b for b in sizes.split("\n- ") if b.startswith("E1-Full:"))
    examples = re.findall(r"a (\d+)x(\d+) picture is edited at (\d+)x(\d+)", flat(e1_full))
    assert examples, "ARCHITECTURE.md section 3.7 lost its worked example of --keep-aspect"
    for width, height, *edited in examples:
        assert e1_full_keep_aspect(int(width), int(height)) == tuple(map(int, edited))


def plan_runs(argvs: dict[str, list[str]], tmp_path: Path) -> dict[str, str]:
    """Output of the CLIs' --plan runs (together) on a machine whose hub cache is empty: sizes from the spec."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFERRED_DEVICE", "PREFERRED_DTYPE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    running = {key: subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE) for key, argv in argvs.items()}
    outputs: dict[str, str] = {}
    for key, process in running.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{argvs[key]}: {err}"
        outputs[key] = out
    return outputs


def test_figures_quoted_from_the_plan_are_what_the_planner_prints(tmp_path: Path) -> None:
    """README_NPU.md's `--plan` example verbatim, and the per-rank host memory of `--offload model`."""
    text = read("README_NPU.md")
    (example,) = re.findall(r"^```text\n\$ (python [^\n]*--plan[^\n]*)\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    command, shown = example
    words = shlex.split(command)[1:]
    offload_model = ["inference_e1_1_npu.py", "--plan", "--plan-host", "1x64GiB", "--host-memory", "512GiB",
                     "--offload", "model", "--json"]
    outputs = plan_runs({"example": words, "offload model": offload_model}, tmp_path)
    assert outputs["example"].splitlines() == shown.splitlines()
    host_peak = json.loads(outputs["offload model"])["host"]["peak_bytes"] / 2**30
    claim = re.search(r"`--plan` predicts a host peak of (\d+\.\d) GiB per rank for E1\.1[^.]*?"
                      r"8 ranks need about (\d+) GiB", flat(text))
    assert claim, "README_NPU.md no longer states the host memory per rank with --offload model"
    assert claim.groups() == (f"{host_peak:.1f}", f"{8 * host_peak:.0f}")


def quoted_error_lines(doc: str) -> list[str]:
    """The one-line messages a doc quotes (`error: ...`, `batch: ...`); "..." stands for text left out."""
    return [flat(quote) for quote in re.findall(r"`((?:error|batch): [^`]*)`", read(doc))]


# Quoted lines the test does not produce, with why.
NOT_PRODUCED = {
    "error: rank 1 failed at": "raised inside a gather of the guidance group; tests/test_guidance_parallel.py",
    "error: rank 1 of the guidance group": "raised inside a gather of the guidance group; "
                                           "tests/test_guidance_parallel.py",
}


def device_error_lines() -> list[str]:
    """`python device_utils.py`'s error lines (the CLIs' too) for a CANN that is not sourced and a 310P's bf16."""
    from concurrent.futures import ThreadPoolExecutor

    from npu_standin import run_standin

    libhccl = "libhccl.so: cannot open shared object file: No such file or directory"
    runs = [
        ("import os, device_utils\ndevice_utils.main(['--device', 'npu'])\n"
         "os.environ['PREFERRED_DEVICE'] = 'npu'\ndevice_utils.main([])", {"import_error": libhccl}),
        ("import device_utils\ndevice_utils.main(['--dtype', 'bf16'])", {"bf16": False}),
    ]
    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(lambda run: run_standin(*run), runs))
    return [line for result in results for line in result.stderr.splitlines()]


def second_batch_lock_line(output_dir: Path) -> str:
    """A second batch's line on a locked --output-dir (flock refuses a second open file, also in one process)."""
    from hidream_edit.batch import output_dir_lock
    from hidream_edit.errors import UserError

    with output_dir_lock(output_dir), pytest.raises(UserError) as refused, output_dir_lock(output_dir):
        pass
    return "error: " + str(refused.value).replace(str(output_dir), "results")


def test_quoted_error_lines_are_what_the_code_prints(
    tiny_checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from hidream_edit.batch import summary_line
    from hidream_edit.cli import out_of_memory_hint, run_edit_cli
    from hidream_edit.config import cli_error_line
    from hidream_edit.errors import NonFiniteError
    from hidream_edit.spec import MODELS

    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    Image.new("RGB", (32, 32)).save(tmp_path / "cat.png")
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text('{"image": "cat.png", "instruction": "x"}\n\n'
                        '{"image": "cat.png", "instruction": "x", "output": "b.png", "sed": 3}\n')
    assert run_edit_cli(["--manifest", str(manifest), "--output-dir", str(tmp_path / "out")], "e1.1", env) == 2
    e1_1 = tmp_path / "models" / "HiDream-E1-1" / "transformer"  # a download that lost shard 4 of 7
    e1_1.mkdir(parents=True)
    shards = [f"diffusion_pytorch_model-{n:05d}-of-00007.safetensors" for n in range(1, 8)]
    index = {"weight_map": {f"tensor{n}": shard for n, shard in enumerate(shards)}}
    (e1_1 / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    for shard in shards[:3] + shards[4:]:
        (e1_1 / shard).touch()
    sources = ["--llama-path", str(tiny_checkpoints.llama), "--i1-path", str(tiny_checkpoints.i1),
               "--e1-path", str(e1_1.parent)]
    assert run_edit_cli(["--plan", "--plan-host", "1x64GiB", *sources], "e1.1", env) == 2
    produced = capsys.readouterr().err.replace(str(tmp_path), "").splitlines()
    produced += [
        "error: " + cli_error_line(NonFiniteError("denoising step 12 of 28", "fp16"), MODELS["e1.1"]),
        "error: " + out_of_memory_hint(RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB")),
        summary_line({"counts": {"ok": 5, "failed": 1, "skipped": 2}, "items_total": 8, "world_size": 1,
                      "seconds": 412.0, "images_per_minute": 0.728}, Path("results/summary.json")),
        *device_error_lines(),
        second_batch_lock_line(tmp_path / "results"),
    ]
    quotes = [quote for quote in quoted_error_lines("README_NPU.md") if not quote.startswith(tuple(NOT_PRODUCED))]
    assert len(quotes) >= 7, "the quoted messages were not found; did the quoting change?"
    unmatched = [quote for quote in quotes
                 if not any(re.fullmatch(".*".join(map(re.escape, quote.split("..."))), line) for line in produced)]
    assert unmatched == [], "the code prints:\n" + "\n".join(produced)


def test_the_prompt_cache_size_is_what_the_editor_keeps() -> None:
    from hidream_edit.editor import PROMPT_CACHE_ENTRIES

    (stated,) = re.findall(r"embeddings of the (\d+) most recent prompts", (REPO / "README_NPU.md").read_text())
    assert int(stated) == PROMPT_CACHE_ENTRIES


def test_every_environment_exception_is_documented() -> None:
    """Each variable a file other than config.py reads or sets is named where the rule states its exceptions."""
    device_utils = (REPO / "device_utils.py").read_text(encoding="utf-8")
    library_reads = set(re.findall(r'os\.environ\.(?:get|setdefault)\("(\w+)"', device_utils))
    library_reads |= set(re.findall(r'^ENV_\w+ = "(\w+)"', device_utils, re.MULTILINE))
    entry_switches = {name for script in ("inference_e1_1_npu.py", "inference_npu.py", "gradio_demo_npu.py",
                                          "test_npu_setup.py")
                      for name in re.findall(r'os\.environ\.setdefault\("(\w+)"', read(script))}
    layout = section_text("docs/ARCHITECTURE.md", "1")
    rule = next(bullet for bullet in layout.split("\n- ") if bullet.startswith("Only `config.py` reads"))
    config_doc = ast.get_docstring(ast.parse(read("hidream_edit/config.py"))) or ""
    assert {"LOCAL_RANK", "PREFERRED_DEVICE"} <= library_reads, "the patterns no longer find device_utils' reads"
    missing = [f"docs/ARCHITECTURE.md section 1: {name}" for name in sorted(library_reads | entry_switches)
               if f"`{name}" not in rule]
    missing += [f"config.py's docstring: {name}" for name in sorted(library_reads) if name not in config_doc]
    assert missing == []


INHERITED = ("HIDREAM_", "PREFERRED_DEVICE", "PREFERRED_DTYPE", "LOCAL_RANK")


def test_no_user_setting_reaches_a_test() -> None:
    """README.md: tests start with no inherited HIDREAM_* or device settings (tests/conftest.py)."""
    assert sorted(name for name in os.environ if name.startswith(INHERITED)) == []


def test_a_run_started_with_user_settings_clears_every_one(tmp_path: Path) -> None:
    settings = {"HIDREAM_TINY_DIR": str(tmp_path / "tiny"), "HIDREAM_GRADIO_AUTH": "user:secret",
                "HIDREAM_SOME_FUTURE_SETTING": "1", "PREFERRED_DEVICE": "cpu", "LOCAL_RANK": "0"}
    test = f"{Path(__file__).relative_to(REPO)}::test_no_user_setting_reaches_a_test"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                            cwd=REPO, env={**os.environ, **settings}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:]
