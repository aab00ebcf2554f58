"""FIM-LoRA (seed 002): a per-module LoRA rank pattern from calibration-time LoRA-B gradients.

Before training, LoRA is attached to every target of every layer, ``passes`` calibration
backward passes are run, each LoRA-B matrix is scored by its gradient statistic, and a fixed
total rank budget (modules × r) is split proportionally to the scores. The result is a plain
``rank_pattern`` for :func:`fora.inject.inject_lora`.

Why B: with the usual init B = 0, ∇A = s · Bᵀ G X = 0 while ∇B = s · G X Aᵀ = s · ∇W0 · Aᵀ ≠ 0
(G: output gradient, X: input), so only B carries signal at step 0.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fora.fisher import batch_loss, scoring_state
from fora.inject import DEFAULT_TARGETS
from fora.models.paths import decoder_layers, target_modules
from fora.selection import validate_batches

log = logging.getLogger(__name__)

STATISTICS = ("second_moment", "variance")


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "lora_B", None), nn.Parameter)}


def lora_b_scores(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], *, passes: int = 8,
                  statistic: str = "second_moment") -> dict[str, float]:
    """Score every LoRA-B matrix of a model that already holds LoRA modules.

    Pass ``p`` uses ``batches[p % len(batches)]``; with per-pass gradient g_p = ∇_B L:

    * ``"second_moment"``: (1/P) Σ_p ‖g_p‖²_F — the uncentered second moment, i.e. the diagonal
      empirical Fisher of B summed over its entries (what the FIM-LoRA reference code accumulates);
    * ``"variance"``: (1/P) Σ_p ‖g_p‖²_F − ‖(1/P) Σ_p g_p‖²_F — the elementwise variance over
      passes summed over entries (what the FIM-LoRA abstract describes).

    Eval mode (no dropout); the model is left as found. Returns {module path: score}.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic={statistic!r}; valid values: {list(STATISTICS)}")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive integer, got {passes!r}")
    validate_batches(batches)
    if statistic == "variance" and min(passes, len(batches)) < 2:
        raise ValueError(f"statistic='variance' needs at least 2 passes over at least 2 distinct batches "
                         f"(got passes={passes}, {len(batches)} batches): the variance of one gradient is 0")
    modules = _lora_modules(model)
    if not modules:
        raise ValueError("the model holds no LoRA modules (no lora_B parameter); attach them with "
                         "fora.inject.inject_lora first, or call fim_rank_pattern on the base model")
    paths = list(modules)
    bs = [modules[p].lora_B for p in paths]
    sq = torch.zeros(len(paths), dtype=torch.float64)
    sums = [torch.zeros_like(b, dtype=torch.float64) for b in bs] if statistic == "variance" else None

    def fold(j: int):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.detach()
            sq[j] += g.double().pow(2).sum().cpu()  # B is small: float64 is affordable here
            if sums is not None:
                sums[j] += g.double()
            p.grad = None
        return hook

    device = bs[0].device
    with scoring_state(model, bs):
        hooks = [b.register_post_accumulate_grad_hook(fold(j)) for j, b in enumerate(bs)]
        try:
            for p in range(passes):
                batch_loss(model, batches[p % len(batches)], device).backward()
        finally:
            for h in hooks:
                h.remove()
    scores = sq / passes
    if sums is not None:
        scores = (scores - torch.stack([(s / passes).pow(2).sum() for s in sums])).clamp_min(0.0)
    return {path: float(v) for path, v in zip(paths, scores)}


def _continuous(s: list[float], lo: list[int], hi: list[int], budget: float) -> list[float]:
    """x_i = clip(λ s_i, lo_i, hi_i) with Σ x_i = budget (exact piecewise-linear solve for λ)."""
    n = len(s)
    pos = [i for i in range(n) if s[i] > 0]
    if not pos:  # no information: split evenly
        return _continuous([1.0] * n, lo, hi, budget)
    zero = [i for i in range(n) if s[i] == 0]
    x = [float(lo[i]) for i in range(n)]
    saturated = sum(hi[i] for i in pos) + sum(lo[i] for i in zero)
    if budget >= saturated:  # positive scores all hit r_max; the rest goes evenly to zero-score modules
        for i in pos:
            x[i] = float(hi[i])
        if zero:
            rest = _continuous([1.0] * len(zero), [lo[i] for i in zero], [hi[i] for i in zero],
                               budget - sum(hi[i] for i in pos))
            for i, v in zip(zero, rest):
                x[i] = v
        return x

    def total(lam: float) -> float:
        return sum(min(max(lam * s[i], lo[i]), hi[i]) for i in pos) + sum(lo[i] for i in zero)

    knots = sorted({lo[i] / s[i] for i in pos} | {hi[i] / s[i] for i in pos})
    lam = knots[-1]
    for a, b in zip(knots, knots[1:]):
        fa, fb = total(a), total(b)
        if fa <= budget <= fb:  # f is linear on [a, b]
            lam = a if fb == fa else a + (budget - fa) * (b - a) / (fb - fa)
            break
    else:
        lam = knots[0] if budget <= total(knots[0]) else knots[-1]
    for i in pos:
        x[i] = min(max(lam * s[i], lo[i]), hi[i])
    return x


def allocate_ranks(scores: Mapping[str, float], budget: int, r_min: int = 1,
                   r_max: int | Mapping[str, int] | None = None) -> dict[str, int]:
    """Split an integer rank budget proportionally to ``scores`` within [r_min, r_max].

    Continuous target x_i = clip(λ · score_i, r_min, r_max_i) with Σ x_i = budget (the bounds
    are respected by clamping and re-solving, not by clipping after the fact), then
    largest-remainder rounding (ties: higher score, then lower position). The ranks sum to
    ``budget`` exactly and are monotone in the score when the bounds are uniform. Zero scores
    get r_min unless the budget cannot be met otherwise; all-zero scores give an even split.

    Args:
        scores: module path -> non-negative finite score.
        budget: total rank, in [n·r_min, Σ r_max].
        r_min: lower bound per module (>= 1).
        r_max: upper bound: an int for all modules, a dict per module, or None (no bound).
    """
    names = list(scores)
    if not names:
        raise ValueError("scores is empty: nothing to allocate ranks to")
    s = [float(scores[n]) for n in names]
    bad = [n for n, v in zip(names, s) if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"scores must be finite and >= 0; offending modules: {bad[:5]}")
    for name, value in (("budget", budget), ("r_min", r_min)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if r_max is None:
        hi = [budget] * len(names)
    elif isinstance(r_max, Mapping):
        missing = [n for n in names if n not in r_max]
        if missing:
            raise ValueError(f"r_max has no bound for modules {missing[:5]}; give one per scored module")
        hi = [int(r_max[n]) for n in names]
    else:
        hi = [int(r_max)] * len(names)
    lo = [r_min] * len(names)
    low = [n for n, h in zip(names, hi) if h < r_min]
    if low:
        raise ValueError(f"r_max is below r_min={r_min} for modules {low[:5]}; lower r_min or raise r_max")
    if not sum(lo) <= budget <= sum(hi):
        raise ValueError(f"rank budget {budget} is infeasible for {len(names)} modules with bounds "
                         f"[r_min, r_max]: it must lie in [{sum(lo)}, {sum(hi)}]; change the budget or the bounds")
    x = _continuous(s, lo, hi, float(budget))
    r = [min(max(math.floor(v), lo[i]), hi[i]) for i, v in enumerate(x)]
    need = budget - sum(r)
    while need > 0:  # largest remainder first (float rounding may call for a second round)
        i = max((i for i in range(len(r)) if r[i] < hi[i]), key=lambda i: (x[i] - r[i], s[i], -i))
        r[i] += 1
        need -= 1
    while need < 0:
        i = min((i for i in range(len(r)) if r[i] > lo[i]), key=lambda i: (x[i] - r[i], s[i], -i))
        r[i] -= 1
        need += 1
    return dict(zip(names, r))


def fim_rank_pattern(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], *, rank: int = 32,
                     targets: Sequence[str] = DEFAULT_TARGETS, passes: int = 8, r_min: int = 1,
                     r_max: int | None = None, statistic: str = "second_moment", seed: int = 0) -> dict[str, int]:
    """FIM-LoRA rank pattern: {full module path: rank} over every target of every layer.

    LoRA (standard init, B = 0, seeded) is injected in place on all L layers, the LoRA-B
    matrices are scored by :func:`lora_b_scores` over ``passes`` calibration passes, and the
    budget L · len(targets) · rank is split by :func:`allocate_ranks`. Afterwards the original
    ``nn.Linear`` modules are put back (LoRALinear shares their weight Parameters, so nothing is
    copied and peak memory is one training step's), and modes / ``requires_grad`` / ``.grad``
    are restored: the model is left exactly as found.

    Statistic: the FIM-LoRA abstract says "gradient variance" over the passes
    (``statistic="variance"``: E‖g‖² − ‖E g‖², elementwise, summed); its reference code
    accumulates the uncentered mean squared gradient — the diagonal empirical Fisher — which is
    our default ``"second_moment"`` (E‖g‖²). (That code scores lora_A and averages over entries;
    we score B, summed over entries, because ∇A = 0 at B = 0.)

    Args:
        rank: the uniform rank r the budget is based on.
        r_max: per-module cap (never above min(d_in, d_out) of the module); default 4·rank.
            The reference code caps at 2·rank; 4·rank leaves the allocation more room.
    """
    from fora.inject import inject_lora  # LoRA lives in its own module; imported where needed

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic={statistic!r}; valid values: {list(STATISTICS)}")
    validate_batches(batches)
    if _lora_modules(model):
        raise ValueError("the model already holds LoRA modules; FIM-LoRA scores the base model — "
                         "pass the model before inject_lora")
    originals = target_modules(model, targets)
    cap = 4 * rank if r_max is None else r_max
    caps = {p: min(cap, m.out_features, m.in_features) for p, m in originals.items()}
    num_layers = len(decoder_layers(model))
    with scoring_state(model, []):  # records modes and flags of the base model; restored on exit
        try:
            inject_lora(model, list(range(num_layers)), targets=tuple(targets), rank=rank,
                        stiefel=False, seed=seed)
            scores = lora_b_scores(model, batches, passes=passes, statistic=statistic)
        finally:
            for path, module in originals.items():
                parent, _, child = path.rpartition(".")
                owner = model.get_submodule(parent)
                if getattr(owner, child) is not module:
                    setattr(owner, child, module)
    pattern = allocate_ranks(scores, budget=len(originals) * rank, r_min=r_min, r_max=caps)
    log.info("FIM-LoRA ranks: min %d, max %d over %d modules", min(pattern.values()),
             max(pattern.values()), len(pattern))
    return pattern
