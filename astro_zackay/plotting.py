"""Figures of astro_zackay results (matplotlib is an optional dependency).

Install it with ``pip install astro_zackay[all]``. Every function returns the
`~matplotlib.figure.Figure` it drew on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["plot_psf_basis", "plot_psf_coefficients"]


def _figure(fig: Any, n_panels: int, panel_size: float = 2.6) -> tuple[Any, list]:
    """A figure (new or ``fig``, cleared) with ``n_panels`` axes in a row-major grid."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install astro_zackay[all] (or pip install matplotlib)"
        ) from None
    ncols = min(n_panels, 4)
    nrows = -(-n_panels // ncols)
    if fig is None:
        fig = plt.figure(figsize=(panel_size * ncols, panel_size * nrows))
    else:
        fig.clear()
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def plot_psf_basis(model: Any, fig: Any = None) -> Any:
    """Show the eigen-PSFs of a `~astro_zackay.psf.KLPSFModel` (properimage's ``autopsf``).

    Parameters
    ----------
    model : `~astro_zackay.psf.KLPSFModel`
        The PSF model.
    fig : `~matplotlib.figure.Figure`, optional
        Figure to draw on (cleared first); default a new one.

    Returns
    -------
    `~matplotlib.figure.Figure`
        One panel (and colour bar) per component, titled with its share of the
        eigen-spectrum.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from astro_zackay.psf import KLPSFModel
    >>> from astro_zackay.plotting import plot_psf_basis
    >>> model = KLPSFModel(np.ones((2, 5, 5)) / 25, np.ones((2, 1)), image_shape=(50, 50), degree=0)
    >>> len(plot_psf_basis(model).axes)  # one panel and one colour bar per component
    4
    """
    fig, axes = _figure(fig, model.n_components)
    total = model.eigenvalues.sum() if model.eigenvalues.size else np.nan
    for k, ax in enumerate(axes):
        image = ax.imshow(model.basis[k], origin="lower", cmap="RdBu_r")
        limit = np.abs(model.basis[k]).max()
        image.set_clim(-limit, limit)
        share = model.eigenvalues[k] / total if k < model.eigenvalues.size else np.nan
        ax.set_title(f"P{k + 1}" + ("" if np.isnan(share) else f" ({100 * share:.3g} %)"))
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{model.method} PSF basis, K={model.n_components}")
    return fig


def plot_psf_coefficients(model: Any, fig: Any = None, *, n_grid: int = 64) -> Any:
    """Map the coefficient fields ``a_k(x, y)`` over the image (properimage's ``autopsf_coef``).

    Parameters
    ----------
    model : `~astro_zackay.psf.KLPSFModel`
        The PSF model.
    fig : `~matplotlib.figure.Figure`, optional
        Figure to draw on (cleared first); default a new one.
    n_grid : int, optional
        Samples per axis of the maps.

    Returns
    -------
    `~matplotlib.figure.Figure`
        One panel (and colour bar) per component, with the training (dots) and
        held-out (crosses) stars.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from astro_zackay.psf import KLPSFModel
    >>> from astro_zackay.plotting import plot_psf_coefficients
    >>> model = KLPSFModel(np.ones((1, 5, 5)) / 25, [[1.0, 0.1, 0.0]], image_shape=(50, 80),
    ...                    degree=1)
    >>> len(plot_psf_coefficients(model, n_grid=8).axes)
    2
    """
    ny, nx = model.image_shape
    xs, ys = np.meshgrid(np.linspace(0, nx - 1, n_grid), np.linspace(0, ny - 1, n_grid))
    maps = model.coefficients(xs.ravel(), ys.ravel()).reshape(-1, n_grid, n_grid)
    fig, axes = _figure(fig, model.n_components, panel_size=3.2)
    stars = model.stars
    for k, ax in enumerate(axes):
        image = ax.imshow(
            maps[k], origin="lower", extent=(-0.5, nx - 0.5, -0.5, ny - 0.5), aspect="auto"
        )
        fig.colorbar(image, ax=ax, shrink=0.8)
        if stars is not None and {"x_fit", "y_fit", "subset"} <= set(stars.colnames):
            held = np.asarray(stars["subset"]) == "holdout"
            ax.plot(stars["x_fit"][~held], stars["y_fit"][~held], "k.", ms=2)
            ax.plot(stars["x_fit"][held], stars["y_fit"][held], "wx", ms=3)
        ax.set_title(f"a{k + 1}(x, y)")
    fig.suptitle(f"{model.method} PSF coefficient fields (degree {model.degree})")
    return fig
