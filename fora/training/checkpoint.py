"""Training checkpoints: everything needed to continue a run bit-for-bit.

A checkpoint is a directory (published atomically, see `fora.formats.atomic.staging_dir`):

    adapter_config.json, adapter_model.safetensors   the LoRA A, B (PEFT layout, loadable as is)
    optim.pt        state dicts of every optimizer (CayleyAdam for A, AdamW for B) and scheduler
    rng.pt          torch CPU / CUDA, python `random` and numpy generator states
    state.json      data position: epoch, optimizer-step index within the epoch, global step; the
                    seconds the run had taken (so timings continue across a resume); and the losses
                    of the steps since the last metrics row (so the next row averages the same steps)
    selection.json  the layer selection (so a resumed run does not recompute Fisher scores)
    train_config.json

Only the adapter is stored, never the frozen base weights: the resumed run reloads the base from
the same `--model`.
"""
from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fora.formats.atomic import atomic_torch_save, atomic_write_json, recover_dir, staging_dir
from fora.formats.peft_io import ADAPTER_WEIGHTS, save_adapter

STATE_FILE = "state.json"
OPTIM_FILE = "optim.pt"
RNG_FILE = "rng.pt"
SELECTION_FILE = "selection.json"
CONFIG_FILE = "train_config.json"
BATCH_UNIT = "step"  # state.json's `batch` counts optimizer steps (epoch_steps), not micro-batches


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands after `step` optimizer steps.

    `epoch` and `batch` index the next optimizer step to read: `batch` counts the epoch's steps
    (`fora.training.batching.epoch_steps`, each micro x accumulation x world rows), not its
    micro-batches. Step order within an epoch is a pure function of the seed and the epoch, so this
    is enough to continue the same stream.
    """

    epoch: int
    batch: int
    step: int


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back from disk (`load_checkpoint`)."""

    path: Path
    position: DataPosition
    adapter: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    rng: dict[str, Any]
    selection: dict[str, Any]
    config: dict[str, Any]
    seconds: float = 0.0
    loss_window: list[float] = field(default_factory=list)


class SaveClock:
    """`--save-minutes`: whether that much wall time has passed since the last checkpoint (or the
    start of the loop), so that a crash costs at most that much training whatever the step time."""

    clock = staticmethod(time.monotonic)

    def __init__(self, minutes: float) -> None:
        self.seconds = 60.0 * minutes
        self.since = self.clock()

    def due(self, ctx: Any = None) -> bool:
        """Time for a checkpoint? Under torchrun, when it is for any rank (`ctx.all_sum`): every rank
        must take part in the save."""
        if not self.seconds > 0:
            return False
        due = self.clock() - self.since >= self.seconds
        return ctx.all_sum(int(due)) > 0 if ctx is not None else due

    def restart(self) -> None:
        self.since = self.clock()


def capture_rng() -> dict[str, Any]:
    """Every random generator a training step may draw from (dropout, shuffles, sampling)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        # Plain lists so that torch.load(weights_only=True) reads them back.
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(ckpt_dir: str | os.PathLike, *, model: nn.Module,
                    optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any],
                    position: DataPosition, selection: dict[str, Any], config: dict[str, Any],
                    base_model_name_or_path: str, seconds: float = 0.0,
                    loss_window: Sequence[float] = ()) -> Path:
    """Write a checkpoint to `ckpt_dir`, replacing any previous one atomically.

    A crash while writing leaves the previous checkpoint in place (see `fora.formats.atomic`).
    """
    with staging_dir(ckpt_dir) as tmp:
        save_adapter(model, tmp, base_model_name_or_path=base_model_name_or_path, fold_gate=False)
        atomic_torch_save({"optimizers": [o.state_dict() for o in optimizers],
                           "schedulers": [s.state_dict() for s in schedulers]}, tmp / OPTIM_FILE)
        atomic_torch_save(capture_rng(), tmp / RNG_FILE)
        atomic_write_json(tmp / STATE_FILE, {**asdict(position), "seconds": seconds, "batch_unit": BATCH_UNIT,
                                             "loss_window": [float(x) for x in loss_window]})
        atomic_write_json(tmp / SELECTION_FILE, selection)
        atomic_write_json(tmp / CONFIG_FILE, config)
    return Path(ckpt_dir)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory or a run's `--out` directory (which holds `checkpoint/`)."""
    path = Path(path)
    for candidate in (path, path / "checkpoint"):
        recover_dir(candidate)
        if (candidate / STATE_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoint in {path} (expected {path}/{STATE_FILE} or "
                            f"{path}/checkpoint/{STATE_FILE}); pass the run's --out folder or its "
                            "checkpoint/ folder to --resume, or drop --resume to start afresh")


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (a run's `--out` folder is accepted too)."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(path)
    missing = [f for f in (ADAPTER_WEIGHTS, OPTIM_FILE, RNG_FILE, SELECTION_FILE, CONFIG_FILE)
               if not (ckpt / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {ckpt} is incomplete (missing {', '.join(missing)}); "
                                "it was not written by fora.training.checkpoint.save_checkpoint - start afresh")
    optim = torch.load(ckpt / OPTIM_FILE, map_location=map_location, weights_only=True)
    state = json.loads((ckpt / STATE_FILE).read_text())
    seconds = float(state.pop("seconds", 0.0))
    loss_window = [float(x) for x in state.pop("loss_window", [])]
    config = json.loads((ckpt / CONFIG_FILE).read_text())
    if state.pop("batch_unit", None) != BATCH_UNIT and int(config.get("grad_accum", 1)) > 1:
        # such a checkpoint counted micro-batches drawn at the micro-batch size: no step of ours matches it
        raise ValueError(f"checkpoint {ckpt} was written by an older fora whose --grad-accum steps took their rows "
                         "micro-batch by micro-batch; its data position cannot be continued - start the run "
                         "afresh (a new --out), or finish it with the fora version that wrote it")
    return Checkpoint(
        path=ckpt,
        position=DataPosition(**state),
        adapter=load_file(ckpt / ADAPTER_WEIGHTS),
        optimizers=optim["optimizers"],
        schedulers=optim["schedulers"],
        rng=torch.load(ckpt / RNG_FILE, map_location="cpu", weights_only=True),
        selection=json.loads((ckpt / SELECTION_FILE).read_text()),
        config=config,
        seconds=seconds,
        loss_window=loss_window,
    )


def restore_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved `A`, `B` and gates (PEFT names, gates unfolded) into the model's LoRA modules; the sets must match exactly."""
    from fora.formats.peft_io import adapter_tensors

    live = adapter_tensors(model, fold_gate=False)
    if set(live) != set(tensors):
        extra, lacking = sorted(set(tensors) - set(live)), sorted(set(live) - set(tensors))
        raise ValueError("checkpoint adapter does not match the model's LoRA modules "
                         f"(only in checkpoint: {extra[:3]}, only in model: {lacking[:3]}); "
                         "resume with the same --model, --method, --k, --rank and --targets")
    with torch.no_grad():
        for name, value in tensors.items():
            if live[name].shape != value.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, the "
                                 f"model's has {tuple(live[name].shape)}; resume with the same --rank")
            live[name].copy_(value)


def restore_training_state(ckpt: Checkpoint, model: nn.Module,
                           optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]) -> None:
    """Load adapter, optimizer, scheduler and RNG states from `ckpt` into a freshly built run."""
    if len(optimizers) != len(ckpt.optimizers) or len(schedulers) != len(ckpt.schedulers):
        raise ValueError(f"checkpoint has {len(ckpt.optimizers)} optimizers, the run {len(optimizers)}; "
                         "resume with the same --method")
    restore_adapter(model, ckpt.adapter)
    for opt, state in zip(optimizers, ckpt.optimizers):
        opt.load_state_dict(state)
    for sched, state in zip(schedulers, ckpt.schedulers):
        sched.load_state_dict(state)
    restore_rng(ckpt.rng)
