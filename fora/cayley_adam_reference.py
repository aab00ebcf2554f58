"""Cayley-Adam written out step by step: the readable twin of the fused ``CayleyAdam``.

``CayleyAdam`` stacks the A's of one shape and folds the bias corrections into r x r Gram blocks
so a step over a model is a few dozen kernels. This file is the same algorithm one parameter at
a time, in the order of Li, Li & Todorovic (ICLR 2020, Algorithm 2) as docs/method.md states it,
each line one line of the algorithm, built from ``fora.stiefel``'s pure functions. The tests hold
the fused optimizer equal to it in float64; read this one to see what the fast one computes.

For one A (r, n) with orthonormal rows, X = Aᵀ ∈ St(n, r), G = (∂L/∂A)ᵀ, at step k:

    M ← β1 M + (1 − β1) G                       first moment (matrix)
    v ← β2 v + (1 − β2) ‖G‖²_F                  second moment (one scalar per A)
    M̂ = M / (1 − β1^k),  v̂ = v / (1 − β2^k)     bias corrections
    D = M̂ − ½ X (Xᵀ M̂)                          canonical direction: W = D Xᵀ − X Dᵀ    (Eq. 5)
    M ← (1 − β1^k) W X                          moment re-projected onto the tangent space
    τ = lr / (√v̂ + ε),  τ ← min(τ, 2q / (‖W‖_F + ε))   step length, capped
    X ← (I + τ/2 W)⁻¹ (I − τ/2 W) X              Cayley step                           (Eq. 6)
    X ← qf(X) every qr_every steps              sign-fixed QR retraction
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fora.cayley_adam import CAYLEY_BETAS, CayleyAdam, _math_dtype
from fora.stiefel import (canonical_direction, cayley_fixed_point, cayley_step, qr_retract, skew_apply,
                          skew_norm)


class CayleyAdamReference(CayleyAdam):
    """Cayley-Adam (Algorithm 2; Eq. 4–6) one parameter at a time, literally; slow but plain.

    Same arguments, validation, state (``step``, ``exp_avg`` in the parameter's (r, n) layout,
    scalar ``exp_avg_sq``) and ``state_dict`` as ``CayleyAdam`` (whose docstring describes
    them), so either optimizer resumes the other's checkpoint. ``lr`` is the step length as
    given: ``build_optimizers``' convention lr · √(r · d_in) per A shape comes in through param
    groups, as for ``CayleyAdam``. No ``compiled`` option: this one is for reading.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-2,
                 betas: tuple[float, float] = CAYLEY_BETAS, eps: float = 1e-8, qr_every: int = 100,
                 solver: str = "closed_form", iters: int = 2, step_cap: float | None = 0.5) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, qr_every=qr_every, solver=solver,
                         iters=iters, step_cap=step_cap, compiled=False)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("CayleyAdam does not support sparse gradients; use a dense A")
                self._step_one(p, self.state[p] or self._init_state(p), group)
        return loss

    def _step_one(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Algorithm 2 for one A, in the order of the module docstring."""
        beta1, beta2 = group["betas"]
        lr, eps, q = group["lr"], group["eps"], group["step_cap"]
        dt = _math_dtype(p)
        X = p.detach().to(dt).mT                       # (n, r), orthonormal columns
        G = p.grad.detach().to(dt).mT                  # (n, r)
        M, v = state["exp_avg"].mT, state["exp_avg_sq"]
        state["step"] += 1
        k = state["step"]

        M = beta1 * M + (1 - beta1) * G
        v = beta2 * v + (1 - beta2) * G.square().sum()
        M_hat, v_hat = M / (1 - beta1 ** k), v / (1 - beta2 ** k)
        D = canonical_direction(X, M_hat)              # W = D Xᵀ − X Dᵀ (Eq. 5), never formed
        M = (1 - beta1 ** k) * skew_apply(D, X, X)     # W X: the tangent projection of M̂, rescaled
        tau = lr / (v_hat.sqrt() + eps)
        if q is not None:
            tau = torch.minimum(tau, 2 * q / (skew_norm(D, X) + eps))
        if group["solver"] == "closed_form":
            X = cayley_step(X, D, tau)                 # Eq. 6, exact
        else:
            X = cayley_fixed_point(X, D, tau, group["iters"])
        if group["qr_every"] and k % group["qr_every"] == 0:
            X = qr_retract(X)

        state["exp_avg"].copy_(M.mT)
        state["exp_avg_sq"].copy_(v)
        p.copy_(X.mT.to(p.dtype))
