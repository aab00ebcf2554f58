"""fora.evaluation.perplexity: sliding windows count every token once; values equal transformers'.

Oracle: the transformers model of a tiny random LLaMA checkpoint; its cross-entropy over each window
is computed directly from its logits.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.evaluation.perplexity import perplexity, text_perplexity, windows
from fora.formats.loading import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("ppl"), "llama")
    return load_model(folder, device="cpu"), load_tokenizer(folder), hf_reference(folder)


IDS = torch.randint(4, 128, (40,), generator=torch.Generator().manual_seed(0)).tolist()


@given(n=st.integers(2, 300), window=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_once(n, window, data):
    stride = data.draw(st.integers(1, window - 1))
    spans = list(windows(n, window, stride))
    targets = [t for _, first, end in spans for t in range(first, end)]
    assert targets == list(range(1, n))  # each of tokens 1..n-1 exactly once, in order
    for begin, first, end in spans:
        assert 0 <= begin < first < end and end - begin <= window
        assert first - begin >= min(first, window - stride)  # the promised context


def _hf_nll_sum(ref, ids):
    """Summed next-token cross-entropy of ids[1:] given ids[:-1], one transformers forward."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = ref(x).logits[0, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))


def test_one_window_equals_exp_mean_token_loss(tiny, one_thread):
    ours, _, ref = tiny
    got = perplexity(ours, IDS, window=64, stride=63)
    assert got["tokens"] == len(IDS) - 1 and got["windows"] == 1
    assert got["perplexity"] == pytest.approx(math.exp(_hf_nll_sum(ref, IDS) / (len(IDS) - 1)), rel=1e-5)


@pytest.mark.parametrize("window,stride", [(8, 7), (8, 1), (10, 4), (16, 15), (2, 1)])
def test_sliding_windows_equal_transformers(tiny, window, stride, one_thread):
    """Each token's loss comes from the one window that scores it: the window's last `stride`
    tokens (all but the first for the first window), recomputed here from transformers' logits."""
    ours, _, ref = tiny
    total, count = 0.0, 0
    for start in range(0, len(IDS) - 1, stride):
        end = min(start + 1 + stride, len(IDS))
        ctx = max(0, end - window)
        chunk = IDS[ctx:end]
        full = _hf_nll_sum(ref, chunk)
        skip = _hf_nll_sum(ref, chunk[:start + 1 - ctx]) if start + 1 - ctx >= 2 else 0.0
        total, count = total + full - skip, count + end - 1 - start
    got = perplexity(ours, IDS, window=window, stride=stride)
    assert got["tokens"] == count == len(IDS) - 1
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_bad_inputs(tiny, tmp_path):
    ours, tok, _ = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt is empty; perplexity needs a text file"):
        text_perplexity(ours, tok, empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_perplexity(ours, tok, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"stride must be in \[1, window - 1\] = \[1, 7\], got 8"):
        perplexity(ours, IDS, window=8, stride=8)
    with pytest.raises(ValueError, match="window must be >= 2"):
        perplexity(ours, IDS, window=1, stride=1)
    with pytest.raises(ValueError, match="needs at least 2"):
        perplexity(ours, IDS[:1])
    text = tmp_path / "t.txt"
    text.write_text("Hello world, hello perplexity.\n")
    got = text_perplexity(ours, tok, text, window=8, stride=3)
    assert got["tokens"] == len(tok.encode(text.read_text(), bos=True)) - 1
