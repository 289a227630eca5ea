"""Detection and vetting of transient candidates in a score image (Scorr) of a subtraction.

`find_transients` finds the local extrema of ``|Scorr|`` above a threshold and
gives each candidate an integer ``flags`` bitmask, one bit per vetting test
(`FLAGS` names and describes them), and ``good`` (no bit set). The tests and
what each needs:

========== ===== =================================================================
flag       bit   set when (needs)
========== ===== =================================================================
DIPOLE     1     an extremum of the opposite sign beyond ``dipole_threshold`` sigma
                 lies within ``dipole_radius`` FWHM: misregistration or motion
                 (the score alone)
MASKED     2     a masked or saturated input pixel lies within ``mask_radius``
                 FWHM (``bad_pixels``)
SHARP      4     the peak pixel of D stands above the PSF fit by more than
                 ``sharp_threshold`` sigma: cosmic rays, hot pixels (``difference``
                 and ``psf``)
CHI2       8     the PSF fit to a D stamp has chi^2 / dof above ``chi2_threshold``
                 (``difference`` and ``psf``)
EDGE       16    closer than ``edge_distance`` FWHM to the image border (the score
                 alone)
BRIGHT     32    within ``bright_radius`` FWHM of a source with S/N of at least
                 ``bright_snr`` in both images, a radius that grows as the cube
                 root of the S/N: a bright star (``sources``)
========== ===== =================================================================

A flag whose inputs are not given is not computed (its bit is never set), and the
table's ``meta["flags_computed"]`` lists the ones that were: on a bare score array
only DIPOLE and EDGE are, with the FWHM of P_D measured from the score's own noise
(or given as ``fwhm``).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import Table
from astropy.wcs import WCS

from ._stats import MAD_TO_SIGMA, positive_median
from .fourier import (
    get_array_module,
    move_whole_pixels,
    psf_correlation_blocks,
    shift_stack,
)
from .profiles import GAUSS_FWHM

__all__ = [
    "BRIGHT_GROWTH",
    "FLAGS",
    "FLAG_BRIGHT",
    "FLAG_CHI2",
    "FLAG_DIPOLE",
    "FLAG_EDGE",
    "FLAG_MASKED",
    "FLAG_SHARP",
    "bright_sources",
    "describe_flags",
    "find_transients",
]

log = logging.getLogger(__name__)

#: Opposite-sign extremum nearby: misregistration (a dipole) or motion.
FLAG_DIPOLE = 1
#: A masked or saturated input pixel nearby.
FLAG_MASKED = 2
#: Sharper than the difference PSF: a cosmic ray or hot pixel.
FLAG_SHARP = 4
#: The difference PSF does not fit the difference image's stamp.
FLAG_CHI2 = 8
#: Near the image border.
FLAG_EDGE = 16
#: Near a bright star.
FLAG_BRIGHT = 32

#: The BRIGHT flag's radius grows as the star's S/N to this power: a PSF wing falling as
#: r**-3 (a diffraction-limited PSF's) leaves a residual of one significance at that
#: radius; seeing-limited (Moffat) wings fall faster. Measured on NIRCam's F200W pair,
#: candidates lie 5-19 px (2-8 FWHM) from stars of S/N 2000-6000.
BRIGHT_GROWTH = 1.0 / 3.0

#: Positions whose windows (`_windows`) are gathered at once by `_in_chunks`: a chunk of
#: 9x9 float64 windows is 2.7 MB, whatever the number of pixels above a threshold.
_CHUNK = 4096
#: Candidates fitted together by `_psf_fits` (their windows and PSF stamps a bounded temporary).
_FIT_CHUNK = 256

#: Each flag's name: its bit and what it means.
FLAGS: dict[str, tuple[int, str]] = {
    "DIPOLE": (FLAG_DIPOLE, "opposite-sign score extremum nearby (misregistration or motion)"),
    "MASKED": (FLAG_MASKED, "masked or saturated input pixel nearby"),
    "SHARP": (FLAG_SHARP, "sharper than the difference PSF (cosmic ray, hot pixel)"),
    "CHI2": (FLAG_CHI2, "PSF fit to the difference image: chi^2/dof too high"),
    "EDGE": (FLAG_EDGE, "near the image border"),
    "BRIGHT": (FLAG_BRIGHT, "near a bright star"),
}


def describe_flags(flags: int) -> list[str]:
    """The names of the flags set in a ``flags`` value, in bit order.

    Parameters
    ----------
    flags : int
        A value of the ``flags`` column of `find_transients`.

    Returns
    -------
    list of str
        Keys of `FLAGS`; empty for a ``good`` candidate.

    Examples
    --------
    >>> from astro_zackay.transients import FLAG_DIPOLE, FLAG_EDGE, describe_flags
    >>> describe_flags(FLAG_DIPOLE | FLAG_EDGE)
    ['DIPOLE', 'EDGE']
    >>> describe_flags(0)
    []
    """
    return [name for name, (bit, _) in FLAGS.items() if int(flags) & bit]


def _floating(values: Any) -> np.ndarray:
    """``values`` as a floating-point array; float32 stays float32, uncopied.

    The images are only read at the candidates' pixels and their neighbourhoods,
    which are taken to float64 there: no frame-sized float64 copy is made.
    """
    array = np.asarray(values)
    return array if array.dtype.kind == "f" else array.astype(float)


def _numeric(values: Any, name: str) -> np.ndarray:
    """``values`` as a 2-D floating array, or a TypeError / ValueError naming ``name``."""
    array = np.asarray(values)
    if array.dtype.kind == "b":
        raise TypeError(f"{name} is a boolean array: give the image's numbers (a score in "
                        "sigma, a flux or a difference), not a mask of them")
    if array.dtype.kind not in "iuf":
        raise TypeError(
            f"{name} must be a 2-D numeric image (a CCDData, NDData, Quantity or array), got "
            f"{type(values).__name__}; read a FITS file or HDU into a CCDData first "
            "(astropy.nddata.CCDData.read)")
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image, got shape {array.shape}")
    return _floating(array)


def _as_array(value: Any, name: str) -> tuple[np.ndarray, np.ndarray | None, WCS | None, Any]:
    """(data, mask, wcs, unit) of an NDData or plain array (floating, see `_floating`)."""
    if isinstance(value, NDData):
        mask = None if value.mask is None else np.asarray(value.mask, dtype=bool)
        wcs = value.wcs if isinstance(value.wcs, WCS) else None
        return _numeric(value.data, name), mask, wcs, value.unit
    if isinstance(value, u.Quantity):
        return _numeric(value.value, name), None, None, value.unit
    return _numeric(value, name), None, None, None


def _subpixel_peak(
    image: np.ndarray, bad: np.ndarray, rows: np.ndarray, cols: np.ndarray, signed: Any
) -> tuple:
    """Refine integer peaks with a separable parabola through the 3x3 neighbourhood.

    Of ``signed(image)``, with ``bad`` pixels read as 0; only the peaks' neighbours are read.
    """
    ny, nx = image.shape
    r = np.clip(rows, 1, ny - 2)
    c = np.clip(cols, 1, nx - 2)

    def value(dr: int, dc: int) -> np.ndarray:
        return np.where(bad[r + dr, c + dc], 0.0, signed(image[r + dr, c + dc].astype(float)))

    def offset(minus: np.ndarray, centre: np.ndarray, plus: np.ndarray) -> np.ndarray:
        curvature = minus - 2.0 * centre + plus
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = 0.5 * (minus - plus) / curvature
        return np.where((curvature < 0) & np.isfinite(delta), np.clip(delta, -0.5, 0.5), 0.0)

    centre = value(0, 0)
    dx = offset(value(0, -1), centre, value(0, 1))
    dy = offset(value(-1, 0), centre, value(1, 0))
    return cols + dx, rows + dy


def _psf_fwhm(psf: np.ndarray) -> float:
    """FWHM in pixels of a PSF stamp: the diameter of the disc as large as its half-maximum area."""
    return float(2.0 * np.sqrt(np.count_nonzero(psf >= 0.5 * psf.max()) / np.pi))


def _score_fwhm(score: np.ndarray, bad: np.ndarray) -> float | None:
    """FWHM of P_D from the lag-1 autocorrelation of a score image's noise.

    Scorr of white D is D correlated with P_D, so its noise autocorrelation is that
    of P_D: ``exp(-1 / (4 sigma**2))`` at lag 1 for a Gaussian P_D of width sigma.
    Only pixels with ``|score| < 3`` (noise) enter. None when it cannot be measured
    (fewer than 100 pixel pairs, or no positive correlation).
    """
    noise = np.where(bad | ~(np.abs(score) < 3.0), np.nan, score)
    lags = []
    for a, b in ((noise[:, :-1], noise[:, 1:]), (noise[:-1, :], noise[1:, :])):
        both = np.isfinite(a) & np.isfinite(b)
        if both.sum() < 100 or np.std(a[both]) == 0 or np.std(b[both]) == 0:
            return None
        lags.append(np.corrcoef(a[both], b[both])[0, 1])
    rho = float(np.mean(lags))
    if not 0 < rho < 1:
        return None
    return float(GAUSS_FWHM * np.sqrt(-1.0 / (4.0 * np.log(rho))))


def _centre(shape: tuple[int, int]) -> tuple[float, float]:
    """``(x, y)`` of the centre of an image of ``shape``."""
    return (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0


def _windows(
    image: np.ndarray, rows: np.ndarray, cols: np.ndarray, half: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``2*half+1`` squares of ``image`` around each (row, col), and which pixels are in it.

    Shape ``(n, 2*half+1, 2*half+1)``; positions off the image read the nearest
    image pixel and are False in the second array. Only these windows are read, so
    the cost does not grow with the image.
    """
    ny, nx = image.shape
    offsets = np.arange(-half, half + 1)
    r = rows[:, None, None] + offsets[None, :, None]
    c = cols[:, None, None] + offsets[None, None, :]
    inside = (r >= 0) & (r < ny) & (c >= 0) & (c < nx)
    return image[np.clip(r, 0, ny - 1), np.clip(c, 0, nx - 1)], inside


def _disk_windows(
    image: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """`_windows` of the pixels within ``radius`` (at least 1) of each (row, col)."""
    half = max(int(np.ceil(radius)), 1)
    values, inside = _windows(image, rows, cols, half)
    offsets = np.arange(-half, half + 1)
    disk = np.hypot(offsets[None, :], offsets[:, None]) <= max(radius, 1.0)
    return values, inside & disk


def _near(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius: float) -> np.ndarray:
    """Whether a True pixel of ``mask`` lies within ``radius`` pixels of each (row, col)."""
    values, inside = _disk_windows(mask, rows, cols, radius)
    return np.any(values & inside, axis=(1, 2))


def _dipole(score: np.ndarray, bad: np.ndarray, rows: np.ndarray, cols: np.ndarray,
            radius: float, threshold: float) -> np.ndarray:
    """Whether an extremum of the opposite sign beyond ``threshold`` lies within ``radius``.

    Masked (``bad``) pixels are no partner: their score is not measured.
    """
    values, inside = _disk_windows(score, rows, cols, radius)
    inside &= ~_windows(bad, rows, cols, values.shape[1] // 2)[0]
    positive = (score[rows, cols] > 0)[:, None, None]
    limit = np.float64(threshold)  # compared in float64 with float32 scores too
    opposite = np.where(positive, values <= -limit, values >= limit)
    return np.any(opposite & inside, axis=(1, 2))


def _edge(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, distance: float) -> np.ndarray:
    """Whether each position is closer than ``distance`` pixels to the image border."""
    ny, nx = shape
    return np.minimum.reduce([x, y, nx - 1 - x, ny - 1 - y]) < distance


def _local_variances(difference: np.ndarray, x: np.ndarray, y: np.ndarray, rows: np.ndarray,
                     cols: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """D's robust variance (MAD) in the annulus ``inner < r <= outer`` around each ``(x, y)``.

    D is white with unit variance far from sources; near stars its pixels also carry
    the stars' pixel-scale residuals (sub-pixel shifts of undersampled images, PSF
    model errors), which Scorr smooths away but a pixel fit sees. 1 for a candidate
    with fewer than 20 finite annulus pixels. ``(rows, cols)`` are the pixels nearest
    to the positions; the annuli are read as windows around them, all at once.
    """
    half = int(np.ceil(outer)) + 1  # the positions lie within a pixel of (rows, cols)
    values, inside = _windows(difference, rows, cols, half)
    offsets = np.arange(-half, half + 1)
    r = np.hypot((cols - x)[:, None, None] + offsets[None, None, :],
                 (rows - y)[:, None, None] + offsets[None, :, None])
    ring = np.where(inside & (r > inner) & (r <= outer), values.astype(float), np.nan)
    ring = ring.reshape(len(rows), -1)
    ring[~np.isfinite(ring)] = np.nan
    out = np.ones(len(rows))
    enough = np.count_nonzero(~np.isnan(ring), axis=1) >= 20
    if enough.any():
        ring = ring[enough]
        centre = np.nanmedian(ring, axis=1, keepdims=True)
        out[enough] = (MAD_TO_SIGMA * np.nanmedian(np.abs(ring - centre), axis=1)) ** 2
    return out


def _difference_variances(flux_error: np.ndarray | None, scale: float | None, rows: np.ndarray,
                          cols: np.ndarray, half: int) -> np.ndarray:
    """D's per-pixel variance in the windows around ``(rows, cols)``: 1 where the background
    dominates, more near sources.

    D is white with unit variance where the background noise dominates; the sources'
    own noise adds to it, as it adds to the flux error, so the variance is taken as
    ``(flux_error / scale)**2`` with ``scale`` its median (`_difference_scale`; 1
    without a flux error, and where it is not finite and positive).
    """
    side = 2 * half + 1
    if flux_error is None or scale is None:
        return np.ones((len(rows), side, side))
    stamps = _windows(flux_error, rows, cols, half)[0].astype(float)
    finite = np.isfinite(stamps) & (stamps > 0)
    return np.where(finite, (stamps / scale) ** 2, 1.0)


def _fit_stack(stamps: np.ndarray, variance: np.ndarray, local: np.ndarray, psfs: np.ndarray,
               dx: np.ndarray, dy: np.ndarray, psf_error: float,
               signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chi^2/dof, peak-pixel residual in sigma along ``signs``) of PSF fits to D stamps.

    ``stamps`` are the ``(n, w, w)`` windows of D centred on each candidate's peak
    pixel (NaN outside the fit radius and off the image), ``psfs`` the ``(n, py, px)``
    PSF stamps (at least ``w`` on a side), ``(dx, dy)`` the score peaks' sub-pixel
    offsets. The amplitude and position are fitted by two Gauss-Newton steps (each
    step linear in the amplitude and the PSF's gradient, the shift kept within 1 px;
    a candidate whose amplitude comes out 0 stops there). Each pixel's variance in the
    fit and its chi^2 is ``max(variance, local) + (psf_error * model)**2``: D's noise,
    raised to its ``local`` level around the candidate, plus the PSF model's own error.
    The peak residual is measured against ``variance`` without ``local``: a defect's
    own ringing in D, which raises ``local``, must not hide how sharp it is.
    """
    n, w = stamps.shape[0], stamps.shape[1]
    half = w // 2
    cy, cx = psfs.shape[1] // 2, psfs.shape[2] // 2
    cut = (slice(None), slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1))
    good = np.isfinite(stamps)
    data = np.where(good, stamps, 0.0)
    dx, dy = dx.astype(float), dy.astype(float)
    amplitude_fit = np.zeros(n)
    moving = np.ones(n, dtype=bool)
    for _ in range(2):
        step = np.flatnonzero(moving)
        if step.size == 0:
            break
        model = shift_stack(psfs[step], dx[step], dy[step])
        grad_y, grad_x = np.gradient(model, axis=(1, 2))
        design = np.stack([m[cut] for m in (model, grad_x, grad_y)], axis=-1)
        design *= good[step, :, :, None]
        normal = np.einsum("kpqi,kpqj->kij", design, design)
        right = np.einsum("kpqi,kpq->ki", design, data[step])
        coef = np.einsum("kij,kj->ki", np.linalg.pinv(normal), right)
        amplitude_fit[step] = coef[:, 0]
        update = coef[:, 0] != 0
        moving[step[~update]] = False
        step, coef = step[update], coef[update]
        dx[step] = np.clip(dx[step] - coef[:, 1] / coef[:, 0], -1.0, 1.0)
        dy[step] = np.clip(dy[step] - coef[:, 2] / coef[:, 0], -1.0, 1.0)
    p = shift_stack(psfs, dx, dy)[cut]
    model_variance = (psf_error * amplitude_fit[:, None, None] * p) ** 2
    weight = 1.0 / (np.maximum(variance, local[:, None, None]) + model_variance)
    weight[~good] = 0.0
    wpp = np.sum(weight * p * p, axis=(1, 2))
    amplitude = np.sum(weight * p * data, axis=(1, 2)) / wpp
    residual = data - amplitude[:, None, None] * p
    dof = np.maximum(np.count_nonzero(good, axis=(1, 2)) - 3, 1)
    chi2 = np.sum(weight * residual**2, axis=(1, 2)) / dof
    leverage = weight[:, half, half] * p[:, half, half] ** 2 / wpp
    sigma = np.sqrt(np.maximum(1.0 - leverage, 1e-3)
                    * (variance[:, half, half] + model_variance[:, half, half]))
    return chi2, signs * residual[:, half, half] / sigma


def _psf_fits(
    difference: np.ndarray, flux_error: np.ndarray | None, psf: Any, x: np.ndarray, y: np.ndarray,
    rows: np.ndarray, cols: np.ndarray, signs: np.ndarray, radius: float, psf_error: float,
) -> tuple[np.ndarray, np.ndarray]:
    """PSF fits to D stamps: (chi^2/dof, peak-pixel residual in sigma) of each candidate.

    The pixels of D within ``radius`` of each candidate are fitted with ``psf``
    (a stamp, or a callable of the position) by `_fit_stack`, with D's per-pixel
    variance (`_difference_variances`, from ``flux_error``) and its local variance
    around the candidate (`_local_variances`); the peak residual is taken along each
    candidate's sign (``signs``, that of its score). NaN for a candidate whose peak pixel is
    masked or whose stamp has fewer than 6 finite pixels. The candidates are fitted
    together, `_FIT_CHUNK` at a time, in groups of equal PSF stamp shapes.
    """
    chi2 = np.full(rows.size, np.nan)
    sharp = np.full(rows.size, np.nan)
    if rows.size == 0:
        return chi2, sharp
    scale = _difference_scale(flux_error)
    if callable(psf):
        stamps = [_check_psf(psf(xi, yi)) for xi, yi in zip(x, y)]
    else:
        stamps = [psf] * rows.size
    shapes = [s.shape for s in stamps]
    for shape in set(shapes):
        members = np.flatnonzero([s == shape for s in shapes])
        half = min(int(np.ceil(radius)), shape[0] // 2, shape[1] // 2)
        for part in np.array_split(members, -(-members.size // _FIT_CHUNK)):
            r, c, xs, ys = rows[part], cols[part], x[part], y[part]
            values, inside = _windows(difference, r, c, half)
            offsets = np.arange(-half, half + 1)
            distance = np.hypot((c - xs)[:, None, None] + offsets[None, None, :],
                                (r - ys)[:, None, None] + offsets[None, :, None])
            window = np.where(inside & (distance <= radius), values.astype(float), np.nan)
            window[~np.isfinite(window)] = np.nan
            fit = ((np.count_nonzero(np.isfinite(window), axis=(1, 2)) >= 6)
                   & np.isfinite(difference[r, c]))
            if not fit.any():
                continue
            keep = part[fit]
            local = _local_variances(difference, xs[fit], ys[fit], r[fit], c[fit], radius,
                                     radius + 2 * half)
            variance = _difference_variances(flux_error, scale, r[fit], c[fit], half)
            psfs = np.stack([np.asarray(stamps[i], dtype=float) for i in keep])
            chi2[keep], sharp[keep] = _fit_stack(window[fit], variance, local, psfs,
                                                 xs[fit] - c[fit], ys[fit] - r[fit], psf_error,
                                                 signs[keep])
    return chi2, sharp


def _difference_scale(flux_error: np.ndarray | None) -> float | None:
    """The median of the finite positive ``flux_error`` (None without one)."""
    if flux_error is None:
        return None
    return positive_median(flux_error)  # exact; no copy and partition of the whole frame


def _bright(sources: Table, x: np.ndarray, y: np.ndarray, snr: float, radius: float) -> np.ndarray:
    """Whether a bright source lies near each position.

    A source is bright with S/N >= ``snr`` in both images; it reaches ``radius``
    times ``(S/N / snr) ** BRIGHT_GROWTH``, S/N being the smaller of its two.
    """
    weaker = np.minimum(np.asarray(sources["snr_reference"], float),
                        np.asarray(sources["snr_science"], float))
    bright = weaker >= snr
    if not bright.any() or x.size == 0:
        return np.zeros(x.size, bool)
    sx, sy = np.asarray(sources["x"], float)[bright], np.asarray(sources["y"], float)[bright]
    reach = radius * (weaker[bright] / snr) ** BRIGHT_GROWTH
    distance = np.hypot(x[:, None] - sx[None, :], y[:, None] - sy[None, :])
    return (distance <= reach[None, :]).any(axis=1)


def _snr_map(
    planes: np.ndarray, psf: np.ndarray, shift: tuple[float, float], out: np.ndarray,
    workers: int | None = None,
) -> None:
    """Matched-filter (PSF-fit) S/N of a point source centred at each pixel of one image.

    The PSF correlated with the data over the square root of the PSF squared
    correlated with the variance, moved by ``shift`` on the way (the reference's onto
    the science grid). ``planes`` is the float32 ``(2, ny, nx)`` data and variance (bad
    pixels 0), overwritten; the map, 0 where the noise is not positive, goes to ``out``.
    Both planes are transformed in float32 in one batched call, and multiplied in place,
    a block of rows at a time, by the kernels' conjugate spectra with the shift's ramp
    (`~astro_zackay.fourier.psf_correlation_blocks`: a direct DFT of the compact PSF and
    its square, no transform of an image-sized kernel): the round-off (~1e-6 of the
    maps' peaks) is far below any S/N that the sources are selected by, and no
    frame-sized float64 array is made.
    """
    shape = planes.shape[1:]
    be = get_array_module("numpy")
    psf = np.asarray(psf, dtype=np.float64)
    spectra = be.rfft2(planes, s=shape, workers=workers)  # (2, ny, nx//2+1) complex64
    for block, kernels in psf_correlation_blocks(np.stack([psf, psf * psf]), shape, shift):
        spectra[:, block] *= kernels
    maps = be.irfft2(spectra, s=shape, workers=workers)
    del spectra
    signal, noise = maps
    positive = noise > 0
    np.sqrt(noise, out=noise, where=positive)
    out[...] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(signal, noise, out=out, where=positive)


def _in_chunks(
    function: Callable[[np.ndarray, np.ndarray], np.ndarray], rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """``function(rows, cols)``, one value per position, on `_CHUNK` positions at a time.

    The windows that ``function`` gathers (`_windows`) are then a bounded temporary,
    however many pixels lie above a threshold.
    """
    n_chunks = max(1, -(-rows.size // _CHUNK))
    return np.concatenate([function(r, c) for r, c in
                           zip(np.array_split(rows, n_chunks), np.array_split(cols, n_chunks))])


def bright_sources(
    images: tuple[np.ndarray, np.ndarray],
    variances: tuple[np.ndarray, np.ndarray],
    psfs: tuple[np.ndarray, np.ndarray],
    *,
    mask: np.ndarray | None = None,
    snr_min: float = 20.0,
    shift: tuple[float, float] = (0.0, 0.0),
    workers: int | None = None,
) -> Table:
    """Sources of a (reference, science) pair with their S/N in each image.

    Each image's matched-filter S/N map (its PSF correlated with the data, over the
    square root of the PSF squared correlated with the variance) is computed; the
    sources are the local maxima of the larger of the two maps, above ``snr_min``,
    and each keeps both maps' values at its pixel. `find_transients` takes this
    table as ``sources`` for its BRIGHT flag.

    Parameters
    ----------
    images : (ndarray, ndarray)
        The background-subtracted reference and science images.
    variances : (ndarray, ndarray)
        Their per-pixel variances.
    psfs : (ndarray, ndarray)
        Their unit-sum PSF stamps (odd-sized).
    mask : ndarray of bool, optional
        Bad pixels of the science image's grid: taken, like non-finite data or
        variances, as zero data and zero variance (in the reference, moved by the
        rounded ``shift``).
    snr_min : float
        The least S/N, in either image, of a source kept.
    shift : tuple of float
        ``(dx, dy)`` by which the reference's content moves onto the science
        image's grid (as `~astro_zackay.fourier.shift_image` moves it); the S/N maps
        and the positions are on that grid. Applied inside the transforms that
        the S/N maps take anyway.
    workers : int, optional
        FFT threads (default: all the cores the process may use).

    Returns
    -------
    `~astropy.table.Table`
        Columns ``x``, ``y`` (0-based pixels), ``snr_reference``, ``snr_science``,
        sorted by the larger S/N, highest first.

    Raises
    ------
    ValueError
        When the images, variances and mask differ in shape, or ``snr_min`` is not
        positive.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.transients import bright_sources
    >>> psf = np.exp(-((np.mgrid[-5:6, -5:6] ** 2).sum(axis=0)) / 4.0); psf /= psf.sum()
    >>> image = np.zeros((64, 64)); image[20:31, 30:41] = 5000 * psf
    >>> table = bright_sources((image, image), (np.ones((64, 64)),) * 2, (psf, psf))
    >>> table["x"].tolist(), table["y"].tolist(), bool(table["snr_science"][0] > 100)
    ([35], [25], True)
    """
    if not (np.ndim(snr_min) == 0 and float(snr_min) > 0):
        raise ValueError(f"snr_min must be a positive signal-to-noise ratio, got {snr_min!r}")
    arrays = [np.asarray(a) for a in (*images, *variances)]
    if mask is not None:
        arrays.append(np.asarray(mask, dtype=bool))
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 2:
        raise ValueError(f"the images, variances and mask must be 2-D of one shape, got "
                         f"{[a.shape for a in arrays]}")
    shift = (float(shift[0]), float(shift[1]))
    # each image's float32 data and variance planes, filled in place and transformed in
    # turn: no image-sized float64 copy, and one image's transforms at a time
    snr = np.empty((2, *arrays[0].shape), dtype=np.float32)
    planes = np.empty((2, *arrays[0].shape), dtype=np.float32)
    for i, moved in enumerate((shift, (0.0, 0.0))):
        planes[0], planes[1] = arrays[i], arrays[2 + i]
        bad = ~(np.isfinite(planes[0]) & np.isfinite(planes[1]))
        if mask is not None:
            bad |= move_whole_pixels(arrays[4], -int(np.rint(moved[0])), -int(np.rint(moved[1])))
        np.copyto(planes, np.float32(0.0), where=bad)
        del bad
        _snr_map(planes, psfs[i], moved, snr[i], workers)
    del planes
    larger = np.fmax(snr[0], snr[1])
    half = max(int(np.ceil(_psf_fwhm(psfs[0]))), 1)
    rows, cols = np.nonzero(larger >= snr_min)

    def is_peak(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return larger[r, c] >= _windows(larger, r, c, half)[0].max(axis=(1, 2), initial=-np.inf)

    peak = _in_chunks(is_peak, rows, cols)
    rows, cols = rows[peak], cols[peak]
    order = np.argsort(-larger[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    return Table({"x": cols, "y": rows, "snr_reference": snr[0][rows, cols].astype(float),
                  "snr_science": snr[1][rows, cols].astype(float)})


def _candidates(
    data: np.ndarray, bad: np.ndarray, threshold: float, min_separation: int, sign: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer peaks (rows, cols) and sub-pixel positions (x, y), by ``|score|`` descending.

    A peak is a good pixel at or above ``threshold`` (of ``|score|``, the score or
    its negative, as ``sign`` asks) and the highest of the good pixels in the
    ``2*min_separation + 1`` square around it; only the pixels above the threshold
    and their squares are examined.
    """
    flip = -1.0 if sign == "negative" else 1.0

    def signed(values: np.ndarray) -> np.ndarray:
        return np.abs(values) if sign == "both" else flip * values

    # a float64 threshold: a float32 score is compared exactly, not with a rounded one;
    # boolean passes only (no frame-sized |score| or signed copy of the score)
    limit = np.float64(threshold)
    with np.errstate(invalid="ignore"):
        if sign == "both":
            above = data >= limit
            above |= data <= -limit
        else:
            above = data >= limit if sign == "positive" else data <= -limit
    rows, cols = np.nonzero(above)
    del above
    keep = ~bad[rows, cols]
    rows, cols = rows[keep], cols[keep]
    half = int(min_separation)

    def is_max(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        values, inside = _windows(data, r, c, half)
        inside &= ~_windows(bad, r, c, half)[0]
        window = np.where(inside, signed(values), -np.inf)
        return signed(data[r, c]) >= window.max(axis=(1, 2), initial=-np.inf)

    peak = _in_chunks(is_max, rows, cols)
    rows, cols = rows[peak], cols[peak]
    order = np.argsort(-signed(data[rows, cols]), kind="stable")
    rows, cols = rows[order], cols[order]
    x, y = _subpixel_peak(data, bad, rows, cols, signed)
    return rows, cols, x, y


def _check_image(value: Any, shape: tuple[int, int], name: str) -> np.ndarray | None:
    """A 2-D array of the score's shape (or None)."""
    if value is None:
        return None
    array = _as_array(value, name)[0]
    if array.shape != shape:
        raise ValueError(f"{name} shape {array.shape} does not match score {shape}")
    return array


def _check_mask(value: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """``bad_pixels`` as a boolean array of the score's shape (or None)."""
    if value is None:
        return None
    mask = np.asarray(value, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"bad_pixels shape {mask.shape} does not match score {shape}")
    return mask


def _check_psf(psf: Any) -> Any:
    """An odd-sized 2-D PSF stamp with a positive peak, a callable (unchecked), or None."""
    if psf is None or callable(psf):
        return psf
    psf = np.asarray(psf, dtype=float)
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0 or not psf.max() > 0:
        raise ValueError(f"psf must be an odd-sized 2-D stamp with a positive peak, "
                         f"got shape {psf.shape}")
    return psf


def _check_separation(min_separation: Any) -> None:
    """``min_separation`` must be a non-negative whole number of pixels."""
    value = np.asarray(min_separation)
    if (value.ndim != 0 or value.dtype.kind not in "iuf" or not np.isfinite(value)
            or value < 0 or value != np.floor(value)):
        raise ValueError(f"min_separation must be a non-negative whole number of pixels (the "
                         f"half-side of the local-extremum box), got {min_separation!r}")


def _check_limits(limits: dict[str, Any]) -> None:
    """The flags' radii and thresholds must be positive numbers (``psf_error``,
    ``edge_distance`` >= 0); infinity is allowed (it turns a flag off or on everywhere)."""
    for key, value in limits.items():
        zero_ok = key in ("psf_error", "edge_distance")
        number = np.asarray(value)
        fine = (number.ndim == 0 and number.dtype.kind in "iuf" and not np.isnan(number)
                and (number >= 0 if zero_ok else number > 0))
        if not fine:
            need = "a number >= 0" if zero_ok else "a positive number"
            raise ValueError(f"{key} must be {need}, got {value!r}")


def _check_not_constant(data: np.ndarray, bad: np.ndarray, threshold: float) -> None:
    """Refuse a fully masked score, and a zero-variance one that reaches ``threshold``.

    Every pixel of the latter would be a local extremum above the threshold: it is no
    map in sigma.
    """
    if bad.all():
        raise ValueError("score has no finite unmasked pixel (all NaN or masked): there is "
                         "nothing to search; check the subtraction's inputs and masks")
    low = float(np.min(data, where=~bad, initial=np.inf))  # no copy of the good pixels
    high = float(np.max(data, where=~bad, initial=-np.inf))
    if low == high and abs(low) >= threshold:
        raise ValueError(
            f"score is constant ({low:g} in every unmasked pixel): a zero-variance "
            "image is not a score in sigma units; pass the Scorr of a subtraction "
            "(SubtractionResult.score)")


def _check_sources(sources: Table | None) -> None:
    """``sources`` must have the columns of `bright_sources`."""
    needed = {"x", "y", "snr_reference", "snr_science"}
    if sources is not None and not needed <= set(sources.colnames):
        raise ValueError(f"sources needs the columns {sorted(needed)} (see bright_sources), "
                         f"got {sources.colnames}")


def _flags(
    data: np.ndarray, bad: np.ndarray, rows: np.ndarray, cols: np.ndarray, x: np.ndarray,
    y: np.ndarray, fwhm: float | None, inputs: dict[str, Any], limits: dict[str, float],
    table: Table,
) -> np.ndarray:
    """The flags bitmask of each candidate; adds the fit columns and ``flags_computed``."""
    flags = np.zeros(rows.size, dtype=np.int32)
    table.meta["flags_computed"] = computed = []
    if fwhm is None:
        log.info("no psf= or fwhm= and the score's scale cannot be measured: no flag computed")
        return flags
    computed += ["DIPOLE", "EDGE"]
    flags[_dipole(data, bad, rows, cols, limits["dipole_radius"] * fwhm,
                  limits["dipole_threshold"])] |= FLAG_DIPOLE
    flags[_edge(data.shape, x, y, limits["edge_distance"] * fwhm)] |= FLAG_EDGE
    if inputs["bad_pixels"] is not None:
        computed.append("MASKED")
        near = _near(inputs["bad_pixels"], rows, cols, limits["mask_radius"] * fwhm)
        flags[near] |= FLAG_MASKED
    if inputs["difference"] is not None and inputs["psf"] is not None:
        computed += ["SHARP", "CHI2"]
        radius = max(limits["fit_radius"] * fwhm, 2.0)
        chi2, sharp = _psf_fits(inputs["difference"], inputs["flux_error"], inputs["psf"], x, y,
                                rows, cols,
                                np.sign(data[rows, cols]), radius, limits["psf_error"])
        table["chi2_dof"] = chi2
        table["sharpness"] = sharp
        flags[sharp > limits["sharp_threshold"]] |= FLAG_SHARP
        flags[chi2 > limits["chi2_threshold"]] |= FLAG_CHI2
    if inputs["sources"] is not None:
        computed.append("BRIGHT")
        near = _bright(inputs["sources"], x, y, limits["bright_snr"],
                       limits["bright_radius"] * fwhm)
        flags[near] |= FLAG_BRIGHT
    return flags


def find_transients(
    score: Any,
    *,
    threshold: float = 5.0,
    flux: Any = None,
    flux_error: Any = None,
    mask: np.ndarray | None = None,
    wcs: WCS | None = None,
    min_separation: int = 3,
    sign: Literal["both", "positive", "negative"] = "both",
    difference: Any = None,
    psf: Any = None,
    bad_pixels: np.ndarray | None = None,
    sources: Table | None = None,
    fwhm: float | None = None,
    dipole_radius: float = 2.0,
    dipole_threshold: float = 3.5,
    mask_radius: float = 2.0,
    fit_radius: float = 1.0,
    sharp_threshold: float = 4.0,
    chi2_threshold: float = 4.0,
    psf_error: float = 0.05,
    edge_distance: float = 2.0,
    bright_snr: float = 100.0,
    bright_radius: float = 3.0,
) -> Table:
    """Find transient candidates as local extrema of a score image, and vet them.

    Each candidate gets a ``flags`` bitmask (see `FLAGS`; one bit per test, set
    when the test fails) and ``good`` (no bit set). Distances are in units of
    ``fwhm``, the FWHM of the difference PSF P_D.

    Parameters
    ----------
    score : `~astropy.nddata.CCDData` or `~numpy.ndarray`
        The score image in sigma units (the ``Scorr`` of a subtraction). Its mask
        and WCS are used when it is a CCDData; its unit, if any, must be
        dimensionless.
    threshold : float
        Detection threshold on ``|score|`` in sigma.
    flux, flux_error : `~astropy.nddata.CCDData` or `~numpy.ndarray`, optional
        Transient flux (PSF photometry, ``alpha``) and its error images, sampled at
        each candidate's peak pixel.
    mask : `~numpy.ndarray`, optional
        Pixels where nothing may be detected (OR-ed with the score's own mask).
    wcs : `~astropy.wcs.WCS`, optional
        Gives ``ra``, ``dec`` columns; default the score's own WCS.
    min_separation : int
        Two candidates are at least this many pixels apart (the local-extremum box
        is ``2*min_separation + 1`` wide).
    sign : {'both', 'positive', 'negative'}
        Brightening (positive score), fading (negative) or both.
    difference : `~astropy.nddata.CCDData` or `~numpy.ndarray`, optional
        The proper difference image D (white, unit variance; NaN where masked).
        With ``psf``, enables the SHARP and CHI2 flags.
    psf : `~numpy.ndarray` or callable, optional
        P_D, the odd-sized PSF stamp of D (centred), or a callable ``psf(x, y)``
        returning the stamp at a position (a PSF that varies across the field).
        Enables SHARP and CHI2 with ``difference``, and sets ``fwhm`` (from the
        stamp at the image centre).
    bad_pixels : `~numpy.ndarray` of bool, optional
        The masked and saturated pixels of the input images (before any growth);
        enables the MASKED flag.
    sources : `~astropy.table.Table`, optional
        Sources of both images with their S/N (`bright_sources`); enables BRIGHT.
    fwhm : float, optional
        FWHM of P_D in pixels; default measured from ``psf`` (the diameter of the
        disc of its half-maximum area), else from the lag-1 autocorrelation of the
        score's noise (when that cannot be measured, as on a constant score, no
        flag is computed).
    dipole_radius, dipole_threshold : float
        DIPOLE: an opposite-sign score beyond ``dipole_threshold`` sigma within
        ``dipole_radius`` FWHM.
    mask_radius : float
        MASKED: a bad pixel within this many FWHM of the peak pixel.
    fit_radius : float
        Half-side of the D stamp of the PSF fit, in FWHM (at least 2 px).
    sharp_threshold : float
        SHARP: the peak pixel of D exceeds the PSF fit by more than this many sigma.
    chi2_threshold : float
        CHI2: chi^2 per degree of freedom of the PSF fit above this.
    psf_error : float
        The PSF model's own error as a fraction of the fitted model in each pixel,
        added in quadrature to D's noise in the fit (so that bright point sources,
        whose residuals from a slightly wrong P_D exceed the noise, are not flagged).
    edge_distance : float
        EDGE: closer than this many FWHM to the border.
    bright_snr, bright_radius : float
        BRIGHT: a source of S/N >= ``bright_snr`` in both images (a star, not the
        transient itself) within ``bright_radius`` FWHM times ``(S/N / bright_snr)
        ** (1/3)`` (`BRIGHT_GROWTH`; S/N the smaller of the two).

    Returns
    -------
    `~astropy.table.Table`
        Columns ``id``, ``x``, ``y`` (0-based pixels, x the column, refined to
        sub-pixel with a parabola through the peak), ``x_peak``, ``y_peak`` (the
        integer peak pixel), ``score`` (signed, sigma), and, when given, ``flux``,
        ``flux_err`` and ``snr`` (= flux / flux_err), ``ra``, ``dec`` (deg) with a
        WCS, ``chi2_dof`` and ``sharpness`` (with ``difference`` and ``psf``);
        then ``flags`` and ``good``. Sorted by ``|score|``, highest first.
        ``meta`` holds the threshold, the sign, the FWHM, every flag's bit and
        meaning (``FLAG_<NAME>``), its parameters, and ``flags_computed``.

    Raises
    ------
    ValueError
        For an invalid ``sign``, ``threshold``, ``min_separation`` (a non-negative
        whole number) or flag limit (negative or NaN), an image that is not 2-D or
        whose shape differs from the score's, a malformed ``psf`` or ``sources``, a
        score with no unmasked finite pixel, or a constant score at or above the
        threshold (every pixel would be a candidate). All before the search.
    TypeError
        For a score or image that is not numeric (a FITS path or HDU: read it into a
        CCDData first) or is boolean, a ``threshold`` that is not a real number (a
        bool or a string), or a ``wcs`` that is not an `~astropy.wcs.WCS`.
    astropy.units.UnitsError
        For a score with a unit other than dimensionless (a score is in sigma: an
        image or a difference in data units is not one).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.transients import find_transients
    >>> score = np.zeros((32, 32))
    >>> score[10, 20] = 8.0
    >>> score[25, 5] = -6.0
    >>> table = find_transients(score, threshold=5.0, fwhm=3.0)
    >>> table["x_peak"].tolist(), table["y_peak"].tolist(), table["score"].tolist()
    ([20, 5], [10, 25], [8.0, -6.0])
    >>> table["flags"].tolist(), table["good"].tolist()  # the second is 5 px from the edge
    ([0, 16], [True, False])
    """
    if sign not in ("both", "positive", "negative"):
        raise ValueError(f"sign must be 'both', 'positive' or 'negative', got {sign!r}")
    if isinstance(threshold, bool | np.bool_) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number of sigma, got {threshold!r} "
                        f"({type(threshold).__name__})")
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number of sigma, got {threshold}")
    if wcs is not None and not isinstance(wcs, WCS):
        raise TypeError(f"wcs must be an astropy.wcs.WCS (or None: the score's own), got "
                        f"{type(wcs).__name__}")
    _check_separation(min_separation)
    limits = {
        "dipole_radius": dipole_radius, "dipole_threshold": dipole_threshold,
        "mask_radius": mask_radius, "fit_radius": fit_radius,
        "sharp_threshold": sharp_threshold, "chi2_threshold": chi2_threshold,
        "psf_error": psf_error,
        "edge_distance": edge_distance, "bright_snr": bright_snr, "bright_radius": bright_radius,
    }
    _check_limits(limits)
    data, own_mask, own_wcs, unit = _as_array(score, "score")
    bad = ~np.isfinite(data)
    for extra in (own_mask, None if mask is None else np.asarray(mask, dtype=bool)):
        if extra is not None:
            if extra.shape != data.shape:
                raise ValueError(f"mask shape {extra.shape} does not match score {data.shape}")
            bad |= extra
    _check_not_constant(data, bad, threshold)
    if unit is not None and unit != u.dimensionless_unscaled:
        raise u.UnitsError(f"score has the unit {unit}: a score is in sigma (dimensionless, "
                           "the Scorr of a subtraction, SubtractionResult.score), not an image "
                           "or a difference in data units")
    inputs = {
        "difference": _check_image(difference, data.shape, "difference"),
        "psf": _check_psf(psf),
        "bad_pixels": _check_mask(bad_pixels, data.shape),
        "sources": sources,
        "flux": _check_image(flux, data.shape, "flux"),
        "flux_error": _check_image(flux_error, data.shape, "flux_error"),
    }
    _check_sources(sources)
    if fwhm is None:
        fwhm = _score_fwhm(data, bad) if inputs["psf"] is None else _psf_fwhm(
            _check_psf(inputs["psf"](*_centre(data.shape))) if callable(inputs["psf"])
            else inputs["psf"])
    if fwhm is not None and not (np.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"fwhm must be a positive number of pixels, got {fwhm}")
    wcs = own_wcs if wcs is None else wcs
    rows, cols, x, y = _candidates(data, bad, threshold, min_separation, sign)

    table = Table()
    table["id"] = np.arange(1, rows.size + 1)
    table["x"] = x
    table["y"] = y
    table["x_peak"] = cols
    table["y_peak"] = rows
    table["score"] = data[rows, cols].astype(float)
    _add_flux(table, flux, flux_error, rows, cols)
    if wcs is not None and wcs.has_celestial:
        sky = wcs.celestial.pixel_to_world(x, y)
        table["ra"] = sky.ra.deg * u.deg
        table["dec"] = sky.dec.deg * u.deg
    table["flags"] = _flags(data, bad, rows, cols, x, y, fwhm, inputs, limits, table)
    table["good"] = table["flags"] == 0
    table.meta["threshold"] = float(threshold)
    table.meta["sign"] = sign
    table.meta["fwhm"] = None if fwhm is None else float(fwhm)
    table.meta.update({f"FLAG_{name}": f"{bit}: {text}" for name, (bit, text) in FLAGS.items()})
    table.meta.update({key: float(value) for key, value in limits.items()})
    return table


def _add_flux(table: Table, flux: Any, flux_error: Any, rows: np.ndarray,
              cols: np.ndarray) -> None:
    """Add the ``flux``, ``flux_err`` and ``snr`` columns sampled at the peak pixels."""
    if flux is not None:
        flux_data, _, _, flux_unit = _as_array(flux, "flux")
        table["flux"] = flux_data[rows, cols].astype(float)
        if flux_unit is not None:
            table["flux"].unit = flux_unit
    if flux_error is not None:
        err_data, _, _, err_unit = _as_array(flux_error, "flux_error")
        table["flux_err"] = err_data[rows, cols].astype(float)
        if err_unit is not None:
            table["flux_err"].unit = err_unit
        if flux is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                table["snr"] = table["flux"].value / table["flux_err"].value
