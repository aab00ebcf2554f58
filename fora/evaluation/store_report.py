"""The report of a store of runs (`scripts/reproduce.py --out OUT`, and `--report` alone): the tables,
plots and claims from every finished arm under OUT, whichever invocations trained them, written beside
the runs and, with --sync-docs, pasted into the pages' marked blocks. `cfg` is the script's
ReproduceConfig (out, task, seeds, n_boot, report, sync_docs, suite and the run settings).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fora.evaluation.arms import ALL_ARMS, run_dir, slug
from fora.evaluation.doc_blocks import sync_files
from fora.evaluation.lr_choice import LR_CHOICE
from fora.evaluation.plots import plot_fisher_profile, plot_spectra, plot_val_curves, read_metrics
from fora.evaluation.report import (arm_label, claims_brief, claims_markdown, claims_rows, finished_runs, load_items,
                                    results_table)
from fora.evaluation.step_choice import choose_stiefel_step, step_choice_markdown
from fora.evaluation.suite import suite_report
from fora.formats.atomic import atomic_write_json, atomic_write_text
from fora.training.commonsense import TASKS as TASKS_OF_SUITE, read_suite

log = logging.getLogger("reproduce")


def plot_store(cfg: Any, model: str) -> None:
    """OUT/<model>/val_loss.png, spectrum.png and fisher_profile.png from the first seed's finished cloze arms."""
    folder = cfg.out / slug(model)
    seed = cfg.seeds[0]
    runs = {m: folder / f"{m}-s{seed}" for m in ALL_ARMS if (folder / f"{m}-s{seed}" / "result.json").is_file()}
    if not runs:
        return
    plot_val_curves({m: read_metrics(r / "metrics.jsonl") for m, r in runs.items()}, folder / "val_loss.png",
                    title=f"{slug(model)}: validation loss on the cloze task (seed {seed})")
    spectra = {m: [d["singular_values"] for d in json.loads((r / "diagnostics.json").read_text())["modules"]]
               for m, r in runs.items()}
    ratios = {m: json.loads((r / "result.json").read_text())["erank_ratio"] for m, r in runs.items()}
    plot_spectra(spectra, folder / "spectrum.png", ratios=ratios, title=f"{slug(model)}: spectra of ΔW = s·B·A (DoRA: W′ − W0)")
    if "fora" in runs:
        plot_fisher_profile(json.loads((runs["fora"] / "selection.json").read_text()), folder / "fisher_profile.png",
                            title=f"{slug(model)}: Fisher scores (Eq. 2), FoRA's K layers in red")


def write_report(cfg: Any) -> dict:
    """Tables, plots and claims from every finished arm under OUT (earlier invocations included)."""
    return write_suite_report(cfg) if cfg.task == "commonsense" else write_cloze_report(cfg)


def write_cloze_report(cfg: Any) -> dict:
    """The cloze task's OUT/results.md and .json, claims.md and .json, stiefel_step.md when there are
    step-scale arms, and the plots; with --sync-docs pasted into the pages' blocks.

    Without run folders (a stored copy holding only results.json, such as results/reproduce200) the rows
    come from OUT/results.json; such runs have no per-item results, so their accuracy claims stay undecided.
    """
    rows, base, stored = finished_runs(cfg.out)
    if any("tasks" in r for r in rows):
        raise SystemExit(f"the runs under {cfg.out} are the commonsense suite's: add --task commonsense")
    config = report_config(cfg, rows, stored)
    for model in base:
        plot_store(cfg, model)
    items = {(r["model"], arm_label(r), r["seed"]):
             load_items(run_dir(cfg, r["model"], r["method"], r["seed"], r.get("stiefel_lr_scale", 1.0), r.get("method_lr")))
             for r in rows}
    claims = claims_rows(rows, items, n_boot=cfg.n_boot)  # default-step arms only
    steps = [choose_stiefel_step(rows, items, m, method=x, n_boot=cfg.n_boot) for m in base
             for x in ("fora", "stiefel-lora")
             if any(r["model"] == m and r["method"] == x and arm_label(r) != x for r in rows)]
    tables = {}  # the markdown tables, written beside the runs and, with --sync-docs, into the pages
    if steps:
        atomic_write_json(cfg.out / "stiefel_step.json", steps)
        tables["stiefel_step.md"] = step_choice_markdown(steps, slug)
    report = {"config": config, "base": base, "runs": rows}
    atomic_write_json(cfg.out / "results.json", report)
    tables["results.md"] = results_table(base, rows, ALL_ARMS, slug)  # per (model, arm), ± std over seeds
    atomic_write_json(cfg.out / "claims.json", claims)
    tables["claims.md"] = claims_markdown(claims, slug)
    for name, text in tables.items():
        atomic_write_text(cfg.out / name, text + "\n")
    print(tables["results.md"])
    if cfg.sync_docs:
        sync_docs(cfg, {**tables, **{f"claims_brief {slug(m)}": claims_brief(claims, m) for m in base}})
    return {**report, "claims": claims}


def report_config(cfg: Any, rows: list[dict], stored: dict | None) -> dict:
    """results.json's config: this invocation's settings (--report: the runs' own, as stored), and
    which models, methods, seeds and scales the tables hold, whichever invocations trained them."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
              if k not in ("sync_docs", "method_lr", "select_lr", "shared_lr", "select_steps")}  # output options; per-arm lr kept in each row
    config = stored if cfg.report and stored else config  # --report keeps the runs' own settings
    return {**config, "models": sorted({r["model"] for r in rows}), "methods": sorted({r["method"] for r in rows}),
            "seeds": sorted({r["seed"] for r in rows}),
            "stiefel_scales": sorted({r.get("stiefel_lr_scale", 1.0) for r in rows})}


def write_suite_report(cfg: Any) -> dict:
    """The suite's tables, contrasts and claims (`fora.evaluation.suite`) from every finished arm under
    OUT: OUT/commonsense.md and .json, OUT/results.json; with --sync-docs pasted into the pages'
    blocks <!-- commonsense.md -->, <!-- commonsense_brief MODEL --> and (OUT/MODEL/budget_choice.md)
    <!-- budget_choice MODEL -->."""
    rows, base, stored = finished_runs(cfg.out)
    items = {(r["model"], arm_label(r), r["seed"]): load_items(cfg.out / slug(r["model"]) / r["folder"]) for r in rows}
    base_items, choices = {}, {}
    for model in dict.fromkeys([*base, *(r["model"] for r in rows)]):
        folder = cfg.out / slug(model)
        if (folder / "base_items.json").is_file():
            base_items[model] = json.loads((folder / "base_items.json").read_text())
        if (folder / LR_CHOICE).is_file():
            choices[model] = json.loads((folder / LR_CHOICE).read_text())
    gold = None  # the test split's answers, where the suite is at hand (a stored copy may travel without it)
    if all((cfg.suite / t / "test.json").is_file() for t in TASKS_OF_SUITE):
        gold = {t: [r["answer"] for r in recs] for t, recs in read_suite(cfg.suite, "test").items()}
    suite = suite_report(rows, items, base_items, choices, n_boot=cfg.n_boot, slug=slug, gold=gold)
    report = {"config": report_config(cfg, rows, stored), "base": base, "runs": rows}
    atomic_write_json(cfg.out / "results.json", report)
    atomic_write_json(cfg.out / "commonsense.json", {"claims": suite["claims"], "lr_choices": choices})
    atomic_write_text(cfg.out / "commonsense.md", suite["markdown"] + "\n")
    print(suite["markdown"])
    if cfg.sync_docs:  # and each model's budget choice (--select-steps), where one was made
        budgets = {f"budget_choice {path.parent.name}": path.read_text()
                   for path in sorted(cfg.out.glob("*/budget_choice.md"))}
        sync_docs(cfg, {"commonsense.md": suite["markdown"], **budgets,
                        **{f"commonsense_brief {slug(m)}": text for m, text in suite["briefs"].items()}})
    return {**report, "claims": suite["claims"], "markdown": suite["markdown"]}


def sync_docs(cfg: Any, blocks: dict[str, str]) -> None:
    """The tables just written, pasted into the marked blocks of the pages named by --sync-docs."""
    for page, names in sync_files(cfg.sync_docs, blocks).items():
        log.info("%s: %s brought up to date", page, ", ".join(names))
