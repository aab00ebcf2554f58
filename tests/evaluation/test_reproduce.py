"""scripts/reproduce.py end to end on a tiny checkpoint: every arm trains, is measured, tabulated,
plotted; a second invocation skips finished arms and re-evaluates a trained but unmeasured one."""
from __future__ import annotations

import importlib.util

import pytest

from fora.training.data import write_jsonl
from script_loader import load_script
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _records(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        a, b = ("cat", "dog") if i % 2 else ("dog", "cat")
        answer = "option1" if i % 2 else "option2"
        out.append({"instruction": f"Fill the sentence: A {i} _ barks.\n\nOption1: {a}\n\nOption2: {b}\n\n"
                                   "Answer format: option1/option2",
                    "input": "", "output": f"the correct answer is {answer}", "answer": answer})
    return out


@pytest.fixture
def reproduce(monkeypatch, tmp_path):
    module = load_script("reproduce")

    def toy_data(out, blanks=1, style="word"):
        return write_jsonl(_records(40), out / "data" / "train.jsonl"), _records(6, 1000)

    monkeypatch.setattr(module, "write_data", toy_data)
    monkeypatch.setattr("fora.evaluation.diagnostics.held_out_text", lambda: "the dog barks at the cat. " * 12)
    return module


def test_reproduce_all_arms_then_skip(reproduce, tmp_path):
    tiny = make_tiny_checkpoint(tmp_path / "tiny", "llama", num_hidden_layers=4, max_position_embeddings=512)
    argv = ["--out", str(tmp_path / "rep"), "--models", str(tiny), "--steps", "2", "--batch-size", "4",
            "--cutoff-len", "400", "--rank", "4", "--val-size", "4", "--eval-limit", "6", "--gen-limit", "2",
            "--max-new-tokens", "3", "--ppl-tokens", "200", "--kl-windows", "1", "--warmup-steps", "0"]
    report = reproduce.main(reproduce.parse_args(argv))
    assert {r["method"] for r in report["runs"]} == set(reproduce.ARMS)
    by = {r["method"]: r for r in report["runs"]}
    assert len(by["fora"]["layers"]) == 2 and len(by["lora"]["layers"]) == 4
    # same budget rule as the paper: FoRA at K = L/2 has lora-half-rank's parameter count
    assert by["fora"]["trainable_params"] == by["lora-half-rank"]["trainable_params"] == by["lora"]["trainable_params"] // 2
    for r in report["runs"]:
        assert 0 <= r["acc_loglik"] <= 1 and r["n_loglik"] == 6 and r["n_generate"] == 2 and 0 <= r["acc_fill_in"] <= 1
        assert r["kl"] > 0 and r["perplexity"] > 1 and r["perplexity_base"] == report["base"][str(tiny)]["perplexity"]
    assert by["fora"]["stiefel_error"] < 1e-4 and by["lora"]["stiefel_error"] > 1e-2
    md = (tmp_path / "rep" / "results.md").read_text()
    assert md.count("\n") == 2 + 1 + len(reproduce.ARMS) and "| tiny | fora | 1 | 2 |" in md
    if importlib.util.find_spec("matplotlib"):
        for name in ("val_loss.png", "spectrum.png", "fisher_profile.png"):
            assert (tmp_path / "rep" / "tiny" / name).read_bytes()[:4] == b"\x89PNG"
    first = (tmp_path / "rep" / "tiny" / "fora-s0" / "result.json").read_text()
    (tmp_path / "rep" / "tiny" / "lora-s0" / "result.json").unlink()  # as if killed during evaluation
    reproduce.main(reproduce.parse_args(argv))
    assert (tmp_path / "rep" / "tiny" / "fora-s0" / "result.json").read_text() == first  # skipped
    assert (tmp_path / "rep" / "tiny" / "lora-s0" / "result.json").is_file()  # re-evaluated, not retrained


def test_match_init_norm_reaches_every_arm_trainer(reproduce, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("fora.training.run.main", seen.append)
    assert reproduce.parse_args([]).match_init_norm is False
    cfg = reproduce.parse_args(["--match-init-norm"])
    for method in ("lora", "fora"):
        reproduce.train_arm("m", method, 0, tmp_path / "train.jsonl", cfg, tmp_path / method)
    assert [c.match_init_norm for c in seen] == [True, True] and [c.method for c in seen] == ["lora", "fora"]
