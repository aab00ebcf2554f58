"""Per-block speed and memory switches of a decoder: regional torch.compile, activation checkpointing.

Both act on each block of ``model.model.layers`` in place, so module paths and state_dict keys
stay those of the checkpoint (no ``_orig_mod.`` wrappers), and both must be applied after the
LoRA adapters are injected (they capture the block as it is).
"""
from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder blocks at model.model.layers; "
                        "pass a fora CausalLM")
    return layers


def compile_supported(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile's default backend runs here: (ok, the reason when not).

    A two-op probe, compiled and run once on ``device``: a missing C++ compiler (CPU), Triton
    (CUDA) or an unsupported Python shows up here instead of in the middle of the first step.
    """
    try:
        probe = torch.compile(lambda x: torch.sin(x) * 2, dynamic=False)
        probe(torch.ones(4, device=device))
    except Exception as err:  # noqa: BLE001 - any backend failure means "run eager"
        return False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return True, ""


def compile_blocks(model: nn.Module, device: torch.device | str | None = None, **options) -> bool:
    """torch.compile every decoder block in place (regional: one block's graph, reused by all).

    Compiling blocks rather than the whole model keeps compile time to one block's and leaves
    the embedding, the loss and the optimizer eager. Blocks of one model share their code, so
    dynamo compiles once per (layer type, grad mode) and reuses the graph.

    Args:
        model: a fora CausalLM, adapters already injected.
        device: where it runs (default: the first parameter's device); probed first.
        options: passed to ``nn.Module.compile`` (e.g. ``mode="max-autotune"``).
    Returns:
        True when compiled; False (with a warning naming the reason) when torch.compile does not
        work here, in which case the model is left eager and unchanged.
    """
    blocks = _blocks(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ok, reason = compile_supported(device)
    if not ok:
        log.warning("--compile: torch.compile does not work on %s here (%s); training without it",
                    device.type, reason)
        return False
    # every block is one code object; allow a recompile per block before dynamo gives up
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(blocks) + 8)
    for block in blocks:
        block.compile(**options)
    return True


def _checkpointed(forward, *args):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)  # nothing to save without autograd


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing per decoder block: only each block's input is kept for backward,
    its inside is recomputed then (about one more forward of the adapted blocks, far less memory).

    Blocks run under no_grad (below ``grad_from_layer``) are untouched by it.

    Args:
        model: a fora CausalLM.
    Returns:
        The number of blocks wrapped.
    """
    blocks = _blocks(model)
    for block in blocks:
        if "forward" not in vars(block):  # idempotent: wrap each block once
            block.forward = partial(_checkpointed, type(block).forward.__get__(block))
    return len(blocks)
