"""Fixtures shared by the end-to-end trainer tests: a learnable data file and a two-step run config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fora.training.config import TrainConfig


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """40 records whose answer is a function of the last digit, short enough for the char tokenizer."""
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps([{"instruction": f"Is {i} even?", "input": "", "output": "yes" if i % 2 == 0 else "no"}
                                for i in range(40)]))
    return path


@pytest.fixture
def cfg(tiny, data_file, tmp_path) -> TrainConfig:
    """Two fp32 CPU steps of FoRA at K=2, r=4 on `tiny` (a test module may override `data_file`)."""
    return TrainConfig(model=str(tiny), k=2, data=str(data_file), out=str(tmp_path / "run"), rank=4, device="cpu",
                       val_size=8, batch_size=4, max_steps=2, warmup_steps=0, lr=1e-2, fisher_batches=2,
                       log_every=1, eval_every=0, save_every=0, lora_dropout=0.0)
