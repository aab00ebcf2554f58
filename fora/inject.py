"""Put LoRALinear adapters into a CausalLM by exact module path, and collect their parameters.

Paths follow the checkpoint names: ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` and
``model.layers.{i}.mlp.{gate,up,down}_proj``. Any other target name is looked up as an exact leaf
name among the block's modules (it must be unique). A missing target, a target that is not an
nn.Linear, or a layer index out of range raises.

**Alpha default (decision).** ``alpha=None`` means α = 2 · ``rank`` (LLM-Adapters' commonsense
recipe: r = 32, α = 64), one α for every module exactly like peft's ``lora_alpha``; with a
``rank_pattern`` a module of rank r_m gets the scale α / r_m (α / √r_m with rsLoRA), as in peft,
so the adapter exports as ``LoraConfig(r=rank, lora_alpha=alpha, rank_pattern=...)``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from fora.defaults import FORA
from fora.lora import STIEFEL_FACTORS, LoRALinear
from fora.models.linear import is_linear
from fora.models.paths import decoder_layers, layer_index, target_path

DEFAULT_TARGETS = FORA.targets



def inject_lora(model: nn.Module, layers: Sequence[int],
                targets: Sequence[str] = DEFAULT_TARGETS, rank: int = FORA.rank, alpha: float | None = None,
                stiefel: bool = True, rank_pattern: dict[str, int] | None = None, dropout: float = 0.0,
                rslora: bool = False, seed: int | None = None, stiefel_factor: str = "B",
                adapter: Callable[..., LoRALinear] = LoRALinear) -> dict[str, LoRALinear]:
    """Replace ``targets`` of blocks ``layers`` by LoRALinear (in place).

    Args:
        model: a CausalLM (``model.layers`` is the block list).
        layers: block indices to adapt (0 <= i < L), e.g. the Fisher top-K (Eq. 3).
        targets: leaf module names per block (default: LLM-Adapters' five).
        rank: r for every module not in ``rank_pattern``.
        alpha: α shared by all modules; None -> 2 · rank (see the module docstring).
        stiefel: FoRA's adapter (``stiefel_factor="B"``: B column-orthonormal, A ~ N(0, 1/r), a
            gate g = 0) or the ablation's (``"A"``: A rows orthonormal, B = 0); False: plain LoRA.
        rank_pattern: full module path -> rank; every key must name an injected module.
        dropout, rslora: as in LoRALinear.
        seed: seeds the CPU generator that draws every A, in sorted layer order then target order.
        adapter: the adapter class, called as ``adapter(base, rank, alpha, dropout=, rslora=, init=,
            generator=)``: LoRALinear, or a subclass such as ``fora.baselines.dora.DoRALinear``.
    Returns:
        {full module path: LoRALinear} in injection order.
    """
    blocks = decoder_layers(model)
    n = len(blocks)
    layers = list(layers)
    bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < n)]
    if bad:
        raise ValueError(f"layer index {bad[0]!r} out of range: this model has {n} layers, valid "
                         f"indices are 0..{n - 1}")
    if not layers:
        raise ValueError("inject_lora got no layers; pass at least one index, e.g. layers=range(L)")
    alpha = FORA.alpha_per_rank * rank if alpha is None else float(alpha)
    rank_pattern = dict(rank_pattern or {})
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if stiefel_factor not in STIEFEL_FACTORS:
        raise ValueError(f"unknown stiefel_factor {stiefel_factor!r}: 'B' (FoRA) or 'A' (the ablation)")
    init = ("stiefel_b" if stiefel_factor == "B" else "stiefel_a") if stiefel else "standard"
    paths = [target_path(blocks[i], f"model.layers.{i}", t) for i in sorted(set(layers)) for t in targets]
    if len(set(paths)) != len(paths):
        raise ValueError(f"duplicate targets in {tuple(targets)}; list each module name once")
    unknown = sorted(set(rank_pattern) - set(paths))
    if unknown:
        raise ValueError(f"rank_pattern names modules that are not injected: {unknown[:3]}; keys must "
                         "be full paths such as 'model.layers.0.self_attn.q_proj'")
    out: dict[str, LoRALinear] = {}
    for path in paths:
        base = model.get_submodule(path)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has a LoRA adapter; inject each module once")
        if not is_linear(base):
            raise TypeError(f"{path} is a {type(base).__name__}, not an nn.Linear; LoRA targets must "
                            "be linear projections (e.g. q_proj, up_proj)")
        lora = adapter(base, rank_pattern.get(path, rank), alpha, dropout=dropout, rslora=rslora, init=init,
                       generator=generator)
        parent_path, leaf = path.rsplit(".", 1)
        setattr(model.get_submodule(parent_path), leaf, lora)
        out[path] = lora
    return out


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{full module path: LoRALinear} for every adapter in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every adapter computes its wrapped layer alone, so the model is the base exactly.

    Acts on every module with a ``disabled`` flag (LoRALinear, DoRALinear and any adapter type that
    honours it). Zeroing the scale would not do: DoRA would still compute (m / ‖W0‖_c) ⊙ x W0ᵀ.
    """
    modules = [m for m in model.modules() if isinstance(getattr(m, "disabled", None), bool)]
    if any(getattr(m, "merged", False) for m in modules):
        raise ValueError("cannot disable merged adapters; unmerge() them first")
    before = [m.disabled for m in modules]
    try:
        for m in modules:
            m.disabled = True
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.disabled = flag


def _check_collection(model: nn.Module) -> dict[str, LoRALinear]:
    """Every trainable parameter must belong to some adapter (nothing silently left out)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters; call fora.inject.inject_lora first")
    ours = {id(p) for m in mods.values() for p in m.adapter_parameters()}
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in ours]
    if stray:
        raise ValueError(f"{len(stray)} trainable parameters are not adapter parameters (e.g. {stray[:3]}); "
                         "call fora.inject.freeze_base(model) first")
    return mods


def stiefel_parameters(model: nn.Module, *, factor: str) -> list[nn.Parameter]:
    """Every module's ``factor`` ("B": FoRA's, "A": the ablation's), in module order: the
    parameters Cayley-Adam keeps on the Stiefel manifold."""
    return [m.factor(factor) for m in _check_collection(model).values()]


def euclidean_parameters(model: nn.Module, *, factor: str) -> list[nn.Parameter]:
    """Everything AdamW trains when ``factor`` is on the manifold, in module order: the other
    factor, then the gate (FoRA), DoRA's magnitude m or AdaLoRA's E."""
    return [p for m in _check_collection(model).values() for p in m.euclidean_parameters(factor)]


def freeze_base(model: nn.Module) -> None:
    """requires_grad = False on every parameter except the adapters' (A, B, gate, DoRA's m, AdaLoRA's E)."""
    ours = {id(p) for m in lora_modules(model).values() for p in m.adapter_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ours)


def count_trainable(model: nn.Module) -> int:
    """Number of scalars with requires_grad (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapted_layers(model: nn.Module) -> list[int]:
    """Sorted block indices that hold at least one LoRALinear."""
    return sorted({i for name in lora_modules(model) if (i := layer_index(name)) is not None})
