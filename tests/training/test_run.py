"""End-to-end training runs on a tiny random checkpoint (char tokenizer), CPU, float32.

Oracles: peft / transformers load what the trainer writes; a resumed run equals an uninterrupted
one bit for bit; the truncated backward equals the full one bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_loader import load_script
from tiny_models import hf_reference

import fora.training.steps
from fora.inject import freeze_base, inject_lora
from fora.stiefel import stiefel_error
from fora.formats.loading import load_model
from fora.training.methods import METHODS
from fora.formats.peft_io import load_adapter
from fora.training.config import TrainConfig
from fora.training.flags import parse_args
from fora.training.loop import MetricsLog, TrainingDiverged, causal_lm_loss
from fora.training.resume import default_out
from fora.training.run import main

L = 4

pytestmark = pytest.mark.usefixtures("one_thread_module")


class Killed(BaseException):
    """A kill the process cannot catch (SIGKILL, power loss); Ctrl-C is KeyboardInterrupt."""
IDS = torch.tensor([[2, 40, 41, 42, 50, 60, 70, 9], [2, 5, 6, 7, 8, 9, 10, 11]])


def _records(n: int) -> list[dict]:
    # Learnable: the answer is a function of the last digit, and short (char tokenizer).
    return [{"instruction": f"Is {i} even?", "input": "", "output": "yes" if i % 2 == 0 else "no"}
            for i in range(n)]


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "adapter_model.safetensors")


def _adapter_config(out) -> dict:
    return json.loads((Path(out) / "adapter_config.json").read_text())


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


def test_end_to_end_fora(cfg, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # lr 5e-2: the gate opens from 0 by at most about lr per AdamW step
    cfg = replace(cfg, max_steps=30, warmup_steps=3, eval_every=15, merge=True, lora_dropout=0.05, lr=5e-2)
    result = main(cfg)
    out = Path(cfg.out)
    (v0, first), (_, last) = result.val_losses[0], result.val_losses[-1]
    assert v0 == 0 and last < 0.7 * first, result.val_losses
    config = _adapter_config(out)
    selection = json.loads((out / "selection.json").read_text())
    assert len(config["layers_to_transform"]) == cfg.k == len(selection["selected"])
    assert config["layers_to_transform"] == selection["selected"] == result.selected
    assert len(selection["scores"]) == L and selection["num_batches"] == 2
    tensors = _adapter(out)
    layers = {int(k.split(".")[4]) for k in tensors}
    assert layers == set(result.selected) and len(tensors) == 2 * 5 * cfg.k
    for name, B in tensors.items():
        if name.endswith("lora_B.weight"):
            assert stiefel_error(B) < 1e-5, name                     # FoRA: B column-orthonormal
    saved = TrainConfig.from_dict(json.loads((out / "train_config.json").read_text()))
    assert saved == cfg
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    assert {"step", "loss", "lr", "tok_s", "stiefel_error", "gate_max", "seconds"} <= set(rows[-1])
    assert 0 < rows[-1]["gate_max"] <= 30 * 5e-2 * 1.01              # AdamW moves g by <= ~lr a step
    assert max(r["stiefel_error"] for r in rows if "stiefel_error" in r) < 1e-5

    ours = load_adapter(load_model(tiny, dtype=torch.float32, device="cpu"), out)
    expected = _logits(ours)
    assert not torch.allclose(expected, _logits(load_model(tiny, dtype=torch.float32, device="cpu")), atol=1e-3)
    peft_model = PeftModel.from_pretrained(hf_reference(tiny), out).eval()
    torch.testing.assert_close(_logits(peft_model), expected, atol=1e-4, rtol=1e-4)
    hf_merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(hf_merged), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(load_model(out / "merged", dtype=torch.float32, device="cpu")),
                               expected, atol=1e-5, rtol=1e-5)


def test_kill_and_resume_equals_uninterrupted(cfg, tmp_path):
    # 32 train records / batch 4 = 8 batches, 2 per step: 4 steps per epoch; 6 steps cross an epoch.
    # a metrics row every 3 steps: the row of step 6 averages steps 4-6, across the checkpoint of step 4
    cfg = replace(cfg, max_steps=6, grad_accum=2, save_every=2, lora_dropout=0.1, val_size=8, log_every=3, eval_every=3)
    main(replace(cfg, out=str(tmp_path / "full")))

    def crash(step: int) -> None:
        if step == 5:
            raise Killed
    killed = replace(cfg, out=str(tmp_path / "killed"))
    with pytest.raises(Killed):
        main(killed, on_step=crash)
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert {k: state[k] for k in ("epoch", "batch", "step")} == {"epoch": 1, "batch": 0, "step": 4}
    result = main(replace(killed, resume=str(tmp_path / "killed")))
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "killed")
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)
    rows = MetricsLog.read(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [3, 6]
    # metrics.jsonl too is the uninterrupted run's, but for the timings (tok_s, seconds)
    timing = ("tok_s", "seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows] == \
        [{k: v for k, v in r.items() if k not in timing} for r in MetricsLog.read(tmp_path / "full" / "metrics.jsonl")]
    assert state["loss_window"] and len(state["loss_window"]) == 1  # step 4's loss, logged with 5 and 6
    # time continues across the resume: the checkpoint carries the seconds spent before it
    seconds = [r["seconds"] for r in rows]
    assert state["seconds"] > 0 and seconds == sorted(seconds)
    assert min(r["seconds"] for r in rows if r["step"] > 4) > state["seconds"]
    assert result.seconds > state["seconds"]


def test_truncated_backward_equals_full(tiny):
    torch.manual_seed(0)
    model = load_model(tiny, dtype=torch.float32, device="cpu")
    inject_lora(model, [2, 3], rank=4, seed=0)
    freeze_base(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_gate" in name:
                p.fill_(0.7)                                   # g = 0 would zero every gradient
    labels = IDS.clone()
    labels[:, :3] = -100
    grads = []
    for start in (0, 2):
        model.zero_grad()
        total, n = causal_lm_loss(model(IDS, grad_from_layer=start), labels)
        (total / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 30   # A, B, g of 10 modules
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS[m].adalora])  # adalora: test_run_adalora.py
def test_each_method_adapts_what_it_should(cfg, method):
    spec = METHODS[method]
    main(replace(cfg, method=method, quantize=spec.quantize))
    config, tensors = _adapter_config(cfg.out), _adapter(cfg.out)
    assert config["use_dora"] == spec.dora
    expected_layers = cfg.k if spec.selector in ("fisher", "cka", "random") else L
    assert len(config["layers_to_transform"]) == expected_layers
    assert config["r"] == (cfg.rank // 2 if method == "lora-half-rank" else cfg.rank)
    ranks = {k: v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    if method == "fim-lora":
        assert config["rank_pattern"] and len(set(ranks.values())) > 1
        assert sum(ranks.values()) == L * 5 * cfg.rank  # the budget of uniform rank r
    else:
        assert not config["rank_pattern"] and set(ranks.values()) == {config["r"]}
    errors = [stiefel_error(B) for k, B in tensors.items() if k.endswith("lora_B.weight") and B.shape[0] >= B.shape[1]]
    if spec.stiefel:
        assert errors and max(errors) < 1e-5                   # B column-orthonormal in the file
    else:
        assert min(errors) > 1e-2  # B = 0 at init, unconstrained
    scores = json.loads((Path(cfg.out) / "selection.json").read_text())["scores"]
    assert (scores is not None) == (spec.selector in ("fisher", "cka"))


def test_nan_loss_stops_with_checkpoint_intact(cfg, monkeypatch):
    real = fora.training.steps.forward_loss
    calls = {"n": 0}

    def poisoned(model, batch, device, **kw):
        total, n = real(model, batch, device, **kw)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                return total * float("nan"), n
        return total, n
    monkeypatch.setattr(fora.training.steps, "forward_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 3.*checkpoint.*--lr"):
        main(replace(cfg, max_steps=4, save_every=1))
    out = Path(cfg.out)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not (out / "adapter_model.safetensors").exists()
    monkeypatch.undo()
    main(replace(cfg, max_steps=4, save_every=1, resume=str(out)))  # the checkpoint is usable
    assert (out / "adapter_model.safetensors").exists()


def test_out_folder_guard(cfg):
    main(cfg)
    with pytest.raises(ValueError, match="already holds this run, finished; choose another --out"):
        main(cfg)
    with pytest.raises(ValueError, match=r"different run \(lr: 0\.001 here vs 0\.01 there\)"):
        main(replace(cfg, lr=1e-3))
    with pytest.raises(ValueError, match="that run is finished.*nothing to resume"):
        main(replace(cfg, resume=cfg.out))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        main(replace(cfg, resume=str(Path(cfg.out) / "merged")))


def test_unfinished_run_guard_and_resume_with_other_settings(cfg, caplog):
    def crash(step: int) -> None:
        raise Killed
    with pytest.raises(Killed):                                # killed before its first checkpoint
        main(replace(cfg, save_every=0), on_step=crash)
    assert not (Path(cfg.out) / "checkpoint").exists()
    (Path(cfg.out) / "stale.txt").write_text("from the killed attempt")
    main(replace(cfg, save_every=0))                           # a plain rerun replaces that attempt
    assert "held an attempt of this run that stopped before its first checkpoint" in caplog.text
    assert not (Path(cfg.out) / "stale.txt").exists() and (Path(cfg.out) / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in MetricsLog.read(Path(cfg.out) / "metrics.jsonl") if "loss" in r] == [1, 2]
    cfg = replace(cfg, save_every=1, out=cfg.out + "-2")
    with pytest.raises(Killed):
        main(cfg, on_step=crash)
    with pytest.raises(ValueError, match=f"already holds this run; pass --resume {cfg.out}"):
        main(cfg)
    with pytest.raises(ValueError, match="other settings.*rank"):
        main(replace(cfg, save_every=1, rank=8, resume=cfg.out))


def test_default_out_folder(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = main(replace(cfg, out=None, max_steps=1))
    assert result.out == Path("runs") / f"{Path(cfg.model).name}-fora-k2"
    assert (tmp_path / result.out / "adapter_model.safetensors").is_file()
    assert default_out(TrainConfig(model="Qwen/Qwen3-0.6B-Base", method="lora")) == Path("runs/Qwen3-0.6B-Base-lora")
    assert default_out(TrainConfig(model="/m/x.gguf", k=3)) == Path("runs/x-fora-k3")


@pytest.mark.cuda
def test_cuda_bf16_run(cfg):
    cfg = replace(cfg, device="cuda", max_steps=30, warmup_steps=3, eval_every=0)
    result = main(cfg)  # dtype auto: bf16 base weights + bf16 autocast, fp32 adapters
    assert result.val_losses[-1][1] < 0.7 * result.val_losses[0][1], result.val_losses
    tensors = _adapter(cfg.out)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert max(stiefel_error(A.mT) for k, A in tensors.items() if k.endswith("lora_A.weight")) < 1e-5


def test_bad_inputs(cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(replace(cfg, data=str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(ValueError, match="malformed JSON"):
        main(replace(cfg, data=str(bad)))
    bad.write_text(json.dumps(_records(10) + [{"instruction": "no answer"}]))
    with pytest.raises(ValueError, match=r"bad.json, line 1: record 11 of 11 lacks \['output'\]"):
        main(replace(cfg, data=str(bad)))
    with pytest.raises(ValueError, match="were dropped.*cutoff_len"):
        main(replace(cfg, cutoff_len=20))
    with pytest.raises(ValueError, match=f"--k 9 exceeds .*L={L}"):
        main(replace(cfg, k=9))
    with pytest.raises(ValueError, match="unknown method 'vera'"):
        replace(cfg, method="vera")


def test_cli(tiny, data_file, tmp_path, capsys):
    cfg = parse_args(["--model", str(tiny), "--k", "2", "--targets", "q_proj,v_proj", "--method", "cka",
                      "--max-steps", "5", "--merge"])
    assert (cfg.k, cfg.targets, cfg.method, cfg.max_steps, cfg.merge, cfg.rank) == \
        (2, ("q_proj", "v_proj"), "cka", 5, True, 32)
    with pytest.raises(SystemExit):
        parse_args(["--model", "x", "--method", "vera"])
    assert "invalid choice: 'vera'" in capsys.readouterr().err
    script = load_script("train")
    argv = ["--model", str(tiny), "--data", str(data_file), "--out", str(tmp_path / "cli"), "--k", "9", "--val-size", "8"]
    assert script.cli(argv) == 1
    assert "--k 9 exceeds" in capsys.readouterr().err
