"""A base model with an optional LoRA adapter (fora's or peft's), ready for evaluation."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from fora.formats.loading import load_model, load_tokenizer
from fora.formats.peft_io import ADAPTER_CONFIG, load_adapter
from fora.formats.tokenizer import LoadedTokenizer

log = logging.getLogger(__name__)


def adapter_base(adapter_dir: str | os.PathLike[str]) -> str | None:
    """The `base_model_name_or_path` an adapter folder names (None if it names none)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        parent = Path(adapter_dir).parent
        hint = (f"; {parent} holds one: a train.py run's adapter is its run folder itself, --adapter {parent}"
                if (parent / ADAPTER_CONFIG).is_file() else "")
        raise FileNotFoundError(f"{path} not found; --adapter must be a folder written by fora's trainer (the "
                                "run folder itself, train.py's --out, e.g. runs/smollm2-135m-fora-k15) or by "
                                f"peft's save_pretrained{hint}")
    try:
        return json.loads(path.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the adapter") from err


def attach_adapter(model: nn.Module, adapter_dir: str | os.PathLike[str], model_name: str) -> nn.Module:
    """`load_adapter`, with an error naming the adapter's base and the model when they do not fit."""
    base = adapter_base(adapter_dir)
    try:
        load_adapter(model, adapter_dir)
    except ValueError as err:
        raise ValueError(f"adapter {str(adapter_dir)!r} was trained on base model {base!r}, which does "
                         f"not match the model {model_name!r} ({err}); pass --model {base}") from err
    return model


def load_evaluated(model_name: str, adapter: str | os.PathLike[str] | None = None, *,
                   dtype: torch.dtype | None = None, device: str | torch.device | None = None
                   ) -> tuple[nn.Module, LoadedTokenizer]:
    """(model in eval mode with the adapter attached, tokenizer) for a preset, folder or GGUF file."""
    if adapter is not None:
        adapter_base(adapter)  # a missing adapter folder fails before the model loads
    model = load_model(model_name, dtype=dtype, device=device)
    tokenizer = load_tokenizer(model_name)
    if adapter is not None:
        attach_adapter(model, adapter, model_name)
        log.info("attached adapter %s (base %s) to %s", adapter, adapter_base(adapter), model_name)
    return model.eval().requires_grad_(False), tokenizer
