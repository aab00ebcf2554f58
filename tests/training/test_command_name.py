"""Usage lines and errors name the command in hand: `fora-train` when installed, `train.py` from a checkout."""
from __future__ import annotations

import sys

import pytest

from fora.training.argparser import command_name
from fora.training.flags import build_parser


@pytest.mark.parametrize("argv0,expected", [
    ("/venv/bin/fora-train", "fora-train"), ("scripts/train.py", "train.py"), ("/usr/bin/pytest", "train.py"),
    ("/venv/bin/fora-eval", "train.py"), ("", "train.py"),
])
def test_the_installed_command_names_itself(monkeypatch, argv0, expected):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert command_name("train.py") == expected
    assert build_parser().prog == expected
