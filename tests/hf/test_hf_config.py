"""fora.hf.fisher_lora_config: the Fisher top-K as peft's layers_to_transform, checked before training.

Oracles: fora.fisher_scores + select_layers on the same batches (the layers), peft's get_peft_model
(what it really injects), and the written adapter_config.json (the choice shows in the file).
"""
from __future__ import annotations

import json

import pytest
from hf_helpers import FAMILIES, base_model, calibration, fora_model

import fora
import fora.hf


@pytest.mark.parametrize("family", FAMILIES)
def test_config_holds_the_fisher_top_k_and_peft_injects_exactly_those(checkpoints, family, tmp_path):
    import peft

    model = base_model(checkpoints[family])
    k = model.config.num_hidden_layers // 2
    expected = fora.select_layers(fora.fisher_scores(model, calibration()), k)
    config = fora.hf.fisher_lora_config(model, calibration(), k, r=4, lora_alpha=8)
    assert config.layers_to_transform == expected and config.layers_pattern == "layers"
    assert set(config.target_modules) == set(fora.DEFAULT_TARGETS) and config.r == 4

    peft_model = peft.get_peft_model(model, config)
    injected = [n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(injected) == k * len(fora.DEFAULT_TARGETS)
    assert sorted({fora.models.paths.layer_index(n) for n in injected}) == expected
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == expected and saved["layers_pattern"] == "layers"


def test_a_target_list_that_matches_partly_is_refused_naming_what_exists(checkpoints):
    model = base_model(checkpoints["llama"])
    with pytest.raises(ValueError) as err:
        fora.hf.fisher_lora_config(model, calibration(), 1, targets=["q_proj", "c_attn"])
    msg = str(err.value)
    assert "match 2 linear modules" in msg and "not 4 (2 layers × 2 targets)" in msg
    assert "no match for ['c_attn']" in msg
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in msg


def test_the_authors_per_layer_patterns_match_nothing_and_are_refused(checkpoints):
    # their apply_fora builds 'layers.<i>.q_proj'; in LLaMA q_proj sits under self_attn
    model = base_model(checkpoints["llama"])
    with pytest.raises(ValueError, match=r"match 0 linear modules .* no match for \['layers.0.q_proj'\]"):
        fora.hf.fisher_lora_config(model, calibration(), 1, targets=["layers.0.q_proj"])


def test_targets_are_checked_before_the_fisher_pass(checkpoints, monkeypatch):
    model = base_model(checkpoints["llama"])
    monkeypatch.setattr(fora.hf.config, "fisher_scores", lambda *a, **k: pytest.fail("scored before checking"))
    with pytest.raises(ValueError, match="no match for"):
        fora.hf.fisher_lora_config(model, calibration(), 1, targets=["qkv_proj"])


def test_owned_fields_a_peft_model_and_bad_targets_are_refused(checkpoints):
    model = base_model(checkpoints["llama"])
    with pytest.raises(ValueError, match=r"sets \['target_modules'\] itself"):
        fora.hf.fisher_lora_config(model, calibration(), 1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="non-empty list of module names"):
        fora.hf.fisher_lora_config(model, calibration(), 1, targets="q_proj")
    with pytest.raises(ValueError, match=r"k=3 is out of range for a model with 2 layers; choose k in \[1, 2\]"):
        fora.hf.fisher_lora_config(model, calibration(), 3)
    peft_model = fora_model(checkpoints["llama"])
    with pytest.raises(ValueError, match="already carries peft adapters; score the base model"):
        fora.hf.fisher_lora_config(peft_model, calibration(), 1)


def test_only_the_first_num_batches_are_read(checkpoints):
    model = base_model(checkpoints["llama"])
    good = calibration(n_batches=1)

    def stream():
        yield good[0]
        raise AssertionError("read past num_batches")

    config = fora.hf.fisher_lora_config(model, stream(), 1, num_batches=1)
    assert config.layers_to_transform == fora.select_layers(fora.fisher_scores(model, good), 1)
