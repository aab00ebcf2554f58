"""scripts/reproduce.py end to end on a tiny checkpoint: every arm trains, is measured, tabulated,
plotted; a second invocation skips finished arms and re-evaluates a trained but unmeasured one."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from torch import nn

from fora.evaluation.paired import contrast_interval, mcnemar_exact, t_interval
from fora.evaluation.report import AGREES, CLAIMS, DISAGREES, UNDECIDED, decide
from fora.lora import LoRALinear
from fora.optim import build_optimizers

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

    def toy_data(out, blanks=1, style="word", test_split="one-blank"):
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
    # same budget rule as the paper: FoRA at K = L/2 has lora-half-rank's parameter count, plus one
    # scalar gate per adapted linear (2 layers x 5 targets)
    assert by["fora"]["trainable_params"] - 2 * 5 == by["lora-half-rank"]["trainable_params"] == by["lora"]["trainable_params"] // 2
    for r in report["runs"]:
        assert 0 <= r["acc_loglik"] <= 1 and r["n_loglik"] == 6 and r["n_generate"] == 2 and 0 <= r["acc_fill_in"] <= 1
        assert r["kl"] > 0 and r["perplexity"] > 1 and r["perplexity_base"] == report["base"][str(tiny)]["perplexity"]
    assert by["fora"]["stiefel_error"] < 1e-4 and by["lora"]["stiefel_error"] > 1e-2
    for r in report["runs"]:  # the per-item file holds the row's accuracies item by item
        items = json.loads((tmp_path / "rep" / "tiny" / f"{r['method']}-s0" / "items.json").read_text())
        assert items["clusters"] == list(range(6)) and items["test_sha256"] == r["test_sha256"]
        for key in ("acc_loglik", "acc_norm", "acc_fill_in", "acc_generate"):
            assert set(items[key]) <= {0, 1} and sum(items[key]) / len(items[key]) == pytest.approx(r[key])
    assert "| tiny | FoRA ≥ LoRA-all at half the parameters |" in (tmp_path / "rep" / "claims.md").read_text()
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


def _write_run(folder, method, seed, row, items=None):
    run = folder / f"{method}-s{seed}"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"model": "m", "method": method, "seed": seed, **row}))
    if items is not None:
        (run / "items.json").write_text(json.dumps(items))


def _row(acc, erank, kl, params):
    return {"layers": [0, 1], "trainable_params": params, "val_loss": 0.5, "acc_loglik": acc, "acc_norm": acc,
            "perplexity": 9.0, "erank_ratio": erank, "stiefel_error": 0.1, "kl": kl, "train_seconds": 1.0}


def test_report_from_finished_runs_equals_a_direct_computation(reproduce, tmp_path, monkeypatch):
    """A fixture of finished runs (2 seeds, 120 items in 40 sentences): every claim recomputed directly."""
    rng = np.random.default_rng(0)
    clusters = [i // 3 for i in range(120)]
    # the three records of a sentence agree (as blanks of one sentence tend to): clustering matters
    lora = np.repeat((rng.random((2, 40)) < 0.55).astype(int), 3, axis=1)
    better = np.maximum(lora, np.repeat((rng.random((2, 40)) < 0.5).astype(int), 3, axis=1))  # right wherever lora is
    tables = {"lora": lora, "fora": better, "stiefel-lora": better, "fg-lora": lora, "lora-half-rank": lora,
              "random-k": lora}
    erank = {"fora": (0.85, 0.86), "stiefel-lora": (0.88, 0.90), "fg-lora": (0.60, 0.62), "lora": (0.65, 0.66),
             "lora-half-rank": (0.7, 0.7), "random-k": (0.8, 0.8)}
    kl = {"fora": (0.5, 0.55), "stiefel-lora": (0.4, 0.42), "fg-lora": (0.2, 0.19), "lora": (0.15, 0.16),
          "lora-half-rank": (0.1, 0.1), "random-k": (0.3, 0.3)}
    out = tmp_path / "out"
    for method, y in tables.items():
        for s in (0, 1):
            row = _row(float(y[s].mean()), erank[method][s], kl[method][s], 100 if method == "lora" else 50)
            _write_run(out / "m", method, s, row, {"test_sha256": "x", "clusters": clusters, "acc_loglik": y[s].tolist()})
    scaled = {**_row(0.1, 0.9, 0.01, 50), "arm": "fora ×0.25", "stiefel_lr_scale": 0.25}  # must not enter the claims
    _write_run(out / "m", "fora-x0.25", 0, scaled, {"test_sha256": "x", "clusters": clusters, "acc_loglik": [0] * 120})
    json_path = out / "m" / "fora-x0.25-s0" / "result.json"
    json_path.write_text(json_path.read_text().replace('"method": "fora-x0.25"', '"method": "fora"'))
    (out / "m" / "base.json").write_text(json.dumps({"model": "m", "acc_loglik": 0.5, "acc_norm": 0.5, "perplexity": 9.0}))
    monkeypatch.setattr("fora.evaluation.store_report.plot_store", lambda *a: None)
    report = reproduce.main(reproduce.parse_args(["--out", str(out), "--report", "--n-boot", "500"]))
    got = {c["claim"]: c for c in report["claims"]}
    assert [c["claim"] for c in report["claims"]] == [c.name for c in CLAIMS]
    for claim in CLAIMS:
        c = got[claim.name]
        if "dora" in claim.weights or "adalora" in claim.weights:
            assert c["verdict"] == UNDECIDED and c["why"].startswith("not run: ") and c["estimate"] is None
            continue
        if claim.metric == "acc_loglik":  # direct: the accuracy contrast per seed, averaged; same bootstrap
            direct = np.mean([sum(w * tables[a][s].mean() for a, w in claim.weights.items()) for s in (0, 1)])
            iv = contrast_interval(tables, claim.weights, clusters=clusters, n_boot=500, seed=0)
        else:
            values = {"erank_ratio": erank, "kl": kl}[claim.metric]
            per_seed = [sum(w * values[a][s] for a, w in claim.weights.items()) for s in (0, 1)]
            direct = float(np.mean(per_seed))
            half = 12.7062 * np.std(per_seed, ddof=1) / math.sqrt(2)  # t(0.975, 1 df) from the printed table
            iv = t_interval(per_seed)
            assert (c["low"], c["high"]) == pytest.approx((direct - half, direct + half), rel=1e-4)
        assert c["estimate"] == pytest.approx(direct) and (c["low"], c["high"]) == pytest.approx((iv.low, iv.high))
        assert c["verdict"] == decide(iv, claim.rule, claim.margin) and c["seeds"] == 2
    assert got[CLAIMS[0].name]["verdict"] == AGREES  # fora right wherever lora is, on ~1/4 more items
    assert got[CLAIMS[0].name]["why"].endswith("40 clusters, seeds); parameters, fora vs lora: 0.50 trained")
    assert got[CLAIMS[0].name]["mcnemar_p"] == [mcnemar_exact(better[s], lora[s])["p"] for s in (0, 1)]
    assert got[CLAIMS[6].name]["verdict"] == AGREES and got[CLAIMS[6].name]["low"] == 0  # identical arms
    assert got[CLAIMS[4].name]["verdict"] == UNDECIDED  # additive by construction: interaction exactly 0
    assert got[CLAIMS[3].name]["verdict"] == AGREES and got[CLAIMS[7].name]["verdict"] == DISAGREES
    claims_md = (out / "claims.md").read_text()
    assert claims_md.count("\n") == 2 + len(CLAIMS) and "| m | FoRA ≥ DoRA |" in claims_md
    md = (out / "results.md").read_text()
    assert md.count("\n") == 2 + 1 + len(tables) + 1 and "| m | lora | 2 | 2 | 100 |" in md
    assert "| m | fora | 2 |" in md and "| m | fora ×0.25 | 1 | 2 | 50 | 0.500 | 0.100 |" in md
    step = json.loads((out / "stiefel_step.json").read_text())  # the scaled arm's own items.json, paired
    assert [c["method"] for c in step] == ["fora"]  # no scaled stiefel-lora run: no row
    quarter = step[0]["scales"][0]
    assert quarter["scale"] == 0.25 and quarter["seeds"] == 1 and quarter["eligible"] is None  # one seed
    assert quarter["kl"] == {"estimate": pytest.approx(0.01 - 0.5), "low": None, "high": None}
    assert quarter["accuracy"]["estimate"] == pytest.approx(-better[0].mean())
    assert quarter["accuracy"]["high"] < -0.02 and step[0]["chosen"] == 1.0 and step[0]["why"].startswith("undecided")
    assert "| m | fora ×0.25 | 1 | -0.490 |" in (out / "stiefel_step.md").read_text()


def test_report_on_runs_without_per_item_results(reproduce, tmp_path, monkeypatch):
    """A stored copy (only results.json, runs measured before items.json): accuracy claims undecided, saying why."""
    runs = [{"model": "m", "method": m, "seed": s, **_row(0.6 + 0.01 * s, 0.7, 0.2, 50)}
            for m in ("fora", "lora", "fg-lora", "stiefel-lora") for s in (0, 1)]
    out = tmp_path / "docs"
    out.mkdir()
    stored = {"config": {"steps": 200}, "base": {"m": {"acc_loglik": 0.5, "acc_norm": 0.5, "perplexity": 9.0}},
              "runs": runs}
    (out / "results.json").write_text(json.dumps(stored))
    report = reproduce.main(reproduce.parse_args(["--out", str(out), "--report"]))
    got = {c["claim"]: c for c in report["claims"]}
    first = got[CLAIMS[0].name]
    assert first["verdict"] == UNDECIDED and first["low"] is None and first["estimate"] == pytest.approx(0.0)
    assert first["why"] == "no per-item results (items.json) for fora, lora: point estimate only"
    assert got[CLAIMS[5].name]["why"] == "not run: random-k"
    assert got[CLAIMS[3].name]["low"] == pytest.approx(0.0) and got[CLAIMS[3].name]["verdict"] == UNDECIDED
    assert json.loads((out / "results.json").read_text())["config"] == {  # the runs' own config, and what they hold
        "steps": 200, "models": ["m"], "methods": ["fg-lora", "fora", "lora", "stiefel-lora"], "seeds": [0, 1],
        "stiefel_scales": [1.0]}
    with pytest.raises(SystemExit, match="no finished runs under"):
        reproduce.main(reproduce.parse_args(["--out", str(tmp_path / "empty"), "--report"]))


@pytest.mark.parametrize("rule, margin, bounds, verdict", [
    ("greater", 0, (0.01, 0.05), AGREES), ("greater", 0, (-0.05, -0.01), DISAGREES), ("greater", 0, (-0.01, 0.02), UNDECIDED),
    ("less", 0, (-0.05, -0.01), AGREES), ("less", 0, (0.01, 0.05), DISAGREES),
    ("not-below", 0.008, (-0.007, 0.03), AGREES), ("not-below", 0.008, (-0.05, -0.009), DISAGREES),
    ("not-below", 0.008, (-0.02, 0.01), UNDECIDED),
    ("within", 0.02, (-0.015, 0.019), AGREES), ("within", 0.02, (0.021, 0.05), DISAGREES),
    ("within", 0.02, (-0.01, 0.03), UNDECIDED)])
def test_decision_rule(rule, margin, bounds, verdict):
    from fora.evaluation.paired import Interval

    assert decide(Interval(sum(bounds) / 2, *bounds), rule, margin) == verdict
    assert decide(Interval(0.5, None, None), rule, margin) == UNDECIDED
    with pytest.raises(ValueError, match="unknown rule 'more'; choose one of greater, less, not-below, within"):
        decide(Interval(0, 0, 1), "more")


def test_an_accuracy_claim_on_one_seed_shows_its_interval_and_stays_undecided():
    from fora.evaluation.report import evaluate_claim

    y = np.zeros(200, dtype=int)
    better = y.copy()
    better[:100] = 1  # +50 points on every item-level resample
    rows = [{"model": "m", "method": a, "seed": 0, "acc_loglik": float(t.mean())}
            for a, t in (("fora", better), ("lora", y))]
    items = {("m", a, 0): {"test_sha256": "x", "clusters": list(range(200)), "acc_loglik": t.tolist()}
             for a, t in (("fora", better), ("lora", y))}
    c = evaluate_claim(CLAIMS[0], rows, items, "m", n_boot=200)
    assert c["low"] > 0.4 and c["verdict"] == UNDECIDED
    assert c["why"] == "one seed: the interval resamples items only, not seeds (paired bootstrap (200 draws, 200 clusters))"
    rows += [{**r, "seed": 1} for r in rows]
    items.update({(m, a, 1): v for (m, a, _), v in list(items.items())})
    assert evaluate_claim(CLAIMS[0], rows, items, "m", n_boot=200)["verdict"] == AGREES


def test_stiefel_scales_run_only_the_stiefel_arms_at_each_scale(reproduce, tmp_path, monkeypatch, capsys):
    trained, measured, seen = [], [], []
    real_train_arm = reproduce.train_arm
    monkeypatch.setattr(reproduce, "train_arm",
                        lambda m, meth, s, f, cfg, run, scale, lr=None: trained.append((meth, scale, run.name)))
    monkeypatch.setattr(reproduce, "base_row", lambda *a: {})
    monkeypatch.setattr(reproduce, "arm_row", lambda *a, **kw: measured.append(kw["stiefel_lr_scale"]))
    monkeypatch.setattr(reproduce, "write_report", lambda cfg: None)
    cfg = reproduce.parse_args(["--out", str(tmp_path), "--models", "m", "--methods", "fora", "lora",
                                "--stiefel-scales", "1", "0.25", "0.0625"])
    reproduce.main(cfg)
    assert trained == [("fora", 1.0, "fora-s0"), ("fora", 0.25, "fora-x0.25-s0"), ("fora", 0.0625, "fora-x0.0625-s0"),
                       ("lora", 1.0, "lora-s0")] and measured == [1.0, 0.25, 0.0625, 1.0]
    assert reproduce.arm_name("fora", 0.25) == "fora ×0.25" and reproduce.arm_name("fora") == "fora"
    monkeypatch.setattr("fora.training.run.main", seen.append)  # the real train_arm: the scale reaches TrainConfig
    real_train_arm("m", "fora", 0, tmp_path / "train.jsonl", cfg, tmp_path / "f", 0.25)
    real_train_arm("m", "fora", 0, tmp_path / "train.jsonl", cfg, tmp_path / "g")
    assert [c.stiefel_lr_scale for c in seen] == [0.25, 1.0]
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--stiefel-scales", "1", "0"])
    assert "--stiefel-scales must all be > 0, got [1.0, 0.0]" in capsys.readouterr().err


def test_stiefel_lr_scale_multiplies_cayley_adams_default_step():
    """Under the ablation the optimizer's A groups get lr * sqrt(r * d_in) * scale (the default step of
    fora.optim, scaled); FoRA's B's get the constant cap 1e-3 * scale."""
    model = nn.ModuleDict({"q": LoRALinear(nn.Linear(8, 8), rank=2, alpha=4, init="stiefel_a"),
                           "d": LoRALinear(nn.Linear(32, 8), rank=2, alpha=4, init="stiefel_a")})
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    for scale in (1.0, 0.25):
        cayley, _ = build_optimizers(model, lr=1e-3, stiefel_lr_scale=scale, stiefel_factor="A")
        assert sorted(g["lr"] for g in cayley.param_groups) == pytest.approx(
            sorted(1e-3 * math.sqrt(2 * d) * scale for d in (8, 32)))
    cayley, _ = build_optimizers(model, lr=1e-3, stiefel_lr=0.3, stiefel_lr_scale=0.25, stiefel_factor="A")
    assert [g["lr"] for g in cayley.param_groups] == pytest.approx([0.075])
    fora_model = nn.ModuleDict({"q": LoRALinear(nn.Linear(8, 8), rank=2, alpha=4, init="stiefel_b")})
    cayley, _ = build_optimizers(fora_model, lr=2e-4, stiefel_lr_scale=0.25)
    assert [g["lr"] for g in cayley.param_groups] == pytest.approx([2.5e-4])
    from fora.training.config import TrainConfig

    with pytest.raises(ValueError, match="--stiefel-lr-scale must be > 0, got 0"):
        TrainConfig(model="m", stiefel_lr_scale=0)


def test_param_ratio_text_names_the_final_budget_only_where_it_differs():
    from fora.evaluation.report import param_ratio_text

    fora, lora = {"trainable_params": 1_658_880}, {"trainable_params": 3_317_760, "budget_params": 3_317_760}
    adalora = {"trainable_params": 4_980_240, "budget_params": 3_555_168}
    assert param_ratio_text(fora, lora, "fora", "lora") == "; parameters, fora vs lora: 0.50 trained"
    assert param_ratio_text(fora, adalora, "fora", "adalora") == \
        "; parameters, fora vs adalora: 0.33 trained, 0.47 of the final budget"
    assert param_ratio_text({}, adalora, "fora", "adalora") == ""


def test_method_lr_runs_a_baseline_at_its_own_rate_as_a_separate_arm(reproduce, tmp_path, monkeypatch, capsys):
    trained, labels, seen = [], [], []
    real_train_arm = reproduce.train_arm
    monkeypatch.setattr(reproduce, "train_arm",
                        lambda m, meth, s, f, cfg, run, scale, lr=None: trained.append((meth, run.name, lr)))
    monkeypatch.setattr(reproduce, "base_row", lambda *a: {})
    monkeypatch.setattr(reproduce, "arm_row", lambda *a, **kw: labels.append(kw))
    monkeypatch.setattr(reproduce, "write_report", lambda cfg: None)
    cfg = reproduce.parse_args(["--out", str(tmp_path), "--models", "m", "--methods", "adalora", "lora",
                                "--method-lr", "adalora=2e-3"])
    assert cfg.method_lr == (("adalora", 0.002),)
    reproduce.main(cfg)
    assert trained == [("adalora", "adalora-lr0.002-s0", 0.002), ("lora", "lora-s0", None)]
    assert [(kw["arm"], kw.get("method_lr")) for kw in labels] == [("adalora lr 0.002", 0.002), ("lora", None)]
    monkeypatch.setattr("fora.training.run.main", seen.append)  # the real train_arm: the lr reaches TrainConfig
    real_train_arm("m", "adalora", 0, tmp_path / "train.jsonl", cfg, tmp_path / "a", 1.0, 0.002)
    real_train_arm("m", "lora", 0, tmp_path / "train.jsonl", cfg, tmp_path / "b")
    assert [c.lr for c in seen] == [0.002, 5e-4]
    # a finished training there is this arm's when nothing that shapes training differs, refused otherwise
    done = tmp_path / "b"
    done.mkdir(exist_ok=True)
    (done / "adapter_model.safetensors").write_bytes(b"")
    (done / "train_config.json").write_text(json.dumps(seen[1].to_dict()))
    real_train_arm("m", "lora", 0, tmp_path / "train.jsonl", cfg, done)
    with pytest.raises(SystemExit, match=r"/b holds another training: lr 0.0005 \(wanted: 0.002\)\. Move it away"):
        real_train_arm("m", "lora", 0, tmp_path / "train.jsonl", cfg, done, 1.0, 0.002)
    assert len(seen) == 2
    for bad, message in (("adalora=fast", "--method-lr takes METHOD=LR with METHOD one of fora, lora"),
                         ("adalora=0", "and LR > 0, got 'adalora=0'"), ("nope=1e-3", "got 'nope=1e-3'"),
                         ("fora=1e-3", "--method-lr fora=1e-3: fora trains a Stiefel factor; vary its Cayley step with "
                                       "--stiefel-scales and its AdamW rate with --select-lr instead")):
        with pytest.raises(SystemExit):
            reproduce.parse_args(["--method-lr", bad])
        assert message in capsys.readouterr().err


def test_an_arm_at_its_own_lr_is_reported_but_kept_out_of_the_claims(reproduce, tmp_path, monkeypatch):
    clusters = list(range(40))
    fora, adalora, fast = np.ones(40, dtype=int), np.zeros(40, dtype=int), np.ones(40, dtype=int)
    fast[:10] = 0  # adalora at its own lr: 0.75
    out = tmp_path / "out"
    for s in (0, 1):
        for method, y, params in (("fora", fora, 50), ("adalora", adalora, 150), ("adalora-lr0.002", fast, 150)):
            row = {**_row(float(y.mean()), 0.9, 0.1, params), "budget_params": params}
            if method.endswith("lr0.002"):
                row.update(arm="adalora lr 0.002", method_lr=0.002)
            _write_run(out / "m", method, s, row, {"test_sha256": "x", "clusters": clusters, "acc_loglik": y.tolist()})
        (out / "m" / f"adalora-lr0.002-s{s}" / "result.json").write_text(
            (out / "m" / f"adalora-lr0.002-s{s}" / "result.json").read_text().replace('"adalora-lr0.002"', '"adalora"'))
    (out / "m" / "base.json").write_text(json.dumps({"model": "m", "acc_loglik": 0.5, "acc_norm": 0.5, "perplexity": 9.0}))
    monkeypatch.setattr("fora.evaluation.store_report.plot_store", lambda *a: None)
    report = reproduce.main(reproduce.parse_args(["--out", str(out), "--report", "--n-boot", "200"]))
    claim = {c["claim"]: c for c in report["claims"]}[CLAIMS[2].name]
    assert claim["estimate"] == pytest.approx(1.0) and claim["seeds"] == 2  # fora - adalora at the shared lr only
    md = (out / "results.md").read_text()
    assert "| m | adalora | 2 |" in md and "| m | adalora lr 0.002 | 2 | 2 | 150 | 0.500 ± 0.000 | 0.750 ± 0.000 |" in md
