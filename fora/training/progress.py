"""Training progress for a person watching: a tqdm bar on a terminal, plain log lines otherwise.

On a terminal (stderr, where the bar is drawn, is a TTY) the bar shows step / total, ETA and, every
`--log-every` steps, loss, lr and tok/s; log messages are routed around it. Redirected to a file,
there is no bar: one log line per `--log-every` steps with the same figures and the ETA. The
validation pass shows progress the same way (a transient bar, or a line saying what it scores), and so
do the evaluation passes (`tracked`): a log file never gets a bar's carriage returns.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from fora.training.loop import format_eta

log = logging.getLogger("fora.train")
T = TypeVar("T")


def is_terminal() -> bool:
    """Whether a progress bar can be drawn (stderr is a TTY)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Progress(contextlib.AbstractContextManager):
    """Per-step progress of one run: `with Progress(total, start) as p: ... p.step(step, row)`."""

    def __init__(self, total: int, start: int = 0, *, bar: bool | None = None) -> None:
        self.total, self.start = total, start
        self.bar_enabled = is_terminal() if bar is None else bar
        self.bar = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Progress:
        if self.bar_enabled:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._stack.enter_context(logging_redirect_tqdm())
            self.bar = self._stack.enter_context(
                tqdm(total=self.total, initial=self.start, unit="step", desc="train", file=sys.stderr,
                     dynamic_ncols=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def step(self, step: int, row: dict[str, Any] | None = None, eta: float = 0.0) -> None:
        """After optimizer step `step`; `row` (loss, lr, tok_s) when this step is a logging step."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if row:
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                     tok_s=f"{row['tok_s']:.0f}", refresh=True)
        elif row:
            log.info("step %d/%d  loss %.4f  lr %.2e  tok/s %.0f  eta %s", step, self.total, row["loss"],
                     row["lr"], row["tok_s"], format_eta(eta))

    def validation(self, batches: Sequence[T], step: int, examples: int) -> Iterable[T]:
        """`batches` wrapped so that the validation pass at `step` shows its progress."""
        if self.bar_enabled:
            from tqdm.auto import tqdm

            return tqdm(batches, desc=f"validation @ step {step}", unit="batch", leave=False,
                        file=sys.stderr, dynamic_ncols=True)
        log.info("validation at step %d: %d examples in %d batches...", step, examples, len(batches))
        return batches


def tracked(items: Sequence[T], desc: str, *, enabled: bool = True, unit: str = "batch",
            units: str = "batches") -> Iterator[T]:
    """`items`, showing progress when `enabled`: a transient tqdm bar labelled `desc` on a terminal,
    else a plain log line when the pass starts ("`desc`: 24 batches...") and one when it ends."""
    if not enabled:
        yield from items
        return
    if is_terminal():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
        return
    plain, t0 = logging.getLogger("fora.progress"), time.perf_counter()
    plain.info("%s: %d %s...", desc, len(items), unit if len(items) == 1 else units)
    yield from items
    plain.info("%s: done in %.1f s", desc, time.perf_counter() - t0)
