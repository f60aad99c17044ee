"""The docs: generated tables match the code that produces them; figures are small; links resolve."""

import re
from pathlib import Path

import pytest

from benchmarks import docs

ROOT = Path(__file__).resolve().parent.parent


def test_mac_table_in_the_docs_matches_the_code():
    """Full-size MACs counted now on the meta device equal the table in docs/results.md (regenerate it with
    `python -m benchmarks.docs` when the merge path or the presets change)."""
    written = docs.read_block((docs.DOCS / "results.md").read_text(), "macs")
    assert written == docs.mac_table()


def test_generated_blocks_are_replaced_exactly():
    text = "a\n<!-- generated: x -->\nold\n<!-- /generated: x -->\nb\n"
    assert docs.replace_block(text, "x", "new\n") == "a\n<!-- generated: x -->\nnew\n<!-- /generated: x -->\nb\n"
    with pytest.raises(ValueError, match="no generated block 'y'"):
        docs.replace_block(text, "y", "z")


def test_readme_is_a_front_door_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12_000  # the front door; the details live in docs/
    assert "./run_benchmark.sh" in readme and "./run_tests.sh" in readme
    for page in [ROOT / "README.md", *sorted(docs.DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)


def test_figures_the_docs_show_are_small_committed_pngs():
    pages = [ROOT / "README.md", *sorted(docs.DOCS.glob("*.md"))]
    shown = {(page.parent / target).resolve() for page in pages
             for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text())}
    for figure in shown:
        assert figure.suffix == ".png" and figure.is_relative_to(docs.IMAGES), figure
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size <= docs.MAX_FIGURE_BYTES
