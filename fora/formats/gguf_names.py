"""The one home of the Hugging Face <-> GGUF (llama.cpp) tensor-name map, shared by reader and writer.

`hf_tensor_name` reads a GGUF name as fora's (HF) name; `gguf_tensor_name` is its inverse. LLaMA's
q/k rows are stored permuted by llama.cpp (its RoPE rotates adjacent pairs, HF's rotate-half
rotates (j, j + d/2)); `permute_rows` is that permutation and `unpermute_rows` its inverse.
"""
from __future__ import annotations

import torch

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# In LLaMA/Qwen3 the norm before the MLP is HF's post_attention_layernorm; Gemma has four norms.
LLAMA_NORMS = {"ffn_norm": "post_attention_layernorm"}
GEMMA_NORMS = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
# The projections llama.cpp can carry a LoRA on: HF short name -> GGUF block tensor.
LORA_TARGETS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _block_names(arch: str) -> dict[str, str]:
    return BLOCK_NAMES | (GEMMA_NORMS if arch.startswith("gemma") else LLAMA_NORMS)


def hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    """The HF name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix != "weight":  # no supported decoder has biases (e.g. Qwen2's q/k/v biases)
        return None
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) != 3 or parts[0] != "blk":
        return None
    names = _block_names(arch)
    return f"model.layers.{parts[1]}.{names[parts[2]]}.{suffix}" if parts[2] in names else None


def gguf_tensor_name(hf_name: str, arch: str) -> str | None:
    """The GGUF name of an HF tensor (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`)."""
    stem, _, suffix = hf_name.rpartition(".")
    if suffix != "weight":
        return None
    for gguf, hf in GLOBAL_NAMES.items():
        if stem == hf:
            return f"{gguf}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    inverse = {hf: gguf for gguf, hf in _block_names(arch).items()}
    return f"blk.{parts[2]}.{inverse[parts[3]]}.{suffix}" if parts[3] in inverse else None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, rows (j, j + d/2) made adjacent for interleaved RoPE."""
    # w.reshape(n_head, 2, d/2, in).swapaxes(1, 2), as llama.cpp's converter does.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rows`: llama.cpp's q/k rows back in HF's rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
