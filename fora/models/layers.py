"""Building blocks of the decoder: gated MLP, attention, one transformer layer (RMSNorm: rms_norm.py).

Module and parameter names mirror the Hugging Face checkpoints (`q_proj`, `input_layernorm`, ...)
so that a state dict loads with the identity key map.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fora.models.config import SLIDING, ModelConfig
from fora.models.rms_norm import RMSNorm
from fora.models.rope import apply_rope


class KVCacheLike(Protocol):
    """What attention needs of `fora.models.generation.KVCache` (not imported: it imports this module)."""

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


# `enable_gqa` arrived in torch 2.5; older versions get the kv heads repeated explicitly.
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)
_ACT = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


class MLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _ACT[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Grouped-query attention with RoPE; query head h reads kv head h // (H / K).

    Uses `F.scaled_dot_product_attention` (causal flag when no mask is needed). Attention
    soft-capping (Gemma-2) has no SDPA form, so that case computes the scores explicitly:
    softmax(tanh(q k^T * s / c) * c + mask). `impl = "eager"` forces the explicit path for every
    layer; it reproduces transformers' eager attention bit for bit (scores rounded to the compute
    dtype before the fp32 softmax), whereas SDPA kernels keep the scores in fp32.
    """

    impl: str = "sdpa"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scaling = cfg.attn_scaling
        self.layer_idx = layer_idx
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCacheLike | None = None) -> Tensor:
        """x [B, T, Hd]; cos/sin [B, 1, T, D]; mask None (plain causal) or additive [B|1, 1, T, T].

        With a `cache` the keys/values of earlier positions are read from it and this call's
        appended; `mask` is then [B|1, 1, T, past + T] and required.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if self.q_norm is not None:  # per-head norm over D, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        # Elementwise RoPE keeps the (B, T, heads, D) memory order of these transposed views, SDPA
        # writes its output in its query's order, so o_proj below reads that output without a copy.
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, past + T, D)
        groups = self.n_heads // self.n_kv
        if self.softcap is None and self.impl == "sdpa":
            gqa = {"enable_gqa": groups > 1} if _SDPA_GQA else {}
            if groups > 1 and not _SDPA_GQA:
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # (B, H, T, D)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scaling, **gqa)
        else:
            o = self._eager(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, H*D)

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        scores = (q @ k.transpose(-1, -2)) * self.scaling  # (B, H, T, T), scaled after the matmul
        if self.softcap is not None:  # Gemma-2: before the mask
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:
            T = q.shape[-2]
            mask = causal_mask(T, None, None, q.dtype, q.device)
        probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return probs @ v  # (B, H, T, D)


class DecoderLayer(nn.Module):
    """Pre-norm block. LLaMA/Qwen3: x += attn(n1(x)); x += mlp(n2(x)).
    Gemma (sandwich): x += n2(attn(n1(x))); x += n4(mlp(n3(x)))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        self.sandwich = cfg.sandwich_norm
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)  # noqa: E731
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCacheLike | None = None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


def causal_mask(T: int, window: int | None, key_mask: Tensor | None, dtype: torch.dtype,
                device: torch.device, past: int = 0) -> Tensor:
    """Additive mask [B|1, 1, T, past + T]: 0 where query i sees key j, finfo.min elsewhere.

    Queries are positions past..past+T-1 of the sequence (`past` keys come from a KV cache).
    Visible iff j <= i, and i - window < j when window is set, and key_mask[b, j] != 0.
    finfo.min (not -inf), as transformers does, so a row with no visible key (a padded query)
    softmaxes to uniform weights instead of NaN, which would leak into later layers.
    """
    i = torch.arange(past, past + T, device=device)[:, None]
    j = torch.arange(past + T, device=device)[None, :]
    visible = j <= i
    if window is not None:
        visible = visible & (j > i - window)
    visible = visible[None, None]  # (1, 1, T, T)
    if key_mask is not None:
        visible = visible & key_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    hidden = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(visible, torch.zeros((), dtype=dtype, device=device), hidden)
