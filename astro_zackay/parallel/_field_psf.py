"""One PSF over the whole field of an image too large to hold: stars found cutout by cutout.

`~astro_zackay.subtract` estimates each image's PSF from the stars of the whole image
(one KL model over the image's coordinates). `subtract_tiled` cannot hold the image,
but the PSF only reads pixels near its stars. So each cutout of a grid that covers
the image is read on a worker, its background estimated and its stars found as
`subtract` finds them (`~astro_zackay._psf_input.find_image_stars`); the worker
returns only the star table (in the image's coordinates) and, around each star, a
window of the data, variance and mask wide enough for everything the estimate reads
(the stamp, its background ring, the wing profile). On the client the windows are
placed into an image of the full shape whose other pixels are masked, and the PSF is
estimated on it by the estimator `subtract` uses, with the union of the stars.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from astropy.table import vstack

from ._cluster import captured, gather_warned

__all__ = ["field_psf"]

_log = logging.getLogger(__name__)

#: Radius of each star's window, in FWHM: the wing profiles reach 12 FWHM.
WINDOW_FWHM = 14.0


def _cutout_stars(source: Any, rows: slice, cols: slice, unit: Any, gain: Any,
                  saturation: Any, name: str) -> tuple | None:
    """The stars of one cutout (image coordinates) and their windows (on a worker).

    ``source`` is the file's `astro_zackay.parallel._tiled._Source` (read as
    `subtract` reads it: its mask and uncertainty extensions, its header's keywords).
    """
    from .._psf_input import find_image_stars
    from ..background import _estimate_from
    from ._tiled import _section_image

    img = _section_image(source, rows, cols, unit, gain, saturation)
    background, detection = _estimate_from(img)
    stars = find_image_stars(img, background, name=name, option=None, detection=detection)
    if stars is None or not len(stars):
        return None
    # the estimator's first step drops the stars under its S/N cut: drop them here, so
    # that their pixels are never sent (the fainter stars are the many)
    stars = stars[np.asarray(stars["snr"], dtype=float) >= _psf_snr_min()]
    if not len(stars):
        return None
    reach = int(np.ceil(WINDOW_FWHM * float(stars.meta.get("fwhm", np.nanmedian(
        stars["fwhm"]))))) + 2
    windows = []
    for x, y in zip(stars["x"], stars["y"]):
        y0, x0 = max(int(round(y)) - reach, 0), max(int(round(x)) - reach, 0)
        y1 = min(int(round(y)) + reach + 1, img.shape[0])
        x1 = min(int(round(x)) + reach + 1, img.shape[1])
        box = (slice(y0, y1), slice(x0, x1))
        windows.append((y0 + rows.start, x0 + cols.start, img.data[box].copy(),
                        img.variance[box].copy(), img.mask[box].copy()))
    stars["x"] += cols.start
    stars["y"] += rows.start
    sources = stars.meta.get("sources")
    if sources is not None:
        sources = {k: np.asarray(v) for k, v in sources.items()}
        sources["x"] = sources["x"] + cols.start
        sources["y"] = sources["y"] + rows.start
    meta = {"fwhm": stars.meta.get("fwhm"), "sources": sources,
            "image": {k: getattr(img, k) for k in ("unit", "gain", "read_noise", "saturation",
                                                   "variance_estimated")}}
    stars.meta = {}
    return stars, windows, meta


def _psf_snr_min() -> float:
    """The S/N cut of the PSF stars in the estimator that `subtract` runs."""
    import inspect

    from ..psf.estimate import _estimate_psf

    return float(inspect.signature(_estimate_psf).parameters["snr_min"].default)


def _cutouts(shape: tuple[int, int], size: tuple[int, int]) -> list[tuple[slice, slice]]:
    """Cutouts of ``size`` side by side that cover the image (the last ones flush)."""
    starts = [sorted({min(s, n - c) for s in range(0, n, c)}) for n, c in zip(shape, size)]
    return [(slice(y, y + size[0]), slice(x, x + size[1]))
            for y in starts[0] for x in starts[1]]


def field_psf(client: Any, source: Any, shape: tuple[int, int], size: tuple[int, int],
              unit: Any, gain: Any, saturation: Any, name: str) -> Any:
    """The PSF of the whole image from the stars of cutouts of ``size`` covering it.

    ``source`` is the file's `astro_zackay.parallel._tiled._Source`.  Returns a
    `~astro_zackay.psf.KLPSFModel` over the image's coordinates, or None when no
    cutout has a star (the caller then keeps its central estimate).  The workers'
    warnings are issued here, each once.
    """
    from .._ccd import ImageData
    from .._psf_input import estimate_image_psf

    cuts = _cutouts(shape, size)
    futures = [client.submit(captured, _cutout_stars, source, rows, cols, unit, gain,
                             saturation, name, pure=False) for rows, cols in cuts]
    found = [f for f in gather_warned(client, futures) if f is not None]
    _log.info("%s: PSF stars found in %d of %d cutouts of %dx%d px", name, len(found),
              len(cuts), size[1], size[0])
    if not found:
        return None
    data = np.zeros(shape)
    variance = np.zeros(shape)  # masked outside the windows; untouched pages stay unmapped
    mask = np.ones(shape, dtype=bool)  # 1 byte a pixel: the one array touched whole
    for _, windows, _ in found:
        for y0, x0, d, v, m in windows:
            box = (slice(y0, y0 + d.shape[0]), slice(x0, x0 + d.shape[1]))
            data[box], variance[box], mask[box] = d, v, m
    stars = vstack([f[0] for f in found], metadata_conflicts="silent")
    stars = stars[np.argsort(-np.asarray(stars["snr"]), kind="stable")]  # as the finder
    stars["id"] = np.arange(1, len(stars) + 1)
    parts = [f[2]["sources"] for f in found if f[2]["sources"] is not None]
    sources = ({k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts
               else None)
    fwhms = [f[2]["fwhm"] for f in found if f[2]["fwhm"] is not None]
    stars.meta = {"fwhm": float(np.median(fwhms)) if fwhms else None, "sources": sources}
    # the arrays as they are (no coercion, which would copy them): the pages of the
    # zeros that no window touched are never mapped
    whole = ImageData(data, variance, mask, **found[0][2]["image"])
    return estimate_image_psf(whole, stars, name=name, option=f"{name} PSF")
