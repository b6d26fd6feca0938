"""Promises every snippet module keeps: cheap to import, and copyable as shown."""

import hashlib
import inspect
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jupytext
import pytest

from sitebuild.pages import shown_code_cells, snippet_pages

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements.txt"
PASSED_RUNS = ROOT / ".cache" / "copy-paste"  # make clean forgets them
PAGES = snippet_pages()
NAMES = [page.stem for page in PAGES]


def test_there_are_snippet_pages():
    assert NAMES, "no snippet modules found in snippets/"


# Imports every page in one fresh interpreter, noting what each import did.
IMPORT_EACH_PAGE = """
import contextlib, io, json, os, sys
sys.path.insert(0, sys.argv[1])
report, files_before = {}, set()
for name in sys.argv[2:]:
    modules_before, captured = set(sys.modules), io.StringIO()
    with contextlib.redirect_stdout(captured):
        __import__("snippets." + name)
    new_modules = set(sys.modules) - modules_before
    files = set(os.listdir("."))
    report[name] = {
        "stdout": captured.getvalue(),
        "plotting": sorted(m for m in new_modules if m.split(".")[0] == "matplotlib"),
        "files": sorted(files - files_before),
    }
    files_before = files
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def imports(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("imports")
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_PAGE, str(ROOT), *NAMES],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", NAMES)
def test_importing_a_snippet_prints_plots_and_writes_nothing(imports, name):
    report = imports[name]
    assert report["stdout"] == "", f"import printed: {report['stdout']!r}"
    assert report["plotting"] == [], "import loaded matplotlib"
    assert report["files"] == [], "import wrote files"


def run_as_shown(page: Path, workdir: Path) -> subprocess.CompletedProcess:
    """The page's shown code cells, joined, in a fresh interpreter that has the
    requirements but nothing from this checkout (-I, another directory)."""
    script = workdir / f"copied_from_{page.stem}.py"
    script.write_text(shown_code(page))
    return subprocess.run(
        [sys.executable, "-I", script.name],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={"MPLBACKEND": "Agg", "HOME": str(workdir), "PATH": "/usr/bin:/bin"},
        timeout=600,
    )


def shown_code(page: Path) -> str:
    return "\n\n".join(shown_code_cells(page)) + "\n"


def passed_marker(page: Path) -> Path:
    """Where a passing run of exactly this code, with exactly these requirements
    and this Python, is recorded: the same inputs pass again without rerunning,
    as the build reuses an executed page. Any change to them reruns it."""
    digest = hashlib.sha256()
    for part in [shown_code(page), REQUIREMENTS.read_text(), sys.version]:
        digest.update(part.encode())
    digest.update(inspect.getsource(run_as_shown).encode())
    return PASSED_RUNS / f"{page.stem}-{digest.hexdigest()[:16]}"


def run_unless_passed(page: Path, workdir: Path) -> str | None:
    """None when the page's code runs as shown; else the end of its traceback."""
    marker = passed_marker(page)
    if marker.exists():
        return None
    result = run_as_shown(page, workdir)
    if result.returncode != 0:
        return result.stderr[-3000:]
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return None


@pytest.fixture(scope="module")
def runs_as_shown(tmp_path_factory):
    """Every page run as shown, as many at once as there are cores."""
    workdirs = {page: tmp_path_factory.mktemp(page.stem) for page in PAGES}
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        futures = {
            page: pool.submit(run_unless_passed, page, workdirs[page]) for page in PAGES
        }
        return {page.stem: future.result() for page, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_page_code_runs_as_shown_in_a_fresh_interpreter(runs_as_shown, name):
    assert runs_as_shown[name] is None, runs_as_shown[name]


@pytest.mark.parametrize("page", PAGES, ids=NAMES)
def test_headings_are_plain_text(page):
    # the table of contents shows headings as text and links to their ids
    headings = [
        line
        for cell in jupytext.read(page).cells
        if cell.cell_type == "markdown"
        for line in cell.source.splitlines()
        if line.startswith("#")
    ]
    assert headings
    assert not [heading for heading in headings if set(heading) & {"$", "`"}]
