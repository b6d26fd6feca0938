"""Jupyter kernels forked from a process that has imported torch already.

Every page runs in a kernel of its own, and a fresh interpreter spends ~2.5 s of
CPU importing torch (and, for pages with an optimizer, torch._dynamo) before the
page's first line. A fork server imports them once; each kernel is a fork of it,
so it starts with those modules loaded and nothing else: no variable, no seed,
no figure of another page. Linux only (execute.py falls back to plain kernels).

Two processes per kernel, because Jupyter manages a kernel as a child process:

- ``python -m sitebuild.forkserver serve SOCKET FD`` imports the heavy modules,
  writes to file descriptor FD that it is ready, then forks one kernel for each
  request on the Unix socket SOCKET;
- ``python -m sitebuild.forkserver launch ARGS...`` is what Jupyter starts in
  place of ``python -m ipykernel_launcher ARGS...``: it asks the server for a
  kernel, passes signals on to it, and exits when it ends. When Jupyter kills
  the launcher, the kernel notices and exits too.
"""

import contextlib
import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback

SOCKET_VARIABLE = "SITEBUILD_FORKSERVER"  # the kernel environment names the server
READY = b"ready"
# Imported once, before any fork: what most pages import, and what the first
# optimizer step or dispatch mode imports (torch._dynamo, ~1.5 s on its own).
# Not ipykernel: its settings read the environment Jupyter gives each kernel
# (JPY_PARENT_PID) when their classes are defined, so it is imported after.
PRELOADED = [
    "torch",
    "torch._dynamo",
    "torch.distributions",
    "torch.nn.functional",
    "numpy",
]


def serve(socket_path: str, ready_fd: str) -> None:
    """Preload, say READY on ``ready_fd``, then fork a kernel per request."""
    for module in PRELOADED:
        __import__(module)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps nothing here
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen()
    os.write(int(ready_fd), READY)
    os.close(int(ready_fd))
    while True:
        connection, _ = server.accept()
        with connection:
            request = json.loads(_read_all(connection))
            assert threading.active_count() == 1, "fork only a single thread"
            pid = os.fork()
            if pid == 0:
                connection.close()  # else the launcher waits for its end
                server.close()
                _become_kernel(**request)  # never returns
            connection.sendall(json.dumps({"pid": pid}).encode())


def _become_kernel(args: list[str], cwd: str, env: dict, launcher: int) -> None:
    """In the fork: the state ``python -m ipykernel_launcher ARGS`` would start
    from in ``cwd`` with ``env``, then the kernel, until it or the launcher ends."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # pages run subprocesses (ffmpeg)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    del os.environ[SOCKET_VARIABLE]  # the page sees the environment it would see
    del sys.path[0]  # the server's directory; ipykernel_launcher drops its own
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


def launch(args: list[str]) -> None:
    """Start a forked kernel with ipykernel's arguments ``args``; wait for it."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(os.environ[SOCKET_VARIABLE])
    request = {"args": args, "cwd": os.getcwd(), "env": dict(os.environ)}
    request["launcher"] = os.getpid()
    client.sendall(json.dumps(request).encode())
    client.shutdown(socket.SHUT_WR)
    kernel = json.loads(_read_all(client))["pid"]
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _, kernel=kernel: os.kill(kernel, signum))
    ended = os.pidfd_open(kernel)
    while True:
        try:
            select.select([ended], [], [])
            return
        except InterruptedError:  # a passed-on signal; keep waiting
            continue


@contextlib.contextmanager
def running(env: dict[str, str]):
    """A fork server started with ``env``; yields ``env`` plus what a launcher
    needs to find it. Stopped on exit; its kernels are stopped by Jupyter."""
    with tempfile.TemporaryDirectory(prefix="sitebuild-forkserver-") as scratch:
        socket_path = os.path.join(scratch, "socket")
        ready_read, ready_write = os.pipe()
        command = [sys.executable, "-m", "sitebuild.forkserver", "serve", socket_path]
        server = subprocess.Popen(
            [*command, str(ready_write)], env=env, pass_fds=[ready_write]
        )
        os.close(ready_write)
        try:
            with os.fdopen(ready_read, "rb") as ready:
                if ready.read() != READY:  # end of file: the server died
                    raise RuntimeError(f"the fork server exited ({server.wait()})")
            yield {**env, SOCKET_VARIABLE: socket_path}
        finally:
            server.terminate()
            server.wait()


def _read_all(connection: socket.socket) -> bytes:
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
        raise SystemExit(f"usage: {sys.argv[0]} serve SOCKET FD | launch ARGS...")
