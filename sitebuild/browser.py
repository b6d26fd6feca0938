"""The Chromium that the browser suite and the screenshots drive."""

import os
import shutil
from pathlib import Path

# Headless on a machine without a GPU or a network beyond the site's own server.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


def chromium_path() -> str | None:
    """Debian's Chromium, or any Chrome named by the CHROMIUM variable."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium")


# Every image loaded now, lazy ones included, and decoded; returns the addresses
# of those that did not load. A lazy image nothing scrolled to never settles its
# decode(): each gets ten seconds, so a slow machine fails, never hangs.
LOAD_EVERY_IMAGE = """async () => {
  const images = [...document.images];
  const settled = (image) => Promise.race([
    image.decode().catch(() => {}),
    new Promise((resolve) => setTimeout(resolve, 10000)),
  ]);
  images.forEach((image) => { image.loading = "eager"; });
  await Promise.all(images.map(settled));
  return images.filter((image) => !image.complete || image.naturalWidth === 0)
               .map((image) => image.src);
}"""


# axe-core (npm, pinned in package.json), injected into pages by the browser suite
# and by `make audit`.
ROOT = Path(__file__).resolve().parents[1]
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
AXE_MISSING = "axe-core is missing: run `npm ci` (make test and make audit do)"

# WCAG 2.0-2.2 A and AA, axe's best practices, and target size.
ALL_RULES = {
    "runOnly": {
        "type": "tag",
        "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]
        + ["best-practice"],
    },
    "rules": {"target-size": {"enabled": True}},
}
# The rules whose outcome the colour scheme can change: the dark theme changes
# colours only, not the page's elements, names or layout.
COLOUR_RULES = {
    "runOnly": {"type": "rule", "values": ["color-contrast", "link-in-text-block"]}
}

RUN_AXE = """async (options) => {
  const results = await axe.run(document, options);
  return results.violations.flatMap((violation) => violation.nodes.map(
    (node) => `${violation.id}: ${node.target.join(" ")}: ${node.failureSummary}`));
}"""


def axe_violations(page, options: dict) -> list[str]:
    """Every violating element on ``page``, one line each: rule, element, why."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        if not AXE.is_file():
            raise FileNotFoundError(AXE_MISSING)
        page.add_script_tag(path=AXE)
    return page.evaluate(RUN_AXE, options)


# Material picks its palette from the reader's preference when the page loads;
# a page already loaded is switched the way its palette toggle switches it.
def show_in_scheme(page, scheme: str) -> None:
    """Turn a loaded page light or dark, as a reader with that preference sees it,
    at once: the checks that follow see the colours Material fades to."""
    page.emulate_media(color_scheme=scheme)
    material = "slate" if scheme == "dark" else "default"
    page.evaluate(SWITCH_SCHEME, material)


SWITCH_SCHEME = """(scheme) => {
  const still = document.createElement("style");
  still.textContent = "*, *::before, *::after { transition: none !important; }";
  document.head.append(still);
  document.body.dataset.mdColorScheme = scheme;
  getComputedStyle(document.body).color;  // restyle now, with no fade
  still.remove();
}"""
