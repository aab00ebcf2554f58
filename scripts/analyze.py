#!/usr/bin/env python3
"""What did a training run's adapter do? Spectra, effective rank, Stiefel error, KL drift, plots.

The command is fora/cli/analyze.py, installed as `fora-analyze`; this file runs it from a checkout.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fora.cli.analyze import AnalyzeConfig, USER_ERRORS, cli, main, parse_args, write_plots  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(cli())
