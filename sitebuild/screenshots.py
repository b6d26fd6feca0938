"""Screenshots of every built page, for a person to look at: light and dark, on a
phone and on a laptop (``make screenshots``; the browser suite asserts, this only
shows). Written as JPEG to ``.cache/screenshots/``.

    python -m sitebuild.screenshots [SITE_DIR [PAGE ...]]

PAGE is a path under the site's root, such as /kl_definition/; all pages if none.
"""

import functools
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sitebuild.browser import CHROMIUM_FLAGS, LOAD_EVERY_IMAGE, chromium_path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".cache" / "screenshots"
SCREENS = {
    "phone": {"width": 390, "height": 844},
    "laptop": {"width": 1280, "height": 900},
}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def page_paths(site: Path) -> list[str]:
    """Every page of the site, as a path under its root."""
    folders = [index.parent.relative_to(site) for index in site.rglob("index.html")]
    return sorted("/" if folder == Path() else f"/{folder}/" for folder in folders)


def main(site: Path, paths: list[str] | None = None) -> None:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise SystemExit("no Chromium: apt-get install -y chromium, or set CHROMIUM")
    handler = functools.partial(QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_port}"
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_FLAGS
        )
        for screen, viewport in SCREENS.items():
            for scheme in ("light", "dark"):
                context = browser.new_context(viewport=viewport, color_scheme=scheme)
                page = context.new_page()
                for path in paths or page_paths(site):
                    page.goto(root + path, wait_until="load")
                    page.evaluate(LOAD_EVERY_IMAGE)  # a full-page shot scrolls none
                    name = path.strip("/").replace("/", "-") or "home"
                    shot = OUT / f"{name}-{screen}-{scheme}.jpg"
                    page.screenshot(path=shot, full_page=True, type="jpeg", quality=80)
                context.close()
        browser.close()
    server.shutdown()
    print(f"screenshots of every page: {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "site", sys.argv[2:])
