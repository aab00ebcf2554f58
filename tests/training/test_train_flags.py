"""train.py's flags: their names, defaults and parsed values, and the stage groups of `--help`.

Oracle: the tables below, written down from the command line before its flags were grouped by
stage (each flag, its default, and the `TrainConfig` value an argv parses to). A dropped or renamed
flag, a changed default, a flag that parses differently or a flag listed under the wrong group fails.
"""
from __future__ import annotations

import re
from dataclasses import fields

import pytest

from fora.training.config import TrainConfig
from fora.training.flags import build_parser, parse_args

DEFAULTS = {  # TrainConfig.to_dict() of `--model m`
    "model": "m", "k": None, "method": "fora", "data": None, "task_size": 2000, "eval_data": None,
    "eval_limit": None, "protocol": "loglik", "export": None, "out": None, "rank": 32, "alpha": None,
    "lora_dropout": 0.05, "rslora": False, "targets": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "lr": 0.0002, "stiefel_factor": "B", "stiefel_lr": None, "stiefel_lr_scale": 1.0, "weight_decay": 0.01,
    "cayley_per_micro_batch": False, "max_grad_norm": 1.0, "batch_size": 16, "grad_accum": 1, "epochs": 3,
    "max_steps": None, "cutoff_len": 256, "template": "alpaca", "fisher_batches": 128, "fisher_params": "block", "selection_from": None,
    "qr_every": 100, "warmup_steps": None, "schedule": "linear", "val_size": 120, "seed": 42, "dtype": "auto",
    "device": "auto", "save_every": 50, "save_minutes": 10.0, "resume": None, "merge": False, "log_every": 10,
    "eval_every": 100, "distributed": None, "world_size": 1, "quantize": None, "fim_statistic": "second_moment",
    "fim_r_min": 1, "fim_r_max": None, "init_r": None, "target_r": None, "tinit": None, "tfinal": None,
    "delta_t": 1, "orth_reg": 0.5, "adalora_betas": [0.85, 0.85], "match_init_norm": False, "compile": False,
    "activation_checkpointing": False,
}

# Argv lists that between them give every flag but --model and --resume a value other than its
# default: one row per flag, (its tokens, the fields they set).
RUNS = {
    "fora": [
        (["--k", "3"], {"k": 3}), (["--data", "d.json"], {"data": "d.json"}),
        (["--task-size", "100"], {"task_size": 100}), (["--eval-data", "none"], {"eval_data": "none"}),
        (["--eval-limit", "5"], {"eval_limit": 5}), (["--protocol", "generate"], {"protocol": "generate"}),
        (["--export", "gguf-lora"], {"export": "gguf-lora"}), (["--out", "o"], {"out": "o"}),
        (["--rank", "8"], {"rank": 8}), (["--alpha", "4"], {"alpha": 4.0}),
        (["--lora-dropout", "0.1"], {"lora_dropout": 0.1}), (["--rslora"], {"rslora": True}),
        (["--targets", "q_proj, v_proj"], {"targets": ["q_proj", "v_proj"]}), (["--lr", "1e-3"], {"lr": 0.001}),
        (["--stiefel-factor", "B"], {}), (["--stiefel-lr", "0.5"], {"stiefel_lr": 0.5}),
        (["--stiefel-lr-scale", "0.25"], {"stiefel_lr_scale": 0.25}), (["--weight-decay", "0"], {"weight_decay": 0.0}),
        (["--cayley-per-micro-batch"], {"cayley_per_micro_batch": True}),
        (["--max-grad-norm", "0"], {"max_grad_norm": 0.0}), (["--batch-size", "2"], {"batch_size": 2}),
        (["--grad-accum", "4"], {"grad_accum": 4}), (["--epochs", "2"], {"epochs": 2}),
        (["--max-steps", "10"], {"max_steps": 10}), (["--cutoff-len", "64"], {"cutoff_len": 64}),
        (["--template", "llm-adapters"], {"template": "llm-adapters"}),
        (["--fisher-batches", "4"], {"fisher_batches": 4}), (["--fisher-params", "targets"], {"fisher_params": "targets"}),
        (["--selection-from", "runs/a"], {"selection_from": "runs/a"}),
        (["--qr-every", "0"], {"qr_every": 0}), (["--warmup-steps", "2"], {"warmup_steps": 2}),
        (["--schedule", "cosine"], {"schedule": "cosine"}), (["--val-size", "0"], {"val_size": 0}),
        (["--seed", "-1"], {"seed": -1}), (["--dtype", "float32"], {"dtype": "float32"}),
        (["--device", "cpu"], {"device": "cpu"}), (["--save-every", "0"], {"save_every": 0}),
        (["--save-minutes", "0.5"], {"save_minutes": 0.5}), (["--merge"], {"merge": True}),
        (["--log-every", "5"], {"log_every": 5}), (["--eval-every", "0"], {"eval_every": 0}),
        (["--distributed", "ddp"], {"distributed": "ddp"}), (["--compile"], {"compile": True}),
        (["--activation-checkpointing"], {"activation_checkpointing": True}),
    ],
    "fim-lora": [
        (["--method", "fim-lora"], {"method": "fim-lora"}), (["--fim-statistic", "variance"], {"fim_statistic": "variance"}),
        (["--fim-r-min", "2"], {"fim_r_min": 2}), (["--fim-r-max", "16"], {"fim_r_max": 16}),
        (["--match-init-norm"], {"match_init_norm": True}), (["--stiefel-factor", "A"], {"stiefel_factor": "A"}),
        (["--eval-data", "builtin"], {"eval_data": "builtin"}),
    ],
    "qdora": [
        (["--method", "qdora"], {"method": "qdora"}), (["--quantize", "nf4"], {"quantize": "nf4"}),
        (["--distributed", "fsdp"], {"distributed": "fsdp"}), (["--dtype", "bfloat16"], {"dtype": "bfloat16"}),
    ],
    "adalora": [
        (["--method", "adalora"], {"method": "adalora"}), (["--rank", "8"], {"rank": 8}),
        (["--init-r", "12"], {"init_r": 12}), (["--target-r", "6"], {"target_r": 6}), (["--tinit", "2"], {"tinit": 2}),
        (["--tfinal", "3"], {"tfinal": 3}), (["--delta-t", "2"], {"delta_t": 2}), (["--orth-reg", "0.1"], {"orth_reg": 0.1}),
        (["--adalora-betas", "0.9,0.95"], {"adalora_betas": [0.9, 0.95]}),
    ],
}

# --help's groups, in the order of the run: load, score and select, inject, train, evaluate, save
GROUPS = {
    "model and data": ["--model", "--dtype", "--quantize", "--data", "--task-size", "--template", "--cutoff-len"],
    "layer selection": ["--method", "--k", "--fisher-batches", "--fisher-params", "--selection-from", "--fim-statistic", "--fim-r-min",
                        "--fim-r-max"],
    "adapters": ["--targets", "--rank", "--alpha", "--lora-dropout", "--rslora", "--stiefel-factor",
                 "--match-init-norm"],
    "adalora": ["--init-r", "--target-r", "--tinit", "--tfinal", "--delta-t", "--orth-reg", "--adalora-betas"],
    "optimization": ["--lr", "--stiefel-lr", "--stiefel-lr-scale", "--qr-every", "--cayley-per-micro-batch",
                     "--weight-decay", "--max-grad-norm", "--batch-size", "--grad-accum"],
    "schedule and checkpoints": ["--epochs", "--max-steps", "--warmup-steps", "--schedule", "--log-every",
                                 "--save-every", "--save-minutes", "--resume"],
    "evaluation": ["--val-size", "--eval-every", "--eval-data", "--eval-limit", "--protocol"],
    "output": ["--out", "--merge", "--export"],
    "runtime": ["--device", "--distributed", "--compile", "--activation-checkpointing", "--seed"],
}


def test_the_defaults_are_the_recorded_ones():
    assert parse_args(["--model", "m"]).to_dict() == DEFAULTS
    assert [f.name for f in fields(TrainConfig)] == list(DEFAULTS)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_each_flag_parses_to_its_recorded_value(run):
    argv = ["--model", "m", *(token for tokens, _ in RUNS[run] for token in tokens)]
    expected = {**DEFAULTS, **{k: v for _, given in RUNS[run] for k, v in given.items()}}
    assert parse_args(argv).to_dict() == expected


def test_resume_is_a_flag():  # parse_args would read the run's folder; the parser alone is enough here
    assert build_parser().parse_args(["--model", "m", "--resume", "runs/x"]).resume == "runs/x"


def test_every_field_but_the_world_size_is_a_flag_named_after_it():
    flags = {a.dest: a.option_strings for a in build_parser()._actions if a.dest != "help"}
    assert set(flags) == set(DEFAULTS) - {"world_size"}  # world_size comes from torchrun, not a flag
    assert all(strings == [f"--{dest.replace('_', '-')}"] for dest, strings in flags.items())
    assert sorted(f for group in GROUPS.values() for f in group) == sorted(f for s in flags.values() for f in s)
    covered = {flag for rows in RUNS.values() for tokens, _ in rows for flag in tokens if flag.startswith("--")}
    assert covered == {f for s in flags.values() for f in s} - {"--model", "--resume"}


def help_sections(text: str) -> dict[str, list[str]]:
    """{group title: the flags its --help section lists, in order} (a title is a line `name:`)."""
    sections: dict[str, list[str]] = {}
    title = None
    for line in text.splitlines():
        if re.fullmatch(r"\S.*:", line):
            title = line[:-1]
            sections[title] = []
        elif title is not None and (m := re.match(r"^  (?:-\w, )?(--[\w-]+)", line)):
            sections[title].append(m.group(1))
    return sections


def test_help_lists_each_stage_group_with_its_flags(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0
    sections = help_sections(capsys.readouterr().out)
    assert sections.pop("options") == ["--help"]
    assert sections == GROUPS  # the groups in pipeline order, each with its flags in order


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_shows_the_defaults_and_the_required_model(capsys, flag):
    with pytest.raises(SystemExit) as done:
        parse_args([flag])
    assert done.value.code == 0
    out = capsys.readouterr().out
    usage = out.split("\n\n")[0]
    assert "--model MODEL" in usage and "[--model MODEL]" not in usage
    assert re.search(r"--rank RANK\s+LoRA rank r \(lora-half-rank uses r/2\) \(default: 32\)", out)
