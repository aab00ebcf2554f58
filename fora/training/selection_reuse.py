"""Reusing another run's layer selection (`train.py --selection-from RUN`).

Fisher (Eq. 2) scores the frozen base model, so arms that share the model, the calibration batches
and the seed (fora, fg-lora, the A-side ablation, later step counts of the same arm) select the same
layers; N = 128 batches cost many minutes on a CPU. A reused selection must be the one this run
would compute: the same selector, model, weights' dtype and quantization, Fisher parameters, K,
layer count and calibration batches (their fingerprint: data, seed, N, cutoff, batch size and
tokenizer). Anything else is refused with what differs.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fora.selection import calibration_fingerprint
from fora.training.checkpoint import CONFIG_FILE, SELECTION_FILE
from fora.training.methods import CALIBRATED_SELECTORS, Selection

# train_config.json fields that change the scores themselves (the calibration batches are fingerprinted)
SCORE_FIELDS = ("model", "dtype", "quantize", "fisher_params")


def read_source(run: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(selection.json, train_config.json) of the finished or running run folder `run`."""
    folder = Path(run)
    if not folder.is_dir():
        raise FileNotFoundError(f"--selection-from {run}: no such run folder; give the --out folder of a run "
                                f"that selected its layers")
    found = []
    for name in (SELECTION_FILE, CONFIG_FILE):
        path = folder / name
        if not path.is_file():
            path = folder / "checkpoint" / name  # a run still training keeps them in its checkpoint
        if not path.is_file():
            raise FileNotFoundError(f"--selection-from {run}: {name} is missing; the run has not selected its "
                                    f"layers yet (it writes them with its first checkpoint)")
        try:
            found.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"--selection-from {run}: {path} is not valid JSON ({e}); rerun that run or drop "
                             f"--selection-from to score the layers here") from None
    return found[0], found[1]


def differences(record: Mapping[str, Any], source_cfg: Mapping[str, Any], want: Mapping[str, Any],
                config: Mapping[str, Any], fields: Sequence[str]) -> list[str]:
    """What keeps a source's selection (`record`, made under `source_cfg`) from being this run's: the
    record's entries unlike `want` (its rank only where it holds a per-module rank pattern, FIM-LoRA's,
    which is made for its rank) and the train-config `fields` unlike `config`; one phrase each."""
    want = {k: v for k, v in want.items() if k != "rank" or record.get("rank_pattern") is not None}
    return ([f"{name} {record.get(name)!r} there, {value!r} here" for name, value in want.items()
             if record.get(name) != value]
            + [f"--{name.replace('_', '-')} {source_cfg.get(name)!r} there, {config.get(name)!r} here"
               for name in fields if source_cfg.get(name) != config.get(name)])


def reused_selection(run: str | Path, *, selector: str, config: Mapping[str, Any],
                     calibration: Sequence[Mapping[str, torch.Tensor]], num_layers: int, k: int,
                     rank: int) -> tuple[Selection, dict[str, Any]]:
    """The selection of run `run`, checked to be the one this run would compute.

    Args:
        selector: this run's selector ("fisher", "cka", "fim").
        config: this run's TrainConfig as a dict (`SCORE_FIELDS` are compared).
        calibration: this run's calibration batches (fingerprinted and compared).
        num_layers, k, rank: this run's decoder depth, K and rank (the rank matters only for a rank pattern).
    Returns:
        (Selection, the source's selection.json record with `reused_from` added).
    Raises:
        ValueError naming every field that differs.
    """
    record, source_cfg = read_source(run)
    want = {"selector": selector, "num_layers": num_layers, "k": k, "rank": rank,
            "calibration_sha256": calibration_fingerprint(calibration)}
    differ = differences(record, source_cfg, want, config, SCORE_FIELDS)
    if differ:
        raise ValueError(f"--selection-from {run}: that selection is not the one this run would compute ("
                         + "; ".join(differ) + "); match those settings or drop --selection-from")
    sel = Selection(record["selected"], record["scores"], record["rank_pattern"])
    return sel, {**record, "reused_from": str(run)}


# the settings that decide a selection: the scores' (SCORE_FIELDS) and the calibration batches'
SHARED_FIELDS = SCORE_FIELDS + ("data", "seed", "val_size", "fisher_batches", "batch_size", "cutoff_len", "template",
                                "task_size", "k")


def find_shared_selection(folders: Sequence[str | Path], config: Mapping[str, Any], selector: str) -> Path | None:
    """The first of `folders` holding a selection (finished or in its checkpoint) made by `selector` under
    the same `SHARED_FIELDS` as `config` (a TrainConfig as a dict): a run the caller can pass to
    --selection-from, which checks it again. None when no folder qualifies or `selector` scores nothing."""
    if selector not in CALIBRATED_SELECTORS:
        return None
    for folder in map(Path, folders):
        try:
            record, source_cfg = read_source(folder)
        except (FileNotFoundError, ValueError):
            continue  # not a run, or one that has not selected yet: not a candidate
        if not differences(record, source_cfg, {"selector": selector, "rank": config.get("rank")}, config,
                           SHARED_FIELDS):
            return folder
    return None
