"""The choice of a learning rate on a validation split (`scripts/reproduce.py --select-lr`).

Each arm is trained at every candidate learning rate (the run's steps, data and first seed) and
scored by loglik on the suite's validation split (`fora.evaluation.measure.validation_scores`);
the rule, fixed before the runs: the highest accuracy averaged over tasks wins, a tie goes to the
rate listed first. OUT/<model>/lr_choice.json keeps every figure and the choice per arm:

    {"model", "split": "val", "metric", "arms": {arm: {"chosen": lr, "seed", "steps",
     "scores": [{"lr", "average", "tasks": {task: accuracy}, "n"}]}}}

and the runs of that arm train at the chosen rate (`chosen_lr`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

LR_CHOICE = "lr_choice.json"


def chosen_lr(folder: Path, arm: str) -> float | None:
    """The learning rate chosen for `arm` in folder/lr_choice.json, or None (no file, or no choice for it)."""
    path = Path(folder) / LR_CHOICE
    choice = json.loads(path.read_text())["arms"].get(arm) if path.is_file() else None
    return None if choice is None else choice["chosen"]


def lr_choice_markdown(choice: Mapping[str, Any], slug: Callable[[str], str] = lambda m: m,
                       labels: Mapping[str, str] | None = None) -> str:
    """One line per (arm, lr) of an lr_choice.json: validation accuracy per task (columns in the order of
    `labels`, task -> column name) and on average, the chosen one marked."""
    labels = labels or {}
    order = list(labels)
    tasks = sorted(dict.fromkeys(t for arm in choice["arms"].values() for s in arm["scores"] for t in s["tasks"]),
                   key=lambda t: (order.index(t) if t in order else len(order), t))
    lines = [f"| model | arm | lr | seed | steps | {' | '.join(labels.get(t, t) for t in tasks)} | average | chosen |",
             "|" + "---|" * (7 + len(tasks))]
    for arm, c in choice["arms"].items():
        for s in c["scores"]:
            mark = "**chosen**" if s["lr"] == c["chosen"] else ""
            lines.append(f"| {slug(choice['model'])} | {arm} | {s['lr']:g} | {c['seed']} | {c['steps']} | "
                         + " | ".join(f"{100 * s['tasks'][t]:.1f}" if t in s["tasks"] else "-" for t in tasks)
                         + f" | {100 * s['average']:.1f} | {mark} |")
    return "\n".join(lines)


def choose_lr(scores: Sequence[Mapping[str, Any]]) -> float:
    """The learning rate with the highest validation accuracy (mean over tasks); a tie goes to the one listed first."""
    if not scores:
        raise ValueError("no validation scores to choose a learning rate from")
    return max(enumerate(scores), key=lambda kv: (kv[1]["average"], -kv[0]))[1]["lr"]
