"""StepHealth: per-step losses and gradient norms checked in one transfer; the first bad step named."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fora.training.health import StepHealth
from fora.training.loop import TrainingDiverged


def test_check_returns_losses_and_last_norm_then_resets():
    h = StepHealth()
    h.record(1, torch.tensor(2.5), torch.tensor(0.5))
    h.record(2, torch.tensor(1.5), torch.tensor(0.25))
    assert h.check(None) == ([2.5, 1.5], 0.25)
    assert h.check(None) == ([], None)


@pytest.mark.parametrize("loss, norm, what", [(float("nan"), 1.0, "the training loss is nan"),
                                               (1.0, float("inf"), "the gradient norm is inf")])
def test_first_bad_step_is_named(loss, norm, what):
    h = StepHealth()
    h.record(7, torch.tensor(1.0), torch.tensor(1.0))
    h.record(8, torch.tensor(loss), torch.tensor(norm))
    h.record(9, torch.tensor(float("nan")), torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match=f"{what} at step 8; the last good checkpoint is ckpt"):
        h.check(Path("ckpt"))
