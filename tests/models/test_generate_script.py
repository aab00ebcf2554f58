"""scripts/generate.py on a tiny random checkpoint: --help documents every flag, messages print once."""
from __future__ import annotations

import logging

import pytest
from script_loader import load_script
from tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def gen():
    return load_script("generate")


def test_help_documents_every_flag(gen, capsys):
    parser = gen.build_parser()
    undocumented = [a.option_strings for a in parser._actions if not a.help]
    assert undocumented == []
    with pytest.raises(SystemExit):
        gen.parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--paragraph", "--max-new-tokens", "--dtype", "--device"):
        assert flag in out
    assert "text to continue greedily" in out and "(default: 30)" in out


def test_each_message_prints_once(gen, tmp_path, capsys, caplog):
    folder = make_tiny_checkpoint(tmp_path, "llama", num_hidden_layers=2)
    with caplog.at_level(logging.INFO):
        assert gen.cli(["--model", str(folder), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(set(messages)), messages
    assert sum("loaded" in m for m in messages) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(gen.DEFAULT_PROMPT) and "perplexity" in out[1]
