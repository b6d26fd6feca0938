"""MkDocs hooks: snippet modules become executed pages, TeX becomes MathML.

MkDocs loads this file by path (``hooks:`` in mkdocs.yml), so the checkout's root
is put on ``sys.path`` to import the ``sitebuild`` package beside it.
"""

import html
import logging
import sys
from pathlib import Path

import mkdocs.plugins
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sitebuild import (  # noqa: E402
    claims,
    describe,
    execute,
    links,
    mathfont,
    notebook_html,
    pages,
    plain_markdown,
    postprocess,
    prerender,
    report,
    workers,
)

log = logging.getLogger("mkdocs.plugins.sitebuild")
CACHE_DIR = ROOT / ".cache" / "pages"
HTML_CACHE_DIR = ROOT / ".cache" / "html"

math_characters: set[str] = set()
executed_pages: dict[Path, execute.ExecutedPage] = {}  # this build's, by source
descriptions: dict[str, str | None] = {}  # by page source, for llms.txt
page_cache = postprocess.PageCache(HTML_CACHE_DIR)


def on_pre_build(config):
    math_characters.clear()
    page_cache.used.clear()
    page_cache.processed_here.clear()


@mkdocs.plugins.event_priority(100)  # before mkdocs-jupyter claims the notebooks
def on_files(files, config):
    jupyter = _jupyter_config(config)
    sources = pages.snippet_pages(ROOT / "snippets")
    try:
        with workers.Workers(len(sources)) as renderers:  # rendered once executed
            executed = execute.execute_pages(
                sources,
                CACHE_DIR,
                on_executed=lambda page: prerender.submit(
                    renderers, page.notebook, jupyter
                ),
            )
            for page in executed.values():  # executed by an earlier build
                prerender.submit(renderers, page.notebook, jupyter)
    except execute.PageExecutionError as error:
        raise PluginError(f"executing the snippet pages failed:\n{error}") from None
    except workers.JobError as error:
        raise PluginError(f"rendering an executed page failed: {error}") from None
    executed_pages.clear()
    executed_pages.update(executed)
    for source, page in executed.items():
        files.append(
            File.generated(config, source.name, abs_src_path=str(page.notebook))
        )
        published = [*page.media, source, page.download]
        for path in published:
            uri = f"{source.stem}/{path.name}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    content = report.build_report(executed)
    files.append(File.generated(config, report.SITE_PATH, content=content))
    order = pages.nav_order(config["nav"])  # the claims page lists in reading order
    sources = sorted(executed, key=lambda source: order.get(source.name, len(order)))
    titles = {source.stem: pages.title(source) for source in sources}
    for path, content in claims.claims_pages(ROOT, titles).items():
        files.append(File.generated(config, path, content=content))
    return files


def on_nav(nav, config, files):
    # mkdocs-jupyter (on_files) wrapped each notebook in a NotebookFile, which
    # recomputes abs_src_path from src_dir, and a generated file has none: give
    # the wrapper the executed notebook's path back.
    for file in files:
        wrapped = getattr(file, "file", None)
        if wrapped is not None and file.__dict__.get("abs_src_path") is None:
            file.__dict__["abs_src_path"] = wrapped.abs_src_path
    _process_notebook_pages_in_workers(config, files)
    return nav


def _process_notebook_pages_in_workers(config, files) -> None:
    """Before MkDocs renders the pages one by one (after on_nav): the notebook
    pages' HTML processed in worker processes, as ``on_page_content`` asks."""
    jupyter = _jupyter_config(config)
    notebooks = [
        (content, file.src_uri)
        for file in files.documentation_pages()
        if file.src_uri.endswith(".py")
        and (content := prerender.cached_content(Path(file.abs_src_path), jupyter))
    ]
    pages = [(_with_claims(html, uri), uri) for html, uri in notebooks]
    site_map, repo_url = links.site_map(files), config.get("repo_url")
    try:
        with workers.Workers(len(pages)) as processors:
            count = page_cache.fill(pages, site_map, repo_url, processors)
    except workers.JobError as error:
        raise PluginError(f"processing a page's HTML failed: {error}") from None
    if count:
        where = "in worker processes" if processors.in_processes else "here"
        log.info(f"processed {count} notebook pages ahead, {where}")


def on_page_content(html, page, config, files):
    if page.file.src_uri.endswith(".py"):
        html = _with_claims(html, page.file.src_uri)
    html, characters = page_cache.process(
        html, page.file.src_uri, links.site_map(files), config.get("repo_url")
    )
    math_characters.update(characters)
    return html


def _with_claims(html: str, src_uri: str) -> str:
    try:
        return claims.render(html, src_uri.removesuffix(".py"))
    except claims.UnknownClaim as error:
        raise PluginError(str(error)) from None


def _jupyter_config(config) -> dict:
    return dict(config["plugins"]["mkdocs-jupyter"].config)


def on_page_context(context, page, config, nav):
    if "description" not in page.meta:  # front matter wins
        text = describe.description(page.content or "")
        descriptions[page.file.src_uri] = text
        # the theme puts it in an attribute as it is: quotes escaped here
        page.meta["description"] = html.escape(text) if text else None
    else:
        descriptions[page.file.src_uri] = page.meta["description"]
    if page.file.src_uri.endswith(".py"):
        page.edit_url = notebook_html.snippet_edit_url(
            config.get("repo_url"), config.get("edit_uri"), page.file.src_uri
        )
    return context


def on_post_build(config):
    _write_plain_markdown(config)
    font = Path(config["site_dir"], mathfont.SITE_PATH)
    mathfont.write_subset(math_characters, font, cache_dir=ROOT / ".cache" / "fonts")
    page_cache.forget_unused()
    one_by_one = [uri for uri in page_cache.processed_here if uri.endswith(".py")]
    if one_by_one:  # the workers' keys missed what MkDocs asked for: slower
        log.info(f"notebook pages processed one by one, not ahead: {one_by_one}")


def _write_plain_markdown(config) -> None:
    """Each notebook page as <page>/index.md, the home page as index.md, and
    llms.txt listing them in reading order (sitebuild/plain_markdown.py)."""
    site = Path(config["site_dir"])
    home = Path(config["docs_dir"]) / "index.md"
    (site / "index.md").write_text(home.read_text())
    entries = [(config["site_name"], "", descriptions.get("index.md"))]
    order = pages.nav_order(config["nav"])
    for source in sorted(executed_pages, key=lambda s: order.get(s.name, len(order))):
        markdown = plain_markdown.page_markdown(executed_pages[source].download)
        (site / source.stem / "index.md").write_text(markdown)
        title = pages.title(source)
        entries.append((title, f"{source.stem}/", descriptions.get(source.name)))
    listing = plain_markdown.llms_txt(
        config["site_name"], config["site_description"], config["site_url"], entries
    )
    (site / "llms.txt").write_text(listing)
