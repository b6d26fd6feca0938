"""TeX in rendered pages becomes MathML at build time.

Browsers render MathML natively, so pages need no math script and nothing from a
CDN. Markdown pages mark their math with ``pymdownx.arithmatex`` (generic mode:
``\\(...\\)`` and ``\\[...\\]`` inside ``.arithmatex``); notebook pages keep the
``$...$`` and ``$$...$$`` of their Markdown cells as text, which nbconvert's
Markdown renderer has already separated from the surrounding Markdown.
"""

import html
import re

from bs4 import BeautifulSoup, NavigableString
from latex2mathml.converter import convert

NOTEBOOK_MARKDOWN = "jp-RenderedMarkdown"  # the class of a Markdown cell's HTML
SKIPPED_PARENTS = {"code", "pre", "script", "style", "math"}
DOLLAR_MATH = re.compile(
    r"\$\$(?P<display>.+?)\$\$|(?<![\\$])\$(?P<inline>[^$]+?)(?<!\\)\$", re.S
)
ARITHMATEX_DELIMITERS = re.compile(r"^\\[\[(](?P<tex>.*)\\[\])]$", re.S)
UNKNOWN_COMMAND = re.compile(r"<m[io][^>]*>\\[A-Za-z]+</m[io]>")
# TeX puts a thin space after \log and friends unless a bracket follows;
# latex2mathml emits a bare <mi>, which browsers set with no space at all.
FUNCTION_NAME = re.compile(
    r"(<mi>(?:log|ln|exp|sin|cos|tan)</mi>)(?!<mo[^>]*>(?:&#x00028;|\[))"
)
THIN_SPACE = r'\1<mspace width="0.1667em"></mspace>'
# TeX reads a sign after an operator or an opening bracket as unary (-x, (-inf));
# MathML would space it as a binary operator unless told its form.
UNARY_SIGN = re.compile(
    r"(<mrow>|<mo[^>]*>(?!&#x00029;|&#x0005D;|&#x0007D;|\)|\]|\})[^<]*</mo>)"
    r"<mo>(&#x02212;|&#x0002B;)</mo>"
)
UNARY_FORM = r'\1<mo form="prefix">\2</mo>'
INFINITY_AS_OPERATOR = "<mo>&#x0221E;</mo>"  # TeX's \infty is a symbol, not an operator
INFINITY_AS_SYMBOL = "<mi>&#x0221E;</mi>"


class MathError(ValueError):
    """TeX that cannot become MathML; the message names the page and formula."""


RADICAL = "\u221a"
# An HTML parser puts <math> in the MathML namespace and makes it inline by
# itself: on a page of formulas these attributes weigh kilobytes.
REDUNDANT = [' xmlns="http://www.w3.org/1998/Math/MathML"', ' display="inline"']


def tex_to_mathml(tex: str, display: bool, page: str = "?") -> str:
    """MathML for one formula; unknown TeX commands are an error, not text."""
    mathml = convert(tex.strip(), display="block" if display else "inline")
    mathml = FUNCTION_NAME.sub(THIN_SPACE, mathml)
    mathml = mathml.replace(INFINITY_AS_OPERATOR, INFINITY_AS_SYMBOL)
    mathml = UNARY_SIGN.sub(UNARY_FORM, mathml)
    for attribute in REDUNDANT:
        mathml = mathml.replace(attribute, "")
    unknown = UNKNOWN_COMMAND.search(mathml)
    if unknown:
        raise MathError(
            f"{page}: cannot render {unknown.group(0)} in the formula {tex!r}; "
            "latex2mathml does not know this command: rewrite the formula "
            "with commands it supports."
        )
    if display:  # a box that scrolls on narrow screens instead of the whole page
        return f'<span class="math-display">{mathml}</span>'
    return mathml


def render_math(page_html: str, page: str = "?") -> tuple[str, set[str]]:
    """The page with every formula as MathML, and the characters they use."""
    if "arithmatex" not in page_html and "$" not in page_html:
        return page_html, set()
    soup = BeautifulSoup(page_html, "html.parser")
    characters = render_math_soup(soup, page)
    return str(soup), characters


def render_math_soup(soup, page: str = "?") -> set[str]:
    """``render_math`` on a parsed page, in place: the characters formulas use."""
    for element in soup.find_all(class_="arithmatex"):
        _replace_arithmatex(element, page)
    for container in soup.find_all(class_=NOTEBOOK_MARKDOWN):
        for text in list(container.find_all(string=True)):
            if "$" in text and not _inside_code(text):
                _replace_dollar_math(text, page)
    characters = {c for math in soup.find_all("math") for c in math.get_text()}
    if soup.find(["msqrt", "mroot"]):
        characters.add(RADICAL)  # drawn by the browser, absent from the markup
    return characters - {" ", "\n"}


def _replace_arithmatex(element, page: str) -> None:
    match = ARITHMATEX_DELIMITERS.match(element.get_text())
    if match is None:
        raise MathError(f"{page}: unexpected arithmatex markup {element}")
    display = element.name == "div"
    mathml = tex_to_mathml(match["tex"], display=display, page=page)
    element.replace_with(BeautifulSoup(mathml, "html.parser"))


def _replace_dollar_math(text: NavigableString, page: str) -> None:
    pieces, position = [], 0
    for match in DOLLAR_MATH.finditer(text):
        pieces.append(html.escape(text[position : match.start()], quote=False))
        display = match["display"] is not None
        tex = match["display"] if display else match["inline"]
        pieces.append(tex_to_mathml(tex, display=display, page=page))
        position = match.end()
    if position == 0:
        return
    pieces.append(html.escape(text[position:], quote=False))
    text.replace_with(BeautifulSoup("".join(pieces), "html.parser"))


def _inside_code(text: NavigableString) -> bool:
    return any(parent.name in SKIPPED_PARENTS for parent in text.parents)
