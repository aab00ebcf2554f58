"""RMSNorm with a hand-written backward that keeps only the input and one scalar per row.

    y = g ⊙ x / sqrt(mean(x²) + eps),   g = w (LLaMA, Qwen3) or 1 + w (Gemma)

Autograd through the composite formula saves the normalised x̂ = x · rstd as well whenever w
needs a gradient (Fisher scoring differentiates every norm weight, Eq. 2): one extra [tokens,
hidden] tensor per norm, two or four per block. Here backward recomputes x̂ from the saved x and
rstd. The forward is the composite formula op for op, so outputs stay bit-identical to
transformers'.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, offset: bool) -> Tensor:  # noqa: D401
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        if offset:
            return (h * rstd * (1.0 + weight.float())).to(x.dtype)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x_hat = x.float() * rstd
        g = grad_y.float()
        grad_x = grad_w = None
        if need_w:
            # LLaMA multiplies w by x̂ rounded to the compute dtype; the rounding is the forward's
            n = x_hat if ctx.offset else x_hat.to(x.dtype).float()
            grad_w = (g * n).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if need_x:
            gain = weight.float() + 1.0 if ctx.offset else weight.float()
            d = g * gain  # dL/dx̂
            # d/dx of x · rstd(x): rstd · (d − x̂ · mean(d ⊙ x̂))
            grad_x = (rstd * (d - x_hat * (d * x_hat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: bool = False) -> Tensor:
    """g ⊙ x / sqrt(mean(x², -1) + eps), statistics in fp32 (g = 1 + w when ``offset``).

    offset=False: the normalised x is cast to x's dtype, then multiplied by w (LLaMA, Qwen3).
    offset=True: multiplied by 1 + w in fp32, cast once at the end (Gemma).
    """
    return _RMSNorm.apply(x, weight, eps, offset)


class RMSNorm(nn.Module):
    """`rms_norm` with its weight w (ones, or zeros when the gain is 1 + w)."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)
