"""The build's own machinery: TeX to MathML, links between notebook pages."""

import logging
import os
from pathlib import Path

import material
import nbformat
import pytest
from bs4 import BeautifulSoup
from mkdocs.structure.files import File, Files
from mkdocs_jupyter.plugin import NotebookFile

from sitebuild import (
    admonitions,
    execute,
    links,
    mathfont,
    mathml,
    notebook_html,
    pages,
    workers,
)


def test_unknown_tex_command_fails_naming_page_and_formula():
    with pytest.raises(mathml.MathError, match=r"page\.py.*\\foo"):
        mathml.tex_to_mathml(r"\foo x", display=False, page="page.py")


def test_leading_and_bracketed_signs_are_unary():
    rendered = mathml.tex_to_mathml(r"(-\infty) = -1, x - y", display=False)
    assert rendered.count('form="prefix"') == 2
    assert "<mi>&#x0221E;</mi>" in rendered  # infinity is a symbol


def test_log_gets_a_thin_space_unless_a_bracket_follows():
    assert "<mspace" in mathml.tex_to_mathml(r"\log P", display=False)
    assert "<mspace" not in mathml.tex_to_mathml(r"\log(P)", display=False)


def test_notebook_dollar_math_becomes_mathml_but_code_is_left_alone():
    html = (
        '<div class="jp-RenderedMarkdown"><p>Let $x^2$ and</p>'
        "<p>$$\\sum_i a_i$$</p><p><code>$HOME</code> costs $5</p></div>"
    )
    rendered, characters = mathml.render_math(html, page="page.py")
    assert rendered.count("<math") == 2
    assert 'display="block"' in rendered
    assert "<code>$HOME</code>" in rendered
    assert {"x", "2", "∑"} <= characters


def test_a_square_root_asks_the_font_for_its_radical_sign():
    # the browser draws √ from the math font; the markup holds no such character
    html = '<div class="jp-RenderedMarkdown"><p>error as $1/\\sqrt{n}$</p></div>'
    rendered, characters = mathml.render_math(html, page="page.py")
    assert "<msqrt>" in rendered
    assert "\u221a" not in BeautifulSoup(rendered, "html.parser").get_text()
    assert "\u221a" in characters


def test_arithmatex_markup_becomes_mathml():
    html = '<p><span class="arithmatex">\\(a+b\\)</span></p>'
    rendered, _ = mathml.render_math(html, page="index.md")
    assert "arithmatex" not in rendered
    assert "<math" in rendered


def test_math_italics_are_added_for_letters():
    assert "\U0001d465" in mathfont.with_math_italics({"x"})  # 𝑥
    assert "\u210e" in mathfont.with_math_italics({"h"})  # ℎ stands in for italic h


def test_math_font_subset_is_written(tmp_path):
    font = tmp_path / "math.woff"
    mathfont.write_subset({"x", "∑"}, font)
    assert font.read_bytes()[:4] == b"wOFF"


def notebook_site(tmp_path):
    """Two notebook pages and a Markdown home page, as the build sees them."""
    site = str(tmp_path / "site")
    files = []
    for name in ["a.py", "b.py", "index.md"]:
        (tmp_path / name).write_text("")
        file = File(name, str(tmp_path), site, use_directory_urls=True)
        if name.endswith(".py"):
            file = NotebookFile(file, use_directory_urls=True, site_dir=site)
        files.append(file)
    return Files(files)


def test_links_in_notebook_pages_point_at_built_pages(tmp_path):
    files = notebook_site(tmp_path)
    html = '<a href="b.py#section">B</a> <a href="index.md">home</a>'
    resolved = links.resolve_page_links(html, "a.py", links.site_map(files))
    assert 'href="../b/#section"' in resolved
    assert 'href="../"' in resolved


def test_link_to_a_missing_page_warns(tmp_path, caplog):
    files = notebook_site(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.sitebuild"):
        urls = links.site_map(files)
        links.resolve_page_links('<a href="missing.py">?</a>', "a.py", urls)
    assert "missing.py" in caplog.text


def test_admonition_becomes_material_html_with_its_body_rendered():
    source = '!!! tip "Stay in log space"\n    Use `log_softmax` and $x$.\n\nAfter.'
    rendered = admonitions.render(source)
    assert rendered.startswith('<div class="admonition tip">')
    assert "<code>log_softmax</code>" in rendered and "$x$" in rendered
    assert rendered.rstrip().endswith("After.")


def test_reference_links_in_an_admonition_use_the_cells_definitions():
    source = (
        '!!! tip "If you came here with…"\n    - a NaN: [the gradient][grad]\n\n'
        "Text.\n\n[grad]: nan_gradients.py#the-gradient\n"
    )
    rendered = admonitions.render(source)
    box = rendered[: rendered.index("</div>")]
    assert '<a href="nan_gradients.py#the-gradient">the gradient</a>' in box
    assert "[grad]" not in box


def test_downloads_row_follows_the_title():
    html = notebook_html.add_downloads("<h1>Title</h1><p>Text</p>", "page", None)
    assert html.index("page.ipynb") < html.index("<p>Text</p>")
    assert "Colab" not in html


def test_colab_link_only_with_a_github_repository():
    url = notebook_html.colab_url("https://github.com/owner/site.git", "page")
    assert url == (
        "https://colab.research.google.com/github/owner/site/blob/gh-pages/page/page.ipynb"
    )
    assert notebook_html.colab_url("https://gitlab.com/owner/site", "page") is None
    assert notebook_html.colab_url(None, "page") is None
    html = notebook_html.add_downloads("<h1>T</h1>", "page", "https://github.com/o/s")
    assert "Open in Colab" in html


def test_edit_link_of_a_snippet_page_points_into_snippets():
    url = notebook_html.snippet_edit_url(
        "https://github.com/owner/site", "edit/main/docs/", "page.py"
    )
    assert url == "https://github.com/owner/site/edit/main/snippets/page.py"
    assert notebook_html.snippet_edit_url(None, "edit/main/docs/", "page.py") is None


def test_simplified_notebook_html_uses_material_code_blocks():
    html = (
        '<div class="jp-Cell"><div class="jp-Cell" id="cell-id=x">'
        '<style>.big{}</style><div class="highlight-ipynb"><pre><span></span>'
        '<span class="n">x</span><span class="w"> </span><span class="o">=</span>'
        '</pre></div><div class="clipboard-copy-txt">x</div></div></div>'
    )
    simplified = notebook_html.simplify(html)
    assert "<style>" not in simplified and "clipboard-copy-txt" not in simplified
    # names and spaces take the code's own colour: no span
    assert (
        '<div class="highlight"><pre><code>x <span class="o">=</span></code>'
        in simplified
    )
    assert simplified.count("jp-Cell") == 1


def test_names_need_no_span_as_material_colours_them_like_plain_code():
    stylesheets = Path(material.__file__).parent / "templates/assets/stylesheets"
    css = next(stylesheets.glob("main.*.min.css")).read_text()
    assert ".highlight .n{color:var(--md-code-hl-name-color)}" in css
    assert "--md-code-hl-name-color:var(--md-code-fg-color)" in css


def test_cells_lose_editor_wrappers_and_their_tab_stops():
    html = (
        '<div class="jp-Cell jp-CodeCell"><div class="jp-Cell-inputWrapper"'
        ' tabindex="0"><div class="jp-InputArea jp-Cell-inputArea"><div'
        ' class="jp-CodeMirrorEditor jp-Editor"><div class="CodeMirror">'
        '<div class="highlight-ipynb"><pre>x</pre></div></div></div></div></div>'
        '<div class="jp-Cell-outputWrapper"><div class="jp-OutputArea"><div'
        ' class="jp-OutputArea-child"><div class="jp-OutputArea-output"><pre>1</pre>'
        "</div></div></div></div></div>"
        '<div class="jp-Cell jp-MarkdownCell"><div class="jp-Cell-inputWrapper"'
        ' tabindex="0"><div class="jp-InputArea"><div class="jp-RenderedHTMLCommon'
        ' jp-RenderedMarkdown" data-mime-type="text/markdown"><p>Prose</p>'
        "</div></div></div></div>"
    )
    simplified = notebook_html.simplify(html)
    assert "tabindex" not in simplified
    assert "CodeMirror" not in simplified and "Wrapper" not in simplified
    assert "jp-OutputArea-child" not in simplified
    assert '<div class="jp-InputArea"><div class="highlight">' in simplified
    assert '"><div class="jp-OutputArea-output"><pre>1</pre>' in simplified
    assert '<div class="jp-RenderedMarkdown"><p>Prose</p>' in simplified


def test_consecutive_prints_become_one_output_whatever_the_flushes():
    cell = nbformat.v4.new_code_cell("...")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="a\n"),
        nbformat.v4.new_output("stream", name="stdout", text="b\n"),  # a flush apart
        nbformat.v4.new_output("stream", name="stderr", text="warning\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": "figure"}),
        nbformat.v4.new_output("stream", name="stdout", text="c\n"),
    ]
    execute.merge_consecutive_streams(cell)
    assert [output.get("text") for output in cell.outputs] == [
        "a\nb\n",
        "warning\n",
        None,
        "c\n",
    ]


def test_a_page_is_parsed_again_once_its_file_changes(tmp_path):
    page = tmp_path / "page.py"
    page.write_text("# %% [markdown]\n# # First\n\n# %%\nx = 1\n")
    first = pages.read(page)
    assert pages.read(page) is first  # unchanged: parsed once
    page.write_text("# %% [markdown]\n# # Second title\n\n# %%\nx = 1\n")
    assert pages.title(page) == "Second title"


@pytest.mark.parametrize("expected", [1, workers.PARALLEL_FROM])  # here, workers
def test_a_job_that_fails_fails_the_build_naming_the_job(tmp_path, expected):
    missing = tmp_path / "missing.ipynb"
    with pytest.raises(workers.JobError, match=f"rendering {missing}"):
        with workers.Workers(expected, count=1) as pool:
            pool.submit(f"rendering {missing}", os.stat, missing)


def test_a_build_with_nothing_to_do_starts_no_worker():
    with workers.Workers(workers.PARALLEL_FROM) as pool:
        pass
    assert pool._pool is None


def test_a_few_jobs_run_here_many_in_worker_processes():
    assert not workers.Workers(workers.PARALLEL_FROM - 1).in_processes
    assert workers.Workers(workers.PARALLEL_FROM).in_processes


def wcag_contrast(colour: str, background: str = "ffffff") -> float:
    """WCAG 2's contrast ratio of two hex colours."""

    def luminance(hex_colour: str) -> float:
        channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (0, 2, 4)]
        linear = [
            c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
            for c in channels
        ]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    lighter, darker = sorted([luminance(colour), luminance(background)], reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_figure_text_reaches_4_5_to_1_on_the_white_figures_are_shown_on():
    rc = dict(
        line.split(":", 1)
        for line in (execute.KERNEL_DIR / "matplotlibrc").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    text_keys = ["text.color", "axes.labelcolor", "xtick.color", "ytick.color"]
    assert wcag_contrast("808080") < 4.5  # the grey it replaced, as axe found
    contrasts = {key: wcag_contrast(rc[key].strip()) for key in text_keys}
    assert all(ratio >= 4.5 for ratio in contrasts.values()), contrasts
