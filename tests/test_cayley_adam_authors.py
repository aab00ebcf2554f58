"""CayleyAdam with the authors' rule (FoRA's default) on tall column-orthonormal B parameters.

The reference is a step-by-step transcription, on dense n x n matrices in float64, of the rule as
the method's description states it (scalar second moment, β = (0.9, 0.99), ε outside the square
root, α = min(lr, 1/‖W‖₁) with the induced 1-norm, fixed-point sweeps from Y = X − αWX, the
moment re-set to (1 − β1ᵏ)(√v̂ + ε) W X at the new X, a sign-fixed QR first on every T-th step),
written here with nothing from fora.stiefel.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fora.cayley_adam import CayleyAdam, cayley_adam_step, l1_step
from fora.stiefel import canonical_direction, random_stiefel, skew_apply, skew_norm_l1, stiefel_error

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def dense_authors(X, grads, *, lr, iters=5, qr_every=100, solver="fixed_point", eps=1e-8):
    """Yields (X, α, whether 1/‖W‖₁ bound) after each step."""
    b1, b2 = 0.9, 0.99
    n, r = X.shape
    eye = torch.eye(n, dtype=F64)
    M, v = torch.zeros(n, r, dtype=F64), 0.0
    for k, G in enumerate(grads, 1):
        if qr_every and k % qr_every == 0:
            Q, R = torch.linalg.qr(X)
            X = Q * torch.sign(torch.diagonal(R))
        M = b1 * M + (1 - b1) * G
        v = b2 * v + (1 - b2) * float((G * G).sum())
        M_hat, v_hat = M / (1 - b1 ** k), v / (1 - b2 ** k)
        W_hat = M_hat @ X.T - 0.5 * X @ (X.T @ M_hat @ X.T)
        W = (W_hat - W_hat.T) / (math.sqrt(v_hat) + eps)
        norm1 = float(W.abs().sum(dim=0).max())                      # max column sum of |W|
        alpha = min(lr, 1 / norm1)
        if solver == "fixed_point":
            Y = X - alpha * W @ X
            for _ in range(iters):
                Y = X - alpha / 2 * W @ (X + Y)
        else:
            Y = torch.linalg.solve(eye + alpha / 2 * W, (eye - alpha / 2 * W) @ X)
        M = (1 - b1 ** k) * (math.sqrt(v_hat) + eps) * W @ Y
        X = Y
        yield X, alpha, 1 / norm1 < lr


def tall(n, r, seed, dtype=F64):
    return nn.Parameter(random_stiefel(n, r, generator=torch.Generator().manual_seed(seed), dtype=dtype))


@pytest.mark.parametrize("solver", ["fixed_point", "closed_form"])
@pytest.mark.parametrize("n, r, lr, qr_every, binds", [
    (9, 3, 1e-3, 0, False),      # the authors' lr: the 1/‖W‖₁ bound never binds
    (16, 4, 5.0, 0, True),       # a large cap: the bound binds on every step
    (12, 2, 1e-3, 3, False),     # QR inside the run (steps 3 and 6)
    (20, 5, 1.3, 4, None),       # binding on some steps only
])
def test_step_equals_the_dense_transcription(solver, n, r, lr, qr_every, binds):
    steps = 7
    B = tall(n, r, 11)
    g = torch.Generator().manual_seed(12)
    grads = [torch.randn(n, r, generator=g, dtype=F64) * (1 + k) for k in range(steps)]
    opt = CayleyAdam([B], lr=lr, qr_every=qr_every, solver=solver)
    bound = []
    for G, (X_ref, _, did_bind) in zip(grads, dense_authors(B.detach().clone(), grads, lr=lr,
                                                             qr_every=qr_every, solver=solver)):
        B.grad = G.clone()
        opt.step()
        torch.testing.assert_close(B.detach(), X_ref, rtol=0, atol=1e-10)
        bound.append(did_bind)
    if binds is not None:
        assert all(bound) if binds else not any(bound)
    else:
        assert any(bound) and not all(bound)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 40), st.data(), st.integers(1, 150), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.float64]), st.floats(-3.0, 3.0))
def test_BtB_stays_the_identity_after_any_number_of_steps(n, data, steps, seed, dtype, log_scale):
    r = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(seed)
    B = tall(n, r, seed, dtype)
    opt = CayleyAdam([B])                           # the authors' defaults: lr 1e-3, QR every 100
    for _ in range(steps):
        B.grad = torch.randn(B.shape, generator=g, dtype=dtype) * 10 ** log_scale
        opt.step()
    assert stiefel_error(B.detach()) < (2e-5 if dtype == torch.float32 else 1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 30), st.data(), st.integers(0, 2**31 - 1))
def test_the_generator_is_skew_symmetric_of_rank_at_most_2r(n, data, seed):
    r = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(seed)
    X = random_stiefel(n, r, generator=g, dtype=F64)
    D = canonical_direction(X, torch.randn(n, r, generator=g, dtype=F64))
    W = skew_apply(D, X, torch.eye(n, dtype=F64))   # Eq. 5's W, column by column
    torch.testing.assert_close(W, -W.T, rtol=0, atol=1e-12)
    assert torch.linalg.matrix_rank(W) <= 2 * r
    torch.testing.assert_close(skew_norm_l1(D, X, chunk=3), W.abs().sum(dim=0).max(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("lr", [1e-4, 1e-2, 0.1, 1.0, 10.0])
def test_l1_step_equals_min_of_lr_and_the_inverse_induced_1_norm(lr):
    g = torch.Generator().manual_seed(5)
    X = torch.stack([random_stiefel(24, 3, generator=g, dtype=F64) for _ in range(4)])
    D = torch.randn(4, 24, 3, generator=g, dtype=F64) * torch.tensor([0.01, 0.3, 1.0, 5.0], dtype=F64)[:, None, None]
    expected = [min(lr, 1 / float(skew_apply(D[i], X[i], torch.eye(24, dtype=F64)).abs().sum(0).max()))
                for i in range(4)]
    torch.testing.assert_close(l1_step(X, D, lr), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)


def test_a_wide_parameter_is_stepped_as_its_transpose():
    B = tall(14, 3, 7)
    A = nn.Parameter(B.detach().mT.clone())
    opt_b, opt_a = CayleyAdam([B], lr=0.3, qr_every=2), CayleyAdam([A], lr=0.3, qr_every=2)
    g = torch.Generator().manual_seed(8)
    for _ in range(5):
        G = torch.randn(14, 3, generator=g, dtype=F64)
        B.grad, A.grad = G, G.mT.clone()
        opt_b.step()
        opt_a.step()
    torch.testing.assert_close(A.detach().mT, B.detach(), rtol=0, atol=1e-13)
    assert opt_a.state[A]["exp_avg"].shape == A.shape


def test_a_stack_equals_one_point_at_a_time():
    g = torch.Generator().manual_seed(9)
    X = torch.stack([random_stiefel(11, 2, generator=g, dtype=F64) for _ in range(3)])
    grads = [torch.randn(3, 11, 2, generator=g, dtype=F64) * torch.tensor([0.1, 1, 30.0], dtype=F64)[:, None, None]
             for _ in range(5)]
    refs = [list(dense_authors(X[i].clone(), [G[i] for G in grads], lr=0.5, qr_every=2)) for i in range(3)]
    M, v = torch.zeros_like(X), torch.zeros(3, dtype=F64)
    for k, G in enumerate(grads, 1):
        X, M, v = cayley_adam_step(X, G, M, v, k, 0.5, betas=(0.9, 0.99), eps=1e-8, step_cap="l1",
                                   solver="fixed_point", iters=5, qr_every=2)
        for i in range(3):
            torch.testing.assert_close(X[i], refs[i][k - 1][0], rtol=0, atol=1e-10)
