"""Tests of align (by stars and by WCS)."""

import numpy as np
import pytest
from astropy.nddata import CCDData

from astro_zackay.alignment import align
from astro_zackay.simulation import simulate_pair


@pytest.fixture(scope="module")
def pair():
    return simulate_pair((256, 256), n_stars=120, shift=(3.4, -2.2), seed=7,
                         flux_range=(3e3, 3e5), reference_psf=2.5, science_psf=2.5)


def _moments(image, truth, half=5):
    """Flux-weighted centroids of the brightest isolated truth stars in ``image``."""
    rows = truth[truth["isolated"] & (truth["snr"] > 50)]
    out = []
    for x, y in zip(rows["x"], rows["y"]):
        ix, iy = int(round(x)), int(round(y))
        cut = image[iy - half: iy + half + 1, ix - half: ix + half + 1]
        if cut.shape != (2 * half + 1, 2 * half + 1):
            continue
        cut = cut - np.median(cut)
        yy, xx = np.mgrid[-half: half + 1, -half: half + 1]
        out.append((ix + (cut * xx).sum() / cut.sum() - x, iy + (cut * yy).sum() / cut.sum() - y))
    return np.array(out)


@pytest.mark.parametrize("method", ["stars", "wcs"])
def test_aligned_stars_land_on_reference_positions(pair, method):
    science = pair.science.ccd
    before = science.data.copy()
    aligned = align(science, pair.reference.ccd, method=method)
    np.testing.assert_array_equal(science.data, before)  # input untouched
    assert isinstance(aligned, CCDData) and aligned.unit == science.unit
    offsets = _moments(np.where(aligned.mask, 0, aligned.data), pair.reference.truth)
    assert len(offsets) >= 5
    assert np.median(np.abs(offsets)) < 0.1
    # footprint: pixels that came from outside the science frame are masked
    assert aligned.mask[:, -3:].all() and not aligned.mask[50:200, 50:200].any()
    assert aligned.uncertainty is not None
    assert "AZALIGN" in aligned.meta
    np.testing.assert_allclose(aligned.wcs.wcs.crpix, pair.reference.ccd.wcs.wcs.crpix)


def test_star_transform_recorded(pair):
    aligned = align(pair.science.ccd, pair.reference.ccd)
    assert aligned.meta["AZALDX"] == pytest.approx(-3.4, abs=0.1)
    assert aligned.meta["AZALDY"] == pytest.approx(2.2, abs=0.1)
    assert aligned.meta["AZALSCL"] == pytest.approx(1.0, abs=1e-3)


def test_variance_is_carried(pair):
    aligned = align(pair.science.ccd, pair.reference.ccd)
    inner = ~aligned.mask
    ratio = aligned.uncertainty.array[inner] / pair.science.ccd.uncertainty.array.mean()
    assert 0.5 < np.median(ratio) < 2.0


def test_masked_input_pixels_are_masked_after_warping(pair):
    science = pair.science.ccd.copy()
    science.mask = np.zeros(science.shape, bool)
    science.mask[100, 100] = True
    aligned = align(science, pair.reference.ccd)
    # the masked pixel moves by the shift (-3.4, +2.2) to about (96.6, 102.2)
    assert aligned.mask[101:104, 96:98].any()
    assert not aligned.mask[110:120, 110:120].any()


def test_clear_errors(pair):
    with pytest.raises(ValueError, match="method"):
        align(pair.science.ccd, pair.reference.ccd, method="magic")
    no_wcs = CCDData(pair.science.ccd.data, unit=pair.science.ccd.unit,
                     uncertainty=pair.science.ccd.uncertainty)
    with pytest.raises(ValueError, match="WCS on both"):
        align(no_wcs, pair.reference.ccd, method="wcs")
    noise = CCDData(np.random.default_rng(0).normal(0, 1, (100, 100)), unit="electron",
                    uncertainty=pair.science.ccd.uncertainty[:100, :100])
    with pytest.raises(ValueError, match="could not match"):
        align(noise, pair.reference.ccd[:100, :100])
