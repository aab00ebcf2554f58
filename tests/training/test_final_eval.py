"""The end-of-run evaluation (fora.evaluation.final_eval, train.py's `evaluate` hook) and the built-in
training tasks (fora.training.builtin).

Oracles: `evaluate_tasks` run directly on a freshly loaded base model (before) and on the trained
adapter loaded back from disk (after); the cloze task's own splits.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch

import fora.training.progress
from fora.evaluation.accuracy import evaluate_tasks
from fora.formats.loading import load_model, load_tokenizer
from fora.formats.peft_io import load_adapter
from fora.training.cloze import cloze_task
from fora.training.config import TrainConfig
from fora.training.flags import parse_args
from fora.evaluation.final_eval import before_after, eval_table, final_evaluation
from fora.training.builtin import builtin_records
from fora.training.run import data_sha256, main, prepare_data
from script_loader import load_script

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "parity" / "test.json"
    path.parent.mkdir()
    path.write_text(json.dumps([{"instruction": f"Is {i} even?\n\nAnswer format: yes/no", "input": "",
                                 "output": f"the correct answer is {'yes' if i % 2 == 0 else 'no'}",
                                 "answer": "yes" if i % 2 == 0 else "no"} for i in range(50, 62)]))
    return path


def test_run_scores_the_base_and_the_adapter_on_the_same_items(cfg, tiny, eval_file, caplog, capsys, monkeypatch):
    cfg = replace(cfg, eval_data=str(eval_file), eval_limit=10, max_steps=3)
    with caplog.at_level(logging.INFO):
        result = main(cfg, final_eval=final_evaluation)
    out = result.out
    # off a terminal: no bar (no carriage returns in a log), one plain line per pass, each labelled
    assert "\r" not in capsys.readouterr().err
    passes = [m for m in caplog.messages if m.startswith("loglik parity")]
    assert passes[0] == "loglik parity, before training (adapters off): 3 batches..."  # 10 records, 4 a batch
    assert passes[1].startswith("loglik parity, before training (adapters off): done in ")
    assert passes[2] == "loglik parity, after training (adapters on): 3 batches..." and len(passes) == 4
    monkeypatch.setattr(fora.training.progress, "is_terminal", lambda: True)  # on a terminal: labelled bars
    before_after(load_model(tiny, dtype=torch.float32, device="cpu"), load_tokenizer(tiny),
                 {"parity": json.loads(eval_file.read_text())}, protocol="loglik", limit=2, template="alpaca")
    err = capsys.readouterr().err
    assert "loglik parity, before training (adapters off):" in err and "loglik parity, after training (adapters on):" in err
    report = json.loads((out / "eval.json").read_text())
    assert report == {"eval_data": str(eval_file), **result.eval}
    tok = load_tokenizer(tiny)
    tasks = {"parity": json.loads(eval_file.read_text())}
    base = load_model(tiny, dtype=torch.float32, device="cpu").eval()
    tuned = load_adapter(load_model(tiny, dtype=torch.float32, device="cpu"), out).eval()
    for key, model in (("before", base), ("after", tuned)):
        direct = evaluate_tasks(model, tok, tasks, protocol="loglik", limit=10, progress=False)
        assert report[key]["tasks"] == direct["tasks"]
        assert [i[key] for i in report["items"]] == [p["correct"] for p in direct["predictions"]]
        for item, p in zip(report["items"], direct["predictions"]):
            assert item[f"scores_{key}"] == pytest.approx(p["scores"], abs=1e-4)
    assert len(report["items"]) == 10 and report["protocol"] == "loglik"
    card = (out / "README.md").read_text()
    assert "## Held-out accuracy" in card and eval_table(report) in card
    assert f"| parity | 10 | {report['before']['tasks']['parity']['accuracy']:.3f} |" in card


def test_generate_protocol_and_no_evaluation(cfg, eval_file, tmp_path):
    report = main(replace(cfg, eval_data=str(eval_file), eval_limit=2, protocol="generate"),
                  final_eval=final_evaluation).eval
    assert report["protocol"] == "generate" and report["before"]["tasks"]["parity"]["n"] == 2
    quiet = main(replace(cfg, out=str(tmp_path / "quiet")), final_eval=final_evaluation)
    assert quiet.eval is None and not (quiet.out / "eval.json").exists()  # a data file, no --eval-data


def test_train_script_prints_the_table(cfg, eval_file, tmp_path, capsys):
    argv = ["--model", cfg.model, "--data", cfg.data, "--out", str(tmp_path / "cli"), "--k", "2", "--rank", "4",
            "--device", "cpu", "--max-steps", "2", "--batch-size", "4", "--val-size", "8", "--fisher-batches", "2",
            "--save-every", "0", "--eval-data", str(eval_file), "--eval-limit", "4"]
    assert load_script("train").cli(argv) == 0
    report = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert eval_table(report) in capsys.readouterr().out


def test_defaults_train_and_score_the_cloze_task(tiny):
    cfg = parse_args(["--model", str(tiny)])
    assert cfg.data is None and cfg.final_eval_data == "builtin"
    assert parse_args(["--model", "m", "--data", "arithmetic"]).final_eval_data == "none"
    assert parse_args(["--model", "m", "--data", "arithmetic", "--eval-data", "builtin"]).final_eval_data == "builtin"
    records = builtin_records("cloze", task_size=5, seed=1)
    assert records == cloze_task("train", blanks=4)
    test_sentences = {r["instruction"].split("sentence: ", 1)[1].split("\n")[0] for r in cloze_task("test")}
    assert not test_sentences & {r["instruction"].split("sentence: ", 1)[1].split("\n")[0] for r in records}
    assert len(builtin_records("arithmetic", task_size=7, seed=0)) == 7
    data = prepare_data(replace(cfg, val_size=0, cutoff_len=4096), load_tokenizer(tiny), need_calibration=False)
    assert data.sha256 == data_sha256(records)  # what the run trains on is the cloze train split
    with pytest.raises(ValueError, match="unknown built-in task 'sums'"):
        builtin_records("sums", task_size=5, seed=0)


def test_bad_evaluation_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--eval-data .* does not exist"):
        TrainConfig(model="m", eval_data=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="--eval-limit must be >= 1"):
        TrainConfig(model="m", eval_limit=0)
    with pytest.raises(ValueError, match="unknown --protocol 'vote'"):
        TrainConfig(model="m", protocol="vote")
