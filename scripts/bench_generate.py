#!/usr/bin/env python3
"""Greedy decoding with vs without the KV cache, side by side on one model in one run.

Both variants decode the same left-padded batch of prompts for the same number of new tokens (no
EOS stop, so the work is identical) and must return the same tokens; the script prints the median
seconds of `--repeats` runs of each, tokens per second and the ratio. The prompts are what
scripts/eval.py feeds the model: Alpaca prompts of the built-in arithmetic task (~80 tokens).

    python scripts/bench_generate.py                                  # smollm2-135m on the CPU
    python scripts/bench_generate.py --model gemma-3-270m --new 64 --batch 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing



def main(argv: list[str] | None = None) -> dict:
    import torch

    from fora.formats.loading import load_model, load_tokenizer
    from fora.training.data import build_prompt
    from fora.training.tasks import arithmetic_task

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new", type=int, default=32, help="new tokens per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, device=a.device), load_tokenizer(a.model)
    prompts = [tok.encode(build_prompt(r)) for r in arithmetic_task(a.batch, seed=1)]
    T = max(map(len, prompts))
    device = next(model.parameters()).device
    ids = torch.tensor([[tok.pad_id] * (T - len(q)) + q for q in prompts], device=device)
    mask = torch.tensor([[0] * (T - len(q)) + [1] * len(q) for q in prompts], device=device)

    def run(use_cache: bool) -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, mask, max_new_tokens=a.new, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    run(True)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    outs = {}
    for _ in range(a.repeats):  # interleaved, so machine load hits both alike
        for use_cache in (True, False):
            s, outs[use_cache] = run(use_cache)
            times[use_cache].append(s)
    same = torch.equal(outs[True], outs[False])
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tokens = a.batch * outs[True].shape[1]
    print(f"{a.model} on {device} ({torch.get_num_threads()} threads), batch {a.batch}, prompt <= {T} tokens, "
          f"{outs[True].shape[1]} new tokens per row, median of {a.repeats}")
    for k, name in ((True, "KV cache"), (False, "no cache")):
        print(f"  {name:<9} {med[k]:7.3f} s  {n_tokens / med[k]:7.1f} tokens/s")
    print(f"  speed-up with the cache: {med[False] / med[True]:.2f}x; identical tokens: {same}")
    return {"seconds": med, "same": same, "speedup": med[False] / med[True]}


if __name__ == "__main__":
    main()
