"""Notebook pages rewritten to look, weigh and behave like the site's other pages.

mkdocs-jupyter renders a notebook with JupyterLab's stylesheet inlined (575 KB on
every page), a clipboard widget and a hidden copy of every code cell, a MathJax
and a Mermaid loader pointing at a CDN, and its own code-block markup. Here the
inline styles and scripts go (site.css styles cells once, cached), code blocks take
Material's markup, so they get its highlighting, its copy button and its dark
theme, and outputs are left out of the search index.
"""

from bs4 import BeautifulSoup

REMOVED_TAGS = {
    "style",  # JupyterLab's CSS, inlined on every page
    "script",  # clipboard widget, MathJax configuration, Mermaid loader
}
REMOVED_CLASSES = {
    "zeroclipboard-container",  # mkdocs-jupyter's copy button
    "clipboard-copy-txt",  # a hidden second copy of every code cell
    "jp-Collapser",  # empty
}


def simplify(page_html: str) -> str:
    """The notebook's HTML, with Material's code blocks and no inline assets."""
    soup = BeautifulSoup(page_html, "html.parser")
    simplify_soup(soup)
    return str(soup)


def simplify_soup(soup) -> None:
    """``simplify`` on a parsed page, in place.

    Elements are found with Beautiful Soup's own matching, not CSS selectors:
    soupsieve's were most of a clean build's page processing."""
    for element in soup.find_all(
        lambda tag: tag.name in REMOVED_TAGS or _has_class(tag, REMOVED_CLASSES)
    ):
        element.decompose()
    _unwrap_nested_cells(soup)
    _flatten_cells(soup)
    for index, cell in enumerate(soup.find_all(class_="jp-Cell")):
        cell["id"] = f"cell-{index + 1}"  # nbconvert repeats one id on every cell
    for block in soup.find_all("div", class_="highlight-ipynb"):
        _as_material_code_block(soup, block)
    for outputs in soup.find_all(class_="jp-OutputArea"):
        outputs["data-search-exclude"] = ""  # search finds prose, not tensors
    for anchor in soup.find_all("a", class_="anchor-link"):
        anchor["class"] = ["headerlink"]  # Material shows it on hover only


def _has_class(tag, classes: set[str]) -> bool:
    return not classes.isdisjoint(tag.get("class") or ())


def _unwrap_nested_cells(soup) -> None:
    # mkdocs-jupyter's template wraps each code cell in a second .jp-Cell div
    for outer in soup.find_all("div", class_="jp-Cell"):
        children = [child for child in outer.children if child.name]
        if len(children) == 1 and "jp-Cell" in children[0].get("class", []):
            outer.unwrap()


# JupyterLab's editor and layout wrappers: nothing styles them here, and each one
# costs bytes on every cell and, with tabindex, a stop in the keyboard's tab order.
WRAPPERS = {
    "jp-Cell-inputWrapper",
    "jp-CodeMirrorEditor",
    "CodeMirror",
    "jp-Cell-outputWrapper",
    "jp-OutputArea-child",
}
MARKDOWN_INPUT = ("jp-MarkdownCell", "jp-InputArea")  # a Markdown cell's input area
# what site.css, the math and the tests select
KEPT_CLASSES = ["jp-InputArea", "jp-RenderedMarkdown", "jp-OutputArea"]


def _flatten_cells(soup) -> None:
    for wrapper in soup.find_all(_is_wrapper):
        wrapper.unwrap()
    for kept in KEPT_CLASSES:
        for element in soup.find_all(class_=kept):
            element["class"] = [kept]
            element.attrs.pop("data-mime-type", None)


def _is_wrapper(tag) -> bool:
    if _has_class(tag, WRAPPERS):
        return True
    cell, area = MARKDOWN_INPUT
    return _has_class(tag, {area}) and tag.find_parent(class_=cell) is not None


def _as_material_code_block(soup, block) -> None:
    """<div class="highlight-ipynb"><pre>…</pre></div> → Material's <pre><code>."""
    block["class"] = ["highlight"]
    # Spaces need no colour, and Material gives names (.n) the code's own colour:
    # unwrapped, a page's code weighs half as much and looks the same.
    for plain in block.find_all(_is_plain_span):
        plain.unwrap()
    pre = block.pre
    code = soup.new_tag("code")
    for child in list(pre.contents):
        code.append(child.extract())
    pre.append(code)


def _is_plain_span(tag) -> bool:  # span.w, span.n, span:not([class])
    if tag.name != "span":
        return False
    return "class" not in tag.attrs or _has_class(tag, {"w", "n"})


def add_downloads(page_html: str, stem: str, repo_url: str | None) -> str:
    """A row of links under the title: the page as a notebook, as a script, and in
    Colab when the site knows its GitHub repository."""
    soup = BeautifulSoup(page_html, "html.parser")
    add_downloads_soup(soup, stem, repo_url)
    return str(soup)


def add_downloads_soup(soup, stem: str, repo_url: str | None) -> None:
    """``add_downloads`` on a parsed page, in place."""
    links = [
        f'<a class="md-button" href="{stem}.ipynb" download>Notebook (.ipynb)</a>',
        f'<a class="md-button" href="{stem}.py" download>Script (.py)</a>',
    ]
    colab = colab_url(repo_url, stem)
    if colab:
        links.append(f'<a class="md-button" href="{colab}">Open in Colab</a>')
    row = f'<p class="page-downloads" data-search-exclude>{" ".join(links)}</p>'
    title = soup.find("h1")
    if title is None:
        soup.insert(0, BeautifulSoup(row, "html.parser"))
    else:
        title.insert_after(BeautifulSoup(row, "html.parser"))


def colab_url(repo_url: str | None, stem: str) -> str | None:
    """Colab opens notebooks from GitHub: the executed one on the gh-pages branch,
    where the deploy workflow publishes the built site."""
    prefix = "https://github.com/"
    if not repo_url or not repo_url.startswith(prefix):
        return None
    repository = repo_url.removeprefix(prefix).strip("/").removesuffix(".git")
    return (
        f"https://colab.research.google.com/github/{repository}"
        f"/blob/gh-pages/{stem}/{stem}.ipynb"
    )


def snippet_edit_url(repo_url: str | None, edit_uri: str | None, name: str):
    """Where to edit a snippet page: under snippets/, not docs/."""
    if not repo_url or not edit_uri:
        return None
    base = edit_uri.strip("/").removesuffix("docs").strip("/")
    return f"{repo_url.rstrip('/')}/{base}/snippets/{name}"
