"""Geometry of the Stiefel manifold St(n, r) = {X in R^{n x r} : XᵀX = I_r} as small pure functions.

Convention. Every function here works on a *column* matrix ``X`` of shape (n, r) with
orthonormal columns: FoRA's up-projection B (d_out, r) is such a point as it is. The ablation's
down-projection ``A`` (r, d_in) has orthonormal *rows*, so its point is ``X = A.mT``; callers
transpose at the boundary, and ``stiefel_error(A, rows=True)`` is ``max |A Aᵀ − I|`` directly. A
wide matrix (fewer rows than columns) has no orthonormal columns, so the functions taking a point
X raise on one instead of silently computing with the wrong orientation.

The step functions (projections, skew_apply, skew_norm, the Cayley steps, qr_retract) also take
a batch of points (..., n, r) (the optimizer stacks the A's of one shape); ``tau`` then
broadcasts as (..., 1, 1). Nothing n x n is ever formed: the skew matrix W = G Xᵀ − X Gᵀ of
Eq. (5) has rank <= 2r and is applied as ``W Z = G (Xᵀ Z) − X (Gᵀ Z)``, so every function costs
O(n r²) (+ O(r³)).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "random_stiefel", "project_tangent", "canonical_direction", "skew_apply", "skew_norm",
    "skew_norm_l1", "cayley_step", "cayley_coefficients", "skew_norm_from_grams", "cayley_fixed_point",
    "qr_retract",
    "stiefel_error", "stiefel_residual", "effective_rank",
]


def _check_point(name: str, X: Tensor, fix: str = "pass A.mT") -> None:
    # A LoRA A passed without .mT is wide, and every formula here would quietly use A's columns.
    if X.ndim < 2 or X.shape[-2] < X.shape[-1]:
        raise ValueError(f"{name} takes a point X of shape (..., n, r) with n >= r (orthonormal columns, "
                         f"such as a LoRA B), got shape {tuple(X.shape)}; for a LoRA A of shape (r, d_in) {fix}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # QR / solves are not implemented for half types; float64 stays float64.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def qr_retract(X: Tensor) -> Tensor:
    """Sign-fixed QR retraction ``X -> qf(X)`` onto St(n, r).

    Args:
        X: (n, r) with n >= r and full column rank.
    Returns:
        Q: (n, r), QᵀQ = I, from ``X = Q R`` with diag(R) >= 0. The sign fix makes the map
        unique, so a point already on the manifold is returned unchanged (up to rounding).
        Computed in fp32 (or fp64) and cast back to ``X.dtype``.
    Raises:
        ValueError for a wide X (a LoRA A: use ``qr_retract(A.mT).mT``).
    """
    _check_point("qr_retract", X)
    Q, R = torch.linalg.qr(X.to(_work_dtype(X.dtype)), mode="reduced")
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (Q * sign.unsqueeze(-2)).to(X.dtype)


def random_stiefel(n: int, r: int, *, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Tensor:
    """A random point of St(n, r): the sign-fixed Q factor of an n x r standard Gaussian.

    The sign fix makes the distribution Haar (uniform on the manifold). The Gaussian is drawn on
    the generator's device (CPU when none is given) so a seed gives the same matrix everywhere.

    Returns:
        X: (n, r) with XᵀX = I_r. For a LoRA A use ``random_stiefel(d_in, r).mT``.
    """
    if r <= 0 or n <= 0 or r > n:
        raise ValueError(f"random_stiefel needs 0 < r <= n, got n={n}, r={r}; an n x r matrix has at "
                         "most n orthonormal columns: lower r (for a LoRA A use random_stiefel(d_in, r).mT)")
    src = generator.device if generator is not None else torch.device("cpu")
    Z = torch.randn(n, r, generator=generator, dtype=_work_dtype(dtype), device=src)
    return qr_retract(Z).to(device=device, dtype=dtype)


def stiefel_error(X: Tensor, *, rows: bool | None = None) -> float:
    """Distance from the manifold (Eq. 4): ``max_ij |(XᵀX − I)_ij|`` (max-abs norm), as a float.

    Args:
        X: (..., n, r), a point with orthonormal columns; or, with ``rows=True``, a matrix with
            orthonormal rows such as a LoRA A (r, d_in): then the error is ``max |X Xᵀ − I|``
            (``stiefel_error(A, rows=True) == stiefel_error(A.mT)``).
        rows: True: rows orthonormal; False: columns. None (default): columns, and a wide X
            raises, since its columns cannot be orthonormal (it is an un-transposed LoRA A).
    Raises:
        ValueError for a wide X when ``rows`` is not given.
    """
    return stiefel_residual(X, rows=rows).item()


def stiefel_residual(X: Tensor, *, rows: bool | None = None) -> Tensor:
    """`stiefel_error` as a 0-d tensor on X's device: no device sync, so that many factors can be
    measured and read back at once. Same arguments and errors as `stiefel_error`."""
    if rows is None:
        _check_point("stiefel_error", X, "call stiefel_error(A, rows=True)")
    Xw = X.detach().to(_work_dtype(X.dtype))
    if rows:
        Xw = Xw.mT
    gram = Xw.mT @ Xw
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (gram - eye).abs().max()


def project_tangent(X: Tensor, V: Tensor) -> Tensor:
    """Project V onto the tangent space at X: ``V − X sym(Xᵀ V)``, sym(M) = (M + Mᵀ)/2.

    Args:
        X: (n, r) on St(n, r). V: (n, r).
    Returns:
        (n, r) tangent vector T with XᵀT + TᵀX = 0. Idempotent.
    """
    _check_point("project_tangent", X)
    XtV = X.mT @ V
    return V - X @ (0.5 * (XtV + XtV.mT))


def canonical_direction(X: Tensor, G: Tensor) -> Tensor:
    """``G − ½ X (Xᵀ G)``: the matrix whose Eq. (5) skew W satisfies ``W X = project_tangent(X, G)``.

    With plain G, ``W X = G − X Gᵀ X``, which doubles the skew part of XᵀG (the motion of X inside
    its own span); with this direction W X is exactly the tangent projection of G (the canonical
    metric of Wen & Yin 2013; Li et al. 2020, Alg. 2: Ŵ = M Xᵀ − ½ X (Xᵀ M Xᵀ), W = Ŵ − Ŵᵀ).
    """
    _check_point("canonical_direction", X)
    return G - 0.5 * (X @ (X.mT @ G))


def skew_apply(G: Tensor, X: Tensor, Z: Tensor) -> Tensor:
    """Apply ``W = G Xᵀ − X Gᵀ`` (Eq. 5, skew-symmetric, rank <= 2r) to Z without forming W.

    Args:
        G, X: (n, r). Z: (n, k).
    Returns:
        W Z = G (Xᵀ Z) − X (Gᵀ Z), shape (n, k), cost O(n r k).
    """
    _check_point("skew_apply", X)
    return G @ (X.mT @ Z) - X @ (G.mT @ Z)


def skew_norm(G: Tensor, X: Tensor) -> Tensor:
    """Frobenius norm of ``W = G Xᵀ − X Gᵀ`` (an upper bound of its spectral norm), in O(n r²).

    ‖W‖²_F = 2 ⟨GᵀG, XᵀX⟩ − 2 ⟨XᵀG, (XᵀG)ᵀ⟩ (r x r Gram blocks only). G, X: (..., n, r);
    returns shape (...) (batched over leading dims, 0-d for plain matrices).
    """
    _check_point("skew_norm", X)
    return skew_norm_from_grams(X.mT @ G, X.mT @ X, G.mT @ G)


def skew_norm_l1(G: Tensor, X: Tensor, chunk: int = 1024) -> Tensor:
    """Induced 1-norm ``‖W‖₁ = max_j Σ_i |W_ij|`` of ``W = G Xᵀ − X Gᵀ`` (Eq. 5), exactly.

    The one quantity here that needs W's entries: W is formed ``chunk`` columns at a time, so the
    cost is O(n² r) time but O(n · chunk) memory. G, X: (..., n, r); returns shape (...).
    """
    _check_point("skew_norm_l1", X)
    n = X.shape[-2]
    best = torch.zeros(X.shape[:-2], dtype=X.dtype, device=X.device)
    for j in range(0, n, chunk):
        cols = G @ X[..., j:j + chunk, :].mT - X @ G[..., j:j + chunk, :].mT   # W[:, j:j+chunk]
        best = torch.maximum(best, cols.abs().sum(dim=-2).amax(dim=-1))
    return best


def skew_norm_from_grams(XtG: Tensor, XtX: Tensor, GtG: Tensor) -> Tensor:
    """``skew_norm`` from the r x r blocks XᵀG, XᵀX, GᵀG (for callers that already hold them)."""
    sq = 2 * (GtG * XtX).sum(dim=(-2, -1)) - 2 * (XtG * XtG.mT).sum(dim=(-2, -1))
    return sq.clamp_min(0).sqrt()


def cayley_step(X: Tensor, G: Tensor, tau: float | Tensor) -> Tensor:
    """Cayley curve ``Y(τ) = (I + τ/2 W)⁻¹ (I − τ/2 W) X`` with W = G Xᵀ − X Gᵀ, closed form.

    Implements Eq. (6) by Sherman–Morrison–Woodbury (Wen & Yin 2013, Lemma 4): with
    U = [G, X], V = [X, −G] (n x 2r, W = U Vᵀ),

        Y(τ) = X − τ U (I_2r + τ/2 Vᵀ U)⁻¹ Vᵀ X

    one 2r x 2r solve. Vᵀ U = [[XᵀG, XᵀX], [−GᵀG, −GᵀX]] and Vᵀ X = [[XᵀX], [−GᵀX]] are built from
    three r x r Gram blocks, so the cost is 5 n r² + O(r³). YᵀY = I holds for every τ (a Cayley
    transform of a skew matrix is orthogonal), so the step size needs no cap for correctness.
    ``Y(τ)`` is a descent curve for a loss with gradient G: dY/dτ at 0 is −W X.

    Args:
        X: (n, r) on St(n, r). G: (n, r) descent direction (gradient or Adam moment).
        tau: step size >= 0 (float, or a tensor broadcastable to (..., 1, 1) for a batch).
    Returns:
        Y: (n, r) on St(n, r).
    """
    _check_point("cayley_step", X)
    Z1, Z2 = cayley_coefficients(X.mT @ G, X.mT @ X, G.mT @ G, tau)
    return X - tau * (G @ Z1 + X @ Z2)


def cayley_coefficients(XtG: Tensor, XtX: Tensor, GtG: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor]:
    """The r x r matrices (Z1, Z2) with ``Y(τ) = X − τ (G Z1 + X Z2)`` (Eq. 6 by SMW, see
    ``cayley_step``), from the Gram blocks XᵀG, XᵀX, GᵀG: one 2r x 2r solve, no n-sized work."""
    r = XtX.shape[-1]
    VtU = torch.cat([torch.cat([XtG, XtX], -1), torch.cat([-GtG, -XtG.mT], -1)], -2)   # (2r, 2r)
    VtX = torch.cat([XtX, -XtG.mT], -2)                                               # (2r, r)
    lhs = torch.eye(2 * r, dtype=XtX.dtype, device=XtX.device) + (0.5 * tau) * VtU
    # solve_ex: no error check, hence no device sync inside the optimizer step; lhs is invertible
    # because det(I_2r + τ/2 VᵀU) = det(I_n + τ/2 W) != 0 for skew W.
    Z, _ = torch.linalg.solve_ex(lhs, VtX)
    return Z[..., :r, :], Z[..., r:, :]


def cayley_fixed_point(X: Tensor, G: Tensor, tau: float | Tensor, iters: int) -> Tensor:
    """Eq. (6) by the paper's fixed-point iteration (Li, Li & Todorovic 2020, Alg. 2).

    ``Y₀ = X − τ W X``, then ``Y ← X − τ/2 · W (X + Y)`` ``iters`` times, W = G Xᵀ − X Gᵀ. A
    contraction with limit Eq. (6) when τ‖W‖₂ < 2; the result is only approximately on the
    manifold (error O((τ‖W‖/2)^iters)), hence the step cap and the periodic QR retraction.

    W maps any Z into span{G, X} (W Z = G (Xᵀ Z) − X (Gᵀ Z)), so every iterate is Y = X P + G Q
    with r x r coefficients; the sweeps run on those, through the Gram blocks XᵀX, XᵀG, GᵀG, and
    only the result is formed at size n: 5 n r² + iters · O(r³).
    """
    _check_point("cayley_fixed_point", X)
    if iters < 1:
        raise ValueError(f"cayley_fixed_point needs iters >= 1, got {iters}; use 5 (the authors) or more")
    XtX, XtG, GtG = X.mT @ X, X.mT @ G, G.mT @ G
    GtX = XtG.mT

    def apply_w(P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
        # W (X P + G Q) = G (XᵀX P + XᵀG Q) − X (GᵀX P + GᵀG Q), in coefficients (of X, of G)
        return -(GtX @ P + GtG @ Q), XtX @ P + XtG @ Q

    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand_as(XtX)
    WP, WQ = apply_w(eye, torch.zeros_like(XtX))         # W X
    P, Q = eye - tau * WP, -tau * WQ                     # Y₀ = X − τ W X
    for _ in range(iters):
        WP, WQ = apply_w(eye + P, Q)                     # W (X + Y)
        P, Q = eye - (0.5 * tau) * WP, -(0.5 * tau) * WQ  # Y = X − τ/2 W (X + Y)
    return X @ P + G @ Q


def effective_rank(M: Tensor, eps: float = 1e-12) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(H(p))``, ``p_i = σ_i / Σ_j σ_j``.

    Args:
        M: any (m, n) matrix, e.g. ΔW = g s B A (by Lemma 1 the same as erank(A) when BᵀB = I).
    Returns:
        erank in [1, min(m, n)] as a float; 0.0 for the zero matrix. Singular values below
        ``eps · σ_max`` count as zero.
    """
    s = torch.linalg.svdvals(M.detach().to(torch.float64))
    if s.numel() == 0 or s.max() <= 0:
        return 0.0
    s = s[s > eps * s.max()]
    p = s / s.sum()
    return math.exp(-(p * p.log()).sum().item())
