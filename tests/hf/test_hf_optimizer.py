"""fora.hf.FoRAOptimizer on its own (no Trainer): what it steps, what its state holds, what it refuses;
and fora.hf.text_batches. Oracles: fora.CayleyAdam and torch's AdamW stepped by hand on a copy."""
from __future__ import annotations

import copy

import pytest
import torch
from hf_helpers import TEXTS, adapter_state, base_model, calibration, fora_model

import fora
import fora.hf


def _backward(model) -> None:
    batch = calibration()[0]
    model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()


def _open(model) -> None:
    with torch.no_grad():
        for m in fora.hf.fora_layers(model).values():
            m.lora_A["default"].gate.fill_(0.3)


def test_one_step_is_adamw_on_a_and_g_and_cayley_adam_on_b(checkpoints):
    model = fora_model(checkpoints["llama"])
    _open(model)
    twin = copy.deepcopy(model)
    layers, twin_layers = fora.hf.fora_layers(model), fora.hf.fora_layers(twin)
    opt = fora.hf.FoRAOptimizer(model, lr=1e-2, weight_decay=0.01)
    Bs = [m.lora_B["default"].weight for m in twin_layers.values()]
    rest = [p for p in twin.parameters() if p.requires_grad and all(p is not b for b in Bs)]
    by_hand = [fora.CayleyAdam(Bs, lr=1e-3), torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.01)]
    for _ in range(2):
        _backward(model)
        _backward(twin)
        opt.step()
        opt.zero_grad()
        for o in by_hand:
            o.step()
            o.zero_grad()
    assert [p for p in opt.param_groups[0]["params"]] == [p for p in model.parameters() if p.requires_grad
                                                          and all(p is not m.lora_B["default"].weight
                                                                  for m in layers.values())]
    ours, theirs = adapter_state(model), adapter_state(twin)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_round_trips_and_restores_the_split_over_folded_weights(checkpoints):
    model = fora_model(checkpoints["llama"])
    opt = fora.hf.FoRAOptimizer(model, lr=1e-2)
    for _ in range(2):
        _backward(model)
        opt.step()
        opt.zero_grad()
    saved, raw = copy.deepcopy(opt.state_dict()), adapter_state(model)
    assert set(saved) >= {"state", "param_groups", "cayley", "fora_split"}
    model.load_state_dict(model.state_dict())          # what a Trainer resume leaves: g · A in A, g = 1
    assert any(not torch.equal(raw[n], p) for n, p in adapter_state(model).items())
    opt.load_state_dict(saved)
    assert all(torch.equal(raw[n], p) for n, p in adapter_state(model).items())


def test_state_of_other_weights_or_another_optimizer_is_refused(checkpoints):
    model = fora_model(checkpoints["llama"])
    _open(model)
    opt = fora.hf.FoRAOptimizer(model)
    saved = opt.state_dict()
    with torch.no_grad():
        next(iter(fora.hf.fora_layers(model).values())).lora_A["default"].weight.add_(1.0)
    with pytest.raises(ValueError, match="belongs to other adapter weights: g · A differs at .*q_proj; load the"):
        opt.load_state_dict(saved)
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]).state_dict()
    with pytest.raises(ValueError, match="was not written by fora.hf.FoRAOptimizer"):
        opt.load_state_dict(plain)
    other = fora_model(checkpoints["llama"], k=2)
    with pytest.raises(ValueError, match="holds 5 FoRA layers .* this model 10; resume with the same LoraConfig"):
        fora.hf.FoRAOptimizer(other).load_state_dict(saved)


def test_a_model_without_fora_adapters_is_refused(checkpoints):
    import peft

    with pytest.raises(ValueError, match="has no FoRA adapters; call fora.hf.make_fora"):
        fora.hf.FoRAOptimizer(peft.get_peft_model(base_model(checkpoints["llama"]),
                                                  peft.LoraConfig(r=4, target_modules=["q_proj"])))
    model = fora_model(checkpoints["llama"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="FoRA adapters are not trainable"):
        fora.hf.FoRAOptimizer(model)


def test_text_batches_pad_and_mask_the_labels(checkpoints):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints["llama"])
    batches = fora.hf.text_batches(tok, TEXTS[:3], batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    n = len(tok(TEXTS[0])["input_ids"])
    assert first["input_ids"][0, :n].tolist() == tok(TEXTS[0])["input_ids"]
    assert first["attention_mask"].sum(1).tolist() == [len(tok(t)["input_ids"]) for t in TEXTS[:2]]
    assert torch.equal(first["labels"] == -100, first["attention_mask"] == 0)
    assert len(fora.hf.text_batches(tok, TEXTS, batch_size=2, num_batches=2)) == 2
    with pytest.raises(ValueError, match="non-empty list of strings"):
        fora.hf.text_batches(tok, [])
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        fora.hf.text_batches(tok, TEXTS, batch_size=0)
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad nor an eos token; set tokenizer.pad_token"):
        fora.hf.text_batches(tok, TEXTS)
