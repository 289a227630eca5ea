"""Star stamps: cutting, local background, sub-pixel recentring, offsets and moments.

Arrays in, arrays out, vectorised over stars (stacks of shape ``(n_star, ny, nx)``).
The convention used throughout `astro_zackay.psf`: a star at ``(x, y)`` (x column,
y row, 0-based pixel centres) is cut around the pixel ``(round(y), round(x))``, so
it sits at ``(dx, dy) = (x - round(x), y - round(y))`` from the stamp's central pixel.
Recentring moves it onto the central pixel with a Fourier (sinc) shift (the phase ramp of
`astro_zackay.fourier.phase_ramp`, applied to the whole stack at once), which is exact
for band-limited images and keeps white noise white.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from astropy.stats import sigma_clip

from ..fourier import shift_stack

__all__ = [
    "StampSet",
    "clean_neighbours",
    "cut_stamps",
    "fit_offsets",
    "recentre",
    "stamp_moments",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StampSet:
    """Background-subtracted star stamps on the image's own pixel grid.

    Attributes
    ----------
    data : `~numpy.ndarray`
        ``(n, ny, nx)`` stamps minus the local background (not recentred).
    variance : `~numpy.ndarray`
        ``(n, ny, nx)`` per-pixel variance of ``data``.
    dx, dy : `~numpy.ndarray`
        Sub-pixel offsets of each star from the stamp's central pixel.
    background : `~numpy.ndarray`
        The local background subtracted from each stamp.
    flux : `~numpy.ndarray`
        The sum of each background-subtracted stamp.
    valid : `~numpy.ndarray`
        False for stars whose stamp leaves the image, touches a masked pixel or has
        non-positive flux; such rows hold zeros.
    """

    data: np.ndarray
    variance: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    background: np.ndarray
    flux: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.flux)

    def select(self, index: np.ndarray) -> StampSet:
        """Return the stamps of the stars picked by ``index`` (boolean or integer)."""
        return StampSet(*(getattr(self, name)[index] for name in self.__dataclass_fields__))


def cut_stamps(
    data: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, int],
    *,
    annulus: int = 4,
) -> StampSet:
    """Cut background-subtracted stamps of the stars at ``(x, y)``.

    The background of each star is the 3-sigma clipped mean of the ring of width
    ``annulus`` pixels just outside its stamp (masked pixels excluded; the mean, not
    the median, because the median of Poisson sky is biased low by ~1/6 count).

    Parameters
    ----------
    data, variance : `~numpy.ndarray`
        The image and its variance, 2-D float arrays.
    mask : `~numpy.ndarray`
        Boolean bad-pixel mask of the image.
    x, y : `~numpy.ndarray`
        Star positions (x column, y row, 0-based).
    shape : tuple of int
        Odd stamp shape ``(ny, nx)``.
    annulus : int, optional
        Width in pixels of the background ring around the stamp.

    Returns
    -------
    StampSet

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import cut_stamps
    >>> img = np.full((40, 40), 10.0); img[20, 21] += 100.0
    >>> s = cut_stamps(img, np.ones_like(img), np.zeros(img.shape, bool),
    ...                np.array([21.2]), np.array([20.0]), (7, 7))
    >>> float(s.flux[0]), float(s.dx[0]), bool(s.valid[0])
    (100.0, 0.2, True)
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ny, nx = shape
    hy, hx = ny // 2 + annulus, nx // 2 + annulus
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    inside = (
        np.isfinite(x)
        & np.isfinite(y)
        & (ix - hx >= 0)
        & (iy - hy >= 0)
        & (ix + hx < data.shape[1])
        & (iy + hy < data.shape[0])
    )
    ixs, iys = np.where(inside, ix, hx), np.where(inside, iy, hy)
    rows = iys[:, None, None] + np.arange(-hy, hy + 1)[None, :, None]
    cols = ixs[:, None, None] + np.arange(-hx, hx + 1)[None, None, :]
    big, big_var, big_mask = data[rows, cols], variance[rows, cols], mask[rows, cols]

    inner = (slice(None), slice(annulus, annulus + ny), slice(annulus, annulus + nx))
    ring = np.ones(big.shape[1:], dtype=bool)
    ring[inner[1:]] = False
    ring_values = np.ma.masked_array(big[:, ring], mask=big_mask[:, ring])
    clipped = sigma_clip(ring_values, sigma=3.0, maxiters=5, axis=1, masked=True)
    background = np.ma.mean(clipped, axis=1).filled(np.nan)

    stamps = big[inner] - background[:, None, None]
    flux = stamps.sum(axis=(1, 2))
    valid = (
        inside
        & ~big_mask[inner].any(axis=(1, 2))
        & np.isfinite(background)
        & np.isfinite(flux)
        & (flux > 0)
    )
    zero = ~valid
    stamps[zero] = 0.0
    stamp_var = big_var[inner].copy()
    stamp_var[zero] = 1.0
    log.debug("cut %d stamps of shape %s: %d valid", len(x), shape, int(valid.sum()))
    return StampSet(
        data=stamps,
        variance=stamp_var,
        dx=np.where(inside, x - ix, 0.0),
        dy=np.where(inside, y - iy, 0.0),
        background=np.where(valid, background, 0.0),
        flux=np.where(valid, flux, 0.0),
        valid=valid,
    )


def recentre(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Move each star from ``(dx, dy)`` onto the stamp's central pixel (Fourier shift).

    Parameters
    ----------
    stamps : `~numpy.ndarray`
        ``(n, ny, nx)`` stamps.
    dx, dy : `~numpy.ndarray`
        ``(n,)`` offsets of the stars from the central pixel.

    Returns
    -------
    `~numpy.ndarray`
        The recentred stamps, a new array.
    """
    return shift_stack(stamps, -np.asarray(dx), -np.asarray(dy))


def _weighted_lstsq(design: np.ndarray, data: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per-star weighted linear least squares; design ``(n, p, m)``, data ``(n, p)``."""
    wd_t = (design * weight[:, :, None]).transpose(0, 2, 1)
    return np.linalg.solve(wd_t @ design, wd_t @ data[:, :, None])[:, :, 0]


def fit_offsets(
    stamps: StampSet,
    psf: np.ndarray,
    *,
    iterations: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit the flux and sub-pixel position of each star with a centred PSF stamp.

    Gauss-Newton on ``data = flux * shift(psf, dx, dy)`` weighted by the inverse
    variance (steps capped at 0.5 pixel); the PSF is shifted to the current position
    with a Fourier shift and differentiated by central differences.

    Parameters
    ----------
    stamps : StampSet
        The stars (``stamps.dx``, ``stamps.dy`` are the starting offsets).
    psf : `~numpy.ndarray`
        ``(n, ny, nx)`` (one per star) or ``(ny, nx)`` unit-sum PSF centred on the
        central pixel.
    iterations : int, optional
        Number of Gauss-Newton steps.

    Returns
    -------
    dx, dy : `~numpy.ndarray`
        The fitted offsets.
    flux : `~numpy.ndarray`
        The fitted fluxes.
    chi2 : `~numpy.ndarray`
        The chi-square of each star at the fit (``ny * nx - 3`` degrees of freedom).
    """
    psf = np.broadcast_to(psf, stamps.data.shape)
    dx, dy = stamps.dx.astype(float), stamps.dy.astype(float)
    n, ny, nx = stamps.data.shape
    data = stamps.data.reshape(n, -1)
    weight = 1.0 / stamps.variance.reshape(n, -1)
    for _ in range(iterations):
        model = shift_stack(psf, dx, dy)
        gy, gx = np.gradient(model, axis=(1, 2))
        design = np.stack([model.reshape(n, -1), gx.reshape(n, -1), gy.reshape(n, -1)], axis=2)
        coef = _weighted_lstsq(design, data, weight)
        flux = np.where(coef[:, 0] > 0, coef[:, 0], np.nan)
        # data ~ f*m(x - dx) => d/d(dx) = -f dm/dx
        dx = dx + np.clip(np.nan_to_num(-coef[:, 1] / flux), -0.5, 0.5)
        dy = dy + np.clip(np.nan_to_num(-coef[:, 2] / flux), -0.5, 0.5)
    model = shift_stack(psf, dx, dy).reshape(n, -1)
    flux = np.sum(model * data * weight, axis=1) / np.sum(model**2 * weight, axis=1)
    chi2 = np.sum((data - flux[:, None] * model) ** 2 * weight, axis=1)
    return dx, dy, flux, chi2


def stamp_moments(
    stamps: np.ndarray, window: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Size and ellipticity of stamps from their second moments.

    Parameters
    ----------
    stamps : `~numpy.ndarray`
        ``(ny, nx)`` or ``(n, ny, nx)`` images.
    window : float, optional
        If given, the stamps are first multiplied by a round Gaussian of this sigma
        (pixels) centred on the central pixel, which keeps the moments of noisy
        stamps stable (compare like with like: use the same window for both).

    Returns
    -------
    size : `~numpy.ndarray`
        ``T = Mxx + Myy`` (pixels squared).
    e1, e2 : `~numpy.ndarray`
        ``(Mxx - Myy) / T`` and ``2 Mxy / T``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import stamp_moments
    >>> yy, xx = np.mgrid[-10:11, -10:11]
    >>> t, e1, e2 = stamp_moments(np.exp(-0.5 * (xx**2 / 4.0 + yy**2 / 1.0)))
    >>> round(float(t), 3), round(float(e1), 3), round(float(e2), 3)
    (5.0, 0.6, 0.0)
    """
    stamps = np.asarray(stamps, dtype=float)
    ny, nx = stamps.shape[-2:]
    yy, xx = np.mgrid[:ny, :nx].astype(float)
    if window is not None:
        r2 = (xx - nx // 2) ** 2 + (yy - ny // 2) ** 2
        stamps = stamps * np.exp(-0.5 * r2 / window**2)
    total = stamps.sum(axis=(-2, -1))
    xc = (stamps * xx).sum(axis=(-2, -1)) / total
    yc = (stamps * yy).sum(axis=(-2, -1)) / total
    ddx = xx - np.asarray(xc)[..., None, None]
    ddy = yy - np.asarray(yc)[..., None, None]
    mxx = (stamps * ddx**2).sum(axis=(-2, -1)) / total
    myy = (stamps * ddy**2).sum(axis=(-2, -1)) / total
    mxy = (stamps * ddx * ddy).sum(axis=(-2, -1)) / total
    size = mxx + myy
    return size, (mxx - myy) / size, 2.0 * mxy / size


def clean_neighbours(
    stamps: np.ndarray, variance: np.ndarray, *, nsigma: float = 4.0, core_level: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Replace the light of neighbouring sources in the wings of normalised stamps.

    Stars that pass an isolation cut still have fainter neighbours in the corners of
    their stamps; a mean or an SVD of the stamps turns that light into a spurious
    pedestal in the PSF wings (measured: 1-2 % of the flux outside 2 FWHM, which
    biases PSF photometry and ZOGY flux ratios by as much). Outside the PSF core
    (where the median stamp is below ``core_level`` of its peak) every pixel more
    than ``nsigma`` sigma ABOVE the per-pixel median stamp is replaced by that
    median. Only positive outliers are touched, so noise is left unbiased to
    ``~3e-5`` of the pixels.

    Parameters
    ----------
    stamps : `~numpy.ndarray`
        ``(n, n_pix)`` recentred unit-sum stamps (flattened).
    variance : `~numpy.ndarray`
        ``(n, n_pix)`` their variances.
    nsigma : float, optional
        Threshold of a neighbour pixel, in sigma of that pixel.
    core_level : float, optional
        Pixels where the median stamp exceeds this fraction of its peak are never changed.

    Returns
    -------
    cleaned : `~numpy.ndarray`
        A cleaned copy of ``stamps``.
    replaced : `~numpy.ndarray`
        Boolean ``(n, n_pix)``, the replaced pixels.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import clean_neighbours
    >>> stamps = np.tile([0.0, 0.1, 0.8, 0.1, 0.0], (5, 1))
    >>> stamps[0, 0] = 0.3  # a neighbour in the first star's wing
    >>> cleaned, replaced = clean_neighbours(stamps, np.full(stamps.shape, 1e-4))
    >>> float(cleaned[0, 0]), int(replaced.sum())
    (0.0, 1)
    """
    median = np.median(stamps, axis=0)
    wing = median < core_level * median.max()
    excess = (stamps - median[None, :]) / np.sqrt(np.maximum(variance, np.finfo(float).tiny))
    replaced = wing[None, :] & (excess > nsigma)
    cleaned = np.where(replaced, median[None, :], stamps)
    log.debug("replaced %d neighbour pixels in %d stamps", int(replaced.sum()),
              int(replaced.any(axis=1).sum()))
    return cleaned, replaced
