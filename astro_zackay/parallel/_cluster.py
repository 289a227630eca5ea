"""The one Dask cluster helper of `astro_zackay.parallel`: a given Client, or a local one.

Every parallel function takes ``client=None``: a `distributed.LocalCluster` is then
started for the call and closed at its end (also on error), with

* worker processes of one thread each, as many as the machine has cores and the call
  has tasks (or ``n_workers``);
* everything on the loopback interface; no dashboard, and the scheduler's small HTTP
  server (health checks) on a free loopback port, not 8787, which another cluster of
  this machine may hold;
* Dask's ``MALLOC_TRIM_THRESHOLD_`` for the workers unset: it makes glibc give freed
  memory back at once (64 KiB), so every array of a subtraction is mapped and faulted
  in afresh; measured on a 512^2 pair, 0.65 s of CPU and 214 000 page faults with it,
  0.26 s and fewer than 3000 without;
* the caller's environment restored afterwards: the nanny sets its workers' variables
  (``OMP_NUM_THREADS`` and others) in the process that starts it.

A given client (for a remote scheduler, or a cluster the caller manages) is used as it
is and left open.

The warnings of a task would stay in its worker's log: `captured` runs a task with
its warnings recorded and returns them with its result, and `gather_warned` gathers
such tasks and issues each distinct warning once on the client, at the caller's line
(``catch_warnings`` is process state: on a worker of several threads, the warnings of
concurrent tasks may mix).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .._warnings import user_stacklevel

__all__ = ["captured", "cluster_client", "gather_warned", "reemit"]

# The example starts a LocalCluster, which needs dask.distributed (the `all` extra).
__doctest_requires__ = {"cluster_client": ["distributed"]}

_log = logging.getLogger(__name__)

#: Dask's setting that makes its workers' glibc return freed memory at once (see above).
_TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


@contextlib.contextmanager
def cluster_client(client: Any = None, n_tasks: int | None = None,
                   n_workers: int | None = None) -> Iterator[Any]:
    """The given client as is, or the client of a LocalCluster started for the block.

    Parameters
    ----------
    client : distributed.Client, optional
        Yielded unchanged and left open.
    n_tasks : int, optional
        Tasks the call will run: no more workers are started (None: no limit).
    n_workers : int, optional
        Worker processes of the local cluster (default: the machine's cores, at most
        ``n_tasks``).

    Yields
    ------
    distributed.Client

    Raises
    ------
    ImportError
        Without ``dask.distributed`` (``pip install "dask[distributed]"``).

    Examples
    --------
    >>> from astro_zackay.parallel._cluster import cluster_client
    >>> with cluster_client(n_tasks=1) as client:
    ...     client.submit(sum, [1, 2, 3]).result()
    6
    """
    if client is not None:
        yield client
        return
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - dask is in the 'all' extra
        raise ImportError("the parallel functions need dask.distributed: "
                          'pip install "dask[distributed]"') from exc
    workers = n_workers or max(1, min(os.cpu_count() or 1, n_tasks or os.cpu_count() or 1))
    _log.info("starting a LocalCluster of %d worker process(es) on 127.0.0.1", workers)
    scheduler = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
    with (_environment_kept(), dask.config.set({_TRIM: None}),
          LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                       host="127.0.0.1", dashboard_address=None,
                       scheduler_kwargs=scheduler) as cluster,
          Client(cluster) as local):
        yield local


@contextlib.contextmanager
def _environment_kept() -> Iterator[None]:
    """Restore the caller's environment variables: Dask's nanny sets its workers' in ours.

    Only the variables that differ afterwards are set back (or removed): the others are
    never touched, so that another thread never sees them missing.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


#: A warning as `captured` records it: its category and message.
Record = tuple[type[Warning], str]


def captured(func: Callable[..., Any], *args: Any) -> tuple[Any, list[Record]]:
    """``func(*args)`` with the warnings it issues recorded (run on a worker).

    Returns ``(result, records)``: each distinct ``(category, message)`` once, in the
    order first issued.  Every warning is recorded (the ``"always"`` filter): the
    client's filters decide in `reemit` which are shown.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = func(*args)
    return result, list(dict.fromkeys((w.category, str(w.message)) for w in caught))


def reemit(records: Iterable[Record]) -> None:
    """Issue each distinct recorded warning once, at the line of the package's caller."""
    for category, message in dict.fromkeys(records):
        warnings.warn(message, category, stacklevel=user_stacklevel())


def gather_warned(client: Any, futures: Sequence[Any]) -> list[Any]:
    """The results of tasks that return `captured`'s pairs; their warnings issued once.

    When a task fails, the others are cancelled (those not yet started never run) and
    its error is raised.
    """
    try:
        pairs = client.gather(list(futures))
    except BaseException:
        client.cancel(list(futures))
        raise
    reemit(record for _, records in pairs for record in records)
    return [result for result, _ in pairs]
