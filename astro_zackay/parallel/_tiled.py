"""ZOGY of one image pair larger than a worker's memory, tile by tile on Dask.

The image is cut into the same overlapping tiles as `~astro_zackay.subtract`'s
varying-PSF path (`astro_zackay._zogy_field._Layout`: inner side ``tile``, each padded
to an FFT grid by the PSF stamp's side).  One Dask task per tile reads its padded
window of both files by sections (``hdul[i].section``: an uncompressed image HDU is
never read whole), prepares it, runs the per-tile core
(`astro_zackay._zogy_field.zogy_tiles`, the function `subtract` runs on its stack of
tiles) and writes the tile's inner pixels into the output file, created at full size
first, through a memory map of its own region: no process holds a full-size array.

What is global, and whence (the "plan", computed once on the client):

* PSFs: given, or estimated as `subtract` estimates them on the whole image, one
  model over the image's coordinates, from the stars found in cutouts of
  ``plan_size`` that cover the image (one task each; ``field_psf=True``,
  `astro_zackay.parallel._field_psf`), or on the central cutout alone (a varying
  model then evaluated at positions clamped to it);
* flux ratio, shift, astrometric noise: given, or from the stars matched in a grid of
  ``plan_grid`` x ``plan_grid`` cutouts spread over the image (one task each; as
  `subtract` measures them on the whole image), combined;
* the background noise level used to grow the mask: the cutout's.

Per tile, on its worker: the background (``background='auto'``: estimated on the
tile's window, which reaches 3 background boxes beyond the tile's padded grid and
starts and ends on the whole image's box boundaries, so that the boxes near the tile
hold the pixels they hold in `subtract`'s map of the whole image; ``'none'``: the
files are already background-subtracted, of noise ``sigmas``), the variance map, the
tile's noise level, PSFs at its centre, the grown mask (on its window) and the
background offset of its D.  The noise is taken as white (`subtract`'s
``noise='white'``): the noise spectrum of a resampled image is not measured here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ._cluster import cluster_client

__all__ = ["subtract_tiled"]

_log = logging.getLogger(__name__)

#: Output images written by `subtract_tiled`, one image extension each.
OUTPUTS = ("DIFF", "SCORR", "FLUX", "FLUXERR")
#: Background boxes read beyond a tile's padded grid on each side (see `_window`).
BACKGROUND_BOXES = 3
#: Side of the central cutout on which the global plan is estimated.
PLAN_SIZE = 2048


def _image_hdu(path: str | os.PathLike, hdu: int | str, name: str) -> tuple[tuple[int, int],
                                                                          fits.Header]:
    """``(shape, header)`` of an uncompressed 2-D image HDU, checked; its data not read."""
    try:
        with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
            h = hdul[hdu]
            if isinstance(h, fits.CompImageHDU):
                raise ValueError(
                    f"{name} ({path}) HDU {hdu!r} is tile-compressed: sections of it cannot "
                    "be read without decompressing whole tiles; write it uncompressed "
                    "(astropy ImageHDU) for subtract_tiled"
                )
            if not isinstance(h, fits.PrimaryHDU | fits.ImageHDU) or h.header.get("NAXIS") != 2:
                raise ValueError(
                    f"{name} ({path}) HDU {hdu!r} is not a 2-D image "
                    f"({type(h).__name__}, NAXIS={h.header.get('NAXIS')}); pass hdu= the image"
                )
            header = h.header.copy()
    except (KeyError, IndexError) as exc:
        raise ValueError(f"{name} ({path}) has no HDU {hdu!r}") from exc
    return (int(header["NAXIS2"]), int(header["NAXIS1"])), header


def _read(path: str | os.PathLike, hdu: int | str, rows: slice, cols: slice) -> np.ndarray:
    """A section of an image HDU as float64 (only those pixels are read)."""
    with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
        return np.asarray(hdul[hdu].section[rows, cols], dtype=np.float64)


class _Window:
    """The layout of one tile read alone: its FFT grid, the image inside it, its inner cell.

    Quacks as `astro_zackay._zogy_field._Layout` for `zogy_tiles`: the arrays it is
    given are already grid-shaped (zero beyond the image).
    """

    n = 1

    def __init__(self, grid: tuple[int, int], offset: tuple[int, int],
                 cell: tuple[slice, slice]):
        self.grid, self.offset = grid, offset
        self.shape = tuple(s.stop - s.start for s in cell)

    def upload(self, be: Any, arr: np.ndarray, bad: Any, dtype: Any) -> Any:
        out = be.asarray(arr, dtype=dtype).copy()
        if bad is not None:
            out[bad] = 0.0
        return out[None]

    def image(self, xp: Any, stack: Any) -> Any:
        (oy, ox), (ny, nx) = self.offset, self.shape
        return xp.ascontiguousarray(stack[0, oy:oy + ny, ox:ox + nx])

    def field(self, xp: Any, values: Any, dtype: Any) -> Any:
        return xp.asarray(np.asarray(values, dtype=dtype).reshape(1, 1))


class _ClampedPSF:
    """A PSF model of a cutout, evaluated in the whole image's pixels (clamped to the cutout)."""

    def __init__(self, sampler: Any, origin: tuple[int, int], size: tuple[int, int]):
        self.sampler, self.origin, self.size = sampler, origin, size
        self.varying = bool(getattr(sampler, "varying", False))

    def __call__(self, x: float, y: float) -> np.ndarray:
        x = min(max(x - self.origin[1], 0.0), self.size[1] - 1.0)
        y = min(max(y - self.origin[0], 0.0), self.size[0] - 1.0)
        return self.sampler(x, y)


def _layout(shape: tuple[int, int], tile: int, stamp: int) -> Any:
    from .._zogy_field import _Layout

    side = (min(int(tile), shape[0]), min(int(tile), shape[1]))
    return _Layout(shape, side, stamp)


def _prepared_window(path: str, hdu: Any, rows: slice, cols: slice, plan: dict,
                     which: int) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
    """One image's window: background-subtracted data (bad 0), rms, variance, bad pixels."""
    raw = _read(path, hdu, rows, cols)
    if plan["background"] == "none":
        bad = ~np.isfinite(raw)
        raw[bad] = 0.0
        return raw, np.full(raw.shape, plan["sigmas"][which]), None, bad
    from astropy.nddata import CCDData

    from .._ccd import to_image
    from .._prepare import prepare_image

    psf = plan["psfs"][which]
    cy, cx = (rows.start + rows.stop - 1) / 2.0, (cols.start + cols.stop - 1) / 2.0
    img = to_image(CCDData(raw, unit=plan["units"][which]), gain=plan["gain"][which],
                   saturation=plan["saturation"][which], dtype=np.float64)
    prep = prepare_image(img, psf(cx, cy), name=f"tile of {path}", option="psf",
                         need_stars=False)
    return prep.data, prep.rms, prep.image.variance, prep.image.mask


def _window_mask(bad: np.ndarray, pixels: tuple, blanks: tuple, origin: tuple[int, int],
                 shape: tuple[int, int], plan: dict, psfs: tuple, reach: list,
                 s_sigma: np.ndarray) -> np.ndarray:
    """The grown mask of a window (origin in the image, the image's ``shape``).

    As `astro_zackay._zogy_field._grown_mask` on the whole image, with this tile's
    kernels for every region in the window and the image's edge (not the window's).
    """
    from scipy import ndimage

    from ..zogy import (
        EDGE_SOURCE_SIGMA,
        _grow_mask,
        _grow_regions,
        _masked_regions,
        _pixels,
    )

    radius = max(r.core_radius for r in reach[0])
    flag = _grow_mask(bad, radius)
    sig = float(s_sigma[0])
    sigmas = list(plan["whole"])
    if bad.any():
        labels, light = _masked_regions(bad, list(pixels), sigmas, list(psfs), blanks)
        _grow_regions(flag, labels, light, reach[0], sig)
    edge_r = radius + int(np.ceil(max(abs(v) for v in plan["shift"])))
    ys = np.arange(origin[0], origin[0] + bad.shape[0])
    xs = np.arange(origin[1], origin[1] + bad.shape[1])
    edge = (((ys < edge_r) | (ys >= shape[0] - edge_r))[:, None]
            | ((xs < edge_r) | (xs >= shape[1] - edge_r))[None, :])
    on_ring = (((ys == 0) | (ys == shape[0] - 1))[:, None]
               | ((xs == 0) | (xs == shape[1] - 1))[None, :])
    ring = np.flatnonzero(on_ring)
    if ring.size:
        seeds = np.zeros(bad.shape, bool)
        for img, blank, sigma in zip(pixels, blanks, sigmas):
            seeds.ravel()[ring] |= np.abs(_pixels(img, blank, ring)) > EDGE_SOURCE_SIGMA * sigma
        labels, n = ndimage.label(seeds, structure=np.ones((3, 3)))
        on_edge = np.flatnonzero(labels)
        owner = labels.ravel()[on_edge]
        light = [np.bincount(owner, weights=np.abs(_pixels(img, blank, on_edge)),
                             minlength=n + 1)[1:] / np.sqrt(np.sum(psf**2))
                 for img, blank, psf in zip(pixels, blanks, psfs)]
        _grow_regions(edge, labels, light, reach[0], sig)
    return flag | edge


def _window(extent: tuple[slice, slice], shape: tuple[int, int],
            margin: int) -> tuple[slice, slice]:
    """The pixels a tile reads: its grid's extent, ``margin`` and `BACKGROUND_BOXES` more.

    The window's edges fall on the boundaries of the whole image's background boxes
    (`astro_zackay.background`'s default box for the image), so that the boxes inside
    it hold the pixels they hold in `subtract`'s map of the whole image; the boxes
    beyond the extent keep the interpolation between boxes near the tile as it is there.
    """
    from ..background import _default_box_size

    box = _default_box_size(shape)
    reach = margin + BACKGROUND_BOXES * box
    return tuple(slice(max((e.start - reach) // box * box, 0),
                       min(-(-(e.stop + reach) // box) * box, n))
                 for e, n in zip(extent, shape))


def _tile_task(index: int, paths: tuple, hdus: tuple, shape: tuple[int, int], tile: int,
               stamp: int, plan: dict, output: str, offsets: dict, dtype: Any) -> dict:
    """Subtract one tile from its windows and write its inner pixels (on a worker)."""
    from .._zogy_field import TilePlan, _blanks, _tile_sigma, zogy_tiles
    from ..fourier import get_array_module, unit_sum_psf
    from ..zogy import _moved_mask

    start = time.perf_counter()
    layout = _layout(shape, tile, stamp)
    cell, extent = layout.cells()[index], layout.extents()[index]
    cx, cy = layout.centres()[index]
    ext = _window(extent, shape, max(layout.offset) + stamp)
    new, rms_n, var_n, bad_n = _prepared_window(paths[1], hdus[1], *ext, plan, 1)
    ref, rms_r, var_r, bad_r = _prepared_window(paths[0], hdus[0], *ext, plan, 0)
    bad = _moved_mask(bad_r, plan["shift"]) | bad_n
    good = ~bad
    in_ext = tuple(slice(e.start - x.start, e.stop - x.start) for e, x in zip(extent, ext))
    sigmas = np.array([[_tile_sigma(rms, good, in_ext, w, None)]
                       for rms, w in zip((rms_n, rms_r), plan["whole"])])
    # the grid: the extent at its place, zero beyond the image
    at = tuple(slice(e.start - (c.start - o), e.stop - (c.start - o))
               for e, c, o in zip(extent, cell, layout.offset))

    def on_grid(arr, fill=0):
        if arr is None:
            return None
        out = np.full(layout.grid, fill, dtype=arr.dtype)
        out[at] = arr[in_ext]
        return out

    be = get_array_module("numpy")
    new_bad_g, ref_bad_g = on_grid(bad_n, False), on_grid(bad_r, False)
    pn = unit_sum_psf(plan["psfs"][1](cx, cy), "science PSF")[None]
    pr = unit_sum_psf(plan["psfs"][0](cx, cy), "reference PSF")[None]
    centre = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    psfs_c = (unit_sum_psf(plan["psfs"][1](*centre), "science PSF"),
              unit_sum_psf(plan["psfs"][0](*centre), "reference PSF"))

    def grow(reach, s_sigma):
        flag = _window_mask(bad, (new, ref), (bad_n, bad_r), (ext[0].start, ext[1].start),
                            shape, plan, psfs_c, reach, s_sigma)
        return on_grid(flag, True)

    window = _Window(layout.grid, layout.offset, cell)
    tplan = TilePlan(plan["beta"], plan["beta_err"], plan["shift"], plan["ast"], plan["eps"])
    out, flag, offs, images = zogy_tiles(
        be, window, {"new": on_grid(new), "ref": on_grid(ref), "var_new": on_grid(var_n),
                     "var_ref": on_grid(var_r)}, _blanks(be, new_bad_g, ref_bad_g),
        pn, pr, sigmas, tplan, grow, dtype, 1)
    oy, ox = layout.offset
    masked = (flag | on_grid(bad, False))[oy:oy + window.shape[0], ox:ox + window.shape[1]]
    for name, key in zip(OUTPUTS, ("D", "Scorr", "alpha", "alpha_err")):
        data = np.asarray(images[key], dtype=np.float32)
        data[masked] = np.nan
        mm = np.memmap(output, dtype=">f4", mode="r+", offset=offsets[name], shape=shape)
        mm[cell] = data
        mm.flush()
        del mm
    return {"index": index, "x_start": cell[1].start, "x_stop": cell[1].stop,
            "y_start": cell[0].start, "y_stop": cell[0].stop, "x_centre": cx, "y_centre": cy,
            "sigma_ref": float(sigmas[1][0]), "sigma_sci": float(sigmas[0][0]),
            "F_D": float(out["F_D"][0]) / plan["beta"], "F_S": float(out["F_S"][0]) / plan["beta"],
            "background_offset": float(offs[0]), "n_masked": int(masked.sum()),
            "seconds": time.perf_counter() - start}


def _create_output(path: str | os.PathLike, shape: tuple[int, int], header: fits.Header,
                   meta: dict, overwrite: bool) -> dict:
    """Write the output file's headers with zero-filled data (sparse); the data offsets."""
    if os.path.exists(path) and not overwrite:
        raise OSError(f"{path} exists: pass overwrite=True to replace it")
    nbytes = shape[0] * shape[1] * 4
    padded = -(-nbytes // 2880) * 2880
    primary = fits.PrimaryHDU()
    for key, value in meta.items():
        primary.header[key] = value
    offsets = {}
    with open(path, "wb") as f:
        f.write(primary.header.tostring().encode("ascii"))
        for name in OUTPUTS:
            h = fits.Header()
            h["XTENSION"] = "IMAGE"
            h["BITPIX"] = -32
            h["NAXIS"] = 2
            h["NAXIS1"] = shape[1]
            h["NAXIS2"] = shape[0]
            h["PCOUNT"] = 0
            h["GCOUNT"] = 1
            h["EXTNAME"] = name
            if header is not None:
                from astropy.wcs import WCS

                with contextlib.suppress(Exception):
                    h.update(WCS(header).to_header())
            f.write(h.tostring().encode("ascii"))
            offsets[name] = f.tell()
            f.seek(padded, os.SEEK_CUR)
        f.truncate(f.tell())
    return offsets


def subtract_tiled(
    reference_path: str | os.PathLike,
    science_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    client: Any = None,
    tile: int = 1024,
    reference_psf: Any = None,
    science_psf: Any = None,
    flux_ratio: float | None = None,
    fit_shift: bool = True,
    astrometric_noise: Any = "auto",
    psf_error: Any = "auto",
    background: str = "auto",
    sigmas: tuple[float, float] | None = None,
    unit: Any = None,
    gain: Any = None,
    saturation: Any = None,
    hdu: int | str = 0,
    plan_size: int = PLAN_SIZE,
    plan_grid: int = 3,
    field_psf: bool = True,
    dtype: Any = np.float32,
    overwrite: bool = False,
) -> Table:
    """ZOGY of one image pair larger than memory: tiles on Dask workers, read by sections.

    Parameters
    ----------
    reference_path, science_path : str or path-like
        Registered FITS images of one shape (uncompressed image HDUs ``hdu``).
    output_path : str or path-like
        The FITS file written: image extensions DIFF (D), SCORR, FLUX and FLUXERR,
        masked pixels NaN, the plan in the primary header.
    client : distributed.Client, optional
        Used as it is; None starts the LocalCluster of `subtract_batch` for the call
        (one single-threaded worker process per core, loopback only, no dashboard,
        without Dask's malloc trim threshold) and closes it.
    tile : int
        Inner side of the square tiles (at least 32); each task holds about
        ``60 * (tile + 2 * stamp)**2`` bytes plus its window's background estimate.
    reference_psf, science_psf : optional
        As `~astro_zackay.subtract` takes them; None: estimated (see ``field_psf``).
    flux_ratio, fit_shift, astrometric_noise, psf_error
        As `~astro_zackay.subtract`; what is fitted is fitted on the central cutout.
    background : {'auto', 'none'}
        ``'auto'``: each tile's background estimated on its window (with a margin);
        ``'none'``: the files are background-subtracted with noise ``sigmas``.
    sigmas : (float, float), optional
        ``(reference, science)`` background noise, required by ``background='none'``.
    unit, gain, saturation : optional
        One value or ``(reference, science)``; the unit defaults to each file's BUNIT,
        else electrons.
    hdu : int or str
        The image HDU of both files.
    plan_size : int
        Side of the central cutout on which the PSFs are estimated.
    plan_grid : int
        The flux ratio, shift and astrometric noise come from the stars matched in
        ``plan_grid`` x ``plan_grid`` cutouts of ``plan_size`` spread over the image
        (one task each), combined; 1: the central cutout alone.
    field_psf : bool
        With ``plan_grid`` > 1, estimate a PSF that is not given from the stars of the
        whole image, found in cutouts of ``plan_size`` covering it: one model over the
        image, as `~astro_zackay.subtract` estimates it. The client then holds the
        pixels around the PSF stars in arrays of the full shape (at most 17 bytes a
        pixel, of which only the stars' pages are mapped). False: estimated on the
        central cutout (the client holds that cutout only).
    dtype : {numpy.float32, numpy.float64}
        Working precision.
    overwrite : bool
        Replace an existing ``output_path``.

    Returns
    -------
    `~astropy.table.Table`
        One row per tile (inner pixels, centre, noises, F_D, F_S, background offset,
        masked pixels, seconds), the plan in ``meta``.

    Raises
    ------
    ValueError
        For images of different shapes, a compressed or non-image HDU, or bad options
        (checked before any tile runs).

    Examples
    --------
    Options are checked before any file is opened or any worker started:

    >>> from astro_zackay.parallel._tiled import subtract_tiled
    >>> subtract_tiled("ref.fits", "sci.fits", "out.fits", background="flat")
    Traceback (most recent call last):
    ...
    ValueError: background must be 'auto' or 'none', got 'flat'
    """
    from .._psf_input import as_psf_sampler
    from .._zogy_field import check_tiles

    check_tiles(tile)
    if tile is None or tile == "auto":
        raise ValueError(f"tile must be an integer side >= 32 px for subtract_tiled, got {tile!r}")
    if not isinstance(field_psf, bool | np.bool_):
        raise TypeError(f"field_psf must be True or False, got {field_psf!r}")
    for name, value, least in (("plan_grid", plan_grid, 1), ("plan_size", plan_size, 64)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if background not in ("auto", "none"):
        raise ValueError(f"background must be 'auto' or 'none', got {background!r}")
    if background == "none" and (sigmas is None or len(sigmas) != 2
                                 or not all(np.isfinite(s) and s > 0 for s in sigmas)):
        raise ValueError("background='none' needs sigmas=(reference, science): the background "
                         f"noise of each file, positive; got {sigmas!r}")
    shape, ref_header = _image_hdu(reference_path, hdu, "reference image")
    sci_shape, sci_header = _image_hdu(science_path, hdu, "science image")
    if sci_shape != shape:
        raise ValueError(f"the reference {shape} and science {sci_shape} images differ in "
                         "shape: give registered images of one shape")
    paths = (os.fspath(reference_path), os.fspath(science_path))
    units = tuple(_pair(unit)[i] or h.get("BUNIT", "electron")
                  for i, h in enumerate((ref_header, sci_header)))
    psfs = [None if p is None else as_psf_sampler(p) for p in (reference_psf, science_psf)]
    if os.path.exists(output_path) and not overwrite:
        raise OSError(f"{output_path} exists: pass overwrite=True to replace it")
    with cluster_client(client) as used:
        plan = _plan(paths, hdu, shape, psfs, units, flux_ratio, fit_shift, astrometric_noise,
                     psf_error, background, sigmas, gain, saturation, plan_size,
                     plan_grid, used, field_psf)
        centre = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
        stamp = max(plan["psfs"][1](*centre).shape + plan["psfs"][0](*centre).shape)
        layout = _layout(shape, tile, stamp)
        meta = {"AZBETA": plan["beta"], "AZBETAE": plan["beta_err"], "AZDX": plan["shift"][0],
                "AZDY": plan["shift"][1], "AZASTX": plan["ast"][0], "AZASTY": plan["ast"][1],
                "AZNTILE": layout.n, "AZTILE": int(tile)}
        offsets = _create_output(output_path, shape, sci_header, meta, overwrite)
        start = time.perf_counter()
        futures = [used.submit(_tile_task, i, paths, (hdu, hdu), shape, int(tile), stamp, plan,
                               os.fspath(output_path), offsets, dtype, pure=False)
                   for i in range(layout.n)]
        rows = used.gather(futures)
    table = Table(rows=[list(r.values()) for r in rows], names=list(rows[0]))
    table.meta.update(meta)
    table.meta["seconds"] = time.perf_counter() - start
    _log.info("subtract_tiled: %d tiles of %d px in %.1f s", layout.n, tile,
              table.meta["seconds"])
    return table


def _pair(value: Any) -> tuple[Any, Any]:
    if isinstance(value, tuple | list):
        return value[0], value[1]
    return value, value


def _cutout_match(paths: tuple, hdu: Any, rows: slice, cols: slice, units: tuple,
                  gains: tuple, sats: tuple, stamps: tuple, needs: list) -> tuple | None:
    """The stars of one cutout of both images matched (on a worker): the match's numbers."""
    import warnings

    from astropy.nddata import CCDData

    from .._ccd import to_image
    from .._prepare import prepare_image
    from .._warnings import FewStarsWarning
    from ..subtraction import _match

    prepared = []
    for i, name in enumerate(("reference image", "science image")):
        img = to_image(CCDData(_read(paths[i], hdu, rows, cols), unit=units[i]),
                       gain=gains[i], saturation=sats[i], dtype=np.float64)
        prepared.append(prepare_image(img, stamps[i], name=name, option="psf",
                                      need_stars=True))
    with warnings.catch_warnings():  # a cutout with too few stars is left out, said below
        warnings.simplefilter("ignore", FewStarsWarning)
        match = _match(prepared[0], prepared[1], stamps, needs)
    if match is None:
        return None
    return (match.flux_ratio, match.flux_ratio_error, tuple(match.offset),
            tuple(match.scatter), int(match.n_matched))


class _Combined:
    """The matches of several cutouts combined, read as one match by `_plan`."""

    def __init__(self, found: list) -> None:
        w = np.array([1.0 / max(f[1], 1e-12) ** 2 for f in found])
        n = np.array([f[4] for f in found], dtype=float)
        self.flux_ratio = float(np.sum(w * [f[0] for f in found]) / w.sum())
        self.flux_ratio_error = float(1.0 / np.sqrt(w.sum()))
        self.offset = tuple(float(v) for v in np.average([f[2] for f in found], axis=0,
                                                         weights=n))
        self.scatter = tuple(float(v) for v in np.sqrt(np.average(
            np.square([f[3] for f in found]), axis=0, weights=n)))
        self.n_matched = int(n.sum())


def _grid_match(client: Any, central: Any, paths: tuple, hdu: Any, shape: tuple[int, int],
                size: tuple[int, int], samplers: list, units: tuple, gains: tuple,
                sats: tuple, needs: list, grid: int) -> Any:
    """The central cutout's match combined with those of a ``grid`` x ``grid`` of cutouts.

    The cutouts (of the central one's ``size``) are centred on a regular grid over the
    image, no more per side than fit in it side by side (so that they do not overlap);
    each is matched on a worker, the PSFs those of the plan at its
    centre.  The flux ratios are averaged with their inverse variances, the shifts and
    scatters with the numbers of matched stars; cutouts with too few matched stars are
    left out (logged).  The central match alone when the cutout covers the image.
    """
    if size[0] >= shape[0] and size[1] >= shape[1]:
        return central
    futures = []
    # no more cutouts per side than fit side by side: no star is counted twice
    counts = [max(1, min(grid, n // s)) for n, s in zip(shape, size)]
    for gy in range(counts[0]):
        for gx in range(counts[1]):
            cy = shape[0] * (2 * gy + 1) // (2 * counts[0])
            cx = shape[1] * (2 * gx + 1) // (2 * counts[1])
            y0 = min(max(cy - size[0] // 2, 0), shape[0] - size[0])
            x0 = min(max(cx - size[1] // 2, 0), shape[1] - size[1])
            rows, cols = slice(y0, y0 + size[0]), slice(x0, x0 + size[1])
            centre = (x0 + (size[1] - 1) / 2.0, y0 + (size[0] - 1) / 2.0)
            stamps = tuple(s(*centre) for s in samplers)
            futures.append(client.submit(_cutout_match, paths, hdu, rows, cols, units, gains,
                                         sats, stamps, needs, pure=False))
    found = [f for f in client.gather(futures) if f is not None]
    _log.info("plan: stars matched in %d of %d cutouts of %dx%d px", len(found),
              len(futures), size[1], size[0])
    if not found:
        return central
    return _Combined(found)


def _whole_field(client: Any, central: Any, given: Any, path: str, hdu: Any,
                 shape: tuple[int, int], size: tuple[int, int], unit: Any, gain: Any,
                 saturation: Any, name: str) -> Any:
    """A given PSF as is; else one estimated from the stars of the whole field."""
    if given is not None:
        return given
    from .._psf_input import as_psf_sampler
    from ._field_psf import field_psf

    model = field_psf(client, path, hdu, shape, size, unit, gain, saturation, name)
    return central if model is None else as_psf_sampler(model)


def _plan(paths: tuple, hdu: Any, shape: tuple[int, int], psfs: list, units: tuple,
          flux_ratio: Any, fit_shift: bool, astrometric_noise: Any, psf_error: Any,
          background: str, sigmas: Any, gain: Any, saturation: Any, plan_size: int,
          plan_grid: int = 1, client: Any = None, field_psf: bool = False) -> dict:
    """The global quantities, from a central cutout read by sections.

    With ``plan_grid`` > 1 and an image larger than the cutout, the stars matched in
    ``plan_grid**2`` cutouts spread over the image (on the workers of ``client``) give
    the flux ratio, shift and astrometric noise (`_grid_match`), and with ``field_psf``
    the PSFs not given come from the stars of cutouts covering it (`_whole_field`).
    """
    from astropy.nddata import CCDData

    from .._ccd import to_image
    from .._prepare import prepare_image
    from .._stats import MAP_LEVEL_SAMPLES, sampled_median
    from ..subtraction import _check_options, _match, _pixel_fit, _psf_errors

    _check_options(flux_ratio, astrometric_noise, fit_shift, None, np.float32)
    size = (min(plan_size, shape[0]), min(plan_size, shape[1]))
    origin = ((shape[0] - size[0]) // 2, (shape[1] - size[1]) // 2)
    rows, cols = slice(origin[0], origin[0] + size[0]), slice(origin[1], origin[1] + size[1])
    needs = [w for w, n in (("flux ratio", flux_ratio is None), ("shift", fit_shift),
                            ("astrometric noise", astrometric_noise == "auto")) if n]
    gains, sats = _pair(gain), _pair(saturation)
    prepared = []
    for i, (path, name) in enumerate(zip(paths, ("reference image", "science image"))):
        if psfs[i] is not None and not needs and background == "none":
            prepared.append(None)
            continue
        img = to_image(CCDData(_read(path, hdu, rows, cols), unit=units[i]), gain=gains[i],
                       saturation=sats[i], dtype=np.float64)
        prepared.append(prepare_image(img, psfs[i], name=name, option=f"{name} PSF",
                                      need_stars=bool(needs)))
    samplers = [psfs[i] if psfs[i] is not None
                else _ClampedPSF(prepared[i].psf, origin, size) for i in range(2)]
    if field_psf and client is not None and plan_grid > 1 and size != tuple(shape):
        samplers = [_whole_field(client, samplers[i], psfs[i], paths[i], hdu, shape, size,
                                 units[i], gains[i], sats[i], name)
                    for i, name in enumerate(("reference image", "science image"))]
    shift, beta, beta_err, ast = (0.0, 0.0), flux_ratio, 0.0, (0.0, 0.0)
    pref, psci = prepared
    if needs:
        c = ((size[1] - 1) / 2.0, (size[0] - 1) / 2.0)
        p0 = (pref.psf(*c), psci.psf(*c))
        match = _match(pref, psci, p0, needs)
        if match is not None and client is not None and plan_grid > 1:
            match = _grid_match(client, match, paths, hdu, shape, size, samplers, units,
                                gains, sats, needs, plan_grid)
        if match is not None:
            shift = match.offset if fit_shift else shift
            if flux_ratio is None:
                beta, beta_err = match.flux_ratio, match.flux_ratio_error
            if astrometric_noise == "auto":
                ast = tuple(float(v) / np.sqrt(2.0) for v in match.scatter)
        else:
            bad = pref.image.mask | psci.image.mask
            sig = (float(np.median(psci.rms[~bad])), float(np.median(pref.rms[~bad])))
            shift, beta, beta_err = _pixel_fit(psci, pref, (p0[1], p0[0]), sig, bad,
                                               flux_ratio, fit_shift)
    if flux_ratio is not None:
        beta, beta_err = float(flux_ratio), 0.0
    if astrometric_noise not in ("auto", None):
        ast = tuple(float(v) for v in _pair(astrometric_noise))
    if background == "none":
        whole = (float(sigmas[1]), float(sigmas[0]))  # (new, reference)
    else:
        whole = tuple(sampled_median(p.rms, ~p.image.mask, MAP_LEVEL_SAMPLES)
                      for p in (psci, pref))
    eps = _psf_errors(psf_error)
    return {"psfs": samplers, "beta": float(beta), "beta_err": float(beta_err),
            "shift": (float(shift[0]), float(shift[1])), "ast": ast, "eps": (eps[1], eps[0]),
            "whole": whole, "background": background,
            "sigmas": None if sigmas is None else tuple(float(s) for s in sigmas),
            "units": units, "gain": gains, "saturation": sats}
