"""The manifold columns of a training log row (`fora.training.steps.manifold_metrics`).

Oracle: each factor measured on its own with `stiefel_error` and each gate read with `LoRALinear.gate`
(what the row held when it was computed module by module); the row is read back in one device sync.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fora.cayley_adam import CayleyAdam
from fora.lora import LoRALinear
from fora.stiefel import stiefel_error
from fora.training.steps import manifold_metrics


def adapters(init: str, n: int = 3) -> nn.ModuleDict:
    """`n` adapters of different shapes, nudged off the manifold and with nonzero gates where they have one."""
    torch.manual_seed(0)
    mods = nn.ModuleDict({f"m{i}": LoRALinear(nn.Linear(16 + 4 * i, 12 + 8 * i), rank=4, alpha=8.0, init=init)
                          for i in range(n)})
    with torch.no_grad():
        for i, m in enumerate(mods.values()):
            if (p := m.stiefel_parameter()) is not None:
                p.add_(1e-3 * (i + 1) * torch.randn_like(p))
            if m.lora_gate is not None:
                m.lora_gate.fill_((-1) ** i * 0.1 * (i + 1))
    return mods


def one_by_one(model: nn.Module) -> dict[str, float]:
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    errors = [stiefel_error(CayleyAdam.point(p)) for m in mods if (p := m.stiefel_parameter()) is not None]
    gates = [abs(m.gate()) for m in mods if m.lora_gate is not None]
    return {**({"stiefel_error": max(errors)} if errors else {}), **({"gate_max": max(gates)} if gates else {})}


@pytest.fixture
def syncs(monkeypatch) -> list[str]:
    """The device-to-host reads made while the test runs (`.item()`, `.tolist()`, `float(t)`)."""
    seen: list[str] = []
    for name in ("item", "tolist", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _name=name: seen.append(_name) or _real(t, *a))
    return seen


@pytest.mark.parametrize("init,keys", [("stiefel_b", ["stiefel_error", "gate_max"]), ("stiefel_a", ["stiefel_error"])])
def test_the_row_equals_the_factors_measured_one_by_one(init, keys, syncs):
    model = adapters(init)
    expected = one_by_one(model)
    syncs.clear()
    row = manifold_metrics(model, stiefel=True)
    assert list(row) == keys and row == expected  # exactly the same floats, in the same order
    assert row["stiefel_error"] > 1e-4  # the nudge is measured, not a zero
    assert syncs == ["tolist"]  # one transfer for the whole row


def test_plain_lora_has_no_manifold_columns_and_reads_nothing(syncs):
    model = adapters("standard")
    assert manifold_metrics(model, stiefel=False) == {} and syncs == []
    assert manifold_metrics(nn.Linear(2, 2), stiefel=True) == {}  # no adapters at all
