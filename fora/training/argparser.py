"""The scripts' argparse: the error message first, and negative numbers taken as values.

Two things plain argparse gets wrong for a person at a shell:
- an error prints the whole usage (25 lines for train.py) before the one line that says what is
  wrong; here the message comes first, then where the usage is (`--help`);
- `--lr -1e-3` fails with "expected one argument", because argparse reads `-1e-3` (scientific
  notation) as an option; here a value that parses as a number is joined to its flag
  (`--lr=-1e-3`), so it reaches the flag's own check (`--lr must be > 0, got -0.001`).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf(inity)?|-nan", re.IGNORECASE)


def command_name(script: str) -> str:
    """What the user typed: `fora-<name>` when running the installed command, else the script's
    file name (`train.py`), so usage lines and errors name the command in hand."""
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return invoked if invoked == f"fora-{Path(script).stem}" else script


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with the error first and negative numbers accepted as values."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help shows the usage and every flag)\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(join_negative_values(self, args), namespace)


def join_negative_values(parser: argparse.ArgumentParser, args: Sequence[str]) -> list[str]:
    """`["--lr", "-1e-3"]` -> `["--lr=-1e-3"]` for every flag of `parser` that takes one value."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + list(args[i:])
        action = parser._option_string_actions.get(arg)  # noqa: SLF001 - argparse has no public lookup
        takes_one = action is not None and action.nargs in (None, "?")  # flags (store_true, ...) take 0
        if takes_one and arg.startswith("--") and i + 1 < len(args) and NUMBER.fullmatch(args[i + 1]):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out
