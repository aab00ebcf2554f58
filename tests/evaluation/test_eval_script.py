"""scripts/eval.py end to end on a tiny checkpoint, with a peft-written adapter as the oracle.

The adapter is made by peft on the transformers model (random A and B); the loglik scores the
script writes must equal those recomputed from the peft model's logits.
"""
from __future__ import annotations

import json

import pytest
import torch
from script_loader import load_script
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.training.data import build_prompt

RECORDS = [{"instruction": f"Is {w} a word?\n\nAnswer format: true/false", "input": "",
            "output": "the correct answer is true", "answer": a}
           for w, a in (("cat", "true"), ("xqzt", "false"), ("dog", "true"))]


def _script():
    return load_script("eval")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("eval")
    ckpt = make_tiny_checkpoint(root / "llama", "llama")
    torch.manual_seed(0)
    peft_model = get_peft_model(hf_reference(ckpt), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)).eval()
    peft_model.save_pretrained(root / "adapter")
    data = root / "dataset"
    for task, recs in (("boolq", RECORDS), ("other", RECORDS[:2])):
        (data / task).mkdir(parents=True)
        (data / task / "test.json").write_text(json.dumps(recs))
    return root, ckpt, peft_model, data


def _peft_score(peft_model, tok, record, choice):
    prompt = tok.encode(build_prompt(record), bos=True)
    cont = tok.encode(f"the correct answer is {choice}", bos=False)
    with torch.no_grad():
        logp = torch.log_softmax(peft_model(torch.tensor([prompt + cont])).logits[0].double(), -1)
    return sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(cont))


def test_eval_with_peft_adapter_writes_report_and_predictions(setup, capsys, one_thread):
    from fora.formats.loading import load_tokenizer

    root, ckpt, peft_model, data = setup
    ev = _script()
    out = root / "run" / "REPORT.json"
    res = ev.main(ev.parse_args(["--model", str(ckpt), "--adapter", str(root / "adapter"), "--data", str(data),
                                 "--protocol", "loglik", "--out", str(out), "--no-progress"]))
    report = json.loads(out.read_text())
    assert set(report) == {"protocol", "template", "model", "adapter", "tasks", "average", "average_acc_norm"}
    assert report["tasks"]["boolq"]["n"] == 3 and report["tasks"]["other"]["n"] == 2
    lines = [json.loads(s) for s in (out.parent / "predictions.jsonl").read_text().splitlines()]
    assert [(p["task"], p["index"]) for p in lines] == [("boolq", 0), ("boolq", 1), ("boolq", 2),
                                                        ("other", 0), ("other", 1)]
    assert lines == res["predictions"]
    tok = load_tokenizer(ckpt)
    for p in lines:
        for choice, score in p["scores"].items():
            assert score == pytest.approx(_peft_score(peft_model, tok, RECORDS[p["index"]], choice), abs=1e-3)
    table = capsys.readouterr().out
    assert "boolq" in table and "average" in table and "acc_norm" in table


def test_generate_protocol_and_perplexity(setup, capsys, one_thread):
    root, ckpt, _, data = setup
    text = root / "text.txt"
    text.write_text("A short paragraph of text to score.\n")
    ev = _script()
    res = ev.main(ev.parse_args(["--model", str(ckpt), "--data", str(data / "boolq" / "test.json"), "--limit", "2",
                                 "--max-new-tokens", "4", "--ppl", str(text), "--window", "16", "--stride", "8",
                                 "--no-progress"]))
    assert res["tasks"] == {"boolq": {"accuracy": res["average"], "n": 2}}
    assert all(len(p["text"]) <= 4 for p in res["predictions"])  # char tokenizer: <= 4 characters
    assert res["perplexity"]["tokens"] == len(text.read_text()) and res["perplexity"]["windows"] == 5
    assert "perplexity of" in capsys.readouterr().out


def test_adapter_base_mismatch_names_both(setup, tmp_path, capsys):
    root, _, _, data = setup
    other = make_tiny_checkpoint(tmp_path / "qwen", "qwen3", tokenizer=True)  # q_proj 64 -> 128
    rc = _script().cli(["--model", str(other), "--adapter", str(root / "adapter"), "--data", str(data)])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"was trained on base model '{root / 'llama'}'" in err and f"does not match the model '{other}'" in err


def test_bad_command_lines(setup, tmp_path, capsys):
    root, ckpt, _, _ = setup
    ev = _script()
    with pytest.raises(SystemExit):
        ev.parse_args(["--data", "x.json", "--limit", "0"])
    assert "--limit must be at least 1 (got 0)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.parse_args([])
    assert "nothing to evaluate: pass --data" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert ev.cli(["--model", str(ckpt), "--ppl", str(empty)]) == 1
    assert "empty.txt is empty; perplexity needs a text file" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    assert ev.cli(["--model", str(ckpt), "--data", str(tmp_path / "junk")]) == 1
    assert "unknown task layout" in capsys.readouterr().err
    assert ev.cli(["--model", str(ckpt), "--adapter", str(tmp_path), "--data", str(root / "dataset")]) == 1
    err = capsys.readouterr().err
    assert "adapter_config.json not found; --adapter must be a folder written by fora's trainer (the run folder " \
           "itself, train.py's --out, e.g. runs/smollm2-135m-fora-k15)" in err and "out/adapter" not in err
    assert "holds one" not in err
    inside = root / "adapter" / "adapter"                  # one level too deep: the run folder is meant
    assert ev.cli(["--model", str(ckpt), "--adapter", str(inside), "--data", str(root / "dataset")]) == 1
    assert f"{root / 'adapter'} holds one: a train.py run's adapter is its run folder itself, " \
           f"--adapter {root / 'adapter'}" in capsys.readouterr().err


def test_generate_script_with_adapter_matches_peft(setup, capsys, one_thread):
    from fora.formats.loading import load_tokenizer

    root, ckpt, peft_model, _ = setup
    gen = load_script("generate")
    out = gen.main(gen.parse_args(["--model", str(ckpt), "--adapter", str(root / "adapter"), "--prompt", "Hi there",
                                   "--paragraph", "Some text.", "--max-new-tokens", "6"]))
    tok = load_tokenizer(ckpt)
    ids = torch.tensor([tok.encode("Hi there")])
    with torch.no_grad():
        expected = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_id,
                                       pad_token_id=tok.pad_id, top_k=None, top_p=None, temperature=None)
    assert out["new_ids"] == expected[0, ids.shape[1]:].tolist()
    assert "Hi there" in capsys.readouterr().out
