"""fora.formats.tokenizer: load_tokenizer (BOS rules, special ids, errors) and tokenizers rebuilt from GGUF.

Oracles: transformers' AutoTokenizer on the same folder (what `encode` must equal), and
transformers' GGUF tokenizer builder on the same GGUF file (what `tokenizer_from_gguf` reproduces,
with two documented exceptions where fora follows the model's original tokenizer.json instead).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fora.formats import gguf as fg
from fora.formats.loading import load_tokenizer
from fora.formats.tokenizer import LoadedTokenizer, _bytes_to_unicode, tokenizer_from_gguf
from tiny_models import write_char_tokenizer

gguf = pytest.importorskip("gguf")

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "  leading spaces", "trailing  ",
         "tabs\tand\nnewlines\r\n", "numbers 12345 and 3.14159, 1,000,000", "a  12", "x\n\n5",
         "Café naïve résumé 你好，世界 😀👍🏽", "def f(x):\n    return x ** 2\n", "multiple   internal    spaces",
         "I'm sure they'll say it's fine", "Россия и Україна", "\n\n\n", " ", ""]


def _auto(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))



# ----------------------------------------------------------------------------- real checkpoints

def test_smollm2_encode_equals_transformers_on_the_folder(smol_folder):
    ours, ref = load_tokenizer(smol_folder), _auto(smol_folder)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (None, 2, 2)  # SmolLM2 adds no BOS; eos = pad = <|im_end|>
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == ref(text).input_ids, text
        assert ours.decode(ours.encode(text)) == text  # byte-level BPE is lossless
    assert ours.encode("hi", eos=True)[-1] == 2


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_tokenizer(smol_gguf, smol_folder):
    """Equal to transformers' GGUF tokenizer, except that digits are split off first (the original
    SmolLM2 tokenizer.json's `Digits(individual_digits=True)`, also llama.cpp's "smollm" rule),
    which transformers' GGUF loader skips: the tokenization of the digit-split pieces, concatenated."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)
    ours = load_tokenizer(smol_folder)
    differ = []
    for text in TEXTS:
        mine, theirs = ours.encode(text), ref(text, add_special_tokens=False).input_ids
        pieces = [p for p in re.split(r"(\d)", text) if p]
        assert mine == [i for p in pieces for i in ref(p, add_special_tokens=False).input_ids], text
        if mine != theirs:
            differ.append(text)
    assert differ == ["a  12", "x\n\n5"]  # whitespace runs before a digit: "ĠĠ" / "ĊĊ" kept whole


def test_gemma3_encode_equals_transformers_on_the_folder(gemma_folder):
    ours, ref = load_tokenizer(gemma_folder), _auto(gemma_folder)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (2, 1, 0)  # <bos>, <eos>, <pad> (ARCHITECTURES §4.4)
    for text in TEXTS + ["<start_of_turn>user\nhi<end_of_turn>"]:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        assert ids[0] == 2  # every Gemma prompt starts with <bos>
        assert ours.decode(ours.encode(text, bos=False)) == text
    assert ours.encode("<start_of_turn>user<end_of_turn>", bos=False) == [105, 2364, 106]


@pytest.mark.slow
def test_gemma3_matches_transformers_gguf_tokenizer(gemma_gguf, gemma_folder):
    """The functions AutoTokenizer.from_pretrained(..., gguf_file=...) runs, called directly."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(gemma_gguf))
    ref, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    ours = load_tokenizer(gemma_folder)
    for text in TEXTS + ["<start_of_turn>model\n<unused3>x", "\t\t  \u00a0nbsp"]:
        assert ours.encode(text, bos=False) == ref.encode(text, add_special_tokens=False).ids, text


def test_presets_and_gguf_paths_resolve(smol_gguf, smol_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_path = load_tokenizer(smol_gguf)  # a .gguf file goes through the conversion cache
    assert by_path.encode("Hello world") == load_tokenizer(smol_folder).encode("Hello world")
    assert load_tokenizer("smollm2-135m").encode("Hello world") == by_path.encode("Hello world")


# ----------------------------------------------------------------------------- BOS rules

_PLAIN = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
          "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
          "special_tokens": {}}


@pytest.mark.parametrize("variant", ["bos_template", "bos_template_config_false", "no_config_flag",
                                     "no_post_processor", "plain_template", "bos_token_null"])
def test_bos_rule_follows_transformers(tmp_path, variant):
    write_char_tokenizer(tmp_path)  # post-processor prepends <bos>; tokenizer_config add_bos_token true
    cfg_path, tok_path = tmp_path / "tokenizer_config.json", tmp_path / "tokenizer.json"
    cfg, tok = json.loads(cfg_path.read_text()), json.loads(tok_path.read_text())
    if variant == "bos_template_config_false":
        cfg["add_bos_token"] = False
    elif variant == "no_config_flag":
        del cfg["add_bos_token"], cfg["add_eos_token"]
    elif variant == "no_post_processor":
        tok["post_processor"] = None
    elif variant == "plain_template":
        tok["post_processor"] = _PLAIN
    elif variant == "bos_token_null":
        cfg["bos_token"] = None
        (tmp_path / "special_tokens_map.json").unlink()
    cfg_path.write_text(json.dumps(cfg))
    tok_path.write_text(json.dumps(tok))
    ours, ref = load_tokenizer(tmp_path), _auto(tmp_path)
    for text in ("hi there", "a\nb", ""):
        assert ours.encode(text) == ref(text).input_ids, (variant, text)
        assert ours.encode(text, bos=False) == ref(text, add_special_tokens=False).input_ids
    assert ours.bos_id == (None if variant in ("no_post_processor", "plain_template") else 2)


def test_pad_falls_back_to_eos(tmp_path):
    write_char_tokenizer(tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        d = json.loads((tmp_path / name).read_text())
        d.pop("pad_token")
        (tmp_path / name).write_text(json.dumps(d))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, LoadedTokenizer) and tok.pad_id == tok.eos_id == 1


def test_special_ids_from_config_json(tmp_path):
    write_char_tokenizer(tmp_path)
    (tmp_path / "special_tokens_map.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 5]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 1)


# ----------------------------------------------------------------------------- synthetic GGUF vocabularies

def _write_vocab_gguf(path: Path, arch: str, model: str, tokens, types, *, scores=None, merges=None,
                      pre=None, add_bos=None) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    ids = {t: i for i, t in enumerate(tokens)}
    for add, name in ((w.add_bos_token_id, ("<s>", "<bos>", "<|endoftext|>")),
                      (w.add_eos_token_id, ("</s>", "<eos>", "<|im_end|>")), (w.add_unk_token_id, ("<unk>",))):
        for n in name:
            if n in ids:
                add(ids[n])
                break
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _byte_level_vocab():
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ in", "Ġ Ġ", "ĠĠ Ġ", "Ċ Ċ", "o r", "Ġ w", "Ġw or", "l d",
              "Ġwor ld", "H e", "l l", "He ll", "Hell o"]
    tokens += ["".join(m.split(" ")) for m in merges]
    return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), merges


def _spm_vocab(gemma: bool):
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] if gemma else \
        ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "\n", "  ", "   "]
    types = [3] * len(specials) + [6] * 256 + [1, 4 if gemma else 1, 1, 1]
    words = ["t", "h", "e", "▁t", "he", "▁the", "i", "n", "in", "▁in", "w", "o", "r", "l", "d", "or", "▁w", "▁wor",
             "ld", "▁world", "a", "▁a", "H", "el", "lo", "Hel", "Hello", "▁Hello", "é", "▁é"]
    tokens += words
    types += [1] * len(words)
    scores = [0.0] * len(specials) + [0.0] * 256 + [-float(i) for i in range(len(tokens) - len(specials) - 256)]
    return tokens, types, scores


_SYNTH_TEXTS = ["Hello world", "the  in the   world", "Hello\n\nworld", "hé hé", "x\tyz 123", "", "  ",
                "<start_of_turn>the<end_of_turn>", "<|im_start|>the<|im_end|>"]


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "llama-spm", "gemma"])
def test_synthetic_vocab_matches_transformers_gguf_tokenizer(tmp_path, kind):
    from transformers import AutoTokenizer

    if kind in ("qwen2", "gpt2"):
        tokens, types, merges = _byte_level_vocab()
        path = _write_vocab_gguf(tmp_path / "t.gguf", "qwen3", "gpt2", tokens, types, merges=merges,
                                 pre="qwen2" if kind == "qwen2" else "gpt-2")
    else:
        tokens, types, scores = _spm_vocab(gemma=kind == "gemma")
        path = _write_vocab_gguf(tmp_path / "t.gguf", "gemma3" if kind == "gemma" else "llama", "llama",
                                 tokens, types, scores=scores)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    tok, config, special_map = tokenizer_from_gguf(fg.read_gguf(path).metadata)
    folder = tmp_path / "folder"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    ours, auto = load_tokenizer(folder), _auto(folder)
    for text in _SYNTH_TEXTS:
        assert ours.encode(text) == auto(text).input_ids, text
        assert ours.encode(text) == ref(text).input_ids, text
        assert ours.decode(ours.encode(text, bos=False)) == ref.decode(ref(text, add_special_tokens=False).input_ids)
    # SentencePiece vocabularies add BOS by default (llama.cpp and transformers agree); byte-level ones do not
    assert (ours.bos_id is not None) == (kind in ("llama-spm", "gemma"))


def test_qwen2_vocabulary_is_nfc_normalized(tmp_path):
    """The original Qwen2/Qwen3 tokenizer.json has an NFC normalizer; transformers' GGUF loader drops it."""
    from transformers import AutoTokenizer

    tokens, types, merges = _byte_level_vocab()
    path = _write_vocab_gguf(tmp_path / "t.gguf", "qwen3", "gpt2", tokens, types, merges=merges, pre="qwen2")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    tok, _, _ = tokenizer_from_gguf(fg.read_gguf(path).metadata)
    decomposed = "he\u0301"  # e + combining acute accent
    assert tok.encode(decomposed).ids == ref("h\u00e9", add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- errors

def test_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer.json \(found: config.json, tokenizer.model\).*"
                                                r"save_pretrained"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    write_char_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json .*re-download it"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_config(tmp_path):
    write_char_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON .*re-download it"):
        load_tokenizer(tmp_path)


def test_no_eos_anywhere(tmp_path):
    write_char_tokenizer(tmp_path)
    (tmp_path / "special_tokens_map.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    with pytest.raises(ValueError, match=r"no EOS token .*add \"eos_token\" to tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_unsupported_gguf_tokenizer_model():
    with pytest.raises(ValueError, match=r"tokenizer model 'bert' is not supported \(supported: gpt2, llama\)"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_gguf_without_vocabulary():
    with pytest.raises(ValueError, match="has no vocabulary"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2"})
