"""The choices made on a suite's validation split before any seeds are spent, as flows over a store of
runs (`scripts/reproduce.py --task commonsense --select-lr / --select-steps`): each candidate, an arm at a
number of steps and a learning rate, is trained (`fora.evaluation.arms.train_arm`, the first seed) into
OUT/<model>/candidates/<arm>-steps<S>-lr<LR>-s<seed> and scored by loglik on SUITE/<task>/val.json; the
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

from fora.evaluation.arms import VAL_SCORES, arm_config, candidate_dir, refuse_other_training, slug, train_arm
from fora.evaluation.budget_choice import BUDGET_CHOICE, budget_choice_markdown, choose_budget
from fora.evaluation.lr_choice import LR_CHOICE, choose_lr, choose_shared_lr, chosen_lr, lr_choice_markdown
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


def _candidate(cfg: Any, model: str, arm: str, steps: int, lr: float, train: Callable[..., None]) -> dict:
    """One candidate's scores on the suite's validation split, with its steps and lr: the arm trained (first
    seed) into `candidate_dir` and scored by loglik, unless scored before (val_scores.json there). A folder
    holding another training is refused (`refuse_other_training`), not read as this one."""
    from fora.evaluation.measure import validation_scores  # at call time: tests replace it

    method, factor = VARIANTS.get(arm, (arm, "B"))
    seed, train_file, at = cfg.seeds[0], suite_train_file(cfg.suite), replace(cfg, steps=steps)
    run = candidate_dir(cfg.out / slug(model), arm, steps, lr, seed)
    refuse_other_training(run, arm_config(model, method, seed, train_file, at, run, lr=lr, stiefel_factor=factor))

    def make() -> dict:
        log.info("%s: training for a choice on the validation split", run)
        train(model, method, seed, train_file, at, run, lr=lr, stiefel_factor=factor)
        log.info("%s: scoring it on the validation split", run)
        return validation_scores(model, run, read_suite(cfg.suite, "val"))
    scores = _cached(run / VAL_SCORES, make)
    return {**scores, **held_out_losses(run / "metrics.jsonl"), "steps": steps, "lr": lr}


def held_out_losses(metrics: Path) -> dict[str, float | None]:
    """A run's held-out losses from its metrics.jsonl, read as it is now: the base model's (step 0,
    `val_loss_start`), the worst after it (`val_loss_worst`, what `lr_choice.diverged` compares) and the
    last (`val_loss`); None where not recorded."""
    rows = [r for r in read_metrics(metrics) if "val_loss" in r] if metrics.is_file() else []
    start = [r["val_loss"] for r in rows if r["step"] == 0]
    after = [r["val_loss"] for r in rows if r["step"] > 0]
    return {"val_loss": rows[-1]["val_loss"] if rows else None, "val_loss_start": start[0] if start else None,
            "val_loss_worst": max(after) if after else None}


def _write_lr_choice(path: Path, model: str, chosen: dict[str, dict], scores: dict[str, list], cfg: Any) -> dict:
    """OUT/<model>/lr_choice.json with these arms' choices, the other arms' kept (but a shared rate
    replaces the one shared before): the file is read just before writing, as an invocation beside
    this one may have chosen another arm's rate."""
    choice = json.loads(path.read_text()) if path.is_file() else {
        "model": model, "split": "val", "metric": METRIC, "arms": {}}
    if any("shared_with" in c for c in chosen.values()):  # a new shared rate replaces the old one
        choice["arms"] = {a: c for a, c in choice["arms"].items() if "shared_with" not in c}
    for arm, c in chosen.items():  # per-item results stay in each candidate's val_scores.json
        choice["arms"][arm] = {**c, "seed": cfg.seeds[0], "steps": cfg.steps,
                               "scores": [{k: v for k, v in s.items() if k != "items"} for s in scores[arm]]}
    atomic_write_json(path, choice)
    return choice


def select_lr(cfg: Any, train: Callable[..., None] = train_arm) -> dict[str, dict]:
    """--select-lr: each --methods arm trained (first seed, the run's steps) at every learning rate
    (`_candidate`), and the best one on validation (`fora.evaluation.lr_choice.choose_lr`; with --shared-lr
    one rate for all of them, `choose_shared_lr`) in OUT/<model>/lr_choice.json and lr_choice.md.
    Resumable like the runs."""
    out = {}
    for model in cfg.models:
        folder = cfg.out / slug(model)
        path = folder / LR_CHOICE
        scores = {}
        for arm in cfg.methods:
            scores[arm] = [_candidate(cfg, model, arm, cfg.steps, lr, train) for lr in cfg.select_lr]
            if cfg.shared_lr:
                continue  # chosen once every arm is scored
            chosen = {arm: {"chosen": choose_lr(scores[arm])}}
            choice = _write_lr_choice(path, model, chosen, scores, cfg)
            log.info("%s %s: lr %g chosen on validation", model, arm, chosen[arm]["chosen"])
        if cfg.shared_lr:
            shared = choose_shared_lr(scores)
            choice = _write_lr_choice(path, model, {arm: {"chosen": shared, "shared_with": list(cfg.methods)}
                                                    for arm in cfg.methods}, scores, cfg)
            log.info("%s %s: lr %g shared, chosen on validation", model, ", ".join(cfg.methods), shared)
        atomic_write_text(folder / "lr_choice.md", lr_choice_markdown(choice, slug, LABELS) + "\n")
        out[model] = choice
    return out


def select_steps(cfg: Any, train: Callable[..., None] = train_arm) -> dict[str, dict]:
    """--select-steps: each --methods arm trained (first seed, its chosen learning rate or --lr) for each
    number of steps (`_candidate`), the base model scored on the same validation split
    (OUT/<model>/base_val_scores.json), and the budget (`fora.evaluation.budget_choice.choose_budget`) in
    OUT/<model>/budget_choice.json and .md. A finished run of the same training (a main arm, a learning
    rate's candidate) is copied, not trained again (`train_arm`). Resumable like the runs."""
    from fora.evaluation.measure import validation_scores  # at call time: tests replace it

    val = read_suite(cfg.suite, "val")
    suite_train_file(cfg.suite)  # its error, before the base model is scored
    out = {}
    for model in cfg.models:
        folder = cfg.out / slug(model)
        folder.mkdir(parents=True, exist_ok=True)
        log.info("%s: the base model on the validation split (%d records), unless scored before", model,
                 sum(map(len, val.values())))
        base = _cached(folder / "base_val_scores.json", lambda: validation_scores(model, None, val))
        scores = {arm: {steps: _candidate(cfg, model, arm, steps, chosen_lr(folder, arm) or cfg.lr, train)
                        for steps in sorted(set(cfg.select_steps))} for arm in cfg.methods}
        choice = {"model": model, "split": "val", "metric": METRIC, "seed": cfg.seeds[0],
                  "arms": list(cfg.methods), "base": {k: base[k] for k in ("average", "tasks")},
                  **choose_budget(base, scores, gold={t: [r["answer"] for r in v] for t, v in val.items()},
                                  n_boot=cfg.n_boot)}
        atomic_write_json(folder / BUDGET_CHOICE, choice)
        atomic_write_text(folder / "budget_choice.md", budget_choice_markdown(choice, slug, LABELS) + "\n")
        log.info("%s: budget %s (%s)", model, choice["chosen"], choice["why"])
        out[model] = choice
    return out
