"""A checkpoint folder as a complete GGUF model that llama.cpp runs (`llama-cli -m model.gguf`).

The inverse of `fora.formats.gguf.convert_gguf`: the metadata keys llama.cpp's converter writes for
llama / qwen3 / gemma2 / gemma3 (`<arch>.embedding_length`, `.attention.head_count_kv`, ...), the
tokenizer (`fora.formats.gguf_vocab`), and the tensors under GGUF names with llama.cpp's transforms
applied: LLaMA's q/k rows permuted for its interleaved RoPE, Gemma's norms stored as the gain 1 + w,
no `output.weight` for a tied model. Settings llama.cpp would silently read otherwise (a Gemma
attention scale other than the one it derives, LLaMA-3 RoPE scaling, a Qwen3 sliding window) are refused.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from fora.formats.gguf_names import gguf_tensor_name, permute_rows
from fora.formats.gguf_vocab import gguf_vocab
from fora.formats.gguf_writer import FILE_TYPES, GGML_TYPES, gguf_architecture, write_gguf
from fora.formats.loading import read_config
from fora.models.config import SLIDING, ModelConfig

log = logging.getLogger(__name__)

_GEMMA_27B = {("gemma2", 46), ("gemma3", 62)}  # llama.cpp's attention scale is 1/sqrt(hidden/heads) there


def model_metadata(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    """The `<arch>.*` hyper-parameter keys llama.cpp reads for `cfg`; a one-line error for what it cannot express."""
    if cfg.rope.rope_type not in ("default", "linear"):
        raise ValueError(f"RoPE scaling {cfg.rope.rope_type!r} is not supported by the GGUF writer (default and "
                         "linear are); serve this model from its safetensors checkpoint")
    meta: dict[str, Any] = {
        f"{arch}.context_length": cfg.max_position_embeddings, f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{arch}.rope.freq_base": float(cfg.rope.theta),
        f"{arch}.attention.key_length": cfg.head_dim, f"{arch}.attention.value_length": cfg.head_dim,
    }
    if cfg.rope.rope_type == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(cfg.rope.factor)
    if arch == "llama":
        meta[f"{arch}.rope.dimension_count"] = cfg.head_dim
        meta[f"{arch}.vocab_size"] = cfg.vocab_size
    if arch == "qwen3" and cfg.sliding_window is not None:
        raise ValueError("this Qwen3 config uses a sliding window, which llama.cpp's qwen3 does not apply; "
                         "export a checkpoint with use_sliding_window=false")
    if arch.startswith("gemma"):
        meta.update(_gemma_metadata(cfg, arch))
    return meta


def _gemma_metadata(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    derived = (cfg.hidden_size // cfg.num_attention_heads if (arch, cfg.num_hidden_layers) in _GEMMA_27B
               else cfg.head_dim)
    if float(cfg.query_pre_attn_scalar or cfg.head_dim) != float(derived):
        raise ValueError(f"query_pre_attn_scalar is {cfg.query_pre_attn_scalar} but llama.cpp's {arch} fixes the "
                         f"attention scale to 1/sqrt({derived}); this model cannot be served by llama.cpp")
    sliding = [t == SLIDING for t in cfg.layer_types]
    meta: dict[str, Any] = {f"{arch}.attention.sliding_window": int(cfg.sliding_window or 4096)}
    if cfg.final_logit_softcapping is not None:
        meta[f"{arch}.final_logit_softcapping"] = float(cfg.final_logit_softcapping)
    if arch == "gemma2":  # llama.cpp hard-codes Gemma-2's alternation (layer 0 sliding)
        if sliding != [i % 2 == 0 for i in range(cfg.num_hidden_layers)]:
            raise ValueError("these Gemma-2 layer_types differ from the alternating pattern llama.cpp "
                             "hard-codes (even layers sliding); this model cannot be served by llama.cpp")
        meta[f"{arch}.attn_logit_softcapping"] = float(cfg.attn_logit_softcapping or 50.0)
    else:
        if not any(sliding):  # window 0: llama.cpp then builds no sliding-window cache (else it aborts)
            meta[f"{arch}.attention.sliding_window"] = 0
        meta[f"{arch}.attention.sliding_window_pattern"] = sliding  # one bool per layer
        meta[f"{arch}.rope.freq_base_swa"] = float(cfg.rope_local.theta)
    return meta


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> list[tuple[str, torch.Tensor]]:
    """`(GGUF name, tensor)` for fora's state dict, with llama.cpp's q/k permutation and Gemma's 1 + w."""
    out = []
    for name, w in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname = gguf_tensor_name(name, arch)
        if gname is None:
            raise ValueError(f"tensor {name} has no GGUF counterpart in llama.cpp's {arch}; "
                             "this checkpoint variant cannot be exported")
        w = w.detach().float()
        if arch == "llama" and ".attn_q." in gname:
            w = permute_rows(w, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gname:
            w = permute_rows(w, cfg.num_key_value_heads)
        if arch.startswith("gemma") and gname.endswith("norm.weight"):
            w = w + 1.0  # llama.cpp multiplies by the stored gain; fora/HF store w of (1 + w)
        out.append((gname, w))
    return out


def export_model_gguf(folder: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "f16",
                      name: str | None = None) -> Path:
    """Write the checkpoint in `folder` (config.json, safetensors, tokenizer.json) as one GGUF model file.

    `dtype`: f32, f16, bf16 or q8_0 for the 2-D tensors (norms stay f32). Returns `out`.
    """
    from fora.formats.loading import load_model

    if dtype not in GGML_TYPES:
        raise ValueError(f"tensor type {dtype!r} is not supported; use one of {', '.join(GGML_TYPES)}")
    folder = Path(folder)
    cfg = read_config(folder)
    arch = gguf_architecture({"model_type": cfg.model_type})
    meta: dict[str, Any] = {"general.architecture": arch, "general.type": "model",
                            "general.name": name or folder.name, "general.file_type": FILE_TYPES[dtype]}
    meta.update(model_metadata(cfg, arch))
    meta.update(gguf_vocab(folder, arch, cfg.vocab_size))
    model = load_model(folder, dtype=torch.float32, device="cpu")
    named = gguf_tensors(model.state_dict(), cfg, arch)
    log.info("writing %s: %s, %d tensors as %s", out, arch, len(named), dtype)
    return write_gguf(out, meta, ((n, t, dtype) for n, t in named))
