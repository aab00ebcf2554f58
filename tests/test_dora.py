"""DoRALinear against the dense DoRA formula, peft's DoRA (both directions) and its merged form.

Oracles: W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_c written out densely (row norms over d_in), with
the norm detached for the gradients (DoRA §4.3); peft 0.21 `use_dora=True`; the merged export.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.baselines.dora import DoRALinear
from fora.formats.loading import load_model
from fora.formats.peft_io import load_adapter, merged_state_dict, save_adapter, save_merged
from fora.inject import euclidean_parameters, freeze_base, inject_lora, lora_modules
from fora.lora import LoRALinear
from fora.quant.nf4 import NF4Linear

IDS = torch.tensor([[2, 40, 41, 42, 50, 60, 70, 9], [2, 5, 6, 7, 8, 9, 10, 11]])


def _dora(bias=True, d_in=48, d_out=20, seed=0) -> tuple[DoRALinear, nn.Linear]:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    ref = nn.Linear(d_in, d_out, bias=bias)
    ref.load_state_dict(base.state_dict())
    layer = DoRALinear(base, 4, 8.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(d_out) + 0.5)
    return layer, ref


def _dense(layer: DoRALinear, w0: torch.Tensor, x: torch.Tensor, b, detach_norm=True) -> torch.Tensor:
    v = w0 + layer.scale * layer.lora_B @ layer.lora_A
    norm = v.norm(dim=1)  # per output row, over the input dim
    w = layer.lora_magnitude_vector[:, None] * v / (norm.detach() if detach_norm else norm)[:, None]
    return F.linear(x, w, b)


def test_init_is_identity_and_magnitude_is_row_norm():
    torch.manual_seed(0)
    base = nn.Linear(48, 20)
    w0 = base.weight.detach().clone()
    layer = DoRALinear(base, 4, 8.0)
    assert torch.allclose(layer.lora_magnitude_vector, w0.norm(dim=1))
    x = torch.randn(3, 48)
    assert torch.allclose(layer(x), F.linear(x, w0, base.bias), atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dense_formula(bias):
    layer, ref = _dora(bias)
    x = torch.randn(2, 5, 48)
    expected = _dense(layer, ref.weight, x, ref.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_gradients_treat_the_norm_as_constant():
    layer, ref = _dora()
    x = torch.randn(6, 48)
    target = torch.randn(6, 20)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
    got = torch.autograd.grad(F.mse_loss(layer(x), target), params)
    want = torch.autograd.grad(F.mse_loss(_dense(layer, ref.weight, x, ref.bias), target), params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)
    # the detach is not vacuous: through the norm the gradient of B differs
    full = torch.autograd.grad(F.mse_loss(_dense(layer, ref.weight, x, ref.bias, detach_norm=False), target),
                               params)
    assert not torch.allclose(full[1], got[1], atol=1e-6)


def test_merge_unmerge():
    layer, ref = _dora()
    x = torch.randn(4, 48)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), before, atol=1e-5)
        assert torch.allclose(layer.weight, layer.merged_weight(ref.weight), atol=1e-6)
        layer.unmerge()
        assert torch.allclose(layer.weight, ref.weight, atol=1e-5)
        assert torch.allclose(layer(x), before, atol=1e-5)


def test_magnitude_is_trained_by_adamw():
    torch.manual_seed(0)
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Module()])
    model.model.layers[0].mlp = nn.Module()
    model.model.layers[0].mlp.up_proj = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="FoRA's gated Stiefel B.*stiefel=False"):
        inject_lora(model, [0], targets=["up_proj"], rank=2, adapter=DoRALinear)
    inject_lora(model, [0], targets=["up_proj"], rank=2, adapter=DoRALinear, stiefel=False)
    freeze_base(model)
    m = lora_modules(model)["model.layers.0.mlp.up_proj"]
    assert m.lora_magnitude_vector.requires_grad
    assert [id(p) for p in euclidean_parameters(model, factor="A")] == [id(m.lora_B), id(m.lora_magnitude_vector)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", num_hidden_layers=3)


def _trained_dora(folder, quantize=None):
    model = load_model(folder, device="cpu", quantize=quantize)
    inject_lora(model, [0, 2], rank=4, stiefel=False, seed=0, adapter=DoRALinear)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.1, generator=g)
            m.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(m.out_features, generator=g))
    return model.eval()


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


def test_peft_round_trip(tiny, tmp_path):
    from peft import PeftModel

    ours = _trained_dora(tiny)
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(tiny))
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    peft_model = PeftModel.from_pretrained(hf_reference(tiny), tmp_path / "ad").eval()
    expected = _logits(ours)
    torch.testing.assert_close(_logits(peft_model), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(load_model(tiny, device="cpu")), expected, atol=1e-3)
    # and back: peft's own save loads into fora with the same outputs
    peft_model.save_pretrained(tmp_path / "peft")
    back = load_adapter(load_model(tiny, device="cpu"), tmp_path / "peft")
    assert all(isinstance(m, DoRALinear) for m in lora_modules(back).values())
    torch.testing.assert_close(_logits(back), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merged_dora_equals_adapter_output(tiny, tmp_path, quantize):
    model = _trained_dora(tiny, quantize)
    save_merged(model, tmp_path / "merged", source_dir=tiny)
    merged = load_model(tmp_path / "merged", device="cpu")
    torch.testing.assert_close(_logits(merged), _logits(model), atol=1e-5, rtol=1e-5)


def test_qdora_equals_dora_on_dequantized_twin(tiny):
    q = _trained_dora(tiny, "nf4")
    assert all(isinstance(m.base_layer, NF4Linear) for m in lora_modules(q).values())
    twin = load_model(tiny, device="cpu")
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, NF4Linear):
                twin.get_submodule(name.removesuffix(".base_layer")).weight.copy_(m.dequantized_weight())
    inject_lora(twin, [0, 2], rank=4, stiefel=False, seed=0, adapter=DoRALinear)
    with torch.no_grad():
        for a, b in zip(lora_modules(q).values(), lora_modules(twin).values()):
            b.lora_B.copy_(a.lora_B)
            b.lora_magnitude_vector.copy_(a.lora_magnitude_vector)
    torch.testing.assert_close(_logits(q), _logits(twin.eval()), atol=1e-5, rtol=1e-5)


def test_errors(tiny, tmp_path):
    model = _trained_dora(tiny)
    with pytest.raises(ValueError, match="is DoRA or sits on a 4-bit base: use fora.formats.peft_io.save_merged"):
        merged_state_dict(model)
    path = "model.layers.1.self_attn.q_proj"
    plain = LoRALinear(model.get_submodule(path), 4, 8.0)
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, plain)
    with pytest.raises(ValueError, match="mix rsLoRA / dropout / DoRA settings"):
        save_adapter(model, tmp_path / "mixed", base_model_name_or_path=str(tiny))
    q = _trained_dora(tiny, "nf4")
    with pytest.raises(ValueError, match="cannot merge an adapter into a packed \\(4-bit\\) base"):
        lora_modules(q)["model.layers.0.self_attn.q_proj"].merge()


@pytest.mark.parametrize("bias", [True, False])
def test_train_mode_with_dropout_equals_peft(bias):
    """The dropout branch (x̃ = dropout(x) feeds both W0 and the adapter) against peft under one seed."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("lin", nn.Linear(24, 12, bias=bias))
    base = nn.Linear(24, 12, bias=bias)
    base.load_state_dict(holder.lin.state_dict())
    ours = DoRALinear(base, 4, 8.0, dropout=0.3)
    theirs = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True,
                                               lora_dropout=0.3))
    with torch.no_grad():
        ours.lora_B.normal_(std=0.3)
        ours.lora_magnitude_vector.mul_(torch.rand(12) + 0.5)
        peft_lin = theirs.base_model.model.lin
        peft_lin.lora_A["default"].weight.copy_(ours.lora_A)
        peft_lin.lora_B["default"].weight.copy_(ours.lora_B)
        peft_lin.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    ours.train()
    theirs.train()
    x = torch.randn(3, 5, 24)
    torch.manual_seed(11)
    y_ours = ours(x)
    torch.manual_seed(11)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    ours.eval()
    assert (ours(x) - y_ours).abs().max() > 1e-3  # dropout really acted in train mode
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for mine, peft_param in ((ours.lora_A, peft_lin.lora_A["default"].weight),
                             (ours.lora_B, peft_lin.lora_B["default"].weight),
                             (ours.lora_magnitude_vector, peft_lin.lora_magnitude_vector["default"].weight)):
        torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-5, atol=1e-6)
