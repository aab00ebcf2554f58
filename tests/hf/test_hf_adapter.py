"""fora.hf.make_fora: FoRA's adapter inside peft's lora.Linear, and the gate folded in every file.

Oracles: Eq. 1 computed by hand from the layer's A, B, g and s; peft's PeftModel.from_pretrained
and fora.load_adapter on fora's own decoder (they must compute the trained model's logits from the
file); peft's merge_and_unload; BᵀB = I read from the file.
"""
from __future__ import annotations

import math

import pytest
import torch
from hf_helpers import base_model, calibration, fora_model
from safetensors.torch import load_file

import fora
import fora.hf


def _open_gates(model, seed: int = 0) -> None:
    """Give every gate a distinct nonzero value (training would), so folding matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in fora.hf.fora_layers(model).values():
            m.lora_A["default"].gate.copy_(0.5 + torch.rand((), generator=g))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_init_is_b_orthonormal_a_normal_gate_zero_and_the_base_function(checkpoints):
    model = fora_model(checkpoints["gemma3"], r=8)
    layers = fora.hf.fora_layers(model)
    assert len(layers) == 3 * len(fora.DEFAULT_TARGETS)
    A = torch.cat([m.lora_A["default"].weight.detach().flatten() for m in layers.values()])
    assert abs(float(A.std()) - 1 / math.sqrt(8)) < 0.01 and abs(float(A.mean())) < 0.01   # N(0, 1/r)
    for m in layers.values():
        assert fora.stiefel_error(m.lora_B["default"].weight.detach()) < 1e-6   # BᵀB = I (Eq. 4)
        assert float(m.lora_A["default"].gate.detach()) == 0.0 and m.lora_A["default"].gate.requires_grad
    ids = calibration()[0]["input_ids"]
    assert torch.equal(_logits(model, ids), _logits(base_model(checkpoints["gemma3"]), ids))  # ΔW = 0


def test_forward_is_eq_1_with_the_gate(checkpoints):
    model = fora_model(checkpoints["llama"])
    _open_gates(model)
    name, layer = next(iter(fora.hf.fora_layers(model).items()))
    x = torch.randn(3, layer.in_features)
    down = layer.lora_A["default"]
    s = layer.scaling["default"]
    expected = layer.base_layer(x) + down.gate * s * (x @ down.weight.T) @ layer.lora_B["default"].weight.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_save_pretrained_folds_the_gate_and_peft_and_fora_load_the_same_logits(checkpoints, tmp_path):
    import peft

    folder = checkpoints["llama"]
    model = fora_model(folder).eval()
    _open_gates(model)
    ids = calibration()[0]["input_ids"]
    tuned = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not [k for k in tensors if "gate" in k]
    assert sorted({k.rsplit(".", 2)[-2] for k in tensors}) == ["lora_A", "lora_B"]
    for name, m in fora.hf.fora_layers(model).items():
        key = name.removeprefix("base_model.model.")
        B = tensors[f"base_model.model.{key}.lora_B.weight"]
        assert fora.stiefel_error(B) < 1e-6
        down = m.lora_A["default"]
        assert torch.equal(tensors[f"base_model.model.{key}.lora_A.weight"], down.gate.detach() * down.weight.detach())

    via_peft = peft.PeftModel.from_pretrained(base_model(folder), tmp_path / "adapter").eval()
    assert (tuned - _logits(base_model(folder), ids)).abs().max() > 1e-3   # the adapter changes the function
    torch.testing.assert_close(_logits(via_peft, ids), tuned, atol=1e-5, rtol=1e-5)
    ours = fora.load_adapter(fora.load_model(folder, dtype=torch.float32), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), tuned, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_folds_the_gate(checkpoints):
    model = fora_model(checkpoints["qwen3"]).eval()
    _open_gates(model)
    ids = calibration()[0]["input_ids"]
    tuned = _logits(model, ids)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), tuned, atol=1e-5, rtol=1e-5)


def test_loading_a_folded_state_keeps_the_function_with_the_gate_at_one(checkpoints):
    model = fora_model(checkpoints["llama"]).eval()
    _open_gates(model)
    ids = calibration()[0]["input_ids"]
    tuned = _logits(model, ids)
    folded = {k: v.clone() for k, v in model.state_dict().items()}
    assert not [k for k in folded if k.endswith(".gate")]
    model.load_state_dict(folded)
    torch.testing.assert_close(_logits(model, ids), tuned, atol=1e-5, rtol=1e-5)
    assert all(float(m.lora_A["default"].gate.detach()) == 1.0 for m in fora.hf.fora_layers(model).values())


def test_make_fora_refuses_what_it_cannot_convert(checkpoints):
    import peft

    with pytest.raises(ValueError, match="has no LoRA layers for adapter 'default'; wrap it first"):
        fora.hf.make_fora(base_model(checkpoints["llama"]))
    model = fora_model(checkpoints["llama"])
    with pytest.raises(ValueError, match="already carries FoRA's adapter; call make_fora once"):
        fora.hf.make_fora(model)
    dora = peft.get_peft_model(base_model(checkpoints["llama"]),
                               peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="uses a LoRA variant \\(DoRA\\)"):
        fora.hf.make_fora(dora)
    wide = peft.get_peft_model(base_model(checkpoints["llama"]), peft.LoraConfig(r=40, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="rank 40 > 32 at .*k_proj: B has at most 32 orthonormal columns"):
        fora.hf.make_fora(wide)


def test_seeded_draws_repeat(checkpoints):
    a, b = fora_model(checkpoints["llama"], seed=3), fora_model(checkpoints["llama"], seed=3)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
