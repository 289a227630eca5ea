"""Detection of transient candidates in a score image (Scorr) of a subtraction."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

__all__ = ["find_transients"]


def _as_array(value: Any, name: str) -> tuple[np.ndarray, np.ndarray | None, WCS | None, Any]:
    """(data, mask, wcs, unit) of an NDData or plain array."""
    if isinstance(value, NDData):
        mask = None if value.mask is None else np.asarray(value.mask, dtype=bool)
        wcs = value.wcs if isinstance(value.wcs, WCS) else None
        return np.asarray(value.data, dtype=float), mask, wcs, value.unit
    if isinstance(value, u.Quantity):
        return np.asarray(value.value, dtype=float), None, None, value.unit
    array = np.asarray(value, dtype=float)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image, got shape {array.shape}")
    return array, None, None, None


def _subpixel_peak(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple:
    """Refine integer peaks with a separable parabola through the 3x3 neighbourhood."""
    ny, nx = image.shape
    r = np.clip(rows, 1, ny - 2)
    c = np.clip(cols, 1, nx - 2)

    def offset(minus: np.ndarray, centre: np.ndarray, plus: np.ndarray) -> np.ndarray:
        curvature = minus - 2.0 * centre + plus
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = 0.5 * (minus - plus) / curvature
        return np.where((curvature < 0) & np.isfinite(delta), np.clip(delta, -0.5, 0.5), 0.0)

    dx = offset(image[r, c - 1], image[r, c], image[r, c + 1])
    dy = offset(image[r - 1, c], image[r, c], image[r + 1, c])
    return cols + dx, rows + dy


def find_transients(
    score: Any,
    *,
    threshold: float = 5.0,
    flux: Any = None,
    flux_error: Any = None,
    mask: np.ndarray | None = None,
    wcs: WCS | None = None,
    min_separation: int = 3,
    sign: Literal["both", "positive", "negative"] = "both",
) -> Table:
    """Find transient candidates as local extrema of a score image above a threshold.

    Parameters
    ----------
    score : `~astropy.nddata.CCDData` or `~numpy.ndarray`
        The score image in sigma units (the ``Scorr`` of a subtraction). Its mask
        and WCS are used when it is a CCDData.
    threshold : float
        Detection threshold on ``|score|`` in sigma.
    flux, flux_error : `~astropy.nddata.CCDData` or `~numpy.ndarray`, optional
        Transient flux (PSF photometry, ``alpha``) and its error images, sampled at
        each candidate's peak pixel.
    mask : `~numpy.ndarray`, optional
        Pixels where nothing may be detected (OR-ed with the score's own mask).
    wcs : `~astropy.wcs.WCS`, optional
        Gives ``ra``, ``dec`` columns; default the score's own WCS.
    min_separation : int
        Two candidates are at least this many pixels apart (the local-extremum box
        is ``2*min_separation + 1`` wide).
    sign : {'both', 'positive', 'negative'}
        Brightening (positive score), fading (negative) or both.

    Returns
    -------
    `~astropy.table.Table`
        Columns ``id``, ``x``, ``y`` (0-based pixels, x the column, refined to
        sub-pixel with a parabola through the peak), ``x_peak``, ``y_peak`` (the
        integer peak pixel), ``score`` (signed, sigma), and, when given, ``flux``,
        ``flux_err`` and ``snr`` (= flux / flux_err), and ``ra``, ``dec`` (deg)
        with a WCS. Sorted by ``|score|``, highest first.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.transients import find_transients
    >>> score = np.zeros((32, 32))
    >>> score[10, 20] = 8.0
    >>> score[25, 5] = -6.0
    >>> table = find_transients(score, threshold=5.0)
    >>> table["x_peak"].tolist(), table["y_peak"].tolist(), table["score"].tolist()
    ([20, 5], [10, 25], [8.0, -6.0])
    """
    if sign not in ("both", "positive", "negative"):
        raise ValueError(f"sign must be 'both', 'positive' or 'negative', got {sign!r}")
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number of sigma, got {threshold}")
    data, own_mask, own_wcs, _ = _as_array(score, "score")
    bad = ~np.isfinite(data)
    for extra in (own_mask, mask):
        if extra is not None:
            if extra.shape != data.shape:
                raise ValueError(f"mask shape {extra.shape} does not match score {data.shape}")
            bad |= extra
    wcs = own_wcs if wcs is None else wcs

    signed = {"both": np.abs(data), "positive": data, "negative": -data}[sign]
    signed = np.where(bad, -np.inf, signed)
    size = 2 * int(min_separation) + 1
    local_max = ndimage.maximum_filter(signed, size=size, mode="constant", cval=-np.inf)
    rows, cols = np.nonzero((signed == local_max) & (signed >= threshold))

    table = Table()
    order = np.argsort(-signed[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    x, y = _subpixel_peak(np.where(bad, 0.0, signed), rows, cols)
    table["id"] = np.arange(1, rows.size + 1)
    table["x"] = x
    table["y"] = y
    table["x_peak"] = cols
    table["y_peak"] = rows
    table["score"] = data[rows, cols]
    if flux is not None:
        flux_data, _, _, flux_unit = _as_array(flux, "flux")
        table["flux"] = flux_data[rows, cols]
        if flux_unit is not None:
            table["flux"].unit = flux_unit
    if flux_error is not None:
        err_data, _, _, err_unit = _as_array(flux_error, "flux_error")
        table["flux_err"] = err_data[rows, cols]
        if err_unit is not None:
            table["flux_err"].unit = err_unit
        if flux is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                table["snr"] = flux_data[rows, cols] / err_data[rows, cols]
    if wcs is not None and wcs.has_celestial:
        sky = wcs.celestial.pixel_to_world(x, y)
        table["ra"] = sky.ra.deg * u.deg
        table["dec"] = sky.dec.deg * u.deg
    table.meta["threshold"] = float(threshold)
    table.meta["sign"] = sign
    return table
