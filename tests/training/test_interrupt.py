"""StopRequest: the first Ctrl-C in an armed loop becomes a flag; before arming, or pressed twice,
it interrupts at once; the previous SIGINT handler comes back."""
from __future__ import annotations

import os
import signal

import pytest

from fora.training.interrupt import StopRequest


def test_ctrl_c_is_deferred_only_while_armed():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        with pytest.raises(KeyboardInterrupt):       # loading / scoring: nothing to save yet
            os.kill(os.getpid(), signal.SIGINT)
        stop.forced = False
        stop.armed = True
        os.kill(os.getpid(), signal.SIGINT)           # in the loop: a request, no exception
        assert stop.requested and not stop.forced
        with pytest.raises(KeyboardInterrupt):       # pressed again: abort
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.forced
    assert signal.getsignal(signal.SIGINT) is before
