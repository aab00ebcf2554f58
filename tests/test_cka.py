"""Linear CKA (properties and an HSIC oracle) and per-layer CKA scores against transformers."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.baselines.cka import cka_scores, linear_cka
from fora.formats.loading import load_model


def _rand(seed, n, d):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthogonal(seed, d):
    q, r = torch.linalg.qr(_rand(seed, d, d))
    return q * torch.sign(torch.diagonal(r))


def hsic_cka(x, y):
    """Oracle: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)) with Gram matrices and centering H."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return torch.trace(k @ l) / torch.sqrt(torch.trace(k @ k) * torch.trace(l @ l))


shapes = st.tuples(st.integers(2, 24), st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31))


@given(shapes)
def test_matches_hsic_form(shape):
    n, dx, dy, seed = shape  # n below and above d: both code paths
    x, y = _rand(seed, n, dx), _rand(seed + 1, n, dy) + 0.5 * _rand(seed, n, dx)[:, :1]
    torch.testing.assert_close(linear_cka(x, y), hsic_cka(x, y), rtol=1e-9, atol=1e-12)


@given(shapes, st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3))
def test_invariances_and_range(shape, a, b):
    n, dx, dy, seed = shape
    x, y = _rand(seed, n, dx), _rand(seed + 1, n, dy)
    value = linear_cka(x, y)
    assert -1e-12 <= float(value) <= 1 + 1e-12
    torch.testing.assert_close(linear_cka(x, x), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(linear_cka(x @ _orthogonal(seed + 2, dx), y), value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(linear_cka(x, y @ _orthogonal(seed + 3, dy)), value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(linear_cka(a * x, b * y), value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(linear_cka(x + 7.0, y - 3.0), value, rtol=1e-9, atol=1e-12)  # centered


def test_linear_cka_errors():
    x = _rand(0, 5, 3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        linear_cka(x[:1], x[:1])
    with pytest.raises(ValueError, match=r"over the same n samples, got \(5, 3\) and \(4, 3\)"):
        linear_cka(x, x[:4])
    with pytest.raises(ValueError, match="zero variance after centering"):
        linear_cka(torch.ones(5, 3), x)


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 128, (3, 10), generator=g)
    right = torch.ones(3, 10, dtype=torch.long)
    right[0, 6:] = 0  # right padding: last real token at 5
    left = torch.ones(2, 10, dtype=torch.long)
    left[1, :4] = 0   # left padding: last real token at 9
    ids2 = torch.randint(4, 128, (2, 10), generator=g)
    return [{"input_ids": ids.masked_fill(right == 0, 0), "attention_mask": right},
            {"input_ids": ids2.masked_fill(left == 0, 0), "attention_mask": left},
            {"input_ids": torch.randint(4, 128, (2, 10), generator=g)}]


def hf_cka(folder, batches):
    """Oracle: transformers' output_hidden_states (with the last entry *before* the final norm)."""
    hf = hf_reference(folder)
    hf.config.tie_last_hidden_states = False
    feats = None
    with torch.no_grad():
        for b in batches:
            mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
            states = hf(input_ids=b["input_ids"], attention_mask=mask, output_hidden_states=True).hidden_states
            last = [max(i for i in range(mask.shape[1]) if mask[r, i]) for r in range(mask.shape[0])]
            rows = [torch.stack([h[r, last[r]] for r in range(len(last))]).double() for h in states]
            feats = rows if feats is None else [torch.cat([f, r]) for f, r in zip(feats, rows)]
    return torch.stack([hsic_cka(feats[i], feats[i + 1]) for i in range(len(feats) - 1)])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_scores_match_transformers(tmp_path, family):
    folder = make_tiny_checkpoint(tmp_path, family, tokenizer=False)
    model = load_model(folder, device="cpu")
    model.train()
    scores = cka_scores(model, _batches())
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert scores.shape == (model.config.num_hidden_layers,) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, hf_cka(folder, _batches()), rtol=1e-5, atol=1e-6)


def test_scores_errors(tmp_path):
    model = load_model(make_tiny_checkpoint(tmp_path, "llama", tokenizer=False), device="cpu")
    one = {"input_ids": torch.randint(4, 128, (1, 6))}
    with pytest.raises(ValueError, match="at least 2 sequences in total, got 1"):
        cka_scores(model, [one])
    with pytest.raises(ValueError, match="batches is empty"):
        cka_scores(model, [])
    bad = {"input_ids": torch.randint(4, 128, (2, 6)), "attention_mask": torch.ones(2, 6)}
    bad["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have an all-zero attention_mask"):
        cka_scores(model, [bad])
    same = {"input_ids": torch.full((3, 6), 7)}
    with pytest.raises(ValueError, match="zero variance after centering"):
        cka_scores(model, [same])
