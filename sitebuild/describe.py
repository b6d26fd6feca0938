"""Each page's own description for search results and link previews: the opening
of its first paragraph, the answer the page leads with."""

import html
import re

FIRST_PARAGRAPH = re.compile(r"<p>(?P<content>.*?)</p>", re.S)  # <p class=…>: not prose
BUTTON = re.compile(r"<button\b.*?</button>", re.S)  # claim markers: a ✓ each
TAG = re.compile(r"<[^>]+>")
LIMIT = 160  # what search results show, about


def description(page_html: str, limit: int = LIMIT) -> str | None:
    """The first plain paragraph as text, cut at a word within ``limit``."""
    match = FIRST_PARAGRAPH.search(page_html)
    if match is None:
        return None
    text = TAG.sub("", BUTTON.sub("", match["content"]))
    text = " ".join(html.unescape(text).split())
    if len(text) <= limit:
        return text or None
    cut = text[: limit - 1].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + "…"
