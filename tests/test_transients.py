"""Tests of find_transients."""

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import CCDData
from astropy.table import Table
from astropy.wcs import WCS

from astro_zackay.transients import (
    FLAG_BRIGHT,
    FLAG_DIPOLE,
    FLAG_MASKED,
    FLAG_SHARP,
    bright_sources,
    find_transients,
)


def _gaussian_blob(shape, x0, y0, amplitude, sigma=1.5):
    y, x = np.indices(shape)
    return amplitude * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))


def test_subpixel_positions_and_sorting():
    shape = (64, 64)
    score = _gaussian_blob(shape, 20.3, 30.7, 9.0) - _gaussian_blob(shape, 45.0, 10.0, 12.0)
    table = find_transients(score, threshold=5.0)
    assert len(table) == 2
    # sorted by |score|: the negative (fading) source first
    assert table["score"][0] < -11.9 and table["score"][1] > 8.0
    assert table["x"][1] == pytest.approx(20.3, abs=0.08)
    assert table["y"][1] == pytest.approx(30.7, abs=0.08)


def test_sign_selection_and_threshold():
    score = np.zeros((40, 40))
    score[10, 10] = 7.0
    score[30, 30] = -7.0
    score[20, 5] = 4.9
    assert len(find_transients(score, threshold=5.0)) == 2
    assert find_transients(score, sign="positive")["score"].tolist() == [7.0]
    assert find_transients(score, sign="negative")["score"].tolist() == [-7.0]
    assert len(find_transients(score, threshold=4.8)) == 3


def test_masked_pixels_and_nan_never_detected():
    score = np.zeros((40, 40))
    score[10, 10] = 50.0
    score[20, 20] = np.nan
    mask = np.zeros(score.shape, bool)
    mask[10, 10] = True
    assert len(find_transients(score, mask=mask)) == 0
    ccd = CCDData(score, unit=u.dimensionless_unscaled, mask=mask)
    assert len(find_transients(ccd)) == 0


def test_min_separation_merges_close_peaks():
    score = np.zeros((40, 40))
    score[10, 10] = 8.0
    score[10, 12] = 7.0
    assert len(find_transients(score, min_separation=3)) == 1
    assert len(find_transients(score, min_separation=1)) == 2


def test_flux_columns_and_sky_coordinates():
    score = np.zeros((40, 40))
    score[15, 25] = 10.0
    flux = np.full(score.shape, 200.0)
    flux_err = np.full(score.shape, 20.0)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, -30.0]
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.cdelt = [-1e-4, 1e-4]
    ccd = CCDData(score, unit=u.dimensionless_unscaled, wcs=w)
    table = find_transients(ccd, flux=flux * u.electron, flux_error=flux_err * u.electron)
    assert table["flux"][0] == 200.0 and table["flux"].unit == u.electron
    assert table["snr"][0] == pytest.approx(10.0)
    expected = w.pixel_to_world(25, 15)
    assert table["ra"][0] == pytest.approx(expected.ra.deg)
    assert table["dec"][0] == pytest.approx(expected.dec.deg)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sign"):
        find_transients(np.zeros((5, 5)), sign="up")
    with pytest.raises(ValueError, match="threshold"):
        find_transients(np.zeros((5, 5)), threshold=-1)
    with pytest.raises(ValueError, match="2-D"):
        find_transients(np.zeros(5))
    with pytest.raises(ValueError, match="mask shape"):
        find_transients(np.zeros((5, 5)), mask=np.zeros((3, 3), bool))


def _white_difference(seed=0, shape=(128, 128), sigma=1.5):
    """White unit-noise D with a PSF-shaped source and a one-pixel spike, its PSF and score."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-7:8, -7:8]
    psf = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    psf /= psf.sum()
    difference = rng.normal(size=shape)
    source = np.zeros(shape)
    source[40, 50] = 1.0
    difference += 15.0 / np.sqrt((psf**2).sum()) * ndimage.convolve(source, psf)  # S/N 15
    difference[90, 70] += 25.0  # a cosmic ray: one pixel (score ~9)
    score = ndimage.correlate(difference, psf) / np.sqrt((psf**2).sum())
    return difference, psf, score


def test_psf_fit_tells_a_point_source_from_a_spike():
    difference, psf, score = _white_difference()
    table = find_transients(score, difference=difference, psf=psf)
    assert table.meta["flags_computed"] == ["DIPOLE", "EDGE", "SHARP", "CHI2"]
    source = table[(table["x_peak"] == 50) & (table["y_peak"] == 40)][0]
    spike = table[(table["x_peak"] == 70) & (table["y_peak"] == 90)][0]
    assert source["good"] and source["chi2_dof"] < 2 and abs(source["sharpness"]) < 3
    assert spike["flags"] & FLAG_SHARP and spike["sharpness"] > 8
    assert table.meta["fwhm"] == pytest.approx(2.3548 * 1.5, rel=0.1)
    # a callable PSF gives the same fits
    by_position = find_transients(score, difference=difference, psf=lambda x, y: psf)
    np.testing.assert_allclose(by_position["chi2_dof"], table["chi2_dof"])



def test_psf_fits_of_candidates_together_equal_each_alone(monkeypatch):
    """The candidates' PSF fits, made together (in chunks, grouped by the PSF stamp's
    shape), equal those of each candidate fitted alone: at the border, beside masked
    pixels, with a flux error, and for a PSF whose stamp size changes across the image."""
    from astro_zackay import transients

    difference, psf, score = _white_difference(seed=3)
    difference[40, 53:55] = np.nan  # masked pixels in the source's fit window
    big = np.pad(psf, 2)

    def by_position(x, y):  # two stamp shapes: two groups
        return psf if x < 64 else big

    flux_error = np.sqrt(1.0 + np.abs(difference))
    rows = np.array([40, 90, 0, 127, 64, 5, 100])
    cols = np.array([50, 70, 30, 127, 0, 120, 100])
    x, y = cols + np.linspace(-0.4, 0.4, 7), rows + np.linspace(0.3, -0.3, 7)
    signs = np.where(np.arange(7) % 2 == 0, 1.0, -1.0)
    args = (difference, flux_error, by_position, x, y, rows, cols, signs, 3.5, 0.05)
    monkeypatch.setattr(transients, "_FIT_CHUNK", 3)
    chi2, sharp = transients._psf_fits(*args)
    assert np.all(np.isfinite(chi2)) and np.all(np.isfinite(sharp))
    for i in range(rows.size):
        alone = transients._psf_fits(difference, flux_error, by_position, x[i:i + 1],
                                     y[i:i + 1], rows[i:i + 1], cols[i:i + 1], signs[i:i + 1],
                                     3.5, 0.05)
        np.testing.assert_allclose([alone[0][0], alone[1][0]], [chi2[i], sharp[i]],
                                   rtol=1e-12)
    # a candidate on a masked pixel is not fitted
    masked = transients._psf_fits(difference, None, psf, np.array([53.0]), np.array([40.0]),
                                  np.array([40]), np.array([53]), np.ones(1), 3.5, 0.05)
    assert np.isnan(masked[0][0]) and np.isnan(masked[1][0])

def test_bad_pixels_and_bright_sources_flag_their_neighbours():
    difference, psf, score = _white_difference()
    bad = np.zeros(score.shape, bool)
    bad[43, 52] = True  # 3.6 px from the source: within 2 FWHM
    stars = Table({"x": [58.0, 20.0], "y": [40.0, 20.0], "snr_reference": [500.0, 500.0],
                   "snr_science": [500.0, 50.0]})
    table = find_transients(score, difference=difference, psf=psf, bad_pixels=bad,
                            sources=stars)
    source = table[(table["x_peak"] == 50) & (table["y_peak"] == 40)][0]
    assert source["flags"] == FLAG_MASKED | FLAG_BRIGHT
    # the star at (20, 20) is faint in one image: not a bright star
    quiet = find_transients(score, difference=difference, psf=psf, sources=stars[1:])
    assert quiet[(quiet["x_peak"] == 50) & (quiet["y_peak"] == 40)]["good"][0]


def test_bright_sources_measures_each_image():
    yy, xx = np.mgrid[-7:8, -7:8]
    psf = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    psf /= psf.sum()
    reference, science = np.zeros((64, 64)), np.zeros((64, 64))
    reference[20:35, 25:40] += 1000.0 * psf  # a star at (32, 27) of S/N 1000 * sqrt(sum P^2)
    science[20:35, 25:40] += 200.0 * psf
    table = bright_sources((reference, science), (np.ones((64, 64)),) * 2, (psf, psf))
    assert len(table) == 1 and (table["x"][0], table["y"][0]) == (32, 27)
    norm = np.sqrt((psf**2).sum())
    assert table["snr_reference"][0] == pytest.approx(1000.0 * norm)
    assert table["snr_science"][0] == pytest.approx(200.0 * norm)
    with pytest.raises(ValueError, match="one shape"):
        bright_sources((reference, science[:10]), (np.ones((64, 64)),) * 2, (psf, psf))


def test_bright_sources_in_chunks(monkeypatch):
    """The peaks of the S/N maps are the same whether their windows are gathered at once or
    in chunks of a few pixels."""
    from astro_zackay import transients

    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[-7:8, -7:8]
    psf = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    psf /= psf.sum()
    images = [rng.normal(size=(96, 96)) for _ in range(2)]
    for x, y in rng.integers(10, 86, (12, 2)):
        for image in images:
            image += _gaussian_blob(image.shape, x, y, rng.uniform(50.0, 500.0))
    variances = (np.ones((96, 96)),) * 2
    whole = bright_sources(images, variances, (psf, psf), snr_min=10.0)
    monkeypatch.setattr(transients, "_CHUNK", 5)
    chunked = bright_sources(images, variances, (psf, psf), snr_min=10.0)
    assert len(whole) >= 8
    for name in whole.colnames:
        np.testing.assert_array_equal(chunked[name], whole[name])


def test_a_masked_pixel_is_no_dipole_partner():
    """Only measured score pixels count as the opposite lobe of a dipole."""
    score = np.zeros((40, 40))
    score[20, 20], score[22, 20] = 8.0, -50.0
    mask = np.zeros(score.shape, bool)
    mask[22, 20] = True
    unmasked = find_transients(score, threshold=5.0, fwhm=2.0, sign="positive")
    masked = find_transients(score, threshold=5.0, fwhm=2.0, sign="positive", mask=mask)
    assert unmasked["flags"][0] & FLAG_DIPOLE
    assert not masked["flags"][0] & FLAG_DIPOLE


def test_bright_sources_moves_the_reference_by_the_shift():
    """``shift=`` gives what the reference moved beforehand by a Fourier shift gives."""
    from astro_zackay.fourier import shift_image

    yy, xx = np.mgrid[-7:8, -7:8]
    psf = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    psf /= psf.sum()
    rng = np.random.default_rng(3)
    reference = rng.normal(0.0, 1.0, (96, 128))
    science = rng.normal(0.0, 1.0, (96, 128))
    for x, y, flux in ((30, 40, 3000.0), (90, 60, 800.0), (64, 20, 200.0)):
        reference[y - 7 : y + 8, x - 7 : x + 8] += flux * psf
        science[y - 7 : y + 8, x - 7 : x + 8] += 0.5 * flux * psf
    variances = (np.ones(reference.shape),) * 2
    shift = (2.4, -1.3)
    moved = bright_sources((shift_image(reference, *shift), science), variances, (psf, psf))
    inside = bright_sources((reference, science), variances, (psf, psf), shift=shift)
    assert len(moved) == len(inside) >= 3
    assert inside["x"].tolist() == moved["x"].tolist()
    assert inside["y"].tolist() == moved["y"].tolist()
    np.testing.assert_allclose(inside["snr_reference"], moved["snr_reference"], rtol=1e-4)
    np.testing.assert_allclose(inside["snr_science"], moved["snr_science"], rtol=1e-4)
    # the shifted reference's brightest star lands where its content moved to
    assert (inside["x"][0], inside["y"][0]) == (32, 39)


@pytest.mark.parametrize("chunk", [None, 7])
def test_candidates_are_the_local_maxima_of_the_good_pixels(monkeypatch, chunk):
    """The peaks read from the candidates' windows are those of a full-image maximum filter,
    the windows gathered in one go or in chunks of a few pixels."""
    from scipy import ndimage

    from astro_zackay import transients

    if chunk is not None:
        monkeypatch.setattr(transients, "_CHUNK", chunk)
    rng = np.random.default_rng(5)
    score = ndimage.gaussian_filter(rng.normal(size=(120, 150)), 1.5) * 12.0
    score[0, 40], score[60, -1] = 9.0, -9.0  # peaks on the border
    mask = np.zeros(score.shape, bool)
    mask[30:34, 50:80] = True
    score[70, 20] = np.nan
    for sign, signed in (("both", np.abs(score)), ("positive", score), ("negative", -score)):
        table = find_transients(score, threshold=3.0, mask=mask, sign=sign, fwhm=3.0)
        values = np.where(mask | np.isnan(score), -np.inf, signed)
        peak = values == ndimage.maximum_filter(values, size=7, mode="constant", cval=-np.inf)
        rows, cols = np.nonzero(peak & (values >= 3.0))
        assert len(table) > 10
        assert sorted(zip(table["y_peak"], table["x_peak"])) == sorted(zip(rows, cols))
        assert np.all(np.diff(np.abs(table["score"])) <= 0)


def test_bright_sources_transforms_take_workers(record_transform_workers):
    """The S/N maps' four transforms (two images, their planes forward and back; the
    kernels' spectra are direct DFTs of the stamps) run on ``workers`` threads, with the
    maps of the default threads.
    """
    from astro_zackay.transients import bright_sources

    psf = np.exp(-((np.mgrid[-5:6, -5:6] ** 2).sum(axis=0)) / 4.0)
    psf /= psf.sum()
    image = np.zeros((64, 64))
    image[20:31, 30:41] = 5000 * psf
    args = ((image, image), (np.ones((64, 64)),) * 2, (psf, psf))
    default = bright_sources(*args, shift=(0.4, 0.0))
    threads = record_transform_workers()
    one = bright_sources(*args, shift=(0.4, 0.0), workers=1)
    assert threads == [1] * 4
    assert one.pformat() == default.pformat()


@pytest.mark.parametrize("layout", ["random", "ties", "sorted", "sample_misleads", "odd"])
def test_positive_median_is_numpys_median_of_the_finite_positive_values(layout):
    """The bracketed median (used for the PSF fits' variance scale) equals np.median of
    the finite positive values exactly, whatever the layout, including one whose regular
    sample sees only outliers (the bracket then misses and the plain median is taken)."""
    from astro_zackay._stats import positive_median

    rng = np.random.default_rng(21)
    values = rng.lognormal(size=(1100, 1100)).astype(np.float32)
    values[rng.random(values.shape) < 0.05] = np.nan
    values[rng.random(values.shape) < 0.05] = -1.0
    flat = values.ravel()
    if layout == "ties":
        flat[: flat.size // 2] = 2.5
    elif layout == "sorted":
        flat.sort()
    elif layout == "sample_misleads":
        flat[:: flat.size // 2**16] = 1e6  # exactly what the sample reads
    elif layout == "odd":
        flat[np.flatnonzero(flat > 0)[:1]] = np.nan  # one value fewer
    expected = float(np.median(flat[np.isfinite(flat) & (flat > 0)]))
    assert positive_median(values) == expected
