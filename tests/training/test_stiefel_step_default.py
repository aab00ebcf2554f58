"""The Stiefel step's default multiplier is the model family's measured choice (fora.optim,
`default_stiefel_lr_scale`): it reaches Cayley-Adam, train_config.json records it, an explicit flag
wins, and the table agrees with the choice the claims runs made (docs/claims/stiefel_step.json)."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

import fora.training.run
from fora.cayley_adam import CayleyAdam
from fora.optim import default_stiefel_lr_scale
from fora.training.run import main, with_stiefel_step

pytestmark = pytest.mark.usefixtures("one_thread_module")

ROOT = Path(__file__).resolve().parents[2]
# the claims runs' models and their config.json model_type (SmolLM2 is a LLaMA)
MEASURED = {"smollm2-135m": "llama", "gemma-3-270m": "gemma3_text"}


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gemma3"), "gemma3", num_hidden_layers=4)


def _cayley_lrs(monkeypatch) -> list[dict[int, float]]:
    """Per build_optimizers call: {numel of an A: its Cayley-Adam group's lr as built}."""
    seen: list[dict[int, float]] = []
    real = fora.training.run.build_optimizers

    def build(*args, **kwargs):
        optimizers = real(*args, **kwargs)
        seen.append({p.numel(): g["lr"] for o in optimizers if isinstance(o, CayleyAdam)
                     for g in o.param_groups for p in g["params"]})
        return optimizers
    monkeypatch.setattr(fora.training.run, "build_optimizers", build)
    return seen


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_family_default_reaches_cayley_adam_and_train_config(family, cfg, tiny_gemma3, monkeypatch):
    cfg = replace(cfg, max_steps=1, **({} if family == "llama" else {"model": str(tiny_gemma3)}))
    model_type = json.loads((Path(cfg.model) / "config.json").read_text())["model_type"]
    expected = {"llama": 1.0, "gemma3": 0.25}[family]
    assert default_stiefel_lr_scale(model_type) == expected
    lrs = _cayley_lrs(monkeypatch)
    main(cfg)  # stiefel_lr_scale left at None: the family's
    saved = json.loads((Path(cfg.out) / "train_config.json").read_text())
    assert saved["stiefel_lr_scale"] == expected
    (groups,) = lrs  # each A's base lr, read before the schedule scales it: lr * sqrt(r * d_in) * scale
    for numel, lr in groups.items():
        assert lr == pytest.approx(cfg.lr * math.sqrt(numel) * expected, rel=1e-6)
    with pytest.raises(ValueError, match="already holds this run, finished"):
        main(cfg)  # the same flags name the same run: the resolved default does not read as a difference


def test_an_explicit_scale_or_step_wins_over_the_family_default(cfg, tiny_gemma3):
    gemma = replace(cfg, model=str(tiny_gemma3))
    assert with_stiefel_step(gemma, "gemma3_text").stiefel_lr_scale == 0.25
    assert with_stiefel_step(replace(gemma, stiefel_lr_scale=1.0), "gemma3_text").stiefel_lr_scale == 1.0
    assert with_stiefel_step(replace(gemma, stiefel_lr=0.01), "gemma3_text").stiefel_lr_scale == 1.0
    assert with_stiefel_step(cfg, "llama").stiefel_lr_scale == 1.0
    assert with_stiefel_step(cfg, "qwen3").stiefel_lr_scale == 1.0  # no claims runs: x1


def test_the_table_is_the_choice_the_claims_runs_made():
    """If the runs are re-decided (docs/claims/stiefel_step.json rebuilt by `reproduce.py --report`),
    the default in fora.optim must follow, or this fails."""
    steps = json.loads((ROOT / "docs" / "claims" / "stiefel_step.json").read_text())
    chosen = {s["model"]: s["chosen"] for s in steps if s["method"] == "fora"}
    assert set(chosen) == set(MEASURED)
    for model, model_type in MEASURED.items():
        assert default_stiefel_lr_scale(model_type) == chosen[model], model
