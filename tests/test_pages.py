"""Pages that stay readable: one page, one question, each one found in the
navigation and in the home page's reading order, the long ones opening with a
way in for the reader who came with a symptom."""

import re
from pathlib import Path

import pytest
from conftest import read_mkdocs_yml

from sitebuild import pages

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "docs" / "index.md"
MOST_LINES = 250  # "a page past about 250 lines splits" (issue 13)
LONG = 200  # lines past which a page opens with the block below
CAME_HERE = '!!! tip "If you came here with…"'
PAGES = {page.stem: page for page in pages.snippet_pages()}
# Pages whose point is one function to copy whole: every section after it runs
# that function, and pages never import from this repository, so a split would
# copy it onto each new page (issue 13's note gives the counts).
LONGER_BY_DESIGN = {
    "checked_kl": "checked_kl, with the checks it makes, is the page",
    "large_vocab": "chunked_kl (113 lines) is run by every section after it",
}
LINKED_PAGE = re.compile(r"\]\((?P<file>[a-z0-9_]+\.py)\)")


def nav_files() -> list[str]:
    nav = read_mkdocs_yml(ROOT / "mkdocs.yml")["nav"]
    return list(pages.nav_order(nav))


def reading_order() -> list[str]:
    """The pages the home page's "Reading order" lists, in its order."""
    section = HOME.read_text().split("## Reading order", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^\d+\. \[[^]]+\]\(([a-z0-9_]+\.py)\)", section, re.M)
    return items


def line_count(page: Path) -> int:
    return len(page.read_text().splitlines())


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_page_is_at_most_about_250_lines(name):
    if name in LONGER_BY_DESIGN:
        pytest.skip(f"one function to copy whole: {LONGER_BY_DESIGN[name]}")
    lines = line_count(PAGES[name])
    assert lines <= MOST_LINES, (
        f"snippets/{name}.py has {lines} lines: split it into pages that each "
        f"answer one question (at most {MOST_LINES} lines each)"
    )


@pytest.mark.parametrize("name", sorted(PAGES))
def test_long_pages_open_with_an_if_you_came_here_block(name):
    page = PAGES[name]
    if line_count(page) <= LONG:
        return
    markdown = [c.source for c in pages.read(page).cells if c.cell_type == "markdown"]
    opening = "\n".join(markdown[:3])
    assert CAME_HERE in opening, (
        f"snippets/{name}.py is longer than {LONG} lines: open it with a "
        f"`{CAME_HERE}` block listing where each reader's question is answered"
    )


def test_every_page_is_in_the_navigation():
    missing = sorted(f"{name}.py" for name in PAGES if f"{name}.py" not in nav_files())
    assert not missing, f"add these pages to nav in mkdocs.yml: {missing}"


def test_the_home_reading_order_lists_every_page_in_navigation_order():
    in_nav = [name for name in nav_files() if name.endswith(".py")]
    assert reading_order() == in_nav, (
        "docs/index.md's reading order and mkdocs.yml's nav differ: list every "
        "page, in the nav's order"
    )


def test_the_symptoms_page_is_the_first_page_the_home_page_links():
    first = LINKED_PAGE.search(HOME.read_text())
    assert first and first["file"] == "symptoms.py"
