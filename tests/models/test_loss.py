"""head_loss / CausalLM.loss against the full computation (full logits, then causal_lm_loss) and
against transformers' own loss on a tiny checkpoint.

The oracles form every logit: `causal_lm_loss(softcap(hidden @ Wᵀ), labels)` with autograd, and
`transformers` `model(ids, labels=labels).loss` (a mean) times the supervised-token count.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.formats.loading import load_model
from fora.models.loss import IGNORE_INDEX, causal_lm_loss, head_loss, supervised_positions


def _case(seed: int, B: int = 3, T: int = 9, H: int = 16, V: int = 37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX   # a prompt
    labels[1, -2:] = IGNORE_INDEX  # right padding
    labels[2, 1::2] = IGNORE_INDEX
    return hidden, weight, labels


def _full(hidden, weight, labels, softcap=None):
    logits = hidden @ weight.mT
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return causal_lm_loss(logits, labels)


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("chunk", [37, 37 * 4, 2 ** 27])  # one row, four rows, everything per chunk
def test_head_loss_equals_full_logits_value_and_gradients(softcap, chunk):
    hidden, weight, labels = _case(0)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, count = head_loss(h1, w1, labels, softcap=softcap, chunk_logits=chunk)
    ref_total, ref_count = _full(h2, w2, labels, softcap)
    assert int(count) == int(ref_count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    # the chunked loss accumulates in fp32 whatever the input dtype, as causal_lm_loss's .float()
    torch.testing.assert_close(total.double(), ref_total.double(), rtol=1e-6, atol=1e-5)
    (2.0 * total).backward()
    (2.0 * ref_total).backward()  # a non-unit upstream gradient reaches both inputs
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert h1.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_head_loss_frozen_weight_and_no_grad():
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in _case(1))
    h = hidden.clone().requires_grad_()
    total, _ = head_loss(h, weight, labels, chunk_logits=37 * 2)
    total.backward()
    ref = hidden.clone().requires_grad_()
    _full(ref, weight, labels)[0].backward()
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        value, _ = head_loss(hidden, weight, labels)
    torch.testing.assert_close(value, _full(hidden, weight, labels)[0], rtol=1e-5, atol=1e-4)


def test_supervised_positions_are_the_shifted_labels():
    labels = torch.tensor([[5, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 2, IGNORE_INDEX, 3]])
    index, target = supervised_positions(labels)
    # hidden[:, :-1] flattened: row 0 -> 0..2, row 1 -> 3..5; position t predicts labels[t + 1]
    assert index.tolist() == [1, 2, 3, 5]
    assert target.tolist() == [7, 8, 2, 3]


@pytest.mark.parametrize("family", ["llama3", "gemma2"])  # untied/tied head; Gemma-2's soft-cap
def test_causal_lm_loss_method_matches_transformers(tmp_path, family):
    folder = make_tiny_checkpoint(tmp_path / family, family)
    ours = load_model(folder, dtype=torch.float32, device="cpu")
    ref = hf_reference(folder)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    total, count = ours.loss(ids, labels)
    with torch.no_grad():
        expected = ref(ids, labels=labels).loss * int(count)
    torch.testing.assert_close(total.detach(), expected.float(), rtol=1e-4, atol=1e-4)
    full_total, _ = causal_lm_loss(ours(ids), labels)
    torch.testing.assert_close(total, full_total, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_head_loss_bf16_on_cuda_matches_full_logits():
    hidden, weight, labels = _case(2, V=1000)
    h = hidden.to("cuda", torch.bfloat16).requires_grad_()
    ref = hidden.to("cuda", torch.bfloat16).requires_grad_()
    w = weight.to("cuda", torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, _ = head_loss(h, w, labels, chunk_logits=1000 * 3)
        ref_total, _ = causal_lm_loss(ref @ w.mT, labels.cuda())
    total.backward()
    ref_total.backward()
    torch.testing.assert_close(total, ref_total.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h.grad.float(), ref.grad.float(), rtol=5e-2, atol=5e-3)
