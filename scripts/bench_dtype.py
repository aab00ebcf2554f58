#!/usr/bin/env python
"""One training step's forward and backward in float32 and in bfloat16, side by side in one run.

Whether bfloat16 pays on a CPU depends on the CPU: with native bf16 instructions (AVX512-BF16,
AMX) it is the faster dtype, without them (AVX2 only) torch may fall back to much slower kernels.
This measures the machine at hand on a real checkpoint, LoRA on every layer (r = 32, targets
q, k, v, up, down), so `--dtype` for a long CPU run is chosen from a figure, not a guess:

    python scripts/bench_dtype.py --model gemma-3-270m --batch 4 --seq 64 --repeats 1

Prints each dtype's seconds per forward + backward (the best of --repeats after one warm-up) and
the ratio bfloat16 / float32.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fora.formats.hub import resolve_checkpoint  # noqa: E402
from fora.formats.loading import load_model  # noqa: E402
from fora.inject import freeze_base, inject_lora  # noqa: E402
from fora.models.paths import decoder_layers  # noqa: E402


def step_seconds(folder: Path, dtype: torch.dtype, batch: int, seq: int, repeats: int, seed: int) -> float:
    """The best time of `repeats` forward + backward passes (after one warm-up) in `dtype`."""
    model = load_model(folder, dtype=dtype)
    inject_lora(model, list(range(len(decoder_layers(model)))), rank=32, stiefel=False, seed=seed)
    freeze_base(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq - 8] = -100  # the answer's tokens only, as in instruction data
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        total, count = model.loss(ids, labels, None)
        (total / count).backward()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return min(times[1:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="preset, hub id, folder or .gguf file")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the long runs use one per arm)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = resolve_checkpoint(args.model)
    print(f"{args.model}: LoRA r=32 on every layer, batch {args.batch} x {args.seq} tokens, "
          f"{args.threads} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    seconds = {}
    for name in ("float32", "bfloat16"):
        seconds[name] = step_seconds(folder, getattr(torch, name), args.batch, args.seq, args.repeats, args.seed)
        print(f"{name:>9}: {seconds[name]:.2f} s per forward + backward", flush=True)
    print(f"bfloat16 / float32 = {seconds['bfloat16'] / seconds['float32']:.2f}")


if __name__ == "__main__":
    main()
