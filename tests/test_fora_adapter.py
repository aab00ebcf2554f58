"""FoRA's adapter (LoRALinear init "stiefel_b"): B column-orthonormal, A ~ N(0, 1/r), a scalar gate
g = 0, checked against dense float64 formulas, Lemma 1 and finite differences."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fora.lora import LoRALinear
from fora.stiefel import stiefel_error

F64 = torch.float64


def fora_linear(d_in, d_out, rank, alpha=None, *, seed=0, gate=None, dtype=F64, bias=True):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    m = LoRALinear(base, rank, 2.0 * rank if alpha is None else alpha, init="stiefel_b", dtype=dtype,
                   generator=torch.Generator().manual_seed(seed))
    if gate is not None:
        with torch.no_grad():
            m.lora_gate.fill_(gate)
    return base, m


def test_init_B_orthonormal_A_gaussian_gate_zero_and_delta_zero():
    base, m = fora_linear(4096, 48, 16, dtype=torch.float32)
    assert stiefel_error(m.lora_B.detach()) < 1e-5
    assert m.lora_gate.shape == () and m.gate() == 0.0 and m.lora_gate.requires_grad
    assert float(m.lora_A.detach().mean()) == pytest.approx(0.0, abs=0.01)
    assert float(m.lora_A.detach().std()) == pytest.approx(1 / math.sqrt(16), rel=0.01)   # N(0, 1/r), 65,536 draws
    assert torch.count_nonzero(m.delta_weight()) == 0
    x = torch.randn(3, 5, 4096)
    assert torch.equal(m(x), base(x))                # ΔW = 0 at step 0, exactly
    assert m.stiefel_factor == "B" and m.stiefel_parameter() is m.lora_B


def test_the_draw_is_seeded_and_differs_between_seeds():
    _, a = fora_linear(32, 24, 4, seed=3)
    _, b = fora_linear(32, 24, 4, seed=3)
    _, c = fora_linear(32, 24, 4, seed=4)
    assert torch.equal(a.lora_B, b.lora_B) and torch.equal(a.lora_A, b.lora_A)
    assert not torch.equal(a.lora_B, c.lora_B)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(1, 16), st.data(), st.floats(-3, 3), st.floats(0.1, 64.0),
       st.booleans(), st.integers(0, 10**6))
def test_forward_equals_the_dense_gated_formula(d_in, d_out, data, g, alpha, bias, seed):
    r = data.draw(st.integers(1, d_out))
    base, m = fora_linear(d_in, d_out, r, alpha, seed=seed, gate=g, bias=bias)
    x = torch.randn(2, 3, d_in, dtype=F64)
    s = alpha / r
    expected = x @ (base.weight + g * s * m.lora_B @ m.lora_A).T + (base.bias if bias else 0)
    torch.testing.assert_close(m(x), expected.detach())
    torch.testing.assert_close(m.delta_weight(), g * s * m.lora_B @ m.lora_A)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.data(), st.floats(-3, 3), st.integers(0, 10**6))
def test_lemma_1_singular_values_of_the_update_are_those_of_A(d_in, d_out, data, g, seed):
    """BᵀB = I  =>  σ(g s B A) = |g s| σ(A)."""
    r = data.draw(st.integers(1, d_out))
    _, m = fora_linear(d_in, d_out, r, seed=seed, gate=g)
    with torch.no_grad():
        m.lora_A.copy_(torch.randn(r, d_in, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    k = min(r, d_in)
    lhs = torch.linalg.svdvals(m.delta_weight().detach())[:k]
    rhs = abs(g * m.scale) * torch.linalg.svdvals(m.lora_A.detach())[:k]
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("g0", [0.0, 0.37])
def test_the_gate_gradient_is_the_directional_derivative_of_the_loss(g0):
    _, m = fora_linear(7, 5, 3, seed=1, gate=g0)
    x = torch.randn(4, 7, dtype=F64, generator=torch.Generator().manual_seed(2))
    target = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(3))

    def loss() -> torch.Tensor:
        return (m(x) - target).pow(3).sum()

    loss().backward()
    h = 1e-6
    with torch.no_grad():
        m.lora_gate.fill_(g0 + h)
        up = float(loss())
        m.lora_gate.fill_(g0 - h)
        down = float(loss())
    assert float(m.lora_gate.grad) == pytest.approx((up - down) / (2 * h), rel=1e-7, abs=1e-9)


def test_merge_and_unmerge_round_trip_with_the_gate():
    base, m = fora_linear(12, 9, 3, seed=4, gate=-0.8)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 12, dtype=F64)
    y = m(x).detach()
    m.merge()
    torch.testing.assert_close(m.weight.detach(), w0 + (-0.8) * m.scale * m.lora_B.detach() @ m.lora_A.detach())
    torch.testing.assert_close(m(x), y)
    m.unmerge()
    torch.testing.assert_close(m.weight.detach(), w0, rtol=0, atol=1e-14)
    torch.testing.assert_close(m(x), y)
