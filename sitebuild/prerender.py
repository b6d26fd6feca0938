"""Executed notebooks rendered to HTML in worker processes, ahead of MkDocs.

MkDocs renders pages one after another, and mkdocs-jupyter's conversion of a
notebook (nbconvert, which compiles its Jinja templates anew for every notebook)
costs ~0.5 s of CPU: on a clean build of 47 pages, 24 s on one core while the
other idled. mkdocs-jupyter caches what it renders, keyed by the notebook's bytes
and its settings. Here worker processes fill that cache, each page as soon as it
has been executed, by running the plugin's own rendering on it: MkDocs then finds
every page rendered and only reads the cache.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

from mkdocs_jupyter.plugin import Plugin, _compute_cache_key, _get_cache_path

from sitebuild.workers import Workers


def submit(workers: Workers, notebook: Path, plugin_config: dict) -> None:
    """Render ``notebook`` unless it is cached or already being rendered."""
    name = f"rendering {notebook}"
    if workers.submitted(name) or _cache_path(notebook, plugin_config).exists():
        return
    config = dict(plugin_config)
    workers.submit(name, render_into_cache, notebook, config, os.getcwd())


def cached_content(notebook: Path, plugin_config: dict) -> str | None:
    """The HTML mkdocs-jupyter has cached for ``notebook``, if it has."""
    path = _cache_path(notebook, plugin_config)
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["content"]


def _cache_path(notebook: Path, plugin_config: dict) -> Path:
    key = _compute_cache_key(notebook, plugin_config, plugin_config["execute"])
    return _get_cache_path(plugin_config["cache_dir"], key)


def render_into_cache(notebook: Path, plugin_config: dict, cwd: str) -> None:
    """What mkdocs-jupyter does to render a page, on a stand-in for the page with
    only what the plugin reads of it; its rendering writes the cache entry."""
    os.chdir(cwd)  # the plugin's cache_dir is relative to where MkDocs runs
    plugin = Plugin()
    plugin.config = plugin_config
    plugin.on_pre_build(config=None)
    page = SimpleNamespace(
        file=SimpleNamespace(abs_src_path=str(notebook), src_path=str(notebook)),
        abs_url="/",
    )
    plugin.on_pre_page(page, config=None, files=None)
    page.render(config=None, files=None)
