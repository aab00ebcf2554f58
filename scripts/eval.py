#!/usr/bin/env python3
"""Accuracy on LLM-Adapters-format test sets and sliding-window perplexity, with or without an adapter.

The command is fora/cli/eval.py, installed as `fora-eval`; this file runs it from a checkout.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fora.cli.eval import EvalConfig, cli, format_table, main, parse_args, write_outputs  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(cli())
