"""The noise spectrum (astro_zackay.noise) and ZOGY on images with correlated noise.

Correlated noise is simulated as white noise smoothed by ``[taper, 1, taper]`` along x
and y (as resampling does), scaled to keep the per-pixel variance; its lag-1
correlation along each axis is ``2 taper / (1 + 2 taper**2)``.
"""

import logging
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, StdDevUncertainty
from conftest import data_path
from scipy import ndimage

from astro_zackay import subtract
from astro_zackay._warnings import NoiseEstimateWarning
from astro_zackay.fourier import half_spectrum_sum
from astro_zackay.noise import NoiseSpectrum, measure_noise_spectrum
from astro_zackay.simulation import simulate_pair

SHAPE = (512, 512)


def lag1(taper):
    return 2 * taper / (1 + 2 * taper**2)


def smooth(white, taper):
    """``white`` smoothed by ``[taper, 1, taper]`` along both axes, per-pixel variance kept."""
    k = np.array([taper, 1.0, taper]) / np.sqrt(1 + 2 * taper**2)
    return ndimage.convolve1d(ndimage.convolve1d(white, k, axis=1, mode="wrap"), k, axis=0,
                              mode="wrap")


def robust_std(values):
    q25, q75 = np.percentile(values, [25, 75])
    return (q75 - q25) / 1.349


@pytest.mark.parametrize("taper", [0.0, 0.1, 0.2, 0.3])
def test_measured_lag1_and_spectrum_of_smoothed_noise(taper):
    """Lag-1 within 0.01 of ``2 t / (1 + 2 t**2)``; the spectrum's mean is sigma**2.

    Bright stars in the image are left out by the source mask: with them the measure
    is the same within 0.01.
    """
    rng = np.random.default_rng(7)
    noise = smooth(rng.normal(0.0, 3.0, SHAPE), taper)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    stars = sum(f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
                for x, y, f in zip(*rng.uniform(20, 490, (2, 30)), rng.uniform(50, 500, 30)))
    spectrum = measure_noise_spectrum(noise + stars)
    rx, ry = spectrum.lag1
    assert rx == pytest.approx(lag1(taper), abs=0.01)
    assert ry == pytest.approx(lag1(taper), abs=0.01)
    assert spectrum.sigma == pytest.approx(3.0, rel=0.01)
    assert spectrum.is_correlated == (lag1(taper) > 0.15)
    power = spectrum.spectrum((64, 80), sigma=2.0)
    assert power.shape == (64, 41)
    assert half_spectrum_sum(power, 80) / (64 * 80) == pytest.approx(4.0, rel=0.01)


def test_rms_map_and_mask():
    """A noise level varying by 4x across the image: its rms map gives the correlation back."""
    rng = np.random.default_rng(8)
    rms = np.linspace(1.0, 4.0, SHAPE[1])[None, :] * np.ones(SHAPE)
    noise = smooth(rng.normal(size=SHAPE), 0.2) * rms
    mask = np.zeros(SHAPE, bool)
    mask[100:140, 200:260] = True
    noise[mask] = 1e6  # masked pixels do not enter
    spectrum = measure_noise_spectrum(noise, mask, rms=rms)
    assert spectrum.lag1[0] == pytest.approx(lag1(0.2), abs=0.01)
    assert spectrum.sigma == pytest.approx(np.median(rms[~mask]), rel=0.02)


@pytest.mark.parametrize("shift", [(0.0, 0.0), (2.4, -1.2)])
def test_pair_noise_leaves_out_the_static_sky(shift):
    """Faint static sky (smooth, rms half the noise) in both images: the pair measure ignores it.

    The new image's noise has lag-1 0.37, the reference's is white (both rms 1); measured
    on one image the sky adds 0.05 and 0.12 to the lag-1 and 7-12 % to the rms, the pair
    measure recovers 0.37 and 0 within 0.015 and each noise rms within 1.5 %.
    """
    from astro_zackay.fourier import shift_image
    from astro_zackay.noise import measure_pair_noise

    rng = np.random.default_rng(9)
    sky = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.5, mode="wrap")
    sky *= 0.5 / sky.std()
    ref = sky + rng.normal(0.0, 1.0, SHAPE)
    new = 0.8 * shift_image(sky, *shift) + smooth(rng.normal(0.0, 1.0, SHAPE), 0.2)
    single = measure_noise_spectrum(new)
    assert single.lag1[1] > lag1(0.2) + 0.03
    assert measure_noise_spectrum(ref).lag1[1] > 0.1
    spec_n, spec_r = measure_pair_noise(new, ref, flux_ratio=0.8, shift=shift)
    for rho in spec_n.lag1:
        assert rho == pytest.approx(lag1(0.2), abs=0.015)
    for rho in spec_r.lag1:
        assert rho == pytest.approx(0.0, abs=0.015)
    assert spec_n.sigma == pytest.approx(1.0, rel=0.015)
    assert spec_r.sigma == pytest.approx(1.0, rel=0.015)


def test_pair_sharing_noise_is_measured_image_by_image_with_a_warning():
    """A coadd of three frames against one of them: the two share noise, not sky.

    Their source-free pixels correlate by 1/sqrt(3) = 0.58; taking that common part off
    as sky would leave the coadd a negative variance (its sigma came out NaN and
    `subtract` failed).  Each image is measured alone instead, and the user is told.
    """
    from astro_zackay.noise import SHARED_NOISE_LIMIT, measure_pair_noise

    rng = np.random.default_rng(4)
    frames = rng.normal(0.0, 1.0, (3, *SHAPE))
    coadd = frames.mean(axis=0)
    assert 1 / np.sqrt(3) > SHARED_NOISE_LIMIT
    with pytest.warns(NoiseEstimateWarning, match="share noise.*correlate by 0.5[5-9]"):
        spec_n, spec_r = measure_pair_noise(frames[0], coadd)
    assert spec_n.sigma == pytest.approx(1.0, rel=0.015)
    assert spec_r.sigma == pytest.approx(1 / np.sqrt(3), rel=0.015)


@pytest.mark.parametrize("shift", [(0.0, 0.0), (-3.4, 2.2)])
def test_large_pair_measured_on_a_sample_of_boxes(monkeypatch, shift):
    """Above SAMPLE_PIXELS the measure takes a fixed random sample of boxes, aligned by the
    shift: it counts about the sample's pixels, still recovers lag-1 0.37 and 0 and each
    rms (the static sky, shifted, still left out), and agrees with the whole-image measure
    within its statistical error (~2e-3 for 2.6e5 pixels).
    """
    from astro_zackay import noise
    from astro_zackay.fourier import shift_image

    shape = (1024, 1024)
    rng = np.random.default_rng(11)
    sky = ndimage.gaussian_filter(rng.normal(size=shape), 1.5, mode="wrap")
    sky *= 0.5 / sky.std()
    ref = sky + rng.normal(0.0, 1.0, shape)
    new = 0.8 * shift_image(sky, *shift) + smooth(rng.normal(0.0, 1.0, shape), 0.2)
    whole = noise.measure_pair_noise(new, ref, flux_ratio=0.8, shift=shift)
    monkeypatch.setattr(noise, "SAMPLE_PIXELS", 4 * 256**2)
    sampled = noise.measure_pair_noise(new, ref, flux_ratio=0.8, shift=shift)
    single = noise.measure_noise_spectrum(ref)
    for spectrum, truth in zip((*sampled, single), (lag1(0.2), 0.0, None)):
        assert 0.8 * 4 * 256**2 < spectrum.n_pixels <= 4 * 256**2
        if truth is not None:
            assert spectrum.lag1 == pytest.approx((truth, truth), abs=0.015)
            assert spectrum.sigma == pytest.approx(1.0, rel=0.015)
    assert single.lag1[1] > 0.1  # the shared sky, measured on one image
    for a, b in zip(sampled, whole):
        assert a.lag1 == pytest.approx(b.lag1, abs=0.01)
        assert a.sigma == pytest.approx(b.sigma, rel=0.01)


def test_sampled_sigma_is_scaled_by_the_whole_images_rms(monkeypatch):
    """With an rms map, sigma is the median rms of the whole image (not of the sampled
    boxes) times the rms of ``data / rms``: white noise whose rms rises from 1 to 4 across
    the image gives the whole image's median rms whether sampled or not, alone or paired
    (a zogy tile's sigma is scaled by ``sigma`` over that whole-image median).
    """
    from astro_zackay import noise

    shape = (1024, 1024)
    rng = np.random.default_rng(13)
    rms = np.broadcast_to(1.0 + 3.0 * np.linspace(0.0, 1.0, shape[1]) ** 2, shape)
    new, ref = rms * rng.normal(size=shape), rms * rng.normal(size=shape)
    level = float(np.median(rms))
    monkeypatch.setattr(noise, "SAMPLE_PIXELS", 4 * 256**2)
    single = noise.measure_noise_spectrum(new, rms=rms)
    pair = noise.measure_pair_noise(new, ref, rms_new=rms, rms_ref=rms, shift=(2.3, -1.6))
    for spectrum in (single, *pair):
        assert spectrum.n_pixels <= 4 * 256**2  # sampled
        assert spectrum.sigma == pytest.approx(level, rel=0.01)


def test_sample_boxes_are_drawn_where_both_images_have_data(monkeypatch):
    """Large blank areas (a mosaic's NaN border in one image, a masked band in the other):
    the sampled boxes lie where both have data, so the sample keeps its size and the
    lag-1 correlations (0.37 and 0) are recovered.
    """
    from astro_zackay import noise

    shape = (1024, 1024)
    rng = np.random.default_rng(12)
    new = smooth(rng.normal(0.0, 1.0, shape), 0.2)
    ref = rng.normal(0.0, 1.0, shape)
    new[:, :300] = np.nan
    mask_ref = np.zeros(shape, bool)
    mask_ref[:300] = True
    monkeypatch.setattr(noise, "SAMPLE_PIXELS", 2 * 256**2)
    spectra = noise.measure_pair_noise(new, ref, None, mask_ref)
    for spectrum, truth in zip(spectra, (lag1(0.2), 0.0)):
        assert 0.9 * 2 * 256**2 < spectrum.n_pixels <= 2 * 256**2
        assert spectrum.lag1 == pytest.approx((truth, truth), abs=0.015)


def test_measure_noise_spectrum_errors():
    with pytest.raises(ValueError, match="2-D"):
        measure_noise_spectrum(np.zeros(10))
    with pytest.raises(ValueError, match="mask has shape"):
        measure_noise_spectrum(np.zeros((50, 50)), np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="max_lag"):
        measure_noise_spectrum(np.zeros((50, 50)), max_lag=0)
    with pytest.raises(ValueError, match="source-free pixels"):
        measure_noise_spectrum(np.random.default_rng(0).normal(size=(20, 20)))
    with pytest.raises(ValueError, match="rms must be positive"):
        measure_noise_spectrum(np.zeros((50, 50)), rms=np.zeros((50, 50)))
    assert "lag1=" in repr(NoiseSpectrum(np.eye(3), 1.0, 100))


def correlated_pair(taper, seed):
    """A star pair (FWHM 2.5 / 3.5 px, flux ratio 0.8, shift) with correlated Gaussian noise.

    The noise of each image is that of a Poisson sky + stars + read noise, smoothed by
    the taper kernel; its uncertainty is the per-pixel rms (kept by the smoothing).
    """
    pair = simulate_pair(SHAPE, n_stars=80, flux_range=(1e3, 1e5), flux_ratio=0.8,
                         shift=(0.3, -0.2), noise=False, seed=seed)
    rng = np.random.default_rng(seed)
    images = []
    for image in (pair.reference, pair.science):
        variance = image.ccd.data + image.noise_rms**2 - image.sky
        noise = smooth(rng.normal(size=SHAPE), taper) * np.sqrt(variance)
        images.append(CCDData(image.ccd.data + noise, unit="electron",
                              uncertainty=StdDevUncertainty(np.sqrt(variance))))
    return pair, images


def off_star(pair, result, radius=10):
    """Unmasked pixels farther than ``radius`` px from every star."""
    near = np.zeros(SHAPE, bool)
    t = pair.science.truth
    near[np.clip(np.round(t["y"]).astype(int), 0, SHAPE[0] - 1),
         np.clip(np.round(t["x"]).astype(int), 0, SHAPE[1] - 1)] = True
    near = ndimage.distance_transform_edt(~near) <= radius
    return ~near & ~result.score.mask


@pytest.mark.parametrize("taper", [0.15, 0.3])
def test_subtract_correlated_pair_gives_unit_scorr(taper, caplog):
    """Lag-1 0.28 and 0.51: off-star std(Scorr) = 1 +- 0.02 (1.4-2.0 assuming white noise).

    The measured correlations are logged and recorded in the outputs' meta.
    """
    pair, (ref, sci) = correlated_pair(taper, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with caplog.at_level(logging.INFO, logger="astro_zackay.subtraction"):
            result = subtract(ref, sci)
        white = subtract(ref, sci, noise="white")
    off = off_star(pair, result)
    assert off.mean() > 0.5
    assert abs(np.std(result.score.data[off]) - 1.0) < 0.02
    assert np.std(white.score.data[off & ~white.score.mask]) > 1.3
    for key in ("AZRHOXR", "AZRHOYR", "AZRHOXS", "AZRHOYS"):
        assert result.score.meta[key] == pytest.approx(lag1(taper), abs=0.03)
        assert key not in white.score.meta
    assert "reference image noise: lag-1 correlation" in caplog.text
    assert "spectrum is used" in caplog.text


def test_subtract_white_pair_is_unchanged_by_noise_auto():
    """On white noise noise='auto' measures lag-1 ~ 0 and returns noise='white''s Scorr."""
    pair = simulate_pair((256, 256), n_stars=30, flux_range=(1e3, 1e5), flux_ratio=0.8, seed=2)
    kw = dict(reference_psf=2.5, science_psf=3.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = subtract(pair.reference.ccd, pair.science.ccd, **kw)
        white = subtract(pair.reference.ccd, pair.science.ccd, noise="white", **kw)
    assert abs(auto.score.meta["AZRHOXR"]) < 0.02
    np.testing.assert_array_equal(auto.score.data, white.score.data)


def test_subtract_rejects_bad_noise_options():
    pair = simulate_pair((64, 64), n_stars=0, seed=1)
    with pytest.raises(ValueError, match="noise must be"):
        subtract(pair.reference.ccd, pair.science.ccd, noise="pink")
    with pytest.raises(ValueError, match="psf_error must be"):
        subtract(pair.reference.ccd, pair.science.ccd, psf_error=-0.1)
    with pytest.raises(ValueError, match="psf_error must be"):
        subtract(pair.reference.ccd, pair.science.ccd, psf_error="floor")


# ---------------------------------------------------------------------------
# JWST NIRCam F200W i2d mosaics (resampled: lag-1 ~0.36) with their error maps
# ---------------------------------------------------------------------------
NIRCAM = "nircam-a2744"
NIRCAM_IMAGES = ("01324001001-01324-o001_t001", "02561001002-02561-o001_t003")


def _nircam(kind):
    stem = f"jw{kind}_nircam_clear-f200w_i2d_stamp"
    data = fits.getdata(data_path(NIRCAM, "input_data", f"{stem}.fits")).astype(float)
    err = fits.getdata(data_path(NIRCAM, "auxiliary", f"{stem}.noise.fits")).astype(float)
    psf = fits.getdata(data_path(NIRCAM, "auxiliary", f"{stem}.WebbPSF.fits")).astype(float)
    return CCDData(data, unit="MJy/sr", uncertainty=StdDevUncertainty(err)), psf / psf.sum()


@pytest.mark.realdata
def test_nircam_pair_with_error_maps_scorr_is_calibrated():
    """Off-source robust std(Scorr) within 1 +- 0.1 (1.65 assuming white noise).

    Off-source: unmasked pixels farther than 12 px from any 5-sigma source of either
    image (on the images smoothed by a Gaussian of sigma 2 px).
    """
    (ref, psf_r), (sci, psf_s) = (_nircam(kind) for kind in NIRCAM_IMAGES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = subtract(ref, sci, reference_psf=psf_r, science_psf=psf_s)
    bright = np.zeros(ref.shape, bool)
    for image in (ref, sci):
        smooth_img = ndimage.gaussian_filter(image.data - np.median(image.data), 2.0)
        bright |= smooth_img > 5 * robust_std(smooth_img)
    near = ndimage.distance_transform_edt(~bright) <= 12
    off = ~near & ~result.score.mask
    assert off.mean() > 0.2
    assert abs(robust_std(result.score.data[off]) - 1.0) < 0.1
    for key in ("AZRHOXR", "AZRHOXS"):
        assert 0.25 < result.score.meta[key] < 0.5


# ---------------------------------------------------------------------------
# Scorr's variance for the PSF model's error, end to end
# ---------------------------------------------------------------------------
def test_psf_error_term_removes_bright_star_candidates():
    """Stars up to 1e7 e-: estimated PSFs leave no more 5-sigma candidates than the true ones.

    Without the term (``psf_error=None``) the estimated PSFs left 4-6 on this 512^2 field
    (15-23 per Mpix, as the PSF estimation changed), the true PSFs 0-1; the target is at
    most 1 per Mpix beyond the true PSFs.
    """
    from astro_zackay.simulation import PSFField

    pair = simulate_pair(SHAPE, reference_psf=PSFField(fwhm=2.5), science_psf=PSFField(fwhm=3.5),
                         flux_ratio=0.85, shift=(0.37, -0.21), n_stars=120,
                         flux_range=(1e3, 1e7), flux_distribution="loguniform",
                         min_separation=8.0, seed=0)
    true_psfs = dict(zip(("reference_psf", "science_psf"), pair.true_psf_stamps()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [subtract(pair.reference.ccd, pair.science.ccd, **kw)
                for kw in ({}, true_psfs, {"psf_error": None})]
    estimated, true, without = (len(r.find_transients(threshold=5.0)) for r in runs)
    assert without > estimated  # the field needs the term: 4 without it, 0 with it, here
    mpix = SHAPE[0] * SHAPE[1] / 1e6
    assert (estimated - true) / mpix <= 1.0


def test_subtract_small_image_assumes_white_noise_announced():
    """Too few source-free pixels to measure the correlation: white noise, with a warning."""
    pair = simulate_pair((30, 30), n_stars=0, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = subtract(pair.reference.ccd, pair.science.ccd, reference_psf=2.5,
                          science_psf=3.5, flux_ratio=1.0, fit_shift=False)
    texts = [str(w.message) for w in caught if w.category is NoiseEstimateWarning]
    assert any(t.startswith("the noise correlation cannot be measured (only ")
               and "white noise is assumed" in t and "noise='white'" in t for t in texts)
    assert not any("source_sigma" in t for t in texts)
    assert "AZRHOXR" not in result.score.meta


def test_source_smoothing_is_the_direct_convolution_over_good_pixels():
    """The FFT smoothing and the sparse weight equal a direct Gaussian convolution."""
    from astro_zackay.noise import _smoothed, _smoothing_kernel

    rng = np.random.default_rng(4)
    good = rng.random((200, 260)) > 0.003  # scattered bad pixels
    good[80:95, 40:75] = False  # a masked block
    good[0, :6] = good[:, -1] = False  # bad pixels on the border
    x = np.where(good, rng.normal(size=good.shape), 0.0).astype(np.float32)
    kernel = _smoothing_kernel()

    def direct(image):
        along_y = ndimage.correlate1d(image.astype(float), kernel, axis=0, mode="constant")
        return ndimage.correlate1d(along_y, kernel, axis=1, mode="constant")

    weight = direct(good)
    expected = np.where(weight > 0.5, direct(x) / np.where(weight > 0.5, weight, 1.0), 0.0)
    (smooth,) = _smoothed([x], [good])
    np.testing.assert_allclose(smooth, expected, atol=1e-5)
    assert np.all(smooth[84:91, 47:68] == 0.0)  # deep in the block: no weight


def test_pair_noise_transforms_take_workers(record_transform_workers):
    """The pair measure's three transforms (smoothing forth and back, the covariances)
    run on ``workers`` threads, with the spectra of the default threads.
    """
    from astro_zackay.noise import measure_pair_noise

    rng = np.random.default_rng(3)
    new, ref = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    default = measure_pair_noise(new, ref, shift=(1.2, -0.4))
    threads = record_transform_workers()
    one = measure_pair_noise(new, ref, shift=(1.2, -0.4), workers=1)
    assert threads == [1] * 3
    for a, b in zip(one, default):
        np.testing.assert_array_equal(a.correlation, b.correlation)
