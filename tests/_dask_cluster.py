"""The real Dask cluster the parallel tests run on (imported by their fixtures).

Single-threaded worker processes on 127.0.0.1; no dashboard, and the scheduler's HTTP
server on a free port: 8787 may be held by another cluster of this machine.
"""

import contextlib

import pytest

distributed = pytest.importorskip(
    "distributed", reason="the parallel functions run on dask.distributed (the 'all' extra)")


@contextlib.contextmanager
def local_cluster(n_workers=2, processes=True):
    """A LocalCluster and its Client, both closed on leaving the block.

    Worker processes listen on 127.0.0.1; threads (``processes=False``) talk in-process.
    """
    host = {"host": "127.0.0.1"} if processes else {}
    with (distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                   processes=processes, dashboard_address=None, **host,
                                   scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
          as cluster,
          distributed.Client(cluster) as client):
        yield cluster, client
