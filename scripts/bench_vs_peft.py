#!/usr/bin/env python3
"""A fora training step against transformers + peft, measured side by side in one process.

Both sides get the same checkpoint (the packaged SmolLM2-135M by default: fora loads it with
``fora.load_model``, transformers loads the converted folder ``fora.resolve_checkpoint`` returns;
``--shape NAME`` builds a preset's shape with random weights instead, for machines without the
weights), the same batch (B x T random tokens, loss on the last ``--supervised`` tokens of each row,
as in instruction data), LoRA r = 32, α = 64 on q, k, v, up, down, and one full step each
(forward, backward, optimizer step, zero_grad):

  peft-all       transformers + peft, LoRA on every layer, AdamW
  fora-all       fora, LoRA on every layer, AdamW
  peft-k         peft with ``layers_to_transform`` = the upper K layers, AdamW
  fg-lora-k      fora, the same K layers, plain A, AdamW (FG-LoRA)
  fora-k         fora, the same K layers, Stiefel A, Cayley-Adam (FoRA)

and, on request (``--variants``), fora-all+ckpt (activation checkpointing per block) and
fora-all+compile (regional torch.compile of the blocks; its warm-up includes the compilation).

Timing: the variants live in one process and are stepped round-robin (one step of each in turn,
``--steps`` rounds after ``--warmup``), so load from other processes hits all of them alike; the
table gives the median step time. Memory: each variant is rebuilt in its own subprocess, stepped
``--warmup`` times (optimizer state exists), then one step is measured: on CUDA
``max_memory_allocated`` above the memory allocated before the step; on the CPU peak RSS above the
RSS before the step (VmHWM reset through /proc/self/clear_refs; ``MALLOC_MMAP_THRESHOLD_=65536`` so
freed tensors leave the process and RSS tracks live tensors). torch keeps no statistics for its
CPU allocator and tracemalloc does not see tensor storage, hence RSS. MFU (CUDA only) counts
4·N·T for the matmul weights N (a frozen-base LoRA step has no weight gradients: forward 2NT,
input gradients 2NT) plus 8·B·T²·(heads·head_dim)·L for attention scores and values.

    python scripts/bench_vs_peft.py                                   # SmolLM2-135M, CPU, fp32
    python scripts/bench_vs_peft.py --device cuda --shape llama-3.2-1b --batch 16 --seq 256
    python scripts/bench_vs_peft.py --variants fora-all fora-all+ckpt fora-all+compile
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench_fisher import SHAPES, _reset_peak_rss, _rss_bytes  # noqa: E402

VARIANTS = ("peft-all", "fora-all", "peft-k", "fg-lora-k", "fora-k")
# opt-in: fora-all with activation checkpointing per block / with regional torch.compile
EXTRA = ("fora-all+ckpt", "fora-all+compile")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense bf16


@dataclass(frozen=True)
class Config:
    checkpoint: str = "smollm2-135m"
    shape: str | None = None
    batch: int = 4
    seq: int = 128
    supervised: int = 32
    rank: int = 32
    k: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    steps: int = 10
    warmup: int = 3
    seed: int = 0
    variants: tuple[str, ...] = VARIANTS


def make_batch(cfg: Config, vocab: int, device: str | None = None) -> dict[str, torch.Tensor]:
    device = device or cfg.device
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, vocab, (cfg.batch, cfg.seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -cfg.supervised:] = ids[:, -cfg.supervised:]
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids, device=device)}


def hf_model(cfg: Config):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = getattr(torch, cfg.dtype)
    if cfg.shape is None:
        from fora.formats.hub import resolve_checkpoint
        return AutoModelForCausalLM.from_pretrained(resolve_checkpoint(cfg.checkpoint), dtype=dtype).to(cfg.device)
    torch.manual_seed(cfg.seed)
    fields = dict(SHAPES[cfg.shape], rms_norm_eps=1e-5)
    with torch.device(cfg.device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**fields), dtype=dtype)


def fora_model(cfg: Config):
    from fora.formats.loading import load_model
    from fora.models.config import ModelConfig
    from fora.models.decoder import CausalLM

    dtype = getattr(torch, cfg.dtype)
    if cfg.shape is None:
        return load_model(cfg.checkpoint, dtype=dtype, device=cfg.device)
    fields = dict(SHAPES[cfg.shape])
    fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                    "rms_norm_eps": 1e-5, **fields})
    with torch.device(cfg.device):
        model = CausalLM(config).to(dtype)
    model.load_state_dict(hf_model(cfg).state_dict())  # the same random weights as the peft side
    model.tie_weights()
    return model


def build(cfg: Config, variant: str):
    """(step function, model, batch, layers) of one variant; the step returns the loss tensor."""
    from fora.inject import DEFAULT_TARGETS, freeze_base, inject_lora
    from fora.optim import build_optimizers
    from fora.training.loop import autocast_context, forward_loss

    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    autocast = lambda: autocast_context(device, dtype)  # noqa: E731
    if variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        model = hf_model(cfg)
        L = model.config.num_hidden_layers
        k = cfg.k or L // 2
        layers = list(range(L)) if variant == "peft-all" else list(range(L - k, L))
        lcfg = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS),
                          layers_to_transform=None if variant == "peft-all" else layers, task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizers = [torch.optim.AdamW(params, lr=1e-4)]
        batch = make_batch(cfg, model.config.vocab_size)

        def loss_fn():
            with autocast():
                return model(**batch).loss
    else:
        from fora.models.speed import checkpoint_blocks, compile_blocks
        model = fora_model(cfg)
        L = model.config.num_hidden_layers
        k = cfg.k or L // 2
        layers = list(range(L)) if variant.startswith("fora-all") else list(range(L - k, L))
        stiefel = variant == "fora-k"
        inject_lora(model, layers, rank=cfg.rank, stiefel=stiefel, seed=cfg.seed)
        freeze_base(model)
        model.train()
        if variant.endswith("+ckpt"):
            checkpoint_blocks(model)
        if variant.endswith("+compile") and not compile_blocks(model, device):
            raise SystemExit("torch.compile does not work here; drop the +compile variant")
        optimizers = build_optimizers(model, lr=1e-4, stiefel=stiefel)
        # on the host, as the trainer keeps it: forward_loss moves the ids and reads labels and
        # padding from the CPU tensors without waiting for the device
        batch = make_batch(cfg, model.config.vocab_size, device="cpu")
        grad_from = min(layers)

        def loss_fn():
            total, count = forward_loss(model, batch, device, grad_from_layer=grad_from, autocast=autocast)
            return total / count

    def step() -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model, batch, layers


def sync(cfg: Config) -> None:
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()


def time_round_robin(cfg: Config) -> dict[str, dict]:
    built = {v: build(cfg, v) for v in cfg.variants}
    first = {}
    for v, (step, *_) in built.items():
        first[v] = float(step())  # same weights, same batch: the first losses must agree
    for _ in range(cfg.warmup - 1):
        for step, *_ in built.values():
            step()
    times: dict[str, list[float]] = {v: [] for v in built}
    for _ in range(cfg.steps):
        for v, (step, *_) in built.items():
            sync(cfg)
            t0 = time.perf_counter()
            step()
            sync(cfg)
            times[v].append(time.perf_counter() - t0)
    out = {}
    for v, (_, model, batch, layers) in built.items():
        out[v] = {"ms": [t * 1e3 for t in times[v]], "first_loss": first[v], "layers": len(layers),
                  "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "flops": step_flops(model, cfg)}
    return out


def step_flops(model, cfg: Config) -> float:
    """4·N·T (N: matmul weights incl. the LM head) + 8·B·T²·(heads·head_dim)·L (attention)."""
    conf = model.config
    emb = conf.vocab_size * conf.hidden_size
    n = sum(p.numel() for name, p in model.named_parameters()
            if p.ndim == 2 and "lora_" not in name and "embed_tokens" not in name)
    if getattr(conf, "tie_word_embeddings", False):
        n += emb  # the tied LM head is a matmul too
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    tokens = cfg.batch * cfg.seq
    return 4 * n * tokens + 8 * cfg.batch * cfg.seq ** 2 * conf.num_attention_heads * head_dim * conf.num_hidden_layers


def measure_memory(cfg: Config, variant: str) -> dict:
    """One variant, in this (fresh) process: peak working memory of one step after warm-up."""
    step, *_ = build(cfg, variant)
    for _ in range(cfg.warmup):
        step()
    sync(cfg)
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(cfg)
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "method": "max_memory_allocated"}
    if not _reset_peak_rss():
        return {"peak_mib": float("nan"), "method": "unavailable (no /proc/self/clear_refs)"}
    base = _rss_bytes("VmRSS") or 0
    step()
    return {"peak_mib": ((_rss_bytes("VmHWM") or 0) - base) / 2**20, "method": "VmHWM - VmRSS after clear_refs"}


def memory_all(cfg: Config) -> dict[str, dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = {}
    for v in cfg.variants:
        proc = subprocess.run([sys.executable, __file__, "--memory-child", v, "--config-json",
                               json.dumps(asdict(cfg)), "--threads", str(torch.get_num_threads())], env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory measurement of {v} failed:\n{proc.stderr[-4000:]}")
        out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def report(cfg: Config, timing: dict[str, dict], memory: dict[str, dict] | None) -> None:
    cuda = cfg.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    peak = next((t for key, t in PEAK_TFLOPS.items() if key in name), None) if cuda else None
    print(f"torch {torch.__version__} | {name} | {cfg.shape or cfg.checkpoint} ({'random weights' if cfg.shape else 'checkpoint'})"
          f" | {cfg.dtype} | {cfg.batch}x{cfg.seq} tokens, loss on the last {cfg.supervised} | r={cfg.rank}"
          f" | round-robin, median of {cfg.steps} after {cfg.warmup} warm-up")
    print(f"{'variant':>10} {'layers':>6} {'params':>11} {'first loss':>10} {'median ms':>10} {'min ms':>8}"
          f" {'tok/s':>8} {'peak MiB':>9} {'MFU':>6}")
    for v, r in timing.items():
        ms = statistics.median(r["ms"])
        mem = memory[v]["peak_mib"] if memory else float("nan")
        mfu = f"{r['flops'] / (ms / 1e3) / (peak * 1e12):.1%}" if peak else "-"
        print(f"{v:>10} {r['layers']:>6} {r['params']:>11,} {r['first_loss']:>10.5f} {ms:>10.1f} {min(r['ms']):>8.1f}"
              f" {cfg.batch * cfg.seq / (ms / 1e3):>8.0f} {mem:>9.1f} {mfu:>6}")
    if memory:
        print(f"memory: {next(iter(memory.values()))['method']} (peak of one step above the memory before it)")
    pairs = [("fora-all", "peft-all"), ("fg-lora-k", "peft-k"), ("fora-k", "peft-k"), ("fora-k", "fg-lora-k"),
             ("fora-all+ckpt", "fora-all"), ("fora-all+compile", "fora-all")]
    for a, b in pairs:
        if a in timing and b in timing:
            t = statistics.median(timing[a]["ms"]) / statistics.median(timing[b]["ms"])
            fastest = min(timing[a]["ms"]) / min(timing[b]["ms"])  # least disturbed by other load
            m = f", peak memory {memory[a]['peak_mib'] / memory[b]['peak_mib']:.3f}" if memory else ""
            print(f"ratio {a} / {b}: step time {t:.3f} (medians), {fastest:.3f} (fastest steps){m}")


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="smollm2-135m", help="preset name or folder (both sides)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random weights of this shape instead")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--supervised", type=int, default=32, help="loss on the last this many tokens of a row")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--k", type=int, default=None, help="adapted upper layers of the -k variants (default L/2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS + EXTRA, default=list(VARIANTS))
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    ap.add_argument("--memory-child", choices=VARIANTS + EXTRA, help=argparse.SUPPRESS)
    ap.add_argument("--config-json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.config_json:
        d = json.loads(a.config_json)
        return Config(**{**d, "variants": tuple(d["variants"])}), a
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    return Config(checkpoint=a.checkpoint, shape=a.shape, batch=a.batch, seq=a.seq, supervised=a.supervised,
                  rank=a.rank, k=a.k, device=a.device, dtype=dtype, steps=a.steps, warmup=a.warmup,
                  seed=a.seed, variants=tuple(a.variants)), a


def main(argv: list[str] | None = None) -> None:
    cfg, a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_child:
        print(json.dumps(measure_memory(cfg, a.memory_child)))
        return
    memory = None if a.no_memory else memory_all(cfg)
    timing = time_round_robin(cfg)
    report(cfg, timing, memory)


if __name__ == "__main__":
    main()
