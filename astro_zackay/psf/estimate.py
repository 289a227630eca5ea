"""`estimate_psf`: the image-level step that turns an image into a `KLPSFModel`.

The stages: stars (given or found) -> stamp size (shrunk before stars are lost at
the edge) -> background-subtracted stamps (a background map, or a ring beyond the
wings) -> an analytic outer wing fitted to the bright stars (`astro_zackay.psf.wings`)
-> stars left out whose stamps hold the wings of other sources -> neighbours
cleaned, then sub-pixel recentring -> the degradation ladder
(`astro_zackay.psf.ladder`) picks the model the stars support -> one builder per
method (`astro_zackay.psf.builders`) -> quality on held-out stars.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
from astropy.nddata import NDData
from astropy.table import Table
from scipy.spatial import cKDTree

from .._ccd import ImageData, to_image
from .._threads import single_threaded_blas
from .._warnings import FewStarsWarning, PSFQualityWarning, user_stacklevel
from ..profiles import GAUSS_FWHM
from ..stars import MASKED_MAX_FRACTION, _find_stars
from .analytic import ProfileFitError, fit_profile, mean_stamp
from .builders import (
    Built,
    TrainingSet,
    build_analytic,
    build_constant,
    build_gaussian,
    build_kl,
)
from .kl import design_matrix, image_scaling, polynomial_terms, scale_coordinates
from .ladder import Plan, plan_model
from .model import KLPSFModel
from .stamps import (
    StampSet,
    _distance,
    _grown_by_one,
    clean_neighbours,
    clipped_mean,
    cut_stamps,
    fit_offsets,
    recentre,
    recentre_unbiased,
    ring_offsets,
    row_median,
    stamp_fits,
    stamp_moments,
)
from .wings import Wing, fit_wing, light_reach, light_samples, profile_pixels, render_wing

__all__ = ["estimate_psf"]

log = logging.getLogger(__name__)

METHODS = ("kl", "constant", "gaussian", "moffat")
#: a held-out median chi2/dof above this emits a PSFQualityWarning
CHI2_WARN = 1.3
#: the core stamp reaches this many FWHM from the centre ...
CORE_FWHM = 3.0
#: ... and is shrunk down to this many FWHM to keep stars near the edge
MIN_CORE_FWHM = 2.0
#: the stamps' background ring lies this many FWHM out (further rings carry more of the
#: neighbours' faint light, which isolated stars lack; the wing's light there is restored)
RING_FWHM = 5.0
#: ... and is this many pixels wide
RING_WIDTH = 4.0
#: the wing and each bright star's residual background are fitted from 2 FWHM to this
#: many FWHM (the background is degenerate with the wing's slope over a shorter range) ...
WING_FIT_FWHM = 12.0
#: ... or this many pixels at most
WING_FIT_MAX = 100.0
#: without a wing, each stamp's background comes from its own pixels beyond this many FWHM
OUTER_FWHM = 2.0
#: ... when it has at least this many of them
MIN_OUTER_PIXELS = 20
#: rounds of position refinement against the mean stamp
REFINE = 1
#: K and the degree are chosen by the held-out chi2 within this many FWHM of the centre
SELECT_FWHM = 2.0
#: where the mean stamps of tiles of the field differ in size by more than this factor,
#: each star's recentring bias is that of its local profile; the tiles are ...
LOCAL_PROFILE_SPREAD = 1.2
#: ... PROFILE_TILES x PROFILE_TILES tiles of the field ...
PROFILE_TILES = 3
#: ... of at least this many training stars each
MIN_TILE_STARS = 8
#: number of bright stars whose stacked profile gives the wing
WING_STARS = 25
#: a star whose core stamp holds more of the other sources' light (by the wing law, net
#: of what its background ring takes off) than this many sigma of its sum's noise is
#: left out of the stamps (kept for the wing); at most half the stars are left out
CONTAMINATION_MAX = 10.0
#: the other sources' light is drawn out to where it falls below this fraction of the
#: sky noise per pixel
LIGHT_FLOOR = 0.01
#: a stamp's background ring keeps the pixels where the other sources' light is below
#: this many sigma of the sky
CLEAN_RING = 0.3


def _check_arguments(
    method: str,
    n_components: int | None,
    inf_loss: float | None,
    degree: int | None,
    stamp_shape: Any,
    holdout_fraction: float,
    fwhm: float | None,
    snr_min: float = 20.0,
    seed: Any = 0,
) -> tuple[int, int] | None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if n_components is not None and inf_loss is not None:
        raise ValueError("give n_components or inf_loss, not both")
    if n_components is not None and (int(n_components) != n_components or n_components < 1):
        raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
    if inf_loss is not None and not 0.0 <= inf_loss < 1.0:
        raise ValueError(f"inf_loss is a fraction of the eigen-spectrum in [0, 1), got {inf_loss}")
    if method != "kl" and (n_components not in (None, 1) or inf_loss is not None):
        raise ValueError(f"n_components/inf_loss only apply to method='kl', not {method!r}")
    if degree is not None and (int(degree) != degree or degree < 0):
        raise ValueError(f"degree must be a non-negative integer or None, got {degree!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if fwhm is not None and not (np.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"fwhm must be a positive number of pixels, got {fwhm!r}")
    if not (isinstance(snr_min, numbers.Real) and np.isfinite(snr_min) and snr_min > 0):
        raise ValueError(f"snr_min must be a positive finite number, got {snr_min!r}: the "
                         "lowest S/N of a PSF star (20 by default)")
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed < 0:
        raise ValueError(f"seed must be an integer >= 0 (or None, or a numpy Generator), got "
                         f"{seed!r}: it picks the held-out stars")
    try:
        np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise TypeError(f"seed must be an int, None or a numpy Generator, got {seed!r}: it "
                        "picks the held-out stars") from None
    if stamp_shape is None:
        return None
    shape = (stamp_shape, stamp_shape) if np.isscalar(stamp_shape) else tuple(stamp_shape)
    if len(shape) != 2 or any(int(n) != n or n < 3 or n % 2 == 0 for n in shape):
        raise ValueError(
            f"stamp_shape must be odd integers >= 3 (the PSF centre is the central "
            f"pixel), got {stamp_shape!r}"
        )
    return int(shape[0]), int(shape[1])


def _select_stars(
    stars: Table | None, img: ImageData, snr_min: float, stamp_shape: tuple[int, int] | None,
    fwhm: float | None,
) -> Table:
    if stars is None:
        try:
            stars = _find_stars(img, snr_min=snr_min, stamp_shape=stamp_shape)
        except ValueError as exc:
            if fwhm is None:
                raise ValueError(
                    f"{exc}. Give the PSF (reference_psf= / science_psf= to subtract, psfs= "
                    "to coadd), or fwhm= for a Gaussian PSF of that FWHM"
                ) from None
            log.info("no PSF stars (%s): a Gaussian of FWHM %g", exc, fwhm)
            return Table({"x": np.zeros(0), "y": np.zeros(0)})
        log.info("find_psf_stars found %d PSF stars", len(stars))
        return stars
    stars = Table(stars, copy=True)
    if "snr" in stars.colnames:
        keep = np.asarray(stars["snr"], dtype=float) >= snr_min
        log.info("%d of %d given stars have snr >= %g", int(keep.sum()), len(stars), snr_min)
        stars = stars[keep]
    return stars


def _measured_fwhm(stars: Table, img: Any) -> float | None:
    """The stars' FWHM: their table's, else windowed moments of the brightest stamps."""
    fwhm = stars.meta.get("fwhm")
    if fwhm is None and "fwhm" in stars.colnames and np.isfinite(stars["fwhm"]).any():
        fwhm = float(np.nanmedian(stars["fwhm"]))
    if fwhm is not None or len(stars) == 0:
        return fwhm
    probe = cut_stamps(img.data, img.variance, img.mask, stars["x"], stars["y"], (31, 31))
    good = np.flatnonzero(probe.valid)
    if good.size == 0:
        probe = cut_stamps(img.data, img.variance, img.mask, stars["x"], stars["y"], (15, 15))
        good = np.flatnonzero(probe.valid)
    if good.size == 0:
        return None
    good = good[np.argsort(probe.flux[good])[::-1][:20]]
    size, _, _ = stamp_moments(recentre(probe.data[good], probe.dx[good], probe.dy[good]), 4.0)
    return float(GAUSS_FWHM * np.sqrt(np.median(size) / 2.0))


def _side(fwhm: float, n_fwhm: float) -> int:
    return 2 * int(np.clip(np.ceil(n_fwhm * fwhm), 3, 60)) + 1


def _core_shape(stars: Table, img: Any, fwhm: float) -> tuple[int, int]:
    """The core stamp: +-3 FWHM, shrunk (to +-2 FWHM at least) when that keeps more stars.

    A smaller stamp is taken when the full one would lose more than a fifth of the
    stars that a +-2 FWHM stamp keeps; the wing model covers what it leaves out.
    """
    full = _side(fwhm, CORE_FWHM)
    smallest = min(_side(fwhm, MIN_CORE_FWHM), full)
    x, y = np.asarray(stars["x"], dtype=float), np.asarray(stars["y"], dtype=float)

    def n_fit(side: int) -> int:
        if "stamp_max" in stars.colnames:
            return int(np.sum(np.asarray(stars["stamp_max"]) >= side))
        return int(stamp_fits(x, y, img.shape, (side, side)).sum())

    wanted = 0.8 * n_fit(smallest)
    side = next(s for s in range(full, smallest - 1, -2) if n_fit(s) >= wanted or s == smallest)
    if side < full:
        log.info("core stamp shrunk from %d to %d pixels: %d instead of %d stars fit",
                 full, side, n_fit(side), n_fit(full))
    return side, side


def _check_stars(stars: Table | None) -> None:
    """Refuse given ``stars`` that are not a Table with numeric ``x`` and ``y`` columns."""
    if stars is None:
        return
    if not isinstance(stars, Table) or not {"x", "y"} <= set(stars.colnames):
        raise TypeError("stars must be an astropy Table with columns 'x' and 'y' (0-based "
                        f"pixels), got {type(stars).__name__}")
    for name in ("x", "y"):
        if np.asarray(stars[name]).dtype.kind not in "iuf":
            raise TypeError(f"the stars' {name!r} column holds {stars[name].dtype} values: give "
                            "pixel positions as numbers (0-based)")


def _sky_array(background: Any) -> np.ndarray | None:
    """The sky map of ``background`` (a BackgroundResult, NDData or array) as a float
    array, refused by name otherwise (its shape is checked against the image later)."""
    if background is None:
        return None
    sky = getattr(background, "sky", background)
    try:
        sky = np.asarray(sky.data if isinstance(sky, NDData) else sky, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(
            f"background must be a BackgroundResult, CCDData or array map of the image, got "
            f"{type(background).__name__}"
        ) from None
    return sky


def _sky_map(background: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """The sky map of ``background`` (`_sky_array`), refused by name unless it is a map
    of ``shape``."""
    sky = _sky_array(background)
    if sky is None:
        return None
    if sky.shape != tuple(shape):
        raise ValueError(
            f"background is a map of shape {sky.shape}, not of the image's {tuple(shape)}: "
            "give the image's own background map (e.g. estimate_background(image)), or none"
        )
    return sky


def _normalised(stamps: StampSet, dx: np.ndarray, dy: np.ndarray, outer: float | None,
                profile: dict[str, Any] | None = None) -> tuple[np.ndarray, ...]:
    """Recentred unit-sum stamps (flattened, neighbours cleaned), variances and star weights.

    With ``profile`` (a Moffat fit to the mean stamp), the error that the Fourier
    recentring of an undersampled star makes is subtracted (`recentring_bias`).

    With ``outer`` (a PSF without a wing there), each stamp's background is then taken
    from its own cleaned pixels beyond ``outer`` pixels (clipped mean): a ring further
    out carries the faint light of neighbours that an isolated star's stamp lacks.
    """
    n = len(stamps)
    shape = stamps.data.shape[1:]
    unit_sum = stamps.data / stamps.flux[:, None, None]
    norm = (recentre(unit_sum, dx, dy) if profile is None
            else recentre_unbiased(unit_sum, dx, dy, profile))
    variance = stamps.variance / stamps.flux[:, None, None] ** 2
    norm, replaced = clean_neighbours(norm, variance)
    log.debug("neighbours: %d pixels replaced in %d stamps", int(replaced.sum()),
              int(replaced.any(axis=(1, 2)).sum()))
    norm, variance = norm.reshape(n, -1), variance.reshape(n, -1)
    beyond = ~_aperture(shape, outer) if outer is not None else np.zeros(norm.shape[1], bool)
    if beyond.sum() >= MIN_OUTER_PIXELS:
        norm = norm - clipped_mean(norm[:, beyond])[:, None]
        total = norm.sum(axis=1, keepdims=True)
        norm, variance = norm / total, variance / total**2
    weights = 1.0 / np.sqrt(variance.sum(axis=1))
    return norm, variance, weights, shape


def _refine(stamps: StampSet, train: np.ndarray, outer: float | None,
            uv: tuple[np.ndarray, np.ndarray]
            ) -> tuple[StampSet, dict[str, Any] | None, tuple[str, ...]]:
    """Sub-pixel offsets refined against the mean of the training stamps (REFINE times).

    Also returns the Moffat profile of each star for `recentring_bias`: fitted to that
    mean, or where the PSF varies strongly to the mean stamps of tiles of the field
    (`_local_profile`; ``uv``: the stars' scaled coordinates). Only the training
    stamps are normalised for the means (the held-out stars take no part in them).
    When no Moffat profile describes the mean (a failed fit), the profile is None (no
    correction) and the third value says so, for the caller's warning.
    """
    dx, dy = stamps.dx, stamps.dy
    training = stamps.select(train)
    for _ in range(REFINE):
        norm, _, weights, shape = _normalised(training, dx[train], dy[train], outer)
        mean = np.tensordot(weights**2, norm, axes=1).reshape(shape)
        dx, dy, _, _ = fit_offsets(stamps, mean / mean.sum())
    refined = StampSet(stamps.data, stamps.variance, dx, dy, stamps.background, stamps.flux,
                       stamps.valid)
    try:
        profile = fit_profile(mean / mean.sum(), "moffat")
    except ProfileFitError as error:
        return refined, None, (f"stars recentred without the correction of the recentring "
                               f"error ({error})",)
    uv_train = (uv[0][train], uv[1][train])
    return refined, _local_profile(norm.reshape(-1, *shape), weights, uv_train, uv,
                                   profile), ()


def _tile_means(stamps: np.ndarray, weights: np.ndarray, u: np.ndarray,
                v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The weighted mean stamps of `PROFILE_TILES` x `PROFILE_TILES` tiles of the field.

    Returns the stamps, the tiles' ``(u, v)`` centres and star counts, for the tiles of
    at least `MIN_TILE_STARS`.
    """
    tile = (np.clip(((u + 1.0) / 2.0 * PROFILE_TILES).astype(int), 0, PROFILE_TILES - 1)
            + PROFILE_TILES * np.clip(((v + 1.0) / 2.0 * PROFILE_TILES).astype(int), 0,
                                      PROFILE_TILES - 1))
    members = [tile == t for t in np.unique(tile) if np.sum(tile == t) >= MIN_TILE_STARS]
    means = np.array([mean_stamp(stamps[k], weights[k] ** 2) for k in members])
    centres = np.array([(np.average(u[k], weights=weights[k] ** 2),
                         np.average(v[k], weights=weights[k] ** 2)) for k in members])
    return means, centres.reshape(-1, 2), np.array([k.sum() for k in members])


def _local_profile(stamps: np.ndarray, weights: np.ndarray, uv_train: tuple[np.ndarray, ...],
                   uv: tuple[np.ndarray, np.ndarray], profile: dict[str, float]) -> dict[str, Any]:
    """The Moffat profile at each star (scaled coordinates ``uv``), for its `recentring_bias`,
    from the training stars' ``stamps`` (normalised) and ``weights`` at ``uv_train``.

    ``profile`` (fitted to the mean stamp) everywhere, unless the mean stamps of tiles
    of the field (`_tile_means`) differ in size (their second moments in a window of
    twice the PSF's sigma) by more than a factor `LOCAL_PROFILE_SPREAD`: then the FWHM
    and ellipticity of each star come from Moffat fits to those stamps, interpolated by
    a weighted polynomial through the tiles' centres (quadratic with six tiles or more,
    linear with three), ``beta`` from the whole field. The recentring error grows
    steeply as the PSF gets sharper: one profile for a FWHM that runs from 2.2 to 4.9
    pixels left the sharp corner's PSF with an L1 error of 0.23.
    """
    u, v = uv
    means, centres, counts = _tile_means(stamps, weights, *uv_train)
    degree = 2 if len(counts) >= 6 else 1 if len(counts) >= 3 else None
    if degree is None:
        return profile
    size, _, _ = stamp_moments(means, profile["fwhm"] / GAUSS_FWHM * 2.0)
    if not (size.min() > 0 and size.max() > LOCAL_PROFILE_SPREAD**2 * size.min()):
        return profile
    try:
        fits = [fit_profile(mean, "moffat") for mean in means]
    except ProfileFitError as error:
        log.info("recentring bias from the whole field's profile: a tile's %s", error)
        return profile
    values = np.array([(f["fwhm"], f["ellipticity"] * np.cos(2 * f["theta"]),
                        f["ellipticity"] * np.sin(2 * f["theta"])) for f in fits])
    terms = polynomial_terms(degree)
    root_w = np.sqrt(counts)[:, None]
    coef = np.linalg.lstsq(design_matrix(centres[:, 0], centres[:, 1], terms) * root_w,
                           values * root_w, rcond=None)[0]
    fwhm, e1, e2 = (design_matrix(u, v, terms) @ coef).T
    fwhm = np.clip(fwhm, values[:, 0].min() / LOCAL_PROFILE_SPREAD,
                   values[:, 0].max() * LOCAL_PROFILE_SPREAD)
    log.info("recentring bias from %d tiles' profiles: FWHM %.2f-%.2f px", len(counts),
             fwhm.min(), fwhm.max())
    return {"fwhm": fwhm, "ellipticity": np.clip(np.hypot(e1, e2), 0.0, 0.9),
            "theta": 0.5 * np.arctan2(e2, e1), "beta": profile["beta"]}


def _held_out_quality(
    model: KLPSFModel, stamps: StampSet, x: np.ndarray, y: np.ndarray
) -> tuple[dict, dict]:
    """Per-star and summary quality of ``model`` (its core) on held-out stars.

    The chi-square (and the flux it is taken at) leaves out the pixels of neighbours
    (`_neighbour_pixels`), as the training stamps are cleaned of them: their light is
    not the PSF's misfit (one faint neighbour per stamp made it 1.5 with the exact
    variance and the true PSF).
    """
    psf = model.psf_at(x, y)
    dx, dy, flux, _ = fit_offsets(stamps, psf)
    centred = recentre(stamps.data, dx, dy)
    weight = np.where(_neighbour_pixels(centred / flux[:, None, None], stamps.variance
                                        / flux[:, None, None] ** 2), 0.0, 1.0 / stamps.variance)
    shifted = recentre(psf, -dx, -dy)
    flux = (shifted * stamps.data * weight).sum(axis=(1, 2)) / (shifted**2 * weight).sum(
        axis=(1, 2))
    fitted = flux[:, None, None] * shifted
    chi2 = ((stamps.data - fitted) ** 2 * weight).sum(axis=(1, 2))
    chi2_dof = chi2 / (np.count_nonzero(weight, axis=(1, 2)) - 3)
    residual = np.abs(stamps.data - fitted).sum(axis=(1, 2)) / flux
    noise = np.sqrt(2.0 / np.pi) * np.sqrt(stamps.variance).sum(axis=(1, 2)) / flux
    size_psf, _, _ = stamp_moments(psf)
    window = float(np.sqrt(np.median(size_psf) / 2.0))
    t_model, e1_model, e2_model = stamp_moments(psf, window)
    t_star, e1_star, e2_star = stamp_moments(centred / flux[:, None, None], window)
    per_star = {
        "chi2_dof": chi2_dof,
        "residual_fraction": residual,
        "noise_fraction": noise,
        "de1": e1_model - e1_star,
        "de2": e2_model - e2_star,
        "dsize": t_model / t_star - 1.0,
    }
    summary = {
        "chi2_dof": float(np.median(chi2_dof)),
        "residual_fraction": float(np.median(residual)),
        "noise_fraction": float(np.median(noise)),
        "ellipticity_rms": float(np.sqrt(np.mean(per_star["de1"] ** 2 + per_star["de2"] ** 2))),
        "size_error": float(np.median(per_star["dsize"])),
    }
    return per_star, summary


def _neighbour_pixels(centred: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """The pixels of ``(n, ny, nx)`` unit-sum stamps recentred on their stars (and of
    the stamps before the recentring) that hold neighbours' light: those
    `~astro_zackay.psf.stamps.clean_neighbours` replaces, with a margin of one pixel
    (the recentring moves them by up to half a pixel)."""
    _, replaced = clean_neighbours(centred, variance)
    return _grown_by_one(replaced)


def _aperture(shape: tuple[int, int], radius: float) -> np.ndarray:
    """Flattened boolean disk of ``radius`` pixels around the stamp's central pixel."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (np.hypot(yy - shape[0] // 2, xx - shape[1] // 2) <= radius).ravel()


def _build(plan: Plan, train: TrainingSet, hold: TrainingSet | None, n_components: int | None,
           inf_loss: float | None, fwhm: float) -> Built:
    if plan.method == "kl":
        return build_kl(train, hold, plan.degrees, n_components=n_components, inf_loss=inf_loss,
                        aperture=_aperture(train.shape, SELECT_FWHM * fwhm))
    if plan.method == "constant":
        return build_constant(train)
    return build_analytic(train, plan.method, fwhm)


class _Pixels(NamedTuple):
    """Pixels at fixed offsets around each star, ``(n_star, n_pix)``, and the wing law there."""

    index: np.ndarray  # flat image index (clipped to the image)
    inside: np.ndarray  # whether the pixel is inside the image
    radius: np.ndarray  # its distance from the star
    law: np.ndarray  # the wing law there, per unit flux


def _star_pixels(shape: tuple[int, int], x: np.ndarray, y: np.ndarray,
                 offsets: tuple[np.ndarray, np.ndarray], wing: Wing) -> _Pixels:
    """The pixels at integer ``offsets`` ``(dy, dx)`` from each star's nearest pixel."""
    ny, nx = shape
    rows = np.round(y).astype(int)[:, None] + offsets[0]
    cols = np.round(x).astype(int)[:, None] + offsets[1]
    inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    radius = _distance(cols - x[:, None], rows - y[:, None])
    index = np.clip(rows, 0, ny - 1) * nx + np.clip(cols, 0, nx - 1)
    return _Pixels(index, inside, radius, wing.law(radius))


def _stamp_offsets(core: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``(dy, dx)`` offsets of a stamp's pixels from its central one, flattened."""
    oy, ox = np.mgrid[-(core[0] // 2) : core[0] // 2 + 1, -(core[1] // 2) : core[1] // 2 + 1]
    return oy.ravel(), ox.ravel()


class _Light(NamedTuple):
    """The sources' light by the wing law (`~astro_zackay.psf.wings.stars_light`), and
    what it was drawn from."""

    image: np.ndarray
    flux: np.ndarray  # the stars' fluxes, first in the sources
    reach: np.ndarray  # how far out each star is drawn
    stamp: _Pixels  # the stars' stamp pixels
    ring: _Pixels  # the pixels of their background rings
    ring_level: np.ndarray | float = 0.0  # the stars' own wing light given back from the ring
    net: np.ndarray | float = 0.0  # the others' light in each star's stamp (`_net_light`)


def _other_sources(sources: dict | None, x: np.ndarray, y: np.ndarray,
                   fwhm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions and fluxes of the detections ``sources`` that are not the stars at ``x, y``.

    `~astro_zackay.stars.find_psf_stars` records every detection in its table's
    ``meta['sources']``, the crowded, saturated and extended ones too: their wings fall
    on the PSF stars' stamps.
    """
    if sources is None:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    sx, sy, flux = (np.asarray(sources[k], dtype=float) for k in ("x", "y", "flux"))
    good = np.isfinite(sx) & np.isfinite(sy) & (flux > 0)
    if x.size:
        xy = np.column_stack([x, y])
        dist, _ = cKDTree(xy).query(np.column_stack([sx, sy]))
        good &= dist > fwhm
    return sx[good], sy[good], flux[good]


def _fit_wing(img: Any, stamps: StampSet, x: np.ndarray, y: np.ndarray, fwhm: float,
              others: tuple[np.ndarray, ...], sky: np.ndarray | None, ring: float,
              core: tuple[int, int]) -> tuple[Wing, StampSet, _Light | None]:
    """The wing law of the brightest stars, the stamps with the law's light restored, and
    the light of all the sources (the stars and ``others``) by the law (None without a
    significant wing).

    The law is fitted twice, the second time to the profiles less the light of all the
    stars' wings but their own by the first law (a field of bright stars otherwise
    flattens it: beta 2.4 for 2.5). It is fitted out to 12 FWHM, each bright star with
    its own residual background (far out, a ring carries the light of neighbours too
    faint to clip, so that offset is only a nuisance here). A background ring from
    ``ring`` pixels out holds the law's mean over its pixels of each star's own wing:
    it is given back to every stamp (``law(ring)``, the law at its inner edge, is
    twice that for a Moffat beta 2.5 at 5 FWHM, a pedestal that raised the stamps'
    outer pixels 3-7 %).
    """
    bright = np.argsort(stamps.flux)[::-1][:WING_STARS]
    r_max = min(WING_FIT_FWHM * fwhm, WING_FIT_MAX)
    profiles = profile_pixels(img.data, img.variance, img.mask, x[bright], y[bright],
                              2.0 * fwhm, r_max)
    kwargs = {"fwhm": fwhm, "sky": sky,
              "background": stamps.background[bright] if sky is None else 0.0}
    wing, _ = fit_wing(profiles, stamps.flux[bright], **kwargs)
    if render_wing(wing, core) is None:  # no (significant) wing
        return wing, stamps, None
    floor = LIGHT_FLOOR * float(np.sqrt(np.median(stamps.variance[:, 0])))

    def reach(flux: np.ndarray) -> np.ndarray:
        return light_reach(np.concatenate([flux, others[2]]), wing, r_max + 1.0, floor)

    # drawn once, for the stars' full fluxes; their own fluxes below are smaller
    samples = light_samples(img.shape, np.concatenate([x, others[0]]),
                            np.concatenate([y, others[1]]), reach(stamps.flux), wing)

    # where the light is read: the stars' stamps and background rings
    pixels = (_star_pixels(img.shape, x, y, _stamp_offsets(core), wing),
              _star_pixels(img.shape, x, y, ring_offsets(ring, RING_WIDTH), wing))

    def all_light(flux: np.ndarray) -> _Light:
        radii = reach(flux)
        image = samples.image(np.concatenate([flux, others[2]]), radii)
        return _Light(image, flux, radii[: flux.size], *pixels)

    # by the first law; the stars' fluxes less the others' light in their stamps
    net = _net_light(all_light(stamps.flux))
    own = np.maximum(stamps.flux - net, 0.1 * stamps.flux)
    light = all_light(own)._replace(net=net)
    wing, _ = fit_wing(profiles, own[bright], **kwargs, neighbours=(light.image, wing))
    if render_wing(wing, core) is None:
        return wing, stamps, None
    if sky is not None:
        return wing, stamps, light
    ring_dy, ring_dx = ring_offsets(ring, RING_WIDTH)
    level = -float(np.mean(wing.law(_distance(ring_dy, ring_dx)))) * stamps.flux
    data = stamps.data - level[:, None, None]
    flux = data.sum(axis=(1, 2))
    wing = Wing(wing.amplitude / float(np.median(flux / stamps.flux)), wing.beta, wing.alpha,
                wing.amplitude_err)
    log.info("outer wing %s; %.3g of each star's flux per pixel given back from its ring",
             wing, -level[0] / stamps.flux[0])
    return wing, StampSet(data, stamps.variance, stamps.dx, stamps.dy,
                          stamps.background + level, flux, stamps.valid), light._replace(
                              ring_level=level)


def _others_light(light: _Light, pixels: _Pixels) -> np.ndarray:
    """The other sources' light at ``pixels`` of each star (the light image less the
    star's own law); NaN outside the image."""
    own = np.where(pixels.radius <= light.reach[:, None], light.flux[:, None] * pixels.law, 0.0)
    return np.where(pixels.inside, np.take(light.image, pixels.index) - own, np.nan)


def _without_others(img: Any, stamps: StampSet, light: _Light) -> StampSet:
    """The stamps less the other sources' light (by the law), their background from the
    ring pixels where that light is below `CLEAN_RING` sigma of the sky.

    A neighbour whose core lies in a star's background ring is clipped there, its
    wing is not: the ring background came out 5-7 e- high on a 200 e- sky and the
    stamps' outer pixels 12 % low (crowded one-bright field). The law's light is what
    remains after the clipping.
    """
    sigma = np.sqrt(np.median(stamps.variance[:, 0], axis=1))
    bad = ~(_others_light(light, light.ring) < CLEAN_RING * sigma[:, None])
    bad |= np.take(img.mask, light.ring.index)
    ring_level = stamps.background - light.ring_level
    clean = clipped_mean(np.where(bad, np.nan, np.take(img.data, light.ring.index)))
    shift = np.where((~bad).sum(axis=1) >= MIN_OUTER_PIXELS, clean - ring_level, 0.0)
    in_stamp = _others_light(light, light.stamp).reshape(stamps.data.shape)
    data = stamps.data - shift[:, None, None] - in_stamp
    log.debug("ring backgrounds without the other sources' light: median shift %.3g",
              float(np.median(shift)))
    return StampSet(data, stamps.variance, stamps.dx, stamps.dy, stamps.background + shift,
                    data.sum(axis=(1, 2)), stamps.valid)


def _net_light(light: _Light) -> np.ndarray:
    """The other sources' light in each stamp, net of what its background ring takes off.

    The light in the stamp less the stamp's area times the light's median over the
    background ring (the ring background is a clipped mean), by the wing law.
    """
    in_stamp = _others_light(light, light.stamp)
    return in_stamp.sum(axis=1) - in_stamp.shape[1] * row_median(_others_light(light, light.ring))


def _contamination(stamps: StampSet, light: _Light) -> np.ndarray:
    """The other sources' light in each stamp (`_net_light`), in sigma of the sum's noise.

    A brighter neighbour just outside the isolation radius slopes its wing across the
    stamp, which the mirror cleaning (`~astro_zackay.psf.stamps.clean_neighbours`)
    removes only on one side (Moffat bright pairs: 5 false candidates around 3e6 e-
    stars from one such star).
    """
    return np.abs(light.net) / np.sqrt(stamps.variance.sum(axis=(1, 2)))


def _uncontaminated(contamination: np.ndarray) -> np.ndarray:
    """The stars whose stamps are clean enough: at most `CONTAMINATION_MAX` sigma.

    When that would leave out more than half the stars, the cleaner half is kept.
    """
    keep = ~(contamination > CONTAMINATION_MAX)
    if keep.sum() < 0.5 * keep.size:
        keep = ~(contamination > np.median(contamination))
    log.info("%d of %d stars left out of the stamps: other sources' wings in them",
             int((~keep).sum()), keep.size)
    return keep


def _announce(steps: list[str], n_usable: int, n_given: int, shape: tuple[int, int],
              n_contaminated: int = 0) -> str:
    """One FewStarsWarning naming every step down; the steps, for the model's meta."""
    if not steps:
        return ""
    lost = n_given - n_usable - n_contaminated
    wings = f", {n_contaminated} with other sources' wings in it" if n_contaminated else ""
    text = (f"{n_usable} usable PSF stars ({n_given} given, {lost} without a clean "
            f"{shape[0]}x{shape[1]} stamp{wings}): " + "; ".join(steps))
    warnings.warn(text, FewStarsWarning, stacklevel=user_stacklevel())
    return "; ".join(steps)


@single_threaded_blas
def estimate_psf(
    image: Any,
    stars: Table | None = None,
    *,
    n_components: int | None = None,
    inf_loss: float | None = None,
    degree: int | None = None,
    stamp_shape: int | tuple[int, int] | None = None,
    method: str = "kl",
    holdout_fraction: float = 0.25,
    snr_min: float = 20.0,
    fwhm: float | None = None,
    background: Any = None,
    saturation: float | None = None,
    mask: np.ndarray | None = None,
    unit: Any = None,
    gain: float | None = None,
    seed: int | None = 0,
) -> KLPSFModel:
    """Estimate the PSF of an image from its stars (Karhunen-Loeve, constant or analytic).

    Stars (from `~astro_zackay.stars.find_psf_stars` unless given) are cut into stamps
    of +-3 FWHM (shrunk to as little as +-2 FWHM when that keeps stars near the
    edge), minus the background (the ``background`` map, else the clipped mean of a
    ring 5 FWHM out, with the light of the fitted wing there given back). The stamps
    are recentred with a Fourier shift (mirrored at their edges, so nothing wraps
    around and rings), normalised to unit sum, and neighbours in their wings are
    replaced by the star's own light at the same radius
    (`~astro_zackay.psf.stamps.clean_neighbours`); their sub-pixel positions are
    refined against the mean stamp. With a significant wing, a star whose stamp holds
    more than 10 sigma of the other sources' wings (by the fitted law, from every
    detection in the stars' ``meta['sources']``, net of what its background ring
    takes off) is left out of the stamps, at most half the stars
    (``model.meta['n_contaminated']``); it still serves the wing fit.

    What is built depends on the usable stars (the degradation ladder, never a dead
    end): a spatially varying KL PSF when they constrain its coefficient fields (the
    degree lowered until they do), a constant PSF (the mean stamp) with fewer than a
    degree-1 field needs, a Moffat profile fitted to 1-3 stars, and with none a round
    Gaussian of ``fwhm`` when it is given. A random ``holdout_fraction`` of the stars
    is held out when at least 5 would be; otherwise the quality is unmeasured
    (``quality['measured']`` False). Every step down from what was asked is announced
    once with a `~astro_zackay.FewStarsWarning` and recorded in ``model.meta``.

    * ``'kl'``: eigen-PSFs from the SVD of the inverse-noise weighted stamps, each
      coefficient a polynomial of total degree ``degree`` in scaled coordinates,
      the PSF unit-sum everywhere. K (1..8) and, when ``degree`` is None, the degree
      (0..3) are the simplest whose median held-out chi2/dof is within one standard
      error of the best, unless ``n_components`` (K itself) or ``inf_loss`` (the
      largest fraction of the eigen-spectrum that may be discarded, as in
      properimage) is given. Without held-out stars (fewer than 20 usable) they are
      chosen by 5-fold cross-validation of the training stars, the degree at most 2.
    * ``'constant'``: the weighted mean stamp (K = 1, no spatial variation).
    * ``'gaussian'`` / ``'moffat'``: an elliptical profile fitted to the mean stamp.

    The core stamp is extended by an analytic wing, a Moffat law ``A (1 + r**2 /
    alpha**2) ** -beta`` of the stars' FWHM fitted to the profiles of the brightest
    stars between 2 and 12 FWHM (each with its own residual background), out to where
    1e-3 of the flux remains, when the wing holds a significant flux outside the core
    (Moffat-like PSFs): ``psf_at`` returns core and wing, unit sum, the core stamp's
    corners (beyond its inscribed disk, where few stars leave it noisy) from the law. A given
    ``stamp_shape`` is kept as it is (no wing).

    The held-out stars measure the quality (``model.quality``): chi2/dof with the
    image variance, residual flux against the noise floor, ellipticity and size
    against the stars' own windowed moments.

    Parameters
    ----------
    image : `~astropy.nddata.CCDData`, `~astropy.nddata.NDData`, array, path or HDU
        The image (see `astro_zackay._ccd.to_image`); its uncertainty is the noise
        model of the held-out chi2.
    stars : `~astropy.table.Table`, optional
        Stars with ``x``, ``y`` (0-based pixels); ``snr`` (cut at ``snr_min``) is used
        when present, ``stamp_max`` (the largest odd stamp side that fits) too;
        ``meta['fwhm']`` (else the median ``fwhm``) sets the stamp size.
    n_components : int, optional
        Number of eigen-PSFs K (``'kl'`` only).
    inf_loss : float, optional
        Choose K so that at most this fraction of the eigen-spectrum is discarded.
    degree : int, optional
        Total degree of the coefficient polynomials (``'kl'``); default chosen from
        the held-out stars. A degree the stars cannot constrain is lowered (announced).
    stamp_shape : int or tuple of int, optional
        Odd stamp shape, kept as given; default +-3 FWHM plus the wing.
    method : {'kl', 'constant', 'gaussian', 'moffat'}, optional
        The PSF model asked for (stepped down when the stars cannot support it).
    holdout_fraction : float, optional
        Fraction of the stars held out to choose K and measure the quality.
    snr_min : float, optional
        Minimum signal-to-noise of the PSF stars.
    fwhm : float, optional
        FWHM (pixels) of a round Gaussian PSF to use when there is no usable star.
    background : `~astro_zackay.background.BackgroundResult`, CCDData or array, optional
        A background map of the image (e.g. from `~astro_zackay.estimate_background`),
        subtracted from the stamps instead of a local ring.
    saturation : float, optional
        Saturation level in data units (stars touching it are rejected).
    mask : array-like of bool, optional
        Bad pixels, OR-combined with the image's own. A star keeps its stamp when its
        masked pixels are at most 3 % of it, none within 1 FWHM of the centre: each is
        filled from its mirror pixel through the star (the star's own light at the same
        radius); otherwise it is rejected.
    unit : str or `~astropy.units.Unit`, optional
        The data unit, for inputs without one.
    gain : float, optional
        Electrons per data unit, to add source Poisson noise to an estimated variance
        when the image has no uncertainty.
    seed : int, optional
        Seed (an integer >= 0, None or a `numpy.random.Generator`) of the random
        train/holdout split.

    Returns
    -------
    KLPSFModel
        ``model.meta`` records ``method_used``, ``n_stars``, ``reason`` (the steps
        down, empty if none) and the wing law.

    Raises
    ------
    ValueError
        For inconsistent arguments (both ``n_components`` and ``inf_loss``, an even
        ``stamp_shape``, a negative ``seed``, a ``background`` that is not a map of
        the image's shape, ...), or no usable star and no ``fwhm``.
    TypeError
        For ``stars`` that are not a Table with numeric ``x`` and ``y`` columns, a
        ``background`` that is not a map of numbers, or a ``seed`` that is not an
        integer, None or a Generator; these and the arguments' values are checked
        before the image is read.

    Examples
    --------
    >>> from astro_zackay.simulation import simulate_image
    >>> from astro_zackay.psf import estimate_psf
    >>> sim = simulate_image((256, 256), psf=3.0, n_stars=40, flux_range=(2e4, 2e5),
    ...                      min_separation=20, seed=3)
    >>> model = estimate_psf(sim.ccd, sim.truth, method="constant")
    >>> model.n_components, round(float(model.psf_at(100, 100).sum()), 12)
    (1, 1.0)
    >>> model.quality["chi2_dof"] < 1.1
    True

    With three stars the ladder steps down to a fitted Moffat profile, and says so:

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     few = estimate_psf(sim.ccd, sim.truth[:3])
    >>> few.method, few.quality["measured"], caught[0].category.__name__
    ('moffat', False, 'FewStarsWarning')
    """
    shape = _check_arguments(method, n_components, inf_loss, degree, stamp_shape,
                             holdout_fraction, fwhm, snr_min, seed)
    _check_stars(stars)
    sky = _sky_array(background)
    img = to_image(image, unit=unit, mask=mask, saturation=saturation, gain=gain)
    return _estimate_psf(img, stars, n_components=n_components, inf_loss=inf_loss,
                         degree=degree, stamp_shape=shape, method=method,
                         holdout_fraction=holdout_fraction, snr_min=snr_min, fwhm=fwhm,
                         background=sky, seed=seed)


def _estimate_psf(
    img: ImageData,
    stars: Table | None = None,
    *,
    n_components: int | None = None,
    inf_loss: float | None = None,
    degree: int | None = None,
    stamp_shape: tuple[int, int] | None = None,
    method: str = "kl",
    holdout_fraction: float = 0.25,
    snr_min: float = 20.0,
    fwhm: float | None = None,
    background: Any = None,
    seed: int | None = 0,
) -> KLPSFModel:
    """`estimate_psf` on an image already coerced (`~astro_zackay._ccd.to_image`).

    The array-level step that orchestrators call with the image they coerced once
    (stars, when not given, are found on the same image); the arguments are checked
    by the public function (``stamp_shape`` as the checked tuple or None).
    """
    shape = stamp_shape
    if shape is not None and (shape[0] > img.shape[0] or shape[1] > img.shape[1]):
        raise ValueError(
            f"stamp_shape {shape} is larger than the image {img.shape}: give a stamp_shape "
            "that fits the image (a few FWHM of the stars)"
        )
    sky = _sky_map(background, img.shape)
    stars = _select_stars(stars, img, snr_min, shape, fwhm)
    star_fwhm = _measured_fwhm(stars, img)
    if star_fwhm is None and fwhm is None:
        plan_model(np.zeros(0), np.zeros(0), method=method, degree=degree,
                   holdout_fraction=holdout_fraction, have_fwhm=False)  # raises: no star
    star_fwhm = fwhm if star_fwhm is None else star_fwhm
    core = shape if shape is not None else _core_shape(stars, img, star_fwhm)
    ring = max(RING_FWHM * star_fwhm, max(core) / 2.0 + 2.0)
    x = np.asarray(stars["x"], dtype=float)
    y = np.asarray(stars["y"], dtype=float)
    stamps = cut_stamps(img.data, img.variance, img.mask, x, y, core, sky=sky,
                        background_radius=ring, annulus=RING_WIDTH,
                        max_masked=MASKED_MAX_FRACTION, core_radius=max(star_fwhm, 1.5))
    log.info("%d of %d stars have clean %dx%d stamps (inside the image, at most a few masked "
             "pixels in the wings, positive flux)", int(stamps.valid.sum()), len(stars), *core)
    n_given = len(stars)
    order = np.random.default_rng(seed).permutation(int(stamps.valid.sum()))
    rows = np.flatnonzero(stamps.valid)[order]  # the stars used, as rows of the table
    stamps = stamps.select(rows)
    x, y = x[rows], y[rows]
    n_contaminated = 0
    if rows.size:
        others = _other_sources(stars.meta.get("sources"), x, y, star_fwhm)
        wing, stamps, light = _fit_wing(img, stamps, x, y, star_fwhm, others, sky, ring, core)
        if light is not None and sky is None:
            stamps = _without_others(img, stamps, light)
        if light is not None:
            keep = _uncontaminated(_contamination(stamps, light))
            n_contaminated = int((~keep).sum())
            rows, stamps, x, y = rows[keep], stamps.select(keep), x[keep], y[keep]
    scaling = image_scaling(img.shape)
    u, v = scale_coordinates(x, y, scaling)
    plan = plan_model(u, v, method=method, degree=degree, holdout_fraction=holdout_fraction,
                      have_fwhm=fwhm is not None)
    n_usable = rows.size
    meta: dict[str, Any] = {"method_used": plan.method, "n_stars": n_usable,
                            "n_contaminated": n_contaminated, "fwhm_stars": float(star_fwhm)}
    if n_usable == 0:
        meta["reason"] = _announce(list(plan.steps), n_usable, n_given, core)
        built = build_gaussian(core, fwhm)
        return _assemble(img, built, plan, None, None, {**built.meta, **meta}, None, None)

    significant = render_wing(wing, core)
    wing_stamp = None if shape is not None else significant
    outer = None if significant is not None else OUTER_FWHM * star_fwhm
    holdout = np.zeros(n_usable, dtype=bool)
    holdout[n_usable - plan.n_holdout :] = True
    stamps, profile, refine_steps = _refine(stamps, ~holdout, outer,
                                            scale_coordinates(x, y, scaling))
    norm, norm_var, weights, _ = _normalised(stamps, stamps.dx, stamps.dy, outer, profile)
    x_fit = np.round(x) + stamps.dx
    y_fit = np.round(y) + stamps.dy
    u, v = scale_coordinates(x_fit, y_fit, scaling)
    everything = TrainingSet(norm, norm_var, weights, u, v, core)
    hold = everything.select(holdout) if plan.n_holdout else None
    built = _build(plan, everything.select(~holdout), hold, n_components, inf_loss,
                   star_fwhm)
    steps = list(plan.steps + built.steps + refine_steps)
    if built.method:
        plan = replace(plan, method=built.method)
        meta["method_used"] = built.method
    if plan.method == "kl" and n_components is not None and len(built.basis) < n_components:
        steps.append(f"K={len(built.basis)} instead of n_components={n_components} "
                     f"({int((~holdout).sum())} training stars)")
    meta["reason"] = _announce(steps, n_usable, n_given, core, n_contaminated)
    meta.update(built.meta)
    meta.update({"wing_amplitude": wing.amplitude, "wing_beta": wing.beta,
                 "wing_alpha": wing.alpha,
                 "wing_fraction": 0.0 if wing_stamp is None else float(wing_stamp.sum())})

    table = stars[rows]  # one slice of the table (a copy), at the end
    table.meta = {}
    table["x_fit"] = x_fit
    table["y_fit"] = y_fit
    table["subset"] = np.where(holdout, "holdout", "train")
    return _assemble(img, built, plan, table, (stamps, holdout, x_fit, y_fit), meta,
                     wing_stamp, scaling)


def _assemble(img: Any, built: Built, plan: Plan, table: Table | None, held: tuple | None,
              meta: dict, wing: np.ndarray | None, scaling: Any) -> KLPSFModel:
    """The model, with the quality measured on the held-out stars when there are some."""
    args = {
        "image_shape": img.shape,
        "degree": built.degree,
        "scaling": scaling,
        "eigenvalues": built.eigenvalues,
        "selection": built.selection,
        "method": plan.method,
        "meta": meta,
    }
    n_train = 0 if table is None else int(np.sum(table["subset"] == "train"))
    quality: dict[str, Any] = {"n_train": n_train, "n_holdout": plan.n_holdout,
                               "measured": bool(plan.n_holdout), "chi2_dof": np.nan}
    if plan.n_holdout:
        stamps, holdout, x_fit, y_fit = held
        core = KLPSFModel(built.basis, built.fields, **args)
        per_star, summary = _held_out_quality(
            core, stamps.select(holdout), x_fit[holdout], y_fit[holdout]
        )
        quality.update(summary)
        for name, values in per_star.items():
            column = np.full(len(table), np.nan)
            column[holdout] = values
            table[name] = column
        if summary["chi2_dof"] > CHI2_WARN:
            warnings.warn(
                f"the {plan.method} PSF leaves a held-out median chi2/dof of "
                f"{summary['chi2_dof']:.2f}: it does not describe the stars to the noise "
                "(a PSF varying faster than the degree allows, crowding, or a variance "
                "without source noise: give an uncertainty or gain)",
                PSFQualityWarning,
                stacklevel=user_stacklevel(),
            )
    model = KLPSFModel(built.basis, built.fields, stars=table, quality=quality, wing=wing, **args)
    log.info("estimated PSF: %r", model)
    return model
