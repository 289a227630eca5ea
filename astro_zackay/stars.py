"""Selection of PSF stars: bright, isolated, unsaturated, unblended point sources.

:func:`find_psf_stars` runs five small stages:

detect
    sep finds the sources on the background-subtracted image;
measure
    adaptive Gaussian-weighted moments of every plausible candidate, all at once
    (centroid, size, ellipticity, flux, S/N, peak);
reference shape
    a smooth size model across the field: the stellar locus (the tight band of
    sizes at the small end, where point sources of every flux pile up, while
    galaxies spread to larger sizes) found locally among each position's nearest
    candidates, so a PSF that changes across the field, even by quadrant, keeps
    its stars everywhere;
cuts
    edge, saturated, masked, low S/N, crowded, sharp, extended, elongated;
table
    the brightest 20 stars are fitted with an elliptical Moffat profile (their
    ``beta`` feeds aperture corrections); the others keep their moment centroids
    and get the PSF flux of the profile with the shape fixed from their moments.

The result is an astropy Table with sub-pixel centroids, PSF fluxes, S/N and
shapes; its ``meta`` records the FWHM, the stamp shape to cut PSF stamps with, the
range of the size model and how many sources each cut rejected.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy import units as u
from astropy.table import Table
from scipy.spatial import cKDTree

from ._ccd import ImageData, to_image
from ._checks import is_whole
from ._moments import Moments, adaptive_moments, pixels_at
from ._stats import mad_std
from ._threads import single_threaded_blas
from .background import (
    BackgroundResult,
    _default_box_size,
    _detect_sources,
    _Detection,
    _sep_maps,
)
from .profiles import GAUSS_FWHM, moffat_jacobian, moffat_model, moffat_shape

__all__ = ["find_psf_stars"]

log = logging.getLogger(__name__)

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
#: A star whose stamp has masked pixels (not saturated ones) stays usable when they are at
#: most this fraction of the stamp and none lies within one FWHM of its centre.
MASKED_MAX_FRACTION = 0.03
#: Neighbours fainter than this fraction of a star's flux do not spoil its isolation.
_NEIGHBOUR_FRACTION = 0.01
#: Shape cuts relative to the local size model (the stellar locus) at each star.
_SHARP_RATIO = 0.75
#: Extended: ln(FWHM / local FWHM) above 4.5 / S/N (the scatter of moment sizes of point
#: sources is 1-2.4 / S/N, measured), within ln 1.08 (the size model's own error where
#: the PSF varies) and ln 1.25.
_EXTENDED_SNR = 4.5
_EXTENDED_MIN, _EXTENDED_MAX = math.log(1.08), math.log(1.25)
#: ... or a concentration below the locus's by more than ln 1.6 / S/N (its scatter is
#: 0.2-0.45 / S/N, measured) and 3 % (extended wings: galaxies with compact cores).
_DIFFUSE_SNR = 1.6
_DIFFUSE_MIN = 0.03
#: Elongated: an ellipticity above the locus's by more than 0.1 ...
_ELONGATION_EXCESS = 0.1
#: ... or 5 / S/N, the 99th percentile of the ellipticity of round stars (measured: 0.25 at
#: S/N 15-30, 0.11 at 30-100 for FWHM 3).
_ELONGATION_SNR = 5.0
#: Widening of the size and ellipticity tolerances for undersampled PSFs, times
#: 1 / sigma**4 (pixels): pixel phase makes the moments of a FWHM 1.5 px star scatter by
#: 0.3 in ellipticity and +-0.2 in ln FWHM even at high S/N (measured), by 0.04 / 0.02
#: at FWHM 2.
_SAMPLING_ELLIPTICITY = 0.058
_SAMPLING_SIZE = 0.025
#: Sources with a FWHM below this (pixels) are sharper than a pixel: cosmic rays, hot pixels.
_MIN_FWHM = 1.0
#: Only sources rounder than this can define the stellar locus (cosmic-ray tracks are not).
_LOCUS_MAX_ELLIPTICITY = 0.6
#: The locus is a band of this full width in ln(FWHM) among the nearest candidates.
_LOCUS_WIDTH = 0.1
#: ... the band of the smallest sizes with at least this fraction of the densest band's count.
_LOCUS_FRACTION = 0.25
#: Candidates this far (in ln FWHM) from their local locus do not inform the size model.
_LOCUS_BAND = math.log(1.2)
#: Nearest candidates for the local locus, and locus members for the size model.
_LOCUS_NEIGHBOURS = 40
_MODEL_NEIGHBOURS = 15
#: The nearest candidates count in the local locus by a Gaussian in their distance, of
#: the distance of this many (an effective sample of about twice as many) ...
_WEIGHT_NEIGHBOURS = 8
#: ... and that locus is taken where its band holds this fraction of the nearest candidates
_LOCAL_FRACTION = 0.25
#: and the smallest band's members weigh, each on average, under this fraction of the
#: heaviest band's (stars across a border; stars among galaxies weigh about the same).
_REMOTE_FRACTION = 0.15
#: The moment S/N pre-cut, a fraction of snr_min (the fitted S/N decides in the end).
_MOMENT_SNR_FRACTION = 0.8
#: Stars fitted with the full Moffat profile (the brightest); the rest keep their shape fixed.
N_PROFILE_FITS = 20
#: Profile fits stop after this many Levenberg-Marquardt iterations (from the moments'
#: start, 6 and 25 give the same beta and FWHM to 4 digits, measured).
_MAX_ITER = 6
#: Bounds of t = 1/beta of the Moffat profile (t -> 0 is a Gaussian).
_T_MIN, _T_MAX = 1e-3, 0.8


# Arguments
# ---------
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


def _check_arguments(
    snr_min: float,
    fwhm: float | None,
    isolation: float | None,
    max_stars: int | None,
    edge: int | None,
) -> None:
    if not (isinstance(snr_min, numbers.Real) and np.isfinite(snr_min) and snr_min > 0):
        raise ValueError(f"snr_min must be a positive finite number, got {snr_min!r}")
    if fwhm is not None and not (np.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"fwhm must be a positive number of pixels, got {fwhm}")
    if isolation is not None and not isolation >= 0:
        raise ValueError(f"isolation must be a radius >= 0 in pixels, got {isolation}")
    if max_stars is not None and not is_whole(max_stars, 1):
        raise ValueError(f"max_stars must be a whole number >= 1 (the stars kept), got "
                         f"{max_stars!r}")
    if edge is not None and not is_whole(edge):
        raise ValueError(f"edge must be a whole number of pixels >= 0 (the margin a star's box "
                         f"keeps from the image border), or None for no margin, got {edge!r}")


def _default_stamp_shape(fwhm: float) -> tuple[int, int]:
    """``2 * ceil(3 FWHM) + 1`` pixels (at least 11): +-3 FWHM holds the wings.

    3 FWHM is taken to 0.05 px, so that a FWHM measured a hair above a whole third of
    a pixel does not add two pixels to every stamp.
    """
    size = max(11, 2 * math.ceil(3.0 * fwhm - 0.05) + 1)
    return size, size


# Stage 1: detect
# ---------------
def _check_background(background: Any) -> None:
    """Raise for a ``background=`` that is not a BackgroundResult, None or one finite sky
    level (a TypeError for another kind of thing, a ValueError for NaN or inf)."""
    if background is None or isinstance(background, BackgroundResult):
        return
    value = background.value if isinstance(background, u.Quantity) else background
    if np.ndim(value) == 0 and isinstance(value, numbers.Real | np.ndarray):
        if not np.isfinite(value):
            raise ValueError(f"background must be a finite sky level, got {background!r}")
        return
    raise TypeError(
        f"background must be a BackgroundResult (from estimate_background) or one finite "
        f"sky level (a number or Quantity), got {type(background).__name__} "
        f"{np.shape(background) if np.ndim(background) else background!r}"
    )


def _given_background(img: ImageData, background: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sky and rms maps (image unit) from a BackgroundResult or a constant sky."""
    if isinstance(background, BackgroundResult):
        if background.sky.shape != img.shape:
            raise ValueError(
                f"the background's shape {background.sky.shape} differs from the image's "
                f"{img.shape}"
            )
        scale = (1.0 * background.sky.unit).to_value(img.unit)
        if scale == 1.0:  # the maps themselves: read, never written
            return background.sky.data, background.rms.data
        return scale * background.sky.data, scale * background.rms.data
    _check_background(background)
    if isinstance(background, u.Quantity):
        try:
            sky = float(background.to_value(img.unit))
        except u.UnitConversionError:
            raise u.UnitsError(f"background={background} cannot be converted to the image's "
                               f"unit {img.unit}") from None
    else:
        sky = float(background)
    good = ~img.mask
    rms = math.sqrt(float(np.median(img.variance[good]))) if good.any() else 0.0
    return np.full(img.shape, sky), np.full(img.shape, rms)


def _residual(img: ImageData, sky: np.ndarray) -> np.ndarray:
    """The data less the sky, masked pixels 0 (one new array, written in place)."""
    residual = img.data - sky
    residual[img.mask] = 0.0
    return residual


def _detect(
    img: ImageData, background: Any, detection: _Detection | None = None
) -> tuple[np.ndarray, np.ndarray, Any]:
    """Background-subtracted data (masked pixels 0), the rms map and the detections.

    The detections are ``detection``, those the background estimate
    (`~astro_zackay.background._estimate_from`) made to mask the sources, on its
    first-pass sky, when given with ``background`` and made on this very image (they
    are not detected again), else sep's on the data less the sky
    (`~astro_zackay.background._detect_sources`).

    Without a ``background``, the sky is one pass of sep's clipped background map
    (64 px boxes, 3x3 filter). The second, source-masked pass of
    `~astro_zackay.background.estimate_background` would cost a third of the time
    here and, on the 1024^2 test fields of 700 stars (measured), changed the
    selection by at most 1 star of 450-490 and the median flux by 0.01-0.12 %
    (at most 0.5 % for S/N > 100). That pass is the one that estimated the variance
    (``img.sky_maps``) when the box sizes agree: it is reused.
    """
    if background is not None:
        sky, rms = _given_background(img, background)
        residual = _residual(img, sky)
        found = detection
        if found is None or not found.of(img):
            found, _ = _detect_sources(img, residual, rms)
        return residual, rms, found.objects
    box = _default_box_size(img.shape)
    if np.count_nonzero(~img.mask) < box * box:
        raise ValueError(
            f"only {int(np.count_nonzero(~img.mask))} unmasked pixels, fewer than one "
            f"{box}x{box} background box: check the mask and the saturation level"
        )
    if img.sky_maps is not None and img.sky_maps.matches(img, box):  # those of the variance
        sky, rms = img.sky_maps.sky, img.sky_maps.rms
    else:
        sky, rms = _sep_maps(img.filled(0.0), img.mask, (box, box), (3, 3))
    residual = _residual(img, sky)
    found, _ = _detect_sources(img, residual, rms)
    return residual, rms, found.objects


def _start_fwhm(objects: Any) -> tuple[float, float]:
    """Typical and broad-end FWHM of the bright, round detections: a start for the moments.

    From sep's isophotal second moments (about the Gaussian sigma for bright
    stars) of the 300 brightest: their median starts the moments, which converge
    from any start, and their 90th percentile sizes the moments' windows.
    """
    flux = np.asarray(objects["flux"], dtype=float)
    a, b = np.asarray(objects["a"], dtype=float), np.asarray(objects["b"], dtype=float)
    clean = (flux > 0) & (b > 0.7 * a) & (a > 0)
    if not clean.any():
        clean = (flux > 0) & (a > 0)
    if not clean.any():
        return 3.0, 3.0
    bright = np.flatnonzero(clean)[np.argsort(-flux[clean])[:300]]
    sizes = GAUSS_FWHM * np.sqrt(a[bright] * b[bright])
    typical, broad = np.clip(np.percentile(sizes, [50, 90]), _MIN_FWHM, 50.0)
    return float(typical), float(broad)


# Stage 2: measure
# ----------------
@dataclass(frozen=True)
class _Candidates:
    """Per-detection measurements (NaN / False where not measured)."""

    x: np.ndarray
    y: np.ndarray
    flux_det: np.ndarray
    moments: Moments
    measured: np.ndarray
    fwhm: np.ndarray
    ellipticity: np.ndarray
    snr: np.ndarray

    @property
    def n(self) -> int:
        return self.x.size


def _measure(
    data: np.ndarray,
    rms: np.ndarray,
    img: ImageData,
    objects: Any,
    fwhm0: float,
    fwhm_broad: float,
    snr_min: float,
) -> _Candidates:
    """Adaptive moments of every detection plausibly bright enough to be a PSF star."""
    x_det = np.asarray(objects["x"], dtype=float)
    y_det = np.asarray(objects["y"], dtype=float)
    flux_det = np.asarray(objects["flux"], dtype=float)
    npix = np.maximum(np.asarray(objects["npix"]), 1)
    ix = np.clip(np.rint(x_det).astype(int), 0, data.shape[1] - 1)
    iy = np.clip(np.rint(y_det).astype(int), 0, data.shape[0] - 1)
    noise = rms[iy, ix].astype(float)  # the background rms at each detection (float64: its
    # square overflows float32 for data above ~1e19)
    # cheap pre-cut on the isophotal S/N (generously below the PSF S/N); source Poisson
    # noise only with a known gain (the estimated variance has none without one)
    poisson = np.clip(flux_det, 0, None) / img.gain if img.gain else 0.0
    rough_snr = flux_det / np.sqrt(npix * noise**2 + poisson)
    idx = np.flatnonzero((flux_det > 0) & (rough_snr > 0.5 * snr_min))
    # windows of +-2 FWHM of the broad end of the stars (not of the largest galaxies)
    half = int(np.clip(math.ceil(2.0 * min(max(fwhm0, fwhm_broad), 2.5 * fwhm0)), 4, 40))
    mom = adaptive_moments(
        data, img.variance, img.mask, x_det[idx], y_det[idx], fwhm0 / GAUSS_FWHM, half
    )
    fwhm, ell, _ = mom.shape()

    def scatter(values: np.ndarray, fill: Any = np.nan) -> np.ndarray:
        out = np.full(x_det.size, fill, dtype=np.asarray(values).dtype)
        out[idx] = values
        return out

    full = Moments(**{
        name: scatter(getattr(mom, name), False if name == "ok" else np.nan)
        for name in (
            "x", "y", "x_err", "y_err", "cxx", "cxy", "cyy", "flux", "flux_err", "peak",
            "concentration", "ok",
        )
    })
    measured = full.ok & np.isfinite(scatter(fwhm))
    return _Candidates(
        x=np.where(measured, full.x, x_det),
        y=np.where(measured, full.y, y_det),
        flux_det=flux_det,
        moments=full,
        measured=measured,
        fwhm=scatter(fwhm),
        ellipticity=scatter(ell),
        snr=np.where(measured, full.snr, np.nan),
    )


# Stage 3: reference shape
# ------------------------
def _trend_terms(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], n_terms: int) -> np.ndarray:
    """Columns 1, u, v, u**2, u v, v**2 (the first ``n_terms``), ``u, v`` in [-1, 1]."""
    u = 2.0 * np.asarray(x, float) / max(shape[1] - 1, 1) - 1.0
    v = 2.0 * np.asarray(y, float) / max(shape[0] - 1, 1) - 1.0
    return np.column_stack([np.ones_like(u), u, v, u * u, u * v, v * v][:n_terms])


def _fit_trend(
    x: np.ndarray, y: np.ndarray, values: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Coefficients of a quadratic (linear, constant with fewer points) 2-D polynomial.

    Least squares with 3-sigma clipping (MAD) of the residuals, three rounds.
    """
    n_terms = 6 if values.size >= 20 else 3 if values.size >= 8 else 1
    terms = _trend_terms(x, y, shape, n_terms)
    use = np.ones(values.size, dtype=bool)
    for _ in range(3):
        coef = np.linalg.lstsq(terms[use], values[use], rcond=None)[0]
        resid = values - terms @ coef
        sigma = mad_std(resid[use], centre=0.0) + 1e-6
        use = np.abs(resid) < 3.0 * sigma
        if use.sum() < n_terms:
            break
    return coef


@dataclass(frozen=True)
class _SizeModel:
    """The stellar locus as a function of position: local medians of its members.

    ``at(x, y)`` gives the FWHM, ellipticity and concentration of the point sources
    near ``(x, y)`` (medians over the nearest locus members), so that the reference
    follows a PSF that changes across the field, smoothly or by quadrant.
    """

    x: np.ndarray
    y: np.ndarray
    fwhm: np.ndarray
    ellipticity: np.ndarray
    concentration: np.ndarray
    snr: np.ndarray
    default: float

    def at(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FWHM, ellipticity and concentration of the locus at ``(x, y)``."""
        x, y = np.atleast_1d(x), np.atleast_1d(y)
        if self.x.size == 0:
            return np.full(x.shape, self.default), np.zeros(x.shape), np.full(x.shape, np.nan)
        k = min(_MODEL_NEIGHBOURS, self.x.size)
        _, nearest = cKDTree(np.column_stack([self.x, self.y])).query(
            np.column_stack([x, y]), k=k
        )
        nearest = nearest.reshape(x.size, k)
        return (
            np.median(self.fwhm[nearest], axis=1),
            np.median(self.ellipticity[nearest], axis=1),
            np.median(self.concentration[nearest], axis=1),
        )


def _local_locus(x: np.ndarray, y: np.ndarray,
                 log_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ln FWHM of the stellar locus among each candidate's nearest candidates, and
    where it is the band around the candidate across a jump of the PSF (see below).

    Point sources share one size and pile into a narrow band; galaxies, convolved
    with the PSF, are all larger and spread over sizes. So the locus is the band of
    the smallest sizes that holds at least a quarter as many candidates as the
    densest band (and 3): the stars' even where galaxies outnumber them.

    Where the PSF changes abruptly (a mosaic of detectors) and the stars are sparse,
    the nearest candidates reach across the border, and the sharper stars there
    would pass for the locus of the broader ones. So the bands are also weighed with
    the neighbours counted by their distance (`_neighbour_weights`): where the
    smallest band's members weigh, each on average, less than `_REMOTE_FRACTION` of
    the heaviest band's (they lie away from the candidate), and the heaviest holds at
    least `_LOCAL_FRACTION` of the nearest candidates (a dense population of one size
    around the candidate) off the smallest band, the heaviest band is the locus.

    The weight is compared per member, not in total: where galaxies are the dense
    population, their band outweighs the few stars among them by numbers alone,
    though the stars lie as near the candidate as the galaxies do.
    """
    k = min(_LOCUS_NEIGHBOURS, x.size)
    distance, nearest = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=k)
    distance, nearest = distance.reshape(x.size, k), nearest.reshape(x.size, k)
    order = np.argsort(log_size[nearest], axis=1)
    values = np.take_along_axis(log_size[nearest], order, axis=1)
    counts = _counts_within(values, _LOCUS_WIDTH)
    enough = counts >= np.maximum(np.minimum(3, k), _LOCUS_FRACTION * counts.max(axis=1))[:, None]
    first = np.argmax(enough, axis=1)
    smallest = _band_median(values, counts, first)
    weights = np.take_along_axis(_neighbour_weights(distance), order, axis=1)
    cumulative = np.concatenate([np.zeros((x.size, 1)), np.cumsum(weights, axis=1)], axis=1)
    weighted = np.take_along_axis(cumulative, np.arange(k) + counts, axis=1) - cumulative[:, :k]
    rows = np.arange(x.size)
    heaviest = np.argmax(weighted, axis=1)
    local = _band_median(values, counts, heaviest)
    # the smallest band lies away from the candidate (across a border), the heaviest
    # is a dense population of another size around it
    mean_weight = weighted / counts
    remote = mean_weight[rows, first] < _REMOTE_FRACTION * mean_weight[rows, heaviest]
    dense = counts[rows, heaviest] >= _LOCAL_FRACTION * k
    jump = remote & dense & (np.abs(local - smallest) > _LOCUS_BAND)
    return np.where(jump, local, smallest), jump


def _band_median(values: np.ndarray, counts: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The median of the band of each row of sorted ``values`` that begins at ``start``
    (a run of ``counts[start]`` values: the middle one or two)."""
    rows = np.arange(len(values))
    count = counts[rows, start]
    return 0.5 * (values[rows, start + (count - 1) // 2] + values[rows, start + count // 2])


def _neighbour_weights(distance: np.ndarray) -> np.ndarray:
    """Weights of the ``(n, k)`` nearest candidates at ``distance``: a Gaussian in the
    distance whose scale is the distance of the `_WEIGHT_NEIGHBOURS`-th (where the
    candidates are fewer, of the farthest)."""
    scale = distance[:, min(_WEIGHT_NEIGHBOURS, distance.shape[1]) - 1]
    return np.exp(-0.5 * (distance / np.maximum(scale, 1e-9)[:, None]) ** 2)


def _counts_within(values: np.ndarray, width: float) -> np.ndarray:
    """For each value of the sorted rows of ``values``, how many of its row lie in
    ``[value, value + width]`` (itself included).

    The rows' values and upper ends sorted together (stably, values first on a tie):
    the place of an upper end counts the values up to it and the upper ends before
    it, four times faster than comparing every pair.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.stars import _counts_within
    >>> _counts_within(np.array([[1.0, 1.05, 1.1, 1.3]]), 0.1).tolist()
    [[3, 2, 1, 1]]
    """
    n, k = values.shape
    upper = values + width
    order = np.argsort(np.concatenate([values, upper], axis=1), axis=1, kind="stable")
    place = np.empty_like(order)
    np.put_along_axis(place, order, np.broadcast_to(np.arange(2 * k), (n, 2 * k)), axis=1)
    return place[:, k:] - 2 * np.arange(k)


def _unmasked_cores(
    cand: _Candidates, masked: tuple[np.ndarray, np.ndarray], fwhm0: float
) -> np.ndarray:
    """Measured candidates with no masked pixel within +-1 FWHM of their centre.

    Saturated (masked) cores share one broad shape: they must not pose as the locus.
    """
    core = max(2, math.ceil(fwhm0))
    ix, iy = np.rint(cand.x).astype(int), np.rint(cand.y).astype(int)
    return cand.measured & ~_window_any(masked, ix, iy, core, core)


def _reference_shape(
    cand: _Candidates,
    usable: np.ndarray,
    crowded: np.ndarray,
    snr_min: float,
    fwhm0: float,
    shape: tuple[int, int],
) -> _SizeModel:
    """The size model from the stellar locus of the clean, isolated candidates.

    The locus is found twice: in the sizes as measured, then in the sizes less a
    smooth trend (a 2-D polynomial) fitted to the first members, so that the
    smallest stars of a neighbourhood across which the PSF grows do not pass for the
    locus.
    """
    base = (
        usable
        & (cand.snr >= _MOMENT_SNR_FRACTION * snr_min)
        & (cand.fwhm > _MIN_FWHM)
        & (cand.ellipticity < _LOCUS_MAX_ELLIPTICITY)
    )
    pool = base & ~crowded
    if not pool.any():
        pool = base if base.any() else usable & (cand.fwhm > _MIN_FWHM)
    idx = np.flatnonzero(pool)
    if idx.size == 0:
        return _SizeModel(*(np.empty(0),) * 6, fwhm0)
    x, y, log_size = cand.x[idx], cand.y[idx], np.log(cand.fwhm[idx])
    first, jump = _local_locus(x, y, log_size)
    member = np.abs(log_size - first) < _LOCUS_BAND
    coef = _fit_trend(x[member], y[member], log_size[member], shape)
    trend = _trend_terms(x, y, shape, coef.size) @ coef
    locus = _local_locus(x, y, log_size - trend)[0] + trend
    # stars are the smallest sources: where the detrended locus lies well above the
    # first one, the trend was pulled by galaxies among the first members; across a
    # jump of the PSF (a mosaic), which no smooth trend follows, the first one holds
    locus = np.where((locus - first > _LOCUS_BAND) | jump, first, locus)
    member = np.abs(log_size - locus) < _LOCUS_BAND
    if not member.any():
        member = np.ones(idx.size, dtype=bool)
    model = _locus_model(cand, idx[member], fwhm0)
    # members that stand out from the model at their own position (a bright galaxy in a
    # patch with few stars) leave it
    fwhm, _, _ = model.at(model.x, model.y)
    limit = np.clip(_EXTENDED_SNR / model.snr, _EXTENDED_MIN, _EXTENDED_MAX)
    consistent = np.abs(np.log(model.fwhm / fwhm)) < limit
    if not consistent.any():
        return model
    return _locus_model(cand, idx[member][consistent], fwhm0)


def _locus_model(cand: _Candidates, member: np.ndarray, fwhm0: float) -> _SizeModel:
    return _SizeModel(
        cand.x[member], cand.y[member], cand.fwhm[member], cand.ellipticity[member],
        cand.moments.concentration[member], cand.snr[member], fwhm0,
    )


# Stage 4: cuts
# -------------
def _reject(reason: np.ndarray, keep: np.ndarray, fail: np.ndarray, name: str) -> None:
    """Mark ``fail & keep`` as rejected for ``name`` (in place)."""
    hit = keep & fail
    reason[hit] = name
    keep &= ~fail


def _window_any(
    flagged: tuple[np.ndarray, np.ndarray], ix: np.ndarray, iy: np.ndarray, hy: int, hx: int
) -> np.ndarray:
    """Whether each window ``[iy-hy, iy+hy] x [ix-hx, ix+hx]`` holds a flagged pixel.

    ``flagged`` holds the (row, column) indices of the flagged pixels, as from
    `numpy.nonzero`; the nearest of them in the window's own (Chebyshev) metric decides.
    """
    py, px = flagged
    if py.size == 0 or ix.size == 0:
        return np.zeros(ix.size, dtype=bool)
    tree = cKDTree(np.column_stack([px / (hx + 0.5), py / (hy + 0.5)]))
    dist, _ = tree.query(np.column_stack([ix / (hx + 0.5), iy / (hy + 0.5)]), p=np.inf)
    return dist < 1.0


def _badly_masked(
    flagged: tuple[np.ndarray, np.ndarray], x: np.ndarray, y: np.ndarray, ix: np.ndarray,
    iy: np.ndarray, hy: int, hx: int, fwhm: np.ndarray,
) -> np.ndarray:
    """Whether each star's stamp has too many masked pixels, or one in its core.

    A star stays usable with a few bad pixels (cosmic rays, hot pixels, NaN) in its
    wings, at most `MASKED_MAX_FRACTION` of the ``(2 hy + 1, 2 hx + 1)`` stamp and
    none within one FWHM of its centre: `~astro_zackay.psf.estimate_psf` fills them
    from their mirror pixels through the star.
    """
    py, px = flagged
    if py.size == 0 or ix.size == 0:
        return np.zeros(ix.size, dtype=bool)
    scaled = cKDTree(np.column_stack([px / (hx + 0.5), py / (hy + 0.5)]))
    count = scaled.query_ball_point(np.column_stack([ix / (hx + 0.5), iy / (hy + 0.5)]),
                                    r=1.0 - 1e-9, p=np.inf, return_length=True)
    core, _ = cKDTree(np.column_stack([px, py])).query(np.column_stack([x, y]))
    area = (2 * hy + 1) * (2 * hx + 1)
    return (count > MASKED_MAX_FRACTION * area) | (core <= np.maximum(fwhm, 1.5))


def _crowded(cand: _Candidates, radius: np.ndarray) -> np.ndarray:
    """A detected neighbour brighter than 1 % of the source within its ``radius``."""
    crowded = np.zeros(cand.n, dtype=bool)
    if cand.n < 2 or not np.any(radius > 0):
        return crowded
    xy = np.column_stack([cand.x, cand.y])
    pairs = cKDTree(xy).query_pairs(float(np.max(radius)), output_type="ndarray")
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        dist = np.hypot(*(xy[i] - xy[j]).T)
        fi, fj = np.abs(cand.flux_det[i]), np.abs(cand.flux_det[j])
        crowded[i[(fj > _NEIGHBOUR_FRACTION * fi) & (dist < radius[i])]] = True
        crowded[j[(fi > _NEIGHBOUR_FRACTION * fj) & (dist < radius[j])]] = True
    return crowded


def _stamp_max(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The largest odd square stamp side centred on each rounded position inside the image."""
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    room = np.minimum.reduce([ix, shape[1] - 1 - ix, iy, shape[0] - 1 - iy])
    return 2 * np.maximum(room, 0) + 1


def _edge_cuts(
    cand: _Candidates, img: ImageData, fwhm_local: np.ndarray, margin: int
) -> np.ndarray:
    """Stars whose +-2 FWHM box (at least 11 px) reaches within ``margin`` of the border."""
    room = (_stamp_max(cand.x, cand.y, img.shape) - 1) // 2 - margin
    need = np.maximum(5, np.ceil(2.0 * np.nan_to_num(fwhm_local, nan=1.0))).astype(int)
    return room < need


def _cuts(
    cand: _Candidates,
    img: ImageData,
    masked: tuple[np.ndarray, np.ndarray],
    local: tuple[np.ndarray, np.ndarray, np.ndarray],
    stamp: tuple[int, int],
    radius: np.ndarray,
    snr_min: float,
    margin: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The keep flags and rejection reasons of every detection.

    ``masked`` holds the indices of the image's masked pixels (`numpy.nonzero`),
    ``local`` the size model's FWHM, ellipticity and concentration at each detection.
    """
    fwhm_local, ell_local, conc_local = local
    reason = np.full(cand.n, "", dtype=object)
    keep = np.ones(cand.n, dtype=bool)
    _reject(reason, keep, _edge_cuts(cand, img, fwhm_local, margin), "edge")
    ix, iy = np.rint(cand.x).astype(int), np.rint(cand.y).astype(int)
    k = np.flatnonzero(keep)
    hy, hx = stamp[0] // 2, stamp[1] // 2
    if img.saturation is not None:
        py, px = masked
        saturated = img.data[py, px] >= img.saturation  # saturated pixels are masked
        has_sat = np.zeros(cand.n, dtype=bool)
        has_sat[k] = _window_any((py[saturated], px[saturated]), ix[k], iy[k], hy, hx)
        _reject(reason, keep, has_sat, "saturated")
    has_mask = np.zeros(cand.n, dtype=bool)
    has_mask[k] = _badly_masked(masked, cand.x[k], cand.y[k], ix[k], iy[k], hy, hx,
                                fwhm_local[k])
    _reject(reason, keep, has_mask, "masked")
    _reject(reason, keep, ~(cand.snr >= _MOMENT_SNR_FRACTION * snr_min), "low_snr")
    _reject(reason, keep, ~cand.measured, "fit")
    _reject(reason, keep, _crowded(cand, radius), "crowded")
    # moments of undersampled stars depend on where the star falls in its pixel: the
    # tolerances widen as 1 / sigma**4 of the local PSF
    sampling = (GAUSS_FWHM / fwhm_local) ** 4
    log_size = np.log(cand.fwhm / fwhm_local)
    sharp = log_size < math.log(_SHARP_RATIO) - _SAMPLING_SIZE * sampling
    _reject(reason, keep, sharp | (cand.fwhm < _MIN_FWHM), "sharp")
    limit = np.clip(_EXTENDED_SNR / cand.snr, _EXTENDED_MIN, _EXTENDED_MAX)
    deficit = np.log(conc_local / cand.moments.concentration)
    diffuse = deficit > np.maximum(_DIFFUSE_SNR / cand.snr, _DIFFUSE_MIN)
    extended = log_size > limit + _SAMPLING_SIZE * sampling
    _reject(reason, keep, extended | diffuse, "extended")
    excess = np.maximum(_ELONGATION_EXCESS, _ELONGATION_SNR / cand.snr)
    elongated = cand.ellipticity > ell_local + excess + _SAMPLING_ELLIPTICITY * sampling
    _reject(reason, keep, elongated, "elongated")
    return keep, reason


# Stage 5: profile fits and the table
# -----------------------------------
def _fit_windows(
    data: np.ndarray,
    img: ImageData,
    x: np.ndarray,
    y: np.ndarray,
    radius: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels, weights (inverse variance inside ``radius``) and coordinates around stars."""
    ny, nx = img.shape
    h = max(3, math.ceil(float(np.max(radius))))
    oy, ox = np.mgrid[-h : h + 1, -h : h + 1]
    ox, oy = ox.ravel(), oy.ravel()
    gx = np.rint(x).astype(int)[:, None] + ox
    gy = np.rint(y).astype(int)[:, None] + oy
    inside = (gx >= 0) & (gx < nx) & (gy >= 0) & (gy < ny)
    gx, gy = np.clip(gx, 0, nx - 1), np.clip(gy, 0, ny - 1)
    var = pixels_at(img.variance, gy, gx)
    outside = ~inside | (ox**2 + oy**2 > radius[:, None] ** 2)
    bad = pixels_at(img.mask, gy, gx) | ~(var > 0) | outside
    w = np.where(bad, 0.0, 1.0 / np.where(var > 0, var, 1.0))
    return pixels_at(data, gy, gx), w, gx.astype(float), gy.astype(float)


def _fit_profiles(
    p: np.ndarray, pix: np.ndarray, w: np.ndarray, gx: np.ndarray, gy: np.ndarray
) -> np.ndarray:
    """Batched Levenberg-Marquardt fit of all 7 parameters of `moffat_model` (from ``p``)."""
    p = p.copy()
    n = p.shape[0]
    sw = np.sqrt(w)
    lam = np.full(n, 1e-2)
    model = moffat_model(p, gx, gy)
    cost = np.sum(((model - pix) * sw) ** 2, axis=1)
    active = np.ones(n, dtype=bool)
    for _ in range(_MAX_ITER):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        jac = moffat_jacobian(p[idx], gx[idx], gy[idx]) * sw[idx][:, :, None]
        res = (model[idx] - pix[idx]) * sw[idx]
        jtj = jac.transpose(0, 2, 1) @ jac  # batched BLAS: six times faster than einsum
        grad = np.einsum("npi,np->ni", jac, res)
        diag = np.einsum("nii->ni", jtj)
        # Marquardt's scaling by the diagonal itself: invariant under a rescaling of the
        # data (an absolute floor damped the amplitude of images in large units, e.g.
        # electrons x 1e6, whose diagonal entry is ~1/variance, and stopped its fit early);
        # a parameter the pixels do not constrain (diagonal 0) is damped by lam alone
        damped = jtj + (lam[idx, None] * np.where(diag > 0, diag, 1.0))[:, :, None] * np.eye(7)
        try:
            delta = -np.linalg.solve(damped, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # a singular system (e.g. all weights zero)
            delta = -np.einsum("nij,nj->ni", np.linalg.pinv(damped), grad)
        trial = p[idx] + delta
        trial[:, 6] = np.clip(trial[:, 6], _T_MIN, _T_MAX)
        trial[:, 0] = np.clip(trial[:, 0], 1e-30, None)
        trial[:, 3:5] = np.clip(trial[:, 3:5], -13.0, 11.0)  # FWHM 0.01 to 1000 px
        trial[:, 5] = np.clip(trial[:, 5], -3.0, 3.0)
        trial_model = moffat_model(trial, gx[idx], gy[idx])
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
    if active.any():
        log.debug("%d of %d profile fits stopped after %d iterations", active.sum(), n, _MAX_ITER)
    return p


def _fit_amplitudes(
    p: np.ndarray, pix: np.ndarray, w: np.ndarray, gx: np.ndarray, gy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``p`` with the weighted least-squares amplitude of `moffat_model` (a linear fit),
    and the model of amplitude 1 (the profile it scales)."""
    p = p.copy()
    p[:, 0] = 1.0
    unit = moffat_model(p, gx, gy)
    p[:, 0] = np.clip(np.sum(w * unit * pix, axis=1) / np.sum(w * unit**2, axis=1), 1e-30, None)
    return p, unit


def _position_errors(
    p: np.ndarray, pix: np.ndarray, w: np.ndarray, gx: np.ndarray, gy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Errors of x0, y0 of a profile fit, inflated by chi2/dof where it exceeds 1.

    From the covariance of amplitude and position (the shape's correlation with them
    vanishes for a symmetric profile); where the profile does not describe a star to
    its noise, the inflation makes the errors include the model mismatch.
    """
    sw = np.sqrt(w)
    jac = moffat_jacobian(p, gx, gy, n_params=3) * sw[:, :, None]
    fisher = jac.transpose(0, 2, 1) @ jac
    cov = np.full_like(fisher, np.nan)
    # conditioned as a correlation matrix: the amplitude's entries scale as 1/unit**2 and
    # the positions' do not, so the raw matrix of an image in large units (x1e6) looked
    # singular and every star lost its position error
    diag = np.einsum("nii->ni", fisher)
    scale = 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0))
    normed = fisher * scale[:, :, None] * scale[:, None, :]
    ok = np.all(diag > 0, axis=1) & (np.linalg.cond(normed) < 1e14)
    cov[ok] = np.linalg.inv(normed[ok]) * scale[ok][:, :, None] * scale[ok][:, None, :]
    chi2 = np.sum(((moffat_model(p, gx, gy) - pix) * sw) ** 2, axis=1)
    dof = np.maximum(np.count_nonzero(w, axis=1) - 7, 1)
    inflation = np.sqrt(np.maximum(chi2 / dof, 1.0))
    return np.sqrt(cov[:, 1, 1]) * inflation, np.sqrt(cov[:, 2, 2]) * inflation


def _shape_from_moments(mom: Moments, idx: np.ndarray, scale: float, t: float) -> np.ndarray:
    """Moffat parameters (amplitude 1) whose half-maximum ellipse is the moments' one, scaled.

    A Gaussian of covariance ``C`` has the half-maximum ellipse ``x C**-1 x = 2 ln 2``;
    ``scale`` (FWHM of the fitted profile over the moment FWHM, from the brightest
    stars) carries it over to the Moffat profile of index ``1/t``.
    """
    cxx, cxy, cyy = (c[idx] for c in mom.source_covariance())
    det = cxx * cyy - cxy**2
    norm = 2.0 * math.log(2.0) * scale**2
    m11, m22, m12 = cyy / det / norm, cxx / det / norm, -cxy / det / norm
    return np.column_stack([
        np.ones(idx.size), mom.x[idx], mom.y[idx], np.log(m11), np.log(m22),
        np.arctanh(np.clip(m12 / np.sqrt(m11 * m22), -0.995, 0.995)),
        np.full(idx.size, t),
    ])


@dataclass(frozen=True)
class _Fits:
    """Profile fits of the selected stars, in the order given."""

    params: np.ndarray
    x_err: np.ndarray
    y_err: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    peak: np.ndarray
    fwhm: np.ndarray
    ellipticity: np.ndarray
    theta: np.ndarray
    beta: np.ndarray
    scale: float


def _fit_stars(
    data: np.ndarray, img: ImageData, cand: _Candidates, sel: np.ndarray, fwhm_local: np.ndarray
) -> _Fits:
    """Full Moffat fits of the brightest selected stars; the rest keep their moments.

    The others' positions are their moment centroids (as accurate as a fit's, within
    10-15 %, measured), and their flux the PSF flux with the profile fixed: the
    moments' half-maximum ellipse and the fitted stars' index.
    """
    radius = np.maximum(3.0, 1.75 * fwhm_local[sel])
    pix, w, gx, gy = _fit_windows(data, img, cand.x[sel], cand.y[sel], radius)
    n_full = min(N_PROFILE_FITS, sel.size)
    full = np.arange(n_full)
    start = _shape_from_moments(cand.moments, sel[full], 1.0, 0.25)
    start[:, 0] = np.clip(cand.moments.peak[sel[full]], 1e-30, None)
    params = np.empty((sel.size, 7))
    params[full] = _fit_profiles(start, pix[full], w[full], gx[full], gy[full])
    x_err = cand.moments.x_err[sel].copy()
    y_err = cand.moments.y_err[sel].copy()
    x_err[full], y_err[full] = _position_errors(
        params[full], pix[full], w[full], gx[full], gy[full]
    )
    fwhm_fit = moffat_shape(params[full])[0]
    ok = np.isfinite(fwhm_fit) & (fwhm_fit > 0)
    scale = float(np.median(fwhm_fit[ok] / cand.fwhm[sel[full]][ok])) if ok.any() else 1.0
    t = float(np.median(params[full][ok, 6])) if ok.any() else 0.25
    rest = np.arange(n_full, sel.size)
    model = np.empty(pix.shape)
    model[full] = moffat_model(params[full], gx[full], gy[full])
    if rest.size:
        start = _shape_from_moments(cand.moments, sel[rest], scale, t)
        params[rest], unit = _fit_amplitudes(start, pix[rest], w[rest], gx[rest], gy[rest])
        model[rest] = params[rest, :1] * unit  # the same profile, not evaluated again
    fwhm, ell, theta, integral = moffat_shape(params)
    fwhm[rest] = scale * cand.fwhm[sel[rest]]  # the moments' FWHM in the profile's terms
    profile = model / (params[:, :1] * integral[:, None])
    flux_err = 1.0 / np.sqrt(np.sum(w * profile**2, axis=1))
    beta = np.full(sel.size, np.nan)
    beta[full] = 1.0 / params[full, 6]
    return _Fits(
        params=params,
        x_err=x_err,
        y_err=y_err,
        flux=np.sum(w * profile * pix, axis=1) * flux_err**2,
        flux_err=flux_err,
        peak=model.max(axis=1),
        fwhm=fwhm,
        ellipticity=ell,
        theta=theta,
        beta=beta,
        scale=scale,
    )


def _table(fits: _Fits, order: np.ndarray, fwhm_local: np.ndarray, stamp_max: np.ndarray,
           unit: u.UnitBase) -> Table:
    """The star table, rows in ``order``."""
    p = fits.params[order]
    table = Table(
        {
            "id": np.arange(order.size),
            "x": p[:, 1],
            "y": p[:, 2],
            "x_err": fits.x_err[order],
            "y_err": fits.y_err[order],
            "flux": fits.flux[order],
            "flux_err": fits.flux_err[order],
            "snr": fits.flux[order] / fits.flux_err[order],
            "fwhm": fits.fwhm[order],
            "ellipticity": fits.ellipticity[order],
            "theta": fits.theta[order],
            "beta": fits.beta[order],
            "peak": fits.peak[order],
            "stamp_max": stamp_max[order],
            "fwhm_local": fwhm_local[order],
        }
    )
    for col in ("x", "y", "x_err", "y_err", "fwhm", "stamp_max", "fwhm_local"):
        table[col].unit = u.pix
    for col in ("flux", "flux_err", "peak"):
        table[col].unit = unit
    table["theta"].unit = u.rad
    return table


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value below which half of the total weight lies."""
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _fwhm_range(model: _SizeModel, shape: tuple[int, int], scale: float) -> tuple[float, float]:
    """(min, max) of the size model on an 8x8 grid over the image, in fitted-profile FWHM."""
    gy, gx = np.mgrid[0 : shape[0] : 8j, 0 : shape[1] : 8j]
    fwhm, _, _ = model.at(gx.ravel(), gy.ravel())
    return float(scale * fwhm.min()), float(scale * fwhm.max())


def _stamp_scale(model: _SizeModel, shape: tuple[int, int]) -> float:
    """The FWHM that sizes the default stamps: the locus's, or its broad end if it varies.

    The locus's FWHM is the median weighted by S/N**2 up to S/N 200 (the sizes of faint
    stars scatter; no single bright star decides).
    """
    if model.fwhm.size == 0:
        return model.default
    low, high = _fwhm_range(model, shape, 1.0)
    median = _weighted_median(model.fwhm, np.minimum(model.snr, 200.0) ** 2)
    return high if high > 1.3 * low else median


def _summary(reason: np.ndarray) -> str:
    return ", ".join(f"{r}: {int(np.sum(reason == r))}" for r in REASONS)


def _candidates_to_fit(
    keep: np.ndarray, reason: np.ndarray, snr: np.ndarray, max_stars: int | None
) -> np.ndarray:
    """The kept detections by decreasing S/N; beyond ``2 max_stars + 5`` marked max_stars.

    A few more than ``max_stars`` are fitted: some may fall below snr_min after the fit.
    """
    sel = np.flatnonzero(keep)
    sel = sel[np.argsort(-snr[sel])]
    if max_stars is not None and sel.size > 2 * int(max_stars) + 5:
        reason[sel[2 * int(max_stars) + 5 :]] = "max_stars"
        sel = sel[: 2 * int(max_stars) + 5]
    return sel


def _accepted_rows(
    fits: _Fits, sel: np.ndarray, reason: np.ndarray, snr_min: float, max_stars: int | None
) -> np.ndarray:
    """Rows of ``fits`` that pass the fitted S/N (and ``max_stars``), by decreasing S/N.

    The others get their reason in ``reason`` (in place): fit, low_snr or max_stars.
    """
    snr = fits.flux / fits.flux_err
    good = np.isfinite(snr) & np.isfinite(fits.fwhm) & np.all(np.isfinite(fits.params), axis=1)
    reason[sel[~good]] = "fit"
    reason[sel[good & ~(snr >= snr_min)]] = "low_snr"
    rows = np.flatnonzero(good & (snr >= snr_min))
    rows = rows[np.argsort(-snr[rows])]
    if max_stars is not None and rows.size > max_stars:
        reason[sel[rows[int(max_stars) :]]] = "max_stars"
        rows = rows[: int(max_stars)]
    return rows


def _choose_stamp(
    user_stamp: tuple[int, int] | None,
    model: _SizeModel,
    shape: tuple[int, int],
    fwhm: float | None,
) -> tuple[int, int]:
    """The user's stamp shape (checked to hold +-1 FWHM) or the default one."""
    scale_fwhm = _stamp_scale(model, shape) if fwhm is None else float(fwhm)
    if user_stamp is None:
        return _default_stamp_shape(scale_fwhm)
    min_size = 2 * math.ceil(scale_fwhm) + 1
    if min(user_stamp) < min_size:
        raise ValueError(
            f"stamp_shape={user_stamp} is too small for the FWHM of {scale_fwhm:.2f} px: "
            f"it must hold at least +-1 FWHM, i.e. be at least {min_size} px on each side"
        )
    return user_stamp


def _no_star_error(n_det: int, summary: str, snr_min: float, radius: float) -> ValueError:
    return ValueError(
        f"no PSF star passed the cuts ({n_det} detected; rejected by {summary}). Try a "
        f"lower snr_min (now {snr_min}), a smaller isolation radius (now {radius:.1f} px) "
        "or edge, and check the mask and the saturation level; or give the PSF itself "
        "(reference_psf= / science_psf= to subtract, psfs= to coadd, a FWHM in pixels "
        "for a Gaussian)"
    )


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
    background-subtracted image and measured with adaptive Gaussian-weighted
    moments. Their sizes are judged against a size model of the stellar locus across
    the field (the narrow band of the smallest sizes that holds at least a quarter as many
    of each position's 40 nearest candidates as the densest band, then the median of
    the 15 nearest locus members), so a PSF that
    varies across the field keeps its stars everywhere, and galaxies, which spread to
    larger sizes, are told from stars even where they outnumber them. Where the PSF
    jumps (a mosaic of detectors) and the smallest band's members lie across the
    border, a dense band of one size around the candidate (the neighbours weighed
    by their distance) is its locus instead.

    The 20 brightest selected stars are fitted by weighted least squares (the image
    uncertainty) with an elliptical Moffat profile whose index ``beta`` is free (a
    Gaussian is the limit ``beta -> inf``), integrated over the pixels, for their
    sub-pixel centroid and its error; the others keep their moment centroids (and
    errors), with the profile's shape fixed from their moments and the fitted stars'
    index. ``flux`` is the optimal (PSF-weighted) flux with the profile, and
    ``snr = flux / flux_err``, the same definition as the ``snr`` column of
    `~astro_zackay.simulation.simulate_image`.

    Cuts, applied in this order (``meta["n_rejected_<reason>"]`` counts each
    source under the first cut it fails):

    ``edge``
        a box of +-2 local FWHM (at least 11 px) is not inside the image, ``edge``
        pixels from its border (the stamp is not required to fit: ``stamp_max``
        says how large a stamp does);
    ``saturated``, ``masked``
        a pixel at or above the saturation level (given, keyword or detected, see
        `~astro_zackay._ccd.to_image`) within the stamp (``meta["stamp_shape"]``,
        clipped to the image) / other masked pixels there: one within 1 FWHM of the
        centre, or more than 3 % of the stamp (a few bad pixels in the wings are
        filled by `~astro_zackay.psf.estimate_psf` from their mirror pixels);
    ``low_snr``
        S/N below ``snr_min`` (of the moments, generously, then of the fit);
    ``fit``
        the moments did not converge (negative flux or shape);
    ``crowded``
        a detected neighbour brighter than 1 % of the star within ``isolation``
        (resolved blends; sep's deblending flag is not used, as the isophotes of
        bright stars merge with neighbours well outside any stamp);
    ``sharp``, ``extended``
        a FWHM below 0.75 times the size model's at the star (cosmic rays and hot
        pixels), or above it by more than the noise allows: a factor
        ``exp(4.5 / snr)``, within 1.08 and 1.25, or less concentrated (the
        matched-weight flux over that of a weight twice as wide) by a factor
        ``exp(1.6 / snr)``, at least 1.03 (galaxies and unresolved blends);
    ``elongated``
        ellipticity more than 0.1 above the size model's (unresolved blends,
        cosmic-ray tracks);
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
        FWHM in pixels to start the moments and to set the default ``stamp_shape``
        and ``isolation``; default: from the detections' half-light radii to start,
        and the size model for the defaults.
    stamp_shape : int or (int, int), optional
        Shape ``(ny, nx)`` of the PSF stamps; odd. Default ``2 * ceil(3 FWHM) + 1``
        (at least 11), which holds the core and the wings to about 3 FWHM, with the
        broadest FWHM of the size model where it varies by more than 30 %. A
        user-set value is kept unchanged (it must hold at least +-1 FWHM).
    isolation : float, optional
        Radius in pixels within which no detected neighbour brighter than 1 % of the
        star may lie; default 3 times the local FWHM (the ``isolated`` definition of
        the simulation).
    max_stars : int, optional
        Keep at most this many stars, those of highest S/N.
    saturation : float or `~astropy.units.Quantity`, optional
        Saturation level in data units; default the SATURATE keyword, else the level
        found in the data (``np.inf`` disables both).
    mask : array-like of bool, optional
        Extra bad pixels (True = bad), OR-combined with the image's mask.
    edge : int, optional
        Minimum distance of a star's +-2 FWHM box from the image border, a whole
        number of pixels >= 0 (an integral float such as ``2.0`` is accepted); None
        (the default) is no margin.
    background : BackgroundResult, float or `~astropy.units.Quantity`, optional
        The sky: a `~astro_zackay.background.BackgroundResult`, or a constant level
        (0 for a sky-subtracted image, whose noise then comes from the variance).
        Default: sep's clipped background map (one pass, 64 px boxes).
    unit : str or `~astropy.units.Unit`, optional
        Unit of a plain array or of a FITS file without BUNIT.

    Returns
    -------
    `~astropy.table.Table`
        One row per selected star, sorted by decreasing S/N, with columns ``id``
        (sequential), ``x``, ``y`` (0-based pixels, ``x`` the column), ``x_err``,
        ``y_err``, ``flux``, ``flux_err`` (image unit), ``snr``, ``fwhm`` (major
        axis, pixels), ``ellipticity`` (1 - b/a), ``theta`` (major-axis angle,
        radians counter-clockwise from +x), ``beta`` (Moffat index of the fitted
        stars, large for a Gaussian; NaN for the stars fitted with a fixed shape),
        ``peak`` (brightest pixel of the fitted star, sky excluded), ``stamp_max``
        (the largest odd square stamp, centred on the star's rounded pixel, inside
        the image) and ``fwhm_local`` (the size model's FWHM at the star).
        ``meta`` holds ``fwhm`` (S/N-weighted median over the selected stars),
        ``stamp_shape``, ``isolation`` (the median radius), ``snr_min``,
        ``saturation`` (the level used, or None), ``fwhm_range`` ((min, max) of the
        size model over the image), ``n_detected``, ``n_selected``,
        ``n_rejected_<reason>`` for every reason above, and ``sources`` (a dict of
        arrays ``x``, ``y``, ``flux``: every detection, selected or rejected, with
        its isophotal flux; `~astro_zackay.psf.estimate_psf` models their wings on
        the PSF stars' stamps).

    Raises
    ------
    ValueError
        For an even ``stamp_shape`` or one smaller than +-1 FWHM, bad numbers (such
        as an ``edge`` that is not a whole number of pixels >= 0), or
        when no star passes the cuts (the message gives the counts per cut and what
        to pass instead). One to four stars are returned without a warning: the PSF
        estimation chooses what they support and says so.

    Warns
    -----
    SaturationWarning
        When the saturation level was found in the data.

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
    _check_arguments(snr_min, fwhm, isolation, max_stars, edge)
    _check_background(background)
    user_stamp = _check_stamp_shape(stamp_shape)
    img = to_image(image, unit=unit, mask=mask, saturation=saturation)
    if user_stamp is not None and (user_stamp[0] > img.shape[0] or user_stamp[1] > img.shape[1]):
        raise ValueError(
            f"stamp_shape {user_stamp} is larger than the image {img.shape}: give a stamp_shape "
            "that fits the image (a few FWHM of the stars)"
        )
    return _find_stars(img, snr_min=snr_min, fwhm=fwhm, stamp_shape=user_stamp,
                       isolation=isolation, max_stars=max_stars, edge=edge,
                       background=background)


def _find_stars(
    img: ImageData,
    *,
    snr_min: float = 20.0,
    fwhm: float | None = None,
    stamp_shape: tuple[int, int] | None = None,
    isolation: float | None = None,
    max_stars: int | None = None,
    edge: int | None = None,
    background: BackgroundResult | float | u.Quantity | None = None,
    detection: _Detection | None = None,
) -> Table:
    """`find_psf_stars` on an image already coerced (`~astro_zackay._ccd.to_image`).

    The array-level step that orchestrators call with the image they coerced once;
    the arguments are checked by the public function (``stamp_shape`` as the checked
    tuple or None). ``detection`` is the sources that the estimate of ``background``
    detected on this image (`~astro_zackay.background._estimate_from`), reused.
    """
    user_stamp = stamp_shape
    data, rms, objects = _detect(img, background, detection)
    n_det = len(objects)
    if n_det == 0:
        raise ValueError(
            "no sources detected above 3 sigma: check the image, its mask (all pixels "
            "masked?) and the background"
        )
    fwhm0, fwhm_broad = _start_fwhm(objects)
    if fwhm is not None:
        fwhm0 = float(fwhm)
    cand = _measure(data, rms, img, objects, fwhm0, fwhm_broad, snr_min)
    masked = np.nonzero(img.mask)
    model = _reference_shape(
        cand, _unmasked_cores(cand, masked, fwhm0), _crowded(cand, np.full(cand.n, 3.0 * fwhm0)),
        snr_min, fwhm0, img.shape,
    )

    stamp = _choose_stamp(user_stamp, model, img.shape, fwhm)
    local = model.at(cand.x, cand.y)
    fwhm_local = local[0]
    radius = 3.0 * fwhm_local if isolation is None else np.full(cand.n, float(isolation))
    margin = 0 if edge is None else int(edge)
    keep, reason = _cuts(cand, img, masked, local, stamp, radius, snr_min, margin)
    sel = _candidates_to_fit(keep, reason, cand.snr, max_stars)
    if sel.size == 0:
        raise _no_star_error(n_det, _summary(reason), snr_min, float(np.median(radius)))
    fits = _fit_stars(data, img, cand, sel, fwhm_local)
    rows = _accepted_rows(fits, sel, reason, snr_min, max_stars)
    if rows.size == 0:
        raise _no_star_error(n_det, _summary(reason), snr_min, float(np.median(radius)))
    stamp_max = _stamp_max(fits.params[:, 1], fits.params[:, 2], img.shape)
    table = _table(fits, rows, fits.scale * fwhm_local[sel], stamp_max, img.unit)
    table.meta.update(
        {
            "fwhm": _weighted_median(np.asarray(table["fwhm"]), np.asarray(table["snr"]) ** 2),
            "stamp_shape": stamp,
            "isolation": float(np.median(radius[sel[rows]])),
            "snr_min": float(snr_min),
            "saturation": img.saturation,
            "fwhm_range": _fwhm_range(model, img.shape, fits.scale),
            "n_detected": n_det,
            "n_selected": int(rows.size),
            "sources": {"x": cand.x, "y": cand.y, "flux": cand.flux_det},
            **{f"n_rejected_{r}": int(np.sum(reason == r)) for r in REASONS},
        }
    )
    log.info("%d PSF stars of %d detections (rejected by %s)", rows.size, n_det,
             _summary(reason))
    return table
