"""`main(cfg)`: one fine-tuning run, read top to bottom.

data, --out and the final evaluation's data checked -> tokenizer and tokenized data -> model -> layer selection (Fisher / CKA / FIM / random / all, see
`fora.training.methods`) -> inject LoRA at the selected layers -> freeze the base -> CayleyAdam for the
Stiefel A's + AdamW for the B's -> warmup + decay -> loop (gradient accumulation, clipping,
checkpoints, validation) -> PEFT adapter (+ merged model) in `--out`.

Gradient clipping (decision): the global norm over *all* adapter parameters (A and B) is clipped
before any optimizer steps, so CayleyAdam sees the clipped gradient of A. Clipping only rescales G,
and Cayley-Adam's step is invariant to a constant rescaling of G up to its eps (scalar second
moment), so clipping mostly matters for B.

Backward stops at the lowest adapted layer: the forward runs the embedding and the layers below
it without autograd (`grad_from_layer`), which gives the same gradients for less work.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fora.formats.atomic import atomic_write_json, atomic_write_text
from fora.formats.hub import resolve_checkpoint
from fora.formats.loading import load_model, load_tokenizer, read_config
from fora.formats.peft_io import save_adapter, save_merged
from fora.inject import freeze_base, inject_lora, lora_modules
from fora.models.speed import checkpoint_blocks, compile_blocks
from fora.cayley_adam import CayleyAdam
from fora.optim import build_optimizers, scheduled
from fora.stiefel import stiefel_residual
from fora.training.adalora_hooks import AdaLoRAStep, init_rank, schedule_of
from fora.training.batching import epoch_steps
from fora.training.checkpoint import CONFIG_FILE, DataPosition, SaveClock, restore_training_state, save_checkpoint
from fora.training.config import TrainConfig, warmup_steps
from fora.training.distributed import (distributed_select, init_distributed, load_device, metrics_log, split_batches,
                                       sync_adapter_grads, wrap_model)
from fora.training.health import StepHealth
from fora.training.init_norm import unit_row_norms
from fora.training.interrupt import LiveRun, checkpoint_on_interrupt
from fora.training.loop import Throughput, autocast_context, evaluate, forward_loss, lr_lambda, supervised_tokens
from fora.training.methods import CALIBRATED_SELECTORS, METHODS, SelectArgs, Selection, method_rank, selection_json
from fora.training.model_card import README_FILE, gguf_source, model_card
from fora.training.model_card import base_model_id as _hub_base_model_id
from fora.training.progress import Progress
from fora.training.resume import out_folder, prepare_out, refuse_foreign_out
from fora.training.run_data import RunData, data_sha256, prepare_data, run_records  # noqa: F401 - re-exported

log = logging.getLogger("fora.train")

SELECTION_FILE = "selection.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
# (model, tokenizer, cfg, autocast) -> (report, Markdown table): fora.evaluation.final_eval.final_evaluation
FinalEval = Callable[[nn.Module, Any, TrainConfig, Callable], tuple[dict, str]]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    """What a finished run reports (the files in `out` hold the same and more)."""

    out: Path
    selected: list[int]
    steps: int
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    eval: dict | None = None  # the end-of-run evaluation (OUT/eval.json), when there is one


def resolve_device_dtype(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """`--device auto` = CUDA when available; `--dtype auto` = bf16 on CUDA, fp32 elsewhere."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if cfg.dtype == "auto" \
        else _DTYPES[cfg.dtype]
    return device, dtype


def base_model_id(cfg: TrainConfig, folder: Path) -> str:
    """What `adapter_config.json` names as the base (see `fora.training.model_card.base_model_id`)."""
    return _hub_base_model_id(cfg.model, folder)


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


def main(cfg: TrainConfig, *, on_step: Callable[[int], None] | None = None,
         final_eval: FinalEval | None = None) -> TrainResult:
    """Run one training job described by `cfg`; returns losses and where the outputs are.

    `on_step(step)` is called after every optimizer step (and its checkpoint); tests use it to
    simulate a crash. `final_eval` (train.py passes `fora.evaluation.final_eval.final_evaluation`)
    scores `cfg.final_eval_data` on the trained model at the end, into OUT/eval.json and the model
    card. Raises `TrainingDiverged` on a NaN / inf loss or gradient norm, and
    `TrainingInterrupted` on Ctrl-C in the loop, after writing a checkpoint at the last finished
    step (`fora.training.interrupt`).
    """
    with checkpoint_on_interrupt() as live:
        return _main(cfg, on_step, final_eval, live)


def _main(cfg: TrainConfig, on_step: Callable[[int], None] | None, final_eval: FinalEval | None,
          live: LiveRun) -> TrainResult:
    t_start = time.perf_counter()
    device, dtype = resolve_device_dtype(cfg)
    ctx = init_distributed(cfg.distributed, device.type)  # torchrun's process group, or one process
    cfg, device = replace(cfg, world_size=ctx.world), ctx.device(device)
    # what can be checked without the model, before anything slow (a download, a conversion, the weights)
    refuse_foreign_out(out_folder(cfg))
    records = run_records(cfg)
    check_eval = getattr(final_eval, "check", None)  # the final evaluation's data, read and checked
    if check_eval is not None and cfg.final_eval_data != "none":
        check_eval(cfg)
    folder = resolve_checkpoint(cfg.model)
    model_config = read_config(folder)  # checked before the weights load
    with ctx.main_first():  # rank 0 may repair a half-published checkpoint before the others read it
        out, ckpt = prepare_out(cfg, stack=live.stack, main=ctx.main)  # out locked for this process
    t_start -= ckpt.seconds if ckpt is not None else 0.0  # timings continue across a resume
    torch.manual_seed(cfg.seed)  # dropout; the LoRA init and the data order have their own seeded streams
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    spec = METHODS[cfg.method]

    # 1. tokenizer (the model loads after the data)
    L = model_config.num_hidden_layers
    if cfg.k is not None and cfg.k > L:
        raise ValueError(f"--k {cfg.k} exceeds the number of layers of {cfg.model} (L={L}); "
                         f"choose --k between 1 and {L}")
    tok = load_tokenizer(folder)
    k = cfg.k or max(1, L // 2)  # PAPER.md §3: default K = L/2

    # 2. data, tokenized before the weights load (so that its errors come first)
    # (calibration and validation batches are global batches: those of the one-process run)
    data = prepare_data(replace(cfg, batch_size=cfg.batch_size * ctx.world), tok,
                        need_calibration=ckpt is None and spec.selector in CALIBRATED_SELECTORS, records=records,
                        folder=folder)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG_FILE, cfg.to_dict())
    model = load_model(folder, dtype=dtype, device=load_device(ctx, device), quantize=cfg.quantize)

    # 3. layer selection (computed once on the base model; a resumed run reuses the saved one)
    rank = init_rank(cfg) if spec.adalora else method_rank(cfg.method, cfg.rank)
    if ckpt is not None:
        record = ckpt.selection
        sel = Selection(record["selected"], record["scores"], record["rank_pattern"])
    else:
        args = SelectArgs(model, data.calibration, L, k, rank, cfg.targets, cfg.seed, cfg.fisher_params,
                          cfg.fim_statistic, cfg.fim_r_min, cfg.fim_r_max)
        sel = distributed_select(ctx, cfg.method, args)
        record = selection_json(cfg.method, sel, data.calibration, num_layers=L,
                                data_sha256=data.sha256, seed=cfg.seed, rank=rank, args=args)
    log.info("method %s: adapting %d of %d layers: %s", cfg.method, len(sel.layers), L, sel.layers)

    # 4. adapters, optimizers, schedules
    inject_lora(model, sel.layers, targets=cfg.targets, rank=rank, alpha=cfg.alpha, stiefel=spec.stiefel,
                stiefel_factor=cfg.stiefel_factor,
                rank_pattern=sel.rank_pattern, dropout=cfg.lora_dropout, rslora=cfg.rslora, seed=cfg.seed,
                dora=spec.dora, adalora=spec.adalora)
    if cfg.match_init_norm and not (spec.stiefel or spec.adalora) and ckpt is None:
        unit_row_norms(model)  # plain A rows at the Stiefel A's unit norm (fora.training.init_norm)
    freeze_base(model)
    model.train()
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    if cfg.compile:
        compile_blocks(model, device)
    engine = wrap_model(ctx, model, device)  # the step calls model, DDP(CausalLMLoss(model)) or model sharded
    params = [p for p in model.parameters() if p.requires_grad]
    log.info("trainable parameters: %d (%d LoRA modules)", sum(p.numel() for p in params), len(lora_modules(model)))
    optimizers = build_optimizers(model, cfg.lr, stiefel=spec.stiefel, stiefel_factor=cfg.stiefel_factor,
                                  stiefel_lr=cfg.stiefel_lr, stiefel_lr_scale=cfg.stiefel_lr_scale,
                                  weight_decay=cfg.weight_decay, qr_every=cfg.qr_every)
    per_micro = optimizers[0] if spec.stiefel and cfg.cayley_per_micro_batch else None
    steps_per_epoch = math.ceil(len(data.train) / (cfg.batch_size * ctx.world * cfg.grad_accum))
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    schedule = lr_lambda(cfg.schedule, warmup_steps(cfg, total), total)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in scheduled(optimizers)]
    adalora = AdaLoRAStep(model, schedule_of(cfg, total)) if spec.adalora else None
    schedulers += [adalora] if adalora else []  # it steps where they do: after the optimizers, before zero_grad
    position = DataPosition(0, 0, 0)
    if ckpt is not None:
        restore_training_state(ckpt, model, optimizers, schedulers)
        position = ckpt.position
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt.path, position.step,
                 position.epoch, position.batch)

    # 5. the loop
    result = TrainResult(out, sorted(sel.layers), total)
    metrics = metrics_log(ctx, out / METRICS_FILE, keep_until_step=position.step if ckpt else None)
    autocast = partial(autocast_context, device, dtype)
    grad_from = min(sel.layers)
    ckpt_dir = ckpt.path if ckpt is not None else None
    # a step's rows are drawn at the global batch size (micro x accumulation x world), then split
    batches_of = split_batches(ctx, partial(epoch_steps, data.train, cfg.batch_size * ctx.world, cfg.grad_accum,
                                            seed=cfg.seed, pad_id=tok.pad_id))
    epoch, b, step = position.epoch, position.batch, position.step
    batches = batches_of(epoch)
    save = partial(save_checkpoint, out / "checkpoint", model=model, optimizers=optimizers, schedulers=schedulers,
                   selection=record, config=cfg.to_dict(), base_model_name_or_path=base_model_id(cfg, folder))
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
        result.val_losses.append((0, val))
        metrics.write({"step": 0, "val_loss": val, "seconds": time.perf_counter() - t_start})
        log.info("validation loss at start: %.4f", val)
    speed = Throughput(step, total)
    save_clock = SaveClock(cfg.save_minutes)  # --save-minutes: a checkpoint after that much training
    while step < total:
        ctx.seed_step(cfg.seed, step)  # several processes: dropout streams per (rank, step)
        if live.stop.requested:  # Ctrl-C, deferred to this step boundary
            raise KeyboardInterrupt
        group = batches[b]  # this step's micro-batches
        n_tokens = ctx.all_sum(supervised_tokens(group))  # of the whole global batch
        step_loss = torch.zeros((), device=device)
        for batch in group:
            loss_sum, _ = forward_loss(engine, batch, device, grad_from_layer=grad_from, autocast=autocast)
            loss = loss_sum / max(n_tokens, 1)  # token-weighted mean over the whole accumulated batch
            (loss * ctx.world).backward()  # DDP / FSDP average the gradients over ranks
            if per_micro is not None:  # the authors' trainer: unclipped, per micro-batch
                per_micro.step()
                per_micro.zero_grad(set_to_none=True)
            step_loss += loss.detach()  # checked for NaN / inf on the device, synced by `health`
            speed.tokens += int(batch["attention_mask"].sum())
        if adalora is not None:
            adalora.backward_regularizer()  # + orth_reg * R, once per step
        sync_adapter_grads(ctx, params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        health.record(step + 1, ctx.all_sum_(step_loss), grad_norm)  # the global batch's loss
        for opt in optimizers:
            if opt is not per_micro:
                opt.step()
        for sched in schedulers:
            sched.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
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
            losses, last_norm = health.check(ckpt_dir)
            window.extend(losses)
            grad_norm = last_norm if last_norm is not None else grad_norm

        row, eta = {}, 0.0
        if logging_now:
            tok_s, eta = speed.report(step)
            row = {"step": step, "loss": sum(window) / len(window), "lr": optimizers[-1].param_groups[0]["lr"],
                   "tok_s": tok_s, "grad_norm": float(grad_norm), **manifold_metrics(model, spec.stiefel),
                   **(adalora.metrics() if adalora else {})}
            result.train_losses.append((step, row["loss"]))
            window.clear()
        progress.step(step, row or None, eta)
        if evaluating:
            val_batches = progress.validation(data.val_batches, step, data.val_examples)
            row.update(step=step, val_loss=evaluate(model, val_batches, device, autocast=autocast))
            result.val_losses.append((step, row["val_loss"]))
            log.info("step %d/%d  validation loss %.4f", step, total, row["val_loss"])
        if row:
            metrics.write({**row, "seconds": time.perf_counter() - t_start})
        if saving:
            live.save(live.position)
            ckpt_dir = out / "checkpoint"
            save_clock.restart()
        if on_step is not None:
            on_step(step)

    # 6. outputs (a finished run keeps a final checkpoint too)
    live.save(live.position)
    live.save = None
    ctx.main_only(save_adapter, model, out, base_model_name_or_path=base_model_id(cfg, folder), r=rank,
                  extra_files={SELECTION_FILE: record}, adalora_schedule=adalora.schedule if adalora else None)
    if adalora is not None:  # and its plain-LoRA twin for serving stacks without AdaLoRA
        adalora.save_folded(model, out / "lora", base_model_name_or_path=base_model_id(cfg, folder))
    table = None
    if final_eval is not None and cfg.final_eval_data != "none":  # every rank scores (a sharded forward
        result.eval, table = final_eval(model, tok, cfg, autocast)  # is a collective); rank 0 writes
        ctx.main_only(atomic_write_json, out / EVAL_FILE, {"eval_data": cfg.final_eval_data, **result.eval})
    ctx.main_only(atomic_write_text, out / README_FILE, model_card(base_model_id(cfg, folder), method=cfg.method,
                  layers=sorted(sel.layers), gguf=gguf_source(folder), evaluation=table))
    if cfg.merge:
        ctx.main_only(save_merged, model, out / "merged", source_dir=folder)
    result.seconds = time.perf_counter() - t_start
    if len(result.val_losses) > 1:
        log.info("validation loss %.4f at start -> %.4f at step %d", result.val_losses[0][1],
                 result.val_losses[-1][1], result.val_losses[-1][0])
    log.info("done: %d steps in %.0f s; adapter in %s", total, result.seconds, out)
    return result


train = main
