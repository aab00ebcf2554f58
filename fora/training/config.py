"""The training run's configuration: a frozen dataclass and the argparse CLI that fills it.

Defaults are the paper's settings (PAPER.md §3: r = 32, batch 16, sequence length 256, 3 epochs,
targets q,k,v,up,down) and LLM-Adapters' recipe where the paper is silent (α = 2r, LoRA dropout
0.05, 100 warmup steps, 120 validation records, linear decay). The README's quick CPU run passes
small explicit flags instead of relying on different defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fora.inject import DEFAULT_TARGETS
from fora.training.data import TEMPLATES
from fora.training.methods import METHODS

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("linear", "cosine", "constant")
# Fields that do not change the trajectory: they may differ between a run and its --resume.
RESUMABLE_FIELDS = frozenset({"out", "resume", "merge", "log_every", "eval_every", "save_every", "device",
                              "activation_checkpointing"})


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of one training run (see `build_parser` for what each one means)."""

    model: str
    k: int | None = None
    method: str = "fora"
    data: str | None = None
    task_size: int = 2000
    out: str | None = None
    rank: int = 32
    alpha: float | None = None
    lora_dropout: float = 0.05
    rslora: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 3e-4
    stiefel_lr: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    epochs: int = 3
    max_steps: int | None = None
    cutoff_len: int = 256
    template: str = "alpaca"
    fisher_batches: int = 8
    fisher_params: str = "block"
    qr_every: int = 100
    warmup_steps: int = 100
    schedule: str = "linear"
    val_size: int = 120
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    save_every: int = 200
    resume: str | None = None
    merge: bool = False
    log_every: int = 10
    eval_every: int = 100
    compile: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        positive = ("rank", "batch_size", "grad_accum", "cutoff_len", "fisher_batches", "task_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "qr_every", "warmup_steps", "val_size", "save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}; omit it to train --epochs")
        if self.max_steps is None and self.epochs < 1:
            raise ValueError("--epochs 0 trains nothing; pass --epochs >= 1 or --max-steps")
        if not self.lr > 0 or (self.stiefel_lr is not None and not self.stiefel_lr > 0):
            raise ValueError(f"learning rates must be > 0, got --lr {self.lr}, --stiefel-lr {self.stiefel_lr}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown --schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown --template {self.template!r}; choose one of {', '.join(sorted(TEMPLATES))}")
        if not self.targets:
            raise ValueError("--targets is empty; pass e.g. q_proj,k_proj,v_proj,up_proj,down_proj")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys raise (a config from another fora version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown train-config keys {unknown}; the file was written by another "
                             "fora version - start a fresh run")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)

    def trajectory_diff(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Fields that differ and change the training trajectory: {name: (self, other)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in RESUMABLE_FIELDS and a[k] != b[k]}


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("--targets needs a comma list such as q_proj,v_proj")
    return names


def _method_help() -> str:
    return "; ".join(f"{name}: {spec.description}" for name, spec in METHODS.items())


def build_parser() -> argparse.ArgumentParser:
    """The `scripts/train.py` command line (every flag maps to a `TrainConfig` field)."""
    d = TrainConfig(model="-")
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune a decoder LLM with FoRA (Fisher-selected layers, Stiefel-constrained "
                    "LoRA) or one of its ablations; writes a PEFT LoRA adapter to --out.")
    a = p.add_argument
    a("--model", required=True, help="preset name (e.g. smollm2-135m), hub repo id, local folder or .gguf file")
    a("--k", type=int, default=d.k, help="number of layers to adapt for the top-K methods; default L/2")
    a("--method", choices=list(METHODS), default=d.method, help=_method_help())
    a("--data", default=d.data, help="training records: .json/.jsonl file (Alpaca / LLM-Adapters "
      "format) or hub dataset 'owner/name[:file]'; default: the generated arithmetic task")
    a("--task-size", type=int, default=d.task_size, help="records generated for the built-in task (no --data)")
    a("--out", default=d.out, help="output folder; default runs/<model>-<method>-k<K>")
    a("--rank", type=int, default=d.rank, help="LoRA rank r (lora-half-rank uses r/2)")
    a("--alpha", type=float, default=d.alpha, help="LoRA alpha; default 2 * rank (scale s = alpha / r = 2)")
    a("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the adapter input")
    a("--rslora", action="store_true", help="rank-stabilised scale alpha / sqrt(r)")
    a("--targets", type=_targets, default=",".join(d.targets), help="comma list of projections to adapt per layer")
    a("--lr", type=float, default=d.lr, help="AdamW learning rate (B, and A for the plain-LoRA methods)")
    a("--stiefel-lr", type=float, default=d.stiefel_lr, help="Cayley-Adam step length for A on the "
      "Stiefel methods; default lr * sqrt(r * d_in) per A (same Frobenius step as AdamW on a plain A)")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (never on Stiefel A)")
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the global grad norm of all "
      "adapter parameters (A and B) before every optimizer sees them; 0 disables")
    a("--batch-size", type=int, default=d.batch_size, help="micro-batch size (sequences per forward)")
    a("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    a("--epochs", type=int, default=d.epochs, help="passes over the training data (ignored with --max-steps)")
    a("--max-steps", type=int, default=d.max_steps, help="optimizer steps to run (overrides --epochs)")
    a("--cutoff-len", type=int, default=d.cutoff_len, help="truncate each example to this many tokens")
    a("--template", choices=sorted(TEMPLATES), default=d.template,
      help="prompt template: clean Alpaca, or LLM-Adapters' finetune.py string verbatim")
    a("--fisher-batches", type=int, default=d.fisher_batches, help="calibration batches N for Fisher (Eq. 2), CKA and FIM-LoRA")
    a("--fisher-params", choices=("block", "targets"), default=d.fisher_params,
      help="theta_l of Eq. 2: every block parameter, or only the target projections")
    a("--qr-every", type=int, default=d.qr_every, help="Cayley-Adam QR retraction every T steps (0 = never)")
    a("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warmup steps")
    a("--schedule", choices=SCHEDULES, default=d.schedule, help="decay after warmup")
    a("--val-size", type=int, default=d.val_size, help="held-out validation records (0 = none)")
    a("--seed", type=int, default=d.seed, help="seeds data split/order, LoRA init, random-k and dropout")
    a("--dtype", choices=DTYPES, default=d.dtype, help="base weight dtype; auto = bfloat16 on CUDA "
      "(with bf16 autocast), float32 on CPU. Adapters are always float32")
    a("--device", default=d.device, help="cpu, cuda, cuda:1, ...; auto = cuda when available")
    a("--save-every", type=int, default=d.save_every, help="checkpoint every N steps into OUT/checkpoint (0 = never)")
    a("--resume", default=d.resume, help="continue the run whose --out folder (or checkpoint/ folder) is given")
    a("--merge", action="store_true", help="also write OUT/merged: the base with W0 + s B A folded in")
    a("--log-every", type=int, default=d.log_every, help="progress line + metrics.jsonl row every N steps")
    a("--eval-every", type=int, default=d.eval_every, help="validation loss every N steps (0 = only start and end)")
    a("--compile", action="store_true", help="torch.compile each decoder block (regional); falls back to "
      "eager with a warning where torch.compile does not work. Off by default: no measured gain yet")
    a("--activation-checkpointing", action="store_true",
      help="recompute each block's activations in backward: less activation memory, about one more forward")
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """argv -> TrainConfig (argparse exits with a usage message on bad flags)."""
    ns = vars(build_parser().parse_args(argv))
    try:
        return TrainConfig(**ns)
    except ValueError as err:
        build_parser().error(str(err))
        raise  # unreachable: error() exits


def config_json(cfg: TrainConfig) -> str:
    """Pretty JSON of a config (for logs)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
