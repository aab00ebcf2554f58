"""llama.cpp itself (llama-cpp-python) runs fora's GGUF exports and gets fora's logits.

For a tiny LLaMA, Qwen3 and Gemma-3 and the real SmolLM2-135M, and for a plain LoRA, an rsLoRA and a
FIM-LoRA (per-module ranks) adapter: the next-token logits of llama.cpp with base.gguf + adapter.gguf
equal fora's with the PEFT adapter, and the merged GGUF's equal them too.

Tolerance: every file is f32 and llama.cpp's KV cache is set to f32 (its default f16 cache alone
moves the tiny models' logits by ~1e-3), so the two sides compute the same float32 function in a
different summation order (ggml's blocked dot products vs torch's GEMMs). Measured: <= 1.5e-5 on the
tiny LLaMA / Qwen3; allowed: 1e-4 * max(1, max|logit|). Gemma's tanh-GELU is read by ggml's CPU
backend from an f16 lookup table (GGML_GELU_FP16 in ggml-cpu/vec.h), which alone moves the tiny
Gemma-3's logits by ~7e-4: allowed 2e-3 * max(1, max|logit|) there. The adapters move the logits by
~1, over 100 times the tolerance (asserted too), so a dropped scale or permutation fails.

Slow (llama-cpp-python compiles llama.cpp on install): `pip install 'fora[llama]'`, then
`pytest -m slow tests/formats/test_llama_cpp.py`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_runs import VARIANTS, make_run
from tiny_models import make_tiny_checkpoint

from fora.formats.gguf_export import export_gguf
from fora.formats.loading import load_model

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytestmark = pytest.mark.slow
IDS = [2, 10, 20, 30, 40, 50, 60, 70]
GGML_F32 = 0


def llama_cpp_logits(model_path, lora_path=None, ids=IDS) -> np.ndarray:
    """Logits [T, V] of llama.cpp for `ids` (f32 KV cache, no BOS added: the ids are passed as they are)."""
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=None if lora_path is None else str(lora_path),
                          logits_all=True, n_ctx=64, n_threads=2, type_k=GGML_F32, type_v=GGML_F32, verbose=False)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


def fora_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def tolerance(ref: np.ndarray, fam: str) -> float:
    return (2e-3 if fam.startswith("gemma") else 1e-4) * max(1.0, float(np.abs(ref).max()))


def assert_same(got: np.ndarray, ref: np.ndarray, base: np.ndarray, fam: str) -> float:
    tol = tolerance(ref, fam)
    err = float(np.abs(got - ref).max())
    assert err <= tol, f"llama.cpp differs from fora by {err:.2e} (tolerance {tol:.2e})"
    assert float(np.abs(ref - base).max()) > 100 * tol  # the adapter matters at this tolerance
    return err


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_cpp")
    out = {}
    for fam in ("llama", "qwen3", "gemma3"):
        folder = make_tiny_checkpoint(root / fam, fam)
        gguf = export_gguf(folder, to="gguf", dtype="f32", out=root / f"{fam}.gguf").path
        out[fam] = (folder, gguf, fora_logits(load_model(folder, dtype=torch.float32, device="cpu")))
    return out


@pytest.mark.parametrize("fam", ["llama", "qwen3", "gemma3"])
def test_tiny_base_gguf_runs_in_llama_cpp(tiny_bases, fam):
    _, gguf, base = tiny_bases[fam]
    got = llama_cpp_logits(gguf)
    assert float(np.abs(got - base).max()) <= tolerance(base, fam)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fam", ["llama", "qwen3", "gemma3"])
def test_tiny_adapter_and_merged_gguf_equal_fora(tiny_bases, tmp_path, fam, variant):
    folder, base_gguf, base = tiny_bases[fam]
    run, model = make_run(tmp_path, folder, variant)
    ref = fora_logits(model)
    adapter = export_gguf(run, to="gguf-lora", dtype="f32").path
    assert_same(llama_cpp_logits(base_gguf, adapter), ref, base, fam)
    merged = export_gguf(run, to="merged", dtype="f32").path
    assert_same(llama_cpp_logits(merged), ref, base, fam)


def test_tiny_dora_merged_gguf_equals_fora(tiny_bases, tmp_path):
    folder, _, base = tiny_bases["llama"]
    run, model = make_run(tmp_path, folder, "dora")
    assert_same(llama_cpp_logits(export_gguf(run, to="merged", dtype="f32").path), fora_logits(model), base, "llama")


@pytest.fixture(scope="module")
def smol_base(smol_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "smollm2-f32.gguf"
    export_gguf(smol_folder, to="gguf", dtype="f32", out=out)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_smollm2_adapter_gguf_equals_fora(smol_folder, smol_base, tmp_path, variant):
    ids = [1, 504, 2821, 1546, 282, 253, 1345, 30]
    run, model = make_run(tmp_path, smol_folder, variant, layers=(3, 17))
    ref = fora_logits(model, ids)
    base = fora_logits(load_model(smol_folder, dtype=torch.float32, device="cpu"), ids)
    adapter = export_gguf(run, to="gguf-lora", dtype="f32").path
    assert_same(llama_cpp_logits(smol_base, adapter, ids), ref, base, "llama")
    if variant == "fim":  # the merged model once: a 540 MB file per export
        assert_same(llama_cpp_logits(export_gguf(run, to="merged", dtype="f32").path, ids=ids), ref, base, "llama")


@pytest.mark.parametrize("preset", ["smollm2", "gemma3"])
def test_llama_cpp_tokenizes_exported_vocabulary_as_fora(request, tmp_path, preset):
    from fora.formats.gguf_model import model_metadata
    from fora.formats.gguf_vocab import gguf_vocab
    from fora.formats.gguf_writer import gguf_architecture, write_gguf
    from fora.formats.loading import load_tokenizer
    from fora.models.config import ModelConfig

    folder = request.getfixturevalue("smol_folder" if preset == "smollm2" else "gemma_folder")
    cfg = ModelConfig.from_json(folder)
    arch = gguf_architecture({"model_type": cfg.model_type})
    path = write_gguf(tmp_path / "vocab.gguf", {"general.architecture": arch, **model_metadata(cfg, arch),
                                                **gguf_vocab(folder, arch, cfg.vocab_size)}, [])
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = load_tokenizer(folder)
    for text in ["The three primary colours are red, yellow and blue.\n  12 + 7 = 19",
                 "a  b   c\t\td    e", "Ünïcödé 😀 end", "<bos> is special"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text
    llm.close()
