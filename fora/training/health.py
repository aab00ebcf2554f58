"""NaN / inf checks of the training loss and gradient norm without a device sync per step.

The trainer records each step's loss and gradient norm as device tensors and checks them all at
once (one transfer) when it has to look anyway: before logging, evaluating, saving a checkpoint
and at the end. A step with a NaN may thus be followed by a few more optimizer steps before the
run stops, but nothing is written after it: the check precedes every save, and the error names
the first bad step.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from fora.training.loop import diverged


class StepHealth:
    """Losses and gradient norms of the steps since the last `check`, kept on the device."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Step `step`'s (summed micro-batch) loss and gradient norm; no synchronisation."""
        self.steps.append(step)
        self.values.append(torch.stack([loss.detach().float(), grad_norm.detach().float()]))

    def check(self, checkpoint: Path | None) -> tuple[list[float], float | None]:
        """Synchronise once: the recorded losses and the last gradient norm, as floats.

        Raises:
            TrainingDiverged naming the first step whose loss or gradient norm is not finite.
        """
        if not self.steps:
            return [], None
        rows = torch.stack(self.values).cpu().tolist()
        steps = self.steps
        self.steps, self.values = [], []
        for step, (loss, norm) in zip(steps, rows):
            if not math.isfinite(loss):
                raise diverged(step, "the training loss", loss, checkpoint)
            if not math.isfinite(norm):
                raise diverged(step, "the gradient norm", norm, checkpoint)
        return [loss for loss, _ in rows], rows[-1][1]
