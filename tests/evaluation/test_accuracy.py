"""fora.evaluation.accuracy: the loglik and generate protocols against transformers on a tiny model.

Oracle: the transformers model of the same tiny random LLaMA checkpoint with its character-level
tokenizer (tests/tiny_models.py); scores are recomputed from its full-sequence logits.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import hf_reference, make_tiny_checkpoint

import fora.evaluation.accuracy as acc
from fora.evaluation.accuracy import evaluate_generate, evaluate_loglik, evaluate_tasks
from fora.formats.loading import load_model, load_tokenizer
from fora.training.data import build_prompt


def _rec(question: str, answer: str, fmt: str = "true/false") -> dict:
    return {"instruction": f"Is it {question}?\n\nAnswer format: {fmt}", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


RECORDS = [_rec("red", "true"), _rec("a long question about blue things", "false"),
           _rec("x", "option2", "option1/option2"), _rec("pick one", "ending3", "ending1/ending2/ending3/ending4")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("acc"), "llama")
    return load_model(folder, device="cpu"), load_tokenizer(folder), hf_reference(folder)


def _hf_score(ref, tok, record, choice, template):
    """sum of log p(response tokens) from one transformers forward over prompt + response."""
    prompt = tok.encode(build_prompt(record, template=template), bos=True)
    cont = tok.encode(f"the correct answer is {choice}", bos=False)
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = torch.log_softmax(ref(ids).logits[0].double(), -1)
    return sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(cont))


@pytest.mark.parametrize("template", ["alpaca", "llm-adapters"])
def test_loglik_scores_equal_transformers(tiny, template, one_thread):
    ours, tok, ref = tiny
    res = evaluate_loglik(ours, tok, RECORDS, template=template, batch_size=3, progress=False)
    assert res["n"] == 4
    for rec, pred in zip(RECORDS, res["predictions"]):
        choices = rec["instruction"].rsplit(": ", 1)[1].split("/")
        assert list(pred["scores"]) == choices
        for c in choices:
            assert pred["scores"][c] == pytest.approx(_hf_score(ref, tok, rec, c, template), abs=1e-3)
        best = max(choices, key=lambda c: pred["scores"][c])
        assert pred["prediction"] == best and pred["correct"] == (best == rec["answer"])
    assert res["accuracy"] == sum(p["correct"] for p in res["predictions"]) / 4


class _WordTokenizer:
    """One token per word, so per-token and per-character normalisation disagree."""
    bos_id, eos_id, pad_id = None, 1, 0

    def encode(self, text, *, bos=True, eos=False):
        return [4 + len(w) for w in text.split()]


def test_acc_norm_divides_by_characters_and_ties_go_first(monkeypatch):
    # "the correct answer is a" has 23 characters, "... bbbbbbbbbb" 32; both are 5 words
    recs = [_rec("q", "bbbbbbbbbb", "a/bbbbbbbbbb"), _rec("q", "b", "a/b")]
    fake = {("a", 0): -10.0, ("bbbbbbbbbb", 0): -10.5, ("a", 1): -7.0, ("b", 1): -7.0}
    order = [[("a", 0), ("bbbbbbbbbb", 0)], [("a", 1), ("b", 1)]]
    monkeypatch.setattr(acc, "choice_logprobs", lambda model, items, **kw: [[fake[k] for k in ks] for ks in order])
    res = evaluate_loglik(None, _WordTokenizer(), recs, progress=False)
    first, tie = res["predictions"]
    assert first["prediction"] == "a" and not first["correct"]  # raw sum: -10 > -10.5
    assert -10.0 / 23 < -10.5 / 32
    assert first["prediction_norm"] == "bbbbbbbbbb" and first["correct_norm"]  # per character
    assert tie["prediction"] == "a" and tie["prediction_norm"] == "a"  # tie -> first choice
    assert (res["accuracy"], res["acc_norm"]) == (0.0, 0.5)


def test_generate_protocol_matches_transformers_generate(tiny, one_thread):
    ours, tok, ref = tiny
    res = evaluate_generate(ours, tok, RECORDS, batch_size=3, max_new_tokens=6, progress=False)
    for rec, pred in zip(RECORDS, res["predictions"]):
        ids = torch.tensor([tok.encode(build_prompt(rec), bos=True)])
        out = ref.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id, top_k=None, top_p=None, temperature=None)
        assert pred["text"] == tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


class _Scripted(torch.nn.Module):
    """A 'model' whose generate returns fixed texts (char tokenizer ids): tests scoring, not decoding."""

    def __init__(self, tok, texts):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.texts, self.calls = tok, texts, []

    def generate(self, ids, mask, *, max_new_tokens, eos_id, pad_id):
        self.calls.append((ids, mask))
        rows = [self.tok.encode(self.texts[len(self.calls) - 1][b], bos=False) + [eos_id, 9, 9]
                for b in range(ids.shape[0])]
        width = max(map(len, rows))
        return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])


def test_generate_protocol_scores_first_answer_word(tiny):
    _, tok, _ = tiny
    # batches are formed longest prompt first: records 1, 3, 2, 0 (batch_size 2 -> [1, 3], [2, 0])
    texts = [["The correct answer is False.", "ending3"],
             ["option3 or option2", "the correct answer is true"]]
    model = _Scripted(tok, texts)
    res = evaluate_generate(model, tok, RECORDS, batch_size=2, progress=False)
    got = [(p["prediction"], p["correct"], p["text"]) for p in res["predictions"]]
    assert got == [("true", True, "the correct answer is true"), ("false", True, "The correct answer is False."),
                   ("option2", True, "option3 or option2"), ("ending3", True, "ending3")]
    ids, mask = model.calls[0]
    assert bool((mask[:, -1] == 1).all()) and int(mask[1].sum()) < ids.shape[1]  # left-padded


def test_evaluate_tasks_report(tiny, one_thread):
    ours, tok, _ = tiny
    tasks = {"b": RECORDS[:2], "a": RECORDS[2:]}
    rep = evaluate_tasks(ours, tok, tasks, protocol="loglik", limit=1, progress=False)
    assert set(rep) == {"protocol", "template", "tasks", "average", "average_acc_norm", "predictions"}
    assert {k: v["n"] for k, v in rep["tasks"].items()} == {"b": 1, "a": 1}
    assert rep["average"] == pytest.approx((rep["tasks"]["a"]["accuracy"] + rep["tasks"]["b"]["accuracy"]) / 2)
    assert [p["task"] for p in rep["predictions"]] == ["b", "a"]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        evaluate_tasks(ours, tok, tasks, limit=0)
    with pytest.raises(ValueError, match="unknown protocol 'mc'"):
        evaluate_tasks(ours, tok, tasks, protocol="mc")
    with pytest.raises(ValueError, match="no records to evaluate"):
        evaluate_generate(ours, tok, [])


def test_llm_adapters_eval_template_is_their_evaluation_prompt():
    """LLM-Adapters' commonsense_evaluate.py generate_prompt, no-input form, written out by hand."""
    pad = " " * 16
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                f"the request. \n\n{pad}### Instruction:\n{pad}Is it red?\n\n{pad}### Response:\n{pad}")
    assert build_prompt({"instruction": "Is it red?", "input": ""}, template="llm-adapters-eval") == expected


def test_shared_prefix_scores_equal_whole_sequences_on_transformers(tiny, one_thread):
    """choice_logprobs runs each prefix once into a KV cache: its sums equal one transformers forward per
    whole (prefix + continuation) sequence, for continuations sharing 0, some or all-but-one tokens,
    items of different prefix lengths and numbers of choices in one left-padded batch."""
    from fora.evaluation.choice_logprobs import choice_logprobs

    ours, tok, ref = tiny
    items = [(tok.encode("Is it red? yes or no", bos=True), [tok.encode(" yes", bos=False), tok.encode(" no", bos=False)]),
             (tok.encode("A much longer question about many things?", bos=True),
              [tok.encode(t, bos=False) for t in (" the answer is a", " the answer is bb", " the answer", " xyz")]),
             (tok.encode("Q", bos=True), [tok.encode(" ab", bos=False), tok.encode(" abc", bos=False)])]
    got = choice_logprobs(ours, items, pad_id=tok.pad_id, batch_size=3)
    for (prefix, conts), sums in zip(items, got):
        for cont, value in zip(conts, sums):
            ids = torch.tensor([list(prefix) + list(cont)])
            with torch.no_grad():
                logp = torch.log_softmax(ref(ids).logits[0].double(), -1)
            expected = sum(float(logp[len(prefix) - 1 + k, t]) for k, t in enumerate(cont))
            assert value == pytest.approx(expected, abs=1e-3)
    one_by_one = choice_logprobs(ours, items, pad_id=tok.pad_id, batch_size=1)  # no padding at all
    for a, b in zip(one_by_one, got):
        assert a == pytest.approx(b, abs=1e-4)
    with pytest.raises(ValueError, match="non-empty prefix"):
        choice_logprobs(ours, [([1], [[]])])
