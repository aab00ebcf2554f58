"""The choice of a training budget on a validation split (`scripts/reproduce.py --select-steps`).

An arm trained too briefly learns the answer format and nothing else: its accuracy stays at the
base model's zero-shot level, and comparing two such arms compares noise. So before seeds are
spent, each arm is trained (first seed, the run's batch size, its chosen learning rate) at every candidate
number of steps, and it and the base model are scored by loglik on the suite's validation split
(`fora.evaluation.measure.validation_scores`). The rule, fixed before the runs: a budget leaves
the zero-shot level when, for every arm, the paired 95 % bootstrap interval of acc(arm) - acc(base)
(items resampled within their task, the mean over tasks) lies above 0; the chosen budget is the
smallest such. Whether two arms then differ is what the seeds measure: the budget is not chosen to
make them differ. Without a qualifying budget none is chosen. Beside the rule, `one_label_agreement`
says how much each arm's results look like giving one constant answer, what an arm that has learnt
the format and nothing else does. OUT/<model>/budget_choice.json:

    {"model", "split": "val", "metric", "seed", "arms": [...], "base": {"average", "tasks"},
     "base_one_label", "rungs": [{"steps", "arms": {arm: {"average", "tasks", "val_loss", "lr", "gain":
     {"estimate", "low", "high"}, "one_label"}}, "leaves_zero_shot": bool}], "chosen": steps or None, "why"}
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fora.evaluation.paired import paired_difference

BUDGET_CHOICE = "budget_choice.json"


def _flat(scores: Mapping[str, Any], tasks: Sequence[str]) -> tuple[list[int], list[str]]:
    items = [x for t in tasks for x in scores["items"][t]]
    return items, [t for t in tasks for _ in scores["items"][t]]


def one_label_agreement(items: Mapping[str, Sequence[int]], gold: Mapping[str, Sequence[str]]) -> float:
    """How much an arm's results look like always giving one answer: per task, the largest share of items
    on which its correctness (1 or 0) equals that of answering the same label k every time (right exactly
    where the gold answer is k), over the task's labels k; the mean over tasks. 1.0: on every task the
    results are exactly a constant answer's (for a two-label task, the answer is constant)."""
    shares = []
    for task, got in items.items():
        answers = gold[task]
        if len(answers) != len(got):
            raise ValueError(f"{task}: {len(got)} results for {len(answers)} gold answers; score the same val.json")
        shares.append(max(sum((a == k) == bool(c) for a, c in zip(answers, got)) for k in set(answers)) / len(got))
    return sum(shares) / len(shares)


def choose_budget(base: Mapping[str, Any], scores: Mapping[str, Mapping[int, Mapping[str, Any]]], *,
                  gold: Mapping[str, Sequence[str]] | None = None, n_boot: int = 4000,
                  seed: int = 0) -> dict[str, Any]:
    """The module docstring's rule.

    Args:
        base: the base model's `validation_scores` (with "items").
        scores: arm -> steps -> that run's `validation_scores`, plus "val_loss" (its last validation loss)
            and "lr" (the rate it trained at), both kept as they are.
        gold: task -> the validation items' gold answers: adds each arm's `one_label_agreement`
            ("one_label"; information beside the rule, not part of it).
    Returns:
        The budget_choice.json fields "rungs", "chosen" and "why" (a rung is a number of steps every arm
        has), and "base_one_label" with `gold`.
    """
    if not scores:
        raise ValueError("no arms to choose a budget for; pass --methods")
    tasks = list(base["items"])
    base_items, strata = _flat(base, tasks)
    rungs = []
    for steps in sorted(set.intersection(*(set(s) for s in scores.values()))):
        row: dict[str, Any] = {"steps": steps, "arms": {}}
        for arm, by_steps in scores.items():
            s = by_steps[steps]
            items, arm_strata = _flat(s, tasks)
            if arm_strata != strata:
                raise ValueError(f"{arm} at {steps} steps was scored on other validation items than the base model; "
                                 f"score both on the same SUITE/<task>/val.json")
            gain = paired_difference([items], [base_items], strata=strata, n_boot=n_boot, seed=seed)
            row["arms"][arm] = {"average": s["average"], "tasks": s["tasks"], "val_loss": s.get("val_loss"),
                                "lr": s.get("lr"),
                                "gain": {"estimate": gain.estimate, "low": gain.low, "high": gain.high},
                                "one_label": None if gold is None else one_label_agreement(s["items"], gold)}
        row["leaves_zero_shot"] = all(a["gain"]["low"] > 0 for a in row["arms"].values())
        rungs.append(row)
    chosen = next((r["steps"] for r in rungs if r["leaves_zero_shot"]), None)
    if not rungs:
        why = "no number of steps has been scored for every arm yet"
    elif chosen is None:
        why = (f"no budget tried (up to {rungs[-1]['steps']} steps) takes every arm above the base model's "
               f"zero-shot validation accuracy: try more steps")
    else:
        why = "the smallest budget tried at which every arm is above the base model's zero-shot level"
    return {"rungs": rungs, "chosen": chosen, "why": why,
            "base_one_label": None if gold is None else one_label_agreement(base["items"], gold)}


def budget_choice_markdown(choice: Mapping[str, Any], slug: Callable[[str], str] = lambda m: m,
                           labels: Mapping[str, str] | None = None) -> str:
    """One line per (steps, arm) and the base model: validation accuracy per task (columns in the order of
    `labels`, task -> column name) and on average, the gain over zero-shot with its interval, how much the
    results look like one constant answer (`one_label_agreement`), the run's last loss on train.py's
    held-out records (--val-size, from the training file); then the choice."""
    labels = labels or {}
    order = list(labels)
    tasks = sorted(choice["base"]["tasks"], key=lambda t: (order.index(t) if t in order else len(order), t))
    lines = [f"| model | steps | arm | lr | {' | '.join(labels.get(t, t) for t in tasks)} | average | "
             "− zero-shot [95 % CI] | like one answer | held-out loss |", "|" + "---|" * (8 + len(tasks))]

    def cells(s: Mapping[str, Any]) -> str:
        return " | ".join(f"{100 * s['tasks'][t]:.1f}" for t in tasks) + f" | {100 * s['average']:.1f}"

    def share(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f} %"

    lines.append(f"| {slug(choice['model'])} | 0 | base (zero-shot) | | {cells(choice['base'])} | | "
                 f"{share(choice.get('base_one_label'))} | |")
    for r in choice["rungs"]:
        for arm, a in r["arms"].items():
            g = a["gain"]
            loss = "" if a["val_loss"] is None else f"{a['val_loss']:.3f}"
            lr = "-" if a.get("lr") is None else f"{a['lr']:g}"
            lines.append(f"| {slug(choice['model'])} | {r['steps']} | {arm} | {lr} | {cells(a)} | "
                         f"{100 * g['estimate']:+.1f} [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}] | "
                         f"{share(a.get('one_label'))} | {loss} |")
    chosen = "none" if choice["chosen"] is None else f"{choice['chosen']} steps"
    lines.append(f"\n**Chosen: {chosen}** ({choice['why']}; seed {choice['seed']}, loglik on the validation split).")
    return "\n".join(lines)
