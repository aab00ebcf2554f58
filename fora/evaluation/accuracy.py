"""Held-out accuracy on LLM-Adapters-format tasks, by two protocols.

generate (LLM-Adapters' commonsense_evaluate.py): greedy decoding of at most `max_new_tokens`
after the prompt; the prediction is the first answer word of the task (`record_choices`) in the
generated text (`fora.training.tasks.extract_answer`, whole words, case-insensitive); no answer
word counts as wrong.

loglik (lm-eval-harness' multiple-choice protocol on LLM-Adapters' answer format): for every
choice c, the sum of log-probabilities of the tokens of the response `the correct answer is {c}`
(no EOS) given the prompt. `accuracy` takes the choice with the highest sum, `acc_norm` the
highest sum divided by the response's length in characters. Ties go to the first choice in the
instruction's order.

Prompts are `build_prompt(record, template=...)` encoded with BOS, the response encoded alone,
exactly as `encode_record` builds training examples.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fora.evaluation.choice_logprobs import batch_order, choice_logprobs, pad_rows, pass_label
from fora.evaluation.tasks_io import limit_tasks, record_choices
from fora.training.data import TokenizerLike, build_prompt
from fora.training.tasks import PROTOCOLS, extract_answer

__all__ = ["PROTOCOLS", "evaluate_generate", "evaluate_loglik", "evaluate_tasks", "continuation_logprobs"]
RESPONSE = "the correct answer is {choice}"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _same(a: Any, b: Any) -> bool:
    return a is not None and str(a).strip().lower() == str(b).strip().lower()


def _check(records: Sequence[Mapping[str, Any]]) -> None:
    if not records:
        raise ValueError("no records to evaluate; pass at least one record")


@torch.no_grad()
def evaluate_generate(model: nn.Module, tokenizer: TokenizerLike, records: Sequence[Mapping[str, Any]],
                      *, template: str = "alpaca", batch_size: int = 8, max_new_tokens: int = 32,
                      progress: bool = True, task: str | None = None, label: str | None = None) -> dict[str, Any]:
    """Accuracy of greedy generations (the `generate` protocol).

    Args:
        model: a fora CausalLM (with or without an adapter); evaluated as is (call .eval()).
        tokenizer: its tokenizer (`fora.formats.loading.load_tokenizer`).
        records: LLM-Adapters records with `instruction`, `answer` (and `input`).
        task: the task name, used only for records without an `Answer format:` line.
    Returns:
        {"accuracy", "n", "predictions": [{"index", "prediction", "answer", "correct", "text"}]}
        (prediction None when the text holds no answer word), in record order.
    """
    _check(records)
    prompts = [tokenizer.encode(build_prompt(r, template=template), bos=True) for r in records]
    order = sorted(range(len(records)), key=lambda i: -len(prompts[i]))  # similar lengths batch together
    pad = getattr(tokenizer, "pad_id", tokenizer.eos_id)
    texts: dict[int, str] = {}
    for idx in batch_order(order, batch_size, pass_label("generate", task, label), progress):
        ids, mask = pad_rows([prompts[i] for i in idx], pad, True, _device(model))
        new = model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                             pad_id=pad).tolist()
        for i, row in zip(idx, new):
            row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
            texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    predictions = []
    for i, rec in enumerate(records):
        pred = extract_answer(texts[i], record_choices(rec, task))
        predictions.append({"index": i, "prediction": pred, "answer": rec["answer"],
                            "correct": _same(pred, rec["answer"]), "text": texts[i]})
    return {"accuracy": sum(p["correct"] for p in predictions) / len(records), "n": len(records),
            "predictions": predictions}


@torch.no_grad()
def continuation_logprobs(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          pad_id: int = 0, batch_size: int = 8, progress: bool = False) -> list[float]:
    """sum_t log p(cont_t | prefix, cont_<t) for every (prefix ids, continuation ids) pair.

    Rows are right-padded (the decoder's causal fast path) and sorted by length; the LM head runs
    only at the positions that predict continuation tokens, in fp32 for the log-softmax.
    """
    for prefix, cont in pairs:
        if not prefix or not cont:
            raise ValueError("every pair needs a non-empty prefix and continuation")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out = [0.0] * len(pairs)
    for idx in batch_order(order, batch_size, "loglik", progress):
        seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in idx]
        ids, mask = pad_rows(seqs, pad_id, False, _device(model))
        hidden = model.model(ids, mask)  # (B, T, Hd)
        rows, cols, targets = [], [], []
        for b, i in enumerate(idx):
            p, c = len(pairs[i][0]), len(pairs[i][1])
            rows += [b] * c
            cols += range(p - 1, p + c - 1)  # position t predicts token t + 1
            targets += pairs[i][1]
        logits = model._head(hidden[rows, cols]).float()  # (N, V)
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(targets, device=logits.device)[:, None])
        sums = torch.zeros(len(idx), dtype=torch.float64, device=logp.device)
        sums.index_add_(0, torch.tensor(rows, device=logp.device), logp[:, 0].double())
        for b, i in enumerate(idx):
            out[i] = float(sums[b])
    return out


def _argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    return max(range(len(values)), key=lambda k: (values[k], -k))


@torch.no_grad()
def evaluate_loglik(model: nn.Module, tokenizer: TokenizerLike, records: Sequence[Mapping[str, Any]],
                    *, template: str = "alpaca", batch_size: int = 8, progress: bool = True,
                    task: str | None = None, label: str | None = None) -> dict[str, Any]:
    """Accuracy of log-likelihood ranking of the choices (the `loglik` protocol).

    Returns:
        {"accuracy", "acc_norm", "n", "predictions": [{"index", "prediction", "answer", "correct",
        "prediction_norm", "correct_norm", "scores": {choice: summed log-prob}}]}, record order.
    """
    _check(records)
    items, choices_of = [], []
    for rec in records:
        prompt = tokenizer.encode(build_prompt(rec, template=template), bos=True)
        choices_of.append(record_choices(rec, task))
        items.append((prompt, [tokenizer.encode(RESPONSE.format(choice=c), bos=False) for c in choices_of[-1]]))
    scores = choice_logprobs(model, items, pad_id=getattr(tokenizer, "pad_id", tokenizer.eos_id),
                             batch_size=batch_size, progress=progress,  # the prompt runs once per record
                             desc=pass_label("loglik", task, label))
    per_record = [dict(zip(cs, ss)) for cs, ss in zip(choices_of, scores)]
    predictions = []
    for i, rec in enumerate(records):
        choices = list(per_record[i])
        raw = [per_record[i][c] for c in choices]
        norm = [s / len(RESPONSE.format(choice=c)) for s, c in zip(raw, choices)]
        pred, pred_norm = choices[_argmax_first(raw)], choices[_argmax_first(norm)]
        predictions.append({"index": i, "prediction": pred, "answer": rec["answer"],
                            "correct": _same(pred, rec["answer"]), "prediction_norm": pred_norm,
                            "correct_norm": _same(pred_norm, rec["answer"]), "scores": per_record[i]})
    n = len(records)
    return {"accuracy": sum(p["correct"] for p in predictions) / n,
            "acc_norm": sum(p["correct_norm"] for p in predictions) / n, "n": n,
            "predictions": predictions}


def evaluate_tasks(model: nn.Module, tokenizer: TokenizerLike, tasks: Mapping[str, Sequence[Mapping[str, Any]]],
                   *, protocol: str = "generate", template: str = "alpaca", batch_size: int = 8,
                   limit: int | None = None, progress: bool = True,
                   max_new_tokens: int = 32, label: str | None = None) -> dict[str, Any]:
    """Evaluate every task by one protocol.

    Args:
        tasks: task name -> records (`fora.evaluation.tasks_io.load_eval_tasks`).
        protocol: "generate" or "loglik".
        limit: evaluate only the first `limit` records of each task (>= 1), all for None.
        label: what this pass is, in its progress ("before training (adapters off)").
    Returns:
        The report `{"protocol", "template", "tasks": {name: {"accuracy", "n"[, "acc_norm"]}},
        "average"[, "average_acc_norm"], "predictions"}`: `average` is the unweighted mean over
        tasks (as LLM-Adapters reports it); `predictions` lists every example's prediction (the
        per-protocol dicts above plus "task") and is what scripts/eval.py writes to
        predictions.jsonl; pop it before saving the report.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    if not tasks:
        raise ValueError("no tasks to evaluate; load_eval_tasks returned nothing")
    tasks = limit_tasks(tasks, limit)
    report: dict[str, Any] = {"protocol": protocol, "template": template, "tasks": {}}
    predictions: list[dict[str, Any]] = []
    for name, records in tasks.items():
        if protocol == "generate":
            res = evaluate_generate(model, tokenizer, records, template=template, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, progress=progress, task=name, label=label)
        else:
            res = evaluate_loglik(model, tokenizer, records, template=template, batch_size=batch_size,
                                  progress=progress, task=name, label=label)
        report["tasks"][name] = {k: res[k] for k in ("accuracy", "acc_norm", "n") if k in res}
        predictions += [{"task": name, **p} for p in res["predictions"]]
    rows = list(report["tasks"].values())
    report["average"] = sum(r["accuracy"] for r in rows) / len(rows)
    if protocol == "loglik":
        report["average_acc_norm"] = sum(r["acc_norm"] for r in rows) / len(rows)
    report["predictions"] = predictions
    return report
