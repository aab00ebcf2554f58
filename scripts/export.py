#!/usr/bin/env python3
"""Export a run's adapter, its base model or the merged model as GGUF, for llama.cpp and ollama.

The command is fora/cli/export.py, installed as `fora-export`; this file runs it from a checkout.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fora.cli.export import ExportConfig, TARGETS, TYPES, build_parser, cli, main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(cli())
