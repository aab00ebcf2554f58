#!/usr/bin/env python3
"""What a FoRA training step costs against LoRA on every layer, measured side by side in one run.

On one random model of a real checkpoint's shape and one batch, each variant is a full training
step (forward, backward, optimizer step) and reports the median step time, tokens/s, peak memory
above the weights, and trainable parameters:

  lora-all            LoRA on all L layers, AdamW (the paper's LoRA baseline)
  stiefel-lora        LoRA on all L layers, Stiefel A with Cayley-Adam
  fora                K = L/2 layers, Stiefel A with Cayley-Adam, no autograd below the lowest
                      adapted layer (`grad_from_layer`, as scripts/train.py runs it)
  fora-full-backward  the same adapters, backward through every layer (isolates grad_from_layer)

The K layers are seeded-random (`--placement random`) or the upper half (`--placement upper`):
the saving of `grad_from_layer` depends on where the lowest selected layer sits, and Fisher scores
of random weights mean nothing. Ratios are against lora-all.

    python scripts/bench_train.py --device cuda --shape llama-3.2-1b --batch 16 --seq 256
    python scripts/bench_train.py                      # tiny model on CPU, under a minute
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_fisher import SHAPES, BenchConfig, build  # noqa: E402  (same random models)

VARIANTS = ("lora-all", "stiefel-lora", "fora", "fora-full-backward")


@dataclass(frozen=True)
class TrainBenchConfig:
    shape: str = "tiny"
    batch: int = 4
    seq: int = 128
    rank: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    placement: str = "random"
    steps: int = 10
    warmup: int = 3
    seed: int = 0


def pick_layers(num_layers: int, placement: str, seed: int) -> list[int]:
    k = num_layers // 2
    if placement == "upper":
        return list(range(num_layers - k, num_layers))
    return sorted(random.Random(seed).sample(range(num_layers), k))


def run_variant(cfg: TrainBenchConfig, variant: str) -> dict:
    from fora.inject import count_trainable, freeze_base, inject_lora
    from fora.optim import build_optimizers

    model, batch = build(BenchConfig(shape=cfg.shape, batch=cfg.batch, seq=cfg.seq, rank=cfg.rank,
                                     device=cfg.device, dtype=cfg.dtype, seed=cfg.seed))
    num_layers = model.config.num_hidden_layers
    layers = list(range(num_layers)) if variant in ("lora-all", "stiefel-lora") else \
        pick_layers(num_layers, cfg.placement, cfg.seed)
    stiefel = variant != "lora-all"
    inject_lora(model, layers, rank=cfg.rank, stiefel=stiefel, seed=cfg.seed)
    freeze_base(model)
    model.to(cfg.device).train()
    optimizers = build_optimizers(model, lr=1e-4, stiefel=stiefel)
    grad_from = min(layers) if variant == "fora" else 0
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = batch["labels"].cpu()  # as the trainer keeps them: supervised positions found without a sync
    cuda = cfg.device.startswith("cuda")

    def step() -> None:
        total, count = model.loss(ids, labels, mask, grad_from_layer=grad_from)  # logits at supervised positions only
        (total / count).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(cfg.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    result = {"variant": variant, "layers": len(layers), "lowest": min(layers), "ms": ms,
              "tok_s": cfg.batch * cfg.seq / (ms / 1e3), "peak_mib": peak, "params": count_trainable(model)}
    return result


def main(cfg: TrainBenchConfig) -> list[dict]:
    print(f"torch {torch.__version__} | device {torch.cuda.get_device_name() if cfg.device.startswith('cuda') else 'cpu'}"
          f" | shape {cfg.shape} | {cfg.batch}x{cfg.seq} tokens | {cfg.dtype} base, fp32 adapters, r={cfg.rank}"
          f" | placement {cfg.placement} | median of {cfg.steps} steps after {cfg.warmup} warm-up")
    rows = []
    for variant in VARIANTS:
        rows.append(run_variant(cfg, variant))
        if cfg.device.startswith("cuda"):  # the variant's model is gone with its frame: hand its memory back
            torch.cuda.empty_cache()
    ref = rows[0]
    print(f"{'variant':>20} {'layers':>6} {'lowest':>6} {'step ms':>9} {'tok/s':>9} {'peak MiB':>9} "
          f"{'params':>11} {'time/lora-all':>13} {'mem/lora-all':>12}")
    for r in rows:
        print(f"{r['variant']:>20} {r['layers']:>6} {r['lowest']:>6} {r['ms']:>9.2f} {r['tok_s']:>9.0f} "
              f"{r['peak_mib']:>9.1f} {r['params']:>11,} {r['ms'] / ref['ms']:>13.3f} "
              f"{r['peak_mib'] / ref['peak_mib']:>12.3f}")
    return rows


def parse_args(argv: list[str] | None = None) -> TrainBenchConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="base weights; default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--placement", choices=("random", "upper"), default="random")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    return TrainBenchConfig(shape=a.shape, batch=a.batch, seq=a.seq, rank=a.rank, device=a.device, dtype=dtype,
                            placement=a.placement, steps=a.steps, warmup=a.warmup, seed=a.seed)


if __name__ == "__main__":
    main(parse_args())
