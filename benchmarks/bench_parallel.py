"""Benchmark: pairs per minute of ``astro_zackay.parallel.subtract_batch`` on a LocalCluster.

Simulates ``--pairs`` (default 8) pairs of ``--size`` (512) pixels a side (one stellar
field per pair, 250 stars per 512^2, FWHM 2.5 / 3.5 px, flux ratio 0.9, float32 FITS in
electrons), then subtracts the whole batch

* serially in this process (``subtract(workers=1)`` + ``find_transients`` + writing both
  files, a loop: the floor without Dask), and
* with ``subtract_batch`` on the LocalCluster it starts itself (N worker processes of one
  thread each, without Dask's ``MALLOC_TRIM_THRESHOLD_``), for each N of ``--workers``
  (default 1,2), and with ``--dask-default`` on a plain ``LocalCluster`` (Dask's setting
  kept) for the largest N.

The cluster is started and warmed up (every worker imports the subtraction) before the clock
starts; its start-up time is a column of its own. ``wall`` is the batch from submission to
the last row; ``task s`` is the mean time of one pair inside its task (reading, subtracting,
vetting, writing). Prints one table; nothing is asserted. On a machine shared with other
work, read the numbers as indicative.

Usage::

    python benchmarks/bench_parallel.py [--pairs 8] [--size 512] [--workers 1,2] [--dask-default]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def simulate(folder: Path, n_pairs: int, size: int) -> list[tuple[Path, Path]]:
    from astro_zackay.simulation import simulate_pair

    pairs = []
    n_stars = int(250 * (size / 512) ** 2)
    for j in range(n_pairs):
        pair = simulate_pair((size, size), n_stars=n_stars, flux_range=(2e3, 2e5),
                             reference_psf=2.5, science_psf=3.5, flux_ratio=0.9,
                             shift=(0.3, -0.2), seed=100 + j)
        paths = folder / f"ref{j}.fits", folder / f"new{j}.fits"
        for ccd, path in zip((pair.reference.ccd, pair.science.ccd), paths):
            ccd.data = ccd.data.astype(np.float32)
            ccd.write(path)
        pairs.append(paths)
    return pairs


def serial(pairs: list[tuple[Path, Path]], out: Path) -> tuple[float, float]:
    from astro_zackay import subtract
    from astro_zackay.files import write_candidates, write_subtraction

    out.mkdir()
    start = time.perf_counter()
    for reference, science in pairs:
        result = subtract(reference, science, workers=1)
        candidates = result.find_transients(threshold=5.0)
        write_subtraction(result, out / f"{science.stem}.fits")
        write_candidates(candidates, out / f"{science.stem}_candidates.ecsv")
    wall = time.perf_counter() - start
    return wall, wall / len(pairs)


def _warm_up() -> None:
    """Import what a task runs, on a worker (the first task would pay for it otherwise)."""
    import astro_zackay.files
    import astro_zackay.parallel._batch
    import astro_zackay.subtraction  # noqa: F401


def on_cluster(pairs: list[tuple[Path, Path]], out: Path, n_workers: int,
               dask_default: bool = False) -> dict[str, float]:
    """The batch on the LocalCluster that subtract_batch starts (or Dask's default one)."""
    from distributed import Client, LocalCluster

    from astro_zackay.parallel import subtract_batch
    from astro_zackay.parallel._cluster import _environment_kept, cluster_client

    start = time.perf_counter()
    if dask_default:  # with Dask's MALLOC_TRIM_THRESHOLD_ in the workers
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address="127.0.0.1:0")
        context = _environment_kept()
    else:
        cluster = contextlib.nullcontext()
        context = cluster_client(None, len(pairs), n_workers)
    with cluster, context as client:
        if dask_default:
            client = Client(cluster)
        client.run(_warm_up)
        started = time.perf_counter() - start
        begin = time.perf_counter()
        summary = subtract_batch(pairs, out, client=client, progress=False)
        wall = time.perf_counter() - begin
        if dask_default:
            client.close()
    failed = [str(e) for s, e in zip(summary["status"], summary["error"]) if s != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} pair(s) failed: {failed[0]}")
    return {"start": started, "wall": wall, "task": float(np.mean(summary["seconds"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="number of pairs (default 8)")
    parser.add_argument("--size", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--workers", default="1,2",
                        help="worker counts to run, comma-separated (default 1,2)")
    parser.add_argument("--dask-default", action="store_true",
                        help="also run the largest worker count on a LocalCluster with Dask's "
                             "default MALLOC_TRIM_THRESHOLD_ (which subtract_batch unsets)")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as tmp:
        folder = Path(tmp)
        pairs = simulate(folder, args.pairs, args.size)
        rows = []
        wall, task = serial(pairs, folder / "serial")
        rows.append(("serial loop", "-", wall, task))
        for n in counts:
            result = on_cluster(pairs, folder / f"w{n}", n)
            rows.append((f"LocalCluster {n} worker(s)", f"{result['start']:.1f}", result["wall"],
                         result["task"]))
        if args.dask_default:
            n = max(counts)
            result = on_cluster(pairs, folder / f"d{n}", n, dask_default=True)
            rows.append((f"{n} worker(s), Dask's trim", f"{result['start']:.1f}", result["wall"],
                         result["task"]))
    base = rows[1][2] if len(rows) > 1 else rows[0][2]
    print(f"subtract_batch: {args.pairs} simulated pairs of {args.size}x{args.size}, "
          f"{os.cpu_count()} cores")
    print(f"{'run':<26} {'start s':>8} {'wall s':>8} {'pairs/min':>10} {'task s':>7} "
          f"{'speed-up':>9}")
    for name, start, wall, task in rows:
        print(f"{name:<26} {start:>8} {wall:>8.1f} {60 * args.pairs / wall:>10.1f} "
              f"{task:>7.2f} {base / wall:>8.2f}x")
    print("speed-up: against the first LocalCluster row; start s: cluster start and warm-up "
          "(not in wall)")


if __name__ == "__main__":
    main()
