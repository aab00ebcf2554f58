"""The built-in training tasks that `--data` names, and the default one.

Without `--data` a run trains on the cloze task (`fora.training.cloze`: the train split, four
blanks per sentence, word answers), the built-in task a small model measurably learns; train.py
then scores the held-out test split before and after (`fora.evaluation.final_eval`). The
arithmetic task (`fora.training.tasks`) stays available as `--data arithmetic`: its validation loss
falls, but it shows the answer format being learnt, not accuracy.
"""
from __future__ import annotations

from pathlib import Path

from fora.training.cloze import cloze_task
from fora.training.tasks import arithmetic_task

BUILTIN_TASKS = ("cloze", "arithmetic")
DEFAULT_TASK = "cloze"
CLOZE_BLANKS = 4  # training records per sentence, each blanking another word (2,532 records)


def is_builtin(data: str | None) -> bool:
    """`--data` names a built-in task (None = the default one); an existing path of that name wins."""
    return data is None or (data in BUILTIN_TASKS and not Path(data).exists())


def builtin_records(name: str | None, *, task_size: int, seed: int) -> list[dict[str, str]]:
    """The training records of a built-in task (`--data cloze`, `--data arithmetic`; None = cloze)."""
    name = name or DEFAULT_TASK
    if name == "cloze":  # a fixed task: `seed` orders the run, it does not redraw the blanks
        return cloze_task("train", blanks=CLOZE_BLANKS)
    if name == "arithmetic":
        return arithmetic_task(task_size, seed=seed)
    raise ValueError(f"unknown built-in task {name!r}; choose one of {', '.join(BUILTIN_TASKS)} "
                     "or pass a data file")


def trains_on_builtin_cloze(data: str | None) -> bool:
    return is_builtin(data) and (data or DEFAULT_TASK) == "cloze"
