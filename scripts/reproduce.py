#!/usr/bin/env python3
"""The paper's comparison at small scale: the 2x2 (lora, fg-lora, stiefel-lora, fora) + lora-half-rank
+ random-k, same data, steps and seed, on the offline checkpoints and the built-in cloze task.

    nice -n 5 python scripts/reproduce.py --out runs/reproduce                       # SmolLM2-135M
    nice -n 5 python scripts/reproduce.py --out runs/reproduce --models gemma-3-270m --steps 40

Per model: the base model's zero-shot accuracy and perplexity, then per arm and seed a training
run (`fora.training.run.main`) into OUT/<model>/<method>-s<seed>, evaluated on the held-out
cloze test split (loglik: acc and acc_norm; generate; the fill-in LM ranking of the two completed
sentences, `fora.evaluation.fill_in`), perplexity on held-out CPython-docs
paragraphs, effective-rank ratio, max |AAᵀ − I| and KL(base ‖ tuned) (`fora.evaluation.diagnostics`),
wall time, trainable parameters, final validation loss. Writes OUT/results.md, OUT/results.json
and per model val_loss.png, spectrum.png, fisher_profile.png. Resumable: finished arms
(result.json) are skipped, a killed run resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

log = logging.getLogger("reproduce")
ARMS = ("fora", "lora", "fg-lora", "stiefel-lora", "lora-half-rank", "random-k")


@dataclass(frozen=True)
class ReproduceConfig:
    out: Path = Path("runs/reproduce")
    models: tuple[str, ...] = ("smollm2-135m",)
    methods: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0,)
    steps: int = 200
    batch_size: int = 8
    cutoff_len: int = 128
    rank: int = 16
    lr: float = 5e-4
    warmup_steps: int = 8
    val_size: int = 32
    blanks: int = 4            # training records per sentence, each blanking another word (2532 in all)
    style: str = "word"        # the cloze answers: the words, or WinoGrande's option1/option2
    eval_limit: int = 185      # loglik records of the test split (185 = all of it)
    gen_limit: int = 48        # generate records (greedy decoding is the slow protocol)
    max_new_tokens: int = 12   # "the correct answer is option1" is 8 tokens with SmolLM2's tokenizer
    ppl_tokens: int = 4096     # held-out text tokens for perplexity
    kl_windows: int = 8        # 256-token windows for the KL drift
    base_first: bool = False   # measure the base model before training (else before the first evaluation)
    match_init_norm: bool = False  # plain-A arms: Kaiming rows scaled to unit norm, as a Stiefel A's (drift control)


def parse_args(argv: Sequence[str] | None = None) -> ReproduceConfig:
    d = ReproduceConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--models", nargs="+", default=list(d.models), help="presets, folders or .gguf files")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds))
    for name in ("steps", "batch_size", "cutoff_len", "rank", "warmup_steps", "val_size", "blanks", "eval_limit",
                 "gen_limit", "max_new_tokens", "ppl_tokens", "kl_windows"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--style", choices=("word", "option"), default=d.style,
                   help="cloze answers: the two words, or WinoGrande's option1/option2 labels")
    p.add_argument("--base-first", action="store_true",
                   help="measure the base model before training (for a second invocation running in parallel)")
    p.add_argument("--match-init-norm", action="store_true",
                   help="plain-A arms start with unit-norm rows of A, as the Stiefel arms do (train.py's "
                        "--match-init-norm): the control for the Stiefel arms' larger output drift")
    a = vars(p.parse_args(argv))
    for name, value in a.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1 and name not in ("gen_limit", "warmup_steps", "val_size"):
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return ReproduceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()})


def slug(model: str) -> str:
    name = Path(model.rstrip("/")).name
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def write_data(out: Path, blanks: int = 1, style: str = "word") -> tuple[Path, list[dict]]:
    """The cloze task (fixed splits) into OUT/data; returns the train file and the test records."""
    from fora.training.cloze import cloze_task
    from fora.training.data import write_jsonl

    train = write_jsonl(cloze_task("train", style=style, blanks=blanks), out / "data" / "train.jsonl")
    test = cloze_task("test", style=style)
    write_jsonl(test, out / "data" / "test.jsonl")
    return train, test


def measure(model, tok, test: list[dict], cfg: ReproduceConfig) -> dict:
    """Accuracy by both protocols on the test split and perplexity on held-out paragraphs."""
    from fora.evaluation.accuracy import evaluate_generate, evaluate_loglik
    from fora.evaluation.diagnostics import held_out_text
    from fora.evaluation.fill_in import fill_in_accuracy
    from fora.evaluation.perplexity import perplexity

    model.eval()
    t0 = time.perf_counter()
    ll = evaluate_loglik(model, tok, test[:cfg.eval_limit], batch_size=8, progress=False)
    row = {"acc_loglik": ll["accuracy"], "acc_norm": ll["acc_norm"], "n_loglik": ll["n"],
           "acc_fill_in": fill_in_accuracy(model, tok, test[:cfg.eval_limit])["accuracy"]}
    if cfg.gen_limit:
        gen = evaluate_generate(model, tok, test[:cfg.gen_limit], batch_size=8,
                                max_new_tokens=cfg.max_new_tokens, progress=False)
        row.update(acc_generate=gen["accuracy"], n_generate=gen["n"],
                   answered=sum(p["prediction"] is not None for p in gen["predictions"]) / gen["n"],
                   sample_generation=gen["predictions"][0]["text"])
    ids = tok.encode(held_out_text(), bos=True)[:cfg.ppl_tokens]
    row["perplexity"] = perplexity(model, ids, window=256, stride=192)["perplexity"]
    row["eval_seconds"] = time.perf_counter() - t0
    return row


def load(model_name: str):
    import torch

    from fora.formats.hub import resolve_checkpoint
    from fora.formats.loading import load_model, load_tokenizer

    folder = resolve_checkpoint(model_name)
    return load_model(folder, dtype=torch.float32, device=torch.device("cpu")), load_tokenizer(folder)


def base_row(model_name: str, test: list[dict], cfg: ReproduceConfig, path: Path) -> dict:
    """The base model's zero-shot row, cached in `path` for these evaluation sizes.

    Another process of the same reproduction computing it (a `.running` marker younger than an
    hour) is waited for rather than duplicated.
    """
    from fora.formats.atomic import atomic_write_json, atomic_write_text

    sizes = {"n_loglik": min(cfg.eval_limit, len(test)), "n_generate": min(cfg.gen_limit, len(test)) or None}
    marker = path.with_suffix(".running")
    while True:
        if path.is_file():
            row = json.loads(path.read_text())
            if all(row.get(k) == v for k, v in sizes.items()):
                return row
        if not (marker.is_file() and time.time() - marker.stat().st_mtime < 3600):
            break
        time.sleep(10)
    atomic_write_text(marker, str(time.time()))
    model, tok = load(model_name)
    row = {"model": model_name, "method": "base (zero-shot)", "seed": None, **measure(model, tok, test, cfg)}
    atomic_write_json(path, row)
    marker.unlink(missing_ok=True)
    log.info("%s zero-shot: %s", model_name, {k: v for k, v in row.items() if k != "sample_generation"})
    return row


def train_arm(model_name: str, method: str, seed: int, train_file: Path, cfg: ReproduceConfig, run: Path) -> None:
    """Train one arm into `run` unless its adapter exists; resume from a checkpoint when there is one."""
    from fora.formats.peft_io import ADAPTER_WEIGHTS
    from fora.training.config import TrainConfig
    from fora.training.run import main

    if (run / ADAPTER_WEIGHTS).is_file():
        return
    resume = str(run) if (run / "checkpoint").is_dir() else None
    if resume is None and run.exists():
        shutil.rmtree(run)  # an attempt killed before its first checkpoint: nothing to keep
    main(TrainConfig(model=model_name, method=method, data=str(train_file), out=str(run), seed=seed,
                     rank=cfg.rank, lr=cfg.lr, max_steps=cfg.steps, batch_size=cfg.batch_size,
                     cutoff_len=cfg.cutoff_len, warmup_steps=cfg.warmup_steps, val_size=cfg.val_size,
                     fisher_batches=4, eval_every=max(1, cfg.steps // 4), log_every=10,
                     save_every=max(1, cfg.steps // 4), match_init_norm=cfg.match_init_norm, resume=resume))


def arm_row(model_name: str, method: str, seed: int, test: list[dict], cfg: ReproduceConfig, run: Path,
            base: dict) -> dict:
    from safetensors import safe_open

    from fora.evaluation.diagnostics import analyze_adapter, held_out_text
    from fora.evaluation.plots import read_metrics
    from fora.formats.atomic import atomic_write_json
    from fora.formats.peft_io import ADAPTER_WEIGHTS, load_adapter

    model, tok = load(model_name)
    load_adapter(model, run)
    row = {"model": model_name, "method": method, "seed": seed, **measure(model, tok, test, cfg)}
    diag = analyze_adapter(model, tok, held_out_text(), window=256, max_windows=cfg.kl_windows)
    atomic_write_json(run / "diagnostics.json", diag)
    with safe_open(run / ADAPTER_WEIGHTS, "pt") as f:
        params = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    metrics = read_metrics(run / "metrics.jsonl")
    vals = [r for r in metrics if "val_loss" in r]
    selection = json.loads((run / "selection.json").read_text())
    row.update(layers=selection["selected"], trainable_params=params, val_loss_start=vals[0]["val_loss"],
               val_loss=vals[-1]["val_loss"], train_seconds=metrics[-1]["seconds"],
               erank_ratio=diag["summary"]["overall"]["effective_rank_ratio"],
               stiefel_error=diag["summary"]["overall"]["stiefel_error"], kl=diag["drift"]["kl"],
               perplexity_base=base["perplexity"])
    atomic_write_json(run / "result.json", row)
    log.info("%s %s seed %d: %s", model_name, method, seed,
             {k: v for k, v in row.items() if k not in ("sample_generation", "layers")})
    return row


def _cell(rows: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return format(mean, fmt) + (f" ± {format(statistics.stdev(values), fmt)}" if len(values) > 1 else "")


def table(base: dict[str, dict], rows: list[dict]) -> str:
    """Markdown: one line per (model, method), seeds averaged (± sample std over seeds)."""
    head = ("| model | method | seeds | layers | trainable params | val loss | acc (loglik) | acc_norm "
            "| acc (generate) | acc (fill-in LM) | ppl before → after | erank / r | max ‖AAᵀ−I‖ | KL(base‖tuned) | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model, b in base.items():
        lines.append(f"| {slug(model)} | base (zero-shot) | - | - | 0 | - | {b['acc_loglik']:.3f} | "
                     f"{b['acc_norm']:.3f} | {_cell([b], 'acc_generate', '.3f')} | {_cell([b], 'acc_fill_in', '.3f')} | "
                     f"{b['perplexity']:.2f} | "
                     "- | - | 0 | - |")
        for method in ARMS:
            group = [r for r in rows if r["model"] == model and r["method"] == method]
            if not group:
                continue
            lines.append(
                f"| {slug(model)} | {method} | {len(group)} | {len(group[0]['layers'])} | "
                f"{group[0]['trainable_params']:,} | {_cell(group, 'val_loss', '.3f')} | "
                f"{_cell(group, 'acc_loglik', '.3f')} | {_cell(group, 'acc_norm', '.3f')} | "
                f"{_cell(group, 'acc_generate', '.3f')} | {_cell(group, 'acc_fill_in', '.3f')} | "
                f"{b['perplexity']:.2f} → {_cell(group, 'perplexity', '.2f')} | "
                f"{_cell(group, 'erank_ratio', '.3f')} | {max(r['stiefel_error'] for r in group):.1e} | "
                f"{_cell(group, 'kl', '.4f')} | {_cell(group, 'train_seconds', '.0f')} |")
    return "\n".join(lines)


def plots(cfg: ReproduceConfig, model: str, rows: list[dict]) -> None:
    from fora.evaluation.plots import plot_fisher_profile, plot_spectra, plot_val_curves, read_metrics

    folder = cfg.out / slug(model)
    seed = cfg.seeds[0]
    runs = {m: folder / f"{m}-s{seed}" for m in ARMS if (folder / f"{m}-s{seed}" / "result.json").is_file()}
    if not runs:
        return
    plot_val_curves({m: read_metrics(r / "metrics.jsonl") for m, r in runs.items()}, folder / "val_loss.png",
                    title=f"{slug(model)}: validation loss on the cloze task (seed {seed})")
    spectra = {m: [d["singular_values"] for d in json.loads((r / "diagnostics.json").read_text())["modules"]]
               for m, r in runs.items()}
    ratios = {m: json.loads((r / "result.json").read_text())["erank_ratio"] for m, r in runs.items()}
    plot_spectra(spectra, folder / "spectrum.png", ratios=ratios, title=f"{slug(model)}: ΔW = s·B·A spectra")
    if "fora" in runs:
        plot_fisher_profile(json.loads((runs["fora"] / "selection.json").read_text()), folder / "fisher_profile.png",
                            title=f"{slug(model)}: Fisher scores (Eq. 2), FoRA's K layers in red")


def main(cfg: ReproduceConfig) -> dict:
    from fora.formats.atomic import atomic_write_json, atomic_write_text

    t0 = time.perf_counter()
    train_file, test = write_data(cfg.out, cfg.blanks, cfg.style)
    base: dict[str, dict] = {}
    for model in cfg.models:
        folder = cfg.out / slug(model)
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.base_first:
            base[model] = base_row(model, test, cfg, folder / "base.json")
        for seed in cfg.seeds:
            for method in cfg.methods:
                run = folder / f"{method}-s{seed}"
                if (run / "result.json").is_file():
                    log.info("%s: done, skipped", run)
                    continue
                log.info("%s: training (%.0f s into this invocation)", run, time.perf_counter() - t0)
                train_arm(model, method, seed, train_file, cfg, run)
                if model not in base:  # after training: a parallel invocation may have measured it meanwhile
                    base[model] = base_row(model, test, cfg, folder / "base.json")
                arm_row(model, method, seed, test, cfg, run, base[model])
    # the table covers every finished arm under OUT (earlier invocations with other models included)
    rows = [json.loads(p.read_text()) for p in sorted(cfg.out.glob("*/*-s*/result.json"))]
    base = {json.loads(p.read_text())["model"]: json.loads(p.read_text()) for p in sorted(cfg.out.glob("*/base.json"))}
    for model in base:
        plots(cfg, model, rows)
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
              "base": base, "runs": rows}
    atomic_write_json(cfg.out / "results.json", report)
    md = table(base, rows)
    atomic_write_text(cfg.out / "results.md", md + "\n")
    print(md)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    main(parse_args())
