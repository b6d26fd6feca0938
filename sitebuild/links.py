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


def resolve_page_links(html: str, page_uri: str, files: Files) -> str:
    """Point ``href="page.py"`` and ``href="page.md"`` at the built pages' URLs."""
    page_file = files.get_file_from_path(page_uri)

    def resolve(match: re.Match) -> str:
        target_uri = posixpath.normpath(
            posixpath.join(posixpath.dirname(page_uri), match["path"])
        )
        target = files.get_file_from_path(target_uri)
        if target is None:
            log.warning(f"{page_uri}: link to '{match['path']}', which is no page")
            return match.group(0)
        url = get_relative_url(target.url, page_file.url)
        return f'href="{url}{match["anchor"] or ""}"'

    return PAGE_LINK.sub(resolve, html)
