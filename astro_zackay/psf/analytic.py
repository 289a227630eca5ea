"""Constant and analytic (elliptical Gaussian / Moffat) PSFs: arrays in, arrays out.

The constant PSF is the weighted mean of the recentred unit-sum star stamps. The
analytic PSFs are fitted to that mean stamp (properimage's ``fitted_psf``) and rendered
centred on the stamp's central pixel with unit sum, both through
`astro_zackay.profiles.psf_stamp` (pixel-integrated profiles), so the package has one
profile renderer and one shape convention: ``fwhm`` along the major axis, the minor
axis ``fwhm * (1 - ellipticity)``, ``theta`` (radians) the angle of the major axis from
the x axis towards y; Moffat profiles are ``(1 + r**2 / alpha**2) ** -beta``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares

from ..profiles import GAUSS_FWHM, psf_stamp

__all__ = ["fit_profile", "mean_stamp", "render_profile"]


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


def render_profile(
    shape: tuple[int, int],
    fwhm: float,
    ellipticity: float = 0.0,
    theta: float = 0.0,
    beta: float | None = None,
) -> np.ndarray:
    """A unit-sum Gaussian (``beta=None``) or Moffat stamp centred on the central pixel.

    Rendered by `astro_zackay.profiles.psf_stamp` (pixel-integrated), whose
    conventions hold here: ``fwhm`` along the major axis, the minor axis
    ``fwhm * (1 - ellipticity)``, ``theta`` the major axis' angle from +x.

    Examples
    --------
    >>> from astro_zackay.psf.analytic import render_profile
    >>> stamp = render_profile((15, 15), 3.0, beta=2.5)
    >>> round(float(stamp.sum()), 12), bool(stamp[7, 7] == stamp.max())
    (1.0, True)
    """
    return psf_stamp(
        shape,
        fwhm,
        profile="gaussian" if beta is None else "moffat",
        ellipticity=ellipticity,
        theta=theta,
        beta=3.5 if beta is None else beta,
    )


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

    def unpack(p: np.ndarray) -> tuple:
        amp, xc, yc, log_a, log_b, theta = p[:6]
        a, b = np.exp(log_a), np.exp(log_b)
        beta = 1.0 + np.exp(min(p[6], 7.0)) if moffat else 3.5  # beta <= 1100: a Gaussian
        return amp, xc, yc, max(a, b), 1.0 - min(a, b) / max(a, b), theta, beta, a < b

    def residual(p: np.ndarray) -> np.ndarray:
        amp, xc, yc, fwhm, ell, theta, beta, swap = unpack(p)
        theta = theta + np.pi / 2 if swap else theta
        model = psf_stamp(stamp.shape, fwhm, profile=profile, ellipticity=ell, theta=theta,
                          beta=beta, center=(xc, yc))
        return (amp * model - stamp).ravel()

    start = [1.0, nx // 2, ny // 2, np.log(fwhm0), np.log(fwhm0), 0.0]
    if moffat:
        start.append(np.log(2.5))
    result = least_squares(residual, np.array(start, dtype=float), method="lm")
    _, _, _, fwhm, ell, theta, beta, swap = unpack(result.x)
    theta = (theta + (np.pi / 2 if swap else 0.0)) % np.pi
    fit = {"fwhm": float(fwhm), "ellipticity": float(ell), "theta": float(theta)}
    if moffat:
        fit["beta"] = float(beta)
    return fit
