"""Links between pages, resolved in notebook pages as MkDocs does in Markdown.

MkDocs rewrites ``[text](other_page.md)`` in Markdown pages to the other page's URL
and warns about targets that do not exist. mkdocs-jupyter hands over finished HTML,
so links in notebook cells would stay ``other_page.py`` and break; this module
gives them the same treatment.
"""

import logging
import posixpath
import re

from mkdocs.structure.files import Files
from mkdocs.utils import get_relative_url

log = logging.getLogger("mkdocs.plugins.sitebuild")
PAGE_LINK = re.compile(r'href="(?P<path>[^":#?]+\.(?:py|md))(?P<anchor>#[^"]*)?"')


def site_map(files: Files) -> dict[str, str]:
    """Each page's source path and URL: all that links (and their cache) need."""
    return {file.src_uri: file.url for file in files.documentation_pages()}


def resolve_page_links(html: str, page_uri: str, urls: dict[str, str]) -> str:
    """Point ``href="page.py"`` and ``href="page.md"`` at the built pages' URLs
    (``urls``: the ``site_map``)."""

    def resolve(match: re.Match) -> str:
        target_uri = posixpath.normpath(
            posixpath.join(posixpath.dirname(page_uri), match["path"])
        )
        if target_uri not in urls:
            log.warning(f"{page_uri}: link to '{match['path']}', which is no page")
            return match.group(0)
        url = get_relative_url(urls[target_uri], urls[page_uri])
        return f'href="{url}{match["anchor"] or ""}"'

    return PAGE_LINK.sub(resolve, html)
