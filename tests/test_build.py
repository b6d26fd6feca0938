"""The strict build: every page built, executed, with math, and failures loud."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from bs4 import BeautifulSoup

from snippets import kl_definition

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PARTS = ["mkdocs.yml", "requirements.txt", "docs", "sitebuild"]
TEX_LEFTOVERS = ["$", "\\(", "\\[", "\\frac", "\\mathrm"]

pytestmark = pytest.mark.slow


def mkdocs_build(project: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        capture_output=True,
        text=True,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("build") / "site"
    result = mkdocs_build(ROOT, site)
    assert result.returncode == 0, result.stderr[-5000:]
    return site


def page_soup(site: Path, page: str) -> BeautifulSoup:
    return BeautifulSoup((site / page / "index.html").read_text(), "html.parser")


def prose_text(soup: BeautifulSoup) -> str:
    """The page's visible text (navigation and table of contents included) without
    code, outputs, scripts or formulas already rendered."""
    hidden = "script, style, pre, code, math, .jp-OutputArea, .highlight-ipynb"
    for element in soup.select(hidden):
        element.decompose()
    return soup.body.get_text()


def test_strict_build_writes_home_and_definition_pages(site):
    assert (site / "index.html").is_file()
    assert (site / "kl_definition" / "index.html").is_file()


def test_no_page_shows_raw_tex(site):
    for html in site.rglob("index.html"):
        text = prose_text(BeautifulSoup(html.read_text(), "html.parser"))
        leftovers = [tex for tex in TEX_LEFTOVERS if tex in text]
        assert not leftovers, f"raw TeX left in {html.relative_to(site)}: {leftovers}"


def test_definition_page_formulas_are_mathml(site):
    soup = page_soup(site, "kl_definition")
    assert len(soup.find_all("math", attrs={"display": "block"})) >= 5
    assert len(soup.find_all("math", attrs={"display": "inline"})) >= 20


def test_definition_page_shows_outputs_executed_at_build(site):
    html = (site / "kl_definition" / "index.html").read_text()
    assert f"KL(P‖Q) = {kl_definition.kl_pq:.4f} nats" in html
    assert f"KL(Q‖P) = {kl_definition.kl_qp:.4f} nats" in html
    figures = re.findall(r'<img [^>]*src="(figure-[0-9a-f]+\.png)"', html)
    assert len(figures) == 1  # drawn at build, published beside the page
    assert (site / "kl_definition" / figures[0]).stat().st_size > 10_000


def local_links(html_file: Path, site: Path):
    """(url, target file, fragment) for every href, src and poster on this site."""
    soup = BeautifulSoup(html_file.read_text(), "html.parser")
    urls = [
        element[attribute]
        for attribute in ("href", "src", "poster")
        for element in soup.find_all(**{attribute: True})
    ]
    for url in urls:
        if urlsplit(url).scheme or url.startswith(("//", "mailto:", "data:")):
            continue
        path, fragment = urlsplit(url).path, urlsplit(url).fragment
        base = site if path.startswith("/") else html_file.parent
        target = (base / path.lstrip("/")).resolve() if path else html_file
        yield url, target / "index.html" if target.is_dir() else target, fragment


def element_ids(html_file: Path) -> set[str]:
    soup = BeautifulSoup(html_file.read_text(), "html.parser")
    return {element["id"] for element in soup.find_all(id=True)}


def test_every_link_asset_and_anchor_on_the_site_exists(site):
    broken, ids = [], {}
    for html in site.rglob("*.html"):
        for url, target, fragment in local_links(html, site):
            if not target.is_file():
                broken.append(f"{html.relative_to(site)} -> {url}: no such file")
            elif fragment and target.suffix == ".html":
                ids.setdefault(target, element_ids(target))
                if fragment not in ids[target]:
                    broken.append(f"{html.relative_to(site)} -> {url}: no such anchor")
    assert not broken, "\n".join(broken)


def test_animations_fit_their_budget_and_are_shown_on_their_page(site):
    videos = sorted(site.rglob("*.mp4"))
    assert len(videos) >= 3
    for video in videos:
        assert video.stat().st_size <= 150 * 1024, video
        page = (video.parent / "index.html").read_text()
        assert f'src="{video.name}"' in page and f'poster="{video.stem}.png"' in page


def test_math_font_is_served_by_the_site(site):
    font = site / "assets" / "fonts" / "math.woff"
    assert font.stat().st_size > 1000
    stylesheet = (site / "stylesheets" / "site.css").read_text()
    assert "../assets/fonts/math.woff" in stylesheet


def write_project_with_page(project: Path, cell: str) -> None:
    """A copy of the site whose only snippet page runs ``cell``."""
    for part in PROJECT_PARTS:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, project / part, dirs_exist_ok=True)
        else:
            shutil.copy(source, project / part)
    config = yaml.safe_load((project / "mkdocs.yml").read_text())
    config["nav"] = [{"Home": "index.md"}, {"Example": "example_page.py"}]
    (project / "mkdocs.yml").write_text(yaml.safe_dump(config, allow_unicode=True))
    (project / "docs" / "index.md").write_text("# Home\n\n[Example](example_page.py)\n")
    (project / "snippets").mkdir(exist_ok=True)
    (project / "snippets" / "example_page.py").write_text(
        f"# %% [markdown]\n# # Example\n\n# %%\n{cell}\n"
    )


def test_a_cell_that_raises_fails_the_build_naming_the_page(tmp_path):
    write_project_with_page(tmp_path, 'print("this cell runs")')
    passing = mkdocs_build(tmp_path, tmp_path / "site")
    assert passing.returncode == 0, passing.stderr[-3000:]  # the copy itself builds

    write_project_with_page(tmp_path, 'raise RuntimeError("this cell fails")')
    failing = mkdocs_build(tmp_path, tmp_path / "site")
    assert failing.returncode != 0
    assert "example_page.py" in failing.stderr
    assert "this cell fails" in failing.stderr
