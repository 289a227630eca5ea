"""Science tests of the ZOGY core against truth: identities, noise statistics, injections."""

import numpy as np
import pytest
from scipy import stats

from astro_zackay.fourier import convolve_fft, correlate_fft, psf_rfft, shift_image
from astro_zackay.zogy import _grow_mask, fit_flux_ratio, fit_shift, zogy


def gaussian_psf(sigma, size=None, ellip=0.0):
    size = size or int(2 * np.ceil(5 * sigma) + 1)
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    p = np.exp(-0.5 * ((x / (sigma * (1 + ellip))) ** 2 + (y / (sigma * (1 - ellip))) ** 2))
    return p / p.sum()


def render(shape, ys, xs, fluxes, psf):
    """Point sources at integer pixels convolved with ``psf`` (noise-free)."""
    sky = np.zeros(shape)
    np.add.at(sky, (np.asarray(ys, int), np.asarray(xs, int)), fluxes)
    return convolve_fft(sky, psf_rfft(psf, shape))


def star_field(rng, shape, n, fmin, fmax, margin=25):
    ys = rng.integers(margin, shape[0] - margin, n)
    xs = rng.integers(margin, shape[1] - margin, n)
    return ys, xs, np.exp(rng.uniform(np.log(fmin), np.log(fmax), n))


CONFIGS = [  # sigma_psf_new, sigma_psf_ref, sigma_new, sigma_ref, flux_new, flux_ref
    (2.3, 1.5, 3.0, 1.2, 1.7, 1.0),
    (1.4, 2.1, 1.0, 2.5, 0.6, 1.3),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_identities(cfg):
    spn, spr, sn, sr, fn, fr = cfg
    rng = np.random.default_rng(10)
    shape = (128, 144)
    new, ref = rng.normal(0, sn, shape), rng.normal(0, sr, shape)
    pn, pr = gaussian_psf(spn, ellip=0.1), gaussian_psf(spr)
    kw = dict(sigma_new=sn, sigma_ref=sr, flux_new=fn, flux_ref=fr)
    res = zogy(new, ref, pn, pr, **kw)
    p_d = res.psf_d_at_origin
    assert p_d.sum() == pytest.approx(1.0, abs=1e-12)
    assert pytest.approx(res.F_D**2 * (p_d**2).sum(), rel=1e-12) == res.F_S
    assert pytest.approx(fn * fr / np.sqrt(sn**2 * fr**2 + sr**2 * fn**2), rel=1e-14) == res.F_D
    s_check = res.F_D * correlate_fft(res.D, np.fft.rfft2(p_d))
    assert np.max(np.abs(s_check - res.S)) < 1e-12 * np.max(np.abs(res.S))
    np.testing.assert_allclose(res.Scorr, res.S / np.sqrt(res.F_S), rtol=1e-12)
    np.testing.assert_allclose(res.alpha, res.S / res.F_S, rtol=1e-14)
    # constant variance maps give the same Scorr through the convolution path
    res_v = zogy(
        new, ref, pn, pr, var_new=np.full(shape, sn**2), var_ref=np.full(shape, sr**2), **kw
    )
    np.testing.assert_allclose(res_v.Scorr, res.Scorr, rtol=1e-8, atol=1e-10)
    # swapping the images gives D -> -D
    swap = zogy(ref, new, pr, pn, sigma_new=sr, sigma_ref=sn, flux_new=fr, flux_ref=fn)
    np.testing.assert_allclose(swap.D, -res.D, atol=1e-12)
    np.testing.assert_allclose(swap.S, -res.S, atol=1e-12 * np.abs(res.S).max())


def test_identical_psfs_give_plain_difference():
    # D_h = (P/|P|) (N_h - R_h) / sqrt(sn**2 + sr**2): the plain difference needs a PSF whose
    # transform is >= 0 and well above FFT round-off (a truncated Gaussian has sign flips at
    # the 1e-7 level), so use a binomial PSF (transform cos(pi ky)**2 cos(pi kx)**2 >= 3e-7)
    # on odd-sized grids (no exact zero at the Nyquist frequency)
    rng = np.random.default_rng(11)
    shape = (65, 63)
    new, ref = rng.normal(0, 2.0, shape), rng.normal(0, 0.7, shape)
    b = np.array([1.0, 2.0, 1.0]) / 4
    psf = np.outer(b, b)
    res = zogy(new, ref, psf, psf, sigma_new=2.0, sigma_ref=0.7)
    np.testing.assert_allclose(res.D, (new - ref) / np.sqrt(2.0**2 + 0.7**2), atol=1e-10)
    np.testing.assert_allclose(res.psf_d_stamp(3), psf, atol=1e-12)


def test_noiseless_reference_limit_is_psf_fit_snr():
    # as sr -> 0 the S/N of a transient becomes Fn * alpha * sqrt(sum(Pn**2)) / sn
    rng = np.random.default_rng(12)
    shape = (96, 96)
    pn, pr = gaussian_psf(2.2), gaussian_psf(1.3)
    sn, fn = 3.0, 1.4
    res = zogy(
        rng.normal(size=shape),
        rng.normal(size=shape),
        pn,
        pr,
        sigma_new=sn,
        sigma_ref=1e-7,
        flux_new=fn,
    )
    assert np.sqrt(res.F_S) == pytest.approx(fn * np.sqrt((pn**2).sum()) / sn, rel=1e-6)


def test_noise_only_statistics():
    """|std(D)-1| < 0.3 %, |std(Scorr)-1| < 1 %, Gaussian shape, white: 2 x 1 Mpix."""
    rng = np.random.default_rng(13)
    shape = (1024, 1024)
    ds, scorrs = [], []
    for spn, spr, sn, sr, fn, fr in CONFIGS:
        new, ref = rng.normal(0, sn, shape), rng.normal(0, sr, shape)
        res = zogy(
            new,
            ref,
            gaussian_psf(spn, ellip=0.1),
            gaussian_psf(spr),
            sigma_new=sn,
            sigma_ref=sr,
            flux_new=fn,
            flux_ref=fr,
        )
        d = res.D
        assert abs(d.std() - 1) < 0.003
        assert abs(res.Scorr.std() - 1) < 0.01
        for axis in (0, 1):
            lag1 = np.mean(d * np.roll(d, 1, axis=axis))
            assert abs(lag1) < 0.005
        ds.append(d.ravel())
        scorrs.append(res.Scorr.ravel())
    d = np.concatenate(ds)
    assert abs(stats.skew(d)) < 0.01
    assert abs(stats.kurtosis(d)) < 0.01
    # tail of Scorr: expected 0.57 per Mpix beyond 5 sigma -> none of 2 Mpix expected above 6
    assert np.max(np.abs(np.concatenate(scorrs))) < 6.0


def poisson_pair(rng, shape, beta, sn, sr, pn, pr, n_star=150):
    ys, xs, fl = star_field(rng, shape, n_star, 100, 3e4)
    mn, mr = beta * render(shape, ys, xs, fl, pn), render(shape, ys, xs, fl, pr)
    var_n, var_r = sn**2 + np.clip(mn, 0, None), sr**2 + np.clip(mr, 0, None)
    new = mn + rng.normal(size=shape) * np.sqrt(var_n)
    ref = mr + rng.normal(size=shape) * np.sqrt(var_r)
    return new, ref, var_n, var_r


def test_scorr_with_variance_maps_on_poisson_images():
    rng = np.random.default_rng(14)
    shape = (512, 512)
    pn, pr = gaussian_psf(2.0), gaussian_psf(1.4)
    new, ref, var_n, var_r = poisson_pair(rng, shape, 1.3, 4.0, 2.0, pn, pr)
    res = zogy(
        new, ref, pn, pr, sigma_new=4.0, sigma_ref=2.0, flux_new=1.3, var_new=var_n, var_ref=var_r
    )
    assert abs(res.Scorr.std() - 1) < 0.01
    # background-only Scorr is too wide on stars: source noise matters
    plain = zogy(new, ref, pn, pr, sigma_new=4.0, sigma_ref=2.0, flux_new=1.3)
    assert plain.Scorr.std() > 1.02


def test_float32_matches_float64():
    rng = np.random.default_rng(15)
    shape = (256, 256)
    pn, pr = gaussian_psf(2.4, ellip=0.15), gaussian_psf(1.5)
    new, ref, var_n, var_r = poisson_pair(rng, shape, 0.8, 3.0, 2.0, pn, pr, n_star=40)
    kw = dict(sigma_new=3.0, sigma_ref=2.0, flux_new=0.8, var_new=var_n, var_ref=var_r)
    r64 = zogy(new, ref, pn, pr, **kw)
    r32 = zogy(new.astype(np.float32), ref.astype(np.float32), pn, pr, dtype=np.float32, **kw)
    assert r32.D.dtype == np.float32 and r32.Scorr.dtype == np.float32
    for name in ("D", "Scorr"):
        a32 = getattr(r32, name)
        assert np.all(np.isfinite(a32))
        assert np.max(np.abs(a32 - getattr(r64, name))) < 1e-2


def injection_setup(rng, shape, spacing, snr, pn, pr, sn, sr, fn, source_noise):
    ys, xs = np.mgrid[spacing // 2 : shape[0] : spacing, spacing // 2 : shape[1] : spacing]
    ys, xs = ys.ravel(), xs.ravel()
    # flux for the requested background-limited S/N, from F_S of a dummy run
    f_s = zogy(
        np.zeros(shape), np.zeros(shape), pn, pr, sigma_new=sn, sigma_ref=sr, flux_new=fn
    ).F_S
    alpha = snr / np.sqrt(f_s) * rng.uniform(0.8, 1.6, ys.size)
    model = fn * render(shape, ys, xs, alpha, pn)
    var_n = sn**2 + (model if source_noise else 0.0)
    new = model + rng.normal(size=shape) * np.sqrt(var_n)
    ref = rng.normal(0, sr, shape)
    return ys, xs, alpha, new, ref, var_n


def test_injection_scorr_matches_true_snr():
    rng = np.random.default_rng(16)
    shape, sn, sr, fn = (1024, 1024), 5.0, 3.0, 1.2
    pn, pr = gaussian_psf(2.2), gaussian_psf(1.6)
    ys, xs, alpha, new, ref, _ = injection_setup(rng, shape, 24, 8.0, pn, pr, sn, sr, fn, False)
    res = zogy(new, ref, pn, pr, sigma_new=sn, sigma_ref=sr, flux_new=fn)
    true_snr = alpha * np.sqrt(res.F_S)
    ratio = res.Scorr[ys, xs].mean() / true_snr.mean()
    assert abs(ratio - 1) < 0.02
    pulls = (res.alpha[ys, xs] - alpha) / res.alpha_err[ys, xs]
    assert ys.size > 1500
    assert abs(pulls.mean()) < 0.1
    assert abs(pulls.std() - 1) < 0.05


def test_injection_photometry_with_source_noise():
    rng = np.random.default_rng(17)
    shape, sn, sr, fn = (1024, 1024), 3.0, 2.0, 0.9
    pn, pr = gaussian_psf(1.7), gaussian_psf(2.0)
    ys, xs, alpha, new, ref, var_n = injection_setup(rng, shape, 24, 25.0, pn, pr, sn, sr, fn, True)
    res = zogy(new, ref, pn, pr, sigma_new=sn, sigma_ref=sr, flux_new=fn, var_new=var_n)
    pulls = (res.alpha[ys, xs] - alpha) / res.alpha_err[ys, xs]
    assert abs(pulls.mean()) < 0.1
    assert abs(pulls.std() - 1) < 0.05
    assert abs(np.median(res.alpha[ys, xs] / alpha) - 1) < 0.005
    # ignoring source noise underestimates the errors of these bright sources
    plain = zogy(new, ref, pn, pr, sigma_new=sn, sigma_ref=sr, flux_new=fn)
    assert ((plain.alpha[ys, xs] - alpha) / plain.alpha_err[ys, xs]).std() > 1.1


def test_astrometric_and_flux_ratio_terms_suppress_bright_star_residuals():
    rng = np.random.default_rng(18)
    shape = (256, 256)
    pn, pr = gaussian_psf(2.0), gaussian_psf(1.5)
    ys, xs, fl = star_field(rng, shape, 30, 5e4, 2e5)
    sn, sr = 5.0, 3.0
    mr = render(shape, ys, xs, fl, pr)
    mn = shift_image(render(shape, ys, xs, fl, pn), 0.05, -0.04) * 1.02  # misregistered, 2 % flux
    var_n, var_r = sn**2 + mn, sr**2 + mr
    new = mn + rng.normal(size=shape) * np.sqrt(var_n)
    ref = mr + rng.normal(size=shape) * np.sqrt(var_r)
    kw = dict(sigma_new=sn, sigma_ref=sr, var_new=var_n, var_ref=var_r)
    bare = zogy(new, ref, pn, pr, **kw)
    full = zogy(new, ref, pn, pr, astrometric_noise_new=(0.05, 0.05), flux_ratio_error=0.02, **kw)
    assert bare.V_ast is None and full.V_ast is not None and full.V_beta is not None
    assert np.max(np.abs(bare.Scorr)) > 10
    assert np.max(np.abs(full.Scorr)) < 5


def test_nan_mask_and_padding():
    rng = np.random.default_rng(19)
    shape = (100, 90)
    pn, pr = gaussian_psf(1.5), gaussian_psf(1.2)
    new, ref = rng.normal(0, 2, shape), rng.normal(0, 1, shape)
    new_nan = new.copy()
    new_nan[40, 30] = np.nan
    mask = np.zeros(shape, bool)
    mask[10, 70] = True
    keep = new_nan.copy()
    res = zogy(new_nan, ref, pn, pr, sigma_new=2, sigma_ref=1, mask=mask, pad=True)
    np.testing.assert_array_equal(new_nan, keep)  # inputs untouched
    assert res.D.shape == shape and np.all(np.isfinite(res.D)) and np.all(np.isfinite(res.Scorr))
    assert res.mask[40, 30] and res.mask[40, 34] and res.mask[10, 70] and res.mask[0, 0]
    assert not res.mask[60, 50]
    assert res.psf_d_at_origin.shape[0] >= shape[0] + 2 * 11
    # far from edges and bad pixels the padded result equals a manual zero fill
    bad = ~np.isfinite(new_nan) | mask  # a bad pixel of either image is zeroed in both
    manual = zogy(
        np.pad(np.where(bad, 0, new_nan), 30),
        np.pad(np.where(bad, 0, ref), 30),
        pn,
        pr,
        sigma_new=2,
        sigma_ref=1,
    )
    np.testing.assert_allclose(res.D[20:80, 40:60], manual.D[50:110, 70:90], atol=1e-10)


def test_input_errors():
    img = np.zeros((32, 32))
    psf = gaussian_psf(1.0)
    with pytest.raises(ValueError, match="odd"):
        zogy(img, img, np.full((4, 4), 1 / 16), psf, sigma_new=1, sigma_ref=1)
    with pytest.raises(ValueError, match="unit sum"):
        zogy(img, img, 2 * psf, psf, sigma_new=1, sigma_ref=1)
    with pytest.raises(ValueError, match="shape"):
        zogy(img, np.zeros((32, 30)), psf, psf, sigma_new=1, sigma_ref=1)
    with pytest.raises(ValueError, match="sigma_ref"):
        zogy(img, img, psf, psf, sigma_new=1, sigma_ref=0)
    with pytest.raises(ValueError, match="negative"):
        zogy(img, img, psf, psf, sigma_new=1, sigma_ref=1, var_new=np.full((32, 32), -1.0))
    with pytest.raises(ValueError, match="dtype"):
        zogy(img, img, psf, psf, sigma_new=1, sigma_ref=1, dtype=np.int32)


@pytest.mark.parametrize("beta,offset", [(0.7, 3.0), (1.6, -5.0)])
def test_fit_flux_ratio(beta, offset):
    rng = np.random.default_rng(20 + int(10 * beta))
    shape = (512, 512)
    pn, pr = gaussian_psf(2.2, ellip=0.1), gaussian_psf(1.5)
    sn, sr = 4.0, 2.0
    new, ref, _, _ = poisson_pair(rng, shape, beta, sn, sr, pn, pr, n_star=300)
    new = new + offset
    fit = fit_flux_ratio(new, ref, pn, pr, sigma_new=sn, sigma_ref=sr)
    assert fit.converged
    assert abs(fit.beta - beta) < 3 * fit.beta_err
    assert abs(fit.beta / beta - 1) < 0.005
    assert abs(fit.background_offset - offset) < 4 * fit.background_offset_err
    assert fit.n_used > 1000


def test_fit_shift():
    rng = np.random.default_rng(30)
    shape = (512, 512)
    pn, pr = gaussian_psf(2.2, ellip=0.1), gaussian_psf(1.5)
    sn, sr = 4.0, 2.0
    ys, xs, fl = star_field(rng, shape, 300, 100, 1e5)
    mr = render(shape, ys, xs, fl, pr)
    mn = 1.3 * shift_image(render(shape, ys, xs, fl, pn), 0.3, -0.2)
    new = mn + 1.0 + rng.normal(size=shape) * np.sqrt(sn**2 + np.clip(mn, 0, None))
    ref = mr + rng.normal(size=shape) * np.sqrt(sr**2 + np.clip(mr, 0, None))
    fit = fit_shift(new, ref, pn, pr, sigma_new=sn, sigma_ref=sr)
    assert fit.converged
    assert abs(fit.dx - 0.3) < 0.02 and abs(fit.dy + 0.2) < 0.02
    assert abs(fit.dx - 0.3) < 4 * fit.dx_err and abs(fit.dy + 0.2) < 4 * fit.dy_err
    assert abs(fit.beta / 1.3 - 1) < 0.005
    # a large integer + fractional shift is found from the cross-correlation start
    big = fit_shift(shift_image(new, -3, 2), ref, pn, pr, sigma_new=sn, sigma_ref=sr)
    assert abs(big.dx + 2.7) < 0.02 and abs(big.dy - 1.8) < 0.02


def test_mask_radius_is_the_kernel_core_not_the_stamp():
    """Masks and edges grow by the radius of S's kernel cores, whatever the stamp size.

    With identical PSFs and noises S's kernels are the PSF itself (``kn_h = P_h / (2
    sigma**2)``), so the radius is that of the disk holding 99 % of ``sum(P**2)`` (5 px
    for a Gaussian of sigma 2 px on the pixel grid), not half of the 61 px stamp: the
    edge of a noise image grows by it; a lone masked pixel at sky level by a disk of
    at least that radius (taken as the core of a star as bright as its rim allows).
    """
    psf = gaussian_psf(2.0, size=61)
    r = np.hypot(*np.mgrid[-30:31, -30:31]).ravel()
    order = np.argsort(r, kind="stable")
    energy = np.cumsum(psf.ravel()[order] ** 2)
    truth = int(np.ceil(r[order][np.searchsorted(energy, 0.99 * energy[-1])]))
    rng = np.random.default_rng(5)
    shape = (128, 128)
    new, ref = rng.normal(0, 1, shape), rng.normal(0, 1, shape)
    res = zogy(new, ref, psf, psf, sigma_new=1, sigma_ref=1, pad=True)
    assert res.mask_radius == truth == 5
    edge = np.ones(shape, bool)
    edge[truth:-truth, truth:-truth] = False
    np.testing.assert_array_equal(res.mask, edge)
    mask = np.zeros(shape, bool)
    mask[64, 64] = True
    res = zogy(new, ref, psf, psf, sigma_new=1, sigma_ref=1, mask=mask, pad=True)
    distance = np.hypot(*np.mgrid[-64:64, -64:64])
    grown = res.mask & ~edge
    assert grown[distance <= truth].all() and distance[grown].max() < 15


@pytest.mark.parametrize("flux", [3e5, 3e6])
def test_masked_saturated_core_moves_scorr_less_than_a_tenth_sigma_outside_the_mask(flux):
    """A saturated star's masked core: outside the grown mask Scorr is that of the true data.

    A Gaussian star (sigma 2 and 1.5 px, flux 3e5 or 3e6 against unit noise) whose
    pixels above 2000 are masked in both images: the light the mask hides moves Scorr
    by less than MASK_SCORR_CHANGE (0.1 sigma) beyond the grown mask (grown by the sky
    radius alone, 5 px, it leaves 50-75 sigma there), which stays far smaller than the
    61 px stamp the masks used to grow by.
    """
    pn, pr = gaussian_psf(2.0, size=61), gaussian_psf(1.5, size=61)
    rng = np.random.default_rng(6)
    shape = (160, 160)
    new = render(shape, [80], [79], [flux], pn) + rng.normal(0, 1, shape)
    ref = render(shape, [80], [79], [flux], pr) + rng.normal(0, 1, shape)
    saturated = (new > 2000) | (ref > 2000)
    masked = zogy(new, ref, pn, pr, sigma_new=1, sigma_ref=1, mask=saturated, pad=True)
    whole = zogy(new, ref, pn, pr, sigma_new=1, sigma_ref=1, pad=True)
    outside = ~masked.mask
    assert np.max(np.abs(masked.Scorr - whole.Scorr)[outside]) < 0.1
    grown = ~outside[masked.mask_radius:-masked.mask_radius, masked.mask_radius:-masked.mask_radius]
    assert grown.sum() < 61**2 / 2


# --------------------------------------------------------------------------------------
# correlated noise, PSF error and the reference shift inside the core


def correlated_noise(rng, shape, sigma, taper):
    """White noise smoothed by ``[taper, 1, taper]`` along x and y, per-pixel rms ``sigma``.

    Its lag-1 correlation along each axis is ``2 taper / (1 + 2 taper**2)`` and its power
    spectrum per pixel ``sigma**2 * H(kx)**2 H(ky)**2 / (1 + 2 taper**2)**2`` with
    ``H(k) = 1 + 2 taper cos(2 pi k)``.
    """
    from scipy import ndimage

    k = np.array([taper, 1.0, taper]) / np.sqrt(1 + 2 * taper**2)
    white = rng.normal(0.0, sigma, shape)
    return ndimage.convolve1d(ndimage.convolve1d(white, k, axis=1, mode="wrap"), k, axis=0,
                              mode="wrap")


def true_spectrum(shape, sigma, taper):
    from astro_zackay.fourier import frequency_grids

    ky, kx = frequency_grids(shape)
    h = (1 + 2 * taper * np.cos(2 * np.pi * kx)) * (1 + 2 * taper * np.cos(2 * np.pi * ky))
    return sigma**2 * h**2 / (1 + 2 * taper**2) ** 2


@pytest.mark.parametrize("cfg", CONFIGS)
def test_white_spectrum_equals_scalar_sigma(cfg):
    """A flat spectrum sigma**2 gives the scalar-sigma outputs to float precision."""
    spn, spr, sn, sr, fn, fr = cfg
    rng = np.random.default_rng(11)
    shape = (128, 144)
    new, ref = rng.normal(0, sn, shape), rng.normal(0, sr, shape)
    pn, pr = gaussian_psf(spn, ellip=0.1), gaussian_psf(spr)
    var_n, var_r = np.full(shape, sn**2), np.full(shape, sr**2)
    var_n[40:50, 60:70] += 30.0  # a source's excess
    kw = dict(sigma_new=sn, sigma_ref=sr, flux_new=fn, flux_ref=fr, var_new=var_n, var_ref=var_r)
    half = (shape[0], shape[1] // 2 + 1)
    a = zogy(new, ref, pn, pr, **kw)
    b = zogy(new, ref, pn, pr, noise_spectrum_new=np.full(half, sn**2),
             noise_spectrum_ref=np.full(half, sr**2), **kw)
    for name in ("D", "S", "Scorr", "psf_d_at_origin"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-9,
                                   atol=1e-12 * np.abs(getattr(a, name)).max())
    assert pytest.approx(a.F_D, rel=1e-14) == b.F_D
    assert pytest.approx(a.F_S, rel=1e-12) == b.F_S


def test_identities_hold_with_a_noise_spectrum():
    """S == F_D (D ⋆ P_D), F_S == F_D**2 sum(P_D**2), sum(P_D) == 1 with a correlated spectrum."""
    shape = (128, 144)
    rng = np.random.default_rng(12)
    new, ref = correlated_noise(rng, shape, 2.0, 0.3), correlated_noise(rng, shape, 1.0, 0.2)
    pn, pr = gaussian_psf(2.0), gaussian_psf(1.4)
    res = zogy(new, ref, pn, pr, sigma_new=2.0, sigma_ref=1.0, flux_new=0.8,
               noise_spectrum_new=true_spectrum(shape, 2.0, 0.3),
               noise_spectrum_ref=true_spectrum(shape, 1.0, 0.2))
    p_d = res.psf_d_at_origin
    assert p_d.sum() == pytest.approx(1.0, abs=1e-12)
    assert pytest.approx(res.F_D**2 * (p_d**2).sum(), rel=1e-12) == res.F_S
    s_check = res.F_D * correlate_fft(res.D, np.fft.rfft2(p_d))
    assert np.max(np.abs(s_check - res.S)) < 1e-12 * np.max(np.abs(res.S))
    np.testing.assert_allclose(res.Scorr, res.S / np.sqrt(res.F_S), rtol=1e-12)


@pytest.mark.parametrize("taper", [0.1, 0.2, 0.3])
def test_correlated_noise_gives_white_d_and_unit_scorr(taper):
    """Lag-1 correlations 0.19-0.51: std(Scorr) = 1 +- 0.02 and D white with the spectra.

    Assuming white noise instead leaves std(Scorr) 1.35-2.0 (checked, so that the test
    can fail) although std(D) stays ~1.
    """
    shape = (512, 512)
    rng = np.random.default_rng(int(taper * 100))
    new = correlated_noise(rng, shape, 3.0, taper)
    ref = correlated_noise(rng, shape, 2.0, taper)
    pn, pr = gaussian_psf(3.5 / 2.355), gaussian_psf(2.5 / 2.355)
    kw = dict(sigma_new=3.0, sigma_ref=2.0, flux_new=0.8, var_new=np.full(shape, 9.0),
              var_ref=np.full(shape, 4.0))
    white = zogy(new, ref, pn, pr, **kw)
    res = zogy(new, ref, pn, pr, noise_spectrum_new=true_spectrum(shape, 3.0, taper),
               noise_spectrum_ref=true_spectrum(shape, 2.0, taper), **kw)
    assert np.std(white.Scorr) > 1.3
    assert abs(np.std(res.Scorr) - 1.0) < 0.02
    assert abs(np.std(res.D) - 1.0) < 0.005
    for a, b in ((res.D[:, 1:], res.D[:, :-1]), (res.D[1:], res.D[:-1])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01


def test_psf_error_term_suppresses_a_bright_star_residual_not_a_transient():
    """A 2 % PSF mismatch on a bright star reads > 5 sigma without V_psf, < 5 with eps = 2 %.

    A new point source (absent from the reference) keeps its Scorr within 0.5 %.
    """
    shape = (128, 128)
    rng = np.random.default_rng(13)
    pn, pr = gaussian_psf(2.0), gaussian_psf(1.5)
    wrong = gaussian_psf(2.0 * 1.02)  # the science PSF model is 2 % too wide
    star = render(shape, [40], [40], [3e5], pn)
    ref = render(shape, [40], [40], [3e5], pr) + rng.normal(0, 5.0, shape)
    new = star + render(shape, [90], [90], [600.0], pn) + rng.normal(0, 5.0, shape)
    kw = dict(sigma_new=5.0, sigma_ref=5.0, var_new=25.0 + np.abs(new),
              var_ref=25.0 + np.abs(ref))
    plain = zogy(new, ref, wrong, pr, **kw)
    with_eps = zogy(new, ref, wrong, pr, psf_error_new=0.02, psf_error_ref=0.0, **kw)
    near = (slice(30, 51), slice(30, 51))
    assert np.abs(plain.Scorr[near]).max() > 5
    assert np.abs(with_eps.Scorr[near]).max() < 5
    assert with_eps.V_psf is not None and plain.V_psf is None
    assert with_eps.Scorr[90, 90] == pytest.approx(plain.Scorr[90, 90], rel=0.005)


def test_shift_ref_is_the_phase_ramp_of_the_reference():
    """shift_ref gives the outputs of a Fourier-shifted reference (and variance map)."""
    shape = (96, 120)
    rng = np.random.default_rng(14)
    pn, pr = gaussian_psf(2.0), gaussian_psf(1.5)
    ref = render(shape, [40, 60], [30, 80], [3e4, 1e4], pr) + rng.normal(0, 2.0, shape)
    new = rng.normal(0, 3.0, shape)
    var_r = 4.0 + np.abs(ref)
    kw = dict(sigma_new=3.0, sigma_ref=2.0, flux_new=1.3, var_new=np.full(shape, 9.0))
    shifted = zogy(new, shift_image(ref, 1.3, -0.4), pn, pr,
                   var_ref=shift_image(var_r, 1.3, -0.4), **kw)
    inside = zogy(new, ref, pn, pr, var_ref=var_r, shift_ref=(1.3, -0.4), **kw)
    for name in ("D", "S", "Scorr"):
        a, b = getattr(shifted, name), getattr(inside, name)
        assert np.max(np.abs(a - b)) < 1e-9 * np.max(np.abs(a))


def test_float32_matches_float64_with_spectrum_shift_and_psf_error():
    """The new terms keep the float32 path finite and within 1e-4 sigma of float64."""
    shape = (256, 256)
    rng = np.random.default_rng(15)
    new, ref = correlated_noise(rng, shape, 3.0, 0.2), correlated_noise(rng, shape, 2.0, 0.2)
    kw = dict(sigma_new=3.0, sigma_ref=2.0, flux_new=0.8, var_new=np.full(shape, 9.0),
              var_ref=np.full(shape, 4.0), noise_spectrum_new=true_spectrum(shape, 3.0, 0.2),
              noise_spectrum_ref=true_spectrum(shape, 2.0, 0.2), psf_error_new=0.01,
              psf_error_ref=0.01, shift_ref=(0.3, -0.2))
    a = zogy(new, ref, gaussian_psf(1.5), gaussian_psf(1.1), **kw)
    b = zogy(new, ref, gaussian_psf(1.5), gaussian_psf(1.1), dtype=np.float32, **kw)
    assert b.Scorr.dtype == np.float32 and np.isfinite(b.Scorr).all()
    assert np.max(np.abs(a.Scorr - b.Scorr)) < 1e-4


def test_new_input_errors():
    img, psf = np.zeros((32, 32)), gaussian_psf(1.0)
    kw = dict(sigma_new=1.0, sigma_ref=1.0)
    with pytest.raises(ValueError, match=r"noise_spectrum_new has shape \(32, 32\).*\(32, 17\)"):
        zogy(img, img, psf, psf, noise_spectrum_new=np.ones((32, 32)), **kw)
    with pytest.raises(ValueError, match="noise_spectrum_ref must be finite and positive"):
        zogy(img, img, psf, psf, noise_spectrum_ref=np.zeros((32, 17)), **kw)
    with pytest.raises(ValueError, match="psf_error_ref must be >= 0"):
        zogy(img, img, psf, psf, psf_error_ref=-0.01, **kw)
    with pytest.raises(ValueError, match="shift_ref must be a finite"):
        zogy(img, img, psf, psf, shift_ref=(np.nan, 0.0), **kw)
    with pytest.raises(ValueError, match="mask_ref shape"):
        zogy(img, img, psf, psf, mask_ref=np.zeros((4, 4), bool), **kw)


@pytest.mark.parametrize("engine", ["zogy", "zogy_field"])
def test_flux_ratio_error_of_a_shifted_very_bright_star_only_adds_variance(engine):
    """V_beta of a 1e7 e- star moved by a sub-pixel shift is >= 0: |Scorr| only shrinks.

    The squared reference rings under the shift's phase ramp; unclipped, its negative
    lobes cancelled the source noise along whole rows and sent Scorr to ~1e6.
    """
    from astro_zackay._zogy_field import zogy_field
    from astro_zackay.fourier import convolve_fft, psf_rfft, shift_image
    from astro_zackay.profiles import psf_stamp

    n, rng = 128, np.random.default_rng(1)
    psf = psf_stamp(15, 2.0)
    star = np.zeros((n, n))
    star[64, 64] = 1e7
    img = convolve_fft(star, psf_rfft(psf, (n, n)))
    # the reference's star sits where the shift (0.4, 0.3) moves it onto the new image's
    ref = shift_image(img, -0.4, -0.3) + rng.normal(0, 10, (n, n))
    new = img + rng.normal(0, 10, (n, n))
    var = 100.0 + np.maximum(img, 0)
    scores = []
    for sigma_beta in (0.0, 0.05):
        if engine == "zogy":
            res = zogy(new, ref, psf, psf, sigma_new=10, sigma_ref=10, var_new=var,
                       var_ref=var, flux_ratio_error=sigma_beta, shift_ref=(0.4, 0.3),
                       dtype=np.float64)
            assert res.V_beta is None or res.V_beta.min() >= 0
        else:
            res = zogy_field(new, ref, lambda x, y: psf, lambda x, y: psf,
                             varying=(False, False), rms_new=np.full((n, n), 10.0),
                             rms_ref=np.full((n, n), 10.0), var_new=var, var_ref=var,
                             mask_new=np.zeros((n, n), bool), mask_ref=np.zeros((n, n), bool),
                             flux_ratio=1.0, flux_ratio_error=sigma_beta,
                             shift_ref=(0.4, 0.3), dtype=np.float64)
        scores.append(np.abs(res.Scorr))
    assert np.all(scores[1] <= scores[0] * (1 + 1e-9) + 1e-9)


@pytest.mark.parametrize("n_bad", [3, 210])
def test_grown_mask_flags_the_euclidean_disk_around_each_bad_pixel(n_bad):
    """A few bad pixels (disks painted) or many (a distance transform): the same disks.

    Every pixel with ``dx**2 + dy**2 <= radius**2`` from a bad pixel is flagged and no
    other, brute force over the bad pixels, including those on the image's edges.
    """
    shape = (60, 70)
    rng = np.random.default_rng(4)
    bad = np.zeros(shape, bool)
    bad.ravel()[rng.choice(bad.size, n_bad, replace=False)] = True
    bad[0, 5] = bad[-1, -1] = True
    ys, xs = np.nonzero(bad)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d2 = np.min((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2, axis=-1)
    for radius in (0, 1, 4):
        np.testing.assert_array_equal(_grow_mask(bad, radius), d2 <= radius**2)
    assert not _grow_mask(np.zeros(shape, bool), 4).any()
