"""What did a training run's adapter do? Spectra, effective rank, Stiefel error, KL drift, plots.

    python scripts/analyze.py runs/smollm2-135m-fora                # held-out CPython docs text
    python scripts/analyze.py RUN_DIR --text notes.txt --window 256 --max-windows 32

Reads RUN_DIR/train_config.json (the base model), the adapter in RUN_DIR, selection.json and
metrics.jsonl; writes RUN_DIR/diagnostics.json, diagnostics.md and (with matplotlib)
fisher_profile.png, spectrum.png, val_loss.png; prints the per-layer table.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fora.training.argparser import ArgumentParser, command_name

log = logging.getLogger("analyze")
USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


@dataclass(frozen=True)
class AnalyzeConfig:
    run_dir: Path
    text: Path | None = None
    window: int = 256
    max_windows: int = 16
    plots: bool = True


def parse_args(argv: Sequence[str] | None = None) -> AnalyzeConfig:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a folder written by scripts/train.py")
    p.add_argument("--text", type=Path, default=None,
                   help="held-out text for the KL drift (default: the cloze task's test paragraphs)")
    p.add_argument("--window", type=int, default=256, help="tokens per KL window")
    p.add_argument("--max-windows", type=int, default=16, help="at most this many windows")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG files")
    a = p.parse_args(argv)
    if a.window < 2 or a.max_windows < 1:
        p.error("--window must be >= 2 and --max-windows >= 1")
    return AnalyzeConfig(a.run_dir, a.text, a.window, a.max_windows, not a.no_plots)


def write_plots(run_dir: Path, report: dict) -> list[Path]:
    """fisher_profile.png (when selection.json has scores), spectrum.png, val_loss.png."""
    from fora.evaluation.plots import plot_fisher_profile, plot_spectra, plot_val_curves, read_metrics

    out = []
    selection_path = run_dir / "selection.json"
    if selection_path.is_file():
        selection = json.loads(selection_path.read_text())
        if selection.get("scores"):
            out.append(plot_fisher_profile(selection, run_dir / "fisher_profile.png"))
    label = report.get("method") or run_dir.name
    out.append(plot_spectra({label: [m["singular_values"] for m in report["modules"]]}, run_dir / "spectrum.png",
                            ratios={label: report["summary"]["overall"]["effective_rank_ratio"]}))
    if (run_dir / "metrics.jsonl").is_file():
        rows = read_metrics(run_dir / "metrics.jsonl")
        if any("val_loss" in r for r in rows):
            out.append(plot_val_curves({label: rows}, run_dir / "val_loss.png"))
    return out


def main(cfg: AnalyzeConfig) -> dict:
    import torch

    from fora.evaluation.diagnostics import analyze_adapter, diagnostics_table, held_out_text
    from fora.formats.atomic import atomic_write_json, atomic_write_text
    from fora.formats.hub import resolve_checkpoint
    from fora.formats.loading import load_model, load_tokenizer
    from fora.formats.peft_io import load_adapter

    config_path = cfg.run_dir / "train_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; pass a folder written by scripts/train.py")
    train_cfg = json.loads(config_path.read_text())
    text = cfg.text.read_text() if cfg.text else held_out_text()
    folder = resolve_checkpoint(train_cfg["model"])
    model = load_model(folder, dtype=torch.float32, device=torch.device("cpu"))
    tok = load_tokenizer(folder)
    load_adapter(model, cfg.run_dir)
    report = analyze_adapter(model, tok, text, window=cfg.window, max_windows=cfg.max_windows)
    report.update(method=train_cfg.get("method"), model=train_cfg["model"],
                  text=str(cfg.text) if cfg.text else "cloze test paragraphs (pydoc_data)")
    atomic_write_json(cfg.run_dir / "diagnostics.json", report)
    table = diagnostics_table(report["modules"], report["summary"])
    drift = report["drift"]
    summary = (f"{table}\n\nKL(base ‖ tuned) = {drift['kl']:.5f} nats/token (max {drift['kl_max']:.4f}) "
               f"over {drift['tokens']} tokens\n")
    atomic_write_text(cfg.run_dir / "diagnostics.md", summary)
    print(summary)
    if cfg.plots:
        for path in write_plots(cfg.run_dir, report):
            log.info("wrote %s", path)
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    from fora.evaluation.cli import run_cli

    return run_cli(command_name("analyze.py"), parse_args, main, argv, errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(cli())
