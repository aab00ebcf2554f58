"""Write the synthetic arithmetic task (Commonsense-170K format) as train/val JSONL files.

    python scripts/make_task.py --out data/arith --n-train 2000 --n-val 200 --seed 0

The validation questions are drawn first and excluded from training, so the two files share no
question and each has balanced answers.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from fora.training.data import write_jsonl
from fora.training.tasks import KINDS, arithmetic_task

log = logging.getLogger("make_task")


@dataclass(frozen=True)
class MakeTaskConfig:
    out: Path
    n_train: int = 2000
    n_val: int = 200
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    values: tuple[int, int] = (10, 99)


def parse_args(argv: list[str] | None = None) -> MakeTaskConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and val.jsonl")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--values", type=int, nargs=2, default=[10, 99], metavar=("LO", "HI"),
                   help="operand range, inclusive")
    a = p.parse_args(argv)
    return MakeTaskConfig(out=a.out, n_train=a.n_train, n_val=a.n_val, seed=a.seed,
                          kinds=tuple(a.kinds), values=(a.values[0], a.values[1]))


def main(cfg: MakeTaskConfig) -> tuple[Path, Path]:
    val = arithmetic_task(cfg.n_val, cfg.seed + 1, kinds=cfg.kinds,
                          values=cfg.values) if cfg.n_val > 0 else []
    train = arithmetic_task(cfg.n_train, cfg.seed, kinds=cfg.kinds, values=cfg.values,
                            exclude={r["instruction"] for r in val})
    train_path = write_jsonl(train, cfg.out / "train.jsonl")
    val_path = write_jsonl(val, cfg.out / "val.jsonl")
    log.info("wrote %d train records to %s and %d val records to %s",
             len(train), train_path, len(val), val_path)
    return train_path, val_path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parse_args())
