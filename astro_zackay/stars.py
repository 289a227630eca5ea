"""Selection of PSF stars: bright, isolated, unsaturated, unblended point sources.

:func:`find_psf_stars` detects sources with sep, fits every plausible candidate
with an elliptical Moffat profile (the Gaussian is its limit, so both shapes are
measured without bias), and keeps the stars that pass every cut. The result is
an astropy Table with sub-pixel centroids, PSF fluxes, S/N and shapes; its
``meta`` records the FWHM, the stamp shape to cut PSF stamps with, and how many
sources each cut rejected.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
import sep
from astropy import units as u
from astropy.table import Table
from scipy.spatial import cKDTree

from ._ccd import ImageData, to_image
from ._threads import single_threaded_blas
from ._warnings import FewStarsWarning
from .background import BackgroundResult, _estimate_from, _sep_extract

__all__ = ["find_psf_stars"]

log = logging.getLogger(__name__)

#: Fewer selected stars than this give a FewStarsWarning.
MIN_STARS = 5
#: Rejection reasons, in the order they are applied (each source counts under its first).
REASONS = (
    "edge",
    "saturated",
    "masked",
    "low_snr",
    "fit",
    "crowded",
    "sharp",
    "extended",
    "elongated",
    "max_stars",
)
#: Detection threshold in units of the background rms (sep, 3x3 matched filter).
_DETECT_THRESHOLD = 3.0
#: Neighbours fainter than this fraction of a star's flux do not spoil its isolation.
_NEIGHBOUR_FRACTION = 0.01
#: Shape cuts relative to the median selected star.
_SHARP_RATIO = 0.75
_EXTENDED_RATIO = 1.25
_ELONGATION_EXCESS = 0.1
#: Sources with a FWHM below this (pixels) are sharper than a pixel: cosmic rays, hot pixels.
_MIN_FWHM = 1.0
#: Only sources rounder than this define the reference FWHM (cosmic-ray tracks are not).
_REF_MAX_ELLIPTICITY = 0.3
#: Profile fits stop after this many Levenberg-Marquardt iterations.
_MAX_ITER = 15
#: Bounds of t = 1/beta of the Moffat profile (t -> 0 is a Gaussian).
_T_MIN, _T_MAX = 1e-3, 0.8
#: 2x2 Gauss-Legendre points per pixel: the model is integrated over pixels like the data.
_SUB = 0.5 / math.sqrt(3.0)
_SUB_DX = np.array([-_SUB, _SUB, -_SUB, _SUB])
_SUB_DY = np.array([-_SUB, -_SUB, _SUB, _SUB])
_LN2 = math.log(2.0)


def _check_stamp_shape(stamp_shape: Any) -> tuple[int, int] | None:
    if stamp_shape is None:
        return None
    shape = tuple(np.broadcast_to(np.asarray(stamp_shape), (2,)).tolist())
    if not all(isinstance(s, int | np.integer) and s > 0 for s in shape):
        raise ValueError(f"stamp_shape must be positive integers, got {stamp_shape!r}")
    if shape[0] % 2 == 0 or shape[1] % 2 == 0:
        raise ValueError(
            f"stamp_shape must be odd so that a star sits on its central pixel, got "
            f"{stamp_shape!r}; use e.g. {tuple(s + 1 - s % 2 for s in shape)}"
        )
    return int(shape[0]), int(shape[1])


def _default_stamp_shape(fwhm: float) -> tuple[int, int]:
    """``2 * ceil(3 FWHM) + 1`` pixels (at least 11): +-3 FWHM holds the wings."""
    size = max(11, 2 * math.ceil(3.0 * fwhm) + 1)
    return size, size


def _background(img: ImageData, background: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sky and rms maps (arrays in the image unit) from the ``background`` argument."""
    if background is None:
        background = _estimate_from(img)
    if isinstance(background, BackgroundResult):
        if background.sky.shape != img.shape:
            raise ValueError(
                f"the background's shape {background.sky.shape} differs from the image's "
                f"{img.shape}"
            )
        scale = (1.0 * background.sky.unit).to_value(img.unit)
        return scale * background.sky.data, scale * background.rms.data
    sky = float(background.to_value(img.unit) if isinstance(background, u.Quantity) else background)
    good = ~img.mask
    rms = math.sqrt(float(np.median(img.variance[good]))) if good.any() else 0.0
    return np.full(img.shape, sky), np.full(img.shape, rms)


def _profile(p: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Pixel-integrated elliptical Moffat profiles.

    ``p[:, k]`` = amplitude, x0, y0, u, v, s, t with the half-maximum ellipse
    ``Q = m11 dx**2 + 2 m12 dx dy + m22 dy**2 = 1``, ``m11 = exp(u)``,
    ``m22 = exp(v)``, ``m12 = tanh(s) sqrt(m11 m22)`` and index ``beta = 1/t``:
    ``A (1 + (2**t - 1) Q)**(-1/t)``, a Gaussian for ``t -> 0``.
    ``dx``, ``dy`` are pixel-centre coordinates of shape (n, npix).
    """
    a, x0, y0, uu, vv, ss, t = (p[:, k, None, None] for k in range(7))
    m11, m22 = np.exp(uu), np.exp(vv)
    m12 = np.tanh(ss) * np.sqrt(m11 * m22)
    ddx = dx[:, :, None] + _SUB_DX - x0
    ddy = dy[:, :, None] + _SUB_DY - y0
    q = m11 * ddx**2 + 2.0 * m12 * ddx * ddy + m22 * ddy**2
    return a[:, :, 0] * np.exp(-np.log1p(np.expm1(t * _LN2) * q) / t).mean(axis=2)


def _profile_jacobian(p: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Analytic derivatives of `_profile` with respect to its 7 parameters, (n, npix, 7).

    With ``g = (1 + c q)**(-1/t)``, ``c = 2**t - 1``: ``dg/dq = -g c / (t (1 + c q))``,
    ``dg/dt = g (ln(1 + c q) / t**2 - q (c + 1) ln 2 / (t (1 + c q)))``, and the
    derivatives of the quadratic form ``q`` follow from ``m11 = exp(u)``,
    ``m22 = exp(v)``, ``m12 = tanh(s) sqrt(m11 m22)``; all are averaged over the same
    sub-pixel samples as the profile (one evaluation instead of six for differences).
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
    dg_dq = -g * c / (t * (1.0 + c * q))
    xy = ddx * ddy
    derivatives = (
        g,
        a * dg_dq * -2.0 * (m11 * ddx + m12 * ddy),
        a * dg_dq * -2.0 * (m12 * ddx + m22 * ddy),
        a * dg_dq * (m11 * ddx**2 + m12 * xy),
        a * dg_dq * (m22 * ddy**2 + m12 * xy),
        a * dg_dq * 2.0 * xy * (1.0 - tanh_s**2) * root,
        a * g * (log_term / t**2 - q * (c + 1.0) * _LN2 / (t * (1.0 + c * q))),
    )
    return np.stack([d.mean(axis=2) for d in derivatives], axis=2)


def _fit_profiles(
    x: np.ndarray,
    y: np.ndarray,
    pix: np.ndarray,
    w: np.ndarray,
    gx: np.ndarray,
    gy: np.ndarray,
    fwhm0: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched Levenberg-Marquardt fit of `_profile` to each star's pixels.

    Returns the parameters (n, 7), their covariance (n, 7, 7) and a success flag.
    """
    n = x.size
    m0 = math.log((2.0 / fwhm0) ** 2)
    p = np.column_stack(
        [
            np.clip(pix.max(axis=1), 1e-30, None),
            x,
            y,
            np.full(n, m0),
            np.full(n, m0),
            np.zeros(n),
            np.full(n, 0.25),
        ]
    )
    sw = np.sqrt(w)

    def jacobian(params: np.ndarray, sel: slice | np.ndarray) -> np.ndarray:
        return _profile_jacobian(params, gx[sel], gy[sel]) * sw[sel][:, :, None]

    lam = np.full(n, 1e-2)
    model = _profile(p, gx, gy)
    cost = np.sum(((model - pix) * sw) ** 2, axis=1)
    active = np.ones(n, dtype=bool)
    for _ in range(_MAX_ITER):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        jac = jacobian(p[idx], idx)
        res = (model[idx] - pix[idx]) * sw[idx]
        jtj = np.einsum("npi,npj->nij", jac, jac)
        grad = np.einsum("npi,np->ni", jac, res)
        diag = np.einsum("nii->ni", jtj)
        damped = jtj + (lam[idx, None] * np.maximum(diag, 1e-12))[:, :, None] * np.eye(7)
        try:
            delta = -np.linalg.solve(damped, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # a singular system (e.g. all weights zero)
            delta = -np.einsum("nij,nj->ni", np.linalg.pinv(damped), grad)
        trial = p[idx] + delta
        trial[:, 6] = np.clip(trial[:, 6], _T_MIN, _T_MAX)
        trial[:, 0] = np.clip(trial[:, 0], 1e-30, None)
        trial[:, 3:5] = np.clip(trial[:, 3:5], -13.0, 11.0)  # FWHM 0.01 to 1000 px
        trial[:, 5] = np.clip(trial[:, 5], -3.0, 3.0)
        trial_model = _profile(trial, gx[idx], gy[idx])
        trial_cost = np.sum(((trial_model - pix[idx]) * sw[idx]) ** 2, axis=1)
        better = trial_cost < cost[idx]
        rel = (cost[idx] - trial_cost) / np.maximum(cost[idx], 1e-300)
        good = idx[better]
        p[good] = trial[better]
        model[good] = trial_model[better]
        cost[good] = trial_cost[better]
        lam[good] = np.maximum(lam[good] / 5.0, 1e-7)
        lam[idx[~better]] *= 10.0
        done = (np.abs(rel) < 1e-6) | (lam[idx] > 1e6)
        active[idx[done]] = False
    jac = jacobian(p, slice(None))
    fisher = np.einsum("npi,npj->nij", jac, jac)
    ok = np.linalg.cond(fisher) < 1e14
    cov = np.full_like(fisher, np.nan)
    cov[ok] = np.linalg.inv(fisher[ok])
    # where the profile does not describe a star to its noise (chi2/dof > 1), inflate the
    # covariance by chi2/dof so that the errors include the model mismatch
    dof = np.maximum(np.count_nonzero(w, axis=1) - 7, 1)
    cov *= np.maximum(cost / dof, 1.0)[:, None, None]
    if active.any():
        log.debug("%d of %d profile fits stopped after %d iterations", active.sum(), n, _MAX_ITER)
    ok &= np.all(np.isfinite(p), axis=1) & (p[:, 0] > 0)
    return p, cov, ok


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value below which half of the total weight lies."""
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _shape_params(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Major-axis FWHM, ellipticity 1 - b/a, major-axis angle and integral per unit amplitude."""
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


def _stamp_flags(
    mask: np.ndarray,
    saturated: np.ndarray,
    ix: np.ndarray,
    iy: np.ndarray,
    half: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Whether each stamp (centred on ix, iy) holds a saturated / any masked pixel."""
    hy, hx = half
    # window sums through a 2-D cumulative sum (summed-area table)
    out = []
    for image in (saturated, mask):
        table = np.zeros((image.shape[0] + 1, image.shape[1] + 1), dtype=np.int64)
        table[1:, 1:] = np.cumsum(np.cumsum(image, axis=0), axis=1)
        y0, y1, x0, x1 = iy - hy, iy + hy + 1, ix - hx, ix + hx + 1
        out.append((table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]) > 0)
    return out[0], out[1]


def _reject(reason: np.ndarray, keep: np.ndarray, fail: np.ndarray, name: str) -> None:
    """Mark ``fail & keep`` as rejected for ``name`` (in place)."""
    hit = keep & fail
    reason[hit] = name
    keep &= ~fail


@single_threaded_blas
def find_psf_stars(
    image: Any,
    *,
    snr_min: float = 20.0,
    fwhm: float | None = None,
    stamp_shape: int | tuple[int, int] | None = None,
    isolation: float | None = None,
    max_stars: int | None = None,
    saturation: Any = None,
    mask: np.ndarray | None = None,
    edge: int | None = None,
    background: BackgroundResult | float | u.Quantity | None = None,
    unit: Any = None,
) -> Table:
    """Find bright, isolated, unsaturated, unblended point sources for PSF modelling.

    Sources are detected with ``sep.extract`` (3 sigma, 3x3 matched filter) on the
    background-subtracted image. Every candidate that is not at the edge, not
    saturated or masked, and plausibly bright enough is fitted by weighted least
    squares (the image uncertainty) with an elliptical Moffat profile whose index
    ``beta`` is free (a Gaussian is the limit ``beta -> inf``), integrated over the
    pixels. The fit gives the sub-pixel centroid and its error, the major-axis
    FWHM, the ellipticity and angle; ``flux`` is the optimal (PSF-weighted) flux
    with the fitted profile, and ``snr = flux / flux_err``, the same definition as
    the ``snr`` column of `~astro_zackay.simulation.simulate_image`.

    Cuts, applied in this order (``meta["n_rejected_<reason>"]`` counts each
    source under the first cut it fails):

    ``edge``
        the stamp is not inside the image, ``edge`` pixels from its border;
    ``saturated``, ``masked``
        a pixel at or above ``saturation`` / any other masked pixel in the stamp;
    ``low_snr``
        ``snr < snr_min``;
    ``fit``
        the profile fit did not converge;
    ``crowded``
        a detected neighbour brighter than 1 % of the star within ``isolation``
        (resolved blends; sep's deblending flag is not used, as the isophotes of
        bright stars merge with neighbours well outside any stamp);
    ``sharp``, ``extended``
        FWHM below 0.75 or above 1.25 times the reference FWHM (cosmic rays and hot
        pixels; galaxies and unresolved blends);
    ``elongated``
        ellipticity more than 0.1 above the reference (unresolved blends, cosmic-ray
        tracks);
    ``max_stars``
        beyond the ``max_stars`` of highest S/N.

    Parameters
    ----------
    image : `~astropy.nddata.CCDData`, `~numpy.ndarray`, str, path or HDU
        The image, with the sky included or not (see ``background``); anything
        :func:`~astro_zackay._ccd.to_image` accepts. Its uncertainty weights the
        fits; without one, the variance is estimated (see ``to_image``).
    snr_min : float, optional
        Minimum S/N of a PSF star.
    fwhm : float, optional
        FWHM in pixels used to start the fits and, when given, to set the default
        ``stamp_shape`` and ``isolation``; default: estimated from the detections
        (their half-light radius) to start the fits, and the defaults derive from
        the measured median FWHM.
    stamp_shape : int or (int, int), optional
        Shape ``(ny, nx)`` of the PSF stamps; odd. Default ``2 * ceil(3 FWHM) + 1``
        (at least 11), which holds the core and the wings to about 3 FWHM. A
        user-set value is kept unchanged (it must hold at least +-1 FWHM).
    isolation : float, optional
        Radius in pixels within which no detected neighbour brighter than 1 % of the
        star may lie; default 3 FWHM (the ``isolated`` definition of the simulation).
    max_stars : int, optional
        Keep at most this many stars, those of highest S/N.
    saturation : float or `~astropy.units.Quantity`, optional
        Saturation level in data units; default the SATURATE keyword. Without it,
        saturated stars cannot be recognised unless the image mask marks them.
    mask : array-like of bool, optional
        Extra bad pixels (True = bad), OR-combined with the image's mask.
    edge : int, optional
        Minimum distance of a stamp from the image border in pixels (default 0:
        the whole stamp inside the image).
    background : BackgroundResult, float or `~astropy.units.Quantity`, optional
        The sky: a `~astro_zackay.background.BackgroundResult`, or a constant level
        (0 for a sky-subtracted image, whose noise then comes from the variance).
        Default: measured with :func:`~astro_zackay.background.estimate_background`.
    unit : str or `~astropy.units.Unit`, optional
        Unit of a plain array or of a FITS file without BUNIT.

    Returns
    -------
    `~astropy.table.Table`
        One row per selected star, sorted by decreasing S/N, with columns ``id``
        (sequential), ``x``, ``y`` (0-based pixels, ``x`` the column), ``x_err``,
        ``y_err``, ``flux``, ``flux_err`` (image unit), ``snr``, ``fwhm`` (major
        axis, pixels), ``ellipticity`` (1 - b/a), ``theta`` (major-axis angle,
        radians counter-clockwise from +x), ``beta`` (Moffat index; large for a
        Gaussian) and ``peak`` (brightest pixel of the fitted star, sky excluded).
        ``meta`` holds ``fwhm`` (median over the selected stars), ``stamp_shape``,
        ``isolation``, ``snr_min``, ``n_detected``, ``n_selected`` and
        ``n_rejected_<reason>`` for every reason above.

    Raises
    ------
    ValueError
        For an even ``stamp_shape`` or one smaller than +-1 FWHM, bad numbers, or
        when no star passes the cuts (the message gives the counts per cut).

    Warns
    -----
    FewStarsWarning
        When fewer than 5 stars (or ``max_stars``, if smaller) are selected.

    Examples
    --------
    >>> from astro_zackay.simulation import simulate_image
    >>> from astro_zackay.stars import find_psf_stars
    >>> ccd, truth = simulate_image((128, 128), psf=3.0, n_stars=10, seed=3, edge=12,
    ...                             flux_range=(2e4, 1e5), min_separation=25)
    >>> stars = find_psf_stars(ccd)
    >>> len(stars), stars.meta["stamp_shape"], round(stars.meta["fwhm"], 1)
    (10, (19, 19), 3.0)
    >>> stars.meta["n_rejected_crowded"], stars.meta["n_rejected_saturated"]
    (0, 0)
    """
    if not snr_min > 0:
        raise ValueError(f"snr_min must be positive, got {snr_min}")
    if fwhm is not None and not (np.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"fwhm must be a positive number of pixels, got {fwhm}")
    if isolation is not None and not isolation >= 0:
        raise ValueError(f"isolation must be a radius >= 0 in pixels, got {isolation}")
    if max_stars is not None and int(max_stars) < 1:
        raise ValueError(f"max_stars must be at least 1, got {max_stars}")
    if edge is not None and int(edge) < 0:
        raise ValueError(f"edge must be >= 0 pixels, got {edge}")
    user_stamp = _check_stamp_shape(stamp_shape)
    img = to_image(image, unit=unit, mask=mask, saturation=saturation)
    sky, rms = _background(img, background)
    data = np.where(img.mask, 0.0, img.data - sky)
    ny, nx = img.shape

    objects = _sep_extract(data, _DETECT_THRESHOLD, rms, img.mask)
    n_det = len(objects)
    if n_det == 0:
        raise ValueError(
            "no sources detected above 3 sigma: check the image, its mask (all pixels "
            "masked?) and the background"
        )
    x_det, y_det = objects["x"].astype(float), objects["y"].astype(float)
    flux_det = np.asarray(objects["flux"], dtype=float)

    # starting FWHM: twice the median half-light radius of the bright, clean, round
    # detections broader than a pixel (not cosmic rays or hot pixels)
    if fwhm is None:
        clean = (flux_det > 0) & (objects["b"] > 0.7 * objects["a"])
        if not clean.any():
            clean = flux_det > 0
        bright = np.flatnonzero(clean)[np.argsort(-flux_det[clean])[:300]]
        # a radius of ~2.5 FWHM (sep's isophotal a is about sigma) holds the star's light;
        # a larger one takes in the neighbours of a crowded field and inflates the FWHM
        rmax = max(5.0, 6.0 * float(np.median(objects["a"][bright])))
        r_half, _ = sep.flux_radius(
            data,
            x_det[bright],
            y_det[bright],
            np.full(bright.size, rmax),
            0.5,
            mask=img.mask,
            subpix=5,
        )
        resolved = np.isfinite(r_half) & (r_half > 0.5 * _MIN_FWHM)
        r_half = r_half[resolved] if resolved.any() else r_half[np.isfinite(r_half)]
        fwhm0 = float(np.clip(2.0 * np.median(r_half), _MIN_FWHM, 50.0)) if r_half.size else 3.0
    else:
        fwhm0 = float(fwhm)

    # fit window: radius 1.75 FWHM around the rounded detection position
    h = max(3, math.ceil(1.75 * fwhm0))
    ix = np.rint(x_det).astype(int)
    iy = np.rint(y_det).astype(int)
    inside = (ix >= h) & (ix < nx - h) & (iy >= h) & (iy < ny - h)
    # cheap pre-cut on the isophotal S/N (generously below the PSF S/N)
    npix = np.maximum(objects["npix"], 1)
    rough_snr = flux_det / np.sqrt(
        npix * np.median(rms) ** 2 + np.clip(flux_det, 0, None) / (img.gain or 1.0)
    )
    fit_idx = np.flatnonzero(inside & (rough_snr > 0.5 * snr_min))
    oy, ox = np.mgrid[-h : h + 1, -h : h + 1]
    ox, oy = ox.ravel(), oy.ravel()
    gx = ix[fit_idx, None] + ox
    gy = iy[fit_idx, None] + oy
    pix = data[gy, gx]
    var = img.variance[gy, gx]
    w = np.where(
        img.mask[gy, gx] | ~(var > 0) | (ox**2 + oy**2 > h**2),
        0.0,
        1.0 / np.where(var > 0, var, 1.0),
    )
    log.debug("fitting %d candidates in %d px windows (starting FWHM %.2f)", fit_idx.size,
              2 * h + 1, fwhm0)
    params, cov, fit_ok = _fit_profiles(
        x_det[fit_idx], y_det[fit_idx], pix, w, gx.astype(float), gy.astype(float), fwhm0
    )
    fwhm_fit, ell_fit, theta_fit, integral = _shape_params(params)
    model = _profile(params, gx.astype(float), gy.astype(float))
    profile = model / (params[:, :1] * integral[:, None])
    flux_err = 1.0 / np.sqrt(np.sum(w * profile**2, axis=1))
    flux = np.sum(w * profile * pix, axis=1) * flux_err**2
    snr = flux / flux_err
    fit_ok &= np.isfinite(snr) & np.isfinite(fwhm_fit)

    # per-detection arrays (NaN where not fitted)
    def scatter(values: np.ndarray) -> np.ndarray:
        out = np.full(n_det, np.nan)
        out[fit_idx] = values
        return out

    snr_all = scatter(snr)
    fitted = np.zeros(n_det, dtype=bool)
    fitted[fit_idx] = fit_ok
    fwhm_all = scatter(fwhm_fit)
    ell_all = scatter(ell_fit)

    # neighbours: detections within the isolation radius brighter than 1 % of the star
    def crowded_flags(radius: float) -> np.ndarray:
        crowded = np.zeros(n_det, dtype=bool)
        if radius <= 0 or n_det < 2:
            return crowded
        pairs = cKDTree(np.column_stack([x_det, y_det])).query_pairs(radius, output_type="ndarray")
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            fi, fj = np.abs(flux_det[i]), np.abs(flux_det[j])
            crowded[i[fj > _NEIGHBOUR_FRACTION * fi]] = True
            crowded[j[fi > _NEIGHBOUR_FRACTION * fj]] = True
        return crowded

    # the reference star: the clean, isolated, S/N >= snr_min fits broader than a pixel
    # (not cosmic rays or hot pixels) and round (not cosmic-ray tracks; ignored if none
    # is), then those within 30 % of their median FWHM. Its FWHM (median weighted by
    # S/N**2) is the reference of the shape cuts and, unless fwhm is given, sets the
    # default stamp shape and isolation radius
    base = fitted & (snr_all >= snr_min)
    ref = base & ~crowded_flags(3.0 * fwhm0) & (fwhm_all > _MIN_FWHM)
    if (ref & (ell_all < _REF_MAX_ELLIPTICITY)).any():
        ref &= ell_all < _REF_MAX_ELLIPTICITY
    if not ref.any():
        ref = base if base.any() else fitted
    ref_fwhm = float(np.median(fwhm_all[ref])) if ref.any() else fwhm0
    near = ref & (np.abs(fwhm_all / ref_fwhm - 1.0) < 0.3)
    if near.any():
        ref = near
        ref_fwhm = _weighted_median(fwhm_all[ref], snr_all[ref] ** 2)
    ref_ell = float(np.median(ell_all[ref])) if ref.any() else 0.0
    scale_fwhm = ref_fwhm if fwhm is None else float(fwhm)
    if user_stamp is not None:
        min_size = 2 * math.ceil(scale_fwhm) + 1
        if min(user_stamp) < min_size:
            raise ValueError(
                f"stamp_shape={user_stamp} is too small for the FWHM of {scale_fwhm:.2f} px: "
                f"it must hold at least +-1 FWHM, i.e. be at least {min_size} px on each side"
            )
        stamp = user_stamp
    else:
        stamp = _default_stamp_shape(scale_fwhm)
    radius = 3.0 * scale_fwhm if isolation is None else float(isolation)
    margin = 0 if edge is None else int(edge)

    reason = np.full(n_det, "", dtype=object)
    keep = np.ones(n_det, dtype=bool)
    half = (stamp[0] // 2, stamp[1] // 2)
    ix_c = np.clip(ix, 0, nx - 1)
    iy_c = np.clip(iy, 0, ny - 1)
    _reject(
        reason,
        keep,
        (ix - half[1] < margin)
        | (ix + half[1] >= nx - margin)
        | (iy - half[0] < margin)
        | (iy + half[0] >= ny - margin)
        | ~inside,
        "edge",
    )
    sat_pix = (
        (img.data >= img.saturation)
        if img.saturation is not None
        else np.zeros(img.shape, dtype=bool)
    )
    has_sat, has_mask = np.zeros(n_det, bool), np.zeros(n_det, bool)
    k = np.flatnonzero(keep)
    has_sat[k], has_mask[k] = _stamp_flags(img.mask, sat_pix, ix_c[k], iy_c[k], half)
    _reject(reason, keep, has_sat, "saturated")
    _reject(reason, keep, has_mask, "masked")
    attempted = np.zeros(n_det, dtype=bool)
    attempted[fit_idx] = True
    # not fitted: below the S/N pre-cut; fitted: below snr_min
    _reject(reason, keep, ~attempted | (fitted & ~(snr_all >= snr_min)), "low_snr")
    _reject(reason, keep, ~fitted, "fit")
    _reject(reason, keep, crowded_flags(radius), "crowded")
    _reject(reason, keep, fwhm_all < _SHARP_RATIO * ref_fwhm, "sharp")
    _reject(reason, keep, fwhm_all > _EXTENDED_RATIO * ref_fwhm, "extended")
    _reject(reason, keep, ell_all > ref_ell + _ELONGATION_EXCESS, "elongated")
    if max_stars is not None and keep.sum() > max_stars:
        order = np.flatnonzero(keep)[np.argsort(-snr_all[keep])]
        extra = np.zeros(n_det, dtype=bool)
        extra[order[int(max_stars) :]] = True
        _reject(reason, keep, extra, "max_stars")
    counts = {f"n_rejected_{r}": int(np.sum(reason == r)) for r in REASONS}

    sel = np.flatnonzero(keep)
    summary = ", ".join(f"{r}: {counts[f'n_rejected_{r}']}" for r in REASONS)
    if sel.size == 0:
        raise ValueError(
            f"no PSF star passed the cuts ({n_det} detected; rejected by {summary}). Try a "
            f"lower snr_min (now {snr_min}), a smaller isolation radius (now {radius:.1f} px), "
            "a smaller stamp_shape, or check the mask and the saturation level"
        )
    if sel.size < min(MIN_STARS, max_stars or MIN_STARS):
        warnings.warn(
            f"only {sel.size} PSF star(s) found ({n_det} detected; rejected by {summary}); "
            f"a PSF model needs at least {MIN_STARS}: lower snr_min or the isolation radius",
            FewStarsWarning,
            stacklevel=2,
        )
    # map from detection index to fitted row
    row = np.full(n_det, -1)
    row[fit_idx] = np.arange(fit_idx.size)
    r_sel = row[sel][np.argsort(-snr_all[sel])]
    p = params[r_sel]
    t = p[:, 6]
    table = Table(
        {
            "id": np.arange(r_sel.size),
            "x": p[:, 1],
            "y": p[:, 2],
            "x_err": np.sqrt(cov[r_sel, 1, 1]),
            "y_err": np.sqrt(cov[r_sel, 2, 2]),
            "flux": flux[r_sel],
            "flux_err": flux_err[r_sel],
            "snr": snr[r_sel],
            "fwhm": fwhm_fit[r_sel],
            "ellipticity": ell_fit[r_sel],
            "theta": theta_fit[r_sel],
            "beta": 1.0 / t,
            "peak": model[r_sel].max(axis=1),
        }
    )
    for col in ("x", "y", "x_err", "y_err", "fwhm"):
        table[col].unit = u.pix
    for col in ("flux", "flux_err", "peak"):
        table[col].unit = img.unit
    table["theta"].unit = u.rad
    table.meta.update(
        {
            "fwhm": _weighted_median(np.asarray(table["fwhm"]), np.asarray(table["snr"]) ** 2),
            "stamp_shape": stamp,
            "isolation": radius,
            "snr_min": float(snr_min),
            "n_detected": n_det,
            "n_selected": int(sel.size),
            **counts,
        }
    )
    log.info("%d PSF stars of %d detections (rejected by %s)", sel.size, n_det, summary)
    return table
