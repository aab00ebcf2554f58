"""fora.evaluation.tasks_io: LLM-Adapters' test-set layouts, and the answer word of every task pattern.

The instructions below follow LLM-Adapters' dataset/<task>/test.json files (the `Answer format:`
line is what `record_choices` reads); extraction is `fora.training.tasks.extract_answer`.
"""
from __future__ import annotations

import json

import pytest

from fora.evaluation.tasks_io import TASK_CHOICES, limit_tasks, load_eval_tasks, record_choices
from fora.training.tasks import extract_answer

INSTRUCTIONS = {
    "boolq": "Please answer the following question with true or false, question: is water wet?"
             "\n\nAnswer format: true/false",
    "piqa": "Please choose the correct solution to the question: open a jar\n\nSolution1: twist the lid"
            "\n\nSolution2: shout at it\n\nAnswer format: solution1/solution2",
    "social_i_qa": "Please choose the correct answer to the question: why?\n\nAnswer1: a\n\nAnswer2: b"
                   "\n\nAnswer3: c\n\nAnswer format: answer1/answer2/answer3",
    "ARC-Challenge": "Please choose the correct answer to the question: which?\n\nAnswer1: a\n\n"
                     "Answer2: b\n\nAnswer3: c\n\nAnswer4: d\n\nAnswer5: e\n\n"
                     "Answer format: answer1/answer2/answer3/answer4/answer5",
    "hellaswag": "Please choose the correct ending to complete the given sentence: He ...\n\n"
                 "Ending1: a\n\nEnding2: b\n\nEnding3: c\n\nEnding4: d\n\n"
                 "Answer format: ending1/ending2/ending3/ending4",
    "winogrande": "Please choose the correct answer to fill in the blank to complete the given sentence:"
                  " The _ is big.\n\nOption1: cat\n\nOption2: house\n\nAnswer format: option1/option2",
}
# generated text -> extracted answer (None = a miss), per pattern; near-misses must not match
CASES = {
    "boolq": [("the correct answer is true", "true"), ("False.", "false"), ("TRUE", "true"),
              ("it is untrue", None), ("truely false", "false"), ("yes", None), ("", None)],
    "piqa": [("the correct answer is solution2", "solution2"), ("Solution1 is right", "solution1"),
             ("solution 1", None), ("solution12", None), ("solution3", None)],
    "social_i_qa": [("answer3", "answer3"), ("answer2 or answer1", "answer2"), ("answer4", None),
                    ("answers", None), ("Answer:1", None)],
    "ARC-Challenge": [("the correct answer is answer5", "answer5"), ("answer10", None),
                      ("answer6", None), ("answer_1", None), ("answer4.", "answer4")],
    "hellaswag": [("the correct answer is ending4", "ending4"), ("ending 2", None),
                  ("ending5", None), ("Ending1!", "ending1"), ("endings", None)],
    "winogrande": [("option2", "option2"), ("option3", None), ("(option1)", "option1"),
                   ("options", None), ("optional", None)],
}


@pytest.mark.parametrize("task", sorted(CASES))
def test_extraction_for_every_pattern(task):
    choices = record_choices({"instruction": INSTRUCTIONS[task]}, task)
    assert choices == TASK_CHOICES[task][:len(choices)]
    for text, expected in CASES[task]:
        assert extract_answer(text, choices) == expected, text


def test_choices_fall_back_to_the_task_pattern():
    record = {"instruction": "Please answer true or false: is it?"}
    assert record_choices(record, "boolq") == ["true", "false"]
    assert record_choices(record, "ARC-Easy") == ["answer1", "answer2", "answer3", "answer4", "answer5"]
    with pytest.raises(ValueError, match="has no trailing 'Answer format: a/b/...' line and the task is none of"):
        record_choices(record, "mystery")


def _rec(answer="true"):
    return {"instruction": INSTRUCTIONS["boolq"], "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


def test_layouts(tmp_path):
    root = tmp_path / "dataset"
    for task, n in (("boolq", 3), ("piqa", 2)):
        (root / task).mkdir(parents=True)
        (root / task / "test.json").write_text(json.dumps([_rec()] * n))
    (root / "README.md").write_text("not a task")
    (root / "empty").mkdir()
    assert {k: len(v) for k, v in load_eval_tasks(root).items()} == {"boolq": 3, "piqa": 2}
    assert list(load_eval_tasks(root / "boolq" / "test.json")) == ["boolq"]  # parent folder's name
    assert list(load_eval_tasks(root / "piqa")) == ["piqa"]  # one task folder
    jsonl = tmp_path / "my_task.jsonl"
    jsonl.write_text("".join(json.dumps(_rec("false")) + "\n" for _ in range(4)))
    assert {k: len(v) for k, v in load_eval_tasks(jsonl).items()} == {"my_task": 4}


def test_unknown_layout_and_bad_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.json").write_text("[]")
    with pytest.raises(ValueError, match=r"unknown task layout in .*: expected test.json .* found \['a'\]"):
        load_eval_tasks(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_tasks(tmp_path / "missing.json")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is not a .json/.jsonl file"):
        load_eval_tasks(tmp_path / "notes.txt")
    no_answer = tmp_path / "t.json"
    no_answer.write_text(json.dumps([_rec(), {k: v for k, v in _rec().items() if k != "answer"}]))
    no_answer.write_text(json.dumps([_rec(), {k: v for k, v in _rec().items() if k != "answer"}], indent=0))
    with pytest.raises(ValueError, match=r"t.json, line 8: record 2 of 2 \(and 0 more\) has no 'answer'"):
        load_eval_tasks(no_answer)


def test_limit():
    tasks = {"a": [1, 2, 3], "b": [4]}
    assert limit_tasks(tasks, 2) == {"a": [1, 2], "b": [4]}
    assert limit_tasks(tasks, None) == tasks
    with pytest.raises(ValueError, match="limit must be >= 1"):
        limit_tasks(tasks, 0)
