"""The tiny checkpoint set: real hub layout, byte-for-byte reproducible, and loadable by the real code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hidream_edit import tiny
from hidream_edit.models import lora_config
from hidream_edit.spec import E1_FULL_LORA
from hidream_edit.tiny import (
    MARKER_NAME,
    TinyCheckpoints,
    build_tiny_checkpoints,
    ensure_tiny_checkpoints,
    is_complete,
)

SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def _check_sharded(folder: Path, index_name: str) -> None:
    index = json.loads((folder / index_name).read_text())
    listed = set(index["weight_map"].values())
    on_disk = {p.name for p in folder.glob("*.safetensors")}
    assert listed == on_disk
    assert len(listed) >= 2
    counts = set()
    for name in listed:
        match = SHARD.match(name)
        assert match, name
        counts.add(int(match["n"]))
        assert (folder / name).is_file()
    assert counts == {len(listed)}


def test_paths_follow_the_hub_repo_names(tmp_path: Path) -> None:
    paths = TinyCheckpoints.at(tmp_path)
    assert paths.llama == tmp_path / "Llama-3.1-8B-Instruct"
    assert paths.i1 == tmp_path / "HiDream-I1-Full"
    assert paths.e1_1 == tmp_path / "HiDream-E1-1"
    assert paths.e1_full == tmp_path / "HiDream-E1-Full"
    assert paths.e1_full_lora == tmp_path / "HiDream-E1-Full" / E1_FULL_LORA.file


def test_layout_matches_the_real_repos(tiny_checkpoints: TinyCheckpoints) -> None:
    t = tiny_checkpoints
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (t.llama / name).is_file(), name
    _check_sharded(t.llama, "model.safetensors.index.json")
    for repo in (t.i1, t.e1_1):
        _check_sharded(repo / "transformer", "diffusion_pytorch_model.safetensors.index.json")
        _check_sharded(repo / "text_encoder_3", "model.safetensors.index.json")
        model_index = json.loads((repo / "model_index.json").read_text())
        assert model_index["_class_name"] == "HiDreamImagePipeline"
        assert model_index["text_encoder_4"] == [None, None]
        assert model_index["tokenizer_4"] == [None, None]
        assert model_index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
        assert model_index["tokenizer_3"] == ["transformers", "T5Tokenizer"]
        for component, value in model_index.items():
            if not component.startswith("_") and value[0] is not None:
                assert (repo / component).is_dir(), component
    for folder in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            assert (t.i1 / folder / name).is_file()
    assert (t.i1 / "tokenizer_3" / "spiece.model").is_file()
    assert t.e1_full_lora.is_file()
    assert [p.name for p in t.e1_full.iterdir()] == [E1_FULL_LORA.file]

    scheduler = json.loads((t.i1 / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_flow_sigmas"] is True
    assert scheduler["flow_shift"] == 3.0
    assert scheduler["prediction_type"] == "flow_prediction"
    vae = json.loads((t.i1 / "vae" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    transformer = json.loads((t.i1 / "transformer" / "config.json").read_text())
    assert transformer == json.loads((t.e1_1 / "transformer" / "config.json").read_text())
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert len(transformer["llama_layers"]) == transformer["num_layers"] + transformer["num_single_layers"]
    llama = json.loads((t.llama / "config.json").read_text())
    assert max(transformer["llama_layers"]) < llama["num_hidden_layers"]
    assert llama["rope_scaling"]["rope_type"] == "llama3"

    total = sum(len(b) for b in _files(t.root).values())
    assert total < 20_000_000


def test_same_seed_same_bytes_other_seed_differs(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    again = build_tiny_checkpoints(tmp_path / "again", seed=0)
    assert _files(again.root) == _files(tiny_checkpoints.root)

    other = _files(build_tiny_checkpoints(tmp_path / "other", seed=1).root)
    base = _files(tiny_checkpoints.root)
    assert other.keys() == base.keys()
    weights = [name for name in base if name.endswith(".safetensors")]
    assert weights and all(other[name] != base[name] for name in weights)


def test_ensure_reuses_a_complete_set_and_rebuilds_an_incomplete_one(tmp_path: Path) -> None:
    root = tmp_path / "set"
    first = ensure_tiny_checkpoints(root, seed=3)
    assert is_complete(root, seed=3)
    assert not is_complete(root, seed=4)
    before = _mtimes(root)

    assert ensure_tiny_checkpoints(root, seed=3) == first
    assert _mtimes(root) == before

    shard = next((first.i1 / "transformer").glob("*-00002-of-*.safetensors"))
    shard.unlink()
    assert not is_complete(root, seed=3)
    ensure_tiny_checkpoints(root, seed=3)
    assert shard.is_file()
    assert is_complete(root, seed=3)
    assert not list(tmp_path.glob(".set.*")), "temporary build dirs must not be left behind"


def test_build_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    keep = tmp_path / "mine.txt"
    keep.write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="exists and is not a tiny checkpoint set; refusing to replace it"):
        build_tiny_checkpoints(tmp_path, seed=0)
    assert keep.read_text() == "not a checkpoint"
    assert not (tmp_path / MARKER_NAME).exists()


def test_cli_reuses_and_reports(tiny_checkpoints: TinyCheckpoints, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoints.root, copy)
    before = _mtimes(copy)
    assert tiny.main([str(copy), "--seed", "0"]) == 0
    assert str(copy.absolute()) in capsys.readouterr().out
    assert _mtimes(copy) == before


def test_import_builds_nothing_and_reads_no_environment() -> None:
    source = Path(tiny.__file__).read_text()
    assert "os.environ" not in source and "getenv" not in source
    code = "import sys, hidream_edit.tiny; print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tokenizers_load_with_the_pipeline_classes(tiny_checkpoints: TinyCheckpoints) -> None:
    from transformers import AutoConfig, AutoTokenizer, CLIPTokenizer, T5Tokenizer

    t = tiny_checkpoints
    for folder in ("tokenizer", "tokenizer_2"):
        clip = CLIPTokenizer.from_pretrained(t.i1 / folder)
        assert clip.model_max_length == 77
        ids = clip("a cat on a sofa").input_ids
        assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
        assert clip.decode(ids, skip_special_tokens=True) == "a cat on a sofa"

    t5 = T5Tokenizer.from_pretrained(t.i1 / "tokenizer_3")
    assert t5.model_max_length == 512
    ids = t5("a cat on a sofa").input_ids
    assert ids[-1] == t5.eos_token_id
    assert t5.decode(ids, skip_special_tokens=True) == "a cat on a sofa"
    assert "<extra_id_0>" in t5.get_vocab()

    llama = AutoTokenizer.from_pretrained(t.llama)
    config = AutoConfig.from_pretrained(t.llama)
    assert len(llama) == config.vocab_size
    assert llama.bos_token == "<|begin_of_text|>" and llama.eos_token == "<|eot_id|>"
    for special in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_0|>"):
        assert llama.convert_tokens_to_ids(special) != llama.unk_token_id
    ids = llama("a cat, on a sofa!").input_ids
    assert ids[0] == llama.bos_token_id
    assert llama.decode(ids, skip_special_tokens=True) == "a cat, on a sofa!"


def test_pipeline_runs_end_to_end(tiny_checkpoints: TinyCheckpoints) -> None:
    import numpy as np
    from diffusers import HiDreamImagePipeline
    from transformers import AutoTokenizer, LlamaForCausalLM

    t = tiny_checkpoints
    tok = AutoTokenizer.from_pretrained(t.llama)
    llm = LlamaForCausalLM.from_pretrained(t.llama)
    pipe = HiDreamImagePipeline.from_pretrained(t.i1, tokenizer_4=tok, text_encoder_4=llm)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    image = pipe(
        "a cat", height=128, width=128, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    # The pipeline rescales any requested size to about 1024 x 1024 pixels (default_sample_size * 8).
    assert image.size == (1024, 1024)
    pixels = np.asarray(image, dtype=np.float32)
    assert np.isfinite(pixels).all() and pixels.std() > 0


def test_e1_1_transformer_loads_and_differs_from_i1(tiny_checkpoints: TinyCheckpoints) -> None:
    from diffusers import HiDreamImageTransformer2DModel

    edit = HiDreamImageTransformer2DModel.from_pretrained(tiny_checkpoints.e1_1, subfolder="transformer")
    base = HiDreamImageTransformer2DModel.from_pretrained(tiny_checkpoints.i1, subfolder="transformer")
    assert {k: v for k, v in edit.config.items() if k != "_name_or_path"} == {
        k: v for k, v in base.config.items() if k != "_name_or_path"
    }
    edit_sd, base_sd = edit.state_dict(), base.state_dict()
    assert edit_sd.keys() == base_sd.keys()
    floating = [k for k, v in base_sd.items() if v.is_floating_point()]
    assert floating and all(not torch.equal(edit_sd[k], base_sd[k]) for k in floating)


def _forward(model: torch.nn.Module) -> torch.Tensor:
    config = model.config
    gen = torch.Generator().manual_seed(0)
    llama_layers = max(config.llama_layers) + 1
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, config.in_channels, 8, 8, generator=gen),
            timesteps=torch.tensor([500.0]),
            encoder_hidden_states_t5=torch.randn(1, 6, config.caption_channels[0], generator=gen),
            encoder_hidden_states_llama3=torch.randn(llama_layers, 1, 6, config.caption_channels[1], generator=gen),
            pooled_embeds=torch.randn(1, config.text_emb_dim, generator=gen),
            return_dict=False,
        )[0]


def test_e1_full_lora_matches_the_adapter_names(tiny_checkpoints: TinyCheckpoints) -> None:
    from diffusers import HiDreamImageTransformer2DModel
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    t = tiny_checkpoints
    checkpoint = load_file(t.e1_full_lora)
    model = HiDreamImageTransformer2DModel.from_pretrained(t.i1, subfolder="transformer").eval()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = _forward(model)
    model.add_adapter(lora_config(E1_FULL_LORA))

    adapter_keys = {k for k in model.state_dict() if ".lora_" in k}
    lora_keys = {k for k in checkpoint if ".lora_" in k}
    assert lora_keys == adapter_keys
    assert "double_stream_blocks.0.block.attn1.to_k.lora_A.default.weight" in lora_keys
    assert "final_layer.linear.lora_B.default.weight" in lora_keys
    assert all(checkpoint[k].abs().sum() > 0 for k in lora_keys if ".lora_B." in k)

    full = {k.replace(".base_layer.", "."): v for k, v in checkpoint.items() if k not in lora_keys}  # I1's names
    assert full and all(k in base_sd and not torch.equal(v, base_sd[k]) for k, v in full.items())
    assert "double_stream_blocks.0.block.attn1.to_out.base_layer.weight" in checkpoint  # in a LoRA layer's base

    info = model.load_state_dict(checkpoint, strict=False)
    assert info.unexpected_keys == []
    assert not [k for k in info.missing_keys if ".lora_" in k]
    edited = _forward(model)
    assert not torch.allclose(edited, base_out)

    fresh = HiDreamImageTransformer2DModel.from_pretrained(t.i1, subfolder="transformer").eval()
    fresh.add_adapter(lora_config(E1_FULL_LORA))
    result = set_peft_model_state_dict(fresh, {k: checkpoint[k] for k in lora_keys})
    assert not result.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[k], checkpoint[k]) for k in lora_keys)
