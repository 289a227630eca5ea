"""Default calls on the real images of ../shared/data, and what they return.

Each subtraction or coadd runs once (module-scoped fixtures) with the options a new
user would give: the unit of files without BUNIT (and properimage's gain, which its
headers lack), nothing else. The warnings of each run are recorded and checked.
Every test is skipped with a reason when its data are absent (`conftest.data_path`).

properimage's Tutorial 1 image is built from ``np.random`` in its notebook and is
not a file of the data folder, so it has no test here.
"""


import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from conftest import data_path, record_warnings
from scipy import ndimage

from astro_zackay import subtract
from astro_zackay._warnings import FewStarsWarning, SaturationWarning
from astro_zackay.background import estimate_background
from astro_zackay.coaddition import coadd
from astro_zackay.stars import find_psf_stars

pytestmark = pytest.mark.realdata

DECAM = ("decam-sfft", "input_data")
NIRCAM = "nircam-a2744"
#: e-/ADU of properimage's pair: not in the headers; its SOURCE.md measures a sky rms of
#: 73-78 ADU at ~8200 ADU, a gain of 1.35-1.5 if the sky noise is Poisson-dominated.
PROPERIMAGE_GAIN = 1.4


def _messages(caught, category):
    return [str(w.message) for w in caught if issubclass(w.category, category)]


def _robust_std(values):
    q25, q75 = np.percentile(values, [25, 75])
    return (q75 - q25) / 1.349


def _off_source(result, images, radius=12):
    """Unmasked pixels farther than ``radius`` from any 5-sigma source of either image."""
    bright = np.zeros(result.score.shape, bool)
    for image in images:
        background, _ = record_warnings(lambda image=image: estimate_background(image))
        smooth = ndimage.gaussian_filter(image.data - background.sky.data, 2.0)
        bright |= smooth > 5 * _robust_std(smooth)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    near = ndimage.binary_dilation(bright, structure=np.hypot(xx, yy) <= radius)
    return ~near & ~result.score.mask


def _decam(name):
    return data_path(*DECAM, f"DEC-OBS{name}.mini.fits")


def _read_adu(path):
    return CCDData.read(path, unit="adu")


def _check_named_ladder_warnings(caught, names):
    """FewStarsWarnings name their image, and none is issued twice."""
    messages = _messages(caught, FewStarsWarning)
    assert len(messages) == len(set(messages))
    for message in messages:
        assert any(message.startswith(f"{name}: ") for name in names), message


# ---------------------------------------------------------------------------
# DECam: one exposure of 2016 against one of 2018 (5 usable stars), then 5 + 5 coadds
# ---------------------------------------------------------------------------
#: The isolated bright stars of the DECam stamps (x, y), for the aperture photometry.
DECAM_STARS = ((57, 180), (100, 73), (104, 233), (178, 202))
#: The source that changed between the epochs: SFFT's decorrelated difference
#: (4check/FinalDifference.DeCorr.fits) has a 13-sigma peak there, at the stamp centre.
DECAM_CHANGE = (129.0, 128.0)


def _big_aperture_ratio(science, reference, radius=14):
    """Median science / reference flux of DECAM_STARS in wide apertures (local sky annulus).

    An independent measure of the flux ratio: the apertures reach 3 FWHM of the
    broader PSF, so no PSF model or aperture correction enters.
    """
    yy, xx = np.mgrid[: science.shape[0], : science.shape[1]]
    ratios = []
    for x, y in DECAM_STARS:
        r = np.hypot(xx - x, yy - y)
        inner, annulus = r < radius, (r > radius + 4) & (r < radius + 14)
        flux = [im[inner].sum() - np.median(im[annulus]) * inner.sum()
                for im in (science, reference)]
        ratios.append(flux[0] / flux[1])
    return float(np.median(ratios))


@pytest.fixture(scope="module")
def decam_pair():
    reference, science = _decam("18a"), _decam("04a")
    result, caught = record_warnings(lambda: subtract(reference, science, unit="adu"))
    return _read_adu(reference), _read_adu(science), result, caught


def test_decam_pair_flux_ratio_and_shift(decam_pair):
    """The fitted flux ratio and shift against independent measures of them.

    The ratio: wide-aperture photometry of the 4 isolated stars here (1.02, per star
    1.01-1.05; SOURCE.md quotes 1.05 from bright stars and SFFT's kernel sum 1.033).
    The shift: SOURCE.md's windowed centroids give dx +0.4...+0.75 (median +0.5) and
    dy +0.1...+0.3 (median +0.2) px between the epochs.
    """
    reference, science, result, caught = decam_pair
    expected = _big_aperture_ratio(science.data, reference.data)
    assert 1.0 < expected < 1.06
    assert result.flux_ratio == pytest.approx(expected, abs=0.02)
    assert 0.4 <= result.shift[0] <= 0.8
    assert 0.05 <= result.shift[1] <= 0.35
    _check_named_ladder_warnings(caught, ("reference image", "science image"))


def test_decam_pair_scorr_is_calibrated_and_finds_the_change(decam_pair):
    """Off-source robust std(Scorr) 1 +- 0.15; the one change between the epochs is found.

    Besides it, at most 2 candidates above 5 sigma (SFFT's reference difference
    leaves a 50-sigma dipole on the brightest star, from the 0.5 px misregistration).
    """
    reference, science, result, _ = decam_pair
    off = _off_source(result, (reference, science))
    assert off.sum() > 5000  # enough for the robust std to +-2 %
    scores = result.score.data[off]
    assert abs(_robust_std(scores) - 1.0) < 0.15
    assert abs(np.median(scores)) < 0.15
    candidates = result.find_transients(5.0)
    distance = np.hypot(candidates["x"] - DECAM_CHANGE[0], candidates["y"] - DECAM_CHANGE[1])
    assert distance.min() < 2.0
    assert len(candidates) <= 3


def test_decam_pair_pixel_fit_fallback_is_announced(decam_pair, monkeypatch):
    """With fewer matched stars than needed, the pixel fit gives the ratio and shift.

    Requiring more matches than the 5 stars there are forces the fallback on the real
    pair: it is announced once, and agrees with the star-based values.
    """
    import astro_zackay.subtraction as subtraction

    reference, science, star_based, _ = decam_pair
    monkeypatch.setattr(subtraction, "MIN_MATCHED_STARS", 50)
    result, caught = record_warnings(lambda: subtract(reference, science))
    fallback = [m for m in _messages(caught, FewStarsWarning) if "pixel fit" in m]
    assert len(fallback) == 1
    assert result.astrometric_noise == (0.0, 0.0)
    assert result.flux_ratio == pytest.approx(star_based.flux_ratio, abs=0.03)
    assert result.shift[0] == pytest.approx(star_based.shift[0], abs=0.15)
    assert result.shift[1] == pytest.approx(star_based.shift[1], abs=0.15)


@pytest.fixture(scope="module")
def decam_coadds():
    groups = {}
    for group in ("18", "04"):
        files = [_decam(f"{group}{letter}") for letter in "abcde"]
        groups[group] = record_warnings(lambda files=files: coadd(files, unit="adu"))
    result, caught = record_warnings(lambda: subtract(groups["18"][0], groups["04"][0]))
    return groups, result, caught


@pytest.mark.parametrize("group", ["18", "04"])
def test_decam_coadd_flux_scales_match_sfft_kernels(decam_coadds, group):
    """Each frame's flux scale against 1 / sum of SFFT's kernel matching it to frame a.

    SFFT's MatchKernel of frame j convolves it to frame a, so its sum is F_a / F_j.
    """
    groups, _, _ = decam_coadds
    result, caught = groups[group]
    kernels = [fits.getdata(data_path(*DECAM, f"DEC-OBS{group}{letter}.MatchKernel.fits"))
               for letter in "bcde"]
    expected = [1.0] + [1.0 / kernel.sum() for kernel in kernels]
    np.testing.assert_allclose(result.frames["flux_scale"], expected, atol=0.03)
    _check_named_ladder_warnings(caught, [f"DEC-OBS{group}{letter}.mini.fits"
                                          for letter in "abcde"])


def test_decam_coadds_are_calibrated_to_their_first_frames(decam_coadds, decam_pair):
    """The calibrated coadds keep the flux scale of 18a and 04a: the single pair's ratio."""
    groups, _, _ = decam_coadds
    reference, science, _, _ = decam_pair
    single = _big_aperture_ratio(science.data, reference.data)
    stacked = _big_aperture_ratio(groups["04"][0].calibrated.data,
                                  groups["18"][0].calibrated.data)
    assert stacked == pytest.approx(single, abs=0.02)


def test_decam_coadd_subtraction_flux_ratio(decam_coadds):
    """The flux ratio fitted on the coadds against wide-aperture photometry of them.

    The aperture correction comes from the coadds' exact PSFs P_R (the stars'
    single-Moffat fits, which misdescribe a mixture of seeings, gave 1.062-1.084).
    """
    groups, result, _ = decam_coadds
    images = [groups[g][0].calibrated for g in ("18", "04")]
    expected = _big_aperture_ratio(images[1].data, images[0].data)
    assert result.flux_ratio == pytest.approx(expected, abs=0.02)


def test_decam_coadd_subtraction(decam_coadds, decam_pair):
    """coadd(2018) against coadd(2016): Scorr calibrated, the change found more strongly.

    The change between the epochs comes out stronger than in the single pair.
    """
    groups, result, caught = decam_coadds
    _, _, single, _ = decam_pair
    images = [groups[g][0].calibrated for g in ("18", "04")]
    off = _off_source(result, images)
    assert off.sum() > 5000
    assert abs(_robust_std(result.score.data[off]) - 1.0) < 0.15
    candidates = result.find_transients(5.0)
    distance = np.hypot(candidates["x"] - DECAM_CHANGE[0], candidates["y"] - DECAM_CHANGE[1])
    best = int(np.argmin(distance))
    assert distance[best] < 2.0
    change_single = single.score.data[round(DECAM_CHANGE[1]), round(DECAM_CHANGE[0])]
    assert candidates["score"][best] > change_single
    _check_named_ladder_warnings(caught, ("reference image", "science image"))


# ---------------------------------------------------------------------------
# JWST NIRCam F200W: galaxies outnumber stars
# ---------------------------------------------------------------------------
def _nircam(kind):
    return data_path(NIRCAM, "input_data",
                     f"jw{kind}_nircam_clear-f200w_i2d_stamp.fits")


NIRCAM_REFERENCE = "01324001001-01324-o001_t001"
NIRCAM_SCIENCE = "02561001002-02561-o001_t003"


@pytest.fixture(scope="module")
def nircam_pair():
    reference, science = _nircam(NIRCAM_REFERENCE), _nircam(NIRCAM_SCIENCE)
    result, caught = record_warnings(lambda: subtract(reference, science))
    return reference, science, result, caught


@pytest.mark.parametrize("kind", [NIRCAM_REFERENCE, NIRCAM_SCIENCE])
def test_nircam_psf_stars_are_stars(kind):
    """The PSF stars give a FWHM of 2.0-2.6 px (WebbPSF's F200W PSF: 2.0-2.4 px).

    Galaxies outnumber stars in this cluster field; before the stellar locus they
    were taken for stars and gave 12.2 px.
    """
    path = _nircam(kind)
    stars, _ = record_warnings(lambda: find_psf_stars(path))
    assert len(stars) >= 1
    assert 2.0 <= stars.meta["fwhm"] <= 2.6


def test_nircam_pair_runs_with_default_call(nircam_pair):
    """The default call runs; the registration residual is small (the i2d are aligned)."""
    _, _, result, caught = nircam_pair
    assert result.score.shape == (900, 900)
    assert np.isfinite(result.score.data[~result.score.mask]).all()
    assert result.flux_ratio == pytest.approx(1.0, abs=0.1)
    assert max(abs(result.shift[0]), abs(result.shift[1])) < 0.5
    _check_named_ladder_warnings(caught, ("reference image", "science image"))


# ---------------------------------------------------------------------------
# properimage's sample pair: saturated stars and no SATURATE keyword
# ---------------------------------------------------------------------------
def _properimage(number):
    return data_path("properimage", f"aligned_eso085-030-00{number}.fit")


@pytest.fixture(scope="module")
def properimage_pair():
    reference, science = _properimage(4), _properimage(5)
    kw = {"unit": "adu", "gain": PROPERIMAGE_GAIN}
    result, caught = record_warnings(lambda: subtract(reference, science, **kw))
    unmasked, _ = record_warnings(lambda: subtract(reference, science, saturation=np.inf, **kw))
    return _read_adu(reference), _read_adu(science), result, caught, unmasked


def test_properimage_saturation_found_masked_and_announced_once(properimage_pair):
    """Saturation is found in the data (no keyword), masked, and announced once per image."""
    reference, science, result, caught, _ = properimage_pair
    messages = _messages(caught, SaturationWarning)
    assert len(messages) == 2
    assert sorted(m.split(":")[0] for m in messages) == ["reference image", "science image"]
    saturated = (science.data >= 65535) | (reference.data >= 65535)
    assert saturated.sum() > 100
    assert result.score.mask[saturated].all()


def test_properimage_masking_saturation_removes_candidates(properimage_pair):
    """The pair is 74 s apart: the saturated stars' false candidates go with their masks.

    Unmasked (``saturation=np.inf``), candidates cluster within 30 px of the saturated
    pixels (8 of 18 measured); masked, none is left there.
    """
    reference, science, result, _, unmasked = properimage_pair
    saturated = (science.data >= 65535) | (reference.data >= 65535)
    distance = ndimage.distance_transform_edt(~saturated)

    def near_saturation(candidates):
        x = np.round(np.asarray(candidates["x"])).astype(int)
        y = np.round(np.asarray(candidates["y"])).astype(int)
        return int((distance[y, x] < 30).sum())

    assert near_saturation(unmasked.find_transients(5.0)) >= 5
    assert near_saturation(result.find_transients(5.0)) == 0
    off = _off_source(result, (reference, science))
    assert abs(_robust_std(result.score.data[off]) - 1.0) < 0.1
