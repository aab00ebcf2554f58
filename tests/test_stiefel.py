"""Properties of fora.stiefel in float64, checked against dense n x n formulas built here only."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fora.stiefel import (canonical_direction, cayley_fixed_point, cayley_step, effective_rank,
                          project_tangent, qr_retract, random_stiefel, skew_apply, skew_norm,
                          stiefel_error)

F64 = torch.float64


@st.composite
def point_and_direction(draw, max_n=40):
    """X on St(n, r) with r <= n/2, and a Gaussian direction G (n x r)."""
    n = draw(st.integers(2, max_n))
    r = draw(st.integers(1, n // 2))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    X = random_stiefel(n, r, generator=gen, dtype=F64)
    G = torch.randn(n, r, generator=gen, dtype=F64)
    return X, G


def dense_W(G, X):
    return G @ X.T - X @ G.T


def dense_cayley(X, G, tau):
    n = X.shape[0]
    W, eye = dense_W(G, X), torch.eye(n, dtype=F64)
    return torch.linalg.solve(eye + tau / 2 * W, (eye - tau / 2 * W) @ X)


def orth_err(X):
    return (X.T @ X - torch.eye(X.shape[1], dtype=F64)).abs().max().item()


@given(point_and_direction(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_skew_apply_is_a_skew_matrix(XG, k, seed):
    X, G = XG
    n = X.shape[0]
    W = skew_apply(G, X, torch.eye(n, dtype=F64))   # the operator, materialised in the test only
    torch.testing.assert_close(W, -W.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(W, dense_W(G, X), rtol=0, atol=1e-12)
    Z = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=F64)  # replays from the drawn seed
    torch.testing.assert_close(skew_apply(G, X, Z), dense_W(G, X) @ Z)
    torch.testing.assert_close(skew_norm(G, X), torch.linalg.matrix_norm(dense_W(G, X)))


@given(point_and_direction(), st.floats(0.0, 1e3))
def test_cayley_step_stays_on_manifold_for_any_step(XG, tau):
    # Exact in real arithmetic for every τ; in float64 the rounding of the Gram blocks and of the
    # 2r x 2r solve grows with τ‖G‖₂ (not τ‖W‖₂: with G nearly parallel to X, ‖W‖ is tiny while
    # the blocks still carry ‖G‖² - Hypothesis found 2.1e-11 at τ = 375, ‖W‖₂ = 0.0025, ‖G‖₂ = 1.3;
    # a flat 1e-12 failed at τ = 86 on St(2, 1) with 1.9e-12).
    X, G = XG
    g = torch.linalg.matrix_norm(G, ord=2).item()
    assert orth_err(cayley_step(X, G, tau)) < 5e-12 * (1 + tau * g)


@given(point_and_direction(), st.floats(0.0, 50.0))
def test_cayley_closed_form_equals_dense_formula(XG, tau):
    # The Gram blocks carry ‖G‖², so rounding grows with τ‖G‖₂² (G nearly parallel to X has a tiny
    # W, hence a huge G once ‖W‖₂ = 1: Hypothesis found 7.3e-10 at τ = 1, ‖G‖₂ = 2.9e3 on St(2, 1)).
    X, G = XG
    G = G / torch.linalg.matrix_norm(dense_W(G, X), ord=2)   # ‖W‖₂ = 1, so τ‖W‖ spans 0..50
    g = torch.linalg.matrix_norm(G, ord=2).item()
    torch.testing.assert_close(cayley_step(X, G, tau), dense_cayley(X, G, tau), rtol=0,
                               atol=1e-10 + 1e-15 * tau * g * g)


@given(point_and_direction(), st.floats(0.01, 1.5))
def test_fixed_point_converges_to_closed_form_when_contractive(XG, c):
    X, G = XG
    tau = c / torch.linalg.matrix_norm(dense_W(G, X), ord=2).item()    # τ‖W‖₂ = c < 2
    torch.testing.assert_close(cayley_fixed_point(X, G, tau, iters=200), cayley_step(X, G, tau),
                               rtol=0, atol=1e-10)


def test_fixed_point_diverges_where_closed_form_does_not():
    gen = torch.Generator().manual_seed(0)
    X = random_stiefel(30, 4, generator=gen, dtype=F64)
    G = torch.randn(30, 4, generator=gen, dtype=F64)
    tau = 10.0 / torch.linalg.matrix_norm(dense_W(G, X), ord=2).item()   # τ‖W‖₂ = 10
    assert orth_err(cayley_fixed_point(X, G, tau, iters=20)) > 1.0
    assert orth_err(cayley_step(X, G, tau)) < 1e-12


def test_cayley_step_moves_downhill_along_minus_WX():
    gen = torch.Generator().manual_seed(1)
    X = random_stiefel(20, 3, generator=gen, dtype=F64)
    G = torch.randn(20, 3, generator=gen, dtype=F64)
    h = 1e-6
    deriv = (cayley_step(X, G, h) - X) / h
    torch.testing.assert_close(deriv, -dense_W(G, X) @ X, rtol=0, atol=1e-5)


@given(point_and_direction())
def test_project_tangent_idempotent_and_tangent(XG):
    X, V = XG
    P = project_tangent(X, V)
    torch.testing.assert_close(project_tangent(X, P), P, rtol=0, atol=1e-12)
    S = X.T @ P
    torch.testing.assert_close(S + S.T, torch.zeros_like(S), rtol=0, atol=1e-12)


@given(point_and_direction())
def test_canonical_direction_makes_WX_the_tangent_projection(XG):
    X, G = XG
    D = canonical_direction(X, G)
    torch.testing.assert_close(dense_W(D, X) @ X, project_tangent(X, G), rtol=0, atol=1e-12)


@given(point_and_direction(), st.integers(1, 12), st.floats(-4.0, 4.0), st.integers(0, 2**31 - 1))
def test_lemma1_singular_values_of_sBA_are_those_of_sB_along_cayley_moves(XG, d_out, s, seed):
    # Lemma 1 is a statement about the A that Cayley steps produce, not about svdvals: A starts at
    # random_stiefel and moves by several Cayley steps (Eq. 6) with large, random directions; then
    # σ(s B A) = |s| σ(B) (dense SVD of the n-wide product) and erank(s B A) = erank(B).
    X, G = XG
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        X = cayley_step(X, G, 2.0)
        G = torch.randn(G.shape, generator=gen, dtype=F64) * 3
    A = X.T                                            # (r, n) with orthonormal rows
    B = torch.randn(d_out, A.shape[0], generator=gen, dtype=F64)
    s_BA, s_B = torch.linalg.svdvals(s * B @ A), abs(s) * torch.linalg.svdvals(B)
    k = s_B.numel()
    torch.testing.assert_close(s_BA[:k], s_B, rtol=1e-10, atol=1e-12)
    assert s_BA.numel() == k or s_BA[k:].abs().max() < 1e-10 * (1 + s_B.max())
    if s != 0:
        assert math.isclose(effective_rank(s * B @ A), effective_rank(B), rel_tol=1e-9)


@given(point_and_direction())
def test_qr_retract_is_identity_on_the_manifold(XG):
    X, G = XG
    torch.testing.assert_close(qr_retract(X), X, rtol=0, atol=1e-12)
    Z = X + 0.1 * G                                    # off the manifold, full rank
    Q = qr_retract(Z)
    assert orth_err(Q) < 1e-12
    R = Q.T @ Z                                        # Z = Q R: R upper triangular, diag >= 0
    torch.testing.assert_close(torch.tril(R, -1), torch.zeros_like(R), rtol=0, atol=1e-12)
    assert (torch.diagonal(R) >= 0).all()


def test_random_stiefel_orthonormal_seeded_and_validated():
    X = random_stiefel(50, 7, generator=torch.Generator().manual_seed(3))
    assert X.shape == (50, 7) and X.dtype == torch.float32
    assert stiefel_error(X) < 1e-5
    assert torch.equal(X, random_stiefel(50, 7, generator=torch.Generator().manual_seed(3)))
    assert random_stiefel(8, 8, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="0 < r <= n"):
        random_stiefel(4, 5)
    with pytest.raises(ValueError, match="0 < r <= n"):
        random_stiefel(4, 0)


@given(point_and_direction())
def test_stiefel_error_is_max_abs_of_gram_minus_identity(XG):
    X, G = XG
    Z = X + 1e-3 * G
    expected = np.abs(Z.numpy().T @ Z.numpy() - np.eye(Z.shape[1])).max()
    assert math.isclose(stiefel_error(Z), expected, rel_tol=1e-9, abs_tol=1e-15)


# 0 or >= 1e-100: a subnormal σ (5e-324) underflows to 0 in U diag(σ) Vᵀ, a different matrix
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-100, 10.0)), min_size=1, max_size=10), st.integers(0, 2**31 - 1))
def test_effective_rank_matches_entropy_of_singular_values(sigmas, seed):
    s = np.array(sigmas)
    gen = torch.Generator().manual_seed(seed)
    k = len(s)
    U = random_stiefel(k + 3, k, generator=gen, dtype=F64)
    V = random_stiefel(k + 5, k, generator=gen, dtype=F64)
    M = U @ torch.diag(torch.tensor(s)) @ V.T
    if s.max() == 0:
        assert effective_rank(M) == 0.0
        return
    p = s[s > 1e-12 * s.max()] / s[s > 1e-12 * s.max()].sum()
    p = p[p > 1e-9]    # relative sizes below the SVD's resolution are noise in both computations
    assert math.isclose(effective_rank(M), float(np.exp(-(p * np.log(p)).sum())), rel_tol=1e-6)


def test_effective_rank_extremes():
    assert math.isclose(effective_rank(torch.eye(6)), 6.0, rel_tol=1e-9)
    assert math.isclose(effective_rank(torch.outer(torch.arange(1.0, 5.0), torch.ones(3))), 1.0, rel_tol=1e-9)


def test_fixed_point_rejects_zero_iterations():
    X = random_stiefel(6, 2)
    with pytest.raises(ValueError, match="iters >= 1"):
        cayley_fixed_point(X, X, 0.1, iters=0)


def test_random_stiefel_is_haar_distributed():
    # Haar measure on St(n, r) is invariant under X -> X D for every sign matrix D = diag(±1), so
    # every entry has mean 0 (and, being a coordinate of a uniform unit vector, E X_ij² = 1/n).
    # Without the sign fix of QR, LAPACK's diag(R) has the sign of -Z_11, so X_11 = Z_11 / R_11 is
    # always negative (mean -E|z_1| / ‖z‖ ≈ -0.4 for n = 4).
    # Bound: |X_ij| <= 1, so by Hoeffding P(|mean| >= t) <= 2 exp(-N t² / 2) and, for X_ij² in
    # [0, 1], P(|mean - 1/n| >= t) <= 2 exp(-2 N t²). N = 1000, t = 0.2: 2 e^-20 + 2 e^-80 per
    # entry, < 4e-8 over the n r = 8 entries: the false-alarm rate of a fresh seed (this seed is
    # fixed, so the test is deterministic).
    n, r, N, t = 4, 2, 1000, 0.2
    gen = torch.Generator().manual_seed(0)
    X = torch.stack([random_stiefel(n, r, generator=gen, dtype=F64) for _ in range(N)])
    assert X.mean(0).abs().max() < t
    assert (X.square().mean(0) - 1 / n).abs().max() < t


@pytest.mark.parametrize("fn, args", [
    (qr_retract, ()), (project_tangent, ("X",)), (canonical_direction, ("X",)),
    (skew_norm, ("G",)), (cayley_step, ("X", 0.1)), (cayley_fixed_point, ("X", 0.1, 2)),
])
def test_point_functions_reject_an_untransposed_lora_A(fn, args):
    # A LoRA A is (r, d_in) with orthonormal rows: wide. Each function takes X = Aᵀ (tall).
    A = random_stiefel(10, 3).mT
    with pytest.raises(ValueError, match=r"n >= r \(orthonormal columns, such as a LoRA B\), got shape \(3, 10\); "
                                         r"for a LoRA A of shape \(r, d_in\) pass A.mT"):
        if fn is skew_norm:
            fn(A, A)                                   # skew_norm(G, X): X is the point
        else:
            fn(A, *[A if a in ("X", "G") else a for a in args])
    with pytest.raises(ValueError, match="pass A.mT"):
        skew_apply(A, A, A)


def test_stiefel_error_reads_a_lora_A_directly_and_refuses_the_wrong_orientation():
    gen = torch.Generator().manual_seed(5)
    A = random_stiefel(12, 4, generator=gen, dtype=F64).mT        # (r, d_in), orthonormal rows
    Z = A + 1e-3 * torch.randn(A.shape, generator=gen, dtype=F64)
    expected = np.abs(Z.numpy() @ Z.numpy().T - np.eye(4)).max()  # max |A Aᵀ − I|
    assert math.isclose(stiefel_error(Z, rows=True), expected, rel_tol=1e-12)
    assert stiefel_error(Z, rows=True) == stiefel_error(Z.mT)
    assert stiefel_error(A, rows=True) < 1e-14
    with pytest.raises(ValueError, match=r"got shape \(4, 12\); for a LoRA A of shape \(r, d_in\) "
                                         r"call stiefel_error\(A, rows=True\)"):
        stiefel_error(A)                               # the silent ≈ 1.0 of the column reading
    # An explicit rows=False is the column reading, whatever the shape (a wide X is never on St).
    expected_cols = np.abs(Z.numpy().T @ Z.numpy() - np.eye(12)).max()
    assert math.isclose(stiefel_error(Z, rows=False), expected_cols, rel_tol=1e-12) and expected_cols > 0.5
    assert stiefel_error(random_stiefel(6, 6, generator=gen, dtype=F64)) < 1e-14   # square: either reading
