"""HiDream-E1.1 end to end on the tiny set: CLI, Editor, loading and the refine-weights option."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from npu_standin import REPO
from PIL import Image

from device_utils import DeviceManager, load_safetensors
from hidream_edit import models
from hidream_edit.attention import install_attention
from hidream_edit.cli import run_edit_cli
from hidream_edit.config import resolve_model_sources
from hidream_edit.editor import EditRequest, EditResult, save_result
from hidream_edit.errors import ModelFilesError, UserError
from hidream_edit.spec import MODELS

METADATA_FIELDS = {
    "model", "instruction", "negative", "steps", "guidance", "image_guidance", "refine_strength", "clip_cfg_norm",
    "seed", "device", "dtype", "attention", "model_sources", "timings", "memory", "source_size", "refine_weights",
}


@pytest.fixture()
def source_png(tmp_path: Path) -> Path:
    path = tmp_path / "source.png"
    Image.new("RGB", (120, 90), (30, 120, 200)).save(path)
    return path


def as_array(result: EditResult) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def edit(editor: Any, source: Path, on_step: Any = None, should_stop: Any = None, **kwargs: Any) -> EditResult:
    request = EditRequest(image=source, instruction="make it green", steps=kwargs.pop("steps", 2), **kwargs)
    return editor.edit(request, on_step=on_step, should_stop=should_stop)


def test_cli_writes_image_of_source_size_and_metadata(tiny_env: dict[str, str], source_png: Path, tmp_path: Path):
    output = tmp_path / "out.jpg"
    command = [sys.executable, "inference_e1_1_npu.py", "--tiny", "--image", str(source_png), "--instruction",
               "make it green", "--output", str(output), "--steps", "2", "--seed", "5"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**dict(_base_env()), **tiny_env})
    assert result.returncode == 0, result.stderr
    assert Image.open(output).size == (120, 90) and Image.open(output).format == "JPEG"
    metadata = json.loads(Path(f"{output}.json").read_text())
    assert set(metadata) >= METADATA_FIELDS
    assert metadata["seed"] == 5 and metadata["steps"] == 2 and metadata["guidance"] == 3.0
    assert metadata["image_guidance"] == 1.5 and metadata["refine_strength"] == 0.3 and metadata["device"] == "cpu"
    assert len(metadata["timings"]["step_s"]) == 2 and metadata["model_sources"]["tiny"] is True
    assert result.stdout.startswith(f"saved {output} (120x90) on cpu fp32") and "s/step" in result.stdout
    assert "denoising" in result.stderr and "Traceback" not in result.stderr


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("PREFERRED_DEVICE", "PREFERRED_DTYPE")}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--image", "missing.png"], "missing.png: file not found"),
        (["--instruction", "   "], "the instruction is empty"),
        (["--output", "out.gif"], "unknown image extension"),
        (["--steps", "0"], "steps must be between 1 and 1000"),
        (["--refine-strength", "1.5"], "refine strength must be between 0 and 1"),
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--device", "npu"], "torch_npu is not installed"),
        (["--llama-path", "/nowhere"], "--tiny uses the built-in tiny checkpoints; drop --llama-path"),
        (["--dtype", "fp8"], "invalid choice"),
        (["--cfg-parallel", "4"], "argument --cfg-parallel: invalid choice: 4 (choose from 1, 2, 3)"),
    ],
)
def test_cli_user_mistakes_are_one_line_exit_2(
    args: list[str], message: str, tiny_env: dict[str, str], source_png: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    flags = {"--image": str(source_png), "--instruction": "x", "--output": str(tmp_path / "o.png"), "--steps": "1"}
    flags.update(zip(args[::2], args[1::2], strict=True))
    argv = ["--tiny", *(item for pair in flags.items() for item in pair)]
    try:
        code = run_edit_cli(argv, "e1.1", env=tiny_env)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_cli_refuses_to_overwrite(tiny_env: dict[str, str], source_png: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "taken.png"
    output.write_bytes(b"keep me")
    argv = ["--tiny", "--image", str(source_png), "--instruction", "x", "--output", str(output)]
    assert run_edit_cli(argv, "e1.1", env=tiny_env) == 2
    assert "already exists" in capsys.readouterr().err and output.read_bytes() == b"keep me"


def reference_edit(editor: Any, source: Path, seed: int, steps: int, refine_strength: float) -> np.ndarray:
    """The pipeline called directly with E1.1's defaults and a CPU generator: what Editor.edit must give."""
    from hidream_edit.images import resize_for_e1_1, resize_to

    image = Image.open(source).convert("RGB")
    with torch.inference_mode():
        output = editor.loaded.pipe(
            prompt="make it green", negative_prompt="low quality, blurry, distorted", image=resize_for_e1_1(image),
            guidance_scale=3.0, image_guidance_scale=1.5, num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed), refine_strength=refine_strength, clip_cfg_norm=True,
            refine_switch=editor.loaded.refine_switch,
        )
    return np.asarray(resize_to(output.images[0], image.size), dtype=np.int16)


def test_same_seed_reproduces_other_seed_is_that_seeds_edit(e1_1_editor: Any, source_png: Path) -> None:
    first, again, other = (edit(e1_1_editor, source_png, seed=s, steps=1) for s in (11, 11, 12))
    assert np.array_equal(as_array(first), as_array(again))
    assert np.array_equal(as_array(other), reference_edit(e1_1_editor, source_png, 12, 1, 0.3))
    assert not np.array_equal(as_array(first), as_array(other))
    assert first.image.size == (120, 90) and first.metadata["model_input_size"] == [1168, 880]


def test_sdpa_and_math_attention_agree(e1_1_editor: Any, source_png: Path) -> None:
    transformer = e1_1_editor.loaded.pipe.transformer
    sdpa = edit(e1_1_editor, source_png, seed=1)
    try:
        install_attention(transformer, e1_1_editor.dm, "math")
        math = edit(e1_1_editor, source_png, seed=1)
    finally:
        install_attention(transformer, e1_1_editor.dm, "sdpa")
    assert np.abs(as_array(sdpa) - as_array(math)).max() <= 2


def test_refine_strength_reaches_the_pipeline(e1_1_editor: Any, source_png: Path) -> None:
    """0.5 of 3 steps starts the refine stage at step 1 (the default 0.3 would at 2, none at 3)."""
    some = edit(e1_1_editor, source_png, steps=3, refine_strength=0.5)
    assert some.metadata["refine_start_step"] == 1
    assert np.array_equal(as_array(some), reference_edit(e1_1_editor, source_png, 3, 3, 0.5))


def test_cancel_between_steps(e1_1_editor: Any, source_png: Path) -> None:
    from hidream_edit.editor import EditCancelled

    seen: list[int] = []
    with pytest.raises(EditCancelled, match="stopped after step 1 of 3"):
        edit(e1_1_editor, source_png, steps=3, on_step=lambda done, total: seen.append(done), should_stop=lambda: True)
    assert seen == [1]


def test_save_is_atomic_and_never_overwrites(e1_1_editor: Any, source_png: Path, tmp_path: Path) -> None:
    result = edit(e1_1_editor, source_png, steps=1)
    image_path, json_path = save_result(result, tmp_path / "r.png")
    before = image_path.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        save_result(result, tmp_path / "r.png")
    assert image_path.read_bytes() == before and json.loads(json_path.read_text())["output"] == str(image_path)
    save_result(result, tmp_path / "r.png", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("r.", ".r"))) == ["r.png", "r.png.json"]


def test_e1_1_loading_holds_one_copy_of_the_transformer(tiny_checkpoints: Any, monkeypatch: pytest.MonkeyPatch):
    loaded_from: list[tuple[str, Any]] = []

    def recording(path: Path, device: Any = None, slices: Any = None) -> dict[str, torch.Tensor]:
        loaded_from.append((str(path), device))
        assert slices is None  # one process reads whole tensors; only tensor-parallel ranks read slices
        return load_safetensors(path, device, slices)

    monkeypatch.setattr(models, "load_safetensors", recording)
    transformer = models.load_e1_1_transformer(tiny_checkpoints.i1, tiny_checkpoints.e1_1, torch.float32, "cpu")
    # I1 weights never read; E1.1's read straight onto the device the plan names
    assert loaded_from == [(str(tiny_checkpoints.e1_1 / "transformer"), "cpu")]
    tensors = list(transformer.state_dict().values())
    assert not any(t.is_meta for t in tensors)
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storages) == len(tensors)  # every tensor owns its storage: no view of a second copy
    checkpoint = load_safetensors(tiny_checkpoints.e1_1 / "transformer")
    assert sum(t.numel() * t.element_size() for t in tensors) == sum(
        t.numel() * t.element_size() for t in checkpoint.values()
    )
    for key, value in checkpoint.items():
        assert torch.equal(transformer.state_dict()[key], value)
    assert transformer.max_seq == 8192


def test_e1_1_bf16_load_casts_every_float_tensor(tiny_checkpoints: Any) -> None:
    transformer = models.load_e1_1_transformer(tiny_checkpoints.i1, tiny_checkpoints.e1_1, torch.bfloat16)
    assert {t.dtype for t in transformer.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}


def test_a_bf16_pipeline_holds_every_component_in_bf16(tiny_checkpoints: Any) -> None:
    """Each component is loaded in the run's dtype: one left in fp32 would double its memory and mix dtypes."""
    sources = models.ModelSources("e1.1", str(tiny_checkpoints.llama), str(tiny_checkpoints.i1),
                                  str(tiny_checkpoints.e1_1))
    pipe = models.load_pipeline(sources, DeviceManager("cpu", "bf16")).pipe
    dtypes = {name: {t.dtype for t in component.state_dict().values() if t.is_floating_point()}
              for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)}
    assert set(dtypes) >= {"transformer", "vae", "text_encoder", "text_encoder_4"}
    assert dtypes == dict.fromkeys(dtypes, {torch.bfloat16})


def test_an_fp16_pipeline_keeps_its_vae_in_fp32(tiny_checkpoints: Any) -> None:
    """On fp16 cards (Atlas 300I/310P) the VAE decode overflows into black images: it is loaded in fp32, the
    rest in fp16, and the result records the VAE's dtype for the metadata."""
    sources = models.ModelSources("e1.1", str(tiny_checkpoints.llama), str(tiny_checkpoints.i1),
                                  str(tiny_checkpoints.e1_1))
    loaded = models.load_pipeline(sources, DeviceManager("cpu", "fp16"))
    vae = {t.dtype for t in loaded.pipe.vae.state_dict().values() if t.is_floating_point()}
    transformer = {t.dtype for t in loaded.pipe.transformer.state_dict().values() if t.is_floating_point()}
    assert (vae, transformer, loaded.vae_dtype) == ({torch.float32}, {torch.float16}, "fp32")


def test_each_i1_part_missing_its_config_or_weights_is_named(tiny_checkpoints: Any, tmp_path: Path) -> None:
    import os
    import shutil

    parts = ["scheduler/scheduler_config.json", "vae/config.json", "text_encoder/config.json",
             "text_encoder_2/config.json", "text_encoder_3/config.json", "transformer/config.json"]
    weights = [str(path.relative_to(tiny_checkpoints.i1)) for path in tiny_checkpoints.i1.glob("*/*.safetensors")
               if path.parent.name != "transformer"]
    assert {name.split("/")[0] for name in weights} == {"vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    for missing in parts + weights:
        i1 = tmp_path / missing.replace("/", "-")
        shutil.copytree(tiny_checkpoints.i1, i1, copy_function=os.symlink)
        (i1 / missing).unlink()
        sources = models.ModelSources("e1.1", str(tiny_checkpoints.llama), str(i1), str(tiny_checkpoints.e1_1))
        named = missing if missing in parts else missing.split("/")[0] + "/"  # a folder without weights is named
        assert any(named in problem for problem in models.check_model_files(sources)), missing


def test_incomplete_model_directory_lists_what_is_missing(tiny_checkpoints: Any, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "E1-1"
    shutil.copytree(tiny_checkpoints.e1_1, broken)
    index = json.loads(next((broken / "transformer").glob("*.index.json")).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (broken / "transformer" / shard).unlink()
    sources = models.ModelSources("e1.1", str(tiny_checkpoints.llama), str(tiny_checkpoints.i1), str(broken))
    problems = models.check_model_files(sources)
    assert len(problems) == 1 and shard in problems[0]
    with pytest.raises(ModelFilesError, match=f"missing or incomplete: .*{shard}"):
        models.load_pipeline(sources, DeviceManager("cpu"))


def test_refine_weights_base_runs_refine_steps_on_i1_tensors(tiny_env: dict[str, str], source_png: Path) -> None:
    from hidream_edit.editor import Editor, EditorSettings

    sources = resolve_model_sources(MODELS["e1.1"], tiny=True, env=tiny_env)
    editor = Editor.load(EditorSettings(sources=sources, device="cpu", refine_weights="base"))
    switch = editor.loaded.refine_switch
    transformer = editor.loaded.pipe.transformer
    probe = "x_embedder.proj.weight"
    i1 = load_safetensors(Path(sources.i1) / "transformer")[probe]
    e1 = load_safetensors(Path(sources.edit) / "transformer")[probe]
    assert probe in switch.stash and not torch.equal(i1, e1)
    live: list[str] = []

    def trace(pipe: Any, index: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        weight = transformer.get_parameter(probe).detach()
        live.append("i1" if torch.equal(weight, i1) else "e1.1" if torch.equal(weight, e1) else "other")
        return tensors

    pipe = editor.loaded.pipe
    image = Image.open(source_png).resize((64, 48))
    pipe("x", "y", image, 3.0, 1.5, 4, torch.Generator().manual_seed(0), 0.5, callback_on_step_end=trace,
         refine_switch=switch)
    assert live == ["e1.1", "e1.1", "i1", "i1"]
    assert torch.equal(transformer.get_parameter(probe).detach(), e1) and torch.equal(switch.stash[probe], i1)


def test_device_out_of_memory_is_one_line_with_the_fix(
    tiny_env: dict[str, str], source_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hidream_edit.editor import Editor

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Editor, "edit", out_of_memory)
    argv = ["--tiny", "--image", str(source_png), "--instruction", "x", "--output", str(tmp_path / "o.png")]
    assert run_edit_cli(argv, "e1.1", env=tiny_env) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NPU out of memory" in errors[0] and "--offload model" in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_unwritable_output_is_a_user_error(
    e1_1_editor: Any, source_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    result = edit(e1_1_editor, source_png, steps=1)
    real_open = os.open

    def denied_in_tmp_path(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(path).parent == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied_in_tmp_path)
    with pytest.raises(UserError, match="cannot write .*r.png: Permission denied"):
        save_result(result, tmp_path / "r.png")
    assert list(tmp_path.iterdir()) == [source_png]


def test_e1_1_needs_only_the_i1_transformer_config_not_its_weights(tiny_checkpoints: Any, tmp_path: Path) -> None:
    """E1.1 reads its transformer weights from E1.1's folder: an I1 folder without them is complete for it
    (docs/ARCHITECTURE.md section 3.5), and only E1-Full, which runs on I1's transformer, reports them missing."""
    i1 = tmp_path / "I1-config-only"
    i1.mkdir()
    for part in tiny_checkpoints.i1.iterdir():
        if part.name != "transformer":
            (i1 / part.name).symlink_to(part)
    (i1 / "transformer").mkdir()
    (i1 / "transformer" / "config.json").symlink_to(tiny_checkpoints.i1 / "transformer" / "config.json")
    e1_1 = models.ModelSources("e1.1", str(tiny_checkpoints.llama), str(i1), str(tiny_checkpoints.e1_1))
    assert models.check_model_files(e1_1) == []
    models.sizes_on_disk(e1_1, "fp32")  # the plan reads the headers it needs and finds nothing missing
    with pytest.raises(ModelFilesError, match="I1-config-only/transformer"):  # the base refine reads I1's weights
        models.sizes_on_disk(e1_1, "fp32", refine_weights="base")
    e1_full = models.ModelSources("e1-full", str(tiny_checkpoints.llama), str(i1), str(tiny_checkpoints.e1_full))
    assert any("transformer" in problem for problem in models.check_model_files(e1_full))


def test_the_device_report_reads_memory_without_logging(e1_1_editor, caplog: pytest.LogCaptureFixture) -> None:
    """Status panels ask for it every few seconds; a log line each time would bury the server log."""
    import logging

    with caplog.at_level(logging.DEBUG):
        report = e1_1_editor.device_report()
    assert caplog.records == []
    assert report["device"] == "cpu" and report["memory"]["host_rss"] > 0


def test_the_layout_names_each_kind_of_group_a_process_edits_with(e1_1_editor, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    assert e1_1_editor.layout() is None  # alone
    everything = ["clip_l", "clip_g", "t5", "llama"]
    monkeypatch.setattr(e1_1_editor, "guidance_group", SimpleNamespace(size=2, ranks=[2, 3]))
    assert e1_1_editor.layout() == {"cfg_parallel": 2, "guidance_ranks": [2, 3], "tensor_parallel": 1,
                                    "tensor_ranks": None, "text_encoders_here": everything}
    monkeypatch.setattr(e1_1_editor, "guidance_group", None)
    monkeypatch.setattr(e1_1_editor, "tensor_group", SimpleNamespace(size=4, ranks=[0, 1, 2, 3]))
    assert e1_1_editor.layout() == {"cfg_parallel": 1, "guidance_ranks": None, "tensor_parallel": 4,
                                    "tensor_ranks": [0, 1, 2, 3], "text_encoders_here": everything}
