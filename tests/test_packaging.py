"""The package people install: its name, version, commands, typing marker and citation agree.

Oracles: pyproject.toml, CHANGELOG.md and CITATION.cff read as files; the commands run from a
wheel built here and installed into a new virtual environment (slow).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from script_loader import load_script

import fora

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMMANDS = PROJECT["project"]["scripts"]


def test_the_distribution_is_not_pypis_unrelated_fora():
    assert PROJECT["project"]["name"] == "fora-lora"
    assert PROJECT["project"]["dynamic"] == ["version"]
    assert PROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fora.__version__"}


def test_version_changelog_and_citation_agree():
    version = fora.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    first = re.search(r"^## (\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert first and first.group(1) == version, "CHANGELOG.md's newest entry must be fora.__version__"
    citation = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf"^version: {re.escape(version)}$", citation, re.M)
    assert "10.48550/arXiv.2605.29317" in citation and "arXiv:2605.29317" in citation


def test_typed_marker_ships():
    assert (ROOT / "fora" / "py.typed").is_file()
    assert "py.typed" in PROJECT["tool"]["setuptools"]["package-data"]["fora"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_is_the_cli_its_script_runs(command):
    module, _, attr = COMMANDS[command].partition(":")
    name = command.removeprefix("fora-")
    assert module == f"fora.cli.{name}" and attr == "cli"
    entry = getattr(__import__(module, fromlist=[attr]), attr)
    assert load_script(name).cli is entry


def _built_wheel(tmp: Path) -> Path:
    """A wheel of the checkout, built from a copy (the build leaves no files in the checkout)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "fora", src / "fora", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("fora_lora-*.whl")
    return wheel


@pytest.mark.slow
def test_a_wheel_installs_working_commands(tmp_path):
    wheel = _built_wheel(tmp_path)
    assert wheel.name == f"fora_lora-{fora.__version__}-py3-none-any.whl"
    env = tmp_path / "venv"
    # this interpreter's packages (torch, ...) stay visible; fora itself comes from the wheel alone
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env)
    python = env / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    where = subprocess.run([python, "-c", "import fora, fora.hf; print(fora.__file__, fora.__version__)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    path, version = where.stdout.split()
    assert Path(path).is_relative_to(env) and version == fora.__version__
    assert (Path(path).parent / "py.typed").is_file()
    for command in COMMANDS:
        done = subprocess.run([env / "bin" / command, "--help"], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr[-1500:])
        assert done.stdout.startswith(f"usage: {command} "), (command, done.stdout[:200])
    for command, args in (("fora-train", ["--model", str(tmp_path / "none"), "--k", "1"]),
                          ("fora-export", [str(tmp_path / "none"), "--to", "merged"])):
        done = subprocess.run([env / "bin" / command, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 1 and done.stderr.startswith(f"{command}: error: "), (command, done.stderr[-500:])
