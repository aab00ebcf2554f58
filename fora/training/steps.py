"""The train stage of a run: the optimizer steps, with their log rows, validation and checkpoints.

`fora.training.run` wires the run together and hands over here once the adapters and optimizers
are in place (`train_steps`).

Gradient clipping (decision): the global norm over *all* adapter parameters (A and B) is clipped
before any optimizer steps, so CayleyAdam sees the clipped gradient of A. Clipping only rescales G,
and Cayley-Adam's step is invariant to a constant rescaling of G up to its eps (scalar second
moment), so clipping mostly matters for B.

Backward stops at the lowest adapted layer: the forward runs the embedding and the layers below
it without autograd (`grad_from_layer`), which gives the same gradients for less work.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fora.cayley_adam import CayleyAdam
from fora.inject import lora_modules
from fora.stiefel import stiefel_residual
from fora.training.adalora_hooks import AdaLoRAStep
from fora.training.batching import epoch_steps
from fora.training.checkpoint import Checkpoint, DataPosition, SaveClock
from fora.training.config import TrainConfig
from fora.training.distributed import DistContext, metrics_log, split_batches, sync_adapter_grads
from fora.training.health import StepHealth
from fora.training.interrupt import LiveRun
from fora.training.loop import Batch, Throughput, evaluate, forward_loss, supervised_tokens
from fora.training.progress import Progress
from fora.training.run_data import RunData

log = logging.getLogger("fora.train")

METRICS_FILE = "metrics.jsonl"


@dataclass
class Trainee:
    """The adapted model as the steps see it (`fora.training.run.inject_adapters`)."""

    model: nn.Module              # the CausalLM with its adapters: validated, measured and saved
    engine: nn.Module             # what a step calls: model, DDP(CausalLMLoss(model)) or model sharded
    params: list[nn.Parameter]    # the trainable adapter parameters, clipped as one
    grad_from: int                # the lowest adapted layer: no autograd below it
    stiefel: bool                 # the method keeps a factor on the Stiefel manifold (logged)


@dataclass
class Optimization:
    """The optimizers and what drives them (`fora.training.run.build_optimization`)."""

    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any]  # one LambdaLR per scheduled optimizer, then AdaLoRA's budget step
    per_micro: torch.optim.Optimizer | None  # --cayley-per-micro-batch: Cayley-Adam after each micro-batch
    adalora: AdaLoRAStep | None
    total: int  # the run's optimizer steps


@dataclass
class Losses:
    """(step, loss) of every logged training row and every validation."""

    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)


def manifold_metrics(model: nn.Module, stiefel: bool) -> dict[str, float]:
    """For a Stiefel method's log row: the largest distance from the manifold of any Stiefel
    factor and the largest |gate|, read back in one device sync; nothing for the plain methods."""
    if not stiefel:  # plain LoRA has no manifold to measure
        return {}
    mods = list(lora_modules(model).values())
    errors = [stiefel_residual(CayleyAdam.point(p)) for m in mods if (p := m.stiefel_parameter()) is not None]
    gates = [m.lora_gate.detach().abs() for m in mods if m.lora_gate is not None]
    # the two maxima stay on the device until the one transfer (float64 holds either dtype exactly)
    names = [name for name, xs in (("stiefel_error", errors), ("gate_max", gates)) if xs]
    peaks = [torch.stack([x.double() for x in xs]).max() for xs in (errors, gates) if xs]
    return dict(zip(names, torch.stack(peaks).tolist())) if peaks else {}


def backward(trainee: Trainee, opt: Optimization, group: Sequence[Batch], cfg: TrainConfig, ctx: DistContext,
             device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
             speed: Throughput) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one step's micro-batches, gradients synced and clipped: (loss, grad norm)."""
    n_tokens = ctx.all_sum(supervised_tokens(group))  # of the whole global batch
    step_loss = torch.zeros((), device=device)
    for batch in group:
        loss_sum, _ = forward_loss(trainee.engine, batch, device, grad_from_layer=trainee.grad_from,
                                   autocast=autocast)
        loss = loss_sum / max(n_tokens, 1)  # token-weighted mean over the whole accumulated batch
        (loss * ctx.world).backward()  # DDP / FSDP average the gradients over ranks
        if opt.per_micro is not None:  # the authors' trainer: unclipped, per micro-batch
            opt.per_micro.step()
            opt.per_micro.zero_grad(set_to_none=True)
        step_loss += loss.detach()  # checked for NaN / inf on the device, synced by `health`
        speed.tokens += int(batch["attention_mask"].sum())
    if opt.adalora is not None:
        opt.adalora.backward_regularizer()  # + orth_reg * R, once per step
    sync_adapter_grads(ctx, trainee.params)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    return step_loss, torch.nn.utils.clip_grad_norm_(trainee.params, max_norm)


def update(opt: Optimization) -> None:
    """Step the optimizers (Cayley-Adam already stepped per micro-batch, if so), then the schedulers."""
    for o in opt.optimizers:
        if o is not opt.per_micro:
            o.step()
    for sched in opt.schedulers:  # AdaLoRA's among them: after the optimizers, before zero_grad
        sched.step()
    for o in opt.optimizers:
        o.zero_grad(set_to_none=True)


def train_steps(cfg: TrainConfig, ctx: DistContext, trainee: Trainee, opt: Optimization, data: RunData,
                pad_id: int, ckpt: Checkpoint | None, *, out: Path, live: LiveRun, save: Callable[..., Path],
                device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
                t_start: float, on_step: Callable[[int], None] | None) -> Losses:
    """Step from the checkpoint's position (or the start) to `opt.total`; a last checkpoint at the end.

    `save(position=, seconds=, loss_window=)` writes OUT/checkpoint (`save_checkpoint` with the
    run's model, optimizers and selection bound); `live` lets a Ctrl-C write one at a step boundary.
    """
    model, total = trainee.model, opt.total
    position = ckpt.position if ckpt is not None else DataPosition(0, 0, 0)
    losses = Losses()
    metrics = metrics_log(ctx, out / METRICS_FILE, keep_until_step=position.step if ckpt else None)
    ckpt_dir = ckpt.path if ckpt is not None else None
    # a step's rows are drawn at the global batch size (micro x accumulation x world), then split
    batches_of = split_batches(ctx, partial(epoch_steps, data.train, cfg.batch_size * ctx.world, cfg.grad_accum,
                                            seed=cfg.seed, pad_id=pad_id))
    epoch, b, step = position.epoch, position.batch, position.step
    batches = batches_of(epoch)
    live.out, live.total, live.position = out, total, DataPosition(epoch, b, step)
    health = StepHealth()
    # losses of the steps since the last logged row: a checkpoint keeps them, so that the row a
    # resumed run logs averages the same steps as the uninterrupted run's
    window: list[float] = list(ckpt.loss_window) if ckpt is not None else []

    def save_at(position: DataPosition) -> Path | None:
        window.extend(health.check(ckpt_dir)[0])  # a diverged step is never checkpointed
        return ctx.main_only(save, position=position, seconds=time.perf_counter() - t_start,
                             loss_window=list(window))

    live.save = save_at
    live.stop.armed = True
    progress = live.stack.enter_context(Progress(total, step))
    if step == 0 and data.val_batches:
        val = evaluate(model, progress.validation(data.val_batches, 0, data.val_examples), device, autocast=autocast)
        losses.val.append((0, val))
        metrics.write({"step": 0, "val_loss": val, "seconds": time.perf_counter() - t_start})
        log.info("validation loss at start: %.4f", val)
    speed = Throughput(step, total)
    save_clock = SaveClock(cfg.save_minutes)  # --save-minutes: a checkpoint after that much training
    while step < total:
        ctx.seed_step(cfg.seed, step)  # several processes: dropout streams per (rank, step)
        if live.stop.requested:  # Ctrl-C, deferred to this step boundary
            raise KeyboardInterrupt
        step_loss, grad_norm = backward(trainee, opt, batches[b], cfg, ctx, device, autocast, speed)
        health.record(step + 1, ctx.all_sum_(step_loss), grad_norm)  # the global batch's loss
        update(opt)
        b, step = b + 1, step + 1
        if b >= len(batches):  # epoch done: the position always names the next batch to read
            epoch, b = epoch + 1, 0
            batches = batches_of(epoch)
        live.position = DataPosition(epoch, b, step)
        logging_now = step % cfg.log_every == 0 or step == total
        evaluating = bool(data.val_batches) and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total)
        saving = step < total and ((bool(cfg.save_every) and step % cfg.save_every == 0)
                                   or save_clock.due(ctx))
        if logging_now or evaluating or saving:  # the one device sync of these steps
            step_losses, last_norm = health.check(ckpt_dir)
            window.extend(step_losses)
            grad_norm = last_norm if last_norm is not None else grad_norm

        row, eta = {}, 0.0
        if logging_now:
            tok_s, eta = speed.report(step)
            row = {"step": step, "loss": sum(window) / len(window), "lr": opt.optimizers[-1].param_groups[0]["lr"],
                   "tok_s": tok_s, "grad_norm": float(grad_norm), **manifold_metrics(model, trainee.stiefel),
                   **(opt.adalora.metrics() if opt.adalora else {})}
            losses.train.append((step, row["loss"]))
            window.clear()
        progress.step(step, row or None, eta)
        if evaluating:
            val_batches = progress.validation(data.val_batches, step, data.val_examples)
            row.update(step=step, val_loss=evaluate(model, val_batches, device, autocast=autocast))
            losses.val.append((step, row["val_loss"]))
            log.info("step %d/%d  validation loss %.4f", step, total, row["val_loss"])
        if row:
            metrics.write({**row, "seconds": time.perf_counter() - t_start})
        if saving:
            live.save(live.position)
            ckpt_dir = out / "checkpoint"
            save_clock.restart()
        if on_step is not None:
            on_step(step)
    live.save(live.position)  # a finished run keeps a final checkpoint too
    live.save = None
    return losses
