"""Worker processes for the parts of a build that MkDocs would do one by one."""

import os
import site
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Workers:
    """Up to ``count`` worker processes, started on the first job (a rebuild with
    nothing to do starts none). Leaving the ``with`` block waits for every job
    and raises the first failure, naming its job."""

    def __init__(self, count: int | None = None):
        self.count = count or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None
        self._jobs: dict[str, Future] = {}

    def __enter__(self):
        return self

    def __exit__(self, error_type, *_):
        try:
            if error_type is None:
                for name, job in self._jobs.items():
                    try:
                        job.result()
                    except Exception as error:
                        raise RuntimeError(f"{name}: {error}") from error
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)

    def submitted(self, name: str) -> bool:
        return name in self._jobs

    def submit(self, name: str, function, *args) -> None:
        """Run ``function(*args)`` in a worker; ``function`` is found by name."""
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
