#!/usr/bin/env python3
"""The paper's comparison at small scale: the 2x2 (lora, fg-lora, stiefel-lora, fora) + lora-half-rank
+ random-k, same data, steps and seed, on the offline checkpoints and the built-in cloze task; the
Table 1 baselines dora and adalora on request (--methods ... dora adalora).

    nice -n 5 python scripts/reproduce.py --out runs/reproduce                       # SmolLM2-135M
    nice -n 5 python scripts/reproduce.py --out runs/reproduce --models gemma-3-270m --steps 40

Per model: the base model's zero-shot accuracy and perplexity, then per arm and seed a training
run (`fora.training.run.main`) into OUT/<model>/<method>-s<seed>, evaluated (`fora.evaluation.measure`) on the held-out
cloze test split (loglik: acc and acc_norm; generate; the fill-in LM ranking of the two completed
sentences, `fora.evaluation.fill_in`), perplexity on held-out CPython-docs
paragraphs, effective-rank ratio, max |AAᵀ − I| and KL(base ‖ tuned) (`fora.evaluation.diagnostics`),
wall time, trainable parameters (trained, and `budget_params` kept at the end: AdaLoRA's final
budget of triplets, the trained count for the other methods), final validation loss. Writes
OUT/results.md, OUT/results.json,
OUT/claims.md (each claim of the paper with its 95 % interval and verdict, `fora.evaluation.report`),
OUT/stiefel_step.md when there are step-scale runs (`fora.evaluation.step_choice`)
and per model val_loss.png, spectrum.png, fisher_profile.png. Every measured run keeps its per-item
correctness in items.json, for paired statistics (the report: `fora.evaluation.store_report`).
Resumable: finished arms (result.json) are skipped, a killed run resumes from its last checkpoint.

    --test-split all-blanks     every eligible blank of each test sentence (1,242 records, clustered)
    --stiefel-scales 1 0.25 0.0625   Stiefel arms also at 1/4 and 1/16 of Cayley-Adam's default step
    --report                    rebuild the tables, plots and claims from finished runs, no training
    --sync-docs README.md docs/reproduction.md   and paste them into those pages' marked blocks
    --method-lr adalora=2e-3    a baseline at its own learning rate: its own arm ("adalora lr 0.002"), not in the claims

The commonsense suite (--task commonsense; docs/reproduction.md#the-commonsense-suite): every arm
trains on SUITE/commonsense_train.json (`scripts/make_task.py --task commonsense`) at the paper's
settings (r 32, alpha 64, cutoff 256, 200 steps x 8, --dtype auto: bfloat16 on CUDA, float32 on the CPU, K = L/2, targets q k v up down,
N = 128 Fisher batches), is measured on SUITE/<task>/test.json per task by loglik and, on the first
--gen-limit records of each task, by generate (`fora.evaluation.measure.measure_tasks`), and the
report (`fora.evaluation.suite`) gives per-task tables beside the paper's Table B, the 2x2
contrasts and the claims. `fora-a` and `stiefel-lora-a` are the A-side ablation's arms
(--stiefel-factor A). --select-lr LR... trains each --methods arm at every LR and keeps the one with
the best validation accuracy (SUITE/<task>/val.json) among those at which its training did not
diverge, in OUT/<model>/lr_choice.json, which later runs of that arm use (--shared-lr: one LR for
all of them and every arm without its own);
--select-steps STEPS... then chooses the budget at that rate the same way (the smallest that takes
every arm above the base model's zero-shot level, OUT/<model>/budget_choice.json). Arms of one seed
that score layers share one Fisher selection (train.py --selection-from).

    nice -n 10 python scripts/reproduce.py --task commonsense --out results/commonsense --models gemma-3-270m \
        --methods lora fora --select-lr 2e-4 1e-3 3e-3 --shared-lr
    nice -n 10 python scripts/reproduce.py --task commonsense --out results/commonsense --models gemma-3-270m \
        --methods lora fora --select-steps 200 600 1200
    nice -n 10 python scripts/reproduce.py --task commonsense --out results/commonsense --models gemma-3-270m \
        --methods fora lora fg-lora stiefel-lora --seeds 0 1 2
    python scripts/reproduce.py --task commonsense --out results/commonsense --report --sync-docs README.md docs/reproduction.md
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fora.defaults import FORA  # noqa: E402
from fora.training.argparser import ArgumentParser  # noqa: E402
from fora.evaluation.measure import EvalSizes, arm_row, base_row  # noqa: E402
from fora.evaluation.arms import (ALL_ARMS, ARMS, arm_config, arm_name, refuse_other_training, run_dir,  # noqa: E402
                                  slug, train_arm)
from fora.evaluation.store_report import write_report  # noqa: E402
from fora.evaluation.lr_choice import LR_CHOICE, chosen_lr  # noqa: E402
from fora.evaluation.suite import VARIANTS  # noqa: E402

log = logging.getLogger("reproduce")
TEST_SPLITS = ("one-blank", "all-blanks")
TASKS = ("cloze", "commonsense")
# --task commonsense's defaults where they differ from the cloze task's (the paper's settings at small scale)
SUITE_DEFAULTS = {"rank": FORA.rank, "cutoff_len": FORA.cutoff_len, "lr": FORA.lr, "dtype": "auto",
                  "fisher_batches": FORA.fisher_batches, "gen_limit": 25}


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
    eval_limit: int | None = None  # loglik records of the test split (None: all, 185 / 1,242 by --test-split)
    gen_limit: int = 48        # generate records (greedy decoding is the slow protocol)
    max_new_tokens: int = 12   # "the correct answer is option1" is 8 tokens with SmolLM2's tokenizer
    ppl_tokens: int = 4096     # held-out text tokens for perplexity
    kl_windows: int = 8        # 256-token windows for the KL drift
    base_first: bool = False   # measure the base model before training (else before the first evaluation)
    match_init_norm: bool = False  # plain-A arms: Kaiming rows scaled to unit norm, as a Stiefel A's (drift control)
    test_split: str = "one-blank"  # or "all-blanks": fora.training.cloze.cloze_all_blanks
    stiefel_scales: tuple[float, ...] = (1.0,)  # Stiefel arms at these multiples of Cayley-Adam's default step
    method_lr: tuple[tuple[str, float], ...] = ()  # (method, lr): that method's arm at its own lr, a separate arm
    report: bool = False       # rebuild tables, plots and claims from finished runs only
    n_boot: int = 4000         # bootstrap draws of the claims' intervals
    sync_docs: tuple[Path, ...] = ()  # pages whose marked blocks get the new tables (fora.evaluation.doc_blocks)
    task: str = "cloze"        # or "commonsense": the suite in `suite` (SUITE_DEFAULTS apply from the command line)
    suite: Path = Path("data/commonsense")
    dtype: str = "auto"        # training dtype (train.py --dtype); measurement is float32 either way
    fisher_batches: int = 4    # calibration batches N of Fisher's Eq. 2 (the authors': 128)
    select_lr: tuple[float, ...] = ()  # train each --methods arm at these lrs, keep the best on validation
    shared_lr: bool = False  # with select_lr: one rate for all --methods arms, the best mean over them
    select_steps: tuple[int, ...] = ()  # train each --methods arm at these step counts, choose the budget on validation


def parse_args(argv: Sequence[str] | None = None) -> ReproduceConfig:
    d = ReproduceConfig()
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--models", nargs="+", default=list(d.models), help="presets, folders or .gguf files")
    p.add_argument("--task", choices=TASKS, default=d.task,
                   help="the built-in cloze task, or the commonsense suite in --suite (its own defaults: "
                        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SUITE_DEFAULTS.items()) + ")")
    p.add_argument("--suite", type=Path, default=d.suite,
                   help="--task commonsense: the folder `make_task.py --task commonsense` wrote")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=ALL_ARMS + tuple(VARIANTS),
                   help="arms; fora-a and stiefel-lora-a (--task commonsense) are fora and stiefel-lora with "
                        "--stiefel-factor A, the A-side ablation")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds))

    def task_default(name: str) -> dict:  # shown in --help; filled in after parsing, by --task
        if name not in SUITE_DEFAULTS:
            return {"default": getattr(d, name)}
        return {"default": argparse.SUPPRESS,
                "help": f"default: {getattr(d, name)} (cloze), {SUITE_DEFAULTS[name]} (commonsense)"}
    for name in ("steps", "batch_size", "cutoff_len", "rank", "warmup_steps", "val_size", "blanks", "eval_limit",
                 "gen_limit", "max_new_tokens", "ppl_tokens", "kl_windows", "n_boot", "fisher_batches"):
        p.add_argument("--" + name.replace("_", "-"), type=int, **task_default(name))
    p.add_argument("--lr", type=float, **task_default("lr"))
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), **task_default("dtype"))
    p.add_argument("--select-lr", nargs="+", type=float, default=[], metavar="LR",
                   help="--task commonsense: train each --methods arm (first --seeds seed) at every LR, score "
                        "SUITE/<task>/val.json by loglik and keep the LR with the best mean over tasks in "
                        f"OUT/<model>/{LR_CHOICE} (and lr_choice.md); later runs of that arm train at it")
    p.add_argument("--shared-lr", action="store_true",
                   help="with --select-lr: one LR for all --methods arms, the best mean validation accuracy "
                        "over them (a comparison of the arms is then not also one of their rates)")
    p.add_argument("--select-steps", nargs="+", type=int, default=[], metavar="STEPS",
                   help="--task commonsense: train each --methods arm (first seed) for each number of STEPS, score "
                        "it and the base model on the validation split, and choose the smallest budget that takes "
                        "every arm above the zero-shot level into OUT/<model>/budget_choice.json (and .md)")
    p.add_argument("--style", choices=("word", "option"), default=d.style,
                   help="cloze answers: the two words, or WinoGrande's option1/option2 labels")
    p.add_argument("--base-first", action="store_true",
                   help="measure the base model before training (for a second invocation running in parallel)")
    p.add_argument("--match-init-norm", action="store_true",
                   help="plain-A arms start with unit-norm rows of A, as the Stiefel arms do (train.py's "
                        "--match-init-norm): the control for the Stiefel arms' larger output drift")
    p.add_argument("--test-split", choices=TEST_SPLITS, default=d.test_split,
                   help="one blank per test sentence (185 records), or every eligible blank (1,242, clustered)")
    p.add_argument("--stiefel-scales", nargs="+", type=float, default=list(d.stiefel_scales),
                   help="multiples of Cayley-Adam's default step lr*sqrt(r*d_in) to run the Stiefel arms at "
                        "(e.g. 1 0.25 0.0625); other arms run once")
    p.add_argument("--method-lr", nargs="+", default=[], metavar="METHOD=LR",
                   help="run these non-Stiefel methods at their own learning rate instead of --lr, as separate arms "
                        "(folder <method>-lr<LR>-s<seed>, label '<method> lr <LR>') that the claims leave out")
    p.add_argument("--report", action="store_true",
                   help="rebuild results.md/json, plots and claims.md from finished runs under --out; trains nothing")
    p.add_argument("--sync-docs", nargs="+", type=Path, default=[], metavar="PAGE",
                   help="after writing the tables, replace the blocks marked <!-- claims.md -->, <!-- results.md -->, "
                        "<!-- stiefel_step.md --> and <!-- claims_brief MODEL --> in these Markdown pages")
    a = vars(p.parse_args(argv))
    for name, value in SUITE_DEFAULTS.items():
        a.setdefault(name, value if a["task"] == "commonsense" else getattr(d, name))
    if a["task"] == "cloze":
        variants = [m for m in a["methods"] if m in VARIANTS]
        if variants or a["select_lr"] or a["select_steps"]:
            p.error(f"{' '.join(variants) or ('--select-lr' if a['select_lr'] else '--select-steps')}: "
                    f"only with --task commonsense")
    if a["select_lr"] and a["select_steps"]:
        p.error("--select-lr and --select-steps: choose one at a time (the learning rate first, then the budget at it)")
    if a["shared_lr"] and not a["select_lr"]:
        p.error("--shared-lr: only with --select-lr LR...")
    if any(x < 1 for x in a["select_steps"]):
        p.error(f"--select-steps takes step counts >= 1, got {a['select_steps']}")
    if any(not x > 0 for x in a["select_lr"]):
        p.error(f"--select-lr takes learning rates > 0, got {a['select_lr']}")
    if any(not x > 0 for x in a["stiefel_scales"]):
        p.error(f"--stiefel-scales must all be > 0, got {a['stiefel_scales']}")
    a["method_lr"] = [_method_lr(p, text) for text in a["method_lr"]]
    for name, value in a.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1 and name not in ("gen_limit", "warmup_steps", "val_size"):
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return ReproduceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()})


def _method_lr(p: argparse.ArgumentParser, text: str) -> tuple[str, float]:
    from fora.training.methods import METHODS

    method, _, value = text.partition("=")
    try:
        lr = float(value)
    except ValueError:
        lr = 0.0
    if method not in ALL_ARMS or not lr > 0:
        p.error(f"--method-lr takes METHOD=LR with METHOD one of {', '.join(ALL_ARMS)} and LR > 0, got {text!r}")
    if METHODS[method].stiefel:
        p.error(f"--method-lr {text}: {method} trains a Stiefel factor; vary its Cayley step with "
                f"--stiefel-scales and its AdamW rate with --select-lr instead")
    return method, lr


def write_data(out: Path, blanks: int = 1, style: str = "word", test_split: str = "one-blank"
               ) -> tuple[Path, list[dict]]:
    """The cloze task (fixed splits) into OUT/data; returns the train file and the test records."""
    from fora.training.cloze import cloze_all_blanks, cloze_task
    from fora.training.data import write_jsonl

    train = write_jsonl(cloze_task("train", style=style, blanks=blanks), out / "data" / "train.jsonl")
    test = cloze_task("test", style=style) if test_split == "one-blank" else cloze_all_blanks("test", style=style)
    write_jsonl(test, out / "data" / "test.jsonl")
    return train, test


def task_data(cfg: ReproduceConfig) -> tuple[Path, list[dict] | dict[str, list[dict]]]:
    """The training file and the test records: the cloze task's (written into OUT/data), or the
    suite's commonsense_train.json and its test split per task."""
    if cfg.task == "cloze":
        return write_data(cfg.out, cfg.blanks, cfg.style, cfg.test_split)
    from fora.evaluation.validation_choices import suite_train_file
    from fora.training.commonsense import read_suite

    return suite_train_file(cfg.suite), read_suite(cfg.suite, "test")


def main(cfg: ReproduceConfig) -> dict:
    from fora.training.methods import METHODS

    if cfg.report:
        return write_report(cfg)
    if cfg.select_lr or cfg.select_steps:
        from fora.evaluation.validation_choices import select_lr, select_steps

        return (select_lr if cfg.select_lr else select_steps)(cfg, train=train_arm)
    t0 = time.perf_counter()
    train_file, test = task_data(cfg)
    sizes = EvalSizes(cfg.eval_limit, cfg.gen_limit, cfg.max_new_tokens, cfg.ppl_tokens, cfg.kl_windows)
    base: dict[str, dict] = {}
    for model in cfg.models:
        folder = cfg.out / slug(model)
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.base_first:
            base[model] = base_row(model, test, sizes, folder / "base.json")
        for seed in cfg.seeds:
            for arm, scale in [(a, x) for a in cfg.methods
                               for x in (cfg.stiefel_scales if METHODS[VARIANTS.get(a, (a,))[0]].stiefel else (1.0,))]:
                method, factor = VARIANTS.get(arm, (arm, "B"))
                lr = dict(cfg.method_lr).get(arm)  # an arm of its own, "<method> lr <LR>"
                run = run_dir(cfg, model, arm, seed, scale, lr)
                chosen = None if lr is not None or cfg.task == "cloze" else chosen_lr(folder, arm)
                train_lr = chosen if lr is None else lr  # None: --lr
                if (run / "result.json").is_file():
                    refuse_other_training(run, arm_config(model, method, seed, train_file, cfg, run, scale,
                                                          train_lr, factor))
                    log.info("%s: done, skipped", run)
                    continue
                log.info("%s: training (%.0f s into this invocation)", run, time.perf_counter() - t0)
                train_arm(model, method, seed, train_file, cfg, run, scale, train_lr,
                          **({} if factor == "B" else {"stiefel_factor": factor}))
                if model not in base:  # after training: a parallel invocation may have measured it meanwhile
                    base[model] = base_row(model, test, sizes, folder / "base.json")
                suite = {} if cfg.task == "cloze" else {  # the suite's rows say where and how each arm trained
                    "folder": run.name, "stiefel_factor": factor, "lr": lr or chosen or cfg.lr,
                    "lr_source": "--method-lr" if lr else f"{LR_CHOICE} (validation)" if chosen else "--lr"}
                arm_row(model, run, test, sizes, base[model], method=method, arm=arm_name(arm, scale, lr), seed=seed,
                        stiefel_lr_scale=scale, **({} if lr is None else {"method_lr": lr}), **suite)
    return write_report(cfg)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    main(parse_args())
