"""Science tests of the proper-coaddition core (Zackay & Ofek 2017), and its array backends."""

from dataclasses import dataclass, field

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

from astro_zackay.coadd_algebra import ProperCoaddAccumulator, reject_outliers
from astro_zackay.fourier import (
    ArrayBackend,
    convolve_fft,
    correlate_fft,
    origin_to_stamp,
    psf_rfft,
    psf_to_origin,
)


def gaussian_psf(sigma, size=None):
    size = size or int(2 * np.ceil(5 * sigma) + 1)
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    p = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return p / p.sum()


def frames_setup(rng, n, seeing_sigmas):
    sig = rng.uniform(1.0, 3.0, n)
    flux = rng.uniform(0.5, 2.0, n)
    psfs = [gaussian_psf(s, size=31) for s in seeing_sigmas]
    return sig, flux, psfs


def coadd(frames, psfs, sig, flux, shape, **kw):
    acc = ProperCoaddAccumulator(shape, **kw)
    for m, p, s, f in zip(frames, psfs, sig, flux):
        acc.add(m, p, s, f)
    return acc.finalize()


def test_noise_only_coadd_is_white_unit_variance():
    rng = np.random.default_rng(40)
    shape, n = (1024, 1024), 6
    sig, flux, psfs = frames_setup(rng, n, rng.uniform(1.2, 3.0, n))
    acc = ProperCoaddAccumulator(shape)
    for j in range(n):
        acc.add(rng.normal(0, sig[j], shape), psfs[j], sig[j], flux[j])
    res = acc.finalize()
    assert abs(res.R.std() - 1) < 0.003
    assert abs(np.mean(res.R[:, 1:] * res.R[:, :-1])) < 0.005
    assert pytest.approx(np.sqrt(np.sum(flux**2 / sig**2)), rel=1e-14) == res.F_R
    assert res.psf_r_at_origin.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.fft.rfft2(res.psf_r_at_origin)[0, 0].real == pytest.approx(1.0, abs=1e-12)
    assert res.P_R.sum() == pytest.approx(1.0, abs=1e-12) and res.P_R.shape == (31, 31)
    assert np.unravel_index(np.argmax(res.P_R), res.P_R.shape) == (15, 15)
    assert not res.mask.any() and np.all(res.n_used == n)
    # S is the matched filter of R with P_R, scaled by F_R
    s_check = res.F_R * correlate_fft(res.R, np.fft.rfft2(res.psf_r_at_origin))
    np.testing.assert_allclose(s_check, res.S, atol=1e-10 * np.abs(res.S).max())
    # and its noise variance is the depth
    assert res.S.std() ** 2 == pytest.approx(res.depth_full, rel=0.03)


def test_injected_source_snr_matches_theory():
    rng = np.random.default_rng(41)
    shape, n, f_src = (512, 512), 8, 60.0
    sig, flux, psfs = frames_setup(rng, n, rng.uniform(1.2, 3.0, n))
    theory = f_src * np.sqrt(
        sum(flux[j] ** 2 / sig[j] ** 2 * (psfs[j] ** 2).sum() for j in range(n))
    )
    y0, x0 = 200, 300
    signal = [
        flux[j] * f_src * np.roll(psf_to_origin(psfs[j], shape), (y0, x0), (0, 1)) for j in range(n)
    ]
    noise = [rng.normal(0, sig[j], shape) for j in range(n)]
    sig_res = coadd(signal, psfs, sig, flux, shape)
    noise_res = coadd(noise, psfs, sig, flux, shape)
    # signal part is exact; the noise is measured from the white coadd R
    assert sig_res.snr[y0, x0] == pytest.approx(theory, rel=1e-10)
    measured = sig_res.S[y0, x0] / (np.sqrt(noise_res.depth_full) * noise_res.R.std())
    assert measured == pytest.approx(theory, rel=0.01)
    # a single noisy coadd: flux estimate S/depth within its error
    total = coadd([a + b for a, b in zip(signal, noise)], psfs, sig, flux, shape)
    f_hat = total.S[y0, x0] / total.depth[y0, x0]
    assert abs(f_hat - f_src) < 4 * f_src / theory


def snr_gain(rng, seeing, n=20, shape=(256, 256)):
    """Measured and predicted S/N ratio: proper coadd / inverse-variance mean + matched filter."""
    sig = rng.uniform(1.0, 2.0, n)
    flux = rng.uniform(0.8, 1.2, n)
    psfs = [gaussian_psf(s, size=41) for s in seeing]
    w2 = flux**2 / sig**2
    y0, x0 = 128, 128
    signal = [flux[j] * np.roll(psf_to_origin(psfs[j], shape), (y0, x0), (0, 1)) for j in range(n)]
    noise = [rng.normal(0, sig[j], shape) for j in range(n)]
    res_sig = coadd(signal, psfs, sig, flux, shape)
    res_noise = coadd(noise, psfs, sig, flux, shape)
    snr_proper = res_sig.S[y0, x0] / res_noise.S.std()

    def mean_mf(frames):
        mean = sum((flux[j] / sig[j] ** 2) * frames[j] for j in range(n)) / w2.sum()
        p_mean = sum(w2[j] * psfs[j] for j in range(n)) / w2.sum()
        return correlate_fft(mean, psf_rfft(p_mean, shape)), p_mean

    mf_sig, p_mean = mean_mf(signal)
    mf_noise, _ = mean_mf(noise)
    snr_mean = mf_sig[y0, x0] / mf_noise.std()
    predicted = np.sqrt(
        sum(w2[j] * (psfs[j] ** 2).sum() for j in range(n)) / (w2.sum() * (p_mean**2).sum())
    )
    return snr_proper / snr_mean, predicted


def test_snr_gain_over_weighted_mean():
    rng = np.random.default_rng(42)
    # identical PSFs: no gain at all (the two statistics are proportional)
    measured, predicted = snr_gain(rng, np.full(20, 2.0))
    assert predicted == pytest.approx(1.0, abs=1e-12)
    assert measured == pytest.approx(1.0, abs=1e-9)
    # lognormal seeing (sigma_ln = 0.2): a few per cent (about +3.5 % in theory)
    seeing = 2.0 * np.exp(rng.normal(0, 0.2, 20))
    measured, predicted = snr_gain(rng, seeing)
    assert 1.01 < predicted < 1.07
    assert measured == pytest.approx(predicted, abs=0.01)
    # a wide FWHM range gains more (about +10 % in theory for FWHM 2.5-8 px)
    measured, predicted = snr_gain(rng, rng.uniform(2.5, 8.0, 20) / 2.3548)
    assert 1.06 < predicted < 1.2
    assert measured == pytest.approx(predicted, abs=0.015)


def _pr_frames(shape, psfs, sig, flux, **kw):
    """P_R of noise-free (zero) frames of ``shape`` with these PSFs, sigmas and flux scales."""
    acc = ProperCoaddAccumulator(shape, **kw)
    for p, s, f in zip(psfs, sig, flux):
        acc.add(np.zeros(shape), p, s, f)
    return acc.finalize()


def test_psf_r_of_identical_gaussians_is_that_gaussian_on_any_grid():
    """Identical PSFs: P_R is the PSF itself, also on an image grid barely wider than it."""
    psf = gaussian_psf(2.0, size=31)  # cut at 7.5 sigma: its transform is positive
    for shape, border in (((32, 32), 0), ((40, 36), 0), ((512, 512), 31)):
        res = _pr_frames(shape, [psf] * 3, [1.0, 2.0, 1.5], [1.0, 0.7, 1.3], border=border)
        assert res.P_R.shape == psf.shape
        np.testing.assert_allclose(res.P_R, psf, rtol=0, atol=1e-13)


def test_psf_r_stamp_holds_its_light_and_does_not_depend_on_the_image():
    """P_R of mixed Moffat and Gaussian PSFs, on images of 40 px (no padding) and 512 px.

    The default stamp (the largest input stamp) holds all but 2e-4 of the light of the
    full P_R (its wings on a 512 px grid), and is the same for both images: it is formed
    on a grid of its own (on a 40 px image grid the old stamp, twice as wide, was cut to
    the grid and aliased).
    """
    from astro_zackay.profiles import psf_stamp

    psfs = [psf_stamp(11, 1.5), psf_stamp(27, 4.0, profile="moffat"),
            psf_stamp(39, 6.0, profile="moffat", ellipticity=0.3, theta=0.5,
                      center=(19.3, 18.8))]
    sig, flux = [1.0, 1.5, 2.0], [1.0, 0.8, 1.2]
    small = _pr_frames((40, 40), psfs, sig, flux)
    large = _pr_frames((512, 512), psfs, sig, flux, border=39)
    assert small.P_R.shape == large.P_R.shape == (39, 39)
    np.testing.assert_allclose(small.P_R, large.P_R, rtol=0, atol=1e-12)
    held = origin_to_stamp(large.psf_r_at_origin, 39).sum()
    assert 1.0 - 2e-4 < held <= 1.0
    np.testing.assert_allclose(large.P_R, origin_to_stamp(large.psf_r_at_origin, 39) / held,
                               rtol=0, atol=1e-12)
    # a size of one's own is still honoured (wider than the image grid too), and checked
    acc = ProperCoaddAccumulator((40, 40))
    acc.add(np.zeros((40, 40)), psfs[0], 1.0)
    assert acc.finalize(psf_stamp_size=61).P_R.shape == (61, 61)
    with pytest.raises(ValueError, match="psf_stamp_size must be a positive odd number, got 20"):
        acc.finalize(psf_stamp_size=20)


def test_masked_pixels_never_leak():
    rng = np.random.default_rng(43)
    shape, n = (256, 256), 4
    sig, flux, psfs = frames_setup(rng, n, [1.5, 2.0, 2.5, 1.8])
    frames = [rng.normal(0, sig[j], shape) for j in range(n)]
    box = (slice(100, 160), slice(80, 150))
    bad0 = np.zeros(shape, bool)
    bad0[box] = True
    dirty = frames[0].copy()
    dirty[box] = 1e6  # a saturated blob, masked
    dirty[120, 100] = np.nan
    dirty_copy = dirty.copy()
    acc = ProperCoaddAccumulator(shape)
    acc.add(dirty, psfs[0], sig[0], flux[0], mask=bad0)
    for j in range(1, n):
        acc.add(frames[j], psfs[j], sig[j], flux[j])
    res = acc.finalize()
    np.testing.assert_array_equal(dirty, dirty_copy)  # input untouched
    assert np.all(np.isfinite(res.R)) and np.all(np.isfinite(res.S))
    assert np.abs(res.R).max() < 6
    assert res.n_used[130, 110] == n - 1 and res.n_used[10, 10] == n
    inner = (slice(115, 145), slice(95, 135))  # a PSF width inside the masked box
    full = sum(flux[j] ** 2 / sig[j] ** 2 * (psfs[j] ** 2).sum() for j in range(n))
    assert res.depth[inner] == pytest.approx(
        full - flux[0] ** 2 / sig[0] ** 2 * (psfs[0] ** 2).sum(), rel=1e-6
    )
    assert res.depth[10, 10] == pytest.approx(full, rel=1e-6)
    # R is rescaled by its exact local noise; masked regions hold correlated noise, so a
    # 60 x 70 box samples its variance only to ~5 %
    assert abs(res.R[box].std() - 1) < 0.08
    # a source inside the box: the noise-free S/N is f * sqrt(local depth), exactly
    y0, x0 = 130, 115
    signal = [
        flux[j] * 50.0 * np.roll(psf_to_origin(psfs[j], shape), (y0, x0), (0, 1)) for j in range(n)
    ]
    acc = ProperCoaddAccumulator(shape)
    acc.add(signal[0], psfs[0], sig[0], flux[0], mask=bad0)
    for j in range(1, n):
        acc.add(signal[j], psfs[j], sig[j], flux[j])
    res_sig = acc.finalize()
    assert res_sig.snr[y0, x0] == pytest.approx(50.0 * np.sqrt(res_sig.depth[y0, x0]), rel=1e-9)
    assert res_sig.S[y0, x0] / res_sig.depth[y0, x0] == pytest.approx(50.0, rel=1e-9)


def test_all_frames_masked_is_flagged_and_borders():
    rng = np.random.default_rng(44)
    shape = (64, 80)
    psf = gaussian_psf(1.5)
    bad = np.zeros(shape, bool)
    bad[20:40, 30:50] = True
    acc = ProperCoaddAccumulator(shape, border=12)
    assert acc.fft_shape[0] >= 64 + 24
    for _ in range(3):
        acc.add(rng.normal(size=shape), psf, 1.0, mask=bad)
    res = acc.finalize()
    assert res.R.shape == shape
    assert res.mask[30, 40] and res.R[30, 40] == 0 and not res.mask[5, 5]
    # the padding counts as missing data: a corner keeps one quadrant of the PSF**2 footprint
    h = psf.shape[0] // 2
    quadrant = (psf[h:, h:] ** 2).sum() / (psf**2).sum()
    assert res.depth[0, 0] / res.depth_full == pytest.approx(quadrant, rel=1e-6)
    assert abs(res.R[:5].std() - 1) < 0.15  # unit noise restored along the edges
    assert res.depth[32, 10] / res.depth_full == pytest.approx(1.0, abs=1e-6)


def test_float32_and_errors():
    rng = np.random.default_rng(45)
    shape = (128, 128)
    psfs = [gaussian_psf(1.5), gaussian_psf(2.5)]
    frames = [rng.normal(size=shape) for _ in psfs]
    r64 = coadd(frames, psfs, [1, 1], [1, 1], shape)
    r32 = coadd(frames, psfs, [1, 1], [1, 1], shape, dtype=np.float32)
    assert r32.R.dtype == np.float32 and np.all(np.isfinite(r32.R))
    assert np.max(np.abs(r32.R - r64.R)) < 1e-3
    acc = ProperCoaddAccumulator(shape)
    with pytest.raises(ValueError, match="no frame"):
        acc.finalize()
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.zeros((10, 10)), psfs[0], 1.0)
    with pytest.raises(ValueError, match="unit sum"):
        acc.add(frames[0], 3 * psfs[0], 1.0)
    with pytest.raises(ValueError, match="sigma"):
        acc.add(frames[0], psfs[0], -1.0)
    # a convolution helper sanity check used by these tests
    assert convolve_fft(frames[0], psf_rfft(psfs[0], shape)).shape == shape


def test_errors_of_a_bad_frame_name_it():
    """A bad flux scale, sigma, PSF, shape or variance names the frame: its index and name.

    With 20 frames in a loop, 'flux_scale must be a finite positive number, got nan' did
    not say which frame to look at.
    """
    shape = (32, 32)
    psf = gaussian_psf(1.5)
    acc = ProperCoaddAccumulator(shape)
    acc.add(np.zeros(shape), psf, 1.0)
    acc.add(np.zeros(shape), psf, 1.0)
    good = dict(image=np.zeros(shape), psf=psf, sigma=1.0)
    for change, match in (
        (dict(flux_scale=np.nan), r"^frame 2: flux_scale must be a finite positive number, "
                                  r"got nan"),
        (dict(flux_scale=0.0, name="night3.fits"), r"^frame 2 \(night3.fits\): flux_scale"),
        (dict(sigma=-1.0), r"^frame 2: sigma must be"),
        (dict(psf=3 * psf), r"^frame 2: psf must have unit sum"),
        (dict(image=np.zeros((8, 8))), r"^frame 2: image shape \(8, 8\) differs"),
        (dict(variance=np.full(shape, -1.0)), r"^frame 2: variance has 1024 negative values"),
    ):
        with pytest.raises(ValueError, match=match):
            acc.add(**{**good, **change})
    assert acc.n_frames == 2  # nothing of the bad frames was added
    with pytest.raises(ValueError, match=r"^frame 1: image shape \(8, 8\) differs"):
        acc.frame_residual(1, np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"^frame 0: pixels shape \(8, 8\) differs"):
        acc.substitute(0, np.zeros((8, 8), bool), np.zeros(shape), np.zeros(shape))


# --------------------------------------------------------------------------------------
# source noise: the variance of R from per-frame variance maps


def test_variance_equal_to_sigma_squared_changes_nothing():
    rng = np.random.default_rng(46)
    shape, n = (96, 96), 3
    sig, flux, psfs = frames_setup(rng, n, [1.5, 2.0, 2.5])
    frames = [rng.normal(0, s, shape) for s in sig]
    bad = np.zeros(shape, bool)
    bad[40:50, 30:60] = True
    plain = ProperCoaddAccumulator(shape, border=16)
    with_var = ProperCoaddAccumulator(shape, border=16)
    for j in range(n):
        plain.add(frames[j], psfs[j], sig[j], flux[j], mask=bad if j == 0 else None)
        with_var.add(frames[j], psfs[j], sig[j], flux[j], mask=bad if j == 0 else None,
                     variance=np.full(shape, sig[j] ** 2))
    a, b = plain.finalize(), with_var.finalize()
    np.testing.assert_array_equal(a.R_variance, 1.0)
    np.testing.assert_allclose(b.R_variance, 1.0, rtol=1e-10, atol=0)
    np.testing.assert_allclose(b.R, a.R, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(b.depth, a.depth)
    with pytest.raises(ValueError, match="negative"):
        with_var.add(frames[0], psfs[0], 1.0, variance=np.full(shape, -1.0))
    with pytest.raises(ValueError, match="variance shape"):
        with_var.add(frames[0], psfs[0], 1.0, variance=np.ones((3, 3)))


@pytest.mark.parametrize("factor", [1e-15, 1e15])
def test_float32_source_variance_in_tiny_or_huge_units(factor):
    """Frames, noises and variances times 1e-15 or 1e15 in float32: the float64 coadd of 1.

    The source-noise excess was scaled by ``w**2 / s**2`` (``1 / s**4``) cast to float32:
    1e60 overflowed (R_variance NaN) and 1e-60 underflowed to 0 (R_variance wrong by 400).
    """
    rng = np.random.default_rng(47)
    shape, seeing = (96, 96), (1.5, 2.0, 2.5)
    sig, flux = (1.0, 2.0, 1.5), (1.0, 1.0, 1.0)
    frames, psfs = _noise_stack(rng, shape, seeing, sig, flux, [(40, 40, 5000.0)])
    variances = [s**2 + np.clip(m, 0, None) for m, s in zip(frames, sig)]
    bad = np.zeros(shape, bool)
    bad[10:14, 60:70] = True

    def run(scale, dtype):
        acc = ProperCoaddAccumulator(shape, border=16, dtype=dtype)
        for m, p, s, v in zip(frames, psfs, sig, variances):
            acc.add(m * scale, p, s * scale, variance=v * scale**2, mask=bad)
        return acc.finalize()

    base = run(1.0, np.float64)
    res = run(factor, np.float32)
    assert np.abs(base.R_variance - 1).max() > 1.0  # the star's source noise counts
    np.testing.assert_allclose(res.R_variance, base.R_variance, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res.R, base.R, atol=1e-3 * np.abs(base.R).max())
    np.testing.assert_allclose(res.S * factor, base.S, atol=1e-5 * np.abs(base.S).max())
    assert res.F_R * factor == pytest.approx(base.F_R, rel=1e-12)


def _brute_force_var_r(variances, psfs, sig, flux, shape):
    """Var(R(x)) = sum_j sum_y V_j(y) kappa_j(y - x)**2, pixel by pixel (circular grid)."""
    p_h = [psf_rfft(p, shape) for p in psfs]
    den = sum(f**2 / s**2 * np.abs(ph) ** 2 for ph, s, f in zip(p_h, sig, flux))
    out = np.zeros(shape)
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    for v, ph, s, f in zip(variances, p_h, sig, flux):
        # R(x) = sum_y M(y) kappa(y - x), kappa_h = w P_h / sqrt(den)
        kappa = np.fft.irfft2(f / s**2 * ph / np.sqrt(den), s=shape)
        for y0 in range(ny):
            for x0 in range(nx):
                out[y0, x0] += np.sum(v * kappa[(yy - y0) % ny, (xx - x0) % nx] ** 2)
    return out


def _star_variance(rng, shape, sig, psf, amplitude):
    """A background + source variance map: a PSF-shaped (asymmetric) bump off-centre."""
    bump = np.roll(psf_to_origin(psf, shape), (9, 6), (0, 1))
    return sig**2 * rng.uniform(0.9, 1.3, shape) + amplitude * bump


def test_source_variance_against_brute_force():
    """Exact for identical centro-symmetric PSFs; a stated underestimate otherwise."""
    rng = np.random.default_rng(47)
    shape = (20, 20)
    sig, flux = np.array([1.0, 1.5, 2.0]), np.array([1.0, 0.7, 1.3])
    # identical symmetric PSFs: K_j is a delta and the pointwise formula is exact, even
    # for a strongly asymmetric variance map
    psf = gaussian_psf(1.2, size=9)
    variances = [_star_variance(rng, shape, s, psf, 400.0) for s in sig]
    acc = ProperCoaddAccumulator(shape, fft_shape=shape)
    for j in range(3):
        acc.add(rng.normal(size=shape), psf, sig[j], flux[j], variance=variances[j])
    res = acc.finalize()
    truth = _brute_force_var_r(variances, [psf] * 3, sig, flux, shape)
    np.testing.assert_allclose(res.R_variance, truth, rtol=1e-10)
    # different PSFs: the source-noise excess is underestimated, by < 25 % at the peak
    psfs = [gaussian_psf(w / 2.3548, size=15) for w in (2.5, 3.5, 5.0)]
    variances = [_star_variance(rng, shape, s, p, 400.0) for s, p in zip(sig, psfs)]
    acc = ProperCoaddAccumulator(shape, fft_shape=shape)
    for j in range(3):
        acc.add(rng.normal(size=shape), psfs[j], sig[j], flux[j], variance=variances[j])
    res = acc.finalize()
    truth = _brute_force_var_r(variances, psfs, sig, flux, shape)
    peak = np.unravel_index(np.argmax(truth), shape)
    assert 0.75 < (res.R_variance[peak] - 1) / (truth[peak] - 1) < 1.0


# --------------------------------------------------------------------------------------
# outliers: the leave-one-out difference, the prediction, substitution and rejection


def _noise_stack(rng, shape, seeing, sig, flux, stars=()):
    """Frames of noise plus point sources ``(x, y, flux)`` seen through each PSF."""
    psfs = [gaussian_psf(s, size=31) for s in seeing]
    sky = np.zeros(shape)
    for x, y, f in stars:
        sky[y, x] = f
    frames = [convolve_fft(sky, psf_rfft(p, shape)) * fj + rng.normal(0, s, shape)
              for p, s, fj in zip(psfs, sig, flux)]
    return frames, psfs


def test_frame_residual_is_white_and_prediction_matches_the_truth():
    """D_j of noise plus stars: unit white noise; the prediction is the frame's truth."""
    rng = np.random.default_rng(70)
    shape, seeing = (256, 256), (1.2, 1.6, 2.0, 1.4)
    sig, flux = (1.0, 1.5, 2.0, 1.2), (1.0, 0.8, 1.3, 1.1)
    stars = [(64, 64, 3000.0), (180, 100, 1000.0), (100, 200, 2000.0)]
    frames, psfs = _noise_stack(rng, shape, seeing, sig, flux, stars)
    acc = ProperCoaddAccumulator(shape, border=31)
    for m, p, s, f in zip(frames, psfs, sig, flux):
        acc.add(m, p, s, f)
    truth, _ = _noise_stack(np.random.default_rng(0), shape, seeing, (0.0,) * 4, flux, stars)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    far = np.min([np.hypot(xx - x, yy - y) for x, y, _ in stars], axis=0) > 15
    for j in range(4):
        difference, prediction, depth = acc.frame_residual(j, frames[j])
        inner = difference[20:-20, 20:-20]
        assert inner.std() == pytest.approx(1.0, abs=0.015)
        lag1 = np.mean(inner[:, 1:] * inner[:, :-1]) / inner.var()
        assert abs(lag1) < 0.02  # 4 sigma of the estimate on 216^2 pixels
        np.testing.assert_array_equal(depth, 1.0)
        assert prediction.max() > 50  # the stars are predicted...
        error = acc.frame_prediction(j, frames[j]) - truth[j]
        assert error[far].std() < sig[j]  # ...with no more than the frame's own noise
        # the star's flux (the sharpest frame's profile rings by +-7 % within 8 px)
        assert abs(error[49:80, 49:80].sum()) < 0.01 * 3000 * flux[j]


def test_substitute_equals_adding_the_changed_frame():
    rng = np.random.default_rng(71)
    shape, seeing = (96, 96), (1.2, 2.0, 1.6)
    sig, flux = (1.0, 2.0, 1.5), (1.0, 1.2, 0.9)
    frames, psfs = _noise_stack(rng, shape, seeing, sig, flux, [(40, 40, 500.0)])
    pixels = np.zeros(shape, bool)
    pixels[30:34, 50:60] = True
    values = rng.normal(5.0, 1.0, shape)
    changed = np.where(pixels, values, frames[1])
    acc, direct = ProperCoaddAccumulator(shape, border=31), ProperCoaddAccumulator(
        shape, border=31)
    for j, (m, p, s, f) in enumerate(zip(frames, psfs, sig, flux)):
        acc.add(m, p, s, f)
        direct.add(changed if j == 1 else m, p, s, f)
    before = frames[1].copy()
    acc.substitute(1, pixels, frames[1], values)
    np.testing.assert_array_equal(frames[1], before)
    a, b = acc.finalize(), direct.finalize()
    np.testing.assert_allclose(a.R, b.R, atol=1e-10)
    np.testing.assert_allclose(a.S, b.S, atol=1e-10)
    with pytest.raises(ValueError, match="not added"):
        acc.substitute(3, pixels, frames[1], values)
    with pytest.raises(ValueError, match="shape"):
        acc.frame_residual(0, frames[0][:50])


def test_reject_outliers_one_frame_only():
    """Cosmic rays in one frame are replaced; a source in every frame is not; a single
    frame or two frames with a shared excess have no outliers."""
    rng = np.random.default_rng(72)
    shape, seeing = (128, 128), (1.2, 2.0, 1.6, 1.4)
    sig, flux = (1.0, 2.0, 1.5, 1.2), (1.0, 1.2, 0.9, 1.0)
    frames, psfs = _noise_stack(rng, shape, seeing, sig, flux, [(40, 40, 5e4), (90, 70, 300.0)])
    hits = [(20, 100), (64, 64), (100, 30)]
    for y, x in hits:
        frames[2][y, x] += 200.0
    acc = ProperCoaddAccumulator(shape, border=31)
    for m, p, s, f in zip(frames, psfs, sig, flux):
        acc.add(m, p, s, f)
    outliers = [np.isin(np.arange(np.prod(shape)), pixels).reshape(shape)
                for pixels in reject_outliers(acc, frames, grow=0)]
    assert [int(m.sum()) for m in outliers] == [0, 0, 3, 0]
    assert all(outliers[2][y, x] for y, x in hits)
    clean = ProperCoaddAccumulator(shape, border=31)
    for j, (m, p, s, f) in enumerate(zip(frames, psfs, sig, flux)):
        clean.add(m, p, s, f, mask=outliers[2] if j == 2 else None)
    r, c = acc.finalize(), clean.finalize()
    for y, x in hits:  # gone from the coadd, as if masked
        assert abs(r.S[y, x] - c.S[y, x]) < 3 * np.sqrt(c.depth[y, x])
    single = ProperCoaddAccumulator(shape)
    single.add(frames[2], psfs[2], sig[2], flux[2])
    assert not reject_outliers(single, frames[2:3])[0].size
    with pytest.raises(ValueError, match="threshold"):
        reject_outliers(acc, frames, threshold=0.0)
    with pytest.raises(ValueError, match="4 added frames"):
        reject_outliers(acc, frames[:3])


# --------------------------------------------------------------------------------------
# array backends: the accumulator's arrays stay on the backend


class _OnDevice(np.ndarray):
    """A numpy array standing for one that lives on the device."""


class _OnDeviceModule:
    """A module (numpy, scipy.ndimage) whose new arrays are `_OnDevice`."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def on_device(*args, **kwargs):
            out = attr(*args, **kwargs)
            return out.view(_OnDevice) if type(out) is np.ndarray else out

        return on_device


@dataclass(frozen=True)
class _RecordingBackend(ArrayBackend):
    """A CPU backend that records every array moved to ("up") or from ("down") it."""

    log: list = field(default_factory=list)

    def asarray(self, a, dtype=None):
        if not isinstance(a, _OnDevice):
            self.log.append(("up", np.shape(a), np.asarray(a).dtype.kind))
        return np.asarray(a, dtype=dtype).view(_OnDevice)

    def to_numpy(self, a):
        if isinstance(a, _OnDevice):
            self.log.append(("down", a.shape, a.dtype.kind))
            return np.asarray(a).view(np.ndarray)
        return a

    def rfft2(self, a, s=None, workers=None):
        assert isinstance(a, _OnDevice), "a transform of a host array"
        return super().rfft2(a, s=s, workers=workers).view(_OnDevice)

    def irfft2(self, a, s, workers=None):
        assert isinstance(a, _OnDevice), "a transform of a host array"
        return super().irfft2(a, s=s, workers=workers).view(_OnDevice)


def _recording():
    return _RecordingBackend("numpy", _OnDeviceModule(np), scipy.fft,
                             _OnDeviceModule(scipy.ndimage))


def _large(log, direction, shape):
    """The logged moves in ``direction`` of arrays of at least a frame's size.

    (The PSF transforms move a stamp and two matrices of the grid's size times the
    stamp's, smaller than these frames.)
    """
    size = np.prod(shape)
    return [entry for entry in log if entry[0] == direction and np.prod(entry[1]) >= size]


def test_backend_moves_each_frame_up_once_and_only_the_results_down():
    """Each frame's image, mask and variance go up once; finalize brings the results
    down once; the sums never come back; the results equal the numpy backend's."""
    rng = np.random.default_rng(80)
    shape, seeing = (96, 128), (1.2, 2.0, 1.6)
    sig, flux = (1.0, 2.0, 1.5), (1.0, 1.2, 0.9)
    frames, psfs = _noise_stack(rng, shape, seeing, sig, flux, [(40, 40, 500.0)])
    masks = [np.zeros(shape, bool) for _ in frames]
    masks[1][30:34, 50:60] = True
    variances = [np.full(shape, s * s) + np.clip(m, 0, None) for m, s in zip(frames, sig)]
    backend = _recording()
    results = []
    for be in ("numpy", backend):
        acc = ProperCoaddAccumulator(shape, border=31, backend=be)
        for j, (m, p, s, f) in enumerate(zip(frames, psfs, sig, flux)):
            acc.add(m, p, s, f, mask=masks[j], variance=variances[j])
        if be is backend:
            ups = _large(backend.log, "up", shape)
            assert [kind for _, _, kind in ups] == ["f", "b", "f"] * 3
            assert all(entry[1] == shape for entry in ups)
            assert not _large(backend.log, "down", shape)
            backend.log.clear()
        results.append(acc.finalize())
    downs = [entry for entry in backend.log if entry[0] == "down"]
    assert len(downs) == 7  # R, R_variance, S, depth, n_used, mask and the full P_R
    assert not _large(backend.log, "up", shape)
    numpy_result, recorded = results
    for name in ("R", "R_variance", "S", "depth", "P_R", "psf_r_at_origin"):
        np.testing.assert_allclose(getattr(recorded, name), getattr(numpy_result, name),
                                   rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(recorded.n_used, numpy_result.n_used)
    np.testing.assert_array_equal(recorded.mask, numpy_result.mask)
    assert recorded.n_used[31, 55] == 2 and recorded.n_used[0, 0] == 3


def test_backend_rejection_reads_each_frame_once_per_round():
    """Outlier rejection on a backend: the frames go up once per round (and once more
    for a frame with outliers); the same pixels are replaced as with numpy."""
    rng = np.random.default_rng(81)
    shape, seeing = (96, 96), (1.2, 2.0, 1.6, 1.4)
    sig, flux = (1.0, 2.0, 1.5, 1.2), (1.0, 1.2, 0.9, 1.0)
    frames, psfs = _noise_stack(rng, shape, seeing, sig, flux, [(40, 40, 5e3)])
    frames[2][20, 70] += 200.0
    backend = _recording()
    found = []
    for be in ("numpy", backend):
        acc = ProperCoaddAccumulator(shape, border=31, backend=be)
        for m, p, s, f in zip(frames, psfs, sig, flux):
            acc.add(m, p, s, f)
        backend.log.clear()
        found.append(reject_outliers(acc, frames, grow=0))
    assert [pixels.tolist() for pixels in found[1]] == [[], [], [20 * 96 + 70], []]
    assert [pixels.tolist() for pixels in found[1]] == [pixels.tolist() for pixels in found[0]]
    # round 1: 4 frames, and frame 2 again to replace its outlier; round 2: 4 frames
    assert len(_large(backend.log, "up", shape)) == 9
    assert not _large(backend.log, "down", shape)
