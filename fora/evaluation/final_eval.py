"""The end-of-run evaluation of train.py: held-out accuracy before (adapters off) and after training.

`--eval-data` (default: `builtin` when the run trained on the built-in cloze task, else no
evaluation) is scored twice by one protocol (`fora.evaluation.accuracy`): with every adapter off
(`fora.inject.adapters_disabled`, the base model exactly) and on, on the same items. The report,
with each item's result before and after (for paired statistics), goes to `OUT/eval.json`.
`fora.training.run.main` takes `final_evaluation` as its `final_eval` hook (training does not import
evaluation: the arrow points the other way).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from fora.evaluation.accuracy import evaluate_tasks
from fora.evaluation.tasks_io import load_eval_tasks
from fora.inject import adapters_disabled
from fora.training.cloze import cloze_task


def eval_tasks(eval_data: str) -> dict[str, list[dict]]:
    """`--eval-data`: "builtin" (the cloze task's held-out test split) or a test file / folder."""
    if eval_data == "builtin":
        return {"cloze": cloze_task("test")}
    return load_eval_tasks(eval_data)


def before_after(model: nn.Module, tokenizer: Any, tasks: Mapping[str, Sequence[dict]], *, protocol: str,
                 limit: int | None, template: str, batch_size: int = 8, max_new_tokens: int = 16,
                 progress: bool = True) -> dict[str, Any]:
    """Accuracy with the adapters off (the base model) and on, on the same items.

    Returns:
        {"protocol", "limit", "before": report, "after": report, "items": [{"task", "index", "answer",
        "before", "after" (correct or not), "prediction_before", "prediction_after"[, "scores_before",
        "scores_after" (loglik: summed log-prob per choice)]}]}, each report as `evaluate_tasks`
        returns it without its predictions.
    """
    was_training = model.training
    model.eval()
    run = dict(protocol=protocol, template=template, batch_size=batch_size, limit=limit, progress=progress,
               max_new_tokens=max_new_tokens)
    try:
        with adapters_disabled(model):
            before = evaluate_tasks(model, tokenizer, tasks, label="before training (adapters off)", **run)
        after = evaluate_tasks(model, tokenizer, tasks, label="after training (adapters on)", **run)
    finally:
        model.train(was_training)
    items = [{"task": b["task"], "index": b["index"], "answer": b["answer"], "before": bool(b["correct"]),
              "after": bool(a["correct"]), "prediction_before": b["prediction"], "prediction_after": a["prediction"],
              **({"scores_before": b["scores"], "scores_after": a["scores"]} if "scores" in b else {})}
             for b, a in zip(before.pop("predictions"), after.pop("predictions"))]
    return {"protocol": protocol, "limit": limit, "before": before, "after": after, "items": items}


class FinalEvaluation:
    """`before_after` on `cfg.final_eval_data` with the run's protocol, limit and template, and its
    table: the `final_eval` hook of `fora.training.run.main`, which calls `check(cfg)` first, before
    the model loads, so that a bad test file fails in seconds, not after the training."""

    def check(self, cfg: Any) -> None:
        """Read and check `cfg.final_eval_data` (a test file or folder; "builtin" needs no check)."""
        if cfg.final_eval_data not in ("none", "builtin"):
            eval_tasks(cfg.final_eval_data)

    def __call__(self, model: nn.Module, tokenizer: Any, cfg: Any,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> tuple[dict[str, Any], str]:
        tasks = eval_tasks(cfg.final_eval_data)
        with autocast():
            report = before_after(model, tokenizer, tasks, protocol=cfg.protocol, limit=cfg.eval_limit,
                                  template=cfg.template, batch_size=min(cfg.batch_size, 8))
        return report, eval_table(report)


final_evaluation = FinalEvaluation()


def eval_table(report: Mapping[str, Any]) -> str:
    """A small Markdown table: accuracy per task before and after training."""
    lines = [f"| task ({report['protocol']}) | n | before | after |", "|---|---|---|---|"]
    for name, b in report["before"]["tasks"].items():
        a = report["after"]["tasks"][name]
        lines.append(f"| {name} | {b['n']} | {b['accuracy']:.3f} | {a['accuracy']:.3f} |")
    if len(report["before"]["tasks"]) > 1:
        lines.append(f"| average | | {report['before']['average']:.3f} | {report['after']['average']:.3f} |")
    return "\n".join(lines)
