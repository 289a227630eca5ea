"""The noise power spectrum of an image, measured from its source-free pixels.

Resampled images (drizzled or SWarp mosaics, most coadds) have correlated pixel
noise: the noise power is not flat in frequency.  ZOGY holds for any stationary
noise if each background variance is replaced by the power spectrum normalised per
pixel, ``Sigma_h = E|eps_h|**2 / Npix`` (``sigma**2`` at every frequency for white
noise).  `measure_noise_spectrum` estimates it from the autocorrelation of the
masked, background-subtracted image within a few pixels of lag (sources and bad
pixels left out); `NoiseSpectrum.spectrum` transforms it to any FFT grid.

Arrays in, arrays out; no astropy objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .fourier import abs2, fast_shape, get_array_module, origin_to_stamp, psf_rfft

__all__ = ["CORRELATION_THRESHOLD", "NoiseSpectrum", "measure_noise_spectrum"]

_log = logging.getLogger(__name__)

#: Lag-1 correlation (largest of x and y, in absolute value) above which the noise is
#: taken as correlated by `NoiseSpectrum.is_correlated`, when it is also significant.
#: Resampled images are well above it (the JWST NIRCam i2d mosaics: 0.35-0.37; white
#: noise smoothed by ``[0.1, 1, 0.1]`` in x and y: 0.19, and white noise assumed there
#: leaves Scorr's scale 35 % high).  Below it, part of what an image's pixels share is
#: faint static sky, present in both images and cancelled in the difference: on a
#: real ground-based pair with lag-1 correlations of 0.13 (x) and 0.04 in one image and
#: 0.03 in the other, the measured spectra took the off-source std of Scorr from 0.96
#: (white) to 0.88.
CORRELATION_THRESHOLD = 0.15
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
    row patterns) is not pixel noise.

    Parameters
    ----------
    data : ndarray
        2-D background-subtracted image.
    mask : ndarray of bool, optional
        Bad pixels (True) to leave out.
    rms : ndarray, optional
        Background noise map of ``data`` (positive); the correlation is measured on
        ``data / rms`` and `NoiseSpectrum.sigma` is then the median of ``rms``
        times the measured per-pixel rms of ``data / rms``.
    max_lag : int, optional
        Largest lag kept, in pixels along each axis (default 2: resampling kernels
        correlate pixels within 1-2 px; every extra lag adds estimation noise and
        faint static sky).
    source_sigma : float, optional
        Detection threshold of the sources left out.
    grow : int, optional
        Pixels by which the sources are grown along x and y (to a square).

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
    x = np.asarray(data, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"data must be a 2-D image, got shape {x.shape}")
    max_lag = int(max_lag)
    if max_lag < 1:
        raise ValueError(f"max_lag must be >= 1, got {max_lag}")
    good = _checked_mask(mask, x.shape) & np.isfinite(x)
    scale = 1.0
    if rms is not None:
        rms = np.asarray(rms, dtype=np.float64)
        if rms.shape != x.shape:
            raise ValueError(f"rms has shape {rms.shape}, expected {x.shape} like data")
        if not np.all(rms[good] > 0):
            raise ValueError("rms must be positive wherever data is good")
        scale = float(np.median(rms[good]))
        x = np.where(good, x / np.where(good, rms, 1.0), 0.0)
    good &= ~_sources(np.where(good, x, 0.0), good, source_sigma, grow)
    n_good = int(good.sum())
    if n_good < _MIN_PIXELS:
        raise ValueError(
            f"only {n_good} source-free pixels to measure the noise from (at least "
            f"{_MIN_PIXELS} needed); check the mask or raise source_sigma"
        )
    x = np.where(good, x - x[good].mean(), 0.0)
    cov = _autocovariance(x, good.astype(np.float64), 2 * max_lag)
    c0 = float(cov[2 * max_lag, 2 * max_lag])
    short = _short_range(cov, max_lag)
    spectrum = NoiseSpectrum(short / short[max_lag, max_lag], scale * np.sqrt(c0), n_good)
    _log.debug("noise spectrum: %s", spectrum)
    return spectrum


def _checked_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Good pixels (True) from a bad-pixel ``mask`` of ``shape`` (all good without one)."""
    if mask is None:
        return np.ones(shape, bool)
    bad = np.asarray(mask, dtype=bool)
    if bad.shape != shape:
        raise ValueError(f"mask has shape {bad.shape}, expected {shape} like data")
    return ~bad


def _median_and_std(values: np.ndarray) -> tuple[float, float]:
    """Median and standard deviation (from the median absolute deviation) of ``values``.

    At most about `_ROBUST_SAMPLE` evenly strided values are used (their sampling error
    is ~0.3 %, and the medians of whole images dominated the run time).
    """
    values = values[:: max(values.size // _ROBUST_SAMPLE, 1)]
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def _sources(x: np.ndarray, good: np.ndarray, nsigma: float, grow: int) -> np.ndarray:
    """Pixels of sources (and outliers) in ``x`` (0 on bad pixels), grown to squares."""
    smooth = ndimage.gaussian_filter(x, 1.0)
    if not good.all():
        weight = ndimage.gaussian_filter(good.astype(np.float64), 1.0)
        smooth = np.divide(smooth, weight, out=np.zeros_like(smooth), where=weight > 0.5)
    level, scale = _median_and_std(smooth[good])
    hits = good & (smooth - level > nsigma * scale)
    level, scale = _median_and_std(x[good])
    hits |= good & (np.abs(x - level) > 2 * nsigma * scale)
    if grow > 0 and hits.any():  # a (2 grow + 1)-square, as two 1-D maxima (fast)
        hits = ndimage.maximum_filter1d(hits.view(np.uint8), 2 * grow + 1, axis=0)
        hits = ndimage.maximum_filter1d(hits, 2 * grow + 1, axis=1).astype(bool)
    return hits


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


def _autocovariance(x: np.ndarray, w: np.ndarray, max_lag: int) -> np.ndarray:
    """``(x ⋆ x) / (w ⋆ w)`` at lags up to ``max_lag`` as a centred stamp (zero-padded FFTs)."""
    shape = fast_shape(x.shape, max_lag)
    be = get_array_module("numpy")
    sums = be.irfft2(abs2(be.rfft2(x, s=shape)), s=shape)
    counts = be.irfft2(abs2(be.rfft2(w, s=shape)), s=shape)
    size = 2 * max_lag + 1
    sums, counts = origin_to_stamp(sums, size), origin_to_stamp(counts, size)
    return sums / np.maximum(np.round(counts), 1.0)
