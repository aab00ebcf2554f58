"""Cayley-Adam: Adam on the Stiefel manifold for LoRA down-projections A (docs/method.md).

Each parameter is an (r, n) matrix with orthonormal rows (A Aᵀ = I). The optimizer works on
the column point X = Aᵀ in St(n, r) and the transposed gradient G = (∂L/∂A)ᵀ, and writes Aᵀ of
the new point back. Per parameter the state is a matrix first moment M (stored as ``exp_avg`` in
the parameter's (r, n) layout, fp32), a *scalar* second moment v (``exp_avg_sq``) and the step
count k. One step (Li, Li & Todorovic, ICLR 2020, Algorithm 2):

    M ← β1 M + (1 − β1) G
    v ← β2 v + (1 − β2) ‖G‖²_F
    v̂ = v / (1 − β2^k),  M̂ = M / (1 − β1^k)
    W = Ŵ − Ŵᵀ,  Ŵ = M̂ Xᵀ − ½ X (Xᵀ M̂ Xᵀ)          (Eq. 5 on D = M̂ − ½ X Xᵀ M̂)
    M ← (1 − β1^k) W X                              (= moment projected onto T_X St)
    τ = lr / (√v̂ + ε),  τ ← min(τ, 2q / (‖W‖_F + ε))  (cap, when step_cap = q is set)
    X ← Cayley(X, W, τ)                             (Eq. 6)

and every ``qr_every`` steps the sign-fixed QR retraction X ← qf(X). The same algorithm one
parameter at a time, line by line, is ``fora.cayley_adam_reference.CayleyAdamReference``; the
tests hold this fused, stacked update equal to it.

**The generator erratum**: the method's text writes W = M̂ Xᵀ − X M̂ᵀ (no ½ term). Then
W X = M̂ − X M̂ᵀ X, which *doubles* the skew part of Xᵀ M̂ instead of projecting it, so the
re-projection multiplies the moment's span(X) part by 2 β1 = 1.8 per step: the moment grows
geometrically, the capped steps wander at their starting distance from the optimum, and the
iterate then turns NaN (nearest point on St(64, 8), fp32: NaN at step 87;
tests/test_cayley_adam_reference.py). With the ½ term of the cited Algorithm 2, W X is exactly
``project_tangent(X, M̂)`` and the re-projection is idempotent.

All arithmetic is fp32 (fp64 for fp64 parameters) whatever the parameter dtype; no weight decay
(it would leave the manifold).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fora.models.speed import compile_supported
from fora.stiefel import (cayley_coefficients, cayley_fixed_point, qr_retract,
                          skew_norm_from_grams, stiefel_error)

SOLVERS = ("closed_form", "fixed_point")
# (β1, β2) of Li et al.'s Cayley-Adam: v ← β2 v + (1 − β2) ‖G‖²_F with β2 = 0.99 averages the
# scalar second moment over about 1 / (1 − β2) = 100 steps. The one default, also build_optimizers'.
CAYLEY_BETAS = (0.9, 0.99)
log = logging.getLogger(__name__)


def _math_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def cayley_adam_update(X: Tensor, G: Tensor, M: Tensor, v: Tensor, bc1: float | Tensor, bc2: float | Tensor,
                       lr: float | Tensor, *, beta1: float, beta2: float, eps: float, step_cap: float | None,
                       solver: str, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """One Cayley-Adam step (Li et al. 2020, Alg. 2; Eq. 4-6) for a batch of P points, pure.

    Args:
        X: (P, n, r) points on St(n, r). G: (P, n, r) gradients. M: (P, n, r) first moments.
        v: (P,) scalar second moments. bc1, bc2: the bias corrections 1 - β1^k, 1 - β2^k.
        lr, eps, step_cap, solver, iters: as in ``CayleyAdam``.
    Returns:
        (Y, M, v): the new points (before any QR retraction), the moment re-projected onto the
        tangent space at X, and the second moment.
    """
    M = torch.lerp(M, G, 1 - beta1)                                       # β1 M + (1 − β1) G
    v = v * beta2 + (1 - beta2) * torch.linalg.vector_norm(G, dim=(-2, -1)).square()
    # D0 = bc1 · canonical_direction(X, M̂), M̂ = M / bc1: the bias correction is applied to r x r
    # blocks instead of (P, n, r) tensors, and every n-sized operation is one (b)addbmm.
    D0 = torch.baddbmm(M, X, X.mT @ M, alpha=-0.5)                        # M − ½ X (Xᵀ M)
    XtX, XtD0, D0tD0 = X.mT @ X, X.mT @ D0, D0.mT @ D0                    # the r x r Gram blocks
    M = torch.baddbmm(D0 @ XtX, X, XtD0.mT, alpha=-1)    # (1 − β1^k) W X: moment on the tangent space
    XtD, DtD = XtD0 / bc1, D0tD0 / (bc1 * bc1)          # Gram blocks of D = D0 / bc1 (Eq. 5's W)
    tau = lr / ((v / bc2).sqrt() + eps)
    if step_cap is not None:
        tau = torch.minimum(tau, 2 * step_cap / (skew_norm_from_grams(XtD, XtX, DtD) + eps))
    tau = tau[:, None, None]
    if solver == "fixed_point":
        return cayley_fixed_point(X, D0, tau / bc1, iters), M, v          # W is linear in D
    Z1, Z2 = cayley_coefficients(XtD, XtX, DtD, tau)                      # Eq. 6: Y = X − τ (D Z1 + X Z2)
    return torch.baddbmm(X @ (torch.eye(X.shape[-1], dtype=X.dtype, device=X.device) - tau * Z2),
                         D0, -(tau / bc1) * Z1), M, v


class CayleyAdam(torch.optim.Optimizer):
    """Adam with a Cayley retraction for (r, n) parameters with orthonormal rows (Eq. 4–6).

    Args:
        params: the LoRA A matrices (or param groups); each 2-D with r <= n and A Aᵀ = I at the
            first step (initialise with ``LoRALinear(..., init="stiefel")`` or
            ``fora.stiefel.random_stiefel(n, r).mT``).
        lr: step length; X moves by about ``lr`` in Frobenius norm per step (scale-free).
        betas: (β1, β2) for the matrix first moment M and the scalar second moment v; default
            ``CAYLEY_BETAS`` = (0.9, 0.99), Li et al.'s values (AdamW's usual β2 = 0.999 is for
            per-entry moments; v here is one number per matrix).
        eps: added to √v̂.
        qr_every: QR retraction every this many steps (0 = never); removes rounding drift.
        solver: "closed_form" (Eq. 6 exactly, one 2r x 2r solve) or "fixed_point" (the paper's
            iteration, ``iters`` sweeps).
        iters: fixed-point sweeps (only for solver="fixed_point").
        step_cap: q in τ <= 2q / (‖W‖_F + ε); q < 1 keeps the fixed point a contraction
            (‖W‖_F >= ‖W‖₂). None disables the cap (closed form only).
        compiled: run the update through ``torch.compile`` (fewer kernel launches on CUDA); the
            iterates equal the eager ones to rounding. Falls back to eager, with a warning, where
            torch.compile does not work.

    The moments of same-shape A's live in one stacked buffer per shape, and a step updates each
    stack with one batched ``cayley_adam_update``: a step over all of a model's A's is a few dozen
    kernels, not a few dozen per A. ``state_dict()`` is per parameter as for any torch optimizer.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-2,
                 betas: tuple[float, float] = CAYLEY_BETAS, eps: float = 1e-8, qr_every: int = 100,
                 solver: str = "closed_form", iters: int = 2, step_cap: float | None = 0.5,
                 compiled: bool = False) -> None:
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
            raise ValueError(f"invalid iters {iters!r}: pass an int >= 1 (the paper uses 2)")
        if step_cap is not None and not 0.0 < step_cap < 1.0:
            raise ValueError(f"invalid step_cap {step_cap!r}: pass q in (0, 1) (0.5 in Li et al.) or None")
        if solver == "fixed_point" and step_cap is None:
            raise ValueError("solver='fixed_point' needs step_cap (q in (0, 1)) to converge; "
                             "pass step_cap=0.5 or use solver='closed_form'")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, qr_every=qr_every, solver=solver,
                        iters=iters, step_cap=step_cap, compiled=bool(compiled))
        self._stacks: dict[tuple[int, ...], tuple[Tensor, Tensor, list[Tensor], list[Tensor]]] = {}
        self._compiled_update: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2 or p.shape[0] > p.shape[1]:
                    raise ValueError(f"CayleyAdam parameters must be (r, n) matrices with r <= n "
                                     f"(a LoRA A), got shape {tuple(p.shape)}; optimise other "
                                     "parameters with AdamW")

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 1e-2
        err = stiefel_error(p.mT)
        if not err <= tol:
            raise ValueError(f"CayleyAdam parameter of shape {tuple(p.shape)} does not have "
                             f"orthonormal rows (max |A Aᵀ − I| = {err:.3g} > {tol:g}); "
                             "initialise A with init='stiefel' or fora.stiefel.random_stiefel")
        state = self.state[p]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=_math_dtype(p), memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros((), dtype=_math_dtype(p), device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # One batched update per (shape, dtype, device, step): a model's A's come in two or
            # three shapes, so a step over all A's is a few dozen kernels whatever their number.
            buckets: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("CayleyAdam does not support sparse gradients; use a dense A")
                state = self.state[p] or self._init_state(p)
                state["step"] += 1
                buckets.setdefault((p.shape, p.dtype, p.device, state["step"]), []).append(p)
            for (_, _, _, k), ps in buckets.items():
                self._update(group, ps, k)
        return loss

    def _moments(self, ps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The bucket's moments as one (P, r, n) and one (P,) buffer whose rows *are* the
        per-parameter ``exp_avg`` / ``exp_avg_sq`` state (views), so the update reads and writes
        them in place: no stacking or copying back per step, and state_dict() is unchanged."""
        key = tuple(id(p) for p in ps)
        cached = self._stacks.get(key)
        if cached is not None and all(self.state[p]["exp_avg"] is m and self.state[p]["exp_avg_sq"] is v
                                      for p, m, v in zip(ps, cached[2], cached[3])):
            return cached[0], cached[1]
        M = torch.stack([self.state[p]["exp_avg"] for p in ps])   # a fresh or reloaded state: copy once
        v = torch.stack([self.state[p]["exp_avg_sq"] for p in ps])
        Ms, vs = list(M.unbind(0)), list(v.unbind(0))
        for p, m, s in zip(ps, Ms, vs):
            self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"] = m, s
        members = set(key)  # a bucket that changed (an A without a gradient) leaves no stale buffer behind
        self._stacks = {k: c for k, c in self._stacks.items() if members.isdisjoint(k)}
        self._stacks[key] = (M, v, Ms, vs)
        return M, v

    def _update(self, group: dict[str, Any], ps: list[Tensor], k: int) -> None:
        """Algorithm 2 for P same-shape parameters at step k, batched as (P, n, r)."""
        beta1, beta2 = group["betas"]
        dt = _math_dtype(ps[0])
        M, v = self._moments(ps)                                   # (P, r, n), (P,): the state itself
        X = torch.stack([p.detach() for p in ps]).to(dt).mT        # (P, n, r), orthonormal columns
        G = torch.stack([p.grad.detach() for p in ps]).to(dt).mT   # (P, n, r)
        bc1, bc2, lr = 1 - beta1 ** k, 1 - beta2 ** k, group["lr"]
        update = self._compiled(group) if group.get("compiled") else cayley_adam_update  # get: older checkpoints
        if update is not cayley_adam_update:  # 0-d tensors, so a new step or lr is not a recompile
            bc1, bc2, lr = (torch.tensor(x, dtype=dt, device=X.device) for x in (bc1, bc2, lr))
        Y, M_new, v_new = update(X, G, M.mT, v, bc1, bc2, lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                                 step_cap=group["step_cap"], solver=group["solver"], iters=group["iters"])
        if group["qr_every"] and k % group["qr_every"] == 0:
            Y = qr_retract(Y)
        M.copy_(M_new.mT)
        v.copy_(v_new)
        torch._foreach_copy_(ps, list(Y.mT.to(ps[0].dtype).unbind(0)))

    def _compiled(self, group: dict[str, Any]) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
        """torch.compile of the update (elementwise chains fused), or eager with a warning where
        compilation does not work here."""
        if self._compiled_update is None:
            device = group["params"][0].device
            ok, reason = compile_supported(device)
            if ok:
                self._compiled_update = torch.compile(cayley_adam_update, dynamic=False)
            else:
                log.warning("CayleyAdam(compiled=True): torch.compile does not work on %s here (%s); "
                            "stepping eagerly", device.type, reason)
                self._compiled_update = cayley_adam_update
        return self._compiled_update

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
                self.state[p][key] = saved[key].to(device=p.device, dtype=_math_dtype(p), copy=True)
            self.state[p]["step"] = int(saved["step"])
