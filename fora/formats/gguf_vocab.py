"""A checkpoint's tokenizer as GGUF `tokenizer.ggml.*` metadata (the inverse of `tokenizer_from_gguf`).

Three forms of `tokenizer.json` are written:
- byte-level BPE (SmolLM2, Qwen3, LLaMA-3) -> `tokenizer.ggml.model = "gpt2"` with the merges and the
  pre-tokenizer named as llama.cpp names it (`tokenizer.ggml.pre`: smollm, qwen2, llama-bpe, default);
- BPE with byte fallback (Gemma, LLaMA-2 SentencePiece) -> `"llama"`: tokens, scores (the merge
  rank, best first, which is the order llama.cpp's SentencePiece tokenizer merges in), token types;
- a word-level vocabulary of single ASCII characters (the tests' tiny tokenizer) -> `"gpt2"` with no
  merges: byte-level BPE without merges splits text into exactly those characters.
Token types: 1 normal, 3 control (special added tokens), 4 user-defined (other added tokens), 6 byte.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fora.formats.tokenizer import _bytes_to_unicode, tokenizer_from_folder

_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 3, 4, 5, 6


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (`tokenizer.ggml.pre`)."""
    from fora.formats.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT

    steps = (pre or {}).get("pretokenizers") or ([pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if "Digits" in kinds and any(s.get("individual_digits") for s in steps):
        return "smollm"
    for s in steps:
        regex = (s.get("pattern") or {}).get("Regex") if s.get("type") == "Split" else None
        if regex == _QWEN2_SPLIT:
            return "qwen2"
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
    return "default"


def _merge_strings(merges: list[Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def gguf_vocab(folder: str | Path, arch: str, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.ggml.*` metadata of the tokenizer in checkpoint `folder` (for GGUF `arch`).

    llama.cpp wants one token per embedding row: ids past the tokenizer's up to `vocab_size` are
    written as unused `[PADi]` tokens, as llama.cpp's converter does.
    """
    folder = Path(folder)
    loaded = tokenizer_from_folder(folder)
    raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model, tok = raw.get("model") or {}, loaded.tokenizer
    n = tok.get_vocab_size(with_added_tokens=True)
    tokens = [tok.id_to_token(i) for i in range(n)]
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise ValueError(f"{folder}/tokenizer.json has no token for ids {holes[:5]}; GGUF needs a dense "
                         "vocabulary: re-save the tokenizer")
    if n > vocab_size:
        raise ValueError(f"{folder}/tokenizer.json has {n} tokens but the model only {vocab_size} embedding "
                         "rows; the tokenizer belongs to another model")
    types = [_NORMAL] * n
    for a in raw.get("added_tokens") or []:
        types[a["id"]] = _CONTROL if a.get("special") else _USER_DEFINED
    meta: dict[str, Any] = {}
    kind = model.get("type")
    if kind == "BPE" and model.get("byte_fallback"):
        meta["tokenizer.ggml.model"] = "llama"
        ranks = {"".join(m.split(" ") if isinstance(m, str) else m): i
                 for i, m in reversed(list(enumerate(model.get("merges") or [])))}
        low = -float(len(ranks))  # tokens no merge makes (characters, bytes, specials) rank last
        scores = [-float(ranks[t]) if t in ranks else low for t in tokens]
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">") and types[i] == _NORMAL:
                types[i] = _BYTE
        if arch.startswith("gemma"):  # Gemma's file: runs of spaces spelled with spaces, matched whole
            runs = [i for i, t in enumerate(tokens) if len(t) > 1 and set(t) == {"▁"}]
            for i in runs:
                tokens[i], types[i] = " " * len(tokens[i]), _USER_DEFINED
        pre = raw.get("pre_tokenizer") or {}
        meta["tokenizer.ggml.add_space_prefix"] = pre.get("type") == "Metaspace" and \
            pre.get("prepend_scheme", "always") != "never"
        meta["tokenizer.ggml.scores"] = np.asarray(scores, dtype=np.float32)
    elif kind == "BPE":
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _pre_tokenizer_name(raw.get("pre_tokenizer"))
        meta["tokenizer.ggml.merges"] = _merge_strings(model.get("merges") or [])
    elif kind == "WordLevel" and all(len(t) == 1 and t.isascii() for i, t in enumerate(tokens)
                                     if types[i] == _NORMAL):
        spell = _bytes_to_unicode()
        tokens = [t if types[i] != _NORMAL else spell[ord(t)] for i, t in enumerate(tokens)]
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = "default"
        meta["tokenizer.ggml.merges"] = []
    else:
        raise ValueError(f"{folder}/tokenizer.json has a {kind} model, which the GGUF writer cannot express "
                         "(it writes byte-level BPE, byte-fallback BPE and single-character vocabularies)")
    pad = vocab_size - n
    meta["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(n, vocab_size)]
    meta["tokenizer.ggml.token_type"] = np.asarray(types + [_UNUSED] * pad, dtype=np.int32)
    if "tokenizer.ggml.scores" in meta:
        meta["tokenizer.ggml.scores"] = np.concatenate([meta["tokenizer.ggml.scores"],
                                                        np.full(pad, -1000.0, dtype=np.float32)])
    special = loaded
    bos = special.bos_id if special.bos_id is not None else _special_id(folder, tok, "bos_token")
    for key, value in (("bos", bos), ("eos", special.eos_id), ("padding", special.pad_id),
                       ("unknown", _special_id(folder, tok, "unk_token"))):
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(value)
    meta["tokenizer.ggml.add_bos_token"] = loaded.bos_id is not None
    meta["tokenizer.ggml.add_eos_token"] = False
    template = _read(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = template
    return meta


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _special_id(folder: Path, tok: Any, name: str) -> int | None:
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        value = _read(folder / file).get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and tok.token_to_id(value) is not None:
            return tok.token_to_id(value)
    return None
