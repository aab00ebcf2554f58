"""FoRA inside the Hugging Face stack: peft adapters, a Trainer optimizer, Fisher layer choice.

The only part of fora that imports transformers / peft (and only when used); the rest of the
package never does.

    config = fora.hf.fisher_lora_config(model, fora.hf.text_batches(tok, texts), k=8, r=16, lora_alpha=32)
    model = fora.hf.get_fora_model(model, config)                  # peft model, FoRA's adapters
    trainer = SFTTrainer(model=model, ..., optimizers=(fora.hf.FoRAOptimizer(model), None))
"""
from __future__ import annotations

from typing import Any

from torch import nn

from fora.hf.adapter import GatedDown, fora_layers, make_fora
from fora.hf.calibration import text_batches
from fora.hf.config import check_targets, fisher_lora_config, matched_modules
from fora.hf.optimizer import FoRAOptimizer

__all__ = ["FoRAOptimizer", "GatedDown", "check_targets", "fisher_lora_config", "fora_layers",
           "get_fora_model", "make_fora", "matched_modules", "text_batches"]


def get_fora_model(model: nn.Module, config: Any, *, seed: int | None = None) -> Any:
    """``peft.get_peft_model(model, config)`` with FoRA's adapter in every LoRA layer (``make_fora``)."""
    import peft

    peft_model = peft.get_peft_model(model, config)
    make_fora(peft_model, seed=seed)
    return peft_model
