"""Tiny random Hugging Face checkpoints (vocab 128) for offline tests.

`make_tiny_checkpoint(folder, family)` writes what `save_pretrained` writes (config.json +
model.safetensors) from a transformers model with random weights and perturbed norms
(the families' documented config fields), plus a character-level tokenizer. `hf_reference(folder, dtype)` loads the
transformers model back with eager attention: the oracle for parity tests.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "llama3", "qwen3", "gemma2", "gemma3")

# the families' tensor names
_TINY: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen3": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True),
    "gemma2": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=24, sliding_window=5,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                   max_position_embeddings=256, rms_norm_eps=1e-6),
    "gemma3": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=16, sliding_window=5, sliding_window_pattern=6,
                   rope_theta=1000000.0, rope_local_base_freq=10000.0,
                   max_position_embeddings=256, rms_norm_eps=1e-6),
}

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIALS = (PAD, EOS, BOS, UNK)  # ids 0, 1, 2, 3 (Gemma's layout)


def _classes(family: str):
    import transformers as tf

    return {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM), "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
            "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[family]


def make_tiny_checkpoint(folder: str | Path, family: str, dtype: torch.dtype = torch.float32, *,
                         tokenizer: bool = True, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a tiny random checkpoint of `family` into `folder` and return the folder.

    `config_overrides` are passed to the transformers config class (e.g. `num_key_value_heads=1`,
    `tie_word_embeddings=False`, `layer_types=[...]`). Token ids: <pad>=0 <eos>=1 <bos>=2 <unk>=3.
    """
    if family not in _TINY:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_cls, model_cls = _classes(family)
    kwargs = {**_TINY[family], "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, **config_overrides}
    if "layer_types" in config_overrides:
        kwargs.pop("sliding_window_pattern", None)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    with torch.no_grad():  # random init leaves norms at ones/zeros: perturb so they matter
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        write_char_tokenizer(folder)
    return folder


def write_char_tokenizer(folder: str | Path) -> None:
    """A character-level tokenizer.json (+ tokenizer_config.json, special_tokens_map.json).

    Specials at ids 0-3, then printable ASCII and newline (100 + 4 < 128 ids). BOS is prepended by
    the post-processor, as Gemma/LLaMA tokenizers do; loadable by transformers' AutoTokenizer.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, decoders

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 95 printable + "\n"
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({c: i + len(SPECIALS) for i, c in enumerate(chars)})
    assert len(vocab) <= 128
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 2)])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **special, "add_bos_token": True, "add_eos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256,
        "clean_up_tokenization_spaces": False}, indent=2))


def hf_reference(folder: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers model of `folder` with eager attention, in eval mode (the parity oracle)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()
