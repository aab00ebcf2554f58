#!/usr/bin/env python3
"""Greedy continuation of a prompt and perplexity of a paragraph, with fora's own model code.

The command is fora/cli/generate.py, installed as `fora-generate`; this file runs it from a checkout.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fora.cli.generate import (  # noqa: E402,F401
    DEFAULT_PARAGRAPH, DEFAULT_PROMPT, GenerateConfig, build_parser, cli, greedy, main, parse_args, perplexity)

if __name__ == "__main__":
    sys.exit(cli())
