"""The noise power spectrum of an image, measured from its source-free pixels.

Resampled images (drizzled or SWarp mosaics, most coadds) have correlated pixel
noise: the noise power is not flat in frequency.  ZOGY holds for any stationary
noise if each background variance is replaced by the power spectrum normalised per
pixel, ``Sigma_h = E|eps_h|**2 / Npix`` (``sigma**2`` at every frequency for white
noise).  `measure_noise_spectrum` estimates it from the autocorrelation of the
masked, background-subtracted image within a few pixels of lag (sources and bad
pixels left out); `measure_pair_noise` does so for two images of the same sky, less
the faint static sky that they share (it cancels in their difference).
`NoiseSpectrum.spectrum` transforms the result to any FFT grid.

Arrays in, arrays out; no astropy objects.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ._stats import MAP_LEVEL_SAMPLES, median_and_std, sampled_median
from ._warnings import NoiseEstimateWarning, user_stacklevel
from .fourier import (
    abs2,
    fast_shape,
    frequency_grids,
    get_array_module,
    move_whole_pixels,
    phase_ramp,
    psf_rfft,
)

__all__ = ["CORRELATION_THRESHOLD", "SAMPLE_PIXELS", "SHARED_NOISE_LIMIT", "NoiseSpectrum",
           "measure_noise_spectrum", "measure_pair_noise"]

_log = logging.getLogger(__name__)

#: Lag-1 correlation (largest of x and y, in absolute value) above which the noise is
#: taken as correlated by `NoiseSpectrum.is_correlated`, when it is also significant.
#: Resampled images are far above it (the JWST NIRCam i2d mosaics: 0.34-0.36); white
#: noise assumed at 0.05 leaves Scorr's scale ~5 % high (1.35 at 0.19).  Measured on one
#: image, faint static sky shared with the other image adds ~0.03-0.05 (a real
#: ground-based pair: 0.15 and 0.05, of which `measure_pair_noise` attributes all but
#: 0.09 and 0.00 to that sky).
CORRELATION_THRESHOLD = 0.05
#: Significance, in standard errors ``1 / sqrt(n_pixels)``, that `is_correlated` asks of it.
_SIGNIFICANCE = 5.0
#: The spectrum is floored at this fraction of its mean (the per-pixel variance): lags
#: cut at ``max_lag`` and the estimate's noise may leave it slightly negative where
#: the true power is near zero.
SPECTRUM_FLOOR = 1e-3
#: Fewest source-free pixels `measure_noise_spectrum` accepts.
_MIN_PIXELS = 1000
#: Values that the robust statistics of the source detection use, at most.
_ROBUST_SAMPLE = 100_000
#: Sigma in pixels of the Gaussian that smooths an image to find its sources, and its
#: reach in pixels (6 sigma: beyond, exp(-18) of the peak), also its FFT's zero padding.
_SMOOTH_SIGMA = 1.0
_SMOOTH_BORDER = 6
#: Pixels above which the noise is measured on a sample of boxes, not the whole image:
#: ~1e6 source-free pixels measure each correlation to ~1e-3 (``1 / sqrt(n_pixels)``),
#: 50 times below `CORRELATION_THRESHOLD`, and the noise scale that the spectrum sets to
#: ~0.1 %; more pixels cost time and memory (a 4096^2 pair's transforms) without a gain.
SAMPLE_PIXELS = 2**20
#: Side of the sampled boxes in pixels (each measured with a margin of its own pixels).
_SAMPLE_BOX = 256
#: Correlation of two images' source-free pixels above which `measure_pair_noise` takes
#: their common part for shared noise, not shared sky: faint static sky gives ~0.1 (a real
#: ground-based pair: 0.10), independent noise ~0, a coadd and one of its own frames
#: 0.5-0.9.
SHARED_NOISE_LIMIT = 0.5


@dataclass(frozen=True, repr=False)
class NoiseSpectrum:
    """Noise autocorrelation of an image and its power spectrum on any FFT grid.

    Attributes
    ----------
    correlation : ndarray
        Odd ``(2 L + 1)``-square stamp of autocorrelation coefficients, lag ``(0, 0)``
        (value 1) at its centre; ``correlation[L + dy, L + dx]`` is the correlation of
        pixels ``dx`` apart along x (axis 1) and ``dy`` along y (axis 0).
    sigma : float
        Per-pixel noise rms of the source-free pixels (image units).
    n_pixels : int
        Source-free pixels that entered the estimate.
    """

    correlation: np.ndarray
    sigma: float
    n_pixels: int

    @property
    def lag1(self) -> tuple[float, float]:
        """Correlation of neighbouring pixels ``(along x, along y)``."""
        c = self.correlation.shape[0] // 2
        return float(self.correlation[c, c + 1]), float(self.correlation[c + 1, c])

    @property
    def is_correlated(self) -> bool:
        """Whether a lag-1 correlation exceeds `CORRELATION_THRESHOLD` and 5 standard errors."""
        largest = max(abs(v) for v in self.lag1)
        return largest > max(CORRELATION_THRESHOLD, _SIGNIFICANCE / np.sqrt(self.n_pixels))

    def spectrum(self, shape: tuple[int, int], sigma: float | None = None) -> np.ndarray:
        """The noise power per pixel on the rfft half plane of a ``shape`` grid.

        Parameters
        ----------
        shape : tuple of int
            Real grid shape ``(ny, nx)``, at least the correlation stamp's size.
        sigma : float, optional
            Per-pixel rms to scale to (default `sigma`): the spectrum's mean over
            the full frequency plane is ``sigma**2``.

        Returns
        -------
        ndarray
            Real, positive array of shape ``(ny, nx // 2 + 1)``; ``sigma**2``
            everywhere for white noise.

        Examples
        --------
        >>> import numpy as np
        >>> from astro_zackay.noise import NoiseSpectrum
        >>> corr = np.zeros((3, 3)); corr[1, 1] = 1.0; corr[1, 0] = corr[1, 2] = 0.25
        >>> spec = NoiseSpectrum(corr, sigma=2.0, n_pixels=10**5).spectrum((4, 4))
        >>> spec[0].round(6).tolist()    # 4 * (1 + 0.5 cos(2 pi kx))
        [6.0, 4.0, 2.0]
        """
        scale = self.sigma if sigma is None else float(sigma)
        power = psf_rfft(self.correlation, shape).real
        np.maximum(power, SPECTRUM_FLOOR, out=power)
        power *= scale * scale
        return power

    def __repr__(self) -> str:
        rx, ry = self.lag1
        return (
            f"<NoiseSpectrum sigma={self.sigma:.5g} lag1=({rx:.3f}, {ry:.3f}) "
            f"max_lag={self.correlation.shape[0] // 2} n_pixels={self.n_pixels}>"
        )


def measure_noise_spectrum(
    data: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    rms: np.ndarray | None = None,
    max_lag: int = 2,
    source_sigma: float = 4.0,
    grow: int = 4,
    workers: int | None = None,
) -> NoiseSpectrum:
    """Measure the noise autocorrelation of a background-subtracted image from source-free pixels.

    Sources are found on the image smoothed by a Gaussian of sigma 1 px (pixels above
    ``source_sigma`` robust standard deviations of the smoothed image, and single
    pixels beyond ``2 * source_sigma`` of the image in absolute value) and left out
    with ``grow`` pixels around them, as are ``mask``-ed and non-finite pixels.  With
    the good pixels ``w`` (0/1) and the image ``x`` (divided by ``rms`` when given, so
    that a varying noise level does not weigh in) less its mean, the autocovariance
    at each lag is ``(x ⋆ x) / (w ⋆ w)``, both from zero-padded FFTs.  Lags up to
    ``max_lag`` are kept, less the median autocovariance at lags from ``max_lag`` to
    ``2 * max_lag``: structure larger than that (residual background, faint wings,
    row patterns) is not pixel noise.  An image of more than `SAMPLE_PIXELS` pixels is
    measured on a fixed random sample of 256^2 boxes that many pixels in all (each with
    a margin of its own pixels for the source detection): enough for the correlations'
    precision, at a bounded cost.

    Parameters
    ----------
    data : ndarray
        2-D background-subtracted image.
    mask : ndarray of bool, optional
        Bad pixels (True) to leave out.
    rms : ndarray, optional
        Background noise map of ``data`` (positive); the correlation is measured on
        ``data / rms`` and `NoiseSpectrum.sigma` is then the median of ``rms``
        over the whole image's good pixels (sampled or not) times the measured
        per-pixel rms of ``data / rms``.
    max_lag : int, optional
        Largest lag kept, in pixels along each axis (default 2: resampling kernels
        correlate pixels within 1-2 px; every extra lag adds estimation noise and
        faint static sky).
    source_sigma : float, optional
        Detection threshold of the sources left out.
    grow : int, optional
        Pixels by which the sources are grown along x and y (to a square).
    workers : int, optional
        FFT threads (default: all the cores the process may use).

    Returns
    -------
    NoiseSpectrum

    Raises
    ------
    ValueError
        For a non 2-D image, a mask or rms map of another shape, a non-positive rms,
        ``max_lag < 1`` or fewer than 1000 source-free pixels.

    Examples
    --------
    White noise smoothed along x by ``[0.2, 1, 0.2]`` has a lag-1 correlation of
    ``0.4 / 1.08 = 0.37`` along x and none along y:

    >>> import numpy as np
    >>> from scipy import ndimage
    >>> from astro_zackay.noise import measure_noise_spectrum
    >>> white = np.random.default_rng(1).normal(size=(256, 256))
    >>> noise = ndimage.convolve1d(white, [0.2, 1.0, 0.2], axis=1, mode="wrap")
    >>> rx, ry = measure_noise_spectrum(noise).lag1
    >>> round(rx, 2), round(ry, 2)
    (0.36, -0.0)
    """
    max_lag = _checked_lag(max_lag)
    scale = _rms_level(data, mask, rms, "data")
    (data,), (mask,), (rms,), core = _sample([data], [mask], [rms], (0, 0), max_lag, grow)
    x, good = _normalised(data, mask, rms, "data", scale)
    (smooth,) = _smoothed([x], [good], workers)
    good &= ~_grown(_sources(x, smooth, good, source_sigma), grow)
    if core is not None:
        good &= core
    n_good = _count(good)
    x = _centred(x, good)
    (cov,) = _covariances([x], good, 2 * max_lag, [(0, 0)], workers=workers)
    spectrum = _spectrum(cov, max_lag, scale, n_good)
    _log.debug("noise spectrum: %s", spectrum)
    return spectrum


def measure_pair_noise(
    new: np.ndarray,
    ref: np.ndarray,
    mask_new: np.ndarray | None = None,
    mask_ref: np.ndarray | None = None,
    *,
    rms_new: np.ndarray | None = None,
    rms_ref: np.ndarray | None = None,
    flux_ratio: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
    max_lag: int = 2,
    source_sigma: float = 4.0,
    grow: int = 4,
    workers: int | None = None,
) -> tuple[NoiseSpectrum, NoiseSpectrum]:
    """The pixel noise of two images of the same sky, less the sky they share.

    Faint static sources and sky structure below the detection limit are present in
    both images: they correlate each image's pixels like noise does, but cancel in
    their difference.  Their covariance is what the images share, the cross-covariance
    of ``new`` and ``ref`` (noise is independent between them); it is taken off each
    image's autocovariance (``flux_ratio * rms_ref / rms_new`` times it from ``new``'s,
    its inverse from ``ref``'s) before the steps of `measure_noise_spectrum`, on the
    pixels that are source-free in both.  ``sigma`` of each result is then the rms of
    its pixel noise alone.  Images of more than `SAMPLE_PIXELS` pixels are measured on a
    sample of boxes, as in `measure_noise_spectrum`, the reference's cut at the shift.

    Parameters
    ----------
    new, ref : ndarray
        Background-subtracted images of the same shape.
    mask_new, mask_ref : ndarray of bool, optional
        Bad pixels of each image.
    rms_new, rms_ref : ndarray, optional
        Background noise maps (see `measure_noise_spectrum`).
    flux_ratio : float, optional
        ``new``'s flux over ``ref``'s for the same source.
    shift : tuple of float, optional
        ``(dx, dy)`` position of ``new``'s content relative to ``ref``'s; ``ref`` is
        moved by the rounded shift to compare the same sky.
    max_lag, source_sigma, grow, workers
        As in `measure_noise_spectrum`.

    Returns
    -------
    tuple of NoiseSpectrum
        ``(new's, ref's)``.

    Raises
    ------
    ValueError
        As `measure_noise_spectrum`, and for images of different shapes or a
        non-positive flux ratio.

    Examples
    --------
    Two images of the same faint, smooth sky with white noise: each image's pixels
    share the sky, their noise does not.

    >>> import numpy as np
    >>> from scipy import ndimage
    >>> from astro_zackay.noise import measure_noise_spectrum, measure_pair_noise
    >>> rng = np.random.default_rng(2)
    >>> sky = ndimage.gaussian_filter(rng.normal(size=(256, 256)), 1.0)
    >>> new, ref = sky + rng.normal(size=sky.shape), sky + rng.normal(size=sky.shape)
    >>> round(measure_noise_spectrum(new).lag1[0], 2)
    0.06
    >>> [round(s.lag1[1], 2) for s in measure_pair_noise(new, ref)]
    [0.0, 0.0]
    """
    max_lag = _checked_lag(max_lag)
    if np.shape(new) != np.shape(ref):
        raise ValueError(f"new {np.shape(new)} and ref {np.shape(ref)} differ in shape")
    if not (np.isfinite(flux_ratio) and flux_ratio > 0):
        raise ValueError(f"flux_ratio must be positive, got {flux_ratio}")
    move = (int(np.rint(shift[1])), int(np.rint(shift[0])))
    scale_n, scale_r = _rms_level(new, mask_new, rms_new, "new"), _rms_level(ref, mask_ref,
                                                                           rms_ref, "ref")
    (new, ref), (mask_new, mask_ref), (rms_new, rms_ref), core = _sample(
        [new, ref], [mask_new, mask_ref], [rms_new, rms_ref], move, max_lag, grow)
    if core is not None:  # the reference's boxes were cut at the move: no move is left
        move = (0, 0)
    xn, good_n = _normalised(new, mask_new, rms_new, "new", scale_n)
    xr, good_r = _normalised(ref, mask_ref, rms_ref, "ref", scale_r)
    smooth_n, smooth_r = _smoothed([xn, xr], [good_n, good_r], workers)
    # one growth of both images' sources, on new's grid (a growth commutes with the move)
    sources = (_sources(xn, smooth_n, good_n, source_sigma)
               | move_whole_pixels(_sources(xr, smooth_r, good_r, source_sigma), *move[::-1]))
    good = good_n & move_whole_pixels(good_r, move[1], move[0]) & ~_grown(sources, grow)
    if core is not None:
        good &= core
    n_good = _count(good)
    good_in_ref = move_whole_pixels(good, -move[1], -move[0])
    xn, xr = _centred(xn, good), _centred(xr, good_in_ref)
    # the shared part comes out symmetrised: static sky is symmetric; noise is not shared
    cov_n, cov_r, shared = _covariances([xn, xr], good, 2 * max_lag,
                                        [(0, 0), (1, 1), (0, 1)], move, workers)
    shared = _sky_part(cov_n, cov_r, shared)
    k = flux_ratio * scale_r / scale_n
    spectra = (_spectrum(cov_n - k * shared, max_lag, scale_n, n_good),
               _spectrum(cov_r - shared / k, max_lag, scale_r, n_good))
    _log.debug("pair noise spectra (new, ref): %s", spectra)
    return spectra


def _sky_part(cov_n: np.ndarray, cov_r: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """``shared``, the two images' common covariance, if it can be faint static sky; else 0.

    Static sky below the detection limit is a small part of each image's pixel
    variance.  When the two images' source-free pixels correlate by more than
    `SHARED_NOISE_LIMIT`, they share noise (one is a coadd that includes the other, or
    both were resampled from the same exposures): ZOGY's premise of independent noise
    fails, and taking the common part off would leave a negative variance.  Each
    image's noise is then measured alone, with a `NoiseEstimateWarning`.
    """
    centre = tuple(n // 2 for n in shared.shape)
    correlation = shared[centre] / np.sqrt(cov_n[centre] * cov_r[centre])
    _log.debug("the images' source-free pixels correlate by %.3f", correlation)
    if correlation <= SHARED_NOISE_LIMIT:
        return shared
    warnings.warn(
        f"the reference and new images share noise: their source-free pixels correlate "
        f"by {correlation:.2f} (faint static sky gives ~0.1); is one of them a coadd that "
        "includes the other? ZOGY assumes independent noise, so Scorr is not calibrated; "
        "each image's noise is measured alone. Subtract against a reference built without "
        "the new image", NoiseEstimateWarning, stacklevel=user_stacklevel())
    return np.zeros_like(shared)


@dataclass(frozen=True)
class _Boxes:
    """A sample of boxes of an image laid side by side in a mosaic (see `_sample`).

    ``starts`` are the windows' first pixels (row, column) in the image, ``places``
    theirs in the mosaic; ``windows`` marks the windows in the mosaic, ``core`` the
    boxes without their margins.
    """

    starts: list[tuple[int, int]]
    places: list[tuple[int, int]]
    window: int
    windows: np.ndarray
    core: np.ndarray

    def cut(self, array: np.ndarray | None, move: tuple[int, int], fill: Any) -> Any:
        """``array``'s windows, taken ``move`` (dy, dx) back, ``fill`` in the gaps.

        No mask (``fill`` True) gives the gaps as bad pixels; no rms map stays None.
        """
        if array is None:
            return ~self.windows if fill is True else None
        array = np.asarray(array)
        dtype = bool if fill is True else np.result_type(array, np.float32)
        out = np.full(self.windows.shape, fill, dtype=dtype)
        w = self.window
        for (y0, x0), (py, px) in zip(self.starts, self.places):
            ys, xs = y0 - move[0], x0 - move[1]
            out[py : py + w, px : px + w] = array[ys : ys + w, xs : xs + w]
        return out


def _usable_windows(
    bads: list[np.ndarray], move: tuple[int, int], grid: tuple[int, int], window: int
) -> np.ndarray:
    """Indices of the grid's windows at least half good in every image (`_boxes`).

    ``bads`` are each image's bad pixels; every image after the first is looked at
    where it meets the first moved by ``move``.
    """
    worst = np.zeros(grid, dtype=np.int64)
    y0, x0 = max(move[0], 0), max(move[1], 0)
    for i, bad in enumerate(bads):
        oy, ox = (y0, x0) if i == 0 else (y0 - move[0], x0 - move[1])
        part = bad[oy : oy + grid[0] * window, ox : ox + grid[1] * window]
        counts = part.reshape(grid[0], window, grid[1], window).sum(axis=(1, 3))
        np.maximum(worst, counts, out=worst)
    return np.flatnonzero(worst <= window * window // 2)


def _boxes(
    bads: list[np.ndarray], move: tuple[int, int], max_lag: int, grow: int
) -> _Boxes | None:
    """The `_Boxes` of `_sample` on images with bad pixels ``bads``; None to measure whole.

    ``SAMPLE_PIXELS / _SAMPLE_BOX**2`` boxes are drawn without replacement (a fixed
    seed: the same boxes each call) from a grid of non-overlapping windows, each a box
    with a margin as wide as the smoothing and the growth reach, within the part of the
    image that meets the other image moved by ``move``, among the windows at least half
    good in every image (mosaics with large blank areas); too few such windows, and
    the images are measured whole.  In the mosaic, masked gaps wider than ``2 max_lag``
    keep the boxes' lags apart.
    """
    shape = bads[0].shape
    n_boxes = -(-SAMPLE_PIXELS // _SAMPLE_BOX**2)
    margin = _SMOOTH_BORDER + max(int(grow), 0)
    window = _SAMPLE_BOX + 2 * margin
    grid = ((shape[0] - abs(move[0])) // window, (shape[1] - abs(move[1])) // window)
    if min(grid) < 1:
        return None
    usable = _usable_windows(bads, move, grid, window)
    if usable.size <= n_boxes:
        return None
    cells = np.sort(np.random.default_rng(0).choice(usable, n_boxes, replace=False))
    starts = [(max(move[0], 0) + int(c // grid[1]) * window,
               max(move[1], 0) + int(c % grid[1]) * window) for c in cells]
    step = window + 2 * max_lag + 1
    columns = int(np.ceil(np.sqrt(n_boxes)))
    places = [((i // columns) * step, (i % columns) * step) for i in range(n_boxes)]
    windows = np.zeros((-(-n_boxes // columns) * step, columns * step), bool)
    core = np.zeros_like(windows)
    for py, px in places:
        windows[py : py + window, px : px + window] = True
        core[py + margin : py + window - margin, px + margin : px + window - margin] = True
    return _Boxes(starts, places, window, windows, core)


def _sample(
    images: list[np.ndarray],
    masks: list[np.ndarray | None],
    rms_maps: list[np.ndarray | None],
    move: tuple[int, int],
    max_lag: int,
    grow: int,
) -> tuple[list, list, list, np.ndarray | None]:
    """The images, masks and rms maps cut to a random sample of boxes, and the boxes' cores.

    Images of at most `SAMPLE_PIXELS` pixels come back as they are (core None), as do
    arrays of mismatched shapes (for `_rms_level` to reject).  Larger ones are cut to
    the boxes of `_boxes`, each with a margin of its own pixels so that the sources by
    its edges are found as on the whole image, laid side by side in a mosaic (gaps
    masked, data 0, rms 1); ``core`` marks the boxes without their margins, the only
    pixels measured.  Every image after the first is cut where it meets the first when
    moved by ``move`` (``(dy, dx)``): the mosaics are aligned.
    """
    shape = np.shape(images[0])
    given = [a for a in (*images, *masks, *rms_maps) if a is not None]
    if (len(shape) != 2 or np.prod(shape) <= SAMPLE_PIXELS
            or any(np.shape(a) != shape for a in given)):
        return images, masks, rms_maps, None
    bads = [~np.isfinite(a) if m is None else ~np.isfinite(a) | np.asarray(m, dtype=bool)
            for a, m in zip(images, masks)]
    boxes = _boxes(bads, move, max_lag, grow)
    del bads
    if boxes is None:
        return images, masks, rms_maps, None
    moves = [(0, 0)] + [move] * (len(images) - 1)
    return ([boxes.cut(a, m, 0.0) for a, m in zip(images, moves)],
            [boxes.cut(a, m, True) for a, m in zip(masks, moves)],
            [boxes.cut(a, m, 1.0) for a, m in zip(rms_maps, moves)], boxes.core)


def _checked_lag(max_lag: int) -> int:
    max_lag = int(max_lag)
    if max_lag < 1:
        raise ValueError(f"max_lag must be >= 1, got {max_lag}")
    return max_lag


def _rms_level(
    data: np.ndarray, mask: np.ndarray | None, rms: np.ndarray | None, name: str
) -> float:
    """The median ``rms`` over ``data``'s good pixels, inputs checked.

    Of the whole image, read as zogy reads its level (`~astro_zackay._stats.sampled_median`
    of ``MAP_LEVEL_SAMPLES`` good pixels) and before any sampling of boxes (`_sample`):
    the boxes' own median rms may be far from it, yet ``sigma`` is compared with the
    whole image's rms level (each zogy tile's rms is scaled by their ratio).

    Without an rms map, the power of 2 nearest the median ``|data|`` of those pixels
    (1 when it is 0): the data are measured in that unit (`_normalised`), whose float32
    squares neither overflow (data of 1e19 gave NaN correlations) nor underflow.
    """
    shape = np.shape(data)
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D image, got shape {shape}")
    if mask is not None and np.shape(mask) != shape:
        raise ValueError(f"mask has shape {np.shape(mask)}, expected {shape} like data")
    if rms is not None and np.shape(rms) != shape:
        raise ValueError(f"rms has shape {np.shape(rms)}, expected {shape} like {name}")
    good = _checked_mask(mask, shape) & np.isfinite(data)
    if rms is not None:
        return sampled_median(rms, good, MAP_LEVEL_SAMPLES)
    level = abs(sampled_median(np.abs(data), good, MAP_LEVEL_SAMPLES)) if good.any() else 0.0
    return float(2.0 ** np.round(np.log2(level))) if 0 < level < np.inf else 1.0


def _normalised(
    data: np.ndarray, mask: np.ndarray | None, rms: np.ndarray | None, name: str,
    level: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``data / rms`` (without ``rms``: ``data / level``, `_rms_level`) in float32, 0 on bad
    pixels, and its good pixels (shapes checked).

    float32 holds the correlations to ~1e-6, far below their statistical error
    (``1 / sqrt(n_pixels)``).
    """
    data = np.asarray(data)
    good = _checked_mask(mask, data.shape) & np.isfinite(data)
    if rms is None:
        with np.errstate(invalid="ignore", over="ignore"):
            x = np.divide(data, level, dtype=np.float32)
    else:
        rms = np.asarray(rms)
        if np.any(good & ~(rms > 0)):
            raise ValueError(f"rms must be positive wherever {name} is good")
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            x = np.divide(data, rms, dtype=np.float32)
    np.copyto(x, np.float32(0.0), where=~good)
    return x, good


def _centred(x: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``x`` less its mean over ``good``, and 0 elsewhere."""
    mean = np.sum(x, where=good, dtype=np.float64) / np.count_nonzero(good)
    return np.where(good, x - np.float32(mean), np.float32(0.0))


def _count(good: np.ndarray) -> int:
    """The number of good pixels, at least `_MIN_PIXELS` (else a ValueError)."""
    n_good = int(good.sum())
    if n_good < _MIN_PIXELS:
        raise ValueError(
            f"only {n_good} source-free pixels to measure the noise from (at least "
            f"{_MIN_PIXELS} needed); check the mask or raise source_sigma"
        )
    return n_good


def _spectrum(cov: np.ndarray, max_lag: int, scale: float, n_good: int) -> NoiseSpectrum:
    """The NoiseSpectrum of a ``2 max_lag`` autocovariance stamp of ``x / rms``."""
    short = _short_range(cov, max_lag)
    variance = float(cov[2 * max_lag, 2 * max_lag])
    return NoiseSpectrum(short / short[max_lag, max_lag], scale * np.sqrt(variance), n_good)


def _checked_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Good pixels (True) from a bad-pixel ``mask`` of ``shape`` (all good without one)."""
    if mask is None:
        return np.ones(shape, bool)
    bad = np.asarray(mask, dtype=bool)
    if bad.shape != shape:
        raise ValueError(f"mask has shape {bad.shape}, expected {shape} like data")
    return ~bad


def _smoothed(
    images: list[np.ndarray], goods: list[np.ndarray], workers: int | None = None
) -> list[np.ndarray]:
    """Each image (0 on bad pixels) smoothed by a Gaussian of sigma 1 px over its good pixels.

    The smoothed image over the smoothed good-pixel weight (`_smoothed_weight`), 0
    where that weight is below 0.5 (in and beside large masked areas). The images
    are smoothed in one batched float32 FFT, zero-padded by the kernel's reach, by
    the exact transfer function of the sampled kernel (`_smoothing_kernel`, as a
    direct convolution would apply it).
    """
    shape = images[0].shape
    grid = fast_shape(shape, _SMOOTH_BORDER)
    be = get_array_module("numpy")
    spectra = be.rfft2(np.stack(images).astype(np.float32, copy=False), s=grid, workers=workers)
    kernel = _smoothing_kernel()
    for k in frequency_grids(grid):  # the kernel's transfer along y, then x
        lags = np.arange(1, kernel.size // 2 + 1)
        transfer = kernel[kernel.size // 2] + 2.0 * np.sum(
            kernel[kernel.size // 2 + 1 :] * np.cos(2.0 * np.pi * k[..., None] * lags), axis=-1)
        spectra *= transfer.astype(np.float32)
    values = be.irfft2(spectra, s=grid, workers=workers)[:, : shape[0], : shape[1]]
    out = []
    for value, good in zip(values, goods):
        weight = _smoothed_weight(good)
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(np.where(weight > 0.5, value / weight, np.float32(0.0)))
    return out


def _smoothing_kernel() -> np.ndarray:
    """The 1-D Gaussian of `_SMOOTH_SIGMA`, sampled out to `_SMOOTH_BORDER` px, unit sum."""
    offsets = np.arange(-_SMOOTH_BORDER, _SMOOTH_BORDER + 1)
    kernel = np.exp(-0.5 * (offsets / _SMOOTH_SIGMA) ** 2)
    return kernel / kernel.sum()


def _smoothed_weight(good: np.ndarray) -> np.ndarray:
    """The good pixels (1, and 0 beyond the image) smoothed by the Gaussian of `_smoothed`.

    That of the whole image (the product of its two 1-D profiles, below 1 within a
    few pixels of the border) less that of the bad pixels, which are smoothed
    directly: along x only in the rows that hold one, along y only in the columns
    within the kernel's reach of one (a few hundred saturated or flagged pixels
    cost a small part of a transform of the image).
    """
    kernel = _smoothing_kernel()
    radius = kernel.size // 2
    edges = [ndimage.correlate1d(np.ones(n), kernel, mode="constant") for n in good.shape]
    weight = np.outer(edges[0], edges[1]).astype(np.float32)
    bad = ~good
    rows = np.flatnonzero(bad.any(axis=1))
    if rows.size == 0:
        return weight
    reach = ndimage.maximum_filter1d(bad.any(axis=0).view(np.uint8), 2 * radius + 1)
    cols = np.flatnonzero(reach)
    along_x = ndimage.correlate1d(bad[rows].astype(np.float32), kernel, axis=1, mode="constant")
    bad_x = np.zeros((good.shape[0], cols.size), dtype=np.float32)
    bad_x[rows] = along_x[:, cols]
    weight[:, cols] -= ndimage.correlate1d(bad_x, kernel, axis=0, mode="constant")
    return weight


def _sources(x: np.ndarray, smooth: np.ndarray, good: np.ndarray, nsigma: float) -> np.ndarray:
    """Pixels of sources (``smooth``, `_smoothed` ``x``) and outliers (``x``) among ``good``."""
    level, scale = median_and_std(smooth, good, _ROBUST_SAMPLE)
    hits = good & (smooth - level > nsigma * scale)
    level, scale = median_and_std(x, good, _ROBUST_SAMPLE)
    hits |= good & (np.abs(x - level) > 2 * nsigma * scale)
    return hits


def _grown(hits: np.ndarray, grow: int) -> np.ndarray:
    """``hits`` grown by ``grow`` pixels along x and y, to squares (two 1-D maxima: fast)."""
    if grow <= 0 or not hits.any():
        return hits
    grown = ndimage.maximum_filter1d(hits.view(np.uint8), 2 * grow + 1, axis=0)
    return ndimage.maximum_filter1d(grown, 2 * grow + 1, axis=1).astype(bool)


def _short_range(cov: np.ndarray, max_lag: int) -> np.ndarray:
    """The lags up to ``max_lag`` of a ``2 max_lag`` autocovariance stamp, less its far plateau.

    Structure larger than the stamp (residual background, faint sources' wings, row
    patterns) puts a near-constant plateau under every lag: its median on the ring
    from ``max_lag`` to ``2 max_lag`` is taken off, so that only the short-range
    correlation of the pixel noise (as resampling makes it) remains.
    """
    n = 2 * max_lag
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    r = np.hypot(yy, xx)
    plateau = float(np.median(cov[(r > max_lag) & (r <= n)]))
    return cov[max_lag : 3 * max_lag + 1, max_lag : 3 * max_lag + 1] - plateau


def _covariances(
    images: list[np.ndarray],
    good: np.ndarray,
    max_lag: int,
    pairs: list[tuple[int, int]],
    move: tuple[int, int] = (0, 0),
    workers: int | None = None,
) -> list[np.ndarray]:
    """``(x_i ⋆ x_j) / (w ⋆ w)`` for each pair ``(i, j)`` at lags up to ``max_lag`` (stamps).

    ``good`` marks the pixels ``w`` (1) in the first image's frame; images after the
    first are in a frame moved by ``-move`` and are compared at that offset.  The
    forward transforms are zero-padded float32 FFTs in one batched call; only the
    stamps' lags are transformed back (`_even_lags`), so a cross-covariance comes
    out symmetrised, ``(c(l) + c(-l)) / 2``.
    """
    shape = fast_shape(good.shape, max_lag + max(abs(v) for v in move))
    stack = np.empty((len(images) + 1, *good.shape), dtype=np.float32)
    stack[:-1] = images
    stack[-1] = good
    be = get_array_module("numpy")
    spectra = be.rfft2(stack, s=shape, workers=workers)
    del stack
    if len(images) > 1 and move != (0, 0):
        spectra[1:-1] *= phase_ramp(shape, move[1], move[0], dtype=spectra.dtype)
    products = [abs2(spectra[-1])]
    products += [abs2(spectra[i]) if i == j else (spectra[i] * np.conj(spectra[j])).real
                 for i, j in pairs]
    lags = _even_lags(products, shape, max_lag)
    counts = np.maximum(np.round(lags[0]), 1.0)
    return [c / counts for c in lags[1:]]


def _even_lags(spectra: list[np.ndarray], shape: tuple[int, int], max_lag: int) -> list:
    """The even part of the inverse rfft2 of real half-plane spectra, at lags up to ``max_lag``.

    ``c(dy, dx) = sum_k w(kx) R(k) cos(2 pi (ky dy + kx dx)) / (ny nx)`` (``w`` 2 but
    on the ``kx = 0`` and Nyquist columns) as two products of small matrices with
    each spectrum ``R``: for a few lags, far less work than inverse FFTs of the grid.
    Returned as ``(2 max_lag + 1)``-square stamps, lag ``(0, 0)`` at the centre.
    """
    ky, kx = frequency_grids(shape)
    lags = np.arange(-max_lag, max_lag + 1)
    along_y = 2.0 * np.pi * lags[:, None] * ky[:, 0][None, :]
    along_x = 2.0 * np.pi * lags[:, None] * kx[0][None, :]
    weight = np.full(kx.shape[1], 2.0)
    weight[0] = 1.0
    if shape[1] % 2 == 0:
        weight[-1] = 1.0
    cos_y, sin_y = np.cos(along_y), np.sin(along_y)
    cos_x, sin_x = (weight * np.cos(along_x)).T, (weight * np.sin(along_x)).T
    norm = 1.0 / (shape[0] * shape[1])
    out = []
    for spectrum in spectra:
        r = np.asarray(spectrum, dtype=np.float64)
        out.append(norm * ((cos_y @ r) @ cos_x - (sin_y @ r) @ sin_x))
    return out
