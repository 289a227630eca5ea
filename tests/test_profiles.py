"""Tests of astro_zackay.profiles: the rendered stamps and the fitted Moffat model agree."""

import numpy as np

from astro_zackay.profiles import moffat_jacobian, moffat_model, moffat_shape, psf_stamp


def _params(fwhm, ellipticity, theta, beta, amplitude=1.0, x0=0.0, y0=0.0):
    """moffat_model parameters of a profile given as psf_stamp describes it."""
    a, b = fwhm / 2.0, fwhm * (1.0 - ellipticity) / 2.0  # half-maximum semi-axes
    c, s = np.cos(theta), np.sin(theta)
    m11 = c**2 / a**2 + s**2 / b**2
    m22 = s**2 / a**2 + c**2 / b**2
    m12 = c * s * (1.0 / a**2 - 1.0 / b**2)
    return np.array([[amplitude, x0, y0, np.log(m11), np.log(m22),
                      np.arctanh(m12 / np.sqrt(m11 * m22)), 1.0 / beta]])


def test_model_matches_psf_stamp_and_shape_inverts():
    """moffat_model of the same FWHM, ellipticity, angle and beta draws psf_stamp's profile
    (to 0.5 % of the peak: 2x2 Gauss-Legendre against 5x5 midpoint integration over the
    pixels; 0.22 % measured), and moffat_shape
    recovers those parameters and the integral."""
    fwhm, ell, theta, beta = 4.0, 0.3, 0.6, 2.5
    stamp = psf_stamp(61, fwhm, profile="moffat", ellipticity=ell, theta=theta, beta=beta,
                      center=(30.3, 29.8))
    p = _params(fwhm, ell, theta, beta, x0=30.3, y0=29.8)
    y, x = np.mgrid[:61, :61]
    model = moffat_model(p, x.reshape(1, -1) * 1.0, y.reshape(1, -1) * 1.0).reshape(61, 61)
    model /= model.sum()
    assert np.max(np.abs(model - stamp)) < 5e-3 * stamp.max()
    got_fwhm, got_ell, got_theta, integral = moffat_shape(p)
    np.testing.assert_allclose([got_fwhm[0], got_ell[0], got_theta[0]], [fwhm, ell, theta],
                               rtol=1e-12)
    # the analytic integral over the plane: the 61 px stamp holds all but the far wings
    raw = moffat_model(p, x.reshape(1, -1) * 1.0, y.reshape(1, -1) * 1.0).sum()
    wing = (1.0 + (30.0 / (fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1)))) ** 2) ** (1 - beta)
    assert abs(raw / integral[0] - (1 - wing)) < 0.01


def test_jacobian_matches_finite_differences():
    """The analytic derivatives of the Moffat profile agree with central differences,
    and n_params=3 gives the first three of them."""
    rng = np.random.default_rng(0)
    n, h = 3, 6
    oy, ox = np.mgrid[-h:h + 1, -h:h + 1]
    gx = np.repeat((20.0 + ox.ravel())[None, :], n, axis=0)
    gy = np.repeat((30.0 + oy.ravel())[None, :], n, axis=0)
    params = np.column_stack([
        rng.uniform(50, 100, n), 20 + rng.uniform(-0.4, 0.4, n), 30 + rng.uniform(-0.4, 0.4, n),
        rng.uniform(-1.5, -0.5, n), rng.uniform(-1.5, -0.5, n), rng.uniform(-0.5, 0.5, n),
        rng.uniform(0.05, 0.6, n),
    ])
    jac = moffat_jacobian(params, gx, gy)
    for k in range(7):
        step = np.zeros(7)
        step[k] = 1e-6
        numeric = (moffat_model(params + step, gx, gy) - moffat_model(params - step, gx, gy)) / 2e-6
        assert np.max(np.abs(numeric - jac[:, :, k])) < 1e-6 * np.max(np.abs(numeric))
    np.testing.assert_array_equal(moffat_jacobian(params, gx, gy, n_params=3), jac[:, :, :3])
