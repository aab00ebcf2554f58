"""The optimizer pair of a LoRA model: Cayley-Adam on the Stiefel factor, AdamW on the rest.

FoRA (``stiefel_factor="B"``, the authors' method): Cayley-Adam on every B with the authors'
rule (α = min(lr, 1/‖W‖₁), lr = ``STIEFEL_LR`` = 1e-3 held constant, 5 fixed-point sweeps),
AdamW on every A and gate g at ``lr`` on the trainer's schedule.

The ablation (``stiefel_factor="A"``): Cayley-Adam on every A with this project's earlier rule:
its step is scale-free over the whole matrix (scalar second moment: X moves by about the step in
Frobenius norm), while AdamW moves each of an unconstrained A's r · d_in entries by about ``lr``,
so each A gets ``lr · √(r · d_in)`` (one param group per A shape), the Frobenius cap q = 0.5 and
the closed-form Cayley step; the schedule drives both optimizers. AdamW on every B.

``stiefel_lr`` replaces either default step, ``stiefel_lr_scale`` multiplies it (the step-size
study of scripts/reproduce.py ``--stiefel-scales``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fora.cayley_adam import CAYLEY_BETAS, CayleyAdam
from fora.defaults import FORA
from fora.inject import euclidean_parameters, stiefel_parameters
from fora.lora import STIEFEL_FACTORS

__all__ = ["STIEFEL_FACTORS", "STIEFEL_LR", "adamw", "authors_cayley_adam", "build_optimizers", "scheduled"]
STIEFEL_LR = FORA.stiefel_lr  # the authors' Cayley-Adam cap for B, constant


def authors_cayley_adam(params: list[nn.Parameter], lr: float = STIEFEL_LR, *,
                        betas: tuple[float, float] = CAYLEY_BETAS, eps: float = FORA.eps,
                        qr_every: int = FORA.qr_every, iters: int = FORA.cayley_iters) -> CayleyAdam:
    """Cayley-Adam with the authors' rule for FoRA's B's: α = min(lr, 1/‖W‖₁) held constant, the
    fixed-point Cayley step with ``iters`` sweeps (values: ``fora.defaults.FORA``)."""
    return CayleyAdam(params, lr=lr, betas=betas, eps=eps, qr_every=qr_every, solver="fixed_point",
                      iters=iters, step_cap=FORA.step_cap)


def build_optimizers(model: nn.Module, lr: float, *, stiefel: bool = True, stiefel_factor: str = "B",
                     stiefel_lr: float | None = None, stiefel_lr_scale: float = 1.0,
                     weight_decay: float = 0.0, betas: tuple[float, float] = FORA.adamw_betas,
                     eps: float = FORA.eps, stiefel_betas: tuple[float, float] = CAYLEY_BETAS,
                     qr_every: int = FORA.qr_every, iters: int = FORA.cayley_iters) -> list[torch.optim.Optimizer]:
    """Optimizers for the adapter parameters of ``model`` (call ``freeze_base`` first).

    Returns:
        ``[CayleyAdam(Stiefel factors), AdamW(the rest)]`` when ``stiefel`` (the modules must have
        been injected with that factor on the manifold), else ``[AdamW(everything)]``.
        ``weight_decay`` applies to AdamW only. Step them all once per optimizer step; wrap them
        in schedules with ``scheduled``.
    Raises:
        ValueError for an unknown factor, a module whose factor differs, a trainable parameter
        that is not an adapter's, or no adapters.
    """
    if stiefel_factor not in STIEFEL_FACTORS:
        raise ValueError(f"unknown stiefel_factor {stiefel_factor!r}: 'B' (FoRA) or 'A' (the ablation)")
    if not stiefel:
        everything = stiefel_parameters(model, factor="A") + euclidean_parameters(model, factor="A")
        return [adamw(everything, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)]
    on_manifold = stiefel_parameters(model, factor=stiefel_factor)
    rest = euclidean_parameters(model, factor=stiefel_factor)
    if stiefel_factor == "B":
        step = (STIEFEL_LR if stiefel_lr is None else stiefel_lr) * stiefel_lr_scale
        cayley = authors_cayley_adam(on_manifold, step, betas=stiefel_betas, eps=eps, qr_every=qr_every,
                                     iters=iters)
    else:
        if stiefel_lr is not None:
            groups = [{"params": on_manifold, "lr": stiefel_lr * stiefel_lr_scale}]
        else:
            by_numel: dict[int, list[nn.Parameter]] = {}
            for p in on_manifold:
                by_numel.setdefault(p.numel(), []).append(p)
            groups = [{"params": ps, "lr": lr * math.sqrt(n) * stiefel_lr_scale} for n, ps in by_numel.items()]
        cayley = CayleyAdam(groups, lr=lr, betas=stiefel_betas, eps=eps, qr_every=qr_every,
                            solver="closed_form", iters=2, step_cap=0.5)
    return [cayley, adamw(rest, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)]


def scheduled(optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """The optimizers a warm-up/decay schedule drives: AdamW always; Cayley-Adam only under the
    ablation's rule (the authors' lr is a constant cap on the step)."""
    return [o for o in optimizers if not (isinstance(o, CayleyAdam) and o.defaults["step_cap"] == "l1")]


def adamw(params: list[nn.Parameter], **hyper) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel where that kernel takes every parameter (plain fp
    tensors on CPU or CUDA; not FSDP2's DTensors): one kernel over all tensors instead of a
    Python loop of per-tensor ops."""
    fused = bool(params) and all(type(p) in (torch.Tensor, nn.Parameter) and p.device.type in ("cpu", "cuda")
                                 and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **hyper)
