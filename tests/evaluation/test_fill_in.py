"""fora.evaluation.fill_in: full-sentence scores against a transformers forward on a tiny model."""
from __future__ import annotations

import pytest
import torch
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.evaluation.fill_in import fill_in_accuracy, fill_in_options
from fora.formats.loading import load_model, load_tokenizer

LAYOUT = ("Please choose the correct answer to fill in the blank to complete the given sentence: {s}\n\n"
          "Option1: {a}\n\nOption2: {b}\n\nAnswer format: {fmt}")


def _rec(s, a, b, answer, fmt="option1/option2"):
    return {"instruction": LAYOUT.format(s=s, a=a, b=b, fmt=fmt), "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


RECORDS = [_rec("the cat _ on the mat.", "sat", "flew", "option1"),
           _rec("a dog _ loudly at night.", "barks", "sings", "barks", fmt="barks/sings"),
           _rec("we _ home.", "went", "go", "option2")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("fill"), "llama")
    return load_model(folder, device="cpu"), load_tokenizer(folder), hf_reference(folder)


def _hf_sentence_logp(ref, tok, text):
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    ids = [start] + tok.encode(text, bos=False)
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[k - 1, ids[k]]) for k in range(1, len(ids)))


def test_scores_equal_transformers_and_the_better_sentence_wins(tiny, one_thread):
    ours, tok, ref = tiny
    res = fill_in_accuracy(ours, tok, RECORDS, batch_size=4)
    hits = 0
    for rec, (a, b) in zip(RECORDS, res["scores"]):
        s, o1, o2 = fill_in_options(rec)
        ref_a, ref_b = _hf_sentence_logp(ref, tok, s.replace("_", o1)), _hf_sentence_logp(ref, tok, s.replace("_", o2))
        assert a == pytest.approx(ref_a, abs=1e-3) and b == pytest.approx(ref_b, abs=1e-3)
        right = 0 if rec["answer"] in (o1, "option1") else 1
        hits += (0 if ref_a >= ref_b else 1) == right
    assert res["n"] == 3 and res["accuracy"] == hits / 3


def test_errors_name_the_problem(tiny):
    ours, tok, _ = tiny
    with pytest.raises(ValueError, match="no records to score"):
        fill_in_accuracy(ours, tok, [])
    bad = {"instruction": "Is it red?\n\nAnswer format: true/false", "answer": "true"}
    with pytest.raises(ValueError, match="not a two-option fill-in record"):
        fill_in_accuracy(ours, tok, [bad])
    with pytest.raises(ValueError, match="not a two-option fill-in record"):
        fill_in_options(_rec("no blank here.", "a", "b", "option1"))
