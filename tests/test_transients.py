"""Tests of find_transients."""

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import CCDData
from astropy.wcs import WCS

from astro_zackay.transients import find_transients


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
