"""fora.evaluation.diagnostics and scripts/analyze.py: spectra, effective rank, Lemma 1, KL drift.

Oracles: dense SVD of s·B·A, the closed-form effective rank of known spectra, a direct KL sum
over explicitly computed base logits (adapters removed by building a fresh model).
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from script_loader import load_script

from fora.evaluation.diagnostics import (adapter_diagnostics, adapters_disabled, analyze_adapter, delta_singular_values,
                                         diagnostics_table, output_drift, summarize, text_windows)
from fora.formats.loading import load_model, load_tokenizer
from fora.formats.peft_io import load_adapter
from fora.inject import inject_lora, lora_modules
from fora.stiefel import effective_rank
from fora.training.config import TrainConfig
from fora.training.run import main as train

L = 4

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def fora_run(tiny, tmp_path_factory) -> Path:
    """A FoRA adapter trained a few steps on a learnable toy task (char tokenizer)."""
    data = tmp_path_factory.mktemp("data") / "train.json"
    data.write_text(json.dumps([{"instruction": f"Is {i} even?", "input": "", "output": "yes" if i % 2 == 0 else "no"}
                                for i in range(40)]))
    out = tmp_path_factory.mktemp("runs") / "fora"
    train(TrainConfig(model=str(tiny), k=2, data=str(data), out=str(out), rank=4, device="cpu", val_size=8,
                      batch_size=4, max_steps=6, warmup_steps=0, lr=3e-2, fisher_batches=2, log_every=1,
                      eval_every=3, save_every=0, lora_dropout=0.0))
    return out


def test_singular_values_equal_dense_svd():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 40, generator=g), torch.randn(30, 5, generator=g)
    dense = torch.linalg.svdvals((0.7 * B @ A).double())
    torch.testing.assert_close(delta_singular_values(A, B, 0.7), dense[:5])
    with pytest.raises(ValueError, match=r"A must be \(r, d_in\)"):
        delta_singular_values(A, B.mT)


def test_effective_rank_known_spectra():
    for r in (1, 3, 8):
        assert effective_rank(torch.diag(torch.full((r,), 2.5))) == pytest.approx(r)
    u, v = torch.randn(20, 1, dtype=torch.float64), torch.randn(1, 12, dtype=torch.float64)
    assert effective_rank(u @ v) == pytest.approx(1.0)
    # rank one through the adapter path: B = u, A = v
    assert effective_rank(torch.diag(delta_singular_values(v.repeat(3, 1), u.repeat(1, 3) / 3))) == pytest.approx(1.0)
    # p = (1/2, 1/4, 1/4): exp(H) = exp(1.5 ln 2) = 2^1.5
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0, 1.0]))) == pytest.approx(2 ** 1.5)


def test_rows_equal_rank_for_equal_singular_values():
    lin = torch.nn.Linear(16, 12)
    from fora.lora import LoRALinear

    m = LoRALinear(lin, 4, 8.0, init="stiefel_a", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.lora_B.copy_(torch.linalg.qr(torch.randn(12, 4))[0] * 3.0)  # orthogonal columns, equal norms
    (row,) = [r for r in adapter_diagnostics(torch.nn.ModuleDict({"model": torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.ModuleDict({"q": m})])})}))]
    assert row["effective_rank"] == pytest.approx(4.0)
    assert row["effective_rank_ratio"] == pytest.approx(1.0)
    assert row["fro_norm"] == pytest.approx(float((m.scale * m.lora_B @ m.lora_A).detach().norm()), rel=1e-6)
    assert row["singular_values"] == pytest.approx([2.0 * 3.0] * 4, rel=1e-6)
    assert row["layer"] == 0 and row["stiefel_error"] < 1e-5


def test_lemma1_end_to_end_on_trained_fora(fora_run, tiny):
    model = load_adapter(load_model(tiny, dtype=torch.float32, device="cpu"), fora_run)
    rows = adapter_diagnostics(model)
    modules = lora_modules(model)
    assert len(rows) == len(modules) == 2 * 5  # K = 2 layers x 5 default targets
    assert sorted({r["layer"] for r in rows}) == json.loads((fora_run / "selection.json").read_text())["selected"]
    for row in rows:
        m = modules[row["module"]]
        assert row["stiefel_error"] < 1e-4  # B stayed on the manifold through Cayley-Adam
        sigma_a = torch.linalg.svdvals(m.lora_A.detach().double())   # the file's A is g·A
        assert float(sigma_a.max()) > 1e-4  # trained: the gate opened away from zero
        # Lemma 1: sigma(dW / s) = sigma(g A) when B^T B = I
        torch.testing.assert_close(torch.tensor(row["singular_values"], dtype=torch.float64) / m.scale, sigma_a, rtol=1e-4, atol=1e-6)
        dense = torch.linalg.svdvals(m.delta_weight().double())[: m.rank]
        torch.testing.assert_close(torch.tensor(row["singular_values"], dtype=torch.float64), dense, rtol=1e-4, atol=1e-7)
        assert row["effective_rank"] == pytest.approx(effective_rank(m.lora_A), rel=1e-4)


def test_summaries_combine_rows():
    rows = [{"layer": 0, "effective_rank_ratio": 0.5, "effective_rank": 2.0, "fro_norm": 3.0, "stiefel_error": 1e-7},
            {"layer": 0, "effective_rank_ratio": 1.0, "effective_rank": 4.0, "fro_norm": 4.0, "stiefel_error": 1e-6},
            {"layer": 2, "effective_rank_ratio": 0.25, "effective_rank": 1.0, "fro_norm": 12.0, "stiefel_error": 0.0}]
    s = summarize(rows)
    assert s["layers"]["0"] == {"modules": 2, "effective_rank_ratio": 0.75, "effective_rank": 3.0,
                                "fro_norm": 5.0, "stiefel_error": 1e-6}
    assert s["overall"]["fro_norm"] == pytest.approx(13.0)
    assert s["overall"]["effective_rank_ratio"] == pytest.approx(1.75 / 3)
    table = diagnostics_table(rows, s)
    assert "| 0 | 2 | 0.750 |" in table and "| all | 3 |" in table
    with pytest.raises(ValueError, match="no diagnostics rows"):
        summarize([])


def _direct_kl(tuned_model, base_model, ids) -> float:
    with torch.no_grad():
        p = F.log_softmax(base_model(ids).float(), -1)
        q = F.log_softmax(tuned_model(ids).float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_kl_zero_for_zero_adapter_positive_after_training(fora_run, tiny):
    base = load_model(tiny, dtype=torch.float32, device="cpu").eval()
    windows = text_windows(list(range(3, 60)), 16)
    assert [w.shape[1] for w in windows] == [16, 16, 16, 9]
    fresh = load_model(tiny, dtype=torch.float32, device="cpu")
    inject_lora(fresh, [0, 1], rank=4, seed=0)  # B = 0
    zero = output_drift(fresh, windows)
    assert zero["kl"] == 0.0 and zero["tokens"] == 57
    trained = load_adapter(load_model(tiny, dtype=torch.float32, device="cpu"), fora_run)
    drift = output_drift(trained, windows)
    assert drift["kl"] > 1e-6
    expected = sum(_direct_kl(trained, base, w) * w.shape[1] for w in windows) / 57
    assert drift["kl"] == pytest.approx(expected, rel=1e-4)
    # the adapters are back on after the base pass
    with torch.no_grad():
        assert not torch.allclose(trained(windows[0]), base(windows[0]), atol=1e-5)
        with adapters_disabled(trained):
            torch.testing.assert_close(trained(windows[0]), base(windows[0]))


def test_bad_text_inputs(fora_run, tiny):
    model = load_adapter(load_model(tiny, dtype=torch.float32, device="cpu"), fora_run)
    tok = load_tokenizer(tiny)
    with pytest.raises(ValueError, match="held-out text is empty"):
        analyze_adapter(model, tok, "  \n")
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        text_windows([5], 8)
    with pytest.raises(ValueError, match="window must be >= 2"):
        text_windows([5, 6, 7], 1)
    with pytest.raises(ValueError, match="no text windows"):
        output_drift(model, [])
    with pytest.raises(ValueError, match="carries no LoRA adapters"):
        adapter_diagnostics(load_model(tiny, dtype=torch.float32, device="cpu"))


def test_analyze_script_writes_report_and_plots(fora_run, tmp_path, monkeypatch, capsys):
    analyze = load_script("analyze")
    text = tmp_path / "held_out.txt"
    text.write_text("Is 41 even? no. Is 12 even? yes. " * 4)
    plots = importlib.util.find_spec("matplotlib") is not None
    argv = [str(fora_run), "--text", str(text), "--window", "32"] + ([] if plots else ["--no-plots"])
    assert analyze.cli(argv) == 0
    report = json.loads((fora_run / "diagnostics.json").read_text())
    assert report["drift"]["kl"] > 0 and report["method"] == "fora"
    assert math.isclose(report["summary"]["overall"]["effective_rank_ratio"],
                        sum(m["effective_rank_ratio"] for m in report["modules"]) / len(report["modules"]))
    assert "| all |" in capsys.readouterr().out
    if plots:
        for name in ("fisher_profile.png", "spectrum.png", "val_loss.png"):
            assert (fora_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert analyze.cli([str(fora_run), "--text", str(empty), "--no-plots"]) == 1
    assert "held-out text is empty" in capsys.readouterr().err
    assert analyze.cli([str(tmp_path)]) == 1
    assert "train_config.json not found" in capsys.readouterr().err


def test_dora_spectrum_is_that_of_its_update_not_of_sBA():
    from torch import nn

    from fora.baselines.dora import DoRALinear
    from fora.evaluation.diagnostics import module_diagnostics
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    w0 = base.weight.detach().double().clone()
    layer = DoRALinear(base, 2, 4.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
        layer.lora_magnitude_vector.mul_(torch.rand(8) + 0.5)
    v = w0 + layer.scale * layer.lora_B.double() @ layer.lora_A.double()
    update = (layer.lora_magnitude_vector.double()[:, None] * v / v.norm(dim=1, keepdim=True) - w0).detach()  # W' - W0
    row = module_diagnostics("model.layers.0.self_attn.q_proj", layer)
    torch.testing.assert_close(torch.tensor(row["singular_values"], dtype=torch.float64),
                               torch.linalg.svdvals(update), rtol=1e-6, atol=1e-9)
    assert len(row["singular_values"]) == 8  # the update is not of rank r = 2
    assert row["fro_norm"] == pytest.approx(float(update.norm()), rel=1e-6)
