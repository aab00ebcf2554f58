"""PEFT-format adapters and merged exports, checked against peft and transformers as oracles."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.inject import inject_lora, lora_modules
from fora.formats.loading import load_model
from fora.lora import LoRALinear
from fora.formats.peft_io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TOKENIZER_FILES, adapter_config, load_adapter,
                          merge_lora_state, merged_state_dict, save_adapter, save_merged)

IDS = torch.tensor([[2, 40, 41, 42, 50, 60, 70, 9], [2, 5, 6, 7, 8, 9, 10, 11]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


@pytest.fixture(scope="module", params=["llama", "qwen3"])  # untied and tied embeddings
def ckpt(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param,
                                num_hidden_layers=4)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """A trained-looking adapter: FoRA's gets a nonzero gate and a new A (B stays orthonormal),
    the others a nonzero B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            if m.lora_gate is not None:
                m.lora_gate.fill_(0.3 + float(torch.rand((), generator=g)))
                m.lora_A.copy_(0.2 * torch.randn(m.lora_A.shape, generator=g))
            else:
                m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=g))


def _adapted(ckpt, **kw):
    model = load_model(ckpt, dtype=torch.float32, device="cpu")
    inject_lora(model, [1, 3], rank=4, seed=0,
                rank_pattern={"model.layers.3.mlp.down_proj": 2, "model.layers.1.self_attn.q_proj": 6}, **kw)
    _randomize(model)
    return model


def _wide_adapted(folder):
    model = load_model(folder, dtype=torch.float32, device="cpu")
    inject_lora(model, [1], rank=2, seed=0)
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS, attention_mask=MASK)
    return getattr(out, "logits", out)


def test_adapter_loads_in_peft_with_same_logits(ckpt, tmp_path):
    from peft import PeftModel

    model = _adapted(ckpt)
    save_adapter(model, tmp_path, base_model_name_or_path=str(ckpt))
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["layers_to_transform"] == [1, 3] and config["r"] == 4
    assert config["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 6, "model.layers.3.mlp.down_proj": 2}
    peft_model = PeftModel.from_pretrained(hf_reference(ckpt), tmp_path).eval()
    n_peft = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert n_peft == len(lora_modules(model)) == 10
    ours, theirs = _logits(model), _logits(peft_model)
    assert not torch.allclose(ours, _logits(load_model(ckpt, dtype=torch.float32, device="cpu")), atol=1e-3)
    torch.testing.assert_close(ours[MASK.bool()], theirs[MASK.bool()], atol=1e-4, rtol=1e-4)


def test_the_gate_is_folded_into_A_and_B_keeps_orthonormal_columns(ckpt, tmp_path):
    from safetensors.torch import load_file

    from fora.stiefel import stiefel_error

    model = _adapted(ckpt)
    save_adapter(model, tmp_path, base_model_name_or_path=str(ckpt))
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert not any("gate" in k for k in tensors)                      # an ordinary LoRA file
    for path, m in lora_modules(model).items():
        A = tensors[f"base_model.model.{path}.lora_A.weight"]
        B = tensors[f"base_model.model.{path}.lora_B.weight"]
        assert stiefel_error(B) < 1e-5
        torch.testing.assert_close(A, m.gate() * m.lora_A.detach(), rtol=0, atol=0)
    again = load_adapter(load_model(ckpt, dtype=torch.float32, device="cpu"), tmp_path)
    torch.testing.assert_close(_logits(again), _logits(model), rtol=1e-5, atol=1e-5)


def test_load_adapter_roundtrip_and_partial_targets(ckpt, tmp_path):
    from peft import PeftModel

    model = load_model(ckpt, dtype=torch.float32, device="cpu")
    inject_lora(model, [0], targets=("q_proj", "v_proj"), rank=3, seed=1, rslora=True)
    inject_lora(model, [2], targets=("q_proj", "up_proj"), rank=3, seed=2, rslora=True)
    _randomize(model, 1)
    save_adapter(model, tmp_path, base_model_name_or_path=str(ckpt))
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert sorted(config["exclude_modules"]) == ["model.layers.0.mlp.up_proj", "model.layers.2.self_attn.v_proj"]
    fresh = load_adapter(load_model(ckpt, dtype=torch.float32, device="cpu"), tmp_path)
    assert set(lora_modules(fresh)) == set(lora_modules(model))
    for path, m in lora_modules(model).items():
        n = lora_modules(fresh)[path]
        assert torch.equal(n.lora_A, m.gate() * m.lora_A) and torch.equal(n.lora_B, m.lora_B) and n.scale == m.scale
    torch.testing.assert_close(_logits(fresh), _logits(model), atol=1e-6, rtol=1e-6)  # g folded: (gA)x vs g(Ax)
    peft_model = PeftModel.from_pretrained(hf_reference(ckpt), tmp_path).eval()
    torch.testing.assert_close(_logits(model)[MASK.bool()], _logits(peft_model)[MASK.bool()], atol=1e-4, rtol=1e-4)


def test_alpha_pattern_matches_peft(ckpt, tmp_path):
    from peft import PeftModel

    model = _adapted(ckpt)
    path = "model.layers.3.self_attn.k_proj"
    old = model.get_submodule(path)
    new = LoRALinear(torch.nn.Linear(old.in_features, old.out_features, bias=False), 4, alpha=3.0)
    new.weight = old.weight
    with torch.no_grad():
        new.lora_A.copy_(old.lora_A)
        new.lora_B.normal_(std=0.3)
    setattr(model.get_submodule("model.layers.3.self_attn"), "k_proj", new)
    save_adapter(model, tmp_path, base_model_name_or_path=str(ckpt))
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["alpha_pattern"] == {path: 3.0}
    assert load_adapter(load_model(ckpt, dtype=torch.float32, device="cpu"), tmp_path).get_submodule(path).scale == 0.75
    peft_model = PeftModel.from_pretrained(hf_reference(ckpt), tmp_path).eval()
    torch.testing.assert_close(_logits(model)[MASK.bool()], _logits(peft_model)[MASK.bool()], atol=1e-4, rtol=1e-4)


def test_merged_export_equals_adapter(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _adapted(ckpt)
    expected = _logits(model)
    state = merged_state_dict(model)
    assert not any("lora_" in k for k in state)
    assert ("lm_head.weight" in state) == (not model.config.tie_word_embeddings)
    assert lora_modules(model) and not any(m.merged for m in lora_modules(model).values())
    save_merged(model, tmp_path / "merged", source_dir=ckpt)
    written = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors"} <= written
    assert {n for n in TOKENIZER_FILES if (ckpt / n).is_file()} <= written
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32, attn_implementation="eager")
    torch.testing.assert_close(_logits(hf.eval())[MASK.bool()], expected[MASK.bool()], atol=1e-4, rtol=1e-4)
    ours = load_model(tmp_path / "merged", dtype=torch.float32, device="cpu")
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=1e-5)


def test_merged_export_starts_from_stored_weights(ckpt, tmp_path):
    from safetensors.torch import load_file

    model = load_model(ckpt, dtype=torch.bfloat16, device="cpu")  # e.g. a bf16 training run
    inject_lora(model, [1], rank=4, seed=0)
    _randomize(model)
    save_merged(model, tmp_path / "merged", source_dir=ckpt)
    stored, merged = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert set(merged) == set(stored)
    for name, w0 in stored.items():
        path = name.removesuffix(".weight")
        if path in lora_modules(model):
            m = lora_modules(model)[path]
            assert merged[name].dtype == w0.dtype == torch.float32
            torch.testing.assert_close(merged[name], w0 + m.gate() * m.scale * (m.lora_B @ m.lora_A), atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(merged[name], w0)


def test_merge_lora_state_is_dense_formula():
    g = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((5, 7), (2, 7), (5, 2)))
    state = {"m.weight": W, "m.lora_A": A, "m.lora_B": B, "other.weight": W}
    out = merge_lora_state(state, {"m": 0.5})
    assert set(out) == {"m.weight", "other.weight"}
    torch.testing.assert_close(out["m.weight"], W + 0.5 * (B @ A))
    assert out["other.weight"] is W and state["m.weight"] is W  # input untouched


def test_merged_state_skips_already_merged_modules(ckpt):
    model = _adapted(ckpt)
    before = merged_state_dict(model)
    for m in lora_modules(model).values():
        m.merge()
    after = merged_state_dict(model)
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-6, rtol=1e-6)


def test_errors(ckpt, tmp_path):
    base = load_model(ckpt, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="no LoRA modules to save"):
        adapter_config(base, base_model_name_or_path="x")
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(base, tmp_path)
    model = _adapted(ckpt)
    save_adapter(model, tmp_path, base_model_name_or_path=str(ckpt))
    with pytest.raises(ValueError, match="already carries an adapter"):
        load_adapter(model, tmp_path)
    wrong = make_tiny_checkpoint(tmp_path / "wide", "llama", num_hidden_layers=4, hidden_size=32, tokenizer=False)
    with pytest.raises(ValueError, match="do not fit"):
        load_adapter(load_model(wrong, dtype=torch.float32, device="cpu"), tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only LoRA"):
        load_adapter(base, tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_adapter(base, tmp_path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, tmp_path / ADAPTER_WEIGHTS)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds no"):
        load_adapter(base, tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        save_merged(model, tmp_path / "m", source_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot find the base weight"):
        save_merged(_wide_adapted(wrong), tmp_path / "m", source_dir=ckpt)
