"""Each page as plain Markdown, and ``llms.txt`` listing them: for a reader who
pastes a page into an assistant (https://llmstxt.org). Written at build time from
the executed notebooks: prose, the code a reader sees, and what it printed.

A page's Markdown is published beside it, as ``<page>/index.md``.
"""

import base64
import json
import re
from pathlib import Path

from sitebuild import execute, pages

CLAIM_MARKER = re.compile(r"\s*\{✓[^}]*\}")  # the site's buttons; noise as text
PAGE_LINK = re.compile(r"\]\((?P<page>[A-Za-z0-9_]+)\.py(?P<anchor>#[^)]*)?\)")
VIDEO = re.compile(
    r'<video src="(?P<src>[^"]+)".*?<figcaption[^>]*>(?P<caption>.*?)<', re.S
)


def page_markdown(executed_notebook: Path) -> str:
    """The executed notebook as Markdown: prose as written, code fenced as Python,
    each output fenced as text; figures named by the file the page shows."""
    notebook = json.loads(executed_notebook.read_text())
    parts = []
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            prose = CLAIM_MARKER.sub("", source)
            parts.append(PAGE_LINK.sub(r"](../\g<page>/\g<anchor>)", prose))
            continue
        if pages.HIDDEN_INPUT_TAG not in cell["metadata"].get("tags", []):
            parts.append(f"```python\n{source}\n```")
        parts.extend(_outputs(cell))
    return "\n\n".join(part.strip("\n") for part in parts if part.strip()) + "\n"


def _outputs(cell) -> list[str]:
    shown = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            shown.append(f"```text\n{''.join(output['text']).rstrip()}\n```")
        elif output["output_type"] == "error":
            shown.append(f"```text\n{output['ename']}: {output['evalue']}\n```")
        elif "image/png" in output.get("data", {}):
            raw = base64.b64decode(output["data"]["image/png"])
            alt = cell["metadata"].get("alt", execute.DEFAULT_ALT)
            shown.append(f"![{alt}]({execute.figure_name(raw, 'png')})")
        elif video := VIDEO.search(_html_of(output)):
            shown.append(f"[Animation: {video['caption']}]({video['src']})")
        elif "text/plain" in output.get("data", {}):
            shown.append(f"```text\n{''.join(output['data']['text/plain'])}\n```")
    return shown


def _html_of(output) -> str:
    return "".join(output.get("data", {}).get("text/html", ""))


def llms_txt(site_name: str, summary: str, site_url: str, entries) -> str:
    """``entries``: (title, page path under the site, description) in reading
    order. Links point at each page's Markdown."""
    lines = [f"# {site_name}", "", f"> {' '.join(summary.split())}", ""]
    lines += ["Each page as Markdown: its prose, its code and what it printed.", ""]
    lines += ["## Pages", ""]
    base = site_url.rstrip("/") + "/" if site_url else ""
    for title, path, description in entries:
        line = f"- [{title}]({base}{path}index.md)"
        lines.append(f"{line}: {description}" if description else line)
    return "\n".join(lines) + "\n"
