"""README.md, docs/*.md and results/README.md point only at things that exist.

Every relative link (files and #anchors, GitHub's heading slugs) and every repository path the text
names (`tests/...`, `scripts/...`, `fora/...`, `docs/...`, `results/...`, code blocks included) must
resolve inside the repository (under results/ once the named store exists: an --out may name one
before its first run); a page outside it (e.g. the brief the paper was restated in) is invisible to
a clone.
Oracle: the file tree and the target page's own headings.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md"]
README_MAX_LINES = 330  # the front door (two runnable examples among it); topics live in docs/

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
PATH = re.compile(r"(?<![\w./~$-])((?:tests|scripts|fora|docs|results)/[\w./*<>-]*[\w*/])")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slugs(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-', dups -1, -2."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    """Relative link targets of a page, outside code blocks (a link in code is text, not a link)."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`(?!\])", "", text)  # inline code, but keep `code` used as link text
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def link_problem(page: Path, target: str) -> str | None:
    """Why `target` (as written in `page`) does not resolve, or None when it does."""
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if ROOT not in (dest, *dest.parents):
        return f"{target} leaves the repository"
    rel = dest.relative_to(ROOT).as_posix()
    if not dest.exists():
        return f"{target} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in slugs(dest):
        return f"{target}: {rel} has no heading with anchor #{anchor}"
    return None


def path_problem(name: str) -> str | None:
    """Why a repository path named in the text does not exist, or None."""
    if "<" in name:  # a pattern such as tests/test_<module>.py
        return None
    clean = name.rstrip("/")
    if clean.startswith("results/") and not (ROOT / "/".join(clean.split("/")[:2])).is_dir():
        return None  # a store a command will write (an --out), not one in the repository yet
    if "*" in clean:
        return None if list(ROOT.glob(clean)) else f"{name} matches no file"
    if (ROOT / clean).exists():
        return None
    return f"{name} does not exist"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    problems = [p for t in links(page) if (p := link_problem(page, t))]
    assert not problems, f"{page.relative_to(ROOT)}: broken links: " + "; ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_named_repository_path_exists(page: Path) -> None:
    names = sorted(set(PATH.findall(page.read_text(encoding="utf-8"))))
    problems = [p for n in names if (p := path_problem(n))]
    assert not problems, f"{page.relative_to(ROOT)} names missing paths (fix the path): " + "; ".join(problems)


def test_readme_is_a_front_door_that_reaches_every_page() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the topic into a docs/ page and link it"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages not linked from README.md: {orphans}; add them to its Documentation table"


def test_api_page_names_every_public_name() -> None:
    import fora

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [n for n in fora.__all__ if not re.search(rf"`{re.escape(n)}[`(\[]", text)]
    assert not missing, f"docs/api.md does not name the public names {missing}; add them to its table"


def test_checker_catches_a_broken_link_a_bad_anchor_and_a_missing_path(tmp_path) -> None:
    readme = ROOT / "README.md"
    assert link_problem(readme, "docs/cli.md#scriptstrainpy") is None
    assert "does not exist" in link_problem(readme, "docs/nope.md")
    assert "no heading" in link_problem(readme, "docs/cli.md#no-such-heading")
    assert "leaves the repository" in link_problem(readme, "../shared/PAPER.md")
    assert "does not exist" in path_problem("tests/test_parity.py")
    assert path_problem("tests/models/test_decoder.py") is None
    assert path_problem("results/claims/claims.md") is None
    assert "does not exist" in path_problem("results/claims/nope.md")
    assert path_problem("results/not-written-yet/results.md") is None
    page = tmp_path / "x.md"
    page.write_text("## `scripts/eval.py`\n## Performance: fora vs transformers + peft\n## A\n## A\n")
    assert slugs(page) == {"scriptsevalpy", "performance-fora-vs-transformers--peft", "a", "a-1"}
    page.write_text("[a](b.md) `[c](d.md)` [`e`](f.md#g)\n```\n[h](i.md)\n```\n[web](https://x.org)\n")
    assert links(page) == ["b.md", "f.md#g"]
