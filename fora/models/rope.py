"""Rotary position embedding, HF "rotate half" convention (dimension j paired with j + D/2).

The op order matches transformers so logits agree bit for bit: inv_freq in fp32, angles in fp32,
cos/sin in fp32 then cast to the compute dtype, the rotation in the compute dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fora.models.config import RopeConfig


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """inv_freq[i] = 1 / theta^(2i / D), fp32 on the CPU, then the rope type's scaling. Shape [D/2]."""
    # Explicit device: the model may be built under `torch.device("meta")`.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponent)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, rope)
    return inv_freq


def _llama3_scaling(inv_freq: Tensor, rope: RopeConfig) -> Tensor:
    """Llama-3.1 rule: short wavelengths kept, long ones divided by `factor`, the band between blended."""
    old_len, lo, hi = rope.original_max_position_embeddings, rope.low_freq_factor, rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    base = torch.where(wavelen > old_len / lo, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * base / rope.factor + smooth * base
    in_band = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
    return torch.where(in_band, smoothed, base)


class RotaryEmbedding:
    """cos/sin tables for one RoPE configuration.

    A plain object, not an nn.Module buffer: inv_freq is never loaded from a checkpoint, is not
    moved by `model.to(dtype)` (a bf16 inv_freq changes logits) and is cached per device.
    """

    def __init__(self, rope: RopeConfig, head_dim: int):
        self.config = rope
        self.inv_freq = rope_inv_freq(rope, head_dim)
        self._on_device: dict[torch.device, Tensor] = {}

    def __call__(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids [B, T] -> (cos, sin), each [B, 1, T, D] in `dtype`."""
        inv_freq = self._on_device.get(position_ids.device)
        if inv_freq is None:
            inv_freq = self._on_device[position_ids.device] = self.inv_freq.to(position_ids.device)
        angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2), fp32
        emb = torch.cat((angles, angles), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, T, D] rotated in its own dtype: x cos + rotate_half(x) sin."""
    return x * cos + rotate_half(x) * sin
