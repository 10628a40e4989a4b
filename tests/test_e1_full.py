"""HiDream-E1-Full on the tiny set: LoRA loading, refine-stage switching, fusing, prompts and the CLI."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel
from PIL import Image
from safetensors.torch import save_file

from device_utils import load_safetensors
from hidream_edit import models
from hidream_edit.cli import build_edit_parser, run_edit_cli
from hidream_edit.config import resolve_model_sources
from hidream_edit.editor import Editor, EditorSettings, EditRequest
from hidream_edit.errors import ModelFilesError
from hidream_edit.spec import E1_FULL_LORA, MODELS

PROMPT = "Editing Instruction: make it green. Target Image Description: a green square"


def transformer_output(transformer: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    llama_dim = config.caption_channels[1]
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, config.in_channels, 8, 8, generator=generator),
            timesteps=torch.tensor([500.0]),
            encoder_hidden_states_t5=torch.randn(1, 4, config.caption_channels[0], generator=generator),
            encoder_hidden_states_llama3=torch.randn(len(config.llama_layers), 1, 4, llama_dim, generator=generator),
            pooled_embeds=torch.randn(1, config.text_emb_dim, generator=generator),
            return_dict=False,
        )[0]


def test_lora_changes_output_and_base_refine_restores_i1(e1_full_editor: Any, tiny_checkpoints: Any) -> None:
    transformer = e1_full_editor.loaded.pipe.transformer
    bare = HiDreamImageTransformer2DModel.from_pretrained(tiny_checkpoints.i1, subfolder="transformer").eval()
    edit_out = transformer_output(transformer)
    assert transformer.max_seq == 4608
    assert not torch.allclose(edit_out, transformer_output(bare), atol=1e-4)
    reference = HiDreamImageTransformer2DModel.from_pretrained(tiny_checkpoints.i1, subfolder="transformer").eval()
    reference.add_adapter(models.lora_config(E1_FULL_LORA))
    reference.load_state_dict(load_safetensors(tiny_checkpoints.e1_full_lora), strict=False)
    torch.testing.assert_close(edit_out, transformer_output(reference))  # I1 + the file's LoRA and full tensors
    switch = e1_full_editor.loaded.refine_switch
    switch.use_refine()
    try:
        torch.testing.assert_close(transformer_output(transformer), transformer_output(bare))
    finally:
        switch.use_edit()
    torch.testing.assert_close(transformer_output(transformer), edit_out)


def test_each_lora_layer_adds_its_whole_rank_16_change(tiny_checkpoints: Any) -> None:
    """E1-Full's adapter is rank 16 with alpha 16 (docs/ARCHITECTURE.md section 3.5): each layer adds B·A at
    scale 1, neither halved nor doubled, on the rank the real file's tensors have."""
    transformer, _ = models.load_e1_full_transformer(tiny_checkpoints.i1, tiny_checkpoints.e1_full_lora,
                                                     torch.float32, "edit")
    layers = lora_layers(transformer)
    assert layers and {(layer.r["default"], layer.scaling["default"]) for layer in layers} == {(16, 1.0)}
    assert {tuple(layer.lora_A["default"].weight.shape)[0] for layer in layers} == {16}


def lora_layers(transformer: Any) -> list[Any]:
    return [m for m in transformer.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]


def test_adapters_disabled_only_during_refine_steps(e1_full_editor: Any) -> None:
    transformer = e1_full_editor.loaded.pipe.transformer
    layers = lora_layers(transformer)
    states: list[bool] = []

    def trace(pipe: Any, index: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        states.append(all(layer.disable_adapters for layer in layers))
        return tensors

    pipe = e1_full_editor.loaded.pipe
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    refine = e1_full_editor.loaded.refine_switch
    pipe(PROMPT, "blur", image, 5.0, 4.0, 4, torch.Generator().manual_seed(0), 0.5, callback_on_step_end=trace,
         refine_switch=refine)
    assert layers and states == [False, False, True, True]
    assert not any(layer.disable_adapters for layer in layers)


def test_fused_and_unfused_agree_without_refine(e1_full_editor: Any, tiny_env: dict[str, str]) -> None:
    sources = resolve_model_sources(MODELS["e1-full"], tiny=True, env=tiny_env)
    fused = Editor.load(EditorSettings(sources=sources, device="cpu", fuse_lora=True))
    request = EditRequest(Image.new("RGB", (96, 64), (200, 50, 20)), PROMPT, steps=2, refine_strength=0.0)
    a = np.asarray(fused.edit(request).image, dtype=np.int16)
    b = np.asarray(e1_full_editor.edit(request).image, dtype=np.int16)
    assert a.shape == (64, 96, 3) and np.abs(a - b).max() <= 2
    assert fused.edit(request).metadata["lora_fused"] is True


def test_keep_aspect_and_output_back_at_source_size(e1_full_editor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from hidream_edit.images import resize_for_e1_full

    image = Image.new("RGB", (200, 100), (0, 255, 0))  # green outer quarters, red | blue middle
    image.paste((255, 0, 0), (50, 0, 100, 100))
    image.paste((0, 0, 255), (100, 0, 150, 100))
    inputs: list[Image.Image] = []
    pipe = e1_full_editor.loaded.pipe
    recording = lambda **kwargs: inputs.append(kwargs["image"]) or pipe(**kwargs)  # noqa: E731
    monkeypatch.setattr(e1_full_editor.loaded, "pipe", recording)
    stretched = e1_full_editor.edit(EditRequest(image, PROMPT, steps=1, refine_strength=0.0))
    kept = e1_full_editor.edit(EditRequest(image, PROMPT, steps=1, refine_strength=0.0, keep_aspect=True))
    assert stretched.image.size == kept.image.size == (200, 100)
    assert np.array_equal(np.asarray(inputs[0]), np.asarray(resize_for_e1_full(image)))
    assert np.array_equal(np.asarray(inputs[1]), np.asarray(resize_for_e1_full(image, keep_aspect=True)))
    assert stretched.metadata["model_input_size"] == [768, 768] and kept.metadata["keep_aspect"] is True
    assert kept.metadata["model_input_size"] == [1072, 528]  # 2:1 kept, about 768*768 pixels, 16-aligned


def test_keep_aspect_help_says_what_it_does() -> None:
    text = " ".join(build_edit_parser(MODELS["e1-full"]).format_help().split())
    assert "resize the whole image to about 768x768 pixels (sides multiples of 16) instead of stretching" in text


def test_bad_lora_files_name_their_keys(tiny_checkpoints: Any, tmp_path: Path) -> None:
    state = load_safetensors(tiny_checkpoints.e1_full_lora)
    extra = dict(state, **{"double_stream_blocks.0.block.attn1.to_zz.lora_A.default.weight": torch.zeros(1)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ModelFilesError, match="unexpected double_stream_blocks.0.block.attn1.to_zz"):
        models.load_e1_full_transformer(tiny_checkpoints.i1, tmp_path / "extra.safetensors", torch.float32, "edit")


def test_an_i1_transformer_that_does_not_fit_its_config_is_named(tiny_checkpoints: Any, tmp_path: Path) -> None:
    """E1-Full runs on I1's transformer weights: a file that lacks a key or has one too many is a model-files
    error naming the keys, not a stack trace from load_state_dict."""
    state = load_safetensors(tiny_checkpoints.i1 / "transformer")
    dropped = sorted(state)[0]
    i1 = tmp_path / "I1"
    (i1 / "transformer").mkdir(parents=True)
    for part in tiny_checkpoints.i1.iterdir():
        if part.name != "transformer":
            (i1 / part.name).symlink_to(part)
    (i1 / "transformer" / "config.json").symlink_to(tiny_checkpoints.i1 / "transformer" / "config.json")
    kept = {key: value for key, value in state.items() if key != dropped} | {"extra.weight": torch.zeros(1)}
    save_file(kept, str(i1 / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelFilesError, match=f"transformer does not match .*: missing {dropped}; unexpected extra"):
        models.load_e1_full_transformer(i1, tiny_checkpoints.e1_full_lora, torch.float32, "edit")


def lora_modules(state: dict[str, torch.Tensor], part: str) -> list[str]:
    """Module paths (before `.lora_A`) whose name contains `part`."""
    return sorted({k.split(".lora_A.")[0] for k in state if ".lora_A." in k and part in k})


def test_missing_lora_tensors_are_zero_and_counted(
    tiny_checkpoints: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Upstream accepts a file lacking LoRA keys; a missing A or B must mean "no LoRA here", never PEFT's random A."""
    state = load_safetensors(tiny_checkpoints.e1_full_lora)
    no_b = lora_modules(state, ".to_k.")  # lora_A present, lora_B missing
    no_a = lora_modules(state, ".to_v.")  # lora_B present, lora_A missing
    assert no_b and no_a
    dropped = {f"{m}.lora_B.default.weight" for m in no_b} | {f"{m}.lora_A.default.weight" for m in no_a}
    assert dropped <= set(state)
    save_file({k: v for k, v in state.items() if k not in dropped}, str(tmp_path / "partial.safetensors"))
    caplog.set_level("WARNING", logger="hidream_edit")
    partial, _ = models.load_e1_full_transformer(
        tiny_checkpoints.i1, tmp_path / "partial.safetensors", torch.float32, "edit"
    )
    total = sum(".lora_" in k for k in partial.state_dict())
    assert f"lacks {len(dropped)} of the {total} LoRA tensors" in caplog.text
    assert "they are set to zero, so those layers run without the LoRA" in caplog.text
    weights = partial.state_dict()
    for module in no_b:
        assert not weights[f"{module}.lora_B.default.weight"].any()
        assert torch.equal(weights[f"{module}.lora_A.default.weight"], state[f"{module}.lora_A.default.weight"])
    for module in no_a:
        assert not weights[f"{module}.lora_A.default.weight"].any()
    full, _ = models.load_e1_full_transformer(tiny_checkpoints.i1, tiny_checkpoints.e1_full_lora, torch.float32, "edit")
    with_lora = transformer_output(full)
    with torch.no_grad():  # the expected effect: exactly those layers without their LoRA change
        for module in no_b + no_a:
            full.get_parameter(f"{module}.lora_B.default.weight").zero_()
    torch.testing.assert_close(transformer_output(partial), transformer_output(full))
    assert (transformer_output(partial) - with_lora).abs().max() > 1e-4


class ChatCompletions(BaseHTTPRequestHandler):
    """A local OpenAI-compatible endpoint answering in the three-line form."""

    answer = "Source: a red square\nInstruction: paint the square green\nTarget: a green square on white"
    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatCompletions.requests.append(body)
        reply = json.dumps({"choices": [{"message": {"content": self.answer}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture()
def vlm_url() -> Any:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_cli_refines_the_instruction_with_a_vlm(vlm_url: str, tiny_env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (80, 60), (220, 0, 0)).save(source)
    output = tmp_path / "out.png"
    argv = ["--tiny", "--image", str(source), "--instruction", "make it green", "--output", str(output),
            "--steps", "1", "--rewrite-instruction", "--vlm-url", vlm_url, "--vlm-model", "test-vlm"]
    assert run_edit_cli(argv, "e1-full", env={**tiny_env, "OPENAI_API_KEY": "k"}) == 0
    metadata = json.loads(Path(f"{output}.json").read_text())
    assert metadata["instruction"] == (
        "Editing Instruction: paint the square green. Target Image Description: a green square on white"
    )
    assert ChatCompletions.requests[-1]["model"] == "test-vlm" and Image.open(output).size == (80, 60)


def test_cli_rewrite_failure_is_one_line_unless_fallback(
    tiny_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (80, 60)).save(source)
    argv = ["--tiny", "--image", str(source), "--instruction", "make it green", "--steps", "1", "--rewrite-instruction",
            "--vlm-url", f"http://127.0.0.1:{closed_port}/v1", "--vlm-model", "m", "--vlm-timeout", "1"]
    assert run_edit_cli([*argv, "--output", str(tmp_path / "a.png")], "e1-full", env=tiny_env) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{closed_port}" in err and not (tmp_path / "a.png").exists()
    argv += ["--rewrite-fallback", "--output", str(tmp_path / "b.png")]
    assert run_edit_cli(argv, "e1-full", env=tiny_env) == 0
    assert json.loads((tmp_path / "b.png.json").read_text())["instruction"] == "make it green"


def test_target_description_builds_the_form(tiny_env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (80, 60)).save(source)
    argv = ["--tiny", "--image", str(source), "--instruction", "add a hat.", "--target-description", "a cat in a hat",
            "--output", str(tmp_path / "o.webp"), "--steps", "1", "--refine-strength", "0"]
    assert run_edit_cli(argv, "e1-full", env=tiny_env) == 0
    metadata = json.loads((tmp_path / "o.webp.json").read_text())
    assert metadata["instruction"] == "Editing Instruction: add a hat. Target Image Description: a cat in a hat"
    assert (
        metadata["guidance"] == 5.0
        and metadata["image_guidance"] == 4.0
        and metadata["negative"] == "low resolution, blur"
    )


def test_bare_instruction_warns_that_e1_full_expects_the_form(
    e1_full_editor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="hidream_edit")
    result = e1_full_editor.edit(EditRequest(Image.new("RGB", (32, 32)), "add a hat", steps=1, refine_strength=0.0))
    assert "E1-Full expects 'Editing Instruction: ... Target Image Description: ...'" in caplog.text
    assert result.metadata["instruction"] == "add a hat"
    caplog.clear()
    e1_full_editor.edit(EditRequest(Image.new("RGB", (32, 32)), PROMPT, steps=1, refine_strength=0.0))
    assert "E1-Full expects" not in caplog.text
