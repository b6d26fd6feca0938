"""Worker processes for the parts of a build that MkDocs would do one by one."""

import os
import site
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Fewer jobs than this run in the build's own process, when the ``with`` block
# ends: starting a worker costs ~1.4 s of CPU (a small site, as the tests build,
# paid more for its workers than it saved).
PARALLEL_FROM = 8


class JobError(RuntimeError):
    """A job failed; the message names it."""


class Workers:
    """Up to ``count`` worker processes, started on the first job (a rebuild with
    nothing to do starts none), for about ``expected`` jobs: below PARALLEL_FROM
    they run here instead. Leaving the ``with`` block waits for every job and
    raises the first failure, naming its job."""

    def __init__(self, expected: int, count: int | None = None):
        self.count = count or os.cpu_count() or 1
        self.in_processes = expected >= PARALLEL_FROM
        self._pool: ProcessPoolExecutor | None = None
        self._jobs: dict[str, Future] = {}
        self._here: dict[str, tuple] = {}

    def __enter__(self):
        return self

    def __exit__(self, error_type, *_):
        try:
            if error_type is None:
                for name, job in self._jobs.items():
                    try:
                        job.result()
                    except Exception as error:
                        raise JobError(f"{name}: {error}") from error
                for name, (function, args) in self._here.items():
                    try:
                        function(*args)
                    except Exception as error:
                        raise JobError(f"{name}: {error}") from error
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)

    def submitted(self, name: str) -> bool:
        return name in self._jobs or name in self._here

    def submit(self, name: str, function, *args) -> None:
        """Run ``function(*args)`` in a worker; ``function`` is found by name."""
        if not self.in_processes:
            self._here[name] = (function, args)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.count,
                # spawned, not forked: the build may run threads (mkdocs serve)
                mp_context=get_context("spawn"),
                # MkDocs puts the checkout on sys.path only while it imports the
                # hooks; a worker needs it to find ``function``'s module.
                initializer=site.addsitedir,
                initargs=(str(ROOT),),
            )
        self._jobs[name] = self._pool.submit(function, *args)
