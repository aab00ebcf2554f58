"""QFoRA under FSDP2 on 2 CPU processes (gloo): the 4-bit base sharded with its blocks.

Oracles: one-process QFoRA with the global batch (same selection, Fisher scores and adapter to
1e-5); `fisher_scores` on the whole 4-bit model; the unsharded model's own NF4 storage bytes
(each rank must hold about half); the uninterrupted run (a run resumed after rank 1 fails).
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import (WORLD, _adapter, _calibration, _free_port, _max_rel_err, _records, _train_job,
                              multiprocess)
from torch.distributed.tensor import DTensor

from fora.fisher import fisher_scores
from fora.formats.loading import load_model
from fora.inject import freeze_base, inject_lora
from fora.quant.nf4 import NF4Linear
from fora.training.checkpoint import load_checkpoint
from fora.training.config import TrainConfig
from fora.training.distributed import distributed_fisher_scores, init_distributed, shutdown, wrap_model
from fora.training.fsdp_nf4 import NF4_SHARDED, nf4_bytes, shard_base, shardable_nf4
from fora.training.run import main

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _worker(rank: int, port: int, jobs: list[tuple]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        for job in jobs:
            if job[0] == "shard":  # the base sharded after injection (the trainer's wrap_model)
                _, folder, out = job
                ctx = init_distributed("fsdp", "cpu")
                model = load_model(folder, quantize="nf4")
                inject_lora(model, [1, 2], rank=4, seed=0)
                freeze_base(model)
                wrap_model(ctx, model, torch.device("cpu"))
                kinds = {name: type(p).__name__ for name, p in model.named_parameters()}
                Path(f"{out}.rank{rank}").write_text(json.dumps({"bytes": nf4_bytes(model), "kinds": kinds}))
            elif job[0] == "fisher":  # scored sharded, before any adapter exists (distributed_select)
                _, folder, n, params, out = job
                ctx = init_distributed("fsdp", "cpu")
                model = shard_base(load_model(folder, quantize="nf4"), WORLD, torch.device("cpu"))
                torch.save(distributed_fisher_scores(ctx, model, _calibration(n), params=params), f"{out}.rank{rank}")
            else:
                _train_job(rank, job)
    finally:
        shutdown()


def _spawn(*jobs: tuple) -> None:
    mp.spawn(_worker, args=(_free_port(), list(jobs)), nprocs=WORLD, join=True)


@pytest.fixture(scope="module")
def base_cfg(tiny, tmp_path_factory) -> TrainConfig:
    data = tmp_path_factory.mktemp("data") / "train.json"
    data.write_text(json.dumps(_records(37)))  # a last global batch of 1 row: a ghost row on rank 1
    return TrainConfig(model=str(tiny), k=2, data=str(data), rank=4, device="cpu", dtype="float32",
                       val_size=8, batch_size=4, grad_accum=2, max_steps=5, warmup_steps=0, lr=1e-2,
                       fisher_batches=3, log_every=1, eval_every=0, save_every=0, lora_dropout=0.0,
                       quantize="nf4")


@pytest.fixture(scope="module")
def runs(base_cfg, tmp_path_factory) -> dict[str, Path]:
    """One-process QFoRA (batch 4); in one spawn: the sharded layout, sharded Fisher (3 batches on
    2 ranks, "block" and "targets"), QFoRA on FSDP2 (batch 2 each), and the same run with
    checkpoints every 2 steps, where rank 1 fails at step 3; then that run resumed."""
    root = tmp_path_factory.mktemp("runs")
    out = {name: root / name for name in ("one", "fsdp", "crash", "shard", "fisher_block", "fisher_targets")}
    main(replace(base_cfg, out=str(out["one"])))
    per_rank = replace(base_cfg, batch_size=base_cfg.batch_size // WORLD, distributed="fsdp")
    crash = replace(per_rank, save_every=2, out=str(out["crash"]))
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 fails at step 3"):
        _spawn(("shard", base_cfg.model, str(out["shard"])),
               ("fisher", base_cfg.model, 3, "block", str(out["fisher_block"])),
               ("fisher", base_cfg.model, 3, "targets", str(out["fisher_targets"])),
               ("train", replace(per_rank, out=str(out["fsdp"])), -1, -1),
               ("train", crash, 1, 3))
    assert load_checkpoint(out["crash"]).position.step == 2
    assert not (out["crash"] / "adapter_model.safetensors").exists()
    _spawn(("train", replace(crash, resume=str(out["crash"])), -1, -1))
    return out


@multiprocess
@pytest.mark.slow  # the `runs` fixture: two spawns of 2 processes, ~30 s of CPU
def test_qfora_on_fsdp_equals_one_process_qfora_with_the_global_batch(runs):
    one = json.loads((runs["one"] / "selection.json").read_text())
    two = json.loads((runs["fsdp"] / "selection.json").read_text())
    assert two["selected"] == one["selected"]
    torch.testing.assert_close(torch.tensor(two["scores"]), torch.tensor(one["scores"]), rtol=1e-6, atol=0)
    assert _max_rel_err(_adapter(runs["fsdp"]), _adapter(runs["one"])) < 1e-5
    assert min(float(t.abs().max()) for k, t in _adapter(runs["fsdp"]).items() if "lora_B" in k) > 1e-3


@multiprocess
@pytest.mark.slow
def test_each_rank_holds_half_of_the_packed_base(runs, tiny):
    whole = load_model(tiny, quantize="nf4")
    expected = sum(m.storage_bytes() for m in whole.modules() if isinstance(m, NF4Linear))
    n_linears = sum(isinstance(m, NF4Linear) for m in whole.modules())
    held = []
    for rank in range(WORLD):
        report = json.loads(Path(f"{runs['shard']}.rank{rank}").read_text())
        local, total = report["bytes"]
        assert total == expected
        assert local <= 0.55 * expected, (local, expected)
        held.append(local)
        for name, kind in report["kinds"].items():
            if name.rsplit(".", 1)[-1] in NF4_SHARDED:
                assert kind == "DTensor", name
            elif ".layers." in name:  # adapters, norms: whole on every rank
                assert kind == "Parameter", name
    # the shards add up to the base (dim-0 chunks; μ, 4 bytes per linear, is on every rank)
    assert sum(held) == expected + (WORLD - 1) * 4 * n_linears


@multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("params", ["block", "targets"])
def test_fisher_on_the_sharded_4bit_base_equals_one_process(runs, tiny, params):
    expected = fisher_scores(load_model(tiny, quantize="nf4"), _calibration(3), params=params)
    assert float(expected.min()) > 0
    for rank in range(WORLD):
        got = torch.load(f"{runs[f'fisher_{params}']}.rank{rank}", weights_only=True)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@multiprocess
@pytest.mark.slow
def test_a_rank_failing_under_qfora_fsdp_resumes_to_the_uninterrupted_run(runs):
    torch.testing.assert_close(_adapter(runs["crash"]), _adapter(runs["fsdp"]), rtol=1e-6, atol=1e-7)


def test_shardable_nf4_keeps_the_state_dict_and_the_output(tiny):
    model = load_model(tiny, quantize="nf4")
    ids = torch.tensor([[2, 40, 41, 42, 50, 60, 70, 9]])
    before, logits = model.state_dict(), model(ids).detach()
    assert shardable_nf4(model) == sum(isinstance(m, NF4Linear) for m in model.modules()) > 0
    assert shardable_nf4(model) == 0  # idempotent
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    torch.testing.assert_close(model(ids), logits, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in NF4_SHARDED)
    local, whole = nf4_bytes(model)
    assert local == whole


def test_memory_plan_counts_what_a_quantized_adapted_model_holds(tiny):
    from fora.models.config import ModelConfig
    from fora.optim import build_optimizers
    from fora.training.memory_plan import qfora_fsdp_memory

    model = load_model(tiny, quantize="nf4")
    config = ModelConfig.from_json(tiny)
    plan = qfora_fsdp_memory(config, 1, k=2, rank=4, float_bytes=4)
    assert plan.packed_base == nf4_bytes(model)[1]  # the quantizer's own tensors
    floats = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] not in NF4_SHARDED)
    assert plan.float_weights == 4 * floats
    inject_lora(model, [1, 2], rank=4, seed=0)
    freeze_base(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert plan.adapters == 4 * sum(p.numel() for p in params)
    optimizers = build_optimizers(model, 1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    for opt in optimizers:
        opt.step()
    state = sum(t.numel() * t.element_size() for opt in optimizers for s in opt.state.values()
                for t in s.values() if torch.is_tensor(t))
    assert plan.optimizer == state
    assert qfora_fsdp_memory(config, 2, k=2, rank=4).packed_base < 0.51 * plan.packed_base
