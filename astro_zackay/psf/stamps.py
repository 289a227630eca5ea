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
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter

from .._moments import pixels_at
from ..fourier import get_array_module, phase_ramp, shift_stack
from ..profiles import _pixel_integrated

__all__ = [
    "StampSet",
    "clean_neighbours",
    "clipped_mean",
    "cut_stamps",
    "fill_masked",
    "fit_offsets",
    "recentre",
    "recentre_unbiased",
    "recentring_bias",
    "ring_background",
    "ring_offsets",
    "row_median",
    "stamp_fits",
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
        False for stars whose stamp leaves the image, has masked pixels it cannot fill or has
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


def _distance(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """``sqrt(dx**2 + dy**2)``: ten times faster than `numpy.hypot` (whose care against
    overflow pixel offsets do not need), equal to it within one unit in the last place."""
    return np.sqrt(dx * dx + dy * dy)


def ring_offsets(radius: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel offsets ``(dy, dx)`` of the annulus ``radius <= r < radius + width``.

    Examples
    --------
    >>> from astro_zackay.psf.stamps import ring_offsets
    >>> dy, dx = ring_offsets(1.0, 0.4)
    >>> len(dy)  # the four neighbours at r = 1 (the diagonals are at 1.41)
    4
    """
    h = int(np.ceil(radius + width))
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    r = np.hypot(yy, xx)
    keep = (r >= radius) & (r < radius + width)
    return yy[keep], xx[keep]


def clipped_mean(values: np.ndarray, *, nsigma: float = 3.0, iterations: int = 4) -> np.ndarray:
    """Mean of each row after symmetric sigma clipping about its median (NaNs ignored).

    The clipping is symmetric (median +- ``nsigma`` * 1.4826 MAD), so it removes
    neighbours and cosmic rays without biasing the mean of symmetric noise; the mean,
    not the median, is returned because the median of Poisson sky is biased low.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import clipped_mean
    >>> rows = np.array([[1.0, 2.0, 3.0, 2.0, 100.0], [0.0, 0.0, np.nan, 1.0, 1.0]])
    >>> clipped_mean(rows).tolist()
    [2.0, 0.5]
    """
    values = np.array(values, dtype=float)
    if values.shape[1] == 0:
        return np.full(len(values), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows with no good value: NaN
        return _clip_rows(values, nsigma, iterations)


def row_median(values: np.ndarray) -> np.ndarray:
    """Median of each row of a 2-D array, NaNs ignored (NaN for an all-NaN row).

    One sort of the whole array (NaNs sort last), much faster than `numpy.nanmedian`
    along an axis.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import row_median
    >>> row_median(np.array([[3.0, np.nan, 1.0, 2.0], [4.0, 1.0, np.nan, np.nan]])).tolist()
    [2.0, 2.5]
    """
    ordered = np.sort(values, axis=1)
    n = np.isfinite(ordered).sum(axis=1)
    low = np.take_along_axis(ordered, np.maximum((n - 1) // 2, 0)[:, None], axis=1)[:, 0]
    high = np.take_along_axis(ordered, np.maximum(n // 2, 0)[:, None], axis=1)[:, 0]
    return np.where(n > 0, 0.5 * (low + high), np.nan)


def _clip_rows(values: np.ndarray, nsigma: float, iterations: int) -> np.ndarray:
    """`clipped_mean` on ``values`` (clipped in place): each round on the rows that the
    last one changed, the others having converged (the same values clip the same)."""
    active = np.arange(len(values))
    for _ in range(iterations):
        rows = values[active]
        deviation = np.abs(rows - row_median(rows)[:, None])
        spread = 1.4826 * row_median(deviation)[:, None]
        out = deviation > nsigma * np.maximum(spread, np.finfo(float).tiny)
        changed = out.any(axis=1)
        if not changed.any():
            break
        rows[out] = np.nan
        active = active[changed]
        values[active] = rows[changed]
    return np.nanmean(values, axis=1)


def ring_background(
    data: np.ndarray,
    mask: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    radius: float,
    *,
    width: float = 4.0,
    min_pixels: int = 20,
) -> np.ndarray:
    """Local background of each star: clipped mean of a circular ring around it.

    The ring ``radius <= r < radius + width`` should lie beyond the star's wings;
    pixels outside the image or masked are left out, and a star with fewer than
    ``min_pixels`` good ring pixels gets NaN.

    Parameters
    ----------
    data, mask : `~numpy.ndarray`
        The image and its boolean bad-pixel mask.
    x, y : `~numpy.ndarray`
        Star positions (x column, y row, 0-based).
    radius, width : float
        Inner radius and width of the ring, pixels.
    min_pixels : int, optional
        Fewest good ring pixels for a background.

    Returns
    -------
    `~numpy.ndarray`
        The backgrounds.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import ring_background
    >>> img = np.full((50, 50), 7.0); img[25, 25] = 1e4
    >>> ring_background(img, img < 0, np.array([25.0, 2.0]), np.array([25.0, 2.0]), 10.0)
    array([7., 7.])
    """
    dy, dx = ring_offsets(radius, width)
    rows = np.round(np.asarray(y, dtype=float)).astype(int)[:, None] + dy
    cols = np.round(np.asarray(x, dtype=float)).astype(int)[:, None] + dx
    ny, nx = data.shape
    inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    rows, cols = np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1)
    good = inside & ~pixels_at(mask, rows, cols)
    values = np.where(good, pixels_at(data, rows, cols), np.nan)
    background = clipped_mean(values)
    background[good.sum(axis=1) < min_pixels] = np.nan
    return background


def stamp_fits(
    x: np.ndarray, y: np.ndarray, image_shape: tuple[int, int], shape: tuple[int, int]
) -> np.ndarray:
    """Whether a stamp of ``shape`` around each star lies inside the image.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import stamp_fits
    >>> stamp_fits(np.array([3.0, 10.0]), np.array([10.0, 10.0]), (20, 20), (7, 7)).tolist()
    [True, True]
    >>> stamp_fits(np.array([2.4]), np.array([10.0]), (20, 20), (7, 7)).tolist()
    [False]
    """
    ix = np.round(np.asarray(x, dtype=float))
    iy = np.round(np.asarray(y, dtype=float))
    hy, hx = shape[0] // 2, shape[1] // 2
    with np.errstate(invalid="ignore"):
        return (
            (ix - hx >= 0) & (iy - hy >= 0)
            & (ix + hx < image_shape[1]) & (iy + hy < image_shape[0])
        )


def cut_stamps(
    data: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, int],
    *,
    sky: np.ndarray | None = None,
    background_radius: float | None = None,
    annulus: float = 4.0,
    max_masked: float = 0.0,
    core_radius: float = 0.0,
) -> StampSet:
    """Cut background-subtracted stamps of the stars at ``(x, y)``.

    The background is the ``sky`` map when given (subtracted pixel by pixel), else
    the clipped mean of a circular ring around each star (`ring_background`) at
    ``background_radius`` (default: just outside the stamp). Put the ring beyond the
    PSF's wings: a ring inside them subtracts part of the star from its own stamp.

    A stamp with masked pixels is valid when they are at most ``max_masked`` of it,
    none within ``core_radius`` pixels of the star and none whose mirror pixel through
    the stamp's centre is masked too: each is filled with its mirror pixel (value and
    variance), the star's own light at the same radius (`fill_masked`).

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
    sky : `~numpy.ndarray`, optional
        A background map of the image.
    background_radius : float, optional
        Inner radius of the background ring, pixels.
    annulus : float, optional
        Width in pixels of the background ring.
    max_masked : float, optional
        Largest fraction of masked pixels a valid stamp may hold (default none).
    core_radius : float, optional
        No masked pixel may lie this close to the star, pixels.

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
    inside = np.isfinite(x) & np.isfinite(y) & stamp_fits(x, y, data.shape, shape)
    ix = np.where(inside, np.round(x), nx // 2).astype(int)
    iy = np.where(inside, np.round(y), ny // 2).astype(int)
    rows = iy[:, None, None] + np.arange(-(ny // 2), ny // 2 + 1)[None, :, None]
    cols = ix[:, None, None] + np.arange(-(nx // 2), nx // 2 + 1)[None, None, :]
    stamps, stamp_mask = pixels_at(data, rows, cols), pixels_at(mask, rows, cols)
    if sky is not None:
        local_sky = pixels_at(sky, rows, cols)
        stamps = stamps - local_sky
        background = local_sky.mean(axis=(1, 2))
    else:
        radius = max(ny, nx) / 2.0 if background_radius is None else float(background_radius)
        background = ring_background(data, mask, ix, iy, radius, width=annulus)
        stamps = stamps - background[:, None, None]
    stamp_var = pixels_at(variance, rows, cols)
    # only the stamps with masked pixels are examined and filled
    masked = np.flatnonzero(stamp_mask.any(axis=(1, 2)))
    fillable = np.ones(len(x), dtype=bool)
    fillable[masked] = _fillable(stamp_mask[masked], (x - ix)[masked], (y - iy)[masked],
                                 max_masked, core_radius)
    fill = masked[fillable[masked]]
    stamps[fill], stamp_var[fill] = fill_masked(stamps[fill], stamp_var[fill], stamp_mask[fill])
    flux = stamps.sum(axis=(1, 2))
    valid = (
        inside
        & (~stamp_mask.any(axis=(1, 2)) | fillable)
        & np.isfinite(background)
        & np.isfinite(flux)
        & (flux > 0)
    )
    zero = ~valid
    stamps[zero] = 0.0
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


def _fillable(mask: np.ndarray, dx: np.ndarray, dy: np.ndarray, max_masked: float,
              core_radius: float) -> np.ndarray:
    """Whether each ``(n, ny, nx)`` stamp's masked pixels can be filled (`cut_stamps`)."""
    n, ny, nx = mask.shape
    yy, xx = np.mgrid[-(ny // 2) : ny // 2 + 1, -(nx // 2) : nx // 2 + 1]
    r = _distance(xx[None] - dx[:, None, None], yy[None] - dy[:, None, None])
    few = mask.sum(axis=(1, 2)) <= max_masked * ny * nx
    return (few & ~(mask & (r <= core_radius)).any(axis=(1, 2))
            & ~(mask & mask[:, ::-1, ::-1]).any(axis=(1, 2)))


def fill_masked(
    stamps: np.ndarray, variance: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Replace masked stamp pixels by their mirror pixels through the stamp's centre.

    A PSF is point-symmetric about its centre, so the mirror pixel holds the star's
    own light at the same radius (to the star's sub-pixel offset from the central
    pixel, a small error in the wings, where a star's few bad pixels are allowed).

    Parameters
    ----------
    stamps, variance : `~numpy.ndarray`
        ``(n, ny, nx)`` stamps (odd sides) and their variances.
    mask : `~numpy.ndarray`
        Boolean ``(n, ny, nx)``: the pixels to replace (their mirrors must be good).

    Returns
    -------
    stamps, variance : `~numpy.ndarray`
        Filled copies.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import fill_masked
    >>> s = np.arange(9.0).reshape(1, 3, 3); bad = np.zeros(s.shape, bool); bad[0, 0, 1] = True
    >>> fill_masked(s, np.ones_like(s), bad)[0][0].tolist()
    [[0.0, 7.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    """
    return (np.where(mask, stamps[:, ::-1, ::-1], stamps),
            np.where(mask, variance[:, ::-1, ::-1], variance))


def recentre(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Move each star from ``(dx, dy)`` onto the stamp's central pixel (Fourier shift).

    The stamps are mirrored about their edges before the shift (a third of a stamp on
    each side, tapered to zero by a half cosine so the period's seam is continuous),
    so light cut by the stamp edge does not wrap around and ring across the stamp as
    a periodic shift would make it.

    Parameters
    ----------
    stamps : `~numpy.ndarray`
        ``(n, ny, nx)`` stamps.
    dx, dy : `~numpy.ndarray`
        ``(n,)`` offsets of the stars from the central pixel.

    Returns
    -------
    `~numpy.ndarray`
        The recentred stamps, a new float64 array. The shift is computed in float32
        (2.4 times faster for a stack of 33x33 padded stamps; its rounding, ~1e-7 of
        the peak, is far below the noise of any star).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import recentre
    >>> s = np.zeros((1, 9, 9)); s[0, :, 8] = 1.0  # a neighbour cut by the right edge
    >>> out = recentre(s, np.array([0.5]), np.array([0.0]))
    >>> round(float(out[0, 4, 0]), 3)  # a periodic shift wraps -0.222 of it to here
    -0.003
    """
    ny, nx = stamps.shape[-2:]
    py, px = -(-ny // 3), -(-nx // 3)
    padded = np.pad(np.asarray(stamps, dtype=np.float32), ((0, 0), (py, py), (px, px)),
                    mode="symmetric")
    padded *= _taper(ny, py)[:, None] * _taper(nx, px)[None, :]
    shifted = shift_stack(padded, -np.asarray(dx), -np.asarray(dy))
    return shifted[:, py : py + ny, px : px + nx].astype(float)


#: `recentring_bias` takes a Moffat profile of a larger index for a Gaussian (the two
#: differ by 1 % at beta 50)
GAUSSIAN_BETA = 50.0


def recentring_bias(
    shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray, profile: dict[str, float]
) -> np.ndarray:
    """What `recentre` adds to unit-sum stars of an analytic ``profile`` at ``(dx, dy)``.

    A Fourier shift is exact only for band-limited images: an undersampled PSF (FWHM
    below ~3 pixels) holds power beyond the Nyquist frequency, and its sinc-shifted
    stamps lose part of the peak and ring along the axes by ~1e-3 of the peak (1e-4
    of the flux at FWHM 2.5 pixels: tens of sigma under a 1e6 e- star). The error is
    deterministic given the profile and the offsets, so the stamps of stars whose PSF
    is close to ``profile`` are corrected by subtracting it; what is left is the
    difference of the errors of two close profiles.

    Parameters
    ----------
    shape : tuple of int
        Odd stamp shape ``(ny, nx)``.
    dx, dy : `~numpy.ndarray`
        ``(n,)`` offsets of the stars from the central pixel.
    profile : dict
        ``fwhm``, ``ellipticity``, ``theta`` and ``beta`` (a Moffat profile, as fitted
        by `astro_zackay.psf.analytic.fit_profile`); ``fwhm``, ``ellipticity`` and
        ``theta`` may be ``(n,)`` arrays, one profile per star (a PSF that varies
        across the field: the error grows fast as the PSF gets sharper).

    Returns
    -------
    `~numpy.ndarray`
        ``(n, ny, nx)``: ``recentre(star at (dx, dy)) - star at (0, 0)``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import recentring_bias
    >>> shape = {"fwhm": 2.5, "ellipticity": 0.0, "theta": 0.0, "beta": 2.5}
    >>> bias = recentring_bias((15, 15), np.array([0.5, 0.0]), np.array([0.3, 0.0]), shape)
    >>> bool(bias[0, 7, 7] < -1e-4), bool(abs(bias[1]).max() < 1e-7)  # none without a shift
    (True, True)

    (but `recentre`'s float32 rounding, 7e-9 of the unit flux here).
    """
    shifted, centred = _profile_stars(shape, dx, dy, profile)
    return recentre(shifted, dx, dy) - centred


def recentre_unbiased(
    stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray, profile: dict[str, float]
) -> np.ndarray:
    """`recentre` of unit-sum stamps less its `recentring_bias`, in one shift.

    The shift is linear, so ``recentre(stamps) - (recentre(model) - centred model)``
    is ``recentre(stamps - model) + centred model``, with ``model`` the stars of
    ``profile`` at ``(dx, dy)``: the stack is shifted once instead of twice, and the
    float32 shift rounds only the small difference.

    Parameters
    ----------
    stamps : `~numpy.ndarray`
        ``(n, ny, nx)`` stamps of unit sum.
    dx, dy : `~numpy.ndarray`
        ``(n,)`` offsets of the stars from the central pixel.
    profile : dict
        The Moffat profile (see `recentring_bias`).

    Returns
    -------
    `~numpy.ndarray`
        ``recentre(stamps, dx, dy) - recentring_bias(shape, dx, dy, profile)``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import recentre, recentre_unbiased, recentring_bias
    >>> shape = {"fwhm": 2.5, "ellipticity": 0.1, "theta": 0.3, "beta": 3.0}
    >>> dx, dy = np.array([0.4, -0.2]), np.array([0.1, 0.5])
    >>> stamps = np.random.default_rng(2).uniform(0.0, 0.01, (2, 15, 15))
    >>> two = recentre(stamps, dx, dy) - recentring_bias((15, 15), dx, dy, shape)
    >>> bool(np.abs(recentre_unbiased(stamps, dx, dy, shape) - two).max() < 1e-7)
    True

    (the two differ by the float32 shifts' rounding).
    """
    shifted, centred = _profile_stars(stamps.shape[1:], dx, dy, profile)
    return recentre(stamps - shifted, dx, dy) + centred


def _profile_stars(
    shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray, profile: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-sum stars of ``profile`` at ``(dx, dy)`` ``(n, ny, nx)`` and centred (one, or
    one per star when the profile varies), for `recentring_bias`."""
    dx, dy = np.asarray(dx, dtype=float), np.asarray(dy, dtype=float)
    n = dx.size
    shapes = [np.asarray(profile[k], dtype=float) for k in ("fwhm", "ellipticity", "theta")]
    n_ref = 1 if all(a.ndim == 0 for a in shapes) else n  # the centred stars
    fwhm, ell, theta = (np.concatenate([np.broadcast_to(a, n_ref), np.broadcast_to(a, n)])
                        .astype(np.float32) for a in shapes)
    offsets = np.concatenate([np.zeros(n_ref), dx]), np.concatenate([np.zeros(n_ref), dy])
    ny, nx = shape
    # rendered in float32 (twice as fast; 1e-7 of a bias of 1e-4 of the flux) with 3x3
    # Gauss-Legendre points per pixel, then shifted in float64
    xoff = (np.arange(nx)[None, :] - nx // 2 - offsets[0][:, None]).astype(np.float32)
    yoff = (np.arange(ny)[None, :] - ny // 2 - offsets[1][:, None]).astype(np.float32)
    # a Moffat index this large is a Gaussian (a fit to a Gaussian star runs it to 1e10)
    kind = "gaussian" if profile["beta"] > GAUSSIAN_BETA else "moffat"
    stars = _pixel_integrated(xoff, yoff, fwhm, ell, theta, kind, profile["beta"], 3, gauss=True)
    stars = stars / stars.sum(axis=(1, 2), keepdims=True, dtype=float)
    return stars[n_ref:], stars[:n_ref]


def _taper(n: int, pad: int) -> np.ndarray:
    """1 over ``n`` pixels, falling as a half cosine to 0 over ``pad`` pixels on each side."""
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(pad) + 0.5) / pad)
    return np.concatenate([ramp, np.ones(n), ramp[::-1]])


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
    dx, dy = stamps.dx.astype(float), stamps.dy.astype(float)
    n, ny, nx = stamps.data.shape
    data = stamps.data.reshape(n, -1)
    weight = 1.0 / stamps.variance.reshape(n, -1)
    be = get_array_module("numpy")
    # float32 transforms: twice as fast, rounding ~1e-7 of the peak (far below the noise)
    spectrum = be.rfft2(np.asarray(psf, dtype=np.float32), s=(ny, nx))  # once, shifted below

    def shifted(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        ramp = phase_ramp((ny, nx), dx[:, None, None], dy[:, None, None], dtype=np.complex64)
        return be.irfft2(spectrum * ramp, s=(ny, nx)).astype(float)

    for _ in range(iterations):
        model = shifted(dx, dy)
        gy, gx = np.gradient(model, axis=(1, 2))
        design = np.stack([model.reshape(n, -1), gx.reshape(n, -1), gy.reshape(n, -1)], axis=2)
        coef = _weighted_lstsq(design, data, weight)
        flux = np.where(coef[:, 0] > 0, coef[:, 0], np.nan)
        # data ~ f*m(x - dx) => d/d(dx) = -f dm/dx
        dx = dx + np.clip(np.nan_to_num(-coef[:, 1] / flux), -0.5, 0.5)
        dy = dy + np.clip(np.nan_to_num(-coef[:, 2] / flux), -0.5, 0.5)
    model = shifted(dx, dy).reshape(n, -1)
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


def _grown_by_one(mask: np.ndarray) -> np.ndarray:
    """Each ``(n, ny, nx)`` boolean plane dilated by one pixel (3x3), by shifted ORs:
    several times faster than `scipy.ndimage.binary_dilation` on small stamps."""
    rows = mask.copy()
    rows[:, 1:] |= mask[:, :-1]
    rows[:, :-1] |= mask[:, 1:]
    grown = rows.copy()
    grown[:, :, 1:] |= rows[:, :, :-1]
    grown[:, :, :-1] |= rows[:, :, 1:]
    return grown


def clean_neighbours(
    stamps: np.ndarray,
    variance: np.ndarray,
    *,
    nsigma: float = 4.0,
    core_level: float = 0.03,
    grow: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace the light of neighbouring sources in the wings of recentred stamps.

    Stars that pass an isolation cut still have fainter neighbours in the corners of
    their stamps; a mean or an SVD of the stamps turns that light into a spurious
    pedestal in the PSF wings. A PSF is point-symmetric about its centre (an
    elliptical profile of any size or angle is), a neighbour is not: outside the core
    (where the median stamp is below ``core_level`` of its peak) a pixel brighter
    than its mirror image through the star by more than ``nsigma`` sigma of their
    difference is a neighbour's, and it and its neighbours within ``grow`` pixels
    are replaced by their mirror pixels (the star's own light at the same radius),
    averaged over 3x3 pixels so that the noise of the replacement value barely
    enters the selection (a single mirror pixel is chosen for being low, and would
    bias the wing low).
    The test compares each star with itself, so a PSF that varies across the field is
    left alone, and pure noise is replaced only in pairs beyond ``nsigma``. Run it on
    stamps recentred to the central pixel, after a shift that does not wrap around
    (`recentre`), so a neighbour cut by the edge does not ring across the stamp.

    Parameters
    ----------
    stamps : `~numpy.ndarray`
        ``(n, ny, nx)`` unit-sum stamps with the star on the central pixel.
    variance : `~numpy.ndarray`
        ``(n, ny, nx)`` their variances.
    nsigma : float, optional
        Threshold of a neighbour pixel, in sigma of the difference with its mirror.
    core_level : float, optional
        Pixels where the median stamp exceeds this fraction of its peak are never changed.
    grow : int, optional
        Pixels within this (chessboard) distance of a rejected pixel are replaced too.

    Returns
    -------
    cleaned : `~numpy.ndarray`
        A cleaned copy of ``stamps``.
    replaced : `~numpy.ndarray`
        Boolean ``(n, ny, nx)``, the replaced pixels.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.stamps import clean_neighbours
    >>> profile = np.array([0.0, 0.01, 0.1, 0.8, 0.1, 0.01, 0.0])
    >>> stamps = np.tile(np.outer(profile, profile), (3, 1, 1))
    >>> stamps[0, 0, 1] = 0.3  # a neighbour in the first star's corner
    >>> cleaned, replaced = clean_neighbours(stamps, np.full(stamps.shape, 1e-4), grow=0)
    >>> round(float(cleaned[0, 0, 1]), 5), int(replaced.sum())  # the 3x3 mean of its mirror
    (0.00012, 1)
    """
    median = np.median(stamps, axis=0)
    wing = median < core_level * median.max()
    # the mirror image, averaged over 3x3 pixels: a replacement value whose own noise
    # barely enters the selection (a pixel-for-pixel mirror is selected for being low)
    mirror = uniform_filter(stamps[:, ::-1, ::-1], size=(1, 3, 3), mode="nearest")
    mirror_var = uniform_filter(variance[:, ::-1, ::-1], size=(1, 3, 3), mode="nearest") / 9.0
    noise = np.sqrt(np.maximum(variance + mirror_var, np.finfo(float).tiny))
    replaced = (stamps - mirror) > nsigma * noise
    if grow > 0:
        for _ in range(grow):
            replaced = _grown_by_one(replaced)
    replaced &= wing[None] & ~replaced[:, ::-1, ::-1]
    cleaned = np.where(replaced, mirror, stamps)
    log.debug("replaced %d neighbour pixels in %d stamps", int(replaced.sum()),
              int(replaced.any(axis=(1, 2)).sum()))
    return cleaned, replaced
