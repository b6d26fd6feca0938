"""Shared fixtures: the site built once per test run, and served on 127.0.0.1."""

import functools
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / ".cache" / "screenshots"


def mkdocs_build(project: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``project`` into ``site``."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        capture_output=True,
        text=True,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
        timeout=900,
    )


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("build") / "site"
    result = mkdocs_build(ROOT, site)
    assert result.returncode == 0, result.stderr[-5000:]
    return site


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the tests report what matters
        pass


@pytest.fixture(scope="session")
def site_url(built_site):
    """The built site over HTTP, as a reader's browser gets it."""
    handler = functools.partial(QuietHandler, directory=str(built_site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def pytest_terminal_summary(terminalreporter):
    if SCREENSHOTS.is_dir() and any(SCREENSHOTS.iterdir()):
        terminalreporter.write_line(f"screenshots of every page: {SCREENSHOTS}")
