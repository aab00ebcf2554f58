"""Generated tables kept inside hand-written pages: marked blocks replaced in place.

A page holds a generated table between two HTML comments, which Markdown does not render:

    <!-- claims.md -->
    | model | claim | ... |
    <!-- end claims.md -->

The opening marker names the block ("claims.md", "claims_brief smollm2-135m"); the closing one is
`<!-- end FIRST-WORD -->`. `replace_blocks` swaps each named block's body for new text and leaves
everything else, unnamed blocks included, as it was, so `reproduce.py --report --sync-docs` can
keep the README and docs/reproduction.md equal to the stored tables without hand copying.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from fora.formats.atomic import atomic_write_text


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name} -->\n", f"\n<!-- end {name.split()[0]} -->"


def replace_blocks(text: str, blocks: Mapping[str, str], *, where: str = "the page") -> tuple[str, list[str]]:
    """`text` with the body of every marked block named in `blocks` replaced; and the names replaced.

    A name whose opening marker is absent is skipped; an opening marker without its closing one, or
    a block that appears twice, is an error naming the marker to fix.
    """
    done = []
    for name, body in blocks.items():
        start, end = _markers(name)
        i = text.find(start)
        if i < 0:
            continue
        if text.find(start, i + 1) >= 0:
            raise ValueError(f"{where} has the block {start.strip()!r} twice; keep one")
        j = text.find(end, i + len(start))
        if j < 0:
            raise ValueError(f"{where} opens the block {start.strip()!r} but never closes it: "
                             f"add {end.strip()!r} on its own line after the table")
        text = text[:i + len(start)] + body.strip("\n") + text[j:]
        done.append(name)
    return text, done


def sync_files(paths: Sequence[str | os.PathLike[str]], blocks: Mapping[str, str]) -> dict[str, list[str]]:
    """Rewrite the named blocks of each file in `paths` (atomically, only when changed).

    Returns, per file, the block names found. A missing file, or one with none of the blocks, is an
    error: a `--sync-docs` that silently did nothing would leave the page stale.
    """
    found = {}
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"--sync-docs: {p} does not exist; name the Markdown pages that hold the tables")
        old = p.read_text(encoding="utf-8")
        new, names = replace_blocks(old, blocks, where=str(p))
        if not names:
            raise ValueError(f"--sync-docs: {p} holds none of the blocks {sorted(blocks)}; mark a table with "
                             f"'<!-- NAME -->' and '<!-- end NAME -->' lines")
        if new != old:
            atomic_write_text(p, new)
        found[str(p)] = names
    return found
