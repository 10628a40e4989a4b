"""The full-size run: `test_npu_setup.py --full-size` and hidream_edit/full_size.py.

At the real sizes even one block costs minutes per step on a CPU (image tokens are padded to 8192), so the
run's own code (builder, planner, pipeline, meters, record) runs here on small configurations the test passes
in; the real configurations are checked by their parameter counts on the meta device, where nothing is
allocated. The real-width measurement is a benchmark (benchmarks/block_working_set.py), not a test.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from npu_standin import load_doctor, run_standin

from device_utils import DeviceManager
from hidream_edit import full_size, pipeline
from hidream_edit.full_size import (
    PHASES,
    RECORD_FIELDS,
    FixedLengthTokenizer,
    FullSizeSettings,
    build_on_meta,
    cut_configs,
    module_sizes,
    parameter_count,
    refine_strength_for,
    run_full_size,
)
from hidream_edit.models import table_sizes
from hidream_edit.placement import gib
from hidream_edit.spec import MODELS, REAL_CONFIGS, REAL_LLAMA_LM_HEAD, REAL_PARAMETERS

ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CLIP_IDS = {"vocab_size": 300, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "max_position_embeddings": 248}
doctor = load_doctor()
# The real configurations' shape at tiny widths: 2 double- and 3 single-stream blocks, 2-layer encoders.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "transformer": {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2, "num_single_layers": 3,
                    "attention_head_dim": 16, "num_attention_heads": 2, "caption_channels": [32, 48],
                    "text_emb_dim": 32, "num_routed_experts": 4, "num_activated_experts": 2,
                    "axes_dims_rope": [8, 4, 4], "max_resolution": [128, 128], "llama_layers": [0, 1, 1, 1, 1]},
    "llama": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 12, "vocab_size": 256, "max_position_embeddings": 131072,
              "rope_parameters": ROPE, "bos_token_id": 1, "eos_token_id": 2},
    "t5": {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 4, "d_kv": 8, "vocab_size": 128,
           "feed_forward_proj": "gated-gelu"},
    "clip_l": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "projection_dim": 16, "hidden_act": "quick_gelu", **CLIP_IDS},
    "clip_g": {"hidden_size": 40, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
               "projection_dim": 16, "hidden_act": "gelu", **CLIP_IDS},
    "vae": {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1,
            "norm_num_groups": 4, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": False, "use_post_quant_conv": False},
}


def files_under(root: Path) -> set[Path]:
    return {path.relative_to(root) for path in root.rglob("*") if path.is_file()}


# ---------------------------------------------------------------------------------------------- the run


def test_the_doctor_runs_a_full_size_edit_and_writes_only_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(full_size, "REAL_CONFIGS", SMALL_CONFIGS)
    synced: list[torch.device] = []
    real_sync = pipeline.synchronize_device
    monkeypatch.setattr(pipeline, "synchronize_device", lambda device: (synced.append(device), real_sync(device)))

    code = doctor.main(["--full-size", "--device", "cpu", "--dtype", "fp32", "--blocks", "1", "--steps", "2",
                        "--size", "32", "--json", "run.json"])

    out = capsys.readouterr().out
    assert code == 0, out
    assert files_under(tmp_path) == {Path("work/run.json")}
    record = json.loads((work / "run.json").read_text())
    assert tuple(record) == RECORD_FIELDS
    assert record["status"] == "ok" and record["error"] is None and record["failed_in"] is None
    assert record["placement"] == "none" and record["attention"] == "sdpa" and record["machine"]["dtype"] == "fp32"
    host_peak = gib(record["plan"]["host"]["peak_bytes"])
    assert record["placement_actions"] == ["all components on cpu", f"placement none: predicted peak host {host_peak}"]
    # one warm-up edit step, then the given number of steps in each stage, the edit stage padded to max_seq
    assert record["steps_done"] == 5
    seconds = record["seconds"]
    assert len(seconds["edit_steps"]) == 2 and len(seconds["refine_steps"]) == 2
    assert seconds["edit_step"] > 0 and seconds["refine_step"] > 0 and seconds["warm_up_step"] > 0
    assert all(seconds[key] > 0 for key in ("build", "encode", "decode", "total"))
    assert record["work"]["image_tokens"] == {"edit": 8, "refine": 4, "edit_padded_to": 8192}
    assert record["work"]["branches"] == {"edit": 3, "refine": 2}
    # the CPU: everything is host memory, measured beside the plan's host peak, with a working set per phase
    host = record["memory"]["host"]
    assert record["memory"]["devices"] == []
    assert host["peak_rss"] > 0 and host["ratio"] == round(host["peak_rss"] / host["predicted"], 3)
    assert host["predicted"] == record["plan"]["host"]["peak_bytes"]
    assert set(record["working_set"]["measured"]) == set(PHASES)
    assert record["working_set"]["predicted"] == record["plan"]["reserve"]
    # what --blocks cut is said, and the parameter counts are those of the cut model
    cut = record["cut"]
    assert cut["double_stream_blocks"] == [1, 2] and cut["single_stream_blocks"] == [1, 3]
    assert cut["llama_layers"] == [1, 2] and cut["t5_layers"] == [1, 2] and cut["llama_layers_read"] == [0, 0]
    assert record["parameters"]["transformer"]["real"] == REAL_PARAMETERS["transformer"]
    assert record["parameters"]["transformer"]["built"] < parameter_count(build_on_meta(SMALL_CONFIGS)["transformer"])
    # the encoders' queued work is waited for before the encode time is taken
    assert synced and all(device.type == "cpu" for device in synced)
    assert "per edit step" in out and "per refine step" in out and "record written to run.json" in out


def test_a_tiny_max_memory_refuses_before_allocating(tmp_path: Path) -> None:
    """On the stand-in NPU (whose memory cannot hold a tensor) the plan refuses before anything is made."""
    record_path = tmp_path / "run.json"
    code = (
        "import hidream_edit.full_size as fs, test_npu_setup as doctor\n"
        f"fs.REAL_CONFIGS = json.loads({json.dumps(json.dumps(SMALL_CONFIGS))})\n"
        "def allocate(*args, **kwargs):\n"
        "    raise AssertionError('materialised')\n"
        "fs.materialize = allocate\n"
        "sys.exit(doctor.main(['--full-size', '--device', 'npu', '--max-memory', '1MiB', '--json', "
        f"{str(record_path)!r}]))\n"
    )
    result = run_standin(code, {"count": 1, "free": 50 * 2**30, "total": 64 * 2**30})
    assert result.returncode == 1, result.stderr
    assert "materialised" not in result.stderr and "Traceback" not in result.stderr
    record = json.loads(record_path.read_text())
    assert record["status"] == "refused" and "--max-memory of at least" in record["error"]
    assert record["seconds"] is None and record["memory"] is None and record["steps_done"] == 0
    assert record["placement_actions"] is None
    assert record["plan"]["devices"][0]["budget_bytes"] == 2**20
    assert "refused before allocating" in result.stdout


def test_running_out_of_memory_is_a_measured_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(modules: Any) -> Any:
        raise torch.OutOfMemoryError("NPU out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(full_size, "assemble", out_of_memory)
    settings = FullSizeSettings(steps=1, size=32, blocks=1)
    record = run_full_size(settings, DeviceManager("cpu", "fp32"), SMALL_CONFIGS)
    assert record["status"] == "out_of_memory" and record["failed_in"] == "build" and record["steps_done"] == 0
    assert record["error"] == "NPU out of memory. Tried to allocate 2.00 GiB"
    assert record["memory"]["host"]["peak_rss"] > 0 and "build" in record["working_set"]["measured"]
    check = doctor.full_size_check(record)
    assert check.status == "FAIL" and check.detail.startswith("out of memory in build after 0 steps")

    monkeypatch.setattr(full_size, "assemble", lambda modules: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        run_full_size(settings, DeviceManager("cpu", "fp32"), SMALL_CONFIGS)


# ---------------------------------------------------------------------------------------------- real configs


def test_the_real_configs_give_the_spec_sizes_on_the_meta_device() -> None:
    modules = build_on_meta(REAL_CONFIGS)
    assert all(p.device.type == "meta" for module in modules.values() for p in module.parameters())
    counts = {name: parameter_count(module) for name, module in modules.items()}
    assert counts == {**REAL_PARAMETERS, "llama": REAL_PARAMETERS["llama"] - REAL_LLAMA_LM_HEAD}
    built, table = module_sizes(modules, "bf16"), table_sizes(MODELS["e1.1"], "bf16")
    assert built.components == table.components
    assert (built.largest_block, built.transformer_unblocked, built.largest_tensor) == (
        table.largest_block, table.transformer_unblocked, table.largest_tensor)
    assert built.dims == table.dims
    assert module_sizes(modules, "fp16").components["t5"] == table_sizes(MODELS["e1.1"], "fp16").components["t5"]


def test_blocks_cut_the_real_configs_and_say_so() -> None:
    cut, what = cut_configs(REAL_CONFIGS, 1)
    assert (cut["transformer"]["num_layers"], cut["transformer"]["num_single_layers"]) == (1, 1)
    assert cut["transformer"]["llama_layers"] == [0, 0] and what["llama_layers_read"] == [0, 0]
    assert cut["llama"]["num_hidden_layers"] == 1 and cut["t5"]["num_layers"] == 1
    assert REAL_CONFIGS["transformer"]["num_layers"] == 16  # the spec's data is not changed
    cut, what = cut_configs(REAL_CONFIGS, 20)
    assert what["double_stream_blocks"] == [16, 16] and what["single_stream_blocks"] == [20, 32]
    assert what["llama_layers"] == [20, 32] and what["t5_layers"] == [20, 24]
    assert cut["transformer"]["llama_layers"] == list(range(20)) + [19] * 16
    assert cut_configs(REAL_CONFIGS, None) == (REAL_CONFIGS, None)


# ---------------------------------------------------------------------------------------------- pieces


def test_token_ids_have_the_real_length() -> None:
    tokens = FixedLengthTokenizer(vocab_size=50)
    first, again = tokens(["a cat", "a dog"], max_length=128), tokens("a cat", padding="longest")
    assert first.input_ids.shape == (2, 128) and first.attention_mask.sum() == 256
    assert torch.equal(first.input_ids[0], again.input_ids[0]) and not torch.equal(*first.input_ids)
    assert int(first.input_ids.max()) < 50


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 28])
def test_each_stage_runs_the_steps_asked(steps: int) -> None:
    strength = refine_strength_for(steps + 1, steps)
    assert pipeline.refine_start_step(2 * steps + 1, strength) == steps + 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--full-size", "--steps", "0"], "--steps must be a whole number of at least 1, got '0'"),
        (["--full-size", "--blocks", "-1"], "--blocks must be a whole number of at least 1, got '-1'"),
        (["--full-size", "--blocks", "two"], "--blocks must be a whole number of at least 1, got 'two'"),
        (["--full-size", "--steps", "1.5"], "--steps must be a whole number of at least 1, got '1.5'"),
        (["--full-size", "--size", "7"], "--size must be a multiple of 16 from 16 to 1024 (pixels), got '7'"),
        (["--full-size", "--offload", "nowhere"], "invalid choice: 'nowhere'"),
        (["--steps", "2", "--offload", "model"], "--steps, --offload need --full-size"),
        (["--json", "run.json"], "--json PATH needs --full-size"),
        (["--full-size", "--model", "e1-full"], "--full-size runs HiDream-E1.1 alone"),
    ],
)
def test_bad_values_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        doctor.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_an_existing_record_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "run.json"
    existing.write_text("keep")
    assert doctor.main(["--full-size", "--device", "cpu", "--json", str(existing)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"test_npu_setup.py: error: {existing} already exists" and existing.read_text() == "keep"
    with pytest.raises(Exception, match="at least 1 step"):
        FullSizeSettings(steps=0).check()
