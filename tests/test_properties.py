"""Property-based tests (hypothesis) of the ZOGY array core and of the CCDData boundary.

Every property draws its PSFs, noise levels, flux zero points and image shapes at
random, with a fixed derandomised search and no example database, so that a run is
reproducible.  Statistical tolerances are set from the number of pixels (and, for
correlated outputs, from the number of independent pixels), at 5 sigma unless said
otherwise, so that a correct implementation fails with negligible probability.
"""

import copy

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import CCDData, InverseVariance, NDData, StdDevUncertainty, VarianceUncertainty
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from astro_zackay._ccd import as_ccddata, match_unit, to_image
from astro_zackay.fourier import (
    abs2,
    convolve_fft,
    correlate_fft,
    get_array_module,
    half_spectrum_sum,
    psf_to_origin,
)
from astro_zackay.profiles import psf_stamp
from astro_zackay.zogy import zogy

#: Fewest independent pixels from which an rms is compared with the 5-sigma normal
#: tolerance of `_std_tolerance` (below it the sample rms is visibly non-normal).
N_EFF_MIN = 50


def _bounded(max_examples: int):
    """Reproducible hypothesis settings: derandomised, no database, no deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# --------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------

@st.composite
def psfs(draw) -> np.ndarray:
    """A unit-sum Gaussian or Moffat stamp: FWHM 1.5-5 px, ellipticity 0-0.4, any
    orientation, its centre up to 0.4 px off the central pixel in each axis."""
    fwhm = draw(st.floats(1.5, 5.0))
    half = int(np.ceil(2.5 * fwhm)) + 2
    size = 2 * half + 1
    offset = draw(st.tuples(st.floats(-0.4, 0.4), st.floats(-0.4, 0.4)))
    return psf_stamp(
        size,
        fwhm,
        profile=draw(st.sampled_from(["gaussian", "moffat"])),
        ellipticity=draw(st.floats(0.0, 0.4)),
        theta=draw(st.floats(0.0, np.pi)),
        center=(half + offset[0], half + offset[1]),
    )


@st.composite
def pairs(draw) -> dict:
    """Everything `zogy` needs for a pair, apart from the images: a shape of 48-96 px
    per side (odd, even and non-square), two PSFs, two noise levels, zero points with a
    flux ratio of 0.3-3, and a seed for the noise."""
    f_ref = draw(st.floats(0.2, 5.0))
    return {
        "shape": (draw(st.integers(48, 96)), draw(st.integers(48, 96))),
        "psf_new": draw(psfs()),
        "psf_ref": draw(psfs()),
        "sigma_new": draw(st.floats(0.1, 30.0)),
        "sigma_ref": draw(st.floats(0.1, 30.0)),
        "flux_ref": f_ref,
        "flux_new": f_ref * draw(st.floats(0.3, 3.0)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _noise(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Pure white background noise of the pair's levels: (new, ref)."""
    rng = np.random.default_rng(p["seed"])
    return (rng.normal(0.0, p["sigma_new"], p["shape"]),
            rng.normal(0.0, p["sigma_ref"], p["shape"]))


def _zogy(new: np.ndarray, ref: np.ndarray, p: dict, **kwargs):
    args = {k: p[k] for k in ("psf_new", "psf_ref", "sigma_new", "sigma_ref",
                              "flux_new", "flux_ref")}
    args.update(kwargs)
    return zogy(new, ref, args.pop("psf_new"), args.pop("psf_ref"), **args)


def _star(stamp: np.ndarray, shape: tuple[int, int], y: int, x: int) -> np.ndarray:
    """The stamp placed (circularly) with its central pixel on pixel ``(y, x)``."""
    return np.roll(psf_to_origin(stamp, shape), (y, x), axis=(0, 1))


def _rfft2(a: np.ndarray) -> np.ndarray:
    return get_array_module("numpy").rfft2(a, s=a.shape)


def _correlating_kernel(draw, shape: tuple[int, int]) -> np.ndarray:
    """Transform of ``(1 - w) delta + w G``: G a unit-sum Gaussian, w < 0.45, so that it
    vanishes nowhere (``|K_h| >= 1 - 2 w``)."""
    weight = draw(st.floats(0.0, 0.45))
    kernel = weight * psf_stamp(9, draw(st.floats(1.0, 3.0)))
    kernel[4, 4] += 1.0 - weight
    return _rfft2(psf_to_origin(kernel, shape))


def _std_tolerance(n_independent: float) -> float:
    """5 sigma of the relative error of a sample rms of ``n_independent`` normal values."""
    return 5.0 / np.sqrt(2.0 * n_independent)


# --------------------------------------------------------------------------------------
# the numerical core
# --------------------------------------------------------------------------------------

@_bounded(100)
@given(p=pairs())
def test_d_is_white_unit_variance_noise(p):
    """On background noise alone, D has unit variance and no correlation between
    neighbouring pixels, for any PSFs, noise levels and flux ratio: the denominator
    ``sn**2 |Fr Pr_h|**2 + sr**2 |Fn Pn_h|**2`` is exactly the power of the numerator,
    frequency by frequency."""
    new, ref = _noise(p)
    d = _zogy(new, ref, p).D
    npix = d.size
    assert np.all(np.isfinite(d))
    assert abs(np.sqrt(np.mean(d**2)) - 1.0) < _std_tolerance(npix)
    # lag-1 correlations along x and y: each has a standard error 1 / sqrt(Npix)
    for axis in (0, 1):
        rho = np.mean(d * np.roll(d, 1, axis=axis)) / np.mean(d**2)
        assert abs(rho) < 5.0 / np.sqrt(npix)


@_bounded(100)
@given(p=pairs())
def test_scorr_is_standard_normal_on_noise(p):
    """On background noise alone, Scorr has zero mean and unit variance (its tolerance
    from the independent pixels of S, see `_scorr_n_eff`; the mean of S is ``F_D``
    times the mean of D, so the mean of Scorr has the variance
    ``F_D**2 / (Npix F_S) = 1 / (Npix sum(P_D**2))``).  With constant variance
    maps equal to the noise levels, the source-noise path gives the same Scorr, and
    ``F_S == F_D**2 sum(P_D**2)``."""
    new, ref = _noise(p)
    res = _zogy(new, ref, p)
    n_eff = _scorr_n_eff(res)
    assert abs(np.sqrt(np.mean(res.Scorr**2)) - 1.0) < _std_tolerance(n_eff)
    mean_sigma = 1.0 / np.sqrt(res.S.size * np.sum(res.psf_d_at_origin**2))
    assert abs(np.mean(res.Scorr)) < 5.0 * mean_sigma
    np.testing.assert_allclose(res.Scorr, res.S / np.sqrt(res.F_S), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        res.F_S, res.F_D**2 * np.sum(res.psf_d_at_origin**2), rtol=1e-10
    )
    with_maps = _zogy(new, ref, p, var_new=np.full(p["shape"], p["sigma_new"] ** 2),
                      var_ref=np.full(p["shape"], p["sigma_ref"] ** 2))
    np.testing.assert_allclose(with_maps.Scorr, res.Scorr, rtol=1e-8, atol=1e-8)


def _scorr_n_eff(res) -> float:
    """Independent pixels of S on background noise, for the rms of Scorr.

    S is D cross-correlated with P_D, so for white D its pixels are correlated like
    P_D's autocorrelation ``rho``: the variance of its sample variance is
    ``2 sum(rho**2) / Npix``, and ``sum(rho**2) = Ngrid sum|PD_h|**4 / (sum|PD_h|**2)**2``
    on P_D's grid of ``Ngrid`` pixels (the padded one with ``pad=True``).
    """
    grid = res.psf_d_at_origin
    pd_h2 = abs2(_rfft2(grid))
    nx = grid.shape[1]
    sum_rho2 = grid.size * half_spectrum_sum(pd_h2**2, nx) / half_spectrum_sum(pd_h2, nx) ** 2
    return res.S.size / sum_rho2


@_bounded(80)
@given(p=pairs(), data=st.data())
def test_correlated_noise_is_whitened(p, data):
    """Background noise correlated by a kernel K (resampling does that) has the power
    per pixel ``sigma**2 |K_h|**2``; given that spectrum, D is again white with unit
    variance and ``Scorr = S / sqrt(F_S)`` is standard normal."""
    white_new, white_ref = _noise(p)
    k_new = _correlating_kernel(data.draw, p["shape"])
    k_ref = _correlating_kernel(data.draw, p["shape"])
    new, ref = convolve_fft(white_new, k_new), convolve_fft(white_ref, k_ref)
    res = _zogy(new, ref, p, noise_spectrum_new=p["sigma_new"] ** 2 * abs2(k_new),
                noise_spectrum_ref=p["sigma_ref"] ** 2 * abs2(k_ref))
    npix = res.D.size
    assert abs(np.sqrt(np.mean(res.D**2)) - 1.0) < _std_tolerance(npix)
    for axis in (0, 1):
        rho = np.mean(res.D * np.roll(res.D, 1, axis=axis)) / np.mean(res.D**2)
        assert abs(rho) < 5.0 / np.sqrt(npix)
    n_eff = _scorr_n_eff(res)
    assert abs(np.sqrt(np.mean(res.Scorr**2)) - 1.0) < _std_tolerance(n_eff)
    np.testing.assert_allclose(res.Scorr, res.S / np.sqrt(res.F_S), rtol=1e-10, atol=1e-12)


@_bounded(60)
@given(p=pairs())
def test_padded_scorr_is_calibrated_off_the_mask(p):
    """With ``pad=True`` the images are zero-padded, and the zeros hide sky noise from
    S near the edge.  Beyond the flagged border (``mask_radius``: the kernels of S hold
    all but ``MASK_SCORR_CHANGE**2 = 1 %`` of their squared weight inside it) Scorr's
    variance is between 0.99 and 1, so its rms over the unflagged pixels lies in
    ``[sqrt(0.99), 1]`` within the sampling tolerance (which uses the unflagged share
    of S's independent pixels).  Draws with fewer than ``N_EFF_MIN`` independent
    unflagged pixels are rejected (`hypothesis.assume`), so that a tiny sample cannot
    make the property flaky."""
    new, ref = _noise(p)
    res = _zogy(new, ref, p, pad=True)
    assert res.D.shape == p["shape"] and res.mask is not None
    good = ~res.mask
    assert good.any()
    n_eff = _scorr_n_eff(res) * good.mean()
    note(f"independent unflagged pixels of S: {n_eff:.1f}")
    # a small image with wide PSFs leaves few independent pixels beyond the flagged
    # border: their rms is then far from normal (skewed, heavy upper tail) and the
    # 5-sigma normal tolerance would no longer bound the false-failure rate
    assume(n_eff >= N_EFF_MIN)
    rms = np.sqrt(np.mean(res.Scorr[good] ** 2))
    tol = _std_tolerance(n_eff)
    assert np.sqrt(0.99) - tol < rms < 1.0 + tol


@_bounded(60)
@given(p=pairs(), flux=st.floats(0.0, 1e4))
def test_float32_matches_float64(p, flux):
    """Working in float32 changes D and Scorr by far less than their noise (0.01 sigma),
    noise only or with a bright transient (the PSF transforms stay float64, and the
    denominator's floor keeps the far tails of the PSFs finite)."""
    new, ref = _noise(p)
    ny, nx = p["shape"]
    new = new + flux * p["flux_new"] * _star(p["psf_new"], p["shape"], ny // 2, nx // 3)
    r64 = _zogy(new, ref, p)
    r32 = _zogy(new, ref, p, dtype=np.float32)
    assert r32.D.dtype == r32.S.dtype == r32.Scorr.dtype == np.float32
    for name in ("D", "Scorr"):
        a64, a32 = getattr(r64, name), getattr(r32, name)
        assert np.max(np.abs(a32 - a64)) < 1e-2 + 1e-5 * np.max(np.abs(a64))


@_bounded(80)
@given(p=pairs(), y=st.floats(0, 1), x=st.floats(0, 1), flux=st.floats(0.0, 1e4))
def test_s_is_f_d_times_d_correlated_with_p_d(p, y, x, flux):
    """``S == F_D * (D ⋆ P_D)`` (circular cross-correlation with P_D) for any images:
    noise plus a transient of any flux."""
    new, ref = _noise(p)
    ny, nx = p["shape"]
    new = new + flux * p["flux_new"] * _star(p["psf_new"], p["shape"], int(y * (ny - 1)),
                                             int(x * (nx - 1)))
    res = _zogy(new, ref, p)
    expected = res.F_D * correlate_fft(res.D, _rfft2(res.psf_d_at_origin))
    scale = np.max(np.abs(res.S))
    np.testing.assert_allclose(res.S, expected, rtol=0, atol=1e-10 * scale)
    assert res.psf_d_at_origin.sum() == pytest.approx(1.0, abs=1e-10)


@_bounded(80)
@given(p=pairs(), flux=st.floats(0.0, 1e4), maps=st.booleans(),
       ast=st.tuples(*[st.floats(0.0, 0.5)] * 4))
def test_swapping_images_negates_the_difference(p, flux, maps, ast):
    """Exchanging new and reference (with their PSFs, noises, zero points, variance maps
    and astrometric noises) negates D, S and Scorr and leaves F_D and F_S unchanged:
    every formula is antisymmetric in the pair (numerators) or symmetric (denominators,
    zero points and the variances of Scorr)."""
    new, ref = _noise(p)
    ny, nx = p["shape"]
    new = new + flux * p["flux_new"] * _star(p["psf_new"], p["shape"], ny // 3, nx // 2)
    var_new = p["sigma_new"] ** 2 + np.abs(new) if maps else None
    var_ref = p["sigma_ref"] ** 2 + np.abs(ref) if maps else None
    ast_new, ast_ref = ast[:2], ast[2:]
    res = _zogy(new, ref, p, var_new=var_new, var_ref=var_ref,
                astrometric_noise_new=ast_new, astrometric_noise_ref=ast_ref)
    swapped = zogy(ref, new, p["psf_ref"], p["psf_new"], sigma_new=p["sigma_ref"],
                   sigma_ref=p["sigma_new"], flux_new=p["flux_ref"], flux_ref=p["flux_new"],
                   var_new=var_ref, var_ref=var_new, astrometric_noise_new=ast_ref,
                   astrometric_noise_ref=ast_new)
    for name in ("D", "S", "Scorr"):
        a, b = getattr(res, name), getattr(swapped, name)
        np.testing.assert_allclose(b, -a, rtol=0, atol=1e-10 * np.max(np.abs(a)))
    np.testing.assert_allclose(swapped.F_D, res.F_D, rtol=1e-12)
    np.testing.assert_allclose(swapped.F_S, res.F_S, rtol=1e-12)


@_bounded(120)
@given(p=pairs(), snr=st.floats(5.0, 200.0), y=st.floats(0, 1), x=st.floats(0, 1),
       static=st.one_of(st.just(0.0), st.floats(1.0, 1e5)), source_noise=st.booleans())
def test_transient_flux_is_recovered_within_its_error(p, snr, y, x, static, source_noise):
    """A point source of flux ``alpha`` in the new image only (``Fn alpha P_n`` on the
    pixel grid) is measured by ``alpha = S / F_S`` at its pixel, with a pull
    ``(alpha_hat - alpha) / alpha_err`` within 4 sigma; a static star elsewhere,
    ``Fn f P_n`` in the new and ``Fr f P_r`` in the reference image, leaves nothing in
    D beyond the noise-free round-off.

    With ``source_noise`` the sources carry their own Gaussian noise of variance equal
    to their expected counts (Poisson at gain 1), and the variance maps
    ``sigma**2 + model`` given to `zogy` put it into ``alpha_err``: ``S_N = kn ⊛ N``
    has the variance ``V_N ⊛ kn**2`` exactly for independent pixels."""
    new, ref = _noise(p)
    shape = p["shape"]
    ny, nx = shape
    yt, xt = int(y * (ny - 1)), int(x * (nx - 1))
    # a static star half the image away from the transient
    ys, xs = (yt + ny // 2) % ny, (xt + nx // 2) % nx
    fn, fr = p["flux_new"], p["flux_ref"]
    # the S/N of a PSF fit on the new image alone: the transient's true S/N is lower
    alpha = snr * p["sigma_new"] / (fn * np.sqrt(np.sum(p["psf_new"] ** 2)))
    star_new = static * fn * _star(p["psf_new"], shape, ys, xs)
    star_ref = static * fr * _star(p["psf_ref"], shape, ys, xs)
    model_new = alpha * fn * _star(p["psf_new"], shape, yt, xt) + star_new
    maps = {}
    if source_noise:
        rng = np.random.default_rng(p["seed"] + 1)
        model_new, star_ref = np.clip(model_new, 0, None), np.clip(star_ref, 0, None)
        new = new + rng.normal(size=shape) * np.sqrt(model_new)
        ref = ref + rng.normal(size=shape) * np.sqrt(star_ref)
        maps = {"var_new": p["sigma_new"] ** 2 + model_new,
                "var_ref": p["sigma_ref"] ** 2 + star_ref}
    res = _zogy(new + model_new, ref + star_ref, p, **maps)
    pull = (res.alpha[yt, xt] - alpha) / res.alpha_err[yt, xt]
    assert abs(pull) < 4.0
    if static > 0:
        clean = _zogy(star_new, star_ref, p).D
        alone = _zogy(star_new, np.zeros(shape), p).D
        assert np.max(np.abs(clean)) < 1e-10 * np.max(np.abs(alone))


@_bounded(80)
@given(p=pairs(), a=st.floats(-3.0, 3.0), b=st.floats(-3.0, 3.0), c=st.floats(0.01, 100.0))
def test_linearity_and_unit_scaling(p, a, b, c):
    """With fixed noises and zero points, D, S and Scorr are linear in the images:
    ``(a N1 + b N2, a R1 + b R2) -> a D1 + b D2``.

    Changing the images' unit by ``c`` (images and noises times ``c``) leaves the
    denominator's square root times ``c``, so D and Scorr are unchanged, while
    ``Q = Fr Fn Pr_h Pn_h / sqrt(den)`` is divided by ``c``: S and F_D scale by ``1/c``,
    F_S by ``1/c**2`` and the flux ``alpha = S / F_S`` (with its error) by ``c``.
    Changing both zero points by ``c`` keeps the flux ratio and D, multiplies F_D and S
    by ``c``, F_S by ``c**2`` and divides ``alpha`` by ``c``."""
    n1, r1 = _noise(p)
    n2, r2 = _noise({**p, "seed": p["seed"] ^ 0x5A5A5A5A})
    res1, res2 = _zogy(n1, r1, p), _zogy(n2, r2, p)
    mix = _zogy(a * n1 + b * n2, a * r1 + b * r2, p)
    for name in ("D", "S", "Scorr"):
        expected = a * getattr(res1, name) + b * getattr(res2, name)
        scale = np.max(np.abs(getattr(res1, name))) + np.max(np.abs(getattr(res2, name)))
        np.testing.assert_allclose(getattr(mix, name), expected, rtol=0, atol=1e-10 * scale)

    unit = _zogy(c * n1, c * r1, p, sigma_new=c * p["sigma_new"], sigma_ref=c * p["sigma_ref"])
    np.testing.assert_allclose(unit.D, res1.D, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(unit.Scorr, res1.Scorr, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(unit.S, res1.S / c, rtol=1e-9, atol=1e-9 * np.abs(res1.S).max() / c)
    np.testing.assert_allclose(unit.F_D, res1.F_D / c, rtol=1e-12)
    np.testing.assert_allclose(unit.F_S, res1.F_S / c**2, rtol=1e-12)
    np.testing.assert_allclose(unit.alpha_err, c * res1.alpha_err, rtol=1e-9)

    zp = _zogy(n1, r1, p, flux_new=c * p["flux_new"], flux_ref=c * p["flux_ref"])
    np.testing.assert_allclose(zp.D, res1.D, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(zp.S, c * res1.S, rtol=1e-9, atol=1e-9 * c * np.abs(res1.S).max())
    np.testing.assert_allclose(zp.F_D, c * res1.F_D, rtol=1e-12)
    np.testing.assert_allclose(zp.F_S, c**2 * res1.F_S, rtol=1e-12)
    np.testing.assert_allclose(zp.alpha_err, res1.alpha_err / c, rtol=1e-9)


# --------------------------------------------------------------------------------------
# the CCDData boundary
# --------------------------------------------------------------------------------------

#: (unit, extra keyword arguments of to_image, header) of each unit tried.
_UNITS = {
    "electron": (u.electron, {}, {}),
    "adu+gain": (u.adu, {"gain": 1.7}, {}),
    "adu+GAIN": (u.adu, {}, {"GAIN": 2.3}),
    "electron/s": (u.electron / u.s, {}, {"EXPTIME": 30.0}),
}
#: Each uncertainty class, without a unit (it takes the data's) or with the data's unit.
_UNCERTAINTIES = {
    "none": None,
    "stddev": lambda var, unit: StdDevUncertainty(np.sqrt(var)),
    "variance": lambda var, unit: VarianceUncertainty(var),
    "inverse": lambda var, unit: InverseVariance(1.0 / var),
    "stddev+unit": lambda var, unit: StdDevUncertainty(np.sqrt(var), unit=unit),
    "variance+unit": lambda var, unit: VarianceUncertainty(var, unit=unit**2),
    "inverse+unit": lambda var, unit: InverseVariance(1.0 / var, unit=unit**-2),
}
#: Pixel types: native and big-endian (as FITS stores them) floats and integers, and
#: the unsigned 16 bits of most cameras.
_DTYPES = ["float32", "float64", "int16", "int32", "uint16", ">f8", ">f4", ">i2", ">i4"]


@st.composite
def ccds(draw) -> tuple[CCDData, dict, str, np.ndarray]:
    """A CCDData of any unit, mask, uncertainty class and dtype (including big-endian),
    with a few NaN pixels for floating types; returns it, the extra arguments of
    to_image, the unit key and the variance put in (the data's own units squared)."""
    shape = (draw(st.integers(8, 40)), draw(st.integers(8, 40)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    data = rng.normal(100.0, 10.0, shape)
    if dtype.kind == "i":
        data = np.round(data)
    data = data.astype(dtype)
    if dtype.kind == "f" and draw(st.booleans()):
        data[rng.integers(0, shape[0], 3), rng.integers(0, shape[1], 3)] = np.nan
    mask = rng.random(shape) < 0.1 if draw(st.booleans()) else None
    var = rng.uniform(1.0, 50.0, shape)
    if not dtype.isnative:
        var = var.astype(dtype)  # a big-endian uncertainty too
    unc_key = draw(st.sampled_from(sorted(_UNCERTAINTIES)))
    unc = _UNCERTAINTIES[unc_key]
    unit_key = draw(st.sampled_from(sorted(_UNITS)))
    unit, kwargs, header = _UNITS[unit_key]
    ccd = CCDData(data, unit=unit, mask=mask,
                  uncertainty=None if unc is None else unc(var, unit), meta=dict(header))
    return ccd, kwargs, unit_key, var if unc is not None else None


def _snapshot(ccd: CCDData) -> dict:
    unc = ccd.uncertainty
    return {
        "data": ccd.data.copy(),
        "dtype": ccd.data.dtype,
        "mask": None if ccd.mask is None else ccd.mask.copy(),
        "uncertainty": None if unc is None else (type(unc), unc.array.copy()),
        "meta": copy.deepcopy(dict(ccd.meta)),
        "unit": ccd.unit,
    }


def _assert_unchanged(ccd: CCDData, before: dict) -> None:
    after = _snapshot(ccd)
    assert after["dtype"] == before["dtype"]
    np.testing.assert_array_equal(after["data"], before["data"])
    if before["mask"] is None:
        assert after["mask"] is None
    else:
        np.testing.assert_array_equal(after["mask"], before["mask"])
    if before["uncertainty"] is None:
        assert after["uncertainty"] is None
    else:
        assert after["uncertainty"][0] is before["uncertainty"][0]
        np.testing.assert_array_equal(after["uncertainty"][1], before["uncertainty"][1])
    assert after["meta"] == before["meta"]
    assert after["unit"] == before["unit"]


@_bounded(200)
@given(case=ccds(), dtype=st.sampled_from([np.float64, np.float32]),
       container=st.sampled_from(["CCDData", "NDData", "array"]))
def test_ccddata_round_trip(case, dtype, container):
    """to_image (in float64 or float32) then as_ccddata keeps the values (native byte
    order), the unit, the mask (the input's OR the non-finite pixels) and the
    uncertainty (as a standard deviation, any input class, with or without its own
    unit), and leaves the caller's CCDData untouched.  The same image given as an
    NDData, or as a plain array with ``unit``, ``mask`` and ``uncertainty`` passed to
    to_image, gives the same ImageData."""
    ccd, kwargs, _, var = case
    # float32 round-off where the work or the given uncertainty (e.g. >f4) is float32
    single = var is not None and var.dtype.kind == "f" and var.dtype.itemsize < 8
    rtol = 1e-12 if dtype == np.float64 and not single else 1e-6
    before = _snapshot(ccd)
    if container == "NDData":
        image = NDData(ccd.data, unit=ccd.unit, mask=ccd.mask, uncertainty=ccd.uncertainty,
                       meta=ccd.meta)
    elif container == "array":
        image = ccd.data
        kwargs = {**kwargs, "unit": ccd.unit, "mask": ccd.mask,
                  "uncertainty": ccd.uncertainty, "gain": kwargs.get("gain", ccd.meta.get("GAIN"))}
    else:
        image = ccd
    img = to_image(image, saturation=np.inf, dtype=dtype, **kwargs)
    _assert_unchanged(ccd, before)

    assert img.data.dtype == dtype and img.data.dtype.isnative
    assert img.variance.dtype == dtype
    assert not np.shares_memory(img.data, ccd.data)
    expected = np.asarray(ccd.data, dtype=dtype)
    np.testing.assert_array_equal(img.data, expected)
    bad = ~np.isfinite(expected)
    if ccd.mask is not None:
        bad |= ccd.mask
    if var is not None:
        np.testing.assert_array_equal(img.mask, bad)
        np.testing.assert_allclose(img.variance, var, rtol=rtol)
        assert not img.variance_estimated
    else:
        assert img.variance_estimated
        assert np.all(img.mask[bad])
        good = ~img.mask
        assert np.all(np.isfinite(img.variance[good])) and np.all(img.variance[good] > 0)

    back = as_ccddata(img)
    assert back.unit == ccd.unit
    np.testing.assert_array_equal(back.data, expected)
    np.testing.assert_array_equal(back.mask, img.mask)
    back_var = back.uncertainty.represent_as(VarianceUncertainty).array
    np.testing.assert_allclose(back_var, img.variance, rtol=rtol)
    # as_ccddata is a view of the ImageData: coercing it again gives the same arrays
    again = to_image(back, saturation=np.inf, dtype=dtype, **case[1])
    np.testing.assert_array_equal(again.data, img.data)
    np.testing.assert_array_equal(again.mask, img.mask)
    np.testing.assert_allclose(again.variance, img.variance, rtol=rtol)
    _assert_unchanged(ccd, before)


@_bounded(150)
@given(case=ccds())
def test_unit_conversion_round_trip(case):
    """Converting to electrons (through the gain or the exposure time) multiplies the
    data by the factor and the variance by its square, and converting back restores
    both; neither the ImageData nor the CCDData is modified."""
    ccd, kwargs, unit_key, _ = case
    img = to_image(ccd, saturation=np.inf, **kwargs)
    data, variance = img.data.copy(), img.variance.copy()
    factor = {"electron": 1.0, "adu+gain": 1.7, "adu+GAIN": 2.3, "electron/s": 30.0}[unit_key]
    gain = kwargs.get("gain")
    electrons = match_unit(img, u.electron, gain=gain, name="image", target="electrons")
    assert electrons.unit == u.electron
    np.testing.assert_allclose(electrons.data, factor * data, rtol=1e-12)
    np.testing.assert_allclose(electrons.variance, factor**2 * variance, rtol=1e-12)
    np.testing.assert_array_equal(electrons.mask, img.mask)
    back = match_unit(electrons, ccd.unit, gain=factor if ccd.unit == u.adu else None,
                      name="image", target="original")
    assert back.unit == ccd.unit
    np.testing.assert_allclose(back.data, data, rtol=1e-12)
    np.testing.assert_allclose(back.variance, variance, rtol=1e-12)
    np.testing.assert_array_equal(img.data, data)
    np.testing.assert_array_equal(img.variance, variance)
