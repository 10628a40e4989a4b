"""The metadata JSON records every setting that shaped a result: VAE tiling and how an E1-Full prompt was built."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from hidream_edit import instructions
from hidream_edit.cli import build_edit_parser, prompt_metadata, run_edit_cli
from hidream_edit.instructions import RewrittenInstruction
from hidream_edit.spec import MODELS


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (200, 40, 40)).save(path)
    return path


def e1_full_args(*extra: str) -> argparse.Namespace:
    return build_edit_parser(MODELS["e1-full"]).parse_args(["--image", "x.png", "--output", "o.png", *extra])


def test_e1_1_cli_records_vae_tiling(tiny_env: dict[str, str], source: Path, tmp_path: Path) -> None:
    def run(name: str, *extra: str) -> dict:
        output = tmp_path / name
        argv = ["--tiny", "--image", str(source), "--instruction", "make it blue", "--output", str(output),
                "--steps", "1", "--refine-strength", "0", *extra]
        assert run_edit_cli(argv, "e1.1", env=tiny_env) == 0
        return json.loads(Path(f"{output}.json").read_text())

    tiled = run("tiled.png", "--vae-tiling")
    assert tiled["vae_tiling"] is True and "VAE tiling" in tiled["memory_actions"]
    assert run("plain.png")["vae_tiling"] is False
    assert "target_description" not in tiled and "vlm" not in tiled  # E1.1 has no prompt form to build


def test_e1_full_cli_records_target_description_and_vlm_settings(
    tiny_env: dict[str, str], source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[instructions.VLMSettings] = []

    def fake_rewrite(image: Image.Image, instruction: str, settings: instructions.VLMSettings) -> RewrittenInstruction:
        asked.append(settings)
        prompt = instructions.format_e1_full_prompt("paint the square blue", "a blue square")
        return RewrittenInstruction("a red square", "paint the square blue", "a blue square", prompt)

    monkeypatch.setattr(instructions, "rewrite_instruction", fake_rewrite)
    output = tmp_path / "vlm.png"
    argv = ["--tiny", "--image", str(source), "--instruction", "make it blue", "--output", str(output),
            "--steps", "1", "--refine-strength", "0", "--rewrite-instruction", "--vlm-url", "http://127.0.0.1:9/v1",
            "--vlm-model", "test-vlm", "--vlm-timeout", "7", "--rewrite-fallback"]
    assert run_edit_cli(argv, "e1-full", env={**tiny_env, "OPENAI_API_KEY": "sk-secret-key"}) == 0
    text = Path(f"{output}.json").read_text()
    metadata = json.loads(text)
    assert asked and asked[0].api_key == "sk-secret-key"
    assert "sk-secret-key" not in text
    assert metadata["instruction"].startswith("Editing Instruction: paint the square blue.")
    assert metadata["instruction_given"] == "make it blue" and metadata["target_description"] is None
    assert metadata["vlm"] == {"url": "http://127.0.0.1:9/v1", "model": "test-vlm", "timeout_s": 7.0,
                               "fallback": True, "outcome": "rewritten"}


def test_prompt_metadata_says_what_built_the_prompt() -> None:
    bare = e1_full_args("--instruction", " add a hat ")
    assert prompt_metadata(bare, "e1-full", "add a hat") == {
        "instruction_given": " add a hat ", "target_description": None, "vlm": None,
    }
    described = e1_full_args("--instruction", "add a hat", "--target-description", "a cat in a hat")
    assert prompt_metadata(described, "e1-full", "...")["target_description"] == "a cat in a hat"
    vlm_flags = ["--rewrite-instruction", "--vlm-url", "http://h/v1", "--vlm-model", "m"]
    fell_back = e1_full_args("--instruction", " add a hat ", *vlm_flags, "--rewrite-fallback")
    assert prompt_metadata(fell_back, "e1-full", "add a hat")["vlm"]["outcome"].startswith("failed")
    in_form = "Editing Instruction: add a hat. Target Image Description: a cat in a hat"
    given = e1_full_args("--instruction", in_form, *vlm_flags)
    assert "already in the E1-Full form" in prompt_metadata(given, "e1-full", in_form)["vlm"]["outcome"]
    both = e1_full_args("--instruction", "add a hat", "--target-description", "a cat", *vlm_flags)
    assert "--target-description" in prompt_metadata(both, "e1-full", "x")["vlm"]["outcome"]
    e1_1 = build_edit_parser(MODELS["e1.1"]).parse_args(["--image", "x", "--output", "o.png", "--instruction", "i"])
    assert prompt_metadata(e1_1, "e1.1", "i") == {}

