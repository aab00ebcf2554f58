"""What a Cayley-Adam step costs: one step on a (d, r) LoRA B (FoRA's factor) against one AdamW step
on the same tensor, and against the LoRA layer's forward + backward on a training batch (16 x 256 tokens).

    python scripts/bench_cayley.py                 # CPU, adapter path only (~1-2 min on 2 cores)
    python scripts/bench_cayley.py --quick         # d in {2048, 4096}, r in {16, 32}
    python scripts/bench_cayley.py --device cuda   # also the full layer (frozen bf16 d x d base)

Columns (median of --repeats timed calls after --warmup, synchronised on CUDA):
  cayley               CayleyAdam.step, the authors' rule (5 fixed-point sweeps, alpha = min(lr, 1/||W||_1))
  cayley_cf            the same with the closed-form Cayley step
  cayley_a             the ablation's rule on an (r, d) A (closed form, Frobenius cap)
  adamw                torch.optim.AdamW.step on the same (d, r) tensor
  adapter_fb           forward + backward of s (x Aᵀ) Bᵀ, x: (tokens, d), grads for x, A, B
  layer_fb             LoRALinear d -> d forward + backward, frozen base in --base-dtype
Then one optimizer step over all B's of LLaMA-3.2-1B at r = 32 (16 layers x 5 targets: q and
down (2048, 32), k and v (512, 32), up (8192, 32)): CayleyAdam (same-shape B's batched) vs AdamW.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fora.cayley_adam import CayleyAdam  # noqa: E402
from fora.lora import LoRALinear  # noqa: E402
from fora.stiefel import random_stiefel  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cpu"
    dims: tuple[int, ...] = (2048, 4096, 8192, 14336)
    ranks: tuple[int, ...] = (16, 32, 64)
    batch: int = 16
    seq_len: int = 256
    warmup: int = 2
    repeats: int = 7
    full_layer: bool = False
    base_dtype: str = "bfloat16"
    threads: int | None = None


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--full-layer", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the whole LoRALinear with its d x d base (default: on for cuda)")
    p.add_argument("--base-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="d in {2048, 4096}, r in {16, 32}, 3 repeats")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda given but torch sees no CUDA device; run on a GPU machine or drop it")
    cuda = a.device.startswith("cuda")
    return BenchConfig(
        device=a.device,
        dims=tuple(a.dims or ((2048, 4096) if a.quick else BenchConfig.dims)),
        ranks=tuple(a.ranks or ((16, 32) if a.quick else BenchConfig.ranks)),
        batch=a.batch, seq_len=a.seq_len,
        warmup=a.warmup if a.warmup is not None else (10 if cuda else 2),
        repeats=a.repeats if a.repeats is not None else (3 if a.quick else (50 if cuda else 7)),
        full_layer=cuda if a.full_layer is None else a.full_layer,
        base_dtype=a.base_dtype, threads=a.threads,
    )


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in seconds, synchronising the device around every call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_timer(opt_cls, p: nn.Parameter, grad: torch.Tensor, **kw) -> Callable[[], None]:
    p.grad = grad
    opt = opt_cls([p], **kw)
    return opt.step


def bench_one(cfg: BenchConfig, d: int, r: int) -> dict[str, float]:
    dev = torch.device(cfg.device)
    g = torch.Generator().manual_seed(d * 1000 + r)
    B0 = random_stiefel(d, r, generator=g).to(dev)
    grad = torch.randn(d, r, generator=g).to(dev)
    t = lambda fn: median_time(fn, dev, cfg.warmup, cfg.repeats)  # noqa: E731
    out = {
        # lr small enough that thousands of timed steps stay orthonormal (the check at step 1 only).
        "cayley": t(step_timer(CayleyAdam, nn.Parameter(B0.clone()), grad, lr=1e-3)),
        "cayley_cf": t(step_timer(CayleyAdam, nn.Parameter(B0.clone()), grad, lr=1e-3, solver="closed_form")),
        "cayley_a": t(step_timer(CayleyAdam, nn.Parameter(B0.mT.contiguous()), grad.mT.contiguous(), lr=1e-3,
                                 solver="closed_form", iters=2, step_cap=0.5)),
        "adamw": t(step_timer(torch.optim.AdamW, nn.Parameter(B0.clone()), grad, lr=1e-3)),
    }
    A0 = torch.randn(r, d, generator=g).to(dev) / r ** 0.5
    tokens = cfg.batch * cfg.seq_len
    x = torch.randn(tokens, d, device=dev, requires_grad=True)
    A = nn.Parameter(A0.clone())
    B = nn.Parameter(torch.randn(d, r, device=dev) * 0.01)
    gy = torch.randn(tokens, d, device=dev)

    def adapter_fb() -> None:
        y = 2.0 * ((x @ A.T) @ B.T)
        y.backward(gy)
    out["adapter_fb"] = t(adapter_fb)
    del x, gy
    if cfg.full_layer:
        dtype = getattr(torch, cfg.base_dtype)
        layer = LoRALinear(nn.Linear(d, d, bias=False, device=dev, dtype=dtype), r, 2 * r, init="stiefel_b")
        xb = torch.randn(tokens, d, device=dev, dtype=dtype, requires_grad=True)
        gb = torch.randn(tokens, d, device=dev, dtype=dtype)
        out["layer_fb"] = t(lambda: layer(xb).backward(gb))
        del layer, xb, gb
    return out


def bench_model(cfg: BenchConfig, r: int = 32) -> dict[str, float]:
    """One step over every B of a LLaMA-3.2-1B adapter (hidden 2048, KV 512, intermediate 8192)."""
    dev = torch.device(cfg.device)
    g = torch.Generator().manual_seed(0)
    shapes = [(2048, r), (512, r), (512, r), (8192, r), (2048, r)] * 16   # q, k, v, up, down: (d_out, r)
    t = lambda fn: median_time(fn, dev, cfg.warmup, cfg.repeats)  # noqa: E731
    out = {}
    for name, cls, kw in [("cayley", CayleyAdam, dict(lr=1e-3)),
                          ("adamw", torch.optim.AdamW, dict(lr=1e-3))]:
        ps = [nn.Parameter(random_stiefel(n, k, generator=g).to(dev)) for n, k in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dev)
        out[name] = t(cls(ps, **kw).step)
    return out


def main(cfg: BenchConfig) -> list[dict[str, float]]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} | device {name} | tokens {cfg.batch}x{cfg.seq_len} | "
          f"median of {cfg.repeats} after {cfg.warmup} warmup | params fp32"
          + (f", layer base {cfg.base_dtype}" if cfg.full_layer else ""))
    cols = ["cayley", "cayley_cf", "cayley_a", "adamw", "adapter_fb"] + (["layer_fb"] if cfg.full_layer else [])
    header = f"{'d':>6} {'r':>3} " + " ".join(f"{c + ' ms':>13}" for c in cols)
    header += f" {'cayley/adamw':>13} {'cayley/adapt':>13}" + (f" {'cayley/layer':>13}" if cfg.full_layer else "")
    print(header)
    rows = []
    for d in cfg.dims:
        for r in cfg.ranks:
            res = bench_one(cfg, d, r)
            rows.append({"d": d, "r": r, **res})
            line = f"{d:>6} {r:>3} " + " ".join(f"{1e3 * res[c]:>13.3f}" for c in cols)
            line += f" {res['cayley'] / res['adamw']:>13.2f} {res['cayley'] / res['adapter_fb']:>13.3f}"
            if cfg.full_layer:
                line += f" {res['cayley'] / res['layer_fb']:>13.3f}"
            print(line, flush=True)
    m = bench_model(cfg)
    print(f"all 80 B's of LLaMA-3.2-1B, r=32: cayley {1e3 * m['cayley']:.3f} ms, adamw {1e3 * m['adamw']:.3f} ms; "
          f"cayley/adamw {m['cayley'] / m['adamw']:.2f}")
    rows.append({"d": 0, "r": 32, **m})
    return rows


if __name__ == "__main__":
    main(parse_args())
