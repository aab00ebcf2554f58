"""Peak memory of Fisher scoring (Eq. 2) vs a naive full-.grad Fisher and vs one LoRA training step.

Each measurement runs in its own subprocess on an identical random model and batch, so one
measurement's allocator state cannot leak into the next:

* CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated just before the measured
  call (peak stats reset there).
* CPU: peak RSS minus the RSS just before the measured call. The kernel's high-water mark
  (``VmHWM``) is reset by writing 5 to ``/proc/self/clear_refs`` (Linux >= 4.0); without that it
  falls back to ``resource.getrusage(...).ru_maxrss`` (then the setup peak may hide a smaller
  measurement). ``MALLOC_MMAP_THRESHOLD_=65536`` is set so freed tensors go back to the OS and RSS
  tracks live memory rather than glibc's free lists.

"Above setup" excludes the model weights, the batch and (for the LoRA step) the adapters
themselves, i.e. it is the working memory of the call: activations, gradients, optimizer state.

    python scripts/bench_fisher.py                     # tiny LLaMA-ish model on CPU, < 1 min
    python scripts/bench_fisher.py --device cuda --shape llama-3.2-1b --seq 256 --batch 4
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# LLaMA-ish shapes (random weights): name -> config.json fields
SHAPES = {
    "tiny": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
MODES = ("fisher", "naive", "lora_step")


@dataclass(frozen=True)
class BenchConfig:
    shape: str = "tiny"
    layers: int | None = None
    batch: int = 2
    seq: int = 128
    rank: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0


def build(cfg: BenchConfig):
    from fora.models.config import ModelConfig
    from fora.models.decoder import CausalLM

    fields = dict(SHAPES[cfg.shape])
    if cfg.layers is not None:
        fields["num_hidden_layers"] = cfg.layers
    fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                    "rms_norm_eps": 1e-5, **fields})
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):  # random init directly on the device (fast for 1B shapes on CUDA)
        model = CausalLM(config)
    model = model.to(dtype=getattr(torch, cfg.dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, config.vocab_size, (cfg.batch, cfg.seq), generator=g)
    labels = ids.clone()
    labels[:, : cfg.seq // 4] = -100  # a prompt, as in instruction data
    batch = {"input_ids": ids.to(cfg.device), "labels": labels.to(cfg.device),
             "attention_mask": torch.ones_like(ids, device=cfg.device)}
    return model, batch


def naive_fisher(model, batch) -> torch.Tensor:
    """Eq. (2) the obvious way: every block parameter's .grad is held at once, then summed."""
    from fora.fisher import batch_loss

    layers = model.model.layers
    for p in layers.parameters():
        p.requires_grad_(True)
    batch_loss(model, batch, batch["input_ids"].device).backward()
    return torch.stack([sum(p.grad.float().pow(2).sum() for p in layer.parameters()) for layer in layers]).double().cpu()


def lora_step(model, batch, optimizers) -> None:
    """One LoRA training step: forward, backward, optimizer step (lazy optimizer state is created here)."""
    from fora.fisher import batch_loss

    batch_loss(model, batch, batch["input_ids"].device).backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(mode: str, cfg: BenchConfig) -> dict:
    """Build, set up, then measure one call; returns {mode, peak_bytes, seconds, method, ...}."""
    from fora.fisher import fisher_scores
    from fora.inject import freeze_base, inject_lora
    from fora.optim import build_optimizers

    model, batch = build(cfg)
    # Warm-up outside the measured window: kernels, thread pools, the autograd engine.
    with torch.no_grad():
        model(batch["input_ids"][:1, :8])
    torch.ones(2, device=cfg.device, requires_grad=True).sum().backward()
    optimizers = None
    if mode == "lora_step":  # the adapters and optimizer objects are setup; their state is not
        inject_lora(model, range(len(model.model.layers)), rank=cfg.rank, seed=cfg.seed)
        freeze_base(model)
        optimizers = build_optimizers(model, lr=1e-4)  # CayleyAdam(A) + AdamW(B), as in training
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    else:
        reset = _reset_peak_rss()
        base = _rss_bytes("VmRSS") or 0
        method = "VmHWM after clear_refs" if reset else "ru_maxrss (no peak reset)"
        ru_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = None
    if mode == "fisher":
        out = fisher_scores(model, [batch])
    elif mode == "naive":
        out = naive_fisher(model, batch)
    else:
        lora_step(model, batch, optimizers)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    elif reset:
        peak = (_rss_bytes("VmHWM") or 0) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(ru_base, base)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"mode": mode, "peak_bytes": int(peak), "seconds": seconds, "method": method,
            "weight_bytes": weights, "scores": None if out is None else out.tolist()}


def run(cfg: BenchConfig) -> dict[str, dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      env.get("PYTHONPATH")]))
    results = {}
    for mode in MODES:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode,
                               "--config-json", json.dumps(asdict(cfg))],
                              env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"measurement {mode!r} failed:\n{proc.stderr[-4000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--config-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, BenchConfig(**json.loads(args.config_json)))))
        return
    cfg = BenchConfig(shape=args.shape, layers=args.layers, batch=args.batch, seq=args.seq, rank=args.rank,
                      device=args.device, dtype=args.dtype, seed=args.seed)
    res = run(cfg)
    mib = 2.0 ** 20
    print(f"config: {asdict(cfg)}")
    print(f"method: {res['fisher']['method']} (peak above setup; weights {res['fisher']['weight_bytes'] / mib:.1f} MiB)")
    for mode in MODES:
        print(f"  {mode:10s} peak {res[mode]['peak_bytes'] / mib:9.1f} MiB   {res[mode]['seconds']:7.2f} s")
    f, n, s = (res[m]["peak_bytes"] for m in MODES)
    print(f"ratio fisher / lora_step = {f / s:.3f}")
    print(f"ratio fisher / naive     = {f / n:.3f}")
    a, b = torch.tensor(res["fisher"]["scores"]), torch.tensor(res["naive"]["scores"])
    print(f"max relative difference fisher vs naive scores = {float(((a - b).abs() / b.abs()).max()):.2e}")


if __name__ == "__main__":
    main()
