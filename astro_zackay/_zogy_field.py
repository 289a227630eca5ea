"""ZOGY over a whole image with spatially varying PSFs: PSF nodes and smooth weights.

Arrays in, arrays out.  The images and variance maps are padded and transformed once;
the PSFs are evaluated at an ``m x m`` grid of nodes that spans the image from edge
to edge (`node_positions`); each node's outputs (D, S_N and S_R, the source-noise variances) are
computed on the shared transforms and summed (D excepted: each node's own
in the pixels nearest to it, see `FieldResult`) with tensor Lagrange weights
``w_ab(x, y) = l_a(y) l_b(x)`` (they sum to 1 everywhere).  A PSF model whose
coefficient fields are polynomials of degree ``m - 1`` (a KL model of that degree)
is reproduced exactly by the same weights, and ZOGY's filters, smooth functions of
the PSFs, nearly so: `choose_nodes` takes the smallest ``m`` whose interpolated
PSFs stay within `NODE_PSF_ERROR` (L1) of the PSFs between the nodes.  Everything
that depends on a pixel's neighbourhood and not on the PSF (mask growth, edge flags)
is done once for the image; Scorr, the flux and its error and the background offset
are formed once, from the summed parts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .fourier import ArrayBackend, fast_shape, get_array_module, unit_sum_psf
from .noise import NoiseSpectrum
from .zogy import (
    _astrometric_variance,
    _at_zero,
    _edge_mask,
    _edge_sources,
    _grow_mask,
    _grow_regions,
    _masked_regions,
    _moved_mask,
    _node,
    _psf_variance,
    _scorr,
    _spectra,
)

__all__ = ["NODE_PSF_ERROR", "FieldResult", "choose_nodes", "lagrange_weights", "zogy_field"]

_log = logging.getLogger(__name__)

#: Largest L1 error of a PSF interpolated from the nodes, at test points between them,
#: that `choose_nodes` accepts.  On properimage's real pair (KL PSFs of degree 2), 3 x 3
#: nodes (error 0.009) left Scorr within 0.27 sigma of 64 px tiles of constant PSF off
#: the bright stars and 4 x 4 nodes (error 0.004) within 0.17 sigma, where 128 px tiles
#: (a PSF change of up to 0.04 within each) left 0.21 sigma.
NODE_PSF_ERROR = 0.005
#: Most nodes per axis that `choose_nodes` tries.
MAX_NODES = 5
#: Test points per axis at which the interpolation error is measured.
_TEST_POINTS = 9

PSF = Callable[[float, float], np.ndarray]


@dataclass(frozen=True)
class FieldResult:
    """Outputs of `zogy_field` (numpy arrays on the input grid).

    Attributes
    ----------
    D, S, Scorr : ndarray
        Proper difference (white, unit variance: each node's own in the pixels
        nearest to it), score and corrected score (summed over the nodes with their
        weights); the background offset is removed from D and S.
    alpha, alpha_err : ndarray
        Point-source flux (in the new image's units, ``S / F_S`` times ``flux_new``)
        and its 1-sigma error from source and background noise.
    mask : ndarray of bool
        The input bad pixels (the reference's moved by the rounded shift) grown as
        in `astro_zackay.zogy.zogy`, and the edge.
    input_mask : ndarray of bool
        The input bad pixels before the growth.
    psf_d : ndarray
        Unit-sum P_D stamp at the image centre (the nodes' stamps interpolated).
    F_D, F_S : float
        Flux zero point of D and normalisation of S at the image centre.
    nodes : list of tuple
        Per node: ``(x_start, x_stop, y_start, y_stop, x_centre, y_centre, sigma_ref,
        sigma_new, F_D, F_S, background_offset)``, the start/stop bounding the pixels
        nearest to the node.
    node_psfs : ndarray
        The unit-sum P_D stamp of each node, one per row of ``nodes``.
    background_offset : float
        Median over the nodes of the constant removed, in the new image's units.
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
    nodes: list
    node_psfs: np.ndarray
    background_offset: float


def node_positions(n: int, m: int) -> np.ndarray:
    """``m`` node positions from ``0`` to ``n - 1`` (the centre for ``m = 1``).

    Chebyshev-Lobatto points (even for ``m <= 3``, closer together towards the edges
    beyond): the Lagrange weights on them stay within a few tenths of [0, 1]; on even
    points they swing to several times that near the edges from 5 nodes on, and the
    sum of the nodes' outputs, whose noise is not fully shared, loses variance there.
    """
    if m == 1:
        return np.array([(n - 1) / 2.0])
    return (n - 1) * (1.0 - np.cos(np.pi * np.arange(m) / (m - 1))) / 2.0


def lagrange_weights(nodes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Lagrange basis polynomials of ``nodes`` at ``x``: shape ``(len(nodes), len(x))``.

    They sum to 1 at every ``x`` and reproduce polynomials of degree ``len(nodes) - 1``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._zogy_field import lagrange_weights
    >>> w = lagrange_weights(np.array([0.0, 5.0, 10.0]), np.array([0.0, 2.5, 7.0]))
    >>> np.round(w.sum(axis=0), 12).tolist(), np.round(w.T @ np.array([0, 25, 100.0]), 9).tolist()
    ([1.0, 1.0, 1.0], [0.0, 6.25, 49.0])
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.ones((len(nodes), x.size))
    for a, xa in enumerate(nodes):
        for b, xb in enumerate(nodes):
            if a != b:
                w[a] *= (x - xb) / (xa - xb)
    return w


def _interpolation_error(psf: PSF, shape: tuple[int, int], m: tuple[int, int],
                         seen: dict) -> float:
    """Largest L1 error of ``psf`` interpolated from ``m = (m_y, m_x)`` nodes at test points.

    ``seen`` keeps the PSF at every position already evaluated (test points, nodes).
    """
    ny, nx = shape

    def at(x, y):
        if (x, y) not in seen:
            seen[x, y] = psf(x, y)
        return seen[x, y]

    ny_nodes, nx_nodes = node_positions(ny, m[0]), node_positions(nx, m[1])
    at_nodes = np.array([[at(x, y) for x in nx_nodes] for y in ny_nodes])
    ty = (np.arange(_TEST_POINTS) + 0.5) * (ny - 1) / _TEST_POINTS
    tx = (np.arange(_TEST_POINTS) + 0.5) * (nx - 1) / _TEST_POINTS
    wy, wx = lagrange_weights(ny_nodes, ty), lagrange_weights(nx_nodes, tx)
    worst = 0.0
    for i, y in enumerate(ty):
        for j, x in enumerate(tx):
            model = np.einsum("a,b,abij->ij", wy[:, i], wx[:, j], at_nodes)
            worst = max(worst, float(np.abs(model - at(x, y)).sum()))
    return worst


def choose_nodes(
    psfs: tuple[PSF, PSF], varying: tuple[bool, bool], shape: tuple[int, int]
) -> tuple[int, int]:
    """Nodes along y and x: the fewest whose interpolated PSFs are within `NODE_PSF_ERROR`.

    ``(1, 1)`` when neither PSF varies; at most `MAX_NODES` per axis.  The error is the
    largest L1 difference, over a grid of test points between the nodes, between each
    varying PSF and its Lagrange interpolation from the nodes.  The smallest square
    grid that passes is found first, then each axis loses nodes while it still
    passes (a field that varies less along one axis); the choice is logged.
    """
    moving = [psf for psf, v in zip(psfs, varying) if v]
    if not moving:
        return 1, 1
    seen = [{} for _ in moving]

    def error(m):
        return max(_interpolation_error(psf, shape, m, s) for psf, s in zip(moving, seen))

    for m in range(1, MAX_NODES + 1):
        worst = error((m, m))
        if worst <= NODE_PSF_ERROR:
            break
    best = (m, m)
    for axis in (0, 1):
        while best[axis] > 1:
            fewer = tuple(n - 1 if i == axis else n for i, n in enumerate(best))
            e = error(fewer)
            if e > NODE_PSF_ERROR:
                break
            best, worst = fewer, e
    _log.info("PSF nodes: %d (y) x %d (x) (interpolated PSFs within %.4f L1 between them)",
              best[0], best[1], worst)
    return best


def _cells(positions: np.ndarray, n: int) -> list[int]:
    """Edges of the pixels nearest to each node along one axis."""
    mid = np.rint((positions[1:] + positions[:-1]) / 2.0 + 0.5).astype(int)
    return [0, *mid.tolist(), n]


def _noise_power(spectrum: NoiseSpectrum | None, sigma: float, unit: Any) -> Any:
    """``sigma**2`` (white) or the spectrum's power scaled to ``sigma`` (``unit`` at 1)."""
    return sigma * sigma if spectrum is None else unit * (sigma * sigma)


def _node_sigma(
    rms: np.ndarray, good: np.ndarray, cell: tuple[slice, slice], whole: float,
    spectrum: NoiseSpectrum | None,
) -> float:
    """A node's background rms for ZOGY: the median rms of its cell's good pixels.

    With a noise spectrum, its pixel-noise share: the rms map holds the faint static
    sky too, which cancels in the difference, and ``spectrum.sigma / whole`` is the
    pixel noise's share of it over the image.
    """
    in_cell = good[cell]
    sigma = float(np.median(rms[cell][in_cell])) if in_cell.any() else whole
    return sigma if spectrum is None else sigma * spectrum.sigma / whole


def _upload(be: ArrayBackend, arr: Any, bad: Any, grid: tuple[int, int], dtype: Any):
    """``arr`` on ``be`` in ``dtype``, centred in a zero ``grid``, 0 where ``bad`` (on ``be``)."""
    xp = be.xp
    out = xp.zeros(grid, dtype=dtype)
    ny, nx = arr.shape
    y0, x0 = (grid[0] - ny) // 2, (grid[1] - nx) // 2
    inner = (slice(y0, y0 + ny), slice(x0, x0 + nx))
    out[inner] = be.asarray(arr, dtype=dtype)
    if bad is not None:
        out[inner][bad] = 0.0
    return out, inner


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
    nodes: int | str | None = "auto",
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
        Background rms maps: each node's noise is the median over its nearest pixels.
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
    nodes : 'auto', int or None
        Nodes per axis: `choose_nodes` (``'auto'``, possibly fewer along one axis), a
        number, or None (one node).
    dtype : {numpy.float32, numpy.float64}
        Working precision of the image-sized algebra (the PSF factors are float64).
    backend : str or ArrayBackend
        Where the image-sized arrays live, from upload to the results.
    workers : int, optional
        FFT threads.

    Returns
    -------
    FieldResult

    Raises
    ------
    ValueError
        For inputs of different shapes, a flux ratio that is not positive, a PSF that
        is not a unit-sum odd stamp, or a ``nodes`` option it does not take.

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
    >>> len(res.nodes), res.psf_d.shape
    (1, (3, 3))
    """
    be = backend if isinstance(backend, ArrayBackend) else get_array_module(backend)
    shape = _checked_shape(new, ref, var_new, var_ref, mask_new, mask_ref, flux_ratio)
    m = _node_count(nodes, (psf_new, psf_ref), varying, shape)
    centre = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    stamp = max(psf_new(*centre).shape + psf_ref(*centre).shape)
    grid = fast_shape(shape, stamp)
    new_bad, ref_bad = _bad_pixels(new, var_new, mask_new), _bad_pixels(ref, var_ref, mask_ref)
    bad = _moved_mask(ref_bad, shift_ref) | new_bad
    arrays, inner = _upload_inputs(be, {"new": new, "ref": ref, "var_new": var_new,
                                        "var_ref": var_ref}, new_bad, ref_bad, grid, dtype)
    eps = (float(psf_error[0]), float(psf_error[1]))
    ast = (tuple(astrometric_noise), tuple(astrometric_noise))
    correlated = (noise_spectra[0] is not None, noise_spectra[1] is not None)
    spec = _spectra(be, arrays, correlated, float(flux_ratio_error), tuple(shift_ref), dtype,
                    workers)
    del arrays
    split = max(ast[0] + ast[1] + eps) > 0  # S_N and S_R for V_ast and V_psf
    acc = _Accumulator(be, shape, inner, m, dtype)
    good = ~bad
    whole = (float(np.median(rms_new[good])), float(np.median(rms_ref[good])))
    noise = _NodeNoise(be, noise_spectra, grid, stamp)
    rows, reaches, s_sigmas, node_psfs = [], [], [], []
    for a, b, cell in acc.nodes():
        x, y = acc.x_nodes[b], acc.y_nodes[a]
        pn, pr = unit_sum_psf(psf_new(x, y), "psf_new"), unit_sum_psf(psf_ref(x, y), "psf_ref")
        sigmas = [_node_sigma(rms, good, cell, w, s)
                  for rms, w, s in zip((rms_new, rms_ref), whole, noise_spectra)]
        powers = noise.powers(sigmas)
        out = _node(be, spec, pn, pr, powers, float(flux_ratio), 1.0, split, dtype, workers,
                    noise.on_small(sigmas))
        acc.add(a, b, cell, out, _at_zero(powers[0]) + flux_ratio**2 * _at_zero(powers[1]))
        reaches.append(out["reach"])
        s_sigmas.append(out["s_sigma"])
        node_psfs.append(_stamp(be, out.pop("P_D"), stamp))
        rows.append([cell[1].start, cell[1].stop, cell[0].start, cell[0].stop, x, y,
                     sigmas[1], sigmas[0], out["F_D"], out["F_S"]])
        del out
    del spec
    images = [np.where(b, 0.0, np.nan_to_num(a)) for a, b in ((new, new_bad), (ref, ref_bad))]
    flag = _grown_mask(bad, images, whole, (psf_new(*centre), psf_ref(*centre)), acc,
                       reaches, s_sigmas, max(abs(v) for v in shift_ref))
    result = acc.finish(be, flag, ast, eps, float(flux_ratio))
    for row, offset in zip(rows, acc.offsets):
        row.append(offset)
    w_centre = acc.weights_at(*centre)
    psf_d = np.tensordot(w_centre, np.array(node_psfs), axes=1)
    return FieldResult(
        **result, mask=flag, input_mask=bad, psf_d=psf_d / psf_d.sum(),
        F_D=float(w_centre @ np.array([r[8] for r in rows])),
        F_S=float(w_centre @ np.array([r[9] for r in rows])), nodes=[tuple(r) for r in rows],
        node_psfs=np.array(node_psfs), background_offset=float(np.median(acc.offsets)),
    )


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


def _bad_pixels(image: np.ndarray, variance: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """An image's masked pixels and those where it or its variance is not finite."""
    bad = mask | ~np.isfinite(image)
    return bad if variance is None else bad | ~np.isfinite(variance)


def _upload_inputs(be: ArrayBackend, inputs: dict, new_bad: np.ndarray, ref_bad: np.ndarray,
                   grid: tuple[int, int], dtype: Any) -> tuple[dict, tuple[slice, slice]]:
    """The images and variance maps on ``be``, padded to ``grid``, their bad pixels 0.

    The new image's bad pixels blank the reference there too (as the reference's own,
    in its frame); each mask goes up once.
    """
    blank_new, blank_both = (be.asarray(b) if b.any() else None
                             for b in (new_bad, new_bad | ref_bad))
    arrays, inner = {}, None
    for name, blank in (("new", blank_new), ("ref", blank_both), ("var_new", blank_new),
                        ("var_ref", blank_both)):
        if inputs[name] is not None:
            arrays[name], inner = _upload(be, inputs[name], blank, grid, dtype)
    return arrays, inner


class _NodeNoise:
    """Each node's noise powers, on the image's grid and on the small grid of its kernels.

    White noise is ``sigma**2``; a noise spectrum is computed once per grid at unit rms
    (on the backend) and scaled to each node's sigma.  The small grid spans 4 stamps
    (P_D and the real-space kernels of S are computed there, in float64); None when the
    image's grid is not larger.
    """

    def __init__(self, be: ArrayBackend, spectra: tuple, grid: tuple[int, int], stamp: int):
        small = fast_shape((4 * stamp + 1, 4 * stamp + 1))
        self.small = None if small[0] > grid[0] or small[1] > grid[1] else small
        self.spectra = spectra
        self.units = [self._unit(be, s, grid) for s in spectra]
        self.small_units = [self._unit(be, s, self.small) for s in spectra]

    @staticmethod
    def _unit(be: ArrayBackend, spectrum: NoiseSpectrum | None, grid: Any) -> Any:
        if spectrum is None or grid is None:
            return None
        return be.asarray(spectrum.spectrum(grid, sigma=1.0))

    def powers(self, sigmas: list[float], small: bool = False) -> tuple:
        """The (new, reference) noise powers for the nodes' sigmas."""
        units = self.small_units if small else self.units
        return tuple(_noise_power(s, sig, unit)
                     for s, sig, unit in zip(self.spectra, sigmas, units))

    def on_small(self, sigmas: list[float]) -> tuple | None:
        """``(small grid, noise powers there)`` for `astro_zackay.zogy._node`, or None."""
        return None if self.small is None else (self.small, self.powers(sigmas, small=True))


def _stamp(be: ArrayBackend, at_origin: Any, size: int) -> np.ndarray:
    """The unit-sum centred ``size`` stamp of an origin-centred array (only it comes back)."""
    ny, nx = at_origin.shape
    rows = be.asarray((np.arange(size) - size // 2) % ny)
    cols = be.asarray((np.arange(size) - size // 2) % nx)
    stamp = np.asarray(be.to_numpy(at_origin[be.xp.ix_(rows, cols)]), dtype=np.float64)
    return stamp / stamp.sum()


def _node_count(nodes: Any, psfs: tuple[PSF, PSF], varying: tuple[bool, bool],
                shape: tuple[int, int]) -> tuple[int, int]:
    """Nodes along y and x from the ``nodes`` option (validated)."""
    if nodes is None:
        return 1, 1
    if isinstance(nodes, str):
        if nodes != "auto":
            raise ValueError(f"nodes must be 'auto', None or a number of nodes, got {nodes!r}")
        return choose_nodes(psfs, varying, shape)
    m = int(nodes)
    if m < 1 or m != nodes:
        raise ValueError(f"nodes must be a positive integer, 'auto' or None, got {nodes!r}")
    return m, m


def _grown_mask(bad: np.ndarray, images: list[np.ndarray], sigmas: tuple[float, float],
                psfs: tuple[np.ndarray, np.ndarray], acc: _Accumulator, reaches: list,
                s_sigmas: list[float], shift: float) -> np.ndarray:
    """The bad pixels and the edge, grown once for the image.

    Every pixel grows by the largest core radius of the nodes' kernels; each masked
    region and each star cut by the edge grows further by the kernels of its nearest
    node (``reaches`` holds each node's (new, reference) reaches, in `nodes` order).
    """
    radius = max(r.core_radius for node in reaches for r in node)
    flag = _grow_mask(bad, radius)
    if bad.any():
        labels, light = _masked_regions(bad, images, list(sigmas), list(psfs))
        _grow_regions(flag, labels, light, reaches, s_sigmas, acc.owners(labels))
    edge = _edge_mask(bad.shape, radius + int(np.ceil(shift)))
    labels, light = _edge_sources(images, list(sigmas), list(psfs))
    _grow_regions(edge, labels, light, reaches, s_sigmas, acc.owners(labels))
    return flag | edge


class _Accumulator:
    """The weighted sums over the nodes of their cropped outputs, on the backend."""

    def __init__(self, be: ArrayBackend, shape: tuple[int, int], inner: tuple[slice, slice],
                 m: tuple[int, int], dtype: Any):
        self.be, self.shape, self.inner, self.dtype = be, shape, inner, dtype
        self.y_nodes = node_positions(shape[0], m[0])
        self.x_nodes = node_positions(shape[1], m[1])
        self.wy = be.asarray(lagrange_weights(self.y_nodes, np.arange(shape[0])), dtype=dtype)
        self.wx = be.asarray(lagrange_weights(self.x_nodes, np.arange(shape[1])), dtype=dtype)
        self.sums: dict[str, Any] = {}
        self.inv_den = np.zeros(m)  # D's response to a unit constant in new, per node
        self.f_s = np.zeros(m)
        self.beta_den = np.zeros(m)
        self.offsets: list[float] = []

    def nodes(self):
        """``(a, b, cell)`` of each node: row and column index and its nearest pixels."""
        ye, xe = _cells(self.y_nodes, self.shape[0]), _cells(self.x_nodes, self.shape[1])
        for a in range(len(self.y_nodes)):
            for b in range(len(self.x_nodes)):
                yield a, b, (slice(ye[a], ye[a + 1]), slice(xe[b], xe[b + 1]))

    def owners(self, labels: np.ndarray) -> np.ndarray:
        """The index (in `nodes` order) of the node nearest to each labelled region's box."""
        ye, xe = _cells(self.y_nodes, self.shape[0]), _cells(self.x_nodes, self.shape[1])
        owner = []
        for box in ndimage.find_objects(labels):
            a = int(np.searchsorted(ye, (box[0].start + box[0].stop) // 2, side="right")) - 1
            b = int(np.searchsorted(xe, (box[1].start + box[1].stop) // 2, side="right")) - 1
            owner.append(a * len(self.x_nodes) + b)
        return np.array(owner, dtype=int)

    def weights_at(self, x: float, y: float) -> np.ndarray:
        """The node weights at one position, flattened like `nodes`."""
        wy = lagrange_weights(self.y_nodes, np.array([y]))[:, 0]
        wx = lagrange_weights(self.x_nodes, np.array([x]))[:, 0]
        return np.outer(wy, wx).ravel()

    def add(self, a: int, b: int, cell: tuple[slice, slice], out: dict, den0: float) -> None:
        """Add one node's outputs times its weight map (one node: its outputs themselves).

        D is the node's own in its cell (the pixels nearest to it): summed with weights,
        the nodes' D would lose the noise of the frequencies where both PSFs vanish,
        which their different filters whiten with unrelated phases.
        """
        xp = self.be.xp
        one = self.inv_den.size == 1  # weight 1 everywhere: no multiply, no copy
        weight = None if one else xp.multiply.outer(self.wy[a], self.wx[b])
        if not one:
            if "D" not in self.sums:
                self.sums["D"] = xp.empty(self.shape, dtype=self.dtype)
            self.sums["D"][cell] = out.pop("D")[self.inner][cell]
        for name in ("D", "S", "S_N", "S_R", "V_SN", "V_SR", "V_beta"):
            value = out.pop(name, None)
            if value is None:
                continue
            if np.isscalar(value):
                value = xp.full(self.shape, value, dtype=self.dtype) if one else weight * value
            else:
                value = value[self.inner]
                if not one:
                    value *= weight
            if name in self.sums:
                self.sums[name] += value
            else:
                self.sums[name] = value
        self.inv_den[a, b] = 1.0 / np.sqrt(den0)
        self.beta_den[a, b] = 1.0 / den0
        self.f_s[a, b] = out["F_S"]

    def field(self, values: np.ndarray) -> Any:
        """``sum_ab w_ab(x, y) values[a, b]`` as an image on the backend (one node: a float)."""
        if values.size == 1:
            return float(values[0, 0])
        v = self.be.asarray(values, dtype=self.dtype)
        return self.wy.T @ (v @ self.wx)

    def _remove_offsets(self, good: Any) -> np.ndarray:
        """The constant ``c`` of each node, from the median of its D; removed from D.

        A constant ``c`` in the new image adds ``c / sqrt(den0)`` to D (the PSFs sum to
        one): ``c`` is the median of the node's D over the good pixels of its cell times
        ``sqrt(den0)``.
        """
        xp = self.be.xp
        for (a, b, cell) in self.nodes():
            d = self.sums["D"][cell]
            values = d[good[cell]]
            level = float(xp.median(values)) if values.size else 0.0
            d -= level
            self.offsets.append(level / self.inv_den[a, b])
        return np.array(self.offsets).reshape(self.inv_den.shape)

    def finish(self, be: ArrayBackend, flag: np.ndarray, ast, eps, beta: float) -> dict:
        """Background offset, S, Scorr, alpha and its error (in place where it can); downloaded."""
        xp = be.xp
        sums = self.sums
        if "S" not in sums:
            sums["S"] = sums["S_N"] - sums["S_R"]
        c = self._remove_offsets(be.asarray(~flag))
        sums["S"] -= self.field(c * beta * self.beta_den)
        var = sums.pop("V_SN")
        var += sums.pop("V_SR")
        f_s = self.field(self.f_s)
        alpha_err = xp.maximum(var, 0.0)
        xp.sqrt(alpha_err, out=alpha_err)
        alpha_err *= beta
        alpha_err /= f_s
        if "S_N" in sums:
            s_n, s_r = sums.pop("S_N"), sums.pop("S_R")
            for extra in (_astrometric_variance(xp, (s_n, s_r), ast, self.dtype),
                          _psf_variance(xp, s_n, s_r, eps)):
                if extra is not None:
                    var += extra
            del s_n, s_r, extra
        if "V_beta" in sums:
            var += sums.pop("V_beta")
        S = sums.pop("S")
        scorr = _scorr(xp, S, var, float(self.f_s.min()))
        alpha = S * beta
        alpha /= f_s
        return {"D": be.to_numpy(sums.pop("D")), "S": be.to_numpy(S),
                "Scorr": be.to_numpy(scorr), "alpha": be.to_numpy(alpha),
                "alpha_err": be.to_numpy(alpha_err)}
