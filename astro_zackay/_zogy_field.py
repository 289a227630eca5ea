"""ZOGY over a whole image with spatially varying PSFs: a batched stack of tiles.

Arrays in, arrays out.  The image is cut into equal tiles of constant PSF (the PSFs
at each tile's centre); each tile is padded by the pixels around it (at least the
kernels' reach: the wrap-around of a periodic transform lands within that reach of
the opposite edge, in the border that is cropped away) and all the tiles are stacked
into one ``(n_tiles, ny, nx)`` array.  The ZOGY algebra runs once on the stack: every
transform takes all the tiles in one call and the filters are ``(n_tiles, ny, nx//2+1)``
arrays built from the stack of PSF stamps, so the cost is that of a few transforms of
the image (times the padding's area factor) whatever the number of tiles.  Each
tile's inner pixels are written back by a reshape.  The tile side is the largest
over which neither PSF changes by more than `MAX_PSF_CHANGE` (`choose_tile_side`);
one tile, the whole image, when neither PSF varies.  Everything that depends on a
pixel's neighbourhood and not on the PSF (mask growth, edge flags) is done once for
the image, each masked region grown by its own tile's kernels; Scorr, the flux and
its error and the background offset are formed once, from the tiles' parts.

The per-tile algebra, from the tiles' padded windows to their outputs, is one function,
`zogy_tiles`, with what the tiles share (flux ratio, shift, astrometric noise, PSF
errors, noise spectra) in a `TilePlan`: `zogy_field` runs it on the whole stack, the
out-of-core path of `astro_zackay.parallel` on one tile at a time, read from files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ._stats import MAP_LEVEL_SAMPLES, sampled_median
from .fourier import (
    ArrayBackend,
    abs2,
    fast_shape,
    floored_inv_sqrt,
    get_array_module,
    half_spectrum_sum,
    psf_rfft_blocks,
    unit_sum_psf,
)
from .noise import NoiseSpectrum
from .zogy import (
    _astrometric_variance,
    _clipped,
    _difference_and_score,
    _edge_mask,
    _edge_sources,
    _grow_mask,
    _grow_regions,
    _KernelReach,
    _masked_regions,
    _moved_mask,
    _psf_variance,
    _scorr,
    _spectra,
    _tile_medians,
    _total_variance,
    _unit_scale,
    _variance_spectra,
    _warn_if_large,
)

__all__ = [
    "MAX_PSF_CHANGE",
    "MIN_TILE_SIDE",
    "TILE_SIDES",
    "FieldResult",
    "TilePlan",
    "check_tiles",
    "choose_tile_side",
    "zogy_field",
    "zogy_tiles",
]

_log = logging.getLogger(__name__)

#: Inner tile sides that ``tiles='auto'`` tries, largest first, when a PSF varies.
TILE_SIDES = (1024, 768, 512, 384, 256, 192, 128)
#: Largest L1 difference between a PSF at a tile's centre and at its inner corners.
#: Measured on a simulated 1536^2 pair whose FWHMs vary by +-15 % (201 stars of
#: S/N > 50): tiles of 512, 256, 192 and 128 px left 5, 1, 3 and 0 of them above
#: 5 sigma; the PSFs change by 0.06 (L1) over 192 px tiles and 0.04 over 128 px ones.
MAX_PSF_CHANGE = 0.04
#: Smallest tile side accepted (the padding would dominate below it).
MIN_TILE_SIDE = 32
#: Complex values per block of the float64 filter algebra (1 MiB a plane: in the cache).
_BLOCK = 2**16

PSF = Callable[[float, float], np.ndarray]


@dataclass(frozen=True)
class FieldResult:
    """Outputs of `zogy_field` (numpy arrays on the input grid).

    Attributes
    ----------
    D, S, Scorr : ndarray
        Proper difference (white, unit variance), score and corrected score, each
        tile's own in its inner pixels; the background offset is removed from D and S.
    alpha, alpha_err : ndarray
        Point-source flux (in the new image's units, ``S / F_S`` times ``flux_new``)
        and its 1-sigma error from source and background noise.
    mask : ndarray of bool
        The input bad pixels (the reference's moved by the rounded shift) grown as
        in `astro_zackay.zogy.zogy`, and the edge.
    input_mask : ndarray of bool
        The input bad pixels before the growth.
    psf_d : ndarray
        Unit-sum P_D stamp of the tile holding the image centre.
    F_D, F_S : float
        Flux zero point of D and normalisation of S of that tile.
    tiles : list of tuple
        Per tile: ``(x_start, x_stop, y_start, y_stop, x_centre, y_centre, sigma_ref,
        sigma_new, F_D, F_S, background_offset)``, start/stop bounding its inner pixels.
    tile_psfs : ndarray
        The unit-sum P_D stamp of each tile, one per row of ``tiles``.
    background_offset : float
        Median over the tiles of the constant removed, in the new image's units.
    """

    D: np.ndarray
    S: np.ndarray
    Scorr: np.ndarray
    alpha: np.ndarray
    alpha_err: np.ndarray
    mask: np.ndarray
    input_mask: np.ndarray
    psf_d: np.ndarray
    F_D: float
    F_S: float
    tiles: list
    tile_psfs: np.ndarray
    background_offset: float


def _stamps_at(psf: PSF, positions: list[tuple[float, float]]) -> np.ndarray:
    """The PSF's stamps at ``(x, y)`` positions, ``(N, ny, nx)``.

    One batched evaluation when ``psf`` offers one (an ``at_positions(x, y)`` method,
    as `~astro_zackay._psf_input.PSFSampler` has), else one call per position.
    """
    at_positions = getattr(psf, "at_positions", None)
    if at_positions is not None and positions:
        x, y = np.array(positions, dtype=float).T
        return np.asarray(at_positions(x, y))
    return np.array([psf(x, y) for x, y in positions])


def _psf_change(psf: PSF, layout: _Layout, seen: dict) -> float:
    """Largest L1 difference between each tile's central PSF and the PSF at its corners.

    The corners are the boundaries between pixels (shared by the tiles that meet there,
    each evaluated once; ``seen`` keeps the PSF at every position evaluated, and the
    positions not yet seen are evaluated together, `_stamps_at`).
    """

    def edge(i, n):  # the boundary between two pixels, a corner shared by up to 4 tiles
        return float(min(max(i - 0.5, 0.0), n - 1.0))

    tiles = []
    for (ys, xs), centre in zip(layout.cells(), layout.centres()):
        corners = [(x, y) for x in (edge(xs.start, layout.shape[1]), edge(xs.stop, layout.shape[1]))
                   for y in (edge(ys.start, layout.shape[0]), edge(ys.stop, layout.shape[0]))]
        tiles.append((tuple(centre), corners))
    new = list(dict.fromkeys(p for centre, corners in tiles for p in (centre, *corners)
                             if p not in seen))
    seen.update(zip(new, _stamps_at(psf, new)))
    worst = 0.0
    for centre, corners in tiles:
        for corner in corners:
            worst = max(worst, float(np.abs(seen[corner] - seen[centre]).sum()))
    return worst


def choose_tile_side(
    psfs: tuple[PSF, PSF], varying: tuple[bool, bool], shape: tuple[int, int]
) -> int | None:
    """The largest of `TILE_SIDES` over which neither PSF changes by more than `MAX_PSF_CHANGE`.

    None (one tile, the whole image) when neither PSF varies or when the image is no
    larger than the largest side that passes; the smallest side when none passes.
    The change is the largest L1 difference between a tile's central PSF and the PSF
    at its inner corners; the choice is logged.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._zogy_field import choose_tile_side
    >>> a, b = np.zeros((3, 3)), np.zeros((3, 3))
    >>> a[1, 1], b[1, :] = 1.0, 1 / 3
    >>> def psf(x, y):
    ...     f = x / 2000
    ...     return (1 - f) * a + f * b
    >>> choose_tile_side((psf, psf), (True, True), (1000, 2000))
    128
    >>> choose_tile_side((psf, psf), (False, False), (1000, 2000)) is None
    True
    """
    moving = [psf for psf, v in zip(psfs, varying) if v]
    if not moving:
        return None
    seen = [{} for _ in moving]
    change = 0.0
    for side in TILE_SIDES:
        if side >= max(shape):
            continue
        layout = _Layout(shape, (side, side), 0)
        change = max(_psf_change(psf, layout, s) for psf, s in zip(moving, seen))
        if change <= MAX_PSF_CHANGE:
            _log.info("tiles of %d px: the PSFs change by at most %.3f (L1) within one",
                      side, change)
            return side
    if change == 0.0:
        return None
    _log.info("tiles of %d px: the PSFs change by %.3f (L1) even within one", TILE_SIDES[-1],
              change)
    return TILE_SIDES[-1]


class _Layout:
    """Equal tiles of inner ``side`` covering the image, each padded to an FFT grid.

    Tile ``(i, j)`` holds image rows from ``i * side[0] - offset[0]`` on (``grid[0]``
    of them; zero beyond the image), and its inner pixels sit at ``offset`` in it.
    The grid is `fast_shape` of the side with ``border`` on each side.
    """

    def __init__(self, shape: tuple[int, int], side: tuple[int, int], border: int):
        self.shape, self.side = shape, side
        self.counts = tuple(-(-n // t) for n, t in zip(shape, side))
        self.n = self.counts[0] * self.counts[1]
        self.grid = fast_shape(side, border)
        self.offset = tuple((g - t) // 2 for g, t in zip(self.grid, side))

    def cells(self) -> list[tuple[slice, slice]]:
        """Each tile's inner pixels in the image (row by row)."""
        ys = [slice(i * self.side[0], min((i + 1) * self.side[0], self.shape[0]))
              for i in range(self.counts[0])]
        xs = [slice(j * self.side[1], min((j + 1) * self.side[1], self.shape[1]))
              for j in range(self.counts[1])]
        return [(y, x) for y in ys for x in xs]

    def extents(self) -> list[tuple[slice, slice]]:
        """The image pixels of each tile's whole grid (its inner pixels and those around)."""
        return [tuple(slice(max(c.start - o, 0), min(c.start - o + g, n))
                      for c, o, g, n in zip(cell, self.offset, self.grid, self.shape))
                for cell in self.cells()]

    def centres(self) -> list[tuple[float, float]]:
        """``(x, y)`` of each tile's inner pixels' centre (row by row)."""
        return [((x.start + x.stop - 1) / 2.0, (y.start + y.stop - 1) / 2.0)
                for y, x in self.cells()]

    def upload(self, be: ArrayBackend, arr: np.ndarray, bad: Any, dtype: Any) -> Any:
        """The stack of tiles of ``arr`` on ``be`` in ``dtype``, 0 where ``bad`` (on ``be``)."""
        xp = be.xp
        padded = xp.zeros(tuple((c - 1) * t + g for c, t, g in
                                zip(self.counts, self.side, self.grid)), dtype=dtype)
        inner = tuple(slice(o, o + n) for o, n in zip(self.offset, self.shape))
        padded[inner] = be.asarray(arr, dtype=dtype)
        if bad is not None:
            padded[inner][bad] = 0.0
        if self.n == 1:
            return padded[None]
        windows = xp.lib.stride_tricks.sliding_window_view(padded, self.grid)
        return windows[:: self.side[0], :: self.side[1]].reshape((self.n, *self.grid))

    def image(self, xp: Any, stack: Any) -> Any:
        """The image made of each tile's inner pixels of a ``(n, *grid)`` stack."""
        (my, mx), (ty, tx), (oy, ox) = self.counts, self.side, self.offset
        inner = stack.reshape(my, mx, *self.grid)[:, :, oy : oy + ty, ox : ox + tx]
        whole = inner.transpose(0, 2, 1, 3).reshape(my * ty, mx * tx)
        return xp.ascontiguousarray(whole[: self.shape[0], : self.shape[1]])

    def field(self, xp: Any, values: Any, dtype: Any) -> Any:
        """An image holding each tile's value (``values``, one per tile) in its pixels.

        For one tile, a ``(1, 1)`` array that broadcasts over the image.
        """
        v = xp.asarray(np.asarray(values, dtype=dtype).reshape(self.counts))
        if self.n == 1:
            return v
        whole = xp.repeat(xp.repeat(v, self.side[0], axis=0), self.side[1], axis=1)
        return xp.ascontiguousarray(whole[: self.shape[0], : self.shape[1]])

    def owners(self, labels: np.ndarray) -> np.ndarray:
        """The tile (row by row) holding the centre of each labelled region's box."""
        owner = [((b[0].start + b[0].stop) // 2 // self.side[0]) * self.counts[1]
                 + (b[1].start + b[1].stop) // 2 // self.side[1]
                 for b in ndimage.find_objects(labels)]
        return np.array(owner, dtype=int)


class _TileNoise:
    """The tiles' noise powers on a grid: ``sigma**2`` (white) or a spectrum times it.

    A noise spectrum is computed once per grid at unit rms and scaled to each tile's
    sigma (on the backend).
    """

    def __init__(self, be: ArrayBackend, spectra: tuple, sigmas: np.ndarray):
        self.be, self.spectra, self.sigmas = be, spectra, sigmas
        self._units: dict = {}

    def _unit(self, grid: tuple[int, int]) -> list:
        if grid not in self._units:
            self._units[grid] = [None if s is None else s.spectrum(grid, sigma=1.0)
                                 for s in self.spectra]
        return self._units[grid]

    def powers(self, grid: tuple[int, int]) -> tuple:
        """The (new, reference) powers: ``(n, 1, 1)`` or ``(n, ny, nx//2+1)`` on the backend."""
        out = []
        for unit, sigma in zip(self._unit(grid), self.sigmas):
            var = self.be.asarray((sigma * sigma)[:, None, None])
            if unit is not None:
                var = var * self.be.asarray(unit)[None]
            out.append(var)
        return tuple(out)

    def top(self, grid: tuple[int, int], pn: np.ndarray, pr: np.ndarray,
            beta: float) -> np.ndarray:
        """Per tile, the largest value ZOGY's denominator ``|A|**2 P_n + |B|**2 P_r`` can take.

        A PSF's transform is at most the sum of its stamp's absolute values (1 at zero
        frequency for a non-negative unit-sum PSF, where the largest value is then
        taken with white noise).
        """
        largest = [1.0 if u is None else float(u.max()) for u in self._unit(grid)]
        reach = [np.abs(p).sum(axis=(1, 2)) ** 2 for p in (pr, pn)]
        return (self.sigmas[0] ** 2 * largest[0] * reach[0]
                + self.sigmas[1] ** 2 * largest[1] * beta**2 * reach[1])

    def at_zero(self, grid: tuple[int, int]) -> np.ndarray:
        """``(2, n)``: each image's power at zero frequency per tile."""
        zero = [1.0 if u is None else float(u[0, 0]) for u in self._unit(grid)]
        return self.sigmas**2 * np.array(zero)[:, None]

    def at_mean(self, grid: tuple[int, int]) -> np.ndarray:
        """``(2, n)``: each image's per-pixel variance (mean power over the plane) per tile."""
        means = [1.0 if u is None else float(half_spectrum_sum(u, grid[1])) / (grid[0] * grid[1])
                 for u in self._unit(grid)]
        return self.sigmas**2 * np.array(means)[:, None]


def _filters(be: ArrayBackend, pn: np.ndarray, pr: np.ndarray, noise: _TileNoise, powers: tuple,
             beta: float, grid: tuple[int, int], ctype: Any) -> tuple[Any, Any, Any, np.ndarray]:
    """Per tile: ``wa = A/sqrt(den)``, ``wb = B/sqrt(den)``, ``Q = wa B`` in ``ctype`` and ``F_S``.

    ``A`` is the reference's PSF transform (``F_r = 1``), ``B = beta`` times the new
    one's, both float64 (their tiny high-frequency values need it); the filters are
    formed from them in blocks of tiles and rows (`_blocks`: on numpy the float64 planes
    exist only a block at a time, in the cache) and written in ``ctype`` (bounded by
    ``1/sigma``, complex64 holds them even where ``|A|**2`` would underflow).  ``powers``
    are ``noise``'s on ``grid``.  The denominator is floored per tile at the largest
    value it can take (`_TileNoise.top`) times ``sqrt(tiny)`` (where it has nearly
    underflowed; ``Q`` is zeroed there).
    """
    xp = be.xp
    n, half = len(pn), (grid[0], grid[1] // 2 + 1)
    wa, wb, q_h = (xp.empty((n, *half), dtype=ctype) for _ in range(3))
    top = be.asarray(noise.top(grid, pn, pr, beta), dtype=np.float64)  # uploaded once
    f_s = xp.zeros(n)
    tiles, rows = _blocks(n, half, be)
    a_parts = psf_rfft_blocks(pr, grid, rows, backend=be)
    for (block, a_h), (_, b_h) in zip(a_parts, psf_rfft_blocks(pn, grid, rows, backend=be)):
        for t in range(0, n, tiles):
            ts = slice(t, min(t + tiles, n))
            part = (ts, block)
            f_s[ts] += _filter_block(xp, a_h[ts], b_h[ts] * beta,
                                     [p[ts] if p.shape[1] == 1 else p[part] for p in powers],
                                     top[ts], (wa[part], wb[part], q_h[part]), grid[1])
    f_s = np.asarray(be.to_numpy(f_s), dtype=np.float64)
    return wa, wb, q_h, f_s / (grid[0] * grid[1])


def _blocks(n: int, half: tuple[int, int], be: ArrayBackend) -> tuple[int, int]:
    """Tiles and rows per block of `_filters`: about `_BLOCK` complex values each on numpy.

    On any other backend (a GPU) one block: every block costs a dozen kernel launches,
    and the device has no CPU cache to keep the float64 planes in.
    """
    if be.name != "numpy":
        return n, half[0]
    plane = half[0] * half[1]
    if plane >= _BLOCK:
        return 1, max(1, _BLOCK // half[1])
    return max(1, _BLOCK // plane), half[0]


def _filter_block(xp: Any, a_h: Any, b_h: Any, powers: list, top: Any, out: tuple,
                  nx: int) -> Any:
    """`_filters` of one block: ``out = (wa, wb, Q)`` written, ``Npix F_S``'s part returned."""
    wa, wb, q_h = out
    den = abs2(a_h)
    den *= powers[0]
    tmp = abs2(b_h)
    tmp *= powers[1]
    den += tmp
    del tmp
    den, good = floored_inv_sqrt(den, per_tile=True, top=top)
    xp.multiply(a_h, den, out=wa)  # float64 products, cast on output
    xp.multiply(b_h, wa, out=q_h)
    q_h *= good
    xp.multiply(b_h, den, out=wb)
    return half_spectrum_sum(abs2(q_h), nx)


def _kernels(be: ArrayBackend, filters: tuple, grid: tuple[int, int]) -> tuple[Any, Any, Any]:
    """Per tile, ``F_D P_D`` and the real-space kernels of S_N and S_R (``filters`` overwritten).

    ``filters`` are `_filters`' ``wa``, ``wb`` and ``Q`` on ``grid`` (float64).
    """
    wa, wb, q_h = filters[:3]
    p_d = be.irfft2(q_h, s=grid)
    be.xp.conjugate(q_h, out=q_h)
    wa *= q_h
    wb *= q_h
    return p_d, be.irfft2(wa, s=grid), be.irfft2(wb, s=grid)


def _at_origin(be: ArrayBackend, k: Any, grid: tuple[int, int], dtype: Any) -> Any:
    """A stack of origin-centred arrays of a smaller grid put at the origin of ``grid``."""
    rows, cols = (np.where(np.arange(n) <= n // 2, np.arange(n), np.arange(n) - n) % size
                  for n, size in zip(k.shape[-2:], grid))
    out = be.xp.zeros((k.shape[0], *grid), dtype=dtype)
    out[:, be.asarray(rows)[:, None], be.asarray(cols)[None, :]] = k
    return out


def _stamps(be: ArrayBackend, at_origin: Any, size: int) -> np.ndarray:
    """The unit-sum centred ``size`` stamps of a stack of origin-centred arrays."""
    ny, nx = at_origin.shape[-2:]
    rows = be.asarray((np.arange(size) - size // 2) % ny)
    cols = be.asarray((np.arange(size) - size // 2) % nx)
    stamps = np.asarray(be.to_numpy(at_origin[:, rows[:, None], cols[None, :]]),
                        dtype=np.float64)
    return stamps / stamps.sum(axis=(1, 2), keepdims=True)


def _stack_zogy(be: ArrayBackend, spec: Any, variances: Callable, layout: _Layout,
                pn: np.ndarray, pr: np.ndarray, noise: _TileNoise, beta: float, split: bool,
                dtype: Any, workers: int | None) -> dict:
    """ZOGY of every tile at once: D, S (or S_N, S_R), the variances, reaches and P_D.

    ``spec`` holds the images' transforms; ``variances()`` gives those of the variance
    maps, asked for once D and S are formed (the images' transforms are then gone).

    Image-sized outputs are ``(n, *grid)`` stacks on ``be``; per-tile numbers are numpy
    vectors.  P_D and the real-space kernels of S (their reach for the mask growth,
    their squares for the source-noise variance) come from a grid of 4 stamps in
    float64, or, when the tiles' grid is less than twice that grid's area (small
    tiles), from the tiles' own filters in the working precision: the transforms of
    S's kernels are those that form S, and no second set of filters is built.
    """
    xp = be.xp
    grid = layout.grid
    npix = grid[0] * grid[1]
    ctype = np.result_type(dtype, np.complex64)
    powers = noise.powers(grid)

    def inv(a_h):
        return be.irfft2(a_h, s=grid, workers=workers)

    wa, wb, q_h, f_s = _filters(be, pn, pr, noise, powers, beta, grid, ctype)
    stamp = max(pn.shape[1:] + pr.shape[1:])
    small = fast_shape((4 * stamp + 1, 4 * stamp + 1))
    own = 2 * small[0] * small[1] > npix  # not much smaller: the tiles' own filters
    if own:
        p_d = inv(q_h)  # before q_h is conjugated
    else:
        p_d, *kernels = _kernels(be, _filters(be, pn, pr, noise, noise.powers(small), beta,
                                              small, np.complex128), small)
    out_pd = _stamps(be, p_d, stamp)
    del p_d
    at0 = noise.at_zero(grid)
    f_d = beta / np.sqrt(at0[0] + at0[1] * beta**2)
    out, (kn_h, kr_h) = _difference_and_score(xp, spec, wa, wb, q_h, split, inv)
    del wa, wb, q_h
    if own:
        kernels = [inv(kn_h), inv(kr_h)]
    for k in kernels:
        k *= k  # the squares give each kernel's reach and its source-noise variance
    out.update(F_S=f_s, F_D=f_d, den0=at0[0] + beta**2 * at0[1], P_D=out_pd)
    sums = _power_sums(be, (kn_h, kr_h), noise, powers, grid[1])
    del kn_h, kr_h
    spec.vn_h, spec.vr_h = variances()
    bkg = [weighted / npix for _, weighted in sums]
    out["reach"] = list(zip(*(_KernelReach.of_stack(be, k2, stamp) for k2 in kernels)))
    out["s_sigma"] = np.sqrt(bkg[0] + bkg[1])
    out["V_S"], out["V_beta"] = _source_variances(be, spec, [full for full, _ in sums], kernels,
                                                  bkg, noise, dtype, workers)
    return out


def _power_sums(be: ArrayBackend, k_hs: tuple, noise: _TileNoise, powers: tuple,
                nx: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per kernel of S and tile: ``sum |k_h|**2`` over the plane, and weighted by the noise.

    ``powers`` are `_TileNoise.powers` on the grid; white noise weighs each tile's sum
    by its ``sigma**2`` (a number), a noise spectrum frequency by frequency.
    """
    out = []
    for k_h, power, spectrum, sigma in zip(k_hs, powers, noise.spectra, noise.sigmas):
        a2 = abs2(k_h)
        full = np.asarray(be.to_numpy(half_spectrum_sum(a2, nx)), dtype=np.float64)
        if spectrum is None:
            weighted = full * sigma**2
        else:
            weighted = np.asarray(be.to_numpy(half_spectrum_sum(a2 * power, nx)),
                                  dtype=np.float64)
        out.append((full, weighted))
    return out


def _source_variances(be: ArrayBackend, spec: Any, fulls: list, squares: list, bkg: list,
                      noise: _TileNoise, dtype: Any, workers: int | None) -> tuple[Any, Any]:
    """``V_SN + V_SR`` (one inverse transform for both) and ``V_beta`` (or None) per tile.

    Each image's term is its kernel's square (``squares``) convolved with its variance
    map (for a correlated noise, with the sources' excess over the sky, scaled as the
    sky's noise is, by ``bkg`` over the white noise's ``fulls`` of `_power_sums`, and
    with the sky's part, a number per tile, added); an image without a variance map
    adds its background term, a number per tile.  A stack, or a vector when neither
    image has a variance map.  The variance spectra of ``spec`` and the ``squares`` are
    used up (overwritten and dropped), so that only one squared kernel's transform is new
    at a time.
    """
    grid = spec.shape
    npix = grid[0] * grid[1]
    white = noise.at_mean(grid)
    total_h, v_beta, level = None, None, np.zeros(len(bkg[0]))
    for i, (full, name) in enumerate(zip(fulls, ("vn_h", "vr_h"))):
        v_h, k2 = getattr(spec, name), squares[i]
        setattr(spec, name, None)
        squares[i] = None
        beta_term = i == 1 and spec.vb_h is not None
        if v_h is None or noise.spectra[i] is not None:
            level += bkg[i]
        if v_h is None and not beta_term:
            continue
        if k2.shape[-2:] != grid:
            k2 = _at_origin(be, k2, grid, dtype)
        k2_h = be.rfft2(k2, s=grid, workers=workers)
        del k2
        if v_h is not None:
            v_h *= k2_h
            if noise.spectra[i] is not None:  # the sources' excess, correlated like the sky
                v_h *= be.asarray((bkg[i] * npix / (white[i] * full))[:, None, None], dtype=dtype)
            if total_h is None:
                total_h = v_h
            else:
                total_h += v_h
            del v_h
        if beta_term:
            vb_h, spec.vb_h = spec.vb_h, None
            vb_h *= k2_h
            del k2_h
            v_beta = _clipped(be.xp, be.irfft2(vb_h, s=grid, workers=workers))
            del vb_h
    if total_h is None:
        return level, v_beta
    total = _clipped(be.xp, be.irfft2(total_h, s=grid, workers=workers))
    del total_h
    total += be.asarray(level[:, None, None], dtype=dtype)
    return total, v_beta


def _tile_sigma(
    rms: np.ndarray, good: np.ndarray, cell: tuple[slice, slice], whole: float,
    spectrum: NoiseSpectrum | None,
) -> float:
    """A tile's background rms for ZOGY: the median rms of the good pixels of its grid.

    ``whole`` is that median over the whole image (a tile's own when it covers the image).

    With a noise spectrum, its pixel-noise share: the rms map holds the faint static
    sky too, which cancels in the difference, and ``spectrum.sigma / whole`` is the
    pixel noise's share of it over the image.
    """
    in_cell = good[cell]
    if in_cell.size == good.size or not in_cell.any():  # the whole image (one tile), or no pixel
        sigma = whole
    else:
        sigma = float(np.median(rms[cell][in_cell], overwrite_input=True))  # a copy: sorted
    return sigma if spectrum is None else sigma * spectrum.sigma / whole


def zogy_field(
    new: np.ndarray,
    ref: np.ndarray,
    psf_new: PSF,
    psf_ref: PSF,
    *,
    varying: tuple[bool, bool],
    rms_new: np.ndarray,
    rms_ref: np.ndarray,
    var_new: np.ndarray | None,
    var_ref: np.ndarray | None,
    mask_new: np.ndarray,
    mask_ref: np.ndarray,
    flux_ratio: float,
    flux_ratio_error: float = 0.0,
    shift_ref: tuple[float, float] = (0.0, 0.0),
    astrometric_noise: tuple[float, float] = (0.0, 0.0),
    psf_error: tuple[float, float] = (0.0, 0.0),
    noise_spectra: tuple[NoiseSpectrum | None, NoiseSpectrum | None] = (None, None),
    tiles: int | str | None = "auto",
    dtype: Any = np.float32,
    backend: str | ArrayBackend = "numpy",
    workers: int | None = None,
) -> FieldResult:
    """ZOGY of a background-subtracted pair whose PSFs may vary across the field.

    Parameters
    ----------
    new, ref : ndarray
        Background-subtracted images on the same grid (the reference in its own frame).
    psf_new, psf_ref : callable
        ``psf(x, y)`` gives the unit-sum odd-sized stamp at a 0-based pixel position.
    varying : tuple of bool
        Whether each PSF (new, reference) changes across the field.
    rms_new, rms_ref : ndarray
        Background rms maps: each tile's noise is the median over its inner pixels.
    var_new, var_ref : ndarray or None
        Variance maps (background + source) for Scorr's source-noise terms.
    mask_new, mask_ref : ndarray of bool
        Bad pixels of each image (the reference's in its own frame).
    flux_ratio, flux_ratio_error : float
        ``beta = F_new / F_ref`` (``F_ref = 1``) and its error.
    shift_ref : tuple of float
        ``(dx, dy)`` by which the reference is moved onto ``new`` (a phase ramp).
    astrometric_noise : tuple of float
        ``(sigma_x, sigma_y)`` registration noise of each image, in pixels.
    psf_error : tuple of float
        Fractional PSF-model error of (new, reference), see `astro_zackay.zogy.zogy`.
    noise_spectra : tuple
        The `~astro_zackay.noise.NoiseSpectrum` of (new, reference) to use, or None
        (white noise).
    tiles : 'auto', int or None
        Inner side of the square tiles of constant PSF: `choose_tile_side`
        (``'auto'``), a number of pixels (at least `MIN_TILE_SIDE`), or None (one
        tile, the PSFs at the image centre).
    dtype : {numpy.float32, numpy.float64}
        Working precision of the image-sized algebra (the PSF factors are float64).
    backend : str or ArrayBackend
        Where the image-sized algebra runs, from upload to the results.  The bad-pixel
        mask is not on it: it is built and grown on the host (``scipy.ndimage``, with the
        tiles' noise levels) and then uploaded.
    workers : int, optional
        FFT threads.

    Returns
    -------
    FieldResult

    Raises
    ------
    ValueError
        For inputs of different shapes, a flux ratio that is not positive, a PSF that
        is not a unit-sum odd stamp, or a ``tiles`` option it does not take.

    Examples
    --------
    Identical constant PSFs and white noise: D is the noise-weighted difference.

    >>> import numpy as np
    >>> from astro_zackay._zogy_field import zogy_field
    >>> rng = np.random.default_rng(0)
    >>> new, ref = rng.normal(0, 2.0, (64, 64)), rng.normal(0, 1.0, (64, 64))
    >>> psf = np.zeros((3, 3)); psf[1, 1] = 0.6; psf[0, 1] = psf[2, 1] = 0.2
    >>> res = zogy_field(new, ref, lambda x, y: psf, lambda x, y: psf, varying=(False, False),
    ...                  rms_new=np.full((64, 64), 2.0), rms_ref=np.ones((64, 64)),
    ...                  var_new=None, var_ref=None, mask_new=np.zeros((64, 64), bool),
    ...                  mask_ref=np.zeros((64, 64), bool), flux_ratio=1.0, dtype=np.float64)
    >>> d = (new - ref) / np.sqrt(5.0)
    >>> good = ~res.mask
    >>> bool(np.allclose(res.D[good], (d - np.median(d[good]))[good]))
    True
    >>> len(res.tiles), res.psf_d.shape
    (1, (3, 3))
    """
    be = backend if isinstance(backend, ArrayBackend) else get_array_module(backend)
    shape = _checked_shape(new, ref, var_new, var_ref, mask_new, mask_ref, flux_ratio)
    centre = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    stamp = max(unit_sum_psf(psf_new(*centre), "psf_new").shape
                + unit_sum_psf(psf_ref(*centre), "psf_ref").shape)
    side = _tile_side(tiles, (psf_new, psf_ref), varying, shape)
    layout = _Layout(shape, side, stamp)
    new_bad, ref_bad = _bad_pixels(new, var_new, mask_new), _bad_pixels(ref, var_ref, mask_ref)
    bad = _moved_mask(ref_bad, shift_ref) | new_bad
    good = ~bad
    # the level of a smooth map: a regular sample of pixels reads it
    whole = tuple(sampled_median(rms, good, MAP_LEVEL_SAMPLES) for rms in (rms_new, rms_ref))
    cells, centres = layout.cells(), layout.centres()
    pn = np.array([unit_sum_psf(p, "psf_new") for p in _stamps_at(psf_new, centres)])
    pr = np.array([unit_sum_psf(p, "psf_ref") for p in _stamps_at(psf_ref, centres)])
    sigmas = np.array([[_tile_sigma(rms, good, cell, w, s) for cell in layout.extents()]
                       for rms, w, s in zip((rms_new, rms_ref), whole, noise_spectra)])
    blanks = _blanks(be, new_bad, ref_bad)
    at_centre = int(np.argmin([abs(x - centre[0]) + abs(y - centre[1]) for x, y in centres]))

    def grow(reach, s_sigma):  # the whole image's mask, once, with every tile's kernels
        return _grown_mask(bad, ((new, new_bad), (ref, ref_bad)), whole,
                           (pn[at_centre], pr[at_centre]), layout, reach, s_sigma,
                           max(abs(v) for v in shift_ref))

    plan = TilePlan(float(flux_ratio), float(flux_ratio_error), tuple(shift_ref),
                    tuple(astrometric_noise), tuple(psf_error), tuple(noise_spectra))
    out, flag, offsets, result = zogy_tiles(
        be, layout, {"new": new, "ref": ref, "var_new": var_new, "var_ref": var_ref}, blanks,
        pn, pr, sigmas, plan, grow, dtype, workers)
    rows = [(c[1].start, c[1].stop, c[0].start, c[0].stop, x, y, sigmas[1][j], sigmas[0][j],
             float(out["F_D"][j]), float(out["F_S"][j]), float(offsets[j]))
            for j, (c, (x, y)) in enumerate(zip(cells, centres))]
    return FieldResult(
        **result, mask=flag, input_mask=bad, psf_d=out["P_D"][at_centre],
        F_D=float(out["F_D"][at_centre]), F_S=float(out["F_S"][at_centre]), tiles=rows,
        tile_psfs=out["P_D"], background_offset=float(np.median(offsets)),
    )


@dataclass(frozen=True)
class TilePlan:
    """The global quantities of a subtraction that every tile shares (`zogy_tiles`).

    Attributes
    ----------
    flux_ratio, flux_ratio_error : float
        ``beta`` and its error.
    shift_ref : tuple of float
        ``(dx, dy)`` moving the reference onto the new image.
    astrometric_noise : tuple of float
        ``(sigma_x, sigma_y)`` of each image.
    psf_error : tuple of float
        Fractional PSF errors of (new, reference).
    noise_spectra : tuple
        The (new, reference) `~astro_zackay.noise.NoiseSpectrum` or None (white).
    """

    flux_ratio: float
    flux_ratio_error: float = 0.0
    shift_ref: tuple = (0.0, 0.0)
    astrometric_noise: tuple = (0.0, 0.0)
    psf_error: tuple = (0.0, 0.0)
    noise_spectra: tuple = (None, None)


def zogy_tiles(
    be: ArrayBackend, layout: Any, inputs: dict, blanks: dict, pn: np.ndarray, pr: np.ndarray,
    sigmas: np.ndarray, plan: TilePlan, grow: Callable, dtype: Any, workers: int | None,
) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    """ZOGY of a stack of tiles from their padded windows: the unit both tiled paths run.

    `zogy_field` gives it every tile of an image at once (one stack, the image's
    `_Layout`); the out-of-core path (`astro_zackay.parallel`) one tile at a time,
    its windows read from files (a one-tile layout).  Everything here is per tile;
    what is global comes in ``plan``, the tiles' PSF stamps ``pn``, ``pr`` and noise
    ``sigmas`` (``(2, n)``: new, reference), and ``grow(reach, s_sigma)``, which gives
    the grown bad-pixel mask (True = bad) that `_finish` reads through the layout.

    Returns ``(out, flag, offsets, images)``: `_stack_zogy`'s per-tile numbers
    (``F_D``, ``F_S``, ``P_D``...), the mask, each tile's background offset and the
    images D, S, Scorr, alpha, alpha_err on the host.
    """
    eps = (float(plan.psf_error[0]), float(plan.psf_error[1]))
    ast = (tuple(plan.astrometric_noise), tuple(plan.astrometric_noise))
    spectra = tuple(plan.noise_spectra)
    correlated = (spectra[0] is not None, spectra[1] is not None)
    shift = tuple(plan.shift_ref)
    images = {k: inputs[k] for k in ("new", "ref")}
    scale = _unit_scale(sigmas)  # the algebra runs on the data over it, in any unit
    spec = _spectra(be, _upload_inputs(be, layout, images, blanks, dtype), correlated,
                    float(plan.flux_ratio_error), shift, dtype, workers, scale)

    def variances():  # uploaded and transformed once D and S are formed (less memory held)
        maps = _upload_inputs(be, layout, {k: inputs.get(k) for k in ("var_new", "var_ref")},
                              blanks, dtype)
        return _variance_spectra(be, maps, correlated, shift, dtype, workers, scale)

    split = max(ast[0] + ast[1] + eps) > 0  # S_N and S_R for V_ast and V_psf
    out = _stack_zogy(be, spec, variances, layout, pn, pr,
                      _TileNoise(be, spectra, np.asarray(sigmas) / scale),
                      float(plan.flux_ratio), split, dtype, workers)
    del spec
    # S's kernels are scale**2 times, its noise scale times those of the data's units: the
    # light the masks hide, read in the data's units, is weighed by their ratio
    flag = grow(out.pop("reach"), out.pop("s_sigma") * scale)
    offsets, result = _finish(be, layout, out, flag, ast, eps, float(plan.flux_ratio), dtype,
                              scale)
    out["F_D"] = out["F_D"] / scale
    out["F_S"] = out["F_S"] / scale**2
    out["den0"] = out["den0"] * scale**2
    return out, flag, offsets, result


def _checked_shape(new: Any, ref: Any, var_new: Any, var_ref: Any, mask_new: Any,
                   mask_ref: Any, flux_ratio: float) -> tuple[int, int]:
    """The images' shape, after checking that every input has it and beta is positive."""
    shape = tuple(np.shape(new))
    if len(shape) != 2:
        raise ValueError(f"new must be a 2-D image, got shape {shape}")
    for name, arr in (("ref", ref), ("var_new", var_new), ("var_ref", var_ref),
                      ("mask_new", mask_new), ("mask_ref", mask_ref)):
        if arr is not None and tuple(np.shape(arr)) != shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}, expected {shape} like new")
    if not (np.isfinite(flux_ratio) and flux_ratio > 0):
        raise ValueError(f"flux_ratio must be a positive number, got {flux_ratio}")
    return shape


def check_tiles(tiles: Any) -> None:
    """Raise ValueError unless ``tiles`` is 'auto', None or an integer side >= `MIN_TILE_SIDE`.

    Examples
    --------
    >>> from astro_zackay._zogy_field import check_tiles
    >>> check_tiles(128)
    >>> check_tiles(16)
    Traceback (most recent call last):
    ...
    ValueError: tiles must be 'auto', None or an integer side >= 32 px, got 16
    """
    if tiles is None or (isinstance(tiles, str) and tiles == "auto"):
        return
    message = f"tiles must be 'auto', None or an integer side >= {MIN_TILE_SIDE} px, got {tiles!r}"
    if isinstance(tiles, str | bool) or not np.isscalar(tiles):
        raise ValueError(message)
    if not (np.isfinite(tiles) and int(tiles) == tiles and tiles >= MIN_TILE_SIDE):
        raise ValueError(message)


def _tile_side(tiles: Any, psfs: tuple[PSF, PSF], varying: tuple[bool, bool],
               shape: tuple[int, int]) -> tuple[int, int]:
    """The tiles' inner ``(side_y, side_x)`` from the ``tiles`` option (validated)."""
    check_tiles(tiles)
    if tiles == "auto":
        tiles = choose_tile_side(psfs, varying, shape)
    if tiles is None:
        return shape
    return (min(int(tiles), shape[0]), min(int(tiles), shape[1]))


def _bad_pixels(image: np.ndarray, variance: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """An image's masked pixels and those where it or its variance is not finite."""
    bad = mask | ~np.isfinite(image)
    return bad if variance is None else bad | ~np.isfinite(variance)


def _blanks(be: ArrayBackend, new_bad: np.ndarray, ref_bad: np.ndarray) -> dict:
    """Each input's pixels to blank, on ``be`` (each mask goes up once; None: none).

    The new image's bad pixels blank the reference there too (as the reference's own,
    in its frame).
    """
    blank_new, blank_both = (be.asarray(b) if b.any() else None
                             for b in (new_bad, new_bad | ref_bad))
    return {"new": blank_new, "ref": blank_both, "var_new": blank_new, "var_ref": blank_both}


def _upload_inputs(be: ArrayBackend, layout: _Layout, inputs: dict, blanks: dict,
                   dtype: Any) -> dict:
    """The given images or variance maps on ``be`` as stacks of tiles, ``blanks`` 0."""
    return {name: layout.upload(be, arr, blanks[name], dtype)
            for name, arr in inputs.items() if arr is not None}


def _grown_mask(bad: np.ndarray, images: tuple, sigmas: tuple[float, float],
                psfs: tuple[np.ndarray, np.ndarray], layout: _Layout, reaches: list,
                s_sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The bad pixels and the edge, grown once for the image.

    Every pixel grows by the largest core radius of the tiles' kernels; each masked
    region and each star cut by the edge grows further by the kernels of its own
    tile (``reaches`` holds each tile's (new, reference) reaches).  ``images`` are the
    (image, its own bad pixels) pairs of the new image and the reference.
    """
    radius = max(r.core_radius for tile in reaches for r in tile)
    flag = _grow_mask(bad, radius)
    s_sigmas = s_sigmas.tolist()
    pixels, blanks = [img for img, _ in images], tuple(b for _, b in images)
    if bad.any():
        sky = float(np.mean(flag))
        labels, light = _masked_regions(bad, pixels, list(sigmas), list(psfs), blanks)
        _grow_regions(flag, labels, light, reaches, s_sigmas, layout.owners(labels))
        _warn_if_large(bad, flag, sky, radius)
    edge = _edge_mask(bad.shape, radius + int(np.ceil(shift)))
    labels, light = _edge_sources(pixels, list(sigmas), list(psfs), blanks)
    _grow_regions(edge, labels, light, reaches, s_sigmas, layout.owners(labels))
    return flag | edge


def _remove_offsets(be: ArrayBackend, layout: _Layout, d: Any, good: np.ndarray,
                    den0: np.ndarray) -> np.ndarray:
    """The constant ``c`` of each tile, from the median of its D; removed from D in place.

    ``d`` is the stack of the tiles' D.  A constant ``c`` in the new image adds
    ``c / sqrt(den0)`` to D (the PSFs sum to one): ``c`` is the median of the tile's D
    over the good pixels of its whole grid within the image (the inner pixels and
    those around them: a small tile's own pixels would give an offset biased by the
    stars in it) times ``sqrt(den0)``.
    """
    on_grid = layout.upload(be, good, None, bool)
    levels = _tile_medians(be.xp, d, on_grid)
    d -= levels[:, None, None]
    return np.asarray(be.to_numpy(levels), dtype=np.float64) * np.sqrt(den0)


def _finish(be: ArrayBackend, layout: _Layout, out: dict, flag: np.ndarray, ast, eps,
            beta: float, dtype: Any, scale: float = 1.0) -> tuple[np.ndarray, dict]:
    """The tiles' offsets and the images: D, S, Scorr, alpha and its error (downloaded).

    ``out`` is in the algebra's units (the data over ``scale``, `_unit_scale`); the
    offsets, S, alpha and its error come back in the data's.
    """
    xp = be.xp

    def image(name):
        value = out.pop(name)
        if isinstance(value, np.ndarray) and value.ndim == 1:  # one number per tile
            per_tile = layout.field(xp, value, dtype)
            if per_tile.shape == layout.shape:
                return per_tile
            return xp.broadcast_to(per_tile, layout.shape).copy()  # one tile: a whole image
        return layout.image(xp, value)

    offsets = _remove_offsets(be, layout, out["D"], ~flag, out["den0"])
    d = image("D")
    if "S" in out:
        s_n = s_r = None
        S = image("S")
    else:
        s_n, s_r = image("S_N"), image("S_R")
        S = s_n - s_r
    S -= layout.field(xp, offsets * beta / out["den0"], dtype)
    var = image("V_S")
    f_s = layout.field(xp, out["F_S"], dtype)
    alpha_err = xp.maximum(var, 0.0)
    xp.sqrt(alpha_err, out=alpha_err)
    alpha_err *= beta
    alpha_err /= f_s
    v_ast = v_psf = None
    if s_n is not None:
        v_ast = _astrometric_variance(xp, (s_n, s_r), ast, dtype)
        v_psf = _psf_variance(xp, s_n, s_r, eps)
        del s_n, s_r
    v_beta = None if out["V_beta"] is None else image("V_beta")
    scorr = _scorr(xp, S, _total_variance(var, v_ast, v_beta, v_psf), f_s)
    alpha = S * beta
    alpha /= f_s
    if scale != 1.0:
        S *= 1.0 / scale
        alpha *= scale
        alpha_err *= scale
        offsets = offsets * scale
    return offsets, {"D": be.to_numpy(d), "S": be.to_numpy(S), "Scorr": be.to_numpy(scorr),
                     "alpha": be.to_numpy(alpha), "alpha_err": be.to_numpy(alpha_err)}
