"""`main(cfg)`: one fine-tuning run, read top to bottom in `_main`.

load (what can be checked first, then the tokenizer, the data and the weights) -> score and select
the layers (Fisher / CKA / FIM / random / all, see `fora.training.methods`) -> inject LoRA at the
selected layers and freeze the base -> train (CayleyAdam for the Stiefel factor + AdamW for the
rest, warmup + decay, the steps in `fora.training.steps`) -> save the PEFT adapter, evaluate,
write the model card (+ merged model) in `--out`. Each stage is a small function below.
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

from fora.defaults import default_k
from fora.formats.atomic import atomic_write_json, atomic_write_text
from fora.formats.hub import resolve_checkpoint
from fora.formats.loading import load_model, load_tokenizer, read_config
from fora.formats.peft_io import save_adapter, save_merged
from fora.inject import freeze_base, inject_lora, lora_modules
from fora.models.speed import checkpoint_blocks, compile_blocks
from fora.optim import build_optimizers, scheduled
from fora.training.adalora_hooks import AdaLoRAStep, init_rank, schedule_of
from fora.training.checkpoint import CONFIG_FILE, SELECTION_FILE, Checkpoint, restore_training_state, save_checkpoint
from fora.training.config import TrainConfig, warmup_steps
from fora.training.distributed import DistContext, distributed_select, init_distributed, load_device, wrap_model
from fora.training.init_norm import unit_row_norms
from fora.training.interrupt import LiveRun, checkpoint_on_interrupt
from fora.training.loop import autocast_context, lr_lambda
from fora.training.methods import (CALIBRATED_SELECTORS, METHODS, MethodSpec, SelectArgs, Selection, method_rank,
                                   selection_json)
from fora.training.model_card import README_FILE, gguf_source, model_card
from fora.training.model_card import base_model_id as _hub_base_model_id
from fora.training.resume import out_folder, prepare_out, refuse_foreign_out
from fora.training.run_data import RunData, data_sha256, prepare_data, run_records  # noqa: F401 - re-exported
from fora.training.selection_reuse import reused_selection
from fora.training.steps import METRICS_FILE, Optimization, Trainee, train_steps  # noqa: F401 - re-exported

log = logging.getLogger("fora.train")

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
    """The run as a page: check -> load -> score and select -> inject -> train -> save and evaluate."""
    # check: the processes, then what can be checked without the model, then OUT (locked, or resumed)
    t_start = time.perf_counter()
    device, dtype = resolve_device_dtype(cfg)
    ctx = init_distributed(cfg.distributed, device.type)  # torchrun's process group, or one process
    cfg, device = replace(cfg, world_size=ctx.world), ctx.device(device)
    records = check_inputs(cfg, final_eval)
    folder = resolve_checkpoint(cfg.model)
    num_layers = read_config(folder).num_hidden_layers  # checked before the weights load
    with ctx.main_first():  # rank 0 may repair a half-published checkpoint before the others read it
        out, ckpt = prepare_out(cfg, stack=live.stack, main=ctx.main)  # out locked for this process
    t_start -= ckpt.seconds if ckpt is not None else 0.0  # timings continue across a resume
    seed_everything(cfg.seed)
    spec = METHODS[cfg.method]

    # load: the tokenizer and the data before the weights, so that their errors come first
    k = layers_to_adapt(cfg, num_layers)
    tok = load_tokenizer(folder)
    data = load_data(cfg, ctx, tok, folder, records, calibrate=ckpt is None and spec.selector in CALIBRATED_SELECTORS)
    write_config(cfg, ctx, out)
    model = load_model(folder, dtype=dtype, device=load_device(ctx, device), quantize=cfg.quantize)

    # score and select the layers (on the base model; a resumed run reuses its selection)
    rank = init_rank(cfg) if spec.adalora else method_rank(cfg.method, cfg.rank)
    sel, record = score_and_select(cfg, ctx, model, data, num_layers, k, rank, ckpt)

    # inject the adapters
    trainee = inject_adapters(model, cfg, spec, sel, rank, ctx, device, fresh=ckpt is None)

    # train
    opt = build_optimization(model, cfg, spec, ctx, len(data.train), ckpt)
    base = base_model_id(cfg, folder)
    save = partial(save_checkpoint, out / "checkpoint", model=model, optimizers=opt.optimizers,
                   schedulers=opt.schedulers, selection=record, config=cfg.to_dict(), base_model_name_or_path=base)
    autocast = partial(autocast_context, device, dtype)
    losses = train_steps(cfg, ctx, trainee, opt, data, tok.pad_id, ckpt, out=out, live=live, save=save,
                         device=device, autocast=autocast, t_start=t_start, on_step=on_step)

    # save the adapter first (a failed evaluation keeps it), then evaluate, then the card and the merged model
    result = TrainResult(out, sorted(sel.layers), opt.total, losses.val, losses.train)
    save_adapters(model, ctx, out, base, rank, record, opt.adalora)
    result.eval, table = evaluate_at_end(model, tok, cfg, ctx, out, final_eval, autocast)
    write_card(cfg, ctx, out, folder, base, sorted(sel.layers), table)
    if cfg.merge:
        ctx.main_only(save_merged, model, out / "merged", source_dir=folder)
    result.seconds = time.perf_counter() - t_start
    log_summary(result)
    return result


def check_inputs(cfg: TrainConfig, final_eval: FinalEval | None) -> list[dict]:
    """What can be checked without the model, before anything slow (a download, a conversion, the weights)."""
    refuse_foreign_out(out_folder(cfg))
    records = run_records(cfg)
    check_eval = getattr(final_eval, "check", None)  # the final evaluation's data, read and checked
    if check_eval is not None and cfg.final_eval_data != "none":
        check_eval(cfg)
    return records


def seed_everything(seed: int) -> None:
    """Seed dropout (torch), `random` and numpy; the LoRA init and the data order have their own seeded streams."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def layers_to_adapt(cfg: TrainConfig, num_layers: int) -> int:
    """K: `--k`, checked against the model's L, or L/2 by default (`fora.defaults.default_k`)."""
    if cfg.k is not None and cfg.k > num_layers:
        raise ValueError(f"--k {cfg.k} exceeds the number of layers of {cfg.model} (L={num_layers}); "
                         f"choose --k between 1 and {num_layers}")
    return cfg.k or default_k(num_layers)


def load_data(cfg: TrainConfig, ctx: DistContext, tok: Any, folder: Path, records: list[dict], *,
              calibrate: bool) -> RunData:
    """Tokenized training examples plus validation (and, with `calibrate`, calibration) batches."""
    # calibration and validation batches are global batches: those of the one-process run
    return prepare_data(replace(cfg, batch_size=cfg.batch_size * ctx.world), tok, need_calibration=calibrate,
                        records=records, folder=folder)


def write_config(cfg: TrainConfig, ctx: DistContext, out: Path) -> None:
    """OUT/train_config.json, written once the data has been read (rank 0)."""
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG_FILE, cfg.to_dict())


def score_and_select(cfg: TrainConfig, ctx: DistContext, model: nn.Module, data: RunData, num_layers: int, k: int,
                     rank: int, ckpt: Checkpoint | None) -> tuple[Selection, dict]:
    """The layers to adapt and their selection.json record (a resumed run reuses its own)."""
    if ckpt is not None:
        record = ckpt.selection
        sel = Selection(record["selected"], record["scores"], record["rank_pattern"])
    elif cfg.selection_from is not None:
        sel, record = reused_selection(cfg.selection_from, selector=METHODS[cfg.method].selector,
                                       config=cfg.to_dict(), calibration=data.calibration,
                                       num_layers=num_layers, k=k, rank=rank)
    else:
        args = SelectArgs(model, data.calibration, num_layers, k, rank, cfg.targets, cfg.seed, cfg.fisher_params,
                          cfg.fim_statistic, cfg.fim_r_min, cfg.fim_r_max)
        sel = distributed_select(ctx, cfg.method, args)
        record = selection_json(cfg.method, sel, data.calibration, num_layers=num_layers,
                                data_sha256=data.sha256, seed=cfg.seed, rank=rank, args=args)
    log.info("method %s: adapting %d of %d layers: %s", cfg.method, len(sel.layers), num_layers, sel.layers)
    return sel, record


def inject_adapters(model: nn.Module, cfg: TrainConfig, spec: MethodSpec, sel: Selection, rank: int,
                    ctx: DistContext, device: torch.device, *, fresh: bool) -> Trainee:
    """LoRA at the selected layers, the base frozen, the model in training mode and wrapped for the processes."""
    inject_lora(model, sel.layers, targets=cfg.targets, rank=rank, alpha=cfg.alpha, stiefel=spec.stiefel,
                stiefel_factor=cfg.stiefel_factor, rank_pattern=sel.rank_pattern, dropout=cfg.lora_dropout,
                rslora=cfg.rslora, seed=cfg.seed, adapter=spec.adapter)
    if cfg.match_init_norm and not (spec.stiefel or spec.adalora) and fresh:
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
    return Trainee(model, engine, params, min(sel.layers), spec.stiefel)


def build_optimization(model: nn.Module, cfg: TrainConfig, spec: MethodSpec, ctx: DistContext, n_train: int,
                       ckpt: Checkpoint | None) -> Optimization:
    """The optimizers and their schedules over the run's steps, restored from `ckpt` when resuming."""
    optimizers = build_optimizers(model, cfg.lr, stiefel=spec.stiefel, stiefel_factor=cfg.stiefel_factor,
                                  stiefel_lr=cfg.stiefel_lr, stiefel_lr_scale=cfg.stiefel_lr_scale,
                                  weight_decay=cfg.weight_decay, qr_every=cfg.qr_every)
    per_micro = optimizers[0] if spec.stiefel and cfg.cayley_per_micro_batch else None
    steps_per_epoch = math.ceil(n_train / (cfg.batch_size * ctx.world * cfg.grad_accum))
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    schedule = lr_lambda(cfg.schedule, warmup_steps(cfg, total), total)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in scheduled(optimizers)]
    adalora = AdaLoRAStep(model, schedule_of(cfg, total)) if spec.adalora else None
    schedulers += [adalora] if adalora else []  # it steps where they do: after the optimizers, before zero_grad
    if ckpt is not None:
        restore_training_state(ckpt, model, optimizers, schedulers)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt.path, ckpt.position.step,
                 ckpt.position.epoch, ckpt.position.batch)
    return Optimization(optimizers, schedulers, per_micro, adalora, total)


def save_adapters(model: nn.Module, ctx: DistContext, out: Path, base: str, rank: int, record: dict,
                  adalora: AdaLoRAStep | None) -> None:
    """The PEFT adapter in OUT (with selection.json), and for AdaLoRA its plain-LoRA twin in OUT/lora."""
    ctx.main_only(save_adapter, model, out, base_model_name_or_path=base, r=rank,
                  extra_files={SELECTION_FILE: record}, adalora_schedule=adalora.schedule if adalora else None)
    if adalora is not None:  # for serving stacks without AdaLoRA
        adalora.save_folded(model, out / "lora", base_model_name_or_path=base)


def evaluate_at_end(model: nn.Module, tok: Any, cfg: TrainConfig, ctx: DistContext, out: Path,
                    final_eval: FinalEval | None, autocast: Callable) -> tuple[dict | None, str | None]:
    """The held-out accuracy before and after training into OUT/eval.json: (report, table), or (None, None)."""
    if final_eval is None or cfg.final_eval_data == "none":
        return None, None
    report, table = final_eval(model, tok, cfg, autocast)  # every rank scores: a sharded forward is a collective
    ctx.main_only(atomic_write_json, out / EVAL_FILE, {"eval_data": cfg.final_eval_data, **report})
    return report, table


def write_card(cfg: TrainConfig, ctx: DistContext, out: Path, folder: Path, base: str, layers: list[int],
               table: str | None) -> None:
    """OUT/README.md: the model card peft and the hub read, with the evaluation table when there is one."""
    ctx.main_only(atomic_write_text, out / README_FILE, model_card(base, method=cfg.method, layers=layers,
                  gguf=gguf_source(folder), evaluation=table))


def log_summary(result: TrainResult) -> None:
    """The run's last log lines: the validation loss from start to end, the time, where the adapter is."""
    if len(result.val_losses) > 1:
        log.info("validation loss %.4f at start -> %.4f at step %d", result.val_losses[0][1],
                 result.val_losses[-1][1], result.val_losses[-1][0])
    log.info("done: %d steps in %.0f s; adapter in %s", result.steps, result.seconds, result.out)


train = main
