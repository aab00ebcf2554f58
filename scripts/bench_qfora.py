"""QFoRA vs FoRA: bytes per base parameter, peak training memory and step time, side by side.

Both variants run in their own subprocess on the same random model of a LLaMA shape (from
`bench_fisher.SHAPES`), the same batch and the same K adapted layers (the upper half: Fisher's
choice does not change memory or time much, and scoring a 1B model is not what is measured here):

* fora:  float32 base (the trainer's CPU default; `--dtype bfloat16` for the CUDA setting);
* qfora: every block linear as an NF4Linear (4-bit NormalFloat, double-quantized constants),
  embedding / norms / LM head as in fora.

Per variant: the bytes of the base weights (block linears alone, and the whole model), and over
`--steps` timed training steps after one warm-up step (forward, backward from the lowest adapted
layer, Cayley-Adam + AdamW): the median step time (CUDA: wall clock; CPU: process CPU time with
one thread, because a shared CPU's wall clock mostly measures waiting for a core), and the peak memory of the process (CPU: VmHWM
after a reset just before the warm-up step, so the model-building transient is excluded and
weights + activations + gradients + optimizer state are included; CUDA: max_memory_allocated).

    python scripts/bench_qfora.py                                 # tiny shape, seconds
    python scripts/bench_qfora.py --shape llama-3.2-1b --batch 1 --seq 64 --steps 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fisher import SHAPES, BenchConfig, _reset_peak_rss, _rss_bytes, build  # noqa: E402

VARIANTS = ("fora", "qfora")


def quantize_blocks(model: torch.nn.Module) -> None:
    """Replace every block nn.Linear by its NF4Linear, one at a time (the float weight is freed)."""
    from fora.quant.nf4 import NF4Linear

    for layer in model.model.layers:
        for name, m in list(layer.named_modules()):
            if isinstance(m, torch.nn.Linear):
                parent, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, leaf, NF4Linear.from_linear(m))


def base_bytes(model: torch.nn.Module) -> dict[str, float]:
    """Bytes of the base weights: block linears (per parameter) and the whole model."""
    from fora.quant.nf4 import NF4Linear

    linear_bytes, linear_params = 0, 0
    for layer in model.model.layers:
        for m in layer.modules():
            if isinstance(m, NF4Linear):
                linear_bytes += m.storage_bytes()
                linear_params += m.in_features * m.out_features
            elif isinstance(m, torch.nn.Linear):
                linear_bytes += m.weight.numel() * m.weight.element_size()
                linear_params += m.weight.numel()
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not ("layers." in n and n.endswith("_proj.weight")))
    return {"linear_bytes": linear_bytes, "linear_params": linear_params,
            "bytes_per_linear_param": linear_bytes / linear_params, "model_bytes": linear_bytes + rest}


def child(variant: str, cfg: BenchConfig, k: int, steps: int) -> dict:
    from fora.inject import freeze_base, inject_lora
    from fora.optim import build_optimizers
    from fora.training.loop import forward_loss

    if cfg.device == "cpu":
        torch.set_num_threads(1)
    model, batch = build(cfg)
    if variant == "qfora":
        quantize_blocks(model)
    sizes = base_bytes(model)
    n_layers = len(model.model.layers)
    layers = list(range(n_layers - k, n_layers))
    inject_lora(model, layers, rank=cfg.rank, seed=cfg.seed)
    freeze_base(model)
    model.train()
    optimizers = build_optimizers(model, lr=1e-4)
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        total, count = forward_loss(model, batch, device, grad_from_layer=min(layers))
        (total / count).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    step()  # warm-up: creates the optimizer state
    walls, cpus = zip(*[step() for _ in range(steps)])
    peak = torch.cuda.max_memory_allocated() if cuda else (_rss_bytes("VmHWM") or 0)
    # On a shared CPU the wall clock counts time spent waiting for a core; with one thread the
    # process CPU time is the work done, so the CPU ratio is taken on that.
    seconds = statistics.median(walls if cuda else cpus)
    return {"variant": variant, "peak_bytes": int(peak), "step_seconds": seconds,
            "times": list(walls if cuda else cpus), **sizes, "method": "max_memory_allocated" if cuda else "VmHWM (process peak)"}


def run(cfg: BenchConfig, k: int, steps: int) -> dict[str, dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = {}
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant, "--k", str(k),
                               "--steps", str(steps), "--config-json", json.dumps(asdict(cfg))],
                              env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"variant {variant!r} failed:\n{proc.stderr[-4000:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--k", type=int, default=None, help="adapted layers (the upper K); default L/2")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--config-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        cfg = BenchConfig(**json.loads(args.config_json))
        print(json.dumps(child(args.child, cfg, args.k, args.steps)))
        return
    cfg = BenchConfig(shape=args.shape, batch=args.batch, seq=args.seq, rank=args.rank, device=args.device,
                      dtype=args.dtype)
    k = args.k or SHAPES[cfg.shape]["num_hidden_layers"] // 2
    res = run(replace(cfg), k, args.steps)
    mib = 2.0 ** 20
    clock = "wall clock" if cfg.device.startswith("cuda") else "process CPU time, 1 thread"
    print(f"config: {asdict(cfg)}, K = {k} (upper layers), {args.steps} timed steps ({clock}); "
          f"peak: {res['fora']['method']}")
    for v in VARIANTS:
        r = res[v]
        print(f"  {v:6s} block-linear bytes/param {r['bytes_per_linear_param']:.4f}  model weights "
              f"{r['model_bytes'] / mib:9.1f} MiB  peak {r['peak_bytes'] / mib:9.1f} MiB  "
              f"step {r['step_seconds']:8.3f} s  (steps {', '.join(f'{t:.3f}' for t in r['times'])})")
    f, q = res["fora"], res["qfora"]
    print(f"ratio qfora / fora: peak memory {q['peak_bytes'] / f['peak_bytes']:.3f}, "
          f"step time {q['step_seconds'] / f['step_seconds']:.3f}, "
          f"block-linear bytes {q['linear_bytes'] / f['linear_bytes']:.4f}")


if __name__ == "__main__":
    main()
