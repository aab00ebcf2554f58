"""The package layout stays true: one-way arrows between the wings, no import cycles, small modules.

fora/*.py is the core, the paper's method (LoRA, injection, Stiefel geometry, Cayley-Adam, Fisher,
selection, the optimizer pair, the defaults); models/ the decoder; quant/ the 4-bit base; baselines/ the methods
FoRA is compared with (DoRA, AdaLoRA, FIM-LoRA, CKA); formats/ disk; training/ the run; evaluation/
the measurements; hf/ the Hugging Face stack (the only wing that imports transformers, peft or trl);
cli/ the commands. The core imports the decoder and nothing else of fora.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fora"
PAPER = {"lora", "inject", "stiefel", "cayley_adam", "optim", "fisher", "selection", "defaults"}
CORE_MAX_LINES = 1500  # the paper's method, read in one sitting
# wing -> the wings it may import (itself always allowed)
ALLOWED = {
    "models": set(),
    "top": {"models"},
    "quant": {"models"},
    "baselines": {"models", "top"},
    "formats": {"models", "top", "quant", "baselines"},
    "training": {"models", "top", "quant", "baselines", "formats"},
    "evaluation": {"models", "top", "quant", "baselines", "formats", "training"},
    "hf": {"models", "top", "formats", "training"},
    "cli": {"models", "top", "quant", "baselines", "formats", "training", "evaluation"},
}
HF_STACK = {"transformers", "peft", "trl", "accelerate", "datasets"}
MAX_LINES = 350


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return parts[1] if parts[1] in ALLOWED and parts[1] != "top" else "top"


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every fora module that `path` imports, at module level or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fora"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fora":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {m: imports_of(p, known) - {m} for m, p in files.items()}


def arrow_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        if wing(src) == "api":
            continue
        for dst in targets:
            a, b = wing(src), wing(dst)
            if b == "api" or (a != b and b not in ALLOWED[a]):
                bad.append(f"{src} ({a}) imports {dst} ({b})")
    return sorted(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_top_level_holds_only_the_paper():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == PAPER
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "models", "quant", "baselines", "formats", "training", "evaluation", "hf", "cli"}


def test_the_core_is_small():
    lines = sum(len((PACKAGE / f"{m}.py").read_text().splitlines()) for m in PAPER)
    assert len(PAPER) <= 8 and lines <= CORE_MAX_LINES, f"{len(PAPER)} files, {lines} lines"


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert listed == on_disk, f"pyproject.toml's [tool.setuptools] packages must be {sorted(on_disk)}"


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of every non-fora package that `path` imports, at module level or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out - {"fora"}


def hf_stack_violations(root: Path = PACKAGE) -> list[str]:
    return sorted(f"{module_name(p, root)} imports {sorted(third_party_imports(p) & HF_STACK)}"
                  for p in root.rglob("*.py")
                  if third_party_imports(p) & HF_STACK and wing(module_name(p, root)) != "hf")


def test_only_fora_hf_imports_the_hugging_face_stack():
    assert hf_stack_violations() == []


def test_the_hf_stack_check_catches_an_import_outside_fora_hf(tmp_path):
    import shutil

    copy = tmp_path / "fora"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "fisher.py"
    target.write_text(target.read_text() + "\n\ndef _probe():\n    from peft import LoraConfig\n")
    assert hf_stack_violations(copy) == ["fora.fisher imports ['peft']"]


def test_importing_fora_hf_imports_none_of_the_stack():
    import subprocess
    import sys

    code = ("import sys, fora, fora.hf; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HF_STACK)!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_arrows_point_one_way():
    assert arrow_violations(import_graph()) == []


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_modules_stay_small():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_public_names_are_imported_explicitly():
    """fora/__init__.py binds every name of __all__ with a plain import (an editor and the import
    graph can follow each one), resolves nothing at attribute time, and names the whole core."""
    import fora

    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    bound = {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert set(fora.__all__) <= bound
    assert not any(isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__dir__") for node in tree.body)
    core_sources = {node.module.split(".")[1] for node in tree.body
                    if isinstance(node, ast.ImportFrom) and len(node.module.split(".")) == 2}
    assert core_sources == PAPER


@pytest.mark.parametrize("src,dst,rule", [
    ("fora/models/decoder.py", "from fora.lora import LoRALinear", "models uses nothing of fora"),
    ("fora/fisher.py", "from fora.training.data import load_records", "the top level uses models only"),
    ("fora/inject.py", "from fora.baselines.dora import DoRALinear", "the core imports no baseline"),
    ("fora/lora.py", "from fora.quant.nf4 import NF4Linear", "the core imports no quantization"),
    ("fora/models/weight_grad.py", "from fora.lora import LoRALinear", "the decoder imports no core"),
    ("fora/formats/hub.py", "from fora.training.run import main", "formats does not use training"),
    ("fora/training/run.py", "import fora", "package modules do not import the public API"),
    ("fora/training/run.py", "from fora.hf import FoRAOptimizer", "nothing outside fora.hf uses it"),
])
def test_the_checks_catch_a_wrong_arrow(tmp_path, src, dst, rule):
    """The checker itself: a copy of the package with one bad import must be flagged."""
    import shutil

    copy = tmp_path / "fora"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / Path(src).relative_to("fora")
    target.write_text(target.read_text() + f"\n\ndef _probe():\n    {dst}\n")
    assert arrow_violations(import_graph(copy)), rule


def test_the_checks_catch_a_cycle(tmp_path):
    import shutil

    copy = tmp_path / "fora"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "formats" / "tokenizer.py"   # gguf -> tokenizer already; close the loop
    target.write_text(target.read_text() + "\n\ndef _probe():\n    from fora.formats import gguf\n")
    assert find_cycle(import_graph(copy)) is not None


def test_what_the_readme_commands_write_is_ignored_by_git():
    # train.py writes runs/<run>, make_task.py data/<task> (README, "The scripts")
    ignored = (PACKAGE.parent / ".gitignore").read_text().splitlines()
    assert {"/runs/", "/data/"} <= set(ignored)
