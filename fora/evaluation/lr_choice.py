"""The choice of a learning rate on a validation split (`scripts/reproduce.py --select-lr`).

Each arm is trained at every candidate learning rate (the run's steps, data and first seed) and
scored by loglik on the suite's validation split (`fora.evaluation.measure.validation_scores`);
the rule, fixed before the runs: the highest accuracy averaged over tasks wins, a tie goes to the
rate listed first. With `--shared-lr` the arms share one rate, the one with the highest mean of
that accuracy over them (`choose_shared_lr`), and so does every arm without a rate of its own, so
that a comparison of the arms is not also one of their rates. Added to the rule once a candidate
had diverged (docs/reproduction.md#the-budget): a rate at which a training `diverged`, its
held-out loss at some evaluation above the base model's, is no candidate (for a shared rate: no
candidate if any arm diverged at it). OUT/<model>/lr_choice.json keeps every figure and the rate
each arm trains at:

    {"model", "split": "val", "metric", "arms": {arm: {"chosen": lr, "seed", "steps",
     "scores": [{"lr", "average", "tasks": {task: accuracy}, "n", "val_loss_start", "val_loss_worst"}],
     "shared_with": [arms] (shared only)}}}

and the runs of that arm train at the chosen rate (`chosen_lr`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

LR_CHOICE = "lr_choice.json"


def chosen_lr(folder: Path, arm: str) -> float | None:
    """The rate `arm` trains at by folder/lr_choice.json: its own choice, else the rate its comparison
    shares (`--shared-lr`, for every arm without one of its own), else None (train at --lr)."""
    path = Path(folder) / LR_CHOICE
    arms = json.loads(path.read_text())["arms"] if path.is_file() else {}
    if arm in arms:
        return arms[arm]["chosen"]
    return next((c["chosen"] for c in arms.values() if "shared_with" in c), None)


def lr_choice_markdown(choice: Mapping[str, Any], slug: Callable[[str], str] = lambda m: m,
                       labels: Mapping[str, str] | None = None) -> str:
    """One line per (arm, lr) of an lr_choice.json: validation accuracy per task (columns in the order of
    `labels`, task -> column name) and on average, the chosen one marked (**shared**: one rate for several
    arms, `choose_shared_lr`)."""
    labels = labels or {}
    order = list(labels)

    def held_out(s: Mapping[str, Any]) -> str:
        start, worst = s.get("val_loss_start"), s.get("val_loss_worst")
        if start is None or worst is None:
            return "-"
        return f"{worst:.3f} > {start:.3f}: diverged" if diverged(s) else f"{worst:.3f} ({start:.3f})"

    tasks = sorted(dict.fromkeys(t for arm in choice["arms"].values() for s in arm["scores"] for t in s["tasks"]),
                   key=lambda t: (order.index(t) if t in order else len(order), t))
    lines = [f"| model | arm | lr | seed | steps | {' | '.join(labels.get(t, t) for t in tasks)} | average "
             "| held-out loss, worst (start) | chosen |", "|" + "---|" * (8 + len(tasks))]
    for arm, c in choice["arms"].items():
        for s in c["scores"]:
            mark = ("**chosen**" if "shared_with" not in c else "**shared**") if s["lr"] == c["chosen"] else ""
            lines.append(f"| {slug(choice['model'])} | {arm} | {s['lr']:g} | {c['seed']} | {c['steps']} | "
                         + " | ".join(f"{100 * s['tasks'][t]:.1f}" if t in s["tasks"] else "-" for t in tasks)
                         + f" | {100 * s['average']:.1f} | {held_out(s)} | {mark} |")
    return "\n".join(lines)


def diverged(score: Mapping[str, Any]) -> bool:
    """Whether a candidate's training diverged: its held-out loss at some evaluation after the start
    (`val_loss_worst`) above the base model's, its evaluation at step 0 (`val_loss_start`). A candidate
    without those records counts as not diverged."""
    start, worst = score.get("val_loss_start"), score.get("val_loss_worst")
    return start is not None and worst is not None and worst > start


def choose_lr(scores: Sequence[Mapping[str, Any]]) -> float:
    """The learning rate with the highest validation accuracy (mean over tasks) among those at which the
    training did not diverge (`diverged`); a tie goes to the one listed first."""
    if not scores:
        raise ValueError("no validation scores to choose a learning rate from")
    stable = [(i, s) for i, s in enumerate(scores) if not diverged(s)]
    if not stable:
        raise _diverged_everywhere("the training", [s["lr"] for s in scores])
    return max(stable, key=lambda kv: (kv[1]["average"], -kv[0]))[1]["lr"]


def choose_shared_lr(scores: Mapping[str, Sequence[Mapping[str, Any]]]) -> float:
    """One learning rate for several arms: the highest mean over the arms of their validation accuracy
    (mean over tasks) among the rates at which no arm's training diverged (`diverged`); a tie goes to the
    rate listed first. Every arm must have scored the same rates."""
    rates = {arm: [s["lr"] for s in arm_scores] for arm, arm_scores in scores.items()}
    first = next(iter(rates.values()), None)
    if not first:
        raise ValueError("no validation scores to choose a learning rate from")
    if any(r != first for r in rates.values()):
        raise ValueError(f"a shared learning rate needs every arm scored at the same rates, got {rates}")
    means = [{"lr": lr, "average": sum(s[i]["average"] for s in scores.values()) / len(scores)}
             for i, lr in enumerate(first) if not any(diverged(s[i]) for s in scores.values())]
    if not means:
        raise _diverged_everywhere("an arm's training", first)
    return choose_lr(means)


def _diverged_everywhere(whose: str, rates: Sequence[float]) -> ValueError:
    return ValueError(f"{whose} diverged at every learning rate tried ({', '.join(f'{lr:g}' for lr in rates)}): "
                      "its held-out loss rose above the base model's; try lower rates")

