"""Proper coaddition (Zackay & Ofek 2017, ApJ 836, 187/188): the streaming array core.

Arrays in, arrays out; no astropy objects.  With ``w_j = F_j / s_j**2`` (the proper
coaddition of Zackay & Ofek 2017)::

    den_R = sum_j F_j**2/s_j**2 |Pj_h|**2
    S_h   = sum_j w_j conj(Pj_h) Mj_h                 score image (matched filter)
    R_h   = S_h / sqrt(den_R)                         white, unit variance
    F_R   = sqrt(sum_j F_j**2/s_j**2),  PR_h = sqrt(den_R) / F_R   (PR_h[0, 0] == 1)

Only the two Fourier sums are kept, so frames are added one at a time.

The stamp of P_R.  ``PR_h`` has no phase, and the modulus spreads any noise of the
frames' PSF stamps (estimated ones hold noise in their wings) over the whole grid:
the zero-phase ``|Pj_h|`` of a stamp is not confined to the stamp.  What P_R holds
of light stays within the frames' stamps: for noise-free Gaussian and Moffat stamps
(FWHM 1.5-6 px, elliptical, off-centre, mixtures of two or three with weights from
1 to 0.05) it loses at most 1.4e-4 of its sum beyond the largest of them.  So the
stamp of P_R is, by default, the largest input stamp; a stamp twice as wide held
mostly the spread noise (3 or 4 frames of 96 px with PSFs estimated from 25 stars,
stamps with up to 37 % of their sum in negative pixels: P_R had up to 14 % at twice
the width, which `~astro_zackay.subtraction.subtract` refuses, and 1-5 % at the
largest input stamp).  It is formed from the stamps on a grid of its own
(`PSF_R_PADDING`), so that it does not depend on the image grid.

Masked pixels.  A Fourier-space sum cannot drop one pixel of one frame exactly.
Masked and NaN pixels of a frame are replaced by 0 before the transform (so they
never leak), and the accumulator records how much matched-filter depth each output
pixel lost.  For a point source at ``x`` the score is unbiased relative to its own
noise: ``E[S(x)] = f * G(x)`` and ``Var(S(x)) = G(x)`` with the depth map::

    G(x) = sum_j F_j**2/s_j**2 * sum_y good_j(y) P_j(y - x)**2
         = G_full - sum_j F_j**2/s_j**2 (bad_j ⋆ P_j**2)(x)

(exact for background-limited noise; the padding around the image counts as bad),
so ``S / sqrt(G)`` is the local S/N and ``S / G`` the PSF flux everywhere.  ``R`` is
divided by the square root of its exact local noise variance
``1 - sum_j s_j**2 ((bad_j | outside) ⊛ K_j**2)`` (``K_j_h = w_j conj(Pj_h) / sqrt(den_R)``,
computed in `ProperCoaddAccumulator.finalize` from the stored PSF stamps and bit-packed
masks), so its noise is unit everywhere; near masks it is no longer white, and its local
zero point is only approximately ``F_R * sqrt(G / G_full)``.  Pixels with
``G < min_depth_fraction * G_full`` are set to 0 and flagged in ``mask``.

Source noise.  ``s_j`` is the background noise; with a per-pixel variance map ``V_j``
(background + source) the noise of R rises near bright sources.  Exactly,
``Var(R(x)) = sum_j (good_j V_j ⋆ K_j**2)(x)``, which needs ``den_R`` and so every
``V_j`` at the end.  Streamed instead, with one real accumulator, is the pointwise
approximation::

    Var(R(x)) ≈ 1 + E(x) / (G_full Var_bkg(R(x))),
    E(x) = sum_j F_j**2/s_j**4 sum(P_j**2) good_j(x) (V_j(x) - s_j**2),

i.e. each frame's excess variance weighted by the energy ``sum(K_j**2)`` of its
whitening kernel, approximated by ``w_j**2 sum(P_j**2) / G_full`` (the ratio of the
means of ``|Pj_h|**2`` and ``den_R`` instead of the mean of their ratio) and treated
as a delta function.  It is exact for ``V_j = s_j**2`` (then ``E = 0``) and for
identical centro-symmetric PSFs with a positive transform, e.g. Gaussians (then
``K_j`` is a delta); with different PSFs it underestimates the source-noise excess,
most where the sharpest frames dominate: at the peak of a star, by 7-21 % against
the exact sum for three frames of FWHM 3/3/6, 2.5/3.5/5 and 3.0/3.5/4.2 px with
different skies (pulls of std 1.04 for FWHM 3.0-3.8 px, 1.2 for 2.5-5 px).  The
smoothed variance of the score, ``sum_j w_j**2 (V_j ⋆ P_j**2)``, is exact for S but
not a good model of R: for a star it underestimates R's peak variance by a third even
for identical PSFs (R is S sharpened, not smoothed).

Outliers (`reject_outliers`).  Each frame ``j`` is compared with what the other frames
predict at the same place, through their PSFs and flux scales (a ZOGY difference of the
frame against the proper coadd of the others; no deconvolution).  With the others'
sums ``S_-j_h = S_h - w_j conj(Pj_h) Mj_h`` and ``den_-j = den_R - F_j**2/s_j**2
|Pj_h|**2`` and ``c_h = 1 / sqrt(s_j**2 den_-j + F_j**2 |Pj_h|**2)``::

    D_j_h = sqrt(den_-j) c_h Mj_h - T_j_h,   T_j_h = F_j Pj_h S_-j_h c_h / sqrt(den_-j)

D_j has white noise of unit variance on the background (when the other frames are
deep, it is the frame minus their prediction, over ``s_j``, pixel by pixel); T_j is the
prediction in the same units.  A pixel of frame ``j`` is an outlier where

    D_j > k sqrt(V_j / s_j**2 + (eta T_j)**2)

(``V_j`` the pixel variance with the sources' noise, at least ``s_j**2``; ``eta`` the
fractional error of the prediction: PSF model, flux scale and registration errors;
``|eta T_j|`` blurred over half a PSF stamp is added to the noise too, for the ringing
of a bright star's model error through the comparison), or
where the mean of ``D_j`` over the 3x3 box around it exceeds ``k`` times its noise and
the pixel itself ``k / 3`` (faint extended outliers), and where the other frames
predict it with at least `MIN_PREDICTION_DEPTH` of their depth everywhere within a
PSF stamp (a source masked in another frame, e.g. a saturated core, biases their
prediction that far).  It is rejected unless another frame
has an outlier within ``grow + 1`` pixels of at least `SUPPORT_RATIO` of its
significance: what several frames show (a transient, a variable star, a star whose PSF
model is off in several frames) is real, what one frame shows (a cosmic ray, a
satellite trail, a hot pixel) is not.  A much brighter outlier of another frame within
a PSF stamp leaks into the comparison through the PSFs (a few to 10 % with noisy
estimated PSF stamps), so such pixels wait for the next round.  The rejected pixels,
grown by ``grow``, are replaced in the sums by what the other frames predict there
(`ProperCoaddAccumulator.frame_prediction`, `ProperCoaddAccumulator.substitute`)
rather than masked: a masked pixel on a star changes the coadd's local PSF, which a
subtraction that uses P_R would read as a residual of the star, while the prediction
keeps the star's profile (the pixels lose their own information, not their depth).
The next round is made with the replaced values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .fourier import (
    ArrayBackend,
    abs2,
    fast_shape,
    floored_inv_sqrt,
    frequency_grids,
    get_array_module,
    origin_to_stamp,
    psf_rfft,
    unit_sum_psf,
)
from .zogy import _positive

__all__ = ["CoaddAlgebraResult", "ProperCoaddAccumulator", "reject_outliers"]

_log = logging.getLogger(__name__)

#: Outliers are looked for only where the other frames reach this fraction of their
#: full depth (not next to their masked pixels, e.g. saturated cores).
MIN_PREDICTION_DEPTH = 0.99

#: An outlier of one frame is real when another frame has one nearby of at least this
#: fraction of its significance; it may be a leak of another frame's outlier through the
#: PSFs when one nearby is more than the inverse times as significant.
SUPPORT_RATIO = 0.25

#: The model error of a bright star's prediction rings through the comparison's
#: kernel out to a PSF stamp (a checkerboard of up to ~1 % of its core residual): this
#: many times the model error blurred by a Gaussian of half a stamp radius is added to
#: the noise (clean stacks of stars of up to 3e5 e- with estimated PSFs: 160-200
#: rejected pixels in a frame without it, 0-9 with it).
_RING_FRACTION = 1.0

#: Above this many significant pixels in a frame, the maxima over their windows come
#: from a maximum filter of the whole image (fewer are painted window by window).
_PAINTED_PIXELS_MAX = 5000

#: ``P_R`` is formed on a grid as wide as its stamp plus this many of the largest input
#: stamp (4 times that stamp by default): its wings do not wrap around into the stamp,
#: whatever the size of the images.
PSF_R_PADDING = 3

#: Frequencies where the other frames hold less than this fraction of the summed PSF
#: power carry no prediction (their difference of two sums is round-off there).
_OTHERS_POWER_FLOOR = 1e-6


def working_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as numpy's float32 or float64, or a TypeError saying what it takes.

    Examples
    --------
    >>> working_dtype("float32")
    dtype('float32')
    """
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = np.dtype(object)
    if dtype is None or resolved.name not in ("float32", "float64"):
        raise TypeError(
            f"dtype must be numpy.float32 or numpy.float64 (the working precision; integer "
            f"images are converted to it), got {dtype!r}: pass dtype=np.float32 or np.float64")
    return resolved


def check_depth_fraction(min_depth_fraction: Any) -> None:
    """``min_depth_fraction`` must be a number in [0, 1] (a fraction of the full depth).

    Examples
    --------
    >>> check_depth_fraction(2)
    Traceback (most recent call last):
    ...
    ValueError: min_depth_fraction must be a fraction of the full depth in [0, 1], got 2: ...
    """
    value = np.asarray(min_depth_fraction)
    if value.ndim != 0 or value.dtype.kind not in "iuf" or not 0 <= value <= 1:
        raise ValueError(
            f"min_depth_fraction must be a fraction of the full depth in [0, 1], got "
            f"{min_depth_fraction!r}: pixels shallower than this fraction are masked "
            "(default 1e-3)")


@dataclass(frozen=True, repr=False)
class CoaddAlgebraResult:
    """Output of `ProperCoaddAccumulator.finalize` (numpy arrays on the image grid).

    Attributes
    ----------
    R : ndarray
        Proper coadd, white with unit variance; near masked pixels and edges it is
        rescaled to unit local noise (correlated there).
    R_variance : ndarray
        Per-pixel noise variance of ``R``: 1 on the background, more near sources when
        the frames were added with a ``variance`` (the pointwise approximation of the
        module docstring; 1 where flagged in ``mask``).
    S : ndarray
        Score image ``sum_j w_j M_j ⋆ P_j = F_R * (R ⋆ P_R)`` (unmasked regions).
    P_R : ndarray
        Centred odd-sized stamp of the coadd PSF, renormalised to unit sum (formed on
        a grid of its own, the same for images of any size).
    psf_r_at_origin : ndarray
        The full coadd PSF on the FFT grid, centre at ``[0, 0]``, sum 1.
    F_R : float
        Flux zero point of ``R``: ``sqrt(sum_j F_j**2 / s_j**2)``.
    depth : ndarray
        ``G(x)``: variance of ``S`` and its response to unit flux (see the module
        docstring); ``S / depth`` is the PSF flux and `snr` the S/N.
    depth_full : float
        ``G`` without masks, ``sum_j F_j**2/s_j**2 sum(P_j**2)``: the squared S/N of a
        unit-flux point source.
    n_used : ndarray of int
        Number of frames not masked at each pixel.
    mask : ndarray of bool
        Pixels whose depth is below the ``min_depth_fraction`` of `finalize`.
    n_frames : int
        Frames added.
    """

    R: np.ndarray
    R_variance: np.ndarray
    S: np.ndarray
    P_R: np.ndarray
    psf_r_at_origin: np.ndarray
    F_R: float
    depth: np.ndarray
    depth_full: float
    n_used: np.ndarray
    mask: np.ndarray
    n_frames: int

    @property
    def snr(self) -> np.ndarray:
        """Matched-filter S/N of a point source at each pixel: ``S / sqrt(depth)``, 0 if masked."""
        return np.where(self.mask, 0.0, self.S / np.sqrt(np.where(self.mask, 1.0, self.depth)))

    def __repr__(self) -> str:
        return (
            f"<CoaddAlgebraResult shape={self.R.shape} n_frames={self.n_frames} "
            f"F_R={self.F_R:.6g} masked={int(self.mask.sum())}>"
        )


class ProperCoaddAccumulator:
    """Streaming proper coaddition: add registered frames one at a time, then `finalize`.

    Memory is a few half-plane spectra of the FFT grid, plus one image once a frame
    is added with a ``variance``, independent of the number of frames.

    Parameters
    ----------
    shape : tuple of int
        Shape of every input frame.
    border : int, optional
        Zero padding on each side (default 0: the FFT is circular over ``shape``); the
        FFT grid is ``fast_shape(shape, border)`` unless ``fft_shape`` is given.
        Use at least the PSF stamp size for images with sources near the edges.
    fft_shape : tuple of int, optional
        Explicit FFT grid, at least ``shape``.
    dtype : {numpy.float64, numpy.float32}, optional
        Working precision of the image transforms (PSF sums are kept in float64).
    backend : {"numpy", "cupy"}, optional
        Array backend; results are returned as numpy.
    workers : int, optional
        scipy.fft threads (default all the cores the process may use).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.coadd_algebra import ProperCoaddAccumulator
    >>> rng = np.random.default_rng(1)
    >>> psf = np.zeros((3, 3)); psf[1, 1] = 0.5; psf[1, 0] = psf[1, 2] = 0.25
    >>> acc = ProperCoaddAccumulator((32, 32))
    >>> for s in (1.0, 2.0):
    ...     acc.add(rng.normal(0, s, (32, 32)), psf, sigma=s)
    >>> res = acc.finalize()
    >>> round(res.F_R, 6), round(float(res.P_R.sum()), 12)
    (1.118034, 1.0)
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        border: int = 0,
        fft_shape: tuple[int, int] | None = None,
        dtype: Any = np.float64,
        backend: str | ArrayBackend = "numpy",
        workers: int | None = None,
    ) -> None:
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"shape must be a 2-D image shape, got {shape}")
        self.fft_shape = fast_shape(self.shape, border) if fft_shape is None else tuple(fft_shape)
        if any(f < s for f, s in zip(self.fft_shape, self.shape)):
            raise ValueError(f"fft_shape {self.fft_shape} is smaller than shape {self.shape}")
        self.dtype = working_dtype(dtype)
        self._be = backend if isinstance(backend, ArrayBackend) else get_array_module(backend)
        self._workers = workers
        self._ctype = np.result_type(self.dtype, np.complex64)
        half = (self.fft_shape[0], self.fft_shape[1] // 2 + 1)
        xp = self._be.xp
        # every sum lives on the backend; PSF sums in float64
        self._num_h = xp.zeros(half, dtype=self._ctype)  # sum_j w_j conj(Pj_h) Mj_h
        self._den_h = xp.zeros(half)  # sum_j F_j**2/s_j**2 |Pj_h|**2
        self._p2_h = xp.zeros(half, dtype=complex)  # sum_j F_j**2/s_j**2 conj(rfft(P_j**2))
        self._deficit_h = None  # sum_j F_j**2/s_j**2 conj(rfft(P_j**2)) rfft(bad_j)
        self._excess = None  # E(x), the source-noise excess (docstring)
        self._n_used = xp.zeros(self.shape, dtype=np.int32)
        self._w2 = 0.0
        self._depth_full = 0.0
        self._stamp = 1
        self._frames: list[tuple[np.ndarray, float, float, Any]] = []  # psf, F, s, packed bad
        self._last_psf_spectrum: tuple[int, Any] = (-1, None)  # see _frame_psf_spectrum
        start = [(g - n) // 2 for g, n in zip(self.fft_shape, self.shape)]
        self._inner = tuple(slice(a, a + n) for a, n in zip(start, self.shape))
        self.n_frames = 0

    @property
    def backend(self) -> ArrayBackend:
        """The array backend on which the sums live."""
        return self._be

    def add(
        self,
        image: Any,
        psf: np.ndarray,
        sigma: float,
        flux_scale: float = 1.0,
        mask: Any = None,
        variance: Any = None,
        name: str | None = None,
    ) -> None:
        """Add one registered, background-subtracted frame.

        Each frame-sized array is moved to the backend once; nothing frame-sized comes
        back.

        Parameters
        ----------
        image : ndarray
            Frame of ``shape`` (not modified); NaN pixels are treated as masked.
        psf : ndarray
            Odd-sized unit-sum PSF stamp of this frame.
        sigma : float
            Background noise of the frame (sets its weight ``F_j / sigma**2``).
        flux_scale : float, optional
            Flux zero point ``F_j`` (image = F_j * sky ⊛ P_j).
        mask : ndarray of bool, optional
            Bad pixels (True = bad); they are excluded (filled with 0) and recorded in
            the depth map.
        variance : ndarray, optional
            Per-pixel noise variance of the frame, background plus source (not
            modified); its excess over ``sigma**2`` enters ``R_variance`` (see the
            module docstring). Non-finite pixels are treated as masked. Default:
            ``sigma**2`` everywhere (background-limited).
        name : str, optional
            What the frame is (a file name), for the error messages, which name the
            frame by its index (the number of frames added before it) and this.

        Raises
        ------
        ValueError
            For arrays of the wrong shape, a stamp without unit sum, a non-positive
            ``sigma`` or ``flux_scale``, or negative variances (each message names the
            frame).
        """
        frame = f"frame {self.n_frames}" + ("" if name is None else f" ({name})")
        s = _positive(f"{frame}: sigma", sigma)
        f = _positive(f"{frame}: flux_scale", flux_scale)
        psf = unit_sum_psf(psf, f"{frame}: psf")
        for what, arr in (("image", image), ("mask", mask), ("variance", variance)):
            if arr is not None and np.shape(arr) != self.shape:
                raise ValueError(
                    f"{frame}: {what} shape {np.shape(arr)} differs from the accumulator's "
                    f"{self.shape}"
                )
        be, xp = self._be, self._be.xp
        image = be.asarray(image)
        bad = ~xp.isfinite(image)
        if mask is not None:
            bad |= be.asarray(mask, dtype=bool)
        if variance is not None:
            variance = be.asarray(variance)
            with np.errstate(invalid="ignore"):
                negative = int((variance < 0).sum())
            if negative:
                raise ValueError(
                    f"{frame}: variance has {negative} negative values; pass the "
                    "background + source variance (>= 0, NaN where unknown)")
            bad |= ~xp.isfinite(variance)
        w2 = f * f / (s * s)
        p2_sum = float((psf * psf).sum())
        if variance is not None:
            # E += w_j**2 sum(P_j**2) good_j (V_j - s_j**2); one temporary frame, formed
            # as (V_j / s_j**2 - 1) w_j**2 ...: the factor w2 / s**2 alone (1/s**4)
            # overflowed float32 for data of ~1e-15 and underflowed to 0 for ~1e15
            excess = xp.divide(variance, s * s, dtype=self.dtype)
            del variance
            excess -= 1.0
            excess[bad] = 0.0
            excess *= w2 * p2_sum
            if self._excess is None:
                self._excess = excess
            else:
                self._excess += excess
            del excess

        m_h = self._frame_spectrum(image, bad)
        del image
        p_h = self._psf_spectrum(psf)
        self._den_h += w2 * abs2(p_h)
        m_h *= self._weight(p_h, f, s)
        del p_h
        self._num_h += m_h
        del m_h
        p2_h = xp.conj(self._psf_spectrum(psf * psf))
        p2_h *= w2
        self._p2_h += p2_h
        any_bad = bool(bad.any())
        if any_bad:
            b_h = self._spectrum(bad)
            b_h *= p2_h
            if self._deficit_h is None:
                self._deficit_h = b_h
            else:
                self._deficit_h += b_h
            del b_h
        self._frames.append((psf, f, s, xp.packbits(bad.ravel()) if any_bad else None))
        self._n_used += ~bad
        self._w2 += w2
        self._depth_full += w2 * p2_sum
        self._stamp = max(self._stamp, *psf.shape)
        self.n_frames += 1

    def _psf_spectrum(self, stamp: np.ndarray) -> Any:
        """The float64 transform of a stamp at the origin of the grid, on the backend."""
        return psf_rfft(stamp, self.fft_shape, backend=self._be, workers=self._workers)

    def _frame_psf_spectrum(self, index: int) -> Any:
        """`_psf_spectrum` of frame ``index``'s PSF, kept for the next call on that frame.

        (Outlier rejection asks for one frame's twice in a row; only the last one is
        kept, so the memory does not grow with the number of frames.)
        """
        if self._last_psf_spectrum[0] != index:
            self._last_psf_spectrum = (index, self._psf_spectrum(self._frames[index][0]))
        return self._last_psf_spectrum[1]

    def _weight(self, p_h: Any, f: float, s: float) -> Any:
        """A frame's matched filter ``w_j conj(Pj_h)`` in the working complex type."""
        weight = self._be.xp.conj(p_h)
        weight *= f / (s * s)
        return weight.astype(self._ctype, copy=False)

    def _spectrum(self, arr: Any, dtype: Any = np.float64) -> Any:
        """The transform of an image-sized array (on the backend) zero-padded to the grid."""
        padded = self._be.xp.zeros(self.fft_shape, dtype=dtype)
        padded[self._inner] = arr
        return self._be.rfft2(padded, s=self.fft_shape, workers=self._workers)

    def _image(self, spectrum: Any) -> Any:
        """The inverse transform of a half-plane spectrum, cut to the image (on the backend)."""
        return self._be.irfft2(spectrum, s=self.fft_shape, workers=self._workers)[self._inner]

    def _bad(self, index: int) -> Any:
        """The pixels of frame ``index`` left out of the sums (masked or NaN), on the backend."""
        packed = self._frames[index][3]
        xp = self._be.xp
        if packed is None:
            return xp.zeros(self.shape, bool)
        n = self.shape[0] * self.shape[1]
        return xp.unpackbits(packed)[:n].reshape(self.shape).astype(bool)

    def _frame_spectrum(self, image: Any, bad: Any) -> Any:
        """The transform of a frame (on the backend) as it was added: bad pixels 0."""
        return self._spectrum(self._be.xp.where(bad, 0.0, image).astype(self.dtype, copy=False),
                              self.dtype)

    def _split(self, index: int, image: Any) -> tuple[Any, ...]:
        """Frame ``index`` and the sums of the others, on the half plane (on the backend).

        Returns ``(p_h, own, others, informed, m_h, s_h)``: the frame's PSF transform,
        its and the others' ``F**2/s**2 |P_h|**2``, where the others carry information,
        the frame's transform as added and the others' score ``S_-j_h``.
        """
        if not 0 <= index < self.n_frames:
            raise ValueError(f"frame {index} was not added ({self.n_frames} frames)")
        if np.shape(image) != self.shape:
            raise ValueError(f"frame {index}: image shape {np.shape(image)} differs from the "
                             f"accumulator's {self.shape}")
        _, f, s, _ = self._frames[index]
        p_h = self._frame_psf_spectrum(index)
        own = (f * f / (s * s)) * abs2(p_h)
        others = self._den_h - own
        informed = others > _OTHERS_POWER_FLOOR * self._den_h
        others[~informed] = 0.0
        m_h = self._frame_spectrum(self._be.asarray(image), self._bad(index))
        s_h = self._num_h - m_h * self._weight(p_h, f, s)
        return p_h, own, others, informed, m_h, s_h

    def frame_residual(
        self, index: int, image: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frame ``index`` against the prediction of the other frames (`reject_outliers`).

        Parameters
        ----------
        index : int
            Which frame (in the order of `add`).
        image : ndarray
            The image given to `add` for that frame (not modified).

        Returns
        -------
        difference : ndarray
            ``D_j``: white noise of unit variance on the background, positive where the
            frame holds more light than the others predict (module docstring); the
            frame's masked pixels are filled with the others' prediction first (a hole
            would ring through the comparison's kernel).
        prediction : ndarray
            ``T_j``, the others' prediction in the units of ``difference``.
        depth : ndarray
            The fraction of the other frames' depth reached at each pixel (1 where none
            of them is masked); 0 everywhere when there is no other frame.

        Raises
        ------
        ValueError
            For an index that was not added or an image of the wrong shape.
        """
        be = self._be
        difference, prediction = self._residual(index, be.asarray(image))
        return (be.to_numpy(difference), be.to_numpy(prediction),
                be.to_numpy(self._others_depth(index)))

    def _residual(self, index: int, image: Any) -> tuple[Any, Any]:
        """`frame_residual`'s difference and prediction, on the backend."""
        p_h, own, others, informed, m_h, s_h = self._split(index, image)
        _, f, s, packed = self._frames[index]
        xp = self._be.xp
        if packed is not None:  # its masked pixels filled with the others' prediction
            filled = xp.where(self._bad(index), self._predict(index, p_h, own, others, informed,
                                                              s_h), image)
            m_h = self._frame_spectrum(filled, xp.zeros(self.shape, bool))
            del filled
        c_h, _ = floored_inv_sqrt(s * s * (others + own))
        inv_others = xp.where(informed, 1.0 / xp.sqrt(xp.where(informed, others, 1.0)), 0.0)
        t_h = s_h * (f * p_h * c_h * inv_others).astype(self._ctype)
        del s_h
        m_h *= (xp.sqrt(others) * c_h).astype(self._ctype)
        m_h -= t_h
        return self._image(m_h), self._image(t_h)

    def frame_prediction(self, index: int, image: np.ndarray) -> np.ndarray:
        """What the other frames predict frame ``index`` holds, in its units.

        ``F_j Pj_h S_-j_h / max(den_-j, F_j**2/s_j**2 |Pj_h|**2)``: the others' sky
        seen through this frame's PSF and flux scale, with no noise amplification (its
        noise is at most the frame's own where this frame is sharper than the others
        together, at the price of a smoother prediction there).

        Parameters
        ----------
        index : int
            Which frame (in the order of `add`).
        image : ndarray
            The image given to `add` for that frame (not modified).

        Returns
        -------
        ndarray
            The prediction, on the image grid.

        Raises
        ------
        ValueError
            For an index that was not added or an image of the wrong shape.
        """
        return self._be.to_numpy(self._prediction(index, self._be.asarray(image)))

    def _prediction(self, index: int, image: Any) -> Any:
        """`frame_prediction` on the backend."""
        p_h, own, others, informed, _, s_h = self._split(index, image)
        return self._predict(index, p_h, own, others, informed, s_h)

    def _predict(
        self, index: int, p_h: Any, own: Any, others: Any, informed: Any, s_h: Any
    ) -> Any:
        """`frame_prediction` from the parts of `_split` (``s_h`` is not modified)."""
        xp = self._be.xp
        f = self._frames[index][1]
        gain = xp.where(informed, f / xp.maximum(xp.maximum(others, own), 1e-300), 0.0)
        return xp.ascontiguousarray(self._image(s_h * (p_h * gain).astype(self._ctype)))

    def _others_depth(self, index: int) -> Any:
        """Fraction of the depth of every frame but ``index`` reached at each pixel.

        Only the masked pixels count (not the padding: the background-subtracted sky
        beyond the edge is 0, as the padding is).
        """
        xp = self._be.xp
        psf, f, s, packed = self._frames[index]
        w2 = f * f / (s * s)
        full = self._depth_full - w2 * float((psf * psf).sum())
        if full <= 0:
            return xp.zeros(self.shape)
        if self._deficit_h is None:
            return xp.ones(self.shape)
        lost_h = self._deficit_h.copy()
        if packed is not None:
            p2_h = xp.conj(self._psf_spectrum(psf * psf))
            p2_h *= w2
            p2_h *= self._spectrum(self._bad(index))
            lost_h -= p2_h
            del p2_h
        return xp.clip(1.0 - self._image(lost_h) / full, 0.0, 1.0)

    def substitute(
        self, index: int, pixels: np.ndarray, image: np.ndarray, values: np.ndarray
    ) -> None:
        """Replace some pixels of an added frame by other values in the sums.

        The sums become those of ``image`` with ``values`` at ``pixels``: the
        replaced pixels keep their depth and their place in ``n_used`` (use
        `frame_prediction` for values that carry no information of their own).

        Parameters
        ----------
        index : int
            Which frame (in the order of `add`).
        pixels : ndarray of bool
            The pixels to replace; masked ones are ignored.
        image : ndarray
            The image given to `add` for that frame, or last passed here (not modified).
        values : ndarray
            The new values (read at ``pixels``).

        Raises
        ------
        ValueError
            For an index that was not added or arrays of the wrong shape.
        """
        if not 0 <= index < self.n_frames:
            raise ValueError(f"frame {index} was not added ({self.n_frames} frames)")
        for name, arr in (("pixels", pixels), ("image", image), ("values", values)):
            if np.shape(arr) != self.shape:
                raise ValueError(f"frame {index}: {name} shape {np.shape(arr)} differs from "
                                 f"the accumulator's {self.shape}")
        be, xp = self._be, self._be.xp
        _, f, s, _ = self._frames[index]
        change = be.asarray(pixels, dtype=bool) & ~self._bad(index)
        delta = xp.where(change, be.asarray(values, dtype=np.float64) - be.asarray(image), 0.0)
        d_h = self._frame_spectrum(delta, ~change)
        d_h *= self._weight(self._frame_psf_spectrum(index), f, s)
        self._num_h += d_h

    def _local_variance_of_r(self, inv_sqrt: Any, outside: Any, outside_h: Any) -> Any:
        """Local noise variance of the unscaled R (exact for background-limited noise).

        ``Var(R(x)) = 1 - sum_j s_j**2 ((bad_j | outside) ⊛ K_j**2)(x)`` with the
        per-frame kernels ``K_j_h = w_j conj(Pj_h) / sqrt(den_R)``; needs ``den_R``, so
        it is done here, from the stored PSF stamps and bit-packed masks, in the
        working precision. ``outside_h`` is the transform of ``outside``.
        """
        be, xp, grid, inner = self._be, self._be.xp, self.fft_shape, self._inner
        if not bool(outside.any()) and all(packed is None for *_, packed in self._frames):
            return xp.ones(self.shape)
        # sum of s_j**2 K_j**2 over frames without masked pixels
        clean_k2 = xp.zeros(grid, dtype=self.dtype)
        lost_h = xp.zeros(self._p2_h.shape, dtype=self._ctype)
        for index, (psf, f, s, packed) in enumerate(self._frames):
            k_h = xp.conj(self._psf_spectrum(psf))
            k_h *= inv_sqrt * (f / (s * s))
            k2 = be.irfft2(k_h.astype(self._ctype, copy=False), s=grid, workers=self._workers)
            del k_h
            k2 *= k2 * (s * s)
            if packed is None:
                clean_k2 += k2
                continue
            k2_h = be.rfft2(k2, workers=self._workers)
            del k2
            bad = outside.astype(self.dtype)
            bad[inner] = self._bad(index)
            k2_h *= be.rfft2(bad, workers=self._workers)
            del bad
            lost_h += k2_h
        lost_h += outside_h * be.rfft2(clean_k2, workers=self._workers)
        return 1.0 - self._image(lost_h)

    def merge(self, other: ProperCoaddAccumulator) -> ProperCoaddAccumulator:
        """Add the frames of another accumulator to this one (in place), as if added here.

        Every sum is linear in the frames, so two partial accumulators built from
        disjoint sets of frames (on different workers, say) merge into the one that
        would have taken all of them: ``other``'s frames come after this one's, in
        their order.  ``other`` is not modified.

        Parameters
        ----------
        other : ProperCoaddAccumulator
            An accumulator of the same ``shape``, FFT grid, ``dtype`` and backend.

        Returns
        -------
        ProperCoaddAccumulator
            This accumulator (merged).

        Raises
        ------
        TypeError
            When ``other`` is not a ProperCoaddAccumulator.
        ValueError
            When the accumulators differ in shape, FFT grid, dtype or backend, or
            ``other`` is this accumulator.

        Examples
        --------
        >>> import numpy as np
        >>> from astro_zackay.coadd_algebra import ProperCoaddAccumulator
        >>> rng = np.random.default_rng(1)
        >>> psf = np.zeros((3, 3)); psf[1, 1] = 0.5; psf[1, 0] = psf[1, 2] = 0.25
        >>> frames = [rng.normal(0, s, (32, 32)) for s in (1.0, 2.0)]
        >>> whole, a, b = (ProperCoaddAccumulator((32, 32)) for _ in range(3))
        >>> for frame, s in zip(frames, (1.0, 2.0)):
        ...     whole.add(frame, psf, sigma=s)
        >>> a.add(frames[0], psf, sigma=1.0); b.add(frames[1], psf, sigma=2.0)
        >>> merged = a.merge(b).finalize()
        >>> merged.n_frames, bool(np.allclose(merged.R, whole.finalize().R))
        (2, True)
        """
        if not isinstance(other, ProperCoaddAccumulator):
            raise TypeError(f"can merge only a ProperCoaddAccumulator, got {type(other).__name__}")
        if other is self:
            raise ValueError("cannot merge an accumulator with itself: its frames would count "
                             "twice")
        for what, mine, theirs in (("shape", self.shape, other.shape),
                                   ("FFT grid", self.fft_shape, other.fft_shape),
                                   ("dtype", self.dtype, other.dtype),
                                   ("backend", self._be.name, other._be.name)):
            if mine != theirs:
                raise ValueError(
                    f"cannot merge accumulators of different {what}: {mine} and {theirs}; "
                    "build every partial accumulator with the same shape, border (or "
                    "fft_shape), dtype and backend"
                )
        xp = self._be.xp
        self._num_h += other._num_h
        self._den_h += other._den_h
        self._p2_h += other._p2_h
        for name in ("_deficit_h", "_excess"):  # None until a frame brings one
            theirs = getattr(other, name)
            if theirs is not None:
                mine = getattr(self, name)
                setattr(self, name, xp.array(theirs, copy=True) if mine is None
                        else mine + theirs)
        self._n_used += other._n_used
        self._w2 += other._w2
        self._depth_full += other._depth_full
        self._stamp = max(self._stamp, other._stamp)
        self._frames.extend(other._frames)  # the arrays in them are never written to
        self.n_frames += other.n_frames
        return self

    def __getstate__(self) -> dict:
        """The state to pickle (to ship to another process): the backend by its name."""
        state = self.__dict__.copy()
        state["_be"] = self._be.name
        state["_last_psf_spectrum"] = (-1, None)  # a cache
        return state

    def __setstate__(self, state: dict) -> None:
        """Restore a pickled accumulator, the backend looked up by its name."""
        state = dict(state)
        state["_be"] = get_array_module(state["_be"])
        self.__dict__.update(state)

    def _psf_r_stamp(self, size: int) -> np.ndarray:
        """``P_R`` as a centred, unit-sum stamp of odd ``size``, on its own grid.

        Formed from the frames' stamps on a grid of ``size`` plus `PSF_R_PADDING`
        times the largest stamp, whatever the image grid: the same stamp for frames of
        any size, without aliasing of its wings (on an image grid only a few stamps
        wide) and never cut by it. Small transforms, on the CPU.
        """
        side = fast_shape((size + PSF_R_PADDING * self._stamp,))[0]
        grid = (side, side)
        den = np.zeros((side, side // 2 + 1))
        for psf, f, s, _ in self._frames:
            den += (f * f / (s * s)) * abs2(psf_rfft(psf, grid, workers=self._workers))
        full = get_array_module("numpy").irfft2(np.sqrt(den), s=grid, workers=self._workers)
        return origin_to_stamp(full, size, normalize=True)

    def finalize(
        self, psf_stamp_size: int | None = None, min_depth_fraction: float = 1e-3
    ) -> CoaddAlgebraResult:
        """Form the coadd from the accumulated sums (the accumulator stays usable).

        Everything is computed on the backend; the results come back once, as numpy.

        Parameters
        ----------
        psf_stamp_size : int, optional
            Odd size of the ``P_R`` stamp; default the largest input stamp (the
            module docstring says why).
        min_depth_fraction : float, optional
            Pixels with ``depth < min_depth_fraction * depth_full`` (e.g. masked in every
            frame) get ``R = 0`` and are flagged.

        Returns
        -------
        CoaddAlgebraResult

        Raises
        ------
        ValueError
            If no frame was added.
        """
        check_depth_fraction(min_depth_fraction)
        if self.n_frames == 0:
            raise ValueError("no frame was added; call add() first")
        be, xp, grid = self._be, self._be.xp, self.fft_shape
        size = self._stamp | 1 if psf_stamp_size is None else int(psf_stamp_size)
        if size % 2 == 0 or size < 1:
            raise ValueError(f"psf_stamp_size must be a positive odd number, got {size}")
        inv_sqrt, _ = floored_inv_sqrt(self._den_h.copy())
        f_r = float(np.sqrt(self._w2))
        pr_full = be.to_numpy(be.irfft2(xp.sqrt(self._den_h) / f_r, s=grid,
                                        workers=self._workers))
        p_r = self._psf_r_stamp(size)

        # depth lost to masks and to the padding around the image
        outside = xp.ones(grid)
        outside[self._inner] = 0.0
        outside_h = be.rfft2(outside, workers=self._workers)
        lost_h = outside_h * self._p2_h
        if self._deficit_h is not None:
            lost_h += self._deficit_h
        depth = self._depth_full - self._image(lost_h)
        del lost_h
        xp.maximum(depth, 0.0, out=depth)
        var_r = self._local_variance_of_r(inv_sqrt, outside, outside_h)
        del outside_h
        del outside
        flag = (depth < min_depth_fraction * self._depth_full) | (var_r < min_depth_fraction)
        var_r[flag] = 1.0
        r_variance = xp.ones(self.shape)
        if self._excess is not None:
            r_variance += self._excess / (self._depth_full * var_r)
            xp.maximum(r_variance, 0.0, out=r_variance)
            r_variance[flag] = 1.0

        S = self._image(self._num_h)
        R = self._image(self._num_h * inv_sqrt.astype(self.dtype, copy=False))
        xp.sqrt(var_r, out=var_r)
        R /= var_r.astype(R.dtype, copy=False)
        R[flag] = 0.0
        _log.debug("proper coadd of %d frames, F_R=%g", self.n_frames, f_r)
        out = (xp.ascontiguousarray(a) for a in (R, r_variance, S, depth.astype(self.dtype),
                                                 self._n_used.copy(), flag))
        R, r_variance, S, depth, n_used, flag = (be.to_numpy(a) for a in out)
        return CoaddAlgebraResult(
            R=R,
            R_variance=r_variance,
            S=S,
            P_R=p_r,
            psf_r_at_origin=pr_full,
            F_R=f_r,
            depth=depth,
            depth_full=self._depth_full,
            n_used=n_used,
            mask=flag,
            n_frames=self.n_frames,
        )


def _blind(acc: ProperCoaddAccumulator, index: int, reach: int) -> Any:
    """Where the other frames cannot predict frame ``index``, bit-packed; None if nowhere.

    Within ``reach`` pixels of where they reach less than `MIN_PREDICTION_DEPTH` of
    their depth (a source masked in another frame biases their prediction out to a PSF
    stamp). The depth does not change with the rounds of `reject_outliers`.
    """
    blind = acc._others_depth(index) < MIN_PREDICTION_DEPTH
    if not bool(blind.any()):
        return None
    # as uint8: the maximum filters of every backend take it
    blind = acc.backend.ndimage.maximum_filter(blind.astype(np.uint8), 2 * reach + 1)
    return acc.backend.xp.packbits(blind.ravel())


def _blurred(acc: ProperCoaddAccumulator, image: Any, sigma: float) -> Any:
    """``image`` (on the backend) convolved with a unit-sum Gaussian of ``sigma`` px.

    Through the accumulator's zero-padded FFT grid (zero beyond the image edges): two
    transforms, a tenth of the time of a direct Gaussian filter this wide.
    """
    be = acc.backend
    ky, kx = frequency_grids(acc.fft_shape)
    g_h = be.asarray(np.exp(-2.0 * (np.pi * sigma * ky) ** 2).astype(acc.dtype))
    g_h = g_h * be.asarray(np.exp(-2.0 * (np.pi * sigma * kx) ** 2).astype(acc.dtype))
    spectrum = acc._spectrum(image, acc.dtype)
    spectrum *= g_h
    return acc._image(spectrum)


def _significance(
    acc: ProperCoaddAccumulator,
    index: int,
    image: Any,
    variance: Any,
    blind: Any,
    threshold: float,
    model_error: float,
    reach: int,
) -> Any:
    """Excess of one frame over the others' prediction, in sigma, where above ``threshold``.

    Tested pixel by pixel (sharp outliers: cosmic rays, hot pixels) and in 3x3 box
    means (faint extended ones: the wings of satellite trails), each against its own
    noise; the larger of the two (the box only where the pixel itself is above a third
    of ``threshold``), 0 below ``threshold``, where the others cannot predict (``blind``,
    from `_blind`) and on the frame's masked pixels. The noise holds the model error of
    the prediction at each pixel and `_RING_FRACTION` times that error blurred by a
    Gaussian of ``reach / 2`` pixels (`_blurred`). Arrays on the accumulator's backend.
    """
    xp = acc.backend.xp
    difference, prediction = acc._residual(index, image)
    s2 = acc._frames[index][2] ** 2
    noise = xp.ones(acc.shape) if variance is None else xp.maximum(
        xp.nan_to_num(variance.astype(np.float64) / s2, nan=1.0), 1.0
    )
    prediction *= model_error
    ring = _blurred(acc, xp.abs(prediction), reach / 2.0)
    ring *= _RING_FRACTION
    noise += ring * ring
    del ring
    sig = difference / xp.sqrt(noise + prediction * prediction)
    # a 3x3 box mean counts for its centre pixel only where that pixel holds some of the
    # excess: computed there only; background noise 1/3, the model error adds coherently
    centres = xp.flatnonzero(sig > threshold / 3.0)
    if centres.size:
        box, box_noise, box_error = _box_means(xp, (difference, noise, prediction), centres)
        box /= xp.sqrt(box_noise / 9.0 + box_error * box_error)
        flat = sig.ravel()
        flat[centres] = xp.maximum(flat[centres], box)
    off = (sig <= threshold) | acc._bad(index)
    if blind is not None:
        n = acc.shape[0] * acc.shape[1]
        off |= xp.unpackbits(blind)[:n].reshape(acc.shape).astype(bool)
    sig[off] = 0.0
    return sig.astype(np.float32)


def _box_means(xp: Any, images: tuple[Any, ...], centres: Any) -> list[Any]:
    """The means of each image over the 3x3 boxes around the pixels ``centres``.

    ``xp`` is the array module of the images; ``centres`` are flat indices; pixels
    beyond the edges count as 0 (as ``uniform_filter(image, 3, mode="constant")`` at
    those pixels, without filtering the whole images): 9 gathers from each image
    padded by one pixel of zeros.
    """
    ny, nx = images[0].shape
    # the centres' flat indices in the padded images, and the boxes' offsets from them
    at = (centres // nx + 1) * (nx + 2) + centres % nx + 1
    offsets = [dy * (nx + 2) + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    means = []
    for image in images:
        padded = xp.pad(image, 1).ravel()
        total = padded[at + offsets[0]]
        for offset in offsets[1:]:
            total += padded[at + offset]
        del padded
        total /= 9.0
        means.append(total)
    return means


class _MaxOfOthers:
    """The largest of the frames' maps within ``size // 2`` px, but for any one frame.

    Streamed: the maps are folded in one at a time (`fold`); `of_others` is then the
    largest value of the other frames' maps, for frame ``j``: the second largest where
    ``j`` holds the largest, the largest elsewhere.
    """

    def __init__(self, acc: ProperCoaddAccumulator, size: int) -> None:
        xp = acc.backend.xp
        self._nd = acc.backend.ndimage
        self._xp = xp
        self.size = size
        self.top = xp.zeros(acc.shape, np.float32)
        self.second = xp.zeros_like(self.top)
        self.owner = xp.full(acc.shape, -1, np.int16)

    def fold(self, index: int, sig: Any, pixels: Any) -> None:
        """Take frame ``index``'s map (non-negative, non-zero at ``pixels`` only) in."""
        if not pixels.size:
            return
        xp = self._xp
        wide = self._widened(sig, pixels)
        higher = wide > self.top
        self.second = xp.where(higher, self.top, xp.maximum(self.second, wide))
        self.top = xp.where(higher, wide, self.top)
        self.owner[higher] = index

    def _widened(self, sig: Any, pixels: Any) -> Any:
        """``maximum_filter(sig, size)``; on the CPU, for a few pixels, window by window.

        The windows of the non-zero pixels are painted in increasing order of their
        value (the same as the filter for a non-negative map: its edge mode reflects
        only pixels already within the window).
        """
        if self._xp is not np or pixels.size > _PAINTED_PIXELS_MAX:
            return self._nd.maximum_filter(sig, self.size)
        values = sig.ravel()[pixels]
        order = np.argsort(values, kind="stable")
        ys, xs = np.divmod(pixels[order], sig.shape[1])
        h = self.size // 2
        wide = np.zeros_like(sig)
        for y, x, value in zip(ys.tolist(), xs.tolist(), values[order].tolist()):
            wide[max(y - h, 0):y + h + 1, max(x - h, 0):x + h + 1] = value
        return wide

    def of_others(self, index: int) -> Any:
        """The largest value of the other frames' maps near each pixel."""
        return self._xp.where(self.owner == index, self.second, self.top)


def _alone(sig: Any, index: int, near: _MaxOfOthers, far: _MaxOfOthers) -> Any:
    """The outliers that frame ``index`` shows alone, and that no other frame's explains.

    Another frame's outlier within ``near.size // 2`` px (``grow + 1``) of at least
    `SUPPORT_RATIO` of the significance makes a pixel real; one within ``far.size // 2``
    px (a PSF stamp) more than ``1 / SUPPORT_RATIO`` times as significant may leak into
    this frame's comparison through the PSFs, and the pixel waits for the next round.
    """
    return ((sig > 0) & (near.of_others(index) < SUPPORT_RATIO * sig)
            & (far.of_others(index) * SUPPORT_RATIO <= sig))


class _Replaced:
    """A frame's replaced pixels (flat indices) and their values, applied on reading."""

    def __init__(self, xp: Any) -> None:
        self.pixels = xp.zeros(0, np.int64)
        self.values = xp.zeros(0)

    def apply(self, image: Any) -> Any:
        """``image`` (on the backend) with the replaced values, a copy when there are any."""
        if not self.pixels.size:
            return image
        image = image.copy()
        image.ravel()[self.pixels] = self.values
        return image

    def extend(self, xp: Any, pixels: Any, values: Any) -> None:
        """Record more replaced pixels (not already replaced ones)."""
        self.pixels = xp.concatenate([self.pixels, pixels])
        self.values = xp.concatenate([self.values, values])


def reject_outliers(
    acc: ProperCoaddAccumulator,
    images: Sequence[np.ndarray],
    variances: Sequence[np.ndarray | None] | None = None,
    *,
    threshold: float = 6.0,
    grow: int = 1,
    model_error: float = 0.1,
    max_rounds: int = 3,
) -> list[np.ndarray]:
    """Replace in ``acc`` the pixels that one frame shows and the others do not.

    See the module docstring. In each round every frame is compared with the others;
    its outliers (grown by ``grow`` pixels) are replaced in the sums by the others'
    prediction (`ProperCoaddAccumulator.frame_prediction`), and the comparison is
    made again with the replaced values (the outliers' light no longer reaches the
    other frames' predictions), until a round finds none or ``max_rounds`` is
    reached.

    Memory does not grow with the number of frames: ``images[j]`` is read when
    needed (once per round, and once more for a frame with outliers), and what is
    kept between frames is a few image-sized maps, each frame's significant pixels
    and replaced values (sparse) and, only where other frames are masked, a bit map
    per frame. Each image read is moved to the accumulator's backend once; the work
    is done there.

    Parameters
    ----------
    acc : ProperCoaddAccumulator
        The accumulator, with every frame added; modified in place.
    images : sequence of ndarray
        The images given to `ProperCoaddAccumulator.add`, in its order (not
        modified): a list, or any sequence that reads the frame when indexed (e.g.
        from a file), so that only one is in memory at a time.
    variances : sequence of ndarray or None, optional
        Their pixel variances (with the sources' noise), indexed the same way;
        default each frame's ``sigma**2``.
    threshold : float, optional
        ``k``: the excess over the prediction, in sigma, that makes an outlier.
    grow : int, optional
        Outliers are grown by this many pixels (a 3x3 step each), and an outlier in
        another frame within ``grow + 1`` pixels makes both real.
    model_error : float, optional
        ``eta``: the fractional error of the prediction (PSF models, flux scales,
        registration), added to the noise in proportion to the predicted light.
    max_rounds : int, optional
        At most this many rounds of comparison.

    Returns
    -------
    list of ndarray of int
        One array per frame: the flat indices (``numpy.ravel_multi_index`` of the
        image shape, ascending) of its replaced outlier pixels.

    Raises
    ------
    ValueError
        For a non-positive threshold or ``max_rounds``, a negative ``grow`` or
        ``model_error``, or not one image per added frame.

    Examples
    --------
    A cosmic ray in one of three frames of a star:

    >>> import numpy as np
    >>> from astro_zackay.coadd_algebra import ProperCoaddAccumulator, reject_outliers
    >>> from astro_zackay.profiles import psf_stamp
    >>> rng = np.random.default_rng(3)
    >>> psf = psf_stamp(15, 3.0)
    >>> star = np.zeros((48, 48)); star[17:32, 17:32] = 5000 * psf
    >>> frames = [star + rng.normal(0, 5, star.shape) for _ in range(3)]
    >>> frames[1][10, 30] += 400.0
    >>> acc = ProperCoaddAccumulator((48, 48), border=15)
    >>> for frame in frames:
    ...     acc.add(frame, psf, sigma=5.0)
    >>> outliers = reject_outliers(acc, frames, grow=0)
    >>> [len(pixels) for pixels in outliers], divmod(int(outliers[1][0]), 48)
    ([0, 1, 0], (10, 30))
    >>> res = acc.finalize()
    >>> bool(abs(res.R[10, 30]) < 4)  # the cosmic ray is gone from the coadd
    True
    """
    if not threshold > 0 or max_rounds < 1:
        raise ValueError(f"threshold and max_rounds must be positive, got {threshold} and "
                         f"{max_rounds}")
    if grow < 0 or model_error < 0:
        raise ValueError(f"grow and model_error must be >= 0, got {grow} and {model_error}")
    if len(images) != acc.n_frames:
        raise ValueError(f"{len(images)} images for {acc.n_frames} added frames")
    be, xp = acc.backend, acc.backend.xp
    replaced = [_Replaced(xp) for _ in range(acc.n_frames)]
    if acc.n_frames >= 2:
        reach = max(max(psf.shape) for psf, *_ in acc._frames) // 2
        blind = [_blind(acc, j, reach) for j in range(acc.n_frames)]
        for round_ in range(max_rounds):
            found = _rejection_round(acc, images, variances, replaced, blind,
                                     threshold=threshold, grow=grow, model_error=model_error,
                                     reach=reach)
            _log.debug("outlier round %d: %d pixels", round_ + 1, found)
            if not found:
                break
    return [np.sort(be.to_numpy(r.pixels)) for r in replaced]


def _rejection_round(
    acc: ProperCoaddAccumulator,
    images: Sequence[np.ndarray],
    variances: Sequence[np.ndarray | None] | None,
    replaced: list[_Replaced],
    blind: list[Any],
    *,
    threshold: float,
    grow: int,
    model_error: float,
    reach: int,
) -> int:
    """One round of `reject_outliers`: every frame compared, then its outliers replaced.

    First pass: each frame's significance map, kept sparse, folded into the maxima of
    the others near and far. Second pass: the frames with outliers alone are read
    again and their outliers replaced. Returns the number of pixels replaced.
    """
    be, xp = acc.backend, acc.backend.xp
    nd = be.ndimage

    def frame(j: int) -> Any:
        return replaced[j].apply(be.asarray(images[j]))

    near = _MaxOfOthers(acc, 2 * (grow + 1) + 1)
    far = _MaxOfOthers(acc, 2 * reach + 1)
    sparse = []
    for j in range(acc.n_frames):
        variance = None if variances is None or variances[j] is None else be.asarray(
            variances[j])
        sig = _significance(acc, j, frame(j), variance, blind[j], threshold, model_error,
                            reach)
        del variance
        pixels = xp.flatnonzero(sig)
        near.fold(j, sig, pixels)
        far.fold(j, sig, pixels)
        sparse.append((pixels, sig.ravel()[pixels]))
        del sig
    step = nd.generate_binary_structure(2, 2)
    found = 0
    for j, (pixels, values) in enumerate(sparse):
        if not pixels.size:
            continue
        sig = xp.zeros(acc.shape, np.float32)
        sig.ravel()[pixels] = values
        alone = _alone(sig, j, near, far)
        del sig
        if not bool(alone.any()):
            continue
        if grow:
            alone = nd.binary_dilation(alone, step, iterations=grow)
        alone &= ~acc._bad(j)
        alone.ravel()[replaced[j].pixels] = False
        image = frame(j)
        prediction = acc._prediction(j, image)
        acc.substitute(j, alone, image, prediction)
        new = xp.flatnonzero(alone)
        replaced[j].extend(xp, new, prediction.ravel()[new])
        found += int(new.size)
    return found
