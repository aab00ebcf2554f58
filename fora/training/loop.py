"""The pieces of one training step: loss, learning-rate schedule, validation, metrics log.

Kept apart from `fora.training.run` (which wires a run together) so each can be read and tested alone.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fora.formats.atomic import atomic_write_text
from fora.models.decoder import CausalLM, CausalLMLoss, _key_mask
from fora.models.loss import IGNORE_INDEX, causal_lm_loss

Batch = Mapping[str, torch.Tensor]


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm became NaN / inf; nothing after the last checkpoint is written."""



def supervised_tokens(batches: Sequence[Batch]) -> int:
    """Tokens that carry a loss (after the shift) over a list of batches."""
    return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate after `step` scheduler steps (transformers' formulas):
    linear warmup from 0 over `warmup` steps, then linear / cosine decay to 0 at `total`, or constant."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return f


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA (the base weights are already in that dtype; the fp32 adapters
    and the logits' upcast are what autocast arbitrates); nothing on the CPU or in float32."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def forward_loss(model: nn.Module, batch: Batch, device: torch.device, *, grad_from_layer: int = 0,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy of one batch and its supervised-token count (`causal_lm_loss`).

    A fora `CausalLM` takes the loss from its final hidden states at supervised positions only
    (`CausalLM.loss`: no [B, T, V] logits); any other model (transformers, peft) through its logits.
    With the batch on the CPU (as the trainer keeps it) nothing here waits for the device: the
    supervised positions and the padding layout are read from the CPU tensors.

    Args:
        model: a fora CausalLM, or any causal LM returning logits (or an object with ``.logits``).
        batch: ``input_ids`` [B, T], ``labels`` [B, T] (IGNORE_INDEX: no loss), optional
            ``attention_mask`` [B, T].
        device: where the model is.
        grad_from_layer: no autograd below this layer (fora CausalLM only).
        autocast: a context factory for mixed precision (see `autocast_context`).
    Returns:
        (loss sum, count); the mean token loss is ``sum / count``.
    """
    ids = batch["input_ids"].to(device, non_blocking=True)
    mask, labels = batch.get("attention_mask"), batch["labels"]
    # a CausalLM, or DDP(CausalLMLoss(lm)) whose forward is the same loss
    loss = model.loss if isinstance(model, CausalLM) else (
        model if isinstance(getattr(model, "module", None), CausalLMLoss) else None)
    if loss is not None:
        if mask is not None and mask.device.type == "cpu" and _key_mask(mask) is None:
            mask = None  # right padding only: causality hides the pads, and the decoder needs no check
        with autocast():
            return loss(ids, labels, None if mask is None else mask.to(device, non_blocking=True),
                        grad_from_layer=grad_from_layer)
    with autocast():
        out = model(ids, attention_mask=None if mask is None else mask.to(device))
    return causal_lm_loss(getattr(out, "logits", out), labels.to(device))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], device: torch.device, *,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Token-weighted mean validation loss, in eval mode (no dropout); the mode is restored."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    try:
        for batch in batches:
            s, n = forward_loss(model, batch, device, autocast=autocast)
            total, count = total + s.double(), count + int(n)  # one device sync, at the end
    finally:
        model.train(was_training)
    return float(total) / max(count, 1)


def diverged(step: int, what: str, value: float, checkpoint: Path | None) -> TrainingDiverged:
    """The error a NaN / inf stops the run with (names the step, the last checkpoint and the fixes)."""
    where = (f"the last good checkpoint is {checkpoint} (continue from it with --resume)"
             if checkpoint is not None else "no checkpoint was saved before it")
    return TrainingDiverged(f"{what} is {value} at step {step}; {where}. Lower --lr / --stiefel-lr, "
                            "keep --max-grad-norm on, or train with --dtype float32")


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, flushed as written (a crash loses at most a line)."""

    def __init__(self, path: Path, *, keep_until_step: int | None = None) -> None:
        self.path = path
        if keep_until_step is None:
            atomic_write_text(path, "")
        else:  # resuming: rows of the killed run past the checkpoint are replayed, so drop them
            rows = self.read(path) if path.is_file() else []
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows
                                            if r.get("step", 0) <= keep_until_step))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Throughput:
    """Tokens/s and ETA over the steps since the last report."""

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.t0 = self.t_last = time.perf_counter()
        self.start, self.total, self.tokens, self.last_step = start_step, total_steps, 0, start_step

    def report(self, step: int) -> tuple[float, float]:
        now = time.perf_counter()
        tok_s = self.tokens / max(now - self.t_last, 1e-9)
        eta = (now - self.t0) / max(step - self.start, 1) * (self.total - step)
        self.t_last, self.tokens, self.last_step = now, 0, step
        return tok_s, eta
