"""Bad inputs of the ZOGY core that gave silently wrong numbers.

A NaN row or column hides its own sky noise (a band of the kernels' core radius) and
the light of the stars crossing it (a disk around each), not a band of the whole stamp
along the image; data in tiny or huge units give the same Scorr as in electrons.
"""

import warnings

import numpy as np
import pytest
from astropy.nddata import CCDData, StdDevUncertainty

from astro_zackay import AstroZackayWarning, FewStarsWarning, subtract
from astro_zackay.fourier import convolve_fft, psf_rfft
from astro_zackay.simulation import simulate_pair
from astro_zackay.zogy import MASK_SCORR_CHANGE, zogy

SHAPE = (256, 256)


def gaussian_psf(sigma: float, size: int) -> np.ndarray:
    """A round unit-sum Gaussian stamp."""
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    p = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return p / p.sum()


def render(shape, ys, xs, fluxes, psf):
    """Point sources at integer pixels convolved with ``psf`` (noise-free)."""
    sky = np.zeros(shape)
    np.add.at(sky, (np.asarray(ys, int), np.asarray(xs, int)), fluxes)
    return convolve_fft(sky, psf_rfft(psf, shape))


@pytest.fixture(scope="module")
def sky_pair():
    """A 256^2 sky-subtracted pair (300 stars, FWHM 2.5 / 3.5 px) and its true PSF stamps."""
    pair = simulate_pair(SHAPE, seed=1, subtract_sky=True)
    return pair, pair.true_psf_stamps()


def with_nan_line(data: np.ndarray, kind: str) -> np.ndarray:
    """A float copy of ``data`` with row 128 or column 100 NaN."""
    out = np.array(data, dtype=float)
    if kind == "row":
        out[128, :] = np.nan
    else:
        out[:, 100] = np.nan
    return out


@pytest.mark.parametrize("kind", ["row", "column"])
def test_nan_line_masks_a_band_of_the_kernel_core_in_zogy(sky_pair, kind):
    """A NaN row (column) masks < 6 % more of Scorr; off the mask Scorr is the clean one.

    Each line was taken as one disk-shaped star core of its area (radius 9 px, wider
    than the PSF), so any star near it grew the whole line by the stamp: +14.8 % of the
    image (a band of 39 rows).
    """
    pair, (psf_ref, psf_sci) = sky_pair
    sci, ref = pair.science.ccd.data, pair.reference.ccd.data
    kw = dict(sigma_new=15.0, sigma_ref=15.0, pad=True,
              var_new=np.clip(sci, 0, None) + 225.0, var_ref=np.clip(ref, 0, None) + 225.0)
    clean = zogy(sci, ref, psf_sci, psf_ref, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = zogy(with_nan_line(sci, kind), ref, psf_sci, psf_ref, **kw)
    r = res.mask_radius
    band = res.mask[128 - r : 129 + r, :] if kind == "row" else res.mask[:, 100 - r : 101 + r]
    assert band.all()  # the line's own sky noise
    assert res.mask.mean() - clean.mask.mean() < 0.06
    off = ~res.mask
    assert np.max(np.abs(res.Scorr - clean.Scorr)[off]) < MASK_SCORR_CHANGE
    assert abs(np.std(res.Scorr[off]) - 1.0) < 0.1


@pytest.mark.parametrize("kind", ["row", "column"])
def test_nan_line_masks_a_band_of_the_kernel_core_in_subtract(sky_pair, kind):
    """Through `subtract` (tiled field): < 8 % more masked (was +14.6 %), std(Scorr) 1 +- 0.1."""
    pair, (psf_ref, psf_sci) = sky_pair
    kw = dict(reference_psf=psf_ref, science_psf=psf_sci)
    clean = subtract(pair.reference.ccd, pair.science.ccd, **kw)
    sci = pair.science.ccd.copy()
    sci.data = with_nan_line(sci.data, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = subtract(pair.reference.ccd, sci, **kw)
    assert res.score.mask.mean() - clean.score.mask.mean() < 0.08
    off = ~res.score.mask
    assert abs(np.std(res.score.data[off]) - 1.0) < 0.1


def test_nan_row_crossing_a_bright_star_grows_around_the_star_only():
    """A NaN row through a 3e5 star: a disk around the star, the core band elsewhere.

    Scorr off the mask stays within MASK_SCORR_CHANGE of that of the unmasked data.
    """
    pn, pr = gaussian_psf(2.0, size=61), gaussian_psf(1.5, size=61)
    rng = np.random.default_rng(3)
    new = render(SHAPE, [128], [70], [3e5], pn) + rng.normal(0, 1, SHAPE)
    ref = render(SHAPE, [128], [70], [3e5], pr) + rng.normal(0, 1, SHAPE)
    whole = zogy(new, ref, pn, pr, sigma_new=1, sigma_ref=1, pad=True)
    masked = zogy(with_nan_line(new, "row"), ref, pn, pr, sigma_new=1, sigma_ref=1, pad=True)
    r = masked.mask_radius
    rows_masked = masked.mask[r:-r, r:-r].sum(axis=0)  # per column, the edge left out
    band = 2 * r + 1
    assert np.all(rows_masked[150 - r :] == band)
    assert np.all(rows_masked[: 40 - r] == band)
    assert rows_masked[70 - r] > band
    off = ~masked.mask
    assert np.max(np.abs(masked.Scorr - whole.Scorr)[off]) < MASK_SCORR_CHANGE


def test_large_masking_around_saturated_stars_warns_how_much_and_why():
    """Four saturated 3e7 stars on 160^2 mask 36 %: a warning says so, naming the user's line."""
    pn, pr = gaussian_psf(2.0, size=61), gaussian_psf(1.5, size=61)
    shape = (160, 160)
    rng = np.random.default_rng(6)
    ys, xs = [40, 40, 120, 120], [40, 120, 40, 120]
    new = render(shape, ys, xs, [3e7] * 4, pn) + rng.normal(0, 1, shape)
    ref = render(shape, ys, xs, [3e7] * 4, pr) + rng.normal(0, 1, shape)
    saturated = (new > 2000) | (ref > 2000)
    with pytest.warns(AstroZackayWarning,
                      match=r"grew to mask 3\d% of it: .* around masked regions whose rim is "
                            r"brighter than the noise") as caught:
        res = zogy(new, ref, pn, pr, sigma_new=1, sigma_ref=1, mask=saturated)
    assert [w.filename for w in caught] == [__file__]
    whole = zogy(new, ref, pn, pr, sigma_new=1, sigma_ref=1)
    assert np.max(np.abs(res.Scorr - whole.Scorr)[~res.mask]) < MASK_SCORR_CHANGE


# --------------------------------------------------------------------------------------
# data in tiny or huge units (erg/s/cm2/A is ~1e-17): the algebra runs in units of the noise

UNIT = "erg / (s cm2 Angstrom)"


def in_unit(ccd: CCDData, factor: float) -> CCDData:
    """``ccd`` times ``factor`` (data and uncertainty, float64) in `UNIT`."""
    return CCDData(ccd.data.astype(float) * factor, unit=UNIT, mask=ccd.mask, wcs=ccd.wcs,
                   uncertainty=StdDevUncertainty(ccd.uncertainty.array * factor))


@pytest.fixture(scope="module")
def unit_pair():
    """A 256^2 pair (PSFs estimated) and its float32 subtraction in units of 1."""
    pair = simulate_pair(SHAPE, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewStarsWarning)
        return pair, subtract(in_unit(pair.reference.ccd, 1.0), in_unit(pair.science.ccd, 1.0))


@pytest.mark.filterwarnings("ignore::astro_zackay.FewStarsWarning")
@pytest.mark.parametrize("factor", [1e-15, 1e-12, 1e12, 1e15])
def test_subtract_in_tiny_or_huge_units_gives_the_same_scorr(unit_pair, factor):
    """The pair times 1e-15 ... 1e15: Scorr within 1e-3 sigma, the flux times the factor.

    S's kernels scale as 1/sigma**2: at 1e-12 their squares overflowed float32 (every
    pixel masked), at 1e12 they underflowed (Scorr off by 3000 sigma).
    """
    pair, base = unit_pair
    res = subtract(in_unit(pair.reference.ccd, factor), in_unit(pair.science.ccd, factor))
    np.testing.assert_array_equal(res.score.mask, base.score.mask)
    good = ~base.score.mask
    assert good.mean() > 0.8
    assert np.max(np.abs(res.score.data - base.score.data)[good]) < 1e-3
    flux_change = (res.flux.data / factor - base.flux.data) / base.flux_error.data
    assert np.max(np.abs(flux_change)[good]) < 1e-3
    assert res.flux_scale * factor == pytest.approx(base.flux_scale, rel=1e-5)
    assert res.flux.unit == UNIT


@pytest.mark.parametrize("factor", [1e-12, 1e12])
def test_zogy_float32_in_tiny_or_huge_units(sky_pair, factor):
    """`zogy` in float32 on data times 1e-12 or 1e12: the same Scorr, S and F_S in its units."""
    pair, (psf_ref, psf_sci) = sky_pair
    sci, ref = pair.science.ccd.data, pair.reference.ccd.data
    var_n, var_r = np.clip(sci, 0, None) + 225.0, np.clip(ref, 0, None) + 225.0
    kw = dict(dtype=np.float32, pad=True)
    base = zogy(sci, ref, psf_sci, psf_ref, sigma_new=15.0, sigma_ref=15.0, var_new=var_n,
                var_ref=var_r, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow, no division by zero
        res = zogy(sci * factor, ref * factor, psf_sci, psf_ref, sigma_new=15.0 * factor,
                   sigma_ref=15.0 * factor, var_new=var_n * factor**2,
                   var_ref=var_r * factor**2, **kw)
    np.testing.assert_array_equal(res.mask, base.mask)
    good = ~base.mask
    assert np.max(np.abs(res.Scorr - base.Scorr)[good]) < 1e-3
    np.testing.assert_allclose(res.S * factor, base.S, rtol=1e-4,
                               atol=1e-4 * np.abs(base.S).max())
    assert res.F_S * factor**2 == pytest.approx(base.F_S, rel=1e-6)
    assert res.F_D * factor == pytest.approx(base.F_D, rel=1e-6)
    np.testing.assert_allclose(res.V_SN * factor**2, base.V_SN, rtol=1e-4,
                               atol=1e-4 * base.V_SN.max())


@pytest.mark.parametrize("factor", [1e-25, 1e19, 1e25])
def test_noise_spectrum_without_rms_in_tiny_or_huge_units(factor):
    """Correlated noise times 1e-25 ... 1e25 without an rms map: the same spectrum.

    Measured in float32 as it came, the autocovariance's squares overflowed at 1e19
    (NaN correlations and sigma, with a RuntimeWarning only).
    """
    from scipy import ndimage

    from astro_zackay.noise import measure_noise_spectrum, measure_pair_noise

    rng = np.random.default_rng(1)
    white = rng.normal(size=(256, 256))
    noise = ndimage.convolve1d(white, [0.2, 1.0, 0.2], axis=1, mode="wrap")
    ref = rng.normal(size=(256, 256))
    one, scaled = measure_noise_spectrum(noise), measure_noise_spectrum(noise * factor)
    assert scaled.sigma / factor == pytest.approx(one.sigma, rel=1e-4)
    np.testing.assert_allclose(scaled.lag1, one.lag1, atol=1e-4)
    assert one.lag1[0] == pytest.approx(0.37, abs=0.02)
    pair_one = measure_pair_noise(noise, ref)
    pair_scaled = measure_pair_noise(noise * factor, ref * factor)
    for a, b in zip(pair_scaled, pair_one):
        assert a.sigma / factor == pytest.approx(b.sigma, rel=1e-4)
        np.testing.assert_allclose(a.lag1, b.lag1, atol=1e-4)
