"""BLAS threading for the package's many small linear-algebra problems.

The PSF, star-fitting and flux-ratio steps solve many small systems (SVDs of a few
hundred stamps, batched 7x7 solves). Multi-threaded OpenBLAS makes them slower, not
faster: on a 2-core machine a 152 x 441 SVD took 5 ms on one thread and 0.3-2.5 s
with the default pool, and a whole `subtract` of properimage's 1024 x 682 pair
took 2.0 s against 4.8-8 s. Parallelism comes from scipy.fft's workers instead.
The limit is scoped to each public call (threadpoolctl), never set globally.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from threadpoolctl import ThreadpoolController

__all__ = ["single_threaded_blas"]

F = TypeVar("F", bound=Callable)


@functools.lru_cache(maxsize=1)
def _controller(n_modules: int) -> ThreadpoolController:
    """The loaded thread pools, found again only when ``n_modules`` (``len(sys.modules)``) changes.

    Finding them (what `threadpoolctl.threadpool_limits` does at every call) reads the
    process's library map, 2-3 ms a call (measured); counting the imported modules is
    free.  A BLAS is loaded by importing the extension module that links it (numpy,
    scipy.linalg, torch, ...), which adds to ``sys.modules``: one loaded after the first
    call is then found and limited too.  One loaded by other means (``ctypes``) with no
    import since is not.
    """
    return ThreadpoolController()


def single_threaded_blas(function: F) -> F:
    """Run ``function`` with BLAS limited to one thread, restoring the limit afterwards."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _controller(len(sys.modules)).limit(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
