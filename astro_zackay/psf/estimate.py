"""`estimate_psf`: the image-level step that turns an image into a `KLPSFModel`."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from astropy.table import Table

from .._ccd import to_image
from .._threads import single_threaded_blas
from .._warnings import PSFQualityWarning
from ..stars import find_psf_stars
from .analytic import fit_profile, mean_stamp, render_profile
from .kl import (
    design_matrix,
    evaluate_psf,
    fit_fields,
    image_scaling,
    kl_basis,
    n_components_from_inf_loss,
    polynomial_terms,
    scale_coordinates,
    select_n_components,
)
from .model import KLPSFModel
from .stamps import (
    StampSet,
    clean_neighbours,
    cut_stamps,
    fit_offsets,
    recentre,
    stamp_moments,
)

__all__ = ["estimate_psf"]

log = logging.getLogger(__name__)

METHODS = ("kl", "constant", "gaussian", "moffat")
#: largest number of eigen-PSFs tried when K is chosen from held-out stars
MAX_COMPONENTS = 8
#: a held-out median chi2/dof above this emits a PSFQualityWarning
CHI2_WARN = 1.3
#: fewest held-out stars for choosing K or reporting quality
MIN_HOLDOUT = 5


def _check_arguments(
    method: str,
    n_components: int | None,
    inf_loss: float | None,
    degree: int,
    stamp_shape: Any,
    holdout_fraction: float,
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
    if int(degree) != degree or degree < 0:
        raise ValueError(f"degree must be a non-negative integer, got {degree!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if method == "kl" and n_components is None and inf_loss is None and holdout_fraction == 0:
        raise ValueError(
            "K is chosen from held-out stars by default: give holdout_fraction > 0, "
            "or n_components / inf_loss"
        )
    if stamp_shape is None:
        return None
    shape = (stamp_shape, stamp_shape) if np.isscalar(stamp_shape) else tuple(stamp_shape)
    if len(shape) != 2 or any(int(n) != n or n < 3 or n % 2 == 0 for n in shape):
        raise ValueError(
            f"stamp_shape must be odd integers >= 3 (the PSF centre is the central "
            f"pixel), got {stamp_shape!r}"
        )
    return int(shape[0]), int(shape[1])


def _stamp_shape_from_fwhm(fwhm: float) -> tuple[int, int]:
    """Stamps reach 3 FWHM from the centre (at least 5, at most 40 pixels)."""
    half = int(np.clip(np.ceil(3.0 * fwhm), 5, 40))
    return 2 * half + 1, 2 * half + 1


def _default_stamp_shape(stars: Table, img: Any) -> tuple[int, int]:
    shape = stars.meta.get("stamp_shape")
    if shape is not None:
        return tuple(int(n) for n in shape)
    fwhm = stars.meta.get("fwhm")
    if fwhm is None and "fwhm" in stars.colnames:
        fwhm = float(np.nanmedian(stars["fwhm"]))
    if fwhm is None:
        # measure it: windowed moments of the brightest stars in generous stamps
        probe = cut_stamps(img.data, img.variance, img.mask, stars["x"], stars["y"], (31, 31))
        good = np.flatnonzero(probe.valid)
        if good.size == 0:
            raise ValueError(
                "no star has a clean 31x31 stamp to measure the FWHM: give stamp_shape"
            )
        good = good[np.argsort(probe.flux[good])[::-1][:20]]
        size, _, _ = stamp_moments(recentre(probe.data[good], probe.dx[good], probe.dy[good]), 4.0)
        fwhm = 2.3548 * np.sqrt(np.median(size) / 2.0)
    return _stamp_shape_from_fwhm(float(fwhm))


def _select_stars(stars: Table | None, image: Any, snr_min: float, kwargs: dict) -> Table:
    if stars is None:
        stars = find_psf_stars(image, snr_min=snr_min, **kwargs)
        log.info("find_psf_stars found %d PSF stars", len(stars))
        return stars
    if not isinstance(stars, Table) or not {"x", "y"} <= set(stars.colnames):
        raise TypeError("stars must be an astropy Table with columns 'x' and 'y' (0-based pixels)")
    stars = Table(stars, copy=True)
    if "snr" in stars.colnames:
        keep = np.asarray(stars["snr"], dtype=float) >= snr_min
        log.info("%d of %d given stars have snr >= %g", int(keep.sum()), len(stars), snr_min)
        stars = stars[keep]
    return stars


def _normalised(stamps: StampSet, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, ...]:
    """Recentred unit-sum stamps (flattened, neighbours cleaned), variances and star weights."""
    n = len(stamps)
    norm = (recentre(stamps.data, dx, dy) / stamps.flux[:, None, None]).reshape(n, -1)
    variance = (stamps.variance / stamps.flux[:, None, None] ** 2).reshape(n, -1)
    norm, _ = clean_neighbours(norm, variance)
    weights = 1.0 / np.sqrt(variance.sum(axis=1))
    return norm, variance, weights


def _held_out_quality(
    model: KLPSFModel, stamps: StampSet, x: np.ndarray, y: np.ndarray
) -> tuple[dict, dict]:
    """Per-star and summary quality of ``model`` on held-out stars."""
    psf = model.psf_at(x, y)
    dx, dy, flux, chi2 = fit_offsets(stamps, psf)
    n_pix = psf.shape[1] * psf.shape[2]
    chi2_dof = chi2 / (n_pix - 3)
    fitted = np.stack([f * p for f, p in zip(flux, recentre(psf, -dx, -dy))])
    residual = np.abs(stamps.data - fitted).sum(axis=(1, 2)) / flux
    noise = np.sqrt(2.0 / np.pi) * np.sqrt(stamps.variance).sum(axis=(1, 2)) / flux
    size_psf, e1_psf, e2_psf = stamp_moments(psf)
    window = float(np.sqrt(np.median(size_psf) / 2.0))
    t_model, e1_model, e2_model = stamp_moments(psf, window)
    t_star, e1_star, e2_star = stamp_moments(
        recentre(stamps.data, dx, dy) / flux[:, None, None], window
    )
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


def _choose_k(
    basis: np.ndarray,
    fields: np.ndarray,
    design: np.ndarray,
    stamps: StampSet,
) -> tuple[int, np.ndarray]:
    n_pix = basis.shape[1]
    chi2_dof = np.empty((basis.shape[0], len(stamps)))
    for k in range(1, basis.shape[0] + 1):
        psf = evaluate_psf(basis[:k], fields[:k], design).reshape(stamps.data.shape)
        chi2_dof[k - 1] = fit_offsets(stamps, psf)[3] / (n_pix - 3)
    n_components, scores, sigma = select_n_components(chi2_dof)
    log.info(
        "held-out median chi2/dof for K=1..%d: %s (one-standard-error band %.4f): K=%d",
        len(scores),
        np.array2string(scores, precision=4),
        sigma,
        n_components,
    )
    return n_components, scores


@single_threaded_blas
def estimate_psf(
    image: Any,
    stars: Table | None = None,
    *,
    n_components: int | None = None,
    inf_loss: float | None = None,
    degree: int = 2,
    stamp_shape: int | tuple[int, int] | None = None,
    method: str = "kl",
    holdout_fraction: float = 0.25,
    snr_min: float = 20.0,
    saturation: float | None = None,
    mask: np.ndarray | None = None,
    unit: Any = None,
    gain: float | None = None,
    seed: int | None = 0,
) -> KLPSFModel:
    """Estimate the PSF of an image from its stars (Karhunen-Loeve, constant or analytic).

    Stars (from `~astro_zackay.stars.find_psf_stars` unless given) are cut into stamps,
    background-subtracted (sigma-clipped mean of a 4-pixel ring around each
    stamp), recentred to the central pixel with a Fourier shift and normalised to
    unit sum. Their sub-pixel positions are refined twice by fitting the mean stamp.
    A random ``holdout_fraction`` of them is held out; the model is built from the
    rest:

    * ``'kl'``: eigen-PSFs from the SVD of the inverse-noise weighted stamps, each
      coefficient a polynomial of total degree ``degree`` in scaled coordinates,
      the PSF unit-sum everywhere. K is the smallest number of components whose
      median held-out chi2/dof is within one standard error of the best K
      (1..8), unless ``n_components`` (K itself) or ``inf_loss`` (the largest
      fraction of the eigen-spectrum that may be discarded, as in properimage)
      is given.
    * ``'constant'``: the weighted mean stamp (K = 1, no spatial variation).
    * ``'gaussian'`` / ``'moffat'``: an elliptical profile fitted to the mean stamp.

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
        when present; ``meta['fwhm']`` / ``meta['stamp_shape']`` set the stamp size.
    n_components : int, optional
        Number of eigen-PSFs K (``'kl'`` only).
    inf_loss : float, optional
        Choose K so that at most this fraction of the eigen-spectrum is discarded.
    degree : int, optional
        Total degree of the coefficient polynomials (``'kl'``).
    stamp_shape : int or tuple of int, optional
        Odd stamp shape; default 3 FWHM either side of the centre (kept as given).
    method : {'kl', 'constant', 'gaussian', 'moffat'}, optional
        The PSF model.
    holdout_fraction : float, optional
        Fraction of the stars held out to choose K and measure the quality.
    snr_min : float, optional
        Minimum signal-to-noise of the PSF stars.
    saturation : float, optional
        Saturation level in data units (stars touching it are rejected).
    mask : array-like of bool, optional
        Bad pixels (stars whose stamp touches one are rejected).
    unit : str or `~astropy.units.Unit`, optional
        The data unit, for inputs without one.
    gain : float, optional
        Electrons per data unit, to add source Poisson noise to an estimated variance
        when the image has no uncertainty.
    seed : int, optional
        Seed of the random train/holdout split.

    Returns
    -------
    KLPSFModel

    Raises
    ------
    ValueError
        For inconsistent arguments (both ``n_components`` and ``inf_loss``, an even
        ``stamp_shape``, ...) or too few usable stars.

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
    """
    shape = _check_arguments(method, n_components, inf_loss, degree, stamp_shape, holdout_fraction)
    img = to_image(image, unit=unit, mask=mask, saturation=saturation, gain=gain)
    finder_kwargs = {"unit": unit, "mask": mask, "saturation": saturation}
    if shape is not None:
        finder_kwargs["stamp_shape"] = shape
    stars = _select_stars(stars, image, snr_min, finder_kwargs)
    if shape is None:
        shape = _default_stamp_shape(stars, img)

    x = np.asarray(stars["x"], dtype=float)
    y = np.asarray(stars["y"], dtype=float)
    stamps = cut_stamps(img.data, img.variance, img.mask, x, y, shape)
    log.info(
        "%d of %d stars have clean %dx%d stamps (inside the image, unmasked, positive flux)",
        int(stamps.valid.sum()),
        len(stars),
        *shape,
    )
    stars = stars[stamps.valid]
    stamps = stamps.select(stamps.valid)
    n_terms = len(polynomial_terms(int(degree))) if method == "kl" else 1
    n_hold = int(round(holdout_fraction * len(stars)))
    n_train = len(stars) - n_hold
    need_hold = MIN_HOLDOUT if holdout_fraction > 0 else 0
    if n_train < n_terms + 5 or n_hold < need_hold:
        raise ValueError(
            f"too few usable PSF stars: {len(stars)} ({n_train} to train, {n_hold} held out); "
            f"method={method!r} with degree={degree} needs at least {n_terms + 5} training and "
            f"{need_hold} held-out stars. Lower snr_min or degree, or give more stars"
        )
    holdout = np.zeros(len(stars), dtype=bool)
    holdout[np.random.default_rng(seed).permutation(len(stars))[:n_hold]] = True
    train = ~holdout

    # sub-pixel positions: refine twice against the mean of the training stamps
    dx, dy = stamps.dx, stamps.dy
    for _ in range(2):
        norm, _, weights = _normalised(stamps, dx, dy)
        mean = mean_stamp(norm[train], weights[train] ** 2).reshape(shape)
        dx, dy, _, _ = fit_offsets(stamps, mean)
    refined = StampSet(
        stamps.data, stamps.variance, dx, dy, stamps.background, stamps.flux, stamps.valid
    )
    norm, norm_var, weights = _normalised(refined, dx, dy)
    x_fit = np.round(np.asarray(stars["x"], dtype=float)) + dx
    y_fit = np.round(np.asarray(stars["y"], dtype=float)) + dy

    selection = None
    meta: dict[str, float] = {}
    eigenvalues = None
    if method == "kl":
        scaling = image_scaling(img.shape)
        design = design_matrix(*scale_coordinates(x_fit, y_fit, scaling), polynomial_terms(degree))
        k_max = min(MAX_COMPONENTS, n_train - n_terms, norm.shape[1])
        if n_components is not None:
            k_max = int(n_components)
            if k_max > min(n_train - n_terms, norm.shape[1]):
                raise ValueError(
                    f"n_components={n_components} is too many for {n_train} training stars "
                    f"and {norm.shape[1]}-pixel stamps"
                )
        basis, eigenvalues = kl_basis(norm[train], weights[train], k_max)
        coefficients = norm[train] @ basis.T
        coefficient_var = norm_var[train] @ (basis**2).T
        fields, used = fit_fields(coefficients, coefficient_var, design[train])
        log.info("coefficient fields: %d of %d training stars kept", int(used.sum()), n_train)
        if inf_loss is not None:
            n_comp = min(n_components_from_inf_loss(eigenvalues, inf_loss), k_max)
        elif n_components is not None:
            n_comp = int(n_components)
        else:
            n_comp, selection = _choose_k(basis, fields, design[holdout], refined.select(holdout))
        basis, fields = basis[:n_comp].reshape(n_comp, *shape), fields[:n_comp]
        model_degree = int(degree)
    else:
        scaling = None
        mean = mean_stamp(norm[train], weights[train] ** 2).reshape(shape)
        if method == "constant":
            basis = mean[None]
        else:
            meta = fit_profile(mean, method)
            basis = render_profile(
                shape, meta["fwhm"], meta["ellipticity"], meta["theta"], meta.get("beta")
            )[None]
            log.info("fitted %s PSF: %s", method, meta)
        fields = np.ones((1, 1))
        model_degree = 0

    table = stars.copy(copy_data=True)
    table.meta = {}
    table["x_fit"] = x_fit
    table["y_fit"] = y_fit
    table["subset"] = np.where(holdout, "holdout", "train")
    model_args = {
        "image_shape": img.shape,
        "degree": model_degree,
        "scaling": scaling,
        "eigenvalues": eigenvalues,
        "selection": selection,
        "method": method,
        "meta": meta,
    }
    model = KLPSFModel(basis, fields, **model_args)
    quality: dict[str, float] = {"n_train": int(n_train), "n_holdout": int(n_hold)}
    if n_hold:
        per_star, summary = _held_out_quality(
            model, refined.select(holdout), x_fit[holdout], y_fit[holdout]
        )
        quality.update(summary)
        for name, values in per_star.items():
            column = np.full(len(table), np.nan)
            column[holdout] = values
            table[name] = column
        if summary["chi2_dof"] > CHI2_WARN:
            warnings.warn(
                f"the {method} PSF leaves a held-out median chi2/dof of "
                f"{summary['chi2_dof']:.2f}: it does not describe the stars to the noise "
                "(a PSF varying faster than degree allows, crowding, or a variance without "
                "source noise: give an uncertainty or gain)",
                PSFQualityWarning,
                stacklevel=2,
            )
    model = KLPSFModel(basis, fields, stars=table, quality=quality, **model_args)
    log.info("estimated PSF: %r", model)
    return model
