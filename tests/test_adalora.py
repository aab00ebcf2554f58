"""AdaLoRA against peft 0.21's AdaLoRA (`tuners/adalora`) on a tiny transformers model with the same weights.

Oracles: peft's SVDLinear forward and orthogonality regulariser (its loss minus the inner model's),
their gradients; peft's RankAllocator driven through `update_and_allocate` on the same gradients
(EMAs, budget, masks, final rank_pattern); the dense formula y = x W0ᵀ + b + s x (A ⊙ E)ᵀ Bᵀ.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.baselines.adalora import AdaLoRALinear, RankAllocator, check_schedule, orthogonal_regularizer
from fora.formats.loading import load_model
from fora.inject import adapters_disabled, euclidean_parameters, freeze_base, inject_lora, lora_modules

TARGETS = ("q_proj", "v_proj", "up_proj")
IDS = torch.tensor([[2, 40, 41, 42, 50, 60, 70, 9], [2, 5, 6, 7, 8, 9, 10, 11]])
INIT_R, TARGET_R, ALPHA = 4, 2, 8.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", num_hidden_layers=2)


def _peft(folder, **schedule):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, target_modules=list(TARGETS),
                        lora_dropout=0.0, task_type="CAUSAL_LM", **{"total_step": 12, **schedule})
    return get_peft_model(hf_reference(folder), cfg)


def _peft_params(pm, path: str) -> list[torch.Tensor]:
    layer = pm.base_model.model.get_submodule(path)
    return [layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]]


def _twins(folder, **schedule):
    """peft's AdaLoRA model (E randomised) and fora's with the same A, E, B."""
    torch.manual_seed(0)
    pm = _peft(folder, **schedule)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_E" in name:
                p.normal_(std=0.5)
    ours = load_model(folder, device="cpu")
    mods = inject_lora(ours, [0, 1], targets=TARGETS, rank=INIT_R, alpha=ALPHA, adapter=AdaLoRALinear, stiefel=False, seed=0)
    freeze_base(ours)
    with torch.no_grad():
        for path, m in mods.items():
            for mine, theirs in zip((m.lora_A, m.lora_E, m.lora_B), _peft_params(pm, path)):
                mine.copy_(theirs)
    return pm, ours, mods


def _ce(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))


def test_forward_regularizer_and_gradients_equal_peft(tiny):
    pm, ours, mods = _twins(tiny)
    out = pm(input_ids=IDS, labels=IDS)
    inner = pm.base_model.model(input_ids=IDS, labels=IDS).loss  # the same CE without the regulariser
    peft_reg = (out.loss - inner) / 0.5
    logits = ours(IDS)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    reg = orthogonal_regularizer(mods.values())
    torch.testing.assert_close(reg, peft_reg, atol=1e-5, rtol=1e-5)
    assert reg > 0.1  # A, B ~ N(0, 0.02): far from orthonormal, so the term is not vacuous
    (_ce(logits) + 0.5 * reg).backward()
    out.loss.backward()
    for path, m in mods.items():
        for mine, theirs in zip((m.lora_A, m.lora_E, m.lora_B), _peft_params(pm, path)):
            torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5)
    assert [id(p) for p in euclidean_parameters(ours, factor="A")][:2] == [id(mods[next(iter(mods))].lora_E),
                                                               id(mods[next(iter(mods))].lora_B)]


def test_dense_formula_init_merge_and_disabled():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = AdaLoRALinear(base, 3, 6.0)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer(x), F.linear(x, w0, b0))  # E = 0 at init
    assert layer.lora_A.std() < 0.05 and layer.lora_B.std() < 0.05 and layer.lora_B.abs().sum() > 0
    with torch.no_grad():
        layer.lora_E.normal_()
        layer.lora_B.normal_()
    dense = F.linear(x, w0 + 6.0 / (3 + 1e-5) * layer.lora_B @ (layer.lora_A * layer.lora_E), b0)
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
    layer.disabled = True
    assert torch.equal(layer(x), F.linear(x, w0, b0))
    layer.disabled = False
    with torch.no_grad():
        layer.merge()
        torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)
    layer.apply_mask(torch.tensor([True, False, True]))
    assert layer.lora_E[1].item() == 0 and layer.lora_E[0].item() != 0 and layer.kept.tolist() == [True, False, True]


def test_adapters_disabled_gives_the_base_model(tiny):
    _, ours, _ = _twins(tiny)
    with torch.no_grad(), adapters_disabled(ours):
        off = ours(IDS)
    torch.testing.assert_close(off, load_model(tiny, device="cpu")(IDS), atol=0, rtol=0)


def _allocator(mods, *, total_step, tinit, tfinal, delta_t):
    return RankAllocator({p: m.rank for p, m in mods.items()}, target_r=TARGET_R, total_step=total_step,
                         tinit=tinit, tfinal=tfinal, delta_t=delta_t)


SCHEDULES = [dict(total_step=12, tinit=0, tfinal=0, deltaT=1),   # final mask at the last step
             dict(total_step=12, tinit=3, tfinal=4, deltaT=3),   # all three phases, sparse masking
             dict(total_step=10, tinit=0, tfinal=3, deltaT=4),
             dict(total_step=8, tinit=5, tfinal=2, deltaT=1)]    # one budgeting step only


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(map(str, s.values())))
def test_allocator_equals_peft_step_by_step(tiny, schedule):
    pm, _, mods = _twins(tiny, **schedule)
    total = schedule["total_step"]
    ours = _allocator(mods, total_step=total, tinit=schedule["tinit"], tfinal=schedule["tfinal"],
                      delta_t=schedule["deltaT"])
    peft_alloc = pm.base_model.rankallocator
    g = torch.Generator().manual_seed(1)
    masked_steps = 0
    for step in range(1, total + 1):
        with torch.no_grad():  # the same "optimizer step" and the same gradients on both sides
            for path, m in mods.items():
                for i, (mine, theirs) in enumerate(zip((m.lora_A, m.lora_E, m.lora_B), _peft_params(pm, path))):
                    delta = 0.01 * torch.randn(mine.shape, generator=g)
                    # a random size per triplet (rows of A and E, columns of B), so each term of Eq. 11 counts
                    per_triplet = torch.rand(INIT_R, generator=g) ** 2
                    grad = torch.randn(mine.shape, generator=g) * (per_triplet if i == 2 else per_triplet[:, None])
                    for p in (mine, theirs):
                        p.add_(delta)
                        p.grad = grad.clone()
        expected_budget = (peft_alloc.budget_schedule(step)[0] if step <= total - schedule["tfinal"]
                           else peft_alloc.target_bgt)
        pm.base_model.update_and_allocate(step)
        masks = ours.update(step, {p: (m.lora_A, m.lora_E, m.lora_B) for p, m in mods.items()})
        if masks is not None:
            masked_steps += 1
            for path, keep in masks.items():
                mods[path].apply_mask(keep)
        assert ours.budget == expected_budget, step
        assert sorted(ours.ipt) == sorted(k.removesuffix(".default") for k in peft_alloc.exp_avg_ipt)
        for key, ema in peft_alloc.exp_avg_ipt.items():
            assert torch.equal(ours.ipt[key.removesuffix(".default")], ema), (step, key)
            assert torch.equal(ours.unc[key.removesuffix(".default")], peft_alloc.exp_avg_unc[key]), (step, key)
        for path, m in mods.items():
            assert torch.equal(m.lora_E, _peft_params(pm, path)[1]), (step, path)  # same masks applied
    assert masked_steps > 0
    final = {k.removesuffix(".default"): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert {f"{p}.lora_E": v for p, v in ours.rank_pattern().items()} == final
    assert sum(sum(v) for v in ours.rank_pattern().values()) <= TARGET_R * len(mods)


def test_allocator_state_round_trip_continues_identically(tiny):
    _, _, mods = _twins(tiny)
    kw = dict(total_step=12, tinit=2, tfinal=3, delta_t=2)
    a, g = _allocator(mods, **kw), torch.Generator().manual_seed(2)
    triplets = {p: (m.lora_A, m.lora_E, m.lora_B) for p, m in mods.items()}

    def grads():
        for t in triplets.values():
            for p in t:
                p.grad = torch.randn(p.shape, generator=g)

    for step in range(1, 6):
        grads()
        a.update(step, triplets)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = _allocator(mods, **kw)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for step in range(6, 13):
        grads()
        ma, mb = a.update(step, triplets), b.update(step, triplets)
        assert (ma is None) == (mb is None)
        assert ma is None or all(torch.equal(ma[p], mb[p]) for p in ma)
        assert a.budget == b.budget and all(torch.equal(a.ipt[k], b.ipt[k]) for k in a.ipt)


def test_equal_init_and_target_rank_prunes_nothing(tiny):
    _, _, mods = _twins(tiny)
    a = RankAllocator({p: m.rank for p, m in mods.items()}, target_r=INIT_R, total_step=4)
    triplets = {p: (m.lora_A, m.lora_E, m.lora_B) for p, m in mods.items()}
    for t in triplets.values():
        for p in t:
            p.grad = torch.randn_like(p)
    for step in range(1, 5):
        masks = a.update(step, triplets)
    assert all(v.all() for v in masks.values()) and a.budget == INIT_R * len(mods)


def test_errors(tiny):
    from fora.quant.nf4 import NF4Linear

    with pytest.raises(ValueError, match=r"pass --target-r <= --init-r"):
        check_schedule(4, 6, 100, 0, 0, 1)
    with pytest.raises(ValueError, match=r"leaves no budgeting phase; lower --tinit / --tfinal or train more"):
        check_schedule(6, 4, 100, 60, 40, 1)
    with pytest.raises(ValueError, match=r"--delta-t >= 1"):
        check_schedule(6, 4, 100, 0, 0, 0)
    with pytest.raises(ValueError, match=r"--adalora-betas must both lie in \(0, 1\)"):
        check_schedule(6, 4, 100, 0, 0, 1, (0.85, 1.0))
    with pytest.raises(ValueError, match="got no modules"):
        RankAllocator({}, target_r=1, total_step=10)
    with pytest.raises(ValueError, match="got no AdaLoRA modules"):
        orthogonal_regularizer([])
    with pytest.raises(TypeError, match="load the base without --quantize for AdaLoRA"):
        AdaLoRALinear(NF4Linear.from_linear(nn.Linear(64, 64)), 2, 4.0)
    for options in ({"rslora": True}, {"init": "stiefel_b"}):
        with pytest.raises(ValueError, match="inject it with stiefel=False and rslora=False"):
            AdaLoRALinear(nn.Linear(8, 8), 2, 4.0, **options)
    _, _, mods = _twins(tiny)
    a = _allocator(mods, total_step=4, tinit=0, tfinal=0, delta_t=1)
    with pytest.raises(ValueError, match="has no gradient; call RankAllocator.update after backward"):
        a.update(1, {p: (m.lora_A, m.lora_E, m.lora_B) for p, m in mods.items()})
    with pytest.raises(ValueError, match="resume with the same --model, --targets and --method"):
        a.load_state_dict({"budget": 1, "ipt": {}, "unc": {}, "pattern": {"x": torch.ones(2, dtype=torch.bool)}})


SCHEDULE = {"target_r": TARGET_R, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
            "orth_reg_weight": 0.5, "total_step": 12}


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


def test_exports_load_in_peft_and_fora_with_equal_logits(tiny, tmp_path):
    import json

    from peft import PeftModel

    from fora.formats.peft_io import load_adapter, save_adapter, save_folded_lora

    _, ours, mods = _twins(tiny)
    g = torch.Generator().manual_seed(5)
    paths = list(mods)
    for i, path in enumerate(paths):  # a pattern per module; the first one keeps nothing
        keep = torch.zeros(INIT_R, dtype=torch.bool) if i == 0 else torch.rand(INIT_R, generator=g) < 0.6
        mods[path].apply_mask(keep)
    ours.eval()
    expected = _logits(ours)
    assert not torch.allclose(expected, _logits(load_model(tiny, device="cpu")), atol=1e-3)
    save_adapter(ours, tmp_path / "ada", base_model_name_or_path=str(tiny), adalora_schedule=SCHEDULE)
    config = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == INIT_R
    assert config["rank_pattern"] == {f"{p}.lora_E": mods[p].kept.tolist() for p in paths}
    for name, back in (("peft", PeftModel.from_pretrained(hf_reference(tiny), tmp_path / "ada")),
                       ("fora", load_adapter(load_model(tiny, device="cpu"), tmp_path / "ada"))):
        torch.testing.assert_close(_logits(back.eval()), expected, atol=1e-5, rtol=1e-5, msg=name)
    # the checkpoint form (no schedule): whole tensors, no rank_pattern, the same function in peft
    save_adapter(ours, tmp_path / "whole", base_model_name_or_path=str(tiny))
    assert json.loads((tmp_path / "whole" / "adapter_config.json").read_text())["rank_pattern"] is None
    whole = PeftModel.from_pretrained(hf_reference(tiny), tmp_path / "whole")
    torch.testing.assert_close(_logits(whole.eval()), expected, atol=1e-5, rtol=1e-5)
    # plain LoRA with the kept triplets folded in: (E * A)[kept], B[:, kept], exact scale
    save_folded_lora(ours, tmp_path / "lora", base_model_name_or_path=str(tiny))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and paths[0] in config["exclude_modules"]
    for name, back in (("peft", PeftModel.from_pretrained(hf_reference(tiny), tmp_path / "lora")),
                       ("fora", load_adapter(load_model(tiny, device="cpu"), tmp_path / "lora"))):
        torch.testing.assert_close(_logits(back.eval()), expected, atol=1e-5, rtol=1e-5, msg=name)


def test_diagnostics_spectrum_is_that_of_the_dense_update():
    from fora.evaluation.diagnostics import module_diagnostics

    torch.manual_seed(0)
    layer = AdaLoRALinear(nn.Linear(12, 7), 3, 6.0)
    with torch.no_grad():
        layer.lora_E.normal_()
    sigma = torch.tensor(module_diagnostics("x", layer)["singular_values"], dtype=torch.float64)
    dense = torch.linalg.svdvals(layer.delta_weight().detach().double())[:3]  # rank 3: the rest are 0
    torch.testing.assert_close(sigma, dense, atol=1e-6, rtol=1e-6)


def test_export_and_allocator_errors(tiny, tmp_path):
    from fora.formats.adalora_io import adalora_config, folded_lora, load_adalora
    from fora.formats.peft_io import merged_state_dict
    from fora.training.adalora_hooks import AdaLoRAStep

    _, ours, mods = _twins(tiny)
    with pytest.raises(ValueError, match="AdaLoRA schedule lacks"):
        adalora_config({}, mods, {"target_r": 2})
    mixed = dict(mods, extra=AdaLoRALinear(nn.Linear(4, 4), 2, 4.0))
    with pytest.raises(ValueError, match="inject every module with the same init_r"):
        adalora_config({}, mixed, None)
    with pytest.raises(ValueError, match="no AdaLoRA modules to fold; train with --method adalora"):
        folded_lora({}, {})
    for m in mods.values():
        m.apply_mask(torch.zeros(INIT_R, dtype=torch.bool))
    with pytest.raises(ValueError, match="every AdaLoRA triplet was pruned"):
        folded_lora(mods, {})
    with pytest.raises(ValueError, match="not AdaLoRA's B \\(A \\* E\\); use fora.formats.peft_io.save_merged"):
        merged_state_dict(ours)
    with pytest.raises(ValueError, match="holds no `base_model.model.\\*.lora_A` tensors"):
        load_adalora(ours, {"init_r": 4, "lora_alpha": 8}, {})
    bad = {f"base_model.model.model.layers.0.self_attn.q_proj.{p}": torch.zeros(s)
           for p, s in (("lora_A", (4, 5)), ("lora_E", (4, 1)), ("lora_B", (64, 4)))}
    with pytest.raises(ValueError, match="load the adapter into the base it was trained on"):
        load_adalora(load_model(tiny, device="cpu"), {"init_r": 4, "lora_alpha": 8}, bad)
    with pytest.raises(ValueError, match="found no AdaLoRA modules; inject with adapter=AdaLoRALinear"):
        AdaLoRAStep(nn.Linear(2, 2), {})
    a = _allocator(mods, total_step=4, tinit=0, tfinal=0, delta_t=1)
    with pytest.raises(ValueError, match="no importance scores yet"):
        a.mask_to_budget(1)
