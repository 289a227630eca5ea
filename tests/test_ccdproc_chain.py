"""A ccdproc reduction chained into astro_zackay: units, uncertainties and history survive."""

import ccdproc
import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import CCDData
from astropy.stats import mad_std
from astropy.table import Table

from astro_zackay import find_psf_stars, subtract
from astro_zackay.simulation import simulate_pair

GAIN = 1.6 * u.electron / u.adu
READ_NOISE = 6.0 * u.electron
BIAS_LEVEL = 1000.0


def _raw(ccd_electrons: CCDData) -> CCDData:
    """What the camera wrote: ADU on a bias level, no uncertainty, no unit in the header."""
    adu = ccd_electrons.data / GAIN.value + BIAS_LEVEL
    return CCDData(np.round(adu), unit="adu", meta={"EXPTIME": 60.0})


@pytest.fixture(scope="module")
def reduced_pair():
    transient = Table({"x": [300.3], "y": [211.6], "flux": [4000.0]})
    pair = simulate_pair((512, 512), n_stars=200, flux_range=(2e3, 2e5), flux_ratio=0.9,
                         read_noise=READ_NOISE.value, transients=transient, seed=8)
    bias = CCDData(np.full((512, 512), BIAS_LEVEL), unit="adu")
    reduced = []
    for sim in (pair.reference, pair.science):
        ccd = ccdproc.subtract_bias(_raw(sim.ccd), bias)
        ccd = ccdproc.create_deviation(ccd, gain=GAIN, readnoise=READ_NOISE)
        ccd = ccdproc.gain_correct(ccd, GAIN)
        reduced.append(ccd)
    return pair, reduced


def test_ccdproc_output_feeds_subtract(reduced_pair):
    pair, (reference, science) = reduced_pair
    assert science.unit == u.electron and science.uncertainty is not None
    result = subtract(reference, science)
    # units: D and Scorr are dimensionless, the transient flux is in the reduced unit
    assert result.flux.unit == u.electron
    assert result.score.unit == u.dimensionless_unscaled
    # history: ccdproc's records and ours are both in meta
    assert "subtract_bias" in result.score.meta and "gain_correct" in result.score.meta
    assert "AZSCORR" in result.score.meta
    # the propagated uncertainty makes Scorr a calibrated statistic (robust std: the
    # transient itself is ~40 sigma)
    good = ~result.score.mask
    assert abs(mad_std(result.score.data[good]) - 1.0) < 0.03
    # the transient comes out at its position, with its flux within 3 sigma
    best = result.find_transients(5.0)[0]
    truth = pair.transients[0]
    assert np.hypot(best["x"] - truth["x"], best["y"] - truth["y"]) < 1.0
    assert abs(best["flux"] - truth["flux"]) < 3 * best["flux_err"]
    assert result.flux_ratio == pytest.approx(0.9, abs=3 * result.flux_ratio_error + 0.005)


def test_ccdproc_output_is_not_modified(reduced_pair):
    _, (reference, science) = reduced_pair
    before = science.data.copy(), science.uncertainty.array.copy(), dict(science.meta)
    find_psf_stars(science)
    subtract(reference, science)
    np.testing.assert_array_equal(science.data, before[0])
    np.testing.assert_array_equal(science.uncertainty.array, before[1])
    assert dict(science.meta) == before[2]
