"""The Chromium that the browser suite and the screenshots drive."""

import os
import shutil

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
