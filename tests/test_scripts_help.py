"""Every script answers --help, and docs/cli.md lists exactly the flags each --help lists.

argparse formats each help string with %, so a stray % breaks --help. The scripts checked are the
files of scripts/ and every `scripts/*.py` the README or a docs page names (a named script that does
not exist fails). Oracle for docs/cli.md: the script's own --help output.
"""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI_PAGE = ROOT / "docs" / "cli.md"


def _named_scripts() -> set[str]:
    named = set()
    for page in PAGES:
        named.update(re.findall(r"(?<![\w/])scripts/(\w+)\.py", page.read_text(encoding="utf-8")))
    return named


NAMES = sorted({p.stem for p in (ROOT / "scripts").glob("*.py")} | _named_scripts())


@functools.cache
def help_output(name: str) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / f"{name}.py"
    assert script.is_file(), f"scripts/{name}.py is named in README.md or docs/ but does not exist; fix the name"
    return subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)


def help_flags(text: str) -> set[str]:
    """The option strings of an argparse --help: the flags at the start of each `options:` line."""
    options = text.split("\noptions:\n", 1)[1]
    flags = set()
    for line in options.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if m:
            flags.update(re.findall(r"--[\w-]+", m.group(1)))
    return flags - {"--help"}


def cli_section(name: str) -> str:
    """The `## `scripts/<name>.py`` section of docs/cli.md (up to the next `## ` heading)."""
    for part in re.split(r"^## ", CLI_PAGE.read_text(encoding="utf-8"), flags=re.M)[1:]:
        heading = part.split("\n", 1)[0]
        if f"scripts/{name}.py" in heading:
            return part
    raise AssertionError(f"docs/cli.md has no '## `scripts/{name}.py`' section; add one with a table of its flags")


def documented_flags(section: str) -> set[str]:
    """Flags in the first cell of the section's table rows."""
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {f for cell in rows for f in re.findall(r"`(--[\w-]+)", cell)}


@pytest.mark.parametrize("name", NAMES)
def test_help_prints_usage_and_exits_zero(name: str) -> None:
    done = help_output(name)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:200]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name", NAMES)
def test_cli_page_lists_every_flag_and_no_other(name: str) -> None:
    flags = help_flags(help_output(name).stdout)
    section = cli_section(name)
    missing = sorted(f for f in flags if not re.search(re.escape(f"`{f}") + r"[` ,]", section))
    assert not missing, f"docs/cli.md's scripts/{name}.py section lacks the flags {missing}: add a row for each"
    stale = sorted(documented_flags(section) - flags)
    assert not stale, f"docs/cli.md documents {stale} for scripts/{name}.py, which --help does not list: remove them"


def test_flag_parsing_reads_argparse_help() -> None:
    text = ("usage: x.py [-h]\n\nSee --not-a-flag.\n\noptions:\n  -h, --help  show\n  --a A       uses --b\n"
            "  --full, --no-full\n                        wrapped --c\n  --long-name LONG_NAME\n")
    assert help_flags(text) == {"--a", "--full", "--no-full", "--long-name"}
    assert documented_flags("| `--a`, `--b` | 1 |\n| `RUN` | x |\n| `--c X` | 2 |\n") == {"--a", "--b", "--c"}


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "scripts").glob("*.py")))
def test_script_runs_from_a_checkout_without_installing(name: str) -> None:
    """The README's commands run from a clone before (or without) `pip install -e .`: each script that
    imports fora puts the checkout on sys.path first (an installed fora would hide a missing line)."""
    lines = (ROOT / "scripts" / f"{name}.py").read_text(encoding="utf-8").splitlines()
    uses = [i for i, line in enumerate(lines) if re.match(r"\s*(from fora[\s.]|import fora\b)", line)]
    if not uses:
        return
    insert = [i for i, line in enumerate(lines) if line.startswith("sys.path.insert(0, ")]
    assert insert and insert[0] < uses[0], (
        f"scripts/{name}.py imports fora (line {uses[0] + 1}) without first putting the checkout on sys.path; "
        "add `sys.path.insert(0, str(Path(__file__).resolve().parents[1]))` after the standard imports")
