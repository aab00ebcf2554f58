"""The per-step displacement of A under the trainer's default optimizers (fora.optim), pinned.

Cayley-Adam's first step moves X = Aᵀ by τ‖WX‖ / (1 ± τ‖W‖₂/2) with τ = lr_A / ‖G‖ (bias-corrected
first moments: M̂ = G, v̂ = ‖G‖²) and, for a tangent G, WX = G and ‖W‖₂ <= 2‖G‖: the displacement
is lr_A within a relative lr_A / (1 - lr_A). AdamW's first step moves every entry of a plain A by
exactly lr, i.e. lr·√(r·d_in) in Frobenius norm. The default lr_A = lr·√(r·d_in)·stiefel_lr_scale
makes the two arms of the ablation move A equally far at scale 1, the default of every family but
Gemma 3 (fora.optim.default_stiefel_lr_scale), whose measured default is checked here too.
"""
import math

import pytest
import torch
from torch import nn

from fora.inject import freeze_base
from fora.lora import LoRALinear
from fora.optim import build_optimizers, default_stiefel_lr_scale
from fora.stiefel import project_tangent

R, D_IN, LR = 4, 96, 1e-3
DEFAULT_SCALE = default_stiefel_lr_scale("llama")  # 1: the step of AdamW on a plain A


def _model(init: str) -> nn.ModuleDict:
    torch.manual_seed(0)
    model = nn.ModuleDict({"q": LoRALinear(nn.Linear(D_IN, 32), rank=R, alpha=8, init=init)})
    freeze_base(model)
    return model


def _tangent_grad(A: torch.Tensor, seed: int) -> torch.Tensor:
    """A gradient of unit Frobenius norm in the tangent space at X = Aᵀ, in A's (r, d_in) layout."""
    g = torch.Generator().manual_seed(seed)
    G = project_tangent(A.detach().mT.double(), torch.randn(D_IN, R, generator=g, dtype=torch.float64))
    return (G / G.norm()).mT.to(A.dtype)


def _displacements(model: nn.ModuleDict, steps: int, scale: float = DEFAULT_SCALE) -> list[float]:
    opts = build_optimizers(model, LR, stiefel_lr_scale=scale, stiefel=model["q"].init == "stiefel")
    A = model["q"].lora_A
    out = []
    for k in range(steps):
        before = A.detach().clone()
        A.grad = _tangent_grad(A, k)
        model["q"].lora_B.grad = torch.zeros_like(model["q"].lora_B)
        for o in opts:
            o.step()
        out.append(float((A.detach() - before).norm()))
    return out


@pytest.mark.parametrize("scale", [DEFAULT_SCALE, default_stiefel_lr_scale("gemma3_text"), 0.0625])
def test_first_step_moves_a_stiefel_A_by_lr_sqrt_r_d_in_times_the_scale(scale):
    lr_a = LR * math.sqrt(R * D_IN) * scale
    (first,) = _displacements(_model("stiefel"), 1, scale)
    assert first == pytest.approx(lr_a, rel=lr_a / (1 - lr_a))


def test_default_step_equals_adamws_first_step_on_a_plain_A():
    (stiefel,) = _displacements(_model("stiefel"), 1)
    (plain,) = _displacements(_model("standard"), 1)
    assert plain == pytest.approx(LR * math.sqrt(R * D_IN), rel=1e-4)  # every entry moves by lr
    assert DEFAULT_SCALE * plain == pytest.approx(stiefel, rel=2 * LR * math.sqrt(R * D_IN))


def test_later_steps_never_exceed_the_first_with_unit_norm_gradients():
    """‖M̂‖ <= mean ‖G‖ = √v̂ when every ‖G‖ = 1, so no step is longer than lr_A (to the Cayley factor)."""
    lr_a = LR * math.sqrt(R * D_IN) * DEFAULT_SCALE
    steps = _displacements(_model("stiefel"), 12)
    assert max(steps) <= lr_a * (1 + lr_a / (1 - lr_a))
    assert min(steps) > 0.2 * lr_a  # random directions shrink M̂, not to nothing in 12 steps
