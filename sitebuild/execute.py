"""Execute snippet pages before MkDocs renders them: in parallel, cached, never stale.

Each page runs in its own Jupyter kernel, all at once, with its own empty working
directory: what the page saves there (an animation, say) is published next to it.
A page is executed again only when something that can change its output changed.
The cache key covers the page's source, every module of this checkout that the
page imports (hidden helper cells included, followed transitively), the kernel's
environment files, `requirements.txt`, the Python version, and this file with the
modules it imports (they shape the notebook handed to the renderer).
"""

import ast
import asyncio
import base64
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jupytext
import nbformat
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets import default

from sitebuild import admonitions, forkserver, pages

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("mkdocs.plugins.sitebuild")
KERNEL_DIR = Path(__file__).resolve().parent / "kernel"  # matplotlibrc and friends
CELL_TIMEOUT_S = 300
EXTRACTED_MIME_TYPES = {"image/png": "png", "image/svg+xml": "svg"}
DEFAULT_ALT = "Figure drawn by the code above"  # a figure cell without its own


class PageExecutionError(RuntimeError):
    """One or more pages raised; the message names each page and its error."""


@dataclass(frozen=True)
class ExecutedPage:
    source: Path  # the snippet module
    directory: Path  # everything the execution produced, under the cache
    cached: bool  # reused from an earlier build, not executed by this one

    @property
    def seconds(self) -> float:
        """How long executing the page took, when it was executed."""
        return json.loads((self.directory / "done.json").read_text())["seconds"]

    @property
    def notebook(self) -> Path:
        """The executed notebook, with figures as files: what the site renders."""
        return self.directory / "page.ipynb"

    @property
    def download(self) -> Path:
        """The executed notebook with figures embedded: what readers download."""
        return self.directory / f"{self.source.stem}.ipynb"

    @property
    def media(self) -> list[Path]:
        """Files the page wrote, and the figures taken out of its outputs."""
        return sorted(path for path in (self.directory / "media").iterdir())


def cache_key(source: Path, root: Path = ROOT) -> str:
    """A hash of everything that can change what executing ``source`` shows."""
    digest = hashlib.sha256()
    executor = Path(__file__)
    inputs = [source, *sorted(imported_project_files(source, root))]
    inputs += [executor, *sorted(_imported_by_this_code(root))]
    inputs += [root / "requirements.txt", *sorted(KERNEL_DIR.iterdir())]
    for path in inputs:
        digest.update(
            str(path.relative_to(root) if root in path.parents else path).encode()
        )
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


@functools.cache  # the same for every page of a build
def _imported_by_this_code(root: Path) -> frozenset[Path]:
    return frozenset(imported_project_files(Path(__file__), root))


def imported_project_files(source: Path, root: Path = ROOT) -> set[Path]:
    """The checkout's modules that ``source`` imports, directly or through others."""
    found: set[Path] = set()
    pending = [source]
    while pending:
        code = _python_code(pending.pop())
        for module in _imported_module_names(code):
            path = _project_module_path(module, root)
            if path is not None and path not in found:
                found.add(path)
                pending.append(path)
    return found


def execute_pages(
    sources: list[Path],
    cache_dir: Path,
    workers: int | None = None,
    forked: bool = sys.platform == "linux",
    on_executed: Callable[[ExecutedPage], None] = lambda page: None,
) -> dict[Path, ExecutedPage]:
    """Execute the pages whose outputs are not cached, ``workers`` at a time, in
    kernels ``forked`` from one that has imported torch (sitebuild.forkserver)
    or started afresh: both give the same bytes. ``on_executed`` is called with
    each page as soon as it is executed, while others still run."""
    # Twice as many kernels as cores: each kernel spends ~0.3 s of its start
    # waiting (jupyter_client waits for IOPub to fall quiet), not computing.
    workers = workers or 2 * (os.cpu_count() or 1)
    planned = {
        source: cache_dir / f"{source.stem}-{cache_key(source)}" for source in sources
    }
    stale = [
        source for source, directory in planned.items() if not _complete(directory)
    ]
    timings = {}
    if stale:
        preload = preload_for(stale) if forked else []
        with _kernels(preload) as (kernel_manager, env):
            timings = _run(
                _execute_all(stale, planned, workers, kernel_manager, env, on_executed)
            )
    for source, seconds in timings.items():
        log.info(f"executed {_shown(source)} in {seconds:.1f} s")
    _remove_outdated(cache_dir, planned)
    return {
        source: ExecutedPage(source, directory, source not in stale)
        for source, directory in planned.items()
    }


def _run(coroutine):
    """asyncio.run, also from a thread that already runs an event loop (Jupyter,
    or a test that drives a browser): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


class LocalKernelManager(AsyncKernelManager):
    """A kernel reached through Unix sockets, not TCP ports: with many kernels
    starting at once (pages, and tests that build sites beside them), a port
    picked as free could be taken before the kernel bound it, and the kernel died."""

    @default("transport")
    def _transport_default(self):
        return "ipc"

    @default("ip")  # the sockets' path prefix; absolute, as the kernel has its cwd
    def _ip_default(self):
        scratch = Path(tempfile.gettempdir())
        return str(scratch / f"kernel-{uuid.uuid4().hex[:12]}")  # ≤ 107 bytes


class ForkedKernelManager(LocalKernelManager):
    """Starts ipykernel through sitebuild.forkserver instead of a new Python."""

    def format_kernel_cmd(self, extra_arguments=None):
        command = super().format_kernel_cmd(extra_arguments)
        assert command[1:3] == ["-m", "ipykernel_launcher"], command
        return [command[0], str(forkserver.HERE), "launch", *command[3:]]


def preload_for(sources: list[Path], root: Path = ROOT) -> list[str]:
    """What a fork server should import for these pages: torch's heavy modules
    if any of them imports torch (directly or through this checkout's modules)."""
    imported = set()
    helpers = (path for page in sources for path in imported_project_files(page, root))
    for path in {*sources, *helpers}:
        imported |= {
            name.split(".")[0] for name in _imported_module_names(_python_code(path))
        }
    return KERNEL_PRELOAD if "torch" in imported else []


# Beyond torch, what every kernel imports before its first cell (~0.3 s of CPU
# each) and what plotting pages import (~0.6 s): not ipykernel.kernelapp, which
# reads the kernel's own environment when it is imported (forkserver.TORCH).
KERNEL_PRELOAD = [
    *forkserver.TORCH,
    "IPython",
    "ipykernel.ipkernel",
    "matplotlib",  # reads MPLBACKEND, set in kernel_environment, when imported
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
]


@contextlib.contextmanager
def _kernels(preload: list[str]):
    """The kernel manager to run pages with, and the environment to run them in:
    forked from a server that has imported ``preload``, or, with nothing worth
    preloading, fresh."""
    if not preload:
        yield LocalKernelManager, kernel_environment()
        return
    with forkserver.running(kernel_environment(), preload) as env:
        yield ForkedKernelManager, env


async def _execute_all(stale, planned, workers, kernel_manager, env, on_executed):
    semaphore = asyncio.Semaphore(workers)

    async def run(source):
        async with semaphore:
            seconds = await _execute_one(source, planned[source], kernel_manager, env)
        on_executed(ExecutedPage(source, planned[source], cached=False))
        return seconds

    results = await asyncio.gather(
        *(run(source) for source in stale), return_exceptions=True
    )
    failures = [
        f"{_shown(source)}: {result}"
        for source, result in zip(stale, results, strict=True)
        if isinstance(result, BaseException)
    ]
    if failures:
        raise PageExecutionError("\n\n".join(failures))
    return dict(zip(stale, results, strict=True))


async def _execute_one(source: Path, directory: Path, kernel_manager, env) -> float:
    shutil.rmtree(directory, ignore_errors=True)
    media = directory / "media"
    media.mkdir(parents=True)
    notebook = jupytext.read(source)
    notebook.metadata.pop("jupytext", None)  # lists cell metadata keys in set order
    for index, cell in enumerate(notebook.cells):
        cell.id = (
            f"cell-{index + 1}"  # jupytext makes random ids: same bytes each build
        )
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        kernel_manager_class=kernel_manager,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        record_timing=False,  # no timestamps in the published notebook
        # Every output is in once the last cell replied; a graceful shutdown
        # then waits ~1.5 s per page for the kernel to tear torch down.
        shutdown_kernel="immediate",
    )
    started = time.perf_counter()
    try:
        await client.async_execute(cwd=str(media), env=env)
    except CellExecutionError as error:
        raise PageExecutionError(f"a cell raised\n{error}") from None
    seconds = time.perf_counter() - started
    for cell in notebook.cells:
        merge_consecutive_streams(cell)
    nbformat.write(notebook, directory / f"{source.stem}.ipynb")
    nbformat.write(_for_the_site(notebook, media), directory / "page.ipynb")
    (directory / "done.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def merge_consecutive_streams(cell) -> None:
    """One output for consecutive prints to the same stream: how the kernel
    splits them depends on when it flushed, which would change the page's HTML
    from one build to the next."""
    merged = []
    for output in cell.get("outputs", []):
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and output.output_type == previous.output_type == "stream"
            and output.name == previous.name
        ):
            previous.text += output.text
        else:
            merged.append(output)
    if "outputs" in cell:
        cell.outputs = merged


def kernel_environment() -> dict[str, str]:
    """One thread per kernel (pages run side by side; sums keep their order),
    the site's plotting style, and this checkout importable for hidden helpers."""
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(ROOT), env.get("PYTHONPATH")])
            ),
            "MATPLOTLIBRC": str(KERNEL_DIR / "matplotlibrc"),
            # what ipykernel sets before the page runs; set here, a fork server
            # that preloads matplotlib reads it too
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }
    )
    return env


def _for_the_site(notebook, media: Path):
    """A copy of the notebook to render: images as files in ``media``, loaded
    lazily, and Material's admonitions in Markdown cells turned into HTML."""
    light = nbformat.from_dict(json.loads(json.dumps(notebook)))
    for cell in light.cells:
        if cell.cell_type == "markdown":
            cell.source = admonitions.render(cell.source)
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            for mime_type, extension in EXTRACTED_MIME_TYPES.items():
                if mime_type in data:
                    name = _write_figure(
                        data.pop(mime_type), mime_type, extension, media
                    )
                    data["text/html"] = _figure_html(name, media / name, cell)
                    data.pop("text/plain", None)
    return light


def _write_figure(content, mime_type, extension, media: Path) -> str:
    if mime_type == "image/png":
        raw = base64.b64decode(content)
    else:
        raw = ("".join(content) if isinstance(content, list) else content).encode()
    name = figure_name(raw, extension)
    (media / name).write_bytes(raw)
    return name


def figure_name(raw: bytes, extension: str) -> str:
    """A figure's file name: its content's hash, the same each build."""
    return f"figure-{hashlib.sha256(raw).hexdigest()[:12]}.{extension}"


def _figure_html(name: str, path: Path, cell) -> str:
    alt = cell.metadata.get("alt", DEFAULT_ALT)
    size = ""
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(io.BytesIO(path.read_bytes())) as image:
            width, height = image.size
        dpi_scale = 2  # figures are drawn at twice their display size (matplotlibrc)
        size = f' width="{width // dpi_scale}" height="{height // dpi_scale}"'
    return f'<img src="{name}" alt="{alt}"{size} loading="lazy" decoding="async">'


def _shown(source: Path) -> str:
    return str(source.relative_to(ROOT) if ROOT in source.parents else source)


def _complete(directory: Path) -> bool:
    return (directory / "done.json").is_file()


def _remove_outdated(cache_dir: Path, planned: dict[Path, Path]) -> None:
    keep = set(planned.values())
    for source in planned:
        for directory in cache_dir.glob(f"{source.stem}-*"):
            if directory not in keep and directory.name.count("-") == 1:
                shutil.rmtree(directory, ignore_errors=True)


def _python_code(path: Path) -> str:
    if path.suffix == ".py" and "# %%" in path.read_text():
        notebook = pages.read(path)
        return "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    return path.read_text()


def _imported_module_names(code: str) -> set[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()  # the kernel will report it, naming the page
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _project_module_path(module: str, root: Path) -> Path | None:
    parts = module.split(".")
    for candidate in (
        root.joinpath(*parts).with_suffix(".py"),
        root.joinpath(*parts, "__init__.py"),
    ):
        if candidate.is_file():
            return candidate
    return None
