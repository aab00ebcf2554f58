"""The commonsense suite's report (`scripts/reproduce.py --task commonsense --report`).

Per model: accuracy per task and averaged over tasks, each arm with its 95 % interval and the
paper's Table B figure beside it where the paper has one; the 2×2 contrasts, per task and on the
averages; the paper's claims, decided by `fora.evaluation.report`'s rule; Table 6's diagnostics
(erank/r, ‖ΔW‖_F, KL drift) beside the paper's.

Per-item results (`fora.evaluation.measure.measure_tasks`): each arm's items.json holds
{"test_sha256", "tasks": {task: {metric: 0/1 per test record}}}. An average over tasks is the mean
of the per-task accuracies (as LLM-Adapters and the paper average); its interval is
`fora.evaluation.paired.contrast_interval`'s bootstrap stratified by task (records resampled within
their task, then seeds), and a contrast of arms is paired as everywhere else. `view` flattens the
chosen tasks of every run into that form, so that `fora.evaluation.report.evaluate_claim` decides
suite claims and contrasts with the cloze claims' code.

Table B (the paper's Appendix B) averages over four tasks, not its seven columns: its CS-Avg is the
mean of PIQA, HellaSwag, WinoGrande and ARC-e, the tasks "shared across all backbones" (its caption),
which its Gemma-3-270M cells reproduce to 0.02 (LoRA-all: 53.18 from the cells, 53.16 printed). So the
tables give three averages: over those 4 (CS-Avg, the paper's), over Table B's 7 columns, and over
all 8 tasks (with SIQA, which Table B lacks). The claims use the 7-task average; Table B's figure
for a claim is computed from its cells on the same 7 tasks, its CS-Avg figure quoted beside.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from fora.evaluation.budget_choice import one_label_agreement
from fora.evaluation.lr_choice import lr_choice_markdown
from fora.evaluation.paired import INTERACTION, contrast_interval
from fora.evaluation.report import (CLAIMS, STIEFEL_EFFECT, Claim, arm_label, claims_markdown,
                                    evaluate_claim, mean_sd)
from fora.training.commonsense import TASKS

BASE = "base (zero-shot)"
LABELS = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag",
          "winogrande": "WinoGrande", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA"}
TABLE_B_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
CS_AVG_TASKS = ("piqa", "hellaswag", "winogrande", "ARC-Easy")  # Table B's CS-Avg
AVERAGES = {"avg 4 (CS-Avg)": CS_AVG_TASKS, "avg 7": TABLE_B_TASKS, "avg 8": TASKS}
CLAIM_TASKS = TABLE_B_TASKS  # the claims' accuracy: loglik, averaged over Table B's seven tasks
METRICS = {"acc_loglik": "loglik accuracy", "acc_norm": "loglik accuracy, length-normalised (acc_norm)",
           "acc_generate": "generate-and-extract accuracy (LLM-Adapters' protocol)"}

# The A-side ablation as arms of their own: (method, Stiefel factor)
VARIANTS = {"fora-a": ("fora", "A"), "stiefel-lora-a": ("stiefel-lora", "A")}
SUITE_ARMS = ("lora", "fg-lora", "stiefel-lora", "fora", "lora-half-rank", "random-k", "dora", "adalora",
              "fora-a", "stiefel-lora-a")  # the rows of every table, "not run" where missing

# The paper's Table B (Appendix B): method -> (params in M, {task: accuracy %}, printed CS-Avg), mean of 3 seeds
_B = ("boolq", "piqa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
TABLE_B: dict[str, dict[str, tuple[float, dict[str, float], float]]] = {
    "gemma-3-270m": {
        "lora": (5.1, dict(zip(_B, (56.4, 67.3, 39.0, 52.9, 53.5, 26.8, 31.6))), 53.16),
        "fg-lora": (2.5, dict(zip(_B, (59.8, 66.3, 39.4, 52.8, 51.9, 27.1, 31.6))), 52.61),
        "stiefel-lora": (5.1, dict(zip(_B, (59.7, 66.5, 38.0, 52.8, 48.3, 25.6, 29.9))), 51.39),
        "fora": (2.5, dict(zip(_B, (59.5, 66.3, 39.2, 54.5, 51.4, 25.9, 30.7))), 52.85),
    },
}
# The paper's Table 6 (LLaMA-3.2-3B, r = 32): erank / r, ||dW||_F, KL(base || tuned)
TABLE_6 = {"lora": (0.71, 9.2, 0.160), "fg-lora": (0.68, 7.3, 0.128), "stiefel-lora": (0.90, 95.9, 0.054),
           "fora": (0.88, 80.6, 0.053)}

STIEFEL_GAIN = Claim("Stiefel raises accuracy (the 2×2's Stiefel effect, ½ of both columns)",
                     "PPL −1.92 (Table 11, LLaMA-3.2-3B)", STIEFEL_EFFECT, "acc_loglik", "greater")
SUITE_CLAIMS = (*CLAIMS, STIEFEL_GAIN)

# the 2x2 contrasts: label and weights, with {fora}/{stiefel} the two Stiefel arms of the side
_CONTRASTS = (
    ("{fora} − lora", {"fora": 1, "lora": -1}),
    ("{fora} − fg-lora (Stiefel at Fisher's K)", {"fora": 1, "fg-lora": -1}),
    ("{stiefel} − lora (Stiefel at all layers)", {"stiefel-lora": 1, "lora": -1}),
    ("fg-lora − lora (Fisher's K, plain)", {"fg-lora": 1, "lora": -1}),
    ("{fora} − {stiefel} (Fisher's K, Stiefel)", {"fora": 1, "stiefel-lora": -1}),
    ("Stiefel effect ½[({fora} − fg-lora) + ({stiefel} − lora)]", STIEFEL_EFFECT),
    ("interaction ({fora} − fg-lora) − ({stiefel} − lora)", INTERACTION),
)
SIDES = {"B": {"fora": "fora", "stiefel-lora": "stiefel-lora"}, "A": {"fora": "fora-a", "stiefel-lora": "stiefel-lora-a"}}
_EXTRA = (("fora − fora-a (B side − A side)", {"fora": 1, "fora-a": -1}),
          ("stiefel-lora − stiefel-lora-a (B side − A side)", {"stiefel-lora": 1, "stiefel-lora-a": -1}))


def contrasts() -> list[tuple[str, str, dict[str, float]]]:
    """(side, label, weights) of every 2×2 contrast: the B side (FoRA), the A side (the ablation), B − A."""
    out = []
    for side, names in SIDES.items():
        for label, weights in _CONTRASTS:
            out.append((side, label.format(fora=names["fora"], stiefel=names["stiefel-lora"]),
                        {names.get(a, a): float(w) for a, w in weights.items()}))
    return out + [("B − A", label, {a: float(w) for a, w in weights.items()}) for label, weights in _EXTRA]


def view(rows: Sequence[Mapping[str, Any]], items: Mapping[tuple, Any], tasks: Sequence[str], metric: str
         ) -> tuple[list[dict], dict[tuple, dict | None]]:
    """The runs as `evaluate_claim` takes them, for `metric` averaged over `tasks`.

    Each row's "method" becomes its arm label (so the A-side and own-lr arms are arms of their own)
    and its `metric` the mean over `tasks` of the per-task accuracies of its items.json; each item
    record becomes {"test_sha256", "clusters", "strata", metric} with the tasks' records one after
    another, each its own cluster, its task its stratum. A run without items.json keeps its row (the
    mean of its result.json's per-task figures) with None for its items; a run lacking a task is left out.
    """
    rows_v, items_v = [], {}
    for r in rows:
        key = (r["model"], arm_label(r), r["seed"])
        it = items.get(key)
        if it is None or any(metric not in it["tasks"].get(t, {}) for t in tasks):
            per_task = r.get("tasks", {})
            if it is None and all(metric in per_task.get(t, {}) for t in tasks):
                rows_v.append({**r, "method": key[1], metric: statistics.fmean(per_task[t][metric] for t in tasks)})
                items_v[key] = None
            continue
        vectors = [it["tasks"][t][metric] for t in tasks]
        flat = [x for v in vectors for x in v]
        rows_v.append({**r, "method": key[1], metric: statistics.fmean(statistics.fmean(v) for v in vectors)})
        items_v[key] = {"test_sha256": f"{it['test_sha256']}:{metric}:{[len(v) for v in vectors]}",
                        "clusters": list(range(len(flat))), "strata": [t for t, v in zip(tasks, vectors) for _ in v],
                        metric: flat}
    return rows_v, items_v


def arm_interval(items_v: Mapping[tuple, Mapping[str, Any]], model: str, arm: str, metric: str, *,
                 n_boot: int, seed: int = 0) -> tuple[int, Any]:
    """(seeds, the interval of `arm`'s accuracy: seeds averaged, items resampled within tasks, seeds
    resampled) from a `view`; (0, None) when the arm has no items. Seeds evaluated on other items
    than the first seed's are left out."""
    found = [v for (m, a, _), v in sorted(items_v.items(), key=lambda kv: str(kv[0][2]))
             if m == model and a == arm and v is not None]
    found = [v for v in found if v["test_sha256"] == found[0]["test_sha256"]] if found else []
    if not found:
        return 0, None
    iv = contrast_interval({arm: [v[metric] for v in found]}, {arm: 1.0}, clusters=found[0]["clusters"],
                           strata=found[0]["strata"], n_boot=n_boot, seed=seed)
    return len(found), iv


def _pct(iv: Any) -> str:
    return "not run" if iv is None else f"{100 * iv.estimate:.1f} [{100 * iv.low:.1f}, {100 * iv.high:.1f}]"


def _pt(r: Mapping[str, Any]) -> str:
    if r["estimate"] is None:
        return "-"
    text = f"{100 * r['estimate']:+.1f}"
    return text if r["low"] is None else f"{text} [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"


def paper_average(model: str, arm: str, tasks: Sequence[str]) -> float | None:
    """Table B's mean over `tasks` for (model, arm), from its cells; None where it has no such row or cell."""
    row = TABLE_B.get(model, {}).get(arm)
    if row is None or any(t not in row[1] for t in tasks):
        return None
    return statistics.fmean(row[1][t] for t in tasks)


def paper_contrast(model: str, weights: Mapping[str, float], tasks: Sequence[str]) -> float | None:
    """The contrast in Table B's cells (accuracy points), averaged over `tasks`; None when an arm is not in it."""
    values = {a: paper_average(model, a, tasks) for a in weights}
    return None if None in values.values() else sum(w * values[a] for a, w in weights.items())


def _paper_cs_contrast(model: str, weights: Mapping[str, float]) -> float | None:
    """The contrast on Table B's printed CS-Avg column."""
    table = TABLE_B.get(model, {})
    return None if any(a not in table for a in weights) else sum(w * table[a][2] for a, w in weights.items())


def arms_of(rows: Sequence[Mapping[str, Any]], model: str) -> list[str]:
    present = list(dict.fromkeys(arm_label(r) for r in rows if r["model"] == model))
    return [*SUITE_ARMS, *(a for a in present if a not in SUITE_ARMS)]


def base_cells(model: str, base_items: Any, columns: Sequence[Sequence[str]], metric: str, *, n_boot: int) -> list[str]:
    """The base model's zero-shot accuracy over each column's tasks, in %, with its 95 % interval."""
    row, stored = [{"model": model, "method": BASE, "seed": None}], {(model, BASE, None): base_items}
    return [_pct(arm_interval(view(row, stored, tasks, metric)[1], model, BASE, metric, n_boot=n_boot)[1])
            for tasks in columns]


def accuracy_table(model: str, rows: Sequence[Mapping[str, Any]], items: Mapping[tuple, Any],
                   base_items: Mapping[str, Any] | None, metric: str, *, n_boot: int) -> str:
    """One line per arm (base first, "not run" where missing): its accuracy per task and the three
    averages, in %, with 95 % intervals; under each arm Table B has, the paper's figures."""
    columns = [(LABELS[t], (t,)) for t in TASKS] + list(AVERAGES.items())
    head = "| arm | seeds | lr | params | " + " | ".join(c for c, _ in columns) + " |"
    lines = [head, "|" + "---|" * (4 + len(columns))]
    views = [view(rows, items, tasks, metric)[1] for _, tasks in columns]
    if base_items is not None:
        cells = base_cells(model, base_items, [tasks for _, tasks in columns], metric, n_boot=n_boot)
        lines.append(f"| {BASE} | - | - | 0 | " + " | ".join(cells) + " |")
    for arm in arms_of(rows, model):
        group = [r for r in rows if r["model"] == model and arm_label(r) == arm]
        if not group:
            lines.append(f"| {arm} | not run |" + " |" * (2 + len(columns)))
        else:
            found = [arm_interval(v, model, arm, metric, n_boot=n_boot) for v in views]
            seeds = max(s for s, _ in found) or len(group)
            lrs = "/".join(format(x, "g") for x in sorted({r["lr"] for r in group if r.get("lr") is not None})) or "-"
            lines.append(f"| {arm} | {seeds} | {lrs} | "
                         f"{group[0]['trainable_params'] / 1e6:.2f} M | " + " | ".join(_pct(iv) for _, iv in found) + " |")
        paper = TABLE_B.get(model, {}).get(arm)
        if paper is not None:
            cells = [f"{paper[1][t[0]]:.1f}" if len(t) == 1 and t[0] in paper[1] else "-" for _, t in columns]
            cells[-3] = f"{paper[2]:.2f}"  # the printed CS-Avg
            cells[-2] = f"({paper_average(model, arm, TABLE_B_TASKS):.2f})"
            lines.append(f"| ↳ {arm}, paper's Table B | 3 | - | {paper[0]:.1f} M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contrasts_table(model: str, rows: Sequence[Mapping[str, Any]], items: Mapping[tuple, Any], metric: str, *,
                    n_boot: int) -> str:
    """Every 2×2 contrast, per task and on the averages, in accuracy points with its paired 95 % interval
    (seeds shared by its arms), and Table B's figure on its 7 tasks and its CS-Avg where it has the arms."""
    columns = [(LABELS[t], (t,)) for t in TASKS] + list(AVERAGES.items())
    views = [view(rows, items, tasks, metric) for _, tasks in columns]
    lines = ["| side | contrast | seeds | " + " | ".join(c for c, _ in columns) + " | Table B, 7 tasks | Table B, CS-Avg |",
             "|" + "---|" * (5 + len(columns))]
    for side, label, weights in contrasts():
        got = [evaluate_claim(Claim(label, "", weights, metric, "greater"), rv, iv, model, n_boot=n_boot)
               for rv, iv in views]
        seeds = max(g["seeds"] for g in got)
        paper7, paper4 = paper_contrast(model, weights, TABLE_B_TASKS), _paper_cs_contrast(model, weights)
        cells = ["not run" if g["why"].startswith("not run") else _pt(g) for g in got]
        lines.append(f"| {side} | {label} | {seeds or '-'} | " + " | ".join(cells) + " | "
                     f"{'-' if paper7 is None else format(paper7, '+.2f')} | "
                     f"{'-' if paper4 is None else format(paper4, '+.2f')} |")
    return "\n".join(lines)


def suite_claims(rows: Sequence[Mapping[str, Any]], items: Mapping[tuple, Any], models: Sequence[str], *,
                 n_boot: int, seed: int = 0) -> list[dict[str, Any]]:
    """`SUITE_CLAIMS` for every model, on loglik accuracy averaged over `CLAIM_TASKS`, by the rule of
    `fora.evaluation.report.decide`. Where Table B has the claim's arms for the model, the paper
    column is Table B's figure on the same 7 tasks (its CS-Avg figure beside), and the last column
    says whether that figure lies inside our interval."""
    rows_v, items_v = view(rows, items, CLAIM_TASKS, "acc_loglik")
    out = []
    for model in models:
        for claim in SUITE_CLAIMS:
            fig = paper_contrast(model, claim.weights, CLAIM_TASKS) if claim.metric == "acc_loglik" else None
            if fig is not None:
                cs = _paper_cs_contrast(model, claim.weights)
                claim = replace(claim, paper=f"{fig:+.1f} pt (Table B, its 7 tasks; CS-Avg {cs:+.2f} pt)")
            r = evaluate_claim(claim, rows_v, items_v, model, n_boot=n_boot, seed=seed)
            if fig is not None and r["low"] is not None:
                inside = r["low"] <= fig / 100 <= r["high"]
                r["why"] += f"; Table B's {fig:+.1f} pt is {'inside' if inside else 'outside'} our interval"
            out.append(r)
    return out


def table6(model: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """erank / r, ‖ΔW‖_F per adapted module (mean) and KL(base ‖ tuned) per arm (mean ± sd over seeds),
    beside the paper's Table 6 (LLaMA-3.2-3B)."""
    lines = ["| arm | seeds | erank / r | ‖ΔW‖_F per module | KL(base ‖ tuned) | paper (Table 6, LLaMA-3.2-3B): "
             "erank / r, ‖ΔW‖_F, KL |", "|---|---|---|---|---|---|"]
    for arm in arms_of(rows, model):
        group = [r for r in rows if r["model"] == model and arm_label(r) == arm]
        paper = TABLE_6.get(arm)
        paper_text = "-" if paper is None else f"{paper[0]:.2f}, {paper[1]:.1f}, {paper[2]:.3f}"
        if not group:
            lines.append(f"| {arm} | not run | | | | {paper_text} |")
            continue
        lines.append(f"| {arm} | {len(group)} | {mean_sd(group, 'erank_ratio', '.3f')} | "
                     f"{mean_sd(group, 'fro_norm_mean', '.3f')} | {mean_sd(group, 'kl', '.4f')} | {paper_text} |")
    return "\n".join(lines)


def averages_brief(model: str, rows: Sequence[Mapping[str, Any]], items: Mapping[tuple, Any],
                   base_items: Any = None, *, n_boot: int) -> str:
    """The README's table: the base model zero-shot, then per arm, loglik accuracy on the three
    averages, Table B's CS-Avg beside."""
    views = {name: view(rows, items, tasks, "acc_loglik")[1] for name, tasks in AVERAGES.items()}
    lines = ["| arm | seeds | params | " + " | ".join(AVERAGES) + " | Table B's CS-Avg |", "|---|---|---|---|---|---|---|"]
    if base_items is not None:
        cells = base_cells(model, base_items, list(AVERAGES.values()), "acc_loglik", n_boot=n_boot)
        lines.append(f"| {BASE} | - | 0 | " + " | ".join(cells) + " | - |")
    for arm in arms_of(rows, model):
        group = [r for r in rows if r["model"] == model and arm_label(r) == arm]
        paper = TABLE_B.get(model, {}).get(arm)
        paper_text = "-" if paper is None else f"{paper[2]:.2f}"
        if not group:
            if paper is not None or arm in SUITE_ARMS[:4]:
                lines.append(f"| {arm} | not run | | | | | {paper_text} |")
            continue
        found = [arm_interval(v, model, arm, "acc_loglik", n_boot=n_boot) for v in views.values()]
        lines.append(f"| {arm} | {max(s for s, _ in found) or len(group)} | {group[0]['trainable_params'] / 1e6:.2f} M | "
                     + " | ".join(_pct(iv) for _, iv in found) + f" | {paper_text} |")
    return "\n".join(lines)


def one_label_table(model: str, rows: Sequence[Mapping[str, Any]], items: Mapping[tuple, Any], base_items: Any,
                    gold: Mapping[str, Sequence[str]]) -> str:
    """Per arm (mean over its seeds with items) and the base model: how much its loglik results on the test
    split look like one constant answer (`fora.evaluation.budget_choice.one_label_agreement`)."""
    def agreement(found: Mapping[str, Any]) -> float:
        got = {t: v["acc_loglik"] for t, v in found["tasks"].items()}
        return one_label_agreement(got, {t: list(gold[t])[:len(v)] for t, v in got.items()})

    lines = ["| arm | seeds | like one answer |", "|---|---|---|"]
    if base_items is not None:
        lines.append(f"| {BASE} | - | {100 * agreement(base_items):.0f} % |")
    for arm in arms_of(rows, model):
        found = [items.get((model, arm, r["seed"])) for r in rows if r["model"] == model and arm_label(r) == arm]
        found = [f for f in found if f is not None]
        if found:
            lines.append(f"| {arm} | {len(found)} | {100 * sum(map(agreement, found)) / len(found):.0f} % |")
    return "\n".join(lines)


def suite_report(rows: Sequence[Mapping[str, Any]], items: Mapping[tuple, Any], base_items: Mapping[str, Any],
                 choices: Mapping[str, Mapping[str, Any]], *, n_boot: int = 4000,
                 slug: Callable[[str], str] = lambda m: m,
                 gold: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Every table of the suite for the models in `rows` and `base_items`.

    Args:
        rows: result.json rows; items: (model, arm label, seed) -> items.json (None where missing);
        base_items: model -> the base model's items.json; choices: model -> lr_choice.json;
        gold: task -> the test split's gold answers (adds `one_label_table`; None: without it).
    Returns:
        {"markdown": the whole report, "briefs": model -> the README's table of averages,
        "claims": the claims rows}.
    """
    models = list(dict.fromkeys([*base_items, *(r["model"] for r in rows)]))
    models += [m for m in TABLE_B if m not in {slug(x) for x in models}]  # the paper's models: "not run" until they land
    claims = suite_claims(rows, items, models, n_boot=n_boot)
    parts, briefs = [], {}
    for model in models:
        name = slug(model)
        parts.append(f"#### {name}")
        for metric, title in METRICS.items():
            parts += [f"{name}, {title}, % [95 % interval]:", "",
                      accuracy_table(model, rows, items, base_items.get(model), metric, n_boot=n_boot), ""]
        parts += [f"{name}, the 2×2 contrasts (loglik accuracy, points [95 % paired interval]):", "",
                  contrasts_table(model, rows, items, "acc_loglik", n_boot=n_boot), "",
                  f"{name}, Table 6's diagnostics:", "", table6(model, rows), ""]
        if gold is not None and any(r["model"] == model for r in rows):
            parts += [f"{name}, how much the loglik results look like one constant answer (test split; "
                      "100 %: every task's results are a constant answer's):", "",
                      one_label_table(model, rows, items, base_items.get(model), gold), ""]
        if model in choices:
            parts += [f"{name}, learning rates on the validation split:", "", lr_choice_markdown(choices[model], slug, LABELS), ""]
        briefs[model] = averages_brief(model, rows, items, base_items.get(model), n_boot=n_boot)
    parts += ["#### The claims (loglik accuracy averaged over Table B's 7 tasks)", "", claims_markdown(claims, slug)]
    return {"markdown": "\n".join(parts), "briefs": briefs, "claims": claims}
