"""What the evaluation scripts (eval.py, generate.py, analyze.py) do around their `main`:
INFO logging to stderr, and an error a user can fix printed as one line with exit status 1
instead of a traceback."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError, PermissionError, ImportError)


def run_cli(prog: str, parse_args: Callable[[Sequence[str] | None], Any], main: Callable[[Any], Any],
            argv: Sequence[str] | None = None, errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """Parse `argv`, run `main(cfg)`; 0 on success, 1 (and "`prog`: error: message") on `errors`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = parse_args(argv)
    try:
        main(cfg)
    except errors as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    return 0
