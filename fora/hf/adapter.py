"""FoRA's adapter on a peft model: B column-orthonormal, A ~ N(0, 1/r), a scalar gate g = 0 (Eq. 1).

peft's ``lora.Linear`` computes ``lora_B(lora_A(dropout(x))) * scaling``. ``make_fora`` swaps each
selected layer's ``lora_A`` for a ``GatedDown``: the same weight A, times a learnable scalar g on
its (N, r) output, so peft's own forward computes Eq. 1 unchanged (no patched forward):

    y = x W0ᵀ + g · s · (dropout(x) Aᵀ) Bᵀ

The function of the layer depends on g · A only; the split into A and g matters for training. So a
``GatedDown`` writes its weight folded (``g · A``, no gate tensor) into every ``state_dict``: peft's
``save_pretrained`` (and every Trainer checkpoint) writes an ordinary LoRA adapter that any LoRA
loader reads as the trained function, with B orthonormal. Loading folded weights back sets A = g · A
and g = 1 (the same function); ``FoRAOptimizer``'s state carries the trained split, so a Trainer
checkpoint resumes bit-identically. ``merge`` / ``merge_and_unload`` fold g as well.
"""
from __future__ import annotations

import math
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fora.stiefel import random_stiefel


class GatedDown(nn.Linear):
    """peft's ``lora_A`` (A: r × d_in, no bias) with FoRA's gate g on its output: u = g · x Aᵀ."""

    def __init__(self, down: nn.Linear) -> None:
        nn.Module.__init__(self)
        if down.bias is not None:
            raise ValueError("FoRA's gate needs lora_A without a bias; build the LoraConfig with lora_bias=False")
        self.in_features, self.out_features = down.in_features, down.out_features
        self.weight = down.weight  # the same Parameter: A keeps its identity
        self.register_parameter("bias", None)
        self.gate = nn.Parameter(torch.zeros((), dtype=down.weight.dtype, device=down.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        u = F.linear(x, self.weight)
        return u * self.gate.to(u.dtype)

    def folded(self) -> Tensor:
        """g · A, what a LoRA loader must see as A (detached)."""
        return self.gate.detach().to(self.weight.dtype) * self.weight.detach()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.folded()  # the function, with no gate tensor

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "gate" not in state_dict and prefix + "weight" in state_dict:
            missing_keys.remove(prefix + "gate")  # folded weights: A = g · A, g = 1, the same function
            with torch.no_grad():
                self.gate.fill_(1.0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gated=True"


def _gated_delta_weight(self: nn.Module, adapter: str) -> Tensor:
    """peft's ΔW = s · B A, times g where A is gated: what merge / unmerge add to W0."""
    delta = type(self).get_delta_weight(self, adapter)
    down = self.lora_A[adapter]
    return delta * down.gate.detach().to(delta.dtype) if isinstance(down, GatedDown) else delta


def fora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """{module path: peft lora layer} for every layer whose ``adapter_name`` carries FoRA's gate."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and isinstance(m.lora_A[adapter_name] if adapter_name in m.lora_A else None, GatedDown)}


def make_fora(model: nn.Module, *, seed: int | None = None, adapter_name: str = "default") -> dict[str, nn.Module]:
    """Turn every LoRA layer of ``adapter_name`` in a peft model into FoRA's adapter, in place.

    B = ``random_stiefel(d_out, r)`` (BᵀB = I), A ~ N(0, 1/r), g = 0, so ΔW = 0 at step 0. Call it
    right after ``peft.get_peft_model`` and before building the optimizer. ``seed`` seeds the draws
    (in module order). Returns {module path: layer}.

    Raises:
        ValueError when the model has no such LoRA layer, a layer is not a linear one, uses DoRA or
        a LoRA bias, or its rank exceeds d_out (no r orthonormal columns of length d_out).
    """
    from peft.tuners.lora import Linear as LoraLinear

    layers = {name: m for name, m in model.named_modules()
              if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter_name!r}; wrap it first: "
                         "peft.get_peft_model(model, fora.hf.fisher_lora_config(model, batches, k))")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, m in layers.items():
        if not isinstance(m, LoraLinear) or getattr(m, "fan_in_fan_out", False):
            raise ValueError(f"{name} is a {type(m).__name__}; FoRA's adapter needs peft's lora.Linear on an "
                             "nn.Linear (target linear projections such as q_proj)")
        if adapter_name in getattr(m, "lora_variant", {}) or m.use_dora.get(adapter_name, False):
            raise ValueError(f"{name} uses a LoRA variant (DoRA); FoRA's adapter is plain LoRA: use_dora=False")
        down, up = m.lora_A[adapter_name], m.lora_B[adapter_name]
        if isinstance(down, GatedDown):
            raise ValueError(f"{name} already carries FoRA's adapter; call make_fora once")
        if up.bias is not None:
            raise ValueError(f"{name} has a LoRA bias; build the LoraConfig with lora_bias=False")
        d_out, r = up.weight.shape
        if r > d_out:
            raise ValueError(f"rank {r} > {d_out} at {name}: B has at most {d_out} orthonormal columns; "
                             f"lower r to at most {d_out}")
        with torch.no_grad():
            B = random_stiefel(d_out, r, generator=generator)
            A = torch.randn(down.weight.shape, generator=generator) / math.sqrt(r)  # N(0, 1/r)
            up.weight.copy_(B)
            down.weight.copy_(A)
        m.lora_A[adapter_name] = GatedDown(down)
        m.get_delta_weight = MethodType(_gated_delta_weight, m)
    return layers
