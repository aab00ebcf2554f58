"""The training run's configuration: a frozen dataclass and the argparse CLI that fills it.

The method's defaults come from `fora.defaults.FORA` (each tagged with its source: the paper, the
authors' code or fora); the run's own are LLM-Adapters' recipe where the paper is silent (batch 16,
120 validation records, linear decay). Warmup defaults to 3 % of the run's steps
(`WARMUP_FRACTION`), so short runs reach their learning rate; LLM-Adapters' 100 steps are about
0.3 % of its ~30k-step runs. The README's quick CPU run passes
small explicit flags instead of relying on different defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fora.formats.gguf_export import TARGETS as EXPORT_TARGETS
from fora.formats.loading import QUANTIZE
from fora.defaults import FORA
from fora.optim import STIEFEL_FACTORS
from fora.training.data import TEMPLATES
from fora.training.distributed import DIST_MODES
from fora.training.builtin import BUILTIN_TASKS, DEFAULT_TASK, trains_on_builtin_cloze
from fora.training.adalora_hooks import check_config, parse_betas
from fora.training.argparser import ArgumentParser, command_name
from fora.training.methods import METHODS
from fora.training.tasks import PROTOCOLS

WARMUP_FRACTION = 0.03
FIM_STATISTICS = ("second_moment", "variance")
DTYPES = ("auto", "float32", "bfloat16")  # no float16: autocast without loss scaling underflows
SCHEDULES = ("linear", "cosine", "constant")
# Fields that do not change the trajectory: they may differ between a run and its --resume.
RESUMABLE_FIELDS = frozenset({"out", "resume", "merge", "log_every", "eval_every", "save_every", "save_minutes", "device",
                              "distributed", "activation_checkpointing", "eval_data", "eval_limit", "protocol",
                              "export"})


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of one training run (see `build_parser` for what each one means)."""

    model: str
    k: int | None = None
    method: str = "fora"
    data: str | None = None
    task_size: int = 2000
    eval_data: str | None = None  # None: "builtin" when training on the built-in cloze task, else "none"
    eval_limit: int | None = None
    protocol: str = "loglik"
    export: str | None = None  # train.py: also write OUT as GGUF (fora.formats.gguf_export) at the end
    out: str | None = None
    rank: int = FORA.rank
    alpha: float | None = None
    lora_dropout: float = FORA.lora_dropout
    rslora: bool = False
    targets: tuple[str, ...] = FORA.targets
    lr: float = FORA.lr             # every method default: fora.defaults (value and source)
    stiefel_factor: str = "B"       # B: FoRA as its authors run it; A: the row-orthonormal-A ablation
    stiefel_lr: float | None = None  # None: fora.optim's default for the factor
    stiefel_lr_scale: float = 1.0
    weight_decay: float = FORA.weight_decay
    cayley_per_micro_batch: bool = False  # the authors' trainer's stepping (a control), not the default
    max_grad_norm: float = FORA.max_grad_norm
    batch_size: int = 16
    grad_accum: int = 1
    epochs: int = FORA.epochs
    max_steps: int | None = None
    cutoff_len: int = FORA.cutoff_len
    template: str = "alpaca"
    fisher_batches: int = FORA.fisher_batches
    fisher_params: str = "block"
    qr_every: int = FORA.qr_every
    warmup_steps: int | None = None
    schedule: str = "linear"
    val_size: int = 120
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    save_every: int = 50
    save_minutes: float = 10.0
    resume: str | None = None
    merge: bool = False
    log_every: int = 10
    eval_every: int = 100
    distributed: str | None = None
    world_size: int = 1  # set by the trainer from torchrun's WORLD_SIZE (not a flag); resume checks it
    quantize: str | None = None
    fim_statistic: str = "second_moment"
    fim_r_min: int = 1
    fim_r_max: int | None = None
    init_r: int | None = None       # adalora (fora.training.adalora_hooks: defaults from --rank and the run)
    target_r: int | None = None
    tinit: int | None = None
    tfinal: int | None = None
    delta_t: int = 1
    orth_reg: float = 0.5
    adalora_betas: tuple[float, float] = (0.85, 0.85)
    match_init_norm: bool = False
    compile: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        positive = ("rank", "batch_size", "grad_accum", "cutoff_len", "fisher_batches", "task_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "qr_every", "warmup_steps", "val_size", "save_every", "eval_every", "save_minutes"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}; omit it to train --epochs")
        if self.max_steps is None and self.epochs < 1:
            raise ValueError("--epochs 0 trains nothing; pass --epochs >= 1 or --max-steps")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        for name in ("stiefel_lr", "stiefel_lr_scale"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.stiefel_factor not in STIEFEL_FACTORS:
            raise ValueError(f"unknown --stiefel-factor {self.stiefel_factor!r}; choose B (FoRA) or A (the ablation)")
        if self.cayley_per_micro_batch and self.stiefel_factor != "B":
            raise ValueError("--cayley-per-micro-batch reproduces the authors' trainer, which constrains B; "
                             "drop it or use --stiefel-factor B")
        if self.dtype == "float16":
            raise ValueError("--dtype float16 is not supported for training: fp16 autocast without loss "
                             "scaling lets small gradients underflow to zero; use --dtype bfloat16 "
                             "(the paper's dtype) or float32")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown --schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown --template {self.template!r}; choose one of {', '.join(sorted(TEMPLATES))}")
        if not self.targets:
            raise ValueError("--targets is empty; pass e.g. q_proj,k_proj,v_proj,up_proj,down_proj")
        if self.distributed is not None and self.distributed not in DIST_MODES:
            raise ValueError(f"unknown --distributed {self.distributed!r}; choose one of {', '.join(DIST_MODES)}")
        if self.distributed == "fsdp" and self.merge:
            raise ValueError("--merge needs the whole base in one process, but --distributed fsdp shards it; "
                             "drop --merge and merge the adapter afterwards in one process (fora.save_merged)")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"unknown --quantize {self.quantize!r}; choose {', '.join(QUANTIZE)} "
                             "(or omit the flag for a full-precision base)")
        needs = METHODS[self.method].quantize
        if needs is not None and self.quantize != needs:
            raise ValueError(f"--method {self.method} trains on a quantized base: pass --quantize {needs} "
                             "(or use the full-precision variant, e.g. --method dora)")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown --protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.export is not None and self.export not in EXPORT_TARGETS:
            raise ValueError(f"unknown --export {self.export!r}; choose one of {', '.join(EXPORT_TARGETS)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"--eval-limit must be >= 1, got {self.eval_limit}; omit it to score every record")
        if self.final_eval_data not in ("none", "builtin") and not Path(self.final_eval_data).expanduser().exists():
            raise ValueError(f"--eval-data {self.final_eval_data!r} does not exist; pass a test .json/.jsonl file "
                             "or folder, 'builtin' (the cloze task's test split) or 'none'")
        if self.fim_statistic not in FIM_STATISTICS:
            raise ValueError(f"unknown --fim-statistic {self.fim_statistic!r}; "
                             f"choose one of {', '.join(FIM_STATISTICS)}")
        if self.fim_r_min < 1 or (self.fim_r_max is not None and self.fim_r_max < self.fim_r_min):
            raise ValueError(f"--fim-r-min must be >= 1 and --fim-r-max >= --fim-r-min, got "
                             f"{self.fim_r_min} and {self.fim_r_max}")
        check_config(self)  # the adalora flags

    @property
    def final_eval_data(self) -> str:
        """What the end-of-run evaluation scores: "builtin", "none" or a test file / folder."""
        if self.eval_data is not None:
            return self.eval_data
        return "builtin" if trains_on_builtin_cloze(self.data) else "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["adalora_betas"] = list(self.adalora_betas)
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
        if "adalora_betas" in d:
            d["adalora_betas"] = tuple(d["adalora_betas"])
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
    p = ArgumentParser(
        prog=command_name("train.py"), formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune a decoder LLM with FoRA (Fisher-selected layers, Stiefel-constrained "
                    "LoRA) or one of its ablations; writes a PEFT LoRA adapter to --out.")
    a = p.add_argument
    a("--model", required=True, help="preset name (e.g. smollm2-135m), hub repo id, local folder or .gguf file")
    a("--k", type=int, default=d.k, help="number of layers to adapt for the top-K methods; default L/2")
    a("--method", choices=list(METHODS), default=d.method, help=_method_help())
    a("--data", default=d.data, help="training records: .json/.jsonl file (Alpaca / LLM-Adapters format, or chat "
      f"records {{'messages': [...]}}, in the checkpoint's chat template), hub dataset 'owner/name[:file]' or a "
      f"built-in task ({', '.join(BUILTIN_TASKS)}); default: {DEFAULT_TASK} (CPython documentation cloze, train split)")
    a("--task-size", type=int, default=d.task_size, help="records generated for --data arithmetic")
    a("--eval-data", default=d.eval_data, help="scored after training, adapters off (the base) and on: "
      "'builtin' (the cloze task's held-out test split), a test .json/.jsonl file or folder "
      "(LLM-Adapters layout), or 'none'; default builtin when training on the cloze task, else none. "
      "Written to OUT/eval.json")
    a("--eval-limit", type=int, default=d.eval_limit, help="score only the first N records of each "
      "evaluation task; default all")
    a("--export", choices=EXPORT_TARGETS, default=d.export, help="after training, also write the run as "
      "GGUF for llama.cpp / ollama at f16 (scripts/export.py RUN --to ...): gguf-lora (the adapter), merged "
      "(base with the adapter folded in) or gguf (the base)")
    a("--protocol", choices=PROTOCOLS, default=d.protocol, help="accuracy protocol of the end-of-run "
      "evaluation: loglik (rank the choices by log-likelihood) or generate (greedy decoding)")
    a("--out", default=d.out, help="output folder; default runs/<model>-<method>-k<K>")
    a("--rank", type=int, default=d.rank, help="LoRA rank r (lora-half-rank uses r/2)")
    a("--alpha", type=float, default=d.alpha, help="LoRA alpha; default 2 * rank (scale s = alpha / r = 2)")
    a("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the adapter input")
    a("--rslora", action="store_true", help="rank-stabilised scale alpha / sqrt(r)")
    a("--targets", type=_targets, default=",".join(d.targets), help="comma list of projections to adapt per layer")
    a("--lr", type=float, default=d.lr, help="AdamW learning rate, on the schedule (A and the gate for FoRA; "
      "every factor for the plain-LoRA methods)")
    a("--stiefel-factor", choices=STIEFEL_FACTORS, default=d.stiefel_factor, help="the factor the Stiefel "
      "methods keep orthonormal: B (FoRA as its authors run it: B column-orthonormal, A ~ N(0, 1/r), a gate "
      "g = 0) or A (the ablation: A rows orthonormal, B = 0)")
    a("--cayley-per-micro-batch", action="store_true", help="step Cayley-Adam after every micro-batch's "
      "backward, before gradient clipping, as the authors' trainer does (a control; default: once per "
      "optimizer step, after clipping)")
    a("--stiefel-lr", type=float, default=d.stiefel_lr, help="Cayley-Adam step for the Stiefel factor: with B "
      "the constant cap of alpha = min(lr, 1/||W||_1), default 1e-3; with A the step length, default "
      "lr * sqrt(r * d_in) per A (same Frobenius step as AdamW on a plain A)")
    a("--stiefel-lr-scale", type=float, default=d.stiefel_lr_scale, help="multiplies Cayley-Adam's step (0.25: a quarter)")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (never on the Stiefel factor)")
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
    a("--qr-every", type=int, default=d.qr_every, help="Cayley-Adam QR retraction every T steps (0 = never; the authors' code: 100, "
      "the paper's Table 10 may say 200)")
    a("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warmup steps; "
      f"default {WARMUP_FRACTION:.0%}% of the run's optimizer steps")  # %% for argparse
    a("--schedule", choices=SCHEDULES, default=d.schedule, help="decay after warmup")
    a("--val-size", type=int, default=d.val_size, help="held-out validation records (0 = none)")
    a("--seed", type=int, default=d.seed, help="seeds data split/order, LoRA init, random-k and dropout")
    a("--dtype", default=d.dtype, help=f"base weight dtype, one of {', '.join(DTYPES)}; auto = bfloat16 "
      "on CUDA (with bf16 autocast), float32 on CPU. Adapters are always float32. No float16: without "
      "loss scaling its small gradients underflow")
    a("--device", default=d.device, help="cpu, cuda, cuda:1, ...; auto = cuda when available")
    a("--save-every", type=int, default=d.save_every, help="checkpoint every N steps into OUT/checkpoint (0 = never)")
    a("--save-minutes", type=float, default=d.save_minutes, help="also checkpoint when this many minutes of "
      "training have passed since the last checkpoint, whichever of the two comes first (0 = never by time)")
    a("--resume", default=d.resume, help="continue the run whose --out folder (or checkpoint/ folder) is given")
    a("--merge", action="store_true", help="also write OUT/merged: the base with W0 + s B A folded in")
    a("--log-every", type=int, default=d.log_every, help="progress line + metrics.jsonl row every N steps")
    a("--eval-every", type=int, default=d.eval_every, help="validation loss every N steps (0 = only start and end)")
    a("--distributed", choices=DIST_MODES, default=d.distributed, help="under torchrun: ddp (base replicated "
      "per GPU) or fsdp (base sharded per block, adapters replicated); --batch-size stays per process")
    a("--quantize", default=d.quantize, help="store the base's block linears in 4 bits: nf4 (QLoRA's "
      "NormalFloat, double-quantized constants; QFoRA with --method fora); default full precision")
    a("--fim-statistic", choices=FIM_STATISTICS, default=d.fim_statistic, help="fim-lora's score of each "
      "LoRA-B gradient over the calibration passes: the uncentered second moment (the reference "
      "code) or the variance (FIM-LoRA's text); summed over B's entries")
    a("--fim-r-min", type=int, default=d.fim_r_min, help="fim-lora: smallest rank of a module")
    a("--fim-r-max", type=int, default=d.fim_r_max, help="fim-lora: largest rank of a module; default "
      "min(4 r, d_in, d_out) (the reference code caps at 2 r)")
    a("--init-r", type=int, default=d.init_r, help="adalora: triplets per module at the start; default round(1.5 * rank)")
    a("--target-r", type=int, default=d.target_r, help="adalora: average rank after budgeting; default --rank")
    a("--tinit", type=int, default=d.tinit, help="adalora: steps before pruning starts; default 10%% of the run")
    a("--tfinal", type=int, default=d.tfinal, help="adalora: last steps with the final rank pattern fixed; "
      "default 20%% of the run")
    a("--delta-t", type=int, default=d.delta_t, help="adalora: mask to the budget every N steps while budgeting")
    a("--orth-reg", type=float, default=d.orth_reg, help="adalora: weight of the orthogonality regulariser")
    a("--adalora-betas", type=parse_betas, default=",".join(map(str, d.adalora_betas)),
      help="adalora: EMA betas of the sensitivity and uncertainty, 'b1,b2'")
    a("--match-init-norm", action="store_true", help="plain-A methods: scale each Kaiming row of A to "
      "unit norm, the row norm of a Stiefel A (Kaiming rows have norm ~1/sqrt(3)), so the 2x2 "
      "ablation starts both arms at the same ||dW|| scale")
    a("--compile", action="store_true", help="torch.compile each decoder block (regional); eager with a "
      "warning where torch.compile does not work (docs/performance.md)")
    a("--activation-checkpointing", action="store_true",
      help="recompute each block's activations in backward: less activation memory, about one more forward")
    return p


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """`--warmup-steps`, or by default `WARMUP_FRACTION` of the `total` optimizer steps (>= 1)."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else max(1, math.ceil(WARMUP_FRACTION * total))


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """argv -> TrainConfig (argparse exits with a usage message on bad flags).

    With `--resume DIR` the settings are read from the run's train_config.json
    (`fora.training.resume`); `--model` is then not needed.
    """
    from fora.training.resume import resume_from_cli

    resumed = resume_from_cli(build_parser, argv, TrainConfig, RESUMABLE_FIELDS)
    if resumed is not None:
        return resumed
    ns = vars(build_parser().parse_args(argv))
    try:
        return TrainConfig(**ns)
    except ValueError as err:
        build_parser().error(str(err))
        raise  # unreachable: error() exits


def config_json(cfg: TrainConfig) -> str:
    """Pretty JSON of a config (for logs)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
