"""Tests of the CCDData boundary (astro_zackay._ccd)."""

import logging

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.nddata import (
    CCDData,
    InverseVariance,
    NDData,
    StdDevUncertainty,
    VarianceUncertainty,
)
from astropy.wcs import WCS

from astro_zackay._ccd import record_step, to_ccddata, to_image


def _wcs(shape):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cdelt = [-1e-4, 1e-4]
    return w


@pytest.fixture
def ccd():
    rng = np.random.default_rng(1)
    data = rng.normal(100.0, 3.0, (20, 30))
    mask = np.zeros(data.shape, bool)
    mask[2, 3] = True
    return CCDData(
        data,
        unit="electron",
        mask=mask,
        uncertainty=StdDevUncertainty(np.full(data.shape, 3.0)),
        wcs=_wcs(data.shape),
        meta={"OBJECT": "field", "GAIN": 2.0},
    )


def test_ccddata_coerces_with_variance_mask_wcs_meta(ccd):
    img = to_image(ccd)
    assert img.data.dtype == np.float64
    assert img.data.dtype.isnative
    np.testing.assert_allclose(img.variance, 9.0)
    assert img.mask[2, 3] and img.mask.sum() == 1
    assert img.unit == u.electron
    assert img.wcs is not None and img.wcs.wcs.crval[0] == 150.0
    assert img.meta["OBJECT"] == "field"
    assert img.gain == 1.0  # data in electrons
    assert not img.variance_estimated


def test_inputs_are_never_mutated(ccd):
    before = ccd.data.copy(), ccd.mask.copy(), ccd.uncertainty.array.copy(), dict(ccd.meta)
    img = to_image(ccd, saturation=100.0)
    img.data[:] = 0
    img.mask[:] = True
    img.variance[:] = 0
    img.meta["NEW"] = 1
    np.testing.assert_array_equal(ccd.data, before[0])
    np.testing.assert_array_equal(ccd.mask, before[1])
    np.testing.assert_array_equal(ccd.uncertainty.array, before[2])
    assert dict(ccd.meta) == before[3]


@pytest.mark.parametrize(
    "uncertainty",
    [
        StdDevUncertainty(np.full((4, 4), 2.0)),
        VarianceUncertainty(np.full((4, 4), 4.0)),
        InverseVariance(np.full((4, 4), 0.25)),
    ],
)
def test_every_uncertainty_class_gives_variance(uncertainty):
    ccd = CCDData(np.zeros((4, 4)), unit="adu", uncertainty=uncertainty)
    np.testing.assert_allclose(to_image(ccd).variance, 4.0)


def test_nddata_array_quantity_inputs():
    data = np.arange(12.0).reshape(3, 4)
    for image, kwargs in [
        (NDData(data, unit="adu"), {}),
        (NDData(data), {"unit": "adu"}),
        (data, {"unit": "adu"}),
        (data * u.adu, {}),
    ]:
        img = to_image(image, uncertainty=StdDevUncertainty(np.ones((3, 4))), **kwargs)
        np.testing.assert_array_equal(img.data, data)
        assert img.unit == u.adu


def test_big_endian_integer_becomes_native_float():
    data = np.arange(16, dtype=">i2").reshape(4, 4)
    img = to_image(data, unit="adu", uncertainty=StdDevUncertainty(np.ones((4, 4))))
    assert img.data.dtype == np.float64 and img.data.dtype.isnative


def test_float32_dtype_is_honoured(ccd):
    img = to_image(ccd, dtype=np.float32)
    assert img.data.dtype == np.float32 and img.variance.dtype == np.float32


def test_nan_inf_and_saturation_are_masked():
    data = np.full((5, 5), 10.0)
    data[0, 0] = np.nan
    data[1, 1] = np.inf
    data[2, 2] = 65535.0
    img = to_image(
        data, unit="adu", saturation=60000, uncertainty=StdDevUncertainty(np.ones_like(data))
    )
    assert img.mask[0, 0] and img.mask[1, 1] and img.mask[2, 2]
    assert img.mask.sum() == 3
    assert img.saturation == 60000


def test_saturation_from_header_keyword():
    header = fits.Header({"SATURATE": 100.0, "BUNIT": "adu"})
    data = np.array([[1.0, 150.0], [99.0, 100.0]])
    img = to_image(fits.PrimaryHDU(data, header=header), uncertainty=StdDevUncertainty(data))
    np.testing.assert_array_equal(img.mask, [[False, True], [False, True]])


def test_saturation_quantity_in_other_unit():
    data = np.array([[1.0, 150.0]])
    img = to_image(
        data,
        unit="adu",
        saturation=100 * u.adu,
        uncertainty=StdDevUncertainty(np.ones_like(data)),
    )
    assert img.mask.tolist() == [[False, True]]
    with pytest.raises(u.UnitsError, match="saturation"):
        to_image(data, unit="adu", saturation=100 * u.m)


def test_user_mask_is_or_combined(ccd):
    extra = np.zeros(ccd.shape, bool)
    extra[5, 5] = True
    img = to_image(ccd, mask=extra)
    assert img.mask[5, 5] and img.mask[2, 3] and img.mask.sum() == 2


def test_variance_estimated_with_logged_notice(caplog):
    rng = np.random.default_rng(3)
    data = rng.normal(0.0, 5.0, (200, 200))
    data[100, 100] = 1000.0
    with caplog.at_level(logging.INFO, logger="astro_zackay._ccd"):
        img = to_image(data, unit="adu")
    assert img.variance_estimated
    assert "no uncertainty" in caplog.text
    np.testing.assert_allclose(np.median(img.variance), 25.0, rtol=0.03)
    # with a gain, source Poisson noise is added on the bright pixel
    img_gain = to_image(data, unit="adu", gain=2.0)
    assert img_gain.variance[100, 100] == pytest.approx(img.variance[100, 100] + 500, rel=0.01)


def test_gain_read_noise_from_header():
    header = {"GAIN": 1.5, "RDNOISE": 7.0}
    img = to_image(CCDData(np.zeros((3, 3)) + 1, unit="adu", meta=header,
                           uncertainty=StdDevUncertainty(np.ones((3, 3)))))
    assert img.gain == 1.5 and img.read_noise == 7.0
    # a keyword argument wins over the header
    img = to_image(CCDData(np.ones((3, 3)), unit="adu", meta=header,
                           uncertainty=StdDevUncertainty(np.ones((3, 3)))), gain=3.0)
    assert img.gain == 3.0


def test_fits_path_and_hdu_inputs(tmp_path, ccd):
    path = tmp_path / "img.fits"
    ccd.write(path)
    img = to_image(path)
    np.testing.assert_array_equal(img.data, ccd.data)
    np.testing.assert_array_equal(img.mask, ccd.mask)
    np.testing.assert_allclose(img.variance, 9.0)
    assert img.wcs is not None
    img_str = to_image(str(path))
    np.testing.assert_array_equal(img_str.data, ccd.data)
    with fits.open(path) as hdul:
        img_hdul = to_image(hdul, uncertainty=StdDevUncertainty(np.ones(ccd.shape)))
        img_hdu = to_image(hdul[0], uncertainty=StdDevUncertainty(np.ones(ccd.shape)))
    np.testing.assert_array_equal(img_hdul.data, ccd.data)
    np.testing.assert_array_equal(img_hdu.data, ccd.data)
    assert img_hdu.wcs is not None


def test_fits_without_bunit_needs_unit(tmp_path):
    path = tmp_path / "nounit.fits"
    fits.PrimaryHDU(np.ones((4, 4))).writeto(path)
    with pytest.raises(ValueError, match="unit='adu'"):
        to_image(path)
    img = to_image(path, unit="adu", uncertainty=StdDevUncertainty(np.ones((4, 4))))
    assert img.unit == u.adu


def test_clear_errors_for_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no FITS file"):
        to_image(tmp_path / "missing.fits", unit="adu")
    with pytest.raises(TypeError, match="cannot use a dict"):
        to_image({"data": 1})
    with pytest.raises(ValueError, match="plain array has no unit"):
        to_image(np.ones((3, 3)))
    with pytest.raises(ValueError, match="2-D"):
        to_image(np.ones(5), unit="adu")
    with pytest.raises(ValueError, match="mask shape"):
        to_image(np.ones((3, 3)), unit="adu", mask=np.zeros((2, 2), bool))
    with pytest.raises(u.UnitsError, match="contradicts"):
        to_image(CCDData(np.ones((3, 3)), unit="adu"), unit="electron")
    with pytest.raises(ValueError, match="gain must be"):
        to_image(np.ones((3, 3)), unit="adu", gain=-1)


def test_output_wrapping_and_fits_round_trip(tmp_path, ccd):
    img = to_image(ccd)
    result_mask = img.mask.copy()
    result_mask[7, 7] = True
    out = to_ccddata(
        img.data * 2,
        img,
        variance=img.variance * 4,
        mask=result_mask,
        step=("AZTEST", "doubled the image"),
    )
    assert out is not ccd and out.unit == u.electron
    np.testing.assert_allclose(out.uncertainty.array, 6.0)
    assert out.meta["AZTEST"] == "doubled the image" and "AZTEST" not in ccd.meta
    path = tmp_path / "out.fits"
    out.write(path)  # no HIERARCH VerifyWarning (warnings are errors in this suite)
    back = CCDData.read(path)
    np.testing.assert_array_equal(back.data, out.data)
    np.testing.assert_array_equal(back.mask, out.mask)
    np.testing.assert_allclose(back.uncertainty.array, out.uncertainty.array)
    assert back.meta["AZTEST"] == "doubled the image"
    assert back.meta["OBJECT"] == "field"
    np.testing.assert_allclose(back.wcs.wcs.crval, ccd.wcs.wcs.crval)


def test_non_finite_results_are_masked(ccd):
    img = to_image(ccd)
    result = img.data.copy()
    result[0, 0] = np.nan
    out = to_ccddata(result, img)
    assert out.mask[0, 0]


def test_record_step_rejects_long_keys():
    with pytest.raises(ValueError, match="at most 8"):
        record_step({}, "AZTOOLONGKEY", "x")


def test_dimensionless_result_reads_back_and_drops_the_input_bunit(tmp_path):
    img = to_image(
        CCDData(np.ones((4, 4)), unit="electron", meta={"BUNIT": "electron"},
                uncertainty=StdDevUncertainty(np.ones((4, 4))))
    )
    out = to_ccddata(np.zeros((4, 4)), img, unit=u.dimensionless_unscaled)
    out.write(tmp_path / "score.fits")
    back = CCDData.read(tmp_path / "score.fits")
    assert back.unit == u.dimensionless_unscaled
    out = to_ccddata(np.zeros((4, 4)), img, unit="adu")
    out.write(tmp_path / "adu.fits")
    assert CCDData.read(tmp_path / "adu.fits").unit == u.adu
