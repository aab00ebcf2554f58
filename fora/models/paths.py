"""Module paths inside a decoder: the block list, a block's target projections, a path's layer index.

Paths follow the checkpoint names (``model.layers.{i}.self_attn.q_proj``,
``model.layers.{i}.mlp.up_proj``), so one set of rules serves LoRA injection, Fisher scoring and the
adapter file format. fora's ``CausalLM`` and Hugging Face causal LMs share this layout.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# where each standard projection sits inside a block; other names are found by a unique leaf match
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def layer_index(path: str) -> int | None:
    """The block index in a module or tensor path (``model.layers.3.mlp.up_proj`` -> 3), else None."""
    match = LAYER_RE.search(path if path.endswith(".") else path + ".")
    return int(match.group(1)) if match else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks ``model.model.layers``."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder blocks at model.model.layers; "
                         "pass a causal LM such as fora.CausalLM (from fora.load_model)")
    return layers


def target_path(block: nn.Module, prefix: str, target: str) -> str:
    """Full path of projection ``target`` inside the block at ``prefix`` (raises when absent or ambiguous).

    A standard name (``q_proj``, ``up_proj``, ...) is looked up at its checkpoint place first; any
    other name must be the last component of exactly one module path in the block.
    """
    parent = _PARENT.get(target)
    if parent is not None:
        try:
            block.get_submodule(f"{parent}.{target}")
            return f"{prefix}.{parent}.{target}"
        except AttributeError:
            pass
    hits = [name for name, _ in block.named_modules() if name.rsplit(".", 1)[-1] == target]
    if len(hits) != 1:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in block.named_modules()
                         if n and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2})
        what = "no module" if not hits else f"{len(hits)} modules ({', '.join(hits)})"
        raise ValueError(f"{what} named {target!r} in {prefix}; linear leaves there: {', '.join(leaves)}")
    return f"{prefix}.{hits[0]}"


def target_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """Full module path -> module for every target projection of every block, layer-major."""
    if isinstance(targets, str) or len(targets) == 0:
        raise ValueError(f"targets must be a non-empty sequence of module names such as "
                         f"['q_proj', 'v_proj'], got {targets!r}")
    found: dict[str, nn.Module] = {}
    for i, block in enumerate(decoder_layers(model)):
        for t in targets:
            path = target_path(block, f"model.layers.{i}", t)
            found[path] = model.get_submodule(path)
    return found
