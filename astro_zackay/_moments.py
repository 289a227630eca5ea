"""Adaptive Gaussian-weighted moments of many sources at once (arrays in, arrays out).

The fast measurement of every star candidate: centroid, second moments, a
Gaussian-weighted flux and its S/N, computed for all sources together in windows
of one size. The weight is an elliptical Gaussian matched iteratively to the
source (adaptive moments as in Bernstein & Jarvis 2002, the weight set at each
step to the source covariance deconvolved from the weighted moments), so that for
a Gaussian source it converges to the source's own covariance from any starting
size, and sizes that change across the field need no global reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .profiles import GAUSS_FWHM

__all__ = ["Moments", "adaptive_moments", "pixels_at"]

#: Weight-covariance eigenvalues are kept within (0.3 px)**2 and (window / 2)**2.
_MIN_VAR = 0.09
#: The variance of a pixel's top-hat response, per axis (px**2).
_PIXEL_VAR = 1.0 / 12.0
#: A centroid moves at most this many pixels per iteration.
_MAX_STEP = 1.0


def pixels_at(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``image[rows, cols]`` for indices inside the image, by one flat `numpy.take`.

    Several times faster than indexing with two integer arrays for the ``(n_star,
    n_pixel)`` indices of stamps and annuli (0.45 ms instead of 2.9 ms for 100 000
    pixels of a 1024x682 image, measured). The indices broadcast together.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._moments import pixels_at
    >>> image = np.arange(12.0).reshape(3, 4)
    >>> pixels_at(image, np.array([[0, 2]]), np.array([[1, 3]]))
    array([[ 1., 11.]])
    """
    return np.take(image, rows * image.shape[1] + cols)


@dataclass(frozen=True)
class Moments:
    """Adaptive moments of ``n`` sources (arrays of shape ``(n,)``).

    Attributes
    ----------
    x, y : ndarray
        Weighted centroids (0-based pixels).
    x_err, y_err : ndarray
        Their errors propagated from the pixel variances.
    cxx, cxy, cyy : ndarray
        The source covariance (the final weight's: exact for a Gaussian source, the
        covariance of the best-matched Gaussian otherwise), pixels squared.
    flux, flux_err : ndarray
        Twice the Gaussian-weighted sum (the total of a Gaussian source) and its error.
    peak : ndarray
        The brightest pixel within 1.5 px of the centroid.
    concentration : ndarray
        The Gaussian-weighted sum under the matched weight over that under a weight
        twice as wide (0.625 for a Gaussian source; lower for sources with extended
        wings, such as galaxies, at the same size).
    ok : ndarray of bool
        Whether the moments converged to a positive flux and a positive-definite shape.
    """

    x: np.ndarray
    y: np.ndarray
    x_err: np.ndarray
    y_err: np.ndarray
    cxx: np.ndarray
    cxy: np.ndarray
    cyy: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    peak: np.ndarray
    concentration: np.ndarray
    ok: np.ndarray

    @property
    def snr(self) -> np.ndarray:
        """S/N of the Gaussian-weighted flux (near the optimal S/N for a compact source)."""
        return self.flux / self.flux_err

    def source_covariance(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``cxx, cxy, cyy`` less a pixel's own (1/12 px**2 per axis): the source before pixelation.

        For a Gaussian source, its true covariance (at least 0.01 px**2 per axis).
        """
        cxx = np.clip(self.cxx - _PIXEL_VAR, 0.01, None)
        cyy = np.clip(self.cyy - _PIXEL_VAR, 0.01, None)
        limit = 0.99 * np.sqrt(cxx * cyy)
        return cxx, np.clip(self.cxy, -limit, limit), cyy

    def shape(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Major-axis FWHM, ellipticity ``1 - b/a`` and angle of `source_covariance`."""
        cxx, cxy, cyy = self.source_covariance()
        half_tr = 0.5 * (cxx + cyy)
        root = np.sqrt(0.25 * (cxx - cyy) ** 2 + cxy**2)
        lam_max = np.clip(half_tr + root, 1e-12, None)
        lam_min = np.clip(half_tr - root, 1e-12, None)
        fwhm = GAUSS_FWHM * np.sqrt(lam_max)
        ellipticity = 1.0 - np.sqrt(lam_min / lam_max)
        theta = 0.5 * np.arctan2(2.0 * cxy, cxx - cyy)
        return fwhm, ellipticity, theta


def adaptive_moments(
    data: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    sigma0: float,
    half: int,
    n_iter: int = 3,
) -> Moments:
    """Adaptive elliptical-Gaussian-weighted moments of sources at ``(x, y)``.

    Parameters
    ----------
    data : ndarray
        The background-subtracted image.
    variance : ndarray
        Its per-pixel variance.
    mask : ndarray of bool
        True for bad pixels (given zero weight).
    x, y : ndarray
        Starting positions (0-based pixels).
    sigma0 : float
        Starting weight sigma in pixels.
    half : int
        Half-size of the square window around each rounded position; pixels outside
        the image are ignored.
    n_iter : int, optional
        Iterations of centroid and weight updates.

    Returns
    -------
    Moments

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._moments import adaptive_moments
    >>> yy, xx = np.mgrid[:41, :41]
    >>> star = 1e4 * np.exp(-0.5 * (((xx - 20.3) / 2.0) ** 2 + ((yy - 19.8) / 1.5) ** 2))
    >>> m = adaptive_moments(star, np.ones_like(star), np.zeros(star.shape, bool),
    ...                      np.array([20.0]), np.array([20.0]), 1.0, 12)
    >>> np.round([m.x[0], m.y[0], m.cxx[0], m.cyy[0]], 2).tolist()
    [20.3, 19.8, 4.0, 2.25]
    """
    ny, nx = data.shape
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    off = np.arange(-half, half + 1)
    gx = (ix[:, None] + off).repeat(off.size, axis=1)
    gy = np.tile(iy[:, None] + off, (1, off.size))
    inside = (gx >= 0) & (gx < nx) & (gy >= 0) & (gy < ny)
    gx_c, gy_c = np.clip(gx, 0, nx - 1), np.clip(gy, 0, ny - 1)
    flat = gy_c * nx + gx_c
    valid = inside & ~np.take(mask, flat)
    pix = np.where(valid, np.take(data, flat), 0.0)
    var = np.where(valid, np.take(variance, flat), 0.0)
    gx, gy = gx.astype(float), gy.astype(float)
    # the window's offsets from the rounded position, and their products: every weighted
    # sum of a pass is one matrix product with them
    ox, oy = np.repeat(off, off.size).astype(float), np.tile(off, off.size).astype(float)
    powers = np.column_stack([np.ones_like(ox), ox, oy, ox**2, oy**2, ox * oy])

    n = ix.size
    xc, yc = np.asarray(x, float).copy(), np.asarray(y, float).copy()
    wxx, wyy, wxy = np.full(n, sigma0**2), np.full(n, sigma0**2), np.zeros(n)
    ok = np.ones(n, dtype=bool)
    max_var = (0.5 * half) ** 2
    for _ in range(n_iter):
        weight, _, _ = _weights(gx, gy, xc, yc, wxx, wxy, wyy, valid)
        s0, sx, sy, sxx, syy, sxy = ((weight * pix) @ powers).T  # about the rounded position
        ex, ey = xc - ix, yc - iy  # the centroid from it
        good = s0 > 0
        s0 = np.where(good, s0, 1.0)
        mx = np.clip((sx - ex * s0) / s0, -_MAX_STEP / 2, _MAX_STEP / 2)
        my = np.clip((sy - ey * s0) / s0, -_MAX_STEP / 2, _MAX_STEP / 2)
        mxx = (sxx - 2.0 * ex * sx + ex**2 * s0) / s0 - mx**2
        myy = (syy - 2.0 * ey * sy + ey**2 * s0) / s0 - my**2
        mxy = (sxy - ex * sy - ey * sx + ex * ey * s0) / s0 - mx * my
        definite = good & (mxx > 0) & (myy > 0) & (mxx * myy > mxy**2)
        ok &= definite
        # the weighted mean offset of a source under a matched weight (W = C) is half
        # its true offset: step twice as far
        xc[ok] += 2.0 * mx[ok]
        yc[ok] += 2.0 * my[ok]
        cxx, cxy, cyy = _deconvolve(mxx, mxy, myy, wxx, wxy, wyy)
        wxx[ok] = np.clip(cxx[ok], _MIN_VAR, max_var)
        wyy[ok] = np.clip(cyy[ok], _MIN_VAR, max_var)
        limit = 0.99 * np.sqrt(wxx[ok] * wyy[ok])
        wxy[ok] = np.clip(cxy[ok], -limit, limit)
    weight, dx, dy = _weights(gx, gy, xc, yc, wxx, wxy, wyy, valid)
    s0 = np.sum(weight * pix, axis=1)
    noise = weight**2 * var
    err = np.sqrt(np.sum(noise, axis=1))
    # the centroid moves by twice the weighted mean offset, 2 sum(w I dx) / sum(w I)
    x_err = 2.0 * np.sqrt(np.sum(noise * dx**2, axis=1)) / np.abs(s0)
    y_err = 2.0 * np.sqrt(np.sum(noise * dy**2, axis=1)) / np.abs(s0)
    broad, _, _ = _weights(gx, gy, xc, yc, 4.0 * wxx, 4.0 * wxy, 4.0 * wyy, valid)
    s_broad = np.sum(broad * pix, axis=1)
    ok &= (s0 > 0) & (err > 0) & np.isfinite(s0)
    near = (gx - xc[:, None]) ** 2 + (gy - yc[:, None]) ** 2 <= 2.25
    peak = np.max(np.where(near & valid, pix, -np.inf), axis=1)
    return Moments(
        x=xc, y=yc, x_err=x_err, y_err=y_err, cxx=wxx, cxy=wxy, cyy=wyy, flux=2.0 * s0,
        flux_err=2.0 * err, peak=peak,
        concentration=s0 / np.where(s_broad > 0, s_broad, np.nan), ok=ok,
    )


def _deconvolve(
    mxx: np.ndarray,
    mxy: np.ndarray,
    myy: np.ndarray,
    wxx: np.ndarray,
    wxy: np.ndarray,
    wyy: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source covariance ``C = (M**-1 - W**-1)**-1`` from weighted moments ``M``, weight ``W``.

    Exact for a Gaussian source (so one step converges); where ``M`` is too close to
    ``W`` for the difference to be positive definite (a source much broader than the
    weight), the weight grows fourfold instead.
    """
    det_m = mxx * myy - mxy**2
    det_w = wxx * wyy - wxy**2
    # sources whose moments failed (det_m <= 0) are flagged by the caller; no warnings
    with np.errstate(divide="ignore", invalid="ignore"):
        axx = myy / det_m - wyy / det_w
        ayy = mxx / det_m - wxx / det_w
        axy = -mxy / det_m + wxy / det_w
        det_a = axx * ayy - axy**2
        definite = (axx > 0) & (det_a > 0)
    safe = np.where(definite, det_a, 1.0)
    cxx = np.where(definite, ayy / safe, 4.0 * wxx)
    cyy = np.where(definite, axx / safe, 4.0 * wyy)
    cxy = np.where(definite, -axy / safe, 4.0 * wxy)
    return cxx, cxy, cyy


def _weights(
    gx: np.ndarray,
    gy: np.ndarray,
    xc: np.ndarray,
    yc: np.ndarray,
    wxx: np.ndarray,
    wxy: np.ndarray,
    wyy: np.ndarray,
    valid: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elliptical Gaussian weights of covariance ``W`` around each centroid, and offsets."""
    det = wxx * wyy - wxy**2
    ixx, iyy, ixy = (wyy / det)[:, None], (wxx / det)[:, None], (-wxy / det)[:, None]
    dx = gx - xc[:, None]
    dy = gy - yc[:, None]
    q = ixx * dx**2 + 2.0 * ixy * dx * dy + iyy * dy**2
    return np.where(valid, np.exp(-0.5 * q), 0.0), dx, dy
