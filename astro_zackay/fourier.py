"""FFT helpers: the single place where images are padded, PSFs are put at the origin
and real 2-D transforms are taken.

All transforms are real (`scipy.fft.rfft2` / `scipy.fft.irfft2` with an explicit
``s=``), unnormalised forward and ``1/Npix`` backward, so outputs are real by
construction.  Spectra therefore have the "half-plane" layout
``(ny, nx // 2 + 1)``; `half_spectrum_sum` turns a sum over that half plane into
the sum over the full plane (Parseval).

Threads: scipy's transforms take ``workers=``; every function here takes
``workers=None`` meaning all the cores that the process may use (scipy's ``-1``) for
an array of at least `THREADED_MIN_SIZE` values, one thread for a smaller one (a
PSF stamp, a tile of a few hundred pixels), which threads only slow down: on 2 cores
a 64^2 transform and back took 134 us with both and 23 us with one (measured; the
results are the same bit for bit).  Pass an explicit integer to set the threads (for
example inside a Dask worker); no module-level setting changes it.

Array backend: `get_array_module` returns an `ArrayBackend` bundling the array
module (numpy or cupy) with its FFT and ndimage modules (`scipy.fft` and
`scipy.ndimage`, or ``cupyx.scipy.fft`` and ``cupyx.scipy.ndimage``), so the
numerical core is written once for both.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import scipy.fft
import scipy.ndimage

__all__ = [
    "PSF_SUM_TOLERANCE",
    "THREADED_MIN_SIZE",
    "ArrayBackend",
    "abs2",
    "convolve_fft",
    "correlate_fft",
    "fast_shape",
    "floored_inv_sqrt",
    "frequency_grids",
    "get_array_module",
    "half_spectrum_sum",
    "move_whole_pixels",
    "origin_to_stamp",
    "pad_image",
    "phase_ramp",
    "psf_correlation_blocks",
    "psf_rfft",
    "psf_rfft_blocks",
    "psf_rfft_stack",
    "psf_to_origin",
    "shift_image",
    "shift_stack",
    "unit_sum_psf",
]

#: Stamps with at most this many rows get a direct (matrix-product) DFT in `psf_rfft`.
_DIRECT_DFT_MAX = 64
#: Complex values per matrix product of that DFT in `psf_rfft_blocks` (8 MiB).
_DFT_CHUNK = 2**19

#: Arrays of fewer values are transformed on one thread when ``workers=None`` (see above).
THREADED_MIN_SIZE = 2**16

#: Largest ``|sum(psf) - 1|`` accepted by `unit_sum_psf`; smaller deviations are divided out.
PSF_SUM_TOLERANCE: float = 1e-3


def _workers(a: Any, s: tuple[int, int] | None, workers: int | None) -> int:
    """scipy's ``workers`` for transforming ``a`` on the real grid ``s`` (default its last
    two axes): the given number, else all the cores (-1) for a transform of at least
    `THREADED_MIN_SIZE` real values, one thread below."""
    if workers is not None:
        return workers
    shape = np.shape(a)
    grid = shape[-2:] if s is None else s
    return -1 if np.prod(shape[:-2], dtype=np.int64) * np.prod(grid, dtype=np.int64) >= \
        THREADED_MIN_SIZE else 1


@dataclass(frozen=True)
class ArrayBackend:
    """An array module together with its FFT module.

    Attributes
    ----------
    name : str
        ``"numpy"`` or ``"cupy"``.
    xp : module
        `numpy` or ``cupy``.
    fft : module
        `scipy.fft` or ``cupyx.scipy.fft``.
    ndimage : module
        `scipy.ndimage` or ``cupyx.scipy.ndimage``.
    """

    name: str
    xp: ModuleType
    fft: ModuleType
    ndimage: ModuleType

    def rfft2(self, a: Any, s: tuple[int, int] | None = None, workers: int | None = None) -> Any:
        """Unnormalised real 2-D forward transform (``workers`` ignored by cupy; None: all
        cores, one for an array smaller than `THREADED_MIN_SIZE`)."""
        if self.name == "numpy":
            return self.fft.rfft2(a, s=s, workers=_workers(a, s, workers))
        return self.fft.rfft2(a, s=s)

    def irfft2(self, a: Any, s: tuple[int, int], workers: int | None = None) -> Any:
        """Inverse of `rfft2` onto the real grid of shape ``s`` (``workers`` as there)."""
        if self.name == "numpy":
            return self.fft.irfft2(a, s=s, workers=_workers(a, s, workers))
        return self.fft.irfft2(a, s=s)

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Move ``a`` to this backend (no copy when it is already there with ``dtype``)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        """Return ``a`` as a numpy array (copies from the GPU for cupy)."""
        if self.name == "numpy" or a is None or np.isscalar(a):
            return a
        return self.xp.asnumpy(a)


def get_array_module(backend: str = "numpy") -> ArrayBackend:
    """Return the array backend named ``backend``.

    Parameters
    ----------
    backend : {"numpy", "cupy"}
        ``"numpy"`` (default) gives `numpy` with `scipy.fft`; ``"cupy"`` gives
        ``cupy`` with ``cupyx.scipy.fft`` and needs CuPy to be installed.

    Returns
    -------
    ArrayBackend

    Raises
    ------
    ValueError
        If ``backend`` is not one of the names above.
    ImportError
        If ``backend="cupy"`` and CuPy cannot be imported.

    Examples
    --------
    >>> from astro_zackay.fourier import get_array_module
    >>> get_array_module().name
    'numpy'
    """
    if backend == "numpy":
        return ArrayBackend("numpy", np, scipy.fft, scipy.ndimage)
    if backend == "cupy":
        try:
            cupy = importlib.import_module("cupy")
            cufft = importlib.import_module("cupyx.scipy.fft")
            cundimage = importlib.import_module("cupyx.scipy.ndimage")
        except ImportError as exc:
            raise ImportError(
                "backend='cupy' needs CuPy (and a CUDA GPU); install the cupy wheel that "
                "matches your CUDA version, e.g. 'pip install cupy-cuda12x', or use "
                "backend='numpy'."
            ) from exc
        return ArrayBackend("cupy", cupy, cufft, cundimage)
    raise ValueError(f"backend must be 'numpy' or 'cupy', got {backend!r}")


def fast_shape(shape: tuple[int, ...], border: int = 0) -> tuple[int, ...]:
    """Smallest fast real-FFT shape holding ``shape`` plus ``border`` pixels on each side.

    Parameters
    ----------
    shape : tuple of int
        Shape of the image.
    border : int, optional
        Pixels of padding wanted on each side of every axis (default 0).

    Returns
    -------
    tuple of int
        ``scipy.fft.next_fast_len(n + 2*border, real=True)`` for every axis.

    Examples
    --------
    >>> from astro_zackay.fourier import fast_shape
    >>> fast_shape((2049, 1000), border=10)
    (2160, 1024)
    """
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    return tuple(scipy.fft.next_fast_len(int(n) + 2 * int(border), real=True) for n in shape)


def pad_image(
    arr: np.ndarray, shape: tuple[int, int], fill: float = 0.0
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Embed ``arr`` in the centre of a ``shape`` array filled with ``fill``.

    Parameters
    ----------
    arr : ndarray
        2-D image (not modified).
    shape : tuple of int
        Output shape, at least ``arr.shape`` along each axis.
    fill : float, optional
        Value of the border pixels (default 0, right for background-subtracted data).

    Returns
    -------
    padded : ndarray
        New array of ``shape`` and ``arr``'s dtype.
    slices : tuple of slice
        ``padded[slices]`` is ``arr``; use it to cut results back to the input grid.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import pad_image
    >>> padded, inner = pad_image(np.ones((2, 3)), (4, 5))
    >>> padded
    array([[0., 0., 0., 0., 0.],
           [0., 1., 1., 1., 0.],
           [0., 1., 1., 1., 0.],
           [0., 0., 0., 0., 0.]])
    >>> bool(np.all(padded[inner] == 1))
    True
    """
    arr = np.asarray(arr)
    if arr.ndim != 2 or len(shape) != 2:
        raise ValueError(f"pad_image needs a 2-D image and a 2-D shape, got {arr.shape}, {shape}")
    if any(s < n for s, n in zip(shape, arr.shape)):
        raise ValueError(f"pad shape {tuple(shape)} is smaller than the image shape {arr.shape}")
    start = [(s - n) // 2 for s, n in zip(shape, arr.shape)]
    slices = tuple(slice(a, a + n) for a, n in zip(start, arr.shape))
    out = np.full(shape, fill, dtype=arr.dtype)
    out[slices] = arr
    return out, slices


def unit_sum_psf(stamp: Any, name: str = "psf") -> np.ndarray:
    """Validate a PSF stamp and return a float64 copy with exactly unit sum.

    Parameters
    ----------
    stamp : array_like
        Finite 2-D PSF stamp whose sum is 1 within `PSF_SUM_TOLERANCE`; flux scales
        belong in the zero points, not in the PSF.
    name : str, optional
        Name used in error messages.

    Returns
    -------
    ndarray

    Raises
    ------
    ValueError
        If the stamp is not finite and 2-D, or its sum is not 1 within the tolerance.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import unit_sum_psf
    >>> float(unit_sum_psf(np.full((3, 3), 1.0002 / 9)).sum())
    1.0
    """
    stamp = np.asarray(stamp, dtype=np.float64)
    if stamp.ndim != 2 or not np.all(np.isfinite(stamp)):
        raise ValueError(f"{name} must be a finite 2-D stamp, got shape {stamp.shape}")
    total = stamp.sum()
    if abs(total - 1.0) > PSF_SUM_TOLERANCE:
        raise ValueError(
            f"{name} must have unit sum (the flux scale lives in the zero points), "
            f"got sum {total:.6g}; divide the stamp by its sum"
        )
    return stamp / total


def _check_stamp(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    stamp = np.asarray(stamp)
    if stamp.ndim != 2:
        raise ValueError(f"a PSF stamp must be 2-D, got shape {stamp.shape}")
    if stamp.shape[0] % 2 == 0 or stamp.shape[1] % 2 == 0:
        raise ValueError(
            f"a PSF stamp must have odd sizes so that its centre is a pixel, got {stamp.shape}; "
            "pad it with one row/column of zeros on the side away from the centre."
        )
    if stamp.shape[0] > shape[0] or stamp.shape[1] > shape[1]:
        raise ValueError(f"PSF stamp {stamp.shape} is larger than the image grid {tuple(shape)}: "
                         "give a PSF on a stamp no larger than the image (crop its wings, "
                         "or a smaller FWHM), or a larger image")
    return stamp


def psf_to_origin(stamp: np.ndarray, shape: tuple[int, int], dtype: Any = None) -> np.ndarray:
    """Zero-pad an odd-sized PSF stamp to ``shape`` with its central pixel moved to ``[0, 0]``.

    This is the zero-pad-then-roll-by ``-(size // 2)`` that puts a PSF at the origin
    (equal to centring the stamp in the image and applying ``ifftshift``), done in
    one scatter: stamp pixel ``(i, j)`` lands on ``((i - h) % ny, (j - w) % nx)``
    with ``h, w = size // 2``.  Even-sized stamps have no central pixel and are
    rejected.

    Parameters
    ----------
    stamp : ndarray
        2-D PSF stamp with odd sizes, no larger than ``shape``; its centre pixel is
        ``stamp[h, w]``.
    shape : tuple of int
        Shape of the (padded) image grid.
    dtype : dtype, optional
        Output dtype (default: the stamp's floating dtype).

    Returns
    -------
    ndarray

    Raises
    ------
    ValueError
        For a non 2-D or even-sized stamp, or a stamp larger than ``shape``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import psf_to_origin
    >>> stamp = np.zeros((3, 3)); stamp[1, 1] = 1.0; stamp[1, 2] = 0.5
    >>> psf_to_origin(stamp, (4, 4))
    array([[1. , 0.5, 0. , 0. ],
           [0. , 0. , 0. , 0. ],
           [0. , 0. , 0. , 0. ],
           [0. , 0. , 0. , 0. ]])
    """
    stamp = _check_stamp(stamp, shape)
    dtype = np.result_type(stamp.dtype, np.float32) if dtype is None else dtype
    out = np.zeros(shape, dtype=dtype)
    h, w = stamp.shape[0] // 2, stamp.shape[1] // 2
    rows = (np.arange(stamp.shape[0]) - h) % shape[0]
    cols = (np.arange(stamp.shape[1]) - w) % shape[1]
    out[np.ix_(rows, cols)] = stamp
    return out


def origin_to_stamp(
    arr: np.ndarray, size: int | tuple[int, int], normalize: bool = False
) -> np.ndarray:
    """Cut a centred odd-sized stamp out of an origin-centred array (inverse of `psf_to_origin`).

    Parameters
    ----------
    arr : ndarray
        2-D array whose centre is at pixel ``[0, 0]`` (wrapping around the edges),
        e.g. ``irfft2`` of a PSF transform.
    size : int or tuple of int
        Odd stamp size(s).
    normalize : bool, optional
        Divide the stamp by its sum (default False).

    Returns
    -------
    ndarray
        New array of shape ``size`` with the centre at ``[size // 2, size // 2]``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import origin_to_stamp, psf_to_origin
    >>> stamp = np.arange(9.0).reshape(3, 3)
    >>> bool(np.array_equal(origin_to_stamp(psf_to_origin(stamp, (8, 8)), 3), stamp))
    True
    """
    sy, sx = (size, size) if np.isscalar(size) else size
    sy, sx = int(sy), int(sx)
    if sy % 2 == 0 or sx % 2 == 0 or sy > arr.shape[0] or sx > arr.shape[1]:
        raise ValueError(f"stamp size must be odd and at most {arr.shape}, got {(sy, sx)}")
    rows = (np.arange(sy) - sy // 2) % arr.shape[0]
    cols = (np.arange(sx) - sx // 2) % arr.shape[1]
    out = np.asarray(arr)[np.ix_(rows, cols)]
    if normalize:
        out = out / out.sum()
    return out


def psf_rfft(
    stamp: np.ndarray,
    shape: tuple[int, int],
    *,
    dtype: Any = np.float64,
    backend: str | ArrayBackend = "numpy",
    workers: int | None = None,
) -> Any:
    """Real transform of a PSF stamp placed at the origin of a ``shape`` grid.

    `psf_rfft_stack` of the one stamp (a separable direct DFT for a small stamp on a
    larger grid, else the stamp at the origin and an FFT).  Either way the transform is
    computed in float64 and then cast to the complex type matching ``dtype``: a
    float32 FFT of a compact stamp has an absolute round-off floor of ~1e-7 that would
    replace the true (tiny) high-frequency PSF power and
    make float32 and float64 subtractions differ by O(1) at those frequencies.

    Parameters
    ----------
    stamp : ndarray
        Odd-sized 2-D PSF stamp (see `psf_to_origin`).
    shape : tuple of int
        Real grid shape.
    dtype : dtype, optional
        Real working dtype, ``float32`` or ``float64`` (default).
    backend : str or ArrayBackend, optional
        Where the result lives (default numpy).
    workers : int, optional
        FFT threads (default: all cores).

    Returns
    -------
    ndarray
        Complex array of shape ``(ny, nx // 2 + 1)``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import psf_rfft
    >>> p_h = psf_rfft(np.full((3, 3), 1 / 9), (8, 8))
    >>> p_h.shape, complex(p_h[0, 0])
    ((8, 5), (1+0j))
    """
    ctype = np.result_type(dtype, np.complex64)
    stamp = _check_stamp(stamp, shape)
    p_h = psf_rfft_stack(stamp[None], shape, backend=backend, workers=workers)[0]
    return p_h.astype(ctype, copy=False)


def psf_rfft_stack(
    stamps: np.ndarray,
    shape: tuple[int, int],
    *,
    backend: str | ArrayBackend = "numpy",
    workers: int | None = None,
) -> Any:
    """Float64 real transforms of a stack of PSF stamps, each at the origin of a ``shape`` grid.

    `psf_rfft` without its cast, for many stamps at once.  A separable direct DFT (two matrix
    products per stamp) costs about ``h (ny + w)`` complex operations per output
    frequency against ``2 log2(ny nx)`` for an FFT of the grid: stamps of up to 64
    rows on grids much larger than them (one tile, the whole image) take the direct
    DFT; otherwise (small tiles) the stamps are placed at the origin and transformed
    by one batched FFT.

    Parameters
    ----------
    stamps : ndarray
        ``(n, h, w)`` stack of odd-sized stamps.
    shape : tuple of int
        Real grid shape (at least the stamps' size).
    backend : str or ArrayBackend, optional
        Where the result lives (default numpy).
    workers : int, optional
        FFT threads (default: all cores).

    Returns
    -------
    ndarray
        Complex128 array of shape ``(n, ny, nx // 2 + 1)``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import psf_rfft, psf_rfft_stack
    >>> stamps = np.random.default_rng(1).random((2, 5, 5))
    >>> bool(np.allclose(psf_rfft_stack(stamps, (16, 12))[1], psf_rfft(stamps[1], (16, 12))))
    True
    """
    return next(psf_rfft_blocks(stamps, shape, shape[0], backend=backend, workers=workers))[1]


def psf_rfft_blocks(
    stamps: np.ndarray,
    shape: tuple[int, int],
    rows: int,
    *,
    backend: str | ArrayBackend = "numpy",
    workers: int | None = None,
) -> Iterator[tuple[slice, Any]]:
    """`psf_rfft_stack` in blocks of ``rows`` rows of the half plane, first to last.

    Yields ``(block, transforms)``: the rows ``block`` of every stamp's transform,
    ``(n, rows, nx // 2 + 1)`` complex128.  With the direct DFT each block is computed
    alone (only one block is ever held: an image-sized plane is formed in pieces that
    stay in the cache); with an FFT the stamps are transformed once and the blocks are
    views of it.  The arguments are checked at the call, before the first block.

    Raises
    ------
    ValueError
        For ``stamps`` that are not an ``(n, h, w)`` stack, ``rows < 1`` or stamps
        larger than ``shape``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import psf_rfft_blocks, psf_rfft_stack
    >>> stamps = np.random.default_rng(2).random((2, 5, 5))
    >>> whole = psf_rfft_stack(stamps, (300, 200))
    >>> parts = list(psf_rfft_blocks(stamps, (300, 200), 128))
    >>> [p[0] for p in parts]
    [slice(0, 128, None), slice(128, 256, None), slice(256, 300, None)]
    >>> bool(np.allclose(np.concatenate([p[1] for p in parts], axis=1), whole))
    True
    """
    be = backend if isinstance(backend, ArrayBackend) else get_array_module(backend)
    stamps = np.asarray(stamps, dtype=np.float64)
    if stamps.ndim != 3:
        raise ValueError(f"stamps must be an (n, h, w) stack, got shape {stamps.shape}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    for stamp in stamps[:1]:
        _check_stamp(stamp, shape)
    return _psf_rfft_blocks(stamps, shape, rows, be, workers)


def _psf_rfft_blocks(stamps: np.ndarray, shape: tuple[int, int], rows: int, be: ArrayBackend,
                     workers: int | None) -> Iterator[tuple[slice, Any]]:
    """The generator of `psf_rfft_blocks`, on checked inputs (float64 ``stamps``)."""
    n, h, w = stamps.shape
    blocks = [slice(r, min(r + rows, shape[0])) for r in range(0, shape[0], rows)]
    if h <= _DIRECT_DFT_MAX and h * (shape[0] + w) < 2 * shape[0] * np.log2(shape[0] * shape[1]):
        ky = np.fft.fftfreq(shape[0])
        ex = np.exp(-2j * np.pi * np.outer(np.arange(w) - w // 2, np.fft.rfftfreq(shape[1])))
        along_x = be.asarray(stamps) @ be.asarray(ex)
        # whole blocks per matrix product, ~_DFT_CHUNK values: many small products stall
        # when the BLAS threads wait for a busy core (a 2160^2 plane: 8 ms or 1 s)
        chunk = max(1, _DFT_CHUNK // (n * along_x.shape[-1] * rows)) * rows
        for start in range(0, shape[0], chunk):
            part = np.arange(start, min(start + chunk, shape[0]))
            ey = np.exp(-2j * np.pi * np.outer(ky[part], np.arange(h) - h // 2))
            product = be.asarray(ey) @ along_x
            for block in blocks[start // rows : (part[-1] // rows) + 1]:
                yield block, product[:, block.start - start : block.stop - start]
        return
    origin = be.xp.zeros((n, *shape), dtype=np.float64)
    at_rows = be.asarray((np.arange(h) - h // 2) % shape[0])
    at_cols = be.asarray((np.arange(w) - w // 2) % shape[1])
    origin[:, at_rows[:, None], at_cols[None, :]] = be.asarray(stamps)
    whole = be.rfft2(origin, s=tuple(shape), workers=workers)
    del origin
    for block in blocks:
        yield block, whole[:, block]


def psf_correlation_blocks(
    stamps: np.ndarray,
    shape: tuple[int, int],
    shift: tuple[float, float] = (0.0, 0.0),
    rows: int = 128,
) -> Iterator[tuple[slice, np.ndarray]]:
    """The complex64 spectra that correlate an image with each stamp and move it by ``shift``.

    ``conj(psf_rfft(stamp)) * phase_ramp(shape, *shift)`` for each stamp, in blocks of
    ``rows`` rows of the half plane, first to last: multiplying an image's `rfft2` by
    them and transforming back gives the image correlated with the stamp, moved by
    ``(dx, dy)``.  Each is a separable direct DFT of the compact stamp (its x transform
    once, in float64; each block of rows one complex64 matrix product, the shift inside
    the DFT's exponents), several times cheaper at a large image than the FFT of the
    stamp at the origin followed by a multiplication by the ramp, and no image-sized
    array is made.  The float32 round-off is that of a float32 FFT of the stamp.

    Parameters
    ----------
    stamps : ndarray
        ``(n, h, w)`` odd-sized PSF stamps (see `psf_to_origin`).
    shape : tuple of int
        Real grid shape.
    shift : tuple of float, optional
        ``(dx, dy)`` in pixels, as in `phase_ramp`.
    rows : int, optional
        Rows of the half plane per block (128: a block of two stamps, 4 MB at 4096^2,
        stays in the cache while the caller multiplies it in).

    Yields
    ------
    block : slice
        The rows of the half plane.
    spectra : ndarray
        ``(n, rows, nx // 2 + 1)`` complex64.

    Raises
    ------
    ValueError
        For stamps that are not an ``(n, h, w)`` stack of odd sizes no larger than
        ``shape``, or ``rows < 1`` (checked at the call, before the first block).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import phase_ramp, psf_correlation_blocks, psf_rfft
    >>> stamp = np.random.default_rng(3).random((5, 5))
    >>> whole = np.concatenate([b for _, b in psf_correlation_blocks(stamp[None], (40, 30),
    ...                                                              (0.3, -1.2), rows=16)], 1)
    >>> expected = np.conj(psf_rfft(stamp, (40, 30))) * phase_ramp((40, 30), 0.3, -1.2)
    >>> whole.shape, bool(np.allclose(whole[0], expected, atol=1e-5))
    ((1, 40, 16), True)
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    if stamps.ndim != 3:
        raise ValueError(f"stamps must be an (n, h, w) stack, got shape {stamps.shape}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    _check_stamp(stamps[0], shape)
    return _psf_correlation_blocks(stamps, tuple(shape), (float(shift[0]), float(shift[1])),
                                   rows)


def _psf_correlation_blocks(stamps: np.ndarray, shape: tuple[int, int],
                            shift: tuple[float, float], rows: int
                            ) -> Iterator[tuple[slice, np.ndarray]]:
    """The generator of `psf_correlation_blocks`, on checked inputs."""
    _, h, w = stamps.shape
    ky, kx = frequency_grids(shape)
    # conj of the stamp's DFT times the ramp: exp(+2 pi i k (pixel - centre - shift))
    ex = np.exp(2j * np.pi * np.outer(np.arange(w) - w // 2 - shift[0], kx[0]))
    along_x = (stamps @ ex).astype(np.complex64)  # (n, h, nx // 2 + 1)
    offsets = np.arange(h) - h // 2 - shift[1]
    for start in range(0, shape[0], rows):
        block = slice(start, min(start + rows, shape[0]))
        ey = np.exp(2j * np.pi * np.outer(ky[block, 0], offsets)).astype(np.complex64)
        yield block, ey @ along_x


def half_spectrum_sum(a: Any, nx: int) -> Any:
    """Sum over the full 2-D frequency plane of a real quantity stored on the rfft half plane.

    Columns ``1 .. (nx - 1) // 2`` stand for two frequencies (``k`` and ``-k``); the
    zero column and, for even ``nx``, the Nyquist column stand for one.  The sum is over
    the last two axes, so a stack of planes gives one sum per plane.

    Parameters
    ----------
    a : ndarray
        Real array of shape ``(..., ny, nx // 2 + 1)`` that is even in frequency
        (e.g. ``|X_h|**2``).
    nx : int
        Length of the real last axis.

    Returns
    -------
    scalar or ndarray
        The full-plane sum (of each plane, shape ``a.shape[:-2]``); with
        ``a = |X_h|**2`` it equals ``Npix * sum(X**2)``.

    Examples
    --------
    >>> import numpy as np, scipy.fft
    >>> from astro_zackay.fourier import half_spectrum_sum
    >>> x = np.arange(12.0).reshape(3, 4)
    >>> float(half_spectrum_sum(np.abs(scipy.fft.rfft2(x))**2, 4) / x.size), float((x**2).sum())
    (506.0, 506.0)
    >>> half_spectrum_sum(np.ones((2, 3, 3)), 4).tolist()
    [12.0, 12.0]
    """
    total = 2.0 * a.sum(axis=(-2, -1)) - a[..., 0].sum(axis=-1)
    if nx % 2 == 0:
        total = total - a[..., -1].sum(axis=-1)
    return total


def abs2(z: Any) -> Any:
    """``|z|**2`` of a complex array as a new real array.

    The modulus squared in place: one contiguous pass over ``z`` and one new array (the
    real and imaginary parts are strided views, and squaring each takes three passes
    and a second array), within a few units in the last place.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import abs2
    >>> abs2(np.array([3 + 4j]))
    array([25.])
    """
    out = abs(z)
    out *= out
    return out


def floored_inv_sqrt(den: Any, per_tile: bool = False, top: Any = None) -> tuple[Any, Any]:
    """``1 / sqrt(max(den, floor))`` computed in place in ``den``, and the mask ``den > floor``.

    The floor is ``den.max() * sqrt(finfo(den.dtype).tiny)``: low enough that it only
    bites where the denominator has (nearly) underflowed, so whitened images keep unit
    variance at every frequency (see `astro_zackay.zogy`), high enough that the
    reciprocal can never overflow.

    Parameters
    ----------
    den : ndarray
        Non-negative real array (overwritten).
    per_tile : bool, optional
        For a stack of planes (tiles): floor each plane at its own maximum over the
        last two axes instead of the whole array's.
    top : float or ndarray, optional
        The value to floor at ``sqrt(tiny)`` times instead of the maximum: the largest
        value that the denominator can take (one per plane with ``per_tile``), for a
        denominator formed and floored in pieces (best on ``den``'s device already:
        then it is not copied there at each call).

    Returns
    -------
    inv_sqrt : ndarray
        ``den`` itself, now holding the floored inverse square root.
    good : ndarray of bool
        Where ``den`` was above the floor; zero derived filters elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import floored_inv_sqrt
    >>> inv, good = floored_inv_sqrt(np.array([4.0, 0.0]))
    >>> float(inv[0]), bool(np.isfinite(inv[1])), good.tolist()
    (0.5, True, [True, False])
    >>> inv, good = floored_inv_sqrt(np.array([[[4.0, 0.0]], [[1e-100, 0.0]]]), per_tile=True)
    >>> good.tolist()
    [[[True, False]], [[True, False]]]
    >>> inv, good = floored_inv_sqrt(np.array([[[4.0, 0.0]]]), per_tile=True, top=[16.0])
    >>> float(inv[0, 0, 0]), good.tolist()
    (0.5, [[[True, False]]])
    """
    xp = np if isinstance(den, np.ndarray) else importlib.import_module("cupy")
    tiny = float(np.sqrt(np.finfo(den.dtype).tiny))
    if top is not None:
        top = xp.asarray(top, dtype=np.float64)  # no copy when already on den's device
        floor = top.reshape(-1, 1, 1) * tiny if per_tile else float(top) * tiny
    elif per_tile:
        floor = den.max(axis=(-2, -1), keepdims=True) * tiny
    else:
        floor = float(den.max()) * tiny
    good = den > floor
    xp.maximum(den, floor, out=den)
    xp.sqrt(den, out=den)
    xp.divide(1.0, den, out=den)
    return den, good


def frequency_grids(
    shape: tuple[int, int], dtype: Any = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (cycles per pixel) of the rfft half plane as broadcastable ``(ky, kx)``.

    Parameters
    ----------
    shape : tuple of int
        Real grid shape ``(ny, nx)``.
    dtype : dtype, optional
        Float dtype of the grids.

    Returns
    -------
    ky : ndarray
        Shape ``(ny, 1)``, from `numpy.fft.fftfreq`.
    kx : ndarray
        Shape ``(1, nx // 2 + 1)``, from `numpy.fft.rfftfreq`.

    Examples
    --------
    >>> from astro_zackay.fourier import frequency_grids
    >>> ky, kx = frequency_grids((4, 4))
    >>> ky.ravel(), kx.ravel()
    (array([ 0.  ,  0.25, -0.5 , -0.25]), array([0.  , 0.25, 0.5 ]))
    """
    ky = np.fft.fftfreq(shape[0]).astype(dtype)[:, None]
    kx = np.fft.rfftfreq(shape[1]).astype(dtype)[None, :]
    return ky, kx


def phase_ramp(
    shape: tuple[int, int], dx: float, dy: float, dtype: Any = np.complex128,
    backend: str | ArrayBackend = "numpy",
) -> Any:
    """Half-plane transfer function ``exp(-2 pi i (kx dx + ky dy))`` of a shift by ``(dx, dy)``.

    Multiplying an rfft2 spectrum by it moves the image content by ``+dx`` pixels
    along x (axis 1) and ``+dy`` along y (axis 0), circularly.

    Parameters
    ----------
    shape : tuple of int
        Real grid shape.
    dx, dy : float
        Shift in pixels.
    dtype : dtype, optional
        Complex dtype of the result.
    backend : str or ArrayBackend, optional
        Where the result is formed (only the two 1-D ramps are moved there).

    Returns
    -------
    ndarray
        Shape ``(ny, nx // 2 + 1)``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import phase_ramp
    >>> np.round(phase_ramp((2, 4), 1.0, 0.0)[0], 12) + 0.0
    array([ 1.+0.j,  0.-1.j, -1.+0.j])
    """
    be = backend if isinstance(backend, ArrayBackend) else get_array_module(backend)
    ky, kx = frequency_grids(shape)
    ramp_x = np.exp(-2j * np.pi * kx * dx).astype(dtype, copy=False)
    ramp_y = np.exp(-2j * np.pi * ky * dy).astype(dtype, copy=False)
    return be.asarray(ramp_x) * be.asarray(ramp_y)


def move_whole_pixels(arr: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``arr`` moved by ``(dx, dy)`` whole pixels without wrapping; 0 (False) moves in.

    The integer counterpart of `shift_image` for masks and other arrays that must not
    be resampled: content moves to larger indices for positive shifts.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import move_whole_pixels
    >>> move_whole_pixels(np.array([[1, 2, 3]]), 1, 0)
    array([[0, 1, 2]])
    """
    out = np.zeros_like(arr)
    ny, nx = arr.shape
    src = arr[max(-dy, 0) : ny - max(dy, 0), max(-dx, 0) : nx - max(dx, 0)]
    out[max(dy, 0) : max(dy, 0) + src.shape[0], max(dx, 0) : max(dx, 0) + src.shape[1]] = src
    return out


def shift_image(arr: np.ndarray, dx: float, dy: float, *, workers: int | None = None) -> np.ndarray:
    """Shift an image by ``(dx, dy)`` pixels with a Fourier phase ramp (circular, band-limited).

    Integer shifts equal ``np.roll(arr, (dy, dx), axis=(0, 1))``.  For sub-pixel
    shifts the Nyquist row/column keeps only the real part of its ramp (what
    ``irfft2`` does for a real output); use it on well-sampled, padded images.

    Parameters
    ----------
    arr : ndarray
        2-D real image (not modified); NaN must be filled beforehand.
    dx, dy : float
        Shift in pixels along x (axis 1) and y (axis 0); content moves to larger
        indices for positive values.
    workers : int, optional
        FFT threads (default: all cores).

    Returns
    -------
    ndarray
        Same shape and floating dtype as ``arr``.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import shift_image
    >>> shift_image(np.array([[0.0, 1.0, 0.0, 0.0]]), 2, 0)
    array([[0., 0., 0., 1.]])
    """
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"shift_image needs a 2-D image, got shape {arr.shape}")
    be = get_array_module("numpy")
    a_h = be.rfft2(arr, s=arr.shape, workers=workers)
    a_h *= phase_ramp(arr.shape, dx, dy, dtype=a_h.dtype)
    return be.irfft2(a_h, s=arr.shape, workers=workers)


def shift_stack(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Shift each stamp of a ``(n, ny, nx)`` stack by its own ``(dx[i], dy[i])`` (Fourier).

    The batched form of `shift_image` (same phase ramp, same direction: content
    moves to larger indices for positive shifts). Pad the stamps first (to odd sides,
    so that no Nyquist bin is shared) when their content must not wrap around.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import shift_stack
    >>> shift_stack(np.array([[[0.0, 1.0, 0.0, 0.0]]]), np.array([1.0]), np.array([0.0]))
    array([[[0., 0., 1., 0.]]])
    """
    shape = stamps.shape[-2:]
    be = get_array_module("numpy")
    spectrum = be.rfft2(stamps, s=shape)
    spectrum *= phase_ramp(shape, np.asarray(dx)[:, None, None], np.asarray(dy)[:, None, None])
    return be.irfft2(spectrum, s=shape)


def convolve_fft(
    image: np.ndarray, kernel_h: np.ndarray, *, workers: int | None = None
) -> np.ndarray:
    """Circular convolution ``image ⊛ k`` given ``kernel_h = rfft2(k)`` (k centred at the origin).

    Parameters
    ----------
    image : ndarray
        2-D real array.
    kernel_h : ndarray
        Half-plane transform of the kernel on ``image``'s grid, e.g. from `psf_rfft`.
    workers : int, optional
        FFT threads (default: all cores).

    Returns
    -------
    ndarray
        Real array of ``image``'s shape.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import convolve_fft, psf_rfft
    >>> img = np.zeros((4, 4)); img[1, 1] = 1.0
    >>> k = np.zeros((3, 3)); k[1, 2] = 1.0          # shift by +1 in x
    >>> np.argwhere(convolve_fft(img, psf_rfft(k, img.shape)) > 0.5).tolist()
    [[1, 2]]
    """
    return _fft_product(image, kernel_h, conjugate=False, workers=workers)


def correlate_fft(
    image: np.ndarray, kernel_h: np.ndarray, *, workers: int | None = None
) -> np.ndarray:
    """Circular cross-correlation ``image ⋆ k`` (the matched filter) given ``kernel_h = rfft2(k)``.

    Parameters
    ----------
    image : ndarray
        2-D real array.
    kernel_h : ndarray
        Half-plane transform of the kernel on ``image``'s grid.
    workers : int, optional
        FFT threads (default: all cores).

    Returns
    -------
    ndarray
        ``sum_y image(y) k(y - x)``, real, of ``image``'s shape.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.fourier import correlate_fft, psf_rfft
    >>> img = np.zeros((4, 4)); img[1, 1] = 1.0
    >>> k = np.zeros((3, 3)); k[1, 2] = 1.0
    >>> np.argwhere(correlate_fft(img, psf_rfft(k, img.shape)) > 0.5).tolist()
    [[1, 0]]
    """
    return _fft_product(image, kernel_h, conjugate=True, workers=workers)


def _fft_product(image: np.ndarray, kernel_h: np.ndarray, *, conjugate: bool, workers: int | None):
    image = np.asarray(image)
    expected = (image.shape[0], image.shape[1] // 2 + 1)
    if image.ndim != 2 or kernel_h.shape != expected:
        raise ValueError(
            f"kernel transform shape {kernel_h.shape} does not match image shape {image.shape} "
            f"(expected {expected}); build it with psf_rfft(stamp, image.shape)"
        )
    be = get_array_module("numpy")
    i_h = be.rfft2(image, s=image.shape, workers=workers)
    i_h *= np.conj(kernel_h) if conjugate else kernel_h
    return be.irfft2(i_h, s=image.shape, workers=workers)
