"""The training run's configuration: a frozen dataclass (its flags: `fora.training.flags`).

The method's defaults come from `fora.defaults.FORA` (each tagged with its source: the paper, the
authors' code or fora); the run's own are LLM-Adapters' recipe where the paper is silent (batch 16,
120 validation records, linear decay). Warmup defaults to 3 % of the run's steps
(`WARMUP_FRACTION`), so short runs reach their learning rate; LLM-Adapters' 100 steps are about
0.3 % of its ~30k-step runs. The README's quick CPU run passes
small explicit flags instead of relying on different defaults.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fora.formats.gguf_export import TARGETS as EXPORT_TARGETS
from fora.formats.loading import QUANTIZE
from fora.defaults import FORA
from fora.optim import STIEFEL_FACTORS
from fora.training.data import TEMPLATES
from fora.training.distributed import DIST_MODES
from fora.training.builtin import trains_on_builtin_cloze
from fora.training.adalora_hooks import check_config
from fora.training.methods import CALIBRATED_SELECTORS, METHODS
from fora.training.tasks import PROTOCOLS

WARMUP_FRACTION = 0.03
FIM_STATISTICS = ("second_moment", "variance")
DTYPES = ("auto", "float32", "bfloat16")  # no float16: autocast without loss scaling underflows
SCHEDULES = ("linear", "cosine", "constant")
# Fields that do not change the trajectory: they may differ between a run and its --resume.
RESUMABLE_FIELDS = frozenset({"out", "resume", "selection_from", "merge", "log_every", "eval_every", "save_every", "save_minutes", "device",
                              "distributed", "activation_checkpointing", "eval_data", "eval_limit", "protocol",
                              "export"})


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of one training run (see `fora.training.flags.build_parser` for what each one means)."""

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
    selection_from: str | None = None  # a run folder whose selection.json this run reuses (checked)
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
        if self.selection_from is not None and METHODS[self.method].selector not in CALIBRATED_SELECTORS:
            raise ValueError(f"--selection-from: --method {self.method} does not score layers "
                             f"({METHODS[self.method].selector} selection); drop --selection-from")
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


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """`--warmup-steps`, or by default `WARMUP_FRACTION` of the `total` optimizer steps (>= 1)."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else max(1, math.ceil(WARMUP_FRACTION * total))


def config_json(cfg: TrainConfig) -> str:
    """Pretty JSON of a config (for logs)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
