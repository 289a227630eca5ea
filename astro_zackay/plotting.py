"""Figures of astro_zackay results (matplotlib is an optional dependency).

Install it with ``pip install matplotlib`` (or ``pip install astro_zackay[all]``).
Importing this module never needs it: only drawing does. Every function draws on a
`~matplotlib.figure.Figure` (a new one, or ``fig=`` cleared first) and returns it;
none calls ``plt.show()`` or changes the matplotlib backend, so the caller decides
whether to show or save the figure.

Images are shown with ``origin="lower"`` and axes in 0-based pixel coordinates
(x the column), the convention of the candidate tables. Data images use a zscale
stretch (`~astropy.visualization.ZScaleInterval`); the difference score Scorr uses a
symmetric linear stretch in sigma. Masked pixels are drawn in one distinct colour
(`MASK_COLOUR`) in every panel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "MASK_COLOUR",
    "plot_candidates",
    "plot_coadd",
    "plot_psf_basis",
    "plot_psf_coefficients",
    "plot_subtraction",
]

#: Colour of masked pixels in every image panel.
MASK_COLOUR = "magenta"
_GOOD_COLOUR = "lime"
_FLAGGED_COLOUR = "red"


def _pyplot() -> Any:
    """``matplotlib.pyplot``, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "astro_zackay.plotting needs matplotlib, which is not installed: "
            "pip install matplotlib (or pip install astro_zackay[all])"
        ) from None
    return plt


def _new_figure(fig: Any, figsize: tuple[float, float]) -> Any:
    """``fig`` cleared, or a new figure of ``figsize`` inches."""
    plt = _pyplot()
    if fig is None:
        return plt.figure(figsize=figsize)
    fig.clear()
    return fig


def _figure(fig: Any, n_panels: int, panel_size: float = 2.6) -> tuple[Any, list]:
    """A figure (new or ``fig``, cleared) with ``n_panels`` axes in a row-major grid."""
    ncols = min(n_panels, 4)
    nrows = -(-n_panels // ncols)
    fig = _new_figure(fig, (panel_size * ncols, panel_size * nrows))
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _data_and_mask(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """The float pixels of an image (CCDData, NDData or array) and its bad-pixel mask."""
    data = np.asarray(getattr(image, "data", image), dtype=float)
    if data.ndim != 2:
        raise ValueError(f"an image to plot must be 2-D, got shape {data.shape}")
    mask = getattr(image, "mask", None)
    bad = ~np.isfinite(data)
    if mask is not None:
        bad |= np.broadcast_to(np.asarray(mask, dtype=bool), data.shape)
    return data, bad


def _cmap(name: str) -> Any:
    """A copy of the colour map ``name`` that draws masked pixels in `MASK_COLOUR`."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=MASK_COLOUR)


def _zscale_norm(data: np.ndarray, bad: np.ndarray) -> Any:
    """A zscale `~astropy.visualization.ImageNormalize` of the good pixels."""
    from astropy.visualization import ImageNormalize, ZScaleInterval

    good = data[~bad]
    if good.size == 0:
        return ImageNormalize(vmin=0.0, vmax=1.0)
    vmin, vmax = ZScaleInterval().get_limits(good)
    if vmax <= vmin:
        vmax = vmin + 1.0
    return ImageNormalize(vmin=vmin, vmax=vmax)


def _show(ax: Any, data: np.ndarray, bad: np.ndarray, *, cmap: str, norm: Any,
          extent: tuple[float, float, float, float] | None = None) -> Any:
    """Draw ``data`` with its bad pixels masked (so drawn in `MASK_COLOUR`)."""
    return ax.imshow(np.ma.masked_array(data, bad), origin="lower", cmap=_cmap(cmap),
                     norm=norm, extent=extent, interpolation="nearest")


def _symmetric_norm(limit: float) -> Any:
    """A linear normalisation from ``-limit`` to ``limit``."""
    from matplotlib.colors import Normalize

    return Normalize(vmin=-limit, vmax=limit)


def _label_pixels(ax: Any) -> None:
    ax.set_xlabel("x (pixel)")
    ax.set_ylabel("y (pixel)")


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number of sigma, got {threshold}")
    return threshold


def _check_candidates(candidates: Any) -> Any:
    """The candidate table, checked for the columns the plots read."""
    if candidates is None:
        return None
    names = set(getattr(candidates, "colnames", ()))
    missing = {"x", "y"} - names
    if missing:
        raise ValueError(
            "candidates must be a table with 'x' and 'y' columns (that of "
            f"SubtractionResult.find_transients), missing {sorted(missing)}"
        )
    return candidates


def _is_good(candidates: Any) -> np.ndarray:
    """The ``good`` column as booleans (all True when the table has none)."""
    if "good" in candidates.colnames:
        return np.asarray(candidates["good"], dtype=bool)
    return np.ones(len(candidates), dtype=bool)


def _circle_candidates(ax: Any, candidates: Any, radius: float) -> None:
    """Circle good candidates in `_GOOD_COLOUR` (solid), flagged ones in red (dashed)."""
    from matplotlib.patches import Circle

    good = _is_good(candidates)
    for x, y, ok in zip(candidates["x"], candidates["y"], good):
        ax.add_patch(Circle((float(x), float(y)), radius, fill=False, lw=1.2,
                            edgecolor=_GOOD_COLOUR if ok else _FLAGGED_COLOUR,
                            linestyle="-" if ok else "--",
                            gid="good" if ok else "flagged"))


def _legend(fig: Any, with_candidates: bool) -> None:
    """One legend for the figure: masked pixels, good and flagged candidates."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=MASK_COLOUR, edgecolor="k", label="masked pixel")]
    if with_candidates:
        handles += [
            Line2D([], [], ls="none", marker="o", mfc="none", mec=_GOOD_COLOUR, ms=9,
                   label="good candidate"),
            Line2D([], [], ls="none", marker="o", mfc="none", mec=_FLAGGED_COLOUR, ms=9,
                   label="flagged candidate"),
        ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)


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
        ax.set_xlabel("x in the stamp (pixel)")
        ax.set_ylabel("y in the stamp (pixel)")
        fig.colorbar(image, ax=ax, shrink=0.8, label="eigen-PSF value")
    fig.suptitle(f"{model.method} PSF basis, K={model.n_components} "
                 "(% of the eigen-spectrum)")
    fig.tight_layout()
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
        fig.colorbar(image, ax=ax, shrink=0.8, label=f"coefficient a{k + 1}")
        if stars is not None and {"x_fit", "y_fit", "subset"} <= set(stars.colnames):
            held = np.asarray(stars["subset"]) == "holdout"
            ax.plot(stars["x_fit"][~held], stars["y_fit"][~held], "k.", ms=2)
            ax.plot(stars["x_fit"][held], stars["y_fit"][held], "wx", ms=3)
        ax.set_title(f"a{k + 1}(x, y)")
        _label_pixels(ax)
    fig.suptitle(f"{model.method} PSF coefficient fields (degree {model.degree}); "
                 "stars: fitted (dots), held out (crosses)")
    fig.tight_layout()
    return fig


def plot_subtraction(result: Any, reference: Any, science: Any, candidates: Any = None, *,
                     threshold: float = 5.0, fig: Any = None) -> Any:
    """Show the reference, new image, difference D and score Scorr of a subtraction.

    Parameters
    ----------
    result : `~astro_zackay.subtraction.SubtractionResult`
        The output of `~astro_zackay.subtract`.
    reference, science : `~astropy.nddata.CCDData`, `~astropy.nddata.NDData` or `~numpy.ndarray`
        The two input images as given to `~astro_zackay.subtract` (shown as they
        are: a reference that `subtract` had to align is shown on its own grid).
    candidates : `~astropy.table.Table`, optional
        Candidates with ``x``, ``y`` (0-based pixels) and optionally ``good``
        columns, such as ``result.find_transients(threshold)``; circled in every
        panel, good ones solid green, flagged ones dashed red.
    threshold : float, optional
        The detection threshold in sigma, stated in the Scorr panel's title; the
        Scorr colour scale runs from ``-threshold`` to ``+threshold``, so pixels
        beyond it show in the darkest colours.
    fig : `~matplotlib.figure.Figure`, optional
        Figure to draw on (cleared first); default a new one.

    Returns
    -------
    `~matplotlib.figure.Figure`
        Four image panels (reference, new, D, Scorr) in a 2x2 grid, each with a
        labelled colour bar; masked pixels in `MASK_COLOUR`.

    Raises
    ------
    ValueError
        If ``threshold`` is not positive, an image is not 2-D, or ``candidates``
        lacks ``x`` or ``y``.
    ImportError
        If matplotlib is not installed.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from astro_zackay import subtract
    >>> from astro_zackay.simulation import simulate_pair
    >>> from astro_zackay.plotting import plot_subtraction
    >>> pair = simulate_pair((256, 256), n_transients=3, seed=1)
    >>> ref, new = pair.reference.ccd, pair.science.ccd
    >>> result = subtract(ref, new)  # doctest: +IGNORE_WARNINGS
    >>> fig = plot_subtraction(result, ref, new, result.find_transients(5.0))
    >>> print([ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"][3])
    Scorr, threshold 5 sigma
    3 candidates (3 good)
    """
    threshold = _check_threshold(threshold)
    candidates = _check_candidates(candidates)
    ny, nx = _data_and_mask(result.score)[0].shape
    row_height = 3.4 * ny / nx + 1.0  # inches: an image panel and its labels
    height = 2 * row_height + 1.4
    fig = _new_figure(fig, (11.0, height))
    panels = [
        ("reference", *_data_and_mask(reference), "gray", None, "reference (zscale)"),
        ("new", *_data_and_mask(science), "gray", None, "new (zscale)"),
        ("D", *_data_and_mask(result.difference), "gray", None, "D (zscale, unit noise)"),
        ("Scorr", *_data_and_mask(result.score), "RdBu_r", _symmetric_norm(threshold),
         "Scorr (sigma)"),
    ]
    radius = max(6.0, 0.025 * max(ny, nx))
    for k, (name, data, bad, cmap, norm, label) in enumerate(panels):
        ax = fig.add_subplot(2, 2, k + 1)
        image = _show(ax, data, bad, cmap=cmap, norm=norm or _zscale_norm(data, bad))
        fig.colorbar(image, ax=ax, shrink=0.85, label=label)
        _label_pixels(ax)
        ax.set_title(name)
        if candidates is not None:
            _circle_candidates(ax, candidates, radius)
    title = f"Scorr, threshold {threshold:g} sigma"
    if candidates is not None:
        n = len(candidates)
        title += f"\n{n} candidate{'' if n == 1 else 's'} ({int(_is_good(candidates).sum())} good)"
    ax.set_title(title)
    fig.suptitle(f"ZOGY subtraction, flux ratio {result.flux_ratio:.4g}, "
                 f"shift ({result.shift[0]:.2f}, {result.shift[1]:.2f}) px")
    _legend(fig, candidates is not None)
    fig.subplots_adjust(left=0.07, right=0.95, bottom=0.75 / height, top=1 - 0.75 / height,
                        hspace=0.35, wspace=0.25)
    return fig


def _cutout(data: np.ndarray, bad: np.ndarray, x: float, y: float,
            half: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """A ``(2 half + 1)``-pixel square around ``(x, y)``, off-image pixels masked.

    Returns the stamp, its bad-pixel mask and its ``extent`` in image pixels.
    """
    size = 2 * half + 1
    col, row = round(x), round(y)
    stamp = np.zeros((size, size))
    off = np.ones((size, size), dtype=bool)
    r0, c0 = row - half, col - half
    rs = slice(max(r0, 0), min(r0 + size, data.shape[0]))
    cs = slice(max(c0, 0), min(c0 + size, data.shape[1]))
    if rs.start < rs.stop and cs.start < cs.stop:
        target = (slice(rs.start - r0, rs.stop - r0), slice(cs.start - c0, cs.stop - c0))
        stamp[target] = data[rs, cs]
        off[target] = bad[rs, cs]
    return stamp, off, (c0 - 0.5, c0 + size - 0.5, r0 - 0.5, r0 + size - 0.5)


def _check_stamps(size: int, max_candidates: int) -> tuple[int, int]:
    if int(size) != size or size < 5 or size % 2 == 0:
        raise ValueError(f"size must be an odd integer >= 5 (pixels), got {size}")
    if int(max_candidates) != max_candidates or max_candidates < 1:
        raise ValueError(f"max_candidates must be a positive integer, got {max_candidates}")
    return int(size), int(max_candidates)


def _row_label(row: Any, good: bool) -> str:
    """``#id S=score`` and ``good`` or the names of the flags set."""
    from .transients import describe_flags

    name = f"#{row['id']}" if "id" in row.colnames else f"({row['x']:.0f}, {row['y']:.0f})"
    score = f" S={row['score']:.3g}" if "score" in row.colnames else ""
    flags = describe_flags(row["flags"]) if "flags" in row.colnames else []
    status = "good" if good else ",".join(flags) or "flagged"
    return f"{name}{score}\n{status}\ny (pixel)"


def _score_limit(score_stamps: list, half: int) -> float:
    """The Scorr colour limit of the cut-outs: the median of the candidates' peak |Scorr|
    (within 2 px of the stamps' centres), at least 5, so that typical candidates show
    in full colour and a few bright residuals saturate rather than wash them out."""
    centre = slice(half - 2, half + 3)
    peaks = [np.abs(np.where(bad, 0.0, stamp)[centre, centre]).max()
             for stamp, bad, _ in score_stamps]
    return max(float(np.median(peaks)), 5.0)


def plot_candidates(result: Any, reference: Any, science: Any, candidates: Any, *,
                    size: int = 21, max_candidates: int = 12, fig: Any = None) -> Any:
    """Cut-outs of the reference, new image, D and Scorr around each candidate.

    Parameters
    ----------
    result : `~astro_zackay.subtraction.SubtractionResult`
        The output of `~astro_zackay.subtract`.
    reference, science : `~astropy.nddata.CCDData`, `~astropy.nddata.NDData` or `~numpy.ndarray`
        The two input images as given to `~astro_zackay.subtract` (cut at the
        candidate's pixel position on their own grids).
    candidates : `~astropy.table.Table`
        Candidates with ``x``, ``y`` (0-based pixels) and optionally ``id``,
        ``score``, ``flags`` and ``good`` columns (those of
        ``result.find_transients``); the first ``max_candidates`` rows are shown.
    size : int, optional
        Side of each cut-out in pixels (odd).
    max_candidates : int, optional
        Most candidates (rows) to show.
    fig : `~matplotlib.figure.Figure`, optional
        Figure to draw on (cleared first); default a new one.

    Returns
    -------
    `~matplotlib.figure.Figure`
        One row per candidate (labelled with its id, score and ``good`` or its
        flags, green when good and red when flagged) and four columns: reference,
        new and D each with their own zscale stretch, and Scorr on a common
        symmetric scale (up to the candidates' median peak, at least 5 sigma) with one
        colour bar in sigma. A ring around the candidate (green when good, red when
        flagged) marks it;
        axes are in image pixels; masked or off-image pixels are in `MASK_COLOUR`.

    Raises
    ------
    ValueError
        If ``size`` is not an odd integer >= 5, ``max_candidates`` is not positive
        or ``candidates`` lacks ``x`` or ``y``.
    ImportError
        If matplotlib is not installed.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from astro_zackay import subtract
    >>> from astro_zackay.simulation import simulate_pair
    >>> from astro_zackay.plotting import plot_candidates
    >>> pair = simulate_pair((256, 256), n_transients=3, seed=1)
    >>> ref, new = pair.reference.ccd, pair.science.ccd
    >>> result = subtract(ref, new)  # doctest: +IGNORE_WARNINGS
    >>> fig = plot_candidates(result, ref, new, result.find_transients(5.0))
    >>> [ax.get_title() for ax in fig.axes[:4]]
    ['reference', 'new', 'D', 'Scorr']
    """
    size, max_candidates = _check_stamps(size, max_candidates)
    candidates = _check_candidates(candidates)
    if candidates is None:
        raise ValueError("plot_candidates needs a candidates table (result.find_transients())")
    shown = candidates[:max_candidates]
    n = max(len(shown), 1)
    fig = _new_figure(fig, (9.0, 2.1 * n + 1.0))
    axes = fig.subplots(n, 4, squeeze=False)
    if len(shown) == 0:
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0][1].text(0.5, 0.5, "no candidates", ha="center", va="center",
                        transform=axes[0][1].transAxes)
        return fig
    from matplotlib.patches import Circle

    images = [_data_and_mask(im) for im in (reference, science, result.difference)]
    score, score_bad = _data_and_mask(result.score)
    half = size // 2
    stamps = [[_cutout(d, b, row["x"], row["y"], half) for d, b in [*images, (score, score_bad)]]
              for row in shown]
    limit = _score_limit([row_stamps[3] for row_stamps in stamps], half)
    good = _is_good(shown)
    ring = max(3.0, size / 7)
    for i, (row, row_stamps) in enumerate(zip(shown, stamps)):
        for j, (stamp, bad, extent) in enumerate(row_stamps):
            ax = axes[i][j]
            norm = _symmetric_norm(limit) if j == 3 else _zscale_norm(stamp, bad)
            image = _show(ax, stamp, bad, cmap="RdBu_r" if j == 3 else "gray", norm=norm,
                          extent=extent)
            ax.add_patch(Circle((float(row["x"]), float(row["y"])), ring, fill=False, lw=1.2,
                                edgecolor=_GOOD_COLOUR if good[i] else _FLAGGED_COLOUR))
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(("reference", "new", "D", "Scorr")[j])
            if i == n - 1:
                ax.set_xlabel("x (pixel)")
        axes[i][0].set_ylabel(_row_label(row, good[i]), fontsize=8,
                              color="green" if good[i] else "red")
    fig.suptitle(f"{len(shown)} of {len(candidates)} candidates, {size}x{size} px "
                 "(reference, new, D: zscale per stamp)")
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.15, right=0.86, wspace=0.35, hspace=0.3,
                        top=1 - 0.75 / height, bottom=0.55 / height)
    cax = fig.add_axes((0.89, 0.15, 0.02, 0.7))
    fig.colorbar(image, cax=cax, label="Scorr (sigma)")
    return fig


def _psf_core(psf: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The centred part of a PSF stamp holding every pixel above 0.1 % of its peak
    (at least 11x11 pixels), and its half sizes."""
    ny, nx = psf.shape
    rows, cols = np.nonzero(psf > 1e-3 * psf.max())
    cy, cx = ny // 2, nx // 2
    half_y = min(max(int(np.abs(rows - cy).max()) if rows.size else 0, 5), cy)
    half_x = min(max(int(np.abs(cols - cx).max()) if cols.size else 0, 5), cx)
    return psf[cy - half_y:cy + half_y + 1, cx - half_x:cx + half_x + 1], half_y, half_x


def plot_coadd(result: Any, fig: Any = None) -> Any:
    """Show a proper coadd, its PSF and its depth map.

    Parameters
    ----------
    result : `~astro_zackay.coaddition.CoaddResult`
        The output of `~astro_zackay.coadd`.
    fig : `~matplotlib.figure.Figure`, optional
        Figure to draw on (cleared first); default a new one.

    Returns
    -------
    `~matplotlib.figure.Figure`
        Three panels with labelled colour bars: the coadd R (zscale, unit noise,
        masked pixels in `MASK_COLOUR`), the core of its unit-sum PSF P_R (the
        pixels above 0.1 % of the peak; square-root stretch) and the depth
        ``G / G_full``, the fraction of the full squared S/N reached at each pixel
        (its lowest value in the title).

    Raises
    ------
    ImportError
        If matplotlib is not installed.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from astro_zackay import coadd
    >>> from astro_zackay.simulation import simulate_image
    >>> stars = simulate_image((128, 128), n_stars=30, seed=1).truth  # one star field
    >>> frames = [simulate_image((128, 128), stars=stars, psf=w, seed=s).ccd
    ...           for s, w in [(2, 2.5), (3, 4.0)]]  # seen twice, in different seeing
    >>> result = coadd(frames)  # doctest: +IGNORE_WARNINGS
    >>> fig = plot_coadd(result)
    >>> [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"][:2]
    ['coadd R (zscale)', 'PSF P_R (core)']
    """
    fig = _new_figure(fig, (15.0, 4.8))
    from astropy.visualization import ImageNormalize, SqrtStretch

    data, bad = _data_and_mask(result.image)
    ax = fig.add_subplot(1, 3, 1)
    image = _show(ax, data, bad, cmap="gray", norm=_zscale_norm(data, bad))
    fig.colorbar(image, ax=ax, shrink=0.85, label="R (unit background noise)")
    ax.set_title("coadd R (zscale)")
    _label_pixels(ax)

    psf, half_y, half_x = _psf_core(np.asarray(result.psf, dtype=float))
    ax = fig.add_subplot(1, 3, 2)
    image = ax.imshow(psf, origin="lower", cmap="viridis",
                      norm=ImageNormalize(vmin=0.0, vmax=psf.max(), stretch=SqrtStretch()),
                      extent=(-half_x - 0.5, half_x + 0.5, -half_y - 0.5, half_y + 0.5))
    fig.colorbar(image, ax=ax, shrink=0.85, label="fraction of the flux per pixel")
    ax.set_title("PSF P_R (core)")
    ax.set_xlabel("x offset (pixel)")
    ax.set_ylabel("y offset (pixel)")

    depth = np.asarray(result.depth, dtype=float)
    ax = fig.add_subplot(1, 3, 3)
    image = _show(ax, depth, bad, cmap="viridis", norm=ImageNormalize(vmin=0.0, vmax=1.0))
    fig.colorbar(image, ax=ax, shrink=0.85, label="G / G_full")
    shallowest = depth[~bad].min() if np.any(~bad) else np.nan
    ax.set_title(f"depth (lowest {shallowest:.2f})")
    _label_pixels(ax)
    fig.suptitle(f"proper coadd of {len(result.frames)} images, "
                 f"flux scale {result.flux_scale:.4g}")
    _legend(fig, False)
    fig.subplots_adjust(bottom=0.15, wspace=0.5)
    return fig
