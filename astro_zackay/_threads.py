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
from collections.abc import Callable
from typing import TypeVar

from threadpoolctl import ThreadpoolController

__all__ = ["single_threaded_blas"]

F = TypeVar("F", bound=Callable)


@functools.cache
def _controller() -> ThreadpoolController:
    """The loaded thread pools, found once: finding them (what `threadpoolctl.threadpool_limits`
    does at every call) reads the process's library map, 2-3 ms a call (measured)."""
    return ThreadpoolController()


def single_threaded_blas(function: F) -> F:
    """Run ``function`` with BLAS limited to one thread, restoring the limit afterwards."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _controller().limit(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
