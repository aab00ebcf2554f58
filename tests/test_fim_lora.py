"""FIM-LoRA: LoRA-B gradient statistics against ∇B = s·∇W0·Aᵀ from transformers, rank allocation."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.baselines.fim_lora import allocate_ranks, fim_rank_pattern, lora_b_scores
from fora.inject import inject_lora, lora_modules
from fora.formats.loading import load_model

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def make_batches(n, B=2, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 128, (B, T), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama", tokenizer=False)


def oracle_scores(folder, lora, batches, passes, statistic):
    """With B = 0 the adapted model equals the base model and ∇B = s · ∇W0 · Aᵀ, so the per-pass
    LoRA-B gradients follow from transformers' base-weight gradients."""
    hf = hf_reference(folder)
    grads = {path: [] for path in lora}
    for p in range(passes):
        hf.zero_grad(set_to_none=True)
        hf(**batches[p % len(batches)]).loss.backward()
        for path, m in lora.items():
            w_grad = hf.get_submodule(path).weight.grad.double()
            grads[path].append(m.scale * w_grad @ m.lora_A.detach().double().T)
    out = {}
    for path, gs in grads.items():
        g = torch.stack(gs)
        second = g.pow(2).sum((1, 2)).mean()
        out[path] = float(second if statistic == "second_moment" else second - g.mean(0).pow(2).sum())
    return out


@pytest.mark.parametrize("statistic", ["second_moment", "variance"])
def test_lora_b_scores_match_oracle(folder, statistic):
    model = load_model(folder, device="cpu")
    lora = inject_lora(model, [0, 1], rank=4, stiefel=False, seed=3)
    batches = make_batches(2)
    ours = lora_b_scores(model, batches, passes=3, statistic=statistic)
    ref = oracle_scores(folder, lora, batches, 3, statistic)
    assert ours.keys() == ref.keys() == lora.keys()
    for path in ours:
        assert ours[path] == pytest.approx(ref[path], rel=1e-5), path
    assert all(p.grad is None for p in model.parameters())


def test_rank_pattern_budget_and_model_unchanged(folder):
    model = load_model(folder, device="cpu")
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]

    pattern = fim_rank_pattern(model, make_batches(3), rank=4, passes=4)

    L = model.config.num_hidden_layers
    assert list(pattern) == [f"model.layers.{i}.{'self_attn' if t.endswith(('q_proj', 'k_proj', 'v_proj')) else 'mlp'}.{t}"
                             for i in range(L) for t in TARGETS]
    assert sum(pattern.values()) == L * len(TARGETS) * 4
    assert all(1 <= r <= 16 for r in pattern.values())
    assert len(set(pattern.values())) > 1
    assert [(n, type(m)) for n, m in model.named_modules()] == types and not lora_modules(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert all(p.grad is None for p in model.parameters())
    assert fim_rank_pattern(model, make_batches(3), rank=4, passes=4) == pattern  # deterministic
    injected = inject_lora(model, range(L), rank=4, rank_pattern=pattern)
    assert {p: m.rank for p, m in injected.items()} == pattern


def test_rank_pattern_follows_scores(folder):
    """The pattern is the allocation of the LoRA-B scores of the same seeded injection."""
    model = load_model(folder, device="cpu")
    batches = make_batches(2)
    pattern = fim_rank_pattern(model, batches, rank=4, passes=2, r_max=9, seed=5)
    inject_lora(model, range(2), rank=4, stiefel=False, seed=5)
    scores = lora_b_scores(model, batches, passes=2)
    assert pattern == allocate_ranks(scores, budget=40, r_min=1, r_max=9)


def test_fim_errors(folder):
    model = load_model(folder, device="cpu")
    batches = make_batches(2)
    with pytest.raises(ValueError, match=r"unknown statistic='fisher'; valid values: \['second_moment', 'variance'\]"):
        fim_rank_pattern(model, batches, statistic="fisher")
    with pytest.raises(ValueError, match="statistic='variance' needs at least 2 passes over at least 2 distinct"):
        fim_rank_pattern(model, batches[:1], rank=4, statistic="variance")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        fim_rank_pattern(model, batches, rank=0)
    with pytest.raises(ValueError, match="batches is empty"):
        fim_rank_pattern(model, [], rank=4)
    with pytest.raises(ValueError, match="rank budget 40 is infeasible"):
        fim_rank_pattern(model, batches, rank=4, r_min=5)
    with pytest.raises(ValueError, match="the model holds no LoRA modules"):
        lora_b_scores(model, batches)
    with pytest.raises(ValueError, match="passes must be a positive integer"):
        lora_b_scores(model, batches, passes=0)
    inject_lora(model, [0], rank=2)
    with pytest.raises(ValueError, match="the model already holds LoRA modules"):
        fim_rank_pattern(model, batches, rank=4)


def test_allocate_examples():
    assert allocate_ranks({"a": 1.0, "b": 3.0}, 8) == {"a": 2, "b": 6}
    assert allocate_ranks({"a": 1.0, "b": 100.0, "c": 1.0}, 12, r_min=2, r_max=6) == {"a": 3, "b": 6, "c": 3}
    assert allocate_ranks({"a": 0.0, "b": 0.0, "c": 0.0}, 7) == {"a": 3, "b": 2, "c": 2}  # even, ties low index
    assert allocate_ranks({"a": 0.0, "b": 1.0}, 9, r_max={"a": 8, "b": 4}) == {"a": 5, "b": 4}


def test_allocate_errors():
    with pytest.raises(ValueError, match="scores is empty"):
        allocate_ranks({}, 4)
    with pytest.raises(ValueError, match=r"finite and >= 0; offending modules: \['b'\]"):
        allocate_ranks({"a": 1.0, "b": -1.0}, 4)
    with pytest.raises(ValueError, match="offending modules"):
        allocate_ranks({"a": math.nan}, 4)
    with pytest.raises(ValueError, match=r"rank budget 10 is infeasible .* \[2, 8\]"):
        allocate_ranks({"a": 1.0, "b": 1.0}, 10, r_max=4)
    with pytest.raises(ValueError, match="r_max is below r_min=3"):
        allocate_ranks({"a": 1.0}, 3, r_min=3, r_max=2)
    with pytest.raises(ValueError, match=r"r_max has no bound for modules \['b'\]"):
        allocate_ranks({"a": 1.0, "b": 1.0}, 3, r_max={"a": 4})
    with pytest.raises(ValueError, match="r_min must be a positive integer"):
        allocate_ranks({"a": 1.0}, 3, r_min=0)


def _lambda_solve(s, lo, hi, budget):
    """Oracle for the continuous allocation: bisection on λ in Σ clip(λ s_i, lo, hi) = budget."""
    f = lambda lam: sum(min(max(lam * v, lo), hi) for v in s)
    a, b = 0.0, 1.0
    while f(b) < budget:
        b *= 2
    for _ in range(200):
        m = (a + b) / 2
        a, b = (m, b) if f(m) < budget else (a, m)
    return [min(max(b * v, lo), hi) for v in s]


@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1e3)), min_size=1, max_size=40),
       st.integers(1, 4), st.integers(0, 40), st.data())
def test_allocate_properties(s, r_min, span, data):
    r_max = r_min + span
    n = len(s)
    budget = data.draw(st.integers(n * r_min, n * r_max))
    ranks = list(allocate_ranks({f"m{i}": v for i, v in enumerate(s)}, budget, r_min, r_max).values())
    assert sum(ranks) == budget
    assert all(r_min <= r <= r_max for r in ranks)
    for i in range(n):
        for j in range(n):
            if s[i] > s[j]:
                assert ranks[i] >= ranks[j]
    positive = sum(r_max for v in s if v > 0) + sum(r_min for v in s if v == 0)
    if any(v > 0 for v in s) and budget < positive:  # proportional regime: within 1 of the real solution
        x = _lambda_solve(s, r_min, r_max, budget)
        assert all(abs(r - xi) < 1 + 1e-6 for r, xi in zip(ranks, x))
