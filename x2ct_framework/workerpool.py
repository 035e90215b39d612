"""A pool of worker processes that cannot hang its command.

``multiprocessing.Pool`` waits forever for the result of a worker that died (killed by the
out-of-memory killer, a segfault in a reader): the pool starts a new worker, and the job is lost.
:func:`run_jobs` keeps at most one job per worker in flight, so when a worker dies
(``BrokenProcessPool``) it knows which jobs were running. Each of those is tried again in a fresh
pool, alone, at most ``attempts`` times in all; a job that still kills its worker is reported as
failed, naming it, and the others go on. The caller gets every result, so it can say what finished.

Workers ignore SIGINT and take the default action on SIGTERM: Ctrl-C or SIGTERM to the command
reaches the main process, which stops the pool (its workers are terminated) and raises
``KeyboardInterrupt`` once, without a traceback from each worker.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable

DIED = "died"


def _quiet_worker(initializer: Callable | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, which raises
    if initializer is not None:
        initializer(*initargs)


def _stop(executor: ProcessPoolExecutor) -> None:
    """Terminate the pool's workers now (no waiting for running jobs) and shut it down."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for p in processes:
        try:
            p.terminate()
        except (OSError, AttributeError):
            pass
    executor.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        try:
            p.join(timeout=5)
        except (OSError, AttributeError, AssertionError):
            pass


def run_jobs(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int, *, on_result: Callable[[Any], None],
             on_died: Callable[[Any, int], None], initializer: Callable | None = None, initargs: tuple = (),
             attempts: int = 2) -> None:
    """Run ``fn(job)`` for every job in ``workers`` processes; ``on_result(result)`` for each result,
    ``on_died(job, tries)`` for a job whose worker died ``attempts`` times (see the module docstring)."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.get_context(method)
    jobs = list(jobs)
    pending = list(range(len(jobs)))[::-1]  # indices, popped from the end: first job first
    tries = [0] * len(jobs)
    suspects: list[int] = []  # jobs that were running when a worker died: retried one at a time

    def new_pool(n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_quiet_worker,
                                   initargs=(initializer, initargs))

    while pending or suspects:
        alone = bool(suspects)
        executor = new_pool(1 if alone else workers)
        running: dict[Future, int] = {}
        try:
            while True:
                limit = 1 if alone else workers
                source = suspects if alone else pending
                while source and len(running) < limit:
                    i = source.pop()
                    tries[i] += 1
                    running[executor.submit(fn, jobs[i])] = i
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = []
                for fut in done:
                    i = running.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        broken.append(i)
                        continue
                    on_result(result)
                if broken:  # every job in flight is lost with the pool: which one killed it is not known
                    for i in broken + list(running.values()):
                        if tries[i] >= attempts:
                            on_died(jobs[i], tries[i])
                        else:
                            suspects.insert(0, i)
                    running.clear()
                    break
                if alone and not suspects:
                    break
        except BaseException:
            _stop(executor)
            raise
        executor.shutdown(wait=True)
