"""What an adapter may wrap: an nn.Linear, or a packed linear whose weight is rebuilt in forward.

A packed linear (the 4-bit NF4 base of ``fora.quant.nf4``) stores its weight as codes and constants
(buffers, or frozen Parameters once FSDP shards them), so it has no ``weight`` Parameter; it
announces itself by ``in_features``, ``out_features`` and ``dequantized_weight()``. The core
(``fora.lora``, ``fora.inject``, ``fora.fisher``) asks these two questions and imports no
quantization code.
"""
from __future__ import annotations

import torch
from torch import nn


def is_packed_linear(module: nn.Module) -> bool:
    """A linear layer that stores its weight packed (no ``weight`` Parameter) and rebuilds it in
    forward: it has ``in_features``, ``out_features`` and ``dequantized_weight()``."""
    return (not isinstance(module, nn.Linear) and isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int)
            and callable(getattr(module, "dequantized_weight", None)))


def is_linear(module: nn.Module) -> bool:
    """What an adapter can wrap: an nn.Linear or a packed linear."""
    return isinstance(module, nn.Linear) or is_packed_linear(module)


def linear_device(module: nn.Module) -> torch.device:
    """Where a linear layer's weight lives: its ``weight``, or a packed layer's codes (buffers, or
    Parameters once FSDP shards them)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter):
        return weight.device
    return next(iter([*module.buffers(), *module.parameters()])).device
