"""The varying-PSF engine (astro_zackay._zogy_field): tile sides, the tile stack, zogy."""

import numpy as np
import pytest

from astro_zackay._zogy_field import MAX_PSF_CHANGE, TILE_SIDES, choose_tile_side, zogy_field
from astro_zackay.fourier import convolve_fft, psf_rfft
from astro_zackay.zogy import zogy


def gaussian(sigma, size=21):
    h = size // 2
    y, x = np.mgrid[-h:h + 1, -h:h + 1]
    p = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return p / p.sum()


def pair(shape=(200, 232), seed=5, psf_n=None, psf_r=None, shift=(0.0, 0.0)):
    """Background-subtracted noisy images of the same stars, with variance maps."""
    rng = np.random.default_rng(seed)
    psf_n = gaussian(2.2) if psf_n is None else psf_n
    psf_r = gaussian(1.6) if psf_r is None else psf_r
    sky = np.zeros(shape)
    ys, xs = rng.integers(20, shape[0] - 20, 40), rng.integers(20, shape[1] - 20, 40)
    sky[ys, xs] = rng.uniform(500, 20000, 40)
    truth_n = 0.8 * convolve_fft(sky, psf_rfft(psf_n, shape))
    truth_r = convolve_fft(sky, psf_rfft(psf_r, shape))
    var_n, var_r = 9.0 + np.maximum(truth_n, 0), 4.0 + np.maximum(truth_r, 0)
    new = truth_n + rng.normal(0, 1, shape) * np.sqrt(var_n)
    ref = truth_r + rng.normal(0, 1, shape) * np.sqrt(var_r)
    return new, ref, var_n, var_r


def test_choose_tile_side_follows_the_psf_variation():
    """The largest side over which the PSF changes by <= MAX_PSF_CHANGE from centre to corner.

    A PSF mixing two profiles with a weight linear in x changes, from a tile's centre
    to its corner (half a pixel beyond its last pixel), by ``slope * side / 2`` times
    the L1 distance of the profiles;
    the expected side follows from that; a constant PSF needs one tile.
    """
    shape = (300, 1100)
    a, b = gaussian(1.5), gaussian(3.0)
    distance = np.abs(a - b).sum()
    for slope in (0.2 / 1100, 0.5 / 1100, 3.0 / 1100):

        def linear(x, y, slope=slope):
            f = slope * x
            return (1 - f) * a + f * b

        passing = [s for s in TILE_SIDES
                   if s < 1100 and slope * s / 2 * distance <= MAX_PSF_CHANGE]
        expected = passing[0] if passing else TILE_SIDES[-1]
        assert choose_tile_side((linear, lambda x, y: a), (True, False), shape) == expected
    assert choose_tile_side((linear, linear), (False, False), shape) is None



def test_a_varying_psf_model_is_sampled_in_one_batch_with_the_same_stamps():
    """A KLPSFModel's sampler evaluates many positions in one call (``at_positions``), with
    the stamps of one call per position; the tile side and the tiles' PSFs chosen from it
    are those of the same PSF sampled one position at a time."""
    from astro_zackay._psf_input import as_psf_sampler
    from astro_zackay.psf import KLPSFModel

    a, b = gaussian(1.5), gaussian(3.0)
    shape = (300, 1100)
    model = KLPSFModel(np.stack([a, b - a]), [[1.0, 0.0, 0.0], [0.0, 1.5, 0.4]],
                       image_shape=shape, degree=1)
    batched = as_psf_sampler(model)
    one_by_one = lambda x, y: batched(x, y)  # noqa: E731  (no at_positions: one call each)
    x, y = np.array([0.0, 550.5, 1099.0]), np.array([0.0, 10.0, 299.0])
    stamps = batched.at_positions(x, y)
    np.testing.assert_allclose(stamps, [batched(xi, yi) for xi, yi in zip(x, y)], rtol=1e-12)
    np.testing.assert_allclose(stamps.sum(axis=(1, 2)), 1.0, rtol=1e-12)
    side = choose_tile_side((batched, batched), (True, True), shape)
    assert side == choose_tile_side((one_by_one, one_by_one), (True, True), shape)
    assert side is not None and side < 1100  # the model does vary
    rng = np.random.default_rng(2)
    new, ref = rng.normal(size=shape), rng.normal(size=shape)
    common = dict(varying=(True, True), rms_new=np.ones(shape), rms_ref=np.ones(shape),
                  var_new=None, var_ref=None, mask_new=np.zeros(shape, bool),
                  mask_ref=np.zeros(shape, bool), flux_ratio=1.0, dtype=np.float64)
    fast = zogy_field(new, ref, batched, batched, **common)
    slow = zogy_field(new, ref, one_by_one, one_by_one, **common)
    np.testing.assert_allclose(fast.tile_psfs, slow.tile_psfs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fast.Scorr, slow.Scorr, rtol=0, atol=1e-7, equal_nan=True)

def test_tiles_of_a_constant_psf_equal_one_tile():
    """With one PSF everywhere, 64 px tiles give one tile's D and S, less each tile's offset.

    The stamps (41 px) are wide enough that the tiles' border holds the kernels: each
    tile's D and S then differ from one tile's by a constant only, the background
    offset measured in the tile (a median of its pixels), itself small in D.
    """
    new, ref, var_n, var_r = pair(shape=(200, 232))
    kw = dict(varying=(True, True), rms_new=np.full(new.shape, 3.0),
              rms_ref=np.full(new.shape, 2.0), var_new=var_n, var_ref=var_r,
              mask_new=np.zeros(new.shape, bool), mask_ref=np.zeros(new.shape, bool),
              flux_ratio=0.8, shift_ref=(0.3, -0.2), dtype=np.float64)
    psf_n, psf_r = (lambda x, y: gaussian(2.2, 41)), (lambda x, y: gaussian(1.6, 41))
    one = zogy_field(new, ref, psf_n, psf_r, tiles=None, **kw)
    tiled = zogy_field(new, ref, psf_n, psf_r, tiles=64, **kw)
    assert len(tiled.tiles) == 4 * 4 and len(tiled.tile_psfs) == 16
    assert np.allclose(tiled.tile_psfs, one.psf_d, atol=1e-9)
    good = ~(one.mask | tiled.mask)
    for x0, x1, y0, y1, *_ in tiled.tiles:
        cell = (slice(y0, y1), slice(x0, x1))
        for name in ("D", "S"):
            diff = (getattr(tiled, name) - getattr(one, name))[cell][good[cell]]
            assert np.ptp(diff) < 1e-4
    assert np.abs(tiled.D - one.D)[good].max() < 0.15


@pytest.mark.parametrize("bad", [None, "nan"])
def test_one_tile_equals_zogy_less_the_offset(bad):
    """tiles=None is zogy(pad=True) of the central PSFs, less a constant background offset."""
    new, ref, var_n, var_r = pair()
    mask = np.zeros(new.shape, bool)
    if bad:
        new = new.copy()
        new[100:103, 50:52] = np.nan
        mask[100:103, 50:52] = True
    psf_n, psf_r = gaussian(2.2), gaussian(1.6)
    kw = dict(var_new=var_n, var_ref=var_r, shift_ref=(0.3, -0.4), flux_ratio_error=0.002,
              dtype=np.float64)
    field = zogy_field(new, ref, lambda x, y: psf_n, lambda x, y: psf_r, varying=(False, False),
                       rms_new=np.full(new.shape, 3.0), rms_ref=np.full(new.shape, 2.0),
                       mask_new=mask, mask_ref=np.zeros(new.shape, bool), flux_ratio=0.8,
                       astrometric_noise=(0.02, 0.03), psf_error=(0.01, 0.01), tiles=None, **kw)
    res = zogy(new, ref, psf_n, psf_r, sigma_new=3.0, sigma_ref=2.0, flux_new=0.8,
               astrometric_noise_new=(0.02, 0.03), astrometric_noise_ref=(0.02, 0.03),
               psf_error_new=0.01, psf_error_ref=0.01, pad=True, border=21, **kw)
    np.testing.assert_array_equal(field.mask, res.mask)
    good = ~res.mask
    d_off = res.D - field.D
    s_off = res.S - field.S
    assert np.ptp(d_off[good]) < 1e-10 and np.ptp(s_off[good]) < 1e-9 * np.abs(res.S).max()
    assert abs(d_off[good][0]) < 0.05  # the median of D over the good pixels: near 0
    assert pytest.approx(res.F_D, rel=1e-12) == field.F_D
    assert pytest.approx(res.F_S, rel=1e-12) == field.F_S
    np.testing.assert_allclose(field.alpha, 0.8 * field.S / res.F_S, rtol=1e-10)
    np.testing.assert_allclose(field.alpha_err, 0.8 * res.alpha_err, rtol=1e-6)
    np.testing.assert_allclose(field.psf_d, res.psf_d_stamp(21, normalize=True), atol=1e-12)


def test_varying_psf_tiles_subtract_each_star_with_its_psf():
    """Stars drawn with a PSF whose width grows from 1.8 to 2.6 px across the field.

    Each star of the science image has the PSF at its own place; the reference has one
    Gaussian. With tiles, no pixel within 3 px of a star leaves |Scorr| > 5 (the
    bright stars reach S/N ~300-1000); with one central PSF the outer stars do.
    """
    shape = (160, 400)
    rng = np.random.default_rng(8)

    def psf_n(x, y):
        return gaussian(1.8 + 0.8 * x / (shape[1] - 1))

    n = 50
    ys, xs = rng.integers(15, shape[0] - 15, n), rng.integers(15, shape[1] - 15, n)
    fluxes = rng.uniform(5000, 20000, n)
    new = rng.normal(0, 2.0, shape)
    sky = np.zeros(shape)
    for y, x, f in zip(ys, xs, fluxes):
        new[y - 10:y + 11, x - 10:x + 11] += f * psf_n(x, y)
        sky[y, x] += f
    ref = convolve_fft(sky, psf_rfft(gaussian(1.5), shape)) + rng.normal(0, 1.0, shape)
    near = np.zeros(shape, bool)
    for y, x in zip(ys, xs):
        near[y - 3:y + 4, x - 3:x + 4] = True
    common = dict(varying=(True, False), rms_new=np.full(shape, 2.0),
                  rms_ref=np.full(shape, 1.0), var_new=np.full(shape, 4.0) + new.clip(0),
                  var_ref=np.full(shape, 1.0) + ref.clip(0), mask_new=np.zeros(shape, bool),
                  mask_ref=np.zeros(shape, bool), flux_ratio=1.0)
    field = zogy_field(new, ref, psf_n, lambda x, y: gaussian(1.5), tiles="auto", **common)
    one = zogy_field(new, ref, psf_n, lambda x, y: gaussian(1.5), tiles=None, **common)
    assert len(field.tiles) > 1
    good = near & ~field.mask
    assert good.sum() > 0.5 * near.sum()
    assert np.abs(field.Scorr[good]).max() < 5
    assert np.abs(one.Scorr[good]).max() > 10


def _constant_field_options(shape: tuple[int, int]) -> dict:
    """zogy_field's options for white unit noise, no mask and constant PSFs."""
    return dict(varying=(False, False), rms_new=np.ones(shape), rms_ref=np.ones(shape),
                var_new=None, var_ref=None, mask_new=np.zeros(shape, bool),
                mask_ref=np.zeros(shape, bool), flux_ratio=1.0)


def test_bad_tiles_option_is_rejected():
    new, ref, var_n, var_r = pair(shape=(64, 64))
    kw = _constant_field_options((64, 64))
    psf = lambda x, y: gaussian(1.5, 9)  # noqa: E731
    for tiles in ("nodes", 0, 16, 40.5):
        with pytest.raises(ValueError, match="tiles"):
            zogy_field(new, ref, psf, psf, tiles=tiles, **kw)


def test_bad_inputs_are_rejected_before_any_work():
    new, ref, _, _ = pair(shape=(64, 64))
    kw = _constant_field_options((64, 64))
    psf = lambda x, y: gaussian(1.5, 9)  # noqa: E731
    with pytest.raises(ValueError, match="ref has shape"):
        zogy_field(new, ref[:-1], psf, psf, **kw)
    with pytest.raises(ValueError, match="flux_ratio"):
        zogy_field(new, ref, psf, psf, **dict(kw, flux_ratio=-1.0))
    with pytest.raises(ValueError, match="unit sum"):
        zogy_field(new, ref, lambda x, y: 2 * gaussian(1.5, 9), psf, **kw)
    calls = []

    def bad(x, y):
        calls.append((x, y))
        return 2 * gaussian(1.5, 9)

    with pytest.raises(ValueError, match="psf_ref must have unit sum"):  # before the tiling
        zogy_field(new, ref, psf, bad, **dict(kw, varying=(True, True)))
    assert calls == [(31.5, 31.5)]


@pytest.mark.parametrize("tiles", [None, 48])
def test_without_variance_maps_scorr_is_white_over_the_image(tiles):
    """No variance maps: each tile's source-noise term is its background, a number.

    On pure noise Scorr (S over that term) has unit variance over the whole image, and
    the flux error is the same everywhere in a tile (one tile, or tiles of one PSF).
    """
    rng = np.random.default_rng(11)
    shape = (120, 144)
    new, ref = rng.normal(0, 2.0, shape), rng.normal(0, 1.0, shape)
    psf = gaussian(1.5, 9)
    res = zogy_field(new, ref, lambda x, y: psf, lambda x, y: psf, varying=(True, True),
                     rms_new=np.full(shape, 2.0), rms_ref=np.ones(shape), var_new=None,
                     var_ref=None, mask_new=np.zeros(shape, bool),
                     mask_ref=np.zeros(shape, bool), flux_ratio=1.0, tiles=tiles)
    good = ~res.mask
    assert res.Scorr.shape == res.alpha_err.shape == shape
    assert 0.9 < np.std(res.Scorr[good]) < 1.1
    assert np.ptp(res.alpha_err[good]) < 1e-4 * res.alpha_err[good].mean()


def test_rms_level_read_on_a_sample_falls_back_to_every_good_pixel(monkeypatch):
    """The rms level of each image is read on a regular sample of its good pixels; when
    no good pixel falls on the sample (here every sampled pixel is in a masked column),
    it is the median over all of them, not NaN.
    """
    from astro_zackay import _zogy_field

    shape = (128, 128)
    rng = np.random.default_rng(5)
    rms_new = np.broadcast_to(np.linspace(1.0, 3.0, shape[1]), shape)
    new, ref = rms_new * rng.normal(size=shape), rng.normal(size=shape)
    mask_new = np.zeros(shape, bool)
    mask_new[:, 0] = True
    new[:, 0] = np.nan
    monkeypatch.setattr(_zogy_field, "MAP_LEVEL_SAMPLES", shape[0] // 2)  # column 0 only
    psf = gaussian(1.5)
    res = zogy_field(new, ref, lambda x, y: psf, lambda x, y: psf, varying=(False, False),
                     rms_new=rms_new, rms_ref=np.ones(shape), var_new=None, var_ref=None,
                     mask_new=mask_new, mask_ref=np.zeros(shape, bool), flux_ratio=1.0,
                     tiles=None)
    sigma_ref, sigma_new = res.tiles[0][6:8]
    assert sigma_ref == 1.0
    assert sigma_new == pytest.approx(float(np.median(rms_new[:, 1:])), rel=1e-12)
