"""The per-step displacement of A under the trainer's default optimizers (fora.optim), pinned.

Cayley-Adam's first step moves X = Aᵀ by τ‖WX‖ / (1 ± τ‖W‖₂/2) with τ = lr_A / ‖G‖ (bias-corrected
first moments: M̂ = G, v̂ = ‖G‖²) and, for a tangent G, WX = G and ‖W‖₂ <= 2‖G‖: the displacement
is lr_A within a relative lr_A / (1 - lr_A). AdamW's first step moves every entry of a plain A by
exactly lr, i.e. lr·√(r·d_in) in Frobenius norm. The default lr_A = lr·√(r·d_in)·stiefel_lr_scale
makes the two arms of the A-side ablation move A equally far at scale 1.

FoRA's default (B on the manifold): Cayley-Adam's first step is capped at α = min(1e-3, 1/‖W‖₁),
and the trainer's schedule reaches AdamW only (``scheduled``).
"""
import math

import pytest
import torch
from torch import nn

from fora.inject import freeze_base
from fora.lora import LoRALinear
from fora.cayley_adam import CayleyAdam
from fora.optim import STIEFEL_LR, build_optimizers, scheduled
from fora.stiefel import project_tangent

R, D_IN, LR = 4, 96, 1e-3
DEFAULT_SCALE = 1.0  # the step of AdamW on a plain A


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
    opts = build_optimizers(model, LR, stiefel_lr_scale=scale, stiefel=model["q"].init == "stiefel_a",
                            stiefel_factor="A")
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


@pytest.mark.parametrize("scale", [DEFAULT_SCALE, 0.25, 0.0625])
def test_first_step_moves_a_stiefel_A_by_lr_sqrt_r_d_in_times_the_scale(scale):
    lr_a = LR * math.sqrt(R * D_IN) * scale
    (first,) = _displacements(_model("stiefel_a"), 1, scale)
    assert first == pytest.approx(lr_a, rel=lr_a / (1 - lr_a))


def test_default_step_equals_adamws_first_step_on_a_plain_A():
    (stiefel,) = _displacements(_model("stiefel_a"), 1)
    (plain,) = _displacements(_model("standard"), 1)
    assert plain == pytest.approx(LR * math.sqrt(R * D_IN), rel=1e-4)  # every entry moves by lr
    assert DEFAULT_SCALE * plain == pytest.approx(stiefel, rel=2 * LR * math.sqrt(R * D_IN))


def test_later_steps_never_exceed_the_first_with_unit_norm_gradients():
    """‖M̂‖ <= mean ‖G‖ = √v̂ when every ‖G‖ = 1, so no step is longer than lr_A (to the Cayley factor)."""
    lr_a = LR * math.sqrt(R * D_IN) * DEFAULT_SCALE
    steps = _displacements(_model("stiefel_a"), 12)
    assert max(steps) <= lr_a * (1 + lr_a / (1 - lr_a))
    assert min(steps) > 0.2 * lr_a  # random directions shrink M̂, not to nothing in 12 steps


def _fora_model() -> nn.ModuleDict:
    torch.manual_seed(0)
    model = nn.ModuleDict({"q": LoRALinear(nn.Linear(D_IN, 32), rank=R, alpha=8, init="stiefel_b")})
    freeze_base(model)
    return model


def test_fora_pairs_cayley_adam_on_B_with_adamw_on_A_and_the_gate():
    model = _fora_model()
    cayley, adamw = build_optimizers(model, 2e-4, weight_decay=0.01)
    q = model["q"]
    assert [p for g in cayley.param_groups for p in g["params"]] == [q.lora_B]
    assert [p for g in adamw.param_groups for p in g["params"]] == [q.lora_A, q.lora_gate]
    assert cayley.defaults["lr"] == STIEFEL_LR == 1e-3 and cayley.defaults["step_cap"] == "l1"
    assert cayley.defaults["solver"] == "fixed_point" and cayley.defaults["iters"] == 5
    assert cayley.defaults["betas"] == (0.9, 0.99) and cayley.defaults["qr_every"] == 100
    assert adamw.defaults["lr"] == 2e-4 and adamw.defaults["weight_decay"] == 0.01


def test_the_schedule_drives_adamw_and_not_the_authors_cayley_adam():
    model = _fora_model()
    opts = build_optimizers(model, 2e-4)
    assert scheduled(opts) == [opts[1]]
    warmup = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: (k + 1) / 10) for o in scheduled(opts)]
    q = model["q"]
    for k in range(3):
        q.lora_B.grad, q.lora_A.grad = torch.randn_like(q.lora_B), torch.randn_like(q.lora_A)
        q.lora_gate.grad = torch.ones(())
        for o in opts:
            o.step()
        for s in warmup:
            s.step()
    assert opts[0].param_groups[0]["lr"] == STIEFEL_LR                 # constant cap
    assert opts[1].param_groups[0]["lr"] == pytest.approx(2e-4 * 4 / 10)  # on the warm-up


def test_the_ablation_schedules_both_optimizers():
    opts = build_optimizers(_model("stiefel_a"), LR, stiefel_factor="A")
    assert isinstance(opts[0], CayleyAdam) and scheduled(opts) == opts


def test_unknown_factor_is_refused():
    with pytest.raises(ValueError, match="unknown stiefel_factor 'C'"):
        build_optimizers(_fora_model(), LR, stiefel_factor="C")
