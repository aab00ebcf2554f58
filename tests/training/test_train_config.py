"""TrainConfig and its CLI: validation messages, defaults that depend on the run."""
from __future__ import annotations

import pytest

from fora.training.config import TrainConfig
from fora.training.flags import parse_args


def test_float16_training_is_refused_with_bf16_as_the_fix(capsys):
    # fp16 autocast without a GradScaler lets small gradients underflow silently.
    with pytest.raises(ValueError, match=r"--dtype float16 is not supported.*underflow.*--dtype bfloat16"):
        TrainConfig(model="m", dtype="float16")
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--dtype", "float16"])
    assert "use --dtype bfloat16" in capsys.readouterr().err
    assert parse_args(["--model", "m", "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown --dtype 'half'"):
        TrainConfig(model="m", dtype="half")


def test_learning_rate_errors_name_only_the_flag_given():
    with pytest.raises(ValueError) as err:
        TrainConfig(model="m", lr=0.0)
    assert str(err.value) == "--lr must be > 0, got 0.0"
    with pytest.raises(ValueError) as err:
        TrainConfig(model="m", stiefel_lr=-1.0)
    assert "--stiefel-lr must be > 0, got -1.0" in str(err.value) and "--lr " not in str(err.value)
