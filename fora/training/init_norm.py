"""Match the initial row norms of a plain (Kaiming) A to those of a Stiefel A.

A Stiefel A has orthonormal rows: each row has norm 1. peft's Kaiming-uniform A (a = √5) draws
entries from U(−1/√d_in, 1/√d_in), of variance 1 / (3 d_in), so each row has norm ≈ 1/√3 ≈ 0.58.
The B gradient ∇B = s · G (x Aᵀ) and ΔW = s · B A both scale with A, so with the same B the Stiefel
arms of the 2×2 ablation start with a ≈ √3 larger ΔW than the plain arms. `--match-init-norm`
rescales each plain row to unit norm (direction unchanged), which removes that factor without
touching the Stiefel A: scaling a Stiefel A instead would give A Aᵀ = c² I, off the manifold
that Cayley-Adam keeps it on.
"""
from __future__ import annotations

import torch
from torch import nn

from fora.inject import lora_modules


@torch.no_grad()
def unit_row_norms(model: nn.Module) -> int:
    """Scale every row of every LoRA A in `model` to unit norm; returns the number of A's scaled.

    Call it on plain-A methods only (a Stiefel A already has unit rows).
    """
    mods = lora_modules(model).values()
    for m in mods:
        m.lora_A.div_(m.lora_A.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return len(mods)
