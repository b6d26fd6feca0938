"""Promises every snippet module keeps: cheap to import, and copyable as shown."""

import subprocess
import sys

import jupytext
import pytest

from sitebuild.pages import shown_code_cells, snippet_pages

PAGES = snippet_pages()
NAMES = [page.stem for page in PAGES]


def test_there_are_snippet_pages():
    assert NAMES, "no snippet modules found in snippets/"


@pytest.mark.parametrize("page", PAGES, ids=NAMES)
def test_importing_a_snippet_prints_plots_and_writes_nothing(page, tmp_path):
    check = (
        f"import sys; sys.path.insert(0, {str(page.parents[1])!r}); "
        f"import snippets.{page.stem}; "
        "assert 'matplotlib' not in sys.modules, 'imported matplotlib'"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", f"import printed: {result.stdout!r}"
    assert list(tmp_path.iterdir()) == [], "import wrote files"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=NAMES)
def test_page_code_runs_as_shown_in_a_fresh_interpreter(page, tmp_path):
    script = tmp_path / f"copied_from_{page.stem}.py"
    script.write_text("\n\n".join(shown_code_cells(page)) + "\n")
    result = subprocess.run(
        [sys.executable, "-I", script.name],  # -I: nothing from this checkout
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"MPLBACKEND": "Agg", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("page", PAGES, ids=NAMES)
def test_headings_are_plain_text(page):
    # the table of contents shows headings as text and links to their ids
    headings = [
        line
        for cell in jupytext.read(page).cells
        if cell.cell_type == "markdown"
        for line in cell.source.splitlines()
        if line.startswith("#")
    ]
    assert headings
    assert not [heading for heading in headings if set(heading) & {"$", "`"}]
