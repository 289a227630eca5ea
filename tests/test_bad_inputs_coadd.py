"""Malformed inputs of `find_transients`, `coadd` and the background: each a specific error.

Every refusal is checked for its exception class and a message that names the input,
what was wrong and what to do; a parameter error raised with a path that does not
exist (or an image that could not be read) proves it came before any work; the
callers' arrays and CCDData are left as they were.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.stats import mad_std
from conftest import assert_ccd_unchanged, ccd_state

from astro_zackay import coadd, subtract
from astro_zackay._checks import check_coadd_options
from astro_zackay._warnings import AstroZackayWarning, NoiseEstimateWarning
from astro_zackay.background import estimate_background, subtract_background
from astro_zackay.coadd_algebra import ProperCoaddAccumulator
from astro_zackay.simulation import psf_stamp, simulate_image, simulate_pair
from astro_zackay.transients import bright_sources, find_transients

#: A path that does not exist: a parameter error raised with it came before any reading.
MISSING = "/nonexistent/frame.fits"
PSF = psf_stamp((15, 15), 3.0)






@pytest.fixture(scope="module")
def frames():
    """Three sky-subtracted 128^2 frames of one field, with PSF and flux scale known."""
    return [simulate_image((128, 128), psf=3.0, n_stars=20, flux_range=(2e3, 2e4), seed=s,
                           subtract_sky=True).ccd for s in range(3)]


def _coadd(images, **kwargs):
    n = len(images) if isinstance(images, list) else 3
    return coadd(images, psfs=[PSF] * n, flux_scales=[1.0] * n, **kwargs)


# find_transients ------------------------------------------------------------------------


def _noise_score(seed=0):
    return np.random.default_rng(seed).normal(size=(64, 64))


@pytest.mark.parametrize(
    ("score", "error", "match"),
    [
        (np.zeros(100), ValueError, r"score must be a 2-D image, got shape \(100,\)"),
        (CCDData(np.zeros(100), unit=""), ValueError, r"score must be a 2-D image"),
        (np.zeros((2, 8, 8)), ValueError, r"score must be a 2-D image, got shape \(2, 8, 8\)"),
        (fits.PrimaryHDU(np.zeros((8, 8))), TypeError,
         r"score must be a 2-D numeric image .* got PrimaryHDU; read a FITS file or HDU into "
         r"a CCDData first"),
        (MISSING, TypeError, r"score must be a 2-D numeric image .* got str; read a FITS"),
    ],
)
def test_find_transients_refuses_what_is_not_an_image(score, error, match):
    with pytest.raises(error, match=match):
        find_transients(score)


def test_constant_score_refused_or_empty():
    """A constant score above the threshold is no significance map (every pixel would be
    a peak: 4096 candidates before); one below it has nothing to find."""
    score = np.full((64, 64), 10.0)
    with pytest.raises(ValueError, match=r"score is constant \(10 in every unmasked pixel\).*"
                                         r"pass the Scorr of a subtraction"):
        find_transients(score)
    np.testing.assert_array_equal(score, 10.0)
    assert len(find_transients(np.zeros((64, 64)), fwhm=2.0)) == 0


def test_constant_score_with_one_masked_outlier_is_refused():
    """The masked pixels do not count: the unmasked ones are constant."""
    score = np.full((64, 64), 7.0)
    score[5, 5] = 50.0
    mask = np.zeros(score.shape, bool)
    mask[5, 5] = True
    with pytest.raises(ValueError, match=r"score is constant \(7 in every unmasked pixel\)"):
        find_transients(score, mask=mask)


@pytest.mark.parametrize("value", [-2, 2.5, np.nan, "3"])
def test_min_separation_must_be_a_whole_non_negative_number(value):
    with pytest.raises(ValueError, match=r"min_separation must be a non-negative whole number "
                                         r"of pixels .* got"):
        find_transients(MISSING, min_separation=value)  # before the score is looked at


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": -2.0}, r"threshold must be a positive number of sigma, got -2"),
        ({"threshold": np.nan}, r"threshold must be a positive number of sigma, got nan"),
        ({"dipole_threshold": -1.0}, r"dipole_threshold must be a positive number, got -1"),
        ({"sharp_threshold": 0.0}, r"sharp_threshold must be a positive number, got 0"),
        ({"chi2_threshold": np.nan}, r"chi2_threshold must be a positive number, got nan"),
        ({"bright_snr": -100.0}, r"bright_snr must be a positive number"),
        ({"mask_radius": -1.0}, r"mask_radius must be a positive number"),
        ({"psf_error": -0.05}, r"psf_error must be a number >= 0, got -0.05"),
        ({"edge_distance": -1.0}, r"edge_distance must be a number >= 0"),
    ],
)
def test_negative_thresholds_refused_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        find_transients(MISSING, **kwargs)


def test_valid_limits_still_find_the_source():
    """Zero edge distance and an infinite bright_snr are allowed and change nothing else."""
    score = _noise_score()
    score[30, 40] = 9.0
    before = score.copy()
    table = find_transients(score, fwhm=2.0, edge_distance=0.0, bright_snr=np.inf,
                            min_separation=np.int64(3))
    assert table["x_peak"].tolist() == [40] and table["y_peak"].tolist() == [30]
    np.testing.assert_array_equal(score, before)


def test_flux_image_checked_before_the_search():
    score = _noise_score()
    with pytest.raises(TypeError, match=r"flux must be a 2-D numeric image .* got PrimaryHDU"):
        find_transients(score, flux=fits.PrimaryHDU(np.zeros((64, 64))))
    with pytest.raises(ValueError, match=r"flux shape \(32, 64\) does not match score"):
        find_transients(score, flux=np.zeros((32, 64)))


def test_mask_as_nested_list():
    """A mask given as a list of lists masks the same pixels as the array."""
    score = _noise_score()
    score[30, 40] = 9.0
    mask = np.zeros(score.shape, bool)
    mask[28:33, 38:43] = True
    assert len(find_transients(score, fwhm=2.0, mask=mask.tolist())) == 0
    assert len(find_transients(score, fwhm=2.0)) == 1


@pytest.mark.parametrize("bad", ["nan", "masked"])
def test_fully_masked_score_refused(bad):
    score = np.full((32, 32), np.nan) if bad == "nan" else _noise_score()[:32, :32]
    mask = None if bad == "nan" else np.ones(score.shape, bool)
    with pytest.raises(ValueError, match=r"score has no finite unmasked pixel \(all NaN or "
                                         r"masked\): there is nothing to search"):
        find_transients(score, mask=mask)


@pytest.mark.parametrize("snr_min", [-20.0, 0.0, np.nan])
def test_bright_sources_snr_min_positive(snr_min):
    image = np.zeros((32, 32))
    with pytest.raises(ValueError, match=r"snr_min must be a positive signal-to-noise ratio"):
        bright_sources((image, image), (image + 1, image + 1), (PSF, PSF), snr_min=snr_min)


@pytest.mark.parametrize("dtype", [">f8", ">f4", ">i4", "<i2"])
def test_big_endian_and_integer_scores(dtype):
    """The byte order and an integer type change nothing; a CCDData score is not mutated."""
    score = _noise_score()
    score[30, 40] = 9.0
    ccd = CCDData(score.astype(dtype), unit="", mask=np.zeros(score.shape, bool))
    before = ccd_state(ccd)
    table = find_transients(ccd, fwhm=2.0)
    assert table["x_peak"].tolist() == [40] and table["y_peak"].tolist() == [30]
    assert table["score"][0] == 9.0
    assert_ccd_unchanged(ccd, before)


@pytest.fixture(scope="module")
def subtraction():
    pair = simulate_pair((192, 192), n_stars=80, flux_range=(5e3, 2e5), seed=1)
    return subtract(pair.reference.ccd, pair.science.ccd)


def test_subtraction_result_find_transients_checks_first(subtraction):
    with pytest.raises(ValueError, match=r"min_separation must be a non-negative whole"):
        subtraction.find_transients(min_separation=-2)
    with pytest.raises(ValueError, match=r"chi2_threshold must be a positive number"):
        subtraction.find_transients(chi2_threshold=-4.0)


# coadd ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, "int16", bool, None, "not a dtype"])
def test_coadd_refuses_non_float_dtype_before_reading(dtype):
    with pytest.raises(TypeError, match=r"dtype must be numpy.float32 or numpy.float64 .*"
                                        r"pass dtype=np.float32 or np.float64"):
        coadd([MISSING, MISSING], dtype=dtype)


def test_accumulator_refuses_non_float_dtype():
    with pytest.raises(TypeError, match=r"dtype must be numpy.float32 or numpy.float64"):
        ProperCoaddAccumulator((16, 16), dtype=np.int32)


@pytest.mark.parametrize("fraction", [2, -0.1, np.nan, "0.5"])
def test_coadd_depth_fraction_in_unit_interval(fraction):
    with pytest.raises(ValueError, match=r"min_depth_fraction must be a fraction of the full "
                                         r"depth in \[0, 1\]"):
        coadd([MISSING, MISSING], min_depth_fraction=fraction)


def test_accumulator_finalize_checks_depth_fraction():
    acc = ProperCoaddAccumulator((16, 16))
    with pytest.raises(ValueError, match=r"min_depth_fraction .* \[0, 1\], got 2"):
        acc.finalize(min_depth_fraction=2)


@pytest.mark.parametrize("images", [[], (), iter([])])
def test_coadd_of_nothing(images):
    with pytest.raises(ValueError, match=r"images is empty: coadd needs at least one image"):
        coadd(images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flux_scales": [1.0, -1.0]}, r"flux_scales\[1\] must be a positive number \(or None "
                                       r"to measure it\), got -1"),
        ({"sigmas": [1.0, np.nan]}, r"sigmas\[1\] must be a positive number .* got nan"),
        ({"psfs": [PSF]}, r"psfs has 1 entries for 2 images: give one per image"),
        ({"border": -1}, r"border must be a non-negative whole number of pixels, got -1"),
        ({"border": 2.5}, r"border must be a non-negative whole number of pixels, got 2.5"),
        ({"border": np.inf}, r"border must be a non-negative whole number of pixels, got inf"),
        ({"flux_scales": ["x", 1.0, 1.0]}, r"flux_scales\[0\] must be a positive number"),
    ],
)
def test_coadd_per_image_options_checked_before_reading(kwargs, match):
    with pytest.raises(ValueError, match=match):
        coadd([MISSING, MISSING], **kwargs)


#: Options `coadd` refuses before any image is read: (options, error class, pattern).
BAD_COADD_OPTIONS = [
    ({"reject": -1.0}, ValueError, r"reject must be a positive threshold in sigma or None, "
                                   r"got -1.0"),
    ({"reject": "6"}, ValueError, r"reject must be a positive threshold .* got '6'"),
    ({"reject_grow": 1.5}, ValueError, r"reject_grow must be a non-negative integer, got 1.5"),
    ({"reject_grow": np.inf}, ValueError, r"reject_grow must be a non-negative integer"),
    ({"reject_model_error": -0.1}, ValueError, r"reject_model_error must be >= 0, got -0.1"),
    ({"align": "sky"}, ValueError, r"align must be False, 'stars' or 'wcs', got 'sky'"),
    ({"saturation": "high"}, ValueError, r"saturation must be one positive finite number"),
    ({"gain": [1.0, "x"]}, ValueError, r"gain\[1\] must be one positive finite number, "
                                       r"got 'x'"),
    ({"gain": -2.0}, ValueError, r"gain must be a positive finite number, got -2.0"),
    ({"psfs": PSF}, TypeError, r"psfs must give one value per image \(a list or array\), got "
                               r"a single ndarray"),
    ({"flux_scales": 1.0}, TypeError, r"flux_scales must give one value per image"),
    ({"psfs": [3.0, -3.0]}, ValueError, r"^psfs\[1\] \(frame.fits\): "),
    ({"unit": "notaunit"}, ValueError, r"unit='notaunit' is not a unit astropy can parse"),
    ({"backend": "torch"}, ValueError, r"backend"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_COADD_OPTIONS)
def test_coadd_options_refused_before_reading(kwargs, error, match):
    with pytest.raises(error, match=match):
        coadd([MISSING, MISSING], **kwargs)


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_COADD_OPTIONS)
def test_check_coadd_options_refuses_what_coadd_refuses(kwargs, error, match):
    """The check the batch and tree functions run before a cluster starts: the options in
    a mapping, the same error as `coadd`'s."""
    options = {"flux_scales": [1.0, 1.0], **kwargs}
    with pytest.raises(error, match=match):
        check_coadd_options(image_names=["frame.fits", "frame.fits"], **options)


def test_check_coadd_options_takes_what_coadd_takes():
    check_coadd_options(**{name: p.default
                           for name, p in inspect.signature(coadd).parameters.items()
                           if p.kind is inspect.Parameter.KEYWORD_ONLY})
    check_coadd_options(psfs=[PSF, 3.0, None], flux_scales=np.array([1.0, 2.0, 0.5]),
                        sigmas=[2.0 * u.adu, None, 1.0], gain=[1.4, None, 2.0],
                        saturation=np.inf, align=True, border=np.int64(4), reject=False,
                        dtype="float64")
    with pytest.raises(TypeError, match=r"coadd\(\) does not take the option\(s\) "
                                        r"'threshold'; it takes dtype"):
        check_coadd_options(threshold=5.0)


def test_coadd_of_mixed_shapes_names_frames_before_any_work(frames):
    small = CCDData(np.zeros((96, 128)), unit="electron")
    before = [ccd_state(f) for f in frames[:2]]
    with pytest.raises(ValueError, match=r"images must be registered frames of one shape, got "
                                         r"image 0 \(128, 128\), image 1 \(128, 128\), image 2 "
                                         r"\(96, 128\): .* or pass align=True"):
        coadd([frames[0], frames[1], small])
    for ccd, snap in zip(frames[:2], before):
        assert_ccd_unchanged(ccd, snap)
    # plain arrays without a unit: the shapes are refused before the missing unit is seen
    with pytest.raises(ValueError, match=r"image 1 \(32, 64\)"):
        coadd([np.zeros((64, 64)), np.zeros((32, 64))])


def _no_reading(*args, **kwargs):
    raise AssertionError("an image was read before the shapes were checked")


def test_coadd_of_fits_files_of_mixed_shapes_fails_before_reading(tmp_path, monkeypatch):
    """The shapes of FITS files come from their headers (the image in an extension too),
    so the odd frame is named with the first one before any image is read."""
    for name, shape in (("a.fits", (64, 64)), ("b.fits", (64, 64))):
        fits.PrimaryHDU(np.zeros(shape, np.float32)).writeto(tmp_path / name)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((48, 64), np.float32))]).writeto(
        tmp_path / "odd.fits")
    monkeypatch.setattr("astro_zackay.coaddition.to_image", _no_reading)
    paths = [tmp_path / "a.fits", tmp_path / "b.fits", tmp_path / "odd.fits"]
    with pytest.raises(ValueError, match=r"images must be registered frames of one shape, got "
                                         r"a.fits \(64, 64\), b.fits \(64, 64\), odd.fits "
                                         r"\(48, 64\): crop or resample .* align=True"):
        coadd(paths, unit="adu")
    # a path of str, an in-memory frame and a missing file (its reader names it later)
    with pytest.raises(ValueError, match=r"image 0 \(64, 64\), odd.fits \(48, 64\)"):
        coadd([np.zeros((64, 64)), MISSING, str(tmp_path / "odd.fits")], unit="adu")


def test_coadd_of_many_files_names_the_first_and_the_odd_ones(tmp_path, monkeypatch):
    paths = []
    for j in range(12):
        paths.append(tmp_path / f"f{j:02d}.fits")
        fits.PrimaryHDU(np.zeros((32, 40 if j == 9 else 32), np.float32)).writeto(paths[-1])
    monkeypatch.setattr("astro_zackay.coaddition.to_image", _no_reading)
    with pytest.raises(ValueError, match=r"got f00.fits \(32, 32\), f09.fits \(32, 40\): "):
        coadd(paths, unit="adu")


def test_coadd_of_a_collection_of_mixed_shapes_fails_before_reading(tmp_path, monkeypatch):
    from ccdproc import ImageFileCollection

    fits.PrimaryHDU(np.zeros((32, 32), np.float32)).writeto(tmp_path / "a.fits")
    fits.PrimaryHDU(np.zeros((30, 32), np.float32)).writeto(tmp_path / "b.fits")
    collection = ImageFileCollection(str(tmp_path))
    monkeypatch.setattr("astro_zackay.coaddition.to_image", _no_reading)
    with pytest.raises(ValueError, match=r"a.fits \(32, 32\), b.fits \(30, 32\)"):
        coadd(collection, unit="adu")


def test_coadd_of_fits_files_of_one_shape_passes_the_check(tmp_path, monkeypatch):
    """Files of one shape (and unreadable ones, left to their reader) are not refused by
    the shape check: the first image is read."""
    fits.PrimaryHDU(np.zeros((32, 32), np.float32)).writeto(tmp_path / "a.fits")
    (tmp_path / "junk.fits").write_bytes(b"not a FITS file")
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("x", "E", array=np.zeros(3))])]).writeto(tmp_path / "table.fits")
    in_memory = fits.HDUList([fits.PrimaryHDU(np.zeros((32, 32), np.float32))])
    monkeypatch.setattr("astro_zackay.coaddition.to_image", _no_reading)
    with pytest.raises(AssertionError, match=r"an image was read before"):
        coadd([tmp_path / "a.fits", tmp_path / "a.fits", tmp_path / "junk.fits",
               tmp_path / "table.fits", in_memory, tmp_path / "absent.fits"], unit="adu")
    # HDUs in memory are checked from their headers too
    odd = fits.ImageHDU(np.zeros((16, 32), np.float32))
    with pytest.raises(ValueError, match=r"a.fits \(32, 32\), image 1 \(32, 32\), image 2 "
                                         r"\(16, 32\): crop"):
        coadd([tmp_path / "a.fits", in_memory, odd], unit="adu")


def test_coadd_of_one_frame_is_that_frame_whitened():
    """One frame's proper coadd: white noise of unit variance, the frame's own depth."""
    sim = simulate_image((128, 128), psf=3.0, n_stars=0, seed=3, subtract_sky=True)
    before = ccd_state(sim.ccd)
    result = _coadd([sim.ccd])
    assert len(result.frames) == 1 and not result.image.mask.any()
    assert abs(mad_std(result.image.data) - 1.0) < 0.05
    sigma = float(result.frames["sigma"][0])
    expected_snr = np.sqrt((PSF**2).sum()) / sigma  # S/N of a unit-flux source
    assert result.snr_full == pytest.approx(expected_snr, rel=1e-3)
    assert_ccd_unchanged(sim.ccd, before)


def test_fully_masked_coadd_warns(frames):
    """Two frames masked on complementary halves: no pixel has the full depth, so a
    min_depth_fraction of 1 masks everything, and says so at the caller's line."""
    half = np.zeros(frames[0].shape, bool)
    half[:, :64] = True
    halves = [CCDData(f.data, unit=f.unit, uncertainty=f.uncertainty, mask=m)
              for f, m in zip(frames[:2], (half, ~half))]
    with pytest.warns(AstroZackayWarning, match=r"every pixel of the coadd is masked "
                                                r"\(min_depth_fraction=1\): .* lower "
                                                r"min_depth_fraction") as record:
        result = _coadd(halves, min_depth_fraction=1.0)
    assert record[0].filename == __file__
    assert result.image.mask.all()
    assert _coadd(halves, min_depth_fraction=0.4).image.mask.mean() < 0.05  # half depth: kept


def test_coadd_of_a_generator_consumes_it_once(frames):
    listed = _coadd(list(frames))
    gen = (f for f in frames)
    streamed = _coadd(gen)
    np.testing.assert_array_equal(streamed.image.data, listed.image.data)
    assert next(gen, None) is None  # consumed


# background -------------------------------------------------------------------------------


@pytest.mark.parametrize("box", [1, 4, 7, (16, 2)])
def test_background_box_too_small(box):
    with pytest.raises(ValueError, match=r"box_size=.* is too small to measure a sky and its "
                                         r"rms: each side needs at least 8 px"):
        estimate_background(MISSING, box_size=box)
    with pytest.raises(ValueError, match=r"box_size=.* is too small"):
        subtract_background(MISSING, box_size=box)


@pytest.mark.parametrize(
    ("filter_size", "match"),
    [
        (2, r"filter_size must be odd \(the median filter has a centre pixel\), got 2"),
        ((3, 4), r"filter_size must be odd"),
        (0, r"filter_size must be a positive integer or a pair of them \(ny, nx\), got 0"),
        (-3, r"filter_size must be a positive integer or a pair of them \(ny, nx\), got -3"),
        ("3", r"filter_size must be a positive integer"),
    ],
)
def test_background_filter_size(filter_size, match):
    with pytest.raises(ValueError, match=match):
        estimate_background(MISSING, filter_size=filter_size)


def test_subtract_background_refuses_wrong_background_first():
    with pytest.raises(TypeError, match=r"background must be a BackgroundResult"):
        subtract_background(MISSING, background=3.0)


@pytest.mark.parametrize("method", ["sep", "photutils"])
def test_smallest_box_measures_the_rms(method):
    """At the smallest box allowed (8 px) the rms of pure noise (sigma 5) is within 3 %."""
    ccd = CCDData(np.random.default_rng(0).normal(100.0, 5.0, (128, 128)), unit="adu")
    before = ccd_state(ccd)
    bkg = estimate_background(ccd, box_size=8, method=method, detect_sources=False)
    assert abs(bkg.global_rms - 5.0) < 0.15
    assert abs(bkg.global_sky - 100.0) < 0.25
    assert_ccd_unchanged(ccd, before)


def test_constant_image_warns_of_zero_rms():
    """A constant image has no sky noise to measure: the rms of 0 comes with a warning
    that points at the caller's line."""
    ccd = CCDData(np.full((64, 64), 100.0), unit="adu")
    with pytest.warns(NoiseEstimateWarning, match=r"background rms is 0 .* in 100% of the "
                                                  r"image: .* mask those pixels") as record:
        bkg = estimate_background(ccd, detect_sources=False)
    assert record[0].filename == __file__
    assert bkg.global_sky == pytest.approx(100.0) and bkg.global_rms == 0.0


def test_image_smaller_than_a_box():
    with pytest.raises(ValueError, match=r"image of shape \(6, 40\) is too small for a "
                                         r"background map: each side needs at least 8 px"):
        estimate_background(np.zeros((6, 40)), unit="adu")


def test_default_box_fits_a_small_image():
    """A 12^2 image (smaller than the default 16 px box) gets one 12 px box."""
    data = np.random.default_rng(2).normal(50.0, 2.0, (12, 12))
    bkg = estimate_background(data, unit="adu", detect_sources=False)
    assert bkg.box_size == (12, 12)
    assert abs(bkg.global_sky - 50.0) < 1.0 and abs(bkg.global_rms - 2.0) < 0.4
