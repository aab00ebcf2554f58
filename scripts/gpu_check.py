#!/usr/bin/env python3
"""The whole GPU check in one command, for a short GPU slot: the `cuda`-marked tests and every GPU
row of the benchmarks, each row in its own subprocess under its own time limit (about 8 minutes
in all), written to one gpu_report.json + gpu_report.md (device, torch, CUDA, every figure).

Rows (CUDA sizes: LLaMA-3.2-1B shape, random weights, bf16, 16 x 256 tokens):
  tests      pytest -m cuda
  vs_peft    fora vs transformers + peft step time, peak memory, MFU; FoRA / FG-LoRA (bench_vs_peft)
  compile    fora-all with and without regional torch.compile (bench_vs_peft)
  train      FoRA (K = L/2, Cayley-Adam) vs LoRA on all layers (bench_train)
  cayley     a Cayley-Adam step vs an AdamW step, per B (and the ablation's A) and over all B's of the model (bench_cayley)
  fisher     Fisher scoring vs a naive full-gradient Fisher vs one LoRA step (bench_fisher)
  qfora      QFoRA (NF4 base) vs FoRA: memory and step time (bench_qfora)
  ddp        2-process smoke runs of scripts/train.py: DDP, and QFoRA on FSDP2 (2+ GPUs only)

A row that fails or runs out of time is recorded so and the others still run. Without CUDA the
script says so and runs `--dry-run`: the same rows and code paths on the CPU at tiny sizes
(left out there: torch.compile, the whole-model Cayley row, peak memory of the peft comparison,
and the DDP launch; the QFoRA-on-FSDP2 smoke run takes one gloo process), then exits 0.

    python scripts/gpu_check.py                          # on a CUDA machine: gpu_report.{json,md}
    python scripts/gpu_check.py --dry-run --out /tmp/gc  # the CPU rehearsal (CI runs it)
    python scripts/gpu_check.py --render gpu_report.json # docs/performance.md's GPU tables from a report
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path[:0] = [str(ROOT), str(SCRIPTS)]  # the bench scripts import each other by name

# row -> seconds on a GPU (the sum stays under 8 minutes with the start-up around it)
LIMITS = {"tests": 80, "vs_peft": 100, "compile": 70, "train": 40, "cayley": 50, "fisher": 40, "qfora": 40,
          "ddp": 50}
DRY_LIMIT = 120  # per row on the CPU rehearsal (a loaded CI core)
SIZES = {
    "gpu": dict(device="cuda", dtype="bfloat16", shape="llama-3.2-1b", batch=16, seq=256, supervised=32,
                steps=10, warmup=3),
    "tiny": dict(device="cpu", dtype="float32", shape="tiny", batch=2, seq=32, supervised=8, steps=2, warmup=1),
}


def row_tests(s: dict) -> dict:
    target = ["tests"] if s["device"] == "cuda" else ["tests/test_cayley_adam.py"]  # rehearsal: one file
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *target],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {}
    for part in summary.strip("= ").split(" in ")[0].split(", "):
        n, _, what = part.partition(" ")
        if n.isdigit():
            counts[what] = int(n)
    if proc.returncode not in (0, 5):  # 5: no test selected
        raise RuntimeError(f"pytest -m cuda failed ({summary}):\n{proc.stdout[-3000:]}")
    return {"summary": summary, "counts": counts}


def _vs_peft(s: dict, variants: tuple[str, ...], memory: bool) -> dict:
    import bench_vs_peft as b

    cfg = b.Config(shape=s["shape"], batch=s["batch"], seq=s["seq"], supervised=s["supervised"], device=s["device"],
                   dtype=s["dtype"], steps=s["steps"], warmup=s["warmup"], variants=variants)
    mem = b.memory_all(cfg) if memory else {}
    timing = b.time_round_robin(cfg)
    peak = next((t for key, t in b.PEAK_TFLOPS.items() if key in _device_name()), None)
    out = {}
    for v, r in timing.items():
        ms = statistics.median(r["ms"])
        out[v] = {"layers": r["layers"], "params": r["params"], "first_loss": r["first_loss"], "median_ms": ms,
                  "min_ms": min(r["ms"]), "tok_s": cfg.batch * cfg.seq / (ms / 1e3),
                  "peak_mib": mem[v]["peak_mib"] if v in mem else None,
                  "mfu": r["flops"] / (ms / 1e3) / (peak * 1e12) if peak else None}
    ratios = {}
    for a, b_ in (("fora-all", "peft-all"), ("fg-lora-k", "peft-k"), ("fora-k", "peft-k"), ("fora-k", "fg-lora-k"),
                  ("fora-all+compile", "fora-all")):
        if a in out and b_ in out:
            mems = out[a]["peak_mib"], out[b_]["peak_mib"]
            ratios[f"{a} / {b_}"] = {"step_time": out[a]["median_ms"] / out[b_]["median_ms"],
                                     "peak_memory": mems[0] / mems[1] if None not in mems else None}
    return {"variants": out, "ratios": ratios, "memory_method": next(iter(mem.values()))["method"] if mem else None}


def row_vs_peft(s: dict) -> dict:
    import bench_vs_peft as b

    return _vs_peft(s, b.VARIANTS, memory=s["device"] == "cuda")  # CPU RSS peaks of tiny models mean nothing


def row_compile(s: dict) -> dict:
    # step times only: a memory child per variant would compile the blocks twice more
    return _vs_peft(s, ("fora-all", "fora-all+compile") if s["device"] == "cuda" else ("fora-all",), memory=False)


def row_train(s: dict) -> dict:
    import bench_train as b

    cfg = b.TrainBenchConfig(shape=s["shape"], batch=s["batch"], seq=s["seq"], device=s["device"], dtype=s["dtype"],
                             steps=max(2, s["steps"] // 2), warmup=s["warmup"])
    return {"variants": {r["variant"]: r for r in b.main(cfg)}}


def row_cayley(s: dict) -> dict:
    import bench_cayley as b

    cuda = s["device"] == "cuda"
    cfg = b.BenchConfig(device=s["device"], dims=(2048, 4096) if cuda else (64,), ranks=(16, 32) if cuda else (8,),
                        batch=s["batch"], seq_len=s["seq"], warmup=10 if cuda else 1, repeats=20 if cuda else 2,
                        full_layer=cuda, base_dtype=s["dtype"])
    rows = [{"d": d, "r": r, **b.bench_one(cfg, d, r)} for d in cfg.dims for r in cfg.ranks]
    return {"per_B": rows, "model": b.bench_model(cfg) if cuda else None}


def row_fisher(s: dict) -> dict:
    import bench_fisher as b

    cuda = s["device"] == "cuda"
    cfg = b.BenchConfig(shape=s["shape"], batch=4 if cuda else s["batch"], seq=s["seq"], device=s["device"],
                        dtype=s["dtype"])
    res = b.run(cfg)
    for r in res.values():
        r.pop("scores")
    return {"modes": res, "batch": cfg.batch}


def row_qfora(s: dict) -> dict:
    import bench_fisher
    import bench_qfora as b

    cfg = bench_fisher.BenchConfig(shape=s["shape"], batch=s["batch"], seq=s["seq"], device=s["device"],
                                   dtype=s["dtype"])
    res = b.run(cfg, bench_fisher.SHAPES[s["shape"]]["num_hidden_layers"] // 2, max(1, s["steps"] // 3))
    for r in res.values():
        r.pop("times", None)
    return {"variants": res}


def _smoke(folder: Path, out: Path, nproc: int, device: str, extra: list[str]) -> dict:
    with socket.socket() as sock:  # a port no other run on this machine holds
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(port), str(SCRIPTS / "train.py"), "--model", str(folder), "--out", str(out),
           "--device", device, "--max-steps", "3", "--k", "2", "--rank", "4", "--data", str(folder / "smoke.json"),
           "--batch-size", "2", "--fisher-batches", "2", "--val-size", "8", "--log-every", "1", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]  # the worker's, not torchrun's
        raise RuntimeError(f"{' '.join(extra)} failed:\n" + "\n".join(errors[:20]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"processes": nproc, "seconds": time.perf_counter() - t0, "steps": len(losses), "last_loss": losses[-1],
            "adapter": (out / "adapter_model.safetensors").exists()}


def row_ddp(s: dict) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny_checkpoint

    cuda = s["device"] == "cuda"
    if cuda and torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 CUDA devices, found {torch.cuda.device_count()}"}
    nproc = 2 if cuda else 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_checkpoint(Path(tmp), "llama", num_hidden_layers=4)
        (folder / "smoke.json").write_text(json.dumps([{"instruction": f"Is {i} even?", "input": "",
                                                        "output": "yes" if i % 2 == 0 else "no"} for i in range(40)]))
        out = {"fsdp_nf4": _smoke(folder, Path(tmp) / "fsdp", nproc, s["device"],
                                  ["--distributed", "fsdp", "--quantize", "nf4"])}
        if cuda:  # the rehearsal launches once (DDP's launch is the same command; tests cover DDP)
            out["ddp"] = _smoke(folder, Path(tmp) / "ddp", nproc, s["device"], ["--distributed", "ddp"])
        return out


ROWS = {"tests": row_tests, "vs_peft": row_vs_peft, "compile": row_compile, "train": row_train,
        "cayley": row_cayley, "fisher": row_fisher, "qfora": row_qfora, "ddp": row_ddp}


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'unknown'})"


def run_row(name: str, sizes: str, limit: float) -> dict:
    """One row in a fresh subprocess (its own allocator and CUDA context), killed with everything it
    started (bench children, torchrun workers) after `limit` s, so that no straggler holds the GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--row", name, "--sizes", sizes, "--row-json", str(result)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=limit)
            status = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            status = "timeout"
        row = {"seconds": time.perf_counter() - t0, "limit_s": limit, "log": err[-2000:]}
        if status is None and (proc.returncode != 0 or not result.exists()):
            status = "failed"
        if status is not None:
            return {"status": status, **row}
        data = json.loads(result.read_text())
        return {"status": "skipped" if "skipped" in data else "ok", "result": data, **row}


def render(report: dict) -> str:
    """The report's markdown: a header line, then one table per row (docs/performance.md's GPU tables)."""
    lines = [f"# GPU check{' (dry run, CPU, tiny sizes)' if report['dry_run'] else ''}", "",
             f"{report['device']} · torch {report['torch']} · CUDA {report['cuda'] or '-'} · "
             f"{report['gpus']} GPU(s) · {report['date']} · {report['wall_s']:.0f} s", ""]
    for name, row in report["rows"].items():
        lines += [f"## {name}", ""]
        if row["status"] != "ok":
            lines += [f"{row['status']} after {row['seconds']:.0f} s (limit {row['limit_s']:.0f} s)"
                      + (f": {row['result']['skipped']}" if row["status"] == "skipped" else ""), ""]
            continue
        for title, table in _tables(name, row["result"]):
            if not table:
                continue
            cols = list(dict.fromkeys(k for r in table.values() for k in r))
            lines += [f"{title}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {key} | " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for key, r in table.items()]
            lines.append("")
    return "\n".join(lines)


def _cell(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _tables(name: str, res: dict) -> list[tuple[str, dict[str, dict]]]:
    """(title, {row label: {column: value}}) for one row's result."""
    if name == "tests":
        return [("pytest -m cuda", {"tests": res["counts"]})]
    if name in ("vs_peft", "compile"):
        return [(f"{name} (peak memory: {res['memory_method'] or 'not measured'})", res["variants"]),
                ("ratios", res["ratios"])]
    if name in ("train", "qfora"):
        return [(name, res["variants"])]
    if name == "cayley":
        per = {f"d={r['d']} r={r['r']}": {k: v for k, v in r.items() if k not in ("d", "r")} for r in res.get("per_B", res.get("per_A", []))}  # per_A: reports from before B
        return [("seconds per call, per B", per), ("all B's of LLaMA-3.2-1B, r=32", {"model": res["model"]}
                                                  if res["model"] else {})]
    if name == "fisher":
        return [(f"one batch of {res['batch']}", res["modes"])]
    return [(f"{key} smoke run", {key: r}) for key, r in res.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the CPU rehearsal at tiny sizes")
    ap.add_argument("--out", default=".", help="folder for gpu_report.json and gpu_report.md (default: here)")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="a subset of the rows")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for all rows together on a GPU")
    ap.add_argument("--render", metavar="REPORT_JSON", help="print the markdown tables of a report and exit")
    ap.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", choices=list(SIZES), help=argparse.SUPPRESS)
    ap.add_argument("--row-json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.render:
        print(render(json.loads(Path(a.render).read_text())))
        return 0
    if a.row:  # the child: one row, its figures to --row-json
        Path(a.row_json).write_text(json.dumps(ROWS[a.row](SIZES[a.sizes])))
        return 0
    dry = a.dry_run or not torch.cuda.is_available()
    if not a.dry_run and dry:
        print("no CUDA device here: nothing to measure; running the --dry-run on the CPU instead")
    t0, rows = time.perf_counter(), {}
    for name in a.rows:
        left = a.budget - (time.perf_counter() - t0)
        limit = DRY_LIMIT if dry else min(LIMITS[name], left)
        if limit < 5:
            rows[name] = {"status": "timeout", "seconds": 0.0, "limit_s": max(limit, 0.0), "log": "budget spent"}
            continue
        rows[name] = run_row(name, "tiny" if dry else "gpu", limit)
        print(f"{name}: {rows[name]['status']} in {rows[name]['seconds']:.1f} s", flush=True)
    report = {"dry_run": dry, "device": _device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpus": torch.cuda.device_count(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "wall_s": time.perf_counter() - t0, "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_report.md").write_text(render(report) + "\n")
    print(f"wrote {out / 'gpu_report.md'} and {out / 'gpu_report.json'}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
