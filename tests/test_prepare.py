"""Tests of astro_zackay._prepare: the preparation shared by subtraction and coaddition."""

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import CCDData

from astro_zackay import _prepare
from astro_zackay._ccd import to_image
from astro_zackay._prepare import prepare_image


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return to_image(CCDData(100.0 + rng.normal(0.0, 2.0, (128, 128)), unit="electron"))


@pytest.mark.parametrize(
    ("sigma", "error", "match"),
    [
        (0.0, ValueError, "image 0: the background noise must be positive, got 0.0"),
        (-1.0, ValueError, "must be positive"),
        (np.nan, ValueError, "must be positive, got nan"),
        (np.inf * u.electron, ValueError, "must be positive, got inf"),
        (2.0 * u.adu, u.UnitConversionError, r"image 0: sigma=.* not in a unit of the image"),
    ],
)
def test_bad_given_sigma_rejected_before_any_work(monkeypatch, sigma, error, match):
    """A bad ``sigma`` is refused before the background is estimated and the image's
    data are changed."""

    def no_background(*args, **kwargs):
        raise AssertionError("the background was estimated")

    monkeypatch.setattr(_prepare, "_estimate_from", no_background)
    img = _image()
    before = img.data.copy()
    with pytest.raises(error, match=match):
        prepare_image(img, 3.0, name="image 0", option="psfs=", need_stars=False, sigma=sigma)
    np.testing.assert_array_equal(img.data, before)


def test_given_sigma_converted():
    prep = prepare_image(_image(), 3.0, name="image 0", option="psfs=", need_stars=False,
                         sigma=2000.0 * u.Unit("0.001 electron"))
    assert prep.sigma == pytest.approx(2.0)


def test_cached_sky_maps_dropped_after_subtraction():
    """The sky maps cached at coercion are of the original pixels: the prepared image,
    whose data are background-subtracted in place, does not carry them."""
    img = _image()
    assert img.sky_maps is not None and img.sky_maps.matches(img, img.sky_maps.box)
    prep = prepare_image(img, 3.0, name="image 0", option="psfs=", need_stars=False)
    assert prep.data is img.data
    assert prep.image.sky_maps is None
