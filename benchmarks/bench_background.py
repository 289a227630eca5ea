"""Compare photutils Background2D and sep.Background on a simulated 2048x2048 image.

Run with ``python benchmarks/bench_background.py [--size 2048] [--stars 2000]``. Prints one
row per estimator: wall time (best of ``--repeat``), peak Python-heap memory (tracemalloc:
numpy allocations are traced, sep's C allocations are not), and the errors of the sky and
rms maps against the simulated truth (sky level plus a linear gradient; noise
sqrt(sky + read_noise**2)). Nothing is asserted: timings depend on the machine.
"""

import argparse
import time
import tracemalloc

import numpy as np
import sep
from photutils.background import Background2D, MADStdBackgroundRMS, SExtractorBackground

from astro_zackay.background import estimate_background
from astro_zackay.simulation import simulate_image


def _photutils(data, box):
    bkg = Background2D(
        data,
        box,
        filter_size=3,
        bkg_estimator=SExtractorBackground(),
        bkg_rms_estimator=MADStdBackgroundRMS(),
    )
    return bkg.background, bkg.background_rms


def _sep(data, box):
    bkg = sep.Background(data, bw=box, bh=box, fw=3, fh=3)
    return bkg.back(), bkg.rms()


def _package(ccd, method, box):
    result = estimate_background(ccd, method=method, box_size=box)
    return result.sky.data, result.rms.data


def _measure(func, repeat):
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    func()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, best, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--stars", type=int, default=2000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--gradient", type=float, default=100.0, help="e- across the image")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    shape = (args.size, args.size)
    sim = simulate_image(shape, psf=3.5, n_stars=args.stars, sky=200.0, read_noise=5.0, seed=1)
    ramp = args.gradient * (np.arange(args.size) / args.size - 0.5)
    data = np.ascontiguousarray(sim.ccd.data + ramp[None, :], dtype=np.float64)
    true_sky = sim.sky + np.broadcast_to(ramp, shape)
    ccd = sim.ccd.copy()
    ccd.data = data
    rms_true = sim.noise_rms
    edge = args.box

    rows = [
        ("photutils Background2D", lambda: _photutils(data, args.box)),
        ("sep.Background", lambda: _sep(data, args.box)),
    ]
    for method in ("photutils", "sep"):
        rows.append(
            (
                f"estimate_background({method}) (2 passes, sources masked)",
                lambda m=method: _package(ccd, m, args.box),
            )
        )

    print(
        f"{args.size}x{args.size}, {args.stars} stars (FWHM 3.5 px), sky {sim.sky:g} e- "
        f"+ {args.gradient:g} e- gradient, read noise {sim.read_noise:g} e-, "
        f"true rms {rms_true:.3f} e-, box {args.box}"
    )
    header = (
        f"{'estimator':58s} {'time/s':>7s} {'peak/MB':>8s} {'sky err':>8s} "
        f"{'|err| p99':>9s} {'edge err':>8s} {'rms/true':>8s}"
    )
    print(header)
    print("-" * len(header))
    for name, func in rows:
        (sky, rms), seconds, peak = _measure(func, args.repeat)
        err = sky - true_sky
        inner = err[edge:-edge, edge:-edge]
        edge_err = max(abs(np.median(err[:, : edge // 2])), abs(np.median(err[:, -edge // 2 :])))
        print(
            f"{name:58s} {seconds:7.3f} {peak / 2**20:8.1f} {np.median(inner):+8.3f} "
            f"{np.percentile(np.abs(inner), 99):9.3f} {edge_err:8.3f} "
            f"{np.median(rms) / rms_true:8.4f}"
        )
    print(
        "sky err: median (sky - truth) inside one box of the edges, e-; |err| p99: its 99th "
        "percentile; edge err: |median error| in the outer half box columns (gradient edge)."
    )


if __name__ == "__main__":
    main()
