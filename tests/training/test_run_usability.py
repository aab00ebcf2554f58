"""The trainer from a user's seat: Ctrl-C, --resume DIR alone, progress, counts, defaults, guards,
what the adapter says about its base; and two equivalences: gradient accumulation, joint clipping.

Tiny random checkpoint (char tokenizer), CPU, float32, as in test_run.py.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from script_loader import load_script

import fora.training.progress
import fora.training.run
import fora.training.steps
from fora.formats.hub import PRESETS
from fora.training.checkpoint import SaveClock
from fora.training.config import TrainConfig, warmup_steps
from fora.training.flags import parse_args
from fora.training.interrupt import TrainingInterrupted
from fora.training.loop import MetricsLog
from fora.training.model_card import base_model_id, gguf_source
from fora.training.resume import LOCK_FILE, claim_out
from fora.training.run import main

L = 4
ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "adapter_model.safetensors")


def _state(out) -> dict:
    return json.loads((Path(out) / "checkpoint" / "state.json").read_text())


def test_ctrl_c_checkpoints_at_the_step_boundary_and_resume_dir_alone_continues(cfg, tmp_path):
    cfg = replace(cfg, max_steps=6, grad_accum=2, lora_dropout=0.1, log_every=4)  # a row at steps 4 and 6
    full = main(replace(cfg, out=str(tmp_path / "full")))
    assert _state(tmp_path / "full")["step"] == 6           # a finished run keeps a final checkpoint

    def ctrl_c(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)               # a real Ctrl-C: honoured at the next boundary
    out = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted) as stop:
        main(replace(cfg, out=str(out)), on_step=ctrl_c)
    assert stop.value.step == 3 and _state(out)["step"] == 3
    assert stop.value.command == f"python scripts/train.py --resume {out}"
    assert not (out / "adapter_model.safetensors").exists()
    resumed = parse_args(["--resume", str(out)])             # --resume DIR alone: settings from the run
    assert replace(resumed, resume=None, out=cfg.out) == replace(cfg, out=cfg.out, stiefel_lr_scale=1.0)  # as recorded
    main(resumed)
    a, b = _adapter(tmp_path / "full"), _adapter(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert full.steps == 6
    # the row of step 4 averages steps 1-4, three of them before the Ctrl-C: the same losses
    rows = [[{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "stiefel_error") if k in r}
             for r in MetricsLog.read(Path(run) / "metrics.jsonl")] for run in (tmp_path / "full", out)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0] if "loss" in r] == [4, 6]


def test_keyboard_interrupt_mid_step_saves_the_last_finished_step(cfg, monkeypatch, tmp_path):
    real, calls = fora.training.steps.forward_loss, {"n": 0}

    def interrupted(model, batch, device, **kw):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 4:                               # inside step 2 (grad_accum 2)
                raise KeyboardInterrupt
        return real(model, batch, device, **kw)
    monkeypatch.setattr(fora.training.steps, "forward_loss", interrupted)
    with pytest.raises(TrainingInterrupted, match=r"(?s)after step 1 of 3.*--resume"):
        main(replace(cfg, max_steps=3, grad_accum=2))
    # the position names the next optimizer step of the epoch (each of grad_accum micro-batches)
    assert {k: _state(cfg.out)[k] for k in ("epoch", "batch", "step")} == {"epoch": 0, "batch": 1, "step": 1}


def test_cli_ctrl_c_prints_the_resume_command_without_traceback(tiny, data_file, tmp_path, capsys, monkeypatch):
    real = fora.training.steps.forward_loss
    calls = {"n": 0}

    def interrupted(model, batch, device, **kw):
        calls["n"] += model.training
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(model, batch, device, **kw)
    monkeypatch.setattr(fora.training.steps, "forward_loss", interrupted)
    out = tmp_path / "cli"
    argv = ["--model", str(tiny), "--data", str(data_file), "--out", str(out), "--k", "2", "--rank", "4",
            "--batch-size", "4", "--max-steps", "3", "--val-size", "8", "--fisher-batches", "2", "--device", "cpu"]
    assert load_script("train").cli(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"Resume with:\n  python scripts/train.py --resume {out}" in err
    assert err.count("--resume") == 1


def test_resume_refuses_flags_that_differ_and_accepts_neutral_ones(cfg, capsys):
    def ctrl_c(step: int) -> None:
        raise KeyboardInterrupt
    with pytest.raises(TrainingInterrupted):
        main(replace(cfg, max_steps=3), on_step=ctrl_c)
    with pytest.raises(SystemExit):
        parse_args(["--resume", cfg.out, "--lr", "0.001", "--rank", "4", "--seed", "7"])
    err = capsys.readouterr().err.splitlines()[0]               # the message first
    assert "--lr (0.001 given, 0.01 saved)" in err and "--seed (7 given, 42 saved)" in err and "--rank" not in err
    again = parse_args(["--resume", cfg.out, "--log-every", "5", "--merge", "--model", cfg.model])
    assert (again.log_every, again.merge, again.lr, again.resume) == (5, True, cfg.lr, cfg.out)
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(Path(cfg.out).parent / "nowhere")])
    assert "no checkpoint in" in capsys.readouterr().err


class Killed(BaseException):
    """A crash that writes nothing (kill -9, out of memory): not an Exception the trainer handles."""


def test_checkpoints_every_50_steps_or_10_minutes_whichever_first(cfg, monkeypatch):
    d = TrainConfig(model="m")
    assert (d.save_every, d.save_minutes) == (50, 10.0)
    assert parse_args(["--model", "m", "--save-minutes", "2.5"]).save_minutes == 2.5
    now = {"t": 0.0}
    monkeypatch.setattr(SaveClock, "clock", staticmethod(lambda: now["t"]))
    saved = []

    def seven_minutes_a_step(step: int) -> None:
        state = Path(cfg.out) / "checkpoint" / "state.json"
        saved.append(json.loads(state.read_text())["step"] if state.is_file() else None)
        now["t"] += 7 * 60
    main(replace(cfg, max_steps=6, save_every=4, save_minutes=10), on_step=seven_minutes_a_step)
    # 14 minutes after the start: step 3 (by time); step 4 (by steps) restarts the clock; then the end
    assert saved == [None, None, 3, 4, 4, 4] and _state(cfg.out)["step"] == 6


def test_a_run_killed_before_its_first_checkpoint_is_replaced_by_a_rerun_or_resume(cfg, caplog):
    def kill(step: int) -> None:
        raise Killed
    with pytest.raises(Killed):
        main(cfg, on_step=kill)
    resumed = parse_args(["--resume", cfg.out])             # what "Resume with" would say: it works too
    assert resumed.lr == cfg.lr and resumed.out == cfg.out
    held = []
    main(resumed, on_step=lambda step: held.append((Path(cfg.out) / LOCK_FILE).is_file()))
    assert held == [True, True]                             # the replacement kept the run's own lock
    assert "stopped before its first checkpoint; training it afresh" in caplog.text
    assert _state(cfg.out)["step"] == 2 and (Path(cfg.out) / "adapter_model.safetensors").is_file()
    assert not (Path(cfg.out) / LOCK_FILE).exists()        # released with the run
    with pytest.raises(Killed):
        main(replace(cfg, out=cfg.out + "-b", batch_size=8), on_step=kill)
    main(replace(cfg, out=cfg.out + "-b"))                  # after an out-of-memory: smaller batches
    assert "held an attempt of a run with other settings (batch_size: 4 here vs 8 there)" in caplog.text


def test_out_is_locked_while_a_process_trains_into_it(cfg, tmp_path, monkeypatch):
    import contextlib

    with contextlib.ExitStack() as other:
        claim_out(Path(cfg.out), other)                     # a lock is per open file: as another process
        with pytest.raises(ValueError, match=rf"--out {cfg.out} is in use: another process \(pid {os.getpid()}\) "
                                             "is training into it; wait for it to finish"):
            main(cfg)
    main(replace(cfg, max_steps=1))
    with pytest.raises(FileNotFoundError):                  # a run that stops before writing anything
        main(replace(cfg, data=str(tmp_path / "missing.json"), out=str(tmp_path / "new" / "run")))
    assert not (tmp_path / "new" / "run").exists()          # leaves no empty folder

    def denied(self, *a, **kw):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(PermissionError, match=rf"--out {tmp_path / 'ro'} cannot be created \(Permission denied: "
                                              rf"{tmp_path / 'ro'}\); choose a folder you can write to"):
        main(replace(cfg, out=str(tmp_path / "ro")))


def test_progress_plain_lines_off_a_terminal(cfg, caplog):
    with caplog.at_level(logging.INFO, logger="fora.train"):
        main(replace(cfg, max_steps=2, log_every=1))
    text = caplog.text
    assert "validation at step 0: 8 examples in 2 batches" in text
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [m.split()[1] for m in lines if "loss" in m and "validation" not in m] == ["1/2", "2/2"]
    assert all("lr" in m and "tok/s" in m and "eta" in m for m in lines if "validation" not in m)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fora.progress"):
        assert list(fora.training.progress.tracked([7], "one pass")) == [7]
        assert list(fora.training.progress.tracked("ab", "windows", unit="window", units="windows")) == ["a", "b"]
    assert caplog.messages[0] == "one pass: 1 batch..." and caplog.messages[2] == "windows: 2 windows..."


def test_progress_bar_on_a_terminal(cfg, capsys, monkeypatch):
    monkeypatch.setattr(fora.training.progress, "is_terminal", lambda: True)
    main(replace(cfg, max_steps=2, log_every=1))
    err = capsys.readouterr().err
    assert "train: 100%" in err and "2/2" in err and "loss=" in err and "tok_s=" in err and "lr=" in err
    assert "validation @ step 0" in err


def test_validation_count_is_after_cutoff_drops(cfg, tmp_path, caplog):
    records = [{"instruction": f"Is {i} even?", "input": "", "output": "yes"} for i in range(32)]
    records += [{"instruction": "x" * 400, "input": "", "output": "no"} for _ in range(16)]  # beyond cutoff
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    with caplog.at_level(logging.INFO, logger="fora.train"):
        main(replace(cfg, data=str(data), val_size=16, cutoff_len=256, max_steps=1))
    msg = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data:"))
    kept = sum(1 for line in caplog.messages if "dropped" in line)
    n_val = int(msg.split("/")[1].split()[0])
    assert kept >= 1 and n_val < 16
    assert f"validation at step 0: {n_val} examples" in caplog.text


def test_default_warmup_is_a_fraction_of_the_run(cfg):
    assert TrainConfig(model="m").warmup_steps is None
    assert warmup_steps(TrainConfig(model="m"), 1000) == 30 and warmup_steps(TrainConfig(model="m"), 10) == 1
    assert warmup_steps(TrainConfig(model="m", warmup_steps=7), 1000) == 7
    main(replace(cfg, warmup_steps=None, max_steps=4))
    lrs = [r["lr"] for r in MetricsLog.read(Path(cfg.out) / "metrics.jsonl") if "lr" in r]
    assert lrs[0] == pytest.approx(cfg.lr)                   # warmup of 1 step: the full lr at once


def test_out_folder_that_is_not_a_run_is_refused(cfg, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff")
    with pytest.raises(ValueError, match="non-empty folder that holds no fora run.*new or empty folder"):
        main(replace(cfg, out=str(foreign)))
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]
    (tmp_path / "empty").mkdir()
    main(replace(cfg, out=str(tmp_path / "empty"), max_steps=1))  # an empty folder is fine


def test_k_is_checked_before_the_weights_load(cfg, monkeypatch):
    def no_load(*a, **kw):
        raise AssertionError("weights loaded before --k was checked")
    monkeypatch.setattr(fora.training.run, "load_model", no_load)
    with pytest.raises(ValueError, match=f"--k 9 exceeds .*L={L}.*between 1 and {L}"):
        main(replace(cfg, k=9))


def test_data_eval_data_and_out_are_checked_before_anything_slow(cfg, tiny, monkeypatch, tmp_path, capsys):
    from fora.evaluation.final_eval import final_evaluation

    def no_load(*a, **kw):
        raise AssertionError("weights loaded before the inputs were checked")
    monkeypatch.setattr(fora.training.run, "load_model", no_load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    no_answer = tmp_path / "test.json"
    no_answer.write_text(json.dumps([{"instruction": "q", "output": "o"}]))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    # before the checkpoint is even looked up (a download, a GGUF conversion)
    monkeypatch.setattr(fora.training.run, "resolve_checkpoint", lambda name: pytest.fail("resolved the model first"))
    for change, error in [
            (dict(data=str(bad)), r"bad.jsonl, line 2: record 2 of 2 lacks \['output'\]"),
            (dict(val_size=40), f"--val-size 40 leaves no training records out of the 40 of --data {cfg.data}; "
                                "pass a smaller --val-size"),
            (dict(eval_data=str(no_answer)), r"test.json, line 1: record 1 of 1 \(and 0 more\) has no 'answer'"),
            (dict(out=str(a_file / "run")), f"--out {a_file / 'run'} cannot be created: {a_file} is a file, not a folder"),
            (dict(out=str(a_file)), f"--out {a_file} is a file; choose a folder for --out")]:
        with pytest.raises(ValueError, match=error):
            main(replace(cfg, **change), final_eval=final_evaluation)
    monkeypatch.undo()
    monkeypatch.setattr(fora.training.run, "load_model", no_load)   # needs the tokenizer, not the weights
    with pytest.raises(ValueError, match="were dropped.*cutoff_len=20"):
        main(replace(cfg, cutoff_len=20))
    assert load_script("train").cli(["--model", str(tiny), "--out", str(a_file / "run"), "--k", "2"]) == 1
    err = capsys.readouterr().err
    assert f"train.py: error: --out {a_file / 'run'} cannot be created: {a_file} is a file" in err and "Traceback" not in err


def test_outputs_honour_the_umask(cfg):
    before = os.umask(0o022)
    try:
        main(replace(cfg, max_steps=1))
    finally:
        os.umask(before)
    out = Path(cfg.out)
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "README.md",
                 "checkpoint/optim.pt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((out / "checkpoint").stat().st_mode) == 0o755


def test_base_model_is_the_hub_id_and_a_gguf_base_is_named(cfg, tiny, tmp_path, monkeypatch):
    # A packaged preset resolves to a converted GGUF folder in a cache; simulate one from the tiny model.
    converted = tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1-0123456789ab"
    converted.mkdir(parents=True)
    for f in tiny.iterdir():
        (converted / f.name).write_bytes(f.read_bytes())
    save_file(load_file(tiny / "model.safetensors"), converted / "model.safetensors",
              metadata={"format": "pt", "source": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    monkeypatch.setattr(fora.training.run, "resolve_checkpoint", lambda name: converted)
    main(replace(cfg, model="smollm2-135m"))
    config = json.loads((Path(cfg.out) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == PRESETS["smollm2-135m"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (Path(cfg.out) / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "quantized GGUF" in card and str(tmp_path) not in card
    assert base_model_id(str(tiny), tiny) == str(tiny.resolve())  # a user's own folder: their path
    assert gguf_source(tiny) is None


@pytest.mark.slow
def test_packaged_gguf_base_names_the_hub_id(smol_folder):
    assert gguf_source(smol_folder) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert base_model_id("smollm2-135m", smol_folder) == "HuggingFaceTB/SmolLM2-135M-Instruct"
