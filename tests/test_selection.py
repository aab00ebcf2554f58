"""select_layers (Eq. 3), baselines, calibration fingerprint and record, batch validation."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fora.selection import (all_layers, calibration_fingerprint, random_layers, select_layers,
                            selection_record, validate_batches)


def _batch(seed=0, B=2, T=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (B, T), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def test_fisher_picks_highest_sorted():
    assert select_layers(torch.tensor([0.1, 5.0, 0.3, 4.0, 2.0]), 3) == [1, 3, 4]


def test_cka_picks_lowest_similarity():
    assert select_layers([0.9, 0.2, 0.99, 0.5], 2, by="cka") == [1, 3]


def test_ties_go_to_lower_index():
    assert select_layers([1.0, 2.0, 2.0, 2.0, 0.0], 2) == [1, 2]
    assert select_layers([0.5, 0.5, 0.5], 1, by="cka") == [0]


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=30), st.data())
def test_select_matches_brute_force(values, data):
    k = data.draw(st.integers(1, len(values)))
    # independent oracle: a layer is selected iff fewer than k layers beat it (higher score, or
    # equal score at a lower index)
    expect = [i for i, v in enumerate(values)
              if sum(1 for j, w in enumerate(values) if w > v or (w == v and j < i)) < k]
    assert select_layers(values, k) == expect
    neg = [-v for v in values]
    assert select_layers(neg, k, by="cka") == expect


@pytest.mark.parametrize("k", [0, 5, -1, 2.0, True])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"L=4 layers; choose an integer k in \[1, 4\]"):
        select_layers([1.0, 2.0, 3.0, 4.0], k)


def test_unknown_by():
    with pytest.raises(ValueError, match=r"unknown by='fisherr'; valid values: \['fisher', 'cka'\]"):
        select_layers([1.0, 2.0], 1, by="fisherr")


def test_nan_scores_rejected():
    with pytest.raises(ValueError, match=r"scores are NaN at layers \[1\]"):
        select_layers([1.0, float("nan"), 2.0], 1)


def test_random_layers_seeded_sorted_distinct():
    a = random_layers(26, 13, seed=3)
    assert a == random_layers(26, 13, seed=3)
    assert a == sorted(set(a)) and len(a) == 13 and all(0 <= i < 26 for i in a)
    assert any(random_layers(26, 13, seed=s) != a for s in range(4, 10))
    with pytest.raises(ValueError, match=r"L=26 layers; choose an integer k in \[1, 26\]"):
        random_layers(26, 27, seed=0)


def test_all_layers():
    assert all_layers(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        all_layers(0)


def test_fingerprint_stable_and_sensitive():
    batches = [_batch(0), _batch(1)]
    fp = calibration_fingerprint(batches)
    assert fp == calibration_fingerprint([{k: v.clone() for k, v in b.items()} for b in batches])
    assert len(fp) == 64
    changed = [dict(batches[0]), batches[1]]
    changed[0]["labels"] = changed[0]["labels"].clone()
    changed[0]["labels"][0, 0] = -100
    assert calibration_fingerprint(changed) != fp
    assert calibration_fingerprint(batches[::-1]) != fp
    assert calibration_fingerprint(batches[:1]) != fp


def test_selection_record_is_json():
    batches = [_batch(0), _batch(1)]
    scores = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    sel = select_layers(scores, 2)
    rec = json.loads(json.dumps(selection_record(scores, sel, batches, "fisher")))
    assert rec["scores"] == [0.5, 2.0, 1.0]
    assert rec["selected"] == [1, 2] and rec["k"] == 2 and rec["num_layers"] == 3
    assert rec["num_batches"] == 2 and rec["method"] == "fisher"
    assert rec["calibration_sha256"] == calibration_fingerprint(batches)
    with pytest.raises(ValueError, match=r"selected layers \[3\] are outside \[0, 2\]"):
        selection_record(scores, [3], batches, "fisher")


def test_validate_errors():
    with pytest.raises(ValueError, match="batches is empty"):
        validate_batches([])
    with pytest.raises(ValueError, match="got a single dict; wrap it"):
        validate_batches(_batch())
    b = _batch()
    del b["labels"]
    with pytest.raises(ValueError, match=r"batch 1 is missing key\(s\) \['labels'\]"):
        validate_batches([_batch(), b])
    validate_batches([b], labels=False)
    b = _batch()
    b["labels"] = b["labels"][:, :-1]
    with pytest.raises(ValueError, match=r"batch 0: labels has shape \(2, 5\) but input_ids has \(2, 6\)"):
        validate_batches([b])
    b = _batch()
    b["attention_mask"] = b["attention_mask"][:1]
    with pytest.raises(ValueError, match="batch 0: attention_mask has shape"):
        validate_batches([b])
    b = _batch()
    b["labels"][:, 1:] = -100
    with pytest.raises(ValueError, match="batch 1 has no supervised token"):
        validate_batches([_batch(), b])
    with pytest.raises(ValueError, match="input_ids must be a 2-D LongTensor"):
        validate_batches([{"input_ids": torch.zeros(4, dtype=torch.long), "labels": torch.zeros(4)}])
    with pytest.raises(ValueError, match="input_ids must hold integer token ids"):
        validate_batches([{"input_ids": torch.zeros(1, 4), "labels": torch.zeros(1, 4)}])
    with pytest.raises(ValueError, match="batch 0 is a list, expected a dict"):
        validate_batches([[1, 2]])
