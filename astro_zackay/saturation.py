"""Saturation found in the pixel values themselves, for images without a SATURATE keyword.

A saturated detector (or its analogue-to-digital converter) clips every pixel at one
level, so a saturated image shows either a pile-up of identical highest values (65535
ADU in many raw frames) or, after bias subtraction and flat fielding, flat-topped cores
of its brightest sources: many adjacent pixels within a few per cent of the highest
value, where an unsaturated PSF has one sharp peak. :func:`detect_saturation` looks
for both (arrays in, a level or None out); :func:`~astro_zackay._ccd.to_image` calls it
when neither ``saturation=`` nor a header keyword gives the level. A lone pixel, or a
clump of up to 4 adjacent pixels, absurdly far above everything around it (a 1e30
written by a broken pipeline or converter) is masked the same way: no detector records
it, and left in it blinds the float32 source detection and the Fourier transforms.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ._stats import median_and_std

__all__ = ["detect_saturation"]

log = logging.getLogger(__name__)

#: The highest value must lie this many (robust) sigma above the median to be a saturation.
_MIN_SIGNIFICANCE = 50.0
#: At least this many pixels at exactly the highest value make a pile-up.
_PILE_MIN = 3
#: Flat top: pixels within this fraction (of the highest value above the median) of it ...
_FLAT_TOLERANCE = 0.02
#: ... in at least two clumps of this many adjacent pixels, or in one clump of _FLAT_ONE.
_FLAT_CLUMP = 3
_FLAT_ONE = 9
#: Pixels sampled for the median and the robust sigma.
_SAMPLE = 65536
#: A spike (one pixel, or a clump of at most `_SPIKE_CLUMP` 8-connected pixels) lies
#: this many robust sigma above the median ...
_SPIKE_SIGMA = 1e7
#: ... and its lowest pixel this many times higher above it than the highest pixel of the
#: ring around it (a star's neighbours reach several per cent of its peak, even for a PSF
#: of 1 px FWHM; a saturated core spreads over many more pixels, with a rim at tens of
#: per cent of its level).
_SPIKE_ISOLATION = 100.0
#: The most pixels a spike's clump may have (a 2x2 block of absurd values, say).
_SPIKE_CLUMP = 4


def _spikes(data: np.ndarray, good: np.ndarray, median: float, sigma: float) -> np.ndarray:
    """Whether each pixel belongs to a spike (`_SPIKE_SIGMA`, `_SPIKE_ISOLATION`, `_SPIKE_CLUMP`).

    Only the few pixels above `_SPIKE_SIGMA` sigma (the candidates) are examined: they
    are grouped into 8-connected clumps (`_clumps`), and a clump of at most
    `_SPIKE_CLUMP` pixels is a spike when its lowest pixel stands `_SPIKE_ISOLATION`
    times higher above the median than the highest pixel of its ring (its 8-connected
    neighbours outside it, none of them a candidate).  Ring pixels off the image,
    masked or not finite do not count.
    """
    spikes = np.zeros(data.shape, dtype=bool)
    candidates = good & (data > median + _SPIKE_SIGMA * sigma)
    rows, cols = np.nonzero(candidates)
    if rows.size == 0:
        return spikes
    ny, nx = data.shape
    labels = _clumps(rows, cols, nx)
    sizes = np.bincount(labels)
    excess = data[rows, cols].astype(np.float64) - median
    lowest = np.full(sizes.size, np.inf)  # each clump's lowest pixel, above the median
    np.minimum.at(lowest, labels, excess)
    ring = np.full(sizes.size, -np.inf)  # each clump's highest ring pixel, above the median
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if (dy, dx) == (0, 0):
                continue
            r, c = rows + dy, cols + dx
            inside = (r >= 0) & (r < ny) & (c >= 0) & (c < nx)
            r, c = np.clip(r, 0, ny - 1), np.clip(c, 0, nx - 1)
            use = inside & good[r, c] & ~candidates[r, c]
            np.maximum.at(ring, labels[use], data[r[use], c[use]] - median)
    isolated = (sizes <= _SPIKE_CLUMP) & (lowest > _SPIKE_ISOLATION * np.maximum(ring, sigma))
    hit = isolated[labels]
    spikes[rows[hit], cols[hit]] = True
    return spikes


def _flat_top_level(
    data: np.ndarray, good: np.ndarray, median: float, top: float
) -> float | None:
    """The lowest value of flat-topped cores within 2 % of ``top``, or None.

    Pixels beside masked ones do not count: they are the rims of cores masked
    already (an image coerced a second time must not find them again).  Only the few
    pixels near the top are examined (`_clumps`), not the whole image.
    """
    near = good & (data >= median + (1.0 - _FLAT_TOLERANCE) * (top - median))
    if np.count_nonzero(near) < 2 * _FLAT_CLUMP:
        return None
    rows, cols = np.nonzero(near)
    keep = ~_beside_bad(good, rows, cols)
    rows, cols = rows[keep], cols[keep]
    labels = _clumps(rows, cols, data.shape[1])
    sizes = np.bincount(labels)
    clumps = np.flatnonzero(sizes >= _FLAT_CLUMP)
    if not (clumps.size >= 2 or (clumps.size == 1 and sizes[clumps[0]] >= _FLAT_ONE)):
        return None
    return float(data[rows, cols][np.isin(labels, clumps)].min())


def _beside_bad(good: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whether a bad pixel (not ``good``) lies in the 3x3 square around each pixel.

    Beyond the image nothing is bad: a neighbour off the edge is clipped onto the
    edge, a pixel of the square anyway.
    """
    ny, nx = good.shape
    beside = np.zeros(rows.size, dtype=bool)
    for dy in (-1, 0, 1):
        r = np.clip(rows + dy, 0, ny - 1)
        for dx in (-1, 0, 1):
            beside |= ~good[r, np.clip(cols + dx, 0, nx - 1)]
    return beside


def _clumps(rows: np.ndarray, cols: np.ndarray, nx: int) -> np.ndarray:
    """Labels 0, 1, ... of the 8-connected clumps of pixels (row-major ``rows``, ``cols``).

    The connected components of the graph that joins each pixel to its right and
    lower neighbours, found among the pixels' sorted flat indices.
    """
    flat = rows.astype(np.int64) * nx + cols
    n = flat.size
    first, second = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        inside = (cols + dx >= 0) & (cols + dx < nx)
        target = flat + dy * nx + dx
        at = np.minimum(np.searchsorted(flat, target), n - 1)
        hit = inside & (flat[at] == target)
        first.append(np.flatnonzero(hit))
        second.append(at[hit])
    edges = np.concatenate(first), np.concatenate(second)
    graph = coo_matrix((np.ones(edges[0].size, dtype=np.int8), edges), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def detect_saturation(data: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Find the saturation level of an image from its pixel values.

    Two signatures are recognised, among the unmasked finite pixels:

    pile-up
        at least 3 pixels, not all in one 2x2 block, share exactly the highest value
        (a clipped detector or converter); the level is that value;
    flat tops
        the pixels within 2 % of the highest value (measured above the median) form
        at least two clumps of 3 adjacent pixels, or one of 9: the flat-topped cores
        of saturated stars, where an unsaturated PSF narrower than about 12 px FWHM
        has at most a few pixels that close to its peak; the level is the lowest
        value of those clumps.

    Neither fires unless the highest value lies 50 robust sigma above the median,
    so noise, cosmic rays and unsaturated stars do not trigger it, nor on noiseless
    images (models, whose robust sigma is 0), nor for equal highest values within
    one 2x2 block (a symmetric peak centred on a pixel corner).

    Spikes are left out of both searches and masked too: single pixels, or clumps of
    at most 4 pixels (8-connected, such as two adjacent pixels or a 2x2 block), whose
    every pixel lies 1e7 robust sigma above the median and whose lowest pixel is 100
    times higher above it than the highest of the neighbours around the clump. No
    star, cosmic ray or saturated core looks like that (their neighbours reach several
    per cent of the peak, and a saturated core spreads over many more pixels): they
    are values such as 1e30 written by a broken pipeline. The level returned is then
    at most the lowest spike pixel's value, so that the spikes are at or above it;
    a clump of 5 or more such pixels is not a spike (it may be a pile-up).

    Parameters
    ----------
    data : ndarray
        The 2-D image, in any unit (the sky included or not).
    mask : ndarray of bool, optional
        True for pixels to ignore; nor do pixels beside them count towards a flat top
        (already masked cores never re-trigger detection).

    Returns
    -------
    float or None
        The saturation level (pixels at or above it are saturated), or None when the
        image shows no sign of saturation.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.saturation import detect_saturation
    >>> rng = np.random.default_rng(1)
    >>> image = rng.normal(100.0, 5.0, (64, 64))
    >>> image[30:33, 30:34] = 65535.0  # a clipped star core
    >>> detect_saturation(image)
    65535.0
    >>> print(detect_saturation(rng.normal(100.0, 5.0, (64, 64))))
    None
    """
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D image, got an array of shape {data.shape}")
    good = np.isfinite(data)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} does not match the image {data.shape}")
        good &= ~mask
    if np.count_nonzero(good) < 16:
        return None
    top = float(np.max(data, where=good, initial=-np.inf))
    median, sigma = median_and_std(data, good, _SAMPLE)
    if not (sigma > 0 and top - median > _MIN_SIGNIFICANCE * sigma):
        return None  # noiseless (a model, not a detector) or nothing bright
    if not top - median > _SPIKE_SIGMA * sigma:  # no spike: no search through the image
        return _level(data, good, median, sigma, top)
    spikes = _spikes(data, good, median, sigma)
    if not spikes.any():
        return _level(data, good, median, sigma, top)
    lowest = float(data[spikes].min())
    log.debug("saturation: %d spike pixels at and above %.6g", np.count_nonzero(spikes), lowest)
    rest = good & ~spikes
    top = float(np.max(data, where=rest, initial=-np.inf))
    level = _level(data, rest, median, sigma, top) if rest.any() else None
    return lowest if level is None else min(level, lowest)


def _level(
    data: np.ndarray, good: np.ndarray, median: float, sigma: float, top: float
) -> float | None:
    """The saturation level of the ``good`` pixels, whose highest is ``top``, or None."""
    if not top - median > _MIN_SIGNIFICANCE * sigma:
        return None
    rows, cols = np.nonzero((data == top) & good)
    # a symmetric peak on a pixel corner repeats its value in a 2x2 block: not a pile-up
    in_one_block = np.ptp(rows) <= 1 and np.ptp(cols) <= 1
    if rows.size >= _PILE_MIN and not in_one_block:
        log.debug("saturation: %d pixels at the highest value %.6g", rows.size, top)
        return top
    level = _flat_top_level(data, good, median, top)
    if level is not None:
        log.debug("saturation: flat-topped cores at and above %.6g", level)
    return level
