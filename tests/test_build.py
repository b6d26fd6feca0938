"""The strict build: every page built, executed, with math, and failures loud."""

import functools
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import imageio_ffmpeg
import pytest
from bs4 import BeautifulSoup
from bs4.element import CData, NavigableString
from conftest import mkdocs_build, read_mkdocs_yml, write_project

from sitebuild import pages
from sitebuild.pages import snippet_pages
from snippets import kl_definition

ROOT = Path(__file__).resolve().parents[1]
TEX_LEFTOVERS = ["$", "\\(", "\\[", "\\frac", "\\mathrm"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(built_site):
    return built_site


@functools.cache
def parsed(html: Path) -> BeautifulSoup:
    """Each built page parsed once for the whole module; tests only read it."""
    return BeautifulSoup(html.read_text(), "html.parser")


def page_soup(site: Path, page: str) -> BeautifulSoup:
    return parsed(site / page / "index.html")


def text_outside(element, hidden: str, separator: str = "") -> str:
    """``element``'s text, leaving out what is inside elements matching ``hidden``."""
    left_out = {id(found) for found in element.select(hidden)}
    return separator.join(
        text
        for text in element.find_all(string=True)
        if not any(id(parent) in left_out for parent in text.parents)
        and type(text) in (NavigableString, CData)  # what get_text() keeps
    )


def prose_text(soup: BeautifulSoup) -> str:
    """The page's visible text (navigation and table of contents included) without
    code, outputs, scripts or formulas already rendered."""
    hidden = "script, style, pre, code, math, .jp-OutputArea, .highlight-ipynb"
    return text_outside(soup.body, hidden)


def test_strict_build_writes_home_and_definition_pages(site):
    assert (site / "index.html").is_file()
    assert (site / "kl_definition" / "index.html").is_file()


def test_no_page_shows_raw_tex(site):
    for html in site.rglob("index.html"):
        text = prose_text(parsed(html))
        leftovers = [tex for tex in TEX_LEFTOVERS if tex in text]
        assert not leftovers, f"raw TeX left in {html.relative_to(site)}: {leftovers}"


def test_definition_page_formulas_are_mathml(site):
    soup = page_soup(site, "kl_definition")
    assert len(soup.find_all("math", attrs={"display": "block"})) >= 2
    inline = soup.find_all("math", attrs={"display": None})  # inline: the default
    assert len(inline) >= 20


def test_definition_page_shows_outputs_executed_at_build(site):
    html = (site / "kl_definition" / "index.html").read_text()
    assert f"KL(P‖Q) = {kl_definition.kl_pq:.4f} nats" in html
    assert f"KL(Q‖P) = {kl_definition.kl_qp:.4f} nats" in html
    figures = re.findall(r'<img [^>]*src="(figure-[0-9a-f]+\.png)"', html)
    assert len(figures) == 1  # drawn at build, published beside the page
    assert (site / "kl_definition" / figures[0]).stat().st_size > 10_000


def local_links(html_file: Path, site: Path):
    """(url, target file, fragment) for every href, src and poster on this site."""
    soup = parsed(html_file)
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
    soup = parsed(html_file)
    return {element["id"] for element in soup.find_all(id=True)}


def test_every_link_asset_and_anchor_on_the_site_exists(site):
    broken, ids = [], {}
    for html in site.rglob("*.html"):
        for url, target, fragment in local_links(html, site):
            if not target.is_file():
                broken.append(f"{html.relative_to(site)} -> {url}: no such file")
            elif fragment and target.suffix == ".html":
                if target not in ids:
                    ids[target] = element_ids(target)
                if fragment not in ids[target]:
                    broken.append(f"{html.relative_to(site)} -> {url}: no such anchor")
    assert not broken, "\n".join(broken)


def test_animations_fit_their_budget_and_are_shown_on_their_page(site):
    videos = sorted(site.rglob("*.mp4"))
    # forward_reverse_animated animates both fits; mse_cosine shows a figure
    assert {video.stem for video in videos} >= {"forward_kl", "reverse_kl"}
    for video in videos:
        assert video.stat().st_size <= 150 * 1024, video
        page = (video.parent / "index.html").read_text()
        assert f'src="{video.name}"' in page and f'poster="{video.stem}.png"' in page


def test_each_animation_is_a_figure_whose_caption_says_what_happens(site):
    videos = [
        (html, video)
        for html in notebook_pages(site)
        for video in page_soup(site, html.parent.name).select("article video")
    ]
    assert len(videos) >= 2
    for html, video in videos:
        figure = video.find_parent("figure")
        assert figure is not None, (html, video)
        caption = figure.find("figcaption")
        assert caption is not None and caption.get("id"), (html, figure)
        assert video.get("aria-describedby") == caption["id"]
        assert len(caption.get_text().split()) >= 15, caption  # a sentence, not a name
        # the size is known before the video loads (no layout shift), and is
        # the frames' own, so the box the page keeps is the one the video fills
        assert (int(video["width"]), int(video["height"])) == frame_size(
            html.parent / video["src"]
        )


def frame_size(mp4: Path) -> tuple[int, int]:
    frames = imageio_ffmpeg.read_frames(str(mp4))
    size = next(frames)["size"]  # the first item is the metadata
    frames.close()
    return tuple(size)


def test_every_page_weighs_at_most_150_kb(site):
    heavy = {
        str(html.relative_to(site)): html.stat().st_size
        for html in site.rglob("*.html")
        if html.stat().st_size > 150 * 1024
    }
    assert heavy == {}


def notebook_pages(site):
    return [site / page.stem / "index.html" for page in snippet_pages()]


def test_notebook_pages_carry_no_inline_styles_or_scripts(site):
    for html in notebook_pages(site):
        article = parsed(html).select_one("article")
        assert article.find("style") is None, html
        assert article.find("script") is None, html


def test_media_load_lazily(site):
    for html in notebook_pages(site):
        soup = parsed(html)
        for image in soup.select("article img"):
            assert image.get("loading") == "lazy", (html, image)
        for video in soup.select("article video"):
            assert video.get("preload") == "none", (html, video)


def test_search_index_holds_the_prose_not_the_outputs(site):
    index = json.loads((site / "search" / "search_index.json").read_text())
    text = " ".join(doc["text"] for doc in index["docs"])
    assert "cost nothing" in text  # prose of the definition page
    assert "0.1838 nats" not in text  # one of its printed outputs


def test_search_finds_each_sentence_on_its_page_not_in_the_claims_lists(site):
    index = json.loads((site / "search" / "search_index.json").read_text())
    locations = {doc["location"].split("#")[0] for doc in index["docs"]}
    assert "claims/" in locations  # the overview
    assert not [
        where
        for where in locations
        if where.startswith("claims/") and where != "claims/"
    ]


def test_notebook_pages_offer_their_source_and_executed_notebook(site):
    for page in snippet_pages():
        folder = site / page.stem
        assert (folder / page.name).read_text() == page.read_text()
        notebook = json.loads((folder / f"{page.stem}.ipynb").read_text())
        outputs = [cell.get("outputs") for cell in notebook["cells"]]
        assert any(outputs), page.stem  # executed, outputs included
        html = (folder / "index.html").read_text()
        assert f'href="{page.stem}.ipynb"' in html and f'href="{page.name}"' in html


def test_admonitions_render_on_notebook_pages(site):
    soup = page_soup(site, "reductions")
    admonition = soup.select_one("div.admonition.warning")
    assert admonition is not None
    assert (
        admonition.select_one(".admonition-title").get_text().startswith("The default")
    )


def test_every_page_has_one_title_and_no_markdown_left_unrendered(site):
    """A prose line starting with `#6586` once became a second <h1>, and
    `[text][label]` links inside admonitions once stayed raw text."""
    raw_reference_link = re.compile(r"\]\[[^\]]+\]")
    for html in notebook_pages(site):
        article = parsed(html).select_one("article")
        assert len(article.find_all("h1")) == 1, html
        text = text_outside(article, "pre, code, .jp-OutputArea", " ")
        raw = raw_reference_link.search(text)
        assert raw is None, (html, raw)
        assert "!!! " not in text, html


def test_math_font_is_served_by_the_site(site):
    font = site / "assets" / "fonts" / "math.woff"
    assert font.stat().st_size > 1000
    stylesheet = (site / "stylesheets" / "site.css").read_text()
    assert "../assets/fonts/math.woff" in stylesheet


def write_project_with_page(project: Path, cell: str) -> None:
    """A copy of the site whose only snippet page runs ``cell``."""
    write_project(project, {"example_page": cell})


def test_a_cell_that_raises_fails_the_build_naming_the_page(tmp_path):
    write_project_with_page(tmp_path, 'print("this cell runs")')
    passing = mkdocs_build(tmp_path, tmp_path / "site")
    assert passing.returncode == 0, passing.stderr[-3000:]  # the copy itself builds

    write_project_with_page(tmp_path, 'raise RuntimeError("this cell fails")')
    failing = mkdocs_build(tmp_path, tmp_path / "site")
    assert failing.returncode != 0
    assert "example_page.py" in failing.stderr
    assert "this cell fails" in failing.stderr


def test_a_deploy_publishes_its_own_addresses_from_the_environment(tmp_path):
    # what .github/workflows/docs.yml sets: a fork publishes under its own name
    write_project_with_page(tmp_path, 'print("a page")')
    env = {
        "SITE_URL": "https://fork.github.io/kl/",
        "REPO_URL": "https://github.com/fork/kl",
        "EDIT_URI": "edit/main/docs/",
    }
    build = mkdocs_build(tmp_path, tmp_path / "site", env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    site = tmp_path / "site"
    sitemap = (site / "sitemap.xml").read_text()
    assert "https://fork.github.io/kl/example_page/" in sitemap
    soup = page_soup(site, "example_page")
    canonical = soup.find("link", rel="canonical")["href"]
    assert canonical == "https://fork.github.io/kl/example_page/"
    assert soup.find("meta", property="og:url")["content"] == canonical
    hrefs = [link["href"] for link in soup.find_all("a", href=True)]
    colab = "https://colab.research.google.com/github/fork/kl/blob/gh-pages/"
    assert any(href.startswith(colab) for href in hrefs)
    assert "https://github.com/fork/kl/edit/main/snippets/example_page.py" in hrefs
    assert (
        "https://fork.github.io/kl/example_page/index.md"
        in (site / "llms.txt").read_text()
    )


def meta_description(soup: BeautifulSoup) -> str:
    return soup.find("meta", attrs={"name": "description"})["content"]


def test_each_page_has_its_own_description_its_opening_answer(site):
    described = {}
    for html in [site / "index.html", *notebook_pages(site)]:
        soup = parsed(html)
        description = meta_description(soup)
        opening = " ".join(soup.select_one("article p:not([class])").get_text().split())
        squeezed = "".join(opening.replace("✓", "").split())  # markers and spaces
        assert squeezed.startswith("".join(description.removesuffix("…").split()))
        described[str(html.relative_to(site))] = description
    assert len(set(described.values())) == len(described)  # none shared
    # the whole opening, not cut short by a quote it holds (argument_order's does)
    assert all(40 <= len(text) <= 160 for text in described.values()), described


def test_search_dialog_has_a_name(site):
    dialog = page_soup(site, "kl_definition").select_one(".md-search[role=dialog]")
    assert dialog.get("aria-label")


LLMS_LINK = re.compile(r"^- \[(?P<title>[^\]]+)\]\((?P<url>[^)]+)\)", re.M)


def test_llms_txt_lists_every_page_in_reading_order_with_its_markdown(site):
    listing = (site / "llms.txt").read_text()
    assert listing.startswith("# KL divergence in PyTorch")
    urls = [match["url"] for match in LLMS_LINK.finditer(listing)]
    paths = [urlsplit(url).path.removeprefix("/") for url in urls]
    assert all((site / path).is_file() for path in paths), paths
    order = pages.nav_order(read_mkdocs_yml(ROOT / "mkdocs.yml")["nav"])
    stems = [path.removesuffix("/index.md") for path in paths[1:]]
    assert stems == sorted(stems, key=lambda stem: order[f"{stem}.py"])
    assert set(stems) == {page.stem for page in snippet_pages()}


def test_a_pages_markdown_holds_its_prose_code_and_printed_results(site):
    markdown = (site / "kl_definition" / "index.md").read_text()
    assert markdown.startswith("# ")
    assert "```python\nimport torch" in markdown
    assert f"KL(P‖Q) = {kl_definition.kl_pq:.4f} nats" in markdown
    assert "{✓" not in markdown and "<button" not in markdown
    for figure in re.findall(r"!\[[^\]]*\]\((figure-[0-9a-f]+\.png)\)", markdown):
        assert (site / "kl_definition" / figure).is_file()
