"""One home per setting: every default of the method is read from fora.defaults.FORA.

Each signature below is compared with the object, so a default typed into a signature (or a
TrainConfig field) instead of read from FORA fails here the day the two disagree; and every field
carries its source, shown on docs/method.md.
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from fora.cayley_adam import CayleyAdam
from fora.defaults import FORA, SOURCES, default_k, sources_table
from fora.inject import DEFAULT_TARGETS, inject_lora
from fora.optim import STIEFEL_LR, authors_cayley_adam, build_optimizers
from fora.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def defaults_of(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_every_field_has_a_source():
    names = [f.name for f in dataclasses.fields(FORA)]
    assert set(SOURCES) == set(names)
    assert all(SOURCES[n].split(":")[0].split(" (")[0] in ("paper", "authors' code", "fora") for n in names)


@pytest.mark.parametrize("fn,expected", [
    (CayleyAdam.__init__, {"lr": FORA.stiefel_lr, "betas": FORA.cayley_betas, "eps": FORA.eps,
                           "qr_every": FORA.qr_every, "iters": FORA.cayley_iters, "step_cap": FORA.step_cap}),
    (authors_cayley_adam, {"lr": FORA.stiefel_lr, "betas": FORA.cayley_betas, "eps": FORA.eps,
                           "qr_every": FORA.qr_every, "iters": FORA.cayley_iters}),
    (build_optimizers, {"betas": FORA.adamw_betas, "eps": FORA.eps, "stiefel_betas": FORA.cayley_betas,
                        "qr_every": FORA.qr_every, "iters": FORA.cayley_iters}),
    (inject_lora, {"rank": FORA.rank, "targets": FORA.targets}),
])
def test_signatures_read_the_defaults(fn, expected):
    got = defaults_of(fn)
    assert {k: got[k] for k in expected} == expected


def test_the_run_and_the_hf_optimizer_read_the_defaults():
    cfg = TrainConfig(model="any")
    assert (cfg.rank, cfg.lr, cfg.weight_decay, cfg.lora_dropout, cfg.targets, cfg.fisher_batches, cfg.qr_every,
            cfg.max_grad_norm, cfg.cutoff_len, cfg.epochs) == (
        FORA.rank, FORA.lr, FORA.weight_decay, FORA.lora_dropout, FORA.targets, FORA.fisher_batches, FORA.qr_every,
        FORA.max_grad_norm, FORA.cutoff_len, FORA.epochs)
    assert STIEFEL_LR == FORA.stiefel_lr and DEFAULT_TARGETS == FORA.targets
    hf_optimizer = pytest.importorskip("fora.hf.optimizer")
    got = defaults_of(hf_optimizer.FoRAOptimizer.__init__)
    assert {k: got[k] for k in ("lr", "weight_decay", "betas", "eps", "stiefel_lr", "stiefel_betas", "qr_every",
                                "iters")} == {
        "lr": FORA.lr, "weight_decay": FORA.weight_decay, "betas": FORA.adamw_betas, "eps": FORA.eps,
        "stiefel_lr": FORA.stiefel_lr, "stiefel_betas": FORA.cayley_betas, "qr_every": FORA.qr_every,
        "iters": FORA.cayley_iters}


def test_alpha_defaults_to_two_per_rank():
    import torch
    from torch import nn

    from fora.inject import lora_modules

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([Block()])

    model = Tiny()
    inject_lora(model, [0], targets=["q_proj"], rank=4, stiefel=False)
    (m,) = lora_modules(model).values()
    assert m.alpha == FORA.alpha_per_rank * 4 and m.scale == pytest.approx(FORA.alpha_per_rank)
    assert torch.equal(m.lora_B, torch.zeros(8, 4))


@pytest.mark.parametrize("layers,k", [(1, 1), (2, 1), (16, 8), (18, 9), (26, 13), (27, 13)])
def test_default_k_is_half_the_layers(layers, k):
    assert default_k(layers) == k


def test_method_page_shows_the_defaults_table():
    assert sources_table() in (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
