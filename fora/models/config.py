"""Model configuration parsed from a Hugging Face `config.json`.

One frozen dataclass describes every supported decoder. The family differences are explicit
fields (q/k norm, sandwich norms, `1 + w` RMSNorm, embedding scale, activation, layer types,
soft-caps, RoPE parameters); the model code reads only those fields. The `architectures` entry of
`config.json` is used once, here, to pick the defaults a family's config file leaves implicit
(e.g. Gemma's `(1 + w)` norm is not written in its config.json).

Both config layouts are accepted: the legacy keys of the official files (`rope_theta`,
`rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`) and the `rope_parameters` /
`layer_types` of files re-saved by transformers 5.x. An explicit `layer_types` wins over any
pattern field.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

# Per supported architecture: the switches its config.json leaves implicit, and the class
# defaults transformers uses when a key is absent from the file.
_FAMILIES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(model_type="llama", qk_norm=False, gemma=False, head_dim=None,
                             tie=False, theta=10000.0, act_key="hidden_act"),
    "Qwen3ForCausalLM": dict(model_type="qwen3", qk_norm=True, gemma=False, head_dim=128,
                             tie=False, theta=10000.0, act_key="hidden_act"),
    "Gemma2ForCausalLM": dict(model_type="gemma2", qk_norm=False, gemma=True, head_dim=256,
                              tie=True, theta=10000.0, act_key="hidden_activation"),
    "Gemma3ForCausalLM": dict(model_type="gemma3_text", qk_norm=True, gemma=True, head_dim=256,
                              tie=True, theta=1_000_000.0, act_key="hidden_activation"),
}
SUPPORTED_ARCHITECTURES = tuple(_FAMILIES)
_MODEL_TYPES = {v["model_type"]: k for k, v in _FAMILIES.items()} | {"gemma3": "Gemma3ForCausalLM"}
_ACT_NAMES = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
              "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies for one layer type: base `theta` and optional scaling of inv_freq."""

    theta: float = 10000.0
    rope_type: str = "default"          # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0         # llama3 only
    high_freq_factor: float = 4.0        # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, theta: float) -> "RopeConfig":
        d = dict(d or {})
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"RoPE scaling type {kind!r} is not supported (supported: {ROPE_TYPES}); "
                             "use a checkpoint whose rope_scaling is null, linear or llama3")
        return cls(theta=float(d.get("rope_theta", theta)), rope_type=kind,
                   factor=float(d.get("factor", 1.0)),
                   low_freq_factor=float(d.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(d.get("high_freq_factor", 4.0)),
                   original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type != "default":
            d["factor"] = self.factor
        if self.rope_type == "llama3":
            d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                     original_max_position_embeddings=self.original_max_position_embeddings)
        return d


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs; build it with `from_dict` / `from_json`.

    Family switches:
      qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma-3).
      sandwich_norm: four norms per layer, the residual branch outputs normalised (Gemma).
      norm_offset: RMSNorm gain is `1 + w`, multiplied in fp32 then cast (Gemma); otherwise the
        normalised value is cast first, then multiplied by `w` (LLaMA/Qwen3).
      embed_scale: embeddings times sqrt(hidden_size) rounded to the compute dtype (Gemma).
      layer_types: per layer, "full_attention" or "sliding_attention" (window `sliding_window`).
      rope / rope_local: RoPE of full / sliding layers (equal except for Gemma-3).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None      # the first one when config.json lists several
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: bool = False
    sandwich_norm: bool = False
    norm_offset: bool = False
    embed_scale: bool = False
    activation: str = "silu"
    query_pre_attn_scalar: float | None = None   # attention scale = this ** -0.5 (None: head_dim)
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    architectures: tuple[str, ...] = ("LlamaForCausalLM",)
    source: dict | None = field(default=None, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                             f"{self.num_hidden_layers}; fix layer_types in config.json")
        bad = set(self.layer_types) - {FULL, SLIDING}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}; expected {FULL!r} or {SLIDING!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}; fix config.json")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported; use one of {ACTIVATIONS}")

    @property
    def attn_scaling(self) -> float:
        """Multiplier of q·k (Gemma: query_pre_attn_scalar ** -0.5, others head_dim ** -0.5)."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    # ---- parsing -------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a checkpoint folder needs the config.json "
                                    "written by transformers' save_pretrained")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Parse a transformers `config.json` dict (legacy keys or transformers-5 keys)."""
        source = copy.deepcopy(d)
        arch = _architecture(d)
        if "text_config" in d:  # multimodal Gemma-3 wrapper: only the text decoder is used
            d = {**d["text_config"]}
        fam = _FAMILIES[arch]
        for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
            if d.get(key):
                raise ValueError(f"config.json sets {key}=true, which fora does not implement; "
                                 "use a checkpoint without it")
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or fam["head_dim"] or hidden // heads
        n_layers = int(d["num_hidden_layers"])
        rope, rope_local = _parse_rope(d, fam, arch)
        act_name = d.get(fam["act_key"]) or d.get("hidden_act") or "silu"
        if act_name not in _ACT_NAMES:
            raise ValueError(f"activation {act_name!r} is not supported; expected one of {sorted(_ACT_NAMES)}")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        gemma = fam["gemma"]
        window = d.get("sliding_window", 4096 if gemma else None)
        if arch == "Qwen3ForCausalLM" and not d.get("use_sliding_window", False):
            window = None  # HF Qwen3Config drops the window unless use_sliding_window is true
        return cls(
            vocab_size=int(d["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]), num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", source.get("tie_word_embeddings",
                                                                                 fam["tie"]))),
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos_ids[0] if eos_ids else None,
            pad_token_id=d.get("pad_token_id"), eos_token_ids=eos_ids,
            qk_norm=fam["qk_norm"], sandwich_norm=gemma, norm_offset=gemma, embed_scale=gemma,
            activation=_ACT_NAMES[act_name],
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)) if gemma else None,
            layer_types=_parse_layer_types(d, arch, n_layers, window),
            sliding_window=None if window is None else int(window),
            # HF's Gemma-3 never passes the attention soft-cap to attention, even when set.
            attn_logit_softcapping=(d.get("attn_logit_softcapping", 50.0)
                                    if arch == "Gemma2ForCausalLM" else None),
            final_logit_softcapping=(d.get("final_logit_softcapping", 30.0 if arch == "Gemma2ForCausalLM"
                                           else None) if gemma else None),
            rope=rope, rope_local=rope_local,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            model_type=str(source.get("model_type", fam["model_type"])),
            architectures=tuple(source.get("architectures") or (arch,)),
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """A transformers-compatible config.json dict (the parsed file itself when there is one)."""
        if self.source is not None:
            return copy.deepcopy(self.source)
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _PLAIN_KEYS}
        d["architectures"] = list(self.architectures)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_id
        act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[self.activation]
        d["hidden_act"] = act
        if self.embed_scale:  # Gemma keys
            d["hidden_activation"] = act
            q = self.query_pre_attn_scalar  # transformers' strict config wants an int here
            d["query_pre_attn_scalar"] = int(q) if q is not None and float(q).is_integer() else q
            d["attn_logit_softcapping"] = self.attn_logit_softcapping
            d["final_logit_softcapping"] = self.final_logit_softcapping
        if self.rope_local != self.rope:
            d["rope_parameters"] = {FULL: self.rope.to_dict(), SLIDING: self.rope_local.to_dict()}
        else:
            d["rope_parameters"] = self.rope.to_dict()
        if self.model_type == "qwen3" and self.sliding_window is not None:
            d["use_sliding_window"] = True
        return d


_PLAIN_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
               "tie_word_embeddings", "bos_token_id", "pad_token_id", "sliding_window",
               "max_position_embeddings", "model_type")


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    for a in archs:
        if a in _FAMILIES:
            return a
        if a == "Gemma3ForConditionalGeneration" and "text_config" in d:
            return "Gemma3ForCausalLM"
    if not archs and d.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[d["model_type"]]
    raise ValueError(f"unsupported architecture {archs or d.get('model_type')!r}; fora supports "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)} - pick a checkpoint of one of these")


def _parse_rope(d: dict[str, Any], fam: dict[str, Any], arch: str) -> tuple[RopeConfig, RopeConfig]:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):  # Gemma-3, transformers 5
        full = RopeConfig.from_dict(params.get(FULL), fam["theta"])
        return full, RopeConfig.from_dict(params.get(SLIDING), d.get("rope_local_base_freq", 10000.0))
    if isinstance(params, dict):
        full = RopeConfig.from_dict(params, d.get("rope_theta", fam["theta"]))
    else:
        full = RopeConfig.from_dict(d.get("rope_scaling"), d.get("rope_theta", fam["theta"]))
    if arch == "Gemma3ForCausalLM":  # local layers: own base, never scaled
        return full, RopeConfig(theta=float(d.get("rope_local_base_freq", 10000.0)))
    return full, full


def _parse_layer_types(d: dict[str, Any], arch: str, n: int, window: Any) -> tuple[str, ...]:
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    if arch == "Gemma2ForCausalLM":  # layer 0 sliding, layer 1 full, alternating
        return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n))
    if arch == "Gemma3ForCausalLM":
        p = int(d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6)))
        return tuple(SLIDING if (i + 1) % p else FULL for i in range(n))
    if arch == "Qwen3ForCausalLM" and window is not None:
        first = int(d.get("max_window_layers", 28))
        return tuple(SLIDING if i >= first else FULL for i in range(n))
    return (FULL,) * n
