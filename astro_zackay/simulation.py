"""Simulated images and image pairs with exactly known truth.

This module is the test bed of the package: it renders star fields with a
known, optionally spatially varying point-spread function (PSF), adds
galaxies (Sersic profiles convolved with the PSF), realistic noise and
detector defects, and returns the images as `~astropy.nddata.CCDData`
together with the truth needed to check every later step (star selection,
PSF estimation, ZOGY subtraction, proper coaddition).  `simulate_mosaic`
tiles independent images into one frame whose PSF jumps between tiles
(`tutorial2_frame` rebuilds properimage's Tutorial 2 frame that way).

Conventions
-----------
* Pixel coordinates are 0-based, ``x`` is the column and ``y`` the row (as in
  photutils); the centre of pixel ``(i, j)`` is at ``x = j, y = i``.
* Every *input* flux, sky level, read noise and saturation level is in
  electrons (e-).  The images are returned in electrons (``u.electron``)
  unless a ``gain`` (e-/ADU) is given, in which case they are in ADU.
  The truth tables are always in electrons.
* The PSF FWHM is the FWHM along the **major** axis; the minor axis has
  ``FWHM * (1 - ellipticity)``.  The position angle ``theta`` (radians) is
  the angle of the major axis, counter-clockwise from the +x axis.
* Stars are pixel-integrated: the profile is evaluated on an
  ``oversample x oversample`` sub-pixel grid of every pixel and averaged.
  Each star is rendered in a square stamp (see `PSFField.half_size`), and
  the rendered stamp is **renormalised to unit sum inside the stamp**, so the
  flux a star deposits is exactly its truth flux (the infinitely extended
  wings beyond the stamp are folded back into it).  The true PSF of the
  image is therefore the truncated profile that `PSFField.stamp` returns.

Everything is vectorised: stars are rendered in chunks on an
``(n_stars, ny, nx)`` grid and scatter-added into the image; there are no
Python loops over pixels or over stars (except when `inject_sources` is
given an arbitrary PSF callable, which it must call once per source).
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.nddata import (
    CCDData,
    InverseVariance,
    StdDevUncertainty,
    VarianceUncertainty,
)
from astropy.table import Table
from astropy.table import vstack as vstack_tables
from astropy.wcs import WCS
from scipy import special
from scipy.signal import fftconvolve
from scipy.spatial import cKDTree

from ._warnings import AstroZackayWarning
from .fourier import shift_stack
from .profiles import (
    GAUSS_FWHM,
    _check_oversample,
    _check_profile,
    _check_shape,
    _pixel_integrated,
    _profile_scale,
    psf_stamp,
)

__all__ = [
    "PSFField",
    "PSFMosaic",
    "SimulatedImage",
    "SimulatedPair",
    "inject_sources",
    "psf_stamp",
    "simulate_bright_star_pair",
    "simulate_image",
    "simulate_mosaic",
    "simulate_pair",
    "tutorial2_frame",
]

logger = logging.getLogger(__name__)

_FLUX_DISTRIBUTIONS = ("powerlaw", "loguniform", "uniform")
# Elements of the (n_stars, ny*os, nx*os) evaluation grid per chunk: bounds memory to
# a few x 8 * _CHUNK_ELEMENTS bytes (~ 100 MB) whatever the number of stars.
_CHUNK_ELEMENTS = 2_000_000
_MAX_HALF_SIZE_FWHM = 15.0  # cap of the Moffat stamp radius, in FWHM
_DEFAULT_PIXEL_SCALE = 0.5 / 3600.0  # deg / pixel of the default TAN WCS
_DEFAULT_CRVAL = (150.0, 2.2)  # deg, default WCS reference point
_TRUTH_COLUMNS = (
    "id",
    "x",
    "y",
    "flux",
    "fwhm",
    "ellipticity",
    "theta",
    "peak",
    "saturated",
    "isolated",
    "snr",
    "snr_background",
)


def _chunk_size(stamp_ny: int, stamp_nx: int, oversample: int) -> int:
    """Return how many sources to evaluate at once to bound memory."""
    per_source = stamp_ny * stamp_nx * oversample**2
    return max(1, _CHUNK_ELEMENTS // per_source)


def _poly_extrema(
    c0: float, grad: tuple[float, float], quad: tuple[float, float, float]
) -> tuple[float, float]:
    """Exact min and max of ``c0 + g.(u, v) + quu u^2 + quv u v + qvv v^2`` on [-1, 1]^2."""
    gu, gv = grad
    quu, quv, qvv = quad

    def f(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        return c0 + gu * uu + gv * vv + quu * uu**2 + quv * uu * vv + qvv * vv**2

    cand_u = [-1.0, -1.0, 1.0, 1.0]
    cand_v = [-1.0, 1.0, -1.0, 1.0]
    for edge in (-1.0, 1.0):
        if qvv != 0:  # u = edge, stationary in v
            cand_u.append(edge)
            cand_v.append(-(gv + quv * edge) / (2 * qvv))
        if quu != 0:  # v = edge, stationary in u
            cand_u.append(-(gu + quv * edge) / (2 * quu))
            cand_v.append(edge)
    det = 4 * quu * qvv - quv**2
    if det != 0:  # interior stationary point
        cand_u.append((-2 * qvv * gu + quv * gv) / det)
        cand_v.append((-2 * quu * gv + quv * gu) / det)
    uu = np.clip(np.array(cand_u), -1, 1)
    vv = np.clip(np.array(cand_v), -1, 1)
    vals = f(uu, vv)
    return float(vals.min()), float(vals.max())


@dataclass(frozen=True)
class PSFField:
    """A PSF whose FWHM, ellipticity and angle vary smoothly across a frame.

    Each parameter ``p`` (FWHM, ellipticity, theta) is a quadratic polynomial
    of the scaled coordinates ``u = (x - xc)/(nx/2)`` and
    ``v = (y - yc)/(ny/2)``, with ``(xc, yc) = ((nx-1)/2, (ny-1)/2)``, so that
    ``u, v`` run over ``[-1, 1]`` from the outer edge of the first pixel to the
    outer edge of the last::

        p(x, y) = p0 + g[0]*u + g[1]*v + q[0]*u**2 + q[1]*u*v + q[2]*v**2

    A constant PSF is a `PSFField` with zero gradients (the default).

    Parameters
    ----------
    fwhm : float
        Major-axis FWHM at the frame centre, in pixels.
    profile : {'gaussian', 'moffat'}
        Radial profile.
    beta : float
        Moffat index (> 1).
    ellipticity : float
        ``1 - b/a`` at the frame centre.
    theta : float
        Major-axis angle at the frame centre, radians counter-clockwise from +x.
    fwhm_gradient, ellipticity_gradient, theta_gradient : tuple of float
        Linear coefficients ``(g_u, g_v)``.
    fwhm_quadratic, ellipticity_quadratic, theta_quadratic : tuple of float
        Quadratic coefficients ``(q_uu, q_uv, q_vv)``.
    shape : tuple of int or None
        Frame shape ``(ny, nx)`` that defines ``u, v``.  Needed only when the
        PSF varies; `simulate_image` fills it in from the image shape.
    oversample : int
        Sub-pixel samples per pixel and axis used to integrate over pixels.
    half_size_override : int or None
        Half size of the rendering stamp (stamps are ``2*h + 1`` pixels wide);
        by default `half_size` derives it from the largest FWHM in the frame.

    Raises
    ------
    ValueError
        If the FWHM is not positive or the ellipticity is outside ``[0, 1)``
        anywhere in the frame, or a coefficient has the wrong length.

    Examples
    --------
    >>> from astro_zackay.simulation import PSFField
    >>> psf = PSFField(fwhm=3.0, fwhm_gradient=(0.5, 0.0), shape=(64, 64))
    >>> fwhm, e, theta = psf.params([-0.5, 63.5], [31.5, 31.5])
    >>> fwhm.tolist()
    [2.5, 3.5]
    >>> psf.half_size(), psf.stamp(10, 20).shape  # ceil(6 sigma) of the largest FWHM
    (9, (19, 19))
    """

    fwhm: float = 3.0
    profile: str = "gaussian"
    beta: float = 3.5
    ellipticity: float = 0.0
    theta: float = 0.0
    fwhm_gradient: tuple[float, float] = (0.0, 0.0)
    fwhm_quadratic: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ellipticity_gradient: tuple[float, float] = (0.0, 0.0)
    ellipticity_quadratic: tuple[float, float, float] = (0.0, 0.0, 0.0)
    theta_gradient: tuple[float, float] = (0.0, 0.0)
    theta_quadratic: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shape: tuple[int, int] | None = None
    oversample: int = 5
    half_size_override: int | None = field(default=None)

    def __post_init__(self) -> None:
        _check_profile(self.profile, self.beta)
        object.__setattr__(self, "oversample", _check_oversample(self.oversample))
        for name in ("fwhm", "ellipticity", "theta", "beta"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise ValueError(f"PSFField.{name} must be finite, got {value}.")
            object.__setattr__(self, name, float(value))
        for name, length in (
            ("fwhm_gradient", 2),
            ("ellipticity_gradient", 2),
            ("theta_gradient", 2),
            ("fwhm_quadratic", 3),
            ("ellipticity_quadratic", 3),
            ("theta_quadratic", 3),
        ):
            coeffs = tuple(float(c) for c in np.atleast_1d(getattr(self, name)))
            if len(coeffs) != length or not all(np.isfinite(coeffs)):
                raise ValueError(
                    f"PSFField.{name} must be {length} finite numbers, got {getattr(self, name)!r}."
                )
            object.__setattr__(self, name, coeffs)
        if self.shape is not None:
            object.__setattr__(self, "shape", _check_shape(self.shape, "PSFField.shape"))
        if self.half_size_override is not None and int(self.half_size_override) < 1:
            raise ValueError(
                f"half_size_override must be a positive integer, got {self.half_size_override}."
            )
        if self.is_variable and self.shape is None:
            # Without a frame only the centre values can be checked.
            fmin = fmax = self.fwhm
            emin = emax = self.ellipticity
        else:
            fmin, fmax = _poly_extrema(self.fwhm, self.fwhm_gradient, self.fwhm_quadratic)
            emin, emax = _poly_extrema(
                self.ellipticity, self.ellipticity_gradient, self.ellipticity_quadratic
            )
        if fmin <= 0:
            raise ValueError(
                f"The PSF FWHM must be > 0 everywhere in the frame, but it reaches {fmin:.4g} px; "
                "reduce fwhm_gradient / fwhm_quadratic or increase fwhm."
            )
        if emin < 0 or emax >= 1:
            raise ValueError(
                f"The ellipticity 1 - b/a must stay in [0, 1) over the frame, but it spans "
                f"[{emin:.4g}, {emax:.4g}]; adjust ellipticity and its gradient/quadratic terms."
            )

    @property
    def is_variable(self) -> bool:
        """Whether any parameter varies across the frame."""
        return any(
            any(c != 0 for c in getattr(self, f"{p}_{k}"))
            for p in ("fwhm", "ellipticity", "theta")
            for k in ("gradient", "quadratic")
        )

    @property
    def max_fwhm(self) -> float:
        """Largest major-axis FWHM over the frame, in pixels."""
        if self.is_variable and self.shape is None:
            return self.fwhm
        return _poly_extrema(self.fwhm, self.fwhm_gradient, self.fwhm_quadratic)[1]

    def half_size(self) -> int:
        """Half size ``h`` of the rendering stamps (``2*h + 1`` pixels wide).

        For a Gaussian ``h = ceil(6 sigma)`` of the largest major-axis FWHM in
        the frame.  For a Moffat ``h`` is the radius holding 99.9 % of the flux
        (``alpha * sqrt(1e-3**(1/(1-beta)) - 1)``), at least the Gaussian value
        and at most 15 FWHM.  ``half_size_override`` replaces it.
        """
        if self.half_size_override is not None:
            return int(self.half_size_override)
        fwhm = self.max_fwhm
        radius = 6.0 * fwhm / GAUSS_FWHM
        if self.profile == "moffat":
            alpha = float(_profile_scale(np.float64(fwhm), "moffat", self.beta))
            r999 = alpha * math.sqrt(1e-3 ** (1.0 / (1.0 - self.beta)) - 1.0)
            radius = max(radius, min(r999, _MAX_HALF_SIZE_FWHM * fwhm))
        return max(3, math.ceil(radius))

    @property
    def stamp_shape(self) -> tuple[int, int]:
        """Shape of the rendering stamps, ``(2*h + 1, 2*h + 1)``."""
        size = 2 * self.half_size() + 1
        return size, size

    def _uv(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.shape is None:
            if self.is_variable:
                raise ValueError(
                    "This PSFField varies across the frame but has no shape; "
                    "create it with shape=(ny, nx) (simulate_image does this for you)."
                )
            return np.zeros_like(x), np.zeros_like(y)
        ny, nx = self.shape
        return (x - (nx - 1) / 2.0) / (nx / 2.0), (y - (ny - 1) / 2.0) / (ny / 2.0)

    def params(
        self, x: float | np.ndarray, y: float | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(fwhm, ellipticity, theta)`` arrays at pixel positions ``(x, y)``.

        Parameters
        ----------
        x, y : float or array_like
            0-based pixel coordinates (x is the column); broadcast together.

        Returns
        -------
        fwhm, ellipticity, theta : ndarray
            Major-axis FWHM (pixels), ``1 - b/a`` and angle (radians).
        """
        x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        uu, vv = self._uv(x, y)

        def poly(c0: float, g: tuple[float, ...], q: tuple[float, ...]) -> np.ndarray:
            return c0 + g[0] * uu + g[1] * vv + q[0] * uu**2 + q[1] * uu * vv + q[2] * vv**2

        return (
            poly(self.fwhm, self.fwhm_gradient, self.fwhm_quadratic),
            poly(self.ellipticity, self.ellipticity_gradient, self.ellipticity_quadratic),
            poly(self.theta, self.theta_gradient, self.theta_quadratic),
        )

    def stamp(
        self,
        x: float,
        y: float,
        shape: int | tuple[int, int] | None = None,
        *,
        center: tuple[float, float] | None = None,
    ) -> np.ndarray:
        """Return the true unit-sum PSF at frame position ``(x, y)``.

        Parameters
        ----------
        x, y : float
            Frame position where the PSF parameters are evaluated.
        shape : int or tuple of int, optional
            Stamp shape; default `stamp_shape` (the stamps stars are rendered
            in, so the result is exactly the rendered profile).
        center : tuple of float, optional
            ``(x, y)`` of the source inside the stamp; default the stamp centre.

        Returns
        -------
        ndarray
            Pixel-integrated stamp summing to 1.
        """
        fwhm, e, theta = self.params(x, y)
        if fwhm.ndim:
            raise ValueError("PSFField.stamp takes a single (x, y) position.")
        return psf_stamp(
            self.stamp_shape if shape is None else shape,
            float(fwhm),
            profile=self.profile,
            ellipticity=float(e),
            theta=float(theta),
            beta=self.beta,
            center=center,
            oversample=self.oversample,
        )

    def for_shape(self, shape: tuple[int, int]) -> PSFField:
        """Return this field bound to frame ``shape`` (checked if already set)."""
        shape = _check_shape(shape, "shape")
        if self.shape is None:
            return replace(self, shape=shape)
        if tuple(self.shape) != shape:
            raise ValueError(
                f"The PSFField was defined for a frame of shape {self.shape} but the image has "
                f"shape {shape}; create the PSFField with shape={shape} or shape=None."
            )
        return self


def _as_psf_field(psf: PSFField | float, shape: tuple[int, int], name: str) -> PSFField:
    if isinstance(psf, PSFField):
        return psf.for_shape(shape)
    if isinstance(psf, (int, float, np.integer, np.floating)) and not isinstance(psf, bool):
        return PSFField(fwhm=float(psf), shape=shape)
    raise TypeError(f"{name} must be a PSFField or a FWHM in pixels (float), got {type(psf)}.")


# ---------------------------------------------------------------------------
# Rendering: stars -> image, vectorised in chunks
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rendered:
    image: np.ndarray  # (ny, nx) sum of flux * P
    fwhm: np.ndarray
    ellipticity: np.ndarray
    theta: np.ndarray
    peak: np.ndarray  # e-/pix of each noiseless star at its brightest pixel
    peak_index: np.ndarray  # flat image index of that pixel, -1 if off the frame
    sum_p2: np.ndarray  # sum of P**2 over in-frame stamp pixels
    sum_p2_var: np.ndarray  # sum of P**2 / (B + flux*P) over in-frame pixels


def _render(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    psf: PSFField,
    background_var: float = 0.0,
) -> _Rendered:
    """Render point sources into an image of ``shape`` (see module docstring)."""
    ny, nx = shape
    n = x.size
    h = psf.half_size()
    m = 2 * h + 1
    offs = np.arange(-h, h + 1)
    image = np.zeros(ny * nx)
    fwhm, ell, theta = psf.params(x, y)
    peak = np.zeros(n)
    peak_index = np.full(n, -1, dtype=np.int64)
    sum_p2 = np.zeros(n)
    sum_p2_var = np.zeros(n)
    chunk = _chunk_size(m, m, psf.oversample)
    logger.debug("Rendering %d sources in %dx%d stamps, %d per chunk", n, m, m, chunk)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        ix = np.rint(x[sl]).astype(np.int64)
        iy = np.rint(y[sl]).astype(np.int64)
        stamps = _pixel_integrated(
            offs[None, :] - (x[sl] - ix)[:, None],
            offs[None, :] - (y[sl] - iy)[:, None],
            fwhm[sl],
            ell[sl],
            theta[sl],
            psf.profile,
            psf.beta,
            psf.oversample,
        )
        stamps /= stamps.sum(axis=(1, 2), keepdims=True)
        cols = ix[:, None, None] + offs[None, None, :]
        rows = iy[:, None, None] + offs[None, :, None]
        inside = (cols >= 0) & (cols < nx) & (rows >= 0) & (rows < ny)
        flat = rows * nx + cols
        values = stamps * flux[sl, None, None]
        np.add.at(image, flat[inside], values[inside])
        # per-star diagnostics (in-frame pixels only)
        p_in = np.where(inside, stamps, 0.0)
        k = p_in.reshape(p_in.shape[0], -1).argmax(axis=1)
        peak[sl] = np.take_along_axis(stamps.reshape(len(k), -1), k[:, None], 1)[:, 0]
        peak[sl] *= flux[sl]
        found = np.take_along_axis(inside.reshape(len(k), -1), k[:, None], 1)[:, 0]
        peak_index[sl] = np.where(found, flat.reshape(len(k), -1)[np.arange(len(k)), k], -1)
        sum_p2[sl] = (p_in**2).sum(axis=(1, 2))
        var = background_var + flux[sl, None, None] * p_in
        sum_p2_var[sl] = np.divide(p_in**2, var, out=np.zeros_like(p_in), where=var > 0).sum(
            axis=(1, 2)
        )
    return _Rendered(image.reshape(ny, nx), fwhm, ell, theta, peak, peak_index, sum_p2, sum_p2_var)


# ---------------------------------------------------------------------------
# Random star lists
# ---------------------------------------------------------------------------
def _draw_fluxes(
    rng: np.random.Generator,
    n: int,
    flux_range: tuple[float, float],
    distribution: str,
    powerlaw_index: float,
) -> np.ndarray:
    try:
        lo, hi = (float(f) for f in flux_range)
    except (TypeError, ValueError):
        raise ValueError(f"flux_range must be a (low, high) pair of fluxes, got "
                         f"{flux_range!r}.") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"flux_range must be (low, high) with 0 < low <= high, got {flux_range}.")
    if distribution not in _FLUX_DISTRIBUTIONS:
        raise ValueError(
            f"flux_distribution must be one of {_FLUX_DISTRIBUTIONS}, got {distribution!r}."
        )
    if not (isinstance(powerlaw_index, numbers.Real) and np.isfinite(powerlaw_index)):
        raise ValueError(f"powerlaw_index must be a finite number, got {powerlaw_index!r}.")
    uu = rng.random(n)
    if distribution == "uniform" or lo == hi:
        return lo + uu * (hi - lo)
    if distribution == "loguniform" or powerlaw_index == 1.0:
        return lo * (hi / lo) ** uu
    k = 1.0 - float(powerlaw_index)  # dN/dF ~ F**-index, inverse CDF sampling
    return (lo**k + uu * (hi**k - lo**k)) ** (1.0 / k)


def _draw_positions(
    rng: np.random.Generator,
    n: int,
    shape: tuple[int, int],
    edge: float,
    min_separation: float | None,
    existing: np.ndarray | None = None,
    max_iter: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform positions in ``[edge, n-1-edge]``, optionally ``min_separation`` apart.

    Conflicting positions are redrawn in vectorised rounds (no loop over stars).
    """
    ny, nx = shape
    if min_separation is not None:
        _check_nonneg(min_separation, "min_separation")
    if edge < 0 or nx - 1 - 2 * edge < 0 or ny - 1 - 2 * edge < 0:
        raise ValueError(
            f"edge={edge:.4g} px leaves no room for sources in a {shape} image; "
            "use a smaller edge (the default is the PSF stamp half size) or a larger image."
        )

    def draw(k: int) -> np.ndarray:
        return np.column_stack(
            [
                edge + rng.random(k) * (nx - 1 - 2 * edge),
                edge + rng.random(k) * (ny - 1 - 2 * edge),
            ]
        )

    pos = draw(n)
    if min_separation is None or min_separation <= 0 or n == 0:
        return pos[:, 0], pos[:, 1]
    fixed = np.empty((0, 2)) if existing is None else np.asarray(existing, float).reshape(-1, 2)
    fixed_tree = cKDTree(fixed) if len(fixed) else None
    kept = np.empty((0, 2))
    todo = pos
    for _ in range(max_iter):
        candidates = np.vstack([kept, todo])
        bad = np.zeros(len(candidates), dtype=bool)
        pairs = cKDTree(candidates).query_pairs(min_separation, output_type="ndarray")
        if len(pairs):
            bad[pairs.max(axis=1)] = True  # drop the later one; kept ones never conflict
        if fixed_tree is not None:
            dist, _ = fixed_tree.query(candidates, distance_upper_bound=min_separation)
            bad |= np.isfinite(dist) & (np.arange(len(candidates)) >= len(kept))
        kept = candidates[~bad]
        if len(kept) == n:
            return kept[:, 0], kept[:, 1]
        todo = draw(n - len(kept))
    raise ValueError(
        f"Could not place {n} sources at least {min_separation} px apart in a {shape} image "
        f"(edge {edge:.4g} px); lower n_stars or min_separation."
    )


def _isolated(
    x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm: np.ndarray, radius_fwhm: float = 3.0
) -> np.ndarray:
    """True where no other source with > 1 % of the flux lies within 3 local FWHM."""
    n = x.size
    iso = np.ones(n, dtype=bool)
    if n < 2:
        return iso
    xy = np.column_stack([x, y])
    pairs = cKDTree(xy).query_pairs(radius_fwhm * fwhm.max(), output_type="ndarray")
    if len(pairs) == 0:
        return iso
    i, j = pairs[:, 0], pairs[:, 1]
    d = np.hypot(x[i] - x[j], y[i] - y[j])
    # j spoils i if it is within i's radius and brighter than 1 % of i; and vice versa
    spoil_i = (d < radius_fwhm * fwhm[i]) & (flux[j] > 0.01 * flux[i])
    spoil_j = (d < radius_fwhm * fwhm[j]) & (flux[i] > 0.01 * flux[j])
    iso[i[spoil_i]] = False
    iso[j[spoil_j]] = False
    return iso


def _check_sources(table: Table, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(table, Table):
        raise TypeError(f"{name} must be an astropy Table with columns x, y, flux.")
    missing = [c for c in ("x", "y", "flux") if c not in table.colnames]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing}; it needs x, y (pixels) and flux.")
    cols = []
    for c in ("x", "y", "flux"):
        col = table[c]
        arr = np.asarray(getattr(col, "value", col), dtype=float).ravel()
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}['{c}'] holds non-finite values.")
        cols.append(arr.copy())
    if np.any(cols[2] < 0):
        raise ValueError(f"{name}['flux'] must be >= 0 (fluxes are added with Poisson noise).")
    return cols[0], cols[1], cols[2]

# ---------------------------------------------------------------------------
# Galaxies: pixel-integrated elliptical Sersic profiles convolved with the PSF
# ---------------------------------------------------------------------------
_GALAXY_COLUMNS = ("x", "y", "flux", "r_eff", "sersic_n", "ellipticity", "theta")
_GALAXY_TRUNCATION = 5.0  # profiles are cut at this many half-light radii (then renormalised)
_GALAXY_CORE = 2  # the central (2k+1)^2 pixels of a galaxy are integrated exactly
_GALAXY_SUBPIXELS = 3  # odd: galaxies are convolved with the PSF on a 3x finer grid
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


def _sersic_b(n: np.ndarray) -> np.ndarray:
    """``b_n`` of the Sersic profile ``exp(-b_n (r/r_e)**(1/n))``: half the light within r_e."""
    return special.gammaincinv(2.0 * n, 0.5)


def _check_range(value: Any, name: str, low: float, high: float = np.inf) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}.") from None
    if not (low <= lo <= hi <= high and np.isfinite(hi)):
        raise ValueError(
            f"{name} must satisfy {low:g} <= low <= high <= {high:g}, got {value!r}."
        )
    return lo, hi


def _draw_galaxies(
    rng: np.random.Generator,
    n: int,
    xy: tuple[np.ndarray, np.ndarray],
    flux_range: tuple[float, float],
    size_range: tuple[float, float],
    sersic_range: tuple[float, float],
    ellipticity_max: float,
) -> Table:
    """Random intrinsic galaxy parameters at positions ``xy`` (log-uniform fluxes and sizes)."""
    lo, hi = _check_range(size_range, "galaxy_size_range", 1e-3)
    n_lo, n_hi = _check_range(sersic_range, "galaxy_sersic_range", 0.3, 8.0)
    e_max = float(ellipticity_max)
    if not 0.0 <= e_max < 1.0:
        raise ValueError(f"galaxy_ellipticity_max must be in [0, 1), got {ellipticity_max!r}.")
    return Table(
        {
            "x": xy[0],
            "y": xy[1],
            "flux": _draw_fluxes(rng, n, flux_range, "loguniform", 1.0),
            "r_eff": lo * (hi / lo) ** rng.random(n),
            "sersic_n": n_lo + (n_hi - n_lo) * rng.random(n),
            "ellipticity": e_max * rng.random(n),
            "theta": np.pi * rng.random(n),
        }
    )


def _check_galaxies(table: Table) -> Table:
    """A validated float copy of a user's galaxy table (columns `_GALAXY_COLUMNS`)."""
    if not isinstance(table, Table):
        raise TypeError(f"galaxies must be an astropy Table with columns {_GALAXY_COLUMNS}.")
    missing = [c for c in _GALAXY_COLUMNS if c not in table.colnames]
    if missing:
        raise ValueError(f"galaxies lacks column(s) {missing}; it needs {_GALAXY_COLUMNS}.")
    cols = {
        c: np.asarray(getattr(table[c], "value", table[c]), float).ravel()
        for c in _GALAXY_COLUMNS
    }
    if not all(np.all(np.isfinite(v)) for v in cols.values()):
        raise ValueError("galaxies holds non-finite values.")
    if np.any(cols["flux"] < 0) or np.any(cols["r_eff"] <= 0):
        raise ValueError("galaxies need flux >= 0 and r_eff > 0 (half-light radius, pixels).")
    if np.any((cols["sersic_n"] < 0.3) | (cols["sersic_n"] > 8)):
        raise ValueError("galaxies['sersic_n'] must be in [0.3, 8].")
    if np.any((cols["ellipticity"] < 0) | (cols["ellipticity"] >= 1)):
        raise ValueError("galaxies['ellipticity'] = 1 - b/a must be in [0, 1).")
    return Table(cols)


def _sersic_pixel_integrals(xc: np.ndarray, yc: np.ndarray, gal: Table) -> np.ndarray:
    """Exact integrals of the truncated Sersic profiles over unit pixels, shape (n, ny, nx).

    ``xc`` (n, nx) and ``yc`` (n, ny) are the pixel centres' offsets from each galaxy
    centre; the profile is ``exp(-b_n ((r/r_eff)**(1/n) - 1))`` as in `_sersic_stamps`.
    In coordinates where the ellipses are circles each pixel is a parallelogram, the sum of
    the signed triangles that its edges make with the galaxy centre; over a triangle the
    integral is an integral over angle of the analytic light within radius ``R(angle)``
    (an incomplete gamma function), smooth even for the cusp of n = 4 that a grid of
    sub-pixel samples misses by up to 6 % of the central pixel.
    """
    def per_galaxy(column: str) -> np.ndarray:
        return np.asarray(gal[column], float)[:, None, None, None]

    r_eff, sersic_n = per_galaxy("r_eff"), per_galaxy("sersic_n")
    q = 1.0 - per_galaxy("ellipticity")
    c, s = np.cos(per_galaxy("theta")), np.sin(per_galaxy("theta"))
    cx = xc[:, None, :, None] + np.array([-0.5, 0.5, 0.5, -0.5])  # corners, anticlockwise
    cy = yc[:, :, None, None] + np.array([-0.5, -0.5, 0.5, 0.5])
    cx, cy = np.broadcast_arrays(cx, cy)
    u, v = c * cx + s * cy, (c * cy - s * cx) / q  # the ellipses' frame, scaled to circles
    u_end, v_end = np.roll(u, -1, axis=-1), np.roll(v, -1, axis=-1)
    cross = u * v_end - v * u_end  # twice the signed area of each triangle
    start = np.arctan2(v, u)
    sweep = (np.arctan2(v_end, u_end) - start + np.pi) % (2.0 * np.pi) - np.pi
    angle = start[..., None] + 0.5 * (_GL_NODES + 1.0) * sweep[..., None]
    denom = np.cos(angle) * (v_end - v)[..., None] - np.sin(angle) * (u_end - u)[..., None]
    radius = np.divide(
        np.broadcast_to(cross[..., None], denom.shape), denom,
        out=np.zeros(denom.shape), where=denom != 0,
    )
    radius = np.clip(radius, 0.0, _GALAXY_TRUNCATION * r_eff[..., None])
    b_n = _sersic_b(sersic_n)
    index = sersic_n[..., None]
    enclosed = special.gammainc(
        2.0 * index, b_n[..., None] * (radius / r_eff[..., None]) ** (1.0 / index)
    )
    triangles = sweep * (0.5 * _GL_WEIGHTS * enclosed).sum(axis=-1)
    # light per radian within radius R: r_eff^2 n e^b b^-2n Gamma(2n) P(2n, b (R/r_eff)^(1/n))
    scale = q * r_eff**2 * sersic_n * np.exp(
        b_n + special.gammaln(2.0 * sersic_n) - 2.0 * sersic_n * np.log(b_n)
    )
    return scale[..., 0] * triangles.sum(axis=-1)


def _sersic_stamps(
    xoff: np.ndarray, yoff: np.ndarray, gal: Table, oversample: int
) -> np.ndarray:
    """Pixel-integrated, truncated, unit-sum intrinsic Sersic stamps, shape (n, ny, nx).

    ``oversample`` x ``oversample`` samples per pixel, except for the central
    ``(2 * _GALAXY_CORE + 1)**2`` pixels, integrated exactly (`_sersic_pixel_integrals`).
    """
    n = len(gal)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    xs = (xoff[:, :, None] + sub).reshape(n, -1)
    ys = (yoff[:, :, None] + sub).reshape(n, -1)
    a = np.asarray(gal["r_eff"], float)
    b = a * (1.0 - np.asarray(gal["ellipticity"], float))
    c, s = np.cos(gal["theta"]), np.sin(gal["theta"])
    xp = c[:, None, None] * xs[:, None, :] + s[:, None, None] * ys[:, :, None]
    yp = -s[:, None, None] * xs[:, None, :] + c[:, None, None] * ys[:, :, None]
    r = np.sqrt((xp / a[:, None, None]) ** 2 + (yp / b[:, None, None]) ** 2)
    sersic_n = np.asarray(gal["sersic_n"], float)[:, None, None]
    profile = np.exp(-_sersic_b(sersic_n) * (r ** (1.0 / sersic_n) - 1.0))
    profile[r > _GALAXY_TRUNCATION] = 0.0
    ny, nx = yoff.shape[1], xoff.shape[1]
    stamps = profile.reshape(n, ny, oversample, nx, oversample).mean(axis=(2, 4))
    ky, kx = min(_GALAXY_CORE, ny // 2), min(_GALAXY_CORE, nx // 2)
    rows = slice(ny // 2 - ky, ny // 2 + ky + 1)
    cols = slice(nx // 2 - kx, nx // 2 + kx + 1)
    stamps[:, rows, cols] = _sersic_pixel_integrals(xoff[:, cols], yoff[:, rows], gal)
    return stamps / stamps.sum(axis=(1, 2), keepdims=True)


def _render_galaxies(
    shape: tuple[int, int], gal: Table, psf: PSFField
) -> tuple[np.ndarray, np.ndarray]:
    """Image of the galaxies (intrinsic profile convolved with the local PSF) and their peaks.

    Galaxies are rendered in chunks of similar size: the intrinsic Sersic profile,
    integrated over sub-pixels of 1/3 pixel, is convolved (FFT) with the local PSF sampled
    at the sub-pixel centres, binned into pixels, renormalised to the galaxy's flux and
    scatter-added.  (A convolution on the pixel grid itself depends on the sub-pixel phase
    for a cuspy profile: 4 % of the peak of a n = 4 galaxy.)
    """
    ny, nx = shape
    m = _GALAXY_SUBPIXELS
    image = np.zeros(ny * nx)
    peak = np.zeros(len(gal))
    h_psf = psf.half_size()
    h_kernel = m * h_psf + (m - 1) // 2
    offs_kernel = np.arange(-h_kernel, h_kernel + 1) / m  # pixels
    oversample = max(1, math.ceil(psf.oversample / m))
    order = np.argsort(np.asarray(gal["r_eff"], float))
    half = np.maximum(1, np.ceil(_GALAXY_TRUNCATION * np.asarray(gal["r_eff"], float)[order]))
    # elements per galaxy: its sub-pixel samples, or its convolution, the larger
    h_sub = m * half + (m - 1) // 2
    cost = np.maximum((2 * h_sub + 1) ** 2 * oversample**2, 4 * (2 * (h_sub + h_kernel) + 1) ** 2)
    fwhm, ell, theta = psf.params(np.asarray(gal["x"], float), np.asarray(gal["y"], float))
    start = 0
    while start < len(order):
        # sorted by size: a chunk of k galaxies costs k times the cost of its largest
        k_cost = np.arange(1, len(order) - start + 1) * cost[start:]
        k = max(1, int(np.count_nonzero(k_cost <= _CHUNK_ELEMENTS)))
        idx = order[start : start + k]
        h_gal = int(half[start + k - 1])
        offs = np.arange(-(m * h_gal + (m - 1) // 2), m * h_gal + (m - 1) // 2 + 1)
        sub = gal[idx]
        gx, gy = np.asarray(sub["x"], float), np.asarray(sub["y"], float)
        ix, iy = np.rint(gx).astype(np.int64), np.rint(gy).astype(np.int64)
        scaled = sub.copy()
        scaled["r_eff"] = m * np.asarray(sub["r_eff"], float)  # in sub-pixels
        intrinsic = _sersic_stamps(
            offs[None, :] - m * (gx - ix)[:, None], offs[None, :] - m * (gy - iy)[:, None],
            scaled, oversample,
        )
        kernel = _pixel_integrated(
            np.broadcast_to(offs_kernel, (len(idx), offs_kernel.size)),
            np.broadcast_to(offs_kernel, (len(idx), offs_kernel.size)),
            fwhm[idx], ell[idx], theta[idx], psf.profile, psf.beta, 1,
        )
        kernel /= kernel.sum(axis=(1, 2), keepdims=True)
        fine = fftconvolve(intrinsic, kernel, mode="full", axes=(1, 2))
        h_out = h_gal + h_psf + 1
        pad = m * h_out + (m - 1) // 2 - (offs[-1] + h_kernel)
        fine = np.pad(fine, ((0, 0), (pad, pad), (pad, pad)))
        size = 2 * h_out + 1
        stamps = fine.reshape(len(idx), size, m, size, m).sum(axis=(2, 4))
        stamps = np.clip(stamps, 0.0, None)
        stamps /= stamps.sum(axis=(1, 2), keepdims=True)
        values = stamps * np.asarray(sub["flux"], float)[:, None, None]
        peak[idx] = values.max(axis=(1, 2))
        offs_out = np.arange(-h_out, h_out + 1)
        cols = ix[:, None, None] + offs_out[None, None, :]
        rows = iy[:, None, None] + offs_out[None, :, None]
        inside = (cols >= 0) & (cols < nx) & (rows >= 0) & (rows < ny)
        image += np.bincount((rows * nx + cols)[inside], values[inside], minlength=ny * nx)
        start += len(idx)
    logger.debug("Rendered %d galaxies", len(gal))
    return image.reshape(ny, nx), peak


def _galaxy_truth(gal: Table, peak: np.ndarray) -> Table:
    """The galaxies' truth table: intrinsic parameters, ``id`` and observed ``peak``."""
    truth = Table(gal, copy=True)
    truth.add_column(np.arange(len(gal)), name="id", index=0)
    truth["peak"] = peak
    for col, unit in (("x", u.pix), ("y", u.pix), ("flux", u.electron), ("r_eff", u.pix),
                      ("theta", u.rad), ("peak", u.electron)):
        truth[col].unit = unit
    truth.meta["description"] = (
        "galaxies: Sersic profiles (half-light radius r_eff along the major axis) convolved "
        "with the PSF; flux and peak in e-"
    )
    return truth


@dataclass(frozen=True)
class _GalaxyOptions:
    """The galaxy arguments of `simulate_image` / `simulate_pair`."""

    n: int = 0
    table: Table | None = None
    flux_range: tuple[float, float] | None = None
    size_range: tuple[float, float] = (1.0, 5.0)
    sersic_range: tuple[float, float] = (1.0, 4.0)
    ellipticity_max: float = 0.6

    def draw(
        self,
        rng: np.random.Generator,
        shape: tuple[int, int],
        edge: float,
        min_separation: float | None,
        existing: np.ndarray,
        star_flux_range: tuple[float, float],
    ) -> Table | None:
        """The intrinsic galaxies: the user's table, ``n`` random ones, or None."""
        n = _check_count(self.n, "n_galaxies")
        if self.table is not None:
            if n:
                raise ValueError("Give either galaxies or n_galaxies, not both.")
            return _check_galaxies(self.table)
        if n == 0:
            return None
        xy = _draw_positions(rng, n, shape, edge, min_separation, existing=existing)
        flux_range = star_flux_range if self.flux_range is None else self.flux_range
        return _draw_galaxies(
            rng, n, xy, flux_range, self.size_range, self.sersic_range, self.ellipticity_max
        )


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SimulatedImage:
    """A simulated image and its truth.

    ``ccd, truth = simulate_image(...)`` unpacks the two most used fields.

    Attributes
    ----------
    ccd : `~astropy.nddata.CCDData`
        The image (electrons, or ADU when a gain was given), with mask
        (saturated and bad pixels), the true-model uncertainty, header and WCS.
    truth : `~astropy.table.Table`
        One row per star; see `simulate_image` for the columns.
    psf : PSFField or PSFMosaic
        The true PSF field (bound to the image shape); a `PSFMosaic` for the
        frames of `simulate_mosaic`.
    sky : float
        Sky level in e-/pixel (present in ``ccd`` unless ``sky_subtracted``).
    read_noise : float
        Read noise in e-.
    gain : float
        e- per data unit (1.0 for images in electrons).
    noise_rms : float
        Background noise ``sqrt(sky + read_noise**2)`` in e-.
    model : ndarray
        The noiseless expected value of ``ccd.data`` (sky, unless subtracted,
        plus stars and transients, before saturation, cosmic rays and bad
        pixels), in the units of ``ccd``.
    cosmic_rays : `~astropy.table.Table` or None
        One row per affected pixel: ``id`` (of the hit), ``x``, ``y``,
        ``value`` (e- deposited).  Cosmic rays are NOT in ``ccd.mask``.
    bad_pixels : `~astropy.table.Table` or None
        ``x``, ``y``, ``kind`` ('hot'/'dead') and ``value`` (e-); all masked.
    sky_subtracted : bool
        Whether the sky was subtracted from ``ccd``.
    galaxies : `~astropy.table.Table` or None
        One row per galaxy (see ``n_galaxies`` of `simulate_image`): ``id``, ``x``,
        ``y``, ``flux`` (e-), ``r_eff`` (intrinsic half-light radius along the
        major axis, pixels), ``sersic_n``, ``ellipticity``, ``theta`` (intrinsic
        shape, before the PSF) and ``peak`` (e-/pix of the observed, PSF-convolved
        galaxy in its brightest pixel).  None without galaxies.
    """

    ccd: CCDData
    truth: Table
    psf: PSFField | PSFMosaic
    sky: float
    read_noise: float
    gain: float
    noise_rms: float
    model: np.ndarray
    cosmic_rays: Table | None = None
    bad_pixels: Table | None = None
    sky_subtracted: bool = False
    galaxies: Table | None = None

    def __iter__(self) -> Iterator[Any]:
        yield self.ccd
        yield self.truth

    def __repr__(self) -> str:
        ny, nx = self.ccd.shape
        n_gal = 0 if self.galaxies is None else len(self.galaxies)
        return (
            f"<SimulatedImage {ny}x{nx} [{self.ccd.unit}], {len(self.truth)} stars, "
            f"{n_gal} galaxies, psf={self.psf.profile} fwhm={self.psf.fwhm:g}, "
            f"sky={self.sky:g} e-, read_noise={self.read_noise:g} e-, gain={self.gain:g}>"
        )

    @property
    def background_subtracted(self) -> CCDData:
        """The image with the (exactly known) sky level subtracted, as a new CCDData."""
        if self.sky_subtracted:
            return self.ccd
        out = self.ccd.copy()
        out.data = out.data - self.sky / self.gain
        out.meta["SKYSUB"] = (True, "Sky level subtracted")
        if "SATURATE" in out.meta:
            out.meta["SATURATE"] = out.meta["SATURATE"] - self.sky / self.gain
        return out


@dataclass(frozen=True, eq=False)
class SimulatedPair:
    """A reference and a science image of the same field (see `simulate_pair`).

    Attributes
    ----------
    reference, science : SimulatedImage
        The two images; row ``i`` of both truth tables is the same star
        (science positions shifted by ``shift``, fluxes scaled by
        ``flux_ratio``).  Transients are not in ``science.truth``.
    transients : `~astropy.table.Table`
        Sources present only in the science image: ``x``, ``y`` (science-frame
        pixels), ``flux`` (e- in the science image), ``snr`` (background-limited
        PSF-fit S/N in the science image), ``snr_total`` (with source noise).
    flux_ratio : float
        ``beta = F_n / F_r``, science over reference flux scale.
    shift : tuple of float
        ``(dx, dy)``: a star at ``(x, y)`` in the reference is at
        ``(x + dx, y + dy)`` in the science image.
    """

    reference: SimulatedImage
    science: SimulatedImage
    transients: Table
    flux_ratio: float
    shift: tuple[float, float]

    def true_psf_stamps(
        self, x: float | None = None, y: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The true unit-sum PSF stamps ``(reference, science)`` at ``(x, y)``.

        The default position is the frame's centre, which is all a constant PSF needs.
        The stamps can be given to `~astro_zackay.subtraction.subtract` as
        ``reference_psf=`` and ``science_psf=`` to separate the error of an estimated PSF
        from the rest.
        """
        ny, nx = self.reference.ccd.shape
        x = (nx - 1) / 2.0 if x is None else x
        y = (ny - 1) / 2.0 if y is None else y
        return self.reference.psf.stamp(x, y), self.science.psf.stamp(x, y)

    def __repr__(self) -> str:
        return (
            f"<SimulatedPair {self.reference.ccd.shape}, {len(self.reference.truth)} stars, "
            f"{len(self.transients)} transients, flux_ratio={self.flux_ratio:g}, "
            f"shift={self.shift}>"
        )


# ---------------------------------------------------------------------------
# Image simulation
# ---------------------------------------------------------------------------
def _make_wcs(shape: tuple[int, int], shift: tuple[float, float] = (0.0, 0.0)) -> WCS:
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(_DEFAULT_CRVAL)
    w.wcs.crpix = [(nx + 1) / 2.0 + shift[0], (ny + 1) / 2.0 + shift[1]]
    w.wcs.cdelt = [-_DEFAULT_PIXEL_SCALE, _DEFAULT_PIXEL_SCALE]
    w.wcs.cunit = ["deg", "deg"]
    return w


def _rng(seed: Any) -> np.random.Generator:
    """`numpy.random.default_rng` of ``seed``; a TypeError names the option otherwise."""
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise TypeError(
            f"seed must be an int, None or a numpy Generator, got {seed!r}."
        ) from None


def _check_wcs(wcs: Any) -> None:
    """Raise a TypeError for a ``wcs=`` that is neither a bool nor a WCS."""
    if not isinstance(wcs, bool | WCS):
        raise TypeError(
            f"wcs must be True (a default TAN WCS), False (none) or an astropy WCS, "
            f"got {type(wcs).__name__} {wcs!r}."
        )


def _check_nonneg(value: float, name: str, strict: bool = False) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0 or (strict and value == 0):
        kind = "> 0" if strict else ">= 0"
        raise ValueError(f"{name} must be a finite number {kind}, got {value}.")
    return value


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)


def _simulate(
    shape: tuple[int, int],
    psf: PSFField,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    *,
    sky: float,
    read_noise: float,
    gain: float | None,
    saturation: float | None,
    n_bad_pixels: int,
    n_cosmic_rays: int,
    noise: bool,
    subtract_sky: bool,
    wcs: bool | WCS,
    rng: np.random.Generator,
    galaxies: Table | None = None,
) -> SimulatedImage:
    """Render, add noise and defects, wrap into CCDData (all point sources in one list)."""
    ny, nx = shape
    bvar = sky + read_noise**2
    rendered = _render(shape, x, y, flux, psf, background_var=bvar)
    model_e = rendered.image
    galaxy_truth = None
    if galaxies is not None:
        galaxy_image, galaxy_peak = _render_galaxies(shape, galaxies, psf)
        model_e += galaxy_image
        galaxy_truth = _galaxy_truth(galaxies, galaxy_peak)
    model_e += sky
    if noise:
        data = rng.poisson(model_e).astype(float)
        if read_noise > 0:
            data += rng.normal(0.0, read_noise, size=shape)
    else:
        data = model_e.copy()
    variance_e = model_e + read_noise**2

    cosmic_rays = None
    if n_cosmic_rays:
        cr_len = rng.integers(1, 4, n_cosmic_rays)
        direction = rng.integers(0, 8, n_cosmic_rays)
        steps = np.array([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)])
        x0 = rng.integers(0, nx, n_cosmic_rays)
        y0 = rng.integers(0, ny, n_cosmic_rays)
        total = 10 ** rng.uniform(np.log10(300.0), np.log10(5000.0), n_cosmic_rays)
        k = np.arange(3)
        px = x0[:, None] + k * steps[direction, 0][:, None]
        py = y0[:, None] + k * steps[direction, 1][:, None]
        weights = rng.uniform(0.5, 1.0, (n_cosmic_rays, 3)) * (k < cr_len[:, None])
        value = total[:, None] * weights / weights.sum(axis=1, keepdims=True)
        keep = (k < cr_len[:, None]) & (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        ids = np.broadcast_to(np.arange(n_cosmic_rays)[:, None], px.shape)
        cosmic_rays = Table(
            {"id": ids[keep], "x": px[keep], "y": py[keep], "value": value[keep]},
            meta={"description": "pixels hit by cosmic rays (e- deposited; not masked)"},
        )
        cosmic_rays["value"].unit = u.electron
        np.add.at(data, (py[keep], px[keep]), value[keep])

    mask = np.zeros(shape, dtype=bool)
    if saturation is not None:
        sat = data > saturation
        data[sat] = saturation
        mask |= sat

    bad_pixels = None
    if n_bad_pixels:
        if n_bad_pixels > nx * ny:
            raise ValueError(f"n_bad_pixels={n_bad_pixels} exceeds the {nx * ny} pixels.")
        flat = rng.choice(nx * ny, size=n_bad_pixels, replace=False)
        hot = rng.random(n_bad_pixels) < 0.5
        hot_value = sky + 10 ** rng.uniform(3, 5, n_bad_pixels)
        if saturation is not None:
            hot_value = np.minimum(hot_value, saturation)
        value = np.where(hot, hot_value, 0.0)
        by, bx = np.unravel_index(flat, shape)
        data[by, bx] = value
        mask[by, bx] = True
        bad_pixels = Table(
            {"x": bx, "y": by, "kind": np.where(hot, "hot", "dead"), "value": value},
            meta={"description": "bad pixels (masked); value in e- before sky subtraction"},
        )
        bad_pixels["value"].unit = u.electron

    # truth table
    saturated = np.zeros(x.size, dtype=bool)
    if saturation is not None:
        ok = rendered.peak_index >= 0
        saturated[ok] = model_e.ravel()[rendered.peak_index[ok]] > saturation
    snr_bg = (
        flux * np.sqrt(rendered.sum_p2) / math.sqrt(bvar) if bvar > 0 else np.full(x.size, np.inf)
    )
    truth = Table(
        {
            "id": np.arange(x.size),
            "x": x,
            "y": y,
            "flux": flux,
            "fwhm": rendered.fwhm,
            "ellipticity": rendered.ellipticity,
            "theta": rendered.theta,
            "peak": rendered.peak,
            "saturated": saturated,
            "isolated": _isolated(x, y, flux, rendered.fwhm),
            "snr": flux * np.sqrt(rendered.sum_p2_var),
            "snr_background": snr_bg,
        }
    )
    for col, unit in (
        ("x", u.pix),
        ("y", u.pix),
        ("flux", u.electron),
        ("fwhm", u.pix),
        ("theta", u.rad),
        ("peak", u.electron),
    ):
        truth[col].unit = unit

    # units, sky subtraction, CCDData
    g = 1.0 if gain is None else float(gain)
    if subtract_sky:
        data -= sky
        model_e -= sky
    data /= g
    model_e /= g
    header = fits.Header()
    header["GAIN"] = (g, "e-/ADU" if gain is not None else "e-/e- (image in electrons)")
    header["RDNOISE"] = (read_noise, "read noise (e-)")
    header["SKYLEVEL"] = (sky / g, "sky level (image units)")
    header["SKYSUB"] = (bool(subtract_sky), "sky level subtracted")
    if saturation is not None:
        header["SATURATE"] = ((saturation - (sky if subtract_sky else 0.0)) / g, "image units")
    header["NSTARS"] = (x.size, "simulated point sources")
    header["NGALAXY"] = (0 if galaxies is None else len(galaxies), "simulated galaxies")
    header["NCOSMIC"] = (n_cosmic_rays, "cosmic-ray hits (not masked)")
    header["PSFPROF"] = (psf.profile, "PSF profile")
    header["PSFFWHM"] = (psf.fwhm, "PSF FWHM at frame centre (pix)")
    if isinstance(wcs, WCS):
        the_wcs = wcs
    elif wcs:
        the_wcs = _make_wcs(shape)
    else:
        the_wcs = None
    ccd = CCDData(
        data,
        unit=u.electron if gain is None else u.adu,
        uncertainty=StdDevUncertainty(np.sqrt(variance_e) / g),
        mask=mask,
        meta=header,
        wcs=the_wcs,
    )
    return SimulatedImage(
        ccd=ccd,
        truth=truth,
        psf=psf,
        sky=sky,
        read_noise=read_noise,
        gain=g,
        noise_rms=math.sqrt(bvar),
        model=model_e,
        cosmic_rays=cosmic_rays,
        bad_pixels=bad_pixels,
        sky_subtracted=bool(subtract_sky),
        galaxies=galaxy_truth,
    )


def _common_checks(
    sky: float, read_noise: float, gain: float | None, saturation: float | None
) -> tuple[float, float, float | None, float | None]:
    sky = _check_nonneg(sky, "sky")
    read_noise = _check_nonneg(read_noise, "read_noise")
    if gain is not None:
        gain = _check_nonneg(gain, "gain", strict=True)
    if saturation is not None:
        saturation = _check_nonneg(saturation, "saturation", strict=True)
        if saturation <= sky:
            raise ValueError(
                f"saturation ({saturation} e-) must exceed the sky level ({sky} e-), "
                "otherwise every pixel saturates."
            )
    return sky, read_noise, gain, saturation


def simulate_image(
    shape: int | tuple[int, int] = (1024, 1024),
    *,
    psf: PSFField | float = 3.0,
    n_stars: int = 300,
    flux_range: tuple[float, float] = (300.0, 3e5),
    flux_distribution: str = "powerlaw",
    powerlaw_index: float = 2.5,
    sky: float = 200.0,
    read_noise: float = 5.0,
    gain: float | None = None,
    saturation: float | None = None,
    n_bad_pixels: int = 0,
    n_cosmic_rays: int = 0,
    stars: Table | None = None,
    seed: int | np.random.Generator | None = None,
    min_separation: float | None = None,
    edge: float | None = None,
    noise: bool = True,
    subtract_sky: bool = False,
    wcs: bool | WCS = True,
    n_galaxies: int = 0,
    galaxies: Table | None = None,
    galaxy_flux_range: tuple[float, float] | None = None,
    galaxy_size_range: tuple[float, float] = (1.0, 5.0),
    galaxy_sersic_range: tuple[float, float] = (1.0, 4.0),
    galaxy_ellipticity_max: float = 0.6,
) -> SimulatedImage:
    """Simulate a star field with a known PSF, noise and detector defects.

    Parameters
    ----------
    shape : int or tuple of int, optional
        Image shape ``(ny, nx)``.
    psf : PSFField or float, optional
        The PSF (a float is a round Gaussian of that FWHM in pixels).
    n_stars : int, optional
        Number of random stars (ignored when ``stars`` is given; 0 is allowed).
    flux_range : tuple of float, optional
        ``(low, high)`` total star flux in e-.
    flux_distribution : {'powerlaw', 'loguniform', 'uniform'}, optional
        ``'powerlaw'`` draws ``dN/dF ~ F**-powerlaw_index`` (2.5: Euclidean
        number counts), truncated to ``flux_range``.
    powerlaw_index : float, optional
        Index of the power law.
    sky : float, optional
        Sky level in e-/pixel.
    read_noise : float, optional
        Gaussian read noise in e-.
    gain : float or None, optional
        If given (e-/ADU), the image is returned in ADU (``data = e- / gain``);
        otherwise in electrons.
    saturation : float or None, optional
        Full well in e-: pixels above it are clipped to it and masked, and the
        header gets SATURATE (in image units, sky-subtracted if ``subtract_sky``).
    n_bad_pixels : int, optional
        Random hot (``sky + 1e3..1e5`` e-) or dead (0 e-) pixels, all masked.
    n_cosmic_rays : int, optional
        Random cosmic-ray hits: 1-3 pixel tracks (straight, any of 8
        directions) depositing 300-5000 e- in total, added after the PSF (so
        sharper than any star) and NOT masked; listed in ``cosmic_rays``.
    stars : `~astropy.table.Table`, optional
        Stars to render instead of random ones: columns ``x``, ``y`` (0-based
        pixels) and ``flux`` (e-).
    seed : int, Generator or None, optional
        Seed of `numpy.random.default_rng`; equal seeds give equal images.
    min_separation : float or None, optional
        Minimum distance between random stars in pixels.
    edge : float or None, optional
        Random stars are kept this many pixels from the borders; default the
        PSF stamp half size, so every stamp lies fully inside the image.
    noise : bool, optional
        If False, return the noiseless expected image (no Poisson, no read
        noise); the uncertainty is still the expected noise.
    subtract_sky : bool, optional
        Return the image with the sky level subtracted (see also
        `SimulatedImage.background_subtracted`).
    wcs : bool or `~astropy.wcs.WCS`, optional
        Attach a simple TAN WCS (0.5"/pix, centred at RA 150, Dec 2.2 deg), or
        the given WCS, or none.
    n_galaxies : int, optional
        Number of random galaxies: elliptical Sersic profiles
        ``exp(-b_n (r/r_eff)**(1/n))``, integrated over the pixels, cut at 5
        ``r_eff`` and convolved with the local PSF, each rendered with exactly its
        truth flux.  Positions are uniform like the stars' (``edge``, and at least
        ``min_separation`` from the stars and from each other when given); fluxes
        log-uniform in ``galaxy_flux_range``, half-light radii log-uniform in
        ``galaxy_size_range``, Sersic indices uniform in ``galaxy_sersic_range``
        (1 exponential disc, 4 de Vaucouleurs), ellipticities uniform in
        ``[0, galaxy_ellipticity_max)`` and angles uniform.  Fields where galaxies
        outnumber stars: e.g. ``n_galaxies=3 * n_stars``.
    galaxies : `~astropy.table.Table`, optional
        Galaxies to render instead of random ones: columns ``x``, ``y``, ``flux``
        (e-), ``r_eff`` (pixels), ``sersic_n``, ``ellipticity``, ``theta``.
    galaxy_flux_range : tuple of float, optional
        ``(low, high)`` galaxy flux in e-; default ``flux_range``.
    galaxy_size_range : tuple of float, optional
        ``(low, high)`` intrinsic half-light radius along the major axis, pixels.
    galaxy_sersic_range : tuple of float, optional
        ``(low, high)`` Sersic index, within ``[0.3, 8]``.
    galaxy_ellipticity_max : float, optional
        Upper end of the intrinsic ellipticity ``1 - b/a``.

    Returns
    -------
    SimulatedImage
        ``ccd`` and ``truth`` (also unpackable as ``ccd, truth = ...``).
        ``truth`` columns: ``id``; ``x``, ``y``; ``flux`` (e-, exact: each
        rendered stamp is renormalised to it); ``fwhm``, ``ellipticity``,
        ``theta`` (the local PSF); ``peak`` (e-/pix of the noiseless star in
        its brightest pixel, sky excluded); ``saturated`` (the noiseless image
        including sky, neighbours and galaxies exceeds ``saturation`` at that
        pixel); ``isolated`` (no other star brighter than 1 % of this one within
        3 local FWHM; galaxies are not counted); ``snr`` (optimal PSF-fit S/N
        with known PSF and position, including the star's own Poisson noise:
        ``flux * sqrt(sum(P**2 / (sky + rn**2 + flux*P)))``); ``snr_background``
        (background-limited: ``flux * sqrt(sum(P**2)) / sqrt(sky + rn**2)``).

    Notes
    -----
    The noise model is ``data = Poisson(sky + stars) + Normal(0, rn)`` in e-,
    and the uncertainty is the TRUE expected standard deviation
    ``sqrt(sky + stars + rn**2)`` (divided by the gain for ADU images), not one
    estimated from the noisy data.

    Examples
    --------
    >>> from astro_zackay.simulation import simulate_image, PSFField
    >>> sim = simulate_image((64, 64), psf=PSFField(fwhm=2.5, profile="moffat"),
    ...                      n_stars=5, seed=1)
    >>> ccd, truth = sim
    >>> ccd.shape, ccd.unit, len(truth)
    ((64, 64), Unit("electron"), 5)
    >>> ccd.meta["SKYLEVEL"], sim.noise_rms ** 2
    (200.0, 225.0)

    Three galaxies for every star:

    >>> sim = simulate_image((128, 128), n_stars=10, n_galaxies=30, seed=2)
    >>> len(sim.truth), len(sim.galaxies), sim.ccd.meta["NGALAXY"]
    (10, 30, 30)
    >>> bool(sim.galaxies["r_eff"].min() >= 1.0 and sim.galaxies["r_eff"].max() <= 5.0)
    True
    """
    shape = _check_shape(shape, "shape")
    _check_wcs(wcs)
    sky, read_noise, gain, saturation = _common_checks(sky, read_noise, gain, saturation)
    n_bad_pixels = _check_count(n_bad_pixels, "n_bad_pixels")
    n_cosmic_rays = _check_count(n_cosmic_rays, "n_cosmic_rays")
    psf = _as_psf_field(psf, shape, "psf")
    rng = _rng(seed)
    edge = float(psf.half_size()) if edge is None else _check_nonneg(edge, "edge")
    if stars is not None:
        x, y, flux = _check_sources(stars, "stars")
    else:
        n_stars = _check_count(n_stars, "n_stars")
        x, y = _draw_positions(rng, n_stars, shape, edge, min_separation)
        flux = _draw_fluxes(rng, n_stars, flux_range, flux_distribution, powerlaw_index)
    gal = _GalaxyOptions(
        n_galaxies,
        galaxies,
        galaxy_flux_range,
        galaxy_size_range,
        galaxy_sersic_range,
        galaxy_ellipticity_max,
    ).draw(rng, shape, edge, min_separation, np.column_stack([x, y]), flux_range)
    return _simulate(
        shape,
        psf,
        x,
        y,
        flux,
        sky=sky,
        read_noise=read_noise,
        gain=gain,
        saturation=saturation,
        n_bad_pixels=n_bad_pixels,
        n_cosmic_rays=n_cosmic_rays,
        noise=noise,
        subtract_sky=subtract_sky,
        wcs=wcs,
        rng=rng,
        galaxies=gal,
    )


def _pair_value(value: Any, name: str) -> tuple[float, float]:
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.size == 1:
        return float(arr[0]), float(arr[0])
    if arr.size == 2:
        return float(arr[0]), float(arr[1])
    raise ValueError(f"{name} must be a number or a (reference, science) pair, got {value!r}.")


def simulate_pair(
    shape: int | tuple[int, int] = (1024, 1024),
    *,
    reference_psf: PSFField | float = 2.5,
    science_psf: PSFField | float = 3.5,
    flux_ratio: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
    reference_sky: float = 200.0,
    science_sky: float = 200.0,
    read_noise: float | tuple[float, float] = 5.0,
    gain: float | None = None,
    saturation: float | None = None,
    n_stars: int = 300,
    flux_range: tuple[float, float] = (300.0, 3e5),
    flux_distribution: str = "powerlaw",
    powerlaw_index: float = 2.5,
    stars: Table | None = None,
    transients: Table | None = None,
    n_transients: int = 0,
    transient_snr: float | tuple[float, float] | None = None,
    transient_flux_range: tuple[float, float] | None = None,
    min_separation: float | None = None,
    edge: float | None = None,
    noise: bool = True,
    subtract_sky: bool = False,
    wcs: bool | WCS = True,
    seed: int | np.random.Generator | None = None,
    n_galaxies: int = 0,
    galaxies: Table | None = None,
    galaxy_flux_range: tuple[float, float] | None = None,
    galaxy_size_range: tuple[float, float] = (1.0, 5.0),
    galaxy_sersic_range: tuple[float, float] = (1.0, 4.0),
    galaxy_ellipticity_max: float = 0.6,
) -> SimulatedPair:
    """Simulate a reference and a science image of the same star field.

    The same stars appear in both images; in the science image they are at
    ``(x + dx, y + dy)`` with fluxes multiplied by ``flux_ratio``.  Transients
    are added to the science image only.  Each image has its own PSF, sky and
    independent noise.

    Parameters
    ----------
    shape : int or tuple of int, optional
        Shape of both images.
    reference_psf, science_psf : PSFField or float, optional
        The PSFs (a float is a round Gaussian FWHM in pixels).
    flux_ratio : float, optional
        ``beta = F_n / F_r``: science flux of a star over its reference flux.
    shift : tuple of float, optional
        ``(dx, dy)`` shift of the science frame positions relative to the
        reference (the science WCS is shifted accordingly).
    reference_sky, science_sky : float, optional
        Sky levels in e-/pixel.
    read_noise : float or tuple of float, optional
        Read noise in e- (one value, or ``(reference, science)``).
    gain, saturation, flux_range, flux_distribution, powerlaw_index, noise, subtract_sky
        As in `simulate_image`, for both images (``flux_range`` in reference e-).
    n_stars : int, optional
        Number of random stars (0 gives a pure-noise pair).
    stars : `~astropy.table.Table`, optional
        ``x``, ``y``, ``flux`` of the stars in REFERENCE-frame pixels and e-.
    transients : `~astropy.table.Table`, optional
        ``x``, ``y`` in SCIENCE-frame pixels and ``flux`` in science-image e-.
    n_transients : int, optional
        Number of random transients (if ``transients`` is not given).
    transient_snr : float or tuple of float, optional
        Target background-limited single-image PSF-fit S/N of random transients
        in the science image, ``flux * sqrt(sum(P**2)) / sqrt(sky + rn**2)``
        (a pair draws uniformly in that range).  This is also the ZOGY optimal
        S/N in the limit of a noiseless reference.  Default 10 when
        ``transient_flux_range`` is not given.
    transient_flux_range : tuple of float, optional
        Log-uniform range of random transient fluxes (science e-), used
        instead of ``transient_snr``.
    min_separation : float, optional
        Minimum distance between random stars, and between random transients
        and any star or transient, in pixels.
    edge : float, optional
        Border kept free of random sources; default the larger stamp half size
        plus the shift, so all stamps lie inside both images.
    wcs : bool or `~astropy.wcs.WCS`, optional
        The reference WCS (True: default TAN); the science WCS is the same
        with CRPIX moved by ``shift``.
    seed : int, Generator or None, optional
        Seed; equal seeds give equal pairs.
    n_galaxies, galaxies, galaxy_flux_range, galaxy_size_range, galaxy_sersic_range, \
galaxy_ellipticity_max
        Galaxies as in `simulate_image` (``galaxies`` in REFERENCE-frame pixels and
        e-).  They do not vary: the same intrinsic galaxies appear in both images,
        moved by ``shift``, scaled by ``flux_ratio`` and convolved with each image's
        PSF, like the stars; ``reference.galaxies`` and ``science.galaxies`` list them
        row by row.

    Returns
    -------
    SimulatedPair

    Examples
    --------
    >>> from astro_zackay.simulation import simulate_pair
    >>> pair = simulate_pair((64, 64), n_stars=4, n_transients=1, transient_snr=20,
    ...                      shift=(0.3, -0.2), flux_ratio=0.5, seed=0)
    >>> len(pair.reference.truth), len(pair.science.truth), len(pair.transients)
    (4, 4, 1)
    >>> bool(np.allclose(pair.science.truth["x"], pair.reference.truth["x"] + 0.3))
    True
    >>> float(pair.transients["snr"][0])
    20.0
    """
    shape = _check_shape(shape, "shape")
    flux_ratio = _check_nonneg(flux_ratio, "flux_ratio", strict=True)
    try:
        dx, dy = (float(s) for s in shift)
    except (TypeError, ValueError):
        raise ValueError(f"shift must be a (dx, dy) pair of floats, got {shift!r}.") from None
    if not (np.isfinite(dx) and np.isfinite(dy)):
        raise ValueError(f"shift must be finite, got {shift!r}.")
    rn_r, rn_s = _pair_value(read_noise, "read_noise")
    reference_sky, rn_r, gain, saturation = _common_checks(reference_sky, rn_r, gain, saturation)
    science_sky, rn_s, _, _ = _common_checks(science_sky, rn_s, gain, saturation)
    n_transients = _check_count(n_transients, "n_transients")
    _check_wcs(wcs)
    rpsf = _as_psf_field(reference_psf, shape, "reference_psf")
    spsf = _as_psf_field(science_psf, shape, "science_psf")
    rng = _rng(seed)
    rng_stars, rng_ref, rng_sci = rng.spawn(3)
    if edge is None:
        edge = float(max(rpsf.half_size(), spsf.half_size())) + math.ceil(max(abs(dx), abs(dy)))
    else:
        edge = _check_nonneg(edge, "edge")
    if stars is not None:
        x, y, flux = _check_sources(stars, "stars")
    else:
        n_stars = _check_count(n_stars, "n_stars")
        x, y = _draw_positions(rng_stars, n_stars, shape, edge, min_separation)
        flux = _draw_fluxes(rng_stars, n_stars, flux_range, flux_distribution, powerlaw_index)

    # transients, in science-frame coordinates and science e-
    s_bvar = science_sky + rn_s**2
    if transients is not None:
        if n_transients:
            raise ValueError("Give either transients or n_transients, not both.")
        tx, ty, tflux = _check_sources(transients, "transients")
    else:
        tx, ty = _draw_positions(
            rng_stars,
            n_transients,
            shape,
            edge,
            min_separation,
            existing=np.column_stack([x + dx, y + dy]),
        )
        if transient_flux_range is not None and transient_snr is not None:
            raise ValueError("Give either transient_snr or transient_flux_range, not both.")
        if transient_flux_range is not None:
            tflux = _draw_fluxes(rng_stars, n_transients, transient_flux_range, "loguniform", 1.0)
        else:
            lo, hi = _pair_value(10.0 if transient_snr is None else transient_snr, "transient_snr")
            if not (0 < lo <= hi and np.isfinite(hi)):
                raise ValueError(f"transient_snr must be > 0, got {transient_snr!r}.")
            if s_bvar == 0 and n_transients:
                raise ValueError(
                    "transient_snr needs a science noise level: science_sky + read_noise**2 > 0."
                )
            target = lo + rng_stars.random(n_transients) * (hi - lo)
            unit = _render(shape, tx, ty, np.ones(n_transients), spsf)
            tflux = target * math.sqrt(s_bvar) / np.sqrt(unit.sum_p2)
    gal = _GalaxyOptions(
        n_galaxies,
        galaxies,
        galaxy_flux_range,
        galaxy_size_range,
        galaxy_sersic_range,
        galaxy_ellipticity_max,
    ).draw(
        rng_stars, shape, edge, min_separation, np.column_stack([x, y]), flux_range
    )
    sci_gal = None
    if gal is not None:
        sci_gal = gal.copy()
        sci_gal["x"] += dx
        sci_gal["y"] += dy
        sci_gal["flux"] *= flux_ratio
    if np.any((tx < 0) | (tx > shape[1] - 1) | (ty < 0) | (ty > shape[0] - 1)):
        warnings.warn(
            "Some transients lie outside the science image; they are only partly rendered.",
            AstroZackayWarning,
            stacklevel=2,
        )

    common = {
        "gain": gain,
        "saturation": saturation,
        "n_bad_pixels": 0,
        "n_cosmic_rays": 0,
        "noise": noise,
        "subtract_sky": subtract_sky,
    }
    if isinstance(wcs, WCS):
        ref_wcs = wcs
        sci_wcs = wcs.deepcopy()
        sci_wcs.wcs.crpix = [wcs.wcs.crpix[0] + dx, wcs.wcs.crpix[1] + dy]
    elif wcs:
        ref_wcs, sci_wcs = _make_wcs(shape), _make_wcs(shape, (dx, dy))
    else:
        ref_wcs = sci_wcs = False
    reference = _simulate(
        shape,
        rpsf,
        x,
        y,
        flux,
        sky=reference_sky,
        read_noise=rn_r,
        wcs=ref_wcs,
        rng=rng_ref,
        galaxies=gal,
        **common,
    )
    n = x.size
    science_all = _simulate(
        shape,
        spsf,
        np.concatenate([x + dx, tx]),
        np.concatenate([y + dy, ty]),
        np.concatenate([flux * flux_ratio, tflux]),
        sky=science_sky,
        read_noise=rn_s,
        wcs=sci_wcs,
        rng=rng_sci,
        galaxies=sci_gal,
        **common,
    )
    truth_all = science_all.truth
    science = replace(science_all, truth=truth_all[:n])
    ttab = Table(
        {
            "x": tx,
            "y": ty,
            "flux": tflux,
            "snr": truth_all["snr_background"][n:],
            "snr_total": truth_all["snr"][n:],
        },
        meta={"description": "transients: science-frame pixels, science e-"},
    )
    ttab["x"].unit = ttab["y"].unit = u.pix
    ttab["flux"].unit = u.electron
    for sim in (reference, science):
        sim.ccd.meta["FLXRATIO"] = (flux_ratio, "science / reference flux scale")
        sim.ccd.meta["SHIFTX"] = (dx, "science x - reference x (pix)")
        sim.ccd.meta["SHIFTY"] = (dy, "science y - reference y (pix)")
    science.ccd.meta["NTRANS"] = (len(ttab), "transients (science only)")
    return SimulatedPair(reference, science, ttab, flux_ratio, (dx, dy))


def simulate_bright_star_pair(
    shape: int | tuple[int, int] = (256, 256),
    *,
    reference_psf: PSFField | float = 2.5,
    science_psf: PSFField | float = 3.5,
    n_stars: int = 30,
    flux_range: tuple[float, float] = (1e4, 3e5),
    contrast: float = 10.0,
    seed: int | None = None,
    **pair_options: Any,
) -> SimulatedPair:
    """A pair whose brightest star, near the centre, outshines all the others ``contrast`` times.

    An adversarial field for PSF models and subtraction: the wings of one star far
    brighter than the stars the PSF is learned from show every error of the model's
    wing. ``n_stars`` stars of fluxes uniform in ``flux_range`` (reference e-) are placed
    uniformly, a PSF half-size from the edges, and one more star of ``contrast`` times
    the brightest of them at ``(nx / 2 + 0.3, ny / 2 - 0.2)``; the pair is then drawn
    by `simulate_pair` with the same ``seed``.

    Parameters
    ----------
    shape : int or (int, int)
        Image shape ``(ny, nx)``.
    reference_psf, science_psf : PSFField or float
        The PSFs (a FWHM in pixels gives a Gaussian).
    n_stars : int
        Number of ordinary stars, besides the bright one.
    flux_range : (float, float)
        Their fluxes (reference e-), drawn uniformly.
    contrast : float
        Flux of the bright star over the brightest ordinary star (> 1).
    seed : int, optional
        Seed of the star positions and fluxes and of `simulate_pair`.
    **pair_options
        Passed to `simulate_pair` (``flux_ratio``, ``shift``, ``reference_sky``, ...);
        ``stars``, ``n_stars`` and ``flux_range`` are set here.

    Returns
    -------
    SimulatedPair
        Row 0 of the truth tables is the bright star.

    Examples
    --------
    >>> from astro_zackay.simulation import simulate_bright_star_pair
    >>> pair = simulate_bright_star_pair((128, 128), n_stars=10, seed=1)
    >>> truth = pair.reference.truth
    >>> bool(truth["flux"][0] == 10 * truth["flux"][1:].max())
    True
    """
    shape = (shape, shape) if np.isscalar(shape) else tuple(shape)
    if not contrast > 1:
        raise ValueError(f"contrast must be > 1, got {contrast}")
    count = _check_count(n_stars, "n_stars")
    if count < 1:
        raise ValueError("n_stars must be >= 1: the bright star outshines the others")
    low, high = _check_range(flux_range, "flux_range", 0.0)
    taken = {"stars", "n_stars", "flux_range"} & set(pair_options)
    if taken:
        raise TypeError(f"simulate_bright_star_pair sets {sorted(taken)} itself")
    ref_psf = _as_psf_field(reference_psf, shape, "reference_psf")
    sci_psf = _as_psf_field(science_psf, shape, "science_psf")
    rng = _rng(seed)
    edge = max(ref_psf.half_size(), sci_psf.half_size()) + 1
    x = rng.uniform(edge, shape[1] - 1 - edge, count + 1)
    y = rng.uniform(edge, shape[0] - 1 - edge, count + 1)
    flux = rng.uniform(low, high, count + 1)
    x[0], y[0], flux[0] = shape[1] / 2 + 0.3, shape[0] / 2 - 0.2, contrast * flux[1:].max()
    return simulate_pair(
        shape,
        reference_psf=ref_psf,
        science_psf=sci_psf,
        stars=Table({"x": x, "y": y, "flux": flux}),
        seed=seed,
        **pair_options,
    )


# ---------------------------------------------------------------------------
# Mosaics: frames tiled from independent images (a PSF that jumps between tiles)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PSFMosaic:
    """The PSF of a frame tiled from independently simulated images (`simulate_mosaic`).

    Tile ``k`` (row-major: row ``k // ncols``, column ``k % ncols``) covers rows
    ``[row * ny, (row + 1) * ny)`` and columns ``[col * nx, (col + 1) * nx)`` of the
    frame, where ``(ny, nx)`` is ``tile_shape``, and has the PSF ``fields[k]`` (in tile
    coordinates).  `params` and `stamp` take FRAME coordinates, like those of
    `PSFField`, so either can serve as the true PSF of a `SimulatedImage`.

    Parameters
    ----------
    fields : tuple of PSFField
        One PSF per tile, row-major.
    grid : tuple of int
        ``(nrows, ncols)`` of the tiles.
    tile_shape : tuple of int
        ``(ny, nx)`` of every tile.

    Examples
    --------
    >>> from astro_zackay.simulation import PSFField, PSFMosaic
    >>> mosaic = PSFMosaic((PSFField(3.0), PSFField(5.0)), (1, 2), (32, 32))
    >>> mosaic.shape, [float(f) for f in mosaic.params([10.0, 40.0], [5.0, 5.0])[0]]
    ((32, 64), [3.0, 5.0])
    """

    fields: tuple[PSFField, ...]
    grid: tuple[int, int]
    tile_shape: tuple[int, int]

    def __post_init__(self) -> None:
        grid = _check_shape(self.grid, "grid")
        tile_shape = _check_shape(self.tile_shape, "tile_shape")
        fields = tuple(self.fields)
        if len(fields) != grid[0] * grid[1]:
            raise ValueError(
                f"A {grid[0]}x{grid[1]} mosaic needs {grid[0] * grid[1]} PSFs, got {len(fields)}."
            )
        bound = tuple(_as_psf_field(f, tile_shape, "fields[k]") for f in fields)
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "tile_shape", tile_shape)
        object.__setattr__(self, "fields", bound)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(ny, nx)`` of the whole frame."""
        return self.grid[0] * self.tile_shape[0], self.grid[1] * self.tile_shape[1]

    @property
    def profile(self) -> str:
        """The tiles' common profile, or ``'mixed'``."""
        profiles = {f.profile for f in self.fields}
        return profiles.pop() if len(profiles) == 1 else "mixed"

    @property
    def fwhm(self) -> float:
        """The largest FWHM at a tile centre, in pixels."""
        return max(f.fwhm for f in self.fields)

    @property
    def max_fwhm(self) -> float:
        """Largest major-axis FWHM over the frame, in pixels."""
        return max(f.max_fwhm for f in self.fields)

    @property
    def is_variable(self) -> bool:
        """Always True: the PSF changes from tile to tile."""
        return True

    def half_size(self) -> int:
        """The largest rendering half size of the tiles."""
        return max(f.half_size() for f in self.fields)

    @property
    def stamp_shape(self) -> tuple[int, int]:
        """Shape of the largest rendering stamps, ``(2*h + 1, 2*h + 1)``."""
        size = 2 * self.half_size() + 1
        return size, size

    def tile_of(
        self, x: float | np.ndarray, y: float | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tile index of frame positions ``(x, y)`` and the positions inside that tile."""
        x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        ty, tx = self.tile_shape
        col = np.clip(np.floor((x + 0.5) / tx), 0, self.grid[1] - 1).astype(int)
        row = np.clip(np.floor((y + 0.5) / ty), 0, self.grid[0] - 1).astype(int)
        return row * self.grid[1] + col, x - col * tx, y - row * ty

    def params(
        self, x: float | np.ndarray, y: float | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(fwhm, ellipticity, theta)`` arrays at frame positions ``(x, y)``."""
        tile, lx, ly = self.tile_of(x, y)
        out = [np.zeros(tile.shape) for _ in range(3)]
        for k, psf in enumerate(self.fields):
            sel = tile == k
            for arr, value in zip(out, psf.params(lx[sel], ly[sel])):
                arr[sel] = value
        return out[0], out[1], out[2]

    def stamp(
        self,
        x: float,
        y: float,
        shape: int | tuple[int, int] | None = None,
        *,
        center: tuple[float, float] | None = None,
    ) -> np.ndarray:
        """Return the true unit-sum PSF at frame position ``(x, y)`` (see `PSFField.stamp`)."""
        tile, lx, ly = self.tile_of(x, y)
        if tile.ndim:
            raise ValueError("PSFMosaic.stamp takes a single (x, y) position.")
        return self.fields[int(tile)].stamp(
            float(lx), float(ly), self.stamp_shape if shape is None else shape, center=center
        )


def _tile(arrays: Sequence[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """Arrange equal-shape 2-D arrays row-major into one ``grid`` of tiles."""
    ncols = grid[1]
    return np.block([list(arrays[r * ncols : (r + 1) * ncols]) for r in range(grid[0])])


def _stack_tables(
    tables: Sequence[Table | None], offsets: Sequence[tuple[int, int]], id_column: str | None
) -> Table | None:
    """Stack per-tile tables into frame coordinates, adding a ``tile`` column."""
    present = [(k, t) for k, t in enumerate(tables) if t is not None and len(t)]
    if not present:
        return None
    parts = []
    n_ids = 0
    for k, t in present:
        part = t.copy()
        part["x"] = part["x"] + offsets[k][0]
        part["y"] = part["y"] + offsets[k][1]
        if id_column is not None:
            ids = np.asarray(part[id_column])
            part[id_column] = ids + n_ids
            n_ids += int(ids.max()) + 1
        part["tile"] = np.full(len(part), k)
        parts.append(part)
    out = vstack_tables(parts)
    out.meta = dict(present[0][1].meta)
    return out


def simulate_mosaic(
    tile_shape: int | tuple[int, int],
    psfs: Sequence[PSFField | float],
    *,
    grid: tuple[int, int] = (2, 2),
    seed: int | np.random.Generator | None = None,
    wcs: bool | WCS = True,
    **kwargs: Any,
) -> SimulatedImage:
    """Simulate a frame tiled from independent images, each with its own PSF.

    Each tile is a `simulate_image` of ``tile_shape`` with the PSF ``psfs[k]``
    (row-major: tile ``k`` at row ``k // ncols``, column ``k % ncols``), its own
    stars, galaxies, noise and defects, and the tiles are placed side by side.
    The PSF therefore jumps at the tile borders, as in properimage's Tutorial 2
    frame (four 512^2 quadrants, x-FWHM from 5 to 10.4 px, y-FWHM 5 px, rotated
    per quadrant); the result's ``psf`` is a `PSFMosaic`, whose ``stamp(x, y)`` is
    the true PSF at any frame position.

    Parameters
    ----------
    tile_shape : int or tuple of int
        Shape ``(ny, nx)`` of every tile.
    psfs : sequence of PSFField or float
        One PSF per tile (a float is a round Gaussian FWHM), row-major.
    grid : tuple of int, optional
        ``(nrows, ncols)`` of the tiles.
    seed : int, Generator or None, optional
        Seed; each tile draws from its own child generator.
    wcs : bool or `~astropy.wcs.WCS`, optional
        A WCS of the whole frame (True: the default TAN WCS of `simulate_image`).
    **kwargs
        Passed to `simulate_image` for every tile (``n_stars`` and ``n_galaxies``
        are per tile; ``stars`` and ``galaxies`` are in tile coordinates).

    Returns
    -------
    SimulatedImage
        The frame, with ``truth`` (and ``galaxies``, ``cosmic_rays``,
        ``bad_pixels``) in frame coordinates, ids running over the frame and a
        ``tile`` column, and ``psf`` the `PSFMosaic`.

    Examples
    --------
    properimage's Tutorial 2 frame (its quadrants were 512 px wide; tiles of 128 px here
    to keep the example quick):

    >>> import numpy as np
    >>> from astro_zackay.simulation import PSFField, simulate_mosaic
    >>> psfs = [
    ...     PSFField(fwhm=5 + 6.5 * a / 180, ellipticity=1 - 5 / (5 + 6.5 * a / 180),
    ...              theta=np.radians(a))
    ...     for a in (0, 45, 105, 150)
    ... ]
    >>> frame = simulate_mosaic((128, 128), psfs, n_stars=10, flux_range=(1e3, 1e5),
    ...                         flux_distribution="uniform", sky=100.0, seed=0)
    >>> frame.ccd.shape, len(frame.truth), np.bincount(frame.truth["tile"]).tolist()
    ((256, 256), 40, [10, 10, 10, 10])
    >>> fwhm, e, theta = frame.psf.params(200.0, 200.0)  # the last quadrant: 150 degrees
    >>> round(float(fwhm), 3), round(float(np.degrees(theta)), 1)
    (10.417, 150.0)
    """
    tile_shape = _check_shape(tile_shape, "tile_shape")
    grid = _check_shape(grid, "grid")
    mosaic = PSFMosaic(tuple(psfs), grid, tile_shape)
    children = _rng(seed).spawn(len(mosaic.fields))
    tiles = [
        simulate_image(tile_shape, psf=psf, seed=child, wcs=False, **kwargs)
        for psf, child in zip(mosaic.fields, children)
    ]
    ty, tx = tile_shape
    offsets = [((k % grid[1]) * tx, (k // grid[1]) * ty) for k in range(len(tiles))]
    first = tiles[0]
    header = first.ccd.meta.copy()
    header["NSTARS"] = sum(len(t.truth) for t in tiles)
    header["NGALAXY"] = sum(int(t.ccd.meta["NGALAXY"]) for t in tiles)
    header["NCOSMIC"] = sum(int(t.ccd.meta["NCOSMIC"]) for t in tiles)
    header["PSFPROF"] = mosaic.profile
    header["PSFFWHM"] = (mosaic.fwhm, "largest PSF FWHM at a tile centre (pix)")
    header["NTILES"] = (len(tiles), f"tiles of {ty}x{tx} px, {grid[0]}x{grid[1]}")
    frame_wcs = wcs if isinstance(wcs, WCS) else (_make_wcs(mosaic.shape) if wcs else None)
    ccd = CCDData(
        _tile([t.ccd.data for t in tiles], grid),
        unit=first.ccd.unit,
        uncertainty=StdDevUncertainty(_tile([t.ccd.uncertainty.array for t in tiles], grid)),
        mask=_tile([t.ccd.mask for t in tiles], grid),
        meta=header,
        wcs=frame_wcs,
    )
    return replace(
        first,
        ccd=ccd,
        truth=_stack_tables([t.truth for t in tiles], offsets, "id"),
        psf=mosaic,
        model=_tile([t.model for t in tiles], grid),
        cosmic_rays=_stack_tables([t.cosmic_rays for t in tiles], offsets, "id"),
        bad_pixels=_stack_tables([t.bad_pixels for t in tiles], offsets, None),
        galaxies=_stack_tables([t.galaxies for t in tiles], offsets, "id"),
    )


def tutorial2_frame(
    tile_size: int = 512,
    *,
    n_stars: int = 80,
    flux_range: tuple[float, float] = (1e3, 1e5),
    sky: float = 100.0,
    seed: int | np.random.Generator | None = None,
    **kwargs: Any,
) -> SimulatedImage:
    """properimage's Tutorial 2 frame: four quadrants with strongly different PSFs.

    properimage's second tutorial builds a 1024^2 frame from four 512^2 images of 80
    stars each, with Gaussian PSFs of x-FWHM ``5 + 6.5 a / 180`` px and y-FWHM 5 px,
    rotated by ``a`` = 0, 45, 105 and 150 degrees (x-FWHM 5, 6.6, 8.8, 10.4 px), and
    fluxes spread linearly over a factor 100.  This rebuilds it with `simulate_mosaic`
    (quadrants row-major: ``a`` = 0 and 45 degrees in the bottom row) and exact truth.

    Parameters
    ----------
    tile_size : int, optional
        Side of each quadrant in pixels.
    n_stars : int, optional
        Stars per quadrant.
    flux_range : tuple of float, optional
        Uniformly distributed star fluxes, e-.
    sky : float, optional
        Sky level, e-/pixel.
    seed : int, Generator or None, optional
        Seed.
    **kwargs
        More `simulate_image` options for every quadrant (e.g. ``n_galaxies``).

    Returns
    -------
    SimulatedImage
        The frame; its ``psf`` is a `PSFMosaic` giving the true PSF anywhere.

    Examples
    --------
    >>> from astro_zackay.simulation import tutorial2_frame
    >>> frame = tutorial2_frame(96, n_stars=5, seed=1)
    >>> frame.ccd.shape, [round(f.fwhm, 2) for f in frame.psf.fields]
    ((192, 192), [5.0, 6.62, 8.79, 10.42])
    >>> [round(f.ellipticity, 3) for f in frame.psf.fields]
    [0.0, 0.245, 0.431, 0.52]
    """
    psfs = []
    for angle in (0.0, 45.0, 105.0, 150.0):
        x_fwhm = 5.0 + 6.5 * angle / 180.0
        psfs.append(
            PSFField(fwhm=x_fwhm, ellipticity=1.0 - 5.0 / x_fwhm, theta=math.radians(angle))
        )
    return simulate_mosaic(
        (tile_size, tile_size),
        psfs,
        n_stars=n_stars,
        flux_range=flux_range,
        flux_distribution="uniform",
        sky=sky,
        seed=seed,
        **kwargs,
    )

# ---------------------------------------------------------------------------
# Injection into existing images
# ---------------------------------------------------------------------------
def _fourier_shifted_stamps(
    stamps: np.ndarray, fx: np.ndarray, fy: np.ndarray, pad: int
) -> np.ndarray:
    """Shift each stamp by ``(fx, fy)`` pixels (new(p) = old(p - f)) through FFTs.

    Stamps are zero-padded by ``pad`` pixels on each side and to odd sizes (no
    Nyquist bin), so the shift is exact for band-limited stamps and preserves
    the sum exactly.
    """
    n, ny, nx = stamps.shape
    py, px = ny + 2 * pad + (ny + 1) % 2, nx + 2 * pad + (nx + 1) % 2
    padded = np.zeros((n, py, px))
    padded[:, pad : pad + ny, pad : pad + nx] = stamps
    return shift_stack(padded, fx, fy)


def _data_gain(ccd: CCDData, gain: float | None) -> float:
    if gain is not None:
        return _check_nonneg(gain, "gain", strict=True)
    if ccd.unit is not None and ccd.unit.is_equivalent(u.electron):
        return 1.0 / float(ccd.unit.to(u.electron))
    meta_gain = ccd.meta.get("GAIN") if ccd.meta is not None else None
    if meta_gain is None:
        raise ValueError(
            f"inject_sources needs the gain (e- per data unit) to add Poisson noise to an image "
            f"in {ccd.unit}: pass gain=... or set ccd.meta['GAIN'] (or use add_noise=False)."
        )
    return _check_nonneg(meta_gain, "ccd.meta['GAIN']", strict=True)


def inject_sources(
    ccd: CCDData,
    sources: Table,
    psf: np.ndarray | Callable[[float, float], np.ndarray] | PSFField,
    *,
    add_noise: bool = True,
    gain: float | None = None,
    seed: int | np.random.Generator | None = None,
) -> CCDData:
    """Add point sources to a copy of an image, with Poisson noise.

    Parameters
    ----------
    ccd : `~astropy.nddata.CCDData`
        The image (any linear unit, e.g. electrons or ADU); never modified.
    sources : `~astropy.table.Table`
        ``x``, ``y`` (0-based pixels, x the column) and ``flux`` (total flux in
        the units of ``ccd``, e.g. ADU for an ADU image).
    psf : ndarray, callable or PSFField
        A unit-sum stamp centred at its centre pixel ``((nx-1)/2, (ny-1)/2)``
        (the same for every source); or a callable ``psf(x, y)`` returning
        such a stamp for a source at ``(x, y)`` (called once per source, all
        stamps of one shape); or a `PSFField` rendered analytically.  Stamps
        are moved to the sub-pixel source position with an exact Fourier
        shift (sum-preserving; band-limited stamps are shifted exactly).  A
        stamp not summing to 1 is renormalised with a warning.
    add_noise : bool, optional
        Add Poisson noise of the added flux (in electrons, using the gain) and
        add its variance to the uncertainty, if any.  Without it the sources
        are added noiselessly and the uncertainty is unchanged.
    gain : float, optional
        e- per data unit; default 1 for images in electrons, else
        ``ccd.meta['GAIN']``.  Needed only with ``add_noise``.
    seed : int, Generator or None, optional
        Random seed of the Poisson noise.

    Returns
    -------
    `~astropy.nddata.CCDData`
        A new image (float64 data; mask, WCS and meta copied; ``NINJECT``
        counts the injected sources).

    Raises
    ------
    ValueError
        For a missing gain, bad source table or bad PSF.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.nddata import CCDData
    >>> from astropy.table import Table
    >>> from astro_zackay.simulation import inject_sources, psf_stamp
    >>> ccd = CCDData(np.zeros((32, 32)), unit="adu", meta={"GAIN": 2.0})
    >>> src = Table({"x": [10.3], "y": [20.6], "flux": [1000.0]})
    >>> out = inject_sources(ccd, src, psf_stamp(11, 2.5), add_noise=False)
    >>> round(float(out.data.sum()), 6), float(ccd.data.sum())
    (1000.0, 0.0)
    """
    if not isinstance(ccd, CCDData):
        raise TypeError(f"ccd must be a CCDData, got {type(ccd)}.")
    if ccd.data.ndim != 2:
        raise ValueError(f"ccd must be a 2-D image, got {ccd.data.ndim} dimensions.")
    x, y, flux = _check_sources(sources, "sources")
    ny, nx = ccd.shape
    added = np.zeros((ny, nx))
    n = x.size
    if isinstance(psf, PSFField):
        added = _render((ny, nx), x, y, flux, psf.for_shape((ny, nx))).image
    elif n:
        if callable(psf):
            stamps = [np.asarray(psf(float(xi), float(yi)), dtype=float) for xi, yi in zip(x, y)]
            shapes = {s.shape for s in stamps}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise ValueError(
                    f"The psf callable must return 2-D stamps of one shape; got {shapes}."
                )
            stack = np.stack(stamps)
        else:
            stamp = np.asarray(psf, dtype=float)
            if stamp.ndim != 2:
                raise ValueError(
                    f"psf must be a 2-D stamp, a callable or a PSFField, got shape "
                    f"{stamp.shape}; for a Gaussian of FWHM f give PSFField(fwhm=f)."
                )
            stack = stamp[None]
        if not np.all(np.isfinite(stack)):
            raise ValueError("The PSF stamp(s) contain non-finite values.")
        sums = stack.sum(axis=(1, 2))
        if np.any(sums <= 0):
            raise ValueError("The PSF stamp(s) must have a positive sum.")
        if np.any(np.abs(sums - 1) > 1e-6):
            warnings.warn(
                "PSF stamp(s) do not sum to 1; they were renormalised to unit sum.",
                AstroZackayWarning,
                stacklevel=2,
            )
        stack = stack / sums[:, None, None]
        sy, sx = stack.shape[1:]
        pad = 2
        ox, oy = x - (sx - 1) / 2.0, y - (sy - 1) / 2.0  # image position of stamp pixel (0, 0)
        ix, iy = np.rint(ox).astype(np.int64), np.rint(oy).astype(np.int64)
        fx, fy = ox - ix, oy - iy
        chunk = max(1, _CHUNK_ELEMENTS // ((sy + 2 * pad + 1) * (sx + 2 * pad + 1) * 4))
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            base = stack if stack.shape[0] == 1 else stack[sl]
            shifted = _fourier_shifted_stamps(
                np.broadcast_to(base, (len(fx[sl]), sy, sx)), fx[sl], fy[sl], pad
            )
            hy, hx = shifted.shape[1:]
            rows = iy[sl, None, None] - pad + np.arange(hy)[None, :, None]
            cols = ix[sl, None, None] - pad + np.arange(hx)[None, None, :]
            inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
            rows, cols = np.broadcast_arrays(rows, cols)
            np.add.at(added, (rows[inside], cols[inside]), (shifted * flux[sl, None, None])[inside])

    out = ccd.copy()
    data = np.asarray(ccd.data, dtype=float)
    if add_noise and n:
        g = _data_gain(ccd, gain)
        rng = _rng(seed)
        lam = np.clip(added, 0, None) * g
        noisy = added + (rng.poisson(lam) - lam) / g  # zero-mean noise, exact expected flux
        out.data = data + noisy
        if ccd.uncertainty is not None:
            extra = np.clip(added, 0, None) / g  # variance in data units**2
            unc = ccd.uncertainty
            if isinstance(unc, StdDevUncertainty):
                out.uncertainty = StdDevUncertainty(np.sqrt(np.asarray(unc.array) ** 2 + extra))
            elif isinstance(unc, VarianceUncertainty):
                out.uncertainty = VarianceUncertainty(np.asarray(unc.array) + extra)
            elif isinstance(unc, InverseVariance):
                with np.errstate(divide="ignore"):
                    out.uncertainty = InverseVariance(1.0 / (1.0 / np.asarray(unc.array) + extra))
            else:
                raise TypeError(
                    f"Cannot propagate the source noise into a {type(unc).__name__}; "
                    "use StdDev, Variance or InverseVariance uncertainties."
                )
    else:
        out.data = data + added
    if isinstance(out.meta, fits.Header):
        out.meta["NINJECT"] = (n, "point sources injected")
    else:
        out.meta["NINJECT"] = n
    logger.debug("Injected %d sources", n)
    return out
