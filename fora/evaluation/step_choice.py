"""Choosing Cayley-Adam's default step from the step-scale runs of `scripts/reproduce.py --stiefel-scales`.

The rule, fixed before the runs (docs/reproduction-claims.md), per model: among the scales k != 1
whose FoRA drift is below x1's (the t interval over seeds of KL(fora xk) - KL(fora) lies entirely
below 0), the default becomes the largest whose FoRA accuracy is at most `ACC_MARGIN` below x1's
(the lower bound of the paired bootstrap interval of acc(fora xk) - acc(fora) is >= -ACC_MARGIN).
If there is none, x1 stays. A scale without both intervals (one seed, no items.json) cannot be
chosen nor ruled out (one seed's accuracy interval covers items only, as for the claims), and a
choice made while some scale is still undecided says so.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fora.evaluation.paired import Interval, paired_difference, t_interval
from fora.evaluation.report import MIN_SEEDS, arm_label, interval_text

ACC_MARGIN = 0.02  # 2 accuracy points
REASON_DRIFT = "drift not shown below ×1's (KL interval reaches 0)"
REASON_ACCURACY = f"loses more than {100 * ACC_MARGIN:g} pt"


def _runs(rows: Sequence[Mapping[str, Any]], model: str, method: str) -> dict[float, dict[int, Mapping[str, Any]]]:
    out: dict[float, dict[int, Mapping[str, Any]]] = {}
    for r in rows:
        if r["model"] == model and r["method"] == method:
            out.setdefault(float(r.get("stiefel_lr_scale", 1.0)), {})[r["seed"]] = r
    return out


def _bounds(iv: Interval | None) -> dict[str, float | None]:
    return {"estimate": None, "low": None, "high": None} if iv is None else \
        {"estimate": iv.estimate, "low": iv.low, "high": iv.high}


def choose_stiefel_step(rows: Sequence[Mapping[str, Any]], items: Mapping[tuple[str, str, int], Any], model: str,
                        *, method: str = "fora", metric: str = "acc_loglik", n_boot: int = 4000,
                        seed: int = 0) -> dict[str, Any]:
    """The module docstring's rule for `model`.

    Args:
        rows: result.json rows (with `stiefel_lr_scale`; rows without it are x1).
        items: (model, arm label, seed) -> items.json dict or None; the arm label of a scaled run
            is ``fora.evaluation.report.arm_label``'s ("fora ×0.25").
    Returns:
        {"model", "method", "chosen": the scale, "why", "scales": one row per scale k != 1 with the
        seeds shared with x1, "kl" and "accuracy" contrasts (estimate, low, high; None where no
        interval), "eligible" (True, False, or None when undecided) and "fails" (why a scale is out:
        REASON_DRIFT and/or REASON_ACCURACY; empty otherwise)}.
    """
    runs = _runs(rows, model, method)
    base = runs.get(1.0, {})
    table = []
    for k in sorted((x for x in runs if x != 1.0), reverse=True):
        seeds = sorted(set(base) & set(runs[k]))
        row: dict[str, Any] = {"scale": k, "seeds": len(seeds), "kl": _bounds(None), "accuracy": _bounds(None)}
        if seeds:
            kl = t_interval([runs[k][s]["kl"] for s in seeds], [base[s]["kl"] for s in seeds])
            row["kl"] = _bounds(kl)
            found = [(items.get((model, arm_label(runs[k][s]), s)), items.get((model, method, s))) for s in seeds]
            if all(a is not None and b is not None for a, b in found) and \
                    len({x["test_sha256"] for pair in found for x in pair}) == 1:
                acc = paired_difference([a[metric] for a, _ in found], [b[metric] for _, b in found],
                                        clusters=found[0][0]["clusters"], n_boot=n_boot, seed=seed)
                row["accuracy"] = _bounds(acc)
        kl_hi, acc_lo = row["kl"]["high"], row["accuracy"]["low"] if len(seeds) >= MIN_SEEDS else None
        # why a scale is out: its drift is not shown below x1's (a t interval over few seeds can
        # reach 0 even when every seed drifts less), and/or it loses more than the margin
        row["fails"] = ([REASON_DRIFT] if kl_hi is not None and kl_hi >= 0 else []) + \
            ([REASON_ACCURACY] if acc_lo is not None and acc_lo < -ACC_MARGIN else [])
        row["eligible"] = False if row["fails"] else None if kl_hi is None or acc_lo is None else True
        table.append(row)
    chosen = next((r["scale"] for r in table if r["eligible"]), 1.0)
    pending = [r["scale"] for r in table if r["eligible"] is None and (chosen == 1.0 or r["scale"] > chosen)]
    if not base:
        why = f"undecided at this scale: no {method} run at x1 to compare with"
    elif not table:
        why = "undecided at this scale: no scaled runs"
    elif pending:
        why = ("undecided at this scale: " + ", ".join(f"×{k:g}" for k in pending)
               + (" lacks" if len(pending) == 1 else " lack") + " an interval (one seed or no items.json)"
               + (f"; ×{chosen:g} qualifies so far" if chosen != 1.0 else ""))
    elif chosen != 1.0:
        why = f"the largest scale with lower drift and accuracy within {100 * ACC_MARGIN:g} pt of ×1"
    elif all(r["fails"] == [REASON_ACCURACY] for r in table):
        why = f"no scale lowers the drift without losing more than {100 * ACC_MARGIN:g} pt: ×1 stays"
    else:
        why = "no scale qualifies (" + "; ".join(f"×{r['scale']:g}: " + " and ".join(r["fails"]) for r in table) \
            + "): ×1 stays"
    return {"model": model, "method": method, "metric": metric, "chosen": chosen, "why": why, "scales": table}


def step_choice_markdown(choices: Sequence[Mapping[str, Any]], slug=lambda m: m) -> str:
    """One line per (model, scale): the two contrasts against x1 and the verdict, then the choice."""
    def cell(b: Mapping[str, float | None], metric: str) -> str:
        return interval_text(b["estimate"], b["low"], b["high"], metric)

    lines = ["| model | arm | seeds | KL − KL(×1) | accuracy − acc(×1) | eligible |", "|---|---|---|---|---|---|"]
    for c in choices:
        for r in c["scales"]:
            verdict = "undecided" if r["eligible"] is None else \
                "yes" if r["eligible"] else "no: " + "; ".join(r["fails"])
            lines.append(f"| {slug(c['model'])} | {c['method']} ×{r['scale']:g} | {r['seeds']} | "
                         f"{cell(r['kl'], 'kl')} | {cell(r['accuracy'], c['metric'])} | {verdict} |")
        lines.append(f"| {slug(c['model'])} | **chosen: ×{c['chosen']:g}** | | | | {c['why']} |")
    return "\n".join(lines)
