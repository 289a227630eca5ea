"""Benchmark: `subtract_tiled` of one pair larger than a worker's memory (issue 13).

A simulated pair of ``--size`` x ``--size`` float32 FITS images (1 GiB each at 16384^2)
is written once under ``--workdir`` band by band (no full-size array is ever made:
Gaussian stars, FWHM 2.5 px in the reference and 3.2 px in the science image, on a sky
of 100 e- with read noise 5 e-, flux ratio 0.9, 100 stars per 1024^2), then subtracted
by `astro_zackay.parallel._tiled.subtract_tiled` on a LocalCluster of ``--workers``
worker processes (one thread each) with a Dask ``memory_limit`` per worker, everything
estimated (PSFs from the stars of the whole field, or of the central 2048^2 cutout with
``--central-psf``; flux ratio and shift from a grid of cutouts; each tile's background
on its window).  Printed: the wall time (plan, tiles and file creation included), each
worker's peak resident memory (VmHWM of the worker process, imports included; the
simulation runs in a child process) and the client's, and the largest |Scorr| in a
central 2048^2 section of the output as a sanity check.

Run from the repository root: ``python benchmarks/bench_tiled.py [--size 16384]
[--tile 1024] [--workers 2] [--memory-limit 900MB] [--workdir DIR] [--central-psf]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import numpy as np
from astropy.io import fits

BAND = 512
FWHM = (2.5, 3.2)
FLUX_RATIO = 0.9
SKY, READ = 100.0, 5.0


def _gaussian_stamp(fwhm: float, dx: float, dy: float, half: int = 12) -> np.ndarray:
    sigma = fwhm / 2.3548
    y, x = np.mgrid[-half:half + 1, -half:half + 1]
    g = np.exp(-((x - dx) ** 2 + (y - dy) ** 2) / (2 * sigma**2))
    return g / g.sum()


def _empty_fits(path: str, size: int) -> int:
    """A primary HDU of size x size float32 zeros (sparse); the data offset."""
    h = fits.Header()
    for key, value in (("SIMPLE", True), ("BITPIX", -32), ("NAXIS", 2), ("NAXIS1", size),
                       ("NAXIS2", size), ("BUNIT", "electron")):
        h[key] = value
    with open(path, "wb") as f:
        f.write(h.tostring().encode("ascii"))
        offset = f.tell()
        f.seek(-(-size * size * 4 // 2880) * 2880, os.SEEK_CUR)
        f.truncate(f.tell())
    return offset


def simulate(workdir: str, size: int, seed: int = 1) -> tuple[str, str]:
    """Write the pair band by band (reused when present)."""
    paths = tuple(os.path.join(workdir, f"{name}_{size}.fits") for name in ("ref", "sci"))
    if all(os.path.exists(p) for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    n_stars = int(100 * size * size / 1024**2)
    xs, ys = rng.uniform(0, size, n_stars), rng.uniform(0, size, n_stars)
    fluxes = 300.0 * (1 - rng.random(n_stars)) ** (-1 / 1.5)  # a power law from 300 e-
    fluxes = np.minimum(fluxes, 3e5)
    for path, fwhm, ratio in zip(paths, FWHM, (1.0, FLUX_RATIO)):
        offset = _empty_fits(path, size)
        out = np.memmap(path, dtype=">f4", mode="r+", offset=offset, shape=(size, size))
        for y0 in range(0, size, BAND):
            band = np.zeros((min(BAND, size - y0) + 24, size + 24))
            near = (ys >= y0 - 12) & (ys < y0 + BAND + 12)
            for x, y, f in zip(xs[near], ys[near], fluxes[near]):
                ix, iy = min(int(round(x)), size - 1), int(round(y))
                stamp = _gaussian_stamp(fwhm, x - ix, y - iy) * f * ratio
                r, c = iy - y0, ix  # the band starts 12 rows above y0
                if r >= 0 and r + 25 <= band.shape[0]:
                    band[r:r + 25, c:c + 25] += stamp
            band = band[12:12 + min(BAND, size - y0), 12:12 + size]
            band += SKY
            band = rng.poisson(np.maximum(band, 0)).astype(np.float64)
            band += rng.normal(0.0, READ, band.shape)
            out[y0:y0 + band.shape[0]] = band
        out.flush()
        del out
    return paths


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM: since its exec, unlike ru_maxrss,
    which a spawned worker inherits from the process that forked it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux


def _warm() -> None:
    """Import what a tile runs, so that the idle memory includes the imports."""
    import importlib

    for name in ("_prepare", "_zogy_field", "parallel._tiled", "subtraction"):
        importlib.import_module(f"astro_zackay.{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="900MB")
    parser.add_argument("--workdir", default="/tmp/astro_zackay_bench_tiled")
    parser.add_argument("--central-psf", action="store_true",
                        help="estimate the PSFs on the central cutout (field_psf=False)")
    parser.add_argument("--simulate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    if args.simulate_only:
        simulate(args.workdir, args.size)
        return

    from distributed import Client, LocalCluster

    from astro_zackay.parallel._tiled import subtract_tiled

    t0 = time.perf_counter()
    # in a child process: the client's own peak memory is then that of the run
    subprocess.run([sys.executable, __file__, "--simulate-only", "--size", str(args.size),
                    "--workdir", args.workdir], check=True)
    ref, sci = simulate(args.workdir, args.size)  # the paths (written by the child)
    t_sim = time.perf_counter() - t0
    out = os.path.join(args.workdir, f"out_{args.size}.fits")
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                      memory_limit=args.memory_limit) as cluster, Client(cluster) as client:
        _warm()
        client.run(_warm)  # imports: not timed
        base = client.run(_peak_mb)
        t1 = time.perf_counter()
        table = subtract_tiled(ref, sci, out, client=client, tile=args.tile, overwrite=True,
                               field_psf=not args.central_psf)
        wall = time.perf_counter() - t1
        peaks = client.run(_peak_mb)
    with fits.open(out, memmap=True) as hdul:
        c = args.size // 2
        centre = hdul["SCORR"].section[c - 1024:c + 1024, c - 1024:c + 1024]
        top = float(np.nanmax(np.abs(centre)))
    rows = [("size", f"{args.size} x {args.size} float32 ({args.size**2 * 4 / 2**30:.2f} GiB "
                     "per image)"),
            ("tile / tiles", f"{args.tile} px / {len(table)}"),
            ("workers x threads", f"{args.workers} x 1, memory_limit {args.memory_limit}"),
            ("wall time", f"{wall:.1f} s ({args.size**2 / wall / 1e6:.2f} Mpix/s)"),
            ("per-tile time", f"median {np.median(table['seconds']):.2f} s, "
                              f"max {np.max(table['seconds']):.2f} s"),
            ("worker peak RSS", ", ".join(f"{v:.0f} MB (idle {base[k]:.0f})"
                                          for k, v in peaks.items())),
            ("client peak RSS", f"{_peak_mb():.0f} MB"),
            ("flux ratio (true 0.9)", f"{table.meta['AZBETA']:.4f}"),
            ("max |Scorr| central 2048^2", f"{top:.2f}"),
            ("simulation (not timed)", f"{t_sim:.0f} s (0 when the files were there)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
