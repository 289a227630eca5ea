"""Flux ratios, offsets and registration noise from stars matched between two images.

These measurements use each star's own fitted flux and centroid
(`astro_zackay.stars.find_psf_stars`), so they do not depend on the accuracy of a
PSF model; they are what `astro_zackay.subtract` and `astro_zackay.coadd` use to put
images on one flux scale and one pixel grid.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.table import Table

from ._ccd import ImageData, to_image
from ._checks import named_errors
from ._stats import clipped_row_stats, mad_std

__all__ = [
    "StarMatch",
    "aperture_photometry",
    "encircled_energy",
    "flux_ratio",
    "match_stars",
    "moffat_encircled_energy",
]

log = logging.getLogger(__name__)

#: S/N of the stars matched between images (lower than that of PSF stars: more matches).
MATCH_SNR_MIN = 10.0
#: Residual, in robust sigma of the other stars', beyond which a star leaves the flux ratio.
CLIP_SIGMA = 5.0
#: Fewest other stars that can show a star to be an outlier (the DECam frames' 5-6 stars
#: disagree by 2-3 % beyond their errors: there, the brightest is no outlier to clip).
CLIP_MIN_OTHERS = 8
#: Radius, in FWHM, of the large aperture that measures the aperture correction.
APCORR_RADIUS = 3.0
#: S/N in that aperture, in both images, of the stars that measure it.
APCORR_SNR_MIN = 50.0
#: Fewest such isolated stars for a measured aperture correction.
APCORR_MIN_STARS = 5
#: Distance in pixels within which a detection is the star itself.
SAME_SOURCE = 2.0


def _weighted_clipped_mean(
    values: np.ndarray, errors: np.ndarray, nsigma: float = 3.0, iterations: int = 5
) -> tuple[float, float, np.ndarray]:
    """Inverse-variance mean with iterative clipping; its error scaled by sqrt(reduced chi2)."""
    keep = np.isfinite(values) & np.isfinite(errors) & (errors > 0)
    mean = float(np.median(values[keep]))
    scale = 1.0
    for _ in range(iterations):
        weights = 1.0 / errors[keep] ** 2
        mean = float(np.sum(weights * values[keep]) / np.sum(weights))
        pulls = (values - mean) / errors
        chi2 = float(np.sum(pulls[keep] ** 2) / max(keep.sum() - 1, 1))
        scale = max(1.0, np.sqrt(chi2))
        new_keep = keep & (np.abs(pulls) < nsigma * scale)
        if new_keep.sum() < 3 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    weights = 1.0 / errors[keep] ** 2
    return mean, float(scale / np.sqrt(np.sum(weights))), keep


def flux_ratio(
    flux: np.ndarray, flux_err: np.ndarray, flux_ref: np.ndarray, flux_ref_err: np.ndarray
) -> tuple[float, float, np.ndarray]:
    """Flux ratio of matched stars: a robustly clipped fit of ``flux = ratio * flux_ref``.

    Both fluxes are noisy, so the ratio minimises the errors-in-variables chi-square
    ``sum((flux - ratio * flux_ref)**2 / (flux_err**2 + ratio**2 * flux_ref_err**2))``
    (a Deming fit through the origin). An inverse-variance mean of the star-by-star
    ratios is biased low by ~0.5 % on simulated fields: their errors grow with the
    ratio's own noise, so the high ratios are down-weighted (and clipped) more than
    the low ones.

    The stars are clipped one at a time: the one whose residual from the fit of the
    other stars is the largest, while that residual exceeds `CLIP_SIGMA` times the
    robust spread (MAD) of the other stars' residuals from their fit, and at least
    `CLIP_MIN_OTHERS` other stars remain. A chi-square scale would be
    inflated by the very outlier it should clip, and residuals from a fit that
    includes a star hide it when it carries the fit: one variable star, 10x brighter
    than 8-20 others and weighted 11x as much, moved the ratio by 47-70 %. The error
    is the fit's, scaled up by the square root of its reduced chi-square: the scatter
    of the kept stars' ratios, where it exceeds their photon noise.

    Parameters
    ----------
    flux, flux_err : `~numpy.ndarray`
        Fluxes and errors of the stars in the image.
    flux_ref, flux_ref_err : `~numpy.ndarray`
        The same stars in the reference.

    Returns
    -------
    ratio : float
        ``flux / flux_ref``, a ratio of FLUXES.
    error : float
        Its error (NaN when no star is usable).
    used : `~numpy.ndarray`
        Boolean, the stars kept by the clipping.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fluxmatch import flux_ratio
    >>> f = np.append(np.linspace(100.0, 900.0, 9), 9000.0)
    >>> flux = 0.5 * f
    >>> flux[-1] *= 2  # a variable star, far brighter than the rest
    >>> ratio, error, used = flux_ratio(flux, 0.01 * flux, f, 0.01 * f)
    >>> round(ratio, 6), int(used.sum()), bool(used[-1])
    (0.5, 9, False)
    """
    f, fr = np.asarray(flux, float), np.asarray(flux_ref, float)
    ef, er = np.asarray(flux_err, float), np.asarray(flux_ref_err, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        usable = (np.isfinite(f) & np.isfinite(fr) & np.isfinite(ef) & np.isfinite(er)
                  & (ef >= 0) & (er >= 0) & (ef**2 + er**2 > 0) & (fr != 0))
        if not usable.any():
            return float("nan"), float("nan"), usable
        keep = usable.copy()
        ratio = _deming(f, ef, fr, er, keep, float(np.median(f[usable] / fr[usable])))
        for _ in range(int(usable.sum()) // 2):
            if keep.sum() <= CLIP_MIN_OTHERS:
                break
            pulls = _left_out_pulls(f, ef, fr, er, keep, ratio)
            worst = int(np.argmax(np.where(keep, np.abs(pulls), -np.inf)))
            rest = keep.copy()
            rest[worst] = False
            fit = _deming(f, ef, fr, er, rest, ratio)
            residuals = (f[rest] - fit * fr[rest]) / np.sqrt(ef[rest] ** 2 + fit**2 * er[rest] ** 2)
            spread = max(1.0, mad_std(residuals, centre=0.0))
            if abs(pulls[worst]) < CLIP_SIGMA * spread:
                break
            keep, ratio = rest, fit
    return ratio, _ratio_error(f, ef, fr, er, keep, ratio), keep


def _deming(
    f: np.ndarray, ef: np.ndarray, fr: np.ndarray, er: np.ndarray, sel: np.ndarray, start: float
) -> float:
    """The ratio minimising the errors-in-variables chi-square of the ``sel`` stars."""
    from scipy.optimize import minimize_scalar

    def chi2(b: float) -> float:
        return float(np.sum((f[sel] - b * fr[sel]) ** 2 / (ef[sel] ** 2 + b**2 * er[sel] ** 2)))

    lo, hi = sorted((0.5 * start, 2.0 * start)) if start != 0 else (-1.0, 1.0)
    return float(minimize_scalar(chi2, bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-9}).x)


def _left_out_pulls(
    f: np.ndarray, ef: np.ndarray, fr: np.ndarray, er: np.ndarray, sel: np.ndarray, ratio: float
) -> np.ndarray:
    """Each ``sel`` star's residual from the fit of the other ``sel`` stars, in sigma.

    The fit is linearised about ``ratio`` (its weights fixed); 0 outside ``sel``.
    """
    var = ef**2 + ratio**2 * er**2
    num, den = np.where(sel, f * fr / var, 0.0), np.where(sel, fr**2 / var, 0.0)
    others = den.sum() - den  # the other stars' total weight
    with np.errstate(divide="ignore", invalid="ignore"):
        left_out = (num.sum() - num) / others
        pulls = (f - left_out * fr) / np.sqrt(var + fr**2 / others)
    return np.where(sel, pulls, 0.0)


def _ratio_error(
    f: np.ndarray, ef: np.ndarray, fr: np.ndarray, er: np.ndarray, sel: np.ndarray, ratio: float
) -> float:
    """The fit's error, scaled up by the square root of its reduced chi-square."""
    var = ef[sel] ** 2 + ratio**2 * er[sel] ** 2
    chi2 = float(np.sum((f[sel] - ratio * fr[sel]) ** 2 / var))
    return float(np.sqrt(max(1.0, chi2 / max(int(sel.sum()) - 1, 1)) / np.sum(fr[sel] ** 2 / var)))


def aperture_photometry(
    data: np.ndarray,
    variance: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    radius: float,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Aperture fluxes with a local background from a sigma-clipped annulus.

    A ratio of such fluxes between two images does not depend on any PSF model
    (only on the fraction of light outside ``radius``, see `encircled_energy`),
    which is why `astro_zackay.subtract` takes its flux ratio from it: forced
    photometry with an estimated PSF inherits the PSF's errors (1-3 % on sparse or
    crowded simulated fields).

    Parameters
    ----------
    data, variance : `~numpy.ndarray`
        The image (background NOT subtracted is fine) and its variance.
    x, y : `~numpy.ndarray`
        Positions (0-based, x the column).
    radius : float
        Aperture radius in pixels; the annulus runs from ``radius + 2`` to
        ``2.5 radius + 2``.
    mask : `~numpy.ndarray`, optional
        Bad pixels, excluded from the aperture sums and the annulus.

    Returns
    -------
    flux, flux_err : `~numpy.ndarray`
        Background-subtracted fluxes and their errors (aperture variance plus the
        error of the background estimate); NaN where the aperture holds a bad pixel.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fluxmatch import aperture_photometry
    >>> image = np.full((60, 60), 10.0); image[30, 30] += 1000.0
    >>> flux, err = aperture_photometry(image, np.ones_like(image), np.array([30.0]),
    ...                                 np.array([30.0]), radius=4.0)
    >>> round(float(flux[0]), 6)
    1000.0
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    r_in, r_out = _annulus(radius)
    half = int(np.ceil(r_out)) + 1
    ny, nx = data.shape
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    inside = (ix - half >= 0) & (iy - half >= 0) & (ix + half < nx) & (iy + half < ny)
    flux = np.full(x.size, np.nan)
    flux_err = np.full(x.size, np.nan)
    if not inside.any():
        return flux, flux_err
    # the images flattened once: each star's pixels are read with one flat index
    images = [np.asarray(data).reshape(-1), np.asarray(variance).reshape(-1),
              None if mask is None else np.asarray(mask, bool).reshape(-1)]
    ring_y, ring_x = _ring_pixels(r_in, r_out)
    half_ap = int(np.ceil(radius)) + 1
    ap_offsets = np.arange(-half_ap, half_ap + 1)
    ap_y, ap_x = (v.ravel() for v in np.meshgrid(ap_offsets, ap_offsets, indexing="ij"))
    # stars in chunks bound the temporaries
    for k in np.array_split(np.flatnonzero(inside), max(1, int(inside.sum()) // 128)):
        dx, dy = x[k] - ix[k], y[k] - iy[k]  # sub-pixel offsets from the star's pixel
        centre = iy[k] * nx + ix[k]
        ring_data, _, ring_bad = _pixels(images, centre, ring_y * nx + ring_x, False)
        dist = np.hypot(ring_x[None, :] - dx[:, None], ring_y[None, :] - dy[:, None])
        ring = (dist >= r_in) & (dist <= r_out) & ~ring_bad
        sky, sky_std, n_sky = clipped_row_stats(np.where(ring, ring_data, np.nan))
        ap_data, ap_variance, ap_bad = _pixels(images, centre, ap_y * nx + ap_x, True)
        weight = _disk_weights(ap_offsets, dx, dy, radius).reshape(len(k), -1)
        area = weight.sum(axis=1)
        flux_k = np.sum(weight * ap_data, axis=1) - sky * area
        var_k = (np.sum(weight * ap_variance, axis=1)
                 + sky_std**2 / np.maximum(n_sky, 1) * area**2)
        holds_bad = np.any((weight > 0) & ap_bad, axis=1)
        valid = ~holds_bad & np.isfinite(flux_k) & (n_sky > 0)
        flux[k] = np.where(valid, flux_k, np.nan)
        flux_err[k] = np.where(valid, np.sqrt(var_k), np.nan)
    return flux, flux_err


def _ring_pixels(r_in: float, r_out: float) -> tuple[np.ndarray, np.ndarray]:
    """``(dy, dx)`` of the pixels that can hold an annulus about a point within a pixel.

    The point lies within half a pixel of the pixel ``(0, 0)`` along each axis, so
    at most ``sqrt(2) / 2`` px from it.
    """
    half = int(np.ceil(r_out)) + 1
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    reach = np.hypot(dy, dx)
    near = (reach >= r_in - _HALF_DIAGONAL) & (reach <= r_out + _HALF_DIAGONAL)
    return dy[near], dx[near]


def _pixels(
    images: list[np.ndarray | None], centre: np.ndarray, offsets: np.ndarray, with_variance: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(n_stars, n_offsets)`` pixels of flattened data, variance and mask at flat offsets.

    Also the bad pixels among them: the mask's (when given), and non-finite data or
    variance (the variance is read only ``with_variance``).
    """
    index = centre[:, None] + offsets[None, :]
    data, variance, mask = images
    data = data[index]
    bad = ~np.isfinite(data)
    if with_variance:
        variance = variance[index]
        bad |= ~np.isfinite(variance)
    if mask is not None:
        bad |= mask[index]
    return data, variance if with_variance else None, bad


_SUBSAMPLE = 5
#: Farthest a pixel's sub-samples lie from its centre: pixels farther than this from
#: the disk's edge lie wholly inside or outside it (plus a margin for rounding).
_SUBSAMPLE_REACH = np.hypot(0.4, 0.4) + 1e-6
#: Farthest a point within half a pixel of a pixel's centre along each axis lies from it.
_HALF_DIAGONAL = np.hypot(0.5, 0.5) + 1e-6


def _disk_weights(offsets: np.ndarray, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Fraction of each pixel inside a disk of ``radius`` centred at ``(dx, dy)``.

    Each pixel is sampled on a 5 x 5 sub-grid (area error ~1e-3 of the disk for
    radii of a few pixels); `encircled_energy` uses the same sampling, so the two
    agree exactly in how they cut the aperture. Only the pixels on the disk's edge
    are sub-sampled: the others lie wholly inside (1) or outside (0).
    """
    cx = offsets[None, None, :] - dx[:, None, None]
    cy = offsets[None, :, None] - dy[:, None, None]
    centre = np.hypot(cx, cy)
    weight = (centre < radius - _SUBSAMPLE_REACH).astype(float)
    edge = np.nonzero(np.abs(centre - radius) <= _SUBSAMPLE_REACH)
    sub = (np.arange(_SUBSAMPLE) + 0.5) / _SUBSAMPLE - 0.5
    px = offsets[edge[2], None, None] + sub[None, None, :] - dx[edge[0], None, None]
    py = offsets[edge[1], None, None] + sub[None, :, None] - dy[edge[0], None, None]
    weight[edge] = ((px**2 + py**2) <= radius**2).mean(axis=(1, 2))
    return weight


def encircled_energy(psf: np.ndarray, radius: float) -> float:
    """Fraction of a unit-sum PSF stamp (centred on its central pixel) within ``radius``.

    At most 1: a PSF model with negative wings cannot make the fraction exceed it.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fluxmatch import encircled_energy
    >>> psf = np.zeros((9, 9)); psf[4, 4] = 0.5; psf[0, 0] = 0.5
    >>> encircled_energy(psf, 2.0)
    0.5
    """
    ny, nx = psf.shape
    if ny != nx or ny % 2 == 0:
        raise ValueError(f"the PSF stamp must be square with odd sides, got {psf.shape}")
    offsets = np.arange(ny) - ny // 2
    weight = _disk_weights(offsets, np.zeros(1), np.zeros(1), radius)[0]
    enclosed = float(np.sum(weight * psf)) / float(psf.sum())
    # no PSF holds more than all of its light within a radius: a model whose wings dip
    # below zero (an over-subtracted local background) reads above 1, which biased
    # the flux scales of broad-seeing frames low by up to 3 % (measured)
    if enclosed > 1.0:
        log.debug("encircled energy %.4f of a PSF with negative wings taken as 1", enclosed)
    return min(enclosed, 1.0)


def moffat_encircled_energy(
    fwhm: np.ndarray, beta: np.ndarray, radius: float, ellipticity: np.ndarray | float = 0.0
) -> np.ndarray:
    """Fraction of a Moffat profile's light within ``radius`` (circularised).

    ``1 - (1 + R**2/alpha**2)**(1 - beta)`` with ``alpha = FWHM / (2 sqrt(2**(1/beta) - 1))``,
    the FWHM taken as the geometric mean of the axes, ``fwhm * sqrt(1 - ellipticity)``;
    a Gaussian is the limit of large ``beta``.

    Examples
    --------
    >>> from astro_zackay.fluxmatch import moffat_encircled_energy
    >>> round(float(moffat_encircled_energy(3.0, 1e5, 3.0)), 4)  # a Gaussian: 1 - 2**-4
    0.9375
    """
    fwhm = np.asarray(fwhm, float) * np.sqrt(1.0 - np.asarray(ellipticity, float))
    beta = np.asarray(beta, float)
    alpha = fwhm / (2.0 * np.sqrt(np.expm1(np.log(2.0) / beta)))
    return -np.expm1((1.0 - beta) * np.log1p((radius / alpha) ** 2))


def _annulus(radius: float) -> tuple[float, float]:
    """Inner and outer radius of the background annulus of `aperture_photometry`."""
    return radius + 2.0, 2.5 * radius + 2.0


def _aperture_correction(
    stars: Table, psf: np.ndarray | None, radius: float
) -> tuple[float, float]:
    """The fraction of a star's flux that `aperture_photometry` at ``radius`` measures, error.

    The encircled energy at ``radius`` less the star's own light that the background
    annulus removes with the sky: ``area(aperture) / area(annulus)`` times the light in
    the annulus. Ignoring it made the flux ratio of Moffat (beta 2.5) pairs of FWHM 2.5
    and 3.5 px 0.6 % low (0.8446 for 0.85, 20 sigma), leaving false candidates at stars
    of 1e6 e- even with the true PSFs given.

    From the stars' own Moffat fits (`~astro_zackay.stars.find_psf_stars` columns
    ``fwhm``, ``beta``, ``ellipticity``; the median over stars) when present: a KL PSF
    stamp of a broad-seeing crowded frame can hold a pedestal of neighbours' light
    (measured: 11.5 % of the flux beyond 2 FWHM for a 6.5 px PSF), which made every
    flux scale of a coadd 7-10 % low. Its error is that of the median, from the
    robust spread of the stars' values: the fits' indices scatter (on Moffat pairs of
    FWHM 2.5 and 3.5 px, medians 2.3-2.6 for a true 2.5 moved the ratio of the two
    corrections by -1 to +3 %). Else from the PSF stamp, at most 1, with no error.
    """
    r_in, r_out = _annulus(radius)
    share = radius**2 / (r_out**2 - r_in**2)  # aperture area over annulus area
    if {"fwhm", "beta"} <= set(stars.colnames) and len(stars):
        ellipticity = stars["ellipticity"] if "ellipticity" in stars.colnames else 0.0

        def energy_at(r: float) -> np.ndarray:
            return moffat_encircled_energy(stars["fwhm"], stars["beta"], r, ellipticity)

        energy = energy_at(radius) - share * (energy_at(r_out) - energy_at(r_in))
        energy = energy[np.isfinite(energy)]
        if energy.size:
            median = float(np.median(energy))
            spread = mad_std(energy, median)
            return median, 1.2533 * spread / np.sqrt(energy.size)
    if psf is None:
        raise ValueError(
            "the aperture correction needs the stars' Moffat fits (fwhm and beta columns, "
            "as find_psf_stars makes) or a PSF stamp (psfs=)"
        )
    ring = encircled_energy(psf, r_out) - encircled_energy(psf, r_in)
    return encircled_energy(psf, radius) - share * ring, 0.0


@dataclass(frozen=True)
class _Stars:
    """The matched stars of a reference and an image: tables, images, PSFs, positions."""

    tables: tuple[Table, Table]
    images: tuple[ImageData, ImageData]
    psfs: tuple[np.ndarray, np.ndarray] | None
    positions: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

    @property
    def fwhm(self) -> float:
        """The broader of the two tables' FWHMs (``meta['fwhm']``, else 3 px)."""
        return max(float(table.meta.get("fwhm", 3.0)) for table in self.tables)

    def photometry(
        self, radius: float, rows: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(flux, error)]`` in apertures of ``radius`` in the reference and the image.

        Of the stars selected by ``rows`` (a boolean array), all by default.
        """
        rows = slice(None) if rows is None else rows
        return [aperture_photometry(img.data, img.variance, xs[rows], ys[rows], radius=radius,
                                    mask=img.mask)
                for img, (xs, ys) in zip(self.images, self.positions)]

    def enclosed(self, radius: float) -> tuple[float, float]:
        """The reference's over the image's `_aperture_correction` at ``radius``, error."""
        psfs = self.psfs or (None, None)
        (ref, ref_err), (img, img_err) = (_aperture_correction(table, psf, radius)
                                          for table, psf in zip(self.tables, psfs))
        return ref / img, ref / img * float(np.hypot(ref_err / ref, img_err / img))

    def isolated(self, radius: float) -> np.ndarray:
        """The stars with no other source within ``radius`` in either image.

        The sources are every detection (a table's ``meta['sources']``, as made by
        `~astro_zackay.stars.find_psf_stars`), else the table's own stars.
        """
        from scipy.spatial import cKDTree

        alone = np.ones(self.positions[0][0].size, bool)
        for table, (xs, ys) in zip(self.tables, self.positions):
            sources = table.meta.get("sources") or table
            tree = cKDTree(np.column_stack([np.asarray(sources["x"], float),
                                            np.asarray(sources["y"], float)]))
            points = np.column_stack([xs, ys])
            near = tree.query_ball_point(points, radius, return_length=True)
            itself = tree.query_ball_point(points, SAME_SOURCE, return_length=True)
            alone &= near == itself
        return alone


def _correction_ratio(
    stars: _Stars, aperture: float, small: tuple[np.ndarray, ...]
) -> tuple[float, float]:
    """The reference's over the image's aperture correction at ``aperture``, and its error.

    Measured on the images (the standard aperture correction): for the isolated
    stars bright in an aperture of `APCORR_RADIUS` FWHM in both images, the growth
    from ``aperture`` to that aperture in the image over that in the reference
    (`flux_ratio` of the two growths, so a variable star cancels), times the ratio
    of the light beyond it from the stars' Moffat fits (`_aperture_correction`). The
    Moffat fits of the cores miss the difference of the two images' wings: on
    properimage's pair (FWHM 2.8 and 2.9 px) the flux ratio grows by 0.7 % from an
    aperture of 1.5 FWHM to one of 3.5 FWHM, where they predict 0.2 %, so the ratio
    was 0.7 % high (1.0097 +- 0.0009 against 1.0015-1.0033 from large apertures).
    With fewer than `APCORR_MIN_STARS` such stars the ratio of the Moffat (or PSF)
    corrections at ``aperture`` serves, with its error.
    """
    f_ref, e_ref, f_img, e_img = small
    large = APCORR_RADIUS * stars.fwhm
    with np.errstate(invalid="ignore"):  # candidates: bright already in the small aperture
        rows = (stars.isolated(_annulus(large)[1]) & (f_ref > APCORR_SNR_MIN * e_ref)
                & (f_img > APCORR_SNR_MIN * e_img))
    if rows.sum() < APCORR_MIN_STARS:
        return stars.enclosed(aperture)
    (g_ref, ge_ref), (g_img, ge_img) = stars.photometry(large, rows)
    with np.errstate(invalid="ignore"):
        usable = (g_ref > APCORR_SNR_MIN * ge_ref) & (g_img > APCORR_SNR_MIN * ge_img)
    if usable.sum() < APCORR_MIN_STARS:
        return stars.enclosed(aperture)
    growth = [(g[usable] / f[rows][usable],
               np.sqrt(np.clip(ge**2 - e[rows] ** 2, 0.0, None))[usable] / f[rows][usable])
              for g, ge, f, e in ((g_ref, ge_ref, f_ref, e_ref), (g_img, ge_img, f_img, e_img))]
    ratio, error, _ = flux_ratio(growth[1][0], growth[1][1], growth[0][0], growth[0][1])
    beyond, beyond_err = stars.enclosed(large)
    log.info("aperture correction from %d isolated stars: the growth from %.1f to %.1f px "
             "differs by %.5f +- %.5f between the images", int(usable.sum()), aperture, large,
             ratio, error)
    return ratio * beyond, ratio * beyond * float(np.hypot(error / ratio, beyond_err / beyond))


@dataclass(frozen=True)
class StarMatch:
    """Stars matched between a reference and a second image, and what they measure.

    Attributes
    ----------
    n_matched : int
        Stars matched within the radius.
    flux_ratio, flux_ratio_error : float
        Flux of the image over flux of the reference (a ratio of FLUXES), clipped
        errors-in-variables fit through the origin (`flux_ratio`), with its error
        scaled by the square root of the reduced chi-square of the fit (and that of
        the aperture correction).
    offset, offset_error : tuple of float
        ``(dx, dy)``: the position in the image minus the position in the reference,
        in pixels, and its error.
    scatter : tuple of float
        ``(sigma_x, sigma_y)``: the registration scatter of the matched stars beyond
        their centroid errors, in pixels (the astrometric noise of the two images
        together).
    table : `~astropy.table.Table`
        The matched pairs: ``x``, ``y`` (in the image), ``x_ref``, ``y_ref``, ``ratio``,
        ``ratio_err`` and ``used`` (kept by the clipping).
    """

    n_matched: int
    flux_ratio: float
    flux_ratio_error: float
    offset: tuple[float, float]
    offset_error: tuple[float, float]
    scatter: tuple[float, float]
    table: Table


def _check_match_options(radius: Any, offset: Any, min_matches: Any) -> None:
    """Raise a ValueError or TypeError for `match_stars` options it cannot use, before any work."""
    try:
        value = float(radius)
    except (TypeError, ValueError):
        raise TypeError(f"radius must be a number of pixels, got {radius!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"radius must be a positive finite number of pixels, got {radius!r}: "
                         "give the largest distance of a match, e.g. radius=1.5")
    try:
        pair = np.asarray(offset, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"offset must be a (dx, dy) pair of numbers, got {offset!r}") from None
    if pair.shape != (2,) or not np.all(np.isfinite(pair)):
        raise ValueError(f"offset must be a finite (dx, dy) pair in pixels, got {offset!r}")
    if (isinstance(min_matches, bool) or not isinstance(min_matches, numbers.Integral)
            or min_matches < 1):
        raise ValueError(f"min_matches must be a whole number >= 1, got {min_matches!r}: a flux "
                         "ratio needs at least one matched star (5 by default)")


def _match_images(
    images: Any, psfs: Any
) -> tuple[ImageData, ImageData] | None:
    """``images`` as two `ImageData` (None when not given), after checking ``psfs``.

    Images that are not `ImageData` go through `~astro_zackay._ccd.to_image`; a TypeError
    or ValueError names the option for anything else (before any matching).
    """
    if psfs is not None:
        if images is None:
            raise ValueError("psfs= is used only with images= (for the aperture correction of "
                             "the photometry in the images): give images=(reference, image) "
                             "or leave psfs out")
        if not (isinstance(psfs, tuple | list) and len(psfs) == 2):
            raise TypeError(f"psfs must be a (reference, image) pair of 2-D PSF stamps, got "
                            f"{psfs!r:.80}")
        for which, stamp in zip(("reference", "image"), psfs):
            if stamp is not None and not (isinstance(stamp, np.ndarray) and stamp.ndim == 2):
                raise TypeError(f"psfs: the {which}'s PSF must be a 2-D array stamp (or None), "
                                f"got {type(stamp).__name__}")
    if images is None:
        return None
    if not (isinstance(images, tuple | list) and len(images) == 2):
        count = f"{len(images)} values" if isinstance(images, tuple | list) else repr(images)
        raise ValueError(f"images must be the two images (reference, image) whose stars are "
                         f"matched, got {count:.80}")
    converted = []
    for which, img in zip(("reference", "image"), images):
        if not isinstance(img, ImageData):
            with named_errors(f"images ({which})"):
                img = to_image(img)
        converted.append(img)
    return converted[0], converted[1]


def match_stars(
    reference: Table,
    image: Table,
    *,
    radius: float = 1.5,
    offset: tuple[float, float] = (0.0, 0.0),
    min_matches: int = 5,
    images: tuple[ImageData, ImageData] | None = None,
    psfs: tuple[np.ndarray, np.ndarray] | None = None,
) -> StarMatch:
    """Match two star lists by position and measure the flux ratio, offset and scatter.

    Parameters
    ----------
    reference, image : `~astropy.table.Table`
        Star lists with ``x``, ``y``, ``flux``, ``flux_err`` and optionally ``x_err``,
        ``y_err`` (as made by `~astro_zackay.stars.find_psf_stars`).
    radius : float
        Largest distance in pixels of a match, after applying ``offset``.
    offset : tuple of float
        A first guess of ``(dx, dy)`` = image minus reference position.
    min_matches : int
        Fewest matches accepted.
    images : (ImageData, ImageData), optional
        The reference and the image (a `~astropy.nddata.CCDData` or anything
        :func:`~astro_zackay._ccd.to_image` accepts is converted). When given, the
        flux ratio comes from
        `aperture_photometry` of the matched stars in apertures of radius 1.5 FWHM (of
        the broader PSF; the tables' ``meta['fwhm']``, else 3 px), times the ratio of
        the two images' aperture corrections: measured on at least
        `APCORR_MIN_STARS` isolated bright stars (their growth out to `APCORR_RADIUS`
        FWHM), else from the stars' own Moffat fits when the tables have them
        (`moffat_encircled_energy`), else from ``psfs``; its error is in the ratio's.
        Otherwise the ratio comes from the tables' ``flux`` columns.
    psfs : (ndarray, ndarray), optional
        Unit-sum PSF stamps of the reference and the image (either may be None), for
        the aperture correction of star tables without Moffat-fit columns; only with
        ``images``.

    Returns
    -------
    StarMatch

    Raises
    ------
    ValueError
        If fewer than ``min_matches`` stars match, or ``radius``, ``offset``,
        ``min_matches`` or ``images`` is not usable, or ``psfs`` is given without
        ``images`` (checked before any work).
    TypeError
        If a star list is not an `~astropy.table.Table`, or ``psfs`` is not a pair of
        2-D stamps.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.table import Table
    >>> from astro_zackay.fluxmatch import match_stars
    >>> rng = np.random.default_rng(0)
    >>> x, y, f = rng.uniform(0, 500, 30), rng.uniform(0, 500, 30), rng.uniform(1e3, 1e4, 30)
    >>> ref = Table({"x": x, "y": y, "flux": f, "flux_err": 0.01 * f})
    >>> new = Table({"x": x + 0.3, "y": y - 0.2, "flux": 0.8 * f, "flux_err": 0.008 * f})
    >>> m = match_stars(ref, new)
    >>> round(m.flux_ratio, 6), round(m.offset[0], 6), round(m.offset[1], 6)
    (0.8, 0.3, -0.2)
    """
    _check_match_options(radius, offset, min_matches)
    for name, table in (("reference", reference), ("image", image)):
        if not isinstance(table, Table):
            raise TypeError(
                f"the {name} star list is a {type(table).__name__}, not an astropy Table: "
                "give a Table with x, y, flux and flux_err columns (e.g. from find_psf_stars)"
            )
        missing = {"x", "y", "flux", "flux_err"} - set(table.colnames)
        if missing:
            raise ValueError(f"the {name} star list lacks the columns {sorted(missing)}")
    images = _match_images(images, psfs)
    rx = np.asarray(reference["x"], float) + offset[0]
    ry = np.asarray(reference["y"], float) + offset[1]
    ix, iy = np.asarray(image["x"], float), np.asarray(image["y"], float)
    if rx.size == 0 or ix.size == 0:
        raise ValueError("cannot match stars: one of the star lists is empty")
    distance = np.hypot(ix[:, None] - rx[None, :], iy[:, None] - ry[None, :])
    nearest = np.argmin(distance, axis=1)
    close = distance[np.arange(ix.size), nearest] < radius
    # one-to-one: a reference star claimed twice keeps only its closest partner
    order = np.argsort(distance[np.arange(ix.size), nearest])
    claimed: set[int] = set()
    for i in order:
        if close[i]:
            if nearest[i] in claimed:
                close[i] = False
            else:
                claimed.add(int(nearest[i]))
    if close.sum() < min_matches:
        raise ValueError(
            f"only {int(close.sum())} stars match within {radius} px (need {min_matches}): "
            "check that the images are registered (or give an offset guess / align)"
        )
    sel, ref_sel = np.flatnonzero(close), nearest[close]

    def col(table: Table, name: str, rows: np.ndarray) -> np.ndarray:
        if name in table.colnames:
            return np.asarray(table[name], float)[rows]
        return np.full(rows.size, np.nan)

    if images is None:
        f_img, e_img = col(image, "flux", sel), col(image, "flux_err", sel)
        f_ref, e_ref = col(reference, "flux", ref_sel), col(reference, "flux_err", ref_sel)
        factor, factor_err = 1.0, 0.0
    else:
        stars = _Stars((reference, image), images, psfs,
                       ((rx[ref_sel] - offset[0], ry[ref_sel] - offset[1]), (ix[sel], iy[sel])))
        aperture = 1.5 * stars.fwhm
        (f_ref, e_ref), (f_img, e_img) = stars.photometry(aperture)
        factor, factor_err = _correction_ratio(stars, aperture, (f_ref, e_ref, f_img, e_img))
    with np.errstate(invalid="ignore"):
        measured = np.isfinite(f_img) & np.isfinite(e_img) & np.isfinite(f_ref) & np.isfinite(
            e_ref) & (f_ref != 0)
    if measured.sum() < min_matches:
        where = ("apertures of 1.5 FWHM and their sky annuli (the others lie near the edge or "
                 "touch a masked pixel)" if images is not None else "finite flux and flux_err")
        raise ValueError(
            f"only {int(measured.sum())} of the {int(sel.size)} matched stars have {where}: "
            f"too few for a flux ratio (need {min_matches}); give the flux ratio, or use "
            "larger images"
        )
    raw_value, raw_error, used = flux_ratio(f_img, e_img, f_ref, e_ref)
    ratio_value = raw_value * factor
    ratio_error = ratio_value * float(np.hypot(raw_error / raw_value, factor_err / factor))
    ratio = f_img / f_ref * factor
    ratio_err = np.abs(ratio) * np.hypot(e_img / f_img, e_ref / f_ref)

    dx = ix[sel] - rx[ref_sel] + offset[0]
    dy = iy[sel] - ry[ref_sel] + offset[1]
    centroid = []
    for name in ("x_err", "y_err"):
        err = np.hypot(col(image, name, sel), col(reference, name, ref_sel))
        centroid.append(np.where(np.isfinite(err) & (err > 0), err, 0.05))
    mean_dx, err_dx, keep_x = _weighted_clipped_mean(dx, centroid[0])
    mean_dy, err_dy, keep_y = _weighted_clipped_mean(dy, centroid[1])

    def scatter(delta: np.ndarray, err: np.ndarray, keep: np.ndarray, mean: float) -> float:
        # robust total scatter minus the part the centroid errors explain
        total = mad_std(delta[keep], mean)
        return float(np.sqrt(max(total**2 - np.median(err[keep] ** 2), 0.0)))

    table = Table(
        {
            "x": ix[sel], "y": iy[sel], "x_ref": rx[ref_sel] - offset[0],
            "y_ref": ry[ref_sel] - offset[1], "ratio": ratio, "ratio_err": ratio_err,
            "used": used,
        }
    )
    result = StarMatch(
        n_matched=int(sel.size),
        flux_ratio=ratio_value,
        flux_ratio_error=ratio_error,
        offset=(mean_dx, mean_dy),
        offset_error=(err_dx, err_dy),
        scatter=(scatter(dx, centroid[0], keep_x, mean_dx),
                 scatter(dy, centroid[1], keep_y, mean_dy)),
        table=table,
    )
    log.info("matched %d stars: flux ratio %.5f +- %.5f, offset (%.4f, %.4f), scatter "
             "(%.4f, %.4f) px", result.n_matched, ratio_value, ratio_error,
             *result.offset, *result.scatter)
    return result
