"""What a run reads: its training records, read and checked before anything slow
(`run_records`), then split, tokenized and batched for validation and layer scoring (`prepare_data`)."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fora.training.batching import calibration_batches, make_batches
from fora.training.builtin import builtin_records, is_builtin
from fora.training.config import TrainConfig
from fora.training.data import load_records, record_encoder, split_records

log = logging.getLogger("fora.train")


@dataclass
class RunData:
    """The tokenized training examples, the validation and calibration batches, the records' sha256."""

    train: list[dict]
    val_batches: list[dict]
    calibration: list[dict]
    sha256: str
    val_examples: int = 0


def data_sha256(records: list[dict]) -> str:
    """sha256 of the records as canonical JSON (recorded in selection.json)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def run_records(cfg: TrainConfig) -> list[dict]:
    """The training records of `cfg.data`, read and checked (the split too): no model needed."""
    records = (builtin_records(cfg.data, task_size=cfg.task_size, seed=cfg.seed) if is_builtin(cfg.data)
               else load_records(cfg.data))
    if cfg.val_size >= len(records):
        raise ValueError(f"--val-size {cfg.val_size} leaves no training records out of the {len(records)} of "
                         f"--data {cfg.data or 'the built-in task'}; pass a smaller --val-size or more data")
    return records


def prepare_data(cfg: TrainConfig, tok, *, need_calibration: bool, records: list[dict] | None = None,
                 folder: Path | None = None) -> RunData:
    """Records (`run_records`, unless given) -> held-out split -> tokenized examples -> validation
    and calibration batches. Chat records are rendered with the chat template of `folder`, the
    checkpoint `tok` comes from."""
    records = run_records(cfg) if records is None else records
    train_recs, val_recs = split_records(records, val_size=cfg.val_size, seed=cfg.seed)
    encode = record_encoder(tok, records, cutoff_len=cfg.cutoff_len, template=cfg.template, folder=folder)
    train = encode(train_recs)
    val_examples = encode(val_recs) if val_recs else []  # what is scored: after cut-off drops
    val = make_batches(val_examples, cfg.batch_size, pad_id=tok.pad_id, shuffle=False) if val_examples else []
    calibration = (calibration_batches(train, min(cfg.fisher_batches, len(train) // cfg.batch_size or 1),
                                       min(cfg.batch_size, len(train)), pad_id=tok.pad_id, seed=cfg.seed)
                   if need_calibration else [])
    log.info("data: %d train / %d validation examples, %d calibration batches", len(train),
             len(val_examples), len(calibration))
    return RunData(train, val, calibration, data_sha256(records), len(val_examples))
