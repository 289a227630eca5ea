"""The PSF's outer wing: a Moffat law fitted to the stacked profile of the bright stars.

A stamp of a few FWHM holds the PSF's core, not its wings: a Moffat profile of
``beta = 2.5`` leaves 1-1.5 % of its flux outside +-3 FWHM, so a model cut there
leaves rings of residual flux around bright stars when they are subtracted. The
wing is fitted where the core stamp cannot see it: the azimuthal profile of the
brightest stars between 2 FWHM and a few times the stamp size, stacked with
symmetric clipping (neighbours are rejected without biasing the noise), as a
Moffat law ``A (1 + r**2 / alpha**2) ** -beta`` of the stars' FWHM relative to each
star's core-stamp flux (a pure power law fitted there misses the curvature of a
Moffat profile between 2 and 8 FWHM and underestimates the flux further out).
Arrays in, arrays out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .stamps import _distance, row_median

__all__ = [
    "LightSamples",
    "ProfilePixels",
    "Wing",
    "fit_wing",
    "light_reach",
    "light_samples",
    "profile_pixels",
    "render_wing",
    "stars_light",
]

log = logging.getLogger(__name__)

#: Moffat indices beta of the wing tried in the fit (r**-3 to r**-12 far out)
BETAS = np.linspace(1.5, 6.0, 91)
#: a wing is kept when its flux outside the core stamp is this many sigma
WING_SIGNIFICANCE = 3.0
#: ... and at least this fraction of the star's flux
WING_MIN_FLUX = 2e-4
#: ... and at most this fraction (more is a background or a crowding problem, not a wing)
WING_MAX_FLUX = 0.05
#: width of the radial bins of the profiles, pixels
BIN_WIDTH = 1.0
#: the profile is sampled every pixel out to this radius, every n-th pixel beyond
MAX_SAMPLES = 45.0
#: the wing stamp reaches the radius beyond which this fraction of the flux remains
WING_TAIL = 1e-3


def moffat_alpha(fwhm: float, beta: np.ndarray | float) -> np.ndarray | float:
    """The Moffat scale ``alpha`` of a profile of ``fwhm`` and index ``beta``.

    Examples
    --------
    >>> from astro_zackay.psf.wings import moffat_alpha
    >>> round(float(moffat_alpha(3.0, 2.5)), 4)
    2.6537
    """
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / np.asarray(beta, dtype=float)) - 1.0))


@dataclass(frozen=True)
class Wing:
    """A round Moffat-law wing ``amplitude * (1 + r**2 / alpha**2) ** -beta``.

    The law is relative to the core-stamp flux; ``alpha`` follows from the stars'
    FWHM and ``beta``, so a Moffat PSF's wing is its own profile.

    Attributes
    ----------
    amplitude, beta, alpha : float
        The fitted law, ``r`` in pixels.
    amplitude_err : float
        The amplitude's standard error at the fitted ``beta``.
    """

    amplitude: float
    beta: float
    alpha: float
    amplitude_err: float

    def law(self, radius: np.ndarray) -> np.ndarray:
        """The wing per pixel at ``radius`` pixels."""
        return self.amplitude * (1.0 + np.asarray(radius) ** 2 / self.alpha**2) ** -self.beta

    def flux_beyond(self, radius: float) -> float:
        """Flux of the law outside a circle of ``radius`` pixels.

        Examples
        --------
        >>> from astro_zackay.psf.wings import Wing
        >>> round(Wing(1.0, 2.0, 1.0, 0.0).flux_beyond(0.0), 6)  # pi alpha**2 / (beta - 1)
        3.141593
        """
        a2, b = self.alpha**2, self.beta
        return float(np.pi * self.amplitude * a2 / (b - 1.0) * (1.0 + radius**2 / a2) ** (1.0 - b))

    def radius_for_tail(self, tail: float) -> float:
        """The radius outside which the law holds ``tail`` of the flux.

        Examples
        --------
        >>> from astro_zackay.psf.wings import Wing
        >>> wing = Wing(1.0, 2.0, 1.0, 0.0)
        >>> round(wing.radius_for_tail(wing.flux_beyond(5.0)), 6)
        5.0
        """
        a2, b = self.alpha**2, self.beta
        q = tail * (b - 1.0) / (np.pi * self.amplitude * a2)
        return float(np.sqrt(a2 * max(q ** (1.0 / (1.0 - b)) - 1.0, 0.0)))


@dataclass(frozen=True)
class ProfilePixels:
    """The pixels of stars' outer profiles (`profile_pixels`), read once for several fits.

    Attributes
    ----------
    grid : `~numpy.ndarray`
        The radii of the sampled offsets on the pixel grid (sorted, shared by all stars).
    radius : `~numpy.ndarray`
        ``(n_star, n_pix)``: each pixel's distance from its star.
    index : `~numpy.ndarray`
        ``(n_star, n_pix)``: its flat index in the image (clipped to the image).
    good : `~numpy.ndarray`
        ``(n_star, n_pix)``: inside the image, unmasked and within the radial range.
    data, variance : `~numpy.ndarray`
        ``(n_star, n_pix)``: the image and its variance there (NaN where not good).
    r_min, r_max : float
        The radial range, pixels.
    """

    grid: np.ndarray
    radius: np.ndarray
    index: np.ndarray
    good: np.ndarray
    data: np.ndarray
    variance: np.ndarray
    r_min: float
    r_max: float

    def at(self, image: np.ndarray) -> np.ndarray:
        """Another image of the same shape at these pixels (NaN where not good)."""
        return np.where(self.good, np.take(image, self.index), np.nan)


def profile_pixels(
    data: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    r_min: float,
    r_max: float,
) -> ProfilePixels:
    """The pixels between ``r_min`` and ``r_max`` of the stars at ``(x, y)``, for `fit_wing`.

    Every pixel out to `MAX_SAMPLES` pixels, every n-th pixel (in both axes) beyond.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.wings import profile_pixels
    >>> img = np.ones((50, 50))
    >>> pixels = profile_pixels(img, img, img < 0, np.array([25.0]), np.array([25.0]), 2.0, 3.0)
    >>> int(pixels.good.sum()), float(np.nanmax(pixels.radius[pixels.good]))  # 2 <= r < 3
    (16, 2.8284271247461903)
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    h = int(np.ceil(r_max)) + 1
    step = max(1, int(round(r_max / MAX_SAMPLES)))  # every pixel out to MAX_SAMPLES, then fewer
    oy, ox = np.mgrid[-h : h + 1 : step, -h : h + 1 : step]
    grid = np.hypot(oy, ox).ravel()
    order = np.argsort(grid[(grid >= r_min - 1) & (grid < r_max + 1)], kind="stable")
    near = np.flatnonzero((grid >= r_min - 1) & (grid < r_max + 1))[order]
    grid, oy, ox = grid[near], oy.ravel()[near], ox.ravel()[near]
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    rows, cols = iy[:, None] + oy, ix[:, None] + ox
    radius = _distance(cols - x[:, None], rows - y[:, None])
    ny, nx = mask.shape
    good = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    index = np.clip(rows, 0, ny - 1) * nx + np.clip(cols, 0, nx - 1)
    good &= ~np.take(mask, index) & (radius >= r_min) & (radius < r_max)
    return ProfilePixels(grid, radius, index, good,
                         *(np.where(good, np.take(image, index), np.nan)
                           for image in (data, variance)), float(r_min), float(r_max))


def _star_levels(
    grid: np.ndarray,
    radius: np.ndarray,
    values: np.ndarray,
    pixel_var: np.ndarray,
    edges: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each star's level in each radial bin, its variance, and the bins' radii.

    The bins are by the pixel-grid radius ``grid`` (sorted, the same for every star),
    so each bin is a slice of columns; the law is evaluated at the kept pixels' own
    radii (``radius``).

    A star's level in a bin is the mean of its pixels there after a symmetric
    3-sigma clip about their median (1.4826 MAD): a neighbour covers a small part of
    an annulus and is clipped, the noise is not biased (a median would be, by the
    profile's slope across the bin). The variance is the mean of the kept pixels'
    variances (``pixel_var``, from the noise model, not from the data: variances
    estimated from the same pixels would weight low fluctuations up) over their number.

    Returns
    -------
    level, variance : ``(n_star, n_bins)`` (NaN / inf where a star has too few pixels);
    r_mean, r_var : ``(n_star, n_bins)`` mean and variance of the kept pixels' radii.
    """
    bounds = np.searchsorted(grid, edges)
    n_star, n_bins = values.shape[0], len(edges) - 1
    counts = np.diff(bounds)
    centre, spread = _bin_medians(values, bounds)
    # the bins' pixels are consecutive columns: sums over them by np.add.reduceat
    cols = slice(bounds[0], bounds[-1])
    in_bin = np.repeat(np.arange(n_bins), counts)
    starts = bounds[:-1] - bounds[0]
    v = values[:, cols]
    with np.errstate(invalid="ignore"):
        kept = np.isfinite(v) & ~(np.abs(v - centre[:, in_bin]) > 3.0 * spread[:, in_bin])

    def bin_sums(array: np.ndarray) -> np.ndarray:
        # a zero column appended: the starts of empty trailing bins (at the end) stay
        # valid indices, and the last non-empty bin keeps its last column
        padded = np.concatenate([array, np.zeros((n_star, 1))], axis=1)
        return np.where(counts > 0, np.add.reduceat(padded, starts, axis=1), 0.0)

    n = bin_sums(kept.astype(float))
    ok = n >= 5
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.where(ok, bin_sums(np.where(kept, v, 0.0)) / n, np.nan)
        variance = np.where(ok, bin_sums(np.where(kept, pixel_var[:, cols], 0.0)) / n**2, np.inf)
        r = radius[:, cols]
        r_mean = np.where(ok, bin_sums(np.where(kept, r, 0.0)) / n, 1.0)
        deviation = np.where(kept, r - r_mean[:, in_bin], 0.0)
        r_var = np.where(ok, bin_sums(deviation**2) / n, 0.0)
    variance[~(variance > 0)] = np.inf
    return level, variance, r_mean, r_var


def _bin_medians(values: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and 1.4826 MAD of each star's values in each bin ``(n_star, n_bins)``.

    The bins (consecutive columns between ``bounds``) are laid side by side, padded
    with NaN to the fullest one, so that one sort serves them all.
    """
    n_star, n_bins = values.shape[0], len(bounds) - 1
    width = max(int(np.max(np.diff(bounds))), 1)
    columns = bounds[:-1, None] + np.arange(width)
    inside = columns < bounds[1:, None]
    padded = np.where(inside, values[:, np.where(inside, columns, 0)], np.nan)
    padded = padded.reshape(-1, width)
    centre = row_median(padded)
    spread = 1.4826 * row_median(np.abs(padded - centre[:, None]))
    return centre.reshape(n_star, n_bins), spread.reshape(n_star, n_bins)


def light_reach(flux: np.ndarray, wing: Wing, radius: float, floor: float) -> np.ndarray:
    """How far out `stars_light` draws stars of ``flux``: to ``floor``, ``radius`` at most.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.wings import Wing, light_reach
    >>> wing = Wing(0.1, 2.0, 1.0, 0.0)  # 1e4 * 0.1 * (1 + r**2)**-2 = 1 at r = 5.53
    >>> np.round(light_reach(np.array([1e4, 10.0]), wing, 30.0, 1.0), 2).tolist()
    [5.53, 0.0]
    >>> light_reach(np.array([1e4]), wing, 30.0, 0.0).tolist()  # no floor: the radius
    [30.0]
    """
    flux = np.asarray(flux, dtype=float)
    reach = np.full(flux.shape, float(radius))
    if floor > 0 and wing.amplitude > 0:
        ratio = np.maximum(flux * wing.amplitude / floor, 1.0) ** (1.0 / wing.beta)
        reach = np.minimum(reach, wing.alpha * np.sqrt(ratio - 1.0))
    return reach


def stars_light(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    wing: Wing,
    radius: float,
    *,
    floor: float = 0.0,
) -> np.ndarray:
    """An image of the stars' light by the wing's law, out to ``radius`` pixels from each.

    Used to take the neighbours' wings out of a star's outer profile: a neighbour's
    core is clipped from an annulus, its wing (a smooth gradient over the annulus) is
    not, and in a field of bright stars it flattens the fitted law. Each star is drawn
    only out to where its light falls below ``floor`` (faint sources stay small).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.wings import Wing, stars_light
    >>> light = stars_light((21, 21), np.array([10.0]), np.array([10.0]), np.array([100.0]),
    ...                     Wing(0.1, 2.5, 2.0, 0.0), 5.0)
    >>> float(light[10, 10]), float(light[10, 16])  # the law at 0; nothing beyond 5 px
    (10.0, 0.0)
    """
    x, y, flux = (np.asarray(v, dtype=float) for v in (x, y, flux))
    reach = np.minimum(light_reach(flux, wing, radius, floor), radius)
    return light_samples(shape, x, y, reach, wing).image(flux, reach)


@dataclass(frozen=True)
class LightSamples:
    """The pixels of the disks that `stars_light` draws, and the wing law at each.

    Drawn once to the largest reach wanted, they give the image of any fluxes whose
    reaches are no larger (`image`), without evaluating the law again.

    Attributes
    ----------
    shape : tuple of int
        The image shape.
    index : `~numpy.ndarray`
        Flat image index of each sample.
    source : `~numpy.ndarray`
        The star each sample belongs to.
    radius : `~numpy.ndarray`
        Its distance from that star, pixels.
    law : `~numpy.ndarray`
        The wing law there, per unit flux.
    """

    shape: tuple[int, int]
    index: np.ndarray
    source: np.ndarray
    radius: np.ndarray
    law: np.ndarray

    def image(self, flux: np.ndarray, reach: np.ndarray) -> np.ndarray:
        """The stars' light for ``flux``, each drawn out to its ``reach`` (pixels)."""
        keep = self.radius <= np.asarray(reach, dtype=float)[self.source]
        value = np.asarray(flux, dtype=float)[self.source[keep]] * self.law[keep]
        return np.bincount(self.index[keep], value,
                           minlength=self.shape[0] * self.shape[1]).reshape(self.shape)


def light_samples(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, reach: np.ndarray,
                  wing: Wing) -> LightSamples:
    """The pixels within ``reach`` of each star inside the image, and the law there.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.wings import Wing, light_samples
    >>> samples = light_samples((21, 21), np.array([10.0]), np.array([10.0]),
    ...                         np.array([5.0]), Wing(0.1, 2.5, 2.0, 0.0))
    >>> len(samples.index), float(samples.image(np.array([100.0]), np.array([0.5])).sum())
    (81, 10.0)
    """
    x, y, reach = (np.asarray(v, dtype=float) for v in (x, y, reach))
    half = np.ceil(reach).astype(int)
    pieces = [_disk_samples(shape, np.flatnonzero(half == h), x, y, reach, h)
              for h in np.unique(half)]
    index, source, radius = (np.concatenate([p[i] for p in pieces]) if pieces
                             else np.zeros(0, int if i < 2 else float) for i in range(3))
    return LightSamples(tuple(shape), index, source, radius, wing.law(radius))


def _disk_samples(shape: tuple[int, int], stars: np.ndarray, x: np.ndarray, y: np.ndarray,
                  reach: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat pixel indices, star and radius of ``stars`` drawn in ``2 half + 1`` boxes."""
    offsets = np.arange(-half, half + 1)
    x, y = x[stars], y[stars]
    rows = np.round(y).astype(int)[:, None, None] + offsets[None, :, None]
    cols = np.round(x).astype(int)[:, None, None] + offsets[None, None, :]
    r = _distance(cols - x[:, None, None], rows - y[:, None, None])
    keep = ((r <= reach[stars][:, None, None]) & (rows >= 0) & (rows < shape[0])
            & (cols >= 0) & (cols < shape[1]))
    source = np.broadcast_to(stars[:, None, None], keep.shape)
    return (rows * shape[1] + cols)[keep], source[keep], r[keep]


def fit_wing(
    pixels: ProfilePixels,
    flux: np.ndarray,
    *,
    fwhm: float,
    background: np.ndarray | float = 0.0,
    sky: np.ndarray | None = None,
    neighbours: tuple[np.ndarray, Wing] | None = None,
) -> tuple[Wing, np.ndarray]:
    """Fit a Moffat law of the stars' FWHM to their outer profiles, with their backgrounds.

    Each star's profile between ``pixels.r_min`` and ``pixels.r_max`` (binned,
    neighbours clipped) is modelled as ``A law(r) + c``: the law is common, the offset ``c`` is the
    star's own residual background (a local background measured in a ring carries
    the light of neighbours and of the star's own wing; this one is fitted where the
    star's profile is known).

    Parameters
    ----------
    pixels : ProfilePixels
        The stars' pixels over the radial range of the fit (`profile_pixels`, from
        about 2 FWHM).
    flux : `~numpy.ndarray`
        The stars' core-stamp fluxes (the wing is relative to them).
    fwhm : float
        The stars' FWHM, which ties the law's ``alpha`` to its ``beta``.
    background : float or `~numpy.ndarray`, optional
        Each star's local background, subtracted from its pixels.
    sky : `~numpy.ndarray`, optional
        A background map, subtracted from the pixels (instead of ``background``).
    neighbours : tuple, optional
        ``(light, wing)``: an image of the stars' light by a first fit's law
        (`stars_light`) and that law; the light is subtracted and each star's own
        part, ``flux * wing.law(r)``, given back, so the profiles lose their
        neighbours' wings.

    Returns
    -------
    wing : Wing
        The law.
    offsets : `~numpy.ndarray`
        Each star's residual background per pixel, relative to its flux.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.profiles import psf_stamp
    >>> from astro_zackay.psf.wings import fit_wing, profile_pixels
    >>> img = 1e6 * psf_stamp(201, 3.0, profile="moffat", beta=2.5)
    >>> pixels = profile_pixels(img + 3.0, img + 1.0, img < 0, np.array([100.0]),
    ...                         np.array([100.0]), 6.0, 40.0)
    >>> wing, offsets = fit_wing(pixels, np.array([1e6]), fwhm=3.0)
    >>> round(wing.beta, 2), round(float(offsets[0]) * 1e6, 1)  # and the 3-unit sky
    (2.5, 3.0)
    """
    # the neighbours' light is taken off the sampled pixels, not off the whole image
    values = pixels.data - pixels.at(neighbours[0]) if neighbours is not None else pixels.data
    values = values - (pixels.at(sky) if sky is not None else 0.0)
    radius, r_min, r_max = pixels.radius, pixels.r_min, pixels.r_max
    flux = np.asarray(flux, dtype=float)
    background = np.broadcast_to(np.asarray(background, dtype=float), flux.shape)
    flux = flux[:, None]
    if neighbours is not None:
        values = values + flux * neighbours[1].law(radius)
    values = (values - background[:, None]) / flux
    edges = np.linspace(r_min, r_max, max(int(np.ceil((r_max - r_min) / BIN_WIDTH)), 4) + 1)
    level, level_var, r_mean, r_var = _star_levels(pixels.grid, radius, values,
                                                   pixels.variance / flux**2, edges)
    weight = np.where(np.isfinite(level), 1.0 / level_var, 0.0)
    level = np.nan_to_num(level)
    alphas = moffat_alpha(fwhm, BETAS)
    if np.sum(weight.sum(axis=0) > 0) < 4:
        return Wing(0.0, float(BETAS[-1]), float(alphas[-1]), np.inf), np.zeros(len(flux))
    beta, alpha2 = BETAS[:, None, None], alphas[:, None, None] ** 2

    def law(r: np.ndarray) -> np.ndarray:
        return (1.0 + r**2 / alpha2) ** -beta

    # mean of the law over a bin, to second order in its spread of radii
    step = 0.1
    curvature = (law(r_mean + step) - 2.0 * law(r_mean) + law(r_mean - step)) / step**2
    model = law(r_mean) + 0.5 * curvature * r_var  # (n_beta, n_star, n_bins)
    # level = A model + c_star: eliminate each star's offset c by its weighted means
    w_sum = np.maximum(weight.sum(axis=1), np.finfo(float).tiny)
    dm = model - ((model * weight).sum(axis=2) / w_sum)[..., None]
    dl = level - ((level * weight).sum(axis=1) / w_sum)[:, None]
    norm = (dm**2 * weight).sum(axis=(1, 2))
    amplitudes = (dm * dl * weight).sum(axis=(1, 2)) / norm
    chi2 = ((dl - amplitudes[:, None, None] * dm) ** 2 * weight).sum(axis=(1, 2))
    i = int(np.argmin(chi2))
    offsets = ((level - amplitudes[i] * model[i]) * weight).sum(axis=1) / w_sum
    wing = Wing(float(amplitudes[i]), float(BETAS[i]), float(alphas[i]),
                float(1.0 / np.sqrt(norm[i])))
    log.debug("wing fit: %s", wing)
    return wing, offsets


def render_wing(
    wing: Wing, core_shape: tuple[int, int], *, tail: float = WING_TAIL, max_half: int = 100
) -> np.ndarray | None:
    """The wing outside the core's disk as a stamp: its fraction of the flux, less the tail.

    The law, relative to the core-stamp flux, is converted to a fraction of the total
    flux (core plus wing) and drawn on a square stamp reaching the radius beyond which
    ``tail`` of the flux remains (at most ``max_half`` pixels from the centre), zero
    inside the disk (ellipse) inscribed in the core stamp: the core stamp's corners, the
    noisiest of its pixels, come from the law; the flux beyond the stamp (``tail``) is
    left out, so the unit-sum model's core holds it, as a truncated profile would. ``None``
    when the wing is not significant (less than `WING_SIGNIFICANCE` sigma or `WING_MIN_FLUX`) or not
    credible (more than `WING_MAX_FLUX`, or the flattest law tried).

    Parameters
    ----------
    wing : Wing
        The fitted law.
    core_shape : tuple of int
        Odd shape ``(ny, nx)`` of the core stamp.
    tail : float, optional
        The flux fraction allowed beyond the stamp.
    max_half : int, optional
        Largest half-size of the stamp.

    Returns
    -------
    `~numpy.ndarray` or None
        The wing stamp (odd, square, centred), or None.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.wings import Wing, render_wing
    >>> wing = Wing(0.05, 2.5, 2.8, 0.001)
    >>> stamp = render_wing(wing, (15, 15))
    >>> h = stamp.shape[0] // 2
    >>> h > 7, float(stamp[h, h]), bool(stamp[h, h + 8] > 0), bool(stamp[h + 7, h + 7] > 0)
    (True, 0.0, True, True)
    >>> outside = wing.flux_beyond(7.5)  # relative to the core stamp's flux
    >>> bool(abs(stamp[h, h + 10] - wing.law(10.0) / (1 + outside)) < 1e-15)
    True
    >>> bool(outside / (1 + outside) - 0.001 <= stamp.sum() < outside / (1 + outside))
    True
    """
    hy, hx = core_shape[0] // 2, core_shape[1] // 2
    core_radius = np.sqrt((hy + 0.5) * (hx + 0.5))  # the disk inscribed in the core stamp
    outside = wing.flux_beyond(core_radius)
    significant = wing.amplitude > WING_SIGNIFICANCE * wing.amplitude_err
    credible = outside < WING_MAX_FLUX and wing.beta > BETAS[0]
    if not (significant and credible and outside > WING_MIN_FLUX):
        log.info("no outer wing: %s (%.2g of the flux outside the core)", wing, outside)
        return None
    half = int(np.ceil(wing.radius_for_tail(tail * (1.0 + outside))))
    half = int(np.clip(half, max(hy, hx) + 1, max(max_half, hy + 1, hx + 1)))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    stamp = wing.law(np.hypot(xx, yy))
    stamp[(xx / (hx + 0.5)) ** 2 + (yy / (hy + 0.5)) ** 2 <= 1.0] = 0.0
    # the law is relative to the core stamp's flux; as a fraction of the whole flux it is
    # divided by (1 + outside). The light beyond the drawn stamp (``tail``) is not spread
    # over the wing (that would raise every wing pixel by tail / outside, ~5 % for a Moffat
    # of beta 2.5): the unit-sum model's core takes it, as a truncated profile would.
    return stamp / (1.0 + outside)
