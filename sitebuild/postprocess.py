"""A page's HTML after rendering: notebook markup simplified, links resolved,
formulas as MathML; cached under a key of everything the result depends on.

A rebuild with nothing changed then reads each page back instead of parsing it
again (the parsing is most of a no-change rebuild's time). The key covers the
rendered HTML, the page's address, every page's URL (links depend on them), the
repository URL (the Colab link), the code of this module and those it imports, and
requirements.txt (the versions of the libraries that parse HTML and convert TeX).
"""

import hashlib
import json
from pathlib import Path

from sitebuild import execute, links, mathml, notebook_html

THIS_CODE = [Path(__file__), *sorted(execute.imported_project_files(Path(__file__)))]
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"


class PageCache:
    """Processed pages of the current build, reusing those of earlier builds."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.used: set[Path] = set()

    def process(self, html, page_uri, files, repo_url) -> tuple[str, set[str]]:
        """The processed HTML and the characters its formulas use."""
        key = _key(html, page_uri, _site_map(files), repo_url)
        path = self.directory / f"{key}.json"
        self.used.add(path)
        if path.is_file():
            cached = json.loads(path.read_text(encoding="utf-8"))
            return cached["html"], set(cached["characters"])
        html, characters = process(html, page_uri, files, repo_url)
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"html": html, "characters": sorted(characters)}
        path.write_text(json.dumps(record), encoding="utf-8")
        return html, characters

    def forget_unused(self) -> None:
        for path in self.directory.glob("*.json"):
            if path not in self.used:
                path.unlink()


def process(html, page_uri, files, repo_url) -> tuple[str, set[str]]:
    if page_uri.endswith(".py"):  # a notebook, rendered by mkdocs-jupyter
        html = notebook_html.simplify(html)
        html = links.resolve_page_links(html, page_uri, files)
        stem = page_uri.removesuffix(".py")  # after the links: its own files
        html = notebook_html.add_downloads(html, stem, repo_url)
    return mathml.render_math(html, page=page_uri)


def _site_map(files) -> list[tuple[str, str]]:
    return sorted((file.src_uri, file.url) for file in files.documentation_pages())


def _key(html, page_uri, site_map, repo_url) -> str:
    digest = hashlib.sha256()
    for part in [html, page_uri, json.dumps(site_map), repr(repo_url)]:
        digest.update(part.encode())
    for path in [*THIS_CODE, REQUIREMENTS]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]
