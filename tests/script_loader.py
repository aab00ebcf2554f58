"""A file of scripts/ as a module, so tests can call its parse_args / main / cli directly."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py executed as a fresh module `fora_script_<name>`, registered in sys.modules
    (a dataclass looks its module up there while the file executes)."""
    spec = importlib.util.spec_from_file_location(f"fora_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
