"""One arm's training in a store of runs (`scripts/reproduce.py --out OUT`): its folder, its training
run, and no training done twice.

Every arm of a comparison trains with the same shared settings (`ArmSettings`: the script's flags)
and its own method, seed, learning rate and Stiefel factor (`arm_config`). `train_arm` trains it
into OUT/<model>/..., resuming a killed run; a finished run elsewhere under OUT/<model> that is the
same training (a main arm, a budget's rung, a learning rate's candidate) is copied instead, and an
arm that scores layers borrows a matching run's selection (`fora.training.selection_reuse`).
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from fora.formats.atomic import atomic_write_json
from fora.formats.peft_io import ADAPTER_WEIGHTS
from fora.training.config import TrainConfig
from fora.training.methods import METHODS
from fora.training.selection_reuse import find_shared_selection

log = logging.getLogger("reproduce")
ARMS = ("fora", "lora", "fg-lora", "stiefel-lora", "lora-half-rank", "random-k")  # the default arms
BASELINES = ("dora", "adalora")  # Table 1's other baselines, opt-in with --methods
ALL_ARMS = ARMS + BASELINES
COPIED_FROM = "copied_from.json"  # a run copied from an identical finished training (train_arm)
VAL_SCORES = "val_scores.json"  # a run scored on the suite's validation split (fora.evaluation.validation_choices)
MEASURED = ("result.json", "items.json", "diagnostics.json", VAL_SCORES, "eval.json")  # not copied
CANDIDATES = ("", "candidates")  # where under OUT/<model> finished trainings are looked for


class ArmSettings(Protocol):
    """The settings every arm shares (`scripts/reproduce.py`'s ReproduceConfig)."""

    out: Path
    rank: int
    lr: float
    steps: int
    batch_size: int
    cutoff_len: int
    warmup_steps: int
    val_size: int
    fisher_batches: int
    match_init_norm: bool
    dtype: str


def slug(model: str) -> str:
    """A model's folder name in a store: the preset, or the checkpoint folder's or .gguf file's name."""
    name = Path(model.rstrip("/")).name
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def arm_config(model_name: str, method: str, seed: int, train_file: Path, cfg: ArmSettings, run: Path,
               stiefel_scale: float = 1.0, lr: float | None = None, stiefel_factor: str = "B") -> TrainConfig:
    """The training run of one arm: the settings every arm shares, and its own."""
    return TrainConfig(model=model_name, method=method, data=str(train_file), out=str(run), seed=seed,
                       rank=cfg.rank, lr=cfg.lr if lr is None else lr, max_steps=cfg.steps, batch_size=cfg.batch_size,
                       cutoff_len=cfg.cutoff_len, warmup_steps=cfg.warmup_steps, val_size=cfg.val_size,
                       fisher_batches=cfg.fisher_batches, eval_every=max(1, cfg.steps // 4), log_every=10,
                       save_every=max(1, cfg.steps // 4), match_init_norm=cfg.match_init_norm,
                       stiefel_lr_scale=stiefel_scale, stiefel_factor=stiefel_factor, dtype=cfg.dtype)


def train_arm(model_name: str, method: str, seed: int, train_file: Path, cfg: ArmSettings, run: Path,
              stiefel_scale: float = 1.0, lr: float | None = None, stiefel_factor: str = "B") -> None:
    """Train one arm (`arm_config`) into `run` unless its adapter exists; resume from a checkpoint when there
    is one. A finished run under OUT/<model> (an arm, a budget's rung, a learning rate's candidate) that
    is this same training is copied instead (`COPIED_FROM` says from where; its measurements are not). An
    arm that scores layers reuses the selection of another run under OUT/<model> that scored the same
    calibration batches with the same selector (train.py --selection-from), if there is one."""
    from fora.training.run import main  # at call time: the trainer, as tests replace it

    want = arm_config(model_name, method, seed, train_file, cfg, run, stiefel_scale, lr, stiefel_factor)
    if (run / ADAPTER_WEIGHTS).is_file():
        return refuse_other_training(run, want)
    resume = str(run) if (run / "checkpoint").is_dir() else None
    if resume is None and run.exists():
        shutil.rmtree(run)  # an attempt killed before its first checkpoint: nothing to keep
    tc = replace(want, resume=resume)
    if resume is None:
        model_dir = cfg.out / slug(model_name)
        others = [f for d in (model_dir / c for c in CANDIDATES) if d.is_dir()
                  for f in sorted(d.iterdir()) if f.is_dir() and f != run]
        same = next((f for f in others if trained_as(f, tc)), None)
        if same is not None:  # the same training done for another purpose (a rung, a learning rate, an arm)
            log.info("%s: the finished %s is this training; copying it", run, same)
            shutil.copytree(same, run, ignore=shutil.ignore_patterns(*MEASURED, "checkpoint", ".train.lock"))
            atomic_write_json(run / COPIED_FROM, {"from": str(same)})
            return
        shared = find_shared_selection(others, tc.to_dict(), METHODS[method].selector)
        if shared is not None:
            log.info("%s: reusing the layer selection of %s", run, shared)
            tc = replace(tc, selection_from=str(shared))
    main(tc)


def _training_diff(run: Path, want: TrainConfig) -> dict[str, tuple] | None:
    """The fields that change the trajectory and differ between `run`'s train_config.json and `want`, or
    None when `run` has no train_config.json; ValueError when it cannot be read as one."""
    path = run / "train_config.json"
    if not path.is_file():
        return None
    return TrainConfig.from_dict(json.loads(path.read_text())).trajectory_diff(want)  # json's errors are ValueErrors


def refuse_other_training(run: Path, want: TrainConfig) -> None:
    """Stop when `run` holds a finished training other than `want` (a store filled at another --steps or
    learning rate): its results would be read as this arm's. Every differing field is named."""
    try:
        diff = _training_diff(run, want)
    except ValueError as e:
        raise SystemExit(f"{run / 'train_config.json'} cannot be read as a training's settings ({e}); "
                         f"move {run} away or give another --out")
    if diff:
        fields = ", ".join(f"{k} {a!r} (wanted: {b!r})" for k, (a, b) in sorted(diff.items()))
        raise SystemExit(f"{run} holds another training: {fields}. Move it away or give another --out")


def candidate_dir(folder: Path, arm: str, steps: int, lr: float, seed: int) -> Path:
    """OUT/<model>/candidates/<arm>-steps<S>-lr<LR>-s<seed>: a run trained for a choice on the validation
    split (a budget's rung, a learning rate's candidate; one folder when they are the same training)."""
    return Path(folder) / "candidates" / f"{arm}-steps{steps}-lr{lr:g}-s{seed}"


def arm_name(method: str, stiefel_scale: float = 1.0, lr: float | None = None) -> str:
    """The arm's label: the method, with its Stiefel step multiple when not 1 ("fora ×0.25") and its
    own learning rate when set by --method-lr ("adalora lr 0.002")."""
    name = method if stiefel_scale == 1 else f"{method} ×{stiefel_scale:g}"
    return name if lr is None else f"{name} lr {lr:g}"


def run_dir(cfg: ArmSettings, model: str, method: str, seed: int, stiefel_scale: float = 1.0,
            lr: float | None = None) -> Path:
    """OUT/<model>/<method>[-x<scale>][-lr<lr>]-s<seed>: one arm's run folder."""
    tag = ("" if stiefel_scale == 1 else f"-x{stiefel_scale:g}") + ("" if lr is None else f"-lr{lr:g}")
    return cfg.out / slug(model) / f"{method}{tag}-s{seed}"


def trained_as(run: Path, want: TrainConfig) -> bool:
    """Whether `run` is a finished training of `want` (no field that changes the trajectory differs)."""
    if not (run / ADAPTER_WEIGHTS).is_file():
        return False
    try:
        return _training_diff(run, want) == {}
    except ValueError:  # unreadable, or written by another fora version: not the same training
        return False
