"""ZOGY of one image pair larger than a worker's memory, tile by tile on Dask.

The image is cut into the same overlapping tiles as `~astro_zackay.subtract`'s
varying-PSF path (`astro_zackay._zogy_field._Layout`: inner side ``tile``, each padded
to an FFT grid by the PSF stamp's side).  One Dask task per tile reads its padded
window of both files by sections (``hdul[i].section``: an uncompressed image HDU is
never read whole), with the same window of the files' MASK and UNCERT extensions
(those `astropy.nddata.CCDData.write` writes: read as `~astropy.nddata.CCDData.read`
reads them for `subtract`), prepares it, runs the per-tile core
(`astro_zackay._zogy_field.zogy_tiles`, the function `subtract` runs on its stack of
tiles) and writes the tile's inner pixels into the output file, created at full size
first: one write of its bytes per row of the tile (`_write_cell`), so that no process
holds a full-size array and no tile writes a byte of another's.  The file is written
under a temporary name in the output's folder and renamed when every tile is in; a
failed run cancels the tiles not yet run and removes it.  The output's folder must be
one that every worker sees (a local disk for a single-host cluster, a shared
filesystem otherwise).

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
The warnings of the tasks come back with their results and are issued on the client,
each distinct one once (`astro_zackay.parallel._cluster.gather_warned`).
"""

from __future__ import annotations

import logging
import numbers
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ._cluster import captured, cluster_client, gather_warned

__all__ = ["subtract_tiled"]

_log = logging.getLogger(__name__)

#: Output images written by `subtract_tiled`, one image extension each.
OUTPUTS = ("DIFF", "SCORR", "FLUX", "FLUXERR")
#: Background boxes read beyond a tile's padded grid on each side (see `_window`).
BACKGROUND_BOXES = 3
#: Side of the central cutout on which the global plan is estimated.
PLAN_SIZE = 2048
#: The extensions `astropy.nddata.CCDData.write` writes beside the image (its bad-pixel
#: mask, its uncertainty), read by sections as `~astropy.nddata.CCDData.read` reads them.
MASK_HDU, UNCERTAINTY_HDU = "MASK", "UNCERT"
#: The keyword of the uncertainty HDU naming its class, and the classes taken (as
#: `~astro_zackay._ccd.to_image` takes them); without it, a standard deviation (as
#: `~astropy.nddata.CCDData.read` reads it).
UNCERTAINTY_TYPE_KEY = "UTYPE"
UNCERTAINTY_TYPES = ("StdDevUncertainty", "VarianceUncertainty", "InverseVariance")


@dataclass(frozen=True)
class _Source:
    """One input file as the tasks read it: its image HDU and the extensions it has."""

    path: str
    hdu: int | str
    #: whether the file has a `MASK_HDU` (nonzero = bad)
    mask: bool
    #: the class of its `UNCERTAINTY_HDU` (one of `UNCERTAINTY_TYPES`), None without one
    uncertainty: str | None


def _is_2d_image(h: Any) -> bool:
    return isinstance(h, fits.PrimaryHDU | fits.ImageHDU) and h.header.get("NAXIS") == 2


def _source(path: str | os.PathLike, hdu: int | str,
            name: str) -> tuple[_Source, tuple[int, int], fits.Header]:
    """The file's `_Source`, image shape and header, checked; only headers are read."""
    path = os.fspath(path)
    try:
        with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
            h = hdul[hdu]
            if isinstance(h, fits.CompImageHDU):
                raise ValueError(
                    f"{name} ({path}) HDU {hdu!r} is tile-compressed: sections of it cannot "
                    "be read without decompressing whole tiles; write it uncompressed "
                    "(astropy ImageHDU) for subtract_tiled"
                )
            if not _is_2d_image(h):
                raise ValueError(
                    f"{name} ({path}) HDU {hdu!r} is not a 2-D image "
                    f"({type(h).__name__}, NAXIS={h.header.get('NAXIS')}); pass hdu= the image"
                )
            header = h.header.copy()
            shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
            extensions = {}
            for ext in (MASK_HDU, UNCERTAINTY_HDU):
                if ext not in hdul:
                    continue
                e = hdul[ext]
                if not _is_2d_image(e) or (e.header["NAXIS2"], e.header["NAXIS1"]) != shape:
                    raise ValueError(
                        f"{name} ({path}) has a {ext} extension that is not an uncompressed "
                        f"2-D image of the image's shape {shape} ({type(e).__name__}, "
                        f"NAXIS={e.header.get('NAXIS')}): write it as CCDData.write does, or "
                        "remove it"
                    )
                extensions[ext] = e.header.get(UNCERTAINTY_TYPE_KEY, UNCERTAINTY_TYPES[0])
    except (KeyError, IndexError) as exc:
        raise ValueError(f"{name} ({path}) has no HDU {hdu!r}") from exc
    kind = extensions.get(UNCERTAINTY_HDU)
    if kind is not None and kind not in UNCERTAINTY_TYPES:
        raise ValueError(
            f"{name} ({path}): its {UNCERTAINTY_HDU} extension's {UNCERTAINTY_TYPE_KEY} is "
            f"{kind!r}, not one of {', '.join(UNCERTAINTY_TYPES)}: set it to the class of "
            "the uncertainty stored"
        )
    return _Source(path, hdu, MASK_HDU in extensions, kind), shape, header


def _read(source: _Source, rows: slice, cols: slice) -> tuple[np.ndarray, Any, Any,
                                                               fits.Header]:
    """A section of a file: ``(data, mask, uncertainty, header)``, only those pixels read.

    The data as float64; the mask (bool) and uncertainty (of its class) None when the
    file has none; the image HDU's header.
    """
    from astropy import nddata

    with fits.open(source.path, memmap=True, lazy_load_hdus=True) as hdul:
        image = hdul[source.hdu]
        data = np.asarray(image.section[rows, cols], dtype=np.float64)
        mask = (np.asarray(hdul[MASK_HDU].section[rows, cols]) != 0) if source.mask else None
        uncertainty = None
        if source.uncertainty is not None:
            kind = getattr(nddata, source.uncertainty)
            uncertainty = kind(np.asarray(hdul[UNCERTAINTY_HDU].section[rows, cols]))
        return data, mask, uncertainty, image.header.copy()


def _section_image(source: _Source, rows: slice, cols: slice, unit: Any, gain: Any,
                   saturation: Any) -> Any:
    """A section of a file as `~astro_zackay._ccd.ImageData`, as `subtract` reads the file.

    Its mask and uncertainty extensions and its header's keywords (gain, read noise,
    saturation) are those of `~astropy.nddata.CCDData.read`'s image, cut to the section.
    """
    from astropy.nddata import CCDData

    from .._ccd import to_image

    data, mask, uncertainty, header = _read(source, rows, cols)
    ccd = CCDData(data, unit=unit, mask=mask, uncertainty=uncertainty, meta=header)
    return to_image(ccd, gain=gain, saturation=saturation, dtype=np.float64)


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


def _prepared_window(source: _Source, rows: slice, cols: slice, plan: dict,
                     which: int) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
    """One image's window: background-subtracted data (bad 0), rms, variance, bad pixels.

    With ``background='none'`` the rms is the given sigma, the variance that of the
    file's uncertainty (None without one) and the bad pixels those of its mask, its
    non-finite data and its unusable uncertainty.
    """
    if plan["background"] == "none":
        from .._ccd import _variance_from_uncertainty

        raw, mask, uncertainty, _ = _read(source, rows, cols)
        bad = ~np.isfinite(raw)
        if mask is not None:
            bad |= mask
        variance, _ = _variance_from_uncertainty(uncertainty, raw.shape, None)
        if variance is not None:
            bad |= ~(variance > 0)  # NaN, negative or zero: unusable
            variance[bad] = 0.0
        raw[bad] = 0.0
        return raw, np.full(raw.shape, plan["sigmas"][which]), variance, bad
    from .._prepare import prepare_image

    psf = plan["psfs"][which]
    cy, cx = (rows.start + rows.stop - 1) / 2.0, (cols.start + cols.stop - 1) / 2.0
    img = _section_image(source, rows, cols, plan["units"][which], plan["gain"][which],
                         plan["saturation"][which])
    prep = prepare_image(img, psf(cx, cy), name=f"tile of {source.path}", option="psf",
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


def _tile_task(index: int, sources: tuple, shape: tuple[int, int], tile: int, stamp: int,
               plan: dict, output: str, offsets: dict, dtype: Any) -> dict:
    """Subtract one tile from its windows and write its inner pixels (on a worker)."""
    from .._zogy_field import TilePlan, _blanks, _tile_sigma, zogy_tiles
    from ..fourier import get_array_module, unit_sum_psf
    from ..zogy import _moved_mask

    start = time.perf_counter()
    layout = _layout(shape, tile, stamp)
    cell, extent = layout.cells()[index], layout.extents()[index]
    cx, cy = layout.centres()[index]
    ext = _window(extent, shape, max(layout.offset) + stamp)
    new, rms_n, var_n, bad_n = _prepared_window(sources[1], *ext, plan, 1)
    ref, rms_r, var_r, bad_r = _prepared_window(sources[0], *ext, plan, 0)
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
    blocks = {}
    for name, key in zip(OUTPUTS, ("D", "Scorr", "alpha", "alpha_err")):
        blocks[name] = np.asarray(images[key], dtype=np.float32)
        blocks[name][masked] = np.nan
    _write_cell(output, offsets, shape[1], cell, blocks)
    return {"index": index, "x_start": cell[1].start, "x_stop": cell[1].stop,
            "y_start": cell[0].start, "y_stop": cell[0].stop, "x_centre": cx, "y_centre": cy,
            "sigma_ref": float(sigmas[1][0]), "sigma_sci": float(sigmas[0][0]),
            "F_D": float(out["F_D"][0]) / plan["beta"], "F_S": float(out["F_S"][0]) / plan["beta"],
            "background_offset": float(offs[0]), "n_masked": int(masked.sum()),
            "seconds": time.perf_counter() - start}


def _write_cell(output: str, offsets: dict, width: int, cell: tuple[slice, slice],
                blocks: dict) -> None:
    """Write a tile's inner pixels into each output image: its bytes and no others.

    One write per row of the cell per image, at its place in the file (big-endian
    float32, rows of ``width`` pixels from ``offsets[name]``): a tile never rewrites a
    neighbour's bytes, as a memory map's page-sized write-back would on a file shared
    between hosts.
    """
    with open(output, "r+b", buffering=0) as f:  # unbuffered: each write() is the bytes
        for name, block in blocks.items():
            rows = np.ascontiguousarray(block, dtype=">f4")
            for i, row in enumerate(rows):
                f.seek(offsets[name] + ((cell[0].start + i) * width + cell[1].start) * 4)
                f.write(row.data)


def _output_wcs(header: fits.Header, name: str) -> fits.Header:
    """The WCS keywords of the science image's header for the outputs (none if unreadable).

    A WCS that astropy cannot read (an unknown projection, inconsistent axes, partial
    distortion keywords) is left out of the outputs, with a warning.
    """
    import warnings

    from astropy.wcs import WCS

    from .._warnings import AstroZackayWarning, user_stacklevel

    try:
        return WCS(header).to_header()
    except ValueError as exc:  # astropy.wcs.WcsError and its kinds are ValueErrors
        warnings.warn(f"the WCS of the {name} cannot be read ({str(exc).strip()}): the outputs "
                      "are written without one; fix its WCS keywords to keep it",
                      AstroZackayWarning, stacklevel=user_stacklevel())
        return fits.Header()


def _create_output(path: str, shape: tuple[int, int], wcs: fits.Header, meta: dict) -> dict:
    """Write the output file's headers with zero-filled data (sparse); the data offsets."""
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
            h.update(wcs)
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
        Registered FITS images of one shape (uncompressed image HDUs ``hdu``), each
        with the bad-pixel mask and uncertainty `~astropy.nddata.CCDData.write` stores
        beside it if it has them (MASK and UNCERT extensions of the image's shape,
        the uncertainty's class in UTYPE: StdDevUncertainty when absent,
        VarianceUncertainty or InverseVariance), read as `~astro_zackay.subtract` reads
        them.  The image header's GAIN, RDNOISE and SATURATE keywords are used as
        `~astro_zackay.subtract` uses them.
    output_path : str or path-like
        The FITS file written: image extensions DIFF (D), SCORR, FLUX and FLUXERR,
        masked pixels NaN, the plan in the primary header, the science image's WCS in
        each extension.  Its folder must exist and be one every worker sees: each
        tile's task writes its pixels into it (only its own bytes, row by row: a local
        disk for one host, or a shared filesystem that the workers' hosts write to
        consistently, such as NFS, whose clients send written byte ranges).  It is
        written under a temporary name (``.<name>.part-<pid>.fits``) beside it, renamed
        when every tile is in; a failed run leaves neither.
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
        ``'none'``: the files are background-subtracted with noise ``sigmas`` (a
        file's UNCERT extension then gives only the variance map of Scorr's source
        noise; its MASK the bad pixels, with the non-finite ones).
    sigmas : (float, float), optional
        ``(reference, science)`` background noise, required by ``background='none'``
        and refused otherwise.
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
        For images of different shapes, a compressed or non-image HDU, a MASK or
        UNCERT extension not of the image's shape, an unknown UTYPE, an unparsable
        BUNIT, or bad options.
    TypeError
        For options of the wrong kind (``field_psf``, ``hdu``, ``overwrite``).
    OSError
        For an ``output_path`` that exists (without ``overwrite``), is a folder, or
        whose folder does not exist.

    Every option, and the files' headers, are checked before any cluster starts or
    any pixel is read; a task's error is raised as it is, the other tasks cancelled.

    Warns
    -----
    AstropyUserWarning
        The warnings of the tasks (a tile's saturation, uncertainty, PSF...), each
        distinct one once, at the caller's line; a science WCS that astropy cannot
        read (the outputs are then written without one).

    Examples
    --------
    Options are checked before any file is opened or any worker started:

    >>> from astro_zackay.parallel._tiled import subtract_tiled
    >>> subtract_tiled("ref.fits", "sci.fits", "out.fits", background="flat")
    Traceback (most recent call last):
    ...
    ValueError: background must be 'auto' or 'none', got 'flat'
    """
    from .._checks import check_subtract_options
    from .._prepare import check_image_size
    from ._batch import _write_then_rename

    _check_options(tile, field_psf, plan_grid, plan_size, background, sigmas, hdu, overwrite)
    check_subtract_options(flux_ratio=flux_ratio, fit_shift=fit_shift,
                           astrometric_noise=astrometric_noise, psf_error=psf_error,
                           dtype=dtype, reference_psf=reference_psf, science_psf=science_psf,
                           unit=unit, gain=gain, saturation=saturation)
    dtype = np.dtype(dtype).type
    names = ("reference image", "science image")
    ref, shape, ref_header = _source(reference_path, hdu, names[0])
    sci, sci_shape, sci_header = _source(science_path, hdu, names[1])
    if sci_shape != shape:
        raise ValueError(f"the reference {shape} and science {sci_shape} images differ in "
                         "shape: give registered images of one shape")
    units, gains, sats = _image_options(unit, gain, saturation, (ref, sci),
                                        (ref_header, sci_header), names)
    psfs = [None if p is None else check_image_size(shape, p, name, f"{option}=")
            for p, name, option in zip((reference_psf, science_psf), names,
                                       ("reference_psf", "science_psf"))]
    output = _check_output(output_path, overwrite)
    wcs = _output_wcs(sci_header, names[1])
    rows: list[dict] = []
    with cluster_client(client) as used:
        plan = _plan((ref, sci), shape, psfs, units, flux_ratio, fit_shift, astrometric_noise,
                     psf_error, background, sigmas, gains, sats, plan_size, plan_grid, used,
                     field_psf)
        centre = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
        stamp = max(plan["psfs"][1](*centre).shape + plan["psfs"][0](*centre).shape)
        layout = _layout(shape, tile, stamp)
        meta = {"AZBETA": plan["beta"], "AZBETAE": plan["beta_err"], "AZDX": plan["shift"][0],
                "AZDY": plan["shift"][1], "AZASTX": plan["ast"][0], "AZASTY": plan["ast"][1],
                "AZNTILE": layout.n, "AZTILE": int(tile)}
        start = time.perf_counter()

        def run(part: str) -> None:  # into a temporary file, renamed when every tile is in
            offsets = _create_output(part, shape, wcs, meta)
            futures = [used.submit(captured, _tile_task, i, (ref, sci), shape, int(tile), stamp,
                                   plan, part, offsets, dtype, pure=False)
                       for i in range(layout.n)]
            rows.extend(gather_warned(used, futures))

        _write_then_rename(run, output)
    table = Table(rows=[list(r.values()) for r in rows], names=list(rows[0]))
    table.meta.update(meta)
    table.meta["seconds"] = time.perf_counter() - start
    _log.info("subtract_tiled: %d tiles of %d px in %.1f s", layout.n, tile,
              table.meta["seconds"])
    return table


def _check_options(tile: Any, field_psf: Any, plan_grid: Any, plan_size: Any, background: Any,
                   sigmas: Any, hdu: Any, overwrite: Any) -> None:
    """Refuse an option that `subtract_tiled` has and `subtract` has not (no file read)."""
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
    if background == "none" and not _two_noises(sigmas):
        raise ValueError("background='none' needs sigmas=(reference, science): the background "
                         f"noise of each file, positive; got {sigmas!r}")
    if background == "auto" and sigmas is not None:
        raise ValueError(f"sigmas={sigmas!r} is used only with background='none' (the files "
                         "already background-subtracted); 'auto' measures each tile's noise: "
                         "pass sigmas=None")
    if isinstance(hdu, bool) or not isinstance(hdu, int | np.integer | str):
        raise TypeError(f"hdu must be an HDU index or name, got {hdu!r}")
    if not isinstance(overwrite, bool | np.bool_):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")


def _two_noises(sigmas: Any) -> bool:
    """Whether ``sigmas`` is a pair of positive finite numbers."""
    try:
        return len(sigmas) == 2 and all(np.isfinite(float(s)) and float(s) > 0 for s in sigmas)
    except (TypeError, ValueError):
        return False


def _image_options(unit: Any, gain: Any, saturation: Any, sources: tuple, headers: tuple,
                   names: tuple) -> tuple[tuple, tuple, tuple]:
    """``(units, gains, saturations)``, one per image, checked against the images' units.

    A unit not given is the file's BUNIT (``'ADU'`` read as ``'adu'``, as
    `~astropy.nddata.CCDData.read` reads it), else electrons.
    """
    import astropy.units as u

    from .._ccd import _as_float, _data_gain, _parse_unit, _unparsable_bunit
    from .._checks import as_pair

    units = []
    for given, source, header, name in zip(as_pair(unit, "unit"), sources, headers, names):
        if given is not None:
            units.append(_parse_unit(given))
            continue
        bunit = header.get("BUNIT", "electron")
        bunit = "adu" if str(bunit).strip().lower() == "adu" else bunit
        unparsable = _unparsable_bunit([bunit], f"the {name} ({source.path})")
        if unparsable is not None:
            raise unparsable
        units.append(u.Unit(bunit))
    gains, sats = as_pair(gain, "gain"), as_pair(saturation, "saturation")
    for g, s, unit_ in zip(gains, sats, units):
        _data_gain(g, None, unit_)
        level = s.value if isinstance(s, u.Quantity) else s
        if not (isinstance(level, numbers.Real) and np.isposinf(level)):
            _as_float(s, unit_, "saturation")
    return tuple(units), gains, sats


def _check_output(path: str | os.PathLike, overwrite: bool) -> str:
    """``path`` as a string, once checked: its folder exists, it does not (or may go)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder of output_path {path!r} does not exist: create it "
                                "first")
    if os.path.isdir(path):
        raise IsADirectoryError(f"output_path {path!r} is a folder: give a file name")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
    return path


def _cutout_match(sources: tuple, rows: slice, cols: slice, units: tuple, gains: tuple,
                  sats: tuple, stamps: tuple, needs: list) -> tuple | None:
    """The stars of one cutout of both images matched (on a worker): the match's numbers."""
    import warnings

    from .._prepare import prepare_image
    from .._warnings import FewStarsWarning
    from ..subtraction import _match

    prepared = []
    for i, name in enumerate(("reference image", "science image")):
        img = _section_image(sources[i], rows, cols, units[i], gains[i], sats[i])
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


def _grid_match(client: Any, central: Any, sources: tuple, shape: tuple[int, int],
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
            futures.append(client.submit(captured, _cutout_match, sources, rows, cols, units,
                                         gains, sats, stamps, needs, pure=False))
    found = [f for f in gather_warned(client, futures) if f is not None]
    _log.info("plan: stars matched in %d of %d cutouts of %dx%d px", len(found),
              len(futures), size[1], size[0])
    if not found:
        return central
    return _Combined(found)


def _whole_field(client: Any, central: Any, given: Any, source: _Source,
                 shape: tuple[int, int], size: tuple[int, int], unit: Any, gain: Any,
                 saturation: Any, name: str) -> Any:
    """A given PSF as is; else one estimated from the stars of the whole field."""
    if given is not None:
        return given
    from .._psf_input import as_psf_sampler
    from ._field_psf import field_psf

    model = field_psf(client, source, shape, size, unit, gain, saturation, name)
    return central if model is None else as_psf_sampler(model)


def _plan(sources: tuple, shape: tuple[int, int], psfs: list, units: tuple,
          flux_ratio: Any, fit_shift: bool, astrometric_noise: Any, psf_error: Any,
          background: str, sigmas: Any, gains: tuple, sats: tuple, plan_size: int,
          plan_grid: int = 1, client: Any = None, field_psf: bool = False) -> dict:
    """The global quantities, from a central cutout read by sections (options checked).

    With ``plan_grid`` > 1 and an image larger than the cutout, the stars matched in
    ``plan_grid**2`` cutouts spread over the image (on the workers of ``client``) give
    the flux ratio, shift and astrometric noise (`_grid_match`), and with ``field_psf``
    the PSFs not given come from the stars of cutouts covering it (`_whole_field`).
    """
    from .._checks import as_pair
    from .._prepare import prepare_image
    from .._stats import MAP_LEVEL_SAMPLES, sampled_median
    from ..subtraction import _match, _pixel_fit, _psf_errors

    size = (min(plan_size, shape[0]), min(plan_size, shape[1]))
    origin = ((shape[0] - size[0]) // 2, (shape[1] - size[1]) // 2)
    rows, cols = slice(origin[0], origin[0] + size[0]), slice(origin[1], origin[1] + size[1])
    needs = [w for w, n in (("flux ratio", flux_ratio is None), ("shift", fit_shift),
                            ("astrometric noise", astrometric_noise == "auto")) if n]
    prepared = []
    for i, (source, name) in enumerate(zip(sources, ("reference image", "science image"))):
        if psfs[i] is not None and not needs and background == "none":
            prepared.append(None)
            continue
        img = _section_image(source, rows, cols, units[i], gains[i], sats[i])
        prepared.append(prepare_image(img, psfs[i], name=name, option=f"{name} PSF",
                                      need_stars=bool(needs)))
    samplers = [psfs[i] if psfs[i] is not None
                else _ClampedPSF(prepared[i].psf, origin, size) for i in range(2)]
    if field_psf and client is not None and plan_grid > 1 and size != tuple(shape):
        samplers = [_whole_field(client, samplers[i], psfs[i], sources[i], shape, size,
                                 units[i], gains[i], sats[i], name)
                    for i, name in enumerate(("reference image", "science image"))]
    shift, beta, beta_err, ast = (0.0, 0.0), flux_ratio, 0.0, (0.0, 0.0)
    pref, psci = prepared
    if needs:
        c = ((size[1] - 1) / 2.0, (size[0] - 1) / 2.0)
        p0 = (pref.psf(*c), psci.psf(*c))
        match = _match(pref, psci, p0, needs)
        if match is not None and client is not None and plan_grid > 1:
            match = _grid_match(client, match, sources, shape, size, samplers, units,
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
        ast = tuple(float(v) for v in as_pair(astrometric_noise, "astrometric_noise"))
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
