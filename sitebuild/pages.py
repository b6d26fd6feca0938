"""Which snippet modules are pages, and what a reader sees of them."""

import functools
from pathlib import Path

import jupytext

SNIPPETS = Path(__file__).resolve().parents[1] / "snippets"
HIDDEN_INPUT_TAG = "hide-input"  # mkdocs.yml: remove_tag_config.remove_input_tags


def snippet_pages(snippets_dir: Path = SNIPPETS) -> list[Path]:
    """Every public module in ``snippets/``: one page each, named by its file."""
    return sorted(
        path for path in snippets_dir.glob("*.py") if not path.name.startswith("_")
    )


def shown_code_cells(page: Path) -> list[str]:
    """The code cells a reader sees on the page, in order, as the notebook runs them.

    Cells active only in the notebook (``active="ipynb"``) are commented out in the
    module and shown uncommented on the page; cells whose input is hidden are left
    out, since a reader cannot copy them.
    """
    notebook = read(page)
    return [
        cell.source
        for cell in notebook.cells
        if cell.cell_type == "code"
        and HIDDEN_INPUT_TAG not in cell.metadata.get("tags", [])
    ]


def title(page: Path) -> str:
    """The page's first heading, as the reader sees it."""
    for cell in read(page).cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line.removeprefix("# ").strip()
    return page.stem


def nav_order(nav) -> dict[str, int]:
    """{file: position} of every file in mkdocs.yml's ``nav``, sections flattened."""
    files = []

    def walk(entries):
        for entry in entries or []:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            if isinstance(value, list):
                walk(value)
            else:
                files.append(value)

    walk(nav)
    return {name: position for position, name in enumerate(files)}


def read(page: Path):
    """The page as a notebook, parsed once per version of its file: a build reads
    each page several times (its cache key, its title, its claims). Shared: do not
    modify it."""
    stat = page.stat()
    return _read(page.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _read(page: Path, mtime_ns: int, size: int):
    return jupytext.read(page)
