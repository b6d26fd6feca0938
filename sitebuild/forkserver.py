"""Processes forked from one that has imported torch already.

A fresh interpreter spends ~2.5 s of CPU importing torch (and, for code with an
optimizer, torch._dynamo) before its first line; with twenty pages, each run by
the build in a kernel of its own and by the tests as a copied script, that was
most of the time. A fork server imports them once; each kernel or script runs in
a fork of it, so it starts with those modules loaded and nothing else: no
variable, no seed, no figure of another page. Linux only: the build falls back
to plain kernels elsewhere. The server uses nothing outside the standard library
until it preloads, so it runs as ``python -I`` for copied scripts too.

- ``python sitebuild/forkserver.py serve SOCKET FD MODULE...`` imports MODULEs,
  writes to file descriptor FD that it is ready, then forks a child for each
  request on the Unix socket SOCKET: a Jupyter kernel, or a script.
- ``python sitebuild/forkserver.py launch ARGS...`` is what Jupyter starts in
  place of ``python -m ipykernel_launcher ARGS...``: it asks the server for a
  kernel, passes signals on to it, and exits when it ends. When Jupyter kills
  the launcher, the kernel notices and exits too.
- ``run_script`` runs a script in a fork, as ``python -I script`` would.
"""

import atexit
import contextlib
import gc
import importlib.util
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

SOCKET_VARIABLE = "SITEBUILD_FORKSERVER"  # the kernel environment names the server
READY = b"ready"
HERE = Path(__file__).resolve()
# What kernels preload: what most pages import, and what the first optimizer
# step or dispatch mode imports (torch._dynamo, ~1.5 s on its own). Not
# ipykernel: its settings read the environment Jupyter gives each kernel
# (JPY_PARENT_PID) when their classes are defined, so it is imported after.
TORCH = ["torch", "torch._dynamo", "torch.distributions", "torch.nn.functional"]


def serve(socket_path: str, ready_fd: str, *modules: str) -> None:
    """Preload ``modules``, say READY on ``ready_fd``, then fork per request."""
    if sys.path and os.path.realpath(sys.path[0]) == str(HERE.parent):
        del sys.path[0]  # the directory of this file, not of the code to run
    for module in modules:
        importlib.import_module(module)
    # The preloaded objects, left out of the children's garbage collections:
    # traversing them cost each child CPU and copies of the pages they sit on.
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the children reap themselves
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen()
    os.write(int(ready_fd), READY)
    os.close(int(ready_fd))
    while True:
        connection, _ = server.accept()
        request = json.loads(_read_until_shut(connection))
        assert threading.active_count() == 1, "fork only a single thread"
        pid = os.fork()
        if pid == 0:
            server.close()
            _in_the_child(connection, **request)  # never returns
        if request["kind"] == "kernel":
            connection.sendall(json.dumps({"pid": pid}).encode())
        connection.close()  # a script's child answers on it when it ends


def _in_the_child(connection, kind: str, cwd: str, env: dict, **request) -> None:
    """The state a new process would start from in ``cwd`` with ``env``."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # pages run subprocesses (ffmpeg)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    os.environ.pop(SOCKET_VARIABLE, None)  # the page sees what it would see
    if kind == "kernel":
        connection.close()  # the launcher reads its kernel's pid to the end
        _become_kernel(**request)
    else:
        _run_script_here(connection, **request)


def _become_kernel(args: list[str], launcher: int) -> None:
    """The kernel ``python -m ipykernel_launcher ARGS`` would start, until it or
    the launcher ends."""
    sys.argv = [importlib.util.find_spec("ipykernel_launcher").origin, *args]
    _exit_with(launcher)
    from ipykernel.kernelapp import IPKernelApp

    try:
        IPKernelApp.launch_instance(argv=args)
    except BaseException:  # SystemExit included: say why before leaving
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _exit_with(pid: int) -> None:
    """Exit as soon as process ``pid`` ends (Jupyter killed the launcher)."""
    watched = os.pidfd_open(pid)

    def wait_then_exit():
        select.select([watched], [], [])
        os._exit(0)

    threading.Thread(target=wait_then_exit, daemon=True).start()


def _run_script_here(connection, script: str, stdout: str, stderr: str) -> None:
    """Run ``script`` as ``__main__``, its output to the files ``stdout`` and
    ``stderr``; answer its exit status on ``connection``, then exit."""
    for fd, path in [(1, stdout), (2, stderr)]:
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    _end_when_abandoned(connection)
    sys.argv = [script]
    status = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:  # as the interpreter reports it
        status = exit.code if isinstance(exit.code, int) else exit.code is not None
        if not isinstance(exit.code, int | None):
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    connection.sendall(json.dumps({"status": int(status)}).encode())
    os._exit(int(status))


def _end_when_abandoned(connection) -> None:
    """Kill this script's process group once whoever asked for it stops waiting
    (``run_script`` timed out, or its process ended): a hung script ends too."""
    poller = select.poll()
    poller.register(connection, select.POLLHUP)  # the requester closed its end

    def wait_then_kill():
        poller.poll()
        os.killpg(0, signal.SIGKILL)  # setsid made this process the group's leader

    threading.Thread(target=wait_then_kill, daemon=True).start()


def launch(args: list[str]) -> None:
    """Start a forked kernel with ipykernel's arguments ``args``; wait for it."""
    request = {"kind": "kernel", "args": args, "launcher": os.getpid()}
    kernel = _ask(os.environ[SOCKET_VARIABLE], request)["pid"]
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _, kernel=kernel: os.kill(kernel, signum))
    ended = os.pidfd_open(kernel)
    while True:
        try:
            select.select([ended], [], [])
            return
        except InterruptedError:  # a passed-on signal; keep waiting
            continue


def run_script(socket_path: str, script: Path, env: dict, timeout: float) -> tuple:
    """Run ``script`` in a fork, in its directory with ``env``, as ``python -I
    script`` would. Returns its exit status, stdout and stderr."""
    output = {name: script.with_suffix(f".{name}") for name in ("stdout", "stderr")}
    request = {"kind": "script", "script": str(script), "cwd": str(script.parent)}
    request |= {"env": env, **{name: str(path) for name, path in output.items()}}
    answer = _ask(socket_path, request, timeout)
    status = answer.get("status", "killed by a signal")
    return status, output["stdout"].read_text(), output["stderr"].read_text()


def _ask(socket_path: str, request: dict, timeout: float | None = None) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(socket_path)
        request.setdefault("cwd", os.getcwd())
        request.setdefault("env", dict(os.environ))
        client.sendall(json.dumps(request).encode())
        client.shutdown(socket.SHUT_WR)
        answer = _read_until_shut(client)
    return json.loads(answer) if answer else {}


@contextlib.contextmanager
def running(env: dict[str, str], preload: list[str], isolated: bool = False):
    """A fork server that has imported ``preload``, started with ``env`` (and
    ``-I`` when ``isolated``); yields ``env`` plus what a launcher needs to find
    it. Stopped on exit; Jupyter stops its kernels."""
    with tempfile.TemporaryDirectory(prefix="forkserver-") as scratch:
        socket_path = os.path.join(scratch, "socket")
        ready_read, ready_write = os.pipe()
        python = [sys.executable, "-I"] if isolated else [sys.executable]
        command = [*python, str(HERE), "serve", socket_path, str(ready_write)]
        server = subprocess.Popen([*command, *preload], env=env, pass_fds=[ready_write])
        os.close(ready_write)
        try:
            with os.fdopen(ready_read, "rb") as ready:
                if ready.read() != READY:  # end of file: the server died
                    raise RuntimeError(f"the fork server exited ({server.wait()})")
            yield {**env, SOCKET_VARIABLE: socket_path}
        finally:
            server.terminate()
            server.wait()


def _read_until_shut(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "serve":
        serve(*rest)
    elif command == "launch":
        launch(rest)
    else:
        raise SystemExit(f"usage: {sys.argv[0]} serve SOCKET FD MODULE...|launch ARGS")
