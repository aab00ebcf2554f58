"""NF4 with double quantization against bitsandbytes 0.50 (CPU), the QLoRA error bound and F.linear.

Oracle notes: bitsandbytes' public ``quantize_4bit`` on CPU runs its torch reference kernel for the
4-bit codes, and its native C kernel for the 8-bit absmax constants; that C kernel's binary search
is approximate (a few constants per thousand go to a farther neighbour). Our 8-bit codes are
therefore compared with bitsandbytes' torch reference kernel (nearest rounding, as its CUDA
kernel), and checked to be never farther than the C kernel's.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fora.quant.nf4 import (BLOCK, NF4Linear, NF4Weight, dequantize_absmax, dequantize_nf4, dynamic_map,
                             nf4_levels, quantize_nf4)



@pytest.fixture(scope="module")
def BF():
    """bitsandbytes.functional (the oracle; only the tests that compare with it need it)."""
    return pytest.importorskip("bitsandbytes.functional")

SHAPES = [(128, 192), (96, 100), (7, 9), (300, 640), (64, 64 * 256 + 64)]


def _weight(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w[0, 0] = 0.3  # an outlier, as real weights have
    return w.to(dtype)


def _bnb_reference_blockwise(x: torch.Tensor, code: torch.Tensor, block: int):
    # bitsandbytes' torch reference kernel (nearest rounding), bypassing the CPU C kernel.
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, block)


def test_tables_equal_bitsandbytes(BF):
    assert torch.equal(nf4_levels(), BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), BF.create_dynamic_map())


def test_levels_are_normal_quantiles():
    # QLoRA Eq. (4), independent of both code bases: q_i = mean of adjacent normal quantiles,
    # 8 on the negative side (delta = 0.9677083) and 9 on the positive one, normalised to [-1, 1].
    normal = torch.distributions.Normal(0.0, 1.0)
    delta = torch.tensor(0.9677083, dtype=torch.float64)
    pos = normal.icdf(torch.linspace(delta, 0.5, 9, dtype=torch.float64))[:-1]
    neg = -normal.icdf(torch.linspace(delta, 0.5, 8, dtype=torch.float64))[:-1]
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    assert torch.allclose(nf4_levels().double(), v / v.abs().max(), atol=1e-6)


def test_dynamic_map_has_one_zero_and_no_minus_one():
    # 2 · (1 + 2 + ... + 64) = 254 signed fractions, plus 0 and 1: 256 entries, nothing spare.
    d = dynamic_map()
    assert d.numel() == 256 and torch.equal(d, d.sort().values) and len(set(d.tolist())) == 256
    assert (d == 0).sum() == 1 and (d > 0).sum() == 128 and (d < 0).sum() == 127
    assert d.max() == 1.0 and d.min() > -1.0


def _nf4_codes(q: NF4Weight) -> torch.Tensor:
    return torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1).long()


def _tie_weight():
    """Two blocks whose absmax (1 and 2) makes the scaled values exact: the 15 float32 midpoints
    of adjacent levels, and the floats one ulp above and below each."""
    levels = nf4_levels()
    mid = (levels[:-1] + levels[1:]) / 2
    up, down = torch.nextafter(mid, torch.ones(15)), torch.nextafter(mid, -torch.ones(15))
    w = torch.zeros(2 * BLOCK)
    for start, c in ((0, 1.0), (BLOCK, 2.0)):
        w[start] = c
        w[start + 1:start + 46] = c * torch.cat([mid, up, down])
    return w, mid


def test_rounding_ties_go_to_the_lower_level():
    w, mid = _tie_weight()
    codes = _nf4_codes(quantize_nf4(w))
    k = torch.arange(15)
    for start in (0, BLOCK):
        assert codes[start] == 15                                  # the absmax itself is level 1.0
        tie, above, below = codes[start + 1:start + 46].view(3, 15)
        assert torch.equal(tie, k) and torch.equal(below, k) and torch.equal(above, k + 1)
    # The rule computed directly: the number of boundaries strictly below the value ...
    x = torch.cat([mid, torch.nextafter(mid, torch.ones(15)), torch.nextafter(mid, -torch.ones(15))])
    assert torch.equal(codes[1:46], (x[:, None] > mid[None, :]).sum(1))
    # ... and, where the float32 midpoint is exact, the nearest level in float64, ties to the lower.
    lv = nf4_levels().double()
    exact = (mid.double() == (lv[:-1] + lv[1:]) / 2).nonzero().flatten()
    assert exact.numel() >= 3                                      # true ties are exercised
    dist = (mid.double()[exact, None] - lv[None, :]).abs()
    assert torch.equal(codes[1 + exact], dist.argmin(1))           # argmin: the first of equal minima


def test_rounding_ties_equal_bitsandbytes(BF):
    w, _ = _tie_weight()
    packed, _ = BF.quantize_4bit(w.view(2, BLOCK), quant_type="nf4", compress_statistics=True, blocksize=BLOCK)
    assert torch.equal(quantize_nf4(w).packed, packed.view(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_equals_bitsandbytes(BF, shape, dtype):
    w = _weight(shape, dtype)
    packed, state = BF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=BLOCK)
    q = quantize_nf4(w)
    assert torch.equal(q.packed, packed.view(-1))                     # 4-bit codes, 2 per byte
    assert torch.equal(q.absmax_offset, state.offset)                 # mean subtracted
    assert torch.equal(q.absmax_scale, state.state2.absmax)           # second-level absmax
    assert q.shape == tuple(state.shape)
    # 8-bit absmax codes: bitsandbytes' reference kernel, on the same centred constants.
    absmax = w.reshape(-1).float().abs()
    absmax = F.pad(absmax, (0, -absmax.numel() % BLOCK)).view(-1, BLOCK).amax(1)
    ref_code, ref_scale = _bnb_reference_blockwise(absmax - state.offset, dynamic_map(), 256)
    if absmax.numel() > 1:  # one block: all-zero centred constants, any code decodes to μ
        assert torch.equal(ref_scale, q.absmax_scale)
        assert torch.equal(q.absmax_code, ref_code)
    # ... and never farther from the exact constant than the CPU C kernel's choice.
    ours = dequantize_absmax(q.absmax_code, q.absmax_scale, q.absmax_offset)
    theirs = dequantize_absmax(state.absmax, q.absmax_scale, q.absmax_offset)
    assert ((ours - absmax).abs() <= (theirs - absmax).abs()).all()
    if absmax.numel() > 1:
        assert (q.absmax_code == state.absmax).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_equals_bitsandbytes(BF, shape, dtype):
    w = _weight(shape, dtype, seed=1)
    packed, state = BF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=BLOCK)
    q = quantize_nf4(w)
    state.absmax = q.absmax_code.clone()  # decode our constants with bitsandbytes
    assert torch.equal(dequantize_nf4(q, dtype), BF.dequantize_4bit(packed, state))


def _nf4_bound(w: torch.Tensor) -> torch.Tensor:
    """Per-element error bound from the weight alone: half the widest NF4 gap times the block
    absmax, plus the 8-bit error of that absmax (half the widest dynamic-map gap times its
    stat-block absmax)."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    c = F.pad(flat.abs(), (0, -n % BLOCK)).view(-1, BLOCK).amax(1)
    centred = c - c.mean()
    s = F.pad(centred.abs(), (0, -c.numel() % 256)).view(-1, 256).amax(1)
    half_nf4 = nf4_levels().diff().max() / 2
    half_dyn = dynamic_map().diff().max() / 2
    c_err = (s.repeat_interleave(256)[:c.numel()] * half_dyn)
    per_block = c * half_nf4 + c_err * 1.0001 + 1e-7
    return per_block.repeat_interleave(BLOCK)[:n].view(w.shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_error_within_nf4_bound_random(shape):
    w = _weight(shape, seed=2)
    err = (dequantize_nf4(quantize_nf4(w)) - w).abs()
    assert (err <= _nf4_bound(w)).all()
    if w.numel() >= 4096:  # the bound is not vacuous: some error reaches half of it
        assert (err > 0.5 * _nf4_bound(w)).any()


@pytest.mark.slow
def test_error_within_nf4_bound_real(smol_folder):
    from safetensors import safe_open

    with safe_open(str(smol_folder / "model.safetensors"), framework="pt") as f:
        names = [n for n in f.keys() if n.endswith(("q_proj.weight", "down_proj.weight"))][:4]
        for name in names:
            w = f.get_tensor(name).float()
            err = (dequantize_nf4(quantize_nf4(w)) - w).abs()
            assert (err <= _nf4_bound(w)).all(), name


def test_all_zero_weight_stays_zero():
    q = quantize_nf4(torch.zeros(4, 64))
    assert torch.equal(dequantize_nf4(q), torch.zeros(4, 64))


@pytest.mark.parametrize("bias", [True, False])
def test_nf4_linear_forward_equals_f_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(100, 24, bias=bias)  # d_in not a multiple of 64: blocks straddle rows
    q = NF4Linear.from_linear(lin)
    x = torch.randn(3, 5, 100)
    w = dequantize_nf4(quantize_nf4(lin.weight))
    assert torch.equal(q.dequantized_weight(), w)
    assert torch.equal(q(x), F.linear(x, w, lin.bias if bias else None))
    assert not list(q.parameters(recurse=False)) or all(not p.requires_grad for p in q.parameters())
    assert {"packed", "absmax_code", "absmax_scale", "absmax_offset"} <= set(q.state_dict())


def test_nf4_linear_backward_saves_no_float_weight():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    q = NF4Linear.from_linear(lin)
    x = torch.randn(5, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not [t for t in saved if t.is_floating_point() and t.numel() == 96 * 128]  # W or Wᵀ
    g = torch.randn(5, 96)
    (grad,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(F.linear(x2, q.dequantized_weight(), lin.bias), x2, g)
    assert torch.allclose(grad, ref, atol=1e-6)


def test_nf4_linear_keeps_input_dtype():
    lin = nn.Linear(64, 8)
    x = torch.randn(2, 64, dtype=torch.float64)
    assert NF4Linear.from_linear(lin)(x).dtype == torch.float64


def test_storage_bytes_per_parameter():
    lin = nn.Linear(2048, 2048, bias=False)
    per_param = NF4Linear.from_linear(lin).storage_bytes() / lin.weight.numel()
    assert 0.5 < per_param <= 0.53


@pytest.mark.cuda
def test_nf4_linear_computes_in_bf16_on_cuda():
    lin = nn.Linear(128, 32).cuda()
    q = NF4Linear.from_linear(lin)
    x = torch.randn(4, 128, device="cuda")
    ref = F.linear(x.bfloat16(), q.dequantized_weight(torch.bfloat16), lin.bias.bfloat16()).float()
    assert torch.equal(q(x), ref)


def test_bad_input():
    with pytest.raises(ValueError, match="floating point weight"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="materialised, non-empty weight"):
        quantize_nf4(torch.empty(4, 64, device="meta"))
    with pytest.raises(TypeError, match="quantizes an nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(quantize_nf4(torch.ones(2, 3, 64)))


def test_nf4weight_roundtrip_fields():
    q = quantize_nf4(_weight((8, 64)))
    assert isinstance(q, NF4Weight) and q.packed.dtype == torch.uint8 and q.packed.numel() == 8 * 32
