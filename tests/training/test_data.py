"""fora.training.data / fora.training.batching: loading, Alpaca prompts, loss masks, splits, batching.

Oracles are independent: the template strings are typed out from LLM-Adapters' finetune.py, the
supervised tokens are compared with the tokenizer's own encoding of the response, and batch
contents are compared with the examples they came from.
"""
from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from fora.training.batching import (batch_indices, calibration_batches, collate, count_tokens,
                           epoch_batches, epoch_seed, epoch_steps, make_batches)
from fora.training.data import (IGNORE_INDEX, build_prompt, encode_record, encode_records, load_records,
                                record_location, split_records, write_jsonl)
from fora.formats.loading import load_tokenizer
from fora.formats.tokenizer import LoadedTokenizer

# ------------------------------------------------------------------------------- tokenizers

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def char_tok(*, bos: bool = True, pad_is_eos: bool = False) -> LoadedTokenizer:
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIALS)
    return LoadedTokenizer(tk, 1 if bos else None, 2, 2 if pad_is_eos else 0)


def bpe_tok() -> LoadedTokenizer:
    """A byte-level BPE (GPT-2 / SmolLM2 / Llama-3 style) trained on prompt-like text."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [build_prompt(r, True, template=t) for r in RECORDS for t in ("alpaca", "llm-adapters")]
    tk.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return LoadedTokenizer(tk, None, tk.token_to_id("<eos>"), tk.token_to_id("<pad>"))


RECORDS = [
    {"instruction": "Please answer the following question with true or false, question: is 2 + 2 = "
                    "4?\n\nAnswer format: true/false", "input": "",
     "output": "the correct answer is true", "answer": "true"},
    {"instruction": "Translate to French.", "input": "the cat", "output": "le chat"},
    {"instruction": "Name a colour.", "output": "blue"},  # no "input" key at all
]

# ----------------------------------------------------------------------------------- prompts


def test_alpaca_templates_match_llm_adapters_text():
    with_input = ("Below is an instruction that describes a task, paired with an input that "
                  "provides further context. Write a response that appropriately completes the "
                  "request.\n\n### Instruction:\nI\n\n### Input:\nX\n\n### Response:\nO")
    no_input = ("Below is an instruction that describes a task. Write a response that "
                "appropriately completes the request.\n\n### Instruction:\nI\n\n### Response:\nO")
    rec = {"instruction": "I", "input": "X", "output": "O"}
    assert build_prompt(rec, with_response=True) == with_input
    assert build_prompt(rec) == with_input[:-1]
    assert build_prompt({**rec, "input": ""}, True) == no_input
    assert build_prompt({"instruction": "I", "output": "O"}, True) == no_input


def test_llm_adapters_verbatim_template():
    # finetune.py's f-string: 16-space indentation, one trailing space (with input) or two.
    s = " " * 16
    with_input = ("Below is an instruction that describes a task, paired with an input that "
                  "provides further context. Write a response that appropriately completes the "
                  f"request. \n\n{s}### Instruction:\n{s}I\n{s}\n{s}### Input:\n{s}X\n{s}\n"
                  f"{s}### Response:\n{s}O")
    no_input = ("Below is an instruction that describes a task. Write a response that "
                f"appropriately completes the request.  \n\n{s}### Instruction:\n{s}I\n{s}\n"
                f"{s}### Response:\n{s}O")
    rec = {"instruction": "I", "input": "X", "output": "O"}
    assert build_prompt(rec, True, template="llm-adapters") == with_input
    assert build_prompt({**rec, "input": ""}, True, template="llm-adapters") == no_input
    with pytest.raises(ValueError, match="unknown template 'chatml'.*alpaca"):
        build_prompt(rec, template="chatml")

# ---------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("template", ["alpaca", "llm-adapters"])
@pytest.mark.parametrize("make_tok", [char_tok, bpe_tok])
def test_labels_supervise_exactly_response_and_eos(make_tok, template):
    tok = make_tok()
    for rec in RECORDS:
        ex = encode_record(tok, rec, cutoff_len=10_000, template=template)
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels)
        supervised = [t for t, y in zip(ids, labels) if y != IGNORE_INDEX]
        assert supervised == [y for y in labels if y != IGNORE_INDEX]  # labels equal the ids there
        assert supervised[-1] == tok.eos_id
        assert tok.decode(supervised[:-1]) == rec["output"]
        # everything before the response is the prompt, masked and decoding to the prompt text
        n_prompt = len(ids) - len(supervised)
        assert all(y == IGNORE_INDEX for y in labels[:n_prompt])
        body = ids[1:n_prompt] if tok.bos_id is not None else ids[:n_prompt]
        assert tok.decode(body) == build_prompt(rec, template=template)


def test_alpaca_boundary_matches_joint_tokenization_for_byte_level_bpe():
    # The documented claim: with the default template, encoding prompt and response apart gives
    # the same ids as encoding the full text once (no merge across "### Response:\n").
    tok = bpe_tok()
    for rec in RECORDS:
        ex = encode_record(tok, rec, cutoff_len=10_000)
        assert ex["input_ids"] == tok.encode(build_prompt(rec, True), bos=False) + [tok.eos_id]
        # ...whereas the verbatim LLM-Adapters prompt ends in spaces that the joint text merges
        # with the response (" the"): a boundary found by counting prompt tokens would be off.
        ex = encode_record(tok, rec, cutoff_len=10_000, template="llm-adapters")
        joint = tok.encode(build_prompt(rec, True, template="llm-adapters"), bos=False)
        assert ex["input_ids"] != joint + [tok.eos_id]


def test_bos_rules(tmp_path):
    rec = RECORDS[1]
    with_bos = encode_record(char_tok(bos=True), rec)
    no_bos = encode_record(char_tok(bos=False), rec)
    assert with_bos["input_ids"][0] == 1 and with_bos["labels"][0] == IGNORE_INDEX
    assert 1 not in no_bos["input_ids"]
    assert with_bos["input_ids"][1:] == no_bos["input_ids"]
    # through load_tokenizer on a checkpoint whose post-processor prepends BOS
    from tiny_models import write_char_tokenizer
    write_char_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    ex = encode_record(tok, rec)
    assert tok.bos_id is not None
    assert ex["input_ids"][0] == tok.bos_id and ex["input_ids"][-1] == tok.eos_id
    assert ex["input_ids"][1:-1] == tok.encode(build_prompt(rec, True), bos=False)
    inputs = encode_record(char_tok(), rec, train_on_inputs=True)
    assert inputs["labels"] == [IGNORE_INDEX] + inputs["input_ids"][1:]


def test_truncation_keeps_the_start_and_drops_unsupervised_records(caplog):
    tok = char_tok()
    rec = RECORDS[1]
    full = encode_record(tok, rec, cutoff_len=10_000)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    cut = encode_record(tok, rec, cutoff_len=n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 3]
    assert cut["labels"] == full["labels"][:n_prompt + 3]
    assert tok.eos_id not in cut["input_ids"]  # EOS is cut with the tail
    short = encode_record(tok, rec, cutoff_len=n_prompt)
    assert set(short["labels"]) == {IGNORE_INDEX}
    long_rec = {**rec, "instruction": "x" * 500}
    with caplog.at_level(logging.WARNING, logger="fora.training.data"):
        kept = encode_records(tok, [rec, long_rec], cutoff_len=len(full["input_ids"]))
    assert kept == [full]
    assert "dropped 1 of 2" in caplog.text
    with pytest.raises(ValueError, match="all 1 records were dropped.*raise cutoff_len"):
        encode_records(tok, [long_rec], cutoff_len=50)
    with pytest.raises(ValueError, match="cutoff_len must be >= 1"):
        encode_record(tok, rec, cutoff_len=0)

# ----------------------------------------------------------------------------------- loading


def test_load_json_list_jsonl_and_jsonl_named_json(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS, indent=2))
    assert load_records(tmp_path / "a.json") == RECORDS
    write_jsonl(RECORDS, tmp_path / "b.jsonl")
    assert load_records(tmp_path / "b.jsonl") == RECORDS
    assert load_records(str(tmp_path / "b.jsonl"), limit=2) == RECORDS[:2]
    (tmp_path / "c.json").write_text((tmp_path / "b.jsonl").read_text() + "\n\n")
    assert load_records(tmp_path / "c.json") == RECORDS
    (tmp_path / "one.json").write_text(json.dumps(RECORDS[0]))
    assert load_records(tmp_path / "one.json") == RECORDS[:1]


def test_write_jsonl_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "sub" / "d.jsonl"
    write_jsonl(RECORDS, out)

    def broken():
        yield RECORDS[0]
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        write_jsonl(broken(), out)
    assert load_records(out) == RECORDS  # the old file is intact
    assert sorted(p.name for p in out.parent.iterdir()) == ["d.jsonl"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="'nope/missing.json' does not exist"):
        load_records("nope/missing.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="is a folder; pass the .json/.jsonl file inside it"):
        load_records(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]')
    with pytest.raises(ValueError, match=r"bad.json: malformed JSON at line 3, column 19"):
        load_records(bad)
    bad_l = tmp_path / "bad.jsonl"
    bad_l.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl: malformed JSON at line 2"):
        load_records(bad_l)
    top = tmp_path / "top.json"
    top.write_text(json.dumps({"train": RECORDS}))
    with pytest.raises(ValueError, match=r"top level is an object with keys \['train'\].*list"):
        load_records(top)
    top.write_text("42")
    with pytest.raises(ValueError, match="top level is int"):
        load_records(top)
    for content, pattern in [
        ([RECORDS[0], "text"], r"top.json, line 1: record 2 of 2 is a str, not an object"),
        ([RECORDS[0], {"instruction": "q", "answer": "a"}],
         r"record 2 of 2 lacks \['output'\] \(it has keys \['answer', 'instruction'\]\)"),
        ([{"output": "o"}], r"line 1: record 1 of 1 lacks \['instruction'\]"),
        ([{"instruction": "q", "output": 3}], r"record 1 of 1: field 'output' is a int"),
    ]:
        top.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=pattern):
            load_records(top)
    # the line a bad record starts on, in a JSON list over many lines and in JSONL with a blank line
    records = [{"instruction": f"q{i}", "output": "o"} for i in range(7)] + [{"instruction": "x"}]
    top.write_text(json.dumps(records, indent=1))           # "[" then 4 lines per record
    with pytest.raises(ValueError, match=r"top.json, line 30: record 8 of 8 lacks \['output'\]"):
        load_records(top)
    lines = [json.dumps(r) for r in records]
    bad_l.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 9: record 8 of 8 lacks \['output'\]"):
        load_records(bad_l)
    assert "line 30" in record_location(top, 7, 8) and record_location(top, 0, 8).endswith("line 2: record 1 of 8")
    for empty in ("[]", "", "\n\n"):
        top.write_text(empty)
        with pytest.raises(ValueError, match="contains no records"):
            load_records(top)


def test_hub_source(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import (LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError)

    local = tmp_path / "cs.json"
    local.write_text(json.dumps(RECORDS))
    calls = []

    def fake_download(repo_id, filename, *, repo_type):
        calls.append((repo_id, filename, repo_type))
        return str(local)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_records("someone/commonsense:data/cs.json") == RECORDS
    assert calls == [("someone/commonsense", "data/cs.json", "dataset")]

    class FakeApi:
        def list_repo_files(self, repo_id, repo_type):
            return ["README.md", "a.json", "b.jsonl"]
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    with pytest.raises(ValueError, match=r"holds 2 JSON/JSONL files.*'someone/cs:<file>'"):
        load_records("someone/cs")

    def raising(err):
        def download(*args, **kwargs):
            raise err
        return download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        raising(LocalEntryNotFoundError("no connection")))
    with pytest.raises(ConnectionError, match="Hub is unreachable.*pass a local .json/.jsonl file"):
        load_records("someone/commonsense:cs.json")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(OSError("network down")))
    with pytest.raises(ConnectionError, match="Hub is unreachable"):
        load_records("someone/commonsense:cs.json")
    # the hub's HTTP errors need a response object to construct; their type is all that matters
    for cls, pattern in [(RepositoryNotFoundError, "repo 'someone/x' not found.*local file"),
                         (RemoteEntryNotFoundError, "file 'cs.json' not found in hub dataset")]:
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(cls.__new__(cls)))
        with pytest.raises(FileNotFoundError, match=pattern):
            load_records("someone/x:cs.json")

# --------------------------------------------------------------------------------- splitting


def test_split_deterministic_disjoint_and_sized():
    records = [{"instruction": str(i), "output": "o"} for i in range(100)]
    train, val = split_records(records, 0.1, seed=3)
    assert (train, val) == split_records(records, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    ids_t, ids_v = {r["instruction"] for r in train}, {r["instruction"] for r in val}
    assert not ids_t & ids_v and ids_t | ids_v == {str(i) for i in range(100)}
    assert split_records(records, 0.1, seed=4)[1] != val
    assert len(split_records(records, val_size=7)[1]) == 7
    assert split_records(records, 0.0) == (records, [])
    assert len(split_records(records[:5], 0.01)[1]) == 1
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        split_records(records, 1.0)
    with pytest.raises(ValueError, match="val_size=100 leaves no training records"):
        split_records(records, val_size=100)

# ---------------------------------------------------------------------------------- batching


def random_examples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(3, 60)
        ids = [rng.randint(4, 90) for _ in range(length - 1)] + [2]  # ends in EOS (= id 2)
        k = rng.randint(1, length - 1)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * k + ids[k:]})
    return out


def rows_as_examples(batch):
    """Invert collate: strip padding by attention_mask."""
    out = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        out.append((tuple(ids[:n].tolist()), tuple(labels[:n].tolist())))
    return out


@pytest.mark.parametrize("group", [True, False])
def test_every_example_once_per_epoch_with_pads_masked(group):
    examples = random_examples(203)
    pad_id = 2  # pad == eos: padding must be found by position, not by value
    batches = make_batches(examples, 8, pad_id=pad_id, seed=1, group_by_length=group,
                           mega_batch_mult=4)
    assert sum(b["input_ids"].shape[0] for b in batches) == 203
    seen = sorted(row for b in batches for row in rows_as_examples(b))
    assert seen == sorted((tuple(e["input_ids"]), tuple(e["labels"])) for e in examples)
    for b in batches:
        assert {k: v.dtype for k, v in b.items()} == dict.fromkeys(
            ("input_ids", "labels", "attention_mask"), torch.long)
        pads = b["attention_mask"] == 0
        assert (b["input_ids"][pads] == pad_id).all()
        assert (b["labels"][pads] == IGNORE_INDEX).all()
        assert count_tokens(b) == int((~pads).sum())
    assert sum(count_tokens(b, supervised=True) for b in batches) == sum(
        sum(y != IGNORE_INDEX for y in e["labels"]) for e in examples)


def test_grouping_reduces_padding():
    examples = random_examples(400)
    pads = {g: sum(count_tokens({"input_ids": b["input_ids"]}) - count_tokens(b)
                   for b in make_batches(examples, 8, pad_id=0, seed=0, group_by_length=g))
            for g in (True, False)}
    assert pads[True] < 0.5 * pads[False]


def test_batches_deterministic_and_epochs_differ():
    examples = random_examples(100)
    lengths = [len(e["input_ids"]) for e in examples]
    a = batch_indices(lengths, 4, seed=5)
    assert a == batch_indices(lengths, 4, seed=5)
    assert a != batch_indices(lengths, 4, seed=6)
    e0 = epoch_batches(examples, 4, 0, 5, pad_id=0)
    e1 = epoch_batches(examples, 4, 1, 5, pad_id=0)
    assert e0.indices == batch_indices(lengths, 4, seed=epoch_seed(5, 0)) and e1.indices != e0.indices
    assert e1.indices == epoch_batches(examples, 4, 1, 5, pad_id=0).indices
    # resuming at batch k gives the same batch as the full pass
    full = make_batches(examples, 4, pad_id=0, seed=5)
    for k in (0, 7, len(e0) - 1):
        assert all(torch.equal(full[k][key], e0[k][key]) for key in full[k])
    assert len(e0[3:]) == len(e0) - 3
    # no shuffle, no grouping: the input order
    assert batch_indices(lengths, 30, shuffle=False, group_by_length=False) == [
        list(range(i, min(i + 30, 100))) for i in range(0, 100, 30)]
    assert len(batch_indices(lengths, 30, drop_last=True)) == 3


def test_epoch_orders_are_independent_across_seeds():
    # With `seed + epoch`, seed s at epoch 1 replayed seed s + 1 at epoch 0: runs over consecutive
    # seeds (mean +- std over three seeds) shared their data orders.
    examples = random_examples(64)
    orders = {(s, e): epoch_batches(examples, 4, e, s, pad_id=0).indices for s in range(4) for e in range(4)}
    assert orders[(0, 1)] != orders[(1, 0)]
    distinct = {tuple(map(tuple, o)) for o in orders.values()}
    assert len(distinct) == len(orders)
    assert len({epoch_seed(s, e) for s in range(50) for e in range(50)}) == 2500


def test_collate_padding_multiple_and_errors():
    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    b = collate(ex, pad_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].tolist() == [[5, 6, 7] + [0] * 5, [5] + [0] * 7]
    assert b["labels"].tolist() == [[-100, 6, 7] + [-100] * 5, [5] + [-100] * 7]
    assert b["attention_mask"].tolist() == [[1, 1, 1] + [0] * 5, [1] + [0] * 7]
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        collate([{"input_ids": [1, 2, 3], "labels": [1, 2]}], pad_id=0)
    with pytest.raises(ValueError, match="empty list of examples"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        collate(ex, pad_id=0, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_batches(ex, 0, pad_id=0)
    with pytest.raises(ValueError, match="mega_batch_mult must be >= 1"):
        make_batches(ex, 1, pad_id=0, mega_batch_mult=0)
    with pytest.raises(ValueError, match="no examples to batch"):
        make_batches([], 4, pad_id=0)


def test_calibration_batches():
    examples = random_examples(50)
    cal = calibration_batches(examples, 3, 4, pad_id=0, seed=2)
    assert [b["input_ids"].shape[0] for b in cal] == [4, 4, 4]
    rows = [r for b in cal for r in rows_as_examples(b)]
    pool = [(tuple(e["input_ids"]), tuple(e["labels"])) for e in examples]
    assert all(r in pool for r in rows)
    assert len({pool.index(r) for r in rows}) == 12  # no example twice
    again = calibration_batches(examples, 3, 4, pad_id=0, seed=2)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(cal, again))
    with pytest.raises(ValueError, match=r"needs 13 x 4 = 52 examples but only 50.*lower"):
        calibration_batches(examples, 13, 4, pad_id=0)
    with pytest.raises(ValueError, match="n_batches and batch_size must be >= 1"):
        calibration_batches(examples, 0, 4, pad_id=0)


def test_end_to_end_records_to_batches():
    tok = char_tok(pad_is_eos=True)
    examples = encode_records(tok, RECORDS * 5, cutoff_len=1024)
    for b in make_batches(examples, 4, pad_id=tok.pad_id, seed=0):
        for ids, labels in rows_as_examples(b):
            sup = [t for t, y in zip(ids, labels) if y != IGNORE_INDEX]
            assert sup[-1] == tok.eos_id
            assert tok.decode(list(sup[:-1])) in {r["output"] for r in RECORDS}


def test_epoch_steps_split_the_rows_of_full_size_batches():
    # lengths all different, so length grouping at the micro size would pick other rows
    examples = [{"input_ids": list(range(3 + (5 * i) % 17)), "labels": list(range(3 + (5 * i) % 17))}
                for i in range(23)]
    for micro, accum in ((2, 2), (3, 3), (1, 4), (5, 1)):
        whole = epoch_batches(examples, micro * accum, 1, 7, pad_id=0)
        steps = epoch_steps(examples, micro, accum, 1, 7, pad_id=0)
        assert len(steps) == len(whole) == -(-23 // (micro * accum))
        for k, rows in enumerate(whole.indices):
            parts = [steps.micro.indices[i] for i in steps.steps[k]]
            assert [r for p in parts for r in p] == rows  # the step's rows, in order, each once
            assert all(len(p) == micro for p in parts[:-1]) and 0 < len(parts[-1]) <= micro
            assert [b["input_ids"].shape[0] for b in steps[k]] == [len(p) for p in parts]
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        epoch_steps(examples, 2, 0, 0, pad_id=0)
