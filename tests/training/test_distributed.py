"""Distributed training on CPU processes (gloo), launched here with torch.multiprocessing.

Oracle: the one-process trainer. A run on 2 processes with --batch-size b (DDP or FSDP2) must
select the same layers and produce the same adapter (1e-5 relative) as one process with
--batch-size 2b; distributed Fisher scores must equal `fora.fisher.fisher_scores` on all batches.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from torch.distributed.tensor import DTensor

from fora.fisher import fisher_scores
from fora.inject import lora_modules, freeze_base, inject_lora
from fora.formats.loading import load_model
from fora.models.decoder import CausalLM
from fora.models.loss import IGNORE_INDEX, causal_lm_loss
from fora.training.batching import epoch_batches
from fora.training.checkpoint import load_checkpoint
from fora.training.config import TrainConfig
from fora.training.distributed import (RankBatches, distributed_fisher_scores, init_distributed, share,
                                       rank_prefix, shutdown, sync_adapter_grads, torchrun_hint,
                                       wrap_model)
from fora.training.loop import MetricsLog, forward_loss
from fora.training.run import main

WORLD = 2
multiprocess = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                  reason="needs torch.distributed with the gloo backend")

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _records(n: int) -> list[dict]:
    return [{"instruction": f"Is {i} even?", "input": "", "output": "yes" if i % 2 == 0 else "no"}
            for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calibration(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 100, (2, 9), generator=g)
        labels = ids.clone()
        labels[:, :3] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out


class _Crash(RuntimeError):
    pass


def _train_job(rank: int, job: tuple) -> None:
    """("train", cfg, crash_rank, crash_step): train, failing on `crash_rank` after `crash_step`."""
    _, cfg, crash_rank, crash_step = job

    def on_step(step: int) -> None:
        if rank == crash_rank and step == crash_step:
            raise _Crash(f"rank {rank} fails at step {step}")
    main(cfg, on_step=on_step)


def _worker(rank: int, port: int, jobs: list[tuple]) -> None:
    """One rank: join the group torchrun would describe, then run `jobs` in order."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a short timeout, so that a deadlock fails the test instead of hanging it (main reuses the group)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        for job in jobs:
            if job[0] == "fisher":
                _, folder, n, out = job
                ctx = init_distributed("ddp", "cpu")
                scores = distributed_fisher_scores(ctx, load_model(folder), _calibration(n))
                torch.save(scores, f"{out}.rank{rank}")
            elif job[0] == "shard":
                _, folder, out = job
                ctx = init_distributed("fsdp", "cpu")
                model = _adapted(folder)
                wrap_model(ctx, model, torch.device("cpu"))
                kinds = {name: [type(p).__name__, p.to_local().numel() if isinstance(p, DTensor) else p.numel(),
                                p.numel()] for name, p in model.named_parameters()}
                Path(f"{out}.rank{rank}").write_text(json.dumps(kinds))
                Path(f"{out}.prefix{rank}").write_text(rank_prefix())
                # the trainer's step on the sharded model: this rank's batch, backward stopping
                # at the adapted layer, loss over the global token count x W, grads averaged
                batches = _calibration(WORLD)
                total, _ = causal_lm_loss(model(batches[rank]["input_ids"], grad_from_layer=ADAPTED),
                                          batches[rank]["labels"])
                n = ctx.all_sum(int((batches[rank]["labels"][:, 1:] != IGNORE_INDEX).sum()))
                (total / n * WORLD).backward()
                params = [p for p in model.parameters() if p.requires_grad]
                sync_adapter_grads(ctx, params)
                torch.save([p.grad for p in params], f"{out}.grads{rank}")
            elif job[0] == "ddp_step":
                _, folder, out = job
                ctx = init_distributed("ddp", "cpu")
                model = _adapted(folder)
                engine = wrap_model(ctx, model, torch.device("cpu"))
                # the step must take the loss at supervised positions, never the full logits
                CausalLM.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("full logits"))
                total, n = forward_loss(engine, _calibration(WORLD)[rank], torch.device("cpu"),
                                        grad_from_layer=ADAPTED)
                (total / n).backward()
                torch.save({"loss": (total.detach(), n), "grads": [p.grad for p in model.parameters()
                                                                   if p.requires_grad]}, f"{out}.rank{rank}")
            else:
                _train_job(rank, job)
    finally:
        shutdown()


ADAPTED = 2  # the layer the sharded step adapts (layers below it run without autograd)


def _adapted(folder) -> torch.nn.Module:
    model = load_model(folder)
    inject_lora(model, [ADAPTED], rank=4, seed=0)
    freeze_base(model)
    with torch.no_grad():  # g = 0 would make every gradient of A and B zero
        for m in lora_modules(model).values():
            m.lora_gate.fill_(0.5)
    return model


def _spawn(*jobs: tuple) -> None:
    mp.spawn(_worker, args=(_free_port(), list(jobs)), nprocs=WORLD, join=True)


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "adapter_model.safetensors")


def _max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


@pytest.fixture(scope="module")
def base_cfg(tiny, tmp_path_factory) -> TrainConfig:
    data = tmp_path_factory.mktemp("data") / "train.json"
    # 37 records - 8 validation = 29 training: global batches of 4 leave a last batch of 1 row,
    # so rank 1 gets a ghost row at the epoch's end (step 4 of 5).
    data.write_text(json.dumps(_records(37)))
    return TrainConfig(model=str(tiny), k=2, data=str(data), rank=4, device="cpu", dtype="float32",
                       val_size=8, batch_size=4, grad_accum=2, max_steps=5, warmup_steps=0, lr=1e-2,
                       fisher_batches=3, log_every=1, eval_every=0, save_every=0, lora_dropout=0.0)


@pytest.fixture(scope="module")
def runs(base_cfg, tmp_path_factory) -> dict[str, Path]:
    """The one-process reference (batch 4) and 2-process DDP / FSDP2 runs (batch 2 each), plus
    distributed Fisher on 3 calibration batches (2 on rank 0, 1 on rank 1), in one spawn."""
    root = tmp_path_factory.mktemp("runs")
    out = {name: root / name for name in ("one", "ddp", "fsdp", "dropout")}
    main(replace(base_cfg, out=str(out["one"])))
    per_rank = replace(base_cfg, batch_size=base_cfg.batch_size // WORLD)
    _spawn(("fisher", base_cfg.model, 3, str(root / "fisher.pt")), ("shard", base_cfg.model, str(root / "shard")),
           ("ddp_step", base_cfg.model, str(root / "ddp_step")),
           ("train", replace(per_rank, distributed="ddp", out=str(out["ddp"])), -1, -1),
           ("train", replace(per_rank, distributed="fsdp", out=str(out["fsdp"])), -1, -1),
           ("train", replace(per_rank, distributed="ddp", lora_dropout=0.1, out=str(out["dropout"])), -1, -1))
    out["fisher"], out["shard"], out["ddp_step"] = root / "fisher.pt", root / "shard", root / "ddp_step"
    return out


@multiprocess
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_global_batch(runs, mode):
    one = json.loads((runs["one"] / "selection.json").read_text())
    two = json.loads((runs[mode] / "selection.json").read_text())
    assert two["selected"] == one["selected"]
    torch.testing.assert_close(torch.tensor(two["scores"]), torch.tensor(one["scores"]), rtol=1e-6, atol=0)
    assert two["calibration_sha256"] == one["calibration_sha256"]
    assert _max_rel_err(_adapter(runs[mode]), _adapter(runs["one"])) < 1e-5
    # the adapter moved (the comparison is not between two initialisations)
    assert min(float(t.abs().max()) for k, t in _adapter(runs[mode]).items() if "lora_A" in k) > 1e-3  # g·A, 0 at init
    # rank 0 alone wrote the log: one row per step, as in the one-process run, with the global
    # batch's loss, gradient norm (a gradient off by the world size would show here) and validation loss
    rows, ref = (MetricsLog.read(runs[m] / "metrics.jsonl") for m in (mode, "one"))
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for key in ("loss", "grad_norm", "val_loss"):
        torch.testing.assert_close(torch.tensor([r.get(key, 0.0) for r in rows]),
                                   torch.tensor([r.get(key, 0.0) for r in ref]), rtol=1e-5, atol=0)
    assert json.loads((runs[mode] / "train_config.json").read_text())["world_size"] == WORLD


@multiprocess
def test_fsdp_shards_the_base_and_keeps_the_adapters_whole(runs):
    for rank in range(WORLD):
        kinds = json.loads(Path(f"{runs['shard']}.rank{rank}").read_text())
        for name, (kind, local, full) in kinds.items():
            if ".lora_" in name:
                assert (kind, local) == ("Parameter", full), name
            else:  # dim-0 chunks: 2 ranks hold ceil / floor halves
                assert kind == "DTensor" and local in (-(-full // WORLD), full // WORLD), name
        assert sum(v[1] for k, v in kinds.items() if ".lora_" not in k) < \
            0.6 * sum(v[2] for k, v in kinds.items() if ".lora_" not in k)
        # error messages name the rank inside a group (train.py: error: rank 1: ...), not outside
        assert Path(f"{runs['shard']}.prefix{rank}").read_text() == f"rank {rank}: "
    assert rank_prefix() == ""


@multiprocess
def test_fsdp_step_gradient_equals_the_unsharded_model_on_the_whole_batch(runs, tiny):
    model = _adapted(tiny)
    batches = _calibration(WORLD)
    ids, labels = (torch.cat([b[key] for b in batches]) for key in ("input_ids", "labels"))
    total, n = causal_lm_loss(model(ids), labels)
    (total / n).backward()
    expected = [p.grad for p in model.parameters() if p.requires_grad]
    for rank in range(WORLD):
        got = torch.load(f"{runs['shard']}.grads{rank}", weights_only=True)
        assert len(got) == len(expected) == 15  # A, B and the gate of 5 modules
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


@multiprocess
def test_ddp_step_takes_the_supervised_position_loss_and_averages_gradients(runs, tiny):
    # each rank: DDP(CausalLMLoss(model)) on its own batch, CausalLM.forward (full logits) disabled
    losses, grads = [], []
    for rank in range(WORLD):
        model = _adapted(tiny)
        batch = _calibration(WORLD)[rank]
        total, n = causal_lm_loss(model(batch["input_ids"]), batch["labels"])
        (total / n).backward()
        losses.append((total.detach(), n))
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for rank in range(WORLD):
        got = torch.load(f"{runs['ddp_step']}.rank{rank}", weights_only=True)
        torch.testing.assert_close(got["loss"][0], losses[rank][0], rtol=1e-5, atol=0)
        assert int(got["loss"][1]) == int(losses[rank][1])
        for g, *per_rank in zip(got["grads"], *grads):  # DDP averages the ranks' gradients
            torch.testing.assert_close(g, sum(per_rank) / WORLD, rtol=1e-5, atol=1e-7)


@multiprocess
def test_distributed_fisher_equals_single_process(runs, tiny):
    expected = fisher_scores(load_model(tiny), _calibration(3))
    for rank in range(WORLD):
        got = torch.load(f"{runs['fisher']}.rank{rank}", weights_only=True)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@multiprocess
def test_a_rank_failing_leaves_the_checkpoint_and_the_run_resumes(runs, base_cfg, tmp_path):
    # with dropout: the resumed ranks must draw the masks of the uninterrupted run
    cfg = replace(base_cfg, batch_size=base_cfg.batch_size // WORLD, distributed="ddp", out=str(tmp_path / "run"),
                  save_every=2, lora_dropout=0.1)
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 fails at step 3"):
        _spawn(("train", cfg, 1, 3))
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.position.step == 2
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    _spawn(("train", replace(cfg, resume=str(tmp_path / "run")), -1, -1))
    torch.testing.assert_close(_adapter(tmp_path / "run"), _adapter(runs["dropout"]), rtol=1e-6, atol=1e-7)
    assert _max_rel_err(_adapter(runs["dropout"]), _adapter(runs["ddp"])) > 1e-4  # dropout did act
    # the global batch depends on the world size: resuming on another one is refused
    with pytest.raises(ValueError, match="world_size: 1 here vs 2 there"):
        main(replace(cfg, distributed=None, resume=str(tmp_path / "run")))


def test_distributed_without_torchrun_names_the_command(base_cfg, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match=r"--distributed ddp needs the environment torchrun sets .*"
                                         r"launch with: torchrun --nproc-per-node"):
        main(replace(base_cfg, distributed="ddp", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    assert "--rdzv-endpoint" in torchrun_hint("fsdp")


def test_bad_distributed_settings_are_refused(base_cfg):
    with pytest.raises(ValueError, match="unknown --distributed 'zero'; choose one of ddp, fsdp"):
        replace(base_cfg, distributed="zero")
    with pytest.raises(ValueError, match="--merge needs the whole base in one process"):
        replace(base_cfg, distributed="fsdp", merge=True)
    with pytest.raises(ValueError, match="unknown --distributed 'zero'; choose one of ddp, fsdp"):
        init_distributed("zero", "cpu")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shares_concatenate_to_the_batch_like_tensor_split(world):
    for rows in range(10):
        parts = [list(share(rows, r, world)) for r in range(world)]
        assert parts == [t.tolist() for t in torch.arange(rows).tensor_split(world)]


def test_rank_batches_split_each_global_batch_and_pad_empty_shares_with_a_ghost():
    examples = [{"input_ids": list(range(4, 4 + n)), "labels": list(range(4, 4 + n))} for n in (3, 5, 4, 6, 2)]
    glob = epoch_batches(examples, 4, 0, seed=1, pad_id=0)   # batches of 4 rows and 1 row
    ranks = [RankBatches(glob, r, 2) for r in range(2)]
    for k in range(len(glob)):
        whole = [row[m.bool()].tolist() for row, m in zip(glob[k]["input_ids"], glob[k]["attention_mask"])]
        parts = [[row[m.bool()].tolist() for row, m in zip(rb[k]["input_ids"], rb[k]["attention_mask"])]
                 for rb in ranks]
        if len(whole) >= 2:
            assert parts[0] + parts[1] == whole
        else:  # one row: rank 1 computes a ghost copy that carries no label
            assert parts[0] == whole and parts[1] == whole
            assert bool((ranks[1][k]["labels"] == IGNORE_INDEX).all())
            assert not bool((ranks[0][k]["labels"] == IGNORE_INDEX).all())
