"""Tokenizers: loading a checkpoint's `tokenizer.json`, and rebuilding one from a GGUF vocabulary.

`load_tokenizer` returns a `LoadedTokenizer` whose `encode(text)` equals transformers'
`AutoTokenizer.from_pretrained(folder)(text).input_ids`: the raw `tokenizers.Tokenizer` is called
without special tokens and BOS is prepended iff the checkpoint's HF tokenizer adds it by default.
transformers 5 takes that from the post-processor stored in tokenizer.json (TemplateProcessing with
a leading BOS: Llama, Gemma; ByteLevel / none: Qwen3, SmolLM2), even when tokenizer_config.json's
`add_bos_token` says otherwise; so does fora (with a warning on such a disagreement).

`tokenizer_from_gguf` rebuilds the tokenizer a GGUF file describes (`tokenizer.ggml.*` metadata),
following transformers' GGUF loader (`integrations/gguf/gguf_tokenizer_mapping.py`):
- "gpt2": byte-level BPE with the file's merges; the pre-tokenizer is chosen by
  `tokenizer.ggml.pre`. One deliberate difference: for "smollm" / "starcoder" / "refact" the digits
  are split one by one before the GPT-2 regex, as in the original SmolLM2 tokenizer.json and in
  llama.cpp; transformers' GGUF loader skips that step (visible on e.g. "a  12": ours
  ["a", "ĠĠ", "1", "2"], theirs ["a", "Ġ", "Ġ", "1", "2"]).
- "llama" (SentencePiece BPE): byte-fallback BPE whose merges are derived from the vocabulary
  (best score first; for Gemma the file order, since Gemma's scores do not follow its merge order).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from fora.formats.cache import damaged_fix

log = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_THEN_BYTES = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
                     "llama-v3": _LLAMA3_SPLIT}
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact")


@dataclass(frozen=True)
class LoadedTokenizer:
    """A `tokenizers.Tokenizer` with the special ids fora needs.

    bos_id: set iff the checkpoint's HF tokenizer prepends BOS by default (Gemma yes, Qwen3 no).
    pad_id: the checkpoint's pad token, else `eos_id`.
    """

    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; BOS first when `bos` and the checkpoint uses one; EOS last when `eos`."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if eos else ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def tokenizer_from_folder(folder: Path) -> LoadedTokenizer:
    """The tokenizer of a checkpoint folder (`tokenizer.json` plus the special-token files beside it)."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json (found: {', '.join(found) or 'nothing'}); fora reads the fast "
            "tokenizer file only: download it from the model's hub repo, or write it with "
            "transformers' AutoTokenizer.from_pretrained(...).save_pretrained(folder)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{file} is not a valid tokenizer.json ({e}); {damaged_fix(file, 're-download it')}") from e
    tok_cfg, special_map, config, gen = (_read_json(folder / n) for n in (
        "tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json"))

    def special(name: str) -> int | None:
        for source in (tok_cfg, special_map):
            token = _token_text(source.get(name))
            if token is not None and tok.token_to_id(token) is not None:
                return tok.token_to_id(token)
        for source in (config, gen):
            value = source.get(f"{name}_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return None

    eos, pad = special("eos_token"), special("pad_token")
    if eos is None:
        raise ValueError(f"{folder}: no EOS token in tokenizer_config.json, special_tokens_map.json, "
                         "config.json or generation_config.json; add \"eos_token\" to tokenizer_config.json")
    # transformers 5 keeps the post-processor of tokenizer.json (add_bos_token in tokenizer_config.json
    # does not rebuild it when loading a folder): BOS is whatever that post-processor puts first.
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    bos = full[0] if len(full) > len(plain) and full[1:1 + len(plain)] == plain else None
    if "add_bos_token" in tok_cfg and bool(tok_cfg["add_bos_token"]) != (bos is not None):
        log.warning("%s: tokenizer_config.json says add_bos_token=%s but tokenizer.json's post-processor "
                    "%s; following the post-processor, as transformers does", folder, tok_cfg["add_bos_token"],
                    "adds one" if bos is not None else "adds none")
    return LoadedTokenizer(tok, bos, eos, eos if pad is None else pad)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {damaged_fix(path, 're-download it')}") from e
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------- from GGUF metadata

def tokenizer_from_gguf(meta: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any], dict[str, str]]:
    """`(tokenizer, tokenizer_config, special_tokens_map)` rebuilt from GGUF `tokenizer.ggml.*` metadata."""
    kind, arch = meta.get("tokenizer.ggml.model"), str(meta.get("general.architecture", ""))
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("the GGUF file has no vocabulary (tokenizer.ggml.tokens); use a checkpoint "
                         "that ships its tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = {name: meta.get(f"tokenizer.ggml.{key}_token_id") for name, key in
           (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))}
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens)
        alphabet = set(_bytes_to_unicode().values())
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        unk = tokens[ids["unk_token"]] if ids["unk_token"] is not None else "<unk>"
        tok = (_gemma_bpe(tokens, unk) if arch.startswith("gemma")
               else _sentencepiece_bpe(tokens, meta.get("tokenizer.ggml.scores"), unk,
                                       bool(meta.get("tokenizer.ggml.add_space_prefix", True))))
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's SPM default
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    # Control tokens are special; user-defined ones (e.g. "<think>", "\n\n") are matched whole but
    # are not special. Without this they would be cut into pieces.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tok.get_vocab()
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
    names = {k: tok.id_to_token(v) if v is not None else None for k, v in ids.items()}
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tok.post_processor = _template(names["bos_token"] if add_bos else None, names["eos_token"] if add_eos else None,
                                   tok)
    special_map = {k: v for k, v in names.items() if v is not None}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
                              "add_eos_token": add_eos, "clean_up_tokenization_spaces": False, **special_map}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config, special_map


def _template(bos: str | None, eos: str | None, tok: Tokenizer) -> processors.TemplateProcessing:
    # Same templates as transformers' `update_post_processor`, so reloading there changes nothing.
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    specials = [(t, tok.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> Tokenizer:
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    # A token outside the byte alphabet is spelled in it (transformers does the same).
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    raw = meta.get("tokenizer.ggml.merges")
    if raw:
        merges = [(left, right) for left, _, right in (m.partition(" ") for m in raw)]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
        merges = _merges_from_vocab(vocab, dict(zip(vocab, scores)))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre in _SPLIT_THEN_BYTES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_THEN_BYTES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        if pre not in ("default", "gpt-2", "gpt2"):
            log.warning("GGUF pre-tokenizer %r is not known to fora; using GPT-2's split rules", pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges_from_vocab(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best-scored result first, then longer left piece first (transformers' `generate_merges`)."""
    found = []
    for token, score in scores.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                found.append((-score, -i, i - len(token), left, right))
    found.sort(key=lambda m: m[:3])  # stable: ties keep vocabulary order
    return [(m[3], m[4]) for m in found]


def _gemma_bpe(tokens: list[str], unk: str) -> Tokenizer:
    # Gemma's file spells tokens of 2+ spaces with real spaces while the model sees "▁"; and its
    # merge order is the order of the tokens in the file, not their scores.
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_vocab(vocab, {t: -float(i) for t, i in vocab.items()})
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                        dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, unk: str, prefix: bool) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = scores or [-float(i) for i in range(len(tokens))]
    merges = _merges_from_vocab(vocab, {t: float(scores[i]) for t, i in vocab.items()})
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                        dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok
