"""fora.training.cloze and `make_task.py --task cloze`: a real-English two-option cloze.

Each record is checked against the source text independently: filling the blank with the answer
word must give back a sentence of CPython's documentation, filling it with the distractor must not.
"""
from __future__ import annotations

import re
from collections import Counter

import pytest
from script_loader import load_script

from fora.training.cloze import SPLITS, cloze_all_blanks, cloze_task, corpus_sha256, prose_paragraphs, sentences
from fora.training.data import load_records, validate_records
from fora.training.tasks import choices_from_instruction

WINO = re.compile(r"^Please choose the correct answer to fill in the blank to complete the given sentence: "
                  r"(?P<sentence>.+ ?)\n\nOption1: (?P<o1>[a-z]+)\n\nOption2: (?P<o2>[a-z]+)\n\n"
                  r"Answer format: (?P<fmt>\S+)$", re.DOTALL)


@pytest.fixture(scope="module")
def tasks() -> dict[str, list[dict]]:
    return {split: cloze_task(split) for split in SPLITS}


def _parts(record: dict) -> tuple[str, str, str]:
    m = WINO.match(record["instruction"])
    assert m, record["instruction"]
    return m["sentence"], m["o1"], m["o2"]


def _right_wrong(record: dict) -> tuple[str, str]:
    _, o1, o2 = _parts(record)
    first = record["answer"] in (o1, "option1")
    return (o1, o2) if first else (o2, o1)


def _check_against_the_text(records: list[dict], split: str, style: str) -> None:
    validate_records(records)
    source = {s for _, s in sentences(split)}
    for r in records:
        sentence, o1, o2 = _parts(r)
        assert r["input"] == "" and r["output"] == f"the correct answer is {r['answer']}"
        if style == "word":
            assert choices_from_instruction(r["instruction"]) == [o1, o2] and r["answer"] in (o1, o2)
        else:
            assert choices_from_instruction(r["instruction"]) == ["option1", "option2"]
        right, wrong = _right_wrong(r)
        assert right != wrong and sentence.count("_") == 1
        assert sentence.replace("_", right) in source
        assert sentence.replace("_", wrong) not in source
        assert re.search(rf"\b{wrong}\b", sentence.replace("_", "")) is None  # no copy-paste give-away


def test_format_and_answers_recomputed_from_the_text(tasks):
    for split, records in tasks.items():
        assert len(records) > (150 if split == "test" else 600)
        _check_against_the_text(records, split, "word")
    _check_against_the_text(cloze_task("test", style="option"), "test", "option")


def test_option_style_differs_only_in_the_answer_labels(tasks):
    labelled = cloze_task("test", style="option")
    for w, o in zip(tasks["test"], labelled):
        assert _parts(w) == _parts(o) and _right_wrong(w) == _right_wrong(o)
        assert o["answer"] == ("option1" if w["answer"] == _parts(w)[1] else "option2")


def test_answers_balanced_and_order_mixed(tasks):
    for records in tasks.values():
        first = [r["answer"] == _parts(r)[1] for r in records]
        assert abs(2 * sum(first) - len(first)) <= 1
        runs = sum(a != b for a, b in zip(first, first[1:]))
        assert runs > len(records) / 3  # shuffled, not alternating blocks


def test_several_blanks_per_sentence_blank_different_words():
    records = cloze_task("train", blanks=4)
    _check_against_the_text(records, "train", "word")
    per_sentence = Counter(_parts(r)[0].replace("_", _right_wrong(r)[0]) for r in records)
    assert max(per_sentence.values()) == 4 and len(records) > 3 * len(cloze_task("train"))
    assert len({_parts(r)[0] for r in records}) == len(records)  # each record blanks another word


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
    assert small == cloze_task("test", 20) and sum(r["answer"] == _parts(r)[1] for r in small) == 10
    other = cloze_task("test", seed=1)
    assert other != tasks["test"] and len(other) == len(tasks["test"])
    assert len(corpus_sha256()) == 64


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split 'val'"):
        cloze_task("val")
    with pytest.raises(ValueError, match="n must be >= 1"):
        cloze_task("test", 0)
    with pytest.raises(ValueError, match=r"has only \d+ cloze records, asked for n=100000"):
        cloze_task("test", 100000)
    with pytest.raises(ValueError, match="unknown style 'labels'; choose one of word, option"):
        cloze_task("test", style="labels")
    with pytest.raises(ValueError, match="blanks must be an int >= 1"):
        cloze_task("test", blanks=0)


def test_all_blanks_test_split_every_blank_clustered_by_sentence(tasks):
    records = cloze_all_blanks()
    _check_against_the_text(records, "test", "word")
    source = sentences("test")
    by_cluster: dict[int, set[str]] = {}
    for r in records:
        sentence, _, _ = _parts(r)
        full = sentence.replace("_", _right_wrong(r)[0])
        assert full == source[r["cluster"]][1]  # the cluster id names the record's own source sentence
        by_cluster.setdefault(r["cluster"], set()).add(sentence)
    assert sum(map(len, by_cluster.values())) == len(records)  # one record per blanked word
    assert len(by_cluster) == len(source) and len(records) > 5 * len(tasks["test"])
    # every blank the default split drew is among them (the default's blank of a sentence is one of its slots)
    blanked = {(_parts(r)[0], _right_wrong(r)[0]) for r in records}
    assert all((_parts(r)[0], _right_wrong(r)[0]) in blanked for r in tasks["test"])
    first = [r["answer"] == _parts(r)[1] for r in records]
    assert abs(2 * sum(first) - len(first)) <= 1
    # disjoint from training: each source sentence lies in its test paragraph, and no training record
    # (any number of blanks) is a sentence of it (the docs repeat a few sentences; those are test only)
    test_par = prose_paragraphs("test")
    assert all(sent in test_par[para] for para, sent in source)
    trained = {_parts(r)[0].replace("_", _right_wrong(r)[0]) for r in cloze_task("train", blanks=4)}
    assert trained and not trained & {sent for _, sent in source}
    assert cloze_all_blanks() == records and cloze_all_blanks(seed=1) != records
    assert [_parts(r) for r in cloze_all_blanks(style="option")] == [_parts(r) for r in records]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        cloze_all_blanks("dev")
    with pytest.raises(ValueError, match="unknown style 'x'; choose one of word, option"):
        cloze_all_blanks(style="x")


def test_default_records_carry_no_cluster(tasks):
    assert all("cluster" not in r for rs in tasks.values() for r in rs)


def test_make_task_cloze(tmp_path, monkeypatch):
    module = load_script("make_task")
    cfg = module.parse_args(["--task", "cloze", "--out", str(tmp_path / "cloze"), "--n-val", "30"])
    assert cfg.n_train is None and cfg.n_val == 30
    train_path, test_path = module.main(cfg)
    assert test_path.name == "test.jsonl"
    assert load_records(train_path) == cloze_task("train")
    assert load_records(test_path) == cloze_task("test", 30)
    cfg = module.parse_args(["--task", "cloze", "--out", str(tmp_path / "c4"), "--blanks", "4", "--style", "option"])
    train_path, test_path = module.main(cfg)
    assert load_records(train_path) == cloze_task("train", style="option", blanks=4)
    assert load_records(test_path) == cloze_task("test", style="option")
    with pytest.raises(SystemExit):
        module.parse_args(["--task", "cloze", "--out", str(tmp_path), "--blanks", "0"])
