"""Memory per GPU of QFoRA under FSDP2, computed on paper (not measured) from a model's config.

    per GPU = packed base / W + embedding and head / W + block norms + 2 gathered blocks
              + adapters + their gradients (x2: the flat all-reduce copy) + optimizer states
              + activations

The parts that follow from the layout are exact: NF4 storage per weight tensor of n values is
ceil(n/2) + ceil(n/64) bytes of codes plus 4 bytes per 256 block constants plus μ
(`fora.quant.nf4`); adapters are fp32 r x (d_in + d_out) plus the gate per target; Cayley-Adam
keeps one d_out x r moment and a scalar per B, AdamW two moments and a step count per A and gate. Activations are an estimate: bf16,
per token and layer that backward runs through, the inputs autograd keeps for the attention and
MLP matmuls, 2 (6 h + 3 i) bytes (less with --activation-checkpointing: 2 h per layer plus
one layer's full set).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fora.inject import DEFAULT_TARGETS
from fora.models.config import ModelConfig
from fora.quant.nf4 import BLOCK, STAT_BLOCK


def nf4_storage_bytes(n: int) -> int:
    """Bytes of one NF4 weight of n values: packed codes, absmax codes, second-level scales, μ."""
    blocks = math.ceil(n / BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / STAT_BLOCK) + 4


def block_linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """{projection name: (d_out, d_in)} of one decoder block."""
    h, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU, by part (see the module docstring)."""

    packed_base: int
    float_weights: int
    gathered_blocks: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return sum(vars(self).values())


def qfora_fsdp_memory(config: ModelConfig, world: int, *, k: int, rank: int = 32,
                      targets: Sequence[str] = DEFAULT_TARGETS, tokens: int = 16 * 256,
                      backward_layers: int | None = None, float_bytes: int = 2) -> MemoryPlan:
    """Memory per GPU of QFoRA on `world` GPUs under FSDP2 (computed, not measured).

    Args:
        config: the model's config. k: adapted layers. rank: LoRA r. targets: adapted projections.
        tokens: tokens per GPU per micro-batch (batch x sequence length).
        backward_layers: layers backward runs through (from the lowest adapted one); default all L.
        float_bytes: bytes per value of the embedding, head and norms (2: bf16 on CUDA).
    """
    shapes = block_linear_shapes(config)
    L, h, i = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    block_nf4 = sum(nf4_storage_bytes(o * d) for o, d in shapes.values())
    packed = L * math.ceil(block_nf4 / world)
    embed = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    norms = L * (2 * h + (2 * config.head_dim if config.qk_norm else 0))
    float_weights = float_bytes * (math.ceil((embed + h) / world) + norms)
    adapter = k * sum(rank * (shapes[t][0] + shapes[t][1]) + 1 for t in targets)  # fp32 values, + the gate
    # Cayley-Adam on B (d_out x r moment, scalar v); AdamW on A and on g (two moments and a step count each)
    moments = k * sum(rank * shapes[t][0] + 1 + (2 * rank * shapes[t][1] + 1) + (2 + 1) for t in targets)
    layers = L if backward_layers is None else backward_layers
    return MemoryPlan(packed_base=packed, float_weights=float_weights, gathered_blocks=2 * block_nf4,
                      adapters=4 * adapter, gradients=2 * 4 * adapter, optimizer=4 * moments,
                      activations=2 * (6 * h + 3 * i) * tokens * layers)
