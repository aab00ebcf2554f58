"""fora.evaluation.plots: each figure is written as a valid PNG; bad input names the problem."""
from __future__ import annotations

import json

import pytest

from fora.evaluation.plots import plot_fisher_profile, plot_spectra, plot_val_curves, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and b"IEND" in data[-12:]


def test_bad_input_messages(tmp_path):
    # checked before matplotlib is imported, so these hold without the extra too
    with pytest.raises(ValueError, match="has no per-layer scores"):
        plot_fisher_profile({"method": "lora", "scores": None, "selected": [0, 1]}, tmp_path / "f.png")
    with pytest.raises(ValueError, match="no spectra to plot"):
        plot_spectra({}, tmp_path / "s.png")
    with pytest.raises(ValueError, match="no run has val_loss rows"):
        plot_val_curves({"a": [{"step": 1, "loss": 2.0}]}, tmp_path / "v.png")


def test_figures_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in
                               [{"step": 0, "val_loss": 2.0}, {"step": 5, "loss": 1.9}, {"step": 10, "val_loss": 1.2}]))
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == [0, 5, 10]
    paths = [
        plot_fisher_profile({"method": "fora", "scores": [0.3, 2.0, 0.1, 1.0], "selected": [1, 3]},
                            tmp_path / "out" / "fisher_profile.png"),
        plot_spectra({"fora": [[2.0, 1.0, 0.5], [1.0, 1.0, 1.0]], "lora": [[3.0, 0.1]]}, tmp_path / "spectrum.png",
                     ratios={"fora": 0.9, "lora": 0.4}),
        plot_spectra({"zero": [[0.0, 0.0]]}, tmp_path / "zero.png"),  # B = 0 still plots
        plot_val_curves({"fora": rows, "lora": [{"step": 0, "val_loss": 2.1}, {"step": 10, "val_loss": 1.0}]},
                        tmp_path / "val_loss.png"),
    ]
    for path in paths:
        assert path.is_file() and _is_png(path)


def test_spectra_zoom_on_the_lora_ranks_and_label_a_ratio_above_one(tmp_path, monkeypatch):
    """DoRA's W' - W0 has min(d_out, d_in) singular values and erank / r above 1: the LoRA arms stay legible."""
    pytest.importorskip("matplotlib")
    from fora.evaluation import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    lora, dora = [[4.0, 2.0, 1.0, 0.5]], [[4.0 / (i + 1) for i in range(64)]]
    plots.plot_spectra({"lora": lora, "dora": dora}, tmp_path / "s.png", ratios={"lora": 0.7, "dora": 7.12})
    ax, bx = figs[0].axes
    assert ax.get_xlim() == (0, 8.5) and ax.get_xlabel() == "index i (first 8 shown)"
    assert [t.get_text() for t in bx.texts] == ["0.70", "7.12 (> 1: not rank r)"]
    assert bx.get_xlim() == (0, 1)
    plots.plot_spectra({"lora": lora, "fora": [[3.0, 1.0]]}, tmp_path / "t.png", ratios={"lora": 0.7, "fora": 0.5})
    assert figs[1].axes[0].get_xlabel() == "index i"  # comparable lengths: no zoom
