"""The HiDream attention processor with a chosen kernel, and its installer.

diffusers' HiDream transformer calls `F.scaled_dot_product_attention` directly inside
`HiDreamAttnProcessor` and ignores diffusers' attention dispatcher, so the only real way to choose the
kernel is to install our own processor on every `HiDreamAttention` module.

Adapted from: diffusers 0.42.1, `diffusers/models/transformers/transformer_hidream_image.py`,
class `HiDreamAttnProcessor` (same projections, norms, RoPE and text twins, in the same order; only the
kernel call differs). When diffusers changes that class, compare it with `HiDreamAttentionProcessor.__call__`.
The kernels themselves are device-generic and live in device_utils.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from device_utils import ATTENTION_FUNCTIONS, DeviceError, DeviceManager

logger = logging.getLogger(__name__)

HIDREAM_ATTENTION_CLASS = "HiDreamAttention"


class HiDreamAttentionProcessor:
    """HiDream's attention (q/k RMS norm, RoPE, text twin projections) with a chosen attention kernel.

    `calls` counts kernel invocations so tests and reports can prove which kernel ran.
    """

    def __init__(self, backend: str) -> None:
        if backend not in ATTENTION_FUNCTIONS:
            raise DeviceError(f"unknown attention backend {backend!r}; use one of: {', '.join(ATTENTION_FUNCTIONS)}")
        self.backend = backend
        self.calls = 0

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        hidden_states_masks: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.transformers.transformer_hidream_image import apply_rope

        dtype = hidden_states.dtype
        batch = hidden_states.shape[0]
        query = attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype)
        key = attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim)
        key = key.view(batch, -1, attn.heads, head_dim)
        value = value.view(batch, -1, attn.heads, head_dim)
        if hidden_states_masks is not None:
            key = key * hidden_states_masks.view(batch, -1, 1, 1)
        num_image_tokens = query.shape[1]
        if not attn.single:
            query_t = attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype)
            key_t = attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype)
            value_t = attn.to_v_t(encoder_hidden_states)
            query = torch.cat([query, query_t.view(batch, -1, attn.heads, head_dim)], dim=1)
            key = torch.cat([key, key_t.view(batch, -1, attn.heads, head_dim)], dim=1)
            value = torch.cat([value, value_t.view(batch, -1, attn.heads, head_dim)], dim=1)
        if query.shape[-1] == image_rotary_emb.shape[-3] * 2:
            query, key = apply_rope(query, key, image_rotary_emb)
        else:
            query_rope, query_pass = query.chunk(2, dim=-1)
            key_rope, key_pass = key.chunk(2, dim=-1)
            query_rope, key_rope = apply_rope(query_rope, key_rope, image_rotary_emb)
            query = torch.cat([query_rope, query_pass], dim=-1)
            key = torch.cat([key_rope, key_pass], dim=-1)
        self.calls += 1
        out = ATTENTION_FUNCTIONS[self.backend](query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if attn.single:
            return attn.to_out(out)
        image_part, text_part = torch.split(out, [num_image_tokens, out.shape[1] - num_image_tokens], dim=1)
        return attn.to_out(image_part), attn.to_out_t(text_part)


def install_attention(transformer: torch.nn.Module, dm: DeviceManager, backend: str | None = None) -> str:
    """Install the chosen kernel (checked against what `dm`'s device runs) on every HiDream attention module."""
    name = dm.resolve_attention_backend(backend)
    count = 0
    for module in transformer.modules():
        if type(module).__name__ == HIDREAM_ATTENTION_CLASS:
            module.set_processor(HiDreamAttentionProcessor(name))
            count += 1
    if count == 0:
        raise DeviceError(f"{type(transformer).__name__} has no HiDream attention modules to configure")
    logger.info("attention: %s on %d modules", name, count)
    return name
