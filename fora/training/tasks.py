"""A small synthetic task in Commonsense-170K format, and answer extraction for accuracy.

Commonsense-170K (LLM-Adapters) records look like
`{"instruction": "Please answer the following question with true or false, question: ...?\\n\\n
Answer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}`
(BoolQ) or, for two-choice sets (PIQA), "Please choose the correct solution to the question: ...
\\n\\nSolution1: ...\\n\\nSolution2: ...\\n\\nAnswer format: solution1/solution2". The arithmetic task
reuses both layouts so that the training and evaluation code path is the real one, while the
content is learnable by a 135M model within a few hundred steps on a CPU.
"""
from __future__ import annotations

import random
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

KINDS = ("sum", "compare")
PROTOCOLS = ("generate", "loglik")  # how accuracy is scored (fora.evaluation.accuracy)
_FORMAT_LINE = re.compile(r"Answer format:\s*(?P<choices>\S+)\s*$")


def _sum_record(a: int, b: int, c: int) -> dict[str, str]:
    answer = "true" if a + b == c else "false"
    return {
        "instruction": ("Please answer the following question with true or false, question: "
                        f"is {a} + {b} = {c}?\n\nAnswer format: true/false"),
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def _compare_record(a: int, b: int) -> dict[str, str]:
    answer = "solution1" if a > b else "solution2"
    return {
        "instruction": ("Please choose the correct solution to the question: which number is "
                        f"larger?\n\nSolution1: {a}\n\nSolution2: {b}\n\n"
                        "Answer format: solution1/solution2"),
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def _draw(kind: str, positive: bool, rng: random.Random, lo: int, hi: int) -> dict[str, str]:
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if kind == "sum":
        # a wrong sum is off by 1..10 either way: close enough that the model must add
        off = 0 if positive else rng.choice([d for d in range(-10, 11) if d != 0])
        return _sum_record(a, b, a + b + off)
    while a == b:
        b = rng.randint(lo, hi)
    a, b = (max(a, b), min(a, b)) if positive else (min(a, b), max(a, b))
    return _compare_record(a, b)


def arithmetic_task(n: int, seed: int = 0, *, kinds: Sequence[str] = KINDS,
                    values: tuple[int, int] = (10, 99),
                    exclude: Collection[str] = ()) -> list[dict[str, str]]:
    """`n` distinct arithmetic questions in Commonsense-170K format, deterministic in `seed`.

    Kinds: "sum" ("is a + b = c?", true/false, wrong sums off by 1..10) and "compare" ("which
    number is larger?", solution1/solution2). Kinds alternate and each kind's two answers are
    balanced (counts differ by at most one); operands are drawn from `values` (inclusive).
    Questions whose instruction is in `exclude` are skipped (e.g. a validation set's).
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown task kinds {unknown or list(kinds)}; choose from {list(KINDS)}")
    lo, hi = values
    if not 0 <= lo < hi:
        raise ValueError(f"values must be (lo, hi) with 0 <= lo < hi, got {values}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    plan = [(kinds[i % len(kinds)], (i // len(kinds)) % 2 == 0) for i in range(n)]
    rng.shuffle(plan)
    records, seen = [], set(exclude)
    for kind, positive in plan:
        for _ in range(1000):
            rec = _draw(kind, positive, rng, lo, hi)
            if rec["instruction"] not in seen:
                break
        else:
            raise ValueError(f"cannot draw {n} distinct questions from values={values}; "
                             "widen the value range or lower n")
        seen.add(rec["instruction"])
        records.append(rec)
    return records


def choices_from_instruction(instruction: str) -> list[str]:
    """The answer words of a Commonsense-170K instruction ("Answer format: a/b" -> ["a", "b"])."""
    match = _FORMAT_LINE.search(instruction.strip())
    if match is None:
        raise ValueError("instruction has no trailing 'Answer format: a/b/...' line; pass the "
                         "choices to extract_answer explicitly")
    return match.group("choices").split("/")


def extract_answer(text: str, choices: Sequence[str]) -> str | None:
    """The first of `choices` that occurs in `text` as a whole word (case-insensitive), or None.

    Like LLM-Adapters' commonsense evaluation (the first match of "true|false" etc. in the
    generated response) but on word boundaries, so "untrue" is not "true", "option10" not "option1".
    """
    if not choices:
        raise ValueError("choices is empty; pass the answer words, e.g. ['true', 'false']")
    canonical = {c.lower(): c for c in choices}
    alternatives = "|".join(re.escape(c) for c in sorted(canonical, key=len, reverse=True))
    match = re.search(rf"(?<![A-Za-z0-9_])({alternatives})(?![A-Za-z0-9_])", text, re.IGNORECASE)
    return canonical[match.group(1).lower()] if match else None


def answer_accuracy(generations: Sequence[str], records: Sequence[Mapping[str, Any]]) -> float:
    """Fraction of generated responses whose extracted answer equals the record's `answer`."""
    if len(generations) != len(records) or not records:
        raise ValueError(f"got {len(generations)} generations for {len(records)} records; pass one "
                         "generated response per record (and at least one)")
    hits = sum(extract_answer(g, choices_from_instruction(r["instruction"])) == r["answer"]
               for g, r in zip(generations, records))
    return hits / len(records)
