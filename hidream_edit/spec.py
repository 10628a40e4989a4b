"""Model facts: one `ModelSpec` per HiDream editing model, looked up by name in `MODELS`.

Everything that differs between HiDream-E1.1 and HiDream-E1-Full lives here (hub ids, the files a run
needs from each repository, the edit-weights flag, `max_seq`, upstream's defaults, the resize rule,
the prompt form, the LoRA layout, the real component sizes), so the rest of the code asks the spec
instead of comparing model names. A leaf module: it imports nothing of this project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LLAMA_HUB_ID = "meta-llama/Llama-3.1-8B-Instruct"
I1_HUB_ID = "HiDream-ai/HiDream-I1-Full"

# What prompt encoding loads from the Llama repository; its `original/` folder (.pth files for Meta's
# own runtime, about 16 GB) is never used.
LLAMA_ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
)
# The parts of HiDream-I1-Full the editing pipeline loads besides the transformer.
I1_PIPELINE_PATTERNS: tuple[str, ...] = (
    "model_index.json", "scheduler/*", "vae/*", "text_encoder/*", "text_encoder_2/*", "text_encoder_3/*",
    "tokenizer/*", "tokenizer_2/*", "tokenizer_3/*",
)
I1_TRANSFORMER_CONFIG = ("transformer/config.json",)
I1_TRANSFORMER_WEIGHTS = ("transformer/*",)

# Which weights the refine stage uses: the edit weights (upstream's measured behaviour) or true I1 weights.
REFINE_WEIGHTS: tuple[str, ...] = ("edit", "base")

# Guidance branches of one denoising step: 3 in the edit stage, 2 in the refine stage, 1 without guidance;
# --cfg-parallel K shares them among K ranks, so K is at most 3.
CFG_PARALLEL_SIZES = (1, 2, 3)

MAX_PROMPT_CHARS = 2000
"""Longest instruction, negative or target description accepted; the text encoders read 128 tokens."""
# Model inputs have sides that are multiples of 16: latents are 1/8 of the image, packed in 2x2 patches.
SIDE_MULTIPLE = 16

# E1-Full's prompt form; the refine stage encodes the text after TARGET_MARKER.
INSTRUCTION_MARKER = "Editing Instruction:"
TARGET_MARKER = "Target Image Description:"


@dataclass(frozen=True)
class EditDefaults:
    """Upstream's defaults for one model."""

    negative: str
    guidance: float
    image_guidance: float
    steps: int
    refine_strength: float
    clip_cfg_norm: bool
    seed: int


@dataclass(frozen=True)
class LoraLayout:
    """A PEFT LoRA shipped as one safetensors file in the model's repository."""

    file: str
    rank: int
    alpha: int
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """Everything this project knows about one editing model."""

    name: str
    title: str
    script: str  # the entry script that edits with it (the planner prints commands that run it)
    edit_hub_id: str
    edit_flag: str
    edit_env: str
    edit_help: str
    max_seq: int
    defaults: EditDefaults
    resize: str  # "area" (about 1024x1024 pixels, aspect kept) or "square" (768x768)
    prompt_form: bool  # expects "Editing Instruction: ... Target Image Description: ..."
    lora: LoraLayout | None = None
    max_pixels: int = 1024 * 1024  # the largest model input (and decoded output), for the memory plan

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None

    def edit_allow_patterns(self) -> tuple[str, ...]:
        """What to download from the edit repository: E1.1's transformer folder or E1-Full's LoRA file."""
        return (self.lora.file,) if self.lora else I1_TRANSFORMER_WEIGHTS

    def needs_i1_transformer_weights(self, base_refine_weights: bool) -> bool:
        """E1-Full adds its LoRA to I1's transformer; E1.1 reads I1's weights only to refine with them."""
        return self.uses_lora or base_refine_weights

    def i1_allow_patterns(self, base_refine_weights: bool) -> tuple[str, ...]:
        """What to download from HiDream-I1-Full: its transformer weights only when they are loaded."""
        needs_weights = self.needs_i1_transformer_weights(base_refine_weights)
        return I1_PIPELINE_PATTERNS + (I1_TRANSFORMER_WEIGHTS if needs_weights else I1_TRANSFORMER_CONFIG)


E1_FULL_LORA = LoraLayout(
    file="HiDream-E1-Full.safetensors",
    rank=16,
    alpha=16,
    target_modules=("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t",
                    "w1", "w2", "w3", "final_layer.linear"),
)

MODELS: dict[str, ModelSpec] = {
    "e1.1": ModelSpec(
        name="e1.1",
        title="HiDream-E1.1",
        script="inference_e1_1_npu.py",
        edit_hub_id="HiDream-ai/HiDream-E1-1",
        edit_flag="--e1-path",
        edit_env="HIDREAM_E1_PATH",
        edit_help="HiDream-E1-1 dir or hub id",
        max_seq=8192,
        defaults=EditDefaults("low quality, blurry, distorted", 3.0, 1.5, 28, 0.3, True, 3),
        resize="area",
        prompt_form=False,
    ),
    "e1-full": ModelSpec(
        name="e1-full",
        title="HiDream-E1-Full",
        script="inference_npu.py",
        edit_hub_id="HiDream-ai/HiDream-E1-Full",
        edit_flag="--lora-path",
        edit_env="HIDREAM_E1_FULL_PATH",
        edit_help="HiDream-E1-Full LoRA file, dir or hub id",
        max_seq=4608,
        defaults=EditDefaults("low resolution, blur", 5.0, 4.0, 28, 0.3, True, 3),
        resize="square",
        prompt_form=True,
        lora=E1_FULL_LORA,
        max_pixels=768 * 768,
    ),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)

# Parameters of the real components, counted from the real configs (REAL_CONFIGS below) on the meta device.
REAL_PARAMETERS: dict[str, int] = {
    "transformer": 17_105_733_184,
    "llama": 8_030_261_248,  # of which lm_head 0.525 B, unused by prompt encoding
    "t5": 4_762_310_656,
    "clip_l": 123_781_632,
    "clip_g": 694_878_720,
    "vae": 83_819_683,
}

# Finer facts of the real components for the memory plan (placement.py), counted on the meta device
# from the real configs with diffusers 0.42.1 / transformers 5.24.
REAL_TRANSFORMER_LARGEST_BLOCK = 424_089_600  # one double-stream block; a single-stream block is 305_438_720
REAL_TRANSFORMER_UNBLOCKED = 32_458_304  # embedders and final layer: outside the ModuleLists group offload streams
REAL_TRANSFORMER_SPLIT = 14_041_251_840  # what --tensor-parallel splits (tensor_parallel.BLOCK_PLAN): 82% of it
REAL_E1_FULL_LORA = 129_737_728  # the LoRA adapter parameters E1-Full adds to the I1 transformer
REAL_LLAMA_LM_HEAD = 525_336_576  # also the size of the largest single tensor (embed_tokens) of the pipeline
REAL_T5_WO = 1_006_632_960  # T5's `wo` weights, which transformers keeps in fp32 when loading in fp16

# The real components' configurations, as keyword arguments of their classes (diffusers
# HiDreamImageTransformer2DModel and AutoencoderKL; transformers LlamaConfig, T5Config and CLIPTextConfig).
# Built on the meta device they give exactly REAL_PARAMETERS (the Llama without its lm_head, as loaded), which
# is what the full-size run (full_size.py) builds with random weights. Values that change no size (rope,
# norms' epsilon, token ids) are the published ones where known; they have not been checked against the
# real config files, which this project has not downloaded.
REAL_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 16, "num_single_layers": 32,
    "attention_head_dim": 128, "num_attention_heads": 20, "caption_channels": [4096, 4096], "text_emb_dim": 2048,
    "num_routed_experts": 4, "num_activated_experts": 2, "axes_dims_rope": [64, 32, 32],
    "max_resolution": [128, 128], "llama_layers": list(range(32)) + [31] * 16,
}
REAL_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
REAL_T5_CONFIG: dict[str, Any] = {
    "d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64, "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
}
REAL_CLIP_L_CONFIG: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 248, "projection_dim": 768, "hidden_act": "quick_gelu",
}
REAL_CLIP_G_CONFIG: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "max_position_embeddings": 248, "projection_dim": 1280, "hidden_act": "gelu",
}
REAL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
    "use_post_quant_conv": False, "force_upcast": True, "mid_block_add_attention": True,
}
# HiDream-I1-Full's scheduler as the tiny set writes it (UniPC on flow sigmas, shift 3.0).
I1_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0,
    "solver_order": 2, "solver_type": "bh2", "lower_order_final": True, "timestep_spacing": "linspace",
    "final_sigmas_type": "zero",
}
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "transformer": REAL_TRANSFORMER_CONFIG, "llama": REAL_LLAMA_CONFIG, "t5": REAL_T5_CONFIG,
    "clip_l": REAL_CLIP_L_CONFIG, "clip_g": REAL_CLIP_G_CONFIG, "vae": REAL_VAE_CONFIG,
}
# Where a component's tensors come from: the names the planner uses (placement.py) and the folders they
# are read from ("llama" dir, "i1" subfolder, or the edit source).
TEXT_ENCODERS: tuple[str, ...] = ("clip_l", "clip_g", "t5", "llama")
I1_COMPONENT_FOLDERS: dict[str, str] = {"vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2",
                                        "t5": "text_encoder_3"}
# Prompt encoding uses only the Llama's hidden states, so it is loaded as the base LlamaModel, without the
# lm_head (0.525 B parameters, 1 GiB in bf16); its checkpoint tensors under these prefixes are never loaded.
LLAMA_UNUSED_PREFIXES: tuple[str, ...] = ("lm_head.",)
# Tensors transformers keeps in fp32 when a model is loaded in fp16 (`_keep_in_fp32_modules`).
KEEP_FP32_IN_FP16: dict[str, tuple[str, ...]] = {"t5": (".wo.",)}

# The transformer's working set at one denoising step (docs/ARCHITECTURE.md section 5): the edit stage runs
# 3 branches, each with the image tokens (padded to max_seq) plus text tokens: 128 T5 + 128 Llama (last
# layer) + 128 Llama (per block) at max_sequence_length 128.
EDIT_BRANCHES = 3
TEXT_TOKENS = 3 * 128
TRANSFORMER_WIDTH = 2560
TRANSFORMER_HEADS = 20
TRANSFORMER_FFN_WIDTH = 6912  # SwiGLU hidden width of the MoE experts (4 x 2560 x 2/3, rounded to 256)
VAE_DECODER_WIDTH = 128  # channels of the VAE decoder's full-resolution blocks


def is_e1_full_form(text: str) -> bool:
    """Whether a prompt already reads "Editing Instruction: ... Target Image Description: ..."."""
    instruction_at = text.find(INSTRUCTION_MARKER)
    target_at = text.find(TARGET_MARKER)
    return 0 <= instruction_at < target_at


def refine_prompt_from(prompt: str) -> str | None:
    """The refine stage's prompt as upstream takes it: the text after TARGET_MARKER up to a second marker,
    stripped, "" when nothing follows (an empty prompt is encoded); None without the marker."""
    parts = prompt.split(TARGET_MARKER)
    if len(parts) < 2:
        return None
    return parts[1].strip()
