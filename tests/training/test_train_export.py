"""train.py --export: the finished run written as GGUF, as scripts/export.py would write it.

Oracle: fora's own GGUF reader on the written file, and scripts/export.py's output for the same run.
"""
from __future__ import annotations

import pytest
from script_loader import load_script

from fora.formats.gguf_reader import read_gguf
from fora.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_train_export_writes_the_adapter_gguf(cfg, tmp_path, capsys):
    pytest.importorskip("gguf")  # the optional extra (fora[gguf]): export reads the written file back with it
    out = tmp_path / "run"
    argv = ["--model", cfg.model, "--data", cfg.data, "--out", str(out), "--k", "2", "--rank", "4", "--device", "cpu",
            "--max-steps", "2", "--batch-size", "4", "--val-size", "8", "--fisher-batches", "2", "--save-every", "0",
            "--export", "gguf-lora"]
    assert load_script("train").cli(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    gguf = read_gguf(out / "adapter-f16.gguf")
    assert gguf.metadata["general.type"] == "adapter" and gguf.metadata["adapter.type"] == "lora"
    assert len(gguf.tensors) == 2 * 2 * 5  # two layers x the five default targets x (lora_a, lora_b)
    (out / "adapter-f16.gguf").rename(tmp_path / "from_train.gguf")
    assert load_script("export").cli([str(out), "--to", "gguf-lora"]) == 0
    assert (tmp_path / "from_train.gguf").read_bytes() == (out / "adapter-f16.gguf").read_bytes()
    assert printed[-2:] == capsys.readouterr().out.splitlines()  # the same two lines: file, how to run it


def test_bad_export_target_is_refused():
    with pytest.raises(ValueError, match="unknown --export 'onnx'"):
        TrainConfig(model="m", export="onnx")
