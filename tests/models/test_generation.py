"""Greedy decoding with the KV cache equals cache-free decoding and transformers' greedy `generate`.

Oracle: the transformers model of the same tiny random checkpoint (tests/tiny_models.py), eager
attention, `generate(do_sample=False)`, fp32. Prompts are left-padded to different lengths and the
Gemma cases decode past their sliding window (5) so the windowed masks over the cache are exercised.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.formats.loading import load_model
from fora.models.generation import KVCache, positions_from_mask

CASES = {
    "llama": ("llama", {}),
    "llama3": ("llama3", {}),
    "qwen3": ("qwen3", {}),
    "gemma2_softcap": ("gemma2", {}),
    "gemma3": ("gemma3", dict(sliding_window_pattern=2)),
}
EOS, PAD = 1, 0
NEW = 14  # prompt (<= 9) + 14 new tokens run well past the window of 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            family, overrides = CASES[case]
            folder = make_tiny_checkpoint(tmp_path_factory.mktemp(case), family, tokenizer=False,
                                          **overrides)
            cache[case] = load_model(folder, dtype=torch.float32, device="cpu"), hf_reference(folder)
        return cache[case]
    return get


def _left_padded(lengths, seed=0):
    """Random prompts (ids 4..127, no EOS) of the given lengths, left-padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(4, 128, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def _hf_generate(ref, ids, mask, eos):
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                       eos_token_id=eos, pad_token_id=PAD, top_k=None, top_p=None, temperature=None)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("case", CASES)
def test_cache_equals_cache_free_and_transformers_left_padded(models, case, one_thread):
    ours, ref = models(case)
    ids, mask = _left_padded([9, 4, 7])
    cached = ours.generate(ids, mask, max_new_tokens=NEW)
    plain = ours.generate(ids, mask, max_new_tokens=NEW, use_cache=False)
    expected = _hf_generate(ref, ids, mask, eos=None)
    assert cached.shape == (3, NEW)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, expected)


@pytest.mark.parametrize("case", ["llama", "gemma3"])
def test_unpadded_batch_matches_transformers(models, case, one_thread):
    ours, ref = models(case)
    ids = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.generate(ids, max_new_tokens=NEW), _hf_generate(ref, ids, None, eos=None))


@pytest.mark.parametrize("case", ["qwen3", "gemma2_softcap"])
def test_rows_stop_at_eos_and_are_padded_after(models, case, one_thread):
    """Stop at a token the model emits: that row carries PAD afterwards, as transformers does."""
    ours, ref = models(case)
    ids, mask = _left_padded([5, 8], seed=2)
    free = ours.generate(ids, mask, max_new_tokens=NEW)
    stop = int(free[0, 3])  # row 0 emits this at step 3 (or earlier)
    got = ours.generate(ids, mask, max_new_tokens=NEW, eos_id=stop, pad_id=PAD)
    first = int((free[0] == stop).nonzero()[0])
    assert int(got[0, first]) == stop and bool((got[0, first + 1:] == PAD).all())
    assert torch.equal(got, ours.generate(ids, mask, max_new_tokens=NEW, eos_id=stop, use_cache=False))
    expected = _hf_generate(ref, ids, mask, eos=stop)
    assert torch.equal(got, expected[:, :got.shape[1]])


def test_cached_logits_equal_full_forward(models, one_thread):
    """Prefill + one-token steps through the cache give the logits of one full forward pass."""
    ours, _ = models("gemma3")
    ids, mask = _left_padded([11, 6], seed=3)
    pos = positions_from_mask(mask)
    with torch.no_grad():
        full = ours(ids, mask, pos)
        cache = KVCache(len(ours.model.layers), ids.shape[1])
        first = ours._head(ours.model(ids[:, :8], mask[:, :8], pos[:, :8], cache=cache))
        steps = [ours._head(ours.model(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], cache=cache))
                 for t in range(8, ids.shape[1])]
    stepped = torch.cat([first, *steps], dim=1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], atol=1e-5, rtol=0)


def test_bad_inputs(models):
    ours, _ = models("llama")
    ids, mask = _left_padded([3, 5])
    with pytest.raises(ValueError, match="pad prompts on the LEFT"):
        ours.generate(ids.flip(1), mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        ours.generate(ids, mask, max_new_tokens=0)
    cache = KVCache(2, 4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions, 5 requested"):
        ours.model(ids, mask, cache=cache)
    with pytest.raises(ValueError, match="must cover the 0 cached and 5 new positions"):
        ours.model(ids, mask[:, 1:], cache=KVCache(2, 8))


@pytest.mark.slow
@pytest.mark.parametrize("folder_fixture", ["smol_folder", "gemma_folder"])
def test_real_checkpoints_match_transformers(request, folder_fixture):
    """SmolLM2-135M and Gemma-3-270M (converted GGUFs), two left-padded prompts, 8 new tokens."""
    from fora.formats.loading import load_tokenizer

    folder = request.getfixturevalue(folder_fixture)
    ours, ref, tok = load_model(folder, dtype=torch.float32, device="cpu"), hf_reference(folder), load_tokenizer(folder)
    prompts = [tok.encode("The capital of France is"), tok.encode("Water boils at a temperature of one hundred")]
    T = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    cached = ours.generate(ids, mask, max_new_tokens=8, eos_id=tok.eos_id, pad_id=tok.pad_id)
    assert torch.equal(cached, ours.generate(ids, mask, max_new_tokens=8, eos_id=tok.eos_id,
                                             pad_id=tok.pad_id, use_cache=False))
    expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, top_k=None, top_p=None,
                            temperature=None)[:, T:]
    assert torch.equal(cached, expected[:, :cached.shape[1]]) and cached.shape[1] == expected.shape[1]
