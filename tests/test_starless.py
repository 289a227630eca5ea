"""Paths without stars, and the warning about missing source noise.

A star-free pair with its PSFs and flux ratio given must subtract: the shift cannot
be fitted, so it comes from the WCSs (0 without them), announced. An image in ADU
without a gain or an uncertainty has no source noise in its variance, which
`subtract` must say once per image.
"""

import warnings

import numpy as np
import pytest
from astropy.nddata import CCDData
from conftest import record_warnings

from astro_zackay import subtract
from astro_zackay._warnings import FewStarsWarning, NoiseEstimateWarning
from astro_zackay.simulation import simulate_pair

SHIFT = (0.3, -0.2)


def _starless(wcs):
    pair = simulate_pair((256, 256), n_stars=0, flux_ratio=0.9, shift=SHIFT, wcs=wcs, seed=1)
    return lambda: subtract(pair.reference.ccd, pair.science.ccd, reference_psf=2.5,
                            science_psf=3.5, flux_ratio=0.9)


@pytest.mark.parametrize("wcs", [True, False])
def test_star_free_pair_subtracts_with_the_shift_from_the_wcs(wcs):
    result, caught = record_warnings(_starless(wcs))
    expected = SHIFT if wcs else (0.0, 0.0)
    np.testing.assert_allclose(result.shift, expected, atol=1e-6)
    messages = [str(w.message) for w in caught if issubclass(w.category, FewStarsWarning)]
    assert any("shift cannot be fitted" in m for m in messages), messages
    assert all("snr_min" not in m for m in messages)
    score = result.score.data[~result.score.mask]
    assert score.size > 0.8 * result.score.data.size
    assert np.std(score) == pytest.approx(1.0, abs=0.03)  # a pure-noise pair: unit Scorr


def test_star_free_pair_without_flux_ratio_names_the_options():
    pair = simulate_pair((256, 256), n_stars=0, seed=1)
    with pytest.raises(ValueError, match="pass flux_ratio=") as info, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FewStarsWarning)
        subtract(pair.reference.ccd, pair.science.ccd, reference_psf=2.5, science_psf=3.5)
    assert "snr_min" not in str(info.value)


def _adu(ccd):
    """The simulated ADU image without its uncertainty and its GAIN keyword."""
    return CCDData(ccd.data, unit="adu", wcs=ccd.wcs)


@pytest.fixture(scope="module")
def adu_pair():
    return simulate_pair((256, 256), n_stars=40, flux_range=(5e3, 2e5), gain=2.0, seed=5)


def test_missing_source_noise_is_announced_once_per_image(adu_pair):
    ref, sci = _adu(adu_pair.reference.ccd), _adu(adu_pair.science.ccd)
    _, caught = record_warnings(lambda: subtract(ref, sci))
    messages = [str(w.message) for w in caught if issubclass(w.category, NoiseEstimateWarning)]
    assert sorted(m.split(":")[0] for m in messages) == ["reference image", "science image"]
    assert all("gain=" in m and "uncertainty" in m for m in messages)
    # a gain (or an uncertainty) gives the source noise: no warning
    _, caught = record_warnings(lambda: subtract(ref, sci, gain=2.0))
    assert not [w for w in caught if issubclass(w.category, NoiseEstimateWarning)]
    _, caught = record_warnings(lambda: subtract(adu_pair.reference.ccd, adu_pair.science.ccd))
    assert not [w for w in caught if issubclass(w.category, NoiseEstimateWarning)]
