"""Benchmark: astro_zackay.coadd against properimage 0.7.2 ``coadd`` and ``ccdproc.combine``.

Simulates ``--n-frames`` registered frames of one field with lognormal seeing, different
skies and flux scales, a few hundred stars (for the PSF and flux-scale estimates) and a
grid of faint sources at integer pixels away from the stars. Each method runs in its own
subprocess (wall time of the call, peak RSS of the process and its RSS after imports):

* ``ours (estimated)``: ``coadd(paths)`` - background, noise, PSFs and flux scales estimated,
  outliers rejected across frames (the default);
* ``ours (no rejection)``: the same with ``reject=None`` (the single streaming pass);
* ``ours (true PSF, F)``: ``coadd(paths, psfs=true, flux_scales=true)``;
* ``ccdproc.combine``: weighted average of the sky-subtracted frames scaled by ``1/F_j``
  with per-pixel weights ``F_j**2 / variance_j`` (true sky, F_j and variance: its best case);
* ``properimage coadd``: ``properimage.operations.coadd(SingleImage(path), align=False)`` in
  the peer's own virtual environment (/work/peers/properimage; see PEERS.md).

Detection S/N is measured the same way for every method: the coadd is matched-filtered
with its PSF (ours: the score S; ccdproc: the weighted mean of the true PSFs; properimage:
its returned P_r), and the S/N of the faint sources is the mean filtered value at their
positions, minus the mean over empty sky, divided by the standard deviation over empty sky.

With ``--memory-frames 5 10 20`` it instead runs ``ours (estimated)`` on the first 5, 10
and 20 of the simulated frames and prints each run's wall time and peak memory (peak RSS
less the RSS after imports), to show that memory does not grow with the number of frames.

Run: ``python benchmarks/bench_coadd.py [--size 512] [--n-frames 8] [--methods ours,properimage]``
or ``python benchmarks/bench_coadd.py --size 2048 --memory-frames 5 10 20``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

PROPERIMAGE_PYTHON = "/work/peers/properimage/bin/python"
PROPERIMAGE_RECIPE = (
    "python -m venv /work/peers/properimage && /work/peers/properimage/bin/pip install "
    "--no-build-isolation tinynpydb==0.1.2 && /work/peers/properimage/bin/pip install "
    "properimage==0.7.2   (PEERS.md; needs the stock setuptools 65)"
)
READ_NOISE = 5.0

#: The methods compared, by the name given to --methods.
METHODS = {"ours": "ours (estimated)", "ours-norej": "ours (no rejection)",
           "ours-true": "ours (true PSF, F)", "ccdproc": "ccdproc.combine",
           "properimage": "properimage coadd"}

# Run by properimage's own interpreter: argv = [dir]. Writes out_properimage.npy/.json.
PROPERIMAGE_WORKER = r"""
import glob, json, os, sys, time
import numpy as np
d = sys.argv[1]
def peak_mb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
rss0 = peak_mb()
from properimage.operations import coadd
from properimage.single_image import SingleImage
paths = sorted(glob.glob(os.path.join(d, "frame*.fits")))
t = time.perf_counter()
images = [SingleImage(p) for p in paths]
R, P, mask = coadd(images, align=False, n_procs=2)
wall = time.perf_counter() - t
R, P = np.real(R), np.real(P)
iy, ix = np.unravel_index(np.argmax(P), P.shape)
h = 12
stamp = np.roll(P, (h - iy, h - ix), (0, 1))[: 2 * h + 1, : 2 * h + 1]
np.save(os.path.join(d, "out_properimage.npy"), R)
np.save(os.path.join(d, "psf_properimage.npy"), stamp / stamp.sum())
rss = peak_mb()
with open(os.path.join(d, "out_properimage.json"), "w") as fh:
    json.dump({"wall": wall, "rss": rss, "rss_imports": rss0}, fh)
"""


def _rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM, which (unlike ``ru_maxrss``) does not
    inherit the parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def simulate(directory: str, size: int, n_frames: int, seed: int) -> dict:
    """Write the frames as FITS and return the truth (sources, PSFs, F_j, sky)."""
    from astropy.table import Table

    from astro_zackay.simulation import PSFField, simulate_image

    rng = np.random.default_rng(seed)
    fwhm = 3.5 * np.exp(rng.normal(0.0, 0.3, n_frames))
    flux_scales = rng.uniform(0.6, 1.4, n_frames)
    flux_scales[0] = 1.0
    sky = rng.uniform(100.0, 400.0, n_frames)
    stars = simulate_image((size, size), n_stars=int(300 * (size / 512) ** 2),
                           flux_range=(3e3, 3e5), seed=seed).truth
    g = np.arange(24, size - 24, 24)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    xs, ys = xx.ravel(), yy.ravel()
    far = np.hypot(xs[:, None] - stars["x"][None, :], ys[:, None] - stars["y"][None, :]).min(1)
    xs, ys = xs[far > 15], ys[far > 15]
    s2 = sky + READ_NOISE**2
    psfs = []
    for j in range(n_frames):
        psfs.append(PSFField(fwhm=float(fwhm[j]), shape=(size, size)).stamp(size / 2, size / 2))
    # faint sources: S/N 6 in the proper coadd (theory)
    snr1 = np.sqrt(np.sum(flux_scales**2 / s2 * np.array([(p**2).sum() for p in psfs])))
    f0 = 6.0 / snr1
    for j in range(n_frames):
        table = Table({"x": np.concatenate([stars["x"], xs.astype(float)]),
                       "y": np.concatenate([stars["y"], ys.astype(float)]),
                       "flux": np.concatenate([stars["flux"], np.full(xs.size, f0)])
                       * flux_scales[j]})
        sim = simulate_image((size, size), psf=float(fwhm[j]), stars=table, sky=float(sky[j]),
                             read_noise=READ_NOISE, seed=seed + 1 + j, wcs=False)
        sim.ccd.write(os.path.join(directory, f"frame{j:03d}.fits"))
    yy, xx = np.mgrid[:size, :size]
    near = np.zeros((size, size), bool)
    for x0, y0 in zip(np.concatenate([stars["x"], xs]), np.concatenate([stars["y"], ys])):
        lo_y, lo_x = max(int(y0) - 12, 0), max(int(x0) - 12, 0)
        near[lo_y:int(y0) + 13, lo_x:int(x0) + 13] = True
    empty = ~near
    empty[:40] = empty[-40:] = False
    empty[:, :40] = empty[:, -40:] = False
    a = flux_scales**2 / s2
    size_max = max(p.shape[0] for p in psfs)
    mean_psf = sum(w * np.pad(p, (size_max - p.shape[0]) // 2) for w, p in zip(a, psfs)) / a.sum()
    snr_mean = f0 * np.sqrt(a.sum() * (mean_psf**2).sum())
    np.save(os.path.join(directory, "psfs.npy"), np.array(psfs, dtype=object), allow_pickle=True)
    truth = {"flux_scales": flux_scales.tolist(), "sky": sky.tolist(), "fwhm": fwhm.tolist(),
             "xs": xs.tolist(), "ys": ys.tolist(), "f0": f0, "snr1": snr1,
             "snr_weighted_mean": snr_mean}
    with open(os.path.join(directory, "truth.json"), "w") as fh:
        json.dump(truth, fh)
    np.save(os.path.join(directory, "empty.npy"), empty)
    return truth


def _paths(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.startswith("frame") and f.endswith(".fits"))


def worker(method: str, directory: str, n_frames: int | None = None) -> None:
    """Run one method in this process; save its matched-filtered coadd and costs.

    With ``n_frames``, on the first ``n_frames`` frames only.
    """
    from astropy.nddata import CCDData

    from astro_zackay.coaddition import coadd
    from astro_zackay.fourier import correlate_fft, psf_rfft

    with open(os.path.join(directory, "truth.json")) as fh:
        truth = json.load(fh)
    psfs = list(np.load(os.path.join(directory, "psfs.npy"), allow_pickle=True))
    flux_scales = np.array(truth["flux_scales"])
    paths = _paths(directory)
    if n_frames is not None:
        psfs, flux_scales, paths = psfs[:n_frames], flux_scales[:n_frames], paths[:n_frames]
    rss_imports = _rss_mb()
    t = time.perf_counter()
    extra = {}
    if method in ("ours", "ours-norej"):
        res = coadd(paths, reject=6.0 if method == "ours" else None)
        extra["n_rejected"] = int(res.frames["n_rejected"].sum())
        filtered = res.score.data
        extra["flux_scale_error"] = float(np.max(np.abs(
            np.asarray(res.frames["flux_scale"]) / flux_scales - 1)))
    elif method == "ours-true":
        res = coadd(paths, psfs=psfs, flux_scales=flux_scales)
        filtered = res.score.data
    elif method == "ccdproc":
        import ccdproc

        ccds, weights = [], []
        for path, b in zip(paths, truth["sky"]):
            ccd = CCDData.read(path)
            ccds.append(CCDData(ccd.data - b, unit=ccd.unit))
            weights.append(1.0 / ccd.uncertainty.array**2)
        weights = np.array(weights) * (flux_scales**2)[:, None, None]
        combined = ccdproc.combine(ccds, method="average", weights=weights,
                                   scale=list(1.0 / flux_scales), mem_limit=16e9)
        a = flux_scales**2 / (np.array(truth["sky"]) + READ_NOISE**2)
        size = max(p.shape[0] for p in psfs)
        psf = sum(w * np.pad(p, (size - p.shape[0]) // 2) for w, p in zip(a, psfs)) / a.sum()
        filtered = correlate_fft(np.asarray(combined.data, float), psf_rfft(psf, combined.shape))
    else:
        raise ValueError(method)
    wall = time.perf_counter() - t
    if n_frames is None:
        np.save(os.path.join(directory, f"out_{method}.npy"), filtered)
    with open(os.path.join(directory, f"out_{method}.json"), "w") as fh:
        json.dump({"wall": wall, "rss": _rss_mb(), "rss_imports": rss_imports, **extra}, fh)


def measured_snr(filtered: np.ndarray, truth: dict, empty: np.ndarray) -> float:
    xs, ys = np.array(truth["xs"]), np.array(truth["ys"])
    sky = filtered[empty]
    return float((filtered[ys, xs].mean() - sky.mean()) / sky.std())


def memory(size: int, counts: list[int], seed: int) -> None:
    """Wall time and peak memory of ``ours (estimated)`` on the first N frames, per N."""
    with tempfile.TemporaryDirectory() as directory:
        simulate(directory, size, counts[-1], seed)
        frame_mb = 2 * size * size * 4 / 2**20  # data and variance in float32
        print(f"ours (estimated) on N frames of {size}x{size} (one frame in float32, data and "
              f"variance: {frame_mb:.0f} MB)")
        print(f"{'N':>4}{'wall [s]':>10}{'s/frame':>9}{'peak RSS [MB]':>15}"
              f"{'RSS-import [MB]':>17}{'/ frame':>9}")
        for n in counts:
            cmd = [sys.executable, __file__, "--worker", "ours", directory,
                   "--worker-frames", str(n)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{n}: failed\n{proc.stderr[-2000:]}")
                continue
            with open(os.path.join(directory, "out_ours.json")) as fh:
                cost = json.load(fh)
            extra = cost["rss"] - cost["rss_imports"]
            print(f"{n:>4}{cost['wall']:>10.2f}{cost['wall'] / n:>9.3f}{cost['rss']:>15.0f}"
                  f"{extra:>17.0f}{extra / frame_mb:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--n-frames", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--memory-frames", type=int, nargs="+", metavar="N",
                        help="peak memory of ours (estimated) on the first N frames, per N")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-frames", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, n_frames=args.worker_frames)
        return
    if args.memory_frames:
        memory(args.size, sorted(args.memory_frames), args.seed)
        return

    have_properimage = os.path.exists(PROPERIMAGE_PYTHON) and subprocess.run(
        [PROPERIMAGE_PYTHON, "-c", "import properimage"], capture_output=True).returncode == 0
    with tempfile.TemporaryDirectory() as directory:
        truth = simulate(directory, args.size, args.n_frames, args.seed)
        empty = np.load(os.path.join(directory, "empty.npy"))
        print(f"{args.n_frames} frames of {args.size}x{args.size}, FWHM "
              f"{min(truth['fwhm']):.2f}-{max(truth['fwhm']):.2f} px (lognormal, sigma 0.3), "
              f"{len(truth['xs'])} faint sources of theoretical proper-coadd S/N 6")
        rows = []
        chosen = args.methods.split(",")
        for method, label in METHODS.items():
            if method not in chosen:
                continue
            if method == "properimage":
                if not have_properimage:
                    print(f"properimage: not installed; install with: {PROPERIMAGE_RECIPE}")
                    continue
                cmd = [PROPERIMAGE_PYTHON, "-c", PROPERIMAGE_WORKER, directory]
            else:
                cmd = [sys.executable, __file__, "--worker", method, directory]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{label}: failed\n{proc.stderr[-2000:]}")
                continue
            with open(os.path.join(directory, f"out_{method}.json")) as fh:
                cost = json.load(fh)
            filtered = np.load(os.path.join(directory, f"out_{method}.npy"))
            rows.append((label, cost, measured_snr(filtered, truth, empty)))

    ours = next((r for r in rows if r[0].startswith("ours")), rows[0])
    print()
    print(f"(ratios to {ours[0]})")
    print(f"{'method':<22}{'wall [s]':>10}{'s/frame':>9}{'peak RSS [MB]':>15}"
          f"{'RSS-import [MB]':>17}{'S/N':>8}{'S/N ratio':>11}{'time ratio':>12}")
    for label, cost, snr in rows:
        print(f"{label:<22}{cost['wall']:>10.2f}{cost['wall'] / args.n_frames:>9.3f}"
              f"{cost['rss']:>15.0f}{cost['rss'] - cost['rss_imports']:>17.0f}{snr:>8.3f}"
              f"{snr / ours[2]:>11.3f}{cost['wall'] / ours[1]['wall']:>12.2f}")
    est = next((r for r in rows if r[0] == "ours (estimated)"), None)
    if est is not None and "flux_scale_error" in est[1]:
        print(f"\nours (estimated): largest flux-scale error {est[1]['flux_scale_error']:.2%}, "
              f"{est[1]['n_rejected']} outlier pixels rejected")
    print(f"theory: proper coadd S/N 6.000, weighted mean + matched filter "
          f"{truth['snr_weighted_mean']:.3f} (ratio {truth['snr_weighted_mean'] / 6:.3f})")


if __name__ == "__main__":
    main()
