"""Bad inputs of the held-out check (second part): the KL PSF model's positions and grid,
find_transients' threshold, score and wcs, estimate_psf's options checked before the image
is read."""

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import CCDData
from astropy.table import Table

from astro_zackay.psf import KLPSFModel, estimate_psf
from astro_zackay.psf.model import POSITION_MARGIN
from astro_zackay.transients import find_transients

SHAPE = (200, 100)  # (ny, nx)


@pytest.fixture(scope="module")
def varying() -> KLPSFModel:
    """Two components whose weights change linearly across a 100x200 image."""
    core = np.zeros((2, 7, 7))
    core[0, 3, 3] = 1.0
    core[1, 3, 2:5] = 1.0 / 3
    fields = [[1.0, 0.5, 0.0], [0.5, -0.4, 0.2]]  # terms 1, u, v
    return KLPSFModel(core, fields, image_shape=SHAPE, degree=1, x_0=50.0, y_0=100.0)


@pytest.fixture(scope="module")
def constant() -> KLPSFModel:
    return KLPSFModel(np.full((1, 5, 5), 1 / 25), [[1.0]], image_shape=SHAPE, degree=0)


# --- KLPSFModel positions -------------------------------------------------------------


@pytest.mark.parametrize("xy", [(-1000.0, 50.0), (50.0, 1e6), (1e9, 1e9), (-11.0, -21.0)])
def test_varying_psf_at_far_outside_is_refused(varying, xy):
    assert varying.is_varying
    with pytest.raises(ValueError, match=r"x, y = .* outside the 200x100 image.*x must be in "
                                         r"\[-10, 109\] and y in \[-20, 219\]"):
        varying.psf_at(*xy)


def test_varying_coefficients_far_outside_are_refused(varying):
    with pytest.raises(ValueError, match=r"x, y = \(1e\+09, 1e\+09\) lies outside"):
        varying.coefficients(1e9, 1e9)
    with pytest.raises(ValueError, match=r"\(1 of 3 positions\)"):
        varying.coefficients([10.0, 20.0, 500.0], [10.0, 20.0, 30.0])


def test_varying_within_the_margin_is_evaluated(varying):
    assert varying.position_margin == (POSITION_MARGIN * 100, POSITION_MARGIN * 200)
    psf = varying.psf_at([-10.0, 109.0, 50.0], [-20.0, 219.0, 100.0])
    np.testing.assert_allclose(psf.sum(axis=(1, 2)), 1.0, atol=1e-12)
    assert np.ptp(psf[:, 3, 3]) > 0.01  # it does vary
    assert varying.coefficients(-10.0, 219.0).shape == (2,)


def test_margin_is_at_least_half_the_stamp():
    small = KLPSFModel(np.ones((2, 9, 9)) / 81, [[1.0, 0.1, 0.0], [0.2, 0.0, 0.1]],
                       image_shape=(20, 20), degree=1)
    assert small.position_margin == (4.0, 4.0)
    assert small.psf_at(-4.0, 23.0).shape == (9, 9)
    with pytest.raises(ValueError, match=r"x must be in \[-4, 23\]"):
        small.psf_at(-4.5, 0.0)


def test_model_evaluation_inside_the_image_works(varying):
    """As photutils evaluates it: the model over a grid around (x_0, y_0)."""
    yy, xx = np.mgrid[95:106, 45:56]
    values = varying(xx.astype(float), yy.astype(float))
    np.testing.assert_allclose(values[5, 5], varying.psf_at(50.0, 100.0)[3, 3])
    edge = varying.copy()
    edge.x_0, edge.y_0 = 0.0, 199.0
    assert edge(np.array([0.0]), np.array([199.0]))[0] > 0
    gridded = varying.to_gridded((2, 3))
    assert len(gridded.grid_xypos) == 6


def test_constant_model_accepts_any_finite_position(constant):
    assert not constant.is_varying
    np.testing.assert_array_equal(constant.psf_at(1e6, -1e6), constant.psf_at(50.0, 100.0))
    assert constant.coefficients(1e9, 1e9).tolist() == [1.0]


@pytest.mark.parametrize("xy", [(np.nan, np.nan), (1.0, np.inf), ([1.0, np.nan], [2.0, 3.0])])
def test_non_finite_position_is_refused(varying, constant, xy):
    for model in (varying, constant):
        with pytest.raises(ValueError, match=r"x and y must be finite pixel positions"):
            model.psf_at(*xy)


def test_positions_of_different_lengths_are_refused(varying):
    with pytest.raises(ValueError, match=r"x and y must have the same length.*\(2,\) and \(3,\)"):
        varying.psf_at([1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize(("x", "y", "name"), [("a", 1.0, "x"), (1.0, "b", "y"),
                                              (1.0, [True, False], "y")])
def test_position_that_is_not_a_number_is_refused(varying, x, y, name):
    with pytest.raises(TypeError, match=rf"^{name} must be a real number"):
        varying.psf_at(x, y)


@pytest.mark.parametrize("grid_shape", [(0, 3), (3,), (2.5, 3), 3, (3, -1), "33"])
def test_to_gridded_bad_grid_shape(varying, grid_shape):
    with pytest.raises(ValueError, match=r"grid_shape must be two positive integers"):
        varying.to_gridded(grid_shape)


# --- find_transients ------------------------------------------------------------------


@pytest.fixture(scope="module")
def score() -> np.ndarray:
    data = np.random.default_rng(1).normal(size=(48, 48))
    data[20, 30] = 9.0
    return data


@pytest.mark.parametrize("threshold", ["5", True, np.bool_(True), None, [5.0]])
def test_threshold_that_is_not_a_number(score, threshold):
    with pytest.raises(TypeError, match=r"threshold must be a number of sigma"):
        find_transients(score, threshold=threshold, fwhm=2.0)


def test_threshold_numpy_number_is_accepted(score):
    table = find_transients(score, threshold=np.float32(6.0), fwhm=2.0)
    assert table["x_peak"].tolist() == [30]


def test_boolean_score_is_refused(score):
    with pytest.raises(TypeError, match=r"score is a boolean array"):
        find_transients(score > 0)
    with pytest.raises(TypeError, match=r"flux is a boolean array"):
        find_transients(score, flux=score > 0, fwhm=2.0)


def test_wcs_that_is_not_a_wcs(score):
    with pytest.raises(TypeError, match=r"wcs must be an astropy.wcs.WCS.*got str"):
        find_transients(score, wcs="not a wcs", fwhm=2.0)


@pytest.mark.parametrize("unit", ["electron", "adu", "percent"])
def test_score_with_a_unit_is_refused(score, unit):
    with pytest.raises(u.UnitsError, match=rf"score has the unit {u.Unit(unit)}: a score is in "
                                           "sigma"):
        find_transients(CCDData(score, unit=unit), fwhm=2.0)
    with pytest.raises(u.UnitsError, match=r"score has the unit"):
        find_transients(score * u.Unit(unit), fwhm=2.0)


def test_dimensionless_score_is_accepted(score):
    for given in (CCDData(score, unit=u.dimensionless_unscaled), score * u.one):
        assert find_transients(given, threshold=6.0, fwhm=2.0)["y_peak"].tolist() == [20]


# --- estimate_psf: options checked before the image is read ---------------------------


class _NoImage:
    """Not an image: reaching `to_image` with it raises an error that names no option."""


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"background": "sky"}, TypeError, r"background must be a BackgroundResult"),
    ({"stars": [1, 2, 3]}, TypeError, r"stars must be an astropy Table.*got list"),
    ({"stars": Table({"x": ["a"], "y": [1.0]})}, TypeError, r"the stars' 'x' column"),
    ({"seed": -1}, ValueError, r"seed must be an integer >= 0.*got -1"),
    ({"seed": "1"}, TypeError, r"seed must be an int, None or a numpy Generator, got '1'"),
])
def test_estimate_psf_options_refused_before_reading(kwargs, error, match):
    with pytest.raises(error, match=match):
        estimate_psf(_NoImage(), **kwargs)


def test_estimate_psf_background_of_another_shape_still_refused():
    image = CCDData(np.zeros((40, 40)), unit="electron")
    with pytest.raises(ValueError, match=r"background is a map of shape \(30, 30\)"):
        estimate_psf(image, fwhm=2.0, background=np.zeros((30, 30)))
