"""CayleyAdamReference (the step-by-step Algorithm 2) against the dense n x n transcription, the
fused stacked CayleyAdam against it, their shared state_dict, and the generator erratum it shows."""
import io
import math

import pytest
import torch
from torch import nn

import fora.cayley_adam_reference as reference
from fora import CayleyAdamReference
from fora.cayley_adam import CayleyAdam
from fora.inject import freeze_base
from fora.lora import LoRALinear
from fora.optim import build_optimizers
from fora.stiefel import random_stiefel
from test_cayley_adam import dense_cayley_adam, stiefel_param

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("solver", ["closed_form", "fixed_point"])
@pytest.mark.parametrize("lr, qr_every", [(0.05, 0), (3.0, 0), (0.5, 2)])
def test_reference_equals_dense_algorithm_2(solver, lr, qr_every):
    n, r, steps = 9, 3, 6
    A = stiefel_param(n, r, 11, F64)
    g = torch.Generator().manual_seed(12)
    grads = [torch.randn(n, r, generator=g, dtype=F64) * (1 + k) for k in range(steps)]
    opt = CayleyAdamReference([A], lr=lr, solver=solver, qr_every=qr_every)
    dense = dense_cayley_adam(A.detach().T.clone(), grads, lr=lr, solver=solver, qr_every=qr_every)
    for G, (X_ref, _) in zip(grads, dense):
        A.grad = G.T.clone()
        opt.step()
        torch.testing.assert_close(A.detach().T, X_ref, rtol=0, atol=1e-12)


class Adapters(nn.Module):
    """Five float64 adapters in three A shapes (4, 8), (4, 24), (2, 24): two stacks of two."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        dims = [(8, 16, 4), (8, 16, 4), (24, 8, 4), (24, 8, 4), (24, 12, 2)]
        self.mods = nn.ModuleList(LoRALinear(nn.Linear(i, o, dtype=F64), r, 2 * r, init="stiefel",
                                             generator=g, dtype=F64) for i, o, r in dims)


@pytest.mark.parametrize("solver", ["closed_form", "fixed_point"])
def test_fused_stacked_cayley_adam_equals_the_reference(solver):
    # build_optimizers' own CayleyAdam (one group per A shape, lr · √(r · d_in)), QR every 3 steps
    # and the norm cap, which binds at the large lr of the first steps (checked below).
    model = Adapters()
    freeze_base(model)
    lr = 0.2
    fused, _ = build_optimizers(model, lr=lr, qr_every=3, solver=solver, step_cap=0.5)
    As = [m.lora_A for m in model.mods]
    twins = [nn.Parameter(a.detach().clone()) for a in As]
    by_shape: dict[tuple, list] = {}
    for t in twins:
        by_shape.setdefault(tuple(t.shape), []).append(t)
    groups = [{"params": ps, "lr": lr * math.sqrt(r * d_in)} for (r, d_in), ps in by_shape.items()]
    ref = CayleyAdamReference(groups, lr=lr, qr_every=3, solver=solver, step_cap=0.5)
    assert len(fused.param_groups) == len(ref.param_groups) == 3
    g = torch.Generator().manual_seed(1)
    capped = 0
    for _ in range(8):
        for a, t in zip(As, twins):
            a.grad = torch.randn(a.shape, generator=g, dtype=F64)
            t.grad = a.grad.clone()
        for t in twins[:1]:  # would the cap bind for this A? (‖W‖_F from the state, computed densely)
            capped += _cap_binds(ref, t)
        fused.step()
        ref.step()
        for a, t in zip(As, twins):
            torch.testing.assert_close(a.detach(), t.detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(fused.state[a]["exp_avg"], ref.state[t]["exp_avg"], rtol=0, atol=1e-12)
            torch.testing.assert_close(fused.state[a]["exp_avg_sq"], ref.state[t]["exp_avg_sq"], rtol=1e-14, atol=0)
    assert 0 < capped < 8        # both branches of the cap ran


def _cap_binds(opt, p) -> bool:
    group = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
    (b1, b2), st = group["betas"], opt.state[p]
    k = st.get("step", 0) + 1
    M = b1 * (st["exp_avg"].T if st else 0) + (1 - b1) * p.grad.T
    v = b2 * (st["exp_avg_sq"] if st else 0) + (1 - b2) * float(p.grad.square().sum())
    X, M_hat = p.detach().T, M / (1 - b1 ** k)
    W_hat = M_hat @ X.T - 0.5 * X @ (X.T @ M_hat @ X.T)
    W = W_hat - W_hat.T
    tau = group["lr"] / (math.sqrt(v / (1 - b2 ** k)) + group["eps"])
    return 2 * group["step_cap"] / (float(torch.linalg.matrix_norm(W)) + group["eps"]) < tau


def test_state_dicts_are_interchangeable():
    # Three fused steps, then the reference resumes from the fused state_dict: same iterates as
    # the fused optimizer continuing.
    params = [stiefel_param(10, 3, s, F64) for s in range(2)] + [stiefel_param(7, 2, 5, F64)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    fused = CayleyAdam(params, lr=0.3, qr_every=4)
    g = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=g, dtype=F64) for p in params] for _ in range(6)]
    for k, gs in enumerate(grads):
        if k == 3:
            buf = io.BytesIO()
            torch.save(fused.state_dict(), buf)
            buf.seek(0)
            with torch.no_grad():
                for t, p in zip(twins, params):
                    t.copy_(p)
            ref = CayleyAdamReference(twins, lr=0.3, qr_every=4)
            ref.load_state_dict(torch.load(buf))
        for p, t, gr in zip(params, twins, gs):
            p.grad, t.grad = gr.clone(), gr.clone()
        fused.step()
        if k >= 3:
            ref.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=0, atol=1e-12)
        assert ref.state[t]["step"] == fused.state[p]["step"] == 6


def _nearest_point(monkeypatch, erratum, steps, dtype=torch.float32):
    """min ‖A − T‖² over St(64, 8) (optimum: the polar factor of T); returns ‖A − A*‖_F and ‖M‖_F
    after each step (NaN once the iterate is not finite)."""
    if erratum:  # PAPER.md's literal W = M̂ Xᵀ − X M̂ᵀ, i.e. the direction M̂ itself
        monkeypatch.setattr(reference, "canonical_direction", lambda X, G: G)
    n, r = 64, 8
    T = torch.randn(r, n, generator=torch.Generator().manual_seed(7), dtype=dtype)
    U, _, Vh = torch.linalg.svd(T.double(), full_matrices=False)
    A = stiefel_param(n, r, 8, dtype)
    opt = CayleyAdamReference([A], lr=0.2)
    dist, moment = [], []
    for _ in range(steps):
        opt.zero_grad()
        (A - T).pow(2).sum().backward()
        opt.step()
        dist.append(float((A.detach().double() - U @ Vh).norm()))
        moment.append(float(opt.state[A]["exp_avg"].norm()))
        if not math.isfinite(dist[-1]):
            break
    return dist, moment


def test_the_erratum_generator_never_approaches_the_optimum_and_diverges(monkeypatch):
    # With the ½ term (canonical_direction) the iterate reaches the optimum; without it the
    # re-projection M ← (1 − β1^k) W X multiplies the span(X) part of M by 2β1 = 1.8 per step, so
    # the moment grows geometrically, the capped steps wander at the starting distance, and
    # the iterate turns NaN (measured: step 87 of 300 in fp32; fp64 stays finite longer).
    dist, _ = _nearest_point(monkeypatch, erratum=False, steps=300)
    assert dist[-1] < 1e-4
    dist, moment = _nearest_point(monkeypatch, erratum=True, steps=300)
    assert moment[39] > 1.5 ** 39 * moment[0]               # at least geometric growth
    finite = [d for d in dist if math.isfinite(d)]
    assert min(finite) > 0.5 * dist[0]                       # never halfway to the optimum
    assert len(dist) < 300 and not math.isfinite(dist[-1])   # and then NaN in fp32


def test_reference_validates_as_cayley_adam():
    with pytest.raises(ValueError, match="invalid lr"):
        CayleyAdamReference([stiefel_param(8, 2, 0)], lr=-1.0)
    A = nn.Parameter(torch.ones(2, 8))
    A.grad = torch.ones_like(A)
    with pytest.raises(ValueError, match="orthonormal rows"):
        CayleyAdamReference([A], lr=0.1).step()
    B = nn.Parameter(random_stiefel(8, 2).mT.contiguous())
    B.grad = torch.eye(2, 8).to_sparse()
    with pytest.raises(ValueError, match="sparse gradients"):
        CayleyAdamReference([B], lr=0.1).step()
