"""Pixel-integrated elliptical Gaussian and Moffat profiles: arrays in, arrays out.

The one renderer of analytic PSF profiles in the package. The simulation test bed,
the star finder, the flux matching and the analytic PSF models all draw their
profiles from here, so they share one convention: ``fwhm`` along the major axis,
the minor axis ``fwhm * (1 - ellipticity)``, ``theta`` (radians) the angle of the
major axis counter-clockwise from +x, and the Moffat profile
``(1 + r**2 / alpha**2) ** -beta``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["psf_stamp"]

_GAUSS_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))  # FWHM / sigma of a Gaussian
_PROFILES = ("gaussian", "moffat")


# Numerical core: pixel-integrated elliptical profiles (arrays in, arrays out)
# ---------------------------------------------------------------------------
def _profile_scale(fwhm: np.ndarray, profile: str, beta: float) -> np.ndarray:
    """Return the major-axis scale (Gaussian sigma or Moffat alpha) for a FWHM."""
    if profile == "gaussian":
        return fwhm / _GAUSS_FWHM
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _pixel_integrated(
    xoff: np.ndarray,
    yoff: np.ndarray,
    fwhm: np.ndarray,
    ellipticity: np.ndarray,
    theta: np.ndarray,
    profile: str,
    beta: float,
    oversample: int,
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

    Returns
    -------
    ndarray, shape (n, ny, nx)
        The profile averaged over each pixel (not normalised).
    """
    n, nx = xoff.shape
    ny = yoff.shape[1]
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
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
    return r2.reshape(n, ny, oversample, nx, oversample).mean(axis=(2, 4))



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
    ny, nx = _check_shape(shape, "shape")
    _check_profile(profile, beta)
    oversample = _check_oversample(oversample)
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
