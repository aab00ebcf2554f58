"""Evaluation data on disk (LLM-Adapters' layout) and the answer words of each task.

LLM-Adapters ships its test sets as `dataset/<task>/test.json` (boolq, piqa, social_i_qa,
hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa), each a JSON list of
`{"instruction", "input", "output", "answer"}` records whose instruction ends with an
`Answer format: a/b/...` line.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fora.training.data import load_records, record_location
from fora.training.tasks import choices_from_instruction

SPLIT_NAMES = ("test", "train", "dev", "val", "validation", "eval")
_DATA_SUFFIXES = (".json", ".jsonl", ".ndjson")
_ANSWERS = {n: [f"answer{i}" for i in range(1, n + 1)] for n in (3, 5)}
# LLM-Adapters' commonsense_evaluate.py answer patterns, for records without an `Answer format:` line
TASK_CHOICES: dict[str, list[str]] = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "social_i_qa": _ANSWERS[5],
    "ARC-Easy": _ANSWERS[5],
    "ARC-Challenge": _ANSWERS[5],
    "openbookqa": _ANSWERS[5],
    "hellaswag": ["ending1", "ending2", "ending3", "ending4"],
    "winogrande": ["option1", "option2"],
}


def record_choices(record: Mapping[str, Any], task: str | None = None) -> list[str]:
    """The answer words of a record: its instruction's `Answer format: a/b` line, else the task's
    pattern (TASK_CHOICES, by task name), else a ValueError naming both options."""
    try:
        return choices_from_instruction(record["instruction"])
    except ValueError:
        if task in TASK_CHOICES:
            return list(TASK_CHOICES[task])
        raise ValueError(f"task {task!r}: a record's instruction has no trailing 'Answer format: a/b/...' "
                         f"line and the task is none of {sorted(TASK_CHOICES)}; add the line to the "
                         "instructions or name the task after one of those") from None


def load_eval_tasks(path: str | os.PathLike[str]) -> dict[str, list[dict]]:
    """Read test sets: task name -> records (each with `instruction`, `output` and `answer`).

    Args:
        path: a JSON/JSONL file (task = file stem, or the parent folder's name when the stem is a
            split name such as `test`: `dataset/boolq/test.json` -> "boolq"), or a folder laid out
            like LLM-Adapters' `dataset/` (one sub-folder per task holding `test.json`), or one such
            task folder itself.
    Returns:
        Tasks sorted by name.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"evaluation data {str(path)!r} does not exist; pass a .json/.jsonl "
                                "test file or a folder of <task>/test.json sub-folders")
    if path.is_file():
        if path.suffix not in _DATA_SUFFIXES:
            raise ValueError(f"{path} is not a .json/.jsonl file; pass an LLM-Adapters test file "
                             "or a folder of <task>/test.json sub-folders")
        files = {_task_name(path): path}
    else:
        own = _test_file(path)
        files = {path.name: own} if own else {
            sub.name: f for sub in sorted(path.iterdir()) if sub.is_dir() and (f := _test_file(sub))}
        if not files:
            found = sorted(p.name for p in path.iterdir())[:10]
            raise ValueError(f"unknown task layout in {path}: expected test.json (or test.jsonl) in it "
                             f"or in its sub-folders, one per task, as LLM-Adapters' dataset/ "
                             f"(boolq/test.json, piqa/test.json, ...); found {found}")
    tasks = {}
    for name, file in sorted(files.items()):
        records = load_records(file)
        missing = [i for i, r in enumerate(records) if r.get("answer") in (None, "")]
        if missing:
            raise ValueError(f"{record_location(file, missing[0], len(records))} (and {len(missing) - 1} "
                             "more) has no 'answer'; evaluation needs the gold answer word in every record")
        tasks[name] = records
    return tasks


def _task_name(file: Path) -> str:
    return file.parent.name if file.stem.lower() in SPLIT_NAMES and file.parent.name else file.stem


def _test_file(folder: Path) -> Path | None:
    for suffix in _DATA_SUFFIXES:
        if (folder / f"test{suffix}").is_file():
            return folder / f"test{suffix}"
    return None


def limit_tasks(tasks: Mapping[str, Sequence[dict]], limit: int | None) -> dict[str, list[dict]]:
    """The first `limit` records of every task (all of them for None)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every record), got {limit}")
    return {name: list(recs[:limit] if limit else recs) for name, recs in tasks.items()}
