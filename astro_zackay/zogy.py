"""ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27): the array core.

Arrays in, arrays out; no astropy objects.  With ``Fr = flux_ref``, ``Fn = flux_new``
and the PSF transforms ``Pr_h``, ``Pn_h`` of unit-sum stamps put at the origin
(`~astro_zackay.fourier.psf_rfft`), writing ``A = Fr*Pr_h`` and ``B = Fn*Pn_h``::

    den   = sn**2 |A|**2 + sr**2 |B|**2                 (floored, see below)
    D_h   = (A N_h - B R_h) / sqrt(den)                 white, unit variance
    Q     = A B / sqrt(den) = F_D * PD_h                (zeroed where den is floored)
    S_h   = conj(Q) D_h = kn_h N_h - kr_h R_h           kn_h = conj(Q) A / sqrt(den), ...
    F_S   = sum(|Q|**2) / Npix = F_D**2 sum(P_D**2)

so the identities ``S == F_D * (D ⋆ P_D)`` and ``F_S == F_D**2 sum(P_D**2)`` hold by
construction.  For correlated (stationary) noise, ``sn**2`` and ``sr**2`` become the
noise power spectra per pixel ``Sigma_n_h`` and ``Sigma_r_h`` (`~astro_zackay.noise`),
and ``F_D = Fr Fn / sqrt(Sigma_n_h[0, 0] Fr**2 + Sigma_r_h[0, 0] Fn**2)``: D is then
white and the identities still hold.

Denominator floor: ``den`` is floored at ``den.max() * sqrt(finfo(dtype).tiny)``
(``~1e-19`` relative in float32, ``~1e-154`` in float64) and ``P_D``, ``S`` and the
noise kernels are zeroed where the floor bites.  The larger floor
``den.max() * 1e-12`` also prevents NaN, but it removes the
noise of ``D`` at every frequency where both PSFs are below 1e-6 of their peak: for
a Gaussian PSF of sigma 2 px that is 45 % of the plane and ``std(D)`` drops to
~0.75.  The float32 path stays NaN-free because the PSF transforms are computed in
float64 (`~astro_zackay.fourier.psf_rfft`), so no round-off noise sits in the
denominator.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from scipy import ndimage

from ._stats import mad_std
from ._warnings import AstroZackayWarning, user_stacklevel
from .fourier import (
    ArrayBackend,
    abs2,
    fast_shape,
    floored_inv_sqrt,
    frequency_grids,
    get_array_module,
    half_spectrum_sum,
    move_whole_pixels,
    origin_to_stamp,
    pad_image,
    phase_ramp,
    psf_rfft,
    unit_sum_psf,
)
from .noise import NoiseSpectrum

__all__ = ["FluxMatch", "ShiftMatch", "ZogyResult", "fit_flux_ratio", "fit_shift", "zogy"]

_log = logging.getLogger(__name__)

#: Variance floor of Scorr's denominator, relative to the background-only variance F_S.
_VAR_FLOOR = 1e-6
#: Values a level's median reads at most (about): larger planes are read on a regular
#: grid of every k-th row and column.  A median of 2**20 white-noise values is within
#: 1.25 / 2**10 = 0.0012 sigma of the level (1 sigma off 1 time in 3); a smooth map's
#: (an rms map) moves by far less.
_MEDIAN_SAMPLES = 2**20
#: Largest change of Scorr, in sigma, that light hidden by masked pixels or beyond the
#: edge (zero-filled) may cause outside the grown mask.  Hidden sky noise moves Scorr
#: by ``sqrt(share of sum(k**2) over the hidden pixels)``: every mask and the edge grow
#: at least to the radius beyond which each kernel of S holds MASK_SCORR_CHANGE**2 of
#: its squared weight (``mask_radius``).  Light X hidden or uncertain moves Scorr by
#: ``k(r) X / sqrt(var S)``: regions holding more (saturated stars, stars cut by the
#: edge) grow to the radius beyond which that stays below MASK_SCORR_CHANGE, at most a
#: stamp.  A share of the kernels' absolute weight would be no radius at all: their
#: faint far tails (the Fourier ratios, estimated PSFs' noisy wings) hold 0.5-1 % of it
#: across the stamp.
MASK_SCORR_CHANGE = 0.1
#: Edge pixels brighter than this many sigma of their image are taken as stars cut by
#: the edge, which hide ``sum(|edge pixels|) * sqrt(1 / sum(P**2))`` of light beyond it
#: (about 3 times a centred star's hidden half).
EDGE_SOURCE_SIGMA = 5.0
#: Noise allowance of the brightest rim pixel of a masked region, in sigma of its image:
#: the largest of the few to few hundred noise pixels of a rim rarely exceeds it, so a
#: bad pixel at sky level is not taken to hide a star (with the rim's bare maximum, 50
#: scattered NaN pixels masked 12 % of a 512^2 difference).
RIM_NOISE_SIGMA = 4.0
#: Fraction of the image that the masked regions taken to hide stars (rims brighter
#: than the noise) may flag beyond the growth of every bad pixel by the kernels' core
#: radius, before a warning says how much was masked and why.
LARGE_MASK_FRACTION = 0.25
#: Tukey biweight and Huber tuning constants (95 % Gaussian efficiency).
_BIWEIGHT_C = 4.685
_HUBER_K = 1.345


@dataclass(frozen=True, repr=False)
class ZogyResult:
    """Outputs of `zogy` (all arrays are numpy arrays on the input grid).

    Attributes
    ----------
    D : ndarray
        Proper difference image, white with unit variance (divide by ``F_D`` for flux units).
    S : ndarray
        Matched-filter score ``S = S_N - S_R = F_D * (D ⋆ P_D)``.
    Scorr : ndarray
        ``S / sqrt(V_SN + V_SR + V_ast + V_beta)``: detection statistic in sigma units.
    F_D : float
        Flux zero point of ``D`` (eq 15).
    F_S : float
        Flux normalisation of ``S`` (eq 42): ``alpha = S / F_S``; also the variance of
        ``S`` for background-only noise.
    V_SN, V_SR : ndarray or float
        Variance of ``S_N`` and ``S_R``: ``V ⊛ k**2`` with the variance maps, or the
        constant ``sigma**2 * sum(k**2)`` without them (with a noise spectrum: its
        variance of ``S_N`` and ``S_R`` plus the maps' source excess, see `zogy`).
    V_ast : ndarray or None
        Astrometric-noise variance (eq 30-33), None when both astrometric noises are 0.
    V_beta : ndarray or None
        Flux-ratio-error variance ``(R sigma_beta)**2 ⊛ kr**2``, None when the error is 0.
    V_psf : ndarray or None
        PSF-model-error variance ``(eps_n**2 + eps_r**2) min(|S_N|, |S_R|)**2``, None
        when both PSF errors are 0 (see `zogy`).
    psf_d_at_origin : ndarray
        Unit-sum PSF of ``D`` on the FFT grid (the padded grid when ``pad=True``), centre
        at pixel ``[0, 0]``; `psf_d_stamp` cuts a centred stamp from it.
    mask : ndarray or None
        True where outputs are unreliable: within ``mask_radius`` of the image edge
        (with ``pad=True``) and of a masked/NaN input pixel, farther around masked
        regions and stars cut by the edge that hide bright light (up to a stamp).  None
        when nothing is flagged.
    flux_new, flux_ref, sigma_new, sigma_ref : float
        The flux zero points and background noises used.
    mask_radius : int
        Radius in pixels of the disk that holds ``1 - MASK_SCORR_CHANGE**2`` (99 %) of
        the squared weight of each of S's kernels: hidden sky noise beyond it moves
        Scorr by less than ``MASK_SCORR_CHANGE`` (0.1 sigma).
    """

    D: np.ndarray
    S: np.ndarray
    Scorr: np.ndarray
    F_D: float
    F_S: float
    V_SN: np.ndarray | float
    V_SR: np.ndarray | float
    V_ast: np.ndarray | None
    V_beta: np.ndarray | None
    psf_d_at_origin: np.ndarray
    mask: np.ndarray | None
    flux_new: float
    flux_ref: float
    sigma_new: float
    sigma_ref: float
    mask_radius: int = 0
    V_psf: np.ndarray | None = None

    @property
    def alpha(self) -> np.ndarray:
        """PSF-photometry flux of a point source centred at each pixel, ``S / F_S`` (eq 41)."""
        return self.S / self.F_S

    @property
    def alpha_err(self) -> np.ndarray:
        """1-sigma error of `alpha` from source + background noise, ``sqrt(V_SN + V_SR) / F_S``."""
        err = np.sqrt(np.maximum(self.V_SN + self.V_SR, 0.0)) / self.F_S
        return np.full(self.S.shape, err, dtype=self.S.dtype) if np.ndim(err) == 0 else err

    def psf_d_stamp(self, size: int, normalize: bool = False) -> np.ndarray:
        """Centred odd-sized stamp of ``P_D`` (optionally renormalised to unit sum)."""
        return origin_to_stamp(self.psf_d_at_origin, size, normalize=normalize)

    def __repr__(self) -> str:
        terms = [n for n in ("V_ast", "V_beta", "V_psf") if getattr(self, n) is not None]
        return (
            f"<ZogyResult shape={self.D.shape} dtype={self.D.dtype} F_D={self.F_D:.6g} "
            f"F_S={self.F_S:.6g} beta={self.flux_new / self.flux_ref:.6g}"
            f"{' +' + '+'.join(terms) if terms else ''}>"
        )


@dataclass(frozen=True)
class FluxMatch:
    """Result of `fit_flux_ratio`: ``new ≈ beta * ref + background_offset``.

    Attributes
    ----------
    beta : float
        Flux ratio ``Fn / Fr`` (a ratio of fluxes, never of magnitudes).
    beta_err : float
        1-sigma error of ``beta`` (sandwich estimate from the fit residuals).
    background_offset : float
        ``new - beta * ref`` background difference, in units of ``new``.
    background_offset_err : float
        1-sigma error of ``background_offset``.
    n_used : int
        Bright pixels that entered the final fit (with non-zero weight).
    converged : bool
        Whether the last update of ``beta`` was below ``tol * beta``.
    n_iter : int
        Iterations done.
    """

    beta: float
    beta_err: float
    background_offset: float
    background_offset_err: float
    n_used: int
    converged: bool
    n_iter: int


@dataclass(frozen=True)
class ShiftMatch:
    """Result of `fit_shift`: ``new ≈ beta * shift_image(ref, dx, dy) + background_offset``.

    Attributes
    ----------
    dx, dy : float
        Shift of ``new`` relative to ``ref`` in pixels along x (axis 1) and y (axis 0).
    dx_err, dy_err : float
        1-sigma errors.
    beta, beta_err, background_offset, background_offset_err, n_used, converged, n_iter
        As in `FluxMatch`, from the joint fit.
    """

    dx: float
    dy: float
    dx_err: float
    dy_err: float
    beta: float
    beta_err: float
    background_offset: float
    background_offset_err: float
    n_used: int
    converged: bool
    n_iter: int


# --------------------------------------------------------------------------------------
# input handling


def _positive(name: str, value: Any) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return value


def _non_negative(name: str, value: Any) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _fill_reference(
    ref: Any, var_ref: Any, mask_ref: Any, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The reference and its variance with their bad pixels (and NaN) set to 0, and those pixels.

    The reference's bad pixels stay in its own frame (the shift is applied in the
    FFT core); None when there are none.
    """
    ref = np.asarray(ref)
    if ref.shape != tuple(shape):
        raise ValueError(f"ref has shape {ref.shape}, expected {tuple(shape)} like new")
    bad = np.zeros(ref.shape, bool) if mask_ref is None else np.array(mask_ref, dtype=bool)
    if bad.shape != ref.shape:
        raise ValueError(f"mask_ref shape {bad.shape} differs from image shape {ref.shape}")
    bad |= ~np.isfinite(ref)
    if var_ref is not None:
        var_ref = np.asarray(var_ref)
        if var_ref.shape == ref.shape:
            bad |= ~np.isfinite(var_ref)
    if not bad.any():
        return ref, var_ref, None
    ref = np.where(bad, 0.0, ref).astype(ref.dtype, copy=False)
    if var_ref is not None and var_ref.shape == ref.shape:
        var_ref = np.where(bad, 0.0, var_ref).astype(var_ref.dtype, copy=False)
    return ref, var_ref, bad


def _moved_mask(bad: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """``bad`` moved by the rounded ``shift = (dx, dy)`` (no wrap) and grown by one pixel.

    Without a shift it is returned as it is.
    """
    if shift == (0.0, 0.0):
        return bad
    moved = move_whole_pixels(bad, int(np.rint(shift[0])), int(np.rint(shift[1])))
    rows = moved.copy()  # the 3x3 dilation as two separable passes of shifted ORs
    rows[1:] |= moved[:-1]
    rows[:-1] |= moved[1:]
    grown = rows.copy()
    grown[:, 1:] |= rows[:, :-1]
    grown[:, :-1] |= rows[:, 1:]
    return grown


def _noise_power(
    spectrum: NoiseSpectrum | np.ndarray | None, sigma: float, grid: tuple[int, int], name: str,
    scale: float = 1.0,
) -> float | np.ndarray:
    """The noise power per pixel on ``grid``'s rfft half plane: ``sigma**2`` or a spectrum.

    In the algebra's units: the data divided by ``scale`` (`_unit_scale`).
    """
    if spectrum is None:
        return (sigma / scale) ** 2
    if isinstance(spectrum, NoiseSpectrum):
        return spectrum.spectrum(grid, sigma=sigma / scale)
    power = np.asarray(spectrum, dtype=np.float64)
    expected = (grid[0], grid[1] // 2 + 1)
    if power.shape != expected:
        raise ValueError(
            f"{name} has shape {power.shape}; on this grid {grid} it must be {expected} "
            "(or pass a NoiseSpectrum)"
        )
    if not np.all(np.isfinite(power) & (power > 0)):
        raise ValueError(f"{name} must be finite and positive")
    return power / scale**2


def _unit_scale(sigmas: Any) -> float:
    """The unit of the ZOGY algebra: the power of 2 nearest the noises' geometric mean.

    The images' transforms are divided by it (exactly: a power of 2 changes no bit
    of a float's mantissa), so that the algebra's noise is near 1 in any unit of the
    data: S's kernels scale as ``1 / sigma**2`` and their squares, summed in float32,
    overflowed for data of ~1e-12 (erg/s/cm2/A: ``sum |k_h|**2 ~ 1e48``) and
    underflowed to 0 for data of ~1e12.  1 when no noise is positive and finite.

    Examples
    --------
    >>> from astro_zackay.zogy import _unit_scale
    >>> _unit_scale([15.0, 12.0]), _unit_scale([3e-12, 5e-12]), _unit_scale([0.0])
    (16.0, 3.637978807091713e-12, 1.0)
    """
    values = np.asarray(sigmas, dtype=np.float64).ravel()
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return 1.0
    return float(2.0 ** np.round(np.mean(np.log2(values))))


def _grow_mask(bad: np.ndarray, radius: int) -> np.ndarray:
    """Flag every pixel within ``radius`` pixels (Euclidean) of a True pixel.

    A few True pixels (their disks covering at most a sixteenth of the image) are
    painted with the disk of offsets; otherwise the distance transform runs on the
    bounding box of the True pixels grown by ``radius`` (nothing beyond it is that
    close).  Both flag the pixels at ``dx**2 + dy**2 <= radius**2`` from a True one.
    """
    ys, xs = np.nonzero(bad)
    if ys.size == 0:
        return bad.copy()
    dy, dx = np.nonzero(np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1])
                        <= radius)
    if ys.size * dy.size <= bad.size // 16:
        rows, cols = (ys[:, None] + (dy - radius)).ravel(), (xs[:, None] + (dx - radius)).ravel()
        inside = (rows >= 0) & (rows < bad.shape[0]) & (cols >= 0) & (cols < bad.shape[1])
        grown = np.zeros(bad.shape, bool)
        grown[rows[inside], cols[inside]] = True
        return grown
    box = (slice(max(ys.min() - radius, 0), ys.max() + radius + 1),
           slice(max(xs.min() - radius, 0), xs.max() + radius + 1))
    grown = np.zeros(bad.shape, bool)
    grown[box] = ndimage.distance_transform_edt(~bad[box]) <= radius
    return grown


def _edge_mask(shape: tuple[int, int], radius: int) -> np.ndarray:
    """Flag every pixel within ``radius`` pixels of the image edge (beyond it: padding)."""
    edge = np.ones(shape, bool)
    edge[radius : shape[0] - radius, radius : shape[1] - radius] = False
    return edge


@dataclass(frozen=True)
class _KernelReach:
    """How far a kernel reaches, up to ``cap`` px: each ``|k|`` level's farthest radius.

    ``values`` and ``radii`` are ``|k|`` and the radius of the pixels within ``cap`` of
    the origin (in no order); ``outer`` is the largest ``|k|`` beyond (levels at or
    below it reach ``cap``); ``core_radius`` holds ``1 - MASK_SCORR_CHANGE**2`` of
    ``sum(k**2)``.  The levels are sorted only when `radius` is first asked.
    """

    values: np.ndarray
    radii: np.ndarray
    outer: float
    cap: int
    core_radius: int

    @classmethod
    def of(cls, be: ArrayBackend, k2: Any, cap: int) -> _KernelReach:
        """From the square of an origin-centred kernel on the FFT grid (wrapping around)."""
        return cls.of_stack(be, k2[None], cap)[0]

    @classmethod
    def of_stack(cls, be: ArrayBackend, k2: Any, cap: int) -> list[_KernelReach]:
        """`of` for each squared kernel of an ``(n, ny, nx)`` stack on ``be``, in one pass.

        The squares are those that the source-noise variance convolves, so no other
        image-sized array is formed; only the windows within ``cap`` of the origin and a
        few numbers per kernel come back.
        """
        n, ny, nx = k2.shape
        rows = np.r_[0 : min(cap + 1, ny), max(ny - cap, cap + 1) : ny]
        cols = np.r_[0 : min(cap + 1, nx), max(nx - cap, cap + 1) : nx]
        index = (slice(None), be.asarray(rows)[:, None], be.asarray(cols)[None, :])
        window = np.asarray(be.to_numpy(k2[index]), dtype=np.float64)
        r = np.hypot(np.minimum(rows, ny - rows)[:, None], np.minimum(cols, nx - cols)[None, :])
        inside = r <= cap
        squares, r = window[:, inside], r[inside]
        total = np.asarray(be.to_numpy(k2.sum(axis=(1, 2), dtype=np.float64)))
        outer_energy = total - np.sum(squares, axis=1)
        outer = np.sqrt(cls._largest_beyond(be, k2, window[:, ~inside], cap))
        by_radius = np.argsort(r, kind="stable")
        energy = np.cumsum(squares[:, by_radius], axis=1)
        need = (1.0 - MASK_SCORR_CHANGE**2) * (energy[:, -1] + outer_energy)
        levels = np.sqrt(squares)
        out = []
        for j in range(n):
            m = int(np.searchsorted(energy[j], need[j]))
            core = cap if m >= r.size else int(np.ceil(r[by_radius][m]))
            out.append(cls(levels[j], r, float(outer[j]), cap, core))
        return out

    @staticmethod
    def _largest_beyond(be: ArrayBackend, k2: Any, corners: np.ndarray, cap: int) -> np.ndarray:
        """Each squared kernel's largest value beyond ``cap`` of the origin (0 where none).

        ``corners`` are the window's values beyond ``cap``; the rest lies in the rows or
        the columns farther than ``cap`` from the origin (read in place, no copy).
        """
        n, ny, nx = k2.shape
        parts = [corners.max(axis=1)] if corners.shape[1] else []
        for far in (k2[:, cap + 1 : ny - cap, :], k2[:, :, cap + 1 : nx - cap]):
            if far.size:
                parts.append(np.asarray(be.to_numpy(far.max(axis=(1, 2))), dtype=np.float64))
        return np.max(parts, axis=0) if parts else np.zeros(n)

    @cached_property
    def _by_level(self) -> tuple[np.ndarray, np.ndarray]:
        """The levels in descending order and the largest radius down to each."""
        order = np.argsort(-self.values, kind="stable")
        return self.values[order], np.maximum.accumulate(self.radii[order])

    def radius(self, level: float) -> int:
        """Radius beyond which ``|k|`` stays below ``level`` (absolute), at most ``cap``."""
        if level <= self.outer:
            return self.cap
        levels, radii = self._by_level
        n = int(np.searchsorted(-levels, -level, side="right"))
        return min(int(np.ceil(radii[n - 1])), self.cap) if n else 0


def _largest_around(labels: np.ndarray) -> np.ndarray:
    """The largest value of each pixel's 3x3 neighbourhood within the image.

    Two separable passes of shifted maxima (a 3x3 grey dilation, ~10x faster).
    """
    rows = labels.copy()
    np.maximum(rows[1:], labels[:-1], out=rows[1:])
    np.maximum(rows[:-1], labels[1:], out=rows[:-1])
    out = rows.copy()
    np.maximum(out[:, 1:], rows[:, :-1], out=out[:, 1:])
    np.maximum(out[:, :-1], rows[:, 1:], out=out[:, :-1])
    return out


def _light_per_rim_value(psf: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Light of a star whose masked core has each radius, per unit of its brightest rim pixel.

    The star's light is its brightest rim pixel over the PSF's largest value on the
    ring 1.5 px outside the core (infinite where that is not positive, as for masked
    cores wider than the PSF).
    """
    cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
    yy, xx = np.mgrid[-cy : psf.shape[0] - cy, -cx : psf.shape[1] - cx]
    r = np.hypot(yy, xx)
    out = np.full(radii.shape, np.inf)
    for r_a in np.unique(radii):
        ring = (r > r_a) & (r <= r_a + 1.5)
        rim = float(psf[ring].max()) if ring.any() else 0.0
        if rim > 0:
            out[radii == r_a] = 1.0 / rim
    return out


def _pixels(img: np.ndarray, blank: np.ndarray | None, at: np.ndarray) -> np.ndarray:
    """``img``'s values at the flat indices ``at``: 0 where ``blank`` (its bad pixels) or NaN.

    The few pixels read are cleaned, not the image (no image-sized copy).
    """
    values = img.ravel()[at]
    if blank is not None:
        values = np.where(blank.ravel()[at], 0.0, values)
    return np.nan_to_num(values, nan=0.0)


def _masked_regions(
    bad: np.ndarray, images: list[np.ndarray], sigmas: list[float], psfs: list[np.ndarray],
    blanks: tuple = (None, None),
) -> tuple[np.ndarray, list]:
    """Labels of the masked parts that may hide a star and, per image, the light each hides.

    Each region is taken as a star's masked core (a saturated star): its flux, centre
    and the non-linear pixels on its rim are uncertain, so the star's whole light
    counts, from its brightest rim pixel beyond the noise (less ``RIM_NOISE_SIGMA``
    times the image's sigma) and `_light_per_rim_value` of the core's radius.  A bad
    pixel whose rim is at sky level hides no star: only its own sky noise, which the
    kernels' core radius covers, so such regions are left out.

    The core is the largest disk the region holds: the smaller of ``sqrt(area / pi)``
    and its inscribed radius (the largest distance of its pixels from the unmasked
    ones).  A thin region (a bad row or column, a trail) hides at most a strip of the
    stars crossing it, so only its pixels within ``2 r + 1.5`` px (``r`` that radius)
    of its bright rim are returned, split into pieces, each with the light of its own
    bright rim: a bad row crossing a star grows around the star, not along the whole
    row.  A compact region (a saturated core, a cosmic ray) lies within that distance
    of its rim and comes back whole.  ``blanks`` are each image's own bad pixels, read
    as 0 (None where the image is clean).
    """
    labels, n = ndimage.label(bad)
    rim = _largest_around(labels)
    rim[bad] = 0
    on_rim = np.flatnonzero(rim)  # the few rim pixels, read by flat index
    rim_region = rim.ravel()[on_rim] - 1
    over = []  # each rim pixel's excess over the noise allowance, per image
    for img, blank, sigma in zip(images, blanks, sigmas):
        over.append(np.maximum(np.abs(_pixels(img, blank, on_rim)) - RIM_NOISE_SIGMA * sigma,
                               0.0))
    lit = np.zeros(n, bool)
    lit[rim_region[np.any(over, axis=0)]] = True
    out = np.zeros(bad.shape, np.int32)
    radii, excess = [], [[] for _ in images]
    count = 0
    boxes = ndimage.find_objects(labels)
    for i in np.flatnonzero(lit):
        # the region's box, 1 px wider (its rim), within the image
        box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, size))
                    for b, size in zip(boxes[i], bad.shape))
        region = labels[box] == i + 1
        r_core = min(np.sqrt(region.sum() / np.pi),
                     float(ndimage.distance_transform_edt(np.pad(region, 1)).max()))
        flat = np.ravel_multi_index(np.mgrid[box].reshape(2, -1), bad.shape)
        at = np.searchsorted(on_rim, flat).clip(max=on_rim.size - 1)
        own = (on_rim[at] == flat) & (rim_region[at] == i)
        values = [np.where(own, o[at], 0.0).reshape(region.shape) for o in over]
        bright = np.any(values, axis=0)
        pieces, m = ndimage.label(region & (ndimage.distance_transform_edt(~bright)
                                            <= 2 * r_core + 1.5))
        owner = _largest_around(pieces)  # each bright rim pixel's piece
        for v, e in zip(values, excess):
            peak = np.zeros(m + 1)
            np.maximum.at(peak, owner[bright], v[bright])
            e.append(peak[1:])
        out[box][pieces > 0] = pieces[pieces > 0] + count
        radii.append(np.full(m, r_core))
        count += m
    radii = np.concatenate(radii) if radii else np.zeros(0)
    light = []
    for e, psf in zip(excess, psfs):
        e = np.concatenate(e) if e else np.zeros(0)
        light.append(e * np.where(e > 0, _light_per_rim_value(psf, radii), 0.0))
    return out, light


def _edge_sources(
    images: list[np.ndarray], sigmas: list[float], psfs: list[np.ndarray],
    blanks: tuple = (None, None),
) -> tuple[np.ndarray, list]:
    """Labels of the runs of edge pixels above EDGE_SOURCE_SIGMA and the light each hides.

    Only the edge pixels are read (``blanks`` as in `_masked_regions`).
    """
    shape = images[0].shape
    ring = np.flatnonzero(_edge_mask(shape, 1))
    seeds = np.zeros(shape, bool)
    for img, blank, sigma in zip(images, blanks, sigmas):
        seeds.ravel()[ring] |= np.abs(_pixels(img, blank, ring)) > EDGE_SOURCE_SIGMA * sigma
    labels, n = ndimage.label(seeds, structure=np.ones((3, 3)))
    on_edge = np.flatnonzero(labels)  # the few labelled pixels, read by flat index
    owner = labels.ravel()[on_edge]
    light = [
        np.bincount(owner, weights=np.abs(_pixels(img, blank, on_edge)), minlength=n + 1)[1:]
        / np.sqrt(np.sum(psf**2))
        for img, blank, psf in zip(images, blanks, psfs)
    ]
    return labels, light


def _grow_regions(
    flag: np.ndarray,
    labels: np.ndarray,
    light: list[np.ndarray],
    reaches: list,
    s_sigma: float | list[float],
    owner: np.ndarray | None = None,
) -> None:
    """Flag, in place, each region's disk beyond which its hidden light moves Scorr < 0.1 sigma.

    The radius is where each kernel times the region's hidden light in its image falls
    below ``MASK_SCORR_CHANGE * s_sigma`` for good (at most the kernels' ``cap``);
    regions within their kernels' core radius (already flagged) are skipped.  With
    ``owner`` (the tile of constant PSF holding each region), ``reaches`` and ``s_sigma``
    are lists over the tiles and each region grows by its own tile's kernels.
    """
    for i, box in enumerate(ndimage.find_objects(labels)):
        own_reaches, sigma = (reaches, s_sigma) if owner is None else (
            reaches[owner[i]], s_sigma[owner[i]])
        radius = max(
            reach.radius(MASK_SCORR_CHANGE * sigma / x[i]) if x[i] > 0 else 0
            for reach, x in zip(own_reaches, light)
        )
        if radius <= max(reach.core_radius for reach in own_reaches):
            continue
        ys = slice(max(box[0].start - radius, 0), box[0].stop + radius)
        xs = slice(max(box[1].start - radius, 0), box[1].stop + radius)
        flag[ys, xs] |= ndimage.distance_transform_edt(labels[ys, xs] != i + 1) <= radius


def _warn_if_large(bad: np.ndarray, flag: np.ndarray, sky: float, radius: int) -> None:
    """Warn when the regions taken to hide stars flagged much of the image.

    ``flag`` is the grown mask of the bad pixels ``bad`` (no edge), ``sky`` the
    fraction of the image that their growth by the kernels' core ``radius`` alone
    flags (a band of a few PSF widths around a bad row, never a warning).
    """
    masked, grown = float(np.mean(bad)), float(np.mean(flag))
    if grown - sky <= LARGE_MASK_FRACTION:
        return
    warnings.warn(
        f"the masked pixels ({masked:.1%} of the image) grew to mask {grown:.0%} of it: "
        f"{sky:.0%} within the {radius} px of S's kernel cores (their hidden sky noise), "
        f"{grown - sky:.0%} more around masked regions whose rim is brighter than the noise, "
        "taken as stars whose light they hide (saturated cores, stars crossing bad "
        "pixels). Scorr is NaN there; mask only pixels that are bad.",
        AstroZackayWarning, stacklevel=user_stacklevel(),
    )


def _prepare(
    images: dict[str, Any], mask: Any, dtype: Any, shape_to: tuple[int, int] | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None, tuple[slice, slice]]:
    """Cast to ``dtype``, fill NaN/masked pixels with 0 and optionally pad (never in place)."""
    first = np.asarray(images["new"])
    if first.ndim != 2:
        raise ValueError(f"images must be 2-D, got shape {first.shape}")
    bad = np.zeros(first.shape, bool) if mask is None else np.array(mask, dtype=bool)
    if bad.shape != first.shape:
        raise ValueError(f"mask shape {bad.shape} differs from image shape {first.shape}")
    arrays = {}
    for name, arr in images.items():
        if arr is None:
            continue
        arr = np.asarray(arr)
        if arr.shape != first.shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {first.shape} like new")
        finite = np.isfinite(arr)
        if name.startswith("var") and np.any(arr[finite] < 0):
            raise ValueError(f"{name} has negative variances; pass background + source variance")
        bad |= ~finite
        arrays[name] = arr
    any_bad = bool(bad.any())
    out = {}
    for name, arr in arrays.items():
        arr = arr.astype(dtype, copy=True)
        if any_bad:
            arr[bad] = 0.0
        out[name] = arr
    inner = (slice(0, first.shape[0]), slice(0, first.shape[1]))
    if shape_to is not None:
        for name in out:
            out[name], inner = pad_image(out[name], shape_to)
    return out, (bad if any_bad else None), inner


# --------------------------------------------------------------------------------------
# the subtraction


def zogy(
    new: np.ndarray,
    ref: np.ndarray,
    psf_new: np.ndarray,
    psf_ref: np.ndarray,
    *,
    sigma_new: float,
    sigma_ref: float,
    flux_new: float = 1.0,
    flux_ref: float = 1.0,
    var_new: np.ndarray | None = None,
    var_ref: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    astrometric_noise_new: tuple[float, float] = (0.0, 0.0),
    astrometric_noise_ref: tuple[float, float] = (0.0, 0.0),
    flux_ratio_error: float = 0.0,
    noise_spectrum_new: NoiseSpectrum | np.ndarray | None = None,
    noise_spectrum_ref: NoiseSpectrum | np.ndarray | None = None,
    psf_error_new: float = 0.0,
    psf_error_ref: float = 0.0,
    shift_ref: tuple[float, float] = (0.0, 0.0),
    mask_ref: np.ndarray | None = None,
    pad: bool = False,
    border: int | None = None,
    dtype: Any = np.float64,
    backend: str | ArrayBackend = "numpy",
    workers: int | None = None,
) -> ZogyResult:
    """ZOGY proper subtraction of two registered, background-subtracted images.

    FFT convolution is circular: with ``pad=False`` (default) the inputs are used as
    they are and must already be padded by the caller (ideally to a fast FFT shape,
    `~astro_zackay.fourier.fast_shape`).  ``pad=True`` pads them with zeros to
    ``fast_shape(shape, border)`` and cuts the outputs back to the input grid.
    NaN and ``mask``-ed pixels (of either image or variance map) are replaced by 0 in
    copies of the inputs and flagged in ``mask`` of the result, grown by the radius
    of the cores of S's kernels (``mask_radius`` of the result: the sky noise hidden
    beyond it moves Scorr by < 0.1 sigma), as is the edge with ``pad=True`` (wider by
    the reference's shift, which brings the padding in).  A masked
    region that hides a bright star (a saturated core: the star's light from its
    brightest rim pixel and the PSF) or a star cut by the edge grows until that light
    moves Scorr by less than ``MASK_SCORR_CHANGE`` (0.1 sigma), at most by a stamp.
    A thin region (a bad row or column) grows so only around the stars crossing it;
    when such growth flags more than ``LARGE_MASK_FRACTION`` of the image, a warning
    says how much.  The FFT algebra and the padding use the whole stamps.

    Units: the algebra runs on the data divided by the power of 2 nearest the noises
    (exact in binary floating point), so that data in any unit (1e-17 erg/s/cm2/A or
    1e15) give the same D and Scorr, in float32 too; S, the variances, ``F_D`` and
    ``F_S`` come back in the data's units.

    Correlated noise: ``noise_spectrum_*`` replace ``sigma**2`` by the noise power
    per pixel at each frequency in ``den``, ``F_D``, ``F_S``, ``P_D`` and S's kernels,
    so that ``D`` comes out white and ``S / sqrt(F_S)`` has unit variance for any
    stationary noise.  The source-noise variances are then the spectrum's variance of
    ``S_N`` and ``S_R`` plus ``(var - median(var)) ⊛ k**2`` (the sources' excess over
    the background level of the variance map), scaled by the ratio of the kernel's
    variance under the spectrum to that under white noise of the same per-pixel
    variance: the source noise is taken as correlated like the background, as
    resampling makes it.

    PSF error: a PSF model wrong by a fraction ``eps`` of a star's matched-filter
    response leaves that fraction of it in ``S`` wherever a star's light cancels
    between the images.  ``V_psf = (eps_n**2 + eps_r**2) min(|S_N|, |S_R|)**2``
    (``min`` is the light present in both, so a new source keeps its significance)
    is added to Scorr's variance.

    Shifted reference: ``shift_ref = (dx, dy)`` moves the reference by ``(dx, dy)``
    pixels inside the FFT algebra (a phase ramp on its transform and on its variance
    map's), never by resampling an image or a mask; the reference's bad pixels
    (``mask_ref`` and its non-finite pixels) are zero-filled in its own frame and
    flagged at their position moved by the rounded shift, grown by one pixel.

    Parameters
    ----------
    new, ref : ndarray
        Science and reference images, same 2-D shape, registered and background
        subtracted, linear units.
    psf_new, psf_ref : ndarray
        Odd-sized PSF stamps (centre = central pixel), no larger than the image.  They
        must have unit sum within ``1e-3`` (the flux scale belongs in ``flux_*``); the
        remaining deviation is divided out.
    sigma_new, sigma_ref : float
        Background noise (sky + read noise, no source noise) of each image.
    flux_new, flux_ref : float, optional
        Flux zero points ``Fn`` and ``Fr``; only ``beta = Fn / Fr`` changes ``D``.
    var_new, var_ref : ndarray, optional
        Per-pixel variance maps (background + source) for the source-noise terms
        ``V_SN = var_new ⊛ kn**2`` and ``V_SR = var_ref ⊛ kr**2``.  Without them the
        constant ``sigma**2`` is used and ``Scorr == S / sqrt(F_S)``.
    mask : ndarray of bool, optional
        Bad pixels of either image (True = bad).
    astrometric_noise_new, astrometric_noise_ref : tuple of float, optional
        Registration noise ``(sigma_x, sigma_y)`` in pixels, giving
        ``V_ast = sx**2 (dS_N/dx)**2 + ...`` (eq 30-33); the gradients are central
        differences (`numpy.gradient`) of the smooth ``S_N`` and ``S_R``.
    flux_ratio_error : float, optional
        Absolute error of ``beta``; adds ``V_beta = (R * sigma_beta)**2 ⊛ kr**2``
        (with ``flux_ref = 1`` conventions: it scales the reference's flux).
    noise_spectrum_new, noise_spectrum_ref : NoiseSpectrum or ndarray, optional
        Noise power spectrum of each image (default white, ``sigma**2``): a
        `~astro_zackay.noise.NoiseSpectrum` (its correlation, scaled to
        ``sigma_*``), or the power per pixel on the rfft half plane of the working
        grid (the padded grid with ``pad=True``), shape ``(ny, nx // 2 + 1)``.
    psf_error_new, psf_error_ref : float, optional
        Fractional error ``eps`` of each PSF model's matched-filter response to a
        star (adds ``V_psf``, see above).
    shift_ref : tuple of float, optional
        ``(dx, dy)`` in pixels by which the reference is moved onto the new image.
    mask_ref : ndarray of bool, optional
        Bad pixels of the reference only, in its own (unshifted) frame.
    pad : bool, optional
        Pad to a fast FFT shape and crop back (see above).
    border : int, optional
        Padding on each side with ``pad=True``; default the larger PSF stamp size.
    dtype : {numpy.float64, numpy.float32}, optional
        Working precision.
    backend : {"numpy", "cupy"} or ArrayBackend, optional
        Where the arrays live during the algebra (uploaded once); results are
        always returned as numpy.
    workers : int, optional
        FFT threads (default: all the cores the process may use).

    Returns
    -------
    ZogyResult

    Raises
    ------
    ValueError
        For mismatched shapes, non-positive noises or fluxes, PSFs that are not
        unit-sum odd stamps, negative variances or an unsupported ``dtype``.

    Warns
    -----
    AstroZackayWarning
        When masked regions taken to hide stars flag more than
        ``LARGE_MASK_FRACTION`` of the image (how much, and why).

    Examples
    --------
    Identical PSFs reduce ZOGY to the noise-weighted plain difference:

    >>> import numpy as np
    >>> from astro_zackay.zogy import zogy
    >>> rng = np.random.default_rng(0)
    >>> new, ref = rng.normal(0, 2.0, (16, 16)), rng.normal(0, 1.0, (16, 16))
    >>> psf = np.zeros((3, 3)); psf[1, 1] = 0.6; psf[0, 1] = psf[2, 1] = 0.2
    >>> res = zogy(new, ref, psf, psf, sigma_new=2.0, sigma_ref=1.0)
    >>> bool(np.allclose(res.D, (new - ref) / np.sqrt(5.0)))
    True
    >>> round(float(res.psf_d_at_origin.sum()), 12)
    1.0
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    sn, sr = _positive("sigma_new", sigma_new), _positive("sigma_ref", sigma_ref)
    fn, fr = _positive("flux_new", flux_new), _positive("flux_ref", flux_ref)
    sb = _non_negative("flux_ratio_error", flux_ratio_error)
    eps = (_non_negative("psf_error_new", psf_error_new),
           _non_negative("psf_error_ref", psf_error_ref))
    shift_ref = tuple(float(v) for v in shift_ref)
    if len(shift_ref) != 2 or not np.all(np.isfinite(shift_ref)):
        raise ValueError(f"shift_ref must be a finite (dx, dy) pair, got {shift_ref}")
    ast_n = tuple(float(v) for v in astrometric_noise_new)
    ast_r = tuple(float(v) for v in astrometric_noise_ref)
    if len(ast_n) != 2 or len(ast_r) != 2 or min(ast_n + ast_r) < 0:
        raise ValueError("astrometric noises must be (sigma_x, sigma_y) pairs of values >= 0")
    pn, pr = unit_sum_psf(psf_new, "psf_new"), unit_sum_psf(psf_ref, "psf_ref")
    stamp = max(pn.shape + pr.shape)
    shape_in = np.shape(new)
    if len(shape_in) != 2:
        raise ValueError(f"new must be a 2-D image, got shape {shape_in}")
    shape_to = fast_shape(shape_in, stamp if border is None else border) if pad else None
    ref_bad = None
    if mask_ref is not None or shift_ref != (0.0, 0.0):
        ref, var_ref, ref_bad = _fill_reference(ref, var_ref, mask_ref, shape_in)
    arrays, bad, inner = _prepare(
        {"new": new, "ref": ref, "var_new": var_new, "var_ref": var_ref}, mask, dtype, shape_to
    )
    if ref_bad is not None:
        moved = _moved_mask(ref_bad, shift_ref)
        bad = moved if bad is None else bad | moved
    grid = arrays["new"].shape
    scale = _unit_scale([sn, sr])  # the algebra runs on the data over it, in any unit
    noise = (
        _noise_power(noise_spectrum_new, sn, grid, "noise_spectrum_new", scale),
        _noise_power(noise_spectrum_ref, sr, grid, "noise_spectrum_ref", scale),
    )
    be = backend if isinstance(backend, ArrayBackend) else get_array_module(backend)
    noise = tuple(power if np.isscalar(power) else be.asarray(power) for power in noise)
    out = _zogy_core(
        be, {name: be.asarray(a) for name, a in arrays.items()}, pn, pr, noise, fn, fr,
        (ast_n, ast_r), sb, eps, shift_ref, dtype, workers, scale,
    )
    # the kernels of S are scale**2 times, S's noise scale times those of the data's
    # units: the light that the masks hide, in the data's units, grows by their ratio
    radius, reach, s_sigma = out["mask_radius"], out["reach"], out["s_sigma"] * scale
    images = [arrays[name][inner] for name in ("new", "ref")]
    flag = None
    if bad is not None:
        flag = _grow_mask(bad, radius)
        sky = float(np.mean(flag))
        _grow_regions(flag, *_masked_regions(bad, images, [sn, sr], [pn, pr]), reach, s_sigma)
        _warn_if_large(bad, flag, sky, radius)
    if pad:
        # the zero padding beyond the edge hides sky, and parts of the stars cut by it; the
        # shifted reference brings up to |shift| px of it into the image
        edge = _edge_mask(shape_in, radius + int(np.ceil(max(map(abs, shift_ref)))))
        _grow_regions(edge, *_edge_sources(images, [sn, sr], [pn, pr]), reach, s_sigma)
        flag = edge if flag is None else flag | edge

    def crop(a, power=0):  # back to the data's units: times scale**power
        if a is None:
            return None
        if np.isscalar(a):
            return a * scale**power
        a = be.to_numpy(a[inner])
        if power:
            a *= scale**power  # the algebra's own arrays, not the caller's
        return a

    return ZogyResult(
        D=crop(out["D"]),
        S=crop(out["S"], -1),
        Scorr=crop(out["Scorr"]),
        F_D=out["F_D"] / scale,
        F_S=out["F_S"] / scale**2,
        V_SN=crop(out["V_SN"], -2),
        V_SR=crop(out["V_SR"], -2),
        V_ast=crop(out["V_ast"], -2),
        V_beta=crop(out["V_beta"], -2),
        V_psf=crop(out["V_psf"], -2),
        psf_d_at_origin=be.to_numpy(out["P_D"]),
        mask=flag,
        flux_new=fn,
        flux_ref=fr,
        sigma_new=sn,
        sigma_ref=sr,
        mask_radius=radius,
    )


@dataclass
class _Spectra:
    """Forward transforms of one pair of (padded) images and their variance maps.

    Taken once (for an image, or every tile of a stack at once): ``n_h``, ``r_h`` (the
    reference moved by the shift's phase ramp), ``vn_h``, ``vr_h`` (the variance maps,
    less their median level (each tile's) when that image's noise is correlated, the
    reference's moved) and ``vb_h``
    (``(sigma_beta R)**2``, moved), each None when not needed.
    """

    shape: tuple[int, int]
    n_h: Any
    r_h: Any
    vn_h: Any = None
    vr_h: Any = None
    vb_h: Any = None


def _spectra(be: ArrayBackend, arrays: dict, correlated: tuple[bool, bool], sb: float,
             shift_ref: tuple[float, float], dtype: Any, workers: int | None,
             scale: float = 1.0) -> _Spectra:
    """The forward transforms of `_Spectra` (arrays on ``be``; each transformed once).

    Each array is taken out of ``arrays`` once transformed (freed there and then
    unless the caller holds it); variance maps that ``arrays`` lacks are None (they
    may be transformed later by `_variance_spectra`).  The transforms are in the
    algebra's units (`_unit_scale`): the images' divided by ``scale``, the variances'
    by its square; the reference is divided before it is squared for ``vb_h``.
    """
    shape = arrays["new"].shape[-2:]  # a stack of tiles is transformed tile by tile
    ramp = _ramp(be, shape, shift_ref, dtype)
    vb_h = None
    if sb > 0:
        ref_beta = arrays["ref"] * (sb / scale)
        ref_beta *= ref_beta
        vb_h = _forward(be, ref_beta, ramp, workers)
        del ref_beta
    n_h = _forward(be, arrays.pop("new"), None, workers, scale)
    r_h = _forward(be, arrays.pop("ref"), ramp, workers, scale)
    del ramp
    return _Spectra(shape, n_h, r_h, *_variance_spectra(be, arrays, correlated, shift_ref, dtype,
                                                         workers, scale), vb_h)


def _variance_spectra(be: ArrayBackend, arrays: dict, correlated: tuple[bool, bool],
                      shift_ref: tuple[float, float], dtype: Any,
                      workers: int | None, scale: float = 1.0) -> tuple[Any, Any]:
    """The transforms of ``arrays``' variance maps (taken out of it), each None when absent.

    A correlated noise's map keeps only the sources' excess over its background level
    (each tile's); the reference's is moved by ``shift_ref``.  Both are divided by
    ``scale**2`` (the algebra's units, `_unit_scale`).
    """
    out = []
    for name, is_correlated, moved in (("var_new", correlated[0], False),
                                       ("var_ref", correlated[1], True)):
        var = arrays.pop(name, None)
        if var is None:
            out.append(None)
            continue
        if is_correlated:
            var = be.xp.maximum(var - _background_level(be.xp, var), 0.0)
        ramp = _ramp(be, var.shape[-2:], shift_ref, dtype) if moved else None
        out.append(_forward(be, var, ramp, workers, scale**2))
        del var
    return out[0], out[1]


def _ramp(be: ArrayBackend, shape: tuple[int, int], shift_ref: tuple[float, float],
          dtype: Any) -> Any:
    """The phase ramp that moves the reference by ``shift_ref`` on ``shape``, or None."""
    if shift_ref == (0.0, 0.0):
        return None
    return phase_ramp(shape, *shift_ref, dtype=np.result_type(dtype, np.complex64), backend=be)


def _forward(be: ArrayBackend, a: Any, ramp: Any, workers: int | None,
             scale: float = 1.0) -> Any:
    """``a``'s transform (of each tile of a stack) over ``scale``, times ``ramp`` when given."""
    a_h = be.rfft2(a, s=a.shape[-2:], workers=workers)
    if scale != 1.0:
        a_h *= 1.0 / scale
    if ramp is not None:
        a_h *= ramp
    return a_h


def _background_level(xp: Any, var: Any) -> Any:
    """The median of a variance map's positive pixels; of each tile's for a stack of tiles.

    A tile's level is the median of every other row and column of it (a level, not a
    noise: a quarter of the pixels measure it as well).
    """
    if var.ndim == 2:
        return xp.median(var[var > 0])
    sub = var[:, ::2, ::2]
    return _tile_medians(xp, sub, sub > 0)[:, None, None]


def _sample_step(n_values: int) -> int:
    """Every how many rows and columns a plane of ``n_values`` is read for a level's median.

    1 up to 4 ``_MEDIAN_SAMPLES`` values; then about ``_MEDIAN_SAMPLES`` of them are read.

    Examples
    --------
    >>> from astro_zackay.zogy import _sample_step
    >>> _sample_step(1024 * 1024), _sample_step(2160 * 2160), _sample_step(4320 * 4320)
    (1, 2, 4)
    """
    return max(1, int(np.sqrt(n_values / _MEDIAN_SAMPLES)))


def _tile_medians(xp: Any, stack: Any, keep: Any) -> Any:
    """The median of each tile's ``keep`` values of a ``(n, ny, nx)`` stack, 0 where none.

    One batched reduction on the stack's backend (no per-tile loop, no transfer): the
    values not kept are NaN and ignored.  One tile: the median of its kept values.
    Tiles of more than 4 ``_MEDIAN_SAMPLES`` pixels are read on a grid (`_sample_step`).
    """
    step = _sample_step(stack.shape[1] * stack.shape[2])
    if step > 1:
        stack, keep = stack[:, ::step, ::step], keep[:, ::step, ::step]
    if stack.shape[0] == 1:
        kept = stack[keep]
        if kept.size == 0:
            return xp.zeros(1, dtype=stack.dtype)
        return xp.median(kept, overwrite_input=True).reshape(1)
    values = xp.where(keep, stack, xp.nan).reshape(stack.shape[0], -1)
    values[:, 0] = xp.where(keep.reshape(stack.shape[0], -1).any(axis=1), values[:, 0], 0.0)
    return xp.nanmedian(values, axis=1)


def _pair_filters(be: ArrayBackend, pn: np.ndarray, pr: np.ndarray, noise, fn: float, fr: float,
                  shape: tuple[int, int], dtype: Any, workers: int | None):
    """The filters of one pair of PSFs: ``wa = A/sqrt(den)``, ``wb = B/sqrt(den)``, ``Q``, ``F_S``.

    They depend on the PSFs and the noise powers only, not on the images.  Computed in
    float64 (see the module docstring), then cast to the working complex
    type on ``be``: ``wa`` and ``wb`` are bounded by ``1/sigma``, so float32 holds them
    even where ``|A|**2`` would underflow.
    """
    sig_n, sig_r = noise
    npix = shape[0] * shape[1]
    a_h = psf_rfft(pr, shape, dtype=np.float64, backend=be, workers=workers)
    a_h *= fr  # A = Fr Pr_h
    b_h = psf_rfft(pn, shape, dtype=np.float64, backend=be, workers=workers)
    b_h *= fn  # B = Fn Pn_h
    inv_sqrt = abs2(a_h)
    inv_sqrt *= sig_n
    tmp = abs2(b_h)
    tmp *= sig_r
    inv_sqrt += tmp  # den
    del tmp
    inv_sqrt, good = floored_inv_sqrt(inv_sqrt)
    ctype = np.result_type(dtype, np.complex64)
    a_h *= inv_sqrt
    q_h = b_h * a_h  # Q = A B / sqrt(den) = F_D PD_h
    q_h *= good
    f_s = float(half_spectrum_sum(abs2(q_h), shape[1])) / npix
    b_h *= inv_sqrt
    return a_h.astype(ctype, copy=False), b_h.astype(ctype, copy=False), q_h.astype(
        ctype, copy=False), f_s


def _difference_and_score(xp, spec: _Spectra, wa: Any, wb: Any, q_h: Any, split: bool,
                          inv: Any) -> tuple[dict, tuple[Any, Any]]:
    """D and S (or S_N and S_R) from the shared transforms and one set of filters.

    ``D_h = wa N_h - wb R_h`` and ``S_h = conj(Q) D_h``, or its two parts
    ``kn_h N_h`` and ``kr_h R_h`` when ``split`` (for the astrometric and PSF-error
    terms), with ``kn_h = conj(Q) wa`` and ``kr_h = conj(Q) wb``; the arrays may be one
    grid or a stack of tiles.  Everything is done in place: ``q_h`` is conjugated,
    ``wa`` and ``wb`` become ``kn_h`` and ``kr_h`` and ``spec``'s image transforms are
    used up (and dropped from it), so that at most one grid-sized buffer is new.
    Returns the outputs and ``(kn_h, kr_h)``, the transforms of S's kernels.
    """
    n_h, r_h = spec.n_h, spec.r_h
    spec.n_h = spec.r_h = None
    n_h *= wa
    r_h *= wb
    xp.conjugate(q_h, out=q_h)
    wa *= q_h
    wb *= q_h
    if split:  # S_N and S_R are conj(Q) times the two terms of D
        out = {"D": inv(n_h - r_h)}
        n_h *= q_h
        out["S_N"] = inv(n_h)
        r_h *= q_h
        out["S_R"] = inv(r_h)
    else:
        n_h -= r_h
        del r_h
        out = {"D": inv(n_h)}
        n_h *= q_h
        out["S"] = inv(n_h)
    return out, (wa, wb)


def _pair_outputs(be: ArrayBackend, spec: _Spectra, pn: np.ndarray, pr: np.ndarray, noise,
                  fn: float, fr: float, split: bool, dtype: Any, workers: int | None) -> dict:
    """ZOGY of an image pair from its transforms: D, S (or S_N, S_R), variances, P_D, reaches.

    Every kernel is inverse-transformed once: its reach (for the mask growth) and its
    square (for the source-noise variance) come from the same real-space kernel.
    """
    xp = be.xp
    shape = spec.shape
    npix = shape[0] * shape[1]
    sig_n, sig_r = noise  # noise power per pixel: sigma**2, or a spectrum on the half plane

    def inv(a_h):
        return be.irfft2(a_h, s=shape, workers=workers)

    wa, wb, q_h, f_s = _pair_filters(be, pn, pr, noise, fn, fr, shape, dtype, workers)
    f_d = fr * fn / np.sqrt(_at_zero(sig_n) * fr**2 + _at_zero(sig_r) * fn**2)
    p_d = inv(q_h)
    p_d /= f_d
    out, (kn_h, kr_h) = _difference_and_score(xp, spec, wa, wb, q_h, split, inv)
    del wa, wb, q_h
    out.update(F_S=f_s, P_D=p_d, F_D=float(f_d))

    cap = max(pn.shape + pr.shape)
    sigs = (sig_n, sig_r)
    bkg = [_kernel_noise(k_h, sig, shape[1]) / npix for k_h, sig in zip((kn_h, kr_h), sigs)]
    reach = []
    variances = (("V_SN", spec.vn_h, None), ("V_SR", spec.vr_h, "V_beta"))
    for k_h, sig, background, (name, v_h, beta_name) in zip((kn_h, kr_h), sigs, bkg, variances):
        k = inv(k_h)
        k *= k
        reach.append(_KernelReach.of(be, k, cap))
        if v_h is None and (beta_name is None or spec.vb_h is None):
            out[name] = background
            continue
        k2_h = be.rfft2(k, s=shape, workers=workers)
        del k
        if v_h is None:
            out[name] = background
        else:
            var = _clipped(xp, inv(k2_h * v_h))
            if not np.isscalar(sig):  # the sources' excess, correlated like the background
                white = _at_mean(sig, shape[1]) * float(half_spectrum_sum(abs2(k_h), shape[1]))
                var *= background * npix / white
                var += background
            out[name] = var
        if beta_name is not None and spec.vb_h is not None:
            k2_h *= spec.vb_h
            out[beta_name] = _clipped(xp, inv(k2_h))
    out.update(reach=reach, s_sigma=float(np.sqrt(bkg[0] + bkg[1])),
               mask_radius=max(r.core_radius for r in reach))
    return out


def _clipped(xp, variance: Any) -> Any:
    """A convolved variance map with its negative values set to 0 (in place).

    A variance convolved with a squared kernel is non-negative, but the phase ramp
    that moves the reference by a sub-pixel shift rings around very bright, sharp
    light: the squared reference of ``V_beta`` (dynamic range ~1e14 around a star of
    1e7 e-) had lobes of -1e-2 of its peak along whole rows, which sent Scorr to 1e4
    on unmasked sky.
    """
    return xp.maximum(variance, 0.0, out=variance)


def _zogy_core(be: ArrayBackend, arrays, pn, pr, noise, fn, fr, ast, sb, eps, shift_ref, dtype,
               workers, scale):
    xp = be.xp
    correlated = (not np.isscalar(noise[0]), not np.isscalar(noise[1]))
    spec = _spectra(be, arrays, correlated, sb, shift_ref, dtype, workers, scale)
    split = max(ast[0] + ast[1] + eps) > 0
    out = _pair_outputs(be, spec, pn, pr, noise, fn, fr, split, dtype, workers)
    del spec
    out.setdefault("V_beta", None)
    out["V_ast"] = out["V_psf"] = None
    if split:
        s_n, s_r = out.pop("S_N"), out.pop("S_R")
        out["S"] = s_n - s_r
        out["V_ast"] = _astrometric_variance(xp, (s_n, s_r), ast, dtype)
        out["V_psf"] = _psf_variance(xp, s_n, s_r, eps)
        del s_n, s_r
    var = _total_variance(out["V_SN"] + out["V_SR"], out["V_ast"], out["V_beta"], out["V_psf"])
    out["Scorr"] = _scorr(xp, out["S"], var, out["F_S"])
    return out


def _total_variance(v_s: Any, v_ast: Any, v_beta: Any, v_psf: Any) -> Any:
    """Scorr's variance: ``V_S = V_SN + V_SR`` plus each of ``V_ast``, ``V_beta``, ``V_psf``.

    Each term is an array, a number or None (not there); ``v_s`` is added to in place
    when it is an array.
    """
    for extra in (v_ast, v_beta, v_psf):
        if extra is None:
            continue
        if np.isscalar(v_s):
            v_s = v_s + extra
        else:
            v_s += extra
    return v_s


def _scorr(xp, S: Any, var: Any, f_s: Any) -> Any:
    """``S / sqrt(var)``, the variance floored at ``_VAR_FLOOR * F_S`` (``var`` overwritten).

    ``f_s`` is a number, or an array on ``S``'s grid (each tile's ``F_S``).
    """
    if np.isscalar(var):
        return S / float(np.sqrt(var))  # a Python float keeps S's precision (NumPy 2)
    xp.maximum(var, _VAR_FLOOR * f_s, out=var)
    xp.sqrt(var, out=var)
    return xp.divide(S, var, out=var)


def _psf_variance(xp, s_n: Any, s_r: Any, eps: tuple[float, float]) -> Any:
    """``(eps_n**2 + eps_r**2) min(|S_N|, |S_R|)**2``: the light that cancels, or None.

    Formed in ``s_n``'s array (``s_n`` and ``s_r`` are overwritten).
    """
    if max(eps) == 0:
        return None
    v_psf = xp.abs(s_n, out=s_n)
    xp.minimum(v_psf, xp.abs(s_r, out=s_r), out=v_psf)
    v_psf *= v_psf
    v_psf *= eps[0] ** 2 + eps[1] ** 2
    return v_psf


def _at_zero(power: float | np.ndarray) -> float:
    """The noise power at zero frequency (a scalar power is the same everywhere)."""
    return float(power) if np.isscalar(power) else float(power[0, 0])


def _at_mean(power: float | np.ndarray, nx: int) -> float:
    """The per-pixel variance of a noise power: its mean over the full frequency plane."""
    if np.isscalar(power):
        return float(power)
    return float(half_spectrum_sum(power, nx)) / (power.shape[0] * nx)


def _kernel_noise(k_h: Any, power: float | np.ndarray, nx: int) -> float:
    """``Npix`` times the variance of ``k ⋆ noise``: ``sum |k_h|**2 power`` over the full plane."""
    if np.isscalar(power):
        return power * float(half_spectrum_sum(abs2(k_h), nx))
    return float(half_spectrum_sum(abs2(k_h) * power, nx))


def _astrometric_variance(xp, images, ast, dtype):
    """``sum sx**2 (dS/dx)**2 + sy**2 (dS/dy)**2`` over ``S_N`` and ``S_R`` (eq 30-33), or None."""
    if max(ast[0] + ast[1]) == 0:
        return None
    v_ast = xp.zeros(images[0].shape, dtype=dtype)
    for img, (sx, sy) in zip(images, ast):
        gy, gx = xp.gradient(img)
        v_ast += (sx * sx) * gx * gx
        v_ast += (sy * sy) * gy * gy
    return v_ast


# --------------------------------------------------------------------------------------
# flux ratio, background offset and shift (eq 37-38)


def fit_flux_ratio(
    new: np.ndarray,
    ref: np.ndarray,
    psf_new: np.ndarray,
    psf_ref: np.ndarray,
    *,
    sigma_new: float,
    sigma_ref: float,
    mask: np.ndarray | None = None,
    beta0: float = 1.0,
    snr_min: float = 10.0,
    tol: float = 1e-5,
    max_iter: int = 30,
    workers: int | None = None,
) -> FluxMatch:
    """Fit the flux ratio ``beta = Fn / Fr`` and background offset of ``new ≈ beta * ref + c``.

    Following eq 37-38, ``Dn_h = Pr_h N_h / sqrt(den)`` and ``Dr_h = Pn_h R_h / sqrt(den)``
    with ``den = sn**2 |Pr_h|**2 + beta**2 sr**2 |Pn_h|**2`` satisfy ``Dn = beta * Dr``
    exactly for the same sky, and ``Dn - beta * Dr = D`` is white.  ``beta`` is fitted on
    bright pixels by iteratively reweighted least squares (Tukey biweight on the
    residuals, scale from their MAD) with a corrected score for the noise in ``Dr``
    (the errors-in-variables bias ``beta * var(Dr noise)``), recomputing ``den`` with
    the current ``beta`` at every iteration.  Bright pixels are those where
    ``beta sr_D**2 Dn + sn_D**2 Dr`` (a combination uncorrelated with the residual, so
    selecting on it does not bias the fit) exceeds ``snr_min`` times its noise.  The
    error is the sandwich estimate from the per-pixel scores.  The background offset
    is ``median(Dn - beta Dr) * sqrt(sn**2 + beta**2 sr**2)`` over all good pixels.

    Pixels within a PSF stamp of the image edge or half a stamp of a masked/NaN pixel
    are not used; mask saturated pixels.  Source (Poisson) noise is not modelled in the
    errors-in-variables correction, which leaves a bias of order ``1/(S/N)**2`` of the
    bright pixels.

    Parameters
    ----------
    new, ref : ndarray
        Registered, background-subtracted images of the same shape.
    psf_new, psf_ref : ndarray
        Odd-sized unit-sum PSF stamps.
    sigma_new, sigma_ref : float
        Background noise of each image.
    mask : ndarray of bool, optional
        Bad (e.g. saturated) pixels of either image.
    beta0 : float, optional
        Starting flux ratio (only its sign and rough size matter).
    snr_min : float, optional
        Per-pixel S/N threshold of the bright pixels (default 10).
    tol : float, optional
        Relative change of ``beta`` that ends the iterations.
    max_iter : int, optional
        Most iterations.
    workers : int, optional
        scipy.fft threads.

    Returns
    -------
    FluxMatch

    Raises
    ------
    ValueError
        If fewer than 10 bright pixels are found (lower ``snr_min`` or check the inputs).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.zogy import fit_flux_ratio
    >>> rng = np.random.default_rng(3)
    >>> y, x = np.mgrid[-3:4, -3:4]
    >>> psf = np.exp(-(x**2 + y**2) / 2.0); psf /= psf.sum()
    >>> sky = np.zeros((64, 64)); sky[16::16, 16::16] = 500.0
    >>> from astro_zackay.fourier import convolve_fft, psf_rfft
    >>> img = convolve_fft(sky, psf_rfft(psf, sky.shape))
    >>> ref = img + rng.normal(0, 1, img.shape)
    >>> new = 1.5 * img + 2.0 + rng.normal(0, 1, img.shape)
    >>> fit = fit_flux_ratio(new, ref, psf, psf, sigma_new=1.0, sigma_ref=1.0)
    >>> bool(abs(fit.beta - 1.5) < 5 * fit.beta_err), bool(abs(fit.background_offset - 2) < 0.1)
    (True, True)
    """
    res = _fit_match(
        new,
        ref,
        psf_new,
        psf_ref,
        sigma_new,
        sigma_ref,
        mask,
        beta0,
        snr_min,
        tol,
        max_iter,
        False,
        workers,
    )
    return FluxMatch(**{k: v for k, v in res.items() if k in FluxMatch.__dataclass_fields__})


def fit_shift(
    new: np.ndarray,
    ref: np.ndarray,
    psf_new: np.ndarray,
    psf_ref: np.ndarray,
    *,
    sigma_new: float,
    sigma_ref: float,
    mask: np.ndarray | None = None,
    beta0: float = 1.0,
    snr_min: float = 10.0,
    tol: float = 1e-5,
    max_iter: int = 30,
    workers: int | None = None,
) -> ShiftMatch:
    """Fit a translation jointly with the flux ratio: ``new ≈ beta * shift_image(ref, dx, dy) + c``.

    The same bright-pixel fit as `fit_flux_ratio`, with the model
    ``Dn = beta * Dr(x - d) + gamma``: the shift is applied to ``Dr_h`` as a Fourier
    phase ramp and linearised with its Fourier derivatives (Gauss-Newton).  The start
    is the integer peak of the cross-correlation of ``Dn`` and ``Dr``, so shifts of
    several pixels are fine.  Registration residuals at this level are the
    astrometric noise of `zogy`.

    Parameters
    ----------
    new, ref, psf_new, psf_ref, sigma_new, sigma_ref, mask, beta0, snr_min, tol, max_iter, workers
        As in `fit_flux_ratio`; ``tol`` also applies to the shift in pixels.

    Returns
    -------
    ShiftMatch

    Raises
    ------
    ValueError
        If fewer than 10 bright pixels are found.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import convolve_fft, psf_rfft, shift_image
    >>> from astro_zackay.zogy import fit_shift
    >>> rng = np.random.default_rng(4)
    >>> y, x = np.mgrid[-4:5, -4:5]
    >>> psf = np.exp(-(x**2 + y**2) / 4.0); psf /= psf.sum()
    >>> sky = np.zeros((64, 64)); sky[16::16, 16::16] = 2000.0
    >>> img = convolve_fft(sky, psf_rfft(psf, sky.shape))
    >>> new = shift_image(img, 0.4, -1.3) + rng.normal(0, 1, img.shape)
    >>> fit = fit_shift(new, img + rng.normal(0, 1, img.shape), psf, psf, sigma_new=1, sigma_ref=1)
    >>> round(fit.dx, 1), round(fit.dy, 1)
    (0.4, -1.3)
    """
    res = _fit_match(
        new,
        ref,
        psf_new,
        psf_ref,
        sigma_new,
        sigma_ref,
        mask,
        beta0,
        snr_min,
        tol,
        max_iter,
        True,
        workers,
    )
    return ShiftMatch(**res)


def _fit_match(
    new,
    ref,
    psf_new,
    psf_ref,
    sigma_new,
    sigma_ref,
    mask,
    beta0,
    snr_min,
    tol,
    max_iter,
    with_shift,
    workers,
):
    sn, sr = _positive("sigma_new", sigma_new), _positive("sigma_ref", sigma_ref)
    beta = _positive("beta0", beta0)
    pn, pr = unit_sum_psf(psf_new, "psf_new"), unit_sum_psf(psf_ref, "psf_ref")
    arrays, bad, _ = _prepare({"new": new, "ref": ref}, mask, np.float64, None)
    shape = arrays["new"].shape
    npix = shape[0] * shape[1]
    stamp = max(pn.shape + pr.shape)
    usable = np.zeros(shape, bool) if bad is None else _grow_mask(bad, stamp // 2)
    usable[:stamp] = usable[-stamp:] = True
    usable[:, :stamp] = usable[:, -stamp:] = True
    usable = ~usable
    be = get_array_module("numpy")
    pr_h = psf_rfft(pr, shape, workers=workers)
    pn_h = psf_rfft(pn, shape, workers=workers)
    ar2, an2 = abs2(pr_h), abs2(pn_h)
    n_h = be.rfft2(arrays["new"], s=shape, workers=workers)
    r_h = be.rfft2(arrays["ref"], s=shape, workers=workers)
    ky, kx = frequency_grids(shape)
    dx = dy = 0.0
    gamma = None
    phase = "huber"  # monotone weights to converge, then the redescending biweight
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        inv_sqrt, _ = floored_inv_sqrt(sn**2 * ar2 + beta**2 * sr**2 * an2)
        var_dn = sn**2 * float(half_spectrum_sum(ar2 * inv_sqrt**2, shape[1])) / npix
        var_dr = sr**2 * float(half_spectrum_sum(an2 * inv_sqrt**2, shape[1])) / npix
        dn_h = pr_h * n_h * inv_sqrt
        dn = be.irfft2(dn_h, s=shape, workers=workers)
        dr_h = pn_h * r_h * inv_sqrt
        if with_shift and n_iter == 1:
            xc = be.irfft2(dn_h * np.conj(dr_h), s=shape, workers=workers)
            iy, ix = np.unravel_index(np.argmax(xc), shape)
            dy = float((iy + shape[0] // 2) % shape[0] - shape[0] // 2)
            dx = float((ix + shape[1] // 2) % shape[1] - shape[1] // 2)
        if with_shift:
            dr_h *= phase_ramp(shape, dx, dy)
        dr = be.irfft2(dr_h, s=shape, workers=workers)
        sel_stat = beta * var_dr * dn + var_dn * dr
        sel_noise = np.sqrt(beta**2 * var_dr**2 * var_dn + var_dn**2 * var_dr)
        if phase == "huber":
            # the bright-pixel selection is frozen once the Huber phase has converged:
            # re-selecting in the biweight phase makes single pixels flip in and out
            # and the iterations cycle at the 0.02-sigma level without converging
            sel = usable & (sel_stat > snr_min * sel_noise)
        if sel.sum() < 10:
            raise ValueError(
                f"only {int(sel.sum())} pixels have S/N > {snr_min} in both images; lower "
                "snr_min, or check the PSFs, noises and masks"
            )
        y, x = dn[sel], dr[sel]
        cols = [x, np.ones_like(x)]
        if with_shift:
            cols.append(-beta * be.irfft2(2j * np.pi * kx * dr_h, s=shape, workers=workers)[sel])
            cols.append(-beta * be.irfft2(2j * np.pi * ky * dr_h, s=shape, workers=workers)[sel])
        jac = np.stack(cols, axis=1)
        if gamma is None:  # robust start: median ratio, then median intercept
            beta = float(np.median(y / x))
            gamma = float(np.median(y - beta * x))
            w_map = np.ones(shape)
        w_prev = w_map[sel]
        resid = y - beta * x - gamma
        # residual variance model var = v0 + v1 * max(x, 0): background + source noise
        xpos = np.maximum(x, 0.0)
        design = np.stack([np.ones_like(x), xpos], axis=1) * w_prev[:, None]
        v0, v1 = np.linalg.lstsq(design, resid**2 * w_prev, rcond=None)[0]
        v_i = max(v0, 1e-3 * float(np.median(resid**2))) + max(v1, 0.0) * xpos
        u = resid / np.sqrt(v_i)
        u /= max(mad_std(u), np.finfo(float).tiny)
        if phase == "huber":
            w_rob = np.minimum(1.0, _HUBER_K / np.maximum(np.abs(u), np.finfo(float).tiny))
        else:
            w_rob = np.where(np.abs(u) < _BIWEIGHT_C, (1.0 - (u / _BIWEIGHT_C) ** 2) ** 2, 0.0)
        w_map[sel] = w_rob
        w = w_rob / v_i
        corr = np.zeros(jac.shape[1])
        corr[0] = beta * var_dr  # E[w r x] = -beta var_dr E[w] at the truth
        hess = (jac * w[:, None]).T @ jac
        hess[0, 0] -= var_dr * float(w.sum())
        scores = w[:, None] * (resid[:, None] * jac + corr[None, :])
        step = np.linalg.solve(hess, scores.sum(axis=0))
        beta += float(step[0])
        gamma += float(step[1])
        if with_shift:
            dx += float(step[2])
            dy += float(step[3])
        small = abs(step[0]) < tol * abs(beta)
        if with_shift:
            small = small and max(abs(step[2]), abs(step[3])) < tol
        if small and phase == "biweight":
            converged = True
            break
        if small:
            phase = "biweight"
    cov = np.linalg.solve(hess, np.linalg.solve(hess, scores.T @ scores).T)
    err = np.sqrt(np.diag(cov))
    # background offset from all usable pixels with the final beta and shift
    inv_sqrt, _ = floored_inv_sqrt(sn**2 * ar2 + beta**2 * sr**2 * an2)
    d_h = pr_h * n_h
    rs_h = pn_h * r_h
    if with_shift:
        rs_h *= phase_ramp(shape, dx, dy)
    d_h -= beta * rs_h
    d_h *= inv_sqrt
    d = be.irfft2(d_h, s=shape, workers=workers)[usable]
    dc = np.sqrt(sn**2 + beta**2 * sr**2)
    out = {
        "beta": beta,
        "beta_err": float(err[0]),
        "background_offset": float(np.median(d) * dc),
        "background_offset_err": float(1.2533 * np.std(d) / np.sqrt(d.size) * dc),
        "n_used": int(np.count_nonzero(w_rob)),
        "converged": converged,
        "n_iter": n_iter,
    }
    if with_shift:
        out.update(dx=dx, dy=dy, dx_err=float(err[2]), dy_err=float(err[3]))
    _log.debug("flux/shift fit: %s", out)
    return out
