"""Run one function over many cases in worker processes, with a progress bar."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from autounet.utils.progress import progress

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Worker processes used when ``-j`` is not given: every core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _context() -> mp.context.BaseContext:
    """``spawn``, so that threads of the parent (ITK, PyTorch) cannot deadlock a forked child.

    ``spawn`` re-imports the caller's main script in each worker; when that script is not a file
    (``python -`` reading standard input) it cannot, and ``fork`` is used instead.
    """
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and not os.path.exists(main_file) and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _init_worker() -> None:
    # One process per core already; let each one use a single ITK thread to avoid oversubscription.
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def map_cases(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str) -> list[R]:
    """Return ``[fn(x) for x in items]`` in order, computed by ``workers`` processes.

    ``workers <= 1`` runs in this process.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in progress(items, total=len(items), desc=desc)]
    ctx = _context()
    results: list[R] = []
    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=ctx, initializer=_init_worker) as pool:
        chunk = max(1, min(16, len(items) // (4 * workers)))
        for r in progress(pool.map(fn, items, chunksize=chunk), total=len(items), desc=desc):
            results.append(r)
    return results
