"""ModelConfig parsing of official (legacy-key) and transformers-5 config.json files.

Oracle: transformers' own config classes, which apply the same defaults and pattern rules.
"""
from __future__ import annotations

import json

import pytest
import torch

from fora.models.config import FULL, SLIDING, ModelConfig, RopeConfig
from fora.models.rope import rope_inv_freq

LLAMA31 = {  # Llama-3.1-8B config.json as published (legacy keys)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}
LLAMA2 = {  # Llama-2-7b-hf: no head_dim, no rope_theta
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2,
}
GEMMA3_1B = {  # legacy layout: pattern field, rope_local_base_freq; tie key absent
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
    "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "vocab_size": 262144,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None,
    "sliding_window": 512, "sliding_window_pattern": 6, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32768, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    "attn_logit_softcapping": None, "final_logit_softcapping": None,
}
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
    "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256, "vocab_size": 256000,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
    "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000, "rope_scaling": None, "sliding_window": None, "use_sliding_window": False,
    "max_window_layers": 28, "tie_word_embeddings": True, "hidden_act": "silu",
    "max_position_embeddings": 32768, "bos_token_id": 151643, "eos_token_id": 151643,
}


def _hf_config(d: dict):
    """transformers' config object for the same dict (the oracle for defaults and patterns)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
           "gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig}[d["model_type"]]
    return cls.from_dict({k: v for k, v in d.items() if k != "architectures"})


def _resaved(d: dict) -> dict:
    """The same config as transformers 5 writes it back (rope_parameters, layer_types)."""
    return {**_hf_config(d).to_dict(), "architectures": d["architectures"]}


@pytest.mark.parametrize("d", [LLAMA31, LLAMA2, GEMMA3_1B, GEMMA2_9B, QWEN3_06B],
                         ids=["llama31", "llama2", "gemma3", "gemma2", "qwen3"])
def test_legacy_and_resaved_configs_agree_with_transformers(d):
    hf = _hf_config(d)
    legacy, resaved = ModelConfig.from_dict(d), ModelConfig.from_dict(_resaved(d))
    assert legacy == resaved
    c = legacy
    assert c.layer_types == tuple(getattr(hf, "layer_types", None) or (FULL,) * c.num_hidden_layers)
    assert c.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert c.tie_word_embeddings == hf.tie_word_embeddings
    assert c.rms_norm_eps == hf.rms_norm_eps
    rope = hf.rope_parameters
    full = rope[FULL] if FULL in rope else rope
    assert c.rope.theta == full["rope_theta"] and c.rope.rope_type == full["rope_type"]
    if SLIDING in rope:
        assert c.rope_local.theta == rope[SLIDING]["rope_theta"]
    if c.embed_scale:  # Gemma
        assert c.query_pre_attn_scalar == hf.query_pre_attn_scalar
        assert c.final_logit_softcapping == hf.final_logit_softcapping
        assert c.sliding_window == hf.sliding_window


def test_family_switches():
    llama, qwen = ModelConfig.from_dict(LLAMA2), ModelConfig.from_dict(QWEN3_06B)
    g2, g3 = ModelConfig.from_dict(GEMMA2_9B), ModelConfig.from_dict(GEMMA3_1B)
    assert (llama.head_dim, llama.rope.theta, llama.tie_word_embeddings) == (128, 10000.0, False)
    assert llama.activation == qwen.activation == "silu" and g2.activation == g3.activation == "gelu_tanh"
    assert qwen.qk_norm and not qwen.norm_offset and qwen.sliding_window is None
    assert g2.sandwich_norm and g2.norm_offset and g2.embed_scale and not g2.qk_norm
    assert g2.tie_word_embeddings  # Gemma's class default when the key is absent
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)
    assert g2.layer_types[:2] == (SLIDING, FULL)
    assert g3.qk_norm and g3.attn_logit_softcapping is None
    assert [i for i, t in enumerate(g3.layer_types) if t == FULL] == [5, 11, 17, 23]
    assert (g3.rope.theta, g3.rope_local.theta) == (1e6, 1e4)
    assert g3.attn_scaling == 256 ** -0.5 and llama.attn_scaling == 128 ** -0.5


def test_eos_list_and_ids():
    c = ModelConfig.from_dict(LLAMA31)
    assert (c.bos_token_id, c.eos_token_id, c.eos_token_ids) == (128000, 128001, (128001, 128008, 128009))
    assert c.pad_token_id is None


def test_layer_types_beat_pattern():
    types = [SLIDING, FULL] * 13
    c = ModelConfig.from_dict({**GEMMA3_1B, "layer_types": types})
    assert c.layer_types == tuple(types)


def test_qwen3_sliding_window_follows_transformers():
    d = {**QWEN3_06B, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20}
    assert ModelConfig.from_dict(d).layer_types == tuple(_hf_config(d).layer_types)
    assert ModelConfig.from_dict(d).sliding_window == 4096


def test_multimodal_gemma3_text_config():
    d = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
         "text_config": {k: v for k, v in GEMMA3_1B.items() if k != "architectures"},
         "vision_config": {"hidden_size": 1152}}
    c, text = ModelConfig.from_dict(d), ModelConfig.from_dict(GEMMA3_1B)
    assert c.architectures == ("Gemma3ForConditionalGeneration",) and c.model_type == "gemma3"
    assert c == text.__class__(**{**{k: getattr(text, k) for k in text.__dataclass_fields__},
                                  "architectures": c.architectures, "model_type": "gemma3"})
    assert c.to_dict() == d  # written back unchanged


@pytest.mark.parametrize("d", [LLAMA31, GEMMA3_1B, GEMMA2_9B, QWEN3_06B])
def test_to_dict_round_trip(d):
    c = ModelConfig.from_dict(d)
    rebuilt = ModelConfig(**{k: getattr(c, k) for k in c.__dataclass_fields__ if k != "source"})
    out = rebuilt.to_dict()
    assert ModelConfig.from_dict(out) == c
    assert json.loads(json.dumps(out)) == out  # plain JSON
    hf = _hf_config(out)  # transformers reads it back to the same layer types
    assert tuple(getattr(hf, "layer_types", None) or c.layer_types) == c.layer_types


@pytest.mark.parametrize("rope_scaling", [
    None, {"rope_type": "linear", "factor": 8.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64}])
def test_inv_freq_matches_transformers(rope_scaling):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
              intermediate_size=128, vocab_size=128, rope_theta=500000.0, rope_scaling=rope_scaling)
    hf = transformers.LlamaConfig(**kw)
    ours = ModelConfig.from_dict({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]})
    assert torch.equal(rope_inv_freq(ours.rope, ours.head_dim), LlamaRotaryEmbedding(hf).inv_freq)


def test_gemma3_dual_inv_freq_matches_transformers():
    import transformers
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    hf = transformers.Gemma3TextConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=4,
        intermediate_size=128, vocab_size=128, rope_theta=20000.0, rope_local_base_freq=500.0,
        sliding_window_pattern=2, rope_scaling={"rope_type": "linear", "factor": 8.0})
    ours = ModelConfig.from_dict({**hf.to_dict(), "architectures": ["Gemma3ForCausalLM"]})
    rot = Gemma3RotaryEmbedding(hf)
    assert torch.equal(rope_inv_freq(ours.rope, 32), rot.full_attention_inv_freq)
    assert torch.equal(rope_inv_freq(ours.rope_local, 32), rot.sliding_attention_inv_freq)


def test_from_json_reads_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2))
    assert ModelConfig.from_json(tmp_path) == ModelConfig.from_json(tmp_path / "config.json")


# ---- errors ------------------------------------------------------------------------------

def test_unsupported_architecture_lists_supported():
    d = {**LLAMA2, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    with pytest.raises(ValueError, match="unsupported architecture.*MistralForCausalLM.*fora supports "
                                         "LlamaForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM"):
        ModelConfig.from_dict(d)


def test_unsupported_rope_type():
    with pytest.raises(ValueError, match="RoPE scaling type 'yarn' is not supported"):
        ModelConfig.from_dict({**LLAMA31, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_bias_not_supported():
    with pytest.raises(ValueError, match="attention_bias=true, which fora does not implement"):
        ModelConfig.from_dict({**QWEN3_06B, "attention_bias": True})


def test_bad_layer_types():
    with pytest.raises(ValueError, match="layer_types has 2 entries but num_hidden_layers is 26"):
        ModelConfig.from_dict({**GEMMA3_1B, "layer_types": [FULL, FULL]})
    with pytest.raises(ValueError, match="unknown layer types \\['chunked_attention'\\]"):
        ModelConfig.from_dict({**GEMMA3_1B, "layer_types": ["chunked_attention"] * 26})


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_attention_heads=32 is not a multiple of num_key_value_heads=5"):
        ModelConfig.from_dict({**LLAMA2, "num_key_value_heads": 5})


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation 'relu2' is not supported"):
        ModelConfig.from_dict({**LLAMA2, "hidden_act": "relu2"})


def test_from_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found: a checkpoint folder needs"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON.*re-download"):
        ModelConfig.from_json(tmp_path)


def test_rope_config_defaults():
    assert RopeConfig.from_dict(None, 10000.0) == RopeConfig(theta=10000.0)
    legacy = RopeConfig.from_dict({"type": "linear", "factor": 2.0}, 1e4)  # pre-4.40 key name
    assert legacy.rope_type == "linear" and legacy.factor == 2.0
