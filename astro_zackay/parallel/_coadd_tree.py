"""Proper coaddition of many frames on Dask: partial accumulators merged as a tree.

Each leaf task reads, prepares and adds one group of frames to its own
`~astro_zackay.coadd_algebra.ProperCoaddAccumulator` on a worker (the frames are
files: a worker reads its own); the partial accumulators are then merged pairwise on
the workers (`~astro_zackay.coadd_algebra.ProperCoaddAccumulator.merge`), level by
level, until one is left, which is finalized.  Every sum of the accumulator is linear
in the frames, so the tree gives the streamed `~astro_zackay.coaddition.coadd` of the
same frames (without outlier rejection) within float rounding.

What does not split.  The flux scale of each frame is measured against the first
frame, so every leaf prepares the first frame too (it adds it only in the first
leaf); the FFT border is the first frame's PSF stamp side, as in ``coadd``.  Outlier
rejection compares each frame with the coadd of all the others: it needs every
frame again after the whole stack is summed and does not merge, so ``reject`` must be
None (the default here) and its tuning options (``reject_grow``,
``reject_model_error``) are refused.  Memory per worker: one accumulator (a few
FFT-grid spectra and two frame-sized maps) plus one frame being prepared; a merge
holds three (its two inputs and their sum, a new accumulator: the inputs are results
Dask may hand to another task or compute again, so they are never changed).

Each task returns its warnings with its result (`~astro_zackay.parallel._cluster.captured`),
and each distinct one is issued once on the client.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from astropy.table import Table, vstack

from ._cluster import Record, captured, cluster_client, reemit

__all__ = ["coadd_tree"]

_log = logging.getLogger(__name__)

#: The options of `~astro_zackay.coaddition.coadd` that give one value per frame.
_PER_FRAME = ("psfs", "flux_scales", "sigmas")
#: The options of `~astro_zackay.coaddition.coadd` that `coadd_tree` passes on.
_OPTIONS = frozenset(("psfs", "flux_scales", "sigmas", "align", "unit", "saturation", "border",
                      "min_depth_fraction", "dtype", "gain", "reject", "backend"))
#: The options of `~astro_zackay.coaddition.coadd` that tune its outlier rejection.
_REJECTION = ("reject_grow", "reject_model_error")


def _groups(paths_or_groups: Any, n_leaves: int) -> list[list[Any]]:
    """The frames cut into groups: the given ones, or ``n_leaves`` runs of a flat list."""
    if isinstance(paths_or_groups, str | os.PathLike) or not isinstance(paths_or_groups,
                                                                         Sequence):
        raise TypeError(
            "paths_or_groups must be a list of FITS paths or a list of lists of them, got "
            f"{type(paths_or_groups).__name__}"
        )
    items = list(paths_or_groups)
    if not items:
        raise ValueError("paths_or_groups is empty: coadd_tree needs at least one frame")
    nested = [isinstance(g, list | tuple) for g in items]
    if all(nested):
        groups = [list(g) for g in items]
        if not all(groups):
            raise ValueError("paths_or_groups has an empty group: give at least one frame each")
        return groups
    if any(nested):
        raise TypeError("paths_or_groups mixes paths and groups: give a flat list of paths or "
                        "a list of lists of paths")
    size = math.ceil(len(items) / max(1, min(n_leaves, len(items))))
    return [items[i:i + size] for i in range(0, len(items), size)]


def _leaf(first: Any, group: list[Any], index: int, options: dict) -> tuple:
    """One group of frames prepared and added to a partial accumulator (on a worker).

    ``options`` are `~astro_zackay.coaddition.coadd`'s, per-frame lists already cut to
    the first frame and this group.  Returns ``(accumulator, rows, template or None)``:
    the frames' table rows and, from the first leaf, the output template.
    """
    from ..coadd_algebra import ProperCoaddAccumulator, working_dtype
    from ..coaddition import _output_template, _per_image, _PerImage, _prepared_frames
    from ..fourier import get_array_module

    dtype = working_dtype(options.get("dtype", np.float32))
    gain = options.get("gain")
    frames = [first, *group] if index > 0 else list(group)
    acc, rows, template = None, [], None
    prepared = _prepared_frames(
        frames, psf_list=_PerImage(options.get("psfs"), "psfs"),
        scale_list=_PerImage(options.get("flux_scales"), "flux_scales"),
        sigma_list=_PerImage(options.get("sigmas"), "sigmas"), gain=gain,
        gain_list=_PerImage(gain, "gain") if _per_image(gain) else None,
        method="stars" if options.get("align") is True else options.get("align", False),
        unit=options.get("unit"), saturation=options.get("saturation"), dtype=dtype,
    )
    for j, (frame, stamp, f, f_err) in enumerate(prepared):
        img = frame.image
        if acc is None:
            border = options.get("border")
            acc = ProperCoaddAccumulator(
                img.shape, border=max(stamp.shape) if border is None else int(border),
                dtype=dtype, backend=get_array_module(options.get("backend", "numpy")))
            if index == 0:
                template = _output_template(img)
        if index > 0 and j == 0:
            continue  # the first frame: prepared here only for the flux scales and border
        acc.add(img.data, stamp, frame.sigma, f, mask=img.mask, variance=img.variance)
        rows.append((frame.name, f, f_err, frame.sigma, f / frame.sigma**2,
                     f**2 / frame.sigma**2 * float((stamp**2).sum()), int(img.mask.sum())))
        del img, frame, stamp
    return acc, rows, template


def _merge(left: tuple[tuple, list[Record]], right: tuple[tuple, list[Record]]
           ) -> tuple[tuple, list[Record]]:
    """Two leaves' (or merges') results merged into a new one: the sums added, rows in order.

    Each is ``((accumulator, rows, template), warnings)`` as `captured` returns a leaf;
    neither is changed (the left accumulator is copied, then the right one added).
    """
    (acc, rows, template), records = captured(_merged, left[0], right[0])
    return (acc, rows, template), list(dict.fromkeys(left[1] + right[1] + records))


def _merged(left: tuple, right: tuple) -> tuple:
    acc = copy.deepcopy(left[0])
    acc.merge(right[0])
    return acc, left[1] + right[1], left[2] if left[2] is not None else right[2]


def _cut(options: dict, groups: list[list[Any]]) -> list[dict]:
    """Per leaf, the options with the per-frame lists cut to the first frame and its group.

    The per-frame lists are ``psfs``, ``flux_scales``, ``sigmas`` and a ``gain`` of one
    value per frame (lists, tuples or arrays).
    """
    from ..coaddition import _per_image

    n = sum(len(g) for g in groups)
    per_frame = _PER_FRAME + (("gain",) if _per_image(options.get("gain")) else ())
    for name in per_frame:
        values = options.get(name)
        if values is not None and (isinstance(values, str) or not hasattr(values, "__len__")
                                   or len(values) != n):
            raise ValueError(f"{name} must give one value per frame ({n} frames), in the order "
                             f"of the frames, got {values!r}")
    out, start = [], 0
    for index, group in enumerate(groups):
        leaf = dict(options)
        for name in per_frame:
            values = options.get(name)
            if values is not None:
                own = list(values[start:start + len(group)])
                leaf[name] = own if index == 0 else [values[0], *own]
        out.append(leaf)
        start += len(group)
    return out


def _check_options(options: dict, frames: list[Any]) -> None:
    """Refuse an option that ``coadd`` does not take, that does not merge, or that is bad.

    As ``coadd`` checks them before reading an image (the frames' shapes from their
    headers, each frame large enough for its PSF), and the per-frame lists' lengths.
    """
    from .._checks import check_coadd_options
    from .._prepare import check_image_size
    from ..coaddition import _check_shapes

    unknown = sorted(set(options) - _OPTIONS - set(_REJECTION))
    if unknown:
        raise TypeError(f"coadd_tree got options that coadd does not take: {', '.join(unknown)}")
    if options.get("reject") not in (None, False):
        raise ValueError(
            f"reject={options['reject']!r}: outlier rejection compares each frame with the "
            "coadd of all the others and cannot be split into partial coadds; pass "
            "reject=None (coadd_tree's default) or use coadd for a stack that needs it"
        )
    tuning = [name for name in _REJECTION if name in options]
    if tuning:
        raise ValueError(
            f"{', '.join(tuning)} tune{'s' if len(tuning) == 1 else ''} the outlier rejection, "
            "which coadd_tree does not do (reject must be None): leave "
            f"{'it' if len(tuning) == 1 else 'them'} out, or use coadd for a stack that "
            "needs rejection"
        )
    names = [os.fspath(f) if isinstance(f, str | os.PathLike) else f"image {j}"
             for j, f in enumerate(frames)]
    check_coadd_options(image_names=names, **options)
    _cut(options, [frames])
    if not options.get("align"):
        psfs = options.get("psfs")
        for j, (name, shape) in enumerate(_check_shapes(frames)):
            if shape is not None and len(shape) == 2:
                check_image_size(shape, None if psfs is None else psfs[j], name, "psfs=")


def _check_frames(frames: list[Any]) -> None:
    """Refuse a frame path that is missing or not a readable FITS file (headers read only).

    The workers would fail on it only after the other leaves had run.
    """
    from .._ccd import _check_fits_file

    for j, frame in enumerate(frames):
        if not isinstance(frame, str | os.PathLike):
            continue
        path = os.fspath(frame)
        if not os.path.exists(path):
            raise FileNotFoundError(f"frame {j} {path!r} does not exist: give the paths of "
                                    "FITS files that every worker can read")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"frame {j} {path!r} cannot be read (permission denied)")
        _check_fits_file(path)


def coadd_tree(
    paths_or_groups: Sequence[Any],
    output_path: str | os.PathLike | None = None,
    *,
    client: Any = None,
    overwrite: bool = False,
    **coadd_options: Any,
) -> Any:
    """Proper coadd of many frames on Dask: partial coadds on workers, merged as a tree.

    Parameters
    ----------
    paths_or_groups : list of path, or list of lists of path
        The registered frames (FITS files the workers read), the first frame being the
        flux reference as in `~astro_zackay.coaddition.coadd`; a flat list is cut into
        as many consecutive groups as the cluster has workers (at least one frame
        each; a ValueError when it has none), a list of lists gives the groups (one
        leaf task each).
    output_path : str or path-like, optional
        Where to write the coadd (`~astro_zackay.coaddition.CoaddResult.write`, on the
        client); its folder must exist.
    client : distributed.Client, optional
        Used as it is; None starts the LocalCluster of `subtract_batch` for the call
        (one single-threaded worker process per core, loopback only, no dashboard,
        without Dask's malloc trim threshold) and closes it.
    overwrite : bool, optional
        Replace an existing ``output_path``.
    **coadd_options
        `~astro_zackay.coaddition.coadd`'s options, checked as ``coadd`` checks them
        before any cluster starts; per-frame lists (``psfs``, ``flux_scales``,
        ``sigmas``) in the order of the frames.  ``reject`` must be None (outlier
        rejection does not split into partial coadds) and ``reject_grow`` and
        ``reject_model_error``, which tune it, are refused.

    Returns
    -------
    `~astro_zackay.coaddition.CoaddResult`
        As ``coadd(frames, reject=None, ...)`` gives it (its ``frames`` table in the
        order of the frames).

    Raises
    ------
    ValueError
        For an empty input or group, per-frame lists of the wrong length, an option
        ``coadd`` refuses, ``reject``, ``reject_grow`` or ``reject_model_error`` set, or
        a flat list of frames and a ``client`` whose cluster has no workers.
    TypeError
        For an input that is not a list, or options ``coadd`` does not take.
    OSError
        For a frame path that does not exist or is not a readable FITS file, or an
        ``output_path`` that exists (without ``overwrite``) or whose folder does not
        (checked before any cluster starts).

    Warns
    -----
    AstropyUserWarning
        The warnings of the tasks (a frame's saturation, uncertainty...), each distinct
        one once, at the caller's line, as ``coadd`` issues them.
    ImportError
        Without ``dask.distributed`` (``pip install "dask[distributed]"``).

    Examples
    --------
    >>> from astro_zackay.parallel._coadd_tree import coadd_tree
    >>> coadd_tree([], reject=None)
    Traceback (most recent call last):
    ...
    ValueError: paths_or_groups is empty: coadd_tree needs at least one frame
    """
    from ._tiled import _check_output

    given = _groups(paths_or_groups, 1)  # a bad input refused; the given groups
    frames = [frame for group in given for frame in group]
    _check_options(coadd_options, frames)
    _check_frames(frames)
    if output_path is not None:
        _check_output(output_path, overwrite)
    nested = all(isinstance(g, list | tuple) for g in paths_or_groups)
    with cluster_client(client, len(frames)) as used:  # no more local workers than frames
        groups = given if nested else _groups(frames, _worker_count(used))
        leaf_options = _cut(coadd_options, groups)
        level = [used.submit(captured, _leaf, frames[0], group, i, leaf_options[i], pure=False)
                 for i, group in enumerate(groups)]
        submitted = list(level)
        _log.info("coadd_tree: %d frames in %d leaves", len(frames), len(groups))
        while len(level) > 1:  # pairwise, on the workers
            nxt = [used.submit(_merge, level[i], level[i + 1], pure=False)
                   for i in range(0, len(level) - 1, 2)]
            submitted += nxt
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        try:
            (acc, rows, template), records = level[0].result()
        except BaseException:
            used.cancel(submitted)  # the tasks not started never run
            raise
    reemit(records)
    return _finish(acc, rows, template, coadd_options, output_path, overwrite)


def _worker_count(client: Any) -> int:
    """The workers of the client's cluster, among which a flat list of frames is cut."""
    n = len(client.nthreads())
    if n == 0:
        raise ValueError(
            "the cluster of client= has no workers, and a flat list of frames is cut into "
            "one group per worker: start workers first (cluster.scale(n), then "
            "client.wait_for_workers(n)), or give the groups as a list of lists (one leaf "
            "task each, run when workers come)"
        )
    return n


def _finish(acc: Any, rows: list, template: Any, options: dict,
            output_path: str | os.PathLike | None, overwrite: bool) -> Any:
    """Finalize the merged accumulator and wrap it as ``coadd`` does; written if asked."""
    from ..coaddition import _reject_outliers, _warn_if_all_masked, _wrap

    frames = Table(rows=rows, names=("name", "flux_scale", "flux_scale_err", "sigma", "weight",
                                     "depth_share", "n_masked"))
    frames = vstack([frames])  # a fresh table whose columns may be set
    frames["depth_share"] /= frames["depth_share"].sum()
    rejected = _reject_outliers(acc, None, None, frames)
    res = acc.finalize(min_depth_fraction=options.get("min_depth_fraction", 1e-3))
    del acc
    _warn_if_all_masked(res.mask | (res.n_used == 0), options.get("min_depth_fraction", 1e-3))
    result = _wrap(res, template, frames, rejected)
    if output_path is not None:
        result.write(output_path, overwrite=overwrite)
    return result
