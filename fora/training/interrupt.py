"""Ctrl-C during training: stop at the next step boundary, write a checkpoint, say how to resume.

`StopRequest` turns the first SIGINT into a flag the loop checks between optimizer steps, so a
checkpoint is never written from a half-applied step (after one optimizer stepped and not the
other). A second Ctrl-C raises KeyboardInterrupt at once (abort, no checkpoint), and so does a
Ctrl-C before the loop is armed (model loading, layer scoring: there is nothing to save yet). Off the main
thread, where Python cannot install signal handlers, a KeyboardInterrupt raised by the caller is
handled at the step boundary the same way.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fora.train")


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C after writing a checkpoint; `command` continues it."""

    def __init__(self, step: int, total: int, checkpoint: Path, command: str) -> None:
        self.step, self.total, self.checkpoint, self.command = step, total, checkpoint, command
        super().__init__(f"interrupted after step {step} of {total}; checkpoint in {checkpoint}. "
                         f"Resume with:\n  {command}")


class StopRequest(contextlib.AbstractContextManager):
    """Context manager: while active, Ctrl-C sets `requested` instead of raising (main thread)."""

    def __init__(self) -> None:
        self.requested = False
        self.forced = False
        self.armed = False  # set when the loop starts: from then on a checkpoint can be written
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested or not self.armed:  # second Ctrl-C, or nothing to save yet: out now
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step and writing a checkpoint "
                    "(press Ctrl-C again to abort without one)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def resume_command(out: Path) -> str:
    """The one command that continues the run in `out` (its settings come from its train_config.json)."""
    return f"python scripts/train.py --resume {out}"


@dataclass
class LiveRun:
    """What a Ctrl-C needs to write a checkpoint; the trainer fills it in once its loop runs
    (`save(position)` writes the checkpoint of `position`, a `DataPosition`)."""

    stack: contextlib.ExitStack
    stop: StopRequest
    out: Path | None = None
    total: int = 0
    position: Any = None
    save: Callable[[Any], Path] | None = None


@contextlib.contextmanager
def checkpoint_on_interrupt() -> Iterator[LiveRun]:
    """Around a training run: a KeyboardInterrupt at a step boundary writes the checkpoint of
    `live.position` and becomes `TrainingInterrupted`; before the loop, or forced, it passes."""
    with contextlib.ExitStack() as stack, StopRequest() as stop:
        live = LiveRun(stack, stop)
        try:
            yield live
        except KeyboardInterrupt:
            if stop.forced or live.save is None:
                raise
            ckpt_dir = live.save(live.position)
            raise TrainingInterrupted(live.position.step, live.total, ckpt_dir, resume_command(live.out)) from None
