"""Cayley-Adam: Adam on the Stiefel manifold (Li, Li & Todorovic, ICLR 2020, Algorithm 2).

FoRA keeps each adapter's up-projection B (d_out × r) column-orthonormal, BᵀB = I (Eq. 4). For
one such parameter X ∈ St(n, r) with Euclidean gradient G, step k, β = (0.9, 0.99), ε = 1e-8:

    every T-th step first:  X ← qf(X)                      (sign-fixed QR, T = qr_every)
    M ← β1 M + (1 − β1) G                                  (first moment, a matrix)
    v ← β2 v + (1 − β2) ‖G‖²_F                             (second moment, one scalar)
    M̂ = M / (1 − β1ᵏ),  v̂ = v / (1 − β2ᵏ)
    Ŵ = M̂ Xᵀ − ½ X (Xᵀ M̂ Xᵀ),  W = (Ŵ − Ŵᵀ) / (√v̂ + ε)   (Eq. 5, never formed: W = D Xᵀ − X Dᵀ)
    α = min(lr, 1 / ‖W‖₁)                                  (‖·‖₁: max column sum of |W|)
    X_new = Cayley(X, W, α)                                (Eq. 6: fixed point from X − α W X)
    M ← (1 − β1ᵏ)(√v̂ + ε) · W X_new                        (the moment re-set at the new point)

``lr`` is a cap, held constant (the trainer's warm-up/decay drives AdamW only). This is the rule of
FoRA's authors, ``step_cap="l1"``. The ablation that keeps A's rows orthonormal instead uses this
project's earlier rule, ``step_cap=q`` (a float): τ = lr / (√v̂ + ε) capped at 2q / ‖W‖_F (W
unnormalised), the moment re-set at the old point, QR after the step.

A wide parameter (r, n) is taken as its transpose: an A with orthonormal rows is the point Aᵀ.
Parameters of one shape are stacked and stepped as one batch (P, n, r); the step below reads
top to bottom as the algorithm above. All arithmetic is fp32 (fp64 for fp64 parameters).
No weight decay: it would leave the manifold.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fora.defaults import FORA
from fora.stiefel import (canonical_direction, cayley_fixed_point, cayley_step, qr_retract, skew_apply,
                          skew_norm, skew_norm_l1, stiefel_error)

SOLVERS = ("closed_form", "fixed_point")
CAYLEY_BETAS = FORA.cayley_betas  # the scalar v averages ~1 / (1 − β2) = 100 steps


def math_dtype(p: Tensor) -> torch.dtype:
    """The dtype Cayley-Adam computes in for parameter ``p``: fp64 for fp64, else fp32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def l1_step(X: Tensor, D: Tensor, lr: float) -> Tensor:
    """α = min(lr, 1 / ‖W‖₁) per point, W = D Xᵀ − X Dᵀ; X, D: (P, n, r) -> α: (P,).

    ‖W‖₁ ≤ √n ‖W‖₂ ≤ √n ‖W‖_F, so where lr · √n · ‖W‖_F ≤ 1 the cap cannot bind and α = lr
    without forming the n × n W; only the other points pay for the exact norm.
    """
    alpha = torch.full(X.shape[:-2], float(lr), dtype=X.dtype, device=X.device)
    may_bind = lr * math.sqrt(X.shape[-2]) * skew_norm(D, X) > 1
    if bool(may_bind.any()):
        idx = may_bind.nonzero().squeeze(-1)
        alpha[idx] = torch.clamp(1 / skew_norm_l1(D[idx], X[idx]), max=float(lr))
    return alpha


def cayley_adam_step(X: Tensor, G: Tensor, M: Tensor, v: Tensor, k: int, lr: float, *,
                     betas: tuple[float, float], eps: float, step_cap: str | float | None,
                     solver: str, iters: int, qr_every: int) -> tuple[Tensor, Tensor, Tensor]:
    """One Cayley-Adam step (Algorithm 2; Eq. 4-6) for P points at step k, pure.

    Args:
        X, G, M: (P, n, r) points, gradients and first moments. v: (P,) second moments.
        k: the step number (from 1). lr, betas, eps, step_cap, solver, iters, qr_every: as
            ``CayleyAdam``.
    Returns:
        (X_new, M, v).
    """
    beta1, beta2 = betas
    authors = step_cap == "l1"
    if authors and qr_every and k % qr_every == 0:
        X = qr_retract(X)
    M = beta1 * M + (1 - beta1) * G
    v = beta2 * v + (1 - beta2) * G.square().sum(dim=(-2, -1))
    bc1, bc2 = 1 - beta1 ** k, 1 - beta2 ** k
    M_hat, v_hat = M / bc1, v / bc2
    D = canonical_direction(X, M_hat)                       # Ŵ − Ŵᵀ = D Xᵀ − X Dᵀ      (Eq. 5)
    root = (v_hat.sqrt() + eps)[:, None, None]
    if authors:
        D = D / root                                        # W normalised by √v̂ + ε
        tau = l1_step(X, D, lr)[:, None, None]
    else:
        M = bc1 * skew_apply(D, X, X)                       # moment re-set at the old X
        tau = lr / root
        if step_cap is not None:
            tau = torch.minimum(tau, 2 * step_cap / (skew_norm(D, X) + eps)[:, None, None])
    if solver == "fixed_point":
        X_new = cayley_fixed_point(X, D, tau, iters)        # Eq. 6 by sweeps
    else:
        X_new = cayley_step(X, D, tau)                      # Eq. 6 exactly
    if authors:
        M = bc1 * root * skew_apply(D, X, X_new)            # (1 − β1ᵏ)(√v̂ + ε) W X_new
    elif qr_every and k % qr_every == 0:
        X_new = qr_retract(X_new)
    return X_new, M, v


class CayleyAdam(torch.optim.Optimizer):
    """Adam with a Cayley retraction for parameters with orthonormal columns (Eq. 4-6).

    Args:
        params: tall (n, r) matrices with orthonormal columns (FoRA's B), or wide (r, n) ones
            with orthonormal rows (the A of the ablation), or param groups of them.
        lr: the step cap α ≤ lr of the authors' rule; with a float ``step_cap`` the step length
            lr / (√v̂ + ε) of the earlier rule.
        betas: (β1, β2) of the matrix first moment and the scalar second moment.
        eps: added to √v̂.
        qr_every: QR retraction every this many steps (0 = never).
        solver: "fixed_point" (the paper's sweeps) or "closed_form" (Eq. 6 exactly, their limit).
        iters: fixed-point sweeps.
        step_cap: "l1" (the authors' rule: α = min(lr, 1/‖W‖₁), moment re-set at the new point),
            q in (0, 1) (the earlier rule: τ ≤ 2q / ‖W‖_F) or None (no cap, closed form only).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = FORA.stiefel_lr,
                 betas: tuple[float, float] = CAYLEY_BETAS, eps: float = FORA.eps, qr_every: int = FORA.qr_every,
                 solver: str = "fixed_point", iters: int = FORA.cayley_iters,
                 step_cap: str | float | None = FORA.step_cap) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"invalid lr {lr!r}: pass a finite number >= 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas!r}: pass two numbers in [0, 1), e.g. (0.9, 0.99)")
        if not eps > 0:
            raise ValueError(f"invalid eps {eps!r}: pass a positive number, e.g. 1e-8")
        if not (isinstance(qr_every, int) and qr_every >= 0):
            raise ValueError(f"invalid qr_every {qr_every!r}: pass an int >= 0 (0 disables the QR retraction)")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}: valid solvers are {', '.join(SOLVERS)}")
        if not (isinstance(iters, int) and iters >= 1):
            raise ValueError(f"invalid iters {iters!r}: pass an int >= 1 (the authors use 5)")
        if not (step_cap is None or step_cap == "l1"
                or (isinstance(step_cap, (int, float)) and 0.0 < step_cap < 1.0)):
            raise ValueError(f"invalid step_cap {step_cap!r}: pass 'l1' (alpha = min(lr, 1/||W||_1)), "
                             "q in (0, 1) (tau <= 2q/||W||_F) or None")
        if solver == "fixed_point" and step_cap is None:
            raise ValueError("solver='fixed_point' needs a step cap to converge; pass step_cap='l1' "
                             "or use solver='closed_form'")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, qr_every=qr_every, solver=solver,
                        iters=iters, step_cap=step_cap)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"CayleyAdam parameters must be matrices, got shape {tuple(p.shape)}; "
                                     "optimise other parameters with AdamW")

    @staticmethod
    def point(p: Tensor) -> Tensor:
        """The (n, r) point of a parameter: itself when tall, its transpose when wide."""
        return p if p.shape[0] >= p.shape[1] else p.mT

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 1e-2
        err = stiefel_error(self.point(p))
        if not err <= tol:
            raise ValueError(f"CayleyAdam parameter of shape {tuple(p.shape)} is not orthonormal along its "
                             f"short side (max |XᵀX − I| = {err:.3g} > {tol:g}); initialise it with "
                             "LoRALinear(init='stiefel_b') or fora.stiefel.random_stiefel")
        state = self.state[p]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=math_dtype(p), memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros((), dtype=math_dtype(p), device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = {}  # same shape, dtype, device and step: one batch
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("CayleyAdam does not support sparse gradients")
                state = self.state[p] or self._init_state(p)
                state["step"] += 1
                buckets.setdefault((p.shape, p.dtype, p.device, state["step"]), []).append(p)
            for (_, _, _, k), ps in buckets.items():
                self._step_bucket(group, ps, k)
        return loss

    def _step_bucket(self, group: dict[str, Any], ps: list[Tensor], k: int) -> None:
        dt = math_dtype(ps[0])
        stack = lambda ts: torch.stack([self.point(t).detach() for t in ts]).to(dt)  # noqa: E731
        X, G = stack(ps), stack([p.grad for p in ps])                               # (P, n, r)
        M = stack([self.state[p]["exp_avg"] for p in ps])
        v = torch.stack([self.state[p]["exp_avg_sq"] for p in ps])
        X, M, v = cayley_adam_step(X, G, M, v, k, group["lr"], betas=group["betas"], eps=group["eps"],
                                   step_cap=group["step_cap"], solver=group["solver"],
                                   iters=group["iters"], qr_every=group["qr_every"])
        for i, p in enumerate(ps):
            self.point(p).copy_(X[i])
            self.point(self.state[p]["exp_avg"]).copy_(M[i])
            self.state[p]["exp_avg_sq"].copy_(v[i])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the moments stay in fp32 (torch casts state to the parameter dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                self.state[p][key] = saved[key].to(device=p.device, dtype=math_dtype(p), copy=True)
            self.state[p]["step"] = int(saved["step"])
