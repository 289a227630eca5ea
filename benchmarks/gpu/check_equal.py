"""Compare ``subtract(..., backend="cupy")`` with the numpy backend on one simulated pair.

Prints the largest difference of Scorr in sigma units over the pixels that both flag as
good (target <= 1e-3) and of D, with the PSFs given and with everything estimated.  Run by
``run_gpu.sh``; ``python benchmarks/gpu/check_equal.py [SIZE]``.
"""

from __future__ import annotations

import inspect
import sys

import numpy as np

from astro_zackay import subtract
from astro_zackay.simulation import simulate_pair


def largest_difference(a, b) -> float:
    """max |a - b| over the pixels finite and unmasked in both results."""
    good = np.isfinite(a.data) & np.isfinite(b.data)
    for image in (a, b):
        if image.mask is not None:
            good &= ~np.asarray(image.mask, bool)
    return float(np.max(np.abs(np.asarray(a.data)[good] - np.asarray(b.data)[good])))


def main(size: int = 1024) -> None:
    if "backend" not in inspect.signature(subtract).parameters:
        print("subtract() has no backend= parameter on this checkout")
        return
    pair = simulate_pair(size, reference_psf=2.5, science_psf=3.5, flux_ratio=0.9,
                         shift=(0.3, -0.2), n_stars=300 * (size // 1024) ** 2,
                         n_transients=20, transient_snr=(6.0, 15.0), wcs=False, seed=2)
    psf_ref, psf_new = pair.true_psf_stamps()
    cases = {"PSFs given": {"reference_psf": psf_ref, "science_psf": psf_new},
             "end to end": {}}
    for name, kwargs in cases.items():
        cpu = subtract(pair.reference.ccd, pair.science.ccd, **kwargs)
        gpu = subtract(pair.reference.ccd, pair.science.ccd, backend="cupy", **kwargs)
        print(f"{name}: max |dScorr| = {largest_difference(cpu.score, gpu.score):.2e} sigma, "
              f"max |dD| = {largest_difference(cpu.difference, gpu.difference):.2e}, "
              f"candidates {len(cpu.find_transients(5.0))} (numpy) / "
              f"{len(gpu.find_transients(5.0))} (cupy)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
