"""Subtractions that stay clean near bright stars (issue 8, Deliver 4).

Clean simulated pairs - no transient, so every 5-sigma candidate is false - with a
sharper reference (FWHM 2.5 px) than science image (3.5 px), a flux ratio of 0.85, a
sub-pixel shift and stars up to 3e6 e- (eight 512^2 fields per profile, 2.1 Mpix),
Gaussian and Moffat (beta 2.5), go through
`astro_zackay.subtract` twice: with its default call (PSFs estimated from the images)
and with the TRUE PSF stamps given. An estimated PSF that misses the wings or the core
of the bright stars leaves rings of false candidates around them; the target is at most
1 false candidate per Mpix more than with the true PSFs, and at most 2 on a 256^2 field
whose brightest star is 10x brighter than all the others. Before the PSF work of issue 8
main gave 282 (Gaussian) and 640 (Moffat) per Mpix against 0-2 with the true PSFs, and
45-64 on the 256^2 field. ``benchmarks/bench_bright_stars.py`` prints the same numbers
for more seeds and maximum fluxes.
"""

import warnings

import numpy as np
import pytest

from astro_zackay import subtract
from astro_zackay.simulation import PSFField, simulate_bright_star_pair, simulate_pair

FWHM_REF, FWHM_SCI = 2.5, 3.5
FLUX_RATIO = 0.85
SHIFT = (0.37, -0.21)
MOFFAT_BETA = 2.5
PROFILES = ("gaussian", "moffat")


def psfs(profile):
    return (
        PSFField(fwhm=FWHM_REF, profile=profile, beta=MOFFAT_BETA),
        PSFField(fwhm=FWHM_SCI, profile=profile, beta=MOFFAT_BETA),
    )


SEEDS = range(8)  # eight 512^2 fields: 2.1 Mpix per profile


def bright_pair(profile, seed):
    """A clean 512^2 pair with 120 stars, fluxes log-uniform in 1e3-3e6 e-."""
    ref_psf, sci_psf = psfs(profile)
    return simulate_pair(
        (512, 512),
        reference_psf=ref_psf,
        science_psf=sci_psf,
        flux_ratio=FLUX_RATIO,
        shift=SHIFT,
        n_stars=120,
        flux_range=(1e3, 3e6),
        flux_distribution="loguniform",
        min_separation=8.0,
        seed=seed,
    )


@pytest.fixture(scope="module", params=PROFILES)
def bright_counts(request):
    """False candidates on each bright-star field: estimated PSFs, true PSFs, true + ratio."""
    counts = {"estimated": [], "true": [], "true, ratio given": [], "fitted ratios": [],
              "mpix": 0.0, "bright": 0}
    for seed in SEEDS:
        pair = bright_pair(request.param, seed)
        counts["mpix"] += pair.reference.ccd.data.size / 1e6
        counts["bright"] += int(np.sum(pair.reference.truth["flux"] > 1e6))
        counts["estimated"].append(len(false_candidates(pair, true_psf=False)[1]))
        result, found = false_candidates(pair, true_psf=True)
        counts["true"].append(len(found))
        counts["fitted ratios"].append(round(result.flux_ratio, 5))
        if seed == SEEDS[0]:
            found = false_candidates(pair, true_psf=True, flux_ratio=FLUX_RATIO)[1]
            counts["true, ratio given"].append(len(found))
    # the fields really hold the bright stars the target is about
    assert counts["bright"] >= 100
    return request.param, counts


def one_bright_pair(profile, seed):
    """A clean 256^2 pair: 30 stars of 1e4-3e5 e- and one star 10x the brightest of them.

    On main before issue 8's PSF work this field gave 54-59 (Gaussian) and 14-36 (Moffat)
    false candidates for seeds 0-2, the issue's "45-64"; 0-1 with the true PSFs.
    """
    ref_psf, sci_psf = psfs(profile)
    return simulate_bright_star_pair(
        (256, 256), reference_psf=ref_psf, science_psf=sci_psf, n_stars=30,
        flux_range=(1e4, 3e5), contrast=10.0, flux_ratio=FLUX_RATIO, shift=SHIFT, seed=seed,
    )


def false_candidates(pair, *, true_psf, **kwargs):
    if true_psf:
        kwargs["reference_psf"], kwargs["science_psf"] = pair.true_psf_stamps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FewStarsWarning etc. are not what is measured here
        result = subtract(pair.reference.ccd, pair.science.ccd, **kwargs)
    return result, result.find_transients(threshold=5)


def test_estimated_psfs_subtract_bright_stars_as_cleanly_as_true_psfs(bright_counts):
    profile, counts = bright_counts
    excess = (sum(counts["estimated"]) - sum(counts["true"])) / counts["mpix"]
    assert excess <= 1.0, (
        f"{profile}: {sum(counts['estimated']) / counts['mpix']:.1f} false 5-sigma candidates "
        f"per Mpix with estimated PSFs, {sum(counts['true']) / counts['mpix']:.1f} with the "
        f"true PSFs (per 512^2 field: {counts['estimated']} / {counts['true']})"
    )


def test_true_psfs_subtract_bright_stars_cleanly(bright_counts):
    """The baseline of the test above: with the true PSFs at most 2 false candidates per Mpix.

    With the flux ratio given there are none; a fitted flux ratio 0.6 % low (the background
    annulus of the aperture photometry holding the stars' own Moffat wings) gave 36 per Mpix.
    """
    profile, counts = bright_counts
    assert counts["true, ratio given"] == [0]
    assert sum(counts["true"]) / counts["mpix"] <= 2.0, (
        f"{profile}: {sum(counts['true']) / counts['mpix']:.1f} false candidates per Mpix "
        f"with the true PSFs (per field {counts['true']}); fitted flux ratios "
        f"{counts['fitted ratios']} (true {FLUX_RATIO})"
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("profile", PROFILES)
def test_one_star_ten_times_brighter(profile, seed):
    pair = one_bright_pair(profile, seed)
    _, found = false_candidates(pair, true_psf=False)
    assert len(found) <= 2, (
        f"{profile}, seed {seed}: {len(found)} false candidates on the 256^2 field, at "
        f"{[(round(float(x)), round(float(y))) for x, y in zip(found['x'], found['y'])]}"
    )
