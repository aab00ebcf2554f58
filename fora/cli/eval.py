"""Accuracy on LLM-Adapters-format test sets and sliding-window perplexity, with or without an adapter.

    python scripts/eval.py --model smollm2-135m --data dataset/ --limit 100
    python scripts/eval.py --model smollm2-135m --adapter runs/smollm2-135m-fora-k15 --data dataset/boolq/test.json \\
        --protocol loglik --out results/REPORT.json
    python scripts/eval.py --model gemma-3-270m --ppl wiki.test.raw --window 1024 --stride 512

--data is one JSON/JSONL file (task = file stem, or the parent folder's name for .../boolq/test.json)
or a folder laid out like LLM-Adapters' dataset/ (one sub-folder per task holding test.json).
--adapter is a folder written by fora's trainer or by peft (any LoRA adapter of a supported base).
Prints a table per task and the average; --out writes REPORT.json and predictions.jsonl beside it.
Thin and importable: argparse -> `EvalConfig` -> `main(cfg)`, which returns the report.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fora.training.argparser import ArgumentParser, command_name


@dataclass(frozen=True)
class EvalConfig:
    model: str = "smollm2-135m"
    adapter: str | None = None
    data: str | None = None
    protocol: str = "generate"
    template: str = "alpaca"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 32
    out: str | None = None
    ppl: str | None = None
    window: int = 1024
    stride: int = 512
    dtype: str | None = None
    device: str | None = None
    progress: bool = True


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EvalConfig.model,
                   help="preset name, hub repo id, checkpoint folder or .gguf file (default: %(default)s)")
    p.add_argument("--adapter", help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--data", help="test file (.json/.jsonl) or a folder of <task>/test.json")
    p.add_argument("--protocol", default="generate", choices=["generate", "loglik"])
    p.add_argument("--template", default="alpaca", choices=["alpaca", "llm-adapters", "llm-adapters-eval"],
                   help="prompt template: the one the adapter was trained with (llm-adapters-eval: "
                        "LLM-Adapters' evaluation prompt)")
    p.add_argument("--limit", type=int, help="evaluate the first N records of each task")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens)
    p.add_argument("--out", help="REPORT.json path; predictions.jsonl is written beside it")
    p.add_argument("--ppl", metavar="TEXT_FILE", help="also report the sliding-window perplexity of a text file")
    p.add_argument("--window", type=int, default=EvalConfig.window, help="tokens per window (--ppl)")
    p.add_argument("--stride", type=int, default=EvalConfig.stride, help="new tokens scored per window (--ppl)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.data is None and a.ppl is None:
        p.error("nothing to evaluate: pass --data FILE_OR_FOLDER and/or --ppl TEXT_FILE")
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be at least 1 (got {a.limit}); leave it out to evaluate every record")
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if a.ppl is not None and not 1 <= a.stride < a.window:
        p.error(f"--stride must be in [1, --window - 1]; got --stride {a.stride} --window {a.window}")
    return EvalConfig(model=a.model, adapter=a.adapter, data=a.data, protocol=a.protocol,
                      template=a.template, limit=a.limit, batch_size=a.batch_size,
                      max_new_tokens=a.max_new_tokens, out=a.out, ppl=a.ppl, window=a.window,
                      stride=a.stride, dtype=a.dtype, device=a.device, progress=not a.no_progress)


def format_table(report: dict) -> str:
    """One row per task (n, accuracy[, acc_norm]) and the unweighted average."""
    norm = report.get("protocol") == "loglik"
    head = f"{'task':<16} {'n':>6} {'accuracy':>9}" + (f" {'acc_norm':>9}" if norm else "")
    lines = [head, "-" * len(head)]
    for name, row in report["tasks"].items():
        lines.append(f"{name:<16} {row['n']:>6} {row['accuracy']:>9.4f}"
                     + (f" {row['acc_norm']:>9.4f}" if norm else ""))
    lines.append("-" * len(head))
    n = sum(r["n"] for r in report["tasks"].values())
    lines.append(f"{'average':<16} {n:>6} {report['average']:>9.4f}"
                 + (f" {report['average_acc_norm']:>9.4f}" if norm else ""))
    return "\n".join(lines)


def write_outputs(report: dict, predictions: list[dict], out: str | Path) -> tuple[Path, Path]:
    """REPORT.json and predictions.jsonl beside it, each written atomically."""
    from fora.formats.atomic import atomic_write_json
    from fora.training.data import write_jsonl

    out = Path(out)
    return atomic_write_json(out, report), write_jsonl(predictions, out.parent / "predictions.jsonl")



def main(cfg: EvalConfig) -> dict:
    import torch

    from fora.evaluation.accuracy import evaluate_tasks
    from fora.evaluation.adapted import load_evaluated
    from fora.evaluation.perplexity import text_perplexity
    from fora.evaluation.tasks_io import load_eval_tasks, limit_tasks

    tasks = limit_tasks(load_eval_tasks(cfg.data), cfg.limit) if cfg.data else None  # bad data fails fast
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    model, tok = load_evaluated(cfg.model, cfg.adapter, dtype=dtype, device=cfg.device)
    report: dict = {"model": cfg.model, "adapter": cfg.adapter}
    predictions: list[dict] = []
    if tasks is not None:
        result = evaluate_tasks(model, tok, tasks, protocol=cfg.protocol, template=cfg.template,
                                batch_size=cfg.batch_size, progress=cfg.progress,
                                max_new_tokens=cfg.max_new_tokens)
        predictions = result.pop("predictions")
        report = {"protocol": result.pop("protocol"), "template": result.pop("template"), **report, **result}
        print(format_table(report))
    if cfg.ppl is not None:
        report["perplexity"] = text_perplexity(model, tok, cfg.ppl, window=cfg.window, stride=cfg.stride,
                                               progress=cfg.progress)
        ppl = report["perplexity"]
        print(f"perplexity of {ppl['file']}: {ppl['perplexity']:.3f} "
              f"({ppl['tokens']} tokens, {ppl['windows']} windows of <= {cfg.window}, stride {cfg.stride})")
    if cfg.out is not None:
        paths = write_outputs(report, predictions, cfg.out)
        logging.info("wrote %s and %s", *paths)
    return {**report, "predictions": predictions}


def cli(argv: Sequence[str] | None = None) -> int:
    from fora.evaluation.cli import run_cli

    return run_cli(command_name("eval.py"), parse_args, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
