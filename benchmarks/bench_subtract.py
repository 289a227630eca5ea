"""Benchmark: astro_zackay ``subtract`` (ZOGY) against properimage, zogyp, sfft and ois.

Every method subtracts the same registered FITS pairs; the script prints ONE table (each
method's numbers and its ratios to ours) and a legend.  Nothing is asserted.

Cases
-----
* ``real``: properimage's sample pair ``aligned_eso085-030-004.fit`` (reference) and
  ``-005.fit`` (science), 1024 x 682 ADU, no BUNIT; ours gets ``unit='adu', gain=1.4``
  (SOURCE.md: the sky noise implies 1.35-1.5 e-/ADU) and ``saturation=65000``.  The two
  exposures are 74 s apart, so every > 5 sigma blob is a residual.
* ``real+inj``: the same pair with ``--n-inject`` (50) point sources injected into the
  science frame (``inject_sources``, Poisson noise at gain 1.4, the science PSF from our
  ``estimate_psf`` at each position) on empty sky, at a true S/N of 10-15, written to a new
  float32 FITS file.
* ``decam``: DECam stamps of one field (256 x 256 ADU, ``unit='adu'``; GAIN, RDNOISE and
  SATURATE keywords): exposure 18a (2018) as reference, 04a (2016) as science; one source
  changed between the epochs (13 sigma at (129, 128) in SFFT's decorrelated difference).
* ``jwst``: the JWST NIRCam F200W pair of Abell 2744 (900 x 900, MJy/sr, resampled, so
  its noise is correlated), each with its error map as the uncertainty; no transient stated.
* ``sim``: ``simulate_pair`` 2048^2 (1024^2 with ``--quick``): ~2000 Gaussian stars
  (500 at 1024^2), fluxes 2e3-2e5 e- (power law, index 2.5), FWHM 2.5 (reference) vs 3.5
  (science) px, flux ratio 0.9, shift (0.3, -0.2) px, sky 200 / 300 e-, read noise 5 e-,
  and 300 (100) transients at true S/N 5-20 (uniform) on empty sky (> 15 px from every
  star, > 64 px from the edges), written as FITS in electrons with BUNIT, GAIN = 1, RDNOISE,
  the true uncertainty (UNCERT extension, read by ours only; the peers read the primary HDU).

"True S/N" is the optimal ZOGY S/N of a point source with background noise only,
``f / F_n * sqrt(F_S)`` (docs/science.rst), from the true PSFs (``sim``) or our
estimated PSFs and the background rms of each frame (``real+inj``).

Methods (each in its own subprocess, one at a time, ``--threads`` threads, default 1)
-----------------------------------------------------------------------------------
* ``ours``: ``astro_zackay.subtract(REF_PATH, SCI_PATH, **case kwargs)``, the default call
  end to end (FITS reading, background, PSF estimation, flux-ratio/shift fit, Scorr), run by
  this script in a child with astro_zackay's python and ``subtract(workers=--threads)``;
* the peers through ``benchmarks/_peers.py``: properimage 0.7.2 ``subtract`` default call
  (beta + shift) and Tutorial04 call, zogyp ``run_ZOGY`` default, sfft
  ``Customized_Packet.CP`` (the harness' "tutorial" variant) and ois ``optimal_system``
  (Bramich 11 x 11, the harness' default).  A peer that cannot run is listed with its reason;
  one whose peak RSS, extrapolated from what was measured here (``GB_PER_MPIX``), exceeds
  ``--max-mem-gb`` (10) is skipped: sfft's CPU backend would need ~20 GB at 2048^2.

Columns
-------
Timings and memory are measured the same way for everybody (as ``_peers`` does): ``wall``
is ``time.perf_counter`` around the call inside the child (imports excluded: ``import`` is
the package import after numpy), ``cpu`` the child's own CPU time in the call (not its
subprocesses: SExtractor/PSFEx of zogyp), ``RSS`` the peak RSS of the child or of its
largest subprocess (``ru_maxrss``, interpreter and imports included).  Linux carries a
parent's peak RSS over into its child's ``ru_maxrss``, so every method is started from a
fresh, small launcher process (``--run-one``; its own peak is printed) rather than from the
main process, which holds the simulated images.

Quality is measured on a common region: the pixels more than 32 px from the edges and more
than 15 px from any pixel at or above the saturation level in either input.  "Off-star" is
that region less the pixels within 5 px of a source (pixels 3 sigma above the local sky in
either input after a 1 px Gaussian smoothing) or within 8 px of an injected source.

* ``std Sc``: std of the method's Scorr over the region, as returned (1 in sigma units);
* ``sigma_T``: the robust (1.4826 MAD) std off-star of the method's detection statistic -
  Scorr where the method returns one, else its difference image D (per pixel, no matched
  filter) - shown as ``Sc <value>`` or ``D <value>``;
* ``T`` is that statistic divided by ``sigma_T``; blobs are local maxima of ``|T|`` above 5
  (``astro_zackay.transients.find_transients``, 7 x 7 box) in the region, and
  ``blobs raw`` the same for ``|Scorr| > 5`` as returned (Scorr methods only).  Blobs within
  4 px of an injected source are not counted (those are detections, not residuals);
* ``recovered``: fraction of injected sources with a blob within 2 px (``|T| > 5`` and,
  after the slash, ``|Scorr| > 5`` as returned); in brackets the fraction among those at
  true S/N >= 8 (``sim`` only).

Run from the repository root: ``python benchmarks/bench_subtract.py [--quick]`` (about 4
min with ``--quick``, 7-8 min without on 2 shared cores; properimage's default call takes
~3 min of that at 2048^2).  ``--workdir DIR`` keeps the
inputs, logs and arrays; ``--cases`` / ``--methods`` select a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("ASTRO_ZACKAY_SHARED", "/work/shared"))
SAMPLE_REFERENCE = SHARED / "data" / "properimage" / "aligned_eso085-030-004.fit"
SAMPLE_SCIENCE = SHARED / "data" / "properimage" / "aligned_eso085-030-005.fit"
#: Real pair: SOURCE.md (sky noise implies a gain of 1.35-1.5 e-/ADU; saturated at 65535).
REAL_GAIN = 1.4
REAL_SATURATION = 65000.0
DECAM = SHARED / "data" / "decam-sfft" / "input_data"
NIRCAM = SHARED / "data" / "nircam-a2744"
NIRCAM_REFERENCE = "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"
NIRCAM_SCIENCE = "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp"

EDGE = 32  # px trimmed from every side of the common region
SATURATION_GROW = 15  # px around saturated input pixels left out of the region
SOURCE_GROW = 5  # px around detected sources left out of the off-star region
INJECTED_GROW = 8  # px around injected sources left out of the off-star region
THRESHOLD = 5.0
MATCH_RADIUS = 2.0  # px: an injected source is recovered by a blob this close
RESIDUAL_EXCLUSION = 4.0  # px: blobs this close to an injected source are not residuals

#: (label, peer or None for ours, harness variant)
METHODS: tuple[tuple[str, str | None, str], ...] = (
    ("ours", None, "default"),
    ("properimage default", "properimage", "default"),
    ("properimage tutorial", "properimage", "tutorial"),
    ("zogyp", "zogyp", "default"),
    ("sfft CP", "sfft", "tutorial"),
    ("ois Bramich", "ois", "default"),
)
CASES = ("real", "real+inj", "decam", "jwst", "sim")
#: Peak RSS per megapixel measured here (sfft CP: 3.4 GB at 0.70 Mpix, 4.9 GB at 1.05 Mpix;
#: ois Bramich 11x11: 0.77 / 1.1 GB): a run whose estimate exceeds --max-mem-gb is skipped.
GB_PER_MPIX = {"sfft": 4.8, "ois": 1.1}


# --------------------------------------------------------------------------------------------
# Our own child process (same measurements as the _peers children).
# --------------------------------------------------------------------------------------------

def ours_worker(spec_path: str) -> int:
    """Run ``astro_zackay.subtract`` as described in the JSON spec; write result.json + .npy.

    Called as ``python bench_subtract.py --ours-worker SPEC``.  Only numpy is imported
    before the timed import, as in the peers' children.
    """
    spec = json.loads(Path(spec_path).read_text())
    workdir = Path(spec["workdir"])
    result: dict[str, Any] = {"ok": False, "info": {}}
    try:
        t0 = time.perf_counter()
        from astro_zackay import subtract

        result["import_s"] = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        res = subtract(spec["reference"], spec["science"], workers=int(spec["threads"]),
                       **spec["kwargs"])
        result["wall_s"] = time.perf_counter() - t0
        result["info"]["cpu_s"] = time.process_time() - c0
        result["info"]["flux_ratio"] = res.flux_ratio
        result["info"]["shift"] = list(res.shift)
        candidates = res.find_transients(THRESHOLD)
        good = (np.asarray(candidates["good"], bool) if "good" in candidates.colnames
                else np.ones(len(candidates), bool))
        result["info"]["candidates"] = len(candidates)
        result["info"]["good"] = int(good.sum())
        np.save(workdir / "candidates.npy", np.column_stack(
            [np.asarray(candidates["x"], float), np.asarray(candidates["y"], float), good]))
        np.save(workdir / "D.npy", np.asarray(res.difference.data, dtype=float))
        np.save(workdir / "Scorr.npy", np.asarray(res.score.data, dtype=float))
        result["ok"] = True
    except Exception:  # reported in the table, like a failing peer
        import traceback

        result["error"] = traceback.format_exc()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    result["peak_rss_mb"] = max(own, kids)
    (workdir / "result.json").write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


@dataclass
class Run:
    """One method on one case: costs and the arrays the quality metrics need."""

    label: str
    ok: bool
    reason: str = "ok"
    wall_s: float = float("nan")
    cpu_s: float = float("nan")
    import_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    difference: np.ndarray | None = None
    score: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    candidates: np.ndarray | None = None  # ours: (n, 3) x, y, good of find_transients


def run_ours(reference: Path, science: Path, kwargs: dict[str, Any], workdir: Path,
             threads: int, timeout: float = 1800.0) -> Run:
    """Run ``subtract`` in a child process of astro_zackay's own python."""
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "D.npy", "Scorr.npy", "candidates.npy"):
        (workdir / stale).unlink(missing_ok=True)
    spec = {"reference": str(reference), "science": str(science), "kwargs": kwargs,
            "workdir": str(workdir), "threads": threads}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS", "PYFFTW_NUM_THREADS"):
        env[var] = str(threads)
    log = workdir / "child_ours.log"
    with open(log, "w") as fh:
        try:
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--ours-worker",
                            str(spec_path)], stdout=fh, stderr=subprocess.STDOUT, env=env,
                           cwd=str(workdir), timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return Run("ours", False, f"timed out after {timeout} s")
    result_path = workdir / "result.json"
    if not result_path.exists():
        return Run("ours", False, "no result.json: " + log.read_text()[-400:])
    res = json.loads(result_path.read_text())
    if not res["ok"]:
        return Run("ours", False, res.get("error", "?")[-400:],
                   peak_rss_mb=res.get("peak_rss_mb", float("nan")))
    return Run("ours", True, wall_s=res["wall_s"], cpu_s=res["info"]["cpu_s"],
               import_s=res["import_s"], peak_rss_mb=res["peak_rss_mb"],
               difference=np.load(workdir / "D.npy"), score=np.load(workdir / "Scorr.npy"),
               info=res["info"], candidates=np.load(workdir / "candidates.npy"))


def run_method(label: str, peer: str | None, variant: str, case: Case, workdir: Path,
               threads: int, max_mem_gb: float) -> Run:
    """Run one method (ours or a peer through ``_peers``) on one case."""
    if peer is None:
        return run_ours(case.reference, case.science, case.ours_kwargs, workdir, threads)
    need = GB_PER_MPIX.get(peer, 0.0) * case.region.size / 1e6
    if need > max_mem_gb:
        return Run(label, False, f"skipped: needs ~{need:.0f} GB ({GB_PER_MPIX[peer]} GB per "
                   f"Mpix measured here) > --max-mem-gb {max_mem_gb:g} on a shared machine")
    import _peers

    res = _peers.run_peer_subtraction(peer, case.reference, case.science, variant=variant,
                                      workdir=workdir, threads=threads)
    if not res.available:
        return Run(label, False, res.reason)
    return Run(label, True, wall_s=res.wall_s, cpu_s=float(res.info.get("cpu_s", np.nan)),
               import_s=res.import_s, peak_rss_mb=res.peak_rss_mb,
               difference=res.difference, score=res.score, info=res.info)


def own_peak_rss_mb() -> float:
    """Peak RSS of this process's own memory map (VmHWM): what a child inherits, in MiB.

    ``ru_maxrss`` would also include the value this process inherited from its parent.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(spec_path: str) -> int:
    """Launcher: run one method on one case, then measure its quality; write metrics.json.

    Called as ``python bench_subtract.py --run-one SPEC`` from a fresh interpreter, so the
    process that spawns the measured child is small: Linux carries a parent's peak RSS over
    into its child's ``ru_maxrss`` across fork/exec, and the main process (which builds the
    2048^2 simulation) would otherwise put a floor of ~750 MB under every RSS figure.
    """
    spec = json.loads(Path(spec_path).read_text())
    case = Case.load(Path(spec["case_dir"]))
    launcher_rss = own_peak_rss_mb()
    run = run_method(spec["label"], spec["peer"], spec["variant"], case, Path(spec["workdir"]),
                     spec["threads"], spec["max_mem_gb"])
    run.label = spec["label"]
    q = quality(run, case) if run.ok else {}
    out = {k: v for k, v in vars(run).items()
           if k not in ("difference", "score", "info", "candidates")}
    out.update(quality=q, launcher_rss_mb=launcher_rss)
    (Path(spec["workdir"]) / "metrics.json").write_text(json.dumps(out, indent=1))
    return 0


def launch(case_dir: Path, label: str, peer: str | None, variant: str, workdir: Path,
           threads: int, max_mem_gb: float) -> tuple[Run, dict[str, Any], float]:
    """Run ``run_one`` in a fresh interpreter; return the run, its quality, launcher RSS."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.json").unlink(missing_ok=True)
    spec = {"case_dir": str(case_dir), "label": label, "peer": peer, "variant": variant,
            "workdir": str(workdir), "threads": threads, "max_mem_gb": max_mem_gb}
    spec_path = workdir / "launch.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run-one",
                           str(spec_path)], capture_output=True, text=True, check=False)
    metrics = workdir / "metrics.json"
    if not metrics.exists():
        return Run(label, False, f"launcher failed: {(proc.stderr or proc.stdout)[-600:]}"), {}, 0
    out = json.loads(metrics.read_text())
    quality_ = out.pop("quality")
    launcher_rss = out.pop("launcher_rss_mb")
    return Run(**out), quality_, launcher_rss


# --------------------------------------------------------------------------------------------
# Cases: input files, common region, off-star region, injected sources.
# --------------------------------------------------------------------------------------------

@dataclass
class Case:
    """A registered pair of FITS files and what the quality metrics need about it."""

    name: str
    reference: Path
    science: Path
    ours_kwargs: dict[str, Any]
    region: np.ndarray  # common evaluation region (bool)
    offstar: np.ndarray  # region without sources (bool)
    injected: np.ndarray | None = None  # (n, 3): x, y, true S/N
    note: str = ""

    def save(self, folder: Path) -> Path:
        """Write the case to ``folder`` (case.json + case.npz) for a launcher process."""
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"name": self.name, "reference": str(self.reference),
                "science": str(self.science), "ours_kwargs": self.ours_kwargs,
                "note": self.note}
        (folder / "case.json").write_text(json.dumps(meta, indent=1))
        arrays = {"region": self.region, "offstar": self.offstar}
        if self.injected is not None:
            arrays["injected"] = self.injected
        np.savez(folder / "case.npz", **arrays)
        return folder

    @classmethod
    def load(cls, folder: Path) -> Case:
        """Read a case written by `save`."""
        meta = json.loads((folder / "case.json").read_text())
        with np.load(folder / "case.npz") as arrays:
            injected = arrays.get("injected", None)
            return cls(meta["name"], Path(meta["reference"]), Path(meta["science"]),
                       meta["ours_kwargs"], arrays["region"], arrays["offstar"], injected,
                       meta["note"])


def robust_std(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation of the finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def zogy_snr_per_flux(psf_ref: np.ndarray, psf_sci: np.ndarray, sigma_ref: float,
                      sigma_sci: float, flux_ratio: float, grid: int = 64) -> float:
    """Optimal ZOGY S/N of a unit-flux (science units) point source, background noise only.

    ``SNR = f / F_n * sqrt(F_S)`` with ``F_S = sum_k F_n^2 F_r^2 |P_n|^2 |P_r|^2 /
    (sigma_n^2 F_r^2 |P_r|^2 + sigma_r^2 F_n^2 |P_n|^2) / N`` (F_r = 1, F_n = flux_ratio).
    """
    spectra = []
    for psf in (psf_ref, psf_sci):
        pad = np.zeros((grid, grid))
        ny, nx = psf.shape
        pad[:ny, :nx] = psf / psf.sum()
        spectra.append(np.abs(np.fft.fft2(pad)) ** 2)
    pr2, pn2 = spectra
    fn = flux_ratio
    denom = sigma_sci**2 * pr2 + sigma_ref**2 * fn**2 * pn2
    f_s = np.sum(fn**2 * pn2 * pr2 / np.maximum(denom, 1e-300)) / grid**2
    return float(np.sqrt(f_s) / fn)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return xx**2 + yy**2 <= radius**2


def source_mask(path: Path, unit: str, saturation: float | None) -> np.ndarray:
    """Pixels of sources in one image: 3 sigma above the local sky after 1 px smoothing."""
    from astropy.nddata import CCDData
    from scipy import ndimage

    from astro_zackay.background import estimate_background

    data = np.asarray(CCDData.read(path, unit=unit).data, dtype=float)
    bkg = estimate_background(data, unit=unit, saturation=saturation)
    smooth = ndimage.gaussian_filter(data - bkg.sky.data, 1.0)
    # a 1 px Gaussian smoothing scales white noise by 1 / (2 sqrt(pi))
    detected = smooth > 3.0 * bkg.rms.data / (2.0 * np.sqrt(np.pi))
    labels, n = ndimage.label(detected)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    detected = (sizes >= 4)[labels] & (labels > 0)
    if saturation is not None:
        detected |= data >= saturation
    return ndimage.binary_dilation(detected, _disk(SOURCE_GROW))


def regions(reference: Path, science: Path, unit: str, saturation: float | None,
            injected_xy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The common evaluation region and its off-star part (see the module docstring)."""
    from astropy.nddata import CCDData
    from scipy import ndimage

    ref = CCDData.read(reference, unit=unit).data
    sci = CCDData.read(science, unit=unit).data
    region = np.zeros(ref.shape, bool)
    region[EDGE:-EDGE, EDGE:-EDGE] = True
    if saturation is not None:
        saturated = (ref >= saturation) | (sci >= saturation)
        region &= ~ndimage.binary_dilation(saturated, _disk(SATURATION_GROW))
    sources = source_mask(reference, unit, saturation) | source_mask(science, unit, saturation)
    offstar = region & ~sources
    if injected_xy is not None and len(injected_xy):
        near = np.zeros(ref.shape, bool)
        near[np.rint(injected_xy[:, 1]).astype(int), np.rint(injected_xy[:, 0]).astype(int)] = 1
        offstar &= ~ndimage.binary_dilation(near, _disk(INJECTED_GROW))
    return region, offstar


def pick_positions(allowed: np.ndarray, n: int, min_sep: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` random sub-pixel (x, y) in ``allowed`` pixels, ``min_sep`` apart."""
    rows, cols = np.nonzero(allowed)
    order = rng.permutation(rows.size)
    chosen: list[tuple[float, float]] = []
    for i in order:
        x, y = cols[i] + rng.uniform(-0.5, 0.5), rows[i] + rng.uniform(-0.5, 0.5)
        if all((x - a) ** 2 + (y - b) ** 2 >= min_sep**2 for a, b in chosen):
            chosen.append((x, y))
            if len(chosen) == n:
                break
    return np.array(chosen).reshape(-1, 2)


def real_case(workdir: Path, n_inject: int, seed: int) -> tuple[Case, Case]:
    """The real pair, and the same pair with point sources injected into the science frame."""
    from astropy.io import fits
    from astropy.nddata import CCDData
    from astropy.table import Table
    from scipy import ndimage

    from astro_zackay.background import estimate_background
    from astro_zackay.psf import estimate_psf
    from astro_zackay.simulation import inject_sources

    kwargs = {"unit": "adu", "gain": REAL_GAIN, "saturation": REAL_SATURATION}
    region, offstar = regions(SAMPLE_REFERENCE, SAMPLE_SCIENCE, "adu", REAL_SATURATION)
    real = Case("real", SAMPLE_REFERENCE, SAMPLE_SCIENCE, kwargs, region, offstar,
                note="no real transient expected (exposures 74 s apart)")

    # empty sky: > 10 px from any source pixel, > 48 px from the edges, off saturation
    empty = ndimage.distance_transform_edt(offstar) > 10
    empty[:48] = empty[-48:] = False
    empty[:, :48] = empty[:, -48:] = False
    rng = np.random.default_rng(seed)
    xy = pick_positions(empty, n_inject, 25.0, rng)
    fits_kw = {"unit": "adu", "saturation": REAL_SATURATION, "gain": REAL_GAIN}
    psf_ref = estimate_psf(SAMPLE_REFERENCE, **fits_kw)
    psf_sci = estimate_psf(SAMPLE_SCIENCE, **fits_kw)
    sig_ref = estimate_background(SAMPLE_REFERENCE, unit="adu",
                                  saturation=REAL_SATURATION).global_rms
    sig_sci = estimate_background(SAMPLE_SCIENCE, unit="adu",
                                  saturation=REAL_SATURATION).global_rms
    snr = rng.uniform(10.0, 15.0, len(xy))
    per_flux = np.array([zogy_snr_per_flux(psf_ref.psf_at(x, y), psf_sci.psf_at(x, y),
                                           sig_ref, sig_sci, 1.0) for x, y in xy])
    sources = Table({"x": xy[:, 0], "y": xy[:, 1], "flux": snr / per_flux})
    sci = CCDData.read(SAMPLE_SCIENCE, unit="adu")
    injected = inject_sources(sci, sources, psf_sci.psf_at, gain=REAL_GAIN, seed=seed + 1)
    header = fits.getheader(SAMPLE_SCIENCE)
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    header["NINJECT"] = (len(xy), "point sources injected by bench_subtract.py")
    path = workdir / "real_science_injected.fits"
    fits.PrimaryHDU(np.asarray(injected.data, dtype=np.float32), header).writeto(
        path, overwrite=True)
    region_i, offstar_i = regions(SAMPLE_REFERENCE, path, "adu", REAL_SATURATION, xy)
    inj = Case("real+inj", SAMPLE_REFERENCE, path, kwargs, region_i, offstar_i,
               injected=np.column_stack([xy, snr]),
               note=f"{len(xy)} injected at true S/N 10-15 "
                    f"(median flux {np.median(sources['flux']):.0f} ADU)")
    return real, inj


def decam_case() -> Case:
    """DECam stamps of one field two years apart: one exposure of 2018 against one of 2016."""
    from astropy.io import fits

    reference, science = DECAM / "DEC-OBS18a.mini.fits", DECAM / "DEC-OBS04a.mini.fits"
    saturation = min(float(fits.getheader(p)["SATURATE"]) for p in (reference, science))
    region, offstar = regions(reference, science, "adu", saturation)
    return Case("decam", reference, science, {"unit": "adu"}, region, offstar,
                note="256^2; one real change at (129, 128), 13 sigma in SFFT's difference")


def jwst_case(workdir: Path) -> Case:
    """The JWST NIRCam pair (resampled: correlated noise) with its error maps as uncertainty.

    Each image and its error map (the ``auxiliary/*.noise.fits`` files) are written as one
    CCDData file (UNCERT extension, read by ours; the peers read the primary HDU).
    """
    from astropy.nddata import CCDData, StdDevUncertainty

    paths = {}
    for name, stem in (("reference", NIRCAM_REFERENCE), ("science", NIRCAM_SCIENCE)):
        ccd = CCDData.read(NIRCAM / "input_data" / f"{stem}.fits")
        error = CCDData.read(NIRCAM / "auxiliary" / f"{stem}.noise.fits")
        ccd.uncertainty = StdDevUncertainty(error.data)
        paths[name] = workdir / f"jwst_{name}.fits"
        ccd.write(paths[name], overwrite=True)
    region, offstar = regions(paths["reference"], paths["science"], "MJy/sr", None)
    return Case("jwst", paths["reference"], paths["science"], {}, region, offstar,
                note="900^2 MJy/sr, SWarp-resampled (lag-1 noise correlation 0.44); "
                     "no transient stated")


def sim_case(workdir: Path, size: int, seed: int) -> Case:
    """A simulated pair with transients at known positions and fluxes (see the docstring)."""
    from astropy.table import Table
    from scipy.spatial import cKDTree

    from astro_zackay.simulation import PSFField, simulate_pair

    scale = (size / 2048) ** 2
    n_stars = round(2000 * scale)
    n_trans = 300 if size >= 2048 else 100
    fwhm_ref, fwhm_sci, beta, shift = 2.5, 3.5, 0.9, (0.3, -0.2)
    sky_ref, sky_sci, read_noise = 200.0, 300.0, 5.0
    rng = np.random.default_rng(seed)
    edge = 16
    sx, sy = rng.uniform(edge, size - 1 - edge, (2, n_stars))
    lo, hi, k = 2e3, 2e5, 1.0 - 2.5  # dN/dF ~ F**-2.5, inverse-CDF sampling
    sflux = (lo**k + rng.random(n_stars) * (hi**k - lo**k)) ** (1.0 / k)
    tree = cKDTree(np.column_stack([sx + shift[0], sy + shift[1]]))
    candidates = np.zeros((size, size), bool)
    candidates[64:-64, 64:-64] = True
    yy, xx = np.nonzero(candidates[::4, ::4])
    far = tree.query(np.column_stack([xx * 4, yy * 4]))[0] > 15 + 3
    candidates[:] = False
    candidates[yy[far] * 4, xx[far] * 4] = True
    xy = pick_positions(candidates, n_trans, 20.0, rng)
    xy = xy[tree.query(xy)[0] > 15]
    snr = rng.uniform(5.0, 20.0, len(xy))
    centre = (size - 1) / 2.0
    psf_r = PSFField(fwhm=fwhm_ref, shape=(size, size)).stamp(centre, centre)
    psf_n = PSFField(fwhm=fwhm_sci, shape=(size, size)).stamp(centre, centre)
    per_flux = zogy_snr_per_flux(psf_r, psf_n, np.sqrt(sky_ref + read_noise**2),
                                 np.sqrt(sky_sci + read_noise**2), beta)
    pair = simulate_pair(
        (size, size), reference_psf=fwhm_ref, science_psf=fwhm_sci, flux_ratio=beta,
        shift=shift, reference_sky=sky_ref, science_sky=sky_sci, read_noise=read_noise,
        stars=Table({"x": sx, "y": sy, "flux": sflux}),
        transients=Table({"x": xy[:, 0], "y": xy[:, 1], "flux": snr / per_flux}), seed=seed,
    )
    paths = {}
    for name, sim in (("reference", pair.reference), ("science", pair.science)):
        paths[name] = workdir / f"sim{size}_{name}.fits"
        sim.ccd.write(paths[name], overwrite=True)
    region, offstar = regions(paths["reference"], paths["science"], "electron", None, xy)
    return Case("sim", paths["reference"], paths["science"], {}, region, offstar,
                injected=np.column_stack([xy, snr]),
                note=f"{size}^2, {n_stars} stars, {len(xy)} transients at true S/N 5-20")


# --------------------------------------------------------------------------------------------
# Quality metrics
# --------------------------------------------------------------------------------------------

def blobs(stat: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(x, y) of the local maxima of ``|stat|`` above THRESHOLD inside ``region``."""
    from astro_zackay.transients import find_transients

    finite = np.isfinite(stat)
    table = find_transients(np.where(finite, stat, 0.0), threshold=THRESHOLD,
                            mask=~(region & finite), min_separation=3)
    return np.column_stack([np.asarray(table["x"], float), np.asarray(table["y"], float)])


def blob_metrics(found: np.ndarray, injected: np.ndarray | None) -> dict[str, Any]:
    """Residual blob count and recovery fractions of the injected sources."""
    if injected is None or len(injected) == 0:
        return {"residual": len(found), "recovered": None, "recovered_hi": None}
    if len(found) == 0:
        dist = np.full((len(injected), 1), np.inf)
    else:
        dist = np.hypot(injected[:, 0, None] - found[None, :, 0],
                        injected[:, 1, None] - found[None, :, 1])
    near_any = (dist <= RESIDUAL_EXCLUSION).any(axis=0) if len(found) else np.zeros(0, bool)
    recovered = dist.min(axis=1) <= MATCH_RADIUS
    hi = injected[:, 2] >= 8.0
    return {"residual": int((~near_any).sum()), "recovered": float(recovered.mean()),
            "recovered_hi": float(recovered[hi].mean()) if hi.any() else None}


def quality(run: Run, case: Case) -> dict[str, Any]:
    """Score statistics, residual blobs and injection recovery of one run."""
    out: dict[str, Any] = {}
    stat = run.score if run.score is not None else run.difference
    if stat is None or stat.shape != case.region.shape:
        shape = None if stat is None else stat.shape
        out["error"] = f"output shape {shape} != input {case.region.shape}"
        return out
    kind = "Sc" if run.score is not None else "D"
    if run.score is not None:
        values = run.score[case.region]
        out["std_score"] = float(np.nanstd(values))
        raw = blob_metrics(blobs(run.score, case.region), case.injected)
        out.update({f"raw_{k}": v for k, v in raw.items()})
    sigma = robust_std(stat[case.offstar])
    out["sigma_T"], out["kind"] = sigma, kind
    normalised = blob_metrics(blobs(stat / sigma, case.region), case.injected)
    out.update({f"T_{k}": v for k, v in normalised.items()})
    if run.candidates is not None:
        out.update(candidate_metrics(run.candidates, case))
    return out


def candidate_metrics(candidates: np.ndarray, case: Case) -> dict[str, Any]:
    """Our ``find_transients`` list: all and ``good`` candidates, injected ones found good.

    Candidates within ``RESIDUAL_EXCLUSION`` of an injected source are detections of it
    and are not counted as candidates; ``inj good`` is the fraction of the injected
    sources (in brackets: of those at true S/N >= 8) with a ``good`` candidate within
    ``MATCH_RADIUS``.
    """
    xy, good = candidates[:, :2], candidates[:, 2].astype(bool)
    out: dict[str, Any] = {"cands": len(xy), "good": int(good.sum())}
    if case.injected is None or len(case.injected) == 0:
        return out
    dist = np.hypot(case.injected[:, 0, None] - xy[None, :, 0],
                    case.injected[:, 1, None] - xy[None, :, 1]) if len(xy) else None
    if dist is None:
        out.update(good_recovered=0.0, good_recovered_hi=0.0)
        return out
    own = (dist <= RESIDUAL_EXCLUSION).any(axis=0)
    out["cands"], out["good"] = int((~own).sum()), int((good & ~own).sum())
    found = (np.where(good[None, :], dist, np.inf) <= MATCH_RADIUS).any(axis=1)
    hi = case.injected[:, 2] >= 8.0
    out["good_recovered"] = float(found.mean())
    out["good_recovered_hi"] = float(found[hi].mean()) if hi.any() else None
    return out


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

def _num(value: float | None, fmt: str) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _recovery(q: dict[str, Any], prefix: str) -> str:
    rec, hi = q.get(f"{prefix}_recovered"), q.get(f"{prefix}_recovered_hi")
    if rec is None:
        return "-"
    text = _pct(rec)
    return text if hi is None or hi == rec else f"{text} ({_pct(hi)})"


HEADER = ("case", "method", "wall s", "t/ours", "cpu s", "import s", "RSS MB", "RSS/ours",
          "std Sc", "sigma_T", "blobs raw", "blobs T", "recovered T / raw", "cands / good",
          "inj good")


def table_row(case: str, run: Run, q: dict[str, Any], ours: Run | None) -> list[str]:
    """One table row; ratios to ``ours`` (same case) when it ran."""
    if not run.ok:
        status = "skipped" if run.reason.startswith("skipped") else "n/a"
        return [case, run.label, status, "", "", "", "", "", "", "", "", "", "(see below)",
                "", ""]
    ref_wall = ours.wall_s if ours is not None and ours.ok else float("nan")
    ref_rss = ours.peak_rss_mb if ours is not None and ours.ok else float("nan")
    if "cands" in q:
        candidate_cells = [f"{q['cands']} / {q['good']}", _recovery(q, "good")]
    else:
        candidate_cells = ["-", "-"]
    if "error" in q:
        quality_cells = ["-", "-", "-", "-", q["error"]]
    else:
        sigma = f"{q['kind']} {q['sigma_T']:.3g}"
        raw_rec = _recovery(q, "raw")
        rec = _recovery(q, "T") + ("" if raw_rec == "-" else f" / {raw_rec}")
        quality_cells = [_num(q.get("std_score"), ".3g"), sigma,
                         str(q["raw_residual"]) if "raw_residual" in q else "-",
                         str(q["T_residual"]), rec]
    return [case, run.label, _num(run.wall_s, ".2f"), _num(run.wall_s / ref_wall, ".2f"),
            _num(run.cpu_s, ".2f"), _num(run.import_s, ".2f"), _num(run.peak_rss_mb, ".0f"),
            _num(run.peak_rss_mb / ref_rss, ".2f"), *quality_cells, *candidate_cells]


def print_table(rows: list[list[str]]) -> None:
    """Print rows as an aligned markdown table."""
    widths = [max(len(r[i]) for r in [list(HEADER), *rows]) for i in range(len(HEADER))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


LEGEND = """\
Legend (details in the docstring of benchmarks/bench_subtract.py):
- wall s: the call alone, timed inside its child process (imports excluded; FITS reading
  included for ours, properimage, zogyp, sfft; ois gets arrays); cpu s: the child's own CPU
  time (not zogyp's SExtractor/PSFEx subprocesses); RSS MB: peak ru_maxrss of the child or
  its largest subprocess.  t/ours, RSS/ours: ratios to ours on the same case.
- std Sc: std of Scorr as returned, over the common region (edges > 32 px, > 15 px from
  saturated pixels); 1 means sigma units.  properimage's and zogyp's are not in sigma units.
- sigma_T: robust (1.4826 MAD) std, off-star, of the method's own detection statistic:
  Scorr ("Sc") where it returns one, else D ("D", per pixel: no matched filter, which costs
  sfft/ois faint detections).  T = statistic / sigma_T, the same rule for every method.
- blobs raw / T: local maxima of |Scorr| > 5 as returned / of |T| > 5 in the common region,
  not within 4 px of an injected source (residuals: stars, cosmic rays, artefacts).
- recovered: injected sources with a |T| > 5 (then |Scorr| > 5 as returned) blob within
  2 px; in brackets the fraction at true S/N >= 8.  True S/N = optimal ZOGY S/N with
  background noise only; a perfect method recovers ~50% at S/N 5 and ~100% at S/N >= 7.
- cands / good (ours): candidates of ``SubtractionResult.find_transients(5)`` (not within
  4 px of an injected source) and those with no vetting flag set; inj good: injected
  sources with a ``good`` candidate within 2 px (at true S/N >= 8 in brackets)."""


# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="simulated pair of 1024^2 instead of 2048^2")
    parser.add_argument("--size", type=int, default=None, help="simulated pair side (px)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset")
    parser.add_argument("--methods", default=None,
                        help="comma-separated labels or peers (e.g. ours,sfft); default all")
    parser.add_argument("--n-inject", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--max-mem-gb", type=float, default=10.0,
                        help="skip a peer whose estimated peak RSS exceeds this (sfft at 2048^2)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep inputs, logs and arrays here (default: a removed temp dir)")
    parser.add_argument("--ours-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ours_worker:
        return ours_worker(args.ours_worker)
    if args.run_one:
        sys.path.insert(0, str(HERE))
        return run_one(args.run_one)

    import warnings

    from astropy.utils.exceptions import AstropyWarning

    warnings.simplefilter("ignore", AstropyWarning)  # FITS 'datfix' notes on the real pair
    sys.path.insert(0, str(HERE))
    import _peers

    size = args.size or (1024 if args.quick else 2048)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    methods = [m for m in METHODS if args.methods is None
               or any(sel.strip() in (m[0], m[1] or "ours") for sel in args.methods.split(","))]
    workroot = args.workdir or Path(tempfile.mkdtemp(prefix="bench_subtract_"))
    workroot.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    print("available peers:")
    for peer, why in _peers.available_peers().items():
        print(f"  {peer:12s} {why if why == 'ok' else why[:300]}")
    print(f"work folder: {workroot}; threads per method: {args.threads}; "
          f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n", flush=True)

    built: list[Case] = []
    if "real" in cases or "real+inj" in cases:
        real, inj = real_case(workroot, args.n_inject, args.seed)
        built += [c for c in (real, inj) if c.name in cases]
    if "decam" in cases:
        built.append(decam_case())
    if "jwst" in cases:
        built.append(jwst_case(workroot))
    if "sim" in cases:
        built.append(sim_case(workroot, size, args.seed))

    rows, failures, launcher_rss = [], [], 0.0
    for case in built:
        print(f"case {case.name}: {case.reference.name} / {case.science.name}; {case.note}",
              flush=True)
        case_dir = case.save(workroot / case.name.replace("+", "_"))
        ours: Run | None = None
        for label, peer, variant in methods:
            t0 = time.perf_counter()
            run, q, rss = launch(case_dir, label, peer, variant,
                                 case_dir / label.replace(" ", "_"), args.threads,
                                 args.max_mem_gb)
            launcher_rss = max(launcher_rss, rss)
            if peer is None:
                ours = run
            status = "ok" if run.ok else run.reason.split(":")[0][:40]
            print(f"  {label:22s} {status} ({time.perf_counter() - t0:.1f} s with metrics)",
                  flush=True)
            if not run.ok:
                failures.append(f"{case.name} / {label}: {run.reason.strip()[-500:]}")
            rows.append(table_row(case.name, run, q, ours))
    print(f"\nall done in {time.perf_counter() - t_start:.0f} s; load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; launcher peak RSS before "
          f"spawning a method <= {launcher_rss:.0f} MB\n")
    print_table(rows)
    print()
    print(LEGEND)
    if failures:
        print("\nSkipped, not available or failed:")
        for text in failures:
            print("- " + text.replace("\n", "\n    "))
    if args.workdir is None:
        shutil.rmtree(workroot, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
