"""Tiny random-weight HiDream checkpoints in the real on-disk layout.

Why: the project's loading code (sharded safetensors, index files, model_index.json, tokenizers,
the E1-Full LoRA file) must be tested without the 60 GB of real weights and without a model hub.
Everything here is built offline from a small built-in corpus and seeded random weights, so the
same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hidream_edit import tiny_tokenizers
from hidream_edit.models import lora_config
from hidream_edit.spec import E1_FULL_LORA, I1_SCHEDULER_CONFIG, ModelSpec

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_NAME = ".tiny-checkpoints.json"
# Non-LoRA tensors the E1-Full file overrides, as the real file does for a few full tensors, keyed as after
# `add_adapter`; the last three are in modules a tensor-parallel split slices (column, row, q norm).
E1_FULL_FULL_TENSOR_PREFIXES: tuple[str, ...] = (
    "x_embedder.", "t_embedder.", "double_stream_blocks.0.block.attn1.to_q.base_layer.",
    "double_stream_blocks.0.block.attn1.to_out.base_layer.", "double_stream_blocks.0.block.attn1.q_rms_norm.",
)

LLAMA_DIR = "Llama-3.1-8B-Instruct"
I1_DIR = "HiDream-I1-Full"
E1_1_DIR = "HiDream-E1-1"
E1_FULL_DIR = "HiDream-E1-Full"



# Tiny dimensions. Distinct widths per encoder so a swapped tensor fails loudly.
CLIP_PROJECTION_DIM = 16
CLIP_1 = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "hidden_act": "quick_gelu"}
CLIP_2 = {"hidden_size": 40, "intermediate_size": 80, "num_attention_heads": 4, "hidden_act": "gelu"}
CLIP_LAYERS = 2
CLIP_MAX_POSITIONS = 248  # HiDream's long CLIPs; the pipeline pads CLIP input to 128 tokens
T5_DIMS = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
LLAMA_DIMS = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 12,
}
TRANSFORMER_DIMS: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "num_routed_experts": 4,
    "num_activated_experts": 2,
    "axes_dims_rope": [8, 4, 4],
    "max_resolution": [128, 128],
    "llama_layers": [0, 1],
    "caption_channels": [T5_DIMS["d_model"], LLAMA_DIMS["hidden_size"]],
    "text_emb_dim": 2 * CLIP_PROJECTION_DIM,
}
VAE_DIMS: dict[str, Any] = {
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}
WEIGHT_PERTURBATION = 0.02
LORA_B_STD = 0.05



@dataclass(frozen=True)
class TinyCheckpoints:
    """Where each tiny stand-in for a real hub repo lives."""

    root: Path
    llama: Path
    i1: Path
    e1_1: Path
    e1_full: Path

    @property
    def e1_full_lora(self) -> Path:
        return self.e1_full / E1_FULL_LORA.file

    def edit_source(self, spec: ModelSpec) -> Path:
        """What a model's edit-weights flag points at: E1.1's repo folder, or E1-Full's LoRA file."""
        return self.e1_full_lora if spec.uses_lora else self.e1_1

    @classmethod
    def at(cls, root: Path) -> TinyCheckpoints:
        root = Path(root)
        return cls(
            root=root,
            llama=root / LLAMA_DIR,
            i1=root / I1_DIR,
            e1_1=root / E1_1_DIR,
            e1_full=root / E1_FULL_DIR,
        )


# ----------------------------------------------------------------------------------------------
# Public entry points


def build_tiny_checkpoints(root: Path, seed: int = 0) -> TinyCheckpoints:
    """Build a fresh set at `root`, replacing an older tiny set there.

    Built in a temp dir beside `root` and renamed into place, so readers never see a half-built set.
    A non-empty `root` that is not a tiny set is refused rather than deleted.
    """
    root = Path(root).absolute()
    if root.exists() and not _replaceable(root):
        raise FileExistsError(f"{root} exists and is not a tiny checkpoint set; refusing to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        _build_into(tmp, seed)
        _install(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    elapsed = time.perf_counter() - started
    logger.info("built tiny HiDream checkpoints (seed %d) at %s: %.1f MB in %.1f s", seed, root, size / 1e6, elapsed)
    return TinyCheckpoints.at(root)


def ensure_tiny_checkpoints(root: Path, seed: int = 0) -> TinyCheckpoints:
    """Reuse a complete set for this format version and seed at `root`, else build one."""
    root = Path(root).absolute()
    if is_complete(root, seed):
        logger.debug("reusing tiny checkpoints at %s", root)
        return TinyCheckpoints.at(root)
    return build_tiny_checkpoints(root, seed)


def is_complete(root: Path, seed: int) -> bool:
    """True if `root` holds every file its marker lists, at the recorded sizes, for this version and seed."""
    marker = _read_marker(Path(root))
    if marker is None or marker.get("format_version") != FORMAT_VERSION or marker.get("seed") != seed:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        path = Path(root) / rel
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Directory handling


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _replaceable(root: Path) -> bool:
    if not root.is_dir():
        return False
    return (root / MARKER_NAME).is_file() or not any(root.iterdir())


def _install(tmp: Path, root: Path) -> None:
    """Swap the finished build into place; the old set is moved aside first and deleted after."""
    old: Path | None = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex}")
        os.rename(root, old)
    os.rename(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _canonicalize_json(root: Path) -> None:
    """Rewrite every JSON file with sorted keys so bytes depend only on content."""
    for path in sorted(root.rglob("*.json")):
        tiny_tokenizers.write_json(path, json.loads(path.read_text(encoding="utf-8")))


def _write_marker(root: Path, seed: int) -> None:
    files = {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }
    tiny_tokenizers.write_json(root / MARKER_NAME, {"format_version": FORMAT_VERSION, "seed": seed, "files": files})


@contextlib.contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """Seed torch's global RNG for one component without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derive_seed(seed, name))
        yield


def _derive_seed(seed: int, name: str) -> int:
    """Independent seed per component, so changing one component leaves the others' bytes alone."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(seed, name))


def _shard_size(model: torch.nn.Module) -> int:
    """A shard limit that splits the model's weights over at least two files."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return max(1, math.ceil(total / 2.5))


# ----------------------------------------------------------------------------------------------
# The build


def _build_into(root: Path, seed: int) -> None:
    paths = TinyCheckpoints.at(root)
    with _quiet_progress_bars():
        _build_llama(paths.llama, seed)
        _build_i1(paths.i1, seed)
        _build_e1_1(paths.i1, paths.e1_1, seed)
        _build_e1_full(paths.e1_full_lora, seed)
    _canonicalize_json(root)
    _normalize_modes(root)
    _write_marker(root, seed)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide the libraries' per-shard progress bars while building, restoring the caller's setting."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    modules = [m for m in (transformers_logging, diffusers_logging) if m.is_progress_bar_enabled()]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in modules:
            module.enable_progress_bar()


def _normalize_modes(root: Path) -> None:
    """mkdtemp makes 0700 dirs and safetensors writes 0600 files; a shared test fixture wants them readable."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _build_i1(out: Path, seed: int) -> None:
    from diffusers import UniPCMultistepScheduler

    clip_vocab, clip_merges = tiny_tokenizers.clip_vocab_and_merges()
    for index, (dims, name) in enumerate(((CLIP_1, "text_encoder"), (CLIP_2, "text_encoder_2"))):
        tokenizer_dir = out / ("tokenizer" if index == 0 else "tokenizer_2")
        tiny_tokenizers.save_clip_tokenizer(tokenizer_dir, clip_vocab, clip_merges)
        _save_clip_encoder(out / name, dims, clip_vocab, seed, name)
    t5_vocab_size = tiny_tokenizers.save_t5_tokenizer(out / "tokenizer_3")
    _save_t5_encoder(out / "text_encoder_3", t5_vocab_size, seed)
    _save_vae(out / "vae", seed)
    transformer = _new_transformer(seed)
    transformer.save_pretrained(out / "transformer", max_shard_size=_shard_size(transformer))
    scheduler = UniPCMultistepScheduler(**I1_SCHEDULER_CONFIG)
    scheduler.save_pretrained(out / "scheduler")
    _write_model_index(out)


def _write_model_index(out: Path) -> None:
    import diffusers

    # Like the real repo: the Llama text encoder is not shipped, callers pass tokenizer_4/text_encoder_4.
    tiny_tokenizers.write_json(
        out / "model_index.json",
        {
            "_class_name": "HiDreamImagePipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "text_encoder_4": [None, None],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5Tokenizer"],
            "tokenizer_4": [None, None],
            "transformer": ["diffusers", "HiDreamImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


def _new_transformer(seed: int) -> Any:
    from diffusers import HiDreamImageTransformer2DModel

    with _seeded(seed, "transformer"):
        model = HiDreamImageTransformer2DModel(**TRANSFORMER_DIMS)
    return model.eval()


def _build_e1_1(i1: Path, out: Path, seed: int) -> None:
    """E1.1 ships a full diffusers repo whose transformer weights differ from I1's everywhere."""
    for item in sorted(i1.iterdir()):
        if item.name == "transformer":
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, out / item.name)
    transformer = _new_transformer(seed)
    gen = _generator(seed, "e1_1-perturbation")
    with torch.no_grad():
        for _, tensor in sorted(transformer.state_dict().items()):
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype) * WEIGHT_PERTURBATION)
    transformer.save_pretrained(out / "transformer", max_shard_size=_shard_size(transformer))


def _build_e1_full(lora_file: Path, seed: int) -> None:
    """LoRA tensors named as `add_adapter` names them, plus a few full tensors that differ from I1."""
    from safetensors.torch import save_file

    transformer = _new_transformer(seed)
    transformer.add_adapter(lora_config(E1_FULL_LORA))
    gen = _generator(seed, "e1_full-lora")
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in sorted(transformer.state_dict().items()):
        if ".lora_A." in key:
            tensors[key] = torch.randn(tensor.shape, generator=gen) / math.sqrt(tensor.shape[1])
        elif ".lora_B." in key:
            tensors[key] = torch.randn(tensor.shape, generator=gen) * LORA_B_STD
    for key, tensor in sorted(transformer.state_dict().items()):
        if ".lora_" not in key and key.startswith(E1_FULL_FULL_TENSOR_PREFIXES):
            tensors[key] = tensor + torch.randn(tensor.shape, generator=gen) * WEIGHT_PERTURBATION
    lora_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(lora_file), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# Text encoders and VAE


def _save_clip_encoder(out: Path, dims: dict[str, Any], vocab: dict[str, int], seed: int, name: str) -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        num_hidden_layers=CLIP_LAYERS,
        max_position_embeddings=CLIP_MAX_POSITIONS,
        projection_dim=CLIP_PROJECTION_DIM,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **dims,
    )
    with _seeded(seed, name):
        model = CLIPTextModelWithProjection(config)
    model.save_pretrained(out)
    _hub_style_config(out / "config.json")


def _save_t5_encoder(out: Path, tokenizer_size: int, seed: int) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=_round_up(tokenizer_size, 8),
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **T5_DIMS,
    )
    with _seeded(seed, "text_encoder_3"):
        model = T5EncoderModel(config)
    model.save_pretrained(out, max_shard_size=_shard_size(model))
    # transformers 5 always records tied embeddings for T5; the T5 v1.1 encoders on the hub are untied.
    _hub_style_config(out / "config.json", tie_word_embeddings=False, drop=("scale_decoder_outputs",))


def _save_vae(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKL

    with _seeded(seed, "vae"):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            act_fn="silu",
            sample_size=1024,
            force_upcast=True,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=True,
            **VAE_DIMS,
        )
    vae.save_pretrained(out)


def _build_llama(out: Path, seed: int) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizers.save_llama_tokenizer(out)
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tiny_tokenizers.LLAMA_MAX_LENGTH,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        **LLAMA_DIMS,
    )
    with _seeded(seed, "llama"):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, do_sample=True, temperature=0.6, top_p=0.9
    )
    model.save_pretrained(out, max_shard_size=_shard_size(model))
    _hub_style_config(out / "config.json")


def _hub_style_config(path: Path, drop: Sequence[str] = (), **overrides: Any) -> None:
    """Rewrite a transformers 5 config.json with the keys the hub files use, which every version reads.

    transformers 5 writes `dtype` and `rope_parameters`; the hub files (and transformers 4.x) use
    `torch_dtype`, `rope_theta` and `rope_scaling`, and 4.x silently ignores the new names.
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    rope = config.pop("rope_parameters", None)
    if rope:
        rope = dict(rope)
        config["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    for key in drop:
        config.pop(key, None)
    config.update(overrides)
    tiny_tokenizers.write_json(path, config)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hidream_edit.tiny",
        description="Build tiny random-weight HiDream checkpoints in the real hub layout (offline).",
    )
    parser.add_argument("outdir", type=Path, help="directory to hold the four tiny repos")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same bytes)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete set is there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.force:
            paths = build_tiny_checkpoints(args.outdir, seed=args.seed)
        else:
            paths = ensure_tiny_checkpoints(args.outdir, seed=args.seed)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tiny checkpoints (seed {args.seed}) in {paths.root}")
    for label, path in (
        ("llama", paths.llama),
        ("i1", paths.i1),
        ("e1_1", paths.e1_1),
        ("e1_full", paths.e1_full),
        ("e1_full_lora", paths.e1_full_lora),
    ):
        print(f"  {label:13s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
