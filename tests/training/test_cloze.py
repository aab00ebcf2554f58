"""fora.training.cloze and `make_task.py --task cloze`: a real-English two-option cloze.

Each record is checked against the source text independently: filling the blank with the answer
word must give back a sentence of CPython's documentation, filling it with the distractor must not.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from fora.training.cloze import SPLITS, cloze_task, corpus_sha256, prose_paragraphs, sentences
from fora.training.data import load_records, validate_records
from fora.training.tasks import choices_from_instruction

WINO = re.compile(r"^Please choose the correct answer to fill in the blank to complete the given sentence: "
                  r"(?P<sentence>.+ ?)\n\nOption1: (?P<o1>[a-z]+)\n\nOption2: (?P<o2>[a-z]+)\n\n"
                  r"Answer format: option1/option2$", re.DOTALL)


@pytest.fixture(scope="module")
def tasks() -> dict[str, list[dict]]:
    return {split: cloze_task(split) for split in SPLITS}


def _parts(record: dict) -> tuple[str, str, str]:
    m = WINO.match(record["instruction"])
    assert m, record["instruction"]
    return m["sentence"], m["o1"], m["o2"]


def test_format_and_answers_recomputed_from_the_text(tasks):
    for split, records in tasks.items():
        validate_records(records)
        source = {s for _, s in sentences(split)}
        assert len(records) > (150 if split == "test" else 600)
        for r in records:
            sentence, o1, o2 = _parts(r)
            assert r["input"] == "" and r["output"] == f"the correct answer is {r['answer']}"
            assert choices_from_instruction(r["instruction"]) == ["option1", "option2"]
            right, wrong = (o1, o2) if r["answer"] == "option1" else (o2, o1)
            assert right != wrong and sentence.count("_") == 1
            assert sentence.replace("_", right) in source
            assert sentence.replace("_", wrong) not in source
            assert re.search(rf"\b{wrong}\b", sentence.replace("_", "")) is None  # no copy-paste give-away


def test_answers_balanced_and_order_mixed(tasks):
    for records in tasks.values():
        counts = Counter(r["answer"] for r in records)
        assert abs(counts["option1"] - counts["option2"]) <= 1
        runs = sum(a["answer"] != b["answer"] for a, b in zip(records, records[1:]))
        assert runs > len(records) / 3  # shuffled, not alternating blocks


def test_splits_disjoint_by_paragraph_and_sentence(tasks):
    train_par, test_par = set(prose_paragraphs("train")), set(prose_paragraphs("test"))
    assert train_par and test_par and not train_par & test_par
    train_sent = {_parts(r)[0] for r in tasks["train"]}
    test_sent = {_parts(r)[0] for r in tasks["test"]}
    assert not train_sent & test_sent
    assert not {s for _, s in sentences("train")} & {s for _, s in sentences("test")}


def test_deterministic_and_seeded(tasks):
    assert cloze_task("test") == tasks["test"]
    small = cloze_task("test", 20)
    assert small == cloze_task("test", 20) and Counter(r["answer"] for r in small) == {"option1": 10, "option2": 10}
    other = cloze_task("test", seed=1)
    assert other != tasks["test"] and len(other) == len(tasks["test"])
    assert len(corpus_sha256()) == 64


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split 'val'"):
        cloze_task("val")
    with pytest.raises(ValueError, match="n must be >= 1"):
        cloze_task("test", 0)
    with pytest.raises(ValueError, match=r"has only \d+ cloze sentences, asked for n=100000"):
        cloze_task("test", 100000)


def test_make_task_cloze(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_task.py"
    spec = importlib.util.spec_from_file_location("make_task", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_task", module)
    spec.loader.exec_module(module)
    cfg = module.parse_args(["--task", "cloze", "--out", str(tmp_path / "cloze"), "--n-val", "30"])
    assert cfg.n_train is None and cfg.n_val == 30
    train_path, test_path = module.main(cfg)
    assert test_path.name == "test.jsonl"
    assert load_records(train_path) == cloze_task("train")
    assert load_records(test_path) == cloze_task("test", 30)
