"""The build's own machinery: TeX to MathML, links between notebook pages."""

import logging

import pytest
from mkdocs.structure.files import File, Files
from mkdocs_jupyter.plugin import NotebookFile

from sitebuild import links, mathfont, mathml


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
    resolved = links.resolve_page_links(html, "a.py", files)
    assert 'href="../b/#section"' in resolved
    assert 'href="../"' in resolved


def test_link_to_a_missing_page_warns(tmp_path, caplog):
    files = notebook_site(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.sitebuild"):
        links.resolve_page_links('<a href="missing.py">?</a>', "a.py", files)
    assert "missing.py" in caplog.text
