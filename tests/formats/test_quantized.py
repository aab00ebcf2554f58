"""A 4-bit NF4 base: `load_model(quantize="nf4")`, adapters on it, Fisher on it, and its exports.

Oracles: the full-precision model whose block linears hold the dequantized NF4 weights (every
quantized computation must equal it), `quantize_nf4` of the full-precision weights, and peft.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from tiny_models import make_tiny_checkpoint

from fora.fisher import fisher_scores
from fora.formats.loading import load_model
from fora.formats.peft_io import save_merged
from fora.inject import freeze_base, inject_lora, lora_modules
from fora.quant.nf4 import NF4Linear, dequantize_nf4, dequantized_weights, quantize_nf4

IDS = torch.tensor([[2, 40, 41, 42, 50, 60, 70, 9], [2, 5, 6, 7, 8, 9, 10, 11]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # qwen3: q/k/v biases off, tied embedding; d_in 64 and 128 (block multiples); llama below
    # covers a block straddling rows through the intermediate size 100.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", num_hidden_layers=3,
                                intermediate_size=100)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny):
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).save_pretrained(out, max_shard_size="40KB")
    return out


def _dequantized_twin(folder) -> nn.Module:
    """The full-precision model with every block linear replaced by its NF4 round trip."""
    model = load_model(folder, device="cpu")
    with torch.no_grad():
        for name, m in model.named_modules():
            if ".layers." in name and isinstance(m, nn.Linear):
                m.weight.copy_(dequantize_nf4(quantize_nf4(m.weight)))
    return model


def _batches():
    labels = IDS.clone()
    labels[:, :3] = -100
    return [{"input_ids": IDS, "labels": labels, "attention_mask": torch.ones_like(IDS)}] * 2


def test_quantized_load_equals_quantize_of_dense(tiny):
    q = load_model(tiny, device="cpu", quantize="nf4")
    dense = load_model(tiny, device="cpu")
    linears = {n: m for n, m in dense.named_modules() if ".layers." in n and isinstance(m, nn.Linear)}
    assert len(linears) == 3 * 7
    for name, lin in linears.items():
        m = q.get_submodule(name)
        assert isinstance(m, NF4Linear)
        ref = quantize_nf4(lin.weight)
        assert torch.equal(m.packed, ref.packed) and torch.equal(m.absmax_code, ref.absmax_code)
    assert isinstance(q.lm_head, nn.Linear) and not isinstance(q.lm_head, NF4Linear)
    with torch.no_grad():
        assert torch.equal(q(IDS), _dequantized_twin(tiny)(IDS))


def test_sharded_checkpoint(sharded, tiny):
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        assert torch.equal(load_model(sharded, device="cpu", quantize="nf4")(IDS),
                           load_model(tiny, device="cpu", quantize="nf4")(IDS))


def test_quantized_while_reading(tiny, monkeypatch):
    # Each block weight is quantized the moment it is read: the reader's result holds no float
    # copy of any of them (so the full-precision model never exists).
    import fora.formats.loading as loading

    seen = {}
    real = loading.read_tensors

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.update(out)
        return out
    monkeypatch.setattr(loading, "read_tensors", spy)
    load_model(tiny, device="cpu", quantize="nf4")
    block = [k for k in seen if ".layers." in k and k.endswith("_proj.weight")]
    assert block and all(not isinstance(seen[k], torch.Tensor) for k in block)


def test_unknown_quantize(tiny):
    with pytest.raises(ValueError, match="unknown quantize='int8'; supported: nf4"):
        load_model(tiny, device="cpu", quantize="int8")


def test_lora_on_nf4_base_equals_dense_twin(tiny):
    q = load_model(tiny, device="cpu", quantize="nf4")
    twin = _dequantized_twin(tiny)
    for m in (q, twin):
        inject_lora(m, [0, 2], rank=4, seed=0)
        freeze_base(m)
    with torch.no_grad():
        for (pa, a), (pb, b) in zip(lora_modules(q).items(), lora_modules(twin).items()):
            assert pa == pb
            a.lora_B.normal_(generator=torch.Generator().manual_seed(len(pa)))
            b.lora_B.copy_(a.lora_B)
    assert not [n for n, p in q.named_parameters() if p.requires_grad and "lora_" not in n]
    with torch.no_grad():
        assert torch.allclose(q(IDS), twin(IDS), atol=1e-6)
    lora = lora_modules(q)["model.layers.0.self_attn.q_proj"]
    assert lora.quantized and isinstance(lora.base_layer, NF4Linear)
    with pytest.raises(ValueError, match="cannot merge an adapter into a packed \\(4-bit\\) base"):
        lora.merge()
    with pytest.raises(ValueError, match="cannot unmerge an adapter into a packed \\(4-bit\\) base"):
        lora.unmerge()


@pytest.mark.parametrize("params", ["block", "targets"])
def test_fisher_on_quantized_equals_dequantized_twin(tiny, params):
    q = load_model(tiny, device="cpu", quantize="nf4")
    twin = _dequantized_twin(tiny)
    s_q, mods_q = fisher_scores(q, _batches(), params=params, per_module=True)
    s_t, mods_t = fisher_scores(twin, _batches(), params=params, per_module=True)
    assert set(mods_q) == set(mods_t)
    for path in mods_t:
        assert mods_q[path] == pytest.approx(mods_t[path], rel=1e-5, abs=1e-12), path
    assert torch.allclose(s_q, s_t, rtol=1e-5)
    assert (s_q > 0).all()


def test_fisher_on_quantized_with_adapters(tiny):
    # Targets mode through LoRALinear-wrapped 4-bit bases (the NF4Linear sits at base_layer).
    q = load_model(tiny, device="cpu", quantize="nf4")
    twin = _dequantized_twin(tiny)
    for m in (q, twin):
        inject_lora(m, [1], rank=2, seed=0)
    s_q = fisher_scores(q, _batches(), params="targets")
    s_t = fisher_scores(twin, _batches(), params="targets")
    assert torch.allclose(s_q, s_t, rtol=1e-5)


def test_merged_export_is_dequantized_plus_delta(tiny, tmp_path):
    q = load_model(tiny, device="cpu", quantize="nf4")
    inject_lora(q, [1], rank=4, seed=0)
    with torch.no_grad():
        for m in lora_modules(q).values():
            m.lora_B.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
        expected = q(IDS)
    save_merged(q, tmp_path / "merged", source_dir=tiny)
    merged = load_model(tmp_path / "merged", device="cpu")
    with torch.no_grad():
        assert torch.allclose(merged(IDS), expected, atol=1e-5)
    # the unadapted quantized layers are written dequantized too
    w = dequantized_weights(q)["model.layers.0.mlp.down_proj"]
    assert torch.equal(merged.get_submodule("model.layers.0.mlp.down_proj").weight, w)
