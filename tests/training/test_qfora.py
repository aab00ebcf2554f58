"""QFoRA end to end: FoRA on a 4-bit NF4 base (tiny random checkpoint, CPU, float32).

Oracles: the validation loss falls; A stays on the Stiefel manifold; a killed and resumed run
equals the uninterrupted one bit for bit; peft loads the adapter onto the full-precision base; the
merged export computes what the trained 4-bit model computes.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import hf_reference

from fora.formats.loading import load_model
from fora.formats.peft_io import load_adapter
from fora.stiefel import stiefel_error
from fora.training.config import TrainConfig
from fora.training.flags import parse_args
from fora.training.loop import MetricsLog
from fora.training.run import main

IDS = torch.tensor([[2, 40, 41, 42, 50, 60, 70, 9], [2, 5, 6, 7, 8, 9, 10, 11]])

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture
def cfg(tiny, tmp_path) -> TrainConfig:
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"instruction": f"Is {i} even?", "input": "",
                                 "output": "yes" if i % 2 == 0 else "no"} for i in range(40)]))
    return TrainConfig(model=str(tiny), k=2, data=str(data), out=str(tmp_path / "run"), rank=4, device="cpu",
                       val_size=8, batch_size=4, max_steps=2, warmup_steps=0, lr=1e-2, fisher_batches=2,
                       log_every=1, eval_every=0, save_every=0, lora_dropout=0.0, quantize="nf4")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


def test_qfora_trains_and_exports(cfg, tiny):
    from peft import PeftModel

    cfg = replace(cfg, max_steps=30, warmup_steps=3, merge=True, lr=5e-2)  # the gate opens by ~lr a step
    result = main(cfg)
    out = Path(cfg.out)
    assert result.val_losses[-1][1] < 0.7 * result.val_losses[0][1], result.val_losses
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert max(r["stiefel_error"] for r in rows if "stiefel_error" in r) < 1e-5
    tensors = load_file(out / "adapter_model.safetensors")
    assert {int(k.split(".")[4]) for k in tensors} == set(result.selected)
    # the adapter is plain LoRA: peft puts it on the full-precision base, as fora does
    full = load_adapter(load_model(tiny, device="cpu"), out)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(hf_reference(tiny), out).eval()),
                               _logits(full), atol=1e-4, rtol=1e-4)
    # the merged export equals the trained 4-bit model (dequantized W0 + s B A)
    trained = load_adapter(load_model(tiny, device="cpu", quantize="nf4"), out)
    torch.testing.assert_close(_logits(load_model(out / "merged", device="cpu")), _logits(trained),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(trained), _logits(full), atol=1e-4)  # the 4 bits do matter


def test_qfora_resume_is_bit_identical(cfg, tmp_path):
    cfg = replace(cfg, max_steps=4, grad_accum=2, save_every=2)
    main(replace(cfg, out=str(tmp_path / "full")))

    def crash(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
    killed = replace(cfg, out=str(tmp_path / "killed"))
    with pytest.raises(KeyboardInterrupt):
        main(killed, on_step=crash)
    main(replace(killed, resume=str(tmp_path / "killed")))
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)
    for k, B in resumed.items():
        if k.endswith("lora_B.weight"):
            assert stiefel_error(B) < 1e-5, k


def test_quantize_flag(tiny, capsys):
    assert parse_args(["--model", str(tiny), "--quantize", "nf4"]).quantize == "nf4"
    assert parse_args(["--model", str(tiny)]).quantize is None
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tiny), "--quantize", "int4"])
    assert "unknown --quantize 'int4'; choose nf4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown --quantize 'fp4'; choose nf4"):
        TrainConfig(model="x", quantize="fp4")


def test_qdora_needs_the_quantized_base(tiny):
    with pytest.raises(ValueError, match="--method qdora trains on a quantized base: pass --quantize nf4"):
        TrainConfig(model=str(tiny), method="qdora")
    assert TrainConfig(model=str(tiny), method="qdora", quantize="nf4").method == "qdora"


def test_qdora_trains(cfg):
    cfg = replace(cfg, method="qdora", max_steps=20, warmup_steps=2)
    result = main(cfg)
    assert result.val_losses[-1][1] < 0.8 * result.val_losses[0][1], result.val_losses
    tensors = load_file(Path(cfg.out) / "adapter_model.safetensors")
    assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == 4 * 5


@pytest.mark.parametrize("method", ["lora", "cka", "random-k", "fim-lora"])
def test_every_selector_runs_on_the_4bit_base(cfg, method):
    result = main(replace(cfg, method=method))
    tensors = load_file(Path(cfg.out) / "adapter_model.safetensors")
    assert {int(k.split(".")[4]) for k in tensors} == set(result.selected)
