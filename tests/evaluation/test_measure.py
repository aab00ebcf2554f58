"""fora.evaluation.measure: the base row's cache (reused only for the same test records and sizes,
waited for while another process computes it) and the test-records fingerprint."""
from __future__ import annotations

import json
import os
import time

import pytest

from fora.evaluation import measure as m

TEST = [{"instruction": f"q{i}", "input": "", "output": "o", "answer": "a" if i % 2 else "b"} for i in range(5)]
SIZES = m.EvalSizes(eval_limit=None, gen_limit=2)


@pytest.fixture
def computed(monkeypatch):
    """Stand-ins for the model and the measurement: counts how often the base is really measured."""
    calls = []
    monkeypatch.setattr(m, "load_fp32", lambda name: ("model", "tok"))

    def fake_measure(model, tok, test, sizes):
        calls.append(len(test[:sizes.eval_limit]))
        n = len(test[:sizes.eval_limit])
        return ({"acc_loglik": 0.5, "n_loglik": n, "n_generate": min(sizes.gen_limit, len(test)) or None,
                 "test_sha256": m.records_sha256(test[:sizes.eval_limit]), "perplexity": 9.0},
                {"acc_loglik": [1] * n})
    monkeypatch.setattr(m, "measure", fake_measure)
    return calls


def test_records_fingerprint_follows_the_questions_answers_and_order():
    assert m.records_sha256(TEST) == m.records_sha256([dict(r) for r in TEST])
    assert m.records_sha256(TEST) == m.records_sha256([{**r, "output": "other"} for r in TEST])  # not scored
    assert m.records_sha256(TEST) != m.records_sha256(TEST[::-1])
    assert m.records_sha256(TEST) != m.records_sha256([{**TEST[0], "answer": "c"}, *TEST[1:]])


def test_base_row_is_measured_once_and_remeasured_for_other_records(tmp_path, computed):
    path = tmp_path / "base.json"
    row = m.base_row("tiny", TEST, SIZES, path)
    assert computed == [5] and row["method"] == "base (zero-shot)" and row["model"] == "tiny"
    assert json.loads((tmp_path / "base_items.json").read_text()) == {"acc_loglik": [1] * 5}
    assert m.base_row("tiny", TEST, SIZES, path) == row and computed == [5]  # cached
    assert not path.with_suffix(".running").exists()
    m.base_row("tiny", TEST, m.EvalSizes(eval_limit=3, gen_limit=2), path)  # fewer records: not the cached row
    m.base_row("tiny", TEST[::-1], m.EvalSizes(eval_limit=3, gen_limit=2), path)  # other records, same count
    m.base_row("tiny", TEST[::-1], m.EvalSizes(eval_limit=3, gen_limit=0), path)  # no generate protocol
    assert computed == [5, 3, 3, 3]


def test_base_row_waits_for_a_live_marker_and_ignores_a_stale_one(tmp_path, computed, monkeypatch):
    path = tmp_path / "base.json"
    marker = path.with_suffix(".running")
    marker.write_text("another process")
    done = {"model": "tiny", "n_loglik": 5, "n_generate": 2, "test_sha256": m.records_sha256(TEST), "perplexity": 7.0}
    naps = []

    def other_process_finishes(seconds):  # the other process writes its row while this one sleeps
        naps.append(seconds)
        path.write_text(json.dumps(done))
        marker.unlink()
    monkeypatch.setattr(m.time, "sleep", other_process_finishes)
    assert m.base_row("tiny", TEST, SIZES, path) == done and naps == [10] and computed == []
    path.unlink()
    marker.write_text("a process killed two hours ago")
    os.utime(marker, (time.time() - 7200, time.time() - 7200))
    assert m.base_row("tiny", TEST, SIZES, path)["perplexity"] == 9.0 and naps == [10] and computed == [5]
    assert not marker.exists()
