"""rms_norm: forward bit-identical to the composite formula, gradients equal to autograd's of the
formula, and only the input and one scalar per row saved for backward."""
from __future__ import annotations

import pytest
import torch

from fora.models.rms_norm import RMSNorm, rms_norm


def composite(x: torch.Tensor, w: torch.Tensor, eps: float, offset: bool) -> torch.Tensor:
    """The formula as transformers writes it, differentiated by autograd."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (1.0 + w.float())).to(x.dtype)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_composite_formula_bit_for_bit(offset: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g).to(dtype)
    w = (torch.randn(64, generator=g) * 0.1 + (0.0 if offset else 1.0)).to(dtype)
    assert torch.equal(rms_norm(x, w, 1e-6, offset), composite(x, w, 1e-6, offset))


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gradients_equal_autograd_of_the_composite(offset: bool, dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 7, 48, generator=g, dtype=torch.float64) * 3
    w0 = torch.randn(48, generator=g, dtype=torch.float64) * 0.2 + (0.0 if offset else 1.0)
    gy = torch.randn(2, 7, 48, generator=g, dtype=torch.float64)
    grads = []
    for fn in (rms_norm, composite):
        x, w = x0.to(dtype).requires_grad_(), w0.to(dtype).requires_grad_()
        fn(x, w, 1e-5, offset).backward(gy.to(dtype))
        grads.append((x.grad.double(), w.grad.double()))
    (gx, gw), (rx, rw) = grads
    assert (gx - rx).abs().max() <= tol * rx.abs().max()
    assert (gw - rw).abs().max() <= tol * rw.abs().max()


def test_only_one_gradient_is_formed_when_the_other_is_frozen() -> None:
    x = torch.randn(4, 16, requires_grad=True)
    norm = RMSNorm(16, 1e-6)
    norm.weight.requires_grad_(False)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is None
    x2 = torch.randn(4, 16)
    norm.weight.requires_grad_(True)
    norm(x2).sum().backward()
    assert norm.weight.grad is not None


def test_saves_the_input_and_a_scalar_per_row_only() -> None:
    """With the weight trainable (Fisher scoring), autograd of the composite saves x̂ too."""
    def saved_elements(fn) -> int:
        sizes: list[int] = []
        x = torch.randn(8, 32, 64, requires_grad=True)
        w = torch.ones(64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn(x * 1.0, w, 1e-6, False)  # x * 1.0: a non-leaf input, as in a block
        return sum(s for s in sizes if s > 64)  # the weight itself is not a cost
    n = 8 * 32 * 64
    assert saved_elements(rms_norm) == n + 8 * 32  # x and rstd
    assert saved_elements(composite) >= 2 * n  # x and x̂ (at least)
