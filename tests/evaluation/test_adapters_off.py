"""Adapters off is the base model, for every method after training (fora.inject.adapters_disabled).

Oracle: a freshly loaded base model with no adapters at all. Zeroing each adapter's scale is not
enough for DoRA, whose off state would still compute (m / ‖W0‖_c) ⊙ x W0ᵀ; the KL drift of
`output_drift` must be measured against the real base.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fora.evaluation.diagnostics import output_drift, text_windows
from fora.formats.loading import load_model
from fora.formats.peft_io import load_adapter
from fora.inject import adapters_disabled, lora_modules
from fora.training.config import TrainConfig
from fora.training.methods import METHODS
from fora.training.run import main

pytestmark = pytest.mark.usefixtures("one_thread_module")

WINDOWS = text_windows(list(range(3, 40)), 12)


def _trained(tiny: Path, tmp_path: Path, method: str):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"instruction": f"Is {i} even?", "input": "", "output": "yes" if i % 2 == 0 else "no"}
                                for i in range(24)]))
    quantize = "nf4" if method == "qdora" else None
    main(TrainConfig(model=str(tiny), method=method, k=None if method == "adalora" else 2, data=str(data), out=str(tmp_path / "run"), rank=4,
                     device="cpu", val_size=4, batch_size=4, max_steps=3, warmup_steps=0, lr=5e-2,
                     fisher_batches=2, log_every=1, eval_every=0, save_every=0, lora_dropout=0.0, quantize=quantize))
    base = load_model(tiny, dtype=torch.float32, device="cpu", quantize=quantize).eval()
    tuned = load_adapter(load_model(tiny, dtype=torch.float32, device="cpu", quantize=quantize), tmp_path / "run")
    return base, tuned.eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_adapters_off_is_the_base_for_every_method(tiny, tmp_path, method):
    base, tuned = _trained(tiny, tmp_path, method)
    ids = WINDOWS[0]
    with torch.no_grad():
        reference = base(ids)
        assert (tuned(ids) - reference).abs().max() > 1e-4  # training moved the outputs
        with adapters_disabled(tuned):
            torch.testing.assert_close(tuned(ids), reference, rtol=0, atol=1e-6)
            assert all(m.disabled for m in lora_modules(tuned).values())
            assert output_drift(tuned, WINDOWS)["kl"] == 0.0  # nested: off inside off stays off
        assert not any(m.disabled for m in lora_modules(tuned).values())  # back on after the block
    # the drift is KL(base ‖ tuned) against the real base, computed directly here
    drift = output_drift(tuned, WINDOWS)
    with torch.no_grad():
        direct = [F.kl_div(F.log_softmax(tuned(w), -1), F.log_softmax(base(w), -1), log_target=True,
                           reduction="none").sum(-1) for w in WINDOWS]
    expected = float(torch.cat([d.flatten() for d in direct]).mean())
    assert drift["kl"] == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_disabling_merged_adapters_is_refused(tiny, tmp_path):
    _, tuned = _trained(tiny, tmp_path, "lora")
    next(iter(lora_modules(tuned).values())).merge()
    with pytest.raises(ValueError, match="unmerge"):
        with adapters_disabled(tuned):
            pass
