"""4-bit NormalFloat (NF4) weights with double quantization, as QLoRA stores them, in plain torch.

    W ≈ q_k · c_b,   q_k ∈ NF4_LEVELS (16 values),   c_b = absmax of block b (64 weights)
    c_b ≈ d(code_b) · s_j + μ,   d = the signed 8-bit dynamic map, s_j = absmax of stat block j
                                   (256 constants), μ = mean of all c_b

Layout (the same as bitsandbytes' ``quantize_4bit(..., quant_type="nf4", compress_statistics=True)``,
so codes and constants are interchangeable with it):

* blocks run over the *row-major flattened* weight, so a row of ``d_in`` not divisible by 64 simply
  lets a block straddle two rows, and a trailing partial block gets its own absmax: every shape
  is accepted, no padding of the weight is needed;
* each value is scaled by ``1 / c_b`` (a multiply, clamped to [-1, 1]) and rounded to the nearest
  level: the decision boundaries are the float32 midpoints ``(q_k + q_{k+1}) / 2`` and a value
  equal to one goes to the lower level, as in bitsandbytes;
* two codes per byte, the even-indexed value in the high nibble; an odd element count is padded
  with the code of 0.0;
* double quantization: μ = mean(c) is subtracted, then the centred constants are absmax-quantized
  in blocks of 256 to 8-bit codes of the dynamic map (Dettmers 2015, signed, 7 exponent bits),
  rounding to the nearest entry as bitsandbytes' CUDA kernel and its torch reference kernel do
  (its native CPU kernel's binary search is approximate and rounds a few constants in a thousand
  to a farther neighbour).

Storage per weight: 4 bits + 8 bits / 64 + 32 bits / (64 · 256) ≈ 0.516 bytes (0.5625 without the
double quantization).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK = 64        # weights per absmax (QLoRA)
STAT_BLOCK = 256  # absmax constants per second-level scale (QLoRA's double quantization)

# QLoRA's NormalFloat levels: quantiles of N(0, 1) normalised to [-1, 1] (8 negative, 0, 7 positive
# plus 1), the values bitsandbytes hard-codes (create_normal_map(offset=0.9677083)).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_levels(device: torch.device | str | None = None) -> Tensor:
    """The 16 NF4 levels, ascending, float32."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """The signed 8-bit dynamic quantization map (256 ascending float32 values in [-1, 1]).

    For exponent i = 0..6 the decade 10^(i-6) holds 2^i fractions (midpoints of an even split of
    [0.1, 1]), with both signs: 2 · 127 = 254 values; plus 0 and 1, exactly 256 entries (one 0,
    128 positive, 127 negative: 1 is in the map, −1 is not), as bitsandbytes' create_dynamic_map.
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + ((-(10 ** (i - 6))) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


def _blockwise(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Flat x (n,) -> (x scaled into [-1, 1] per block, absmax per block (ceil(n / block),))."""
    n = x.numel()
    pad = -n % block
    blocks = F.pad(x, (0, pad)).view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    # Multiply by the reciprocal (as bitsandbytes does) so the rounding matches code for code;
    # the tiny floor keeps an all-zero block at zero instead of NaN.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    return scaled, absmax


def _nearest(scaled: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level (levels ascending; a tie goes to the lower level)."""
    return torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2)


@dataclass
class NF4Weight:
    """A weight in NF4 with double-quantized constants (the tensors of the module docstring).

    packed: uint8 (ceil(n / 2),); absmax_code: uint8 (ceil(n / 64),); absmax_scale: float32
    (ceil(n / (64 · 256)),); absmax_offset: float32 scalar μ; shape: the original weight shape.
    """

    packed: Tensor
    absmax_code: Tensor
    absmax_scale: Tensor
    absmax_offset: Tensor
    shape: tuple[int, ...]


def quantize_nf4(weight: Tensor, block: int = BLOCK, stat_block: int = STAT_BLOCK) -> NF4Weight:
    """Quantize a float weight to NF4 with double quantization (computed in float32).

    Args:
        weight: any float tensor (e.g. [d_out, d_in]); it is flattened row-major.
        block, stat_block: values per absmax and absmax constants per second-level scale.
    """
    if not weight.dtype.is_floating_point:
        raise ValueError(f"quantize_nf4 needs a floating point weight, got {weight.dtype}")
    if weight.is_meta or weight.numel() == 0:
        raise ValueError(f"quantize_nf4 needs a materialised, non-empty weight, got shape "
                         f"{tuple(weight.shape)} on {weight.device}; load the weights first")
    flat = weight.detach().reshape(-1).float()
    scaled, absmax = _blockwise(flat, block)
    codes = _nearest(F.pad(scaled, (0, scaled.numel() % 2)), nf4_levels(flat.device)).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    offset = absmax.mean()
    centred, scale = _blockwise(absmax - offset, stat_block)
    absmax_code = _nearest(centred, dynamic_map(flat.device)).to(torch.uint8)
    return NF4Weight(packed, absmax_code, scale, offset, tuple(weight.shape))


def dequantize_absmax(absmax_code: Tensor, absmax_scale: Tensor, absmax_offset: Tensor,
                      stat_block: int = STAT_BLOCK) -> Tensor:
    """c_b = d(code_b) · s_j + μ, float32 (n_blocks,)."""
    n = absmax_code.numel()
    values = dynamic_map(absmax_code.device)[absmax_code.long()]
    values = F.pad(values, (0, -n % stat_block)).view(-1, stat_block) * absmax_scale[:, None]
    return values.reshape(-1)[:n] + absmax_offset


def _byte_table(device: torch.device) -> Tensor:
    """(256, 2) float32: the two levels a packed byte decodes to (high nibble first)."""
    levels = nf4_levels(device)
    byte = torch.arange(256, device=device)
    return torch.stack([levels[byte >> 4], levels[byte & 0xF]], dim=1)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32, block: int = BLOCK,
                   stat_block: int = STAT_BLOCK) -> Tensor:
    """W ≈ q_k · c_b with the shape of the original weight, computed in float32, returned in ``dtype``."""
    n = torch.Size(q.shape).numel()
    # One table lookup per byte decodes both of its codes.
    values = _byte_table(q.packed.device)[q.packed.long()].view(-1)[:n]
    absmax = dequantize_absmax(q.absmax_code, q.absmax_scale, q.absmax_offset, stat_block)
    if n % block:
        values = F.pad(values, (0, -n % block))
    return (values.view(-1, block) * absmax[:, None]).view(-1)[:n].view(q.shape).to(dtype)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (QLoRA's compute dtype), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class _NF4LinearFn(torch.autograd.Function):
    """y = x Wᵀ with W dequantized in the forward and again in the backward (as bitsandbytes'
    MatMul4Bit): autograd keeps only the 4-bit buffers, never a float copy of W."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, code: Tensor, scale: Tensor, offset: Tensor,
                shape: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(packed, code, scale, offset)
        ctx.shape = shape
        return F.linear(x, dequantize_nf4(NF4Weight(packed, code, scale, offset, shape), x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        packed, code, scale, offset = ctx.saved_tensors
        w = dequantize_nf4(NF4Weight(packed, code, scale, offset, ctx.shape), grad.dtype)
        return grad @ w, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantized in each forward.

    The NF4Weight tensors are buffers (``packed``, ``absmax_code``, ``absmax_scale``,
    ``absmax_offset``): they move with ``.to()`` and appear in ``state_dict`` but are no
    parameters, so nothing trains or keeps gradients for them. The bias, if any, stays in float
    as a frozen Parameter. Forward: ``F.linear(x, dequantize(W), b)`` in bf16 on CUDA, float32
    elsewhere, cast back to x's dtype. Autograd saves no float copy of W: the backward
    dequantizes again (one extra dequantization per step buys the memory of a float weight).

    Args:
        q: the quantized weight (``quantize_nf4`` of a [d_out, d_in] weight).
        bias: [d_out] or None.
    Build one from an nn.Linear with ``NF4Linear.from_linear`` (any d_in: see the module docstring).
    """

    def __init__(self, q: NF4Weight, bias: Tensor | None = None) -> None:
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D [d_out, d_in] weight, got shape {list(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax_code", q.absmax_code)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_offset", q.absmax_offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        """Quantize ``linear.weight`` (its bias is kept as is)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear quantizes an nn.Linear, got {type(linear).__name__}")
        return cls(quantize_nf4(linear.weight), linear.bias)

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax_code, self.absmax_scale, self.absmax_offset,
                         (self.out_features, self.in_features))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight [d_out, d_in] in ``dtype`` (a new tensor each call)."""
        return dequantize_nf4(self.nf4, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_in) -> (..., d_out) in x's dtype."""
        dtype = compute_dtype(x.device)
        y = _NF4LinearFn.apply(x.to(dtype), self.packed, self.absmax_code, self.absmax_scale,
                               self.absmax_offset, (self.out_features, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight (packed codes + both levels of constants)."""
        return sum(t.numel() * t.element_size() for t in
                   (self.packed, self.absmax_code, self.absmax_scale, self.absmax_offset))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, nf4"


def dequantized_weights(model: nn.Module) -> dict[str, Tensor]:
    """{module path: dense float32 weight} for every NF4Linear in ``model``.

    A quantized base wrapped by an adapter sits at ``<path>.base_layer``; it is reported under
    ``<path>``, the name of the checkpoint's linear layer.
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            out[name.removesuffix(".base_layer")] = m.dequantized_weight(torch.float32)
    return out
