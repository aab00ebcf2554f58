"""fora.training.tasks and scripts/make_task.py: the synthetic task is balanced, correct, deterministic.

Correctness is recomputed from the question text with an independent parser.
"""
from __future__ import annotations

import re
from collections import Counter

import pytest
from script_loader import load_script

from fora.training.data import load_records, validate_records
from fora.training.tasks import answer_accuracy, arithmetic_task, choices_from_instruction, extract_answer

SUM = re.compile(r"question: is (\d+) \+ (\d+) = (\d+)\?\n\nAnswer format: true/false$")
CMP = re.compile(r"which number is larger\?\n\nSolution1: (\d+)\n\nSolution2: (\d+)\n\n"
                 r"Answer format: solution1/solution2$")


def expected_answer(instruction: str) -> tuple[str, str]:
    if m := SUM.search(instruction):
        a, b, c = map(int, m.groups())
        return "sum", "true" if a + b == c else "false"
    m = CMP.search(instruction)
    assert m, instruction
    a, b = map(int, m.groups())
    assert a != b
    return "compare", "solution1" if a > b else "solution2"


def test_answers_correct_balanced_distinct_and_in_format():
    records = arithmetic_task(401, seed=0)
    validate_records(records)
    assert len({r["instruction"] for r in records}) == 401
    counts = Counter()
    for r in records:
        kind, answer = expected_answer(r["instruction"])
        assert r["answer"] == answer
        assert r["output"] == f"the correct answer is {answer}"
        assert r["input"] == "" and set(r) == {"instruction", "input", "output", "answer"}
        counts[kind, answer] += 1
    assert abs(counts["sum", "true"] - counts["sum", "false"]) <= 1
    assert abs(counts["compare", "solution1"] - counts["compare", "solution2"]) <= 1
    assert abs(counts["sum", "true"] + counts["sum", "false"] - 200.5) <= 1
    # wrong sums are close to the true sum, so the model has to add
    for r in records:
        if (m := SUM.search(r["instruction"])) and r["answer"] == "false":
            a, b, c = map(int, m.groups())
            assert 1 <= abs(a + b - c) <= 10


def test_deterministic_by_seed_and_options():
    assert arithmetic_task(50, seed=3) == arithmetic_task(50, seed=3)
    assert arithmetic_task(50, seed=3) != arithmetic_task(50, seed=4)
    only_sum = arithmetic_task(20, kinds=("sum",), values=(1, 9))
    assert all(expected_answer(r["instruction"])[0] == "sum" for r in only_sum)
    assert all(int(x) <= 9 for r in only_sum for x in SUM.search(r["instruction"]).groups()[:2])
    first = arithmetic_task(30, seed=1)
    other = arithmetic_task(30, seed=1, exclude={r["instruction"] for r in first})
    assert not {r["instruction"] for r in first} & {r["instruction"] for r in other}


def test_task_errors():
    with pytest.raises(ValueError, match=r"unknown task kinds \['mul'\]; choose from"):
        arithmetic_task(4, kinds=("sum", "mul"))
    with pytest.raises(ValueError, match="values must be"):
        arithmetic_task(4, values=(5, 5))
    with pytest.raises(ValueError, match="n must be >= 1"):
        arithmetic_task(0)
    with pytest.raises(ValueError, match="cannot draw 50 distinct questions.*widen"):
        arithmetic_task(50, kinds=("compare",), values=(1, 3))


def test_extract_answer_and_accuracy():
    assert extract_answer("the correct answer is true", ["true", "false"]) == "true"
    assert extract_answer("False. It is not, though true sums exist", ["true", "false"]) == "false"
    assert extract_answer("untrue, so: false", ["true", "false"]) == "false"
    assert extract_answer("the answer is Option10", ["option1", "option10"]) == "option10"
    assert extract_answer("no idea", ["true", "false"]) is None
    with pytest.raises(ValueError, match="choices is empty"):
        extract_answer("true", [])
    records = arithmetic_task(4, seed=0)
    assert choices_from_instruction(records[0]["instruction"]) in (
        ["true", "false"], ["solution1", "solution2"])
    with pytest.raises(ValueError, match="no trailing 'Answer format"):
        choices_from_instruction("Name a colour.")
    gens = [r["output"] for r in records]
    assert answer_accuracy(gens, records) == 1.0
    gens[0] = "I cannot say"
    assert answer_accuracy(gens, records) == 0.75
    with pytest.raises(ValueError, match="got 3 generations for 4 records"):
        answer_accuracy(gens[:3], records)


def test_make_task_script(tmp_path, monkeypatch):
    make_task = load_script("make_task")
    cfg = make_task.parse_args(["--out", str(tmp_path / "arith"), "--n-train", "40",
                                "--n-val", "10", "--seed", "7"])
    assert cfg.n_train == 40 and cfg.values == (10, 99) and cfg.kinds == ("sum", "compare")
    train_path, val_path = make_task.main(cfg)
    train, val = load_records(train_path), load_records(val_path)
    assert len(train) == 40 and len(val) == 10
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in val}
    assert Counter(r["answer"] for r in val) == Counter(r["answer"] for r in arithmetic_task(10, 8))
    make_task.main(cfg)  # rewriting gives the same files
    assert load_records(train_path) == train
