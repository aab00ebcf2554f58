"""Atomic writes and training checkpoints (save -> load -> continue equals never stopping)."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_checkpoint

from fora.training.checkpoint import (DataPosition, capture_rng, find_checkpoint, load_checkpoint, restore_adapter,
                             restore_rng, restore_training_state, save_checkpoint)
from fora.inject import freeze_base, inject_lora
from fora.formats.atomic import (atomic_save_safetensors, atomic_write_json, atomic_write_text, publish_dir,
                           recover_dir, staging_dir)
from fora.formats.loading import load_model
from fora.optim import build_optimizers
from fora.training.loop import lr_lambda


# ------------------------------------------------------------------------------ io_utils

def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert os.listdir(target.parent) == ["a.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def boom(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_safetensors_handles_shared_storage(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(3, 4)
    atomic_save_safetensors({"a": w, "b": w, "c": torch.ones(2)}, tmp_path / "t.safetensors")
    back = load_file(tmp_path / "t.safetensors")
    assert torch.equal(back["a"], w) and torch.equal(back["b"], w) and torch.equal(back["c"], torch.ones(2))


def test_staging_dir_publishes_or_leaves_old(tmp_path):
    final = tmp_path / "ckpt"
    with staging_dir(final) as d:
        (d / "f").write_text("1")
    with pytest.raises(RuntimeError, match="killed"):
        with staging_dir(final) as d:
            (d / "f").write_text("2")
            raise RuntimeError("killed")
    assert (final / "f").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with staging_dir(final) as d:
        (d / "f").write_text("3")
    assert (final / "f").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_recover_dir_after_crash_between_renames(tmp_path):
    final = tmp_path / "ckpt"
    with staging_dir(final) as d:
        (d / "f").write_text("1")
    os.replace(final, tmp_path / "ckpt.old")  # the first rename of publish_dir, then a crash
    (tmp_path / ".staging-ckpt-x").mkdir()    # and a half-written staging dir
    recover_dir(final)
    assert (final / "f").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    staged = tmp_path / "new"
    staged.mkdir()
    (staged / "f").write_text("2")
    publish_dir(staged, final)
    assert (final / "f").read_text() == "2"


# ------------------------------------------------------------------------------ checkpoint

def test_rng_roundtrip():
    state = capture_rng()
    first = (torch.rand(3), random.random(), np.random.rand(2))
    restore_rng(state)
    second = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and np.array_equal(first[2], second[2])


@pytest.fixture(scope="module")
def ckpt_folder(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama", num_hidden_layers=3, tokenizer=False)


def _run(folder, stiefel: bool):
    """A tiny adapted model with optimizers and schedulers, as the trainer builds them."""
    model = load_model(folder, dtype=torch.float32, device="cpu")
    inject_lora(model, [1, 2], rank=4, stiefel=stiefel, seed=0, dropout=0.1)
    freeze_base(model)
    model.train()
    opts = build_optimizers(model, 1e-2, stiefel=stiefel, qr_every=2)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda("linear", 2, 10)) for o in opts]
    return model, opts, scheds


def _step(model, opts, scheds, seed):
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(seed))
    model(ids).float().logsumexp(-1).mean().backward()  # dropout draws from the global RNG
    for o in opts:
        o.step()
    for s in scheds:
        s.step()
    for o in opts:
        o.zero_grad()


def _lora(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("stiefel", [True, False])
def test_checkpoint_resume_is_bit_identical(ckpt_folder, tmp_path, stiefel):
    torch.manual_seed(0)
    model, opts, scheds = _run(ckpt_folder, stiefel)
    for i in range(3):
        _step(model, opts, scheds, i)
    selection = {"selected": [1, 2], "method": "test"}
    save_checkpoint(tmp_path / "checkpoint", model=model, optimizers=opts, schedulers=scheds,
                    position=DataPosition(0, 3, 3), selection=selection, config={"seed": 0},
                    base_model_name_or_path=str(ckpt_folder))
    for i in range(3, 6):
        _step(model, opts, scheds, i)
    expected = _lora(model)

    torch.manual_seed(123)  # a fresh process: different RNG, fresh init
    model2, opts2, scheds2 = _run(ckpt_folder, stiefel)
    ckpt = load_checkpoint(tmp_path)  # the run's --out folder is accepted too
    assert ckpt.position == DataPosition(0, 3, 3) and ckpt.selection == selection
    restore_training_state(ckpt, model2, opts2, scheds2)
    for i in range(3, 6):
        _step(model2, opts2, scheds2, i)
    got = _lora(model2)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert opts2[0].param_groups[0]["lr"] == opts[0].param_groups[0]["lr"]


def test_checkpoint_errors(ckpt_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        find_checkpoint(tmp_path)
    model, opts, scheds = _run(ckpt_folder, True)
    save_checkpoint(tmp_path / "checkpoint", model=model, optimizers=opts, schedulers=scheds,
                    position=DataPosition(0, 0, 0), selection={}, config={}, base_model_name_or_path="x")
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    other, o2, s2 = _run(ckpt_folder, False)
    with pytest.raises(ValueError, match="same --method"):
        restore_training_state(ckpt, other, o2, s2)
    small = load_model(ckpt_folder, dtype=torch.float32, device="cpu")
    inject_lora(small, [1], rank=4, seed=0)
    with pytest.raises(ValueError, match="does not match the model's LoRA modules"):
        restore_adapter(small, ckpt.adapter)
    lower = load_model(ckpt_folder, dtype=torch.float32, device="cpu")
    inject_lora(lower, [1, 2], rank=2, seed=0)
    with pytest.raises(ValueError, match="same --rank"):
        restore_adapter(lower, ckpt.adapter)
    (tmp_path / "checkpoint" / "rng.pt").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_checkpoint(tmp_path / "checkpoint")


def test_checkpoint_counting_micro_batches_is_refused_with_accumulation(ckpt_folder, tmp_path):
    model, opts, scheds = _run(ckpt_folder, True)
    for accum in (1, 2):
        ckpt = tmp_path / f"accum{accum}"
        save_checkpoint(ckpt, model=model, optimizers=opts, schedulers=scheds, position=DataPosition(0, 4, 2),
                        selection={}, config={"grad_accum": accum}, base_model_name_or_path="x")
        assert load_checkpoint(ckpt).position == DataPosition(0, 4, 2)
        state = json.loads((ckpt / "state.json").read_text())
        del state["batch_unit"]  # as written before steps were drawn at the global batch size
        (ckpt / "state.json").write_text(json.dumps(state))
        if accum == 1:  # one micro-batch a step: both counts agree
            assert load_checkpoint(ckpt).position == DataPosition(0, 4, 2)
        else:
            with pytest.raises(ValueError, match="start the run afresh"):
                load_checkpoint(ckpt)
