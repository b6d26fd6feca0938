"""axe-core over every built page, in the four settings a reader meets: light
and dark, on a laptop (1280 px) and a phone (390 px). Prints each violation and
writes the summary to ``.cache/audit.md``; exits non-zero if any page fails.

    python -m sitebuild.audit [SITE_DIR]      (make audit)

Rules: WCAG 2.0, 2.1 and 2.2 A and AA, axe's best practices, and target-size.
"""

import functools
import json
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

from sitebuild.browser import (
    ALL_RULES,
    AXE,
    AXE_MISSING,
    CHROMIUM_FLAGS,
    axe_violations,
    chromium_path,
)
from sitebuild.screenshots import QuietHandler, page_paths

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    (scheme, screen, viewport)
    for screen, viewport in [
        ("laptop", {"width": 1280, "height": 900}),
        ("phone", {"width": 390, "height": 844}),
    ]
    for scheme in ("light", "dark")
]


def main(site: Path) -> int:
    from playwright.sync_api import sync_playwright

    if not AXE.is_file():
        raise SystemExit(AXE_MISSING)
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_port}"
    rows, failures, started = [], 0, time.perf_counter()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_FLAGS
        )
        for scheme, screen, viewport in SETTINGS:
            context = browser.new_context(viewport=viewport, color_scheme=scheme)
            page = context.new_page()
            paths, found = page_paths(site), 0
            for path in paths:
                page.goto(root + path, wait_until="load")
                violations = axe_violations(page, ALL_RULES)
                found += len(violations)
                for violation in violations:
                    print(f"{scheme} {screen} {path} {violation}")
            rows.append(f"| {scheme} | {screen} | {len(paths)} | {found} |")
            failures += found
            context.close()
        browser.close()
    server.shutdown()
    version = json.loads((AXE.parent / "package.json").read_text())["version"]
    seconds = time.perf_counter() - started
    report = "\n".join(
        [
            f"axe-core {version} over every page of {site}, in {seconds:.0f} s",
            "",
            "| scheme | screen | pages | violating nodes |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    output = ROOT / ".cache" / "audit.md"
    output.parent.mkdir(exist_ok=True)
    output.write_text(report + "\n")
    print(report)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "site"))
