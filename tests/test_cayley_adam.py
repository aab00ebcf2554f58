"""CayleyAdam under the earlier rule (``step_cap=q``: the row-orthonormal-A ablation) on wide A
parameters: a dense n x n transcription of that rule, Hypothesis properties of step(), known
optima on the Stiefel manifold, manifold drift, state_dict resume, errors; build_optimizers for
the ablation: the A/B split, its betas and its guards. The authors' rule (FoRA's default, on tall
B parameters) is tests/test_cayley_adam_authors.py.

Everything goes through the public class (parameters, .grad, step(), state_dict()), so the
tests hold whatever the optimizer's internal buffers look like.
"""
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fora.cayley_adam import CayleyAdam
from fora.inject import freeze_base
from fora.lora import LoRALinear
from fora.optim import build_optimizers
from fora.stiefel import random_stiefel, stiefel_error

F64 = torch.float64
EARLIER = dict(solver="closed_form", iters=2, step_cap=0.5)  # the ablation's rule


def earlier(params, **kw):
    """CayleyAdam with the ablation's rule (``kw`` overrides)."""
    return CayleyAdam(params, **{**EARLIER, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")


def stiefel_param(n, r, seed, dtype=torch.float32):
    A = random_stiefel(n, r, generator=torch.Generator().manual_seed(seed), dtype=dtype).mT
    return nn.Parameter(A.contiguous())


def spd_with_gap(n, r, seed):
    """C = Q diag(λ) Qᵀ, Q Haar-random, top r eigenvalues in [2, 3], the rest in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    Q = random_stiefel(n, n, generator=g, dtype=F64)
    lam = torch.cat([torch.rand(n - r, generator=g, dtype=F64), 2 + torch.rand(r, generator=g, dtype=F64)])
    return Q @ torch.diag(lam) @ Q.T


def fixed_point_drift_bound(opt, A):
    """Before a fixed-point step of A: by how much the step can raise ‖XᵀX − I‖₂, derived.

    With a = τ/2, c = a‖W‖₂ and m = iters + 2: the exact Cayley point Y* = Q X (Q orthogonal, W
    skew, whatever X) keeps Y*ᵀY* = XᵀX; the start Y₀ = X − 2a W X misses it by
    Y* − Y₀ = 2a² (I + aW)⁻¹ W² X, and each sweep multiplies the miss e by −aW, so
    ‖e‖ <= 2 c^m ‖X‖₂ and YᵀY − I = (XᵀX − I) + Y*ᵀe + eᵀY* + eᵀe rises by <= (4c^m + 4c^2m) ‖X‖₂².
    τ and W are Algorithm 2's, computed densely here from the optimizer's public state.
    """
    group = opt.param_groups[0]
    (b1, b2), st = group["betas"], opt.state[A]
    k = st.get("step", 0) + 1
    M = b1 * (st["exp_avg"].T if st else 0) + (1 - b1) * A.grad.T
    v = b2 * (float(st["exp_avg_sq"]) if st else 0.0) + (1 - b2) * float(A.grad.square().sum())
    X, M_hat = A.detach().T, M / (1 - b1 ** k)
    W_hat = M_hat @ X.T - 0.5 * X @ (X.T @ M_hat @ X.T)
    W = W_hat - W_hat.T
    tau = group["lr"] / (math.sqrt(v / (1 - b2 ** k)) + group["eps"])
    tau = min(tau, 2 * group["step_cap"] / (float(torch.linalg.matrix_norm(W)) + group["eps"]))
    c, m = tau / 2 * float(torch.linalg.matrix_norm(W, ord=2)), group["iters"] + 2
    return (4 * c ** m + 4 * c ** (2 * m)) * float(torch.linalg.matrix_norm(X, ord=2)) ** 2


def gram_error(A):
    X = A.detach().T
    return float(torch.linalg.matrix_norm(X.T @ X - torch.eye(X.shape[1], dtype=X.dtype), ord=2))


@pytest.mark.parametrize("solver", ["closed_form", "fixed_point"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maximises_trace_and_finds_top_eigenspace(solver, seed):
    n, r = 20, 3
    C = spd_with_gap(n, r, seed)
    A = stiefel_param(n, r, seed + 100, F64)
    opt = earlier([A], lr=0.2, solver=solver, qr_every=0)    # no QR: the iteration's own accuracy
    for _ in range(300):
        opt.zero_grad()
        loss = -torch.trace(A @ C @ A.T)               # maximise tr(A C Aᵀ)
        loss.backward()
        if solver == "fixed_point":
            before, bound = gram_error(A), fixed_point_drift_bound(opt, A)
        opt.step()
        if solver == "fixed_point":                    # 2 sweeps: a drift, within its derived bound
            assert gram_error(A) <= before + bound + 1e-14
    evals, evecs = torch.linalg.eigh(C)
    V = evecs[:, -r:]
    projector_dist = torch.linalg.matrix_norm(A.detach().T @ A.detach() - V @ V.T).item()
    err = stiefel_error(A.detach().mT)
    if solver == "closed_form":     # Eq. 6 exactly: on the manifold to rounding
        assert projector_dist < 1e-4 and err < 1e-12
        assert abs(-loss.item() - evals[-r:].sum().item()) < 1e-8
    else:                           # the top eigenspace to within the drift (bounded above)
        assert projector_dist < 1e-3 + 2 * err
        assert abs(-loss.item() - evals[-r:].sum().item()) < 2e-3


def dense_cayley_adam(X, grads, *, lr, solver, step_cap=0.5, iters=2, qr_every=0, eps=1e-8):
    """Li, Li & Todorovic (2020) Algorithm 2 on dense n x n matrices, float64, written from
    the paper's algorithm with nothing from fora.stiefel: yields X after each step and whether the cap bound."""
    b1, b2 = 0.9, 0.99
    n, r = X.shape
    eye = torch.eye(n, dtype=F64)
    M, v = torch.zeros(n, r, dtype=F64), 0.0
    for k, G in enumerate(grads, 1):
        M = b1 * M + (1 - b1) * G
        v = b2 * v + (1 - b2) * float((G * G).sum())                  # ‖G‖²_F, summed
        M_hat, v_hat = M / (1 - b1 ** k), v / (1 - b2 ** k)            # both bias corrections
        W_hat = M_hat @ X.T - 0.5 * X @ (X.T @ M_hat @ X.T)
        W = W_hat - W_hat.T
        M = (1 - b1 ** k) * W @ X                                      # re-projected moment
        tau = lr / (math.sqrt(v_hat) + eps)
        cap = 2 * step_cap / (float(torch.linalg.matrix_norm(W)) + eps) if step_cap else math.inf
        capped = cap < tau
        tau = min(tau, cap)
        if solver == "closed_form":
            Y = torch.linalg.solve(eye + tau / 2 * W, (eye - tau / 2 * W) @ X)
        else:
            Y = X - tau * W @ X
            for _ in range(iters):
                Y = X - tau / 2 * W @ (X + Y)
        if qr_every and k % qr_every == 0:
            Q, R = torch.linalg.qr(Y)
            Y = Q * torch.sign(torch.diagonal(R))
        X = Y
        yield X, capped


@pytest.mark.parametrize("solver", ["closed_form", "fixed_point"])
@pytest.mark.parametrize("lr, qr_every, cap_binds", [(0.05, 0, False), (3.0, 0, True), (0.5, 2, None)])
def test_step_equals_dense_algorithm_2(solver, lr, qr_every, cap_binds):
    n, r, steps = 9, 3, 6
    A = stiefel_param(n, r, 11, F64)
    g = torch.Generator().manual_seed(12)
    grads = [torch.randn(n, r, generator=g, dtype=F64) * (1 + k) for k in range(steps)]
    opt = earlier([A], lr=lr, solver=solver, qr_every=qr_every)
    capped = []
    for G, (X_ref, was_capped) in zip(grads, dense_cayley_adam(A.detach().T.clone(), grads, lr=lr,
                                                                solver=solver, qr_every=qr_every)):
        A.grad = G.T.clone()                       # ∂L/∂A is (r, n); Algorithm 2 works on X = Aᵀ
        opt.step()
        torch.testing.assert_close(A.detach().T, X_ref, rtol=0, atol=1e-10)
        capped.append(was_capped)
    if cap_binds is not None:                      # each branch of the cap is really exercised
        assert all(capped) if cap_binds else not any(capped)
    assert opt.state_dict()["state"][0]["step"] == steps


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 24), st.data(), st.integers(1, 6), st.integers(0, 2**31 - 1),
       st.sampled_from(["closed_form", "fixed_point"]), st.floats(1e-3, 5.0), st.floats(-3.0, 3.0))
def test_step_keeps_A_on_the_manifold_and_the_moment_tangent(n, data, steps, seed, solver, lr, log_scale):
    # The fixed point is only approximately orthonormal (error O((τ‖W‖/2)^iters) per step), so it
    # is checked with the QR retraction every step; the closed form must stay on St without it.
    r = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(seed)
    A = nn.Parameter(random_stiefel(n, r, generator=g, dtype=F64).mT.contiguous())
    opt = earlier([A], lr=lr, solver=solver, qr_every=0 if solver == "closed_form" else 1)
    for _ in range(steps):
        X_old = A.detach().T.clone()
        A.grad = torch.randn(A.shape, generator=g, dtype=F64) * 10 ** log_scale
        opt.step()
        assert stiefel_error(A.detach().mT) < 1e-10
        M = opt.state_dict()["state"][0]["exp_avg"].T       # (n, r): the moment at the point it was projected
        S = X_old.T @ M
        assert (S + S.T).abs().max() <= 1e-10 * (1 + M.abs().max())


def test_nearest_point_is_the_polar_factor():
    # min ‖A − T‖²: the gradient has a skew part in A Gᵀ (motion within span A), which the
    # canonical-metric W handles; the optimum is the polar factor U Vᵀ of T (Procrustes).
    n, r = 30, 5
    T = torch.randn(r, n, generator=torch.Generator().manual_seed(7), dtype=F64)
    U, _, Vh = torch.linalg.svd(T, full_matrices=False)
    A = stiefel_param(n, r, 8, F64)
    opt = earlier([A], lr=0.2)
    for _ in range(300):
        opt.zero_grad()
        (A - T).pow(2).sum().backward()
        opt.step()
    torch.testing.assert_close(A.detach(), U @ Vh, rtol=0, atol=1e-6)


@pytest.mark.parametrize("qr_every", [0, 100])
def test_stays_on_manifold_over_thousands_of_fp32_steps(qr_every):
    g = torch.Generator().manual_seed(0)
    A = stiefel_param(64, 8, 1)
    opt = earlier([A], lr=0.05, qr_every=qr_every)
    worst = 0.0
    for _ in range(3000):
        A.grad = torch.randn(A.shape, generator=g)
        opt.step()
        worst = max(worst, stiefel_error(A.detach().mT))
    assert worst < 1e-5


def _run(A, opt, steps, start):
    C = spd_with_gap(A.shape[1], A.shape[0], 3).float()
    for k in range(start, start + steps):
        opt.zero_grad()
        (-torch.trace(A @ C @ A.T)).backward()
        A.grad += 0.1 * torch.randn(A.shape, generator=torch.Generator().manual_seed(k))
        opt.step()


@pytest.mark.parametrize("solver", ["closed_form", "fixed_point"])
def test_resume_from_state_dict_is_bit_identical(solver):
    kw = dict(lr=0.05, qr_every=7, solver=solver)
    A = stiefel_param(16, 4, 5)
    opt = earlier([A], **kw)
    _run(A, opt, 40, 0)

    B = stiefel_param(16, 4, 5)
    opt_b = earlier([B], **kw)
    _run(B, opt_b, 20, 0)
    buf = io.BytesIO()
    torch.save({"A": B.detach().clone(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    B2 = nn.Parameter(saved["A"])
    opt_b2 = earlier([B2], **kw)
    opt_b2.load_state_dict(saved["opt"])
    _run(B2, opt_b2, 20, 20)

    assert torch.equal(A, B2)
    assert torch.equal(opt.state[A]["exp_avg"], opt_b2.state[B2]["exp_avg"])
    assert opt.state[A]["step"] == opt_b2.state[B2]["step"] == 40


def test_batched_update_equals_one_optimizer_per_parameter():
    # Same-shape A's are stacked into one (P, n, r) update; different shapes go separately.
    params = [stiefel_param(12, 3, s, F64) for s in range(3)] + [stiefel_param(20, 4, 9, F64)]
    singles = [nn.Parameter(p.detach().clone()) for p in params]
    joint = earlier(params, lr=0.1, qr_every=3)
    alone = [earlier([p], lr=0.1, qr_every=3) for p in singles]
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        for p, q in zip(params, singles):
            p.grad = torch.randn(p.shape, generator=g, dtype=F64)
            q.grad = p.grad.clone()
        joint.step()
        for o in alone:
            o.step()
    for p, q in zip(params, singles):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    for p, q, o in zip(params, singles, alone):
        torch.testing.assert_close(joint.state[p]["exp_avg"], o.state[q]["exp_avg"], rtol=0, atol=1e-12)


def test_bf16_parameter_keeps_fp32_moments_and_stays_near_manifold():
    A = nn.Parameter(random_stiefel(64, 8, generator=torch.Generator().manual_seed(0)).mT.to(torch.bfloat16))
    opt = earlier([A], lr=0.05, qr_every=10)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        A.grad = torch.randn(A.shape, generator=g).to(torch.bfloat16)
        opt.step()
    assert A.dtype == torch.bfloat16
    assert stiefel_error(A.detach().mT) < 2e-2
    opt2 = earlier([A], lr=0.05)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[A]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[A]["exp_avg"], opt.state[A]["exp_avg"])


def test_rejects_a_non_orthonormal_initial_A():
    lora = LoRALinear(nn.Linear(16, 8), rank=4, alpha=8, init="standard")
    opt = earlier([lora.lora_A], lr=0.1)
    lora.lora_A.grad = torch.ones_like(lora.lora_A)
    with pytest.raises(ValueError, match=r"not orthonormal along its short side.*init='stiefel_b'"):
        opt.step()


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "invalid lr"),
    (dict(lr=float("nan")), "invalid lr"),
    (dict(betas=(1.0, 0.99)), "invalid betas"),
    (dict(betas=(0.9, -0.1)), "invalid betas"),
    (dict(eps=0.0), "invalid eps"),
    (dict(qr_every=-1), "invalid qr_every"),
    (dict(qr_every=2.5), "invalid qr_every"),
    (dict(solver="newton"), "valid solvers are closed_form, fixed_point"),
    (dict(iters=0), "invalid iters"),
    (dict(step_cap=1.5), "invalid step_cap"),
    (dict(step_cap="l2"), "invalid step_cap"),
    (dict(solver="fixed_point", step_cap=None), "needs a step cap"),
])
def test_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        earlier([stiefel_param(8, 2, 0)], **kwargs)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4)])
def test_rejects_parameters_that_are_not_matrices(shape):
    with pytest.raises(ValueError, match=r"must be matrices"):
        CayleyAdam([nn.Parameter(torch.zeros(shape))])


class TwoAdapters(nn.Module):
    def __init__(self, init="stiefel_a"):
        super().__init__()
        self.up = LoRALinear(nn.Linear(8, 32), rank=4, alpha=8, init=init)
        self.down = LoRALinear(nn.Linear(32, 8), rank=4, alpha=8, init=init)
        self.norm = nn.LayerNorm(8)


def test_one_betas_default_for_cayley_adam():
    # β2 = 0.99 (Li et al.) in the class and in build_optimizers; AdamW keeps its (0.9, 0.999).
    model = TwoAdapters()
    freeze_base(model)
    cayley, adamw = build_optimizers(model, lr=1e-3, stiefel_factor="A")
    assert cayley.defaults["betas"] == CayleyAdam([stiefel_param(8, 2, 0)]).defaults["betas"] == (0.9, 0.99)
    assert adamw.defaults["betas"] == (0.9, 0.999)


def test_build_optimizers_splits_A_and_B():
    model = TwoAdapters()
    freeze_base(model)
    cayley, adamw = build_optimizers(model, lr=1e-3, weight_decay=0.1, stiefel_factor="A")
    assert cayley.defaults["step_cap"] == 0.5 and cayley.defaults["solver"] == "closed_form"
    assert isinstance(cayley, CayleyAdam) and isinstance(adamw, torch.optim.AdamW)
    lrs = {p.shape: g["lr"] for g in cayley.param_groups for p in g["params"]}
    assert lrs == {(4, 8): pytest.approx(1e-3 * 32 ** 0.5), (4, 32): pytest.approx(1e-3 * 128 ** 0.5)}
    assert {id(p) for p in adamw.param_groups[0]["params"]} == {id(model.up.lora_B), id(model.down.lora_B)}
    assert adamw.param_groups[0]["weight_decay"] == 0.1 and adamw.defaults["fused"] is True
    (cayley2, _) = build_optimizers(model, lr=1e-3, stiefel_lr=0.3, stiefel_factor="A")
    assert [g["lr"] for g in cayley2.param_groups] == [0.3]
    (plain,) = build_optimizers(model, lr=1e-3, stiefel=False)
    assert len(plain.param_groups[0]["params"]) == 4


def test_adamw_is_fused_where_the_kernel_applies_and_steps_as_torch_default():
    """fora.optim.adamw: torch's fused kernel for plain fp32 CPU tensors, same iterates as torch's
    default (for-loop) AdamW to rounding; float64 tensors keep torch's default path."""
    from fora.optim import adamw
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(6, 4, generator=g), torch.randn(3, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in init] for _ in range(5)]
    iterates = []
    for make in (lambda ps: adamw(ps, lr=1e-2, weight_decay=0.1),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False)):
        ps = [nn.Parameter(t.clone()) for t in init]
        opt = make(ps)
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        iterates.append((opt.defaults["fused"], [p.detach() for p in ps]))
    (fused, ours), (_, ref) = iterates
    assert fused is True
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not adamw([nn.Parameter(torch.zeros(2, dtype=torch.float64))], lr=1e-3).defaults["fused"]


def test_build_optimizers_one_training_step_keeps_A_orthonormal():
    model = TwoAdapters()
    freeze_base(model)
    opts = build_optimizers(model, lr=1e-2, stiefel_factor="A")
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for o in opts:
            o.zero_grad()
        model.down(torch.relu(model.up(x))).pow(2).sum().backward()
        for o in opts:
            o.step()
    assert model.up.lora_B.abs().sum() > 0
    assert stiefel_error(model.up.lora_A.detach().mT) < 1e-5


def test_build_optimizers_refuses_stray_trainable_parameters_and_no_adapters():
    with pytest.raises(ValueError, match=r"not adapter parameters.*freeze_base"):
        build_optimizers(TwoAdapters(), lr=1e-3)             # the LayerNorm is still trainable
    with pytest.raises(ValueError, match="no LoRA adapters.*inject_lora"):
        build_optimizers(nn.Linear(3, 3), lr=1e-3)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    C = spd_with_gap(32, 4, 0).float()
    results = []
    for device in ("cpu", "cuda"):
        lora = LoRALinear(nn.Linear(32, 16, device=device, dtype=torch.bfloat16), 4, 8, init="stiefel_a",
                          generator=torch.Generator().manual_seed(0))
        opt = earlier([lora.lora_A], lr=0.1, qr_every=5)
        Cd = C.to(device)
        for _ in range(20):
            opt.zero_grad()
            (-torch.trace(lora.lora_A @ Cd @ lora.lora_A.T)).backward()
            opt.step()
        results.append(lora.lora_A.detach().cpu())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-4)
    assert stiefel_error(results[1].mT) < 1e-5


def _steps(params, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()


def test_reloading_a_stepped_optimizer_uses_the_loaded_moments():
    # The moments live in one stacked buffer per shape; loading a state_dict into an optimizer
    # that has already stepped must replace them, not keep stepping the stale buffer.
    params = [stiefel_param(12, 3, s) for s in range(3)]
    opt = earlier(params, lr=0.1, qr_every=0)
    _steps(params, opt, 3, 0)
    snap = ([p.detach().clone() for p in params], io.BytesIO())
    torch.save(opt.state_dict(), snap[1])
    _steps(params, opt, 4, 1)
    expected = [p.detach().clone() for p in params]
    _steps(params, opt, 2, 2)                      # move on, then rewind to the snapshot
    with torch.no_grad():
        for p, s in zip(params, snap[0]):
            p.copy_(s)
    snap[1].seek(0)
    opt.load_state_dict(torch.load(snap[1]))
    _steps(params, opt, 4, 1)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["closed_form", "fixed_point"])
def test_cayley_adam_step_on_a_stack_equals_dense_algorithm_2_per_point(solver):
    from fora.cayley_adam import cayley_adam_step

    n, r, steps = 9, 3, 4
    g = torch.Generator().manual_seed(3)
    X = torch.stack([random_stiefel(n, r, generator=g, dtype=F64) for _ in range(2)])
    grads = [torch.randn(2, n, r, generator=g, dtype=F64) for _ in range(steps)]
    refs = [list(dense_cayley_adam(X[i].clone(), [G[i] for G in grads], lr=0.3, solver=solver)) for i in range(2)]
    M, v = torch.zeros_like(X), torch.zeros(2, dtype=F64)
    for k, G in enumerate(grads, 1):
        X, M, v = cayley_adam_step(X, G, M, v, k, 0.3, betas=(0.9, 0.99), eps=1e-8, step_cap=0.5,
                                   solver=solver, iters=2, qr_every=0)
        for i in range(2):
            torch.testing.assert_close(X[i], refs[i][k - 1][0], rtol=0, atol=1e-10)


def test_a_parameter_skipping_a_step_keeps_every_moment_right():
    # Buckets regroup when an A has no gradient for a step; each A's moments must follow it.
    params = [stiefel_param(12, 3, s, F64) for s in range(3)]
    singles = [nn.Parameter(p.detach().clone()) for p in params]
    joint = earlier(params, lr=0.1, qr_every=0)
    alone = [earlier([q], lr=0.1, qr_every=0) for q in singles]
    g = torch.Generator().manual_seed(4)
    for step in range(6):
        for i, (p, q) in enumerate(zip(params, singles)):
            grad = torch.randn(p.shape, generator=g, dtype=F64)
            skip = step in (2, 3) and i == 1
            p.grad, q.grad = (None, None) if skip else (grad, grad.clone())
        joint.step()
        for o in alone:
            o.step()
    for p, q, o in zip(params, singles, alone):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        torch.testing.assert_close(joint.state[p]["exp_avg"], o.state[q]["exp_avg"], rtol=0, atol=1e-12)



def _nearest_point(monkeypatch, erratum, steps, dtype=torch.float32):
    """min ‖A − T‖² over St(64, 8) (optimum: the polar factor of T) under the ablation's rule;
    returns ‖A − A*‖_F and ‖M‖_F after each step (stops once the iterate is not finite)."""
    import fora.cayley_adam as ca

    if erratum:  # the literal W = M̂ Xᵀ − X M̂ᵀ, i.e. the direction M̂ itself
        monkeypatch.setattr(ca, "canonical_direction", lambda X, G: G)
    n, r = 64, 8
    T = torch.randn(r, n, generator=torch.Generator().manual_seed(7), dtype=dtype)
    U, _, Vh = torch.linalg.svd(T.double(), full_matrices=False)
    A = stiefel_param(n, r, 8, dtype)
    opt = earlier([A], lr=0.2)
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
    # the moment grows geometrically, the capped steps wander at the starting distance, and the
    # iterate turns NaN in fp32.
    dist, _ = _nearest_point(monkeypatch, erratum=False, steps=300)
    assert dist[-1] < 1e-4
    dist, moment = _nearest_point(monkeypatch, erratum=True, steps=300)
    assert moment[39] > 1.5 ** 39 * moment[0]               # at least geometric growth
    finite = [d for d in dist if math.isfinite(d)]
    assert min(finite) > 0.5 * dist[0]                       # never halfway to the optimum
    assert len(dist) < 300 and not math.isfinite(dist[-1])   # and then NaN in fp32
