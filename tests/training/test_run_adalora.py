"""`--method adalora` end to end on the tiny checkpoint: the budget logged per step (against the cubic
schedule written out here), the final ADALORA adapter in peft, its folded LoRA twin, a bit-identical
resume in the middle of the budgeting phase, and the one-line errors of the adalora flags."""
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
from fora.inject import lora_modules
from fora.training.adalora_hooks import AdaLoRAStep
from fora.training.config import TrainConfig
from fora.training.flags import parse_args
from fora.training.loop import MetricsLog
from fora.training.run import main

pytestmark = pytest.mark.usefixtures("one_thread_module")
IDS = torch.tensor([[2, 40, 41, 42, 50, 60, 70, 9]])


class Killed(Exception):
    pass


@pytest.fixture
def ada(cfg) -> TrainConfig:
    # rank 2 -> init_r 3, target_r 2; T = 8 - 2 = 6: budgeting over steps 2..5, masks at even steps
    return replace(cfg, k=None, method="adalora", rank=2, max_steps=8, tinit=1, tfinal=2, delta_t=2,
                   targets=("q_proj", "v_proj"), lora_dropout=0.1)


def _budget(step: int, b0: int, b1: int, tinit=1, tfinal=2, total=8) -> int:
    """AdaLoRA's cubic schedule (Zhang et al. 2023, Eq. 12), written out independently."""
    if step <= tinit:
        return b0
    if step >= total - tfinal:
        return b1
    return int((b0 - b1) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + b1)


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


def test_adalora_run_budget_and_exports(ada, tiny, tmp_path):
    from peft import PeftModel

    main(ada)
    out = Path(ada.out)
    rows = [r for r in MetricsLog.read(out / "metrics.jsonl") if "loss" in r]
    m = 2 * 4  # q, v in each of the 4 layers
    assert [r["budget"] for r in rows] == [_budget(s, 3 * m, 2 * m) for s in range(1, 9)]
    assert rows[-1]["kept_triplets"] <= 2 * m and rows[0]["kept_triplets"] == 3 * m
    assert all(r["orth_reg"] > 0 for r in rows)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 3 and config["total_step"] == 8
    assert sum(sum(v) for v in config["rank_pattern"].values()) == rows[-1]["kept_triplets"]
    ours = load_adapter(load_model(tiny, device="cpu"), out).eval()
    expected = _logits(ours)
    assert not torch.allclose(expected, _logits(load_model(tiny, device="cpu")), atol=1e-4)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(hf_reference(tiny), out).eval()), expected,
                               atol=1e-5, rtol=1e-5)
    twin = PeftModel.from_pretrained(hf_reference(tiny), out / "lora").eval()
    torch.testing.assert_close(_logits(twin), expected, atol=1e-5, rtol=1e-5)
    assert len(lora_modules(ours)) == sum(1 for v in config["rank_pattern"].values() if any(v))
    # reproduce.py's counts: trained = init_r triplets of every module, budget = the kept ones
    from fora.evaluation.measure import adapter_params

    sizes = {"q_proj": 64 + 64 + 1, "v_proj": 64 + 32 + 1}  # d_in + d_out + 1 per triplet (tiny llama)
    per_layer = sum(sizes.values())
    assert adapter_params(out / "checkpoint" / "adapter_model.safetensors") == 3 * 4 * per_layer
    assert adapter_params(out / "adapter_model.safetensors") == sum(
        sum(v) * sizes[k.split(".")[-2]] for k, v in config["rank_pattern"].items())


def test_orth_reg_enters_the_gradient(ada, tmp_path):
    adapters = {}
    for w in (0.0, 0.5):
        main(replace(ada, orth_reg=w, max_steps=3, tinit=0, tfinal=0, out=str(tmp_path / f"w{w}")))
        adapters[w] = load_file(tmp_path / f"w{w}" / "checkpoint" / "adapter_model.safetensors")
    key = next(k for k in adapters[0.0] if k.endswith("lora_A"))
    assert not torch.allclose(adapters[0.0][key], adapters[0.5][key])


def _record_emas(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """The allocator's sensitivity EMAs after every step, by step."""
    seen, real = {}, AdaLoRAStep.step

    def step(self):
        real(self)
        seen[self.last_step] = {k: v.clone() for k, v in self.allocator.ipt.items()}
    monkeypatch.setattr(AdaLoRAStep, "step", step)
    return seen


def test_resume_in_the_budgeting_phase_is_bit_identical(ada, tmp_path, monkeypatch):
    ada = replace(ada, save_every=3)
    emas = {"full": _record_emas(monkeypatch)}
    main(replace(ada, out=str(tmp_path / "full")))
    monkeypatch.undo()
    emas["killed"] = _record_emas(monkeypatch)

    def crash(step: int) -> None:
        if step == 4:
            raise Killed
    killed = replace(ada, out=str(tmp_path / "killed"))
    with pytest.raises(Killed):
        main(killed, on_step=crash)
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"] == 3
    main(replace(killed, resume=str(tmp_path / "killed")))
    for step in range(4, 6):  # the EMAs continue from the checkpoint's (they are cleared at T = 6)
        assert all(torch.equal(v, emas["killed"][step][k]) for k, v in emas["full"][step].items()), step
    for sub in ("", "lora", "checkpoint"):
        full = load_file(tmp_path / "full" / sub / "adapter_model.safetensors")
        resumed = load_file(tmp_path / "killed" / sub / "adapter_model.safetensors")
        assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full), sub
    rows = {p: [(r["budget"], r["kept_triplets"]) for r in MetricsLog.read(tmp_path / p / "metrics.jsonl")
                if "loss" in r] for p in ("full", "killed")}
    assert rows["full"] == rows["killed"]
    configs = [json.loads((tmp_path / p / "adapter_config.json").read_text()) for p in ("full", "killed")]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]


@pytest.mark.parametrize("change, message", [
    (dict(k=2), "--method adalora adapts every layer and allocates ranks itself; drop --k"),
    (dict(quantize="nf4"), "--method adalora trains on a full-precision base; drop --quantize"),
    (dict(target_r=4), r"target rank 4 must be in \[1, init_r = 3\]: pass --target-r <= --init-r"),
    (dict(rslora=True), "drop --rslora"),
    (dict(distributed="ddp"), "drop --distributed"),
    (dict(orth_reg=-1.0), "--orth-reg must be >= 0"),
    (dict(method="lora"), "--tinit applies to --method adalora only; drop it"),
])
def test_config_errors(ada, change, message):
    with pytest.raises(ValueError, match=message):
        replace(ada, **change)


def test_schedule_errors_name_the_fix(ada, capsys):
    with pytest.raises(ValueError, match=r"--tinit 5 \+ --tfinal 3 >= 8 total steps leaves no budgeting phase"):
        main(replace(ada, tinit=5, tfinal=3))
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--method", "adalora", "--adalora-betas", "0.9"])
    assert "--adalora-betas needs two comma-separated floats" in capsys.readouterr().err
