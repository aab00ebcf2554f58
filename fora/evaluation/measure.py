"""One arm of the reproduction measured (`scripts/reproduce.py`): accuracy on the cloze test split by
every protocol, or on every task of the commonsense suite by loglik and generate, each item's result
kept for paired statistics (`fora.evaluation.paired`), perplexity on held-out paragraphs, the
adapter's diagnostics; and the base model's row, cached for every invocation.

Everything runs in float32 on the CPU, so arms measured by different invocations compare.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from torch import nn

from fora.evaluation.report import ITEMS_FILE
from fora.formats.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


# the cloze test records, or a suite's: task -> test records (fora.training.commonsense.read_suite)
Test = Union[list[dict], Mapping[str, list[dict]]]


@dataclass(frozen=True)
class EvalSizes:
    """How much of each measurement: test records, generated answers, perplexity tokens, KL windows.
    For a suite, the record limits hold per task."""
    eval_limit: int | None = None  # loglik records of the test split (None: all)
    gen_limit: int = 48            # generate records (greedy decoding is the slow protocol); 0: none
    max_new_tokens: int = 12
    ppl_tokens: int = 4096         # held-out text tokens for perplexity
    kl_windows: int = 8            # 256-token windows for the KL drift


def records_sha256(records: list[dict]) -> str:
    """Fingerprint of the evaluated test records: paired statistics pair only runs with the same one."""
    return hashlib.sha256(json.dumps([[r["instruction"], r["answer"]] for r in records]).encode()).hexdigest()


def evaluated(test: Test, sizes: EvalSizes) -> list[dict]:
    """The records the loglik protocol scores: the first `eval_limit` of the test split, or of every task."""
    if isinstance(test, Mapping):
        return [r for records in test.values() for r in records[:sizes.eval_limit]]
    return test[:sizes.eval_limit]


def measure(model: nn.Module, tok: Any, test: Test, sizes: EvalSizes) -> tuple[dict, dict]:
    """Accuracy by every protocol on the test split and perplexity on held-out paragraphs
    (`measure_tasks` for a suite).

    Returns the row and the per-item record (`fora.evaluation.report.ITEMS_FILE`): 0/1 correctness
    per protocol in test order, each record's cluster (its own index when it has none).
    """
    from fora.evaluation.accuracy import evaluate_generate, evaluate_loglik
    from fora.evaluation.fill_in import fill_in_accuracy, fill_in_options

    if isinstance(test, Mapping):
        return measure_tasks(model, tok, test, sizes)
    model.eval()
    t0 = time.perf_counter()
    records = test[:sizes.eval_limit]
    ll = evaluate_loglik(model, tok, records, batch_size=8, progress=False)
    fill = fill_in_accuracy(model, tok, records)
    row = {"acc_loglik": ll["accuracy"], "acc_norm": ll["acc_norm"], "n_loglik": ll["n"],
           "acc_fill_in": fill["accuracy"], "test_sha256": records_sha256(records)}
    right = [0 if r["answer"] in (fill_in_options(r)[1], "option1") else 1 for r in records]  # fill_in's rule
    items = {"test_sha256": row["test_sha256"], "clusters": [r.get("cluster", i) for i, r in enumerate(records)],
             "acc_loglik": [int(p["correct"]) for p in ll["predictions"]],
             "acc_norm": [int(p["correct_norm"]) for p in ll["predictions"]],
             "acc_fill_in": [int((0 if a >= b else 1) == k) for (a, b), k in zip(fill["scores"], right)]}
    if sizes.gen_limit:
        gen = evaluate_generate(model, tok, test[:sizes.gen_limit], batch_size=8,
                                max_new_tokens=sizes.max_new_tokens, progress=False)
        row.update(acc_generate=gen["accuracy"], n_generate=gen["n"],
                   answered=sum(p["prediction"] is not None for p in gen["predictions"]) / gen["n"],
                   sample_generation=gen["predictions"][0]["text"])
        items["acc_generate"] = [int(p["correct"]) for p in gen["predictions"]]
    row["perplexity"] = held_out_perplexity(model, tok, sizes)
    row["eval_seconds"] = time.perf_counter() - t0
    return row, items


def measure_tasks(model: nn.Module, tok: Any, tasks: Mapping[str, list[dict]], sizes: EvalSizes
                  ) -> tuple[dict, dict]:
    """Every task of a suite by loglik (acc, acc_norm; its first `eval_limit` records) and generate
    (its first `gen_limit`), `fora.evaluation.accuracy.evaluate_tasks`; perplexity on held-out paragraphs.

    Returns the row, with the means over tasks on top and each task's figures under "tasks", and
    the per-item record {"test_sha256", "tasks": {task: {"acc_loglik", "acc_norm"[, "acc_generate"]:
    0/1 per record in test order}}}.
    """
    from fora.evaluation.accuracy import evaluate_tasks

    model.eval()
    t0 = time.perf_counter()
    sha = records_sha256(evaluated(tasks, sizes))
    per_task: dict[str, dict[str, Any]] = {name: {} for name in tasks}
    items: dict[str, Any] = {"test_sha256": sha, "tasks": {name: {} for name in tasks}}
    ll = evaluate_tasks(model, tok, tasks, protocol="loglik", limit=sizes.eval_limit, progress=False)
    for name, r in ll["tasks"].items():
        per_task[name].update(acc_loglik=r["accuracy"], acc_norm=r["acc_norm"], n_loglik=r["n"])
    for p in ll["predictions"]:
        for key, hit in (("acc_loglik", p["correct"]), ("acc_norm", p["correct_norm"])):
            items["tasks"][p["task"]].setdefault(key, []).append(int(hit))
    row = {"acc_loglik": ll["average"], "acc_norm": ll["average_acc_norm"],
           "n_loglik": sum(r["n"] for r in ll["tasks"].values()), "test_sha256": sha}
    if sizes.gen_limit:
        gen = evaluate_tasks(model, tok, tasks, protocol="generate", limit=sizes.gen_limit,
                             max_new_tokens=sizes.max_new_tokens, progress=False)
        for p in gen["predictions"]:
            items["tasks"][p["task"]].setdefault("acc_generate", []).append(int(p["correct"]))
            per_task[p["task"]]["answered"] = per_task[p["task"]].get("answered", 0) + (p["prediction"] is not None)
        for name, r in gen["tasks"].items():
            per_task[name].update(acc_generate=r["accuracy"], n_generate=r["n"],
                                  answered=per_task[name]["answered"] / r["n"])
        row.update(acc_generate=gen["average"], n_generate=sum(r["n"] for r in gen["tasks"].values()),
                   answered=sum(p["prediction"] is not None for p in gen["predictions"]) / len(gen["predictions"]),
                   sample_generation=gen["predictions"][0]["text"])
    row["tasks"] = per_task
    row["perplexity"] = held_out_perplexity(model, tok, sizes)
    row["eval_seconds"] = time.perf_counter() - t0
    return row, items


def held_out_perplexity(model: nn.Module, tok: Any, sizes: EvalSizes) -> float:
    """Perplexity on the first `ppl_tokens` tokens of the held-out paragraphs (`diagnostics.held_out_text`)."""
    from fora.evaluation import diagnostics
    from fora.evaluation.perplexity import perplexity

    ids = tok.encode(diagnostics.held_out_text(), bos=True)[:sizes.ppl_tokens]
    return perplexity(model, ids, window=256, stride=192)["perplexity"]


def load_fp32(model_name: str) -> tuple[nn.Module, Any]:
    """A preset, folder or .gguf file as a float32 CPU model and its tokenizer."""
    import torch

    from fora.formats.hub import resolve_checkpoint
    from fora.formats.loading import load_model, load_tokenizer

    folder = resolve_checkpoint(model_name)
    return load_model(folder, dtype=torch.float32, device=torch.device("cpu")), load_tokenizer(folder)


def base_row(model_name: str, test: Test, sizes: EvalSizes, path: Path) -> dict:
    """The base model's zero-shot row, cached in `path` (its items beside it) for these evaluation sizes.

    Another process of the same reproduction computing it (a `.running` marker younger than an
    hour) is waited for rather than duplicated.
    """
    parts = test.values() if isinstance(test, Mapping) else [test]
    expected = {"n_loglik": len(evaluated(test, sizes)),
                "n_generate": sum(min(sizes.gen_limit, len(records)) for records in parts) or None,
                "test_sha256": records_sha256(evaluated(test, sizes))}
    marker = path.with_suffix(".running")
    while True:
        if path.is_file():
            row = json.loads(path.read_text())
            if all(row.get(k) == v for k, v in expected.items()):
                return row
        if not (marker.is_file() and time.time() - marker.stat().st_mtime < 3600):
            break
        time.sleep(10)
    atomic_write_text(marker, str(time.time()))
    model, tok = load_fp32(model_name)
    row, items = measure(model, tok, test, sizes)
    row = {"model": model_name, "method": "base (zero-shot)", "seed": None, **row}
    atomic_write_json(path.with_name("base_" + ITEMS_FILE), items)
    atomic_write_json(path, row)
    marker.unlink(missing_ok=True)
    log.info("%s zero-shot: %s", model_name, {k: v for k, v in row.items() if k != "sample_generation"})
    return row


def arm_row(model_name: str, run: Path, test: Test, sizes: EvalSizes, base: dict, **labels: Any) -> dict:
    """The trained adapter in `run` measured: `measure`'s row, its diagnostics, the run's parameter
    counts, selected layers and validation losses; writes items.json, diagnostics.json and, last
    (it marks the arm finished), result.json. `labels` (method, arm, seed, ...) head the row."""
    from fora.evaluation import diagnostics
    from fora.evaluation.plots import read_metrics
    from fora.formats.peft_io import ADAPTER_WEIGHTS, load_adapter

    model, tok = load_fp32(model_name)
    load_adapter(model, run)
    measured, items = measure(model, tok, test, sizes)
    atomic_write_json(run / ITEMS_FILE, items)
    row = {"model": model_name, **labels, **measured}
    diag = diagnostics.analyze_adapter(model, tok, diagnostics.held_out_text(), window=256,
                                       max_windows=sizes.kl_windows)
    atomic_write_json(run / "diagnostics.json", diag)
    trained = run / "checkpoint" if (run / "checkpoint" / ADAPTER_WEIGHTS).is_file() else run
    metrics = read_metrics(run / "metrics.jsonl")
    vals = [r for r in metrics if "val_loss" in r]
    selection = json.loads((run / "selection.json").read_text())
    row.update(layers=selection["selected"], trainable_params=adapter_params(trained / ADAPTER_WEIGHTS),
               budget_params=adapter_params(run / ADAPTER_WEIGHTS), val_loss_start=vals[0]["val_loss"],
               val_loss=vals[-1]["val_loss"], train_seconds=metrics[-1]["seconds"],
               erank_ratio=diag["summary"]["overall"]["effective_rank_ratio"],
               fro_norm=diag["summary"]["overall"]["fro_norm"],  # sqrt of the sum over modules of ||dW||_F^2
               fro_norm_mean=sum(d["fro_norm"] for d in diag["modules"]) / len(diag["modules"]),
               stiefel_error=diag["summary"]["overall"]["stiefel_error"], kl=diag["drift"]["kl"],
               perplexity_base=base["perplexity"])
    atomic_write_json(run / "result.json", row)
    log.info("%s %s: %s", model_name, run.name, {k: v for k, v in row.items() if k not in ("sample_generation", "layers")})
    return row


def adapter_params(weights: Path) -> int:
    """Scalars in an adapter file (a checkpoint's holds every trained tensor whole; AdaLoRA's final
    adapter only the kept triplets, its budget)."""
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def validation_scores(model_name: str, run: Path | None, tasks: Mapping[str, list[dict]]) -> dict:
    """The adapter in `run` (None: the base model, zero-shot) scored on a suite's validation split by
    loglik (float32, every record): {"average": the mean over tasks, "tasks": {task: accuracy}, "n":
    records, "items": {task: [1 or 0 per record, in order]}} (the items pair arms for intervals)."""
    from fora.evaluation.accuracy import evaluate_tasks
    from fora.formats.peft_io import load_adapter

    if not tasks or not all(tasks.values()):
        raise ValueError("no validation records to score (a task without val.json items); rebuild the suite "
                         "with `python scripts/make_task.py --task commonsense --out SUITE`")
    model, tok = load_fp32(model_name)
    if run is not None:
        load_adapter(model, run)
    model.eval()
    accuracy, items, t0 = {}, {}, time.perf_counter()
    for task, records in tasks.items():  # one task at a time, for a progress line each
        report = evaluate_tasks(model, tok, {task: records}, protocol="loglik", progress=False)
        accuracy[task] = report["tasks"][task]["accuracy"]
        items[task] = [int(p["correct"]) for p in sorted(report["predictions"], key=lambda p: p["index"])]
        log.info("validation %s: %s %.3f on %d records (%.0f s)", "base" if run is None else run.name, task,
                 accuracy[task], len(records), time.perf_counter() - t0)
    return {"average": sum(accuracy.values()) / len(accuracy), "tasks": accuracy,
            "n": sum(map(len, items.values())), "items": items}
