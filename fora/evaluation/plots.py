"""Figures of a run or a comparison: Fisher profile, ΔW spectra, validation-loss curves.

matplotlib is the optional `[plot]` extra: it is imported inside each function (Agg backend, no
display needed), so `fora` imports without it. Every function writes one PNG and returns its path.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'fora[plot]' (or pip install matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a run's `metrics.jsonl`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_fisher_profile(selection: Mapping[str, Any], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Bar chart of the per-layer scores of `selection.json`, the selected layers highlighted.

    Args:
        selection: a `selection.json` record with `scores` (one per layer) and `selected`.
    """
    scores = selection.get("scores")
    if not scores:
        raise ValueError(f"selection of method {selection.get('method')!r} has no per-layer scores "
                         "(only fora, fg-lora and cka record them); nothing to plot")
    plt = _pyplot()
    chosen = set(selection.get("selected", []))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colors = ["tab:red" if i in chosen else "tab:gray" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("Fisher score (Eq. 2)" if selection.get("selector") != "cka" else "CKA")
    ax.set_title(title or f"{selection.get('method', '')}: selected K={len(chosen)} layers in red")
    return _save(fig, path)


def plot_spectra(spectra: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike[str], *,
                 ratios: Mapping[str, float] | None = None, title: str = "") -> Path:
    """Mean normalised singular-value spectrum of ΔW per method (left) and erank / r (right).

    Args:
        spectra: method -> one list of singular values per adapted module.
        ratios: method -> mean effective-rank ratio; computed from the spectra's row count if absent.
    """
    import math

    if not spectra:
        raise ValueError("no spectra to plot; pass {method: [[singular values of each module], ...]}")
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    colors, widths = {}, []
    for label, rows in spectra.items():
        normed = [[s / row[0] for s in row] if row and row[0] > 0 else [0.0] * len(row) for row in rows]
        width = max(len(r) for r in normed)
        mean = [sum(r[i] for r in normed if i < len(r)) / len(normed) for i in range(width)]
        (line,) = ax.plot(range(1, width + 1), mean, marker=".", label=label)
        colors[label] = line.get_color()
        widths.append(width)
    # DoRA's W' - W0 has min(d_out, d_in) singular values against a LoRA's r: zoom on the LoRA ranks
    cut = 2 * min(widths) if max(widths) > 4 * min(widths) else None
    if cut:
        ax.set_xlim(0, cut + 0.5)
    ax.set_xlabel("index i" + (f" (first {cut} shown)" if cut else ""))
    ax.set_ylabel("mean σ_i / σ_1 of ΔW")
    ax.legend(fontsize=8)
    labels = list(spectra)
    values = [ratios[m] if ratios else math.nan for m in labels]
    bx.barh(labels, values, color=[colors[m] for m in labels])
    for y, v in enumerate(values):
        if not math.isnan(v):
            # above 1 the update is not rank r (DoRA's W' - W0): the bar is cut at 1, the text says so
            text = f"{v:.2f}" if v <= 1 else f"{v:.2f} (> 1: not rank r)"
            bx.text(min(v, 0.82 if v <= 1 else 0.35) + 0.02, y, text, va="center", fontsize=8)
    bx.set_xlim(0, 1)
    bx.set_xlabel("effective rank / r")
    bx.invert_yaxis()
    fig.suptitle(title or "ΔW = s·B·A spectra")
    return _save(fig, path)


def plot_val_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike[str], *,
                    title: str = "validation loss") -> Path:
    """Validation loss against step for several runs on one figure.

    Args:
        runs: label -> metrics rows (`read_metrics`); rows without `val_loss` are skipped.
    """
    curves = {label: [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r] for label, rows in runs.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        raise ValueError("no run has val_loss rows; train with --val-size > 0")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
