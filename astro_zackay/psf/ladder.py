"""The PSF degradation ladder: which model the usable stars can support.

From many stars spread over the field down to none, the ladder steps down
through a spatially varying Karhunen-Loeve PSF (the polynomial degree lowered
until the stars constrain every term), a constant PSF (the weighted mean stamp),
a Moffat profile fitted to a handful of stars, and a Gaussian of a FWHM the user
gives; with no star and no FWHM there is nothing to build and the caller must
say what to use. Stars are held out to measure the quality only when enough
remain to train the model. Arrays in, a `Plan` out; the caller announces the steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kl import design_matrix, polynomial_terms

__all__ = ["Plan", "plan_model", "spread_ok", "stars_needed"]

#: fewest held-out stars for choosing K and the degree, or reporting quality
MIN_HOLDOUT = 5
#: fewest stars for a constant (mean-stamp) PSF; fewer get a fitted Moffat profile
MIN_CONSTANT = 4
#: training stars per polynomial term of a KL coefficient field (plus MIN_CONSTANT - 1)
STARS_PER_TERM = 2
#: highest degree tried when the degree is chosen from held-out stars
MAX_DEGREE = 3
#: the degree used when no stars are held out to choose it
DEFAULT_DEGREE = 2
#: smallest singular value of the stars' design matrix, relative to that of stars
#: covering the whole image, for the stars to constrain a polynomial field
SPREAD_MIN = 0.3


@dataclass(frozen=True)
class Plan:
    """What to build from the usable stars.

    Attributes
    ----------
    method : str
        ``'kl'``, ``'constant'``, ``'moffat'`` or ``'gaussian'``.
    degrees : tuple of int
        The KL polynomial degrees to try (one: used as it is; several: chosen by
        the held-out stars). ``(0,)`` for the other methods.
    n_holdout : int
        Stars held out for choosing and for the quality (0: quality unmeasured).
    steps : tuple of str
        What was stepped down from what was asked, and why (empty: as asked).
    """

    method: str
    degrees: tuple[int, ...]
    n_holdout: int
    steps: tuple[str, ...]

    @property
    def degree(self) -> int:
        """The highest degree of the plan."""
        return max(self.degrees)


def stars_needed(degree: int) -> int:
    """Training stars a KL PSF of total degree ``degree`` needs.

    Examples
    --------
    >>> from astro_zackay.psf.ladder import stars_needed
    >>> [stars_needed(d) for d in range(4)]
    [5, 9, 15, 23]
    """
    return STARS_PER_TERM * len(polynomial_terms(degree)) + MIN_CONSTANT - 1


def spread_ok(u: np.ndarray, v: np.ndarray, degree: int) -> bool:
    """Whether stars at scaled coordinates ``(u, v)`` constrain a polynomial of ``degree``.

    The smallest singular value of their design matrix (per star) must reach
    `SPREAD_MIN` of that of stars covering the whole ``[-1, 1]`` square: stars in
    one corner or along one line cannot fix a field over the image.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.ladder import spread_ok
    >>> u, v = np.meshgrid(np.linspace(-0.9, 0.9, 5), np.linspace(-0.9, 0.9, 5))
    >>> spread_ok(u.ravel(), v.ravel(), 2), spread_ok(u.ravel(), 0 * v.ravel(), 1)
    (True, False)
    """
    if degree == 0:
        return True
    terms = polynomial_terms(degree)
    gu, gv = np.meshgrid(np.linspace(-1, 1, 12), np.linspace(-1, 1, 12))
    reference = _smallest_singular(design_matrix(gu.ravel(), gv.ravel(), terms))
    return _smallest_singular(design_matrix(u, v, terms)) >= SPREAD_MIN * reference


def _smallest_singular(design: np.ndarray) -> float:
    if design.shape[0] < design.shape[1]:
        return 0.0
    return float(np.linalg.svd(design / np.sqrt(len(design)), compute_uv=False)[-1])


def _kl_degree(u: np.ndarray, v: np.ndarray, top: int) -> tuple[int, str]:
    """The highest degree <= ``top`` the training stars support, and why not higher."""
    why = ""
    for degree in range(top, 0, -1):
        if len(u) < stars_needed(degree):
            why = why or f"degree {degree} needs {stars_needed(degree)} training stars"
        elif not spread_ok(u, v, degree):
            why = why or f"the stars do not cover the field for degree {degree}"
        else:
            return degree, why
    return 0, why


def plan_model(
    u: np.ndarray,
    v: np.ndarray,
    *,
    method: str,
    degree: int | None,
    holdout_fraction: float,
    have_fwhm: bool,
) -> Plan:
    """Choose the PSF model the usable stars support.

    Parameters
    ----------
    u, v : `~numpy.ndarray`
        Scaled coordinates (``[-1, 1]`` over the image) of the usable stars.
    method : {'kl', 'constant', 'moffat', 'gaussian'}
        What was asked.
    degree : int or None
        The KL degree asked (None: chosen up to `MAX_DEGREE` by held-out stars).
    holdout_fraction : float
        The fraction of stars to hold out when there are enough.
    have_fwhm : bool
        Whether a FWHM was given for a Gaussian when there is no star.

    Returns
    -------
    Plan

    Raises
    ------
    ValueError
        With no usable star and no FWHM.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.ladder import plan_model
    >>> u = np.random.default_rng(1).uniform(-1, 1, 200); v = u[::-1].copy()
    >>> plan_model(u, v, method="kl", degree=None, holdout_fraction=0.25, have_fwhm=False)
    Plan(method='kl', degrees=(0, 1, 2, 3), n_holdout=50, steps=())
    >>> plan = plan_model(u[:5], v[:5], method="kl", degree=2, holdout_fraction=0.25,
    ...                   have_fwhm=False)
    >>> plan.method, plan.n_holdout, plan.steps[0]
    ('constant', 0, 'using a constant PSF (the mean stamp) instead of a KL PSF of degree 2 (degree 2 needs 15 training stars)')
    """  # noqa: E501
    n = len(u)
    n_hold = int(round(holdout_fraction * n))
    if n_hold < MIN_HOLDOUT or n - n_hold < MIN_CONSTANT:
        n_hold = 0
    steps: list[str] = []
    hold = []
    if holdout_fraction > 0 and n_hold == 0:
        hold.append(f"no stars held out (fewer than {MIN_HOLDOUT}): quality unmeasured")
    train_u, train_v = u[: n - n_hold], v[: n - n_hold]
    n_train = len(train_u)
    if method == "kl":
        top = (MAX_DEGREE if n_hold else DEFAULT_DEGREE) if degree is None else int(degree)
        chosen, why = _kl_degree(train_u, train_v, top)
        if chosen > 0 or (degree == 0 and n_train >= MIN_CONSTANT):
            degrees = tuple(range(chosen + 1)) if degree is None else (chosen,)
            if degree is not None and chosen < degree:
                steps.append(f"using a KL PSF of degree {chosen} instead of {degree} ({why})")
            return Plan("kl", degrees, n_hold, tuple(steps + hold))
        asked = f"a KL PSF of degree {top}"
        reason = why
    else:
        asked, reason = f"a {method} PSF", ""
    if method in ("kl", "constant") and n_train >= MIN_CONSTANT:
        if method == "kl":
            steps.append(f"using a constant PSF (the mean stamp) instead of {asked} ({reason})")
        return Plan("constant", (0,), n_hold, tuple(steps + hold))
    if n_train >= 1:
        if method in ("kl", "constant"):
            steps.append(
                f"using a Moffat profile fitted to the mean stamp instead of {asked} "
                f"(a mean stamp needs {MIN_CONSTANT} stars)"
            )
            return Plan("moffat", (0,), n_hold, tuple(steps + hold))
        return Plan(method, (0,), n_hold, tuple(steps + hold))
    if have_fwhm:
        steps = [f"using a round Gaussian of the given FWHM instead of {asked} (no usable star)"]
        return Plan("gaussian", (0,), 0, tuple(steps))
    raise ValueError(
        "no usable PSF star: give the PSF (reference_psf= / science_psf= to subtract, psfs= "
        "to coadd), or fwhm= for a Gaussian PSF of that FWHM, or stars= with positions of "
        "isolated, unsaturated stars"
    )
