"""LoRALinear against a dense float64 formula and against peft's LoRA layer."""
import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fora.lora import LoRALinear
from fora.stiefel import stiefel_error

F64 = torch.float64


def make(d_in=12, d_out=7, rank=3, alpha=6.0, bias=True, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    lora = LoRALinear(base, rank, alpha, generator=torch.Generator().manual_seed(seed), **kw)
    return base, lora


def randomise_B(lora, seed=1):
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=torch.Generator().manual_seed(seed)))


@given(st.integers(1, 16), st.integers(1, 16), st.integers(1, 8), st.floats(0.1, 64.0),
       st.booleans(), st.booleans(), st.integers(0, 10**6))
def test_forward_equals_dense_formula(d_in, d_out, rank, alpha, rslora, bias, seed):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias, dtype=F64)
    lora = LoRALinear(base, rank, alpha, rslora=rslora, dtype=F64)
    randomise_B(lora, seed)
    x = torch.randn(2, 3, d_in, dtype=F64)
    s = alpha / (math.sqrt(rank) if rslora else rank)
    W = base.weight + s * lora.lora_B @ lora.lora_A
    expected = x @ W.T + (base.bias if bias else 0)
    torch.testing.assert_close(lora(x), expected.detach())
    assert lora.scale == pytest.approx(s)
    torch.testing.assert_close(lora.delta_weight(), s * lora.lora_B @ lora.lora_A)


@pytest.mark.parametrize("init", ["standard", "stiefel_a", "stiefel_b"])
def test_zero_B_equals_the_base_layer_exactly(init):
    base, lora = make(init=init, dropout=0.5)
    lora.train()                        # dropout active on the adapter path only
    x = torch.randn(4, 12)
    assert torch.equal(lora(x), base(x))


def test_shares_base_parameters_and_keeps_state_dict_keys():
    base, lora = make()
    keys = set(base.state_dict())
    assert lora.weight is base.weight and lora.bias is base.bias
    assert not lora.weight.requires_grad and not lora.bias.requires_grad
    assert set(lora.state_dict()) == keys | {"lora_A", "lora_B"}
    assert lora.lora_A.shape == (3, 12) and lora.lora_B.shape == (7, 3)
    assert lora.lora_A.dtype == lora.lora_B.dtype == torch.float32
    _, no_bias = make(bias=False)
    assert no_bias.bias is None and "bias" not in no_bias.state_dict()


def test_merge_unmerge_round_trip():
    base, lora = make()
    randomise_B(lora)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 12)
    y = lora(x)
    lora.merge()
    assert lora.merged
    torch.testing.assert_close(base.weight, w0 + lora.delta_weight().detach())
    torch.testing.assert_close(lora(x), y)
    with torch.no_grad():              # merged forward must not use the adapter path
        lora.lora_B.mul_(100.0)
    torch.testing.assert_close(lora(x), y)
    with torch.no_grad():
        lora.lora_B.div_(100.0)
    lora.unmerge()
    assert not lora.merged
    torch.testing.assert_close(base.weight, w0)
    torch.testing.assert_close(lora(x), y)


def test_merge_twice_and_unmerge_unmerged_are_no_ops(caplog):
    base, lora = make()
    randomise_B(lora)
    w0 = base.weight.detach().clone()
    lora.unmerge()
    torch.testing.assert_close(base.weight, w0)
    lora.merge()
    w1 = base.weight.detach().clone()
    lora.merge()
    assert torch.equal(base.weight, w1)
    assert "already merged" in caplog.text


def test_merge_in_bf16_base_dtype():
    base, lora = make(dtype=torch.bfloat16)
    randomise_B(lora)
    w0 = base.weight.detach().clone()
    lora.merge()
    assert base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(base.weight.float(), (w0.float() + lora.delta_weight().detach()),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_peft_lora(rslora, bias):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 6, bias=bias))
    ref = peft.get_peft_model(copy.deepcopy(base),
                              peft.LoraConfig(r=4, lora_alpha=12, target_modules=["0"], use_rslora=rslora))
    ours = LoRALinear(base[0], 4, 12, rslora=rslora, init="stiefel_a")
    randomise_B(ours)
    layer = ref.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    assert layer.scaling["default"] == pytest.approx(ours.scale)
    x = torch.randn(3, 5, 10)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
@pytest.mark.parametrize("rslora", [False, True])
def test_gradients_equal_the_dense_formula(shape, rslora):
    """The adapter term accumulated into the base output in place (addmm_) differentiates as
    x (W + s B A)ᵀ + b: gradients of x, A and B against autograd of the dense float64 formula."""
    base, lora = make(dtype=F64, rslora=rslora, init="stiefel_a")
    lora.lora_A.data, lora.lora_B.data = lora.lora_A.data.double(), lora.lora_B.data.double()
    randomise_B(lora)
    g = torch.Generator().manual_seed(3)
    x0, gy = torch.randn(shape, generator=g, dtype=F64), torch.randn(*shape[:-1], 7, generator=g, dtype=F64)
    x = x0.clone().requires_grad_()
    lora(x).backward(gy)
    A, B = lora.lora_A.detach().clone().requires_grad_(), lora.lora_B.detach().clone().requires_grad_()
    xr = x0.clone().requires_grad_()
    (xr @ (base.weight + lora.scale * B @ A).T + base.bias).backward(gy)
    for ours, ref in ((x.grad, xr.grad), (lora.lora_A.grad, A.grad), (lora.lora_B.grad, B.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_under_cpu_autocast_equals_peft_and_keeps_fp32_adapter_grads():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8))
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    ours = LoRALinear(base[0], 4, 8)
    randomise_B(ours)
    layer = ref.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = ours(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    assert ours.lora_A.grad.dtype == ours.lora_B.grad.dtype == torch.float32
    for ours_g, ref_g in ((ours.lora_A.grad, layer.lora_A["default"].weight.grad),
                          (ours.lora_B.grad, layer.lora_B["default"].weight.grad)):
        assert (ours_g - ref_g).norm() <= 0.05 * ref_g.norm()


def test_bf16_base_with_fp32_adapter():
    base, lora = make(dtype=torch.bfloat16, init="stiefel_a")
    randomise_B(lora)
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    xd = x.double()
    A, B = lora.lora_A.double(), lora.lora_B.double()
    expected = xd @ base.weight.double().T + base.bias.double() + lora.scale * (xd @ A.T) @ B.T
    torch.testing.assert_close(y.double(), expected.detach(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert lora.lora_A.grad.dtype == torch.float32 and lora.lora_B.grad.dtype == torch.float32
    assert base.weight.grad is None


def test_inits():
    _, st_lora = make(d_in=64, d_out=32, rank=8, init="stiefel_a")
    assert stiefel_error(st_lora.lora_A.detach().mT) < 1e-5
    assert st_lora.lora_B.abs().max() == 0
    _, again = make(d_in=64, d_out=32, rank=8, init="stiefel_a")
    assert torch.equal(again.lora_A, st_lora.lora_A)          # same generator seed, same A
    _, std = make(d_in=400, d_out=32, rank=16, init="standard")
    bound = 1 / math.sqrt(400)        # kaiming_uniform_(a=√5): gain √(1/3) · √(3 / fan_in)
    assert std.lora_A.abs().max() <= bound
    assert std.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert std.lora_B.abs().max() == 0


def test_meta_device_construction_skips_init():
    base = nn.Linear(4096, 1024, bias=False, device="meta")
    lora = LoRALinear(base, 32, 64, init="stiefel_a")
    assert lora.lora_A.is_meta and lora.lora_A.shape == (32, 4096)
    assert lora.weight is base.weight


def test_errors():
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(nn.LayerNorm(4), 2, 4)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="positive int"):
            LoRALinear(nn.Linear(8, 8), bad, 4)
    with pytest.raises(ValueError, match=r"rank 6 > 5 for a Stiefel B of a 8 -> 5 layer.*at most 5"):
        LoRALinear(nn.Linear(8, 5), 6, 4, init="stiefel_b")      # B: d_out x r, r <= d_out
    with pytest.raises(ValueError, match=r"rank 6 > 5 for a Stiefel A of a 5 -> 8 layer.*at most 5"):
        LoRALinear(nn.Linear(5, 8), 6, 4, init="stiefel_a")      # A: r x d_in, r <= d_in
    LoRALinear(nn.Linear(8, 5), 6, 4, init="stiefel_a")          # A's constraint alone allows it
    LoRALinear(nn.Linear(8, 5), 6, 4, init="standard")          # allowed without the constraint
    with pytest.raises(ValueError, match="valid inits are standard, stiefel_b, stiefel_a"):
        LoRALinear(nn.Linear(8, 8), 2, 4, init="gaussian")
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRALinear(nn.Linear(8, 8), 2, 4, dropout=1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("init", ["standard", "stiefel_a", "stiefel_b"])
def test_cuda_with_cpu_generator_draws_the_cpu_values(init):
    cpu = LoRALinear(nn.Linear(32, 16), 4, 8, init=init, generator=torch.Generator().manual_seed(0))
    gpu = LoRALinear(nn.Linear(32, 16, device="cuda", dtype=torch.bfloat16), 4, 8, init=init,
                     generator=torch.Generator().manual_seed(0))
    assert gpu.lora_A.device.type == "cuda" and gpu.lora_A.dtype == torch.float32
    torch.testing.assert_close(gpu.lora_A.cpu(), cpu.lora_A, rtol=0, atol=0)
    randomise_B(gpu)
    x = torch.randn(3, 32, device="cuda", dtype=torch.bfloat16)
    gpu(x).float().sum().backward()
    assert gpu.lora_A.grad is not None and gpu.lora_A.grad.dtype == torch.float32


def test_lora_inherits_eval_mode_of_the_wrapped_layer():
    base = torch.nn.Linear(8, 6).eval()
    lora = LoRALinear(base, 2, 4.0, dropout=0.5, init="stiefel_a")
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 8)
    # eval mode: dropout off, so two calls agree and equal the dense formula
    dense = x @ (base.weight + lora.scale * lora.lora_B @ lora.lora_A).T + base.bias
    torch.testing.assert_close(lora(x), dense)
    assert not lora.training
