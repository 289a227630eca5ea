"""Benchmark: the whole pipeline's speed, memory and scaling, in one table (issue 10).

Rows (each case runs in a fresh subprocess, one at a time, so that its peak memory is its own):

* ``subtract e2e`` on simulated pairs of 1024^2 ... 8192^2: the default call
  ``subtract(ref, sci)`` (background, PSFs, flux ratio and shift estimated) followed by
  ``find_transients``, with file reading and imports excluded (the pair is read first; a
  256^2 pair is subtracted once before timing so that lazy imports and FFT plans are warm).
  In the SAME process the bare ZOGY FFT algebra at that size is timed (`fft_floor`: float32,
  no masks, the PSF transforms and D's weights precomputed: the squared kernels of S's
  source noise (4 transforms), 4 forward transforms of the two images and their variance
  maps, 3 inverse ones for D, S and the source-noise variance of Scorr, and the element-wise
  algebra); ``x floor`` is end to end over that floor (target <= 5 at 4096^2).
  ``peak`` is the process' peak resident memory during the call minus its resident memory
  just before it (the inputs already loaded), also as a multiple of the float32 input pair
  (target <= 12).  The simulated pairs (1200 stars per 2048^2, a mildly varying science PSF,
  FWHM 2.5 and ~3.5 px, flux ratio 0.9, shift (0.3, -0.2) px, transients at S/N 6-15)
  are written to FITS once under ``--workdir`` and reused by later runs.
  ``cpu s`` is the process' CPU time (all its threads) of the call with the least of it:
  on a machine shared with other work, which stretches wall times (the floor's too, by
  2-4x at a load of 5-8 on 2 cores), it is the steadier measure of the work a call does,
  for comparing two versions of the code.  It is not a wall time: the floor's FFTs keep
  every core busy (its CPU time is about its wall time times the cores), while much of the
  pipeline runs on one thread, so no "x floor" is formed from it.
* ``subtract, PSFs given``: the same call with the true PSFs at the centre as stamps.
* ``exponent``: the slope of log(time) against log(pixels) over the sizes run; N log N
  from 1024^2 to 8192^2 gives 1.06-1.07, a pure N gives 1.
* ``real pair``: properimage's sample pair (``aligned_eso085-030-004.fit`` as reference,
  ``-005.fit`` as science, ``unit='adu'``, ``gain=1.4``, ``saturation=65000``), target
  <= 0.3 s, against properimage 0.7.2's default ``subtract`` in its own environment
  (``benchmarks/_peers.py``), which also runs the simulated sizes up to ``--peer-max-size``.
* ``estimate_psf``: the PSF of one 4096^2 simulated frame (2048^2 with ``--quick``).
* ``coadd``: ``coadd(paths)`` of N x 2048^2 frames with estimated PSFs and flux scales, seconds
  per frame, against properimage's ``coadd`` (both harnesses are those of ``bench_coadd.py``,
  imported; both include reading the files), and the peak memory above the imports at several
  frame counts (flat in the number of frames is the target).
* ``--backend cupy``: the subtraction rows on the GPU (end to end and with PSFs given) and
  the floor on the GPU, with the GPU's name (their memory is the host's; GPU memory is not
  measured); without CuPy the rows say so.  Finished rows are echoed to stderr as they
  come, so a run cut off by a time limit keeps them.

Run from the repository root: ``python benchmarks/bench_pipeline.py [--quick]
[--sizes 1024,2048,4096,8192] [--backend numpy|cupy]``.  ``--quick`` (1024^2 and 2048^2,
the real pair, 2 and 5 coadd frames, properimage on the real pair only) takes
about 3 minutes here once the inputs are cached; the full run takes much longer
(properimage's coadd of 20 frames alone takes minutes).  Timings are the best of 3 calls
up to 2048^2, of 2 at 4096^2 and of 1 at 8192^2 (fewer with ``--quick``); nothing is
asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _peers  # noqa: E402  (benchmarks/ is not a package)

SHARED = Path(os.environ.get("ASTRO_ZACKAY_SHARED", "/work/shared"))
REAL_REFERENCE = SHARED / "data" / "properimage" / "aligned_eso085-030-004.fit"
REAL_SCIENCE = SHARED / "data" / "properimage" / "aligned_eso085-030-005.fit"
REAL_KWARGS = {"gain": 1.4, "saturation": 65000.0}
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "astro_zackay_bench_pipeline"
#: Stars and transients per 2048^2 of the simulated pairs.
STARS_PER_4MPIX = 1200
TRANSIENTS_PER_4MPIX = 80
READ_NOISE = 5.0
FLUX_RATIO = 0.9
SHIFT = (0.3, -0.2)
COADD_SIZE = 2048
THRESHOLD = 5.0


# --------------------------------------------------------------------------------------------
# Memory: the peak resident set of this process since the last reset.
# --------------------------------------------------------------------------------------------

def _status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc, in MiB (NaN off Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def reset_peak() -> float:
    """Reset the process' peak RSS (Linux ``clear_refs`` 5); return the current RSS in MiB.

    Freed memory that the C allocator kept is first returned to the system
    (``malloc_trim``): a later call reusing it would otherwise not raise the peak.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """Peak RSS since the last `reset_peak`, in MiB."""
    return _status_mb("VmHWM")


def best_times(function, repeats: int, sync=None) -> tuple[float, float]:
    """Smallest wall time and smallest process CPU time (all threads) of ``repeats`` calls
    of ``function`` (``sync`` waits for a GPU).

    The CPU time is the steadier of the two on a shared machine: other processes
    stretch the wall time of a call, much less the work it does.
    """
    best, best_cpu = math.inf, math.inf
    for _ in range(max(1, repeats)):
        t0, c0 = time.perf_counter(), time.process_time()
        function()
        if sync is not None:
            sync()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def best_time(function, repeats: int, sync=None) -> float:
    """Smallest wall time of ``repeats`` calls of ``function`` (`best_times`)."""
    return best_times(function, repeats, sync)[0]


# --------------------------------------------------------------------------------------------
# The bare ZOGY FFT algebra: the floor that end-to-end times are compared with.
# --------------------------------------------------------------------------------------------

def floor_setup(backend: str, shape: tuple[int, int], psf_new: np.ndarray, psf_ref: np.ndarray,
                sigma2: tuple[float, float], flux_new: float) -> dict[str, Any]:
    """PSF-only factors of the floor on ``backend``: D's weights and S's filter (complex64).

    Computed in float64 and cast, as the core does; not part of the timing.
    """
    from astro_zackay.fourier import abs2, floored_inv_sqrt, get_array_module, psf_rfft

    be = get_array_module(backend)
    a_h = psf_rfft(psf_ref, shape)  # A = Fr Pr_h with Fr = 1
    b_h = psf_rfft(psf_new, shape) * flux_new  # B = Fn Pn_h
    inv_sqrt, good = floored_inv_sqrt(sigma2[0] * abs2(a_h) + sigma2[1] * abs2(b_h))
    wa, wb = a_h * inv_sqrt, b_h * inv_sqrt
    q_conj = np.conj(wa * b_h * good)  # conj(F_D P_D_h): S_h = conj(Q) D_h
    return {"be": be, "shape": shape,
            **{name: be.asarray(arr.astype(np.complex64)) for name, arr in
               (("wa", wa), ("wb", wb), ("q_conj", q_conj))}}


def _squared_kernel_h(setup: dict[str, Any], weight: Any) -> Any:
    """Transform of ``k**2`` for the kernel ``k_h = conj(Q) weight`` of S from one image."""
    be, shape = setup["be"], setup["shape"]
    kernel = be.irfft2(setup["q_conj"] * weight, s=shape)
    kernel *= kernel
    return be.rfft2(kernel, s=shape)


def fft_floor(setup: dict[str, Any], new: Any, ref: Any, var_new: Any, var_ref: Any) -> Any:
    """D, S and Scorr (with source noise) of float32 arrays on the backend: 11 FFTs.

    4 for the squared kernels of S's source noise, 4 forward transforms of the images and
    variance maps, 3 inverse ones for D, S and S's variance.
    """
    be, shape = setup["be"], setup["shape"]
    v_h = _squared_kernel_h(setup, setup["wa"]) * be.rfft2(var_new, s=shape)
    v_h += _squared_kernel_h(setup, setup["wb"]) * be.rfft2(var_ref, s=shape)
    variance = be.irfft2(v_h, s=shape)
    d_h = setup["wa"] * be.rfft2(new, s=shape)
    d_h -= setup["wb"] * be.rfft2(ref, s=shape)
    diff = be.irfft2(d_h, s=shape)
    d_h *= setup["q_conj"]
    score = be.irfft2(d_h, s=shape)
    be.xp.maximum(variance, 1e-30, out=variance)
    be.xp.sqrt(variance, out=variance)
    score /= variance
    return diff, score


def floor_inputs(backend: str, ref: np.ndarray, sci: np.ndarray) -> tuple[Any, ...]:
    """Float32 sky-subtracted images and Poisson+read variance maps, on the backend."""
    from astro_zackay.fourier import get_array_module

    be = get_array_module(backend)
    out = []
    for image in (sci, ref):
        image = np.asarray(image, dtype=np.float32)
        out.append(image - np.float32(np.median(image)))
    for image in (sci, ref):
        out.append(np.maximum(image, 0).astype(np.float32) + np.float32(READ_NOISE**2))
    return tuple(be.asarray(a) for a in out)


# --------------------------------------------------------------------------------------------
# Simulated pairs, cached as FITS.
# --------------------------------------------------------------------------------------------

def pair_paths(workdir: Path, size: int) -> dict[str, Path]:
    """Where the simulated pair of ``size`` lives (FITS files and the true centre PSFs)."""
    folder = workdir / f"pair{size}"
    return {"folder": folder, "reference": folder / "reference.fits",
            "science": folder / "science.fits", "psfs": folder / "true_psfs.npz"}


def simulate_pair_files(workdir: Path, size: int, seed: int = 1) -> None:
    """Simulate the pair of ``size`` and write it as float32 FITS in electrons (no uncertainty).

    The data carry ``BUNIT``, ``GAIN`` and ``RDNOISE``, so the default call estimates the
    variance from the data as it would for a real frame.
    """
    from astropy.io import fits

    from astro_zackay.simulation import PSFField, simulate_pair

    paths = pair_paths(workdir, size)
    paths["folder"].mkdir(parents=True, exist_ok=True)
    area = (size / 2048) ** 2
    science_psf = PSFField(fwhm=3.5, fwhm_gradient=(0.2, 0.1), ellipticity=0.05,
                           shape=(size, size))
    pair = simulate_pair(size, reference_psf=2.5, science_psf=science_psf,
                         flux_ratio=FLUX_RATIO, shift=SHIFT, read_noise=READ_NOISE,
                         n_stars=int(STARS_PER_4MPIX * area),
                         n_transients=int(TRANSIENTS_PER_4MPIX * area),
                         transient_snr=(6.0, 15.0), wcs=False, seed=seed)
    psf_ref, psf_new = pair.true_psf_stamps()
    for name, image in (("reference", pair.reference.ccd), ("science", pair.science.ccd)):
        header = fits.Header({"BUNIT": "electron", "GAIN": 1.0, "RDNOISE": READ_NOISE})
        fits.PrimaryHDU(np.asarray(image.data, dtype=np.float32), header).writeto(
            paths[name], overwrite=True)
    np.savez(paths["psfs"], reference=psf_ref, science=psf_new)


def read_pair(reference: Path, science: Path, unit: str | None = None) -> tuple[Any, Any]:
    """Both images as CCDData (reading is not part of any timing)."""
    from astropy.nddata import CCDData

    return CCDData.read(reference, unit=unit), CCDData.read(science, unit=unit)


# --------------------------------------------------------------------------------------------
# Workers: each runs in its own process and writes one JSON result.
# --------------------------------------------------------------------------------------------

def _warm_up(backend_kwargs: dict[str, Any]) -> None:
    """One small subtraction: lazy imports, FFT plans and GPU context outside the timings."""
    from astro_zackay import subtract
    from astro_zackay.simulation import simulate_pair

    pair = simulate_pair(256, n_stars=60, seed=3, wcs=False)
    subtract(pair.reference.ccd, pair.science.ccd, **backend_kwargs).find_transients(THRESHOLD)


def _backend_kwargs(backend: str) -> dict[str, Any]:
    """``{"backend": backend}`` for a GPU run; an error when ``subtract`` cannot take it."""
    if backend == "numpy":
        return {}
    import inspect

    from astro_zackay import subtract

    if "backend" not in inspect.signature(subtract).parameters:
        raise RuntimeError("subtract() has no backend= parameter on this checkout")
    return {"backend": backend}


def _sync(backend: str):
    """A function that waits for the GPU (None on the CPU)."""
    if backend == "numpy":
        return None
    import cupy

    return cupy.cuda.Device().synchronize


def device_name(backend: str) -> str:
    """The GPU's name, or the CPU count for numpy."""
    if backend == "numpy":
        return f"CPU, {os.cpu_count()} cores"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _subtract_case(ref, sci, kwargs: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Time ``subtract(...).find_transients`` and its peak memory (first call)."""
    from astro_zackay import subtract

    def call():
        return subtract(ref, sci, **kwargs).find_transients(THRESHOLD)

    rss0 = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    candidates = call()
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    extra_mb = peak_mb() - rss0
    seconds, cpu = first, first_cpu
    if repeats > 1:
        wall, cpu_more = best_times(call, repeats - 1)
        seconds, cpu = min(first, wall), min(first_cpu, cpu_more)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": extra_mb,
            "n_candidates": len(candidates)}


def worker_sim(spec: dict[str, Any]) -> dict[str, Any]:
    """End to end, PSFs given and the floor on one cached simulated pair."""
    backend, size, repeats = spec["backend"], spec["size"], spec["repeats"]
    kwargs = _backend_kwargs(backend)
    _warm_up(kwargs)
    paths = pair_paths(Path(spec["workdir"]), size)
    ref, sci = read_pair(paths["reference"], paths["science"])
    psfs = np.load(paths["psfs"])
    out = {"device": device_name(backend), "input_mb": 2 * size * size * 4 / 2**20}
    out["e2e"] = _subtract_case(ref, sci, kwargs, repeats)
    given = {**kwargs, "reference_psf": psfs["reference"], "science_psf": psfs["science"]}
    out["given"] = _subtract_case(ref, sci, given, repeats)
    out["floor"] = _floor_case(backend, ref.data, sci.data, psfs, repeats)
    return out


def _floor_case(backend: str, ref: np.ndarray, sci: np.ndarray, psfs, repeats: int) -> dict:
    """Best time and peak memory of `fft_floor` on this pair."""
    sigma2 = tuple(float(np.median(im)) + READ_NOISE**2 for im in (ref, sci))
    setup = floor_setup(backend, ref.shape, psfs["science"], psfs["reference"], sigma2,
                        FLUX_RATIO)
    arrays = floor_inputs(backend, ref, sci)
    sync = _sync(backend)
    rss0 = reset_peak()
    seconds, cpu = best_times(lambda: fft_floor(setup, *arrays), max(3, repeats + 1), sync)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak_mb() - rss0}


def worker_real(spec: dict[str, Any]) -> dict[str, Any]:
    """Properimage's real pair end to end."""
    kwargs = _backend_kwargs(spec["backend"])
    _warm_up(kwargs)
    ref, sci = read_pair(REAL_REFERENCE, REAL_SCIENCE, unit="adu")
    out = {"device": device_name(spec["backend"]),
           "input_mb": 2 * ref.data.size * 4 / 2**20}
    out["e2e"] = _subtract_case(ref, sci, {**kwargs, **REAL_KWARGS}, spec["repeats"])
    return out


def worker_psf(spec: dict[str, Any]) -> dict[str, Any]:
    """``estimate_psf`` of the reference frame of one cached simulated pair."""
    from astro_zackay import estimate_psf

    paths = pair_paths(Path(spec["workdir"]), spec["size"])
    ref, _ = read_pair(paths["reference"], paths["science"])
    rss0 = reset_peak()
    seconds = best_time(lambda: estimate_psf(ref), spec["repeats"])
    return {"e2e": {"seconds": seconds, "peak_mb": peak_mb() - rss0},
            "input_mb": ref.data.size * 4 / 2**20, "device": device_name("numpy")}


def worker_coadd_frames(spec: dict[str, Any]) -> None:
    """Simulate the coadd frames with ``bench_coadd``'s simulation, in a worker so that the
    launcher, the parent of every measured process, stays small."""
    import bench_coadd

    bench_coadd.simulate(spec["folder"], COADD_SIZE, spec["n"], seed=1)


WORKERS = {"sim": worker_sim, "real": worker_real, "psf": worker_psf,
           "coadd_frames": worker_coadd_frames,
           "simulate": lambda spec: simulate_pair_files(Path(spec["workdir"]), spec["size"])}


def run_worker(kind: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; its JSON result, or ``{"error": ...}``."""
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_path),
               str(out_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode or not out_path.exists():
            return {"error": (proc.stderr.strip() or "no output").splitlines()[-1][-300:]}
        return json.loads(out_path.read_text())


def worker_main(kind: str, spec_path: str, out_path: str) -> None:
    """Entry point of a worker process."""
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[kind](spec)
    Path(out_path).write_text(json.dumps(result if result is not None else {}))


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table."""

    what: str
    size: str
    seconds: float = float("nan")
    peak_mb: float = float("nan")
    input_mb: float = float("nan")
    floor_s: float = float("nan")
    peer_s: float = float("nan")
    note: str = ""
    cpu_s: float = float("nan")

    def cells(self) -> list[str]:
        """The row as printed."""
        def num(value: float, fmt: str) -> str:
            return "" if not np.isfinite(value) else format(value, fmt)

        return [self.what, self.size, num(self.seconds, ".3f"), num(self.floor_s, ".3f"),
                num(self.seconds / self.floor_s, ".1f"), num(self.cpu_s, ".3f"),
                num(self.peak_mb, ".0f"),
                num(self.peak_mb / self.input_mb, ".1f"), num(self.peer_s, ".2f"),
                num(self.peer_s / self.seconds, ".1f"), self.note]


HEADER = ["what", "size", "seconds", "floor s", "x floor", "cpu s", "peak MB", "x input",
          "peer s", "peer/ours", "note"]


def print_table(rows: list[Row]) -> None:
    """One markdown table."""
    cells = [HEADER] + [row.cells() for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    for k, line in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def progress(rows: list[Row]) -> list[Row]:
    """Echo finished rows to stderr (kept if a later case is cut off); return them.

    The simulated sizes echo their rows one size at a time, in `sim_rows`.
    """
    for row in rows:
        print("done: " + " | ".join(cell for cell in row.cells() if cell), file=sys.stderr,
              flush=True)
    return rows


def fitted_exponent(sizes: list[int], seconds: list[float]) -> float:
    """Slope of log(seconds) against log(pixels) (NaN with fewer than two sizes)."""
    keep = [(s * s, t) for s, t in zip(sizes, seconds) if np.isfinite(t)]
    if len(keep) < 2:
        return float("nan")
    n, t = np.log(np.array(keep)).T
    return float(np.polyfit(n, t, 1)[0])


# --------------------------------------------------------------------------------------------
# The cases, as rows.
# --------------------------------------------------------------------------------------------

def ensure_pair(workdir: Path, size: int) -> str | None:
    """Simulate and cache the pair of ``size`` unless it is there; an error text or None."""
    paths = pair_paths(workdir, size)
    if all(paths[k].exists() for k in ("reference", "science", "psfs")):
        return None
    print(f"simulating the {size}^2 pair into {paths['folder']} ...", flush=True)
    result = run_worker("simulate", {"workdir": str(workdir), "size": size}, timeout=1800)
    return result.get("error")


def _size_label(size: int) -> str:
    return f"{size}^2"


def _repeats(size: int, quick: bool) -> int:
    if quick:
        return 2 if size <= 1024 else 1
    return 3 if size <= 2048 else (2 if size <= 4096 else 1)


def sim_rows(args, backend: str, peer_times: dict[int, float]) -> list[Row]:
    """End to end, PSFs given and the floor per size, then the exponent rows."""
    rows, sizes, e2e, floors = [], [], [], []
    for size in args.sizes:
        error = ensure_pair(args.workdir, size)
        res = error and {"error": error} or run_worker(
            "sim", {"workdir": str(args.workdir), "size": size, "backend": backend,
                    "repeats": _repeats(size, args.quick)}, timeout=args.timeout)
        label = f"subtract e2e [{backend}]"
        if "error" in res:
            rows.append(Row(label, _size_label(size), note="FAILED: " + res["error"]))
            continue
        floor = res["floor"]["seconds"]
        rows += progress([
            Row(label, _size_label(size), res["e2e"]["seconds"], res["e2e"]["peak_mb"],
                res["input_mb"], floor, peer_times.get(size, float("nan")),
                f"{res['e2e']['n_candidates']} candidates; {res['device']}",
                cpu_s=res["e2e"].get("cpu_seconds", float("nan"))),
            Row(f"subtract PSFs given [{backend}]", _size_label(size), res["given"]["seconds"],
                res["given"]["peak_mb"], res["input_mb"], floor,
                cpu_s=res["given"].get("cpu_seconds", float("nan"))),
            Row(f"fft_floor [{backend}]", _size_label(size), floor, res["floor"]["peak_mb"],
                res["input_mb"], note="11 float32 FFTs + algebra",
                cpu_s=res["floor"].get("cpu_seconds", float("nan")))])
        sizes.append(size)
        e2e.append(res["e2e"]["seconds"])
        floors.append(floor)
    if len(sizes) > 1:
        span = f"{sizes[0]}^2-{sizes[-1]}^2"
        nlogn = fitted_exponent(sizes, [s * s * math.log(s * s) for s in sizes])
        for what, times in (("e2e", e2e), ("fft_floor", floors)):
            rows.append(Row(f"exponent {what} [{backend}]", span,
                            note=f"t ~ N^{fitted_exponent(sizes, times):.2f} "
                                 f"(N log N: {nlogn:.2f})"))
    return rows


def peer_subtract(args, reference: Path, science: Path, name: str) -> tuple[float, str | None]:
    """properimage's default subtract: its wall time, and None or why it has none.

    With ``--reuse-peers`` a successful earlier run in the same work folder is read back
    instead of run again (the peer does not change between runs of this benchmark).
    """
    workdir = args.workdir / "peers" / name
    earlier = workdir / "result.json"
    if args.reuse_peers:
        result = json.loads(earlier.read_text()) if earlier.exists() else {}
        if result.get("ok"):
            return float(result["wall_s"]), None
        return float("nan"), f"no earlier result in {workdir}"
    res = _peers.run_peer_subtraction("properimage", reference, science, workdir=workdir,
                                      threads=2, timeout=args.timeout)
    return res.wall_s, None if res.available else res.reason


def peer_sim_times(args) -> tuple[dict[int, float], list[Row]]:
    """properimage's default subtract on the simulated sizes it can handle."""
    times, rows = {}, []
    for size in args.sizes:
        if size > args.peer_max_size:
            rows.append(Row("properimage subtract", _size_label(size),
                            note=f"not run: above --peer-max-size {args.peer_max_size}"))
            continue
        if ensure_pair(args.workdir, size) is not None:
            continue
        paths = pair_paths(args.workdir, size)
        wall, reason = peer_subtract(args, paths["reference"], paths["science"],
                                     f"properimage_{size}")
        if reason is None:
            times[size] = wall
        else:
            rows.append(Row("properimage subtract", _size_label(size),
                            note="FAILED: " + reason[-200:]))
    return times, rows


def real_rows(args, backend: str) -> list[Row]:
    """Properimage's real pair, ours and properimage's default call."""
    res = run_worker("real", {"backend": backend, "repeats": 3}, timeout=args.timeout)
    size = "1024x682"
    if "error" in res:
        return [Row(f"real pair e2e [{backend}]", size, note="FAILED: " + res["error"])]
    peer = float("nan")
    note = "target <= 0.3 s"
    if not args.no_peers:
        wall, reason = peer_subtract(args, REAL_REFERENCE, REAL_SCIENCE, "real")
        peer = wall if reason is None else peer
        note += "" if reason is None else "; properimage: " + reason[-120:]
    return [Row(f"real pair e2e [{backend}]", size, res["e2e"]["seconds"],
                res["e2e"]["peak_mb"], res["input_mb"], peer_s=peer,
                note=f"{res['e2e']['n_candidates']} candidates; {note}",
                cpu_s=res["e2e"].get("cpu_seconds", float("nan")))]


def psf_rows(args) -> list[Row]:
    """``estimate_psf`` of one frame."""
    size = 2048 if args.quick else 4096
    error = ensure_pair(args.workdir, size)
    res = {"error": error} if error else run_worker(
        "psf", {"workdir": str(args.workdir), "size": size, "repeats": 2}, args.timeout)
    if "error" in res:
        return [Row("estimate_psf", _size_label(size), note="FAILED: " + res["error"])]
    return [Row("estimate_psf", _size_label(size), res["e2e"]["seconds"],
                res["e2e"]["peak_mb"], res["input_mb"], note="one frame, stars found too")]


def coadd_rows(args) -> list[Row]:
    """Per-frame coadd time against properimage, and the memory at several frame counts."""
    import bench_coadd

    counts = (2, 5) if args.quick else (5, 10, 20)
    frames_dir = args.workdir / f"coadd{COADD_SIZE}x{counts[-1]}"
    if not (frames_dir / "truth.json").exists():
        print(f"simulating {counts[-1]} coadd frames into {frames_dir} ...", flush=True)
        frames_dir.mkdir(parents=True, exist_ok=True)
        made = run_worker("coadd_frames", {"folder": str(frames_dir), "n": counts[-1]},
                          timeout=args.timeout)
        if "error" in made:
            return [Row("coadd", _size_label(COADD_SIZE), note="FAILED: " + made["error"])]
    peer = _peer_coadd(args, frames_dir)
    rows = []
    frame_mb = COADD_SIZE**2 * 4 / 2**20
    for n in counts:
        label = f"coadd {n} frames, s/frame"
        ours = _coadd_run([sys.executable, bench_coadd.__file__, "--worker", "ours",
                           str(frames_dir), "--worker-frames", str(n)],
                          frames_dir / "out_ours.json", args.timeout)
        if "error" in ours:
            rows.append(Row(label, _size_label(COADD_SIZE), note="FAILED: " + ours["error"]))
            continue
        every = n == counts[-1]  # properimage coadds every frame of the folder
        note = "x input = peak over one float32 frame"
        if every and "error" in peer:
            note += "; properimage: " + peer["error"]
        rows.append(Row(label, _size_label(COADD_SIZE), ours["wall"] / n,
                        ours["rss"] - ours["rss_imports"], frame_mb,
                        peer_s=peer["wall"] / n if every and "wall" in peer else float("nan"),
                        note=note))
    return rows


def _peer_coadd(args, frames_dir: Path) -> dict[str, Any]:
    """properimage's coadd of every frame in ``frames_dir`` (or its earlier result)."""
    import bench_coadd

    out_json = frames_dir / "out_properimage.json"
    if args.reuse_peers:
        return (json.loads(out_json.read_text()) if out_json.exists()
                else {"error": f"no earlier result in {frames_dir}"})
    if args.no_peers or args.quick:
        return {"error": "not run (--no-peers or --quick)"}
    return _coadd_run([bench_coadd.PROPERIMAGE_PYTHON, "-c", bench_coadd.PROPERIMAGE_WORKER,
                       str(frames_dir)], out_json, args.timeout)


def _coadd_run(cmd: list[str], out_json: Path, timeout: float) -> dict[str, Any]:
    """Run one coadd harness command of bench_coadd; its JSON costs or an error."""
    out_json.unlink(missing_ok=True)
    if not Path(cmd[0]).exists():
        return {"error": f"{cmd[0]} not found"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode or not out_json.exists():
        return {"error": (proc.stderr.strip() or "no output").splitlines()[-1][-200:]}
    return json.loads(out_json.read_text())


def gpu_rows(args) -> list[Row]:
    """The subtraction rows on the GPU, or one row saying why there are none."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return [Row("backend cupy", "-", note="skipped: CuPy is not installed")]
    return sim_rows(args, "cupy", {})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1024^2 and 2048^2, the real pair, 5 coadd frames")
    parser.add_argument("--sizes", help="comma-separated sizes (default 1024,2048,4096,8192)")
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                        help="cupy: the subtraction rows on the GPU as well")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="cache of simulated inputs and peer outputs")
    parser.add_argument("--cases", default="sim,real,psf,coadd",
                        help="comma-separated subset of sim,real,psf,coadd")
    parser.add_argument("--no-peers", action="store_true", help="skip properimage")
    parser.add_argument("--reuse-peers", action="store_true",
                        help="read properimage's results of an earlier run in --workdir back "
                             "(never run it)")
    parser.add_argument("--peer-max-size", type=int,
                        help="largest simulated size properimage is run on (default 2048; "
                             "0 with --quick: the real pair only)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default = "1024,2048" if args.quick else "1024,2048,4096,8192"
    args.sizes = [int(s) for s in (args.sizes or default).split(",")]
    if args.peer_max_size is None:
        args.peer_max_size = 0 if args.quick else 2048
    args.cases = set(args.cases.split(","))
    args.workdir = args.workdir.resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the selected cases one after the other and print the table."""
    args = parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows: list[Row] = []
    if args.backend == "cupy":  # first: on a GPU machine the time is short
        rows += gpu_rows(args)
    if "real" in args.cases:
        rows += progress(real_rows(args, "numpy"))
    if "sim" in args.cases:
        peer_times, peer_notes = ({}, []) if args.no_peers else peer_sim_times(args)
        rows += sim_rows(args, "numpy", peer_times) + progress(peer_notes)
    if "psf" in args.cases:
        rows += progress(psf_rows(args))
    if "coadd" in args.cases:
        rows += progress(coadd_rows(args))
    print_table(rows)
    reused = "; its times read back from an earlier run" if args.reuse_peers else ""
    print(f"(peer = properimage 0.7.2 in {_peers.PEERS_ROOT / 'properimage'}{reused}; total "
          f"{time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
