"""scripts/gpu_check.py rehearsed on the CPU (--dry-run): the report, its tables, the time limits.

Oracles: NF4's storage formula (4 bits + 8 bits / 64 + 32 bits / (64 · 256) per weight) for the
QFoRA row's bytes per parameter; torch's own version strings; the JSON the markdown is rendered
from; in the full rehearsal (slow), fora's and peft's first losses on the same weights.
"""
from __future__ import annotations

import json

import pytest
import torch
from script_loader import load_script

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="rehearses the machine without CUDA")


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


@pytest.fixture(scope="module")
def dry(gpu_check, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert gpu_check.main(["--dry-run", "--rows", "tests", "cayley", "qfora", "--out", str(out)]) == 0
    return out, json.loads((out / "gpu_report.json").read_text())


def test_dry_run_writes_a_report_with_the_versions_and_every_figure(dry):
    _, report = dry
    assert report["dry_run"] is True
    assert (report["torch"], report["cuda"], report["gpus"]) == (torch.__version__, torch.version.cuda, 0)
    assert list(report["rows"]) == ["tests", "cayley", "qfora"]
    assert all(r["status"] == "ok" for r in report["rows"].values()), report["rows"]
    assert report["rows"]["tests"]["result"]["counts"]["deselected"] > 0  # -m cuda selected
    (a,) = report["rows"]["cayley"]["result"]["per_B"]
    assert (a["d"], a["r"]) == (64, 8) and all(a[k] > 0 for k in ("cayley", "cayley_cf", "cayley_a", "adamw", "adapter_fb"))
    q = report["rows"]["qfora"]["result"]["variants"]
    assert q["fora"]["bytes_per_linear_param"] == 4.0  # float32 base
    assert abs(q["qfora"]["bytes_per_linear_param"] - NF4_BYTES) < 2e-3
    assert q["qfora"]["peak_bytes"] > 0 and q["qfora"]["step_seconds"] > 0


def test_the_markdown_tables_render_the_json(dry, gpu_check, capsys):
    out, report = dry
    md = (out / "gpu_report.md").read_text()
    assert gpu_check.main(["--render", str(out / "gpu_report.json")]) == 0
    assert capsys.readouterr().out == md
    assert f"torch {torch.__version__}" in md and "dry run" in md
    q = report["rows"]["qfora"]["result"]["variants"]["qfora"]
    row = next(line for line in md.splitlines() if line.startswith("| qfora |"))
    header = next(line for line in md.splitlines() if line.startswith("| | ") and "bytes_per_linear_param" in line)
    cells = dict(zip(header.strip("|").split(" | ")[1:], row.strip("|").split(" | ")[1:]))
    assert float(cells["bytes_per_linear_param"]) == pytest.approx(q["bytes_per_linear_param"], rel=1e-3)
    assert md.count("\n## ") == len(report["rows"]) and md.count("## tests\n") == 1  # one section per row


@no_cuda
def test_without_cuda_it_says_so_and_rehearses(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--rows", "cayley", "--out", str(tmp_path)]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu_report.json").read_text())["dry_run"] is True


def test_a_row_over_its_limit_is_recorded_and_a_bad_row_name_refused(gpu_check, capsys):
    row = gpu_check.run_row("cayley", "tiny", 0.2)
    assert row["status"] == "timeout" and row["limit_s"] == 0.2
    with pytest.raises(SystemExit):
        gpu_check.main(["--rows", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.heavy  # minutes on 2 cores: deselected by default, `pytest -m heavy` runs it
def test_the_full_rehearsal_runs_every_row(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_report.json").read_text())["rows"]
    assert list(rows) == list(gpu_check.ROWS)
    assert all(r["status"] == "ok" for r in rows.values()), {k: r["status"] for k, r in rows.items()}
    v = rows["vs_peft"]["result"]["variants"]
    assert v["fora-all"]["first_loss"] == pytest.approx(v["peft-all"]["first_loss"], rel=1e-4)  # same weights
    smoke = rows["ddp"]["result"]["fsdp_nf4"]
    assert smoke["steps"] == 3 and smoke["adapter"]
