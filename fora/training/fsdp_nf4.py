"""QFoRA under FSDP2: the 4-bit base sharded with its decoder blocks.

`fully_shard` shards Parameters, never buffers, and `NF4Linear` keeps its quantized weight in
buffers. `shardable_nf4` re-registers three of them as frozen Parameters under the same names
(state_dict keys unchanged):

    packed        uint8   (n / 2,)          two NF4 codes per byte
    absmax_code   uint8   (n / 64,)         8-bit codes of the block absmax c_b
    absmax_scale  float32 (n / 16384,)      second-level scales s_j

`fully_shard` then splits each along dim 0 like any frozen weight, so a rank holds about 1/W of
the packed base. The block's pre-forward hook all-gathers them (one collective per block: FSDP2
gathers a group of mixed dtypes as bytes), the post-forward frees them, and backward gathers them
again (the 4-bit matmul dequantizes W again there). μ (`absmax_offset`, a 0-d tensor FSDP cannot
split) stays a replicated buffer: 4 bytes per linear.

The blocks' float parameters (RMSNorm weights, biases: a few vectors per block) stay whole on every
rank, as the adapters do. Fisher scoring (Eq. 2) then runs on the sharded model with local
gradients only: ‖∇W‖² of a 4-bit weight comes from its input and output gradient
(`fora.models.weight_grad`), a norm's gradient lands in its own `.grad`, and FSDP has nothing to
reduce-scatter (which would average the different batches the ranks score).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fora.quant.nf4 import NF4Linear
from fora.models.paths import decoder_layers

NF4_SHARDED = ("packed", "absmax_code", "absmax_scale")


def nf4_linears(model: nn.Module) -> list[NF4Linear]:
    """Every 4-bit linear of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, NF4Linear)]


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds a 4-bit base (`load_model(..., quantize="nf4")`)."""
    return bool(nf4_linears(model))


def shardable_nf4(model: nn.Module) -> int:
    """Turn each NF4Linear's packed codes and constants (`NF4_SHARDED`) from buffers into frozen
    Parameters of the same name, which `fully_shard` shards. Idempotent; returns the layers changed."""
    changed = 0
    for m in nf4_linears(model):
        for name in NF4_SHARDED:
            if name in m._buffers:
                m.register_parameter(name, nn.Parameter(m._buffers.pop(name), requires_grad=False))
                changed += 1
    return changed // len(NF4_SHARDED)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole) of the 4-bit base: packed codes and both
    levels of constants of every NF4Linear. Equal in one process; about (1/W, 1) x under FSDP."""
    local = whole = 0
    for m in nf4_linears(model):
        for t in (m.packed, m.absmax_code, m.absmax_scale, m.absmax_offset):
            local += _local(t).numel() * t.element_size()
            whole += t.numel() * t.element_size()
    return local, whole


def _replicated(model: nn.Module, keep: Iterable[nn.Parameter]) -> set[nn.Parameter]:
    """The parameters FSDP must leave whole: `keep` (the adapters), plus, on a 4-bit base, every
    float parameter of the blocks that is no NF4 storage (norms, biases; see the module docstring)."""
    whole = set(keep)
    if is_quantized(model):
        storage = {id(getattr(m, name)) for m in nf4_linears(model) for name in NF4_SHARDED}
        whole |= {p for block in decoder_layers(model) for p in block.parameters() if id(p) not in storage}
    return whole


def shard_base(model: nn.Module, world: int, device: torch.device, keep: Iterable[nn.Parameter] = ()) -> nn.Module:
    """`fully_shard` per decoder block, then the root, over a 1-D mesh of `world` processes.

    `keep` (the adapters) stays whole and moves to `device`, as do a 4-bit base's float block
    parameters; the rest, the 4-bit codes included, is sharded. A model sharded before (for Fisher
    scoring, see `fora.training.distributed.distributed_select`) is not sharded again: adapters
    injected since then are plain Parameters FSDP does not manage, and only move to `device`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    sharded = isinstance(model, FSDPModule)
    if not sharded:
        shardable_nf4(model)
    whole = _replicated(model, keep)
    with torch.no_grad():  # fully_shard moves what it shards; what stays whole moves here
        for p in whole:
            p.data = p.data.to(device)
    if sharded:
        return model
    mesh = init_device_mesh(device.type, (world,))
    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh, ignored_params=whole & set(block.parameters()))
    fully_shard(model, mesh=mesh, ignored_params=whole)
    register_fsdp_forward_method(model, "loss")  # the trainer's step calls CausalLM.loss, not forward
    return model
