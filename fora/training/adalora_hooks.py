"""`--method adalora` in the training run: the regulariser, the rank allocator's step, its state.

`AdaLoRAStep` is stepped with the learning-rate schedulers (it sits at the end of their list), i.e.
after every optimizer step and before `zero_grad`, where peft's `update_and_allocate` belongs; its
`state_dict` therefore travels in the checkpoint's `optim.pt` with theirs, so `--resume` continues
the EMAs, the budget and the masks bit for bit. Steps count from 1 (the optimizer steps done).

Defaults (decision): init_r = round(1.5 r), target_r = r (so the final budget is LoRA's at rank r
over the same modules), α = 2 · init_r (scale ≈ 2, as the LoRA methods), tinit = ⌊0.1 T⌋ and
tfinal = ⌊0.2 T⌋ of the run's T optimizer steps, masking every step (peft's deltaT = 1).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fora.baselines.adalora import AdaLoRALinear, RankAllocator, check_schedule, orthogonal_regularizer

TINIT_FRACTION, TFINAL_FRACTION = 0.1, 0.2


def init_rank(cfg: Any) -> int:
    """init_r of the run: ``--init-r``, or round(1.5 · ``--rank``)."""
    return cfg.init_r if cfg.init_r is not None else max(1, round(1.5 * cfg.rank))


def schedule_of(cfg: Any, total: int) -> dict[str, Any]:
    """The run's AdaLoRA schedule under peft's AdaLoraConfig names (checked: one-line errors)."""
    init_r = init_rank(cfg)
    target_r = cfg.target_r if cfg.target_r is not None else cfg.rank
    tinit = cfg.tinit if cfg.tinit is not None else int(TINIT_FRACTION * total)
    tfinal = cfg.tfinal if cfg.tfinal is not None else int(TFINAL_FRACTION * total)
    betas = tuple(cfg.adalora_betas)
    check_schedule(init_r, target_r, total, tinit, tfinal, cfg.delta_t, betas)
    return {"target_r": target_r, "tinit": tinit, "tfinal": tfinal, "deltaT": cfg.delta_t, "beta1": betas[0],
            "beta2": betas[1], "orth_reg_weight": cfg.orth_reg, "total_step": total}


class AdaLoRAStep:
    """The allocator of one run over its AdaLoRA modules, with the LR scheduler protocol (step, state_dict)."""

    def __init__(self, model: nn.Module, schedule: dict[str, Any]) -> None:
        self.modules = {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)}
        if not self.modules:
            raise ValueError("AdaLoRAStep found no AdaLoRA modules; inject with adapter=AdaLoRALinear first")
        self.schedule = schedule
        self.allocator = RankAllocator({p: m.rank for p, m in self.modules.items()},
                                       target_r=schedule["target_r"], total_step=schedule["total_step"],
                                       tinit=schedule["tinit"], tfinal=schedule["tfinal"],
                                       delta_t=schedule["deltaT"], betas=(schedule["beta1"], schedule["beta2"]))
        self.last_step = 0
        self.last_reg = 0.0

    def backward_regularizer(self) -> None:
        """Add orth_reg · R's gradient to the adapters' (once per optimizer step, as peft's per-forward term
        is once per batch)."""
        reg = orthogonal_regularizer(self.modules.values())
        (self.schedule["orth_reg_weight"] * reg).backward()
        self.last_reg = reg.detach()

    def step(self) -> None:
        """One allocator step after the optimizers stepped, before their zero_grad: update, then mask E."""
        self.last_step += 1
        masks = self.allocator.update(self.last_step, {p: (m.lora_A, m.lora_E, m.lora_B)
                                                        for p, m in self.modules.items()})
        for path, keep in (masks or {}).items():
            self.modules[path].apply_mask(keep)

    def metrics(self) -> dict[str, float]:
        """The metrics.jsonl fields: the current budget (triplets kept over all modules) and R."""
        kept = sum(int(m.kept.sum()) for m in self.modules.values())
        return {"budget": self.allocator.budget, "kept_triplets": kept, "orth_reg": float(self.last_reg)}

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "allocator": self.allocator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the allocator; the modules' kept sets follow its masks (E itself comes with the adapter)."""
        self.last_step = int(state["last_step"])
        self.allocator.load_state_dict(state["allocator"])
        for path, keep in (self.allocator.pattern or {}).items():
            self.modules[path].kept = keep.clone()

    def save_folded(self, model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str) -> Path:
        """OUT/lora: the plain LoRA twin of the final adapter (`fora.formats.adalora_io.save_folded_lora`)."""
        from fora.formats.peft_io import save_folded_lora

        return save_folded_lora(model, out_dir, base_model_name_or_path=base_model_name_or_path)


def trainable_budget(model: nn.Module) -> dict[str, int]:
    """Parameter counts the paper compares: trained (init_r triplets) and kept at the end (the final budget)."""
    mods = [m for m in model.modules() if isinstance(m, AdaLoRALinear)]
    per = [(m.in_features + m.out_features + 1) for m in mods]
    return {"trained": sum(m.rank * p for m, p in zip(mods, per)),
            "kept": sum(int(m.kept.sum()) * p for m, p in zip(mods, per))}


def parse_betas(text: str) -> tuple[float, float]:
    """``--adalora-betas 0.85,0.85`` -> (0.85, 0.85)."""
    try:
        b1, b2 = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--adalora-betas needs two comma-separated floats such as 0.85,0.85, "
                                         f"got {text!r}") from None
    return b1, b2


def check_config(cfg: Any) -> None:
    """One-line errors for the adalora flags of a TrainConfig (the schedule is checked once T is known)."""
    given = [f for f in ("init_r", "target_r", "tinit", "tfinal") if getattr(cfg, f) is not None]
    if cfg.method != "adalora":
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to --method adalora only; drop it")
        return
    if cfg.k is not None:
        raise ValueError("--method adalora adapts every layer and allocates ranks itself; drop --k "
                         "(or use --method fora for K layers)")
    if cfg.quantize is not None:
        raise ValueError("--method adalora trains on a full-precision base; drop --quantize "
                         "(AdaLoRA on a 4-bit base is not implemented)")
    if cfg.rslora:
        raise ValueError("--method adalora scales by alpha / init_r as peft does; drop --rslora")
    if cfg.distributed is not None:
        raise ValueError("--method adalora runs in one process (the rank allocator is not synchronised "
                         "across ranks); drop --distributed")
    target_r = cfg.target_r if cfg.target_r is not None else cfg.rank
    if not 1 <= target_r <= init_rank(cfg):
        raise ValueError(f"AdaLoRA target rank {target_r} must be in [1, init_r = {init_rank(cfg)}]: "
                         "pass --target-r <= --init-r")
    if cfg.orth_reg < 0:
        raise ValueError(f"--orth-reg must be >= 0, got {cfg.orth_reg}")

