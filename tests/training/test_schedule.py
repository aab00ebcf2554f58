"""The learning-rate schedule (fora.training.loop.lr_lambda) against transformers' own schedulers."""
from __future__ import annotations

import pytest
import torch

from fora.training.loop import lr_lambda

transformers = pytest.importorskip("transformers")

ORACLES = {"linear": transformers.get_linear_schedule_with_warmup,
           "cosine": transformers.get_cosine_schedule_with_warmup,
           "constant": lambda opt, warmup, total: transformers.get_constant_schedule_with_warmup(opt, warmup)}


def _lrs(make, total: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = make(opt)
    lrs = []
    for _ in range(total):  # the lr of each of the run's `total` optimizer steps
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", sorted(ORACLES))
@pytest.mark.parametrize("warmup,total", [(1, 10), (3, 10), (4, 40), (5, 5), (0, 7)])
def test_schedule_equals_transformers(schedule, warmup, total):
    ours = _lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule, warmup, total)), total)
    theirs = _lrs(lambda opt: ORACLES[schedule](opt, warmup, total), total)
    assert ours == pytest.approx(theirs, abs=1e-12)
    if 0 < warmup < total:
        assert ours[0] == 0.0 and ours[warmup] == pytest.approx(0.3)  # the full lr is reached at step `warmup`
