"""The memory plan end to end: --plan in the CLIs (no weights read), placements running real tiny edits on the
CPU, refusal before loading, and --plan on the stand-in NPU."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from npu_standin import REPO, run_standin
from PIL import Image

from hidream_edit.cli import run_edit_cli
from hidream_edit.config import resolve_model_sources
from hidream_edit.editor import Editor, EditorSettings, EditRequest
from hidream_edit.placement import GIB, PLACEMENTS, EncoderVisits
from hidream_edit.spec import MODELS

SOURCE = Image.new("RGB", (40, 30), (30, 120, 200))
SMALL_INPUT = SOURCE.resize((32, 32))


def clean_env(**extra: str) -> dict[str, str]:
    drop = ("PREFERRED_DEVICE", "PREFERRED_DTYPE", "HIDREAM_LLAMA_PATH", "HIDREAM_I1_PATH", "HIDREAM_E1_PATH",
            "HIDREAM_E1_FULL_PATH", "HIDREAM_ATTENTION")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


# ---------------------------------------------------------------------------------------------- --plan


@pytest.mark.parametrize("host,placement", [("1x64GiB", "none"), ("1x32GiB", "group"), ("2x64GiB", "none"),
                                            ("1x24GiB", "group")])
def test_plan_host_prints_a_plan_that_fits_from_the_real_sizes(tmp_path: Path, host: str, placement: str) -> None:
    """The issue's Done-when commands, with an empty hub cache: sizes come from the spec's table."""
    env = clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    command = [sys.executable, "inference_e1_1_npu.py", "--plan", "--plan-host", host, "--json"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["placement"] == placement and plan["fits"] is True and plan["reason"]
    assert len(plan["devices"]) >= 1 and plan["host"]["budget_bytes"] is None
    for device in plan["devices"]:
        assert 0 < device["peak_bytes"] <= device["budget_bytes"] == int(host.split("x")[1][:-3]) * GIB
    assert {c["source"] for c in plan["components"]} == {"table"}


def headers_only_copy(source: Path, target: Path) -> Path:
    """A copy of a checkpoint folder whose safetensors files keep their header and lose every tensor byte."""
    shutil.copytree(source, target)
    for file in target.rglob("*.safetensors"):
        data = file.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        file.write_bytes(data[: 8 + length])
    return target


def test_plan_reads_headers_only_and_needs_no_image(tiny_checkpoints, tmp_path: Path, capsys) -> None:
    """Tensor data is gone from every file: any weight read would fail, the plan does not."""
    llama = headers_only_copy(tiny_checkpoints.llama, tmp_path / "llama")
    i1 = headers_only_copy(tiny_checkpoints.i1, tmp_path / "i1")
    e1 = headers_only_copy(tiny_checkpoints.e1_1, tmp_path / "e1")
    argv = ["--plan", "--json", "--device", "cpu", "--llama-path", str(llama), "--i1-path", str(i1),
            "--e1-path", str(e1), "--host-memory", "64GiB"]
    assert run_edit_cli(argv, "e1.1", env=clean_env()) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["placement"] == "none" and plan["fits"] and plan["devices"] == []
    assert {c["source"] for c in plan["components"]} == {"headers"}
    assert plan["host"]["budget_bytes"] == 64 * GIB and plan["host"]["source"] == "--host-memory"


def test_plan_text_for_e1_full_names_placement_and_rejections(capsys, tmp_path: Path) -> None:
    env = clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    argv = ["--plan", "--plan-host", "1x48GiB", "--host-memory", "512GiB"]
    assert run_edit_cli(argv, "e1-full", env=env) == 0
    text = capsys.readouterr().out
    assert "placement: model (fits; asked auto)" in text
    assert "rejected none: npu:0 needs" in text and "rejected split: needs a second npu card" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--plan", "--plan-host", "64GiB"], "is not a host; write cards x size per card"),
        (["--plan", "--max-memory", "lots"], "'lots' is not a size"),
        (["--image", "a.png", "--instruction", "x", "--output", "o.png", "--json"], "--plan-host and --json go with"),
        (["--instruction", "x"], "missing --image, --output"),
    ],
)
def test_plan_flag_mistakes_are_one_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_edit_cli(argv, "e1.1", env=clean_env())
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_missing_local_path_is_an_error_not_a_table_guess(capsys, tmp_path: Path) -> None:
    argv = ["--plan", "--plan-host", "1x64GiB", "--llama-path", str(tmp_path / "nowhere")]
    assert run_edit_cli(argv, "e1.1", env=clean_env()) == 2
    assert "nowhere does not exist; check --llama-path" in capsys.readouterr().err


def test_nothing_fits_refuses_before_loading(tiny_env: dict[str, str], tmp_path: Path, capsys) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    output = tmp_path / "out.png"
    argv = ["--tiny", "--device", "cpu", "--host-memory", "1GiB", "--image", str(tmp_path / "in.png"),
            "--instruction", "x", "--output", str(output)]
    assert run_edit_cli(argv, "e1.1", env=clean_env(**tiny_env)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: HiDream-E1.1 in fp32 does not fit: ") and "of host memory" in err
    assert not output.exists()


def test_nothing_fits_refuses_before_downloading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub ids not on disk are planned with the spec's real sizes; no download starts when they cannot fit."""
    import huggingface_hub

    from device_utils import DeviceManager
    from hidream_edit.errors import UserError
    from hidream_edit.models import ModelSources, load_pipeline

    asked: list[bool] = []

    def snapshot_download(repo_id: str, local_files_only: bool = False, **kwargs: Any) -> str:
        asked.append(local_files_only)
        raise FileNotFoundError(f"{repo_id} is not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    spec = MODELS["e1.1"]
    sources = ModelSources("e1.1", "meta-llama/Llama-3.1-8B-Instruct", "HiDream-ai/HiDream-I1-Full", spec.edit_hub_id)
    with pytest.raises(UserError, match="HiDream-E1.1 in fp32 does not fit: on the CPU"):
        load_pipeline(sources, DeviceManager("cpu", "fp32"), host_memory=64 * GIB)
    assert asked == [True, True, True]  # only cache look-ups


@pytest.mark.parametrize("model", ["e1.1", "e1-full"])
def test_what_the_plan_reads_straight_onto_the_card_reaches_the_loaders(
    model: str, tiny_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transformer and the Llama are read onto the card the plan names (no host copy); on the CPU the plan
    names none, so the plan is made to name the CPU and the loaders' device arguments are recorded."""
    from transformers import LlamaModel

    from device_utils import DeviceManager
    from hidream_edit import models
    from hidream_edit.placement import Plan

    asked: dict[str, Any] = {}

    def recorded(name: str, load: Any, device_of: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            if name != "transformer" or Path(args[0]).name == "transformer":  # not E1-Full's LoRA file
                asked[name] = device_of(args, kwargs)
            return load(*args, **kwargs)

        return spy

    monkeypatch.setattr(Plan, "load_device", lambda plan, component: "cpu" if component in ("transformer", "llama")
                        else None)
    monkeypatch.setattr(models, "load_safetensors", recorded(
        "transformer", models.load_safetensors, lambda args, kwargs: args[1] if len(args) > 1 else None))
    monkeypatch.setattr(LlamaModel, "from_pretrained", classmethod(
        recorded("llama", LlamaModel.from_pretrained.__func__, lambda args, kwargs: kwargs.get("device_map"))))
    sources = resolve_model_sources(MODELS[model], tiny=True, env=tiny_env)
    models.load_pipeline(sources, DeviceManager("cpu", "fp32"), offload="none")
    assert asked == {"transformer": "cpu", "llama": "cpu"}  # E1-Full: I1's transformer folder, then its LoRA file


# ---------------------------------------------------------------------------------------------- placements on CPU


@pytest.fixture(scope="module")
def placed_editors(tiny_env: dict[str, str]) -> dict[str, Editor]:
    sources = resolve_model_sources(MODELS["e1.1"], tiny=True, env=tiny_env)
    editors = {}
    for placement in PLACEMENTS:
        editor = Editor.load(EditorSettings(sources=sources, device="cpu", dtype="fp32", offload=placement))
        editor.prepare_image = lambda request: (SOURCE, SMALL_INPUT)  # a small model input keeps the edit quick
        editors[placement] = editor
    return editors


def small_edit(editor: Editor) -> Any:
    return editor.edit(EditRequest(image=SOURCE, instruction="make it green", steps=2, refine_strength=0.5))


def test_every_placement_gives_the_pixels_of_none(placed_editors: dict[str, Editor]) -> None:
    reference = np.asarray(small_edit(placed_editors["none"]).image, dtype=np.int16)
    for placement in PLACEMENTS[1:]:
        result = small_edit(placed_editors[placement])
        assert np.abs(np.asarray(result.image, dtype=np.int16) - reference).max() <= 1, placement
        assert result.metadata["placement"]["name"] == placement and result.metadata["offload"] == placement
        assert result.metadata["placement"]["predicted_peak_bytes"]["host"] > 0


def test_encoders_keep_the_transformer_and_move_each_encoder_once_per_encode(
    placed_editors: dict[str, Editor], monkeypatch: pytest.MonkeyPatch
) -> None:
    editor = placed_editors["encoders"]
    visits = editor.loaded.placement_hooks
    assert isinstance(visits, EncoderVisits)
    transformer_moves: list[Any] = []
    monkeypatch.setattr(editor.loaded.pipe.transformer, "to", lambda *a, **k: transformer_moves.append(a))
    visits.moves.clear()
    one_encode = [(name, where) for name in ("clip_l", "clip_g", "t5", "llama") for where in ("card", "host")]
    violet = EditRequest(image=SOURCE, instruction="make it violet", steps=2, refine_strength=0.5)
    editor.edit(violet)
    assert visits.moves == one_encode
    editor.edit(violet)  # the same prompt again: its embeddings come from the Editor's cache, no encoder moves
    assert visits.moves == one_encode
    editor.edit(EditRequest(image=SOURCE, instruction="make it orange", steps=2, refine_strength=0.5))
    assert visits.moves == one_encode * 2
    assert transformer_moves == [] and visits.visitor is None


def test_group_offload_hooks_are_on_the_transformer_blocks(placed_editors: dict[str, Editor]) -> None:
    from diffusers.hooks import HookRegistry

    transformer = placed_editors["group"].loaded.pipe.transformer
    block = transformer.double_stream_blocks[0]
    assert "group_offloading" in HookRegistry.check_if_exists_or_initialize(block).hooks
    assert placed_editors["group"].loaded.memory_actions[0].startswith("transformer group offload onto cpu")


def test_model_offload_hooks_every_component(placed_editors: dict[str, Editor]) -> None:
    """`model`: diffusers' model CPU offload puts accelerate's hook on each component (on the CPU too), so each
    visits the card when it runs; the pixels test alone would pass with nothing installed."""
    pipe = placed_editors["model"].loaded.pipe
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"):
        assert hasattr(getattr(pipe, name), "_hf_hook"), name
    assert not hasattr(placed_editors["none"].loaded.pipe.transformer, "_hf_hook")
    assert placed_editors["model"].loaded.memory_actions[0] == "model CPU offload onto cpu"


def test_auto_on_the_cpu_is_none_and_the_log_names_the_plan(tiny_env: dict[str, str], caplog) -> None:
    sources = resolve_model_sources(MODELS["e1.1"], tiny=True, env=tiny_env)
    with caplog.at_level("INFO", logger="hidream_edit"):
        editor = Editor.load(EditorSettings(sources=sources, device="cpu", dtype="fp32"))
    assert editor.settings.offload == "auto" and editor.placement()["name"] == "none"
    assert any("placement none: predicted peak host" in record.message for record in caplog.records)


def test_the_llama_without_lm_head_gives_identical_prompt_embeddings(
    e1_1_editor: Editor, tiny_checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader's LlamaModel (no lm_head, 1 GiB less for the real model) encodes exactly as the full LM."""
    import torch
    from transformers import LlamaForCausalLM, LlamaModel

    pipe = e1_1_editor.loaded.pipe
    assert type(pipe.text_encoder_4) is LlamaModel

    def encode() -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return pipe.encode_prompt(prompt="make it green", negative_prompt="blurry", device=torch.device("cpu"),
                                      do_classifier_free_guidance=True, max_sequence_length=128)

    base = encode()
    full = LlamaForCausalLM.from_pretrained(tiny_checkpoints.llama, dtype=torch.float32, attn_implementation="eager")
    monkeypatch.setattr(pipe, "text_encoder_4", full)
    with_lm_head = encode()
    assert len(base) == len(with_lm_head) == 6
    assert all(torch.equal(a, b) for a, b in zip(base, with_lm_head, strict=True))


# ---------------------------------------------------------------------------------------------- stand-in NPU


PLAN_ON_STANDIN = """
import contextlib, io
from hidream_edit.cli import run_edit_cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = run_edit_cli(ARGV, "e1.1")
print(json.dumps({"code": code, "plan": json.loads(out.getvalue()),
                  "mem_get_info": npu.memory_asked}))
"""


def plan_on_standin(argv: list[str], config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = run_standin(PLAN_ON_STANDIN.replace("ARGV", repr(["--plan", "--json", *argv])), config, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_plan_on_the_standin_npu_uses_a_second_card_for_the_encoders(tmp_path: Path) -> None:
    config = {"count": 2, "free": [40 * GIB, 60 * GIB], "total": [64 * GIB, 64 * GIB]}
    outcome = plan_on_standin(["--host-memory", "512GiB"], config, tmp_path)
    plan = outcome["plan"]
    assert outcome["code"] == 0 and plan["placement"] == "split" and plan["encoder_device"] == "npu:1"
    assert [(d["device"], d["budget_bytes"]) for d in plan["devices"]] == [("npu:0", 40 * GIB), ("npu:1", 60 * GIB)]
    assert plan["dtype"] == "bf16"


def test_plan_on_the_standin_asks_only_the_edit_card_when_it_is_enough(tmp_path: Path) -> None:
    """The process's own plan asks the edit card alone (asking a card may create a runtime context on it);
    only then does --plan ask every card it sees, for the whole host's layouts."""
    config = {"count": 2, "free": [63 * GIB, 10 * GIB], "total": [64 * GIB, 64 * GIB]}
    outcome = plan_on_standin(["--host-memory", "512GiB"], config, tmp_path)
    assert outcome["plan"]["placement"] == "none" and outcome["mem_get_info"] == [0, 0, 1]
    # the second card's 10 GiB hold a process only by streaming, so every layout that needs it loses, with why
    host = outcome["plan"]["host_layouts"]
    for goal in ("latency", "throughput"):
        assert host[goal]["command"].startswith("python inference_e1_1_npu.py --offload none ")
        assert [peak["device"] for peak in host[goal]["card_peaks"]] == ["npu:0"]
    why = {other["layout"]: other["latency"] for other in host["others"]}
    assert why["dp 1 x cfg 2 x tp 1"] == "moves the transformer between host and card (none, sequential)"
    assert why["dp 1 x cfg 1 x tp 2"].startswith("cards npu:0-npu:1: ")
    assert "npu:1 needs" in why["1 process, text encoders on a second card (split)"]


def test_plan_on_the_standin_plans_the_host_from_the_cards_it_sees(tmp_path: Path) -> None:
    """Two free 64 GiB cards: the fastest edit is the tensor-parallel pair (each card under 90%), as on a
    described 2x64GiB host."""
    config = {"count": 2, "free": [64 * GIB, 64 * GIB], "total": [64 * GIB, 64 * GIB]}
    outcome = plan_on_standin(["--host-memory", "512GiB"], config, tmp_path)
    latency = outcome["plan"]["host_layouts"]["latency"]
    assert latency["command"].startswith("torchrun --standalone --nproc-per-node 2 inference_e1_1_npu.py "
                                         "--tensor-parallel 2 ")
    assert [peak["device"] for peak in latency["card_peaks"]] == ["npu:0", "npu:1"] and latency["fullest"] < 0.9


def test_plan_on_the_standin_caps_each_card(tmp_path: Path) -> None:
    config = {"count": 1, "free": 63 * GIB, "total": 64 * GIB}
    outcome = plan_on_standin(["--host-memory", "512GiB", "--max-memory", "40GiB"], config, tmp_path)
    assert outcome["plan"]["placement"] == "model" and outcome["plan"]["devices"][0]["budget_bytes"] == 40 * GIB
