"""Tests of astro_zackay.background against simulated truth."""

import dataclasses
import pickle

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import CCDData

from astro_zackay import background as bg_module
from astro_zackay._ccd import to_image
from astro_zackay.background import (
    BackgroundResult,
    _detect_sources,
    estimate_background,
    subtract_background,
)
from astro_zackay.simulation import simulate_image

SHAPE = (1024, 1024)
GRADIENT = 100.0  # e- across the image, added to the simulated sky


@pytest.fixture(scope="module")
def crowded():
    """A crowded-ish field: 1500 stars on 1 Mpix, sky 200 e-, read noise 5 e-."""
    return simulate_image(SHAPE, psf=3.0, n_stars=1500, sky=200.0, read_noise=5.0, seed=11)


@pytest.fixture(scope="module")
def gradient(crowded):
    """The crowded field plus a linear sky gradient along x; returns (ccd, true sky map)."""
    ramp = GRADIENT * (np.arange(SHAPE[1]) / SHAPE[1] - 0.5)
    ccd = crowded.ccd.copy()
    ccd.data = ccd.data + ramp[None, :]
    return ccd, crowded.sky + np.broadcast_to(ramp, SHAPE)


@pytest.mark.parametrize("method", ["sep", "photutils"])
def test_crowded_field_sky_and_rms(crowded, method):
    bkg = estimate_background(crowded.ccd, method=method)
    assert bkg.method == method
    # rms within 2 % of the true background noise sqrt(sky + rn**2)
    assert abs(np.median(bkg.rms.data) / crowded.noise_rms - 1) < 0.02
    assert abs(bkg.global_rms / crowded.noise_rms - 1) < 0.02
    # sky within 5 % of the noise (measured: -2 %, the mode estimator on Poisson sky)
    assert abs(np.median(bkg.sky.data) - crowded.sky) < 0.05 * crowded.noise_rms
    assert abs(bkg.global_sky - crowded.sky) < 0.05 * crowded.noise_rms
    assert np.percentile(np.abs(bkg.sky.data - crowded.sky), 99) < 0.2 * crowded.noise_rms
    assert bkg.sky.unit == u.electron and bkg.rms.unit == u.electron


def test_source_masking_reduces_sky_bias(crowded):
    with_sources = estimate_background(crowded.ccd, detect_sources=False)
    masked = estimate_background(crowded.ccd)
    assert masked.masked_fraction > with_sources.masked_fraction
    # stars raise an unmasked estimate; masking them brings it closer to the truth
    assert masked.global_sky < with_sources.global_sky


@pytest.mark.parametrize("method", ["sep", "photutils"])
def test_sky_gradient(gradient, crowded, method):
    ccd, true_sky = gradient
    bkg = estimate_background(ccd, method=method)
    err = bkg.sky.data - true_sky
    inner = err[:, 64:-64]  # photutils holds the edge boxes' value instead of extrapolating
    assert abs(np.median(inner)) < 0.05 * crowded.noise_rms
    assert np.percentile(np.abs(inner), 99) < 0.15 * crowded.noise_rms
    assert abs(np.median(bkg.rms.data) / crowded.noise_rms - 1) < 0.02
    if method == "sep":  # sep extrapolates the gradient to the edges
        assert np.percentile(np.abs(err), 99) < 0.15 * crowded.noise_rms


def test_mask_respected(crowded):
    ccd = crowded.ccd.copy()
    blob = np.zeros(SHAPE, dtype=bool)
    blob[300:600, 300:600] = True
    ccd.data = np.where(blob, ccd.data + 5000.0, ccd.data)
    masked = estimate_background(ccd, mask=blob)
    outside = ~blob
    truth = crowded.sky
    assert abs(np.median(masked.sky.data[outside]) - truth) < 0.05 * crowded.noise_rms
    # the sky under the blob is interpolated from its surroundings
    assert abs(np.median(masked.sky.data[blob]) - truth) < 0.1 * crowded.noise_rms
    assert masked.masked_fraction >= blob.mean()
    # the same blob unmasked biases the sky: the test above can fail
    unmasked = estimate_background(ccd, detect_sources=False)
    assert np.median(unmasked.sky.data[blob]) - truth > 100.0


def test_subtract_background_preserves_and_does_not_mutate(crowded):
    ccd = crowded.ccd
    before = ccd.data.copy(), ccd.uncertainty.array.copy(), dict(ccd.meta)
    out = subtract_background(ccd)
    assert isinstance(out, CCDData) and out is not ccd
    np.testing.assert_array_equal(ccd.data, before[0])
    np.testing.assert_array_equal(ccd.uncertainty.array, before[1])
    assert dict(ccd.meta) == before[2] and "AZBKG" not in ccd.meta
    np.testing.assert_allclose(out.uncertainty.array, ccd.uncertainty.array)
    assert out.wcs is not None and out.wcs.to_header() == ccd.wcs.to_header()
    assert out.meta["RDNOISE"] == ccd.meta["RDNOISE"]
    assert out.meta["AZBKG"].startswith("subtracted sep background")
    assert out.unit == ccd.unit
    assert abs(np.median(out.data[~out.mask])) < 0.1 * crowded.noise_rms + 2.0
    # the residual sky level of empty sky is near zero: compare with the known sky
    resid = out.data - (ccd.data - crowded.sky)
    assert abs(np.median(resid)) < 0.05 * crowded.noise_rms


def test_result_subtract_and_repr(crowded):
    bkg = estimate_background(crowded.ccd)
    out = bkg.subtract(crowded.ccd)
    np.testing.assert_allclose(out.data, crowded.ccd.data - bkg.sky.data)
    text = repr(bkg)
    assert text.startswith("<BackgroundResult 1024x1024 method='sep'") and "global_rms=" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        bkg.method = "photutils"
    with pytest.raises(ValueError, match="shape"):
        bkg.subtract(np.zeros((10, 10)), unit="electron")
    with pytest.raises(u.UnitsError, match="not compatible"):
        bkg.subtract(crowded.ccd.data, unit="adu")
    with pytest.raises(TypeError, match="BackgroundResult"):
        subtract_background(crowded.ccd, background=3.0)


def test_result_pickles():
    """The result is a plain record: it pickles (no detection or weak reference in it)."""
    rng = np.random.default_rng(3)
    bkg = estimate_background(rng.normal(100.0, 5.0, (128, 128)), unit="electron")
    back = pickle.loads(pickle.dumps(bkg))
    for field in dataclasses.fields(BackgroundResult):
        value, other = getattr(bkg, field.name), getattr(back, field.name)
        if isinstance(value, CCDData):
            np.testing.assert_array_equal(other.data, value.data)
            np.testing.assert_array_equal(other.mask, value.mask)
            assert other.unit == value.unit and other.meta == value.meta
        else:
            assert other == value
    assert repr(back) == repr(bkg)


def test_unit_conversion_in_subtract(crowded):
    bkg = estimate_background(crowded.ccd)
    kilo = crowded.ccd.data / 1000.0
    out = bkg.subtract(kilo, unit=u.Unit("1000 electron"))
    # the sky map is float32 (sep's own precision): converted in float64, like the data
    np.testing.assert_allclose(out.data, kilo - bkg.sky.data.astype(np.float64) / 1000.0)


def test_fits_path_and_ndarray_inputs(tmp_path):
    sim = simulate_image((256, 256), psf=3.0, n_stars=40, seed=2)
    path = tmp_path / "image.fits"
    sim.ccd.write(path)
    from_path = estimate_background(path)
    from_array = estimate_background(np.asarray(sim.ccd.data), unit="electron")
    assert isinstance(from_path, BackgroundResult)
    assert from_path.box_size == (32, 32)
    np.testing.assert_allclose(from_path.sky.data, from_array.sky.data, rtol=1e-6)
    out = subtract_background(path)
    assert out.meta["AZBKG"].startswith("subtracted")
    with pytest.raises(ValueError, match="unit"):
        estimate_background(np.asarray(sim.ccd.data))


def test_saturation_masks_pixels():
    rng = np.random.default_rng(4)
    data = rng.normal(100.0, 5.0, (128, 128))
    data[40:60, 40:60] = 1000.0
    bkg = estimate_background(data, unit="adu", saturation=900.0, detect_sources=False)
    assert abs(np.median(bkg.sky.data[40:60, 40:60]) - 100.0) < 1.0


def _all_but_corner() -> np.ndarray:
    """A 64x64 mask leaving 5x5 pixels: enough to coerce, fewer than one 16x16 box."""
    mask = np.ones((64, 64), bool)
    mask[:5, :5] = False
    return mask


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "median"}, "method must be one of"),
        ({"filter_size": 2}, "filter_size must be odd"),
        ({"box_size": 0}, "box_size must be a positive integer"),
        ({"box_size": 500}, "larger than the image"),
        ({"mask": _all_but_corner()}, "only 25 unmasked pixels, fewer than one 16x16 box"),
    ],
)
def test_errors(kwargs, match):
    data = np.random.default_rng(0).normal(10.0, 1.0, (64, 64))
    with pytest.raises(ValueError, match=match):
        estimate_background(data, unit="adu", **kwargs)


def test_overflowing_detection_in_strips_without_global_settings():
    """A source too large for sep's pixel buffer (300 000 pixels above the threshold by
    default; this disk holds 320 000) is detected in strips: every star, also those on
    the strips' cuts (rows 256 and 512), found once and in place, the whole disk among
    the strong sources' pixels, and sep's process-wide settings left as they were."""
    import sep

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:1024, :1024]
    disk = np.hypot(xx - 512, yy - 512) < 320
    data = rng.normal(0.0, 1.0, (1024, 1024)) + 10.0 * disk
    stars = [(60, 60), (960, 60), (60, 512), (960, 511.5), (80, 256.5), (930, 768.5),
             (100, 900), (900, 960)]
    for x, y in stars:
        data += 500.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
    settings = sep.get_extract_pixstack(), sep.get_sub_object_limit()
    with pytest.raises(Exception, match="pixel buffer full"):  # sep alone cannot
        sep.extract(data, 3.0, err=np.ones_like(data), minarea=5)
    img = to_image(data, unit="electron", saturation=np.inf)
    detection, strong = _detect_sources(img, data, np.ones(data.shape), strong=5.0)
    assert (sep.get_extract_pixstack(), sep.get_sub_object_limit()) == settings
    assert detection.of(img)
    objects = detection.objects
    for x, y in stars:
        near = np.hypot(objects["x"] - x, objects["y"] - y)
        assert np.sum(near < 2.0) == 1 and near.min() < 0.2
    assert strong[disk].mean() > 0.99 and strong[~disk].mean() < 0.01


def test_options_checked_once(monkeypatch):
    """estimate_background checks its options once, before the image is coerced."""
    calls = []
    check = bg_module._check_options

    def counting(*args):
        calls.append(args)
        return check(*args)

    monkeypatch.setattr(bg_module, "_check_options", counting)
    data = np.random.default_rng(5).normal(10.0, 1.0, (64, 64))
    estimate_background(data, unit="adu", box_size=16)
    assert calls == [(16, 3, "auto")]


@pytest.mark.parametrize("factor", [1e19, 1e-19, 2.0**80])
def test_any_unit_scale_gives_the_same_background(factor):
    # sep works in float32 and squares the pixels: at ~1e19 its rms came 7-32 % off
    # and it detected nothing; the data is now rescaled by a power of two around sep
    data = simulate_image((128, 128), psf=3.0, n_stars=30, flux_range=(2e3, 5e4),
                          seed=4).ccd.data
    plain = estimate_background(CCDData(data, unit="MJy/sr"))
    scaled = estimate_background(CCDData(data * factor, unit="MJy/sr"))
    if np.log2(factor).is_integer():  # a power of two: exactly the same maps
        assert np.array_equal(scaled.sky.data, plain.sky.data * np.float32(factor))
        assert np.array_equal(scaled.rms.data, plain.rms.data * np.float32(factor))
    else:  # the data differ by float rounding only
        rms = plain.rms.data.astype(float)
        np.testing.assert_allclose(scaled.rms.data / factor, rms, rtol=1e-5)
        np.testing.assert_allclose(scaled.sky.data / factor, plain.sky.data,
                                   atol=1e-4 * float(np.mean(rms)))
