"""Images in different units: `astro_zackay._ccd.match_unit` and `subtract` with mixed units.

The simulated pairs are made in ADU with a known gain, and one image is put into
electrons by that gain, so the truth of each conversion is known exactly.
"""

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import CCDData, StdDevUncertainty

from astro_zackay import subtract
from astro_zackay._ccd import match_unit, to_image
from astro_zackay._warnings import UnitConversionWarning
from astro_zackay.simulation import simulate_pair

GAIN = 1.4  # e-/ADU of the simulated pairs
BETA = 0.9  # their science / reference flux ratio


@pytest.fixture(scope="module")
def pair():
    return simulate_pair((384, 384), n_stars=150, flux_range=(2e3, 2e5), flux_ratio=BETA,
                         gain=GAIN, seed=3)


def _in_electrons(ccd):
    """The ADU image ``ccd`` in electrons (data and uncertainty times the gain)."""
    return CCDData(ccd.data * GAIN, unit="electron", wcs=ccd.wcs, meta={},
                   uncertainty=StdDevUncertainty(ccd.uncertainty.array * GAIN))


def _in_adu(ccd, meta=None):
    """The ADU image ``ccd`` as it is, with ``meta`` (no GAIN keyword by default)."""
    return CCDData(ccd.data, unit="adu", wcs=ccd.wcs, meta=meta or {},
                   uncertainty=StdDevUncertainty(ccd.uncertainty.array))


def _image(unit="adu", meta=None, value=10.0):
    return to_image(CCDData(np.full((16, 16), value), unit=unit, meta=meta or {},
                            uncertainty=StdDevUncertainty(np.full((16, 16), 2.0))),
                    saturation=100.0)


def test_match_unit_converts_everything_in_data_units():
    img = _image()
    before = img.data.copy(), img.variance.copy()
    out = match_unit(img, u.electron, gain=GAIN, name="science image", target="reference image")
    np.testing.assert_allclose(out.data, 10.0 * GAIN)
    np.testing.assert_allclose(out.variance, 4.0 * GAIN**2)
    assert out.unit == u.electron and out.gain == 1.0
    assert out.saturation == pytest.approx(100.0 * GAIN)
    assert "adu -> electron" in out.meta["AZUNIT"] and "gain 1.4" in out.meta["AZUNIT"]
    # the input is untouched
    np.testing.assert_array_equal(img.data, before[0])
    np.testing.assert_array_equal(img.variance, before[1])
    assert img.unit == u.adu and "AZUNIT" not in img.meta


def test_match_unit_back_to_adu_and_identity():
    electrons = _image("electron", meta={"EGAIN": 2.0}, value=20.0)
    with pytest.warns(UnitConversionWarning, match=r"the reference is in adu and the science "
                                                   r"image in electron: the conversion uses the "
                                                   r"science image's gain keyword \(2 e-/ADU\) "
                                                   r"as the gain of the reference's ADU; pass "
                                                   r"gain=") as caught:
        out = match_unit(electrons, u.adu, gain=None, name="science image", target="reference")
    assert [w.filename for w in caught] == [__file__]
    np.testing.assert_allclose(out.data, 10.0)  # the EGAIN keyword: 20 e- = 10 ADU
    assert out.gain == pytest.approx(2.0)  # e- per ADU again
    assert match_unit(electrons, u.electron, gain=None, name="a", target="b") is electrons
    kilo = match_unit(electrons, u.Unit("1000 electron"), gain=None, name="a", target="b")
    np.testing.assert_allclose(kilo.data, 0.02)  # a scale: no gain needed


def test_match_unit_count_rate_needs_an_exposure_time():
    img = _image(meta={"GAIN": 2.0, "EXPTIME": 40.0})
    rate = match_unit(img, u.electron / u.s, gain=None, name="science image", target="ref")
    np.testing.assert_allclose(rate.data, 10.0 * 2.0 / 40.0)
    with pytest.raises(u.UnitsError, match="exposure time"):
        match_unit(_image(meta={"GAIN": 2.0}), u.electron / u.s, gain=None, name="a",
                   target="b")


def test_match_unit_errors_name_both_units_and_the_gain_option():
    with pytest.raises(u.UnitsError, match=r"science image is in adu.*reference image in "
                                           r"electron.*gain="):
        match_unit(_image(), u.electron, gain=None, name="science image",
                   target="reference image")
    with pytest.raises(u.UnitsError, match="no conversion"):
        match_unit(_image(), u.Jy, gain=GAIN, name="science image", target="reference image")


def test_electron_data_have_gain_one_whatever_gain_is_given():
    # one gain for a pair in which only the other image is in ADU
    img = to_image(np.ones((8, 8)), unit="electron", gain=GAIN, saturation=np.inf)
    assert img.gain == 1.0


@pytest.fixture(scope="module")
def same_unit(pair):
    return subtract(_in_electrons(pair.reference.ccd), _in_electrons(pair.science.ccd))


@pytest.mark.parametrize("how", ["gain", "pair", "keyword"])
def test_subtract_converts_the_science_image_to_the_reference_unit(pair, same_unit, how):
    """Reference in electrons, science in ADU: the flux ratio is that of both in electrons."""
    meta = {"GAIN": GAIN} if how == "keyword" else None
    gain = {"gain": GAIN, "pair": (None, GAIN), "keyword": None}[how]
    result = subtract(_in_electrons(pair.reference.ccd), _in_adu(pair.science.ccd, meta),
                      gain=gain)
    # equal but for float32 rounding (the stamps' and the ZOGY core's transforms round at
    # ~1e-7 relative, and scaling by the gain changes the rounding): a unit or gain error
    # would be a factor 1.4
    assert result.flux_ratio == pytest.approx(same_unit.flux_ratio, rel=1e-6)
    assert abs(result.flux_ratio - BETA) < 3 * result.flux_ratio_error < 0.02
    assert result.flux.unit == u.electron
    assert result.score.meta["AZUNIT"].startswith("science image: adu -> electron x1.4")


def test_subtract_converts_an_electron_science_image_to_adu(pair):
    """Reference in ADU: the reference's gain converts the science image to ADU."""
    result = subtract(_in_adu(pair.reference.ccd), _in_electrons(pair.science.ccd),
                      gain=(GAIN, None))
    assert abs(result.flux_ratio - BETA) < 3 * result.flux_ratio_error < 0.02
    assert result.flux.unit == u.adu


def test_subtract_without_a_gain_raises_before_any_fit(pair):
    with pytest.raises(u.UnitsError, match=r"adu.*electron.*gain="):
        subtract(_in_electrons(pair.reference.ccd), _in_adu(pair.science.ccd))
