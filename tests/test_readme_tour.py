"""The README's tour of the scripts ("## The scripts"), read out of README.md: every command parses
with its script's own parser, the commands after train.py use the folder train.py writes (and not
the main job's), and the quick ones run as written and give the counts the README states."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from script_loader import load_script

from fora.training.flags import parse_args as train_args
from fora.training.resume import default_out

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## The scripts"


def tour() -> list[list[str]]:
    """The argv of every line of the section's ```bash block (comments dropped)."""
    section = README.read_text(encoding="utf-8").split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"README.md's section {SECTION!r} has no ```bash block"
    lines = [shlex.split(line.split("  #", 1)[0]) for line in block.group(1).splitlines() if line.strip()]
    assert all(argv[0] == "python" and argv[1].startswith("scripts/") for argv in lines), lines
    return lines


def by_script(name: str) -> list[list[str]]:
    return [argv[2:] for argv in tour() if argv[1] == f"scripts/{name}.py"]


def test_every_tour_command_parses_and_follows_the_run_train_writes():
    (train,) = by_script("train")
    cfg = train_args(train)
    main_job = default_out(train_args(["--model", "smollm2-135m", "--k", "15"]))
    assert cfg.out is not None and Path(cfg.out) != main_job       # no collision with the main job's folder
    assert cfg.max_steps is not None                                 # a tour step, not the paper's hours
    data = Path(cfg.data)
    for argv in by_script("make_task"):
        mk = load_script("make_task").parse_args(argv)
        assert mk.out == data.parent or mk.task != "cloze"
    (ev,) = by_script("eval")
    assert load_script("eval").parse_args(ev).adapter == cfg.out
    (gen,) = by_script("generate")
    assert load_script("generate").parse_args(gen).adapter == cfg.out
    (an,) = by_script("analyze")
    assert str(load_script("analyze").parse_args(an).run_dir) == cfg.out
    (ex,) = by_script("export")
    assert str(load_script("export").parse_args(ex).source) == cfg.out
    (rep,) = by_script("reproduce")
    load_script("reproduce").parse_args(rep)


def test_the_cloze_task_command_writes_what_the_readme_says(tmp_path, monkeypatch):
    (argv,) = [a for a in by_script("make_task") if "cloze" in a]
    monkeypatch.chdir(tmp_path)
    make_task = load_script("make_task")
    make_task.main(make_task.parse_args(argv))
    out = tmp_path / argv[argv.index("--out") + 1]
    train, test = ((out / f).read_text().splitlines() for f in ("train.jsonl", "test.jsonl"))
    text = README.read_text(encoding="utf-8")
    assert f"{len(train)} train, {len(test)} test records" in text
    assert all(json.loads(line)["output"] for line in train)
