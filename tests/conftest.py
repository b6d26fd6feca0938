"""Shared fixtures: the site built once per test run, and served on 127.0.0.1."""

import functools
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from hypothesis import HealthCheck, settings

# One thread per test process, as in the build's kernels: the same sums in the same
# order, and test workers that do not fight over the cores.
torch.set_num_threads(1)

# Property tests search the same examples on every run (CI and laptop agree), with no
# per-example deadline: a 128k-vocabulary example takes longer than a tiny one.
settings.register_profile(
    "site",
    derandomize=True,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("site")

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PARTS = ["mkdocs.yml", "requirements.txt", "docs", "overrides", "sitebuild"]


def mkdocs_build(project: Path, site: Path, env=None) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``project`` into ``site``, with ``env`` added
    to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        capture_output=True,
        text=True,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"} | (env or {}),
        timeout=900,
    )


class EnvValue(list):
    """mkdocs.yml's ``!ENV`` values (read from the environment by MkDocs), kept
    as written when a test reads the file and writes a copy."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


def _env_value(loader, node):
    if isinstance(node, yaml.SequenceNode):
        return EnvValue(loader.construct_sequence(node))
    return EnvValue([loader.construct_scalar(node)])


_Loader.add_constructor("!ENV", _env_value)
_Dumper.add_representer(
    EnvValue, lambda dumper, value: dumper.represent_sequence("!ENV", list(value))
)


def read_mkdocs_yml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)


def write_mkdocs_yml(path: Path, config: dict) -> None:
    path.write_text(yaml.dump(config, Dumper=_Dumper, allow_unicode=True))


def write_project(project: Path, pages: dict[str, str], files=None) -> None:
    """A copy of the site's machinery with other snippet pages: ``pages`` maps a
    module name to the code of its one cell; ``files`` adds or replaces files."""
    for part in PROJECT_PARTS:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, project / part, dirs_exist_ok=True)
        else:
            shutil.copy(source, project / part)
    config = read_mkdocs_yml(project / "mkdocs.yml")
    config["nav"] = [{"Home": "index.md"}] + [{name: f"{name}.py"} for name in pages]
    write_mkdocs_yml(project / "mkdocs.yml", config)
    home = "# Home\n\n" + "".join(f"[{name}]({name}.py)\n" for name in pages)
    (project / "docs" / "index.md").write_text(home)
    (project / "snippets").mkdir(exist_ok=True)
    for name, cell in pages.items():
        (project / "snippets" / f"{name}.py").write_text(
            f"# %% [markdown]\n# # {name}\n\n# %%\n{cell}\n"
        )
    for relative, content in (files or {}).items():
        (project / relative).write_text(content)


@pytest.fixture(scope="session")
def built_site(tmp_path_factory, worker_id) -> Path:
    """The site, built once per run even when pytest-xdist runs several workers:
    the first to take the lock builds, the others wait and reuse its output."""
    shared = tmp_path_factory.getbasetemp()  # this run's, and under xdist its
    if worker_id != "master":  # workers' directories share their parent
        shared = shared.parent
    site, log = shared / "site", shared / "build.log"
    with FileLock(shared / "build.lock"):
        if not log.exists():
            result = mkdocs_build(ROOT, site)
            log.write_text(f"{result.returncode}\n{result.stderr[-5000:]}")
    returncode, stderr = log.read_text().split("\n", 1)
    assert returncode == "0", stderr
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


def pytest_collection_modifyitems(items):
    """A claim about CUDA runs where a GPU is present and is skipped, saying so,
    where none is: the site builds and tests on a CPU."""
    if torch.cuda.is_available():
        return
    reason = f"no CUDA device here (torch {torch.__version__}); run on a GPU machine"
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason=reason))
