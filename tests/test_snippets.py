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

from sitebuild import forkserver
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


# One thread, as the tests and the build's kernels: two copies run at once beside
# them, and torch's thread pools, oversubscribed, made them run 5x slower.
COPIED_ENVIRONMENT = {"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin"}
COPIED_ENVIRONMENT |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PRELOADED = [*forkserver.TORCH, "numpy", "matplotlib.pyplot"]


def run_as_shown(page: Path, workdir: Path, server: str) -> tuple[int, str]:
    """The page's shown code cells, joined, run as ``python -I`` runs a script in
    another directory: with the requirements and nothing from this checkout. It
    runs in a fork of such an interpreter that has imported torch, numpy and
    matplotlib, and nothing else (sitebuild/forkserver.py): the imports are the
    costly part, and the code still has to import every name it uses."""
    script = workdir / f"copied_from_{page.stem}.py"
    script.write_text(shown_code(page))
    env = COPIED_ENVIRONMENT | {"HOME": str(workdir)}
    status, _, stderr = forkserver.run_script(server, script, env, timeout=600)
    return status, stderr


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


def run_unless_passed(page: Path, workdir: Path, server: str) -> str | None:
    """None when the page's code runs as shown; else the end of its traceback."""
    marker = passed_marker(page)
    if marker.exists():
        return None
    status, stderr = run_as_shown(page, workdir, server)
    if status != 0:
        return f"exit status {status}\n{stderr[-3000:]}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return None


@pytest.fixture(scope="module")
def copy_server(tmp_path_factory):
    """The fork server that copied code runs in (see run_as_shown)."""
    home = COPIED_ENVIRONMENT | {"HOME": str(tmp_path_factory.mktemp("server"))}
    with forkserver.running(home, PRELOADED, isolated=True) as env:
        yield env[forkserver.SOCKET_VARIABLE]


@pytest.fixture(scope="module")
def runs_as_shown(tmp_path_factory, copy_server):
    """Every page run as shown, as many at once as there are cores."""
    workdirs = {page: tmp_path_factory.mktemp(page.stem) for page in PAGES}
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        futures = {
            page: pool.submit(run_unless_passed, page, workdirs[page], copy_server)
            for page in PAGES
        }
        return {page.stem: future.result() for page, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_page_code_runs_as_shown_with_only_the_requirements(runs_as_shown, name):
    assert runs_as_shown[name] is None, runs_as_shown[name]


COPY_MISTAKES = {
    "a name used without its import": ("x = torch.zeros(2)", 1, "NameError"),
    "an import from this checkout": ("import sitebuild", 1, "ModuleNotFoundError"),
    "an exit status": ("raise SystemExit(3)", 3, ""),
}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", COPY_MISTAKES)
def test_copied_code_fails_as_it_would_in_a_fresh_interpreter(
    tmp_path, copy_server, mistake
):
    code, expected_status, expected_error = COPY_MISTAKES[mistake]
    page = tmp_path / "page.py"
    page.write_text(f"# %%\n{code}\n")
    status, stderr = run_as_shown(page, tmp_path, copy_server)
    assert status == expected_status
    assert expected_error in stderr


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
