"""The choices made on a suite's validation split before any seeds are spent, as flows over a store of
runs (`scripts/reproduce.py --task commonsense --select-lr / --select-steps`): each candidate is trained
(`fora.evaluation.arms.train_arm`, the first seed) and scored by loglik on SUITE/<task>/val.json; the
rules themselves are `fora.evaluation.lr_choice` and `fora.evaluation.budget_choice`. `cfg` is the
script's ReproduceConfig (the `ArmSettings` plus models, methods, seeds, suite, n_boot and the candidates).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from fora.evaluation.arms import VAL_SCORES, slug, train_arm
from fora.evaluation.budget_choice import BUDGET_CHOICE, budget_choice_markdown, choose_budget
from fora.evaluation.lr_choice import LR_CHOICE, choose_lr, chosen_lr, lr_choice_markdown
from fora.evaluation.plots import read_metrics
from fora.evaluation.suite import LABELS, VARIANTS
from fora.formats.atomic import atomic_write_json, atomic_write_text
from fora.training.commonsense import read_suite

log = logging.getLogger("reproduce")
METRIC = "loglik accuracy, the mean over tasks"


def _cached(path: Path, make: Callable[[], dict]) -> dict:
    """path's JSON, made (and written atomically) first when it is not there: what makes a choice resumable."""
    if not path.is_file():
        atomic_write_json(path, make())
    return json.loads(path.read_text())


def suite_train_file(suite: Path) -> Path:
    """SUITE/commonsense_train.json, or an error naming the command that builds the suite."""
    train = Path(suite) / "commonsense_train.json"
    if not train.is_file():
        raise SystemExit(f"{train} does not exist; build the suite with "
                         f"`python scripts/make_task.py --task commonsense --out {suite}`")
    return train


def select_lr(cfg: Any, train: Callable[..., None] = train_arm) -> dict[str, dict]:
    """--select-lr: each --methods arm trained (first seed, the run's steps) at every learning rate into
    OUT/<model>/lr-select/<arm>-lr<LR>-s<seed>, its loglik accuracy on the suite's validation split
    (val_scores.json there), and the best one (`fora.evaluation.lr_choice.choose_lr`) in OUT/<model>/lr_choice.json
    and lr_choice.md. Resumable like the runs: a scored lr is not trained or scored again."""
    from fora.evaluation.measure import validation_scores  # at call time: tests replace it

    train_file = suite_train_file(cfg.suite)
    val = read_suite(cfg.suite, "val")
    seed, out = cfg.seeds[0], {}
    for model in cfg.models:
        folder = cfg.out / slug(model)
        path = folder / LR_CHOICE
        for arm in cfg.methods:
            method, factor = VARIANTS.get(arm, (arm, "B"))
            scores = []
            for lr in cfg.select_lr:
                run = folder / "lr-select" / f"{arm}-lr{lr:g}-s{seed}"

                def candidate() -> dict:
                    log.info("%s: training at lr %g for the choice on validation", run, lr)
                    train(model, method, seed, train_file, cfg, run, lr=lr, stiefel_factor=factor)
                    return {"lr": lr, **validation_scores(model, run, val)}
                scores.append(_cached(run / VAL_SCORES, candidate))
            # read just before writing: an invocation beside this one may have chosen another arm's rate
            choice = json.loads(path.read_text()) if path.is_file() else {
                "model": model, "split": "val", "metric": METRIC, "arms": {}}
            choice["arms"][arm] = {"chosen": choose_lr(scores), "seed": seed, "steps": cfg.steps, "scores": scores}
            atomic_write_json(path, choice)
            log.info("%s %s: lr %g chosen on validation", model, arm, choice["arms"][arm]["chosen"])
        atomic_write_text(folder / "lr_choice.md", lr_choice_markdown(choice, slug, LABELS) + "\n")
        out[model] = choice
    return out


def select_steps(cfg: Any, train: Callable[..., None] = train_arm) -> dict[str, dict]:
    """--select-steps: each --methods arm trained (first seed) for each number of steps into
    OUT/<model>/steps-select/<arm>-steps<S>-s<seed> and scored on the suite's validation split (val_scores.json
    there), the base model too (OUT/<model>/base_val_scores.json), and the budget
    (`fora.evaluation.budget_choice.choose_budget`) in OUT/<model>/budget_choice.json and .md. A run of the
    arm at --steps with the same settings (OUT/<model>/<arm>-s<seed>) is not trained again for
    that rung (`train_arm` copies it). Resumable: a scored rung is not trained or scored again."""
    from fora.evaluation.measure import validation_scores  # at call time: tests replace it

    train_file = suite_train_file(cfg.suite)
    val = read_suite(cfg.suite, "val")
    seed, out = cfg.seeds[0], {}
    for model in cfg.models:
        folder = cfg.out / slug(model)
        folder.mkdir(parents=True, exist_ok=True)
        log.info("%s: the base model on the validation split (%d records), unless scored before", model,
                 sum(map(len, val.values())))
        base = _cached(folder / "base_val_scores.json", lambda: validation_scores(model, None, val))
        scores: dict[str, dict[int, dict]] = {}
        for arm in cfg.methods:
            method, factor = VARIANTS.get(arm, (arm, "B"))
            lr = chosen_lr(folder, arm)
            for steps in sorted(set(cfg.select_steps)):
                run = folder / "steps-select" / f"{arm}-steps{steps}-s{seed}"

                def rung() -> dict:
                    log.info("%s: %d steps for the budget's choice on validation", run, steps)
                    train(model, method, seed, train_file, replace(cfg, steps=steps), run, lr=lr,
                          stiefel_factor=factor)
                    log.info("%s: scoring it on the validation split", run)
                    vals = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
                    return {"steps": steps, "val_loss": vals[-1] if vals else None, **validation_scores(model, run, val)}
                scores.setdefault(arm, {})[steps] = _cached(run / VAL_SCORES, rung)
        choice = {"model": model, "split": "val", "metric": METRIC, "seed": seed,
                  "arms": list(cfg.methods), "base": {k: base[k] for k in ("average", "tasks")},
                  **choose_budget(base, scores, gold={t: [r["answer"] for r in v] for t, v in val.items()},
                                  n_boot=cfg.n_boot)}
        atomic_write_json(folder / BUDGET_CHOICE, choice)
        atomic_write_text(folder / "budget_choice.md", budget_choice_markdown(choice, slug, LABELS) + "\n")
        log.info("%s: budget %s (%s)", model, choice["chosen"], choice["why"])
        out[model] = choice
    return out
