"""The paper's claims against finished reproduction runs: one verdict per claim, by a rule fixed in code.

A run folder `<model>/<method>-s<seed>` of `scripts/reproduce.py` holds `result.json` (one row:
accuracies, erank/r, KL, ...) and, since per-item recording, `items.json`: the per-item correctness
of every protocol on the test split and each record's cluster (source sentence). Accuracy claims
are contrasts of arms on the same items (`fora.evaluation.paired.contrast_interval`: paired,
clustered by sentence, seeds resampled; stratified when the item record carries `strata`, one label
per item, as the commonsense suite's task averages do: `fora.evaluation.suite.view`); per-run
quantities (erank/r, KL) use Student's t over the seed-paired contrasts (`t_interval`).

Decision rule (written before the runs; `decide`), on the 95 % interval [lo, hi] of the contrast:

* "greater" (the claim says the contrast is > 0): agrees if lo > 0, disagrees if hi < 0.
* "less" (the contrast is < 0): agrees if hi < 0, disagrees if lo > 0.
* "not-below m" (no worse than m below): agrees if lo >= -m, disagrees if hi < -m.
* "within m" (the two match): agrees if -m <= lo and hi <= m, disagrees if lo > m or hi < -m.

Anything else, or no interval (one seed for a per-run quantity, runs without items.json, an arm
not run), is "undecided at this scale", with the reason. So is an accuracy claim on one seed: its
bootstrap interval resamples the items but cannot contain the seed-to-seed spread (the same arm
moves by 2-3 points between seeds here), so it is shown and does not decide (`MIN_SEEDS`).
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fora.evaluation.paired import Interval, contrast_interval, mcnemar_exact, t_interval

ITEMS_FILE = "items.json"
AGREES, DISAGREES, UNDECIDED = "agrees", "disagrees", "undecided at this scale"
MIN_SEEDS = 2  # a verdict needs seed variance inside its interval: one seed's interval covers items only
STIEFEL_EFFECT = {"fora": 0.5, "stiefel-lora": 0.5, "fg-lora": -0.5, "lora": -0.5}  # mean over the two columns


@dataclass(frozen=True)
class Claim:
    """One claim of the paper as a contrast of arms, with the rule that decides it."""

    name: str
    paper: str          # the paper's figure
    weights: Mapping[str, float]
    metric: str         # a per-item protocol (acc_loglik, ...) or a per-run quantity (erank_ratio, kl)
    rule: str           # greater | less | not-below | within
    margin: float = 0.0
    params: tuple[str, str] | None = None  # a parameter ratio the claim states: print the measured one


CLAIMS: tuple[Claim, ...] = (
    Claim("FoRA ≥ LoRA-all at half the parameters", "+0.9 to +7.1 pt (Table 1 averages)",
          {"fora": 1, "lora": -1}, "acc_loglik", "greater", params=("fora", "lora")),
    Claim("FoRA ≥ DoRA", "+1.0 to +7.0 pt (Table 1)", {"fora": 1, "dora": -1}, "acc_loglik", "greater"),
    Claim("FoRA within 0.7–0.8 pt of AdaLoRA at ¼ its parameters", "−0.7 pt (1B); −2.5 to +0.9 (Table 1)",
          {"fora": 1, "adalora": -1}, "acc_loglik", "not-below", 0.008, params=("fora", "adalora")),
    Claim("Stiefel raises erank/r (0.71 → 0.88)", "+0.17 (Table 6)", STIEFEL_EFFECT, "erank_ratio", "greater"),
    Claim("super-additive 2×2: (fora − fg-lora) − (stiefel-lora − lora) > 0",
          "> 0 claimed (its Table 11 PPL: +0.86, i.e. sub-additive)",
          {"fora": 1, "fg-lora": -1, "stiefel-lora": -1, "lora": 1}, "acc_loglik", "greater"),
    Claim("Fisher-K ≥ random-K (both Stiefel)", "FoRA PPL 7.04 vs random-K LoRA 7.28 (Table 5)",
          {"fora": 1, "random-k": -1}, "acc_loglik", "greater"),
    Claim("Fisher alone matches rank reduction at the same budget (fg-lora vs lora-half-rank, ±2 pt)",
          "PPL 7.38 vs 7.35 (Table 5)", {"fg-lora": 1, "lora-half-rank": -1}, "acc_loglik", "within", 0.02),
    Claim("Stiefel keeps outputs closer to the base (KL drift lower)", "−0.09 (KL 0.053 vs 0.128–0.160, Table 6)",
          STIEFEL_EFFECT, "kl", "less"),
)
PER_RUN = ("erank_ratio", "kl")


def decide(iv: Interval | None, rule: str, margin: float = 0.0) -> str:
    """The verdict of the module docstring's rule for an interval (None or no bounds: undecided)."""
    if iv is None or iv.low is None:
        return UNDECIDED
    lo, hi = iv.low, iv.high
    if rule == "greater":
        return AGREES if lo > 0 else DISAGREES if hi < 0 else UNDECIDED
    if rule == "less":
        return AGREES if hi < 0 else DISAGREES if lo > 0 else UNDECIDED
    if rule == "not-below":
        return AGREES if lo >= -margin else DISAGREES if hi < -margin else UNDECIDED
    if rule == "within":
        return AGREES if -margin <= lo and hi <= margin else DISAGREES if lo > margin or hi < -margin else UNDECIDED
    raise ValueError(f"unknown rule {rule!r}; choose one of greater, less, not-below, within")


def load_items(run: Path) -> dict[str, Any] | None:
    """A run's items.json, or None for runs measured before per-item recording."""
    path = Path(run) / ITEMS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def finished_runs(out: Path) -> tuple[list[dict], dict[str, dict], dict | None]:
    """(result rows, base rows by model, the config stored in out/results.json or None) under `out`.

    The rows are the run folders' result.json; without run folders (a stored copy holding only
    results.json) they and the base rows come from out/results.json.
    """
    out = Path(out)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/*-s*/result.json"))]
    base = {}
    for p in sorted(out.glob("*/base.json")):
        row = json.loads(p.read_text())
        base[row["model"]] = row
    stored = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    if rows:
        return rows, base, stored and stored["config"]
    if stored is None:
        raise SystemExit(f"no finished runs under {out} (no */*-s*/result.json, no results.json); "
                         "run scripts/reproduce.py without --report first")
    return stored["runs"], stored["base"], stored["config"]


def _by_arm_seed(rows: Sequence[Mapping[str, Any]], model: str) -> dict[str, dict[int, Mapping[str, Any]]]:
    out: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in rows:
        if r["model"] == model and arm_label(r) == r["method"]:  # default Stiefel step only
            out.setdefault(r["method"], {})[r["seed"]] = r
    return out


def evaluate_claim(claim: Claim, rows: Sequence[Mapping[str, Any]], items: Mapping[tuple[str, str, int], Any],
                   model: str, *, n_boot: int = 4000, seed: int = 0) -> dict[str, Any]:
    """One row of the claims table for `model`: estimate, interval, verdict and why.

    Args:
        rows: result.json rows (every model); items: (model, method, seed) -> items.json dict or None.
    """
    runs = _by_arm_seed(rows, model)
    out = {"model": model, "claim": claim.name, "paper": claim.paper, "metric": claim.metric,
           "estimate": None, "low": None, "high": None, "seeds": 0, "mcnemar_p": None}
    missing = [a for a in claim.weights if a not in runs]
    if missing:
        return {**out, "verdict": UNDECIDED, "why": f"not run: {', '.join(missing)}"}
    seeds = sorted(set.intersection(*(set(runs[a]) for a in claim.weights)))
    if not seeds:
        return {**out, "verdict": UNDECIDED, "why": "the arms share no seed"}
    out["seeds"] = len(seeds)
    if claim.metric in PER_RUN:
        values = [sum(w * runs[a][s][claim.metric] for a, w in claim.weights.items()) for s in seeds]
        iv = t_interval(values)
        why = iv.method
    else:
        found = {(a, s): items.get((model, a, s)) for a in claim.weights for s in seeds}
        lacking = sorted({a for (a, s), it in found.items() if it is None})
        point = sum(w * np.mean([runs[a][s][claim.metric] for s in seeds]) for a, w in claim.weights.items())
        if lacking:
            return {**out, "estimate": float(point), "verdict": UNDECIDED,
                    "why": f"no per-item results ({ITEMS_FILE}) for {', '.join(lacking)}: point estimate only"}
        if len({it["test_sha256"] for it in found.values()}) != 1:
            return {**out, "estimate": float(point), "verdict": UNDECIDED,
                    "why": "arms were evaluated on different test items (test_sha256 differs)"}
        tables = {a: [found[a, s][claim.metric] for s in seeds] for a in claim.weights}
        first = found[next(iter(found))]
        iv = contrast_interval(tables, claim.weights, clusters=first["clusters"], strata=first.get("strata"),
                               n_boot=n_boot, seed=seed)
        why = iv.method
        if len(claim.weights) == 2:
            a, b = claim.weights
            out["mcnemar_p"] = [mcnemar_exact(tables[a][k], tables[b][k])["p"] for k in range(len(seeds))]
    verdict = decide(iv, claim.rule, claim.margin)
    if len(seeds) < MIN_SEEDS:
        verdict, why = UNDECIDED, f"one seed: the interval resamples items only, not seeds ({why})"
    if claim.params:
        why += param_ratio_text(*(runs[a][seeds[0]] for a in claim.params), *claim.params)
    return {**out, "estimate": iv.estimate, "low": iv.low, "high": iv.high, "verdict": verdict, "why": why}


def param_ratio_text(a: Mapping[str, Any], b: Mapping[str, Any], name_a: str, name_b: str) -> str:
    """"; parameters, fora vs adalora: 0.33 trained, 0.47 of the final budget" ("" when a count is missing).

    The final budget (`budget_params`: AdaLoRA's kept triplets) is named only where it differs from the
    trained count, so a claim "at half / a quarter of the parameters" shows the ratio the runs had.
    """
    if "trainable_params" not in a or "trainable_params" not in b:
        return ""
    text = f"; parameters, {name_a} vs {name_b}: {a['trainable_params'] / b['trainable_params']:.2f} trained"
    budget_a, budget_b = (r.get("budget_params", r["trainable_params"]) for r in (a, b))
    if (budget_a, budget_b) != (a["trainable_params"], b["trainable_params"]):
        text += f", {budget_a / budget_b:.2f} of the final budget"
    return text


def claims_rows(rows: Sequence[Mapping[str, Any]], items: Mapping[tuple[str, str, int], Any], *,
                n_boot: int = 4000, seed: int = 0) -> list[dict[str, Any]]:
    """Every claim for every model that has runs."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    return [evaluate_claim(c, rows, items, m, n_boot=n_boot, seed=seed) for m in models for c in CLAIMS]


def _num(x: float | None, metric: str) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f} pt" if metric not in PER_RUN else f"{x:+.3f}"


def interval_text(estimate: float | None, low: float | None, high: float | None, metric: str) -> str:
    """"+1.9 pt [+0.0 pt, +3.8 pt]" for an accuracy metric, "+0.080 [...]" for a per-run one; "-" without estimate."""
    text = _num(estimate, metric)
    return text if estimate is None or low is None else f"{text} [{_num(low, metric)}, {_num(high, metric)}]"


def claims_markdown(table: Sequence[Mapping[str, Any]], slug=lambda m: Path(m).name) -> str:
    """The claims table: model, claim, the paper's figure, ours with its 95 % interval, verdict, why."""
    lines = ["| model | claim | paper | ours (95 % interval) | seeds | McNemar p | verdict | why |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        ours = interval_text(r["estimate"], r["low"], r["high"], r["metric"])
        p = ", ".join(f"{x:.2g}" for x in r["mcnemar_p"]) if r["mcnemar_p"] else "-"
        lines.append(f"| {slug(r['model'])} | {r['claim']} | {r['paper']} | {ours} | {r['seeds']} | {p} | "
                     f"{r['verdict']} | {r['why']} |")
    return "\n".join(lines)


def claims_brief(table: Sequence[Mapping[str, Any]], model: str) -> str:
    """The head of the claims table for one model (the README's): claim, paper, ours, seeds, verdict."""
    lines = ["| claim | paper | ours (95 % interval) | seeds | verdict |", "|---|---|---|---|---|"]
    for r in table:
        if r["model"] != model:
            continue
        ours = interval_text(r["estimate"], r["low"], r["high"], r["metric"])
        lines.append(f"| {r['claim']} | {r['paper']} | {ours} | {r['seeds']} | {r['verdict']} |")
    return "\n".join(lines)


def mean_sd(rows: Sequence[Mapping[str, Any]], key: str, fmt: str) -> str:
    """"mean ± sd" of `key` over the rows that have it (sample sd over seeds; the mean alone for one; "-" for none)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return format(mean, fmt) + (f" ± {format(statistics.stdev(values), fmt)}" if len(values) > 1 else "")


def arm_label(row: Mapping[str, Any]) -> str:
    """The row's arm: its method, or e.g. "fora ×0.25" for a scaled Stiefel step."""
    return row.get("arm", row["method"])


def results_table(base: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], arms: Sequence[str],
                  slug: Callable[[str], str]) -> str:
    """Markdown: one line per (model, arm), seeds averaged (± sample std over seeds); `arms` first, in order."""
    head = ("| model | method | seeds | layers | trainable params | val loss | acc (loglik) | acc_norm "
            "| acc (generate) | acc (fill-in LM) | ppl before → after | erank / r | max ‖AAᵀ−I‖ | KL(base‖tuned) | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model, b in base.items():
        lines.append(f"| {slug(model)} | base (zero-shot) | - | - | 0 | - | {b['acc_loglik']:.3f} | "
                     f"{b['acc_norm']:.3f} | {mean_sd([b], 'acc_generate', '.3f')} | {mean_sd([b], 'acc_fill_in', '.3f')} | "
                     f"{b['perplexity']:.2f} | "
                     "- | - | 0 | - |")
        present = sorted({arm_label(r) for r in rows if r["model"] == model} - set(arms))
        for arm in [*arms, *present]:
            group = [r for r in rows if r["model"] == model and arm_label(r) == arm]
            if not group:
                continue
            lines.append(
                f"| {slug(model)} | {arm} | {len(group)} | {len(group[0]['layers'])} | "
                f"{group[0]['trainable_params']:,} | {mean_sd(group, 'val_loss', '.3f')} | "
                f"{mean_sd(group, 'acc_loglik', '.3f')} | {mean_sd(group, 'acc_norm', '.3f')} | "
                f"{mean_sd(group, 'acc_generate', '.3f')} | {mean_sd(group, 'acc_fill_in', '.3f')} | "
                f"{b['perplexity']:.2f} → {mean_sd(group, 'perplexity', '.2f')} | "
                f"{mean_sd(group, 'erank_ratio', '.3f')} | {max(r['stiefel_error'] for r in group):.1e} | "
                f"{mean_sd(group, 'kl', '.4f')} | {mean_sd(group, 'train_seconds', '.0f')} |")
    return "\n".join(lines)
