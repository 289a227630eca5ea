"""Registration of one image onto the pixel grid of another, by stars or by WCS."""

from __future__ import annotations

import logging
import numbers
from typing import Any, Literal

import numpy as np
from astropy.nddata import CCDData

from ._ccd import ImageData, to_ccddata, to_image
from ._checks import named_errors

__all__ = ["align"]

log = logging.getLogger(__name__)


def _warp_by_stars(
    source: ImageData, target: ImageData, order: int, max_control_points: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    import astroalign
    from skimage.transform import warp

    try:
        transform, _ = astroalign.find_transform(
            source.filled(np.nanmedian(source.data[~source.mask])),
            target.filled(np.nanmedian(target.data[~target.mask])),
            max_control_points=max_control_points,
        )
    except (astroalign.MaxIterError, ValueError) as exc:
        raise ValueError(
            f"astroalign could not match the star patterns of the two images ({exc}); "
            "check that they overlap and contain at least 3 common stars, or use "
            "method='wcs' when both have a WCS"
        ) from None

    def _warp(array: np.ndarray, warp_order: int, cval: float) -> np.ndarray:
        return warp(
            array,
            inverse_map=transform.inverse,
            output_shape=target.shape,
            order=warp_order,
            mode="constant",
            cval=cval,
            preserve_range=True,
        )

    data = _warp(source.filled(0.0), order, np.nan)
    variance = _warp(np.where(source.mask, 0.0, source.variance), 1, np.nan)
    # a pixel is bad if any masked input pixel contributes to it
    bad = _warp(source.mask.astype(float), 1, 1.0) > 0
    params = {
        "AZALROT": float(np.degrees(transform.rotation)),
        "AZALSCL": float(transform.scale),
        "AZALDX": float(transform.translation[0]),
        "AZALDY": float(transform.translation[1]),
    }
    return data, variance, bad, params


#: Points per side of the grid of pixels whose sky positions test two footprints' overlap.
_OVERLAP_GRID = 17


def _lands_inside(source: ImageData, target: ImageData) -> bool:
    """Whether any point of a grid over ``source`` falls on ``target``, through their WCSs."""
    ny, nx = source.shape
    y, x = np.meshgrid(np.linspace(-0.5, ny - 0.5, _OVERLAP_GRID),
                       np.linspace(-0.5, nx - 0.5, _OVERLAP_GRID), indexing="ij")
    with np.errstate(invalid="ignore"):
        tx, ty = target.wcs.world_to_pixel(source.wcs.pixel_to_world(x.ravel(), y.ravel()))
    ty_max, tx_max = target.shape
    inside = (tx >= -0.5) & (tx <= tx_max - 0.5) & (ty >= -0.5) & (ty <= ty_max - 0.5)
    return bool(np.any(inside))


def _check_wcs_pair(source: ImageData, target: ImageData) -> None:
    """Raise a ValueError for WCSs that cannot map one image onto the other: not both
    celestial, or with a reference point or pixel scale that is not finite."""
    for name, img in (("image", source), ("target", target)):
        wcs = img.wcs.wcs
        if not img.wcs.has_celestial:
            raise ValueError(
                f"method='wcs': the {name}'s WCS is not celestial (CTYPE {list(wcs.ctype)}), "
                "so the images cannot be matched on the sky; give both images a celestial "
                "WCS (e.g. RA---TAN/DEC--TAN) or use method='stars'"
            )
        with np.errstate(invalid="ignore", over="ignore"):  # inf x 0 in the matrix
            values = [wcs.crval, wcs.crpix, img.wcs.pixel_scale_matrix]
        if not all(np.all(np.isfinite(v)) for v in values):
            raise ValueError(
                f"method='wcs': the {name}'s WCS has a CRVAL, CRPIX or CD/CDELT that is not "
                "finite (NaN or inf); fix its header or use method='stars'"
            )


def _check_overlap(source: ImageData, target: ImageData) -> None:
    """Raise a ValueError when the images' footprints on the sky do not overlap."""
    if not (_lands_inside(source, target) or _lands_inside(target, source)):
        raise ValueError(
            "method='wcs': no overlap between the images' footprints on the sky, so no pixel "
            "of the image lands on the target; check the WCS of both images (CRVAL, CRPIX, "
            "CD/CDELT), or use method='stars'"
        )


def _warp_by_wcs(
    source: ImageData, target: ImageData, order: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    if source.wcs is None or target.wcs is None:
        raise ValueError(
            "method='wcs' needs a WCS on both images; use method='stars' to align by the "
            "star patterns instead"
        )
    try:
        from reproject import reproject_interp
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "method='wcs' needs the optional package reproject: pip install astro_zackay[all]"
        ) from None
    orders = {0: "nearest-neighbor", 1: "bilinear", 3: "bicubic"}
    if order not in orders:
        raise ValueError(f"order must be 0, 1 or 3 for method='wcs', got {order}")
    _check_wcs_pair(source, target)
    _check_overlap(source, target)
    kwargs = {"output_projection": target.wcs, "shape_out": target.shape}
    data, footprint = reproject_interp(
        (source.filled(0.0), source.wcs), order=orders[order], **kwargs
    )
    variance, _ = reproject_interp(
        (np.where(source.mask, 0.0, source.variance), source.wcs), order="bilinear", **kwargs
    )
    bad_in, _ = reproject_interp(
        (source.mask.astype(float), source.wcs), order="bilinear", **kwargs
    )
    bad = (footprint == 0) | ~(np.nan_to_num(bad_in, nan=1.0) == 0)
    return data, variance, bad, {}


def _check_align_options(method: str, order: Any, max_control_points: Any) -> None:
    """Raise a ValueError for an interpolation order or star count `align` cannot use."""
    orders = (0, 1, 3) if method == "wcs" else (0, 1, 2, 3, 4, 5)
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in orders:
        allowed = ", ".join(str(o) for o in orders[:-1]) + f" or {orders[-1]}"
        raise ValueError(f"order must be {allowed} for method={method!r}, got {order!r}: "
                         "the interpolation order (3, bicubic, by default)")
    if (isinstance(max_control_points, bool)
            or not isinstance(max_control_points, numbers.Integral) or max_control_points < 3):
        raise ValueError(f"max_control_points must be a whole number >= 3, got "
                         f"{max_control_points!r}: astroalign matches triangles of stars "
                         "(50 by default)")


def align(
    image: Any,
    target: Any,
    *,
    method: Literal["stars", "wcs"] = "stars",
    order: int = 3,
    max_control_points: int = 50,
    unit: Any = None,
    saturation: Any = None,
) -> CCDData:
    """Resample ``image`` onto the pixel grid of ``target``.

    Parameters
    ----------
    image : `~astropy.nddata.CCDData` or any input of the CCDData boundary
        The image to move.
    target : `~astropy.nddata.CCDData` or any input of the CCDData boundary
        The image whose pixel grid (and WCS) the result takes.
    method : {'stars', 'wcs'}
        ``'stars'`` matches star triangles with astroalign (a similarity transform:
        shift, rotation, scale); ``'wcs'`` reprojects with reproject through both WCSs.
    order : int
        Interpolation order of the data (3, bicubic, by default; 0, 1 or 3 for 'wcs').
    max_control_points : int
        Stars astroalign may use to match the images.
    unit, saturation : optional
        Passed to the CCDData boundary for both images.

    Returns
    -------
    `~astropy.nddata.CCDData`
        The aligned image on the target grid, with the target's WCS. Its variance is
        the input variance interpolated bilinearly, an upper bound on the
        interpolated noise (interpolation smooths and correlates the noise, which
        the per-pixel variance cannot express). Pixels outside the input footprint
        or touched by a masked input pixel are masked. The transform is recorded
        in ``meta`` (``AZALIGN`` and, for 'stars', ``AZALROT``/``AZALSCL``/``AZALDX``/``AZALDY``).

    Raises
    ------
    ValueError
        If the images cannot be matched, or 'wcs' is asked for without WCSs or with
        footprints that do not overlap.
    TypeError
        For a ``target`` that is a shape (a tuple of numbers) instead of an image.

    Examples
    --------
    >>> from astro_zackay.alignment import align
    >>> from astro_zackay.simulation import simulate_pair
    >>> pair = simulate_pair((192, 192), n_stars=80, flux_range=(3e3, 2e5),
    ...                      shift=(2.5, -1.5), seed=3)
    >>> aligned = align(pair.science.ccd, pair.reference.ccd)
    >>> abs(aligned.meta["AZALDX"] + 2.5) < 0.1, abs(aligned.meta["AZALDY"] - 1.5) < 0.1
    (True, True)
    """
    if method not in ("stars", "wcs"):
        raise ValueError(f"method must be 'stars' or 'wcs', got {method!r}")
    _check_align_options(method, order, max_control_points)
    if isinstance(target, tuple | list) and all(isinstance(v, numbers.Real) for v in target):
        raise TypeError(
            f"target must be the image whose pixel grid the result takes (a CCDData, a 2-D "
            f"array, a FITS path or HDU), got the numbers {target!r}: a shape alone gives no "
            "grid to register on (no stars, no WCS)"
        )
    with named_errors("image"):
        source = to_image(image, unit=unit, saturation=saturation)
    with named_errors("target"):
        reference = to_image(target, unit=unit, saturation=saturation)
    if method == "stars":
        data, variance, bad, params = _warp_by_stars(source, reference, order, max_control_points)
    else:
        data, variance, bad, params = _warp_by_wcs(source, reference, order)
    bad |= ~np.isfinite(data) | ~np.isfinite(variance)
    data = np.where(bad, 0.0, data)
    variance = np.where(bad, 0.0, variance)
    template = ImageData(
        data=data,
        variance=variance,
        mask=bad,
        unit=source.unit,
        wcs=reference.wcs,
        meta=source.meta,
    )
    log.info("aligned by %s: %s", method, params or "WCS reprojection")
    return to_ccddata(
        data,
        template,
        variance=variance,
        step=("AZALIGN", f"aligned to the target grid by {method}, order={order}"),
        extra_meta=params,
    )
