"""A page's HTML after rendering: notebook markup simplified, links resolved,
formulas as MathML; cached under a key of everything the result depends on.

A rebuild with nothing changed then reads each page back instead of parsing it
again (the parsing is most of a no-change rebuild's time). The key covers the
rendered HTML, the page's address, every page's URL (links depend on them), the
repository URL (the Colab link), the code of this module and those it imports, and
requirements.txt (the versions of the libraries that parse HTML and convert TeX).
On a clean build, worker processes fill the cache for the notebook pages before
MkDocs renders them one by one (``PageCache.fill``, from the hooks' ``on_env``).
"""

import hashlib
import json
import os
from pathlib import Path

from bs4 import BeautifulSoup

from sitebuild import execute, links, mathml, notebook_html

THIS_CODE = [Path(__file__), *sorted(execute.imported_project_files(Path(__file__)))]
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"


class PageCache:
    """Processed pages of the current build, reusing those of earlier builds."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.used: set[Path] = set()
        self.processed_here: list[str] = []  # pages not found processed ahead

    def process(self, html, page_uri, site_map, repo_url) -> tuple[str, set[str]]:
        """The processed HTML and the characters its formulas use."""
        path = self._path(html, page_uri, site_map, repo_url)
        self.used.add(path)
        if not path.is_file():
            self.processed_here.append(page_uri)
            _process_into(path, html, page_uri, site_map, repo_url)
        cached = json.loads(path.read_text(encoding="utf-8"))
        return cached["html"], set(cached["characters"])

    def fill(self, pages: list[tuple[str, str]], site_map, repo_url, workers) -> int:
        """Process in ``workers`` the pages, (html, page_uri), not cached yet:
        MkDocs then finds them processed, instead of processing one by one.
        Returns how many there were."""
        submitted = 0
        for html, page_uri in pages:
            path = self._path(html, page_uri, site_map, repo_url)
            if not path.is_file():
                args = path, html, page_uri, site_map, repo_url
                workers.submit(f"processing {page_uri}", _process_into, *args)
                submitted += 1
        return submitted

    def forget_unused(self) -> None:
        for path in self.directory.glob("*.json"):
            if path not in self.used:
                path.unlink()

    def _path(self, html, page_uri, site_map, repo_url) -> Path:
        return self.directory / f"{_key(html, page_uri, site_map, repo_url)}.json"


def _process_into(path: Path, html, page_uri, site_map, repo_url) -> None:
    html, characters = process(html, page_uri, site_map, repo_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"html": html, "characters": sorted(characters)}
    partial = path.with_suffix(f".{os.getpid()}.partial")  # readers see all or none
    partial.write_text(json.dumps(record), encoding="utf-8")
    partial.replace(path)


def process(html, page_uri, site_map, repo_url) -> tuple[str, set[str]]:
    if not page_uri.endswith(".py"):
        return mathml.render_math(html, page=page_uri)
    # A notebook, rendered by mkdocs-jupyter: parsed once (parsing is most of
    # the time) and changed in place.
    html = links.resolve_page_links(html, page_uri, site_map)
    soup = BeautifulSoup(html, "html.parser")
    notebook_html.simplify_soup(soup)
    stem = page_uri.removesuffix(".py")  # after the links: its own files
    notebook_html.add_downloads_soup(soup, stem, repo_url)
    characters = mathml.render_math_soup(soup, page=page_uri)
    return str(soup), characters


def _key(html, page_uri, site_map, repo_url) -> str:
    digest = hashlib.sha256()
    pages = json.dumps(sorted(site_map.items()))
    for part in [html, page_uri, pages, repr(repo_url)]:
        digest.update(part.encode())
    for path in [*THIS_CODE, REQUIREMENTS]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]
