"""Karhunen-Loeve PSF algebra (Lauer 2002): arrays in, arrays out.

* :func:`kl_basis` - eigen-PSFs from the SVD of the (weighted) matrix of recentred,
  unit-sum star stamps, with a fixed sign (the mean coefficient of every component
  is positive).
* :func:`fit_fields` - every coefficient ``a_k`` as a 2-D polynomial of total degree
  ``degree`` in SCALED coordinates ``u, v`` in ``[-1, 1]`` over the image.
* :func:`evaluate_psf` - ``PSF(x, y) = sum_k a_k(x, y) P_k``, normalised to unit sum
  at every position.
* :func:`select_n_components` / :func:`n_components_from_inf_loss` - the choice of K.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "design_matrix",
    "evaluate_psf",
    "fit_fields",
    "image_scaling",
    "kl_basis",
    "n_components_from_inf_loss",
    "polynomial_terms",
    "scale_coordinates",
    "select_n_components",
]


def polynomial_terms(degree: int) -> np.ndarray:
    """Exponents ``(i, j)`` of the monomials ``u**i * v**j`` with ``i + j <= degree``.

    Examples
    --------
    >>> from astro_zackay.psf.kl import polynomial_terms
    >>> polynomial_terms(1).tolist()
    [[0, 0], [1, 0], [0, 1]]
    """
    terms = [(total - j, j) for total in range(degree + 1) for j in range(total + 1)]
    return np.array(terms, dtype=int).reshape(-1, 2)


def image_scaling(shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(xc, xs, yc, ys)`` mapping pixel centres of an image onto ``[-1, 1]`` in both axes.

    Examples
    --------
    >>> from astro_zackay.psf.kl import image_scaling
    >>> image_scaling((11, 21))
    (10.0, 10.0, 5.0, 5.0)
    """
    ny, nx = shape
    return (nx - 1) / 2, max((nx - 1) / 2, 1.0), (ny - 1) / 2, max((ny - 1) / 2, 1.0)


def scale_coordinates(
    x: np.ndarray, y: np.ndarray, scaling: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Map pixel coordinates to scaled ones: ``u = (x - xc) / xs``, ``v = (y - yc) / ys``.

    ``scaling`` is ``(xc, xs, yc, ys)``, e.g. from :func:`image_scaling`.
    """
    xc, xs, yc, ys = scaling
    return (np.asarray(x, dtype=float) - xc) / xs, (np.asarray(y, dtype=float) - yc) / ys


def design_matrix(u: np.ndarray, v: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """``(n, n_terms)`` matrix of the monomials at scaled coordinates ``(u, v)``."""
    u = np.atleast_1d(u)[:, None]
    v = np.atleast_1d(v)[:, None]
    return u ** terms[:, 0] * v ** terms[:, 1]


def kl_basis(stamps: np.ndarray, weights: np.ndarray, n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-PSFs of a set of unit-sum stamps.

    Parameters
    ----------
    stamps : `~numpy.ndarray`
        ``(n, n_pix)`` recentred unit-sum stamps (flattened).
    weights : `~numpy.ndarray`
        ``(n,)`` star weights (e.g. inverse noise of the normalised stamp); the SVD is
        of ``weights[:, None] * stamps`` (not mean-subtracted, as in Lauer 2002).
    n_max : int
        Number of components to return.

    Returns
    -------
    basis : `~numpy.ndarray`
        ``(n_max, n_pix)`` orthonormal eigen-PSFs; sign fixed so that the weighted
        mean coefficient of every component is positive.
    eigenvalues : `~numpy.ndarray`
        All squared singular values, largest first.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.kl import kl_basis
    >>> stamps = np.array([[0.2, 0.6, 0.2], [0.1, 0.8, 0.1]])
    >>> basis, ev = kl_basis(stamps, np.ones(2), 1)
    >>> bool(basis[0].sum() > 0), ev.shape
    (True, (2,))
    """
    weighted = weights[:, None] * stamps
    basis, eigenvalues = _right_singular(weighted, n_max)
    sign = np.sign(weights @ weighted @ basis.T)
    sign[sign == 0] = 1.0
    return basis * sign[:, None], eigenvalues


#: Squared singular values from the Gram matrix below this fraction of the largest are
#: rounding: their vectors are not orthogonal to the others.
_GRAM_RCOND = 1e-12


def _right_singular(matrix: np.ndarray, n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_max`` right singular vectors of ``matrix`` and all squared singular
    values, largest first, from the eigen-decomposition of its smaller Gram matrix.

    Three times faster than `numpy.linalg.svd` for a few hundred stamps of a few
    hundred pixels; the squared singular values carry an absolute rounding of ~1e-16
    of the largest, far below the noise components that K is chosen against. Where
    fewer stamps than pixels leave a wanted component at that rounding (stamps that
    repeat one another), the vectors it would give are not orthogonal, and the SVD
    gives them instead.
    """
    n, n_pix = matrix.shape
    if n_pix <= n:
        eigenvalues, vectors = np.linalg.eigh(matrix.T @ matrix)
        return vectors[:, ::-1][:, :n_max].T, np.maximum(eigenvalues[::-1], 0.0)
    eigenvalues, vectors = np.linalg.eigh(matrix @ matrix.T)
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1][:, :n_max]
    if eigenvalues[min(n_max, n) - 1] <= _GRAM_RCOND * eigenvalues[0]:
        _, singular, basis = np.linalg.svd(matrix, full_matrices=False)
        return basis[:n_max], singular**2  # n of them: fewer stamps than pixels
    basis = vectors.T @ matrix
    return basis / np.linalg.norm(basis, axis=1, keepdims=True), np.maximum(eigenvalues, 0.0)


#: median of a chi-square of one degree of freedom
_CHI2_1_MEDIAN = 0.454936
#: Eigenvalues of a normal matrix below this fraction of its largest are rounding (a
#: condition number of 1e10: singular values of the weighted design 1e-5 of the largest).
_NORMAL_RCOND = 1e-10


def fit_fields(
    coefficients: np.ndarray,
    variances: np.ndarray,
    design: np.ndarray,
    *,
    clip: float = 5.0,
    iterations: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit each coefficient field as a polynomial by weighted least squares.

    Parameters
    ----------
    coefficients : `~numpy.ndarray`
        ``(n, K)`` star coefficients ``a_k(x_i, y_i)``.
    variances : `~numpy.ndarray`
        ``(n, K)`` their variances (weights are their inverse).
    design : `~numpy.ndarray`
        ``(n, n_terms)`` from :func:`design_matrix`.
    clip : float, optional
        Stars deviating by more than ``clip`` sigma in any component are dropped and
        the fit repeated, ``iterations`` times at most.
    iterations : int, optional
        Maximum number of clipping rounds.

    Returns
    -------
    fields : `~numpy.ndarray`
        ``(K, n_terms)`` polynomial coefficients.
    used : `~numpy.ndarray`
        ``(n,)`` True for the stars kept by the clipping.
    """
    used = np.ones(len(coefficients), dtype=bool)
    excess = np.zeros(coefficients.shape[1])
    for _ in range(iterations + 1):
        fields = _weighted_fits(design[used], coefficients[used],
                                1.0 / (variances[used] + excess))
        residuals = coefficients - design @ fields.T
        excess = _excess_variance(residuals[used], variances[used])
        pulls = residuals / np.sqrt(variances + excess)
        new_used = np.all(np.abs(pulls) < clip, axis=1)
        if np.array_equal(new_used, used) or new_used.sum() <= design.shape[1]:
            break
        used = new_used
    return fields, used


def _weighted_fits(design: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(K, n_terms)`` weighted least-squares fits of the ``K`` columns of ``values``.

    The normal equations of all the columns (each with its own ``weights`` column) are
    solved together from their eigen-decompositions (ten times faster than one
    `numpy.linalg.lstsq` per column). Directions whose eigenvalue is below
    `_NORMAL_RCOND` of the largest are left out: the minimum-norm solution, as lstsq
    gives it. Stars on a line leave the polynomial undetermined across it, and there
    the normal matrix is singular only up to rounding, which a plain solve turns into
    coefficients of thousands.
    """
    weighted = design.T[None] * weights.T[:, None, :]  # (K, n_terms, n)
    eigenvalues, vectors = np.linalg.eigh(weighted @ design)
    kept = eigenvalues > _NORMAL_RCOND * eigenvalues[:, -1:]
    inverse = np.where(kept, 1.0 / np.where(kept, eigenvalues, 1.0), 0.0)
    projected = np.swapaxes(vectors, 1, 2) @ (weighted @ values.T[:, :, None])
    return (vectors @ (inverse[:, :, None] * projected))[:, :, 0]


def _excess_variance(residuals: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Per component, the variance ``s**2`` the polynomial cannot follow, beyond the noise.

    The smallest ``s**2 >= 0`` for which the median of ``r**2 / (var + s**2)`` is at
    most that of a chi-square of one degree of freedom (0.455). Weights of ``1 / var``
    alone let the brightest stars pull the polynomial through their own mismatch and
    swing it where stars are few (a field's corners: L1 errors of 0.26 in a corner of
    a 2.5x varying field against 0.02-0.05 elsewhere).

    A star's ratio is at most 0.455 from ``s**2 >= t = r**2 / 0.455 - var`` on. For an
    odd number of stars the median is the middle ratio, so the answer is the middle
    order statistic of the ``t``. For an even number numpy's median is the mean of the
    two middle ratios: the answer lies between the two middle ``t``, where the stars
    below (set A) have ratios at most 0.455 and those above (B) more, and it is the
    smallest ``s**2`` at which every star of A has a partner in B with whom its mean
    ratio is at most 0.455, ``max_A min_B`` of the pairs' roots (each a quadratic).
    Exact, with no search (a log-space search to 3 % changed K on a field with one
    bright star, where the mean ratio sits on the edge).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.kl import _excess_variance
    >>> rng = np.random.default_rng(1)
    >>> variances = np.full((2000, 2), 1.0)
    >>> residuals = rng.normal(0.0, [1.0, 2.0], size=(2000, 2))  # excess 0 and 3
    >>> excess = _excess_variance(residuals, variances)
    >>> np.round(excess, 1).tolist()
    [0.0, 3.0]
    >>> def median_ratio(s):  # exactly 0.455 at the excess, above it just below
    ...     return np.median(residuals[:, 1] ** 2 / (1.0 + s))
    >>> bool(median_ratio(excess[1]) <= 0.455 < median_ratio(0.999 * excess[1]))
    True
    """
    r2 = residuals**2
    need = np.median(r2 / variances, axis=0) > _CHI2_1_MEDIAN
    if not need.any():
        return np.zeros(r2.shape[1])
    n = len(r2)
    middle = n // 2
    t = r2 / _CHI2_1_MEDIAN - variances
    if n % 2:
        excess = np.partition(t, middle, axis=0)[middle]
    else:
        excess = _even_median_root(r2, variances, t, middle)
    return np.where(need, np.maximum(excess, 0.0), 0.0)


def _even_median_root(
    r2: np.ndarray, variances: np.ndarray, t: np.ndarray, middle: int
) -> np.ndarray:
    """The smallest ``s`` at which the mean of the two middle ``r2 / (var + s)`` is 0.455.

    See `_excess_variance`: ``max`` over the lower half A of the ``t``, ``min`` over
    the upper half B, of the larger root of ``r_a / (v_a + s) + r_b / (v_b + s) =
    2 c``, kept between the two middle ``t``.
    """
    order = np.argsort(t, axis=0)
    lower, upper = order[:middle], order[middle:]
    ra = np.take_along_axis(r2, lower, 0)[:, None]
    va = np.take_along_axis(variances, lower, 0)[:, None]
    rb = np.take_along_axis(r2, upper, 0)[None]
    vb = np.take_along_axis(variances, upper, 0)[None]
    two_c = 2.0 * _CHI2_1_MEDIAN
    b = two_c * (va + vb) - ra - rb
    c = two_c * va * vb - ra * vb - rb * va
    root = (np.sqrt(np.maximum(b * b - 4.0 * two_c * c, 0.0)) - b) / (2.0 * two_c)
    sorted_t = np.take_along_axis(t, order, 0)
    return np.clip(root.min(axis=1).max(axis=0), sorted_t[middle - 1], sorted_t[middle])


def evaluate_psf(basis: np.ndarray, fields: np.ndarray, design: np.ndarray) -> np.ndarray:
    """Unit-sum PSFs ``sum_k a_k P_k / sum(...)`` at the rows of ``design``.

    Parameters
    ----------
    basis : `~numpy.ndarray`
        ``(K, n_pix)`` eigen-PSFs.
    fields : `~numpy.ndarray`
        ``(K, n_terms)`` polynomial coefficients.
    design : `~numpy.ndarray`
        ``(n, n_terms)`` monomials at the positions.

    Returns
    -------
    `~numpy.ndarray`
        ``(n, n_pix)`` PSFs, each summing to 1.
    """
    psf = (design @ fields.T) @ basis
    return psf / psf.sum(axis=1, keepdims=True)


def select_n_components(chi2_dof: np.ndarray) -> tuple[int, np.ndarray, float]:
    """Choose K from held-out chi2/dof with the one-standard-error rule.

    For each candidate K the score is the median held-out chi2/dof; its standard
    error is ``1.2533 * sigma / sqrt(n_holdout)``, with ``sigma`` the robust
    (1.4826 MAD) spread of the per-star chi2/dof at the best K. The chosen K is the
    smallest one whose score is within one standard error of the best score: extra
    components must improve the held-out fit by more than the noise of the estimate.

    Parameters
    ----------
    chi2_dof : `~numpy.ndarray`
        ``(K_max, n_holdout)`` per-star chi2/dof with 1..K_max components.

    Returns
    -------
    n_components : int
        The chosen K.
    scores : `~numpy.ndarray`
        ``(K_max,)`` median chi2/dof per K.
    sigma : float
        The standard error used.

    Raises
    ------
    ValueError
        When some chi2/dof are not finite (zero or non-finite variances).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.kl import select_n_components
    >>> chi2 = np.array([[1.8, 1.9, 1.7], [1.2, 1.1, 1.3],
    ...                  [1.0, 1.1, 1.05], [1.0, 1.1, 1.04]])
    >>> select_n_components(chi2)[0]
    3
    """
    if not np.all(np.isfinite(chi2_dof)):
        raise ValueError(
            "the held-out stars' chi2/dof are not all finite (their stamps hold pixels of "
            "zero or non-finite variance): check the image's uncertainty, or give n_components"
        )
    scores = np.median(chi2_dof, axis=1)
    best = int(np.argmin(scores))
    n = chi2_dof.shape[1]
    spread = 1.4826 * np.median(np.abs(chi2_dof[best] - scores[best]))
    sigma = 1.2533 * float(spread) / np.sqrt(n)
    n_components = int(np.flatnonzero(scores <= scores[best] + sigma)[0]) + 1
    return n_components, scores, sigma


def n_components_from_inf_loss(eigenvalues: np.ndarray, inf_loss: float) -> int:
    """Smallest K whose discarded eigen-spectrum fraction is at most ``inf_loss``.

    ``sum(eigenvalues[K:]) / sum(eigenvalues) <= inf_loss`` (properimage's meaning).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf.kl import n_components_from_inf_loss
    >>> n_components_from_inf_loss(np.array([90.0, 8.0, 2.0]), 0.05)
    2
    """
    total = eigenvalues.sum()
    discarded = 1.0 - np.cumsum(eigenvalues) / total
    return int(np.flatnonzero(discarded <= inf_loss)[0]) + 1
