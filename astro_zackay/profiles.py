"""Pixel-integrated elliptical Gaussian and Moffat profiles: arrays in, arrays out.

The one renderer of analytic PSF profiles in the package. The simulation test bed,
the star finder, the flux matching and the analytic PSF models all draw their
profiles from here, so they share one convention: ``fwhm`` along the major axis,
the minor axis ``fwhm * (1 - ellipticity)``, ``theta`` (radians) the angle of the
major axis counter-clockwise from +x, and the Moffat profile
``(1 + r**2 / alpha**2) ** -beta``.

`psf_stamp` renders a profile; `moffat_model`, `moffat_jacobian` and `moffat_shape`
are the parametrised elliptical Moffat model (and its analytic derivatives) that
the star finder fits to stars by least squares.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["moffat_jacobian", "moffat_model", "moffat_shape", "psf_stamp"]

#: FWHM / sigma of a Gaussian.
GAUSS_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
_PROFILES = ("gaussian", "moffat")
_LN2 = math.log(2.0)
#: 2x2 Gauss-Legendre points per pixel: the fitted model is integrated over pixels like data.
_SUB = 0.5 / math.sqrt(3.0)
_SUB_DX = np.array([-_SUB, _SUB, -_SUB, _SUB])
_SUB_DY = np.array([-_SUB, -_SUB, _SUB, _SUB])


# Numerical core: pixel-integrated elliptical profiles (arrays in, arrays out)
# ---------------------------------------------------------------------------
def _profile_scale(fwhm: np.ndarray, profile: str, beta: float) -> np.ndarray:
    """Return the major-axis scale (Gaussian sigma or Moffat alpha) for a FWHM."""
    if profile == "gaussian":
        return fwhm / GAUSS_FWHM
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` Gauss-Legendre points and weights on one pixel, ``[-0.5, 0.5]``."""
    return tuple(0.5 * a for a in np.polynomial.legendre.leggauss(n))


#: Gauss-Legendre points and weights for 1 to 5 points per pixel, computed once: an
#: eigen-decomposition each time cost more than a small stamp's profile.
_GAUSS_LEGENDRE = tuple(_gauss_legendre(n) for n in range(1, 6))


def _pixel_integrated(
    xoff: np.ndarray,
    yoff: np.ndarray,
    fwhm: np.ndarray,
    ellipticity: np.ndarray,
    theta: np.ndarray,
    profile: str,
    beta: float,
    oversample: int,
    *,
    gauss: bool = False,
) -> np.ndarray:
    """Evaluate pixel-integrated elliptical profiles for a batch of sources.

    Parameters
    ----------
    xoff, yoff : ndarray, shape (n, nx) and (n, ny)
        Offsets of the pixel-centre columns / rows from each source position.
    fwhm, ellipticity, theta : ndarray, shape (n,)
        Profile parameters of each source.
    profile : {'gaussian', 'moffat'}
        Radial profile.
    beta : float
        Moffat index.
    oversample : int
        Sub-pixel samples per pixel and axis (midpoint rule).
    gauss : bool, optional
        Gauss-Legendre points and weights instead of the midpoint rule: 3 of them per
        axis integrate a FWHM 2 px Moffat profile ten times more closely than 5
        midpoints, in a third of the evaluations.

    Returns
    -------
    ndarray, shape (n, ny, nx)
        The profile averaged over each pixel (not normalised), in the inputs' float type.
    """
    n, nx = xoff.shape
    ny = yoff.shape[1]
    dtype = np.result_type(xoff, yoff, fwhm, ellipticity, theta)  # float32 stays float32
    if gauss:
        sub, weights = (_GAUSS_LEGENDRE[oversample - 1] if oversample <= len(_GAUSS_LEGENDRE)
                        else _gauss_legendre(oversample))
        sub, weights = sub.astype(dtype), weights.astype(dtype)
    else:
        sub = ((np.arange(oversample) + 0.5) / oversample - 0.5).astype(dtype)
    xs = (xoff[:, :, None] + sub).reshape(n, nx * oversample)
    ys = (yoff[:, :, None] + sub).reshape(n, ny * oversample)
    a = _profile_scale(fwhm, profile, beta)
    b = a * (1.0 - ellipticity)
    c, s = np.cos(theta), np.sin(theta)
    ia2, ib2 = 1.0 / a**2, 1.0 / b**2
    # r^2 = x'^2/a^2 + y'^2/b^2 with x' = x c + y s, y' = -x s + y c
    qa = (c**2 * ia2 + s**2 * ib2)[:, None]
    qb = (2.0 * c * s * (ia2 - ib2))[:, None]
    qc = (s**2 * ia2 + c**2 * ib2)[:, None]
    r2 = (qa * xs**2)[:, None, :] + (qb * xs)[:, None, :] * ys[:, :, None]
    r2 += (qc * ys**2)[:, :, None]
    if profile == "gaussian":
        r2 *= -0.5
        np.exp(r2, out=r2)
    else:
        np.log1p(r2, out=r2)
        r2 *= -beta
        np.exp(r2, out=r2)
    r2 = r2.reshape(n, ny, oversample, nx, oversample)
    if gauss:
        return (r2 @ weights).transpose(0, 1, 3, 2) @ weights
    return r2.mean(axis=(2, 4))



def _check_profile(profile: str, beta: float) -> None:
    if profile not in _PROFILES:
        raise ValueError(f"profile must be one of {_PROFILES}, got {profile!r}.")
    if profile == "moffat" and not (np.isfinite(beta) and beta > 1.0):
        raise ValueError(
            f"Moffat beta must be a finite number > 1 (the flux diverges otherwise), got {beta}."
        )


def _check_oversample(oversample: int) -> int:
    if isinstance(oversample, bool) or int(oversample) != oversample or oversample < 1:
        raise ValueError(f"oversample must be a positive integer, got {oversample!r}.")
    return int(oversample)


def psf_stamp(
    shape: int | tuple[int, int],
    fwhm: float,
    *,
    profile: str = "gaussian",
    ellipticity: float = 0.0,
    theta: float = 0.0,
    beta: float = 3.5,
    center: tuple[float, float] | None = None,
    oversample: int = 5,
) -> np.ndarray:
    """Return a unit-sum, pixel-integrated elliptical Gaussian or Moffat stamp.

    Parameters
    ----------
    shape : int or tuple of int
        Stamp shape ``(ny, nx)``; an int gives a square stamp.
    fwhm : float
        FWHM of the major axis, in pixels.
    profile : {'gaussian', 'moffat'}, optional
        Radial profile.  The Moffat profile is ``(1 + r**2/alpha**2)**-beta``.
    ellipticity : float, optional
        ``1 - b/a``, in ``[0, 1)``.
    theta : float, optional
        Position angle of the major axis in radians, counter-clockwise from +x.
    beta : float, optional
        Moffat index (> 1); ignored for a Gaussian.
    center : tuple of float, optional
        ``(x, y)`` position of the source in 0-based pixel coordinates of the
        stamp (x is the column).  Default: the stamp centre
        ``((nx - 1)/2, (ny - 1)/2)``.
    oversample : int, optional
        Sub-pixel samples per pixel and axis used to integrate over pixels.

    Returns
    -------
    ndarray
        Array of shape ``(ny, nx)`` summing to 1 (the profile truncated to
        the stamp and renormalised).

    Raises
    ------
    ValueError
        For a non-positive FWHM, an ellipticity outside ``[0, 1)``, an unknown
        profile or a bad shape.

    Examples
    --------
    >>> from astro_zackay.profiles import psf_stamp
    >>> p = psf_stamp(15, 3.0, profile="moffat", ellipticity=0.2, theta=0.5)
    >>> p.shape, bool(abs(p.sum() - 1) < 1e-12)
    ((15, 15), True)
    >>> int(p.argmax()) == 7 * 15 + 7  # peak at the central pixel
    True
    """
    return _stamp(_check_shape(shape, "shape"), fwhm, profile, ellipticity, theta, beta, center,
                  _check_oversample(oversample))


def _stamp(
    shape: tuple[int, int],
    fwhm: float,
    profile: str,
    ellipticity: float,
    theta: float,
    beta: float,
    center: tuple[float, float] | None,
    oversample: int,
    *,
    gauss: bool = False,
) -> np.ndarray:
    """`psf_stamp` on a checked ``shape`` and ``oversample``, with its checks of the
    profile and the centre; ``gauss`` as in `_pixel_integrated`.

    The one stamp renderer: the analytic PSFs (`astro_zackay.psf.analytic`) render
    through it with 3x3 Gauss-Legendre points.
    """
    ny, nx = shape
    _check_profile(profile, beta)
    fwhm = float(fwhm)
    ellipticity = float(ellipticity)
    if not (np.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"fwhm must be a positive finite number of pixels, got {fwhm}.")
    if not (0.0 <= ellipticity < 1.0):
        raise ValueError(f"ellipticity = 1 - b/a must be in [0, 1), got {ellipticity}.")
    if center is None:
        cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    else:
        cx, cy = (float(v) for v in center)
    stamp = _pixel_integrated(
        (np.arange(nx) - cx)[None, :],
        (np.arange(ny) - cy)[None, :],
        np.array([fwhm]),
        np.array([ellipticity]),
        np.array([float(theta)]),
        profile,
        float(beta),
        oversample,
        gauss=gauss,
    )[0]
    total = stamp.sum()
    if not total > 0:
        raise ValueError(
            f"The source at center={center} is too far outside the {shape} stamp: "
            "nothing of its profile falls in the stamp."
        )
    return stamp / total


def _check_shape(shape: Any, name: str) -> tuple[int, int]:
    if np.isscalar(shape):
        shape = (shape, shape)
    try:
        ny, nx = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a (ny, nx) pair, got {shape!r}.") from None
    if ny < 1 or nx < 1 or (ny, nx) != tuple(shape):
        raise ValueError(f"{name} must hold positive integers (ny, nx), got {shape!r}.")
    return ny, nx


# The fitted model: an elliptical Moffat profile in a parametrisation for least squares
# ------------------------------------------------------------------------------------
def moffat_model(p: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Pixel-integrated elliptical Moffat profiles, one per row of ``p``.

    ``p[:, k]`` = amplitude, x0, y0, u, v, s, t with the half-maximum ellipse
    ``Q = m11 dx**2 + 2 m12 dx dy + m22 dy**2 = 1``, ``m11 = exp(u)``,
    ``m22 = exp(v)``, ``m12 = tanh(s) sqrt(m11 m22)`` and index ``beta = 1/t``:
    ``A (1 + (2**t - 1) Q)**(-1/t)``, a Gaussian for ``t -> 0``. Unconstrained
    ``u, v, s`` keep every parameter vector a valid (positive-definite) shape.

    Parameters
    ----------
    p : ndarray, shape (n, 7)
        The parameters of ``n`` profiles.
    dx, dy : ndarray, shape (n, npix)
        Pixel-centre coordinates (the same frame as x0, y0).

    Returns
    -------
    ndarray, shape (n, npix)
        The profiles averaged over each pixel (2x2 Gauss-Legendre points).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.profiles import moffat_model, moffat_shape
    >>> p = np.array([[1.0, 0.0, 0.0, np.log((2 / 3.0) ** 2), np.log((2 / 3.0) ** 2), 0.0, 0.4]])
    >>> fwhm, ellipticity, theta, integral = moffat_shape(p)
    >>> round(float(fwhm[0]), 6), round(float(ellipticity[0]), 6)  # beta 2.5, FWHM 3
    (3.0, 0.0)
    >>> y, x = np.mgrid[-60:61, -60:61]
    >>> total = moffat_model(p, x.reshape(1, -1) * 1.0, y.reshape(1, -1) * 1.0).sum()
    >>> bool(abs(total / integral[0] - 1) < 0.01)  # all but the far wings
    True
    """
    a, x0, y0, uu, vv, ss, t = (p[:, k, None, None] for k in range(7))
    m11, m22 = np.exp(uu), np.exp(vv)
    m12 = np.tanh(ss) * np.sqrt(m11 * m22)
    ddx = dx[:, :, None] + _SUB_DX - x0
    ddy = dy[:, :, None] + _SUB_DY - y0
    q = m11 * ddx**2 + 2.0 * m12 * ddx * ddy + m22 * ddy**2
    return a[:, :, 0] * np.exp(-np.log1p(np.expm1(t * _LN2) * q) / t).mean(axis=2)


def moffat_jacobian(
    p: np.ndarray, dx: np.ndarray, dy: np.ndarray, n_params: int = 7
) -> np.ndarray:
    """Analytic derivatives of `moffat_model` with respect to its first ``n_params`` parameters.

    With ``g = (1 + c q)**(-1/t)``, ``c = 2**t - 1``: ``dg/dq = -g c / (t (1 + c q))``,
    ``dg/dt = g (ln(1 + c q) / t**2 - q (c + 1) ln 2 / (t (1 + c q)))``, and the
    derivatives of the quadratic form ``q`` follow from ``m11 = exp(u)``,
    ``m22 = exp(v)``, ``m12 = tanh(s) sqrt(m11 m22)``; all are averaged over the same
    sub-pixel samples as the profile.

    Parameters
    ----------
    p : ndarray, shape (n, 7)
        The parameters (see `moffat_model`).
    dx, dy : ndarray, shape (n, npix)
        Pixel-centre coordinates.
    n_params : int, optional
        How many leading parameters to differentiate by (3: amplitude and position,
        for fits with the shape held fixed).

    Returns
    -------
    ndarray, shape (n, npix, n_params)

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.profiles import moffat_jacobian, moffat_model
    >>> p = np.array([[2.0, 0.2, -0.1, -0.8, -0.9, 0.3, 0.3]])
    >>> x = np.arange(-4.0, 5.0)[None, :]
    >>> jac = moffat_jacobian(p, x, 0.5 * x)
    >>> bool(np.allclose(jac[..., 0], moffat_model(p, x, 0.5 * x) / 2.0))  # d/d amplitude
    True
    """
    a, x0, y0, uu, vv, ss, t = (p[:, k, None, None] for k in range(7))
    m11, m22 = np.exp(uu), np.exp(vv)
    root = np.sqrt(m11 * m22)
    tanh_s = np.tanh(ss)
    m12 = tanh_s * root
    ddx = dx[:, :, None] + _SUB_DX - x0
    ddy = dy[:, :, None] + _SUB_DY - y0
    q = m11 * ddx**2 + 2.0 * m12 * ddx * ddy + m22 * ddy**2
    c = np.expm1(t * _LN2)
    log_term = np.log1p(c * q)
    g = np.exp(-log_term / t)
    a_dg_dq = g * (-a * c / t) / (1.0 + c * q)  # a dg/dq
    xy = ddx * ddy
    derivatives = [
        lambda: g,
        lambda: a_dg_dq * (-2.0 * m11 * ddx - 2.0 * m12 * ddy),
        lambda: a_dg_dq * (-2.0 * m12 * ddx - 2.0 * m22 * ddy),
        lambda: a_dg_dq * (m11 * ddx**2 + m12 * xy),
        lambda: a_dg_dq * (m22 * ddy**2 + m12 * xy),
        lambda: a_dg_dq * xy * (2.0 * (1.0 - tanh_s**2) * root),
        lambda: a * g * (log_term / t**2 - q * (c + 1.0) * _LN2 / (t * (1.0 + c * q))),
    ]
    return np.stack([d().mean(axis=2) for d in derivatives[:n_params]], axis=2)


def moffat_shape(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Major-axis FWHM, ellipticity ``1 - b/a``, major-axis angle and integral per amplitude.

    Parameters
    ----------
    p : ndarray, shape (n, 7)
        The parameters of `moffat_model`.

    Returns
    -------
    fwhm, ellipticity, theta, integral : ndarray, shape (n,)
        ``theta`` in radians counter-clockwise from +x, in ``[-pi/2, pi/2)``;
        ``integral`` the profile's total over the plane for a unit amplitude.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.profiles import moffat_shape
    >>> p = np.array([[1.0, 0, 0, np.log(4 / 16.0), np.log(4 / 4.0), 0.0, 1e-3]])
    >>> fwhm, ellipticity, theta, _ = moffat_shape(p)  # 4 px along x, 2 px along y
    >>> round(float(fwhm[0]), 6), round(float(ellipticity[0]), 6), round(float(theta[0]), 6)
    (4.0, 0.5, 0.0)
    """
    m11, m22 = np.exp(p[:, 3]), np.exp(p[:, 4])
    m12 = np.tanh(p[:, 5]) * np.sqrt(m11 * m22)
    half_tr = 0.5 * (m11 + m22)
    root = np.sqrt(0.25 * (m11 - m22) ** 2 + m12**2)
    lam_min, lam_max = half_tr - root, half_tr + root
    fwhm = 2.0 / np.sqrt(lam_min)
    ellipticity = 1.0 - np.sqrt(lam_min / lam_max)
    # the major axis is the eigenvector of the smaller eigenvalue of M
    theta = 0.5 * np.arctan2(2.0 * m12, m11 - m22) + 0.5 * np.pi
    theta = (theta + 0.5 * np.pi) % np.pi - 0.5 * np.pi
    t = p[:, 6]
    det = m11 * m22 - m12**2
    integral = np.pi * t / (np.expm1(t * _LN2) * (1.0 - t) * np.sqrt(det))
    return fwhm, ellipticity, theta, integral
