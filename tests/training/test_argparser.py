"""The scripts' command lines: an error says what is wrong on its first line (no usage before it),
and a negative number is a flag's value (`--lr -1e-3`), as a person types it."""
from __future__ import annotations

import pytest
from script_loader import load_script

from fora.training.argparser import join_negative_values
from fora.training.flags import build_parser, parse_args

HINT = "(train.py --help shows the usage and every flag)"


def _error(capsys, argv, parse=parse_args) -> list[str]:
    with pytest.raises(SystemExit) as done:
        parse(argv)
    assert done.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_negative_numbers_are_values(capsys):
    assert build_parser().parse_args(["--model", "m", "--lr", "-1e-3", "--seed", "-1"]).lr == -1e-3
    for argv in (["--model", "m", "--lr", "-1e-3"], ["--model", "m", "--lr=-1e-3"]):
        # the value reaches --lr's own check, not argparse's "expected one argument"
        assert _error(capsys, argv) == ["train.py: error: --lr must be > 0, got -0.001", HINT]
    assert _error(capsys, ["--model", "m", "--stiefel-lr-scale", "-.5"])[0] == \
        "train.py: error: --stiefel-lr-scale must be > 0, got -0.5"
    parser = build_parser()
    assert join_negative_values(parser, ["--lr", "-1e-3", "--merge", "--k", "-2", "--", "--rank", "-4"]) == \
        ["--lr=-1e-3", "--merge", "--k=-2", "--", "--rank", "-4"]
    assert join_negative_values(parser, ["--model", "-m"]) == ["--model", "-m"]  # not a number: an option


def test_an_error_comes_first_without_the_usage(capsys):
    err = _error(capsys, ["--model", "m", "--bogus"])
    assert err == ["train.py: error: unrecognized arguments: --bogus", HINT]
    err = _error(capsys, ["--k", "3"])                          # --model missing
    assert err[0] == "train.py: error: the following arguments are required: --model" and len(err) == 2
    export = load_script("export")
    err = _error(capsys, ["run", "--to", "onnx"], export.parse_args)
    assert ": error: argument --to: invalid choice: 'onnx'" in err[0] and not any("usage:" in e for e in err)
