"""Marked blocks of generated tables inside hand-written pages (`fora.evaluation.doc_blocks`)."""
import pytest

from fora.evaluation.doc_blocks import replace_blocks, sync_files

PAGE = """# Title

text before
<!-- claims.md -->
| old | table |
<!-- end claims.md -->
between
<!-- claims_brief smollm2-135m -->
old brief
<!-- end claims_brief -->
<!-- end of the set-up section -->
<!-- other.md -->
untouched
<!-- end other.md -->
tail
"""


def test_named_blocks_are_replaced_and_everything_else_kept():
    new, names = replace_blocks(PAGE, {"claims.md": "| new |\n|---|\n", "claims_brief smollm2-135m": "new brief",
                                       "results.md": "absent from the page"})
    assert names == ["claims.md", "claims_brief smollm2-135m"]
    expected = (PAGE.replace("| old | table |", "| new |\n|---|").replace("old brief", "new brief"))
    assert new == expected


def test_replacing_twice_is_idempotent():
    once, _ = replace_blocks(PAGE, {"claims.md": "x"})
    assert replace_blocks(once, {"claims.md": "x"})[0] == once


def test_an_unclosed_block_is_an_error_naming_the_marker():
    with pytest.raises(ValueError, match=r"README.md opens the block '<!-- claims.md -->' but never closes it: "
                                         r"add '<!-- end claims.md -->'"):
        replace_blocks("<!-- claims.md -->\n| t |\n", {"claims.md": "x"}, where="README.md")


def test_a_block_twice_is_an_error():
    with pytest.raises(ValueError, match="has the block '<!-- claims.md -->' twice; keep one"):
        replace_blocks(PAGE + PAGE, {"claims.md": "x"})


def test_sync_files_rewrites_pages_and_reports_the_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert sync_files([page], {"claims.md": "fresh"}) == {str(page): ["claims.md"]}
    assert "<!-- claims.md -->\nfresh\n<!-- end claims.md -->" in page.read_text()


def test_sync_files_refuses_a_missing_page_or_one_without_blocks(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--sync-docs: .*nope.md does not exist"):
        sync_files([tmp_path / "nope.md"], {"claims.md": "x"})
    plain = tmp_path / "plain.md"
    plain.write_text("# no tables here\n")
    with pytest.raises(ValueError, match=r"plain.md holds none of the blocks \['claims.md'\]; mark a table"):
        sync_files([plain], {"claims.md": "x"})
    assert plain.read_text() == "# no tables here\n"
