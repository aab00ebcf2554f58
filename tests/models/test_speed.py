"""Per-block activation checkpointing and regional torch.compile leave the step's numbers alone.

Oracle: the same model without the switch (same weights, batch and adapters); checkpointing
recomputes the same eager ops, so loss and gradients agree exactly.
"""
from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import make_tiny_checkpoint

import fora.models.speed as speed
from fora.formats.loading import load_model
from fora.inject import freeze_base, inject_lora
from fora.models.speed import checkpoint_blocks, compile_blocks

IDS = torch.tensor([[2, 40, 41, 42, 50, 60, 70, 9, 11, 12], [2, 5, 6, 7, 8, 9, 10, 11, 30, 31]])
LABELS = torch.where(torch.arange(10) < 4, -100, IDS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", num_hidden_layers=3)


def _adapted(folder, dropout=0.1):
    model = load_model(folder, dtype=torch.float32, device="cpu")
    inject_lora(model, [1, 2], rank=4, seed=0, dropout=dropout)
    freeze_base(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_gate" in name:
                p.fill_(0.7)                                   # g = 0 would zero every gradient
    return model.train()


def _step(model, grad_from_layer=0):
    torch.manual_seed(0)  # adapter dropout: same masks in both runs
    total, n = model.loss(IDS, LABELS, grad_from_layer=grad_from_layer)
    (total / n).backward()
    return total.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("grad_from_layer", [0, 1])
def test_activation_checkpointing_same_loss_and_gradients(tiny, grad_from_layer):
    ref_loss, ref_grads = _step(_adapted(tiny), grad_from_layer)
    model = _adapted(tiny)
    assert checkpoint_blocks(model) == 3
    assert checkpoint_blocks(model) == 3  # idempotent: a block is wrapped once
    loss, grads = _step(model, grad_from_layer)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 30   # A, B, g of 10 modules
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    assert list(model.state_dict()) == list(_adapted(tiny).state_dict())  # names unchanged


def test_compile_falls_back_with_a_warning(tiny, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")
    monkeypatch.setattr(speed.torch, "compile", broken)
    model = _adapted(tiny)
    with caplog.at_level(logging.WARNING, logger="fora.models.speed"):
        assert compile_blocks(model) is False
    assert "torch.compile does not work on cpu here (RuntimeError: no C++ compiler found); training without it" \
        in caplog.text
    assert all("forward" not in vars(b) and b._compiled_call_impl is None for b in model.model.layers)


def test_blocks_error_names_the_fix():
    with pytest.raises(TypeError, match="has no decoder blocks at model.model.layers; pass a fora CausalLM"):
        checkpoint_blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_blocks_same_loss_and_gradients(tiny):
    # no adapter dropout: inductor draws its own masks, so compiled dropout differs from eager's
    ref_loss, ref_grads = _step(_adapted(tiny, 0.0), 1)
    model = _adapted(tiny, 0.0)
    assert compile_blocks(model) is True
    loss, grads = _step(model, 1)
    assert list(model.state_dict()) == list(_adapted(tiny).state_dict())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)
