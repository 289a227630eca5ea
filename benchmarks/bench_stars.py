"""PSF-star selection: time, selections and rejections of `find_psf_stars` (issue 8).

Fields:

``real 004``
    properimage's real image ``aligned_eso085-030-004.fit`` (1024x682, ADU, saturated at
    65535 without a keyword), ``CCDData(data, unit='adu')``, the background estimated
    inside (issue 8, Deliver 6: within ~0.09 s);
``sim 2048``
    2048^2, 2000 stars (log-uniform 1e3-1e6 e-, saturating above ~3e5 e-), 300 cosmic
    rays, a FWHM 3 px Moffat PSF;
``varying``
    1024^2, 600 stars, FWHM from 1.9 to 6.1 px across the frame, ellipticity 0 to 0.4;
``galaxies 3:1``
    1024^2, 200 stars and 600 galaxies (Sersic n 1-4, half-light radii 1-5 px);
``tutorial2``
    properimage's Tutorial 2 frame rebuilt: four 512^2 quadrants of 60 stars, x-FWHM
    5 to 10.4 px, y-FWHM 5 px, rotated per quadrant (``quadrants``: stars selected in
    each).

For the simulated fields: ``complete`` is the fraction of the isolated, unsaturated
truth stars of S/N > 30 (with the ±2 FWHM box inside the frame) that are selected;
``false`` the selections farther than 0.5 px from every truth star (galaxies, blends,
cosmic rays).

Run: ``python benchmarks/bench_stars.py`` (about a minute; ``--repeats`` sets the best-of).
"""

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.nddata import CCDData
from scipy.spatial import cKDTree

from astro_zackay.simulation import PSFField, simulate_image, simulate_mosaic
from astro_zackay.stars import REASONS, find_psf_stars

_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_REAL = _DATA / "properimage" / "aligned_eso085-030-004.fit"


def _fields() -> dict:
    """name -> (CCDData, simulation or None)."""
    fields = {}
    if _REAL.exists():
        fields["real 004"] = (CCDData(fits.getdata(_REAL).astype(float), unit="adu"), None)
    sim = simulate_image((2048, 2048), psf=PSFField(3.0, profile="moffat"), n_stars=2000,
                         flux_range=(1e3, 1e6), flux_distribution="loguniform",
                         saturation=3e4, n_cosmic_rays=300, seed=1)
    fields["sim 2048"] = (sim.ccd, sim)
    psf = PSFField(fwhm=4.0, fwhm_gradient=(1.4, 0.6), ellipticity=0.2,
                   ellipticity_gradient=(0.1, 0.1), theta_gradient=(0.5, 0.0),
                   shape=(1024, 1024))
    sim = simulate_image((1024, 1024), psf=psf, n_stars=600, flux_range=(3e3, 3e5),
                         flux_distribution="loguniform", n_cosmic_rays=60, seed=2)
    fields["varying"] = (sim.ccd, sim)
    sim = simulate_image((1024, 1024), psf=3.0, n_stars=200, n_galaxies=600,
                         flux_range=(5e3, 3e5), flux_distribution="loguniform", seed=3)
    fields["galaxies 3:1"] = (sim.ccd, sim)
    psfs = [PSFField(fwhm=5 + 6.5 * a / 180, ellipticity=1 - 5 / (5 + 6.5 * a / 180),
                     theta=np.radians(a)) for a in (0, 45, 105, 150)]
    sim = simulate_mosaic((512, 512), psfs, n_stars=60, flux_range=(3e3, 3e5),
                          flux_distribution="loguniform", sky=100.0, seed=0)
    fields["tutorial2"] = (sim.ccd, sim)
    return fields


def _score(stars, sim) -> tuple[str, str]:
    """Completeness of the isolated bright truth stars and the false selections."""
    if sim is None:
        return "-", "-"
    truth = sim.truth
    ny, nx = sim.ccd.shape
    fwhm, _, _ = sim.psf.params(truth["x"], truth["y"])
    box = np.maximum(5, np.ceil(2 * fwhm)) + 0.5
    inside = ((truth["x"] > box) & (truth["x"] < nx - 1 - box)
              & (truth["y"] > box) & (truth["y"] < ny - 1 - box))
    ref = truth["isolated"] & ~truth["saturated"] & (truth["snr"] > 30) & inside
    sel = np.column_stack([stars["x"], stars["y"]])
    dist, _ = cKDTree(sel).query(np.column_stack([truth["x"][ref], truth["y"][ref]]))
    false, _ = cKDTree(np.column_stack([truth["x"], truth["y"]])).query(sel)
    return f"{np.mean(dist < 0.5):.3f}", f"{int(np.sum(false >= 0.5))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the real image's SaturationWarning, once per call
    rows = []
    for name, (ccd, sim) in _fields().items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            stars = find_psf_stars(ccd)
            times.append(time.perf_counter() - start)
        complete, false = _score(stars, sim)
        rejected = " ".join(
            f"{r}={stars.meta[f'n_rejected_{r}']}" for r in REASONS
            if stars.meta[f"n_rejected_{r}"]
        )
        if name == "tutorial2":
            quadrant = (stars["x"] > 512).astype(int) + 2 * (stars["y"] > 512).astype(int)
            rejected += " quadrants=" + "/".join(map(str, np.bincount(quadrant, minlength=4)))
        low, high = stars.meta["fwhm_range"]
        rows.append((name, f"{min(times):.3f}", str(stars.meta["n_detected"]), str(len(stars)),
                     f"{stars.meta['fwhm']:.2f}", f"{low:.2f}-{high:.2f}", complete, false,
                     rejected))
    header = ("field", "time s", "detected", "selected", "fwhm", "fwhm range", "complete",
              "false", "rejected")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    if not _REAL.exists():
        print(f"(real image not found at {_REAL}: row skipped)")


if __name__ == "__main__":
    main()
