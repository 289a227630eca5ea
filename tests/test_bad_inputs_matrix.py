"""The bad-input matrix: every public function against the malformed inputs a user can give.

Each cell is a public call and an input: the call returns a usable result (checked,
not only run) or raises a specific exception whose message names the input, what was
wrong and what to do. Every input is hashed before and after the call
(`conftest.assert_inputs_unchanged`), so no cell may mutate what it was given.
Cells of the faults named in issue 12 live in test_bad_inputs_subtract.py and
test_bad_inputs_coadd.py; this module covers the rest of the matrix.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import CCDData, InverseVariance, StdDevUncertainty, VarianceUncertainty
from astropy.table import Table
from conftest import assert_inputs_unchanged

from astro_zackay import (
    FewStarsWarning,
    KLPSFModel,
    NoiseEstimateWarning,
    align,
    coadd,
    estimate_background,
    estimate_psf,
    find_psf_stars,
    find_transients,
    match_stars,
    subtract,
    subtract_background,
)
from astro_zackay._ccd import to_image
from astro_zackay.cli import main
from astro_zackay.files import read_subtraction
from astro_zackay.simulation import (
    inject_sources,
    simulate_image,
    simulate_pair,
    tutorial2_frame,
)

# The 96 px field holds 10-13 PSF stars: too few to hold any out, which every PSF
# estimate announces; that warning is tested in test_mutation.py and test_psf*.py.
pytestmark = pytest.mark.filterwarnings("ignore::astro_zackay.FewStarsWarning")


@dataclass(frozen=True)
class Raises:
    """The cell's call raises ``error`` with a message matching ``match``."""

    error: type
    match: str
    warns: type | None = None
    warns_match: str = ""


@dataclass(frozen=True)
class Works:
    """The cell's call returns a result that ``check(result, bad_input)`` accepts."""

    check: Any = None
    warns: type | None = None
    warns_match: str = ""


def _ccd(like: CCDData, data=None, *, uncertainty: Any = "same", mask: Any = "same",
         unit: Any = None, meta: dict | None = None, wcs: Any = "same") -> CCDData:
    """A new CCDData like ``like`` with some of its parts replaced (copies throughout)."""
    return CCDData(
        like.data.copy() if data is None else data,
        unit=like.unit if unit is None else unit,
        uncertainty=(like.uncertainty if isinstance(uncertainty, str) else uncertainty),
        mask=(like.mask.copy() if isinstance(mask, str) else mask),
        wcs=(like.wcs.deepcopy() if isinstance(wcs, str) else wcs),
        meta=dict(like.meta) if meta is None else meta,
    )


def _with_nan(ccd: CCDData, where, value=np.nan) -> CCDData:
    data = ccd.data.copy()
    data[where] = value
    return _ccd(ccd, data)


def _uncertainty_as(ccd: CCDData, kind: type) -> CCDData:
    sigma = ccd.uncertainty.array
    values = {StdDevUncertainty: sigma, VarianceUncertainty: sigma**2,
              InverseVariance: 1.0 / sigma**2}[kind]
    return _ccd(ccd, uncertainty=kind(values))


def _scaled(ccd: CCDData, factor: float, unit: Any = None, meta: dict | None = None) -> CCDData:
    return _ccd(ccd, ccd.data * factor, uncertainty=StdDevUncertainty(ccd.uncertainty.array
                                                                      * factor),
                unit=unit, meta=meta)


def _big_endian(ccd: CCDData, dtype: str) -> CCDData:
    data = np.clip(ccd.data, -3e4, 3e4) if dtype.endswith("i2") else ccd.data
    return _ccd(ccd, data.astype(dtype),
                uncertainty=StdDevUncertainty(ccd.uncertainty.array.astype(">f4")))


#: A few NaN and inf pixels, a NaN row, an all-NaN frame (in the science image's place).
FEW = (slice(10, 13), slice(20, 22))
BUILD = {
    "few NaN": lambda s: _with_nan(s, FEW),
    "few inf": lambda s: _with_nan(s, FEW, np.inf),
    "NaN row": lambda s: _with_nan(s, 40),
    "all NaN": lambda s: _with_nan(s, ...),
    "fully masked": lambda s: _ccd(s, mask=np.ones(s.shape, bool)),
    "VarianceUncertainty": lambda s: _uncertainty_as(s, VarianceUncertainty),
    "InverseVariance": lambda s: _uncertainty_as(s, InverseVariance),
    ">f4": lambda s: _big_endian(s, ">f4"),
    ">i2": lambda s: _big_endian(s, ">i2"),
    "int32": lambda s: _ccd(s, s.data.astype(np.int32)),
    "1-D": lambda s: CCDData(s.data.ravel(), unit="electron"),
    "3-D": lambda s: CCDData(np.stack([s.data, s.data]), unit="electron"),
    "constant": lambda s: CCDData(np.full(s.shape, 100.0), unit="electron",
                                  uncertainty=StdDevUncertainty(np.full(s.shape, 10.0))),
    "x1e30 (float32 overflow)": lambda s: _scaled(s, 1e30),
    "x1e-30 (float32 underflow)": lambda s: _scaled(s, 1e-30),
    "no unit": lambda s: s.data.copy(),
    "Jy": lambda s: _scaled(s, 1e-6, unit="Jy", meta={}),
    "ADU with GAIN": lambda s: _scaled(s, 0.5, unit="adu", meta={"GAIN": 2.0}),
    "ADU without gain": lambda s: _scaled(s, 0.5, unit="adu", meta={}),
}

CALLS = {
    "estimate_background": lambda x, p: estimate_background(x),
    "subtract_background": lambda x, p: subtract_background(x),
    "find_psf_stars": lambda x, p: find_psf_stars(x),
    "estimate_psf": lambda x, p: estimate_psf(x),
    "align": lambda x, p: align(x, p.reference.ccd),
    "subtract": lambda x, p: subtract(p.reference.ccd, x),
    "coadd": lambda x, p: coadd([p.reference.ccd, p.reference.ccd, x]),
}


def _main_image(result) -> CCDData:
    for name in ("score", "sky"):
        if hasattr(result, name):
            return getattr(result, name)
    return result


def _usable(result, bad) -> None:
    """Finite where unmasked, and not (nearly) fully masked."""
    if isinstance(result, Table):
        assert len(result) >= 3
        assert np.isfinite(result["x"]).all() and np.isfinite(result["flux"]).all()
        return
    if isinstance(result, KLPSFModel):
        stamp = result.psf_at(48.0, 48.0)
        assert np.isfinite(stamp).all() and stamp.sum() == pytest.approx(1.0, abs=1e-6)
        return
    image = _main_image(result)
    mask = np.zeros(image.shape, bool) if image.mask is None else image.mask
    assert mask.mean() < 0.5
    assert np.isfinite(image.data[~mask]).all()


def _bad_pixels_masked(result, bad) -> None:
    """Usable, and the input's non-finite pixels are masked in the result on its grid."""
    _usable(result, bad)
    image = _main_image(result)
    assert image.mask[~np.isfinite(bad.data)].all()


def _same_as(case: str):
    """The result equals that of the unmodified science image (to float32 precision)."""
    def check(result, bad, *, _case=case) -> None:
        _usable(result, bad)
        reference = _BASELINE[_case]
        got, want = _main_image(result), _main_image(reference)
        if isinstance(got, Table):
            assert len(got) == len(want)
            np.testing.assert_allclose(got["flux"], want["flux"], rtol=1e-4)
            return
        if isinstance(got, KLPSFModel):
            np.testing.assert_allclose(got.psf_at(48.0, 48.0), want.psf_at(48.0, 48.0),
                                       atol=1e-6)
            return
        np.testing.assert_array_equal(got.mask, want.mask)
        good = ~got.mask
        np.testing.assert_allclose(got.data[good], want.data[good], rtol=1e-3, atol=1e-3)
    return check


#: The cell results of the unmodified science image, filled by the `baseline` fixture.
_BASELINE: dict[str, Any] = {}

NO_PIXEL = Raises(ValueError, r"has no usable pixel: of its 9216 pixels, .*check the data, "
                              r"the mask and saturation=")
NOT_2D = r"expected a 2-D image, got an array of shape \({shape}\)"
OVERFLOW = r"'s variance has 9216 values .* outside the range of float32 .* rescale the image"
NO_STARS = r"no sources detected above 3 sigma: check the image, its mask"
NO_MATCH = r"astroalign could not match the star patterns .* at least 3 common stars"
PLAIN_ARRAY = r"a plain array has no unit: pass unit='adu' or unit='electron'"

#: (call, case) -> what must happen. Cells left out are faults of modules owned elsewhere
#: (listed in the session report) or meaningless (an image in Jy has no sky to map).
EXPECT: dict[tuple[str, str], Raises | Works] = {}
for _call in CALLS:
    for _case in ("few NaN", "few inf"):
        EXPECT[_call, _case] = Works(_usable)
    for _case in ("VarianceUncertainty", "InverseVariance", ">f4", "int32"):
        EXPECT[_call, _case] = Works(_same_as(_call) if _case in ("VarianceUncertainty",
                                                                  "InverseVariance")
                                     else _usable)
    EXPECT[_call, ">i2"] = Works(_usable)
    if _call != "coadd":  # coadd names the frame of a wrong shape: test_bad_inputs_coadd
        EXPECT[_call, "1-D"] = Raises(ValueError, NOT_2D.format(shape="9216,"))
        EXPECT[_call, "3-D"] = Raises(ValueError, NOT_2D.format(shape="2, 96, 96"))
        EXPECT[_call, "no unit"] = Raises(ValueError, PLAIN_ARRAY)
    else:
        EXPECT[_call, "1-D"] = Raises(ValueError, r"images must be registered frames of one "
                                                  r"shape, got .*image 2 \(9216,\)")
        EXPECT[_call, "3-D"] = Raises(ValueError, r"images must be registered frames of one "
                                                  r"shape, got .*image 2 \(2, 96, 96\)")
    EXPECT[_call, "ADU with GAIN"] = Works(_usable)
for _call in ("estimate_background", "subtract_background", "find_psf_stars", "estimate_psf",
              "align"):
    EXPECT[_call, "NaN row"] = Works(_usable)
    EXPECT[_call, "all NaN"] = NO_PIXEL
    EXPECT[_call, "fully masked"] = NO_PIXEL
EXPECT["subtract_background", "few NaN"] = Works(_bad_pixels_masked)
EXPECT["subtract_background", "few inf"] = Works(_bad_pixels_masked)
EXPECT["subtract", "few NaN"] = Works(_bad_pixels_masked)
EXPECT["subtract", "few inf"] = Works(_bad_pixels_masked)
EXPECT["subtract", "all NaN"] = Raises(ValueError, r"^science image: the CCDData has no usable "
                                                   r"pixel: of its 9216 pixels, 9216 not finite")
EXPECT["subtract", "fully masked"] = Raises(ValueError, r"^science image: the CCDData has no "
                                                        r"usable pixel: .* 9216 masked by its "
                                                        r"mask")
EXPECT["subtract", "no unit"] = Raises(ValueError, "^science image: " + PLAIN_ARRAY)
EXPECT["coadd", "NaN row"] = Works(_usable)
for _call in ("estimate_background", "subtract_background"):
    EXPECT[_call, "constant"] = Works(_usable, NoiseEstimateWarning,
                                      r"the background rms is 0 .* in 100% of the image")
for _call in ("find_psf_stars", "estimate_psf"):
    EXPECT[_call, "constant"] = Raises(ValueError, NO_STARS)
EXPECT["align", "constant"] = Raises(ValueError, NO_MATCH)
CONSTANT = (r"all its 9216 unmasked pixels are 100 \(a constant image\): it has no sky noise "
            r"to measure; check that the right image")
EXPECT["subtract", "constant"] = Raises(ValueError, r"^science image: " + CONSTANT)
EXPECT["coadd", "constant"] = Raises(ValueError, r"^image 2: " + CONSTANT)
EXPECT["subtract", "x1e30 (float32 overflow)"] = Raises(ValueError, "^science image: the "
                                                        "CCDData" + OVERFLOW)
EXPECT["subtract", "x1e-30 (float32 underflow)"] = Raises(ValueError, "^science image: the "
                                                          "CCDData" + OVERFLOW)
for _call in ("align", "subtract"):  # registration by stars cares only for their pattern
    EXPECT[_call, "ADU without gain"] = (Works(_usable) if _call == "align" else Raises(
        u.UnitsError, r"the science image is in adu and the reference image in electron: "
                      r"converting between electrons and ADU needs the science image's gain "
                      r"\(e-/ADU\); pass gain= or give the image a GAIN keyword"))
EXPECT["subtract", "Jy"] = Raises(u.UnitsError, r"the science image is in Jy and the "
                                                r"reference image in electron: no conversion "
                                                r"between them is known")
EXPECT["coadd", "Jy"] = Raises(u.UnitsError, r"the image 2 is in Jy and the first image in "
                                             r"electron: no conversion between them is known")
EXPECT["coadd", "ADU without gain"] = Raises(u.UnitsError, r"the image 2 is in adu and the first "
                                                           r"image in electron: converting .*"
                                                           r"needs the image 2's gain")


@pytest.fixture(scope="module")
def baseline(small_pair):
    """The results of every call on the unmodified science image (for `_same_as`)."""
    for call, run in CALLS.items():
        _BASELINE[call] = run(small_pair.science.ccd, small_pair)
    yield _BASELINE
    _BASELINE.clear()


@pytest.mark.parametrize(("call", "case"), list(EXPECT), ids=[f"{c}-{k}" for c, k in EXPECT])
def test_matrix(call, case, small_pair, baseline):
    """One cell: the result is usable, or the error says what was wrong and what to do."""
    bad = BUILD[case](small_pair.science.ccd)
    inputs = (bad, small_pair.reference.ccd)

    def run():
        return assert_inputs_unchanged(lambda: CALLS[call](bad, small_pair), *inputs)

    expected = EXPECT[call, case]
    if isinstance(expected, Raises):
        with pytest.raises(expected.error, match=expected.match):
            if expected.warns is None:
                run()
            else:
                with pytest.warns(expected.warns, match=expected.warns_match):
                    run()
        return
    if expected.warns is not None:
        with pytest.warns(expected.warns, match=expected.warns_match):
            result = run()
    else:
        result = run()
    expected.check(result, bad)


def test_matrix_covers_every_call_and_case():
    """No call and no input of the matrix is left without a cell."""
    assert {call for call, _ in EXPECT} == set(CALLS)
    assert {case for _, case in EXPECT} == set(BUILD)


# ---------------------------------------------------------------------------------------
# images smaller than the PSF, mismatched and missing WCS, mixed uncertainty classes


def _tiny(pair) -> CCDData:
    s = pair.science.ccd
    return _ccd(s, s.data[20:29, 20:29].copy(), uncertainty=StdDevUncertainty(
        s.uncertainty.array[20:29, 20:29].copy()), mask=None, wcs=None)


@pytest.mark.parametrize("call", ["find_psf_stars", "estimate_psf"])
def test_image_smaller_than_the_psf_stamp(small_pair, call):
    tiny = _tiny(small_pair)
    function = {"find_psf_stars": find_psf_stars, "estimate_psf": estimate_psf}[call]
    with pytest.raises(ValueError, match=r"stamp_shape \(25, 25\) is larger than the image "
                                         r"\(9, 9\): give a stamp_shape that fits the image"):
        assert_inputs_unchanged(lambda: function(tiny, stamp_shape=25), tiny)


def _far_away(ccd: CCDData) -> CCDData:
    moved = _ccd(ccd)
    moved.wcs.wcs.crval = [ccd.wcs.wcs.crval[0] + 10.0, ccd.wcs.wcs.crval[1]]
    return moved


@pytest.mark.parametrize("which", ["image", "target"])
def test_align_wcs_without_a_wcs(small_pair, which):
    ref, sci = small_pair.reference.ccd, _ccd(small_pair.science.ccd, wcs=None, meta={})
    args = (sci, ref) if which == "image" else (ref, sci)
    with pytest.raises(ValueError, match=r"method='wcs' needs a WCS on both images; use "
                                         r"method='stars'"):
        assert_inputs_unchanged(lambda: align(*args, method="wcs"), *args)


def test_align_wcs_of_images_apart_on_the_sky(small_pair):
    far, sci = _far_away(small_pair.reference.ccd), small_pair.science.ccd
    with pytest.raises(ValueError, match=r"method='wcs': no overlap between the images' "
                                         r"footprints .* check the WCS of both images"):
        assert_inputs_unchanged(lambda: align(far, sci, method="wcs"), far, sci)


def _with_wcs(ccd: CCDData, **cards) -> CCDData:
    out = _ccd(ccd)
    for name, value in cards.items():
        setattr(out.wcs.wcs, name, value)
    return out


@pytest.mark.parametrize(
    ("cards", "match"),
    [
        ({"ctype": ["", ""]}, r"the image's WCS is not celestial \(CTYPE \['', ''\]\), so the "
                              r"images cannot be matched on the sky; give both images a "
                              r"celestial WCS"),
        ({"crval": [np.nan, 2.2]}, r"the image's WCS has a CRVAL, CRPIX or CD/CDELT that is not "
                                   r"finite \(NaN or inf\); fix its header"),
        ({"cdelt": [np.inf, 1.0]}, r"the image's WCS has a CRVAL, CRPIX or CD/CDELT that is not "
                                   r"finite"),
    ],
)
def test_align_wcs_with_a_wcs_that_cannot_map_the_sky(small_pair, cards, match):
    """A linear WCS gave astropy's 'Expected the following order of world arguments:
    SkyCoord'; a NaN CRVAL was blamed on the footprints not overlapping."""
    bad, sci = _with_wcs(small_pair.reference.ccd, **cards), small_pair.science.ccd
    with pytest.raises(ValueError, match=r"^method='wcs': " + match):
        assert_inputs_unchanged(lambda: align(bad, sci, method="wcs"), bad, sci)


def test_subtract_align_wcs_without_a_wcs(small_pair):
    ref, sci = _ccd(small_pair.reference.ccd, wcs=None, meta={}), small_pair.science.ccd
    with pytest.raises(ValueError, match=r"^reference image: method='wcs' needs a WCS on both"):
        assert_inputs_unchanged(lambda: subtract(ref, sci, align="wcs"), ref, sci)


def test_align_wcs_matches_align_by_stars(small_pair):
    """Both methods put the unshifted pair's reference on the science grid alike."""
    ref, sci = small_pair.reference.ccd, small_pair.science.ccd
    by_wcs = assert_inputs_unchanged(lambda: align(ref, sci, method="wcs"), ref, sci)
    good = ~by_wcs.mask
    assert good.mean() > 0.9
    residual = by_wcs.data[good] - ref.data[good]
    assert np.abs(np.median(residual)) < 1.0  # e-: the grids agree, nothing moved


@pytest.mark.parametrize(("kinds"), [(VarianceUncertainty, InverseVariance),
                                     (InverseVariance, StdDevUncertainty)])
def test_subtract_with_mixed_uncertainty_classes(small_pair, baseline, kinds):
    ref = _uncertainty_as(small_pair.reference.ccd, kinds[0])
    sci = _uncertainty_as(small_pair.science.ccd, kinds[1])
    result = assert_inputs_unchanged(lambda: subtract(ref, sci), ref, sci)
    want = baseline["subtract"].score
    np.testing.assert_array_equal(result.score.mask, want.mask)
    np.testing.assert_allclose(result.score.data[~want.mask], want.data[~want.mask],
                               rtol=1e-3, atol=1e-3)


def test_coadd_with_mixed_uncertainty_classes(small_pair, baseline):
    ref = small_pair.reference.ccd
    frames = [_uncertainty_as(ref, VarianceUncertainty), _uncertainty_as(ref, InverseVariance),
              _uncertainty_as(small_pair.science.ccd, StdDevUncertainty)]
    result = assert_inputs_unchanged(lambda: coadd(frames), *frames)
    want = baseline["coadd"]  # StdDev, StdDev, StdDev of the same pixels
    np.testing.assert_allclose(result.image.data, want.image.data, rtol=1e-4, atol=1e-4)


def test_subtract_converts_adu_with_a_gain_option(small_pair, baseline):
    """ADU and electrons convert with the gain given for the image in ADU."""
    ref = _scaled(small_pair.reference.ccd, 0.5, unit="adu", meta={})
    sci = small_pair.science.ccd
    result = assert_inputs_unchanged(lambda: subtract(ref, sci, gain=(2.0, None)), ref, sci)
    assert result.flux_ratio == pytest.approx(baseline["subtract"].flux_ratio, rel=1e-3)


@pytest.mark.parametrize("factor", [1e-6, 1e6])
def test_subtract_does_not_depend_on_the_unit_scale(small_pair, baseline, factor):
    """A pair in a unit 1e-6 or 1e6 times another (MJy/sr, say) gives the same Scorr.

    In large units every star's position error was NaN (its fit's Fisher matrix looked
    singular), which changed the astrometric noise and Scorr by up to 0.56 sigma.
    """
    ref = _scaled(small_pair.reference.ccd, factor, unit="MJy/sr", meta={})
    sci = _scaled(small_pair.science.ccd, factor, unit="MJy/sr", meta={})
    result = assert_inputs_unchanged(lambda: subtract(ref, sci), ref, sci)
    want = baseline["subtract"]
    assert result.astrometric_noise == pytest.approx(want.astrometric_noise, rel=1e-4)
    assert result.flux_ratio == pytest.approx(want.flux_ratio, rel=1e-5)
    np.testing.assert_array_equal(result.score.mask, want.score.mask)
    good = ~want.score.mask
    np.testing.assert_allclose(result.score.data[good], want.score.data[good], atol=2e-3)


def test_unparsable_unit_string_is_named(small_pair):
    data = small_pair.science.ccd.data
    with pytest.raises(ValueError, match=r"unit='e-' is not a unit astropy can parse: pass e.g. "
                                         r"unit='adu'.*'electron' for 'e-'"):
        estimate_background(data, unit="e-")
    with pytest.raises(ValueError, match=r"^science image: unit='bananas' is not a unit"):
        subtract(data, data, unit="bananas")


# ---------------------------------------------------------------------------------------
# scores for find_transients


@pytest.fixture(scope="module")
def score(small_pair):
    return subtract(small_pair.reference.ccd, small_pair.science.ccd).score


SCORE_CASES = {
    "few NaN": (lambda s: _with_nan(s, FEW), None),
    "NaN row": (lambda s: _with_nan(s, 40), None),
    "all NaN": (lambda s: _with_nan(s, ...), r"score has no finite unmasked pixel"),
    "fully masked": (lambda s: _ccd(s, mask=np.ones(s.shape, bool)),
                     r"score has no finite unmasked pixel .* check the subtraction's inputs"),
    ">f4": (lambda s: _ccd(s, s.data.astype(">f4")), None),
    "1-D": (lambda s: CCDData(s.data.ravel(), unit=""), r"score must be a 2-D image, got shape"),
    "3-D": (lambda s: CCDData(np.stack([s.data] * 2), unit=""),
            r"score must be a 2-D image, got shape \(2, 96, 96\)"),
    "constant": (lambda s: CCDData(np.full(s.shape, 10.0), unit=""),
                 r"score is constant \(10 in every unmasked pixel\).* pass the Scorr"),
}


@pytest.mark.parametrize("case", SCORE_CASES)
def test_find_transients_matrix(score, case):
    build, error = SCORE_CASES[case]
    bad = build(score)
    if error is not None:
        with pytest.raises(ValueError, match=error):
            assert_inputs_unchanged(lambda: find_transients(bad), bad)
        return
    found = assert_inputs_unchanged(lambda: find_transients(bad), bad)
    want = find_transients(score)
    assert abs(len(found) - len(want)) <= 3  # a few pixels or a row can drop a candidate
    if len(found):
        ok = np.isfinite(bad.data[np.round(found["y"]).astype(int),
                                  np.round(found["x"]).astype(int)])
        assert ok.all()


# ---------------------------------------------------------------------------------------
# match_stars, KLPSFModel, read_subtraction, simulation entry points, the CLI


@pytest.fixture(scope="module")
def star_lists(small_pair):
    return find_psf_stars(small_pair.reference.ccd), find_psf_stars(small_pair.science.ccd)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"radius": -1.0}, ValueError, r"radius must be a positive finite number of pixels, "
                                       r"got -1.0: give the largest distance"),
        ({"radius": np.nan}, ValueError, r"radius must be a positive finite number"),
        ({"radius": "far"}, TypeError, r"radius must be a number of pixels, got 'far'"),
        ({"offset": (1.0,)}, ValueError, r"offset must be a finite \(dx, dy\) pair in pixels"),
        ({"offset": (np.inf, 0.0)}, ValueError, r"offset must be a finite \(dx, dy\) pair"),
        ({"offset": "left"}, TypeError, r"offset must be a \(dx, dy\) pair of numbers"),
        ({"min_matches": 0}, ValueError, r"min_matches must be a whole number >= 1, got 0"),
        ({"min_matches": 2.5}, ValueError, r"min_matches must be a whole number >= 1, got 2.5"),
    ],
)
def test_match_stars_options_checked_first(star_lists, kwargs, error, match):
    with pytest.raises(error, match=match):
        assert_inputs_unchanged(lambda: match_stars(*star_lists, **kwargs), *star_lists)


def test_match_stars_refuses_what_is_not_a_table():
    with pytest.raises(TypeError, match=r"the reference star list is a ndarray, not an astropy "
                                        r"Table: give a Table with x, y, flux and flux_err"):
        match_stars(np.ones((3, 4)), Table({"x": [1.0]}))


def test_match_stars_of_the_pair(star_lists):
    matched = assert_inputs_unchanged(lambda: match_stars(*star_lists), *star_lists)
    assert matched.n_matched >= 5
    assert matched.flux_ratio == pytest.approx(1.0, abs=0.05)  # simulated with ratio 1


def test_psf_model_reads_refuse_other_files(small_pair, tmp_path):
    image = tmp_path / "image.fits"
    small_pair.science.ccd.write(image)
    with pytest.raises(ValueError, match=r"image.fits' is not an astro_zackay PSF file .*write "
                                         r"one with KLPSFModel.write"):
        KLPSFModel.read(image)
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"x" * 3000)
    with pytest.raises(ValueError, match=r"garbage.fits' is not a FITS file"):
        KLPSFModel.read(garbage)


def test_read_subtraction_refuses_an_image_file(small_pair, tmp_path):
    image = tmp_path / "image.fits"
    small_pair.science.ccd.write(image)
    with pytest.raises(ValueError, match=r"image.fits' is not an astro_zackay subtraction file"):
        read_subtraction(image)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: simulate_image((-5, 64)), r"shape must hold positive integers \(ny, nx\)"),
        (lambda: simulate_image((5, 64, 3)), r"shape must be an int or a \(ny, nx\) pair"),
        (lambda: simulate_image(64, n_stars=-1), r"n_stars must be a non-negative integer"),
        (lambda: simulate_image(64, flux_range=(1e5, 1e3)),
         r"flux_range must be \(low, high\) with 0 < low <= high"),
        (lambda: simulate_image(64, psf=np.nan), r"fwhm must be finite, got nan"),
        (lambda: simulate_image(64, sky=-1.0), r"sky must be a finite number >= 0, got -1.0"),
        (lambda: simulate_image(64, gain=0.0), r"gain must be a finite number > 0, got 0.0"),
        (lambda: simulate_image(64, flux_distribution="gauss"),
         r"flux_distribution must be one of \('powerlaw'"),
        (lambda: simulate_pair(64, flux_ratio=0.0), r"flux_ratio must be a finite number > 0"),
        (lambda: simulate_pair(64, flux_ratio=np.nan), r"flux_ratio must be a finite number > 0"),
        (lambda: simulate_pair(64, shift=(1.0,)), r"shift must be a \(dx, dy\) pair of floats"),
        (lambda: simulate_pair(64, shift=(np.nan, 0.0)), r"shift must be finite"),
        (lambda: simulate_pair(64, n_transients=-1), r"n_transients must be a non-negative"),
        (lambda: tutorial2_frame(-1), r"tile_shape must hold positive integers"),
        (lambda: simulate_image(64, powerlaw_index=np.nan),
         r"powerlaw_index must be a finite number, got nan"),
        (lambda: simulate_image(64, min_separation=-1.0),
         r"min_separation must be a finite number >= 0, got -1.0"),
        (lambda: simulate_image(64, flux_range="ab"),
         r"flux_range must be a \(low, high\) pair of fluxes, got 'ab'"),
    ],
)
def test_simulation_parameters_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: simulate_image(64, seed="x"), TypeError,
         r"seed must be an int, None or a numpy Generator"),
        (lambda: simulate_pair(64, seed=1.5), TypeError,
         r"seed must be an int, None or a numpy Generator"),
        (lambda: simulate_image(64, wcs="yes"), TypeError,
         r"wcs must be True \(a default TAN WCS\), False \(none\) or an astropy WCS, got "
         r"str 'yes'"),
        (lambda: simulate_pair(64, wcs=None), TypeError, r"wcs must be True .*got NoneType"),
        (lambda: inject_sources(simulate_image(32, n_stars=0, seed=1).ccd,
                                Table({"x": [9.0], "y": [9.0], "flux": [1.0]}), 2.5),
         ValueError, r"psf must be a 2-D stamp, a callable or a PSFField, got shape \(\); for "
         r"a Gaussian of FWHM f give PSFField\(fwhm=f\)"),
    ],
)
def test_simulation_options_of_the_wrong_kind_are_refused_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_inject_sources_refuses_bad_tables_and_images(small_pair):
    ccd = small_pair.science.ccd
    with pytest.raises(ValueError, match=r"sources lacks column\(s\) \['x', 'y', 'flux'\]"):
        assert_inputs_unchanged(lambda: inject_sources(ccd, Table({"a": [1]}), 2.5), ccd)
    line = CCDData(np.ones(5), unit="electron")
    with pytest.raises(ValueError, match=r"ccd must be a 2-D image, got 1 dimensions"):
        inject_sources(line, Table({"x": [1.0], "y": [1.0], "flux": [1.0]}), 2.5)


@pytest.fixture(scope="module")
def pair_files(small_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    small_pair.reference.ccd.write(folder / "ref.fits")
    small_pair.science.ccd.write(folder / "new.fits")
    CCDData(np.full((96, 96), np.nan), unit="electron").write(folder / "nan.fits")
    return folder


CLI_MISTAKES = {
    "flux ratio 0": (["--flux-ratio", "0"], "--flux-ratio: must be a finite number > 0"),
    "flux ratio nan": (["--flux-ratio", "nan"], "--flux-ratio: must be a finite number > 0"),
    "tiles 3": (["--tiles", "3"], "--tiles: a tile side must be at least 32 px"),
    "tiles -5": (["--tiles", "-5"], "--tiles: a tile side must be at least 32 px"),
    "fwhm -1": (["--reference-fwhm", "-1"], "--reference-fwhm: must be a finite number > 0"),
    "fwhm nan": (["--science-fwhm", "nan"], "--science-fwhm: must be a finite number > 0"),
    "threshold nan": (["--threshold", "nan"], "--threshold: must be a finite number > 0"),
    "three units": (["--unit", "adu,electron,adu"], "--unit: give one value or REF,NEW"),
}


@pytest.mark.parametrize("mistake", CLI_MISTAKES)
def test_cli_options_exit_2_naming_the_option(pair_files, tmp_path, mistake):
    extra, words = CLI_MISTAKES[mistake]
    out = tmp_path / "out.fits"
    argv = ["subtract", str(pair_files / "ref.fits"), str(pair_files / "new.fits"),
            "-o", str(out), *extra]
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse's own checks
            status = exc.code
    assert status == 2
    assert words in err.getvalue()
    assert not out.exists()


def test_cli_all_nan_image_exits_2_naming_it(pair_files, tmp_path):
    out = tmp_path / "out.fits"
    err = io.StringIO()
    with redirect_stderr(err):
        status = main(["subtract", str(pair_files / "ref.fits"), str(pair_files / "nan.fits"),
                       "-o", str(out)])
    assert status == 2
    assert "science image: " in err.getvalue() and "nan.fits' has no usable pixel" in (
        err.getvalue())
    assert not out.exists()



#: A path that does not exist: an option's error raised with it came before any reading.
MISSING = "/nonexistent/image.fits"


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: estimate_psf(MISSING, snr_min=np.nan), ValueError,
         r"snr_min must be a positive finite number, got nan: the lowest S/N of a PSF star"),
        (lambda: estimate_psf(MISSING, snr_min=-3.0), ValueError,
         r"snr_min must be a positive finite number, got -3.0"),
        (lambda: estimate_psf(MISSING, seed="a"), TypeError,
         r"seed must be an int, None or a numpy Generator, got 'a'"),
        (lambda: find_psf_stars(MISSING, snr_min=np.inf), ValueError,
         r"snr_min must be a positive finite number, got inf"),
        (lambda: find_psf_stars(MISSING, background=np.ones((3, 3))), TypeError,
         r"background must be a BackgroundResult \(from estimate_background\) or one finite "
         r"sky level .*got ndarray \(3, 3\)"),
        (lambda: find_psf_stars(MISSING, background=np.nan), ValueError,
         r"background must be a finite sky level, got nan"),
        (lambda: align(MISSING, MISSING, order=-1), ValueError,
         r"order must be 0, 1, 2, 3, 4 or 5 for method='stars', got -1: the interpolation "
         r"order"),
        (lambda: align(MISSING, MISSING, method="wcs", order=2), ValueError,
         r"order must be 0, 1 or 3 for method='wcs', got 2"),
        (lambda: align(MISSING, MISSING, max_control_points=2), ValueError,
         r"max_control_points must be a whole number >= 3, got 2"),
    ],
)
def test_options_are_checked_before_the_image_is_read(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_background_quantity_in_another_unit_is_refused(small_pair):
    sci = small_pair.science.ccd
    with pytest.raises(u.UnitsError, match=r"background=3.0 m cannot be converted to the "
                                            r"image's unit electron"):
        assert_inputs_unchanged(lambda: find_psf_stars(sci, background=3.0 * u.m), sci)
    found = assert_inputs_unchanged(lambda: find_psf_stars(sci, background=200.0 * u.electron),
                                    sci)
    assert len(found) >= 5


def test_match_stars_without_measurable_fluxes_is_refused(star_lists):
    """Matched stars whose fluxes are NaN gave a NaN flux ratio, silently."""
    ref, img = (table.copy() for table in star_lists)
    img["flux"] = np.nan
    with pytest.raises(ValueError, match=r"only 0 of the \d+ matched stars have finite flux and "
                                         r"flux_err: too few for a flux ratio \(need 5\)"):
        assert_inputs_unchanged(lambda: match_stars(ref, img), ref, img)


def test_coadd_of_frames_too_small_for_star_apertures_falls_back_to_a_pixel_fit():
    """On 64 px frames every matched star's sky annulus crosses the edge: the flux scale
    was NaN ('flux_scale must be a finite positive number, got nan'); now the pixel fit
    gives it, announced."""
    pair = simulate_pair(64, n_stars=10, flux_range=(3e3, 2e5), seed=2)
    frames = [pair.reference.ccd, pair.science.ccd]
    with pytest.warns(FewStarsWarning, match=r"^image 1: no star matches the first image "
                                             r"\(only 0 of the \d matched stars have apertures "
                                             r".*comes from a pixel fit"):
        result = assert_inputs_unchanged(lambda: coadd(frames), *frames)
    scale = result.frames["flux_scale"][1]
    assert np.isfinite(scale) and 0.8 < scale < 1.2  # simulated with equal fluxes
    assert np.isfinite(result.image.data[~result.image.mask]).all()


def test_a_gain_keyword_of_the_image_in_electrons_is_a_guess_and_warned(small_pair):
    """The reference in ADU with no gain, the science in electrons with GAIN = 1: the
    science image's keyword is taken for the reference's ADU, which is announced."""
    from astro_zackay._warnings import UnitConversionWarning

    ref = _scaled(small_pair.reference.ccd, 0.5, unit="adu", meta={})
    sci = small_pair.science.ccd
    assert sci.meta["GAIN"] == 1.0  # the simulation's keyword for data in electrons
    with pytest.warns(UnitConversionWarning, match=r"the reference image is in adu and the "
                                                   r"science image in electron: the conversion "
                                                   r"uses the science image's gain keyword "
                                                   r"\(1 e-/ADU\)") as caught:
        result = assert_inputs_unchanged(lambda: subtract(ref, sci), ref, sci)
    assert [w.filename for w in caught if w.category is UnitConversionWarning] == [__file__]
    assert result.flux.unit == u.adu


@pytest.mark.parametrize("dtype", [complex, bool])
def test_psf_arrays_of_other_than_real_numbers_are_refused(dtype):
    """A complex stamp lost its imaginary part with a bare ComplexWarning, then was used."""
    stamp = np.zeros((9, 9), dtype)
    stamp[4, 4] = 1
    with pytest.raises(TypeError, match=rf"^science_psf: the PSF array must hold real numbers, "
                                        rf"got an array of dtype {np.dtype(dtype)}"):
        subtract(MISSING, MISSING, reference_psf=2.5, science_psf=stamp)


def _with_uncertainty(ccd: CCDData, values) -> CCDData:
    return _ccd(ccd, uncertainty=StdDevUncertainty(values))


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda s: _with_uncertainty(s, np.full(s.shape, np.nan)), ValueError,
         r"the CCDData's StdDevUncertainty leaves no usable pixel: it is NaN, inf, zero or "
         r"negative at all \d+ pixels not already masked; give a valid uncertainty, or none"),
        (lambda s: _with_uncertainty(s, np.full(s.shape, np.inf)), ValueError,
         r"StdDevUncertainty leaves no usable pixel"),
        (lambda s: np.ma.masked_array(s.data, mask=np.ones(s.shape, bool)), ValueError,
         r"the MaskedArray has no usable pixel: .* 9216 masked by its mask"),
        (lambda s: np.ones(s.shape, complex), TypeError,
         r"the ndarray holds complex128 values, not real numbers: give the pixel values"),
        (lambda s: np.ones(s.shape, bool), TypeError, r"the ndarray holds bool values, not real"),
        (lambda s: np.full(s.shape, "a"), TypeError, r"the ndarray holds <U1 values, not real"),
        (lambda s: np.ones((1, 1)), ValueError,
         r"only 1 unmasked pixels, too few \(16\) to estimate the noise from the data; give an "
         r"uncertainty"),
    ],
)
def test_images_no_pixel_of_which_can_be_used(small_pair, build, error, match):
    """An all-NaN uncertainty or a fully masked MaskedArray gave a fully masked image
    without a word (the MaskedArray's mask was dropped); complex data lost their
    imaginary part with a bare ComplexWarning."""
    bad = build(small_pair.science.ccd)
    with pytest.raises(error, match=match):
        assert_inputs_unchanged(lambda: find_psf_stars(bad, unit="electron"), bad)


def test_a_masked_array_keeps_its_mask(small_pair):
    sci = small_pair.science.ccd
    mask = np.zeros(sci.shape, bool)
    mask[:, :48] = True
    data = np.ma.masked_array(sci.data, mask=mask)
    stars = assert_inputs_unchanged(lambda: find_psf_stars(data, unit="electron"), data)
    assert len(stars) >= 1 and (stars["x"] > 48).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"hdu": "NOPE"}, ValueError, r"new.fits' has no HDU 'NOPE': its HDUs are \['PRIMARY', "
                                      r"'MASK', 'UNCERT'\] \(index 0 to 2\); pass hdu="),
        ({"hdu": 7}, ValueError, r"has no HDU 7: its HDUs are"),
        ({"saturation": "high"}, ValueError, r"saturation must be one positive finite number, "
                                             r"got 'high'"),
        ({"saturation": np.ones(3)}, ValueError, r"saturation must be one positive finite"),
        ({"gain": "two"}, ValueError, r"gain must be one positive finite number, got 'two'"),
    ],
)
def test_reading_options_are_named(pair_files, kwargs, error, match):
    """A missing HDU gave a bare KeyError or IndexError; a string gain or saturation
    numpy's 'could not convert string to float' (at the CCDData boundary every public
    function reads its images through)."""
    with pytest.raises(error, match=match):
        to_image(pair_files / "new.fits", **kwargs)


def test_a_string_gain_is_named_by_estimate_psf(pair_files):
    with pytest.raises(ValueError, match=r"gain must be one positive finite number, got 'two'"):
        estimate_psf(pair_files / "new.fits", gain="two")


@pytest.mark.parametrize("dtype", [np.int32, "int16", bool, "not a dtype"])
def test_subtract_refuses_non_float_dtypes(small_pair, dtype):
    with pytest.raises(ValueError, match=r"dtype"):
        subtract(small_pair.reference.ccd, small_pair.science.ccd, dtype=dtype)


def test_uncertainty_of_another_shape_is_named(small_pair):
    sci = small_pair.science.ccd
    with pytest.raises(ValueError, match=r"the StdDevUncertainty's shape \(3, 3\) does not "
                                         r"match the image \(96, 96\): give one uncertainty"):
        to_image(sci, uncertainty=StdDevUncertainty(np.ones((3, 3))))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stamp_shape": 201}, ValueError, r"stamp_shape \(201, 201\) is larger than the image "
                                           r"\(96, 96\): give a stamp_shape that fits"),
        ({"background": np.ones((3, 3))}, ValueError,
         r"background is a map of shape \(3, 3\), not of the image's \(96, 96\): give the "
         r"image's own background map"),
        ({"background": np.nan}, ValueError, r"background is a map of shape \(\), not of the "
                                             r"image's"),
        ({"stars": Table({"x": ["a"], "y": ["b"]})}, TypeError,
         r"the stars' 'x' column holds <U1 values: give pixel positions as numbers"),
    ],
)
def test_estimate_psf_options_the_image_cannot_take(small_pair, kwargs, error, match):
    """Each was an IndexError (or numpy's 'could not convert string to float')."""
    sci = small_pair.science.ccd
    with pytest.raises(error, match=match):
        assert_inputs_unchanged(lambda: estimate_psf(sci, **kwargs), sci)
