"""‖∂L/∂W‖²_F of packed linear layers (weight no Parameter, e.g. a 4-bit NF4 base), from hooks.

For y_t = W x_t (+ b) at every token t of a batch, the weight gradient is

    ∂L/∂W = Σ_t δ_t x_tᵀ,   δ_t = ∂L/∂y_t,

so a forward hook keeps each layer's input x [tokens, d_in] and a hook on its output receives
δ [tokens, d_out]; the gradient is formed once per layer and batch as δᵀ x (float32, the size of
one weight, freed at once) and only its squared Frobenius norm is kept. This is exact (the same
matrix autograd would put in ``W.grad``), so the Fisher score of Eq. (2) on a quantized model equals
the score of the full-precision model that holds the dequantized weights.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from fora.models.linear import is_packed_linear
from fora.models.paths import decoder_layers, target_modules


def quantized_linears(model: nn.Module, params: str, targets: Sequence[str]) -> dict[str, nn.Module]:
    """{module path: packed linear} whose weights belong to θ_l of Eq. (2) (``fora.models.linear.is_packed_linear``).

    ``params="block"``: every packed linear of every block; ``"targets"``: the target projections that
    are packed (or wrap one as ``base_layer``). Paths are the checkpoint's module paths.
    """
    if params == "targets":
        found = {p: getattr(m, "base_layer", m) for p, m in target_modules(model, targets).items()}
        return {p: m for p, m in found.items() if is_packed_linear(m)}
    return {name.removesuffix(".base_layer"): m
            for i, block in enumerate(decoder_layers(model))
            for name, m in block.named_modules(prefix=f"model.layers.{i}") if is_packed_linear(m)}


@contextlib.contextmanager
def weight_grad_norms(modules: Mapping[str, nn.Module],
                      fold: Callable[[str, Tensor], None]) -> Iterator[None]:
    """While active, each backward through ``modules[path]`` calls ``fold(path, ‖∂L/∂W‖²_F)``.

    The value is a 0-d float32 tensor on the layer's device. A layer whose output would not need a
    gradient (nothing upstream trainable) gets ``requires_grad`` on its output, so δ still reaches
    it. All hooks are removed on exit.

    Args:
        modules: {path: linear module} called as y = module(x), x (..., d_in), y (..., d_out).
        fold: receives (path, squared Frobenius norm of that layer's weight gradient).
    """
    def capture(path: str):
        def forward_hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            x = args[0].detach()
            if not out.requires_grad:
                out.requires_grad_(True)  # a leaf: the loss still differentiates through it

            def backward_hook(delta: Tensor) -> None:
                g = delta.reshape(-1, delta.shape[-1]).float().mT @ x.reshape(-1, x.shape[-1]).float()
                fold(path, g.pow(2).sum())
            out.register_hook(backward_hook)
            return out
        return forward_hook

    handles = [m.register_forward_hook(capture(path)) for path, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
