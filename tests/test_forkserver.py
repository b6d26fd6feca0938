"""Pages run in kernels forked from a server that has imported torch: faster, and
indistinguishable from a fresh kernel for the page."""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

from sitebuild import execute, forkserver

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="the build forks on Linux"),
]

# What a page could notice about the kernel it runs in, minus what differs between
# any two kernels (ports, process ids, the scratch directory's name).
WHAT_A_PAGE_SEES = """\
# %%
import json, os, subprocess, sys
from pathlib import Path
import torch  # the build forks kernels for pages that import torch
print(json.dumps({
    "forked": os.getppid() != int(os.environ["JPY_PARENT_PID"]),
    "argv[0]": sys.argv[0],
    "argv after the connection file": sys.argv[3:],
    "path": sys.path,
    "working directory": Path.cwd().name,
    "environment": sorted(os.environ),
    "names defined": sorted(n for n in globals() if not n.startswith("_")),
    "exit status of a subprocess": subprocess.run([sys.executable, "-c",
                                                   "raise SystemExit(3)"]).returncode,
}))
"""


def page_text(page: execute.ExecutedPage) -> str:
    notebook = json.loads(page.download.read_text())
    return "".join(notebook["cells"][0]["outputs"][0]["text"])


def page_output(page: execute.ExecutedPage) -> dict:
    return json.loads(page_text(page))


def executed(tmp_path, name, code, forked):
    page = tmp_path / "snippets" / f"{name}.py"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(code)
    cache = tmp_path / ("forked" if forked else "fresh")
    return execute.execute_pages([page], cache, workers=1, forked=forked)[page]


def assert_ended(pid: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"kernel {pid} still runs")


def test_a_forked_kernel_shows_the_page_what_a_fresh_kernel_shows(tmp_path):
    forked = executed(tmp_path, "what_a_page_sees", WHAT_A_PAGE_SEES, forked=True)
    fresh = executed(tmp_path, "what_a_page_sees", WHAT_A_PAGE_SEES, forked=False)
    seen, seen_fresh = page_output(forked), page_output(fresh)
    assert seen.pop("forked") and not seen_fresh.pop("forked")
    assert seen == seen_fresh
    assert seen["exit status of a subprocess"] == 3  # SIGCHLD is not ignored
    assert "SITEBUILD_FORKSERVER" not in seen["environment"]


def test_a_forked_kernel_ends_with_its_launcher_while_the_server_runs(tmp_path):
    # Jupyter stops a kernel by killing the process it started, the launcher;
    # the kernel must not linger (holding its memory) until the build ends.
    cell = nbformat.v4.new_code_cell("import os\nos.getpid()")
    notebook = nbformat.v4.new_notebook(cells=[cell])
    with forkserver.running(execute.kernel_environment(), ["torch"]) as env:
        NotebookClient(
            notebook,
            kernel_name="python3",
            kernel_manager_class=execute.ForkedKernelManager,
            shutdown_kernel="immediate",
        ).execute(cwd=str(tmp_path), env=env)
        assert_ended(int(cell.outputs[0]["data"]["text/plain"]))


def test_a_page_that_hangs_fails_naming_it_and_leaves_no_kernel(tmp_path, monkeypatch):
    monkeypatch.setattr(execute, "CELL_TIMEOUT_S", 3)
    hangs = "# %%\nimport os, time, torch\nopen('pid', 'w').write(str(os.getpid()))\n"
    hangs += "time.sleep(600)\n"
    with pytest.raises(execute.PageExecutionError, match="snippets/hangs.py"):
        executed(tmp_path, "hangs", hangs, forked=True)
    [pid_file] = (tmp_path / "forked").glob("hangs-*/media/pid")
    assert_ended(int(pid_file.read_text()))


def test_a_script_whose_caller_stopped_waiting_ends(tmp_path):
    # the copy-paste test runs page code with run_script and a timeout: a page
    # that hangs must not run on after the test failed
    script = tmp_path / "hangs.py"
    script.write_text("import os\nopen('pid', 'w').write(str(os.getpid()))\n")
    script.write_text(script.read_text() + "while True:\n    pass\n")
    with forkserver.running(dict(os.environ), []) as env:
        socket_path = env[forkserver.SOCKET_VARIABLE]
        with pytest.raises(TimeoutError):
            forkserver.run_script(socket_path, script, dict(os.environ), timeout=2)
        assert_ended(int((tmp_path / "pid").read_text()))
        done = tmp_path / "done.py"
        done.write_text("print('still serving')\n")
        status, stdout, _ = forkserver.run_script(socket_path, done, {}, timeout=30)
        assert (status, stdout) == (0, "still serving\n")


@pytest.fixture(scope="module")
def three_clean_executions(tmp_path_factory):
    """distillation (random draws and a figure): forked twice, then fresh."""
    page = ROOT / "snippets" / "distillation.py"
    runs = {}
    for name, forked in [("first", True), ("second", True), ("fresh", False)]:
        cache = tmp_path_factory.mktemp(name)
        runs[name] = execute.execute_pages([page], cache, forked=forked)[page]
        assert not runs[name].cached
    return runs


def produced_bytes(page: execute.ExecutedPage) -> dict:
    return {
        str(path.relative_to(page.directory)): path.read_bytes()
        for path in sorted(page.directory.rglob("*"))
        if path.is_file() and path.name != "done.json"  # done.json: the timing
    }


def test_two_clean_executions_give_the_same_bytes(three_clean_executions):
    first, second = three_clean_executions["first"], three_clean_executions["second"]
    assert produced_bytes(first) == produced_bytes(second)


def test_forked_and_fresh_kernels_give_the_same_bytes(three_clean_executions):
    forked, fresh = three_clean_executions["first"], three_clean_executions["fresh"]
    assert produced_bytes(forked) == produced_bytes(fresh)


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "fresh"])
def test_kernels_listen_on_unix_sockets_that_are_removed_after(
    tmp_path, monkeypatch, forked
):
    # A TCP port picked as free can be taken by another kernel (pages and the
    # tests' builds start many at once) before this one binds it: then a kernel
    # died, or the build hung sending to the wrong socket. Socket files can't clash.
    scratch = Path(tempfile.mkdtemp(prefix="kl-"))  # short: socket paths are
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # at most 107 bytes
    code = "# %%\nimport torch\nfrom ipykernel.kernelapp import IPKernelApp\n"
    code += "app = IPKernelApp.instance()\nprint(app.transport, app.ip)\n"
    page = executed(tmp_path, "sockets", code, forked=forked)
    transport, prefix = page_text(page).split()
    assert transport == "ipc"
    assert Path(prefix).parent == scratch
    assert not list(scratch.iterdir())
    scratch.rmdir()


def test_torch_is_preloaded_only_for_pages_that_import_it(tmp_path):
    # A small site's pages (the tests build several) gain nothing from a server
    # that spends ~3 s importing torch; a page that imports it through a helper
    # module of the checkout does.
    (tmp_path / "snippets").mkdir()
    plain = tmp_path / "snippets" / "plain.py"
    plain.write_text("# %%\nprint(1)\n")
    helper = tmp_path / "snippets" / "_helper.py"
    helper.write_text("import torch.nn.functional as F\n")
    indirect = tmp_path / "snippets" / "indirect.py"
    indirect.write_text("# %%\nfrom snippets._helper import F\n")
    assert execute.preload_for([plain], tmp_path) == []
    assert execute.preload_for([plain, indirect], tmp_path) == execute.KERNEL_PRELOAD
