"""One arm of the reproduction measured (`scripts/reproduce.py`): accuracy on the cloze test split by
every protocol, each item's result kept for paired statistics (`fora.evaluation.paired`), perplexity on
held-out paragraphs, the adapter's diagnostics; and the base model's row, cached for every invocation.

Everything runs in float32 on the CPU, so arms measured by different invocations compare.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fora.evaluation.report import ITEMS_FILE
from fora.formats.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSizes:
    """How much of each measurement: test records, generated answers, perplexity tokens, KL windows."""
    eval_limit: int | None = None  # loglik records of the test split (None: all)
    gen_limit: int = 48            # generate records (greedy decoding is the slow protocol); 0: none
    max_new_tokens: int = 12
    ppl_tokens: int = 4096         # held-out text tokens for perplexity
    kl_windows: int = 8            # 256-token windows for the KL drift


def records_sha256(records: list[dict]) -> str:
    """Fingerprint of the evaluated test records: paired statistics pair only runs with the same one."""
    return hashlib.sha256(json.dumps([[r["instruction"], r["answer"]] for r in records]).encode()).hexdigest()


def measure(model: nn.Module, tok: Any, test: list[dict], sizes: EvalSizes) -> tuple[dict, dict]:
    """Accuracy by every protocol on the test split and perplexity on held-out paragraphs.

    Returns the row and the per-item record (`fora.evaluation.report.ITEMS_FILE`): 0/1 correctness
    per protocol in test order, each record's cluster (its own index when it has none).
    """
    from fora.evaluation import diagnostics
    from fora.evaluation.accuracy import evaluate_generate, evaluate_loglik
    from fora.evaluation.fill_in import fill_in_accuracy, fill_in_options
    from fora.evaluation.perplexity import perplexity

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
    ids = tok.encode(diagnostics.held_out_text(), bos=True)[:sizes.ppl_tokens]
    row["perplexity"] = perplexity(model, ids, window=256, stride=192)["perplexity"]
    row["eval_seconds"] = time.perf_counter() - t0
    return row, items


def load_fp32(model_name: str) -> tuple[nn.Module, Any]:
    """A preset, folder or .gguf file as a float32 CPU model and its tokenizer."""
    import torch

    from fora.formats.hub import resolve_checkpoint
    from fora.formats.loading import load_model, load_tokenizer

    folder = resolve_checkpoint(model_name)
    return load_model(folder, dtype=torch.float32, device=torch.device("cpu")), load_tokenizer(folder)


def base_row(model_name: str, test: list[dict], sizes: EvalSizes, path: Path) -> dict:
    """The base model's zero-shot row, cached in `path` (its items beside it) for these evaluation sizes.

    Another process of the same reproduction computing it (a `.running` marker younger than an
    hour) is waited for rather than duplicated.
    """
    expected = {"n_loglik": len(test[:sizes.eval_limit]), "n_generate": min(sizes.gen_limit, len(test)) or None,
                "test_sha256": records_sha256(test[:sizes.eval_limit])}
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


def arm_row(model_name: str, run: Path, test: list[dict], sizes: EvalSizes, base: dict, **labels: Any) -> dict:
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
