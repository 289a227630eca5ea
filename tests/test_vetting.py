"""Vetting of transient candidates: each flag of `find_transients` against simulated truth.

One simulated pair holds a case for every flag (cosmic rays and a short track in the
science image, a hot pixel in the reference, a star that moved by 2 px and one
misregistered by 0.6 px, a saturated star, a transient beside a bright star, one at the
image border, one beside a bad pixel) and clean transients far from everything, which
must come out ``good``.
"""

import contextlib
import warnings

import numpy as np
import pytest
from astropy.table import Table

from astro_zackay import subtract
from astro_zackay._warnings import AstroZackayWarning
from astro_zackay.profiles import psf_stamp
from astro_zackay.simulation import inject_sources, simulate_pair
from astro_zackay.transients import (
    BRIGHT_GROWTH,
    FLAG_BRIGHT,
    FLAG_CHI2,
    FLAG_DIPOLE,
    FLAG_EDGE,
    FLAG_MASKED,
    FLAG_SHARP,
    FLAGS,
    describe_flags,
    find_transients,
)

SIZE = 384
#: Transients far from every star, edge and defect: they must be ``good``.
CLEAN = ((60.3, 60.7), (200.2, 200.4), (320.6, 250.1), (250.5, 330.2))
BRIGHT_STAR = (100.0, 300.0)  # 6e5 e-: S/N of several hundred in both images
SATURATED_STAR = (300.0, 80.0)  # 2e7 e-: saturated core in both images
NEAR_BRIGHT = (106.0, 303.0)  # a transient 2 FWHM from the bright star
AT_EDGE = (3.0, 150.0)
NEAR_BAD = (200.2, 120.4)  # a transient with a bad science pixel 3 px away
BAD_PIXEL = (200, 123)  # (x, y)
COSMIC_RAYS = ((150, 100, 3000.0), (80, 200, 2000.0), (230, 60, 4000.0))  # (x, y, e-)
TRACK = ((330, 120), (331, 121))  # two adjacent pixels of 2500 e- each
HOT_PIXEL = (140, 260)  # in the reference: a negative candidate
MOVER_REF, MOVER_SCI = (180.0, 300.0), (182.0, 300.5)  # 8000 e-, moved by 2 px
MISREGISTERED_REF, MISREGISTERED_SCI = (300.0, 330.0), (300.6, 330.0)  # 3e4 e-, off by 0.6 px


def _field_stars(rng, special):
    """90 field stars of 2e3-1e5 e-, none within 30 px of a special source."""
    x, y = rng.uniform(20, SIZE - 20, 90), rng.uniform(20, SIZE - 20, 90)
    flux = np.exp(rng.uniform(np.log(2e3), np.log(1e5), 90))
    far = np.ones(x.size, bool)
    for sx, sy in special:
        far &= np.hypot(x - sx, y - sy) > 30
    return x[far], y[far], flux[far]


@pytest.fixture(scope="module")
def vetting_pair():
    """The reference and science images with every case."""
    rng = np.random.default_rng(7)
    special = (*CLEAN, BRIGHT_STAR, SATURATED_STAR, NEAR_BAD, MOVER_REF, HOT_PIXEL,
               MISREGISTERED_REF,
               *[(x, y) for x, y, _ in COSMIC_RAYS], TRACK[0])
    x, y, flux = _field_stars(rng, special)
    stars = Table({"x": np.r_[x, BRIGHT_STAR[0], SATURATED_STAR[0]],
                   "y": np.r_[y, BRIGHT_STAR[1], SATURATED_STAR[1]],
                   "flux": np.r_[flux, 6e5, 2e7]})
    positions = (*CLEAN, NEAR_BRIGHT, AT_EDGE, NEAR_BAD)
    transients = Table({"x": [p[0] for p in positions], "y": [p[1] for p in positions],
                        "flux": [1500.0, 2000.0, 1500.0, 2500.0, 3000.0, 2500.0, 2500.0]})
    pair = simulate_pair((SIZE, SIZE), reference_psf=2.5, science_psf=3.0, stars=stars,
                         transients=transients, saturation=1.5e5, seed=3)
    flux = [8000.0, 3e4]
    reference = inject_sources(pair.reference.ccd, Table(
        {"x": [MOVER_REF[0], MISREGISTERED_REF[0]], "y": [MOVER_REF[1], MISREGISTERED_REF[1]],
         "flux": flux}), psf_stamp(25, 2.5), seed=1)
    science = inject_sources(pair.science.ccd, Table(
        {"x": [MOVER_SCI[0], MISREGISTERED_SCI[0]], "y": [MOVER_SCI[1], MISREGISTERED_SCI[1]],
         "flux": flux}), psf_stamp(25, 3.0), seed=2)
    for x, y, value in COSMIC_RAYS:
        science.data[y, x] += value
    for x, y in TRACK:
        science.data[y, x] += 2500.0
    reference.data[HOT_PIXEL[1], HOT_PIXEL[0]] += 3000.0
    science.mask = np.zeros(science.shape, bool) if science.mask is None else science.mask.copy()
    science.mask[BAD_PIXEL[1], BAD_PIXEL[0]] = True
    return reference, science


@pytest.fixture(scope="module")
def vetted(vetting_pair):
    result = subtract(*vetting_pair)
    return result, result.find_transients(5.0)


def _at(candidates, x, y, radius=2.0):
    """The candidates within ``radius`` px of (x, y)."""
    near = np.hypot(candidates["x"] - x, candidates["y"] - y) <= radius
    return candidates[near]


def _one_at(candidates, x, y, radius=2.0):
    found = _at(candidates, x, y, radius)
    assert len(found) == 1, f"{len(found)} candidates at ({x}, {y})"
    return found[0]


def test_clean_transients_are_good_and_the_only_good_ones(vetted):
    _, candidates = vetted
    for x, y in CLEAN:
        row = _one_at(candidates, x, y)
        assert row["good"], describe_flags(row["flags"])
        assert row["chi2_dof"] < 2.0 and abs(row["sharpness"]) < 3.0
    good = candidates[candidates["good"]]
    assert len(good) == len(CLEAN)


def test_cosmic_rays_and_hot_pixel_are_sharp(vetted):
    _, candidates = vetted
    defects = [(x, y) for x, y, _ in COSMIC_RAYS] + [TRACK[0], HOT_PIXEL]
    for x, y in defects:
        row = _one_at(candidates, x, y)
        assert row["flags"] & FLAG_SHARP, describe_flags(row["flags"])
        assert row["sharpness"] > 10
    assert _one_at(candidates, *HOT_PIXEL)["score"] < 0  # a reference defect reads as fading


@pytest.mark.parametrize("where", [(MOVER_REF, MOVER_SCI), (MISREGISTERED_REF,
                                                            MISREGISTERED_SCI)])
def test_moved_or_misregistered_star_is_a_dipole(vetted, where):
    _, candidates = vetted
    (x0, y0), (x1, y1) = where
    lobes = _at(candidates, (x0 + x1) / 2, (y0 + y1) / 2, radius=5.0)
    assert len(lobes) == 2 and (lobes["score"] > 0).sum() == 1
    assert np.all(lobes["flags"] & FLAG_DIPOLE)


def test_bright_star_edge_and_bad_pixel_are_flagged(vetted):
    _, candidates = vetted
    assert _one_at(candidates, *NEAR_BRIGHT)["flags"] & FLAG_BRIGHT
    edge = _one_at(candidates, *AT_EDGE)
    assert edge["flags"] == FLAG_EDGE, describe_flags(edge["flags"])
    assert _one_at(candidates, *NEAR_BAD, radius=3.0)["flags"] & FLAG_MASKED


def test_saturated_star_leaves_no_good_candidate(vetting_pair, vetted):
    """Masked, the saturated star leaves no good candidate; unmasked, its flat-topped
    core leaves several, each flagged (a bright star's residual)."""
    result, candidates = vetted
    assert result.input_mask[int(SATURATED_STAR[1]), int(SATURATED_STAR[0])]
    assert not np.any(_at(candidates, *SATURATED_STAR, radius=30.0)["good"])
    reference, science = (image.copy() for image in vetting_pair)
    reference.mask = science.mask = None
    unmasked = subtract(reference, science, saturation=np.inf).find_transients(5.0)
    residuals = _at(unmasked, *SATURATED_STAR, radius=30.0)
    assert len(residuals) >= 3
    assert np.all(residuals["flags"] & FLAG_BRIGHT)


def test_masked_outputs_are_nan(vetted):
    result, _ = vetted
    for image in (result.difference, result.score, result.flux, result.flux_error):
        assert image.mask.any()
        assert np.all(np.isnan(image.data[image.mask]))
        assert np.all(np.isfinite(image.data[~image.mask]))


def test_thresholds_are_parameters(vetted):
    """A stricter or looser threshold changes exactly the flag it belongs to."""
    result, candidates = vetted
    loose = result.find_transients(5.0, sharp_threshold=1e6, chi2_threshold=1e6)
    assert not np.any(loose["flags"] & FLAG_SHARP)
    assert np.array_equal(loose["flags"] | FLAG_SHARP | FLAG_CHI2,
                          candidates["flags"] | FLAG_SHARP | FLAG_CHI2)
    wide = result.find_transients(5.0, edge_distance=30.0)
    assert np.sum(wide["flags"] & FLAG_EDGE) > np.sum(candidates["flags"] & FLAG_EDGE)
    unlit = result.find_transients(5.0, sources=None)  # an input replaced: BRIGHT skipped
    assert "BRIGHT" not in unlit.meta["flags_computed"]
    assert not np.any(unlit["flags"] & FLAG_BRIGHT)


def test_table_meta_documents_the_flags(vetted):
    _, candidates = vetted
    for name, (bit, _) in FLAGS.items():
        assert candidates.meta[f"FLAG_{name}"].startswith(f"{bit}:")
    assert candidates.meta["flags_computed"] == ["DIPOLE", "EDGE", "MASKED", "SHARP", "CHI2",
                                                 "BRIGHT"]
    assert candidates.meta["bright_snr"] == 100.0


def test_bare_score_array_measures_its_scale_and_flags_what_it_can(vetted):
    """On a bare Scorr array the FWHM of P_D comes from the score's noise."""
    result, candidates = vetted
    score = np.asarray(result.score.data)
    bare = find_transients(score)
    assert bare.meta["flags_computed"] == ["DIPOLE", "EDGE"]
    assert bare.meta["fwhm"] == pytest.approx(candidates.meta["fwhm"], rel=0.25)
    assert len(bare) == len(candidates)
    lobes = _at(bare, (MOVER_REF[0] + MOVER_SCI[0]) / 2, MOVER_REF[1], radius=5.0)
    assert len(lobes) == 2
    assert np.all(lobes["flags"] & FLAG_DIPOLE)


def test_bad_vetting_inputs():
    score = np.zeros((20, 20))
    with pytest.raises(ValueError, match="difference shape"):
        find_transients(score, difference=np.zeros((5, 5)), psf=np.ones((3, 3)))
    with pytest.raises(ValueError, match="odd-sized"):
        find_transients(score, psf=np.ones((4, 4)))
    with pytest.raises(ValueError, match="sources needs"):
        find_transients(score, sources=Table({"x": [1.0]}))
    with pytest.raises(ValueError, match="fwhm"):
        find_transients(score, fwhm=-1.0)


# ---------------------------------------------------------------------------
# properimage's real pair: 74 s apart, so nothing real changes
# ---------------------------------------------------------------------------
#: e-/ADU of properimage's pair (not in its headers; its sky noise gives 1.35-1.5).
PROPERIMAGE_GAIN = 1.4
#: The injected sources' S/N (alpha / its error), 5 of each.
INJECTED_SNR = (8.0, 10.0, 15.0, 25.0, 50.0, 100.0)


@contextlib.contextmanager
def _quiet():
    """Silence the package's warnings (saturation found in the data, PSF ladder steps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstroZackayWarning)
        yield


def _properimage(number):
    from astropy.io import fits
    from astropy.nddata import CCDData
    from conftest import data_path

    path = data_path("properimage", f"aligned_eso085-030-00{number}.fit")
    with fits.open(path) as hdul:
        return CCDData(hdul[0].data.astype(float), unit="adu", meta=hdul[0].header)


@pytest.fixture(scope="module")
def properimage_pair():
    reference, science = _properimage(4), _properimage(5)
    with _quiet():  # the saturation found in the data is announced
        result = subtract(reference, science, gain=PROPERIMAGE_GAIN)
    return reference, science, result


@pytest.mark.realdata
def test_properimage_pair_has_at_most_five_good_candidates(properimage_pair):
    """The pair's candidates are saturated-star, bright-star, cosmic-ray and hot-pixel junk.

    Issue 9 counted 34 candidates at 5 sigma, none real; at most 5 may stay ``good``.
    """
    _, _, result = properimage_pair
    candidates = result.find_transients(5.0)
    assert len(candidates) >= 10  # the junk is there to be flagged
    assert candidates["good"].sum() <= 5
    # the junk is told apart by what it is, not by one catch-all test
    raised = {name for flags in candidates["flags"] for name in describe_flags(int(flags))}
    assert len(raised) >= 2 and raised <= set(candidates.meta["flags_computed"])


def _injection_positions(result, rng, n, fwhm):
    """``n`` random positions 20 px from the edges, 6 px from masked pixels, 25 px from
    each other and 5 FWHM from any source of S/N >= 50 in either image, farther from
    brighter ones as the residuals of bright stars reach (``BRIGHT_GROWTH``)."""
    from scipy import ndimage

    ny, nx = result.score.shape
    sources = result.sources
    snr = np.fmax(sources["snr_reference"], sources["snr_science"])
    strong = snr >= 50
    sx, sy = np.asarray(sources["x"])[strong], np.asarray(sources["y"])[strong]
    reach = 5 * fwhm * np.maximum(np.asarray(snr)[strong] / 100, 1) ** BRIGHT_GROWTH
    masked = ndimage.binary_dilation(result.score.mask, iterations=6)
    xs, ys = [], []
    for _ in range(20000):
        x, y = rng.uniform(20, nx - 20), rng.uniform(20, ny - 20)
        if (masked[round(y), round(x)] or np.any(np.hypot(sx - x, sy - y) < reach)
                or (xs and np.hypot(np.array(xs) - x, np.array(ys) - y).min() < 25)):
            continue
        xs.append(x)
        ys.append(y)
        if len(xs) == n:
            return np.array(xs), np.array(ys)
    raise AssertionError("no room for the injected sources")


@pytest.mark.realdata
def test_properimage_injected_point_sources_stay_good(properimage_pair):
    """PSF-shaped sources of S/N 8-100 injected into the science image are all ``good``."""
    from astro_zackay.psf import estimate_psf

    reference, science, first = properimage_pair
    fwhm = first.find_transients(5.0).meta["fwhm"]
    xs, ys = _injection_positions(first, np.random.default_rng(1), 5 * len(INJECTED_SNR), fwhm)
    snr = np.repeat(INJECTED_SNR, 5)
    flux = snr * first.flux_error.data[np.round(ys).astype(int), np.round(xs).astype(int)]
    with _quiet():
        model = estimate_psf(science, gain=PROPERIMAGE_GAIN)
    injected = inject_sources(science, Table({"x": xs, "y": ys, "flux": flux}), model.psf_at,
                              gain=PROPERIMAGE_GAIN, seed=1)
    with _quiet():
        result = subtract(reference, injected, gain=PROPERIMAGE_GAIN)
    candidates = result.find_transients(5.0)
    for x, y, level in zip(xs, ys, snr):
        row = _one_at(candidates, x, y, radius=1.5)
        assert row["good"], f"S/N {level} at ({x:.1f}, {y:.1f}): {describe_flags(row['flags'])}"
