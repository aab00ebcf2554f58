"""Writing GGUF v3 files (llama.cpp's format), and LoRA adapters as llama.cpp adapter GGUFs.

`write_gguf` lays out a file as gguf.md specifies: magic, version 3, tensor and key counts, the
key/value metadata, the tensor infos (dimensions innermost first, offsets relative to the data
section), then each tensor's bytes aligned to `general.alignment` (32). Tensor types: f32, f16,
bf16 and q8_0 (blocks of 32 values: one f16 scale d = max|x| / 127, 32 int8 round(x / d)); 1-D
tensors (norms) stay f32, as llama.cpp's converter keeps them. The file is streamed into a
temporary file and renamed into place (`fora.formats.atomic.atomic_open`): a failed export leaves
nothing behind.

`export_adapter_gguf` writes a PEFT LoRA adapter in the form llama.cpp's `--lora` reads (see
`adapter_gguf_tensors` for the scale folding and LLaMA's q/k row permutation). The model export is
in `fora.formats.gguf_model`.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from fora.formats.atomic import atomic_open
from fora.formats.gguf_names import LORA_TARGETS, permute_rows
from fora.formats.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, _pattern_value
from fora.models.paths import layer_index

ALIGNMENT = 32
GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # general.file_type (llama_ftype)
ADAPTER_TYPES = ("f32", "f16", "bf16")  # llama.cpp adds B A to the activations: no quantized LoRA
# HF model_type -> GGUF general.architecture
ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
_QK = 32  # values per q8_0 block

# GGUF value types (gguf.md)
_U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64 = 4, 5, 6, 7, 8, 9, 10
_NUMPY_TYPES = {np.dtype("<u1"): 0, np.dtype("<i1"): 1, np.dtype("<u2"): 2, np.dtype("<i2"): 3,
                np.dtype("<u4"): 4, np.dtype("<i4"): 5, np.dtype("<f4"): 6, np.dtype("bool"): 7,
                np.dtype("<u8"): 10, np.dtype("<i8"): 11, np.dtype("<f8"): 12}


def gguf_architecture(config: Mapping[str, Any]) -> str:
    """The GGUF `general.architecture` of an HF `config.json` dict; a one-line error when unknown."""
    model_type = str(config.get("model_type"))
    if model_type not in ARCHITECTURES:
        raise ValueError(f"the GGUF writer does not know architecture {model_type!r} "
                         f"(known: {', '.join(sorted(ARCHITECTURES))}); export a PEFT adapter instead")
    return ARCHITECTURES[model_type]


# ----------------------------------------------------------------------------- encoding

def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(v: Any) -> tuple[int, bytes]:
    """(GGUF type, encoded bytes) of a metadata value: Python int -> u32, float -> f32, numpy
    scalars and arrays keep their dtype, lists of str / bool / float / int become arrays."""
    if isinstance(v, (bool, np.bool_)):
        return _BOOL, struct.pack("<?", bool(v))
    if isinstance(v, np.generic):
        return _NUMPY_TYPES[v.dtype], v.tobytes()
    if isinstance(v, int):
        return _U32, struct.pack("<I", v)
    if isinstance(v, float):
        return _F32, struct.pack("<f", v)
    if isinstance(v, str):
        return _STRING, _string(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):  # [] too: an empty merges list
        return _ARRAY, struct.pack("<IQ", _STRING, len(v)) + b"".join(_string(x) for x in v)
    if isinstance(v, list):
        kind = bool if all(isinstance(x, bool) for x in v) else (float if any(isinstance(x, float) for x in v)
                                                                  else np.int32)
        v = np.asarray(v, dtype={bool: np.bool_, float: np.float32}.get(kind, np.int32))
    if isinstance(v, np.ndarray) and v.ndim == 1:
        return _ARRAY, struct.pack("<IQ", _NUMPY_TYPES[v.dtype], len(v)) + v.tobytes()
    raise TypeError(f"cannot store {type(v).__name__} as GGUF metadata")


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """q8_0 blocks of a float32 array whose last dimension is a multiple of 32 (uint8, 34 bytes a block)."""
    blocks = x.astype(np.float32).reshape(-1, _QK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0.0, 1.0 / d)
    q = blocks * inv
    q = (np.sign(q) * np.floor(np.abs(q) + 0.5)).astype(np.int8)  # ggml rounds half away from zero
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // _QK * (2 + _QK))


def _stored_kind(shape: tuple[int, ...], kind: str) -> str:
    # 1-D tensors (norms) stay f32; q8_0 needs rows of whole blocks, else f16 (as llama.cpp's converter)
    if len(shape) == 1:
        return "f32"
    return "f16" if kind == "q8_0" and shape[-1] % _QK else kind


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    n = math.prod(shape)
    return n // _QK * (2 + _QK) if kind == "q8_0" else n * (4 if kind == "f32" else 2)


def encode_tensor(t: torch.Tensor, kind: str) -> tuple[int, bytes]:
    """(ggml type, bytes) of `t` stored as `kind` (f32 / f16 / bf16 / q8_0; see `_stored_kind`)."""
    t = t.detach().cpu().contiguous()
    kind = _stored_kind(tuple(t.shape), kind)
    if kind == "bf16":  # numpy has no bfloat16: torch rounds (to nearest even), its bit pattern is stored
        return GGML_TYPES[kind], t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    x = t.float().numpy()
    data = quantize_q8_0(x) if kind == "q8_0" else x.astype(np.float16 if kind == "f16" else np.float32)
    return GGML_TYPES[kind], data.tobytes()


def write_gguf(path: str | os.PathLike, metadata: Mapping[str, Any],
               tensors: Iterable[tuple[str, torch.Tensor, str]]) -> Path:
    """Write a GGUF v3 file: `metadata` (key -> value, see `_value`), `tensors` as (name, tensor, kind).

    The header is laid out from the shapes alone, then each tensor is encoded and streamed in turn
    (one encoded tensor in memory at a time); the file is published atomically.
    """
    tensors = list(tensors)
    for name, t, kind in tensors:
        if kind not in GGML_TYPES:
            raise ValueError(f"tensor type {kind!r} is not supported; use one of {', '.join(GGML_TYPES)}")
    meta = {"general.alignment": ALIGNMENT, **metadata}
    header = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for key, v in meta.items():
        vtype, raw = _value(v)
        header += [_string(key), struct.pack("<I", vtype), raw]
    offset = 0
    for name, t, kind in tensors:
        shape = tuple(t.shape)
        stored = _stored_kind(shape, kind)
        dims = tuple(reversed(shape))  # GGUF lists the innermost dimension first
        header += [_string(name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, GGML_TYPES[stored], offset)]
        offset += -(-_nbytes(shape, stored) // ALIGNMENT) * ALIGNMENT
    with atomic_open(path) as f:
        _write_aligned(f, b"".join(header))
        for _, t, kind in tensors:
            _write_aligned(f, encode_tensor(t, kind)[1])
    return Path(path)


def _write_aligned(f: BinaryIO, raw: bytes) -> None:
    f.write(raw)
    f.write(b"\0" * (-len(raw) % ALIGNMENT))


# ----------------------------------------------------------------------------- LoRA adapters

def _lora_form(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return config, tensors


# peft_type -> function giving the plain-LoRA form (config with peft_type LORA, PEFT-named lora_A /
# lora_B tensors) of an adapter of that type. An adapter type with an exact plain-LoRA form (AdaLoRA:
# A and B with the singular values folded in) registers its function here.
PLAIN_LORA_FORMS: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor]],
                                     tuple[dict[str, Any], dict[str, torch.Tensor]]]] = {"LORA": _lora_form}


def read_peft_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT adapter folder, in its plain-LoRA form."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); "
                                "pass a run folder written by scripts/train.py, or --to gguf for a base model")
    config = json.loads(cfg_path.read_text())
    kind = config.get("peft_type")
    if kind not in PLAIN_LORA_FORMS:
        raise ValueError(f"{cfg_path}: peft_type {kind!r} has no plain-LoRA form llama.cpp can read "
                         f"(supported: {', '.join(PLAIN_LORA_FORMS)}); export the merged model with --to merged")
    config, tensors = PLAIN_LORA_FORMS[kind](config, load_file(weights))
    if config.get("use_dora"):
        raise ValueError(f"{cfg_path} is a DoRA adapter: llama.cpp's LoRA cannot apply DoRA's magnitude "
                         "rescaling; export the merged model instead (--to merged, as train.py --merge)")
    return config, tensors


def adapter_gguf_tensors(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                         base_config: Mapping[str, Any]) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """(adapter.lora.alpha, [(GGUF name, tensor)]) of a plain PEFT LoRA adapter, in llama.cpp's form.

    llama.cpp adds (alpha / r) B (A x) with one alpha for the file and r = the module's rank. fora's
    scale s (alpha_m / r, or alpha_m / sqrt(r) under rsLoRA, alpha_m from alpha_pattern) is met by
    writing B' = (s r / alpha) B: exact for any mix of ranks and alphas. For LLaMA, B's rows are
    permuted as llama.cpp permutes the base's q/k rows, since P (B A) = (P B) A.
    """
    arch = gguf_architecture(base_config)
    alpha = float(config["lora_alpha"])
    if alpha <= 0:
        raise ValueError(f"lora_alpha is {alpha}; llama.cpp reads alpha <= 0 as 'no scaling': "
                         "re-save the adapter with a positive lora_alpha")
    heads = {"attn_q": int(base_config["num_attention_heads"]),
             "attn_k": int(base_config.get("num_key_value_heads") or base_config["num_attention_heads"])}
    paths = sorted({k[len(PEFT_PREFIX):-len(".lora_A.weight")] for k in tensors
                    if k.startswith(PEFT_PREFIX) and k.endswith(".lora_A.weight")})
    if not paths:
        raise ValueError("the adapter holds no `base_model.model.*.lora_A.weight` tensors; is it a LoRA adapter?")
    out: list[tuple[str, torch.Tensor]] = []
    for path in paths:
        short, index = path.rsplit(".", 1)[-1], layer_index(path)
        if short not in LORA_TARGETS or index is None:
            raise ValueError(f"adapter module {path!r} has no llama.cpp LoRA counterpart (llama.cpp adapts "
                             f"{', '.join(LORA_TARGETS)} inside decoder layers); export with --to merged")
        A = tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"].float()
        B = tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"].float()
        r = A.shape[0]
        alpha_m = float(_pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"]))
        scale = alpha_m / (math.sqrt(r) if config.get("use_rslora") else r)
        B = B * (scale * r / alpha)
        name = f"blk.{index}.{LORA_TARGETS[short]}"
        if arch == "llama" and LORA_TARGETS[short] in heads:
            B = permute_rows(B, heads[LORA_TARGETS[short]])
        out += [(f"{name}.weight.lora_a", A), (f"{name}.weight.lora_b", B)]
    return alpha, out


def export_adapter_gguf(adapter_dir: str | os.PathLike, base_config: Mapping[str, Any],
                        out: str | os.PathLike, *, dtype: str = "f32", name: str | None = None) -> Path:
    """Write the LoRA adapter in `adapter_dir` as a llama.cpp adapter GGUF (`llama-cli --lora out`).

    `base_config` is the base model's config.json dict; `dtype` one of f32, f16, bf16.
    """
    if dtype not in ADAPTER_TYPES:
        raise ValueError(f"adapter tensor type {dtype!r} is not supported; use one of {', '.join(ADAPTER_TYPES)}")
    config, tensors = read_peft_adapter(adapter_dir)
    arch = gguf_architecture(base_config)
    alpha, named = adapter_gguf_tensors(config, tensors, base_config)
    meta = {"general.architecture": arch, "general.type": "adapter", "general.name": name or Path(adapter_dir).name,
            "general.file_type": FILE_TYPES[dtype], "adapter.type": "lora", "adapter.lora.alpha": alpha}
    return write_gguf(out, meta, ((n, t, dtype) for n, t in named))
