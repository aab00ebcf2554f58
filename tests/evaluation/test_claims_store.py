"""The stored claims runs (results/claims; the init-norm control's results/claims-mn): `reproduce.py
--report` rebuilds the committed tables from them.

results/claims holds each finished arm's small files (result.json, items.json, ...) in git; the tables
beside them (results.md, claims.md, stiefel_step.md) are what `--report` wrote. Rebuilding them from
the run files alone must give the same text: the tables are the runs' and the current code's, not
edited by hand nor left behind by a change of the statistics.
"""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fora.evaluation.doc_blocks import replace_blocks
from fora.evaluation.report import claims_brief
from script_loader import load_script

STORE = Path(__file__).resolve().parents[2] / "results" / "claims"
TABLES = ("results.md", "claims.md", "claims.json", "stiefel_step.md", "stiefel_step.json")
PAGES = ("README.md", "docs/reproduction.md")  # the pages holding copies of the tables
BLOCKS = ("claims.md", "results.md", "stiefel_step.md", "claims_brief smollm2-135m", "claims_brief gemma-3-270m")


def _copy_run_files(store: Path, out: Path) -> None:
    """The run files only: not the tables at the top, the generated data or any local weights left behind."""
    shutil.copytree(store, out, ignore=lambda folder, names: [
        n for n in names if (Path(folder) == store and n in (*TABLES, "results.json", "data"))
        or n == "checkpoint" or n.endswith(".safetensors")])


def test_report_rebuilds_the_stored_tables(tmp_path, monkeypatch):
    runs = sorted(STORE.glob("*/*-s*/result.json"))
    assert runs, f"no finished runs under {STORE}"
    out = tmp_path / "claims"
    _copy_run_files(STORE, out)
    # stale copies of the pages: --sync-docs must bring them back to the committed text
    root, pages = STORE.parents[1], []
    for rel in PAGES:
        stale, names = replace_blocks((root / rel).read_text(), {b: "stale" for b in BLOCKS})
        assert names, f"{rel} has none of the marked blocks"
        pages.append(tmp_path / rel.replace("/", "_"))
        pages[-1].write_text(stale)
    reproduce = load_script("reproduce")
    monkeypatch.setattr("fora.evaluation.store_report.plot_store", lambda *a: None)
    report = reproduce.main(reproduce.parse_args(["--out", str(out), "--report", "--sync-docs", *map(str, pages)]))
    assert len(report["runs"]) == len(runs)
    for name in TABLES:
        if (STORE / name).is_file() or (out / name).is_file():
            assert (out / name).read_text() == (STORE / name).read_text(), f"{name} is stale: rerun --report"
    for rel, page in zip(PAGES, pages):
        assert page.read_text() == (root / rel).read_text(), \
            f"{rel} differs from the stored tables: rerun --report --sync-docs {' '.join(PAGES)}"


def test_the_init_norm_control_store_rebuilds_its_tables(tmp_path, monkeypatch):
    """results/claims-mn (plain arms with unit-norm A rows) is its own store: the same rebuild, no pages."""
    store = STORE.parent / "claims-mn"
    runs = sorted(store.glob("*/*-s*/result.json"))
    if not runs:
        pytest.skip(f"no finished control runs under {store} yet")
    out = tmp_path / "claims-mn"
    _copy_run_files(store, out)
    reproduce = load_script("reproduce")
    monkeypatch.setattr("fora.evaluation.store_report.plot_store", lambda *a: None)
    report = reproduce.main(reproduce.parse_args(["--out", str(out), "--report"]))
    assert len(report["runs"]) == len(runs)
    assert all(json.loads(r.read_text())["method"] in ("lora", "fg-lora") for r in runs)
    assert all(json.loads((r.parent / "train_config.json").read_text())["match_init_norm"] for r in runs)
    for name in TABLES:
        if (store / name).is_file() or (out / name).is_file():
            assert (out / name).read_text() == (store / name).read_text(), f"claims-mn/{name} is stale: rerun --report"


def test_the_readme_and_reproduction_page_show_the_stored_tables():
    """README's head of the claims and docs/reproduction.md's copies are the stored tables, not older ones."""
    root = STORE.parents[1]
    readme, page = (root / "README.md").read_text(), (root / "docs" / "reproduction.md").read_text()
    claims = json.loads((STORE / "claims.json").read_text())
    assert claims_brief(claims, "smollm2-135m") in readme, "README's claims head is stale: rerun --report --sync-docs"
    for name in ("claims.md", "stiefel_step.md", "results.md"):
        assert (STORE / name).read_text().strip() in page, f"docs/reproduction.md's copy of {name} is stale: rerun --report --sync-docs"


def test_the_store_tracks_no_weights():
    """Only the runs' small files are in git: weights, checkpoints, adapter cards, generated data and markers stay
    ignored, at any depth
    (AdaLoRA's folded plain LoRA lives one folder further down, in lora/)."""
    try:
        tracked = subprocess.run(["git", "ls-files", "results/claims*"], cwd=STORE.parents[1], capture_output=True,
                                 text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    heavy = [f for f in tracked if f.endswith(".safetensors") or "/checkpoint/" in f or f.endswith("/README.md")]
    assert tracked and not heavy, f"weights or adapter cards tracked under results/claims: {heavy}; see .gitignore"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "results/claims/m/adalora-s0/lora/adapter_model.safetensors",
                              "results/claims/m/adalora-s0/lora/README.md"], cwd=STORE.parents[1], capture_output=True, text=True)
    assert len(ignored.stdout.split()) == 2, "the nested lora/ weights and card must be ignored"
    generated = ["results/claims/data/train.jsonl", "results/claims-mn/m/base.running"]  # the task's data, a marker
    kept = ["results/claims/results.md", "results/claims/m/fora-s0/items.json", "results/claims/m/spectrum.png"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *generated, *kept], cwd=STORE.parents[1],
                             capture_output=True, text=True).stdout.split()
    assert ignored == generated, f"ignored: {ignored}; the generated data and markers only, not the tables, items or plots"
