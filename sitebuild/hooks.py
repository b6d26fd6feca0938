"""MkDocs hooks: snippet modules become pages, TeX becomes MathML.

MkDocs loads this file by path (``hooks:`` in mkdocs.yml), so the checkout's root
is put on ``sys.path`` to import the ``sitebuild`` package beside it.
"""

import sys
from pathlib import Path

import mkdocs.plugins
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sitebuild import links, mathfont, mathml, pages  # noqa: E402

math_characters: set[str] = set()


def on_pre_build(config):
    math_characters.clear()


@mkdocs.plugins.event_priority(100)  # before mkdocs-jupyter claims the .py files
def on_files(files, config):
    for module in pages.snippet_pages(ROOT / "snippets"):
        files.append(
            File(
                module.name,
                src_dir=str(module.parent),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def on_page_content(html, page, config, files):
    if page.file.src_uri.endswith(".py"):  # notebook HTML: MkDocs left links alone
        html = links.resolve_page_links(html, page.file.src_uri, files)
    html, characters = mathml.render_math(html, page=page.file.src_uri)
    math_characters.update(characters)
    return html


def on_post_build(config):
    mathfont.write_subset(math_characters, Path(config["site_dir"], mathfont.SITE_PATH))
