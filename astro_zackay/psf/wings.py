"""The PSF's outer wing: a power law fitted to the stacked profile of the bright stars.

A stamp of a few FWHM holds the PSF's core, not its wings: a Moffat profile of
``beta = 2.5`` leaves 1-1.5 % of its flux outside +-3 FWHM, so a model cut there
leaves rings of residual flux around bright stars when they are subtracted. The
wing is fitted where the core stamp cannot see it: the azimuthal profile of the
brightest stars between 2 FWHM and a few times the stamp size, stacked with
symmetric clipping (neighbours are rejected without biasing the noise), as
``I(r) = A r**-p`` relative to each star's core-stamp flux. Arrays in, arrays out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = ["Wing", "fit_wing", "render_wing"]

log = logging.getLogger(__name__)

#: powers p of the wing ``r**-p`` tried in the fit (p > 2: finite flux)
POWERS = np.linspace(2.3, 12.0, 98)
#: a wing is kept when its flux outside the core stamp is this many sigma
WING_SIGNIFICANCE = 3.0
#: ... and at least this fraction of the star's flux
WING_MIN_FLUX = 2e-4
#: the wing stamp reaches the radius beyond which this fraction of the flux remains
WING_TAIL = 1e-3


@dataclass(frozen=True)
class Wing:
    """A round power-law wing ``amplitude * r**-power`` (relative to the core-stamp flux).

    Attributes
    ----------
    amplitude, power : float
        The fitted law, ``r`` in pixels.
    amplitude_err : float
        The amplitude's standard error at the fitted power.
    """

    amplitude: float
    power: float
    amplitude_err: float

    def flux_beyond(self, radius: float) -> float:
        """Flux of the law outside a circle of ``radius`` pixels.

        Examples
        --------
        >>> from astro_zackay.psf.wings import Wing
        >>> round(Wing(1.0, 4.0, 0.0).flux_beyond(2.0), 6)  # 2 pi / (2 * 2**2)
        0.785398
        """
        p = self.power
        return 2.0 * np.pi * self.amplitude * radius ** (2.0 - p) / (p - 2.0)

    def radius_for_tail(self, tail: float) -> float:
        """The radius outside which the law holds ``tail`` of the flux.

        Examples
        --------
        >>> from astro_zackay.psf.wings import Wing
        >>> round(Wing(1.0, 4.0, 0.0).radius_for_tail(0.785398), 3)
        2.0
        """
        p = self.power
        return float((tail * (p - 2.0) / (2.0 * np.pi * self.amplitude)) ** (1.0 / (2.0 - p)))


def _profile_pixels(
    data: np.ndarray,
    mask: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    r_min: float,
    r_max: float,
    sky: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Radii and values ``(n_star, n_pix)`` of the pixels between ``r_min`` and ``r_max``.

    Pixels outside the image or masked are NaN; ``sky`` (a map) is subtracted.
    """
    h = int(np.ceil(r_max)) + 1
    oy, ox = np.mgrid[-h : h + 1, -h : h + 1]
    oy, ox = oy.ravel(), ox.ravel()
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    rows, cols = iy[:, None] + oy, ix[:, None] + ox
    radius = np.hypot(cols - x[:, None], rows - y[:, None])
    ny, nx = data.shape
    good = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    rows, cols = np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1)
    good &= ~mask[rows, cols] & (radius >= r_min) & (radius < r_max)
    values = data[rows, cols] if sky is None else data[rows, cols] - sky[rows, cols]
    values = np.where(good, values, np.nan)
    keep = good.any(axis=0)
    return radius[:, keep], values[:, keep]


def _stacked_profile(
    radius: np.ndarray, values: np.ndarray, edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clipped-mean profile per radial bin: bin index of each pixel, mean, error, weights."""
    index = np.digitize(radius, edges) - 1
    n_bins = len(edges) - 1
    mean = np.full(n_bins, np.nan)
    error = np.full(n_bins, np.nan)
    used = np.zeros(values.shape, dtype=bool)
    for b in range(n_bins):
        in_bin = (index == b) & np.isfinite(values)
        if in_bin.sum() < 10:
            continue
        v = values[in_bin]
        centre = np.median(v)
        spread = 1.4826 * np.median(np.abs(v - centre))
        keep = np.abs(v - centre) <= 3.0 * spread
        mean[b] = v[keep].mean()
        error[b] = np.std(v[keep]) / np.sqrt(keep.sum())
        flat = np.flatnonzero(in_bin.ravel())[keep]
        used.reshape(-1)[flat] = True
    return index, mean, error, used


def _bin_radii(
    radius: np.ndarray, index: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the radii of the pixels in each bin."""
    counts = np.maximum(np.bincount(index, minlength=n_bins), 1)
    mean = np.bincount(index, weights=radius, minlength=n_bins) / counts
    square = np.bincount(index, weights=radius**2, minlength=n_bins) / counts
    return mean, np.maximum(square - mean**2, 0.0)


def fit_wing(
    data: np.ndarray,
    mask: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    *,
    r_min: float,
    r_max: float,
    background: np.ndarray | float = 0.0,
    sky: np.ndarray | None = None,
    ring_radius: float | None = None,
) -> Wing:
    """Fit ``I(r) = A r**-p`` to the stacked outer profile of background-subtracted stars.

    Parameters
    ----------
    data : `~numpy.ndarray`
        The image.
    mask : `~numpy.ndarray`
        Boolean bad-pixel mask.
    x, y, flux : `~numpy.ndarray`
        The stars' positions and core-stamp fluxes (the wing is relative to them).
    r_min, r_max : float
        The radial range of the fit, pixels (from about 2 FWHM).
    background : float or `~numpy.ndarray`, optional
        Each star's local background, subtracted from its pixels.
    sky : `~numpy.ndarray`, optional
        A background map, subtracted from the pixels (instead of ``background``).
    ring_radius : float, optional
        When each star's background was the mean of a ring at this radius, the law
        there was subtracted with it: the fit models ``A (r**-p - ring_radius**-p)``.

    Returns
    -------
    Wing

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.wings import fit_wing
    >>> yy, xx = np.mgrid[:121, :121]
    >>> r = np.hypot(xx - 60.0, yy - 60.0)
    >>> img = 1e5 * 0.5 * np.maximum(r, 1.0) ** -3.0
    >>> wing = fit_wing(img, img < 0, np.array([60.0]), np.array([60.0]), np.array([1e5]),
    ...                 r_min=6.0, r_max=40.0)
    >>> round(wing.power, 2), round(wing.amplitude, 3)
    (3.0, 0.5)
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    radius, values = _profile_pixels(data, mask, x, y, r_min, r_max, sky)
    background = np.broadcast_to(np.asarray(background, dtype=float), x.shape)
    values = (values - background[:, None]) / np.asarray(flux, dtype=float)[:, None]
    edges = np.linspace(r_min, r_max, max(int(np.ceil((r_max - r_min) / 1.5)), 4) + 1)
    index, mean, error, used = _stacked_profile(radius, values, edges)
    fit_bins = np.isfinite(mean) & (error > 0)
    if fit_bins.sum() < 3:
        return Wing(0.0, float(POWERS[-1]), np.inf)
    weight = 1.0 / error[fit_bins] ** 2
    r_mean, r_var = _bin_radii(radius[used], index[used], len(mean))
    r_mean, r_var = r_mean[fit_bins], r_var[fit_bins]
    # mean of r**-p over a bin, to second order in its spread of radii
    p = POWERS[:, None]
    law = r_mean**-p * (1.0 + 0.5 * p * (p + 1.0) * r_var / r_mean**2)
    if ring_radius is not None:
        law = law - float(ring_radius) ** -p
    norm = law**2 @ weight
    amplitudes = (law * mean[fit_bins]) @ weight / norm
    chi2 = (mean[fit_bins] - amplitudes[:, None] * law) ** 2 @ weight
    i = int(np.argmin(chi2))
    amplitude, power, amplitude_err = amplitudes[i], POWERS[i], 1.0 / np.sqrt(norm[i])
    log.debug("wing fit: A=%.3g +- %.2g, p=%.2f", amplitude, amplitude_err, power)
    return Wing(float(amplitude), float(power), float(amplitude_err))


def render_wing(
    wing: Wing, core_shape: tuple[int, int], *, tail: float = WING_TAIL, max_half: int = 150
) -> np.ndarray | None:
    """The wing outside the core stamp as a stamp that sums to the wing's flux fraction.

    The law, relative to the core-stamp flux, is converted to a fraction of the total
    flux (core plus wing) and drawn on a square stamp reaching the radius beyond which
    ``tail`` of the flux remains (at most ``max_half`` pixels from the centre), zero
    inside the core stamp; the flux beyond the stamp is spread over the drawn wing in
    proportion, so the stamp holds the whole wing fraction. ``None`` when the wing is
    not significant (less than `WING_SIGNIFICANCE` sigma or `WING_MIN_FLUX`).

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
    >>> wing = Wing(0.5, 5.0, 0.01)
    >>> stamp = render_wing(wing, (15, 15))
    >>> h = stamp.shape[0] // 2
    >>> h > 7, float(stamp[h, h]), bool(stamp[h, h + 8] > 0)
    (True, 0.0, True)
    >>> outside = wing.flux_beyond(2.0 * np.sqrt(7.5**2 / np.pi))
    >>> bool(abs(stamp.sum() - outside / (1 + outside)) < 1e-12)
    True
    """
    hy, hx = core_shape[0] // 2, core_shape[1] // 2
    core_radius = 2.0 * np.sqrt((hy + 0.5) * (hx + 0.5) / np.pi)  # a circle of the core's area
    outside = wing.flux_beyond(core_radius)
    significant = wing.amplitude > WING_SIGNIFICANCE * wing.amplitude_err
    if not (significant and outside > WING_MIN_FLUX):
        return None
    half = int(np.ceil(wing.radius_for_tail(tail * (1.0 + outside))))
    half = int(np.clip(half, max(hy, hx) + 1, max(max_half, hy + 1, hx + 1)))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    stamp = wing.amplitude * np.maximum(np.hypot(xx, yy), 1.0) ** -wing.power
    stamp[half - hy : half + hy + 1, half - hx : half + hx + 1] = 0.0
    fraction = outside / (1.0 + outside)
    return stamp * (fraction / stamp.sum())
