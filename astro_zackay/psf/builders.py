"""One builder per PSF method: training stamps in, eigen-PSFs and coefficient fields out.

Every builder takes the recentred, unit-sum training stamps (`TrainingSet`) and
returns a `Built` (the ``basis`` and ``fields`` of a `~astro_zackay.psf.KLPSFModel`,
with what was learned on the way); `~astro_zackay.psf.estimate_psf` picks the
builder that the degradation ladder (`astro_zackay.psf.ladder`) allows.

* `build_kl` - Karhunen-Loeve eigen-PSFs (Lauer 2002) with polynomial coefficient
  fields; K and the degree chosen from held-out stars, or K from the eigen-spectrum.
* `build_constant` - the weighted mean stamp.
* `build_analytic` - an elliptical Gaussian or Moffat profile fitted to the mean stamp.
* `build_gaussian` - a round Gaussian of a given FWHM (no star needed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .analytic import ProfileFitError, fit_profile, mean_stamp, render_profile
from .kl import (
    design_matrix,
    fit_fields,
    kl_basis,
    n_components_from_inf_loss,
    polynomial_terms,
    select_n_components,
)

__all__ = [
    "Built",
    "TrainingSet",
    "build_analytic",
    "build_constant",
    "build_gaussian",
    "build_kl",
    "noise_components",
]

log = logging.getLogger(__name__)

#: largest number of eigen-PSFs
MAX_COMPONENTS = 8
#: without held-out stars, K and the degree are chosen by this many-fold cross-validation
CV_FOLDS = 5
#: ... when there are at least this many training stars
CV_MIN = 10


@dataclass(frozen=True)
class TrainingSet:
    """Recentred unit-sum star stamps and where the stars are.

    Attributes
    ----------
    stamps, variance : `~numpy.ndarray`
        ``(n, n_pix)`` flattened stamps and their variances.
    weights : `~numpy.ndarray`
        ``(n,)`` star weights, the inverse noise of each normalised stamp.
    u, v : `~numpy.ndarray`
        ``(n,)`` scaled coordinates (``[-1, 1]`` over the image).
    shape : tuple of int
        The stamp shape ``(ny, nx)``.
    """

    stamps: np.ndarray
    variance: np.ndarray
    weights: np.ndarray
    u: np.ndarray
    v: np.ndarray
    shape: tuple[int, int]

    def __len__(self) -> int:
        return len(self.weights)

    def select(self, index: np.ndarray) -> TrainingSet:
        """The stars picked by ``index`` (boolean or integer)."""
        return TrainingSet(
            self.stamps[index], self.variance[index], self.weights[index],
            self.u[index], self.v[index], self.shape,
        )

    def design(self, degree: int) -> np.ndarray:
        """The ``(n, n_terms)`` monomials of ``degree`` at the stars."""
        return design_matrix(self.u, self.v, polynomial_terms(degree))

    def mean(self) -> np.ndarray:
        """The inverse-variance weighted mean stamp, ``(ny, nx)``, unit sum."""
        return mean_stamp(self.stamps, self.weights**2).reshape(self.shape)


@dataclass(frozen=True)
class Built:
    """What a builder made: the model's arrays and what was learned on the way."""

    basis: np.ndarray
    fields: np.ndarray
    degree: int = 0
    eigenvalues: np.ndarray | None = None
    selection: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: the method used, when a builder had to step down from the one asked ("": as asked)
    method: str = ""
    #: why it stepped down, for the caller's warning
    steps: tuple[str, ...] = ()


def build_constant(train: TrainingSet) -> Built:
    """The weighted mean stamp: one component, no spatial variation.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.builders import TrainingSet, build_constant
    >>> stamps = np.array([[0.0, 1.0, 0.0], [0.2, 0.6, 0.2]])
    >>> train = TrainingSet(stamps, np.ones((2, 3)), np.ones(2), np.zeros(2), np.zeros(2),
    ...                     (1, 3))
    >>> build_constant(train).basis.tolist()
    [[[0.1, 0.8, 0.1]]]
    """
    return Built(train.mean()[None], np.ones((1, 1)))


def build_analytic(train: TrainingSet, profile: str, fwhm: float) -> Built:
    """An elliptical ``profile`` ('gaussian' or 'moffat') fitted to the weighted mean stamp.

    A fit that fails (`~astro_zackay.psf.analytic.ProfileFitError`: the mean stamp is
    dominated by a background or neighbours) steps down the ladder: a failed Moffat
    fit to an elliptical Gaussian fit, a failed Gaussian fit to a round Gaussian of
    ``fwhm`` (the stars' measured FWHM); the ``method`` and ``steps`` of the result
    say what was used and why.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.builders import TrainingSet, build_analytic
    >>> flat = np.full((1, 21 * 21), 1.0 / 21**2)  # no star at all
    >>> train = TrainingSet(flat, np.ones_like(flat), np.ones(1), np.zeros(1), np.zeros(1),
    ...                     (21, 21))
    >>> built = build_analytic(train, "moffat", 3.0)
    >>> built.method, built.meta["fwhm"], built.steps[0][:42]
    ('gaussian', 3.0, "using a round Gaussian of the stars' FWHM ")
    """
    mean = train.mean()
    failures: list[str] = []
    for kind in ("moffat", "gaussian") if profile == "moffat" else ("gaussian",):
        try:
            fit = fit_profile(mean, kind)
        except ProfileFitError as error:
            log.info("%s", error)
            failures.append(str(error))
            continue
        log.info("fitted %s PSF: %s", kind, fit)
        basis = render_profile(train.shape, fit["fwhm"], fit["ellipticity"], fit["theta"],
                               fit.get("beta"))
        used = "an elliptical Gaussian fitted to the mean stamp"
        return _stepped(Built(basis[None], np.ones((1, 1)), meta=fit), kind, used, failures)
    used = f"a round Gaussian of the stars' FWHM ({fwhm:.3g} px)"
    return _stepped(build_gaussian(train.shape, fwhm), "gaussian", used, failures)


def _stepped(built: Built, method: str, used: str, failures: list[str]) -> Built:
    """``built`` marked as made by ``method`` (described by ``used``) after ``failures``."""
    if not failures:
        return built
    return Built(built.basis, built.fields, meta=built.meta, method=method,
                 steps=(f"using {used} ({'; '.join(failures)})",))


def build_gaussian(shape: tuple[int, int], fwhm: float) -> Built:
    """A round Gaussian of ``fwhm`` pixels (for an image without usable stars).

    Examples
    --------
    >>> from astro_zackay.psf.builders import build_gaussian
    >>> built = build_gaussian((11, 11), 2.5)
    >>> built.basis.shape, round(float(built.basis.sum()), 12), built.meta["fwhm"]
    ((1, 11, 11), 1.0, 2.5)
    """
    basis = render_profile(shape, fwhm)
    return Built(basis[None], np.ones((1, 1)), meta={"fwhm": float(fwhm), "ellipticity": 0.0,
                                                     "theta": 0.0})


def noise_components(eigenvalues: np.ndarray, n_stars: int, n_pix: int) -> int:
    """Eigen-PSFs standing above the noise of inverse-noise weighted stamps.

    Each weighted stamp carries unit noise power spread over ``n_pix`` pixels, so
    pure noise has eigenvalues up to about ``(sqrt(n_stars) + sqrt(n_pix))**2 /
    n_pix`` (the Marchenko-Pastur edge); components above twice that are signal.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.builders import noise_components
    >>> noise_components(np.array([5e4, 300.0, 2.5, 2.0]), 40, 400)
    2
    """
    edge = (np.sqrt(n_stars) + np.sqrt(n_pix)) ** 2 / n_pix
    return max(int(np.sum(eigenvalues > 2.0 * edge)), 1)


def _held_out_chi2(basis: np.ndarray, fields: np.ndarray, hold: TrainingSet,
                   degree: int, aperture: np.ndarray) -> np.ndarray:
    """``(K, n_hold)`` chi2/dof of held-out stamps within ``aperture`` for K = 1, 2, ...

    The PSF with the first k components is ``sum_{j<=k} a_j P_j`` over its sum; the
    flux is fitted (linear). The aperture keeps the pixels where the PSF's shape is
    (the wings' noise would dilute the differences between models).
    """
    coefficients = hold.design(degree) @ fields.T  # (n_hold, K)
    psf = np.cumsum(coefficients[:, :, None] * basis[None, :, aperture], axis=1)
    total = np.cumsum(coefficients * basis.sum(axis=1)[None], axis=1)
    psf /= total[:, :, None]
    data = hold.stamps[:, None, aperture]
    weight = 1.0 / hold.variance[:, None, aperture]
    flux = np.sum(psf * data * weight, axis=2) / np.sum(psf**2 * weight, axis=2)
    chi2 = np.sum((data - flux[:, :, None] * psf) ** 2 * weight, axis=2)
    return (chi2 / (aperture.sum() - 1)).T


def _fields(train: TrainingSet, basis: np.ndarray, degree: int) -> np.ndarray:
    coefficients = train.stamps @ basis.T
    coefficient_var = train.variance @ (basis**2).T
    fields, used = fit_fields(coefficients, coefficient_var, train.design(degree))
    log.debug("degree %d fields: %d of %d training stars kept", degree, int(used.sum()),
              len(train))
    return fields


def _candidate_chi2(
    train: TrainingSet, hold: TrainingSet, degrees: tuple[int, ...], basis: np.ndarray,
    aperture: np.ndarray,
) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """Held-out chi2/dof ``(n_candidates, n_hold)`` of every (degree, K) trained on ``train``.

    ``basis`` holds the eigen-PSFs of ``train`` (K up to its length). Candidates are
    ``(n_parameters, degree, K)``, n_parameters = K times the terms.
    """
    candidates, chi2 = [], []
    for degree in degrees:
        fields = _fields(train, basis, degree)
        chi2.extend(_held_out_chi2(basis, fields, hold, degree, aperture))
        candidates.extend(
            (k * len(polynomial_terms(degree)), degree, k) for k in range(1, len(basis) + 1)
        )
    return candidates, np.array(chi2)


def _cross_validated(
    train: TrainingSet, degrees: tuple[int, ...], k_max: int, aperture: np.ndarray
) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """`_candidate_chi2` with every star held out once (CV_FOLDS folds)."""
    fold = np.arange(len(train)) % CV_FOLDS
    runs = []
    for f in range(CV_FOLDS):
        part = train.select(fold != f)
        basis, _ = kl_basis(part.stamps, part.weights, k_max)
        runs.append(_candidate_chi2(part, train.select(fold == f), degrees, basis, aperture))
    return runs[0][0], np.concatenate([chi2 for _, chi2 in runs], axis=1)


def _select(
    candidates: list[tuple[int, int, int]], chi2: np.ndarray
) -> tuple[int, int, np.ndarray]:
    """(degree, K, median chi2/dof by K at that degree) by the one-standard-error rule.

    Candidates are ordered by their number of parameters: the simplest one within one
    standard error of the best held-out median chi2/dof wins.
    """
    order = sorted(range(len(candidates)), key=lambda i: candidates[i])
    index, _, sigma = select_n_components(chi2[order])
    _, degree, k = candidates[order[index - 1]]
    at_degree = [i for i in range(len(candidates)) if candidates[i][1] == degree]
    by_k = np.median(chi2[at_degree], axis=1)
    log.info(
        "held-out median chi2/dof by K at degree %d: %s (one-standard-error band %.4f): "
        "degree %d, K=%d", degree, np.array2string(by_k, precision=4), sigma, degree, k,
    )
    return degree, k, by_k


def build_kl(
    train: TrainingSet,
    hold: TrainingSet | None,
    degrees: tuple[int, ...],
    *,
    n_components: int | None = None,
    inf_loss: float | None = None,
    aperture: np.ndarray | None = None,
) -> Built:
    """Karhunen-Loeve eigen-PSFs with polynomial coefficient fields.

    K (and the degree, when ``degrees`` offers several) is chosen from the held-out
    stars ``hold``, or without them by `CV_FOLDS`-fold cross-validation of the training
    stars (each held out once), unless ``n_components`` or ``inf_loss`` fixes K. The
    choice is the simplest (fewest parameters) within one standard error of the best
    median held-out chi2/dof. Too few stars to cross-validate: K counts the eigen-PSFs
    above the noise (`noise_components`) at the highest degree.

    Parameters
    ----------
    train : TrainingSet
        The training stamps.
    hold : TrainingSet or None
        The held-out stamps.
    degrees : tuple of int
        Candidate total degrees of the coefficient polynomials.
    n_components : int, optional
        K itself (at most what the stars allow).
    inf_loss : float, optional
        The largest fraction of the eigen-spectrum that may be discarded.
    aperture : `~numpy.ndarray`, optional
        Boolean ``(n_pix,)``: the pixels whose held-out chi2 chooses the model
        (default all).

    Returns
    -------
    Built
    """
    n_pix = train.stamps.shape[1]
    n_fit = len(train) if hold is not None else len(train) - -(-len(train) // CV_FOLDS)
    k_max = max(min(MAX_COMPONENTS, n_fit - len(polynomial_terms(max(degrees))), n_pix), 1)
    if n_components is not None:
        k_max = min(int(n_components), len(train), n_pix)
    aperture = np.ones(n_pix, dtype=bool) if aperture is None else aperture
    choose = n_components is None and inf_loss is None
    selection = None
    if choose and (hold is not None or len(train) >= CV_MIN):
        basis, eigenvalues = kl_basis(train.stamps, train.weights, k_max)
        if hold is not None:  # the eigen-PSFs of all of train: reused for the model
            candidates, chi2 = _candidate_chi2(train, hold, degrees, basis, aperture)
        else:
            candidates, chi2 = _cross_validated(train, degrees, k_max, aperture)
        degree, k, selection = _select(candidates, chi2)
    else:
        degree = max(degrees)
        basis, eigenvalues = kl_basis(train.stamps, train.weights, k_max)
        if inf_loss is not None:
            k = min(n_components_from_inf_loss(eigenvalues, inf_loss), k_max)
        elif n_components is not None:
            k = k_max
        else:
            k = min(noise_components(eigenvalues, len(train), n_pix), k_max)
    basis = basis[:k]
    fields = _fields(train, basis, degree)
    return Built(basis.reshape(k, *train.shape), fields, degree, eigenvalues, selection)
