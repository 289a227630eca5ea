"""Masks in the ZOGY core and in `subtract`: bad pixels grow only where the kernels reach.

A bad pixel hides its own sky noise, which moves Scorr within the cores of S's kernels
(``mask_radius``); it hides a star only when its rim is brighter than the noise.  The
reference's sub-pixel shift is applied inside the core (a phase ramp), never to a mask
image: its bad pixels move by the rounded shift, grown by one pixel.
"""

import warnings

import numpy as np
import pytest
from scipy import ndimage

from astro_zackay import subtract
from astro_zackay.profiles import psf_stamp
from astro_zackay.simulation import simulate_pair
from astro_zackay.zogy import zogy

SHAPE = (512, 512)
SHIFT = (0.3, -0.4)


def _quiet(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()


@pytest.fixture(scope="module")
def star_pair():
    """A 512^2 star pair (FWHM 2.5 / 3.5 px, flux ratio 0.9, shifted) and its clean result."""
    pair = simulate_pair(SHAPE, n_stars=150, flux_ratio=0.9, shift=SHIFT, seed=5)
    return pair, _quiet(lambda: subtract(pair.reference.ccd, pair.science.ccd))


def with_nan(ccd, n, seed):
    """A copy of ``ccd`` with ``n`` NaN pixels at random positions."""
    out = ccd.copy()
    rng = np.random.default_rng(seed)
    out.data = out.data.astype(float)
    out.data[rng.integers(0, SHAPE[0], n), rng.integers(0, SHAPE[1], n)] = np.nan
    return out


def off_star(pair, result, radius=10):
    near = np.zeros(SHAPE, bool)
    t = pair.science.truth
    near[np.clip(np.round(t["y"]).astype(int), 0, SHAPE[0] - 1),
         np.clip(np.round(t["x"]).astype(int), 0, SHAPE[1] - 1)] = True
    return (ndimage.distance_transform_edt(~near) > radius) & ~result.score.mask


def test_reference_mask_moves_by_the_rounded_shift_inside_the_core():
    """One bad reference pixel with shift (2.6, -1.4) flags a disk at (x+3, y-1), no cross."""
    rng = np.random.default_rng(1)
    shape = (128, 128)
    new, ref = rng.normal(0, 2.0, shape), rng.normal(0, 1.0, shape)
    bad = np.zeros(shape, bool)
    bad[50, 60] = True
    kw = dict(sigma_new=2.0, sigma_ref=1.0, flux_new=0.9)
    res = zogy(new, ref, psf_stamp(21, 3.5), psf_stamp(21, 2.5), mask_ref=bad,
               shift_ref=(2.6, -1.4), **kw)
    flagged = np.argwhere(res.mask)
    assert np.allclose(flagged.mean(axis=0), (49, 63))
    # the moved pixel grown by one pixel (3x3), then by the kernels' core radius
    extent = np.hypot(*(flagged - (49, 63)).T).max()
    assert extent <= res.mask_radius + np.sqrt(2) + 1e-9
    assert res.mask.sum() <= np.pi * (res.mask_radius + 1.5) ** 2
    assert np.isfinite(res.Scorr).all()


def test_one_nan_reference_pixel_masks_a_disk_not_a_cross(star_pair):
    """A NaN pixel of the shifted reference flags at most a disk of ~10 px radius.

    Shifting the 0/1 mask image by a sinc flagged a 46 px wide cross.
    """
    pair, clean = star_pair
    ref = pair.reference.ccd.copy()
    ref.data = ref.data.astype(float)
    ref.data[300, 200] = np.nan  # away from stars at this seed
    result = _quiet(lambda: subtract(ref, pair.science.ccd))
    extra = result.score.mask & ~clean.score.mask
    ys, xs = np.nonzero(extra)
    assert extra.sum() > 0
    assert xs.max() - xs.min() <= 20 and ys.max() - ys.min() <= 20
    assert abs(xs.mean() - 200) < 2 and abs(ys.mean() - 300) < 2


def test_50_scattered_nan_pixels_mask_less_than_3_points_more(star_pair):
    """50 NaN pixels (0.02 %) raise the masked fraction of Scorr by < 3 percentage points.

    Each bad pixel at sky level was taken to hide a star: +25 points.
    """
    pair, clean = star_pair
    result = _quiet(lambda: subtract(with_nan(pair.reference.ccd, 25, 1),
                                     with_nan(pair.science.ccd, 25, 2)))
    assert result.score.mask.mean() - clean.score.mask.mean() < 0.03


def test_02_percent_bad_pixels_still_subtract_with_unit_scorr(star_pair):
    """0.2 % NaN pixels: the flux ratio and shift are fitted, off-star std(Scorr) = 1 +- 0.02."""
    pair, clean = star_pair
    n = int(0.002 * SHAPE[0] * SHAPE[1]) // 2
    result = _quiet(lambda: subtract(with_nan(pair.reference.ccd, n, 3),
                                     with_nan(pair.science.ccd, n, 4)))
    assert result.score.mask.mean() < 0.5
    assert result.flux_ratio == pytest.approx(clean.flux_ratio, rel=0.01)
    assert result.shift == pytest.approx(clean.shift, abs=0.05)
    off = off_star(pair, result)
    assert off.sum() > 0.3 * off.size
    assert abs(np.std(result.score.data[off]) - 1.0) < 0.02


def test_edge_flag_covers_the_padding_that_the_shift_brings_in():
    """With pad=True a reference shifted by 6.3 px has no data within 6 px of the edge."""
    rng = np.random.default_rng(2)
    new, ref = rng.normal(0, 1.0, (96, 96)), rng.normal(0, 1.0, (96, 96))
    psf = psf_stamp(15, 2.5)
    still = zogy(new, ref, psf, psf, sigma_new=1.0, sigma_ref=1.0, pad=True)
    moved = zogy(new, ref, psf, psf, sigma_new=1.0, sigma_ref=1.0, pad=True, shift_ref=(6.3, 0))
    r = still.mask_radius
    rows = slice(r + 8, -r - 8)
    assert not still.mask[rows, r + 1 : -r - 1].any()
    assert moved.mask[rows, : r + 7].all()
    assert not moved.mask[rows, r + 8 : -r - 8].any()
