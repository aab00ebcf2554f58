#!/usr/bin/env python3
"""Fine-tune a decoder LLM with FoRA or one of its ablations; writes a PEFT LoRA adapter.

The command is fora/cli/train.py, installed as `fora-train`; this file runs it from a checkout.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fora.cli.train import USER_ERRORS, cli  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(cli())
