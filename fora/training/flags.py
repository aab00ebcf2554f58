"""train.py's command line: every `TrainConfig` field as a flag, grouped in `--help` by pipeline stage.

The groups follow the run (`fora.training.run`): load the model and data -> score and select the
layers -> inject the adapters -> optimize -> schedule and checkpoint -> evaluate -> write the outputs,
plus how the processes run. Groups only arrange `--help`; the parsed values are the same.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from fora.formats.gguf_export import TARGETS as EXPORT_TARGETS
from fora.optim import STIEFEL_FACTORS
from fora.training.adalora_hooks import parse_betas
from fora.training.argparser import ArgumentParser, command_name
from fora.training.builtin import BUILTIN_TASKS, DEFAULT_TASK
from fora.training.config import (DTYPES, FIM_STATISTICS, RESUMABLE_FIELDS, SCHEDULES, WARMUP_FRACTION,
                                  TrainConfig)
from fora.training.data import TEMPLATES
from fora.training.distributed import DIST_MODES
from fora.training.methods import METHODS
from fora.training.tasks import PROTOCOLS


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("--targets needs a comma list such as q_proj,v_proj")
    return names


def _method_help() -> str:
    return "; ".join(f"{name}: {spec.description}" for name, spec in METHODS.items())


def build_parser() -> argparse.ArgumentParser:
    """The `scripts/train.py` command line (every flag maps to a `TrainConfig` field)."""
    d = TrainConfig(model="-")
    p = ArgumentParser(
        prog=command_name("train.py"), formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune a decoder LLM with FoRA (Fisher-selected layers, Stiefel-constrained "
                    "LoRA) or one of its ablations; writes a PEFT LoRA adapter to --out.")

    a = p.add_argument_group("model and data", "the base model and the records it trains on").add_argument
    a("--model", required=True, help="preset name (e.g. smollm2-135m), hub repo id, local folder or .gguf file")
    a("--dtype", default=d.dtype, help=f"base weight dtype, one of {', '.join(DTYPES)}; auto = bfloat16 "
      "on CUDA (with bf16 autocast), float32 on CPU. Adapters are always float32. No float16: without "
      "loss scaling its small gradients underflow")
    a("--quantize", default=d.quantize, help="store the base's block linears in 4 bits: nf4 (QLoRA's "
      "NormalFloat, double-quantized constants; QFoRA with --method fora); default full precision")
    a("--data", default=d.data, help="training records: .json/.jsonl file (Alpaca / LLM-Adapters format, or chat "
      f"records {{'messages': [...]}}, in the checkpoint's chat template), hub dataset 'owner/name[:file]' or a "
      f"built-in task ({', '.join(BUILTIN_TASKS)}); default: {DEFAULT_TASK} (CPython documentation cloze, train split)")
    a("--task-size", type=int, default=d.task_size, help="records generated for --data arithmetic")
    a("--template", choices=sorted(TEMPLATES), default=d.template,
      help="prompt template: clean Alpaca, or LLM-Adapters' finetune.py string verbatim")
    a("--cutoff-len", type=int, default=d.cutoff_len, help="truncate each example to this many tokens")

    a = p.add_argument_group("layer selection", "which layers get adapters: the method, K and how the "
                             "layers are scored on calibration batches").add_argument
    a("--method", choices=list(METHODS), default=d.method, help=_method_help())
    a("--k", type=int, default=d.k, help="number of layers to adapt for the top-K methods; default L/2")
    a("--fisher-batches", type=int, default=d.fisher_batches, help="calibration batches N for Fisher (Eq. 2), CKA and FIM-LoRA")
    a("--fisher-params", choices=("block", "targets"), default=d.fisher_params,
      help="theta_l of Eq. 2: every block parameter, or only the target projections")
    a("--selection-from", default=d.selection_from, metavar="RUN", help="reuse the layers the run in folder RUN "
      "selected instead of scoring them again; refused unless that run scored the same model, dtype, "
      "calibration batches, K and Fisher parameters with this method's selector")
    a("--fim-statistic", choices=FIM_STATISTICS, default=d.fim_statistic, help="fim-lora's score of each "
      "LoRA-B gradient over the calibration passes: the uncentered second moment (the reference "
      "code) or the variance (FIM-LoRA's text); summed over B's entries")
    a("--fim-r-min", type=int, default=d.fim_r_min, help="fim-lora: smallest rank of a module")
    a("--fim-r-max", type=int, default=d.fim_r_max, help="fim-lora: largest rank of a module; default "
      "min(4 r, d_in, d_out) (the reference code caps at 2 r)")

    a = p.add_argument_group("adapters", "the LoRA modules injected at the selected layers").add_argument
    a("--targets", type=_targets, default=",".join(d.targets), help="comma list of projections to adapt per layer")
    a("--rank", type=int, default=d.rank, help="LoRA rank r (lora-half-rank uses r/2)")
    a("--alpha", type=float, default=d.alpha, help="LoRA alpha; default 2 * rank (scale s = alpha / r = 2)")
    a("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the adapter input")
    a("--rslora", action="store_true", help="rank-stabilised scale alpha / sqrt(r)")
    a("--stiefel-factor", choices=STIEFEL_FACTORS, default=d.stiefel_factor, help="the factor the Stiefel "
      "methods keep orthonormal: B (FoRA as its authors run it: B column-orthonormal, A ~ N(0, 1/r), a gate "
      "g = 0) or A (the ablation: A rows orthonormal, B = 0)")
    a("--match-init-norm", action="store_true", help="plain-A methods: scale each Kaiming row of A to "
      "unit norm, the row norm of a Stiefel A (Kaiming rows have norm ~1/sqrt(3)), so the 2x2 "
      "ablation starts both arms at the same ||dW|| scale")

    a = p.add_argument_group("adalora", "the rank budget and its schedule (--method adalora only)").add_argument
    a("--init-r", type=int, default=d.init_r, help="adalora: triplets per module at the start; default round(1.5 * rank)")
    a("--target-r", type=int, default=d.target_r, help="adalora: average rank after budgeting; default --rank")
    a("--tinit", type=int, default=d.tinit, help="adalora: steps before pruning starts; default 10%% of the run")
    a("--tfinal", type=int, default=d.tfinal, help="adalora: last steps with the final rank pattern fixed; "
      "default 20%% of the run")
    a("--delta-t", type=int, default=d.delta_t, help="adalora: mask to the budget every N steps while budgeting")
    a("--orth-reg", type=float, default=d.orth_reg, help="adalora: weight of the orthogonality regulariser")
    a("--adalora-betas", type=parse_betas, default=",".join(map(str, d.adalora_betas)),
      help="adalora: EMA betas of the sensitivity and uncertainty, 'b1,b2'")

    a = p.add_argument_group("optimization", "Cayley-Adam for the Stiefel factor, AdamW for the rest, "
                             "and the batch each step sees").add_argument
    a("--lr", type=float, default=d.lr, help="AdamW learning rate, on the schedule (A and the gate for FoRA; "
      "every factor for the plain-LoRA methods)")
    a("--stiefel-lr", type=float, default=d.stiefel_lr, help="Cayley-Adam step for the Stiefel factor: with B "
      "the constant cap of alpha = min(lr, 1/||W||_1), default 1e-3; with A the step length, default "
      "lr * sqrt(r * d_in) per A (same Frobenius step as AdamW on a plain A)")
    a("--stiefel-lr-scale", type=float, default=d.stiefel_lr_scale, help="multiplies Cayley-Adam's step (0.25: a quarter)")
    a("--qr-every", type=int, default=d.qr_every, help="Cayley-Adam QR retraction every T steps (0 = never; the authors' code: 100, "
      "the paper's Table 10 may say 200)")
    a("--cayley-per-micro-batch", action="store_true", help="step Cayley-Adam after every micro-batch's "
      "backward, before gradient clipping, as the authors' trainer does (a control; default: once per "
      "optimizer step, after clipping)")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (never on the Stiefel factor)")
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the global grad norm of all "
      "adapter parameters (A and B) before every optimizer sees them; 0 disables")
    a("--batch-size", type=int, default=d.batch_size, help="micro-batch size (sequences per forward)")
    a("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")

    a = p.add_argument_group("schedule and checkpoints", "how long the run trains, its learning-rate "
                             "schedule, its log and where it can continue from").add_argument
    a("--epochs", type=int, default=d.epochs, help="passes over the training data (ignored with --max-steps)")
    a("--max-steps", type=int, default=d.max_steps, help="optimizer steps to run (overrides --epochs)")
    a("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warmup steps; "
      f"default {WARMUP_FRACTION:.0%}% of the run's optimizer steps")  # %% for argparse
    a("--schedule", choices=SCHEDULES, default=d.schedule, help="decay after warmup")
    a("--log-every", type=int, default=d.log_every, help="progress line + metrics.jsonl row every N steps")
    a("--save-every", type=int, default=d.save_every, help="checkpoint every N steps into OUT/checkpoint (0 = never)")
    a("--save-minutes", type=float, default=d.save_minutes, help="also checkpoint when this many minutes of "
      "training have passed since the last checkpoint, whichever of the two comes first (0 = never by time)")
    a("--resume", default=d.resume, help="continue the run whose --out folder (or checkpoint/ folder) is given")

    a = p.add_argument_group("evaluation", "the validation loss during training and the held-out "
                             "accuracy before and after it").add_argument
    a("--val-size", type=int, default=d.val_size, help="held-out validation records (0 = none)")
    a("--eval-every", type=int, default=d.eval_every, help="validation loss every N steps (0 = only start and end)")
    a("--eval-data", default=d.eval_data, help="scored after training, adapters off (the base) and on: "
      "'builtin' (the cloze task's held-out test split), a test .json/.jsonl file or folder "
      "(LLM-Adapters layout), or 'none'; default builtin when training on the cloze task, else none. "
      "Written to OUT/eval.json")
    a("--eval-limit", type=int, default=d.eval_limit, help="score only the first N records of each "
      "evaluation task; default all")
    a("--protocol", choices=PROTOCOLS, default=d.protocol, help="accuracy protocol of the end-of-run "
      "evaluation: loglik (rank the choices by log-likelihood) or generate (greedy decoding)")

    a = p.add_argument_group("output", "what the run writes besides the PEFT adapter").add_argument
    a("--out", default=d.out, help="output folder; default runs/<model>-<method>-k<K>")
    a("--merge", action="store_true", help="also write OUT/merged: the base with W0 + s B A folded in")
    a("--export", choices=EXPORT_TARGETS, default=d.export, help="after training, also write the run as "
      "GGUF for llama.cpp / ollama at f16 (scripts/export.py RUN --to ...): gguf-lora (the adapter), merged "
      "(base with the adapter folded in) or gguf (the base)")

    a = p.add_argument_group("runtime", "devices, processes, speed and the seed").add_argument
    a("--device", default=d.device, help="cpu, cuda, cuda:1, ...; auto = cuda when available")
    a("--distributed", choices=DIST_MODES, default=d.distributed, help="under torchrun: ddp (base replicated "
      "per GPU) or fsdp (base sharded per block, adapters replicated); --batch-size stays per process")
    a("--compile", action="store_true", help="torch.compile each decoder block (regional); eager with a "
      "warning where torch.compile does not work (docs/performance.md)")
    a("--activation-checkpointing", action="store_true",
      help="recompute each block's activations in backward: less activation memory, about one more forward")
    a("--seed", type=int, default=d.seed, help="seeds data split/order, LoRA init, random-k and dropout")
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """argv -> TrainConfig (argparse exits with a usage message on bad flags).

    With `--resume DIR` the settings are read from the run's train_config.json
    (`fora.training.resume`); `--model` is then not needed.
    """
    from fora.training.resume import resume_from_cli

    resumed = resume_from_cli(build_parser, argv, TrainConfig, RESUMABLE_FIELDS)
    if resumed is not None:
        return resumed
    ns = vars(build_parser().parse_args(argv))
    try:
        return TrainConfig(**ns)
    except ValueError as err:
        build_parser().error(str(err))
        raise  # unreachable: error() exits
