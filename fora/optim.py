"""The optimizer pair for a LoRA model: Cayley-Adam on the A's, AdamW on the B's (PAPER.md §2).

**stiefel_lr default (decision).** Cayley-Adam's step is scale-free over the whole matrix: it
moves X = Aᵀ by about ``stiefel_lr`` in Frobenius norm per step (scalar second moment), while
AdamW moves each of the r · d_in entries of an unconstrained A by about ``lr``, i.e. about
``lr · √(r · d_in)`` in Frobenius norm. With ``stiefel_lr=None`` each A gets
``lr · √(r · d_in)`` (one param group per A shape), so both arms of the ablation take
comparable steps; at lr = 2e-4, r = 32 that is 0.051 for d_in = 2048 and 0.10 for d_in = 8192.
An explicit ``stiefel_lr`` is used as is for every A. ``stiefel_lr_scale`` multiplies either (the
step-size study of scripts/reproduce.py ``--stiefel-scales``).

**stiefel_lr_scale default per family (decision, measured).** The trainer multiplies the default
step by ``default_stiefel_lr_scale(model_type)``, the scale that the rule of
``fora.evaluation.step_choice`` (fixed before the runs) chose on the claims runs of the family's
measured model (docs/reproduction.md, "The Stiefel step"). SmolLM2-135M (LLaMA): x1, since both
shorter steps lowered the drift only by losing more than 2 points. Gemma-3-270M (Gemma 3): a shorter
step drifted less with no accuracy lost, so Gemma 3 gets the scale chosen there. Families without
such runs (Qwen3, Gemma 2) keep x1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fora.cayley_adam import CAYLEY_BETAS, CayleyAdam
from fora.inject import euclidean_parameters, stiefel_parameters

# model_type (config.json) -> the Stiefel step's default multiplier; absent families get 1.
STIEFEL_LR_SCALE: dict[str, float] = {"gemma3_text": 0.25, "gemma3": 0.25}  # Gemma-3-270M, three seeds


def default_stiefel_lr_scale(model_type: str) -> float:
    """The default multiplier of Cayley-Adam's step for a model family (`ModelConfig.model_type`):
    the scale chosen by the Stiefel-step rule on that family's claims runs, 1 where none ran."""
    return STIEFEL_LR_SCALE.get(model_type, 1.0)


def build_optimizers(model: nn.Module, lr: float, *, stiefel_lr: float | None = None, stiefel_lr_scale: float = 1.0,
                     weight_decay: float = 0.0, stiefel: bool = True,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     stiefel_betas: tuple[float, float] = CAYLEY_BETAS,
                     qr_every: int = 100, solver: str = "closed_form", iters: int = 2,
                     step_cap: float | None = 0.5, compiled: bool = False) -> list[torch.optim.Optimizer]:
    """Optimizers for the LoRA parameters of ``model`` (call ``freeze_base`` first).

    Returns:
        ``[CayleyAdam(A's), AdamW(B's)]`` when ``stiefel`` (the A's must have orthonormal rows:
        inject with ``stiefel=True``), else ``[AdamW(A's and B's)]``. ``weight_decay`` applies to
        AdamW only: decay on A would leave the manifold. Step them all every iteration.
        ``betas`` are AdamW's (0.9, 0.999); CayleyAdam uses ``stiefel_betas``, Li et al.'s
        (0.9, 0.99) by default (see ``fora.cayley_adam.CAYLEY_BETAS``). ``compiled`` runs
        CayleyAdam's update through torch.compile (``CayleyAdam(compiled=True)``).
    Raises:
        ValueError when a trainable parameter is not a LoRA A or B, or there are no adapters.
    """
    A = stiefel_parameters(model)
    B = euclidean_parameters(model)
    if not stiefel:
        return [adamw(A + B, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)]
    if stiefel_lr is not None:
        groups = [{"params": A, "lr": stiefel_lr * stiefel_lr_scale}]
    else:
        by_numel: dict[int, list[nn.Parameter]] = {}
        for p in A:
            by_numel.setdefault(p.numel(), []).append(p)
        groups = [{"params": ps, "lr": lr * math.sqrt(numel) * stiefel_lr_scale} for numel, ps in by_numel.items()]
    cayley = CayleyAdam(groups, lr=lr, betas=stiefel_betas, eps=eps, qr_every=qr_every, solver=solver,
                        iters=iters, step_cap=step_cap, compiled=compiled)
    return [cayley, adamw(B, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)]


def adamw(params: list[nn.Parameter], **hyper) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel where that kernel takes every parameter (plain fp tensors
    on CPU or CUDA; not FSDP2's DTensors): one kernel over all tensors instead of torch's CPU default,
    a Python loop of per-tensor ops (measured 3.7 vs 12.1 ms for the 300 A's and B's of SmolLM2-135M)."""
    fused = bool(params) and all(type(p) in (torch.Tensor, nn.Parameter) and p.device.type in ("cpu", "cuda")
                                 and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **hyper)
