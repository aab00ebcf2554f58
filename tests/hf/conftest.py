"""Tiny random LLaMA / Qwen3 / Gemma-3 checkpoints (written by transformers' save_pretrained), once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-tiny")
    return {family: make_tiny_checkpoint(root / family, family) for family in ("llama", "qwen3", "gemma3")}
