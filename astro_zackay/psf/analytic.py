"""Constant and analytic (elliptical Gaussian / Moffat) PSFs: arrays in, arrays out.

The constant PSF is the weighted mean of the recentred unit-sum star stamps. The
analytic PSFs are fitted to that mean stamp (properimage's ``fitted_psf``) and rendered
centred on the stamp's central pixel with unit sum, both through the pixel integrator
of `astro_zackay.profiles` (that of `~astro_zackay.profiles.psf_stamp`, here with 3x3
Gauss-Legendre points per pixel), so the package has one profile renderer and one shape
convention: ``fwhm`` along the major axis, the minor
axis ``fwhm * (1 - ellipticity)``, ``theta`` (radians) the angle of the major axis from
the x axis towards y; Moffat profiles are ``(1 + r**2 / alpha**2) ** -beta``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import least_squares

from ..profiles import GAUSS_FWHM, _pixel_integrated, _stamp

__all__ = ["BETA_EDGE", "ProfileFitError", "fit_profile", "mean_stamp", "render_profile"]

#: a Moffat fit that ends with ``beta - 1`` below this ran to the edge of the index's
#: domain (at ``beta = 1`` the flux diverges): a flat pedestal under the stars that no
#: profile describes. A heavy halo converges at a finite index (1.03 for a 3 px core in
#: a 12 px halo of 4 times its flux) and is kept.
BETA_EDGE = 1e-6


class ProfileFitError(RuntimeError):
    """`fit_profile` found no profile that describes the stamp (a failed fit).

    Raised when the fit does not converge, when a Moffat index runs down to 1
    (`BETA_EDGE`), or when the profile's FWHM grows over half the stamp: the stamp is
    dominated by something else than one star (a background, neighbours, noise).
    """


def mean_stamp(stamps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of ``(n, ny, nx)`` unit-sum stamps, renormalised to unit sum.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.analytic import mean_stamp
    >>> mean_stamp(np.array([[[0.0, 1.0]], [[0.5, 0.5]]]), np.array([1.0, 1.0])).tolist()
    [[0.25, 0.75]]
    """
    mean = np.tensordot(weights, stamps, axes=1)
    return mean / mean.sum()


def _render(shape: tuple[int, int], fwhm: float, ellipticity: float, theta: float,
            profile: str, beta: float, center: tuple[float, float]) -> np.ndarray:
    """A unit-sum profile centred at ``center`` = ``(x, y)``, integrated over each pixel by
    3x3 Gauss-Legendre points: closer than 5x5 midpoints (ten times for a FWHM 2 px
    Moffat, which the midpoints widen by their own spread, 1/12 px**2 per axis), at a
    third of the cost. `~astro_zackay.profiles.psf_stamp`'s renderer and checks: a
    centre off the stamp, or a bad FWHM, ellipticity or beta, is a `ValueError`."""
    return _stamp(shape, fwhm, profile, ellipticity, theta, beta, center, 3, gauss=True)


def render_profile(
    shape: tuple[int, int],
    fwhm: float,
    ellipticity: float = 0.0,
    theta: float = 0.0,
    beta: float | None = None,
) -> np.ndarray:
    """A unit-sum Gaussian (``beta=None``) or Moffat stamp centred on the central pixel.

    Pixel-integrated (3x3 Gauss-Legendre points per pixel), with the conventions of
    `astro_zackay.profiles.psf_stamp`: ``fwhm`` along the major axis, the minor axis
    ``fwhm * (1 - ellipticity)``, ``theta`` the major axis' angle from +x. The same
    renderer as `fit_profile`'s, so that a fitted profile renders back what it fitted.

    Examples
    --------
    >>> from astro_zackay.psf.analytic import render_profile
    >>> stamp = render_profile((15, 15), 3.0, beta=2.5)
    >>> round(float(stamp.sum()), 12), bool(stamp[7, 7] == stamp.max())
    (1.0, True)
    """
    profile = "gaussian" if beta is None else "moffat"
    return _render(tuple(shape), float(fwhm), float(ellipticity), float(theta), profile,
                   3.5 if beta is None else float(beta), (shape[1] // 2, shape[0] // 2))


def fit_profile(stamp: np.ndarray, profile: str) -> dict[str, float]:
    """Fit an elliptical Gaussian or Moffat profile to a unit-sum stamp.

    Parameters
    ----------
    stamp : `~numpy.ndarray`
        ``(ny, nx)`` stamp with the star near the central pixel.
    profile : {'gaussian', 'moffat'}
        The profile.

    Returns
    -------
    dict
        ``fwhm``, ``ellipticity``, ``theta`` and, for Moffat, ``beta``.

    Raises
    ------
    ProfileFitError
        When no profile of the kind describes the stamp (see `ProfileFitError`);
        the steps of the fit stay where the profile is defined (``beta > 1``), and
        a fit that ends where it describes no star is reported, never returned.

    Examples
    --------
    >>> from astro_zackay.psf.analytic import fit_profile, render_profile
    >>> fit = fit_profile(render_profile((21, 21), 4.0, 0.2, 0.5), "gaussian")
    >>> round(fit["fwhm"], 4), round(fit["ellipticity"], 4), round(fit["theta"], 4)
    (4.0, 0.2, 0.5)
    """
    if profile not in ("gaussian", "moffat"):
        raise ValueError(f"profile must be 'gaussian' or 'moffat', got {profile!r}")
    ny, nx = stamp.shape
    yy, xx = np.mgrid[:ny, :nx]
    total = stamp.sum()
    mxx = float((stamp * (xx - nx // 2) ** 2).sum() / total)
    myy = float((stamp * (yy - ny // 2) ** 2).sum() / total)
    fwhm0 = GAUSS_FWHM * np.sqrt(max(0.5 * (mxx + myy), 0.25))
    moffat = profile == "moffat"
    start = [1.0, nx // 2, ny // 2, np.log(fwhm0), np.log(fwhm0), 0.0]
    if moffat:
        start.append(np.log(2.5))
    residuals = _ProfileResiduals(stamp, moffat)
    result = least_squares(residuals, np.array(start, dtype=float), jac=residuals.jacobian,
                           method="lm")
    _, _, _, fwhm, ell, theta, beta = residuals.unpack(result.x[None])
    fit = {"fwhm": float(fwhm[0]), "ellipticity": float(ell[0]), "theta": float(theta[0] % np.pi)}
    if moffat:
        fit["beta"] = float(beta[0])
    failure = _failure(result, fit, stamp.shape)
    if failure:
        raise ProfileFitError(f"the {profile} fit to the mean stamp failed: {failure}")
    return fit


def _failure(result: Any, fit: dict[str, float], shape: tuple[int, int]) -> str:
    """Why a fit of `fit_profile` does not describe its stamp ("" when it does)."""
    if result.status <= 0 or not np.all(np.isfinite(result.x)):
        return f"no convergence ({result.message})"
    if "beta" in fit and fit["beta"] - 1.0 < BETA_EDGE:
        return "the Moffat index ran down to 1 (a pedestal of background or neighbours' light)"
    if fit["fwhm"] > min(shape) / 2.0:
        return (f"a FWHM of {fit['fwhm']:.3g} px, over half the {shape[0]}x{shape[1]} stamp "
                "(a background or neighbours' light)")
    return ""


class _ProfileResiduals:
    """The residuals of `fit_profile` (``amp * profile - stamp``) and their Jacobian by
    forward differences (MINPACK's steps), the perturbed profiles rendered together.

    The parameters are amplitude, centre ``(x, y)``, the logs of the two axes, the angle
    and (Moffat) ``ln(beta - 1)``. Rendering the 7 profiles of a Jacobian as one batch
    takes a third of the time of 7 renders.
    """

    #: MINPACK's forward-difference step relative to the parameter
    STEP = float(np.sqrt(np.finfo(float).eps))

    def __init__(self, stamp: np.ndarray, moffat: bool) -> None:
        self.stamp = stamp
        self.moffat = moffat

    def unpack(self, p: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(n, n_par)`` parameters as amplitude, x, y, FWHM, ellipticity, angle, beta.

        The trial steps stay where the renderer is defined: centres on the stamp, axes
        of 0.02-400 px, beta from ``1 + 1.7e-15`` (never 1, where the flux diverges) to
        1100 (a Gaussian); a fit that ends within `BETA_EDGE` of 1 is reported as failed.
        """
        ny, nx = self.stamp.shape
        a, b = np.exp(np.clip(p[:, 3], -4.0, 6.0)), np.exp(np.clip(p[:, 4], -4.0, 6.0))
        major = np.maximum(a, b)
        beta = (1.0 + np.exp(np.clip(p[:, 6], -34.0, 7.0)) if self.moffat
                else np.full(len(p), 3.5))
        theta = np.where(a < b, p[:, 5] + np.pi / 2, p[:, 5])
        return (p[:, 0], np.clip(p[:, 1], 0.0, nx - 1.0), np.clip(p[:, 2], 0.0, ny - 1.0),
                major, 1.0 - np.minimum(a, b) / major, theta, beta)

    def models(self, p: np.ndarray) -> np.ndarray:
        """``(n, ny * nx)`` unit-sum profiles times their amplitudes; ``p`` of one beta."""
        ny, nx = self.stamp.shape
        amp, xc, yc, fwhm, ell, theta, beta = self.unpack(p)
        stars = _pixel_integrated(np.arange(nx) - xc[:, None], np.arange(ny) - yc[:, None],
                                  fwhm, ell, theta, "moffat" if self.moffat else "gaussian",
                                  float(beta[0]), 3, gauss=True).reshape(len(p), -1)
        return amp[:, None] * stars / stars.sum(axis=1, keepdims=True)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return self.models(p[None])[0] - self.stamp.ravel()

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        """``(ny * nx, n_par)`` forward differences, each step ``STEP * |p_j|``."""
        step = self.STEP * np.abs(p)
        step[step == 0] = self.STEP
        trials = p + np.diag(step)
        same_beta = 6  # the last, beta, trial is rendered on its own
        base, *shifted = np.split(self.models(np.vstack([p[None], trials[:same_beta]])),
                                  [1], axis=0)
        columns = [shifted[0]]
        if self.moffat:
            columns.append(self.models(trials[same_beta:]))
        return ((np.concatenate(columns) - base) / step[:, None]).T
