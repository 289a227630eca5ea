"""Proper coaddition (Zackay & Ofek 2017) of CCDData images: the image-level step.

This module turns each input into arrays, estimates what the user did not give
(background, background noise and PSF in the preparation stage shared with
subtraction, `~astro_zackay._prepare.prepare_image`; the flux scale against the first
image), feeds the frames one at a time to
the streaming array core (`~astro_zackay.coadd_algebra.ProperCoaddAccumulator`) and
wraps the coadd back into `~astropy.nddata.CCDData`.

Streaming design (single pass).  Every input is read, prepared and added before the
next one is read (and released before the next one is read), so a generator is
consumed exactly once and the memory does not grow with the number of frames: the
accumulator (a few half-plane spectra of the FFT grid and one image), the frame in
hand with its temporaries, and the outputs.  The first image is the flux reference
(``F_1 = 1``): unless every flux scale is given, its background-subtracted data,
variance, mask, PSF and stars are kept, and the flux scale of every later image is
measured against it as it arrives (aperture photometry of matched stars,
`~astro_zackay.fluxmatch.match_stars`), so it is known before the image is added with
its weight ``F_j / s_j**2``.

Outlier rejection (the default ``reject``) needs every frame again once all are added
(`~astro_zackay.coadd_algebra.reject_outliers` compares each with the others'
prediction).  As each frame is added, its background-subtracted data (working dtype)
and variance (float32) are written to an anonymous temporary file, deleted when `coadd`
returns; rejection reads them back one frame at a time.  So the memory stays flat in the
number of frames whatever the input (a list, an ImageFileCollection, or a generator
consumed once), at the price of that much temporary disk space (12 bytes a pixel per
frame in float64, 8 in float32) and no re-reading or re-preparing of any input.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.nddata import CCDData, NDData
from astropy.table import Table

from ._ccd import (
    GAIN_KEYS,
    READ_NOISE_KEYS,
    SATURATION_KEYS,
    ImageData,
    _parse_unit,
    as_ccddata,
    check_not_constant,
    match_unit,
    to_ccddata,
    to_image,
)
from ._checks import check_coadd_options, named_errors, per_image_values
from ._checks import is_per_image_gain as _per_image
from ._prepare import PreparedImage, check_image_size, prepare_image
from ._psf_input import ImageWarnings
from ._threads import single_threaded_blas
from ._warnings import AstroZackayWarning, FewStarsWarning, user_stacklevel
from .alignment import align as align_image
from .coadd_algebra import (
    CoaddAlgebraResult,
    ProperCoaddAccumulator,
    reject_outliers,
    working_dtype,
)
from .fluxmatch import match_stars
from .fourier import get_array_module
from .zogy import fit_flux_ratio

__all__ = ["CoaddResult", "coadd"]

log = logging.getLogger(__name__)

#: Matched stars for a flux scale without a FewStarsWarning (fewer still give one).
MIN_SCALE_STARS = 5

#: Header keywords that describe a single exposure and are dropped from the coadd's meta.
_EXPOSURE_KEYS = GAIN_KEYS + READ_NOISE_KEYS + SATURATION_KEYS


@dataclass(frozen=True, repr=False)
class CoaddResult:
    """The outputs of `coadd`, on the pixel grid of the first image.

    Attributes
    ----------
    image : `~astropy.nddata.CCDData`
        The proper coadd R (dimensionless): white background noise of unit variance,
        PSF `psf`, flux zero point `flux_scale`. Where frames were masked, R is
        rescaled to unit noise (its local zero point is then
        ``flux_scale * sqrt(depth)``). Its uncertainty includes the sources' own
        noise, from the inputs' variance (uncertainty, or the estimate of
        `~astro_zackay._ccd.to_image`): 1 on the background, more near bright
        sources (a pointwise approximation, exact for identical Gaussian-like PSFs
        and otherwise low by up to about 20-30 % in variance at the peaks of bright
        stars when the seeing differs by a factor 2; see
        `~astro_zackay.coadd_algebra`).
    score : `~astropy.nddata.CCDData`
        The score S (the matched filter of the stack, ``flux_scale * R ⊛ psf`` where
        no frame is masked), in the inverse of the input unit; its uncertainty is
        ``sqrt(G)``, the local depth, so ``score / uncertainty`` is the S/N of a point
        source (`snr`) and ``score / uncertainty**2`` its flux. This uncertainty is
        the background noise only (the S/N of detection).
    calibrated : `~astropy.nddata.CCDData`
        The flux-calibrated coadd ``R / (flux_scale * sqrt(depth))`` in the unit
        (and flux scale) of the first image, with PSF `psf`; its uncertainty is that
        of `image` divided by ``flux_scale * sqrt(depth)``: ``1 / flux_scale`` on the
        background where no frame is masked, more near bright sources. This is the
        image to use as the reference of `~astro_zackay.subtraction.subtract`, whose
        source-noise term reads this uncertainty.
    psf : `~numpy.ndarray`
        P_R, the PSF of `image` and `calibrated`: a unit-sum, odd-sized stamp.
    flux_scale : float
        F_R = ``sqrt(sum_j F_j**2 / s_j**2)``, in the inverse of the input unit.
    frames : `~astropy.table.Table`
        One row per input image: ``name`` (the file name, else ``image <j>``),
        ``flux_scale`` (F_j, flux ratio to the first image unless given),
        ``flux_scale_err`` (0 when given), ``sigma`` (s_j, background noise in the
        input unit), ``weight`` (F_j / s_j**2, the weight of the image's matched
        filter in S), ``depth_share`` (the image's fraction of the squared S/N of a
        point source, ``F_j**2/s_j**2 sum(P_j**2) / sum_k ...``), ``n_masked`` and
        ``n_rejected`` (its pixels rejected as outliers).
    depth : `~numpy.ndarray`
        G / G_full: the fraction of the full squared S/N reached at each pixel
        (1 where no frame is masked, smaller near masked pixels and image edges).
    n_used : `~numpy.ndarray`
        The number of images not masked at each pixel; pixels with 0 are masked in
        every output.
    rejected : `~numpy.ndarray`
        The number of images whose pixel was rejected as an outlier (``reject`` of
        `coadd`: replaced by the other images' prediction), per pixel; all 0 without
        rejection.
    snr_full : float
        The S/N of a point source of unit flux (first-image units) where no frame
        is masked: ``sqrt(sum_j F_j**2/s_j**2 sum(P_j**2))``.
    """

    image: CCDData
    score: CCDData
    calibrated: CCDData
    psf: np.ndarray
    flux_scale: float
    frames: Table
    depth: np.ndarray
    n_used: np.ndarray
    rejected: np.ndarray
    snr_full: float

    @property
    def weights(self) -> np.ndarray:
        """The weight ``F_j / s_j**2`` of each image (the ``weight`` column of `frames`)."""
        return np.asarray(self.frames["weight"])

    @property
    def snr(self) -> CCDData:
        """Point-source S/N map ``score / sqrt(G)`` (dimensionless; 0 where masked)."""
        sigma = self.score.uncertainty.array
        mask = self.score.mask
        data = np.where(mask, 0.0, self.score.data / np.where(mask | (sigma == 0), 1.0, sigma))
        return CCDData(data, unit=u.dimensionless_unscaled, mask=mask.copy(),
                       wcs=self.score.wcs, meta=self.score.meta.copy())

    def write(
        self,
        path: str | os.PathLike,
        *,
        inputs: Sequence[Any] = (),
        parameters: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        """Write the coadd, its PSF, score and depth to one FITS file.

        The file's primary image is `calibrated` with its uncertainty, so it can be
        given as the reference of `~astro_zackay.subtract` as it is; see
        `astro_zackay.files.write_coadd` for its extensions and headers, and
        `astro_zackay.files.read_coadd` to read the whole result back.

        Parameters
        ----------
        path : str or path-like
            The FITS file to write.
        inputs : sequence of str or path-like, optional
            The input files recorded in the header (default: the ``name`` column of
            `frames`).
        parameters : mapping, optional
            The options of the coadd, recorded as ``name=value``.
        overwrite : bool, optional
            Replace an existing file.
        """
        from .files import write_coadd

        write_coadd(self, path, inputs=inputs, parameters=parameters, overwrite=overwrite)

    def __repr__(self) -> str:
        ny, nx = self.image.shape
        return (
            f"<CoaddResult {ny}x{nx} n_frames={len(self.frames)} "
            f"unit={self.calibrated.unit} flux_scale={self.flux_scale:.6g} "
            f"snr_full={self.snr_full:.6g} psf={self.psf.shape[0]}x{self.psf.shape[1]} "
            f"masked={int(self.image.mask.sum())}>"
        )


def _iter_inputs(images: Any) -> Iterator[tuple[Any, str, Any]]:
    """Yield ``(item, name, hdu)`` for each input image."""
    if hasattr(images, "files_filtered") and hasattr(images, "location"):  # ImageFileCollection
        for path in images.files_filtered(include_path=True):
            yield path, os.path.basename(path), images.ext
        return
    if isinstance(images, CCDData | np.ndarray | str | os.PathLike | fits.HDUList):
        raise TypeError(
            f"images must be an iterable of images (a list, a generator or a ccdproc "
            f"ImageFileCollection), got a single {type(images).__name__}"
        )
    if not isinstance(images, Iterable):
        raise TypeError(
            f"images must be a list, a generator or a ccdproc ImageFileCollection, "
            f"got {type(images).__name__}"
        )
    for j, item in enumerate(images):
        yield item, _input_name(item, j), None


_EMPTY = ("images is empty: coadd needs at least one image (a list, a generator or an "
          "ImageFileCollection that yields one)")


def _check_shapes(images: Any) -> list[tuple[str, tuple[int, ...] | None]]:
    """Images of a list or an ImageFileCollection must share one shape, checked first.

    Returns ``(name, shape or None)`` of each image, in order (empty for a generator).

    The shapes of arrays and NDData are read from the objects, those of FITS files and
    HDUs from their headers (``NAXIS1``/``NAXIS2`` of the image HDU that would be read),
    so a stack of files of mixed shapes is refused before any image is read or prepared.
    Inputs whose shape cannot be known without reading them (a file that is missing or
    unreadable, or holds no image: its reader names it) are left to `_check_like`, and
    so is a generator, which can be consumed only once.
    """
    if isinstance(images, list | tuple):
        items = [(item, _input_name(item, j), None) for j, item in enumerate(images)]
    elif hasattr(images, "files_filtered") and hasattr(images, "location"):
        items = list(_iter_inputs(images))
    else:
        return []
    shapes = [(name, _known_shape(item, hdu)) for item, name, hdu in items]
    known = [(name, shape) for name, shape in shapes if shape is not None]
    if len({shape for _, shape in known}) < 2:
        return shapes
    first = known[0][1]
    listed = known if len(known) <= 8 else [known[0]] + [k for k in known if k[1] != first][:7]
    text = ", ".join(f"{name} {shape}" for name, shape in listed)
    raise ValueError(f"images must be registered frames of one shape, got {text}: "
                     "crop or resample them to one grid, or pass align=True")


def _input_name(item: Any, j: int) -> str:
    """How an input image is named in messages: its file name, else ``image <j>``."""
    return os.path.basename(item) if isinstance(item, str | os.PathLike) else f"image {j}"


def _known_shape(item: Any, hdu: int | str | None) -> tuple[int, ...] | None:
    """The shape of an input image, known without reading its pixels, or None."""
    if isinstance(item, np.ndarray | NDData | u.Quantity):
        return tuple(np.shape(getattr(item, "data", item)))
    if isinstance(item, str | os.PathLike):
        return _fits_shape(item, hdu)
    if isinstance(item, fits.HDUList):
        return _header_shape([h.header for h in item if h.is_image])
    if isinstance(item, fits.PrimaryHDU | fits.ImageHDU):
        return _header_shape([item.header])
    return None


def _header_shape(headers: Sequence[fits.Header]) -> tuple[int, ...] | None:
    """The image shape of the first header with data (``NAXIS`` > 0), or None."""
    for header in headers:
        naxis = int(header.get("NAXIS", 0))
        if naxis > 0:
            return tuple(int(header[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
    return None


def _fits_shape(path: str | os.PathLike, hdu: int | str | None) -> tuple[int, ...] | None:
    """The image shape in a FITS file's header (HDU ``hdu``, else the first with data).

    None for a file that cannot be opened: reading it later raises the error that
    names what is wrong with it.
    """
    if os.path.isdir(path) or not os.path.isfile(path):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a damaged file is reported when it is read
            with fits.open(path, memmap=False) as hdul:
                if hdu is not None:
                    return _header_shape([hdul[hdu].header])
                return _header_shape([h.header for h in hdul if h.is_image])
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None


class _PerImage:
    """A per-image option given as a sequence, consumed in step with the images."""

    def __init__(self, values: Any, name: str) -> None:
        self.name = name
        self.given = values is not None
        if self.given:
            self._values = per_image_values(values, name)
        self._n = 0

    def peek(self, j: int) -> Any:
        """Entry ``j`` (None when not given or beyond the entries), not consumed."""
        return self._values[j] if self.given and j < len(self._values) else None

    def next(self) -> Any:
        if not self.given:
            return None
        if self._n >= len(self._values):
            raise ValueError(
                f"{self.name} has {len(self._values)} entries but there are more images"
            )
        self._n += 1
        return self._values[self._n - 1]

    def check_exhausted(self, n_images: int) -> None:
        if self.given and len(self._values) != n_images:
            raise ValueError(
                f"{self.name} has {len(self._values)} entries for {n_images} images: give "
                "one per image, in the order of the images"
            )


def _check_like(
    img: ImageData, first: tuple[u.UnitBase, tuple[int, int]], name: str, gain: Any
) -> ImageData:
    """``img`` in the first image's unit (through ``gain`` if needed), of its shape.

    ``first`` is the first image's ``(unit, shape)``.
    """
    unit, shape = first
    if img.unit != unit:
        img = match_unit(img, unit, gain=gain, name=name, target="first image")
    if img.shape != shape:
        raise ValueError(
            f"{name} has shape {img.shape} but the first image has {shape}: give "
            "registered images of one shape, or pass align=True"
        )
    return img


def _output_template(first: ImageData) -> ImageData:
    """The first image's unit, shape, WCS and meta (less the keywords of one exposure).

    Its arrays are zero-stride views, so it holds no frame-sized memory.
    """
    meta = first.meta.copy()
    for key in _EXPOSURE_KEYS:
        if key in meta:
            del meta[key]
    return replace(first, data=np.broadcast_to(first.data.dtype.type(0), first.shape),
                   variance=np.broadcast_to(first.variance.dtype.type(0), first.shape),
                   mask=np.broadcast_to(False, first.shape), meta=meta)


@single_threaded_blas
def coadd(
    images: Any,
    *,
    psfs: Any = None,
    flux_scales: Any = None,
    sigmas: Any = None,
    align: Literal["stars", "wcs"] | bool = False,
    unit: Any = None,
    saturation: Any = None,
    border: int | None = None,
    min_depth_fraction: float = 1e-3,
    dtype: type = np.float32,
    gain: Any = None,
    reject: float | None = 6.0,
    reject_grow: int = 1,
    reject_model_error: float = 0.1,
    backend: str = "numpy",
) -> CoaddResult:
    """Proper coaddition of registered images (Zackay & Ofek 2017).

    With background-subtracted images ``M_j``, PSFs ``P_j``, background noise
    ``s_j`` and flux scales ``F_j`` (``M_j = F_j * sky ⊛ P_j + noise``)::

        R_h = sum_j (F_j/s_j**2) conj(Pj_h) Mj_h / sqrt(sum_j F_j**2/s_j**2 |Pj_h|**2)

    R has white noise of unit variance and is a sufficient statistic of the stack
    for any measurement: no information is lost, whatever the seeing of each image,
    and a point source of flux f has the S/N ``f * sqrt(sum_j F_j**2/s_j**2
    sum(P_j**2))``, more than any weighted mean can give when the PSFs differ.

    The images are processed one at a time, in a single pass (a generator is
    consumed once; memory does not grow with the number of images):

    1. read through the CCDData boundary (mask, NaN, saturated pixels; with
       ``align``, resampled onto the first image's grid by
       `~astro_zackay.alignment.align`);
    2. background: `~astro_zackay.background.estimate_background`, subtracted;
    3. background noise ``s_j``: the median of the input uncertainty over unmasked
       background pixels (less than 3 background rms above the sky), or, for
       images without uncertainty, the median of the background rms map;
    4. PSF: ``psfs[j]`` or `~astro_zackay.psf.estimate_psf` on the stars of
       `~astro_zackay.stars.find_psf_stars` (found once per image, for the PSF and
       the flux scale), evaluated at the image centre (one PSF per image: a PSF
       that varies across the field is averaged out to its central value);
       `~astro_zackay.psf.estimate_psf` chooses the model from the usable stars
       (down to a Moffat profile fitted to 1-3 stars), each step down announced
       with a `~astro_zackay._warnings.FewStarsWarning` that names the image;
    5. flux scale: ``flux_scales[j]``, or 1 for the first image and, for each later
       image, the flux ratio to the first one from aperture photometry of the stars
       matched between them (`~astro_zackay.fluxmatch.match_stars`: clipped, so
       robust to variable stars, and free of PSF-model errors); with fewer than 5
       matched stars a FewStarsWarning says so, and with none the ratio comes from
       a ZOGY pixel fit through the PSFs (`~astro_zackay.zogy.fit_flux_ratio`);
    6. added to `~astro_zackay.coadd_algebra.ProperCoaddAccumulator` with its
       per-pixel variance (for the source noise in the outputs' uncertainties),
       masked and NaN pixels excluded;
    7. with ``reject`` (the default), outliers: once every image is added, each
       image is compared with what the others predict at the same place through
       their PSFs and flux scales (`~astro_zackay.coadd_algebra.reject_outliers`: a
       ZOGY difference of the image against the proper coadd of the others, white
       with unit noise), and its pixels more than ``reject`` sigma above the
       prediction (pixel by pixel, and in 3x3 boxes for faint trails; the noise
       including the sources' own and ``reject_model_error`` times the predicted
       light) are replaced, in that image only and grown by ``reject_grow`` pixels,
       by the others' prediction, unless another image has an outlier there too
       (what several images show is real: a transient, a variable star, a PSF model
       off in several images; what one image shows is not: a cosmic ray, a
       satellite trail, a hot pixel). Pixels next to the other images' masked
       pixels (e.g. saturated cores) are left alone, and only positive excesses are
       rejected. For this second look, each image's background-subtracted data and
       variance are written to a temporary file as it is added (12 bytes a pixel
       per image in float64, 8 in float32; deleted on return) and read back one at
       a time, so memory does not grow with the number of images either way.

    Masked pixels.  A pixel masked in some images gets the estimate of the others:
    the depth G (the squared S/N reached there) is recorded in ``depth`` and the
    outputs are normalised with it. Pixels masked in every image, and pixels where
    the depth is below ``min_depth_fraction`` of the full depth, are masked.

    Parameters
    ----------
    images : iterable or `ccdproc.ImageFileCollection`
        The images: a list or generator of anything the CCDData boundary accepts
        (`~astropy.nddata.CCDData`, `~astropy.nddata.NDData`, FITS path or HDU,
        array with ``unit=``), or an ImageFileCollection (its filtered files,
        HDU ``collection.ext``). Of one shape unless ``align``; images in another
        unit than the first are converted to it (see ``gain``).
    psfs : sequence or iterator, optional
        One PSF per image: a `~astro_zackay.psf.KLPSFModel`, an astropy/photutils
        model, an odd-sized stamp, or a FWHM in pixels (a Gaussian PSF). Default:
        estimated from each image's stars.
    flux_scales : sequence or iterator of float, optional
        One flux scale ``F_j`` per image (flux ratios, not magnitudes: 0.5 for an
        image recording half the counts of a star). Default: fitted against the
        first image, whose scale is 1.
    sigmas : sequence or iterator of float or `~astropy.units.Quantity`, optional
        One background noise ``s_j`` per image, in the image unit. Default: from
        the uncertainty or the data (step 3 above).
    align : {'stars', 'wcs'} or bool, optional
        Resample every image onto the first image's grid (True means 'stars').
    unit : str or `~astropy.units.Unit`, optional
        The unit of inputs without one (arrays, FITS files without BUNIT).
    saturation : float or `~astropy.units.Quantity`, optional
        Pixels at or above this level are masked; default each image's SATURATE
        keyword.
    border : int, optional
        Zero padding of the FFT grid on each side, so that sources at one edge do
        not wrap around to the other; default the size of the first PSF stamp.
    min_depth_fraction : float, optional
        Pixels whose depth is below this fraction of the full depth are masked.
    dtype : {numpy.float32, numpy.float64}, optional
        Working precision of the images and their transforms (the PSF sums are kept in
        float64 either way). float32, the default, halves the memory and the time of the
        image-sized algebra; its round-off (about 1e-7 of the brightest pixel, against
        noise of at least 1e-3 of it) does not change any measurement.
    gain : float, `~astropy.units.Quantity` or sequence, optional
        Electrons per ADU, one value for every image or one per image; default each
        image's GAIN (or EGAIN) keyword. It converts an image whose unit differs from
        the first image's (electrons and ADU) to that unit, and gives the sources'
        Poisson noise of images without uncertainty.
    reject : float or None, optional
        Threshold, in sigma, of the per-pixel outlier rejection across images (step
        7); None turns it off.
    reject_grow : int, optional
        Pixels by which each image's outliers are grown before they are rejected.
    reject_model_error : float, optional
        Fractional error of the other images' prediction (PSF models, flux scales,
        registration), added to the noise of the comparison so that the cores of
        bright stars are not rejected for PSF differences.
    backend : {"numpy", "cupy"}, optional
        Array backend of the coaddition's sums and transforms, and of the outlier
        rejection: with ``"cupy"`` each prepared image is moved to the GPU once; each
        rejection round moves every frame's image and variance there again, and the
        image once more for every frame with outliers to replace; the outputs come
        back once. The preparation of each image (background, stars, PSF) runs on the
        CPU. Needs CuPy (``pip install cupy-cuda12x``).

    Returns
    -------
    CoaddResult
        R (``image``), the score S, the flux-calibrated coadd, the PSF P_R, the zero
        point F_R, the per-image table and the depth map. The first image's WCS
        and a copy of its meta (less GAIN, RDNOISE and SATURATE, which describe
        one exposure) are carried; ``meta`` records ``AZCOADD`` and ``NCOMBINE``.

    Raises
    ------
    ValueError
        For no images, images of different shapes (without ``align``), per-image
        options of the wrong length, an image with no usable PSF star and no
        ``psfs`` entry (the message names the image), a flux scale that cannot
        be fitted, bad rejection options, an unknown ``backend``, a
        ``min_depth_fraction`` outside [0, 1], a negative ``border``, a non-positive
        flux scale or sigma, or a FWHM of ``psfs`` whose stamp is larger than its
        image. Everything that can be checked without reading an image
        is checked before any image is read: the options
        (`~astro_zackay._checks.check_coadd_options`), the number of images of a list, and
        the shapes of a list's or an ImageFileCollection's images (arrays,
        NDData and HDUs from the objects, FITS files from their headers; the message
        names the images and their shapes).
    ImportError
        For ``backend="cupy"`` without CuPy (the message names the pip package).
    astropy.units.UnitsError
        For an image whose unit cannot be converted to the first image's (electrons
        and ADU without a gain: the message names both units and ``gain=``).
    TypeError
        For inputs that are not iterables of images (a dict among them), a per-image
        option given as one value, or a ``dtype`` other than float32 and float64.

    Warns
    -----
    FewStarsWarning
        Once per image and step down of its PSF model, and for a flux scale from
        fewer than 5 matched stars or from the pixel fit.
    SaturationWarning
        Once per image whose saturation level was found in the data.

    Each warning about one image starts with its name (the file name, else
    ``"image <j>"``).

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.nddata import CCDData, StdDevUncertainty
    >>> from astro_zackay.coaddition import coadd
    >>> from astro_zackay.profiles import psf_stamp
    >>> rng = np.random.default_rng(0)
    >>> frames = [CCDData(rng.normal(0.0, s, (64, 64)), unit="electron",
    ...                   uncertainty=StdDevUncertainty(np.full((64, 64), s)))
    ...           for s in (1.0, 2.0, 3.0)]
    >>> psfs = [psf_stamp(15, fwhm) for fwhm in (2.5, 3.0, 4.0)]
    >>> result = coadd(frames, psfs=psfs, flux_scales=[1.0, 1.0, 1.0])
    >>> result
    <CoaddResult 64x64 n_frames=3 unit=electron flux_scale=1.16667 snr_full=0.283789
     psf=15x15 masked=0>
    >>> round(float(result.psf.sum()), 12), result.weights.round(3).tolist()
    (1.0, [1.0, 0.25, 0.111])

    A cosmic ray of 50 sigma in the second image is replaced by what the others
    predict there (the pixel, grown by one):

    >>> frames[1].data[30, 30] += 100.0
    >>> result = coadd(frames, psfs=psfs, flux_scales=[1.0, 1.0, 1.0])
    >>> result.frames["n_rejected"].tolist(), int(result.rejected[30, 30])
    ([0, 9, 0], 1)
    """
    if isinstance(images, Mapping):
        raise TypeError(
            f"images must be a list, a generator or a ccdproc ImageFileCollection, got a "
            f"{type(images).__name__} (its keys would be read as images): give "
            f"list(images.values())"
        )
    # a per-image option given as an iterator is read once, here: the checks and the
    # images' loop both go through it
    psfs, flux_scales, sigmas, gain = (
        list(values) if isinstance(values, Iterator) else values
        for values in (psfs, flux_scales, sigmas, gain)
    )
    names = ([_input_name(item, j) for j, item in enumerate(images)]
             if isinstance(images, list | tuple) else None)
    check_coadd_options(
        image_names=names, psfs=psfs, flux_scales=flux_scales, sigmas=sigmas, align=align,
        unit=unit, saturation=saturation, border=border, min_depth_fraction=min_depth_fraction,
        dtype=dtype, gain=gain, reject=reject, reject_grow=reject_grow,
        reject_model_error=reject_model_error, backend=backend,
    )
    dtype = working_dtype(dtype)
    unit = _parse_unit(unit)
    be = get_array_module(backend)
    method = "stars" if align is True else align
    rejection = (None if reject is None or reject is False else
                 {"threshold": float(reject), "grow": int(reject_grow),
                  "model_error": float(reject_model_error)})
    # what depends on the images: their shapes, sizes and number, before any is read
    shapes = [] if align else _check_shapes(images)
    psf_list = _PerImage(psfs, "psfs")
    scale_list = _PerImage(flux_scales, "flux_scales")
    sigma_list = _PerImage(sigmas, "sigmas")
    gain_list = _PerImage(gain, "gain") if _per_image(gain) else None
    for j, (name, shape) in enumerate(shapes):  # too small for a background or its PSF
        if shape is not None and len(shape) == 2:
            check_image_size(shape, psf_list.peek(j), name, "psfs=")
    if isinstance(images, list | tuple):  # the counts, when known before reading
        if not images:
            raise ValueError(_EMPTY)
        for option in (psf_list, scale_list, sigma_list, gain_list):
            if option is not None:
                option.check_exhausted(len(images))

    acc = None
    rows = []
    with _FrameFile() as spilled:  # read back only to reject outliers
        for frame, stamp, f, f_err in _prepared_frames(
            images, psf_list=psf_list, scale_list=scale_list, sigma_list=sigma_list, gain=gain,
            gain_list=gain_list, method=method, unit=unit, saturation=saturation, dtype=dtype,
        ):
            img = frame.image
            if acc is None:
                template = _output_template(img)
                acc = ProperCoaddAccumulator(
                    img.shape, border=max(stamp.shape) if border is None else int(border),
                    dtype=dtype, backend=be,
                )
            acc.add(img.data, stamp, frame.sigma, f, mask=img.mask, variance=img.variance)
            if rejection is not None:
                spilled.append(img.data, img.variance.astype(np.float32))
            rows.append((frame.name, f, f_err, frame.sigma, f / frame.sigma**2,
                         f**2 / frame.sigma**2 * float((stamp**2).sum()), int(img.mask.sum())))
            log.info("%s: flux scale %.6g +- %.2g, sigma %.6g, PSF stamp %s, %d masked pixels",
                     frame.name, f, f_err, frame.sigma, stamp.shape, rows[-1][-1])
            del img, frame, stamp  # released before the next image is read
        if acc is None:
            raise ValueError(_EMPTY)
        for option in (psf_list, scale_list, sigma_list, gain_list):
            if option is not None:
                option.check_exhausted(len(rows))
        frames = Table(rows=rows, names=("name", "flux_scale", "flux_scale_err", "sigma",
                                         "weight", "depth_share", "n_masked"))
        frames["depth_share"] /= frames["depth_share"].sum()
        rejected = _reject_outliers(acc, spilled, rejection, frames)
    res = acc.finalize(min_depth_fraction=min_depth_fraction)
    del acc  # its spectra are not needed to wrap the outputs
    _warn_if_all_masked(res.mask | (res.n_used == 0), min_depth_fraction)
    return _wrap(res, template, frames, rejected)


def _warn_if_all_masked(mask: np.ndarray, min_depth_fraction: float) -> None:
    """Warn when no pixel of the coadd is left unmasked."""
    if mask.all():
        warnings.warn(
            f"every pixel of the coadd is masked (min_depth_fraction={min_depth_fraction:g}): "
            "the frames' masks leave no pixel deep enough; lower min_depth_fraction or check "
            "the masks", AstroZackayWarning, stacklevel=user_stacklevel())


def _prepared_frames(
    images: Any,
    *,
    psf_list: _PerImage,
    scale_list: _PerImage,
    sigma_list: _PerImage,
    gain: Any,
    gain_list: _PerImage | None,
    method: str | bool,
    unit: Any,
    saturation: Any,
    dtype: type,
) -> Iterator[tuple[PreparedImage, np.ndarray, float, float]]:
    """Read, check, align and prepare each image in turn, with its flux scale.

    Yields ``(prepared image, PSF stamp at its centre, F_j, error of F_j)``; the first
    image (and, unless every flux scale is given, its prepared self, for the flux
    scales of the others) is kept, every other one is released before the next one
    is read.
    """
    first: tuple[u.UnitBase, tuple[int, int]] | None = None  # the first image's unit, shape
    reference: tuple[PreparedImage, np.ndarray] | None = None  # for the flux scales
    target: CCDData | None = None  # for the alignment
    for j, (item, name, hdu) in enumerate(_iter_inputs(images)):
        given = scale_list.next()
        frame_gain = gain if gain_list is None else gain_list.next()
        with ImageWarnings(name):
            if method and target is not None:
                item = align_image(item, target, method=method, unit=unit,
                                   saturation=saturation)
            with named_errors(name):
                img = to_image(item, unit=unit, gain=frame_gain, saturation=saturation,
                               hdu=hdu, dtype=dtype)
            del item
            if first is not None:
                img = _check_like(img, first, name, frame_gain)
            else:
                first = (img.unit, img.shape)
                if method:
                    target = as_ccddata(replace(img, data=img.data.copy()))
            psf = psf_list.next()
            check_not_constant(img, name)
            frame = prepare_image(img, psf, name=name, option="psfs=",
                                  need_stars=given is None, sigma=sigma_list.next())
            del img
            stamp = frame.psf_stamp()
            if given is not None:
                f, f_err = float(given), 0.0
            elif j == 0:
                f, f_err = 1.0, 0.0
                reference = (frame, stamp)
            else:
                f, f_err = _fit_scale(frame, stamp, reference)
        yield frame, stamp, f, f_err
        del frame, stamp


class _FrameFile:
    """Arrays of each frame written to an anonymous temporary file, read back one at a time.

    A context manager: the file (opened at the first `append`) is deleted on exit.
    """

    def __init__(self) -> None:
        self._file: Any = None
        self._frames: list[list[tuple[int, np.dtype, tuple[int, ...]]]] = []

    def __enter__(self) -> _FrameFile:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._file is not None:
            self._file.close()

    def __len__(self) -> int:
        return len(self._frames)

    def append(self, *arrays: np.ndarray) -> None:
        """Write one frame's arrays at the end of the file."""
        if self._file is None:
            # closed (and so deleted) by __exit__
            self._file = tempfile.TemporaryFile(prefix="astro_zackay_coadd_")  # noqa: SIM115
        self._file.seek(0, os.SEEK_END)
        where = []
        for arr in arrays:
            arr = np.ascontiguousarray(arr)
            where.append((self._file.tell(), arr.dtype, arr.shape))
            arr.tofile(self._file)
        self._frames.append(where)

    def read(self, index: int, field: int) -> np.ndarray:
        """Array ``field`` of frame ``index``, read from the file."""
        offset, dtype, shape = self._frames[index][field]
        self._file.seek(offset)
        return np.fromfile(self._file, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def field(self, field: int) -> _FrameField:
        """A sequence view of one array of every frame (read when indexed)."""
        return _FrameField(self, field)


class _FrameField(Sequence):
    """One array of every frame of a `_FrameFile`, read from the file when indexed."""

    def __init__(self, frames: _FrameFile, field: int) -> None:
        self._frames = frames
        self._field = field

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return self._frames.read(index, self._field)


def _reject_outliers(
    acc: ProperCoaddAccumulator,
    frames_file: _FrameFile,
    rejection: dict[str, float] | None,
    frames: Table,
) -> np.ndarray:
    """Find and replace each frame's outliers; their count per pixel and per frame.

    The frames' data and variances are read back from ``frames_file`` one at a time.
    Adds the ``n_rejected`` column to ``frames`` (0 without rejection).
    """
    rejected = np.zeros(acc.shape, np.int16)
    frames["n_rejected"] = 0
    if rejection is None:
        return rejected
    outliers = reject_outliers(acc, frames_file.field(0), frames_file.field(1), **rejection)
    flat = rejected.ravel()
    for j, pixels in enumerate(outliers):
        frames["n_rejected"][j] = pixels.size
        flat[pixels] += 1
        if pixels.size:
            log.info("%s: %d outlier pixels rejected", frames["name"][j], pixels.size)
    return rejected


def _fit_scale(
    frame: PreparedImage, stamp: np.ndarray, first: tuple[PreparedImage, np.ndarray] | None
) -> tuple[float, float]:
    """Flux ratio of ``frame`` to the first image: matched stars, else a pixel fit.

    Aperture photometry of the stars matched between them
    (`~astro_zackay.fluxmatch.match_stars` with images) needs no PSF model; a pixel
    fit through the estimated PSFs (`~astro_zackay.zogy.fit_flux_ratio`) inherits
    their errors (1-14 % measured), so it serves only when no star matches. Fewer
    than `MIN_SCALE_STARS` matched stars, or the pixel fit, are announced with a
    `~astro_zackay._warnings.FewStarsWarning`.
    """
    if first is None:
        raise ValueError(
            f"{frame.name}: the flux scale is measured against the first image, whose flux "
            "scale was given: pass flux_scales= for every image"
        )
    ref, ref_stamp = first
    reason = "no stars were found in this image or the first one"
    if frame.stars is not None and ref.stars is not None:
        try:
            match = match_stars(ref.stars, frame.stars, radius=2.0, min_matches=1,
                                images=(ref.image, frame.image), psfs=(ref_stamp, stamp))
        except ValueError as exc:
            reason = str(exc)
        else:
            if match.n_matched < MIN_SCALE_STARS:
                warnings.warn(
                    f"the flux scale comes from only {match.n_matched} star(s) matched with "
                    f"the first image ({MIN_SCALE_STARS} wanted)", FewStarsWarning,
                    stacklevel=user_stacklevel(),
                )
            return match.flux_ratio, match.flux_ratio_error
    try:
        fit = fit_flux_ratio(frame.data, ref.data, stamp, ref_stamp,
                             sigma_new=frame.sigma, sigma_ref=ref.sigma,
                             mask=frame.image.mask | ref.image.mask)
        if not (np.isfinite(fit.beta) and fit.beta > 0):
            raise ValueError(f"it gives {fit.beta:.4g}: the images share no bright source")
    except ValueError as exc:
        raise ValueError(
            f"{frame.name}: the flux scale relative to the first image could not be measured "
            f"({reason}; the pixel fit: {exc}); pass flux_scales= explicitly"
        ) from None
    warnings.warn(
        f"no star matches the first image ({reason}): the flux scale {fit.beta:.4g} comes from "
        "a pixel fit through the PSFs", FewStarsWarning, stacklevel=user_stacklevel(),
    )
    return fit.beta, fit.beta_err


def _wrap(
    res: CoaddAlgebraResult, template: ImageData, frames: Table, rejected: np.ndarray
) -> CoaddResult:
    """Wrap the arrays of the finalized accumulator into CCDData."""
    mask = res.mask | (res.n_used == 0)
    frac = res.depth / res.depth_full
    text = (f"proper coadd (Zackay & Ofek 2017) of {res.n_frames} images, "
            f"F_R={res.F_R:.6g}")
    meta = {"NCOMBINE": res.n_frames}
    score = to_ccddata(res.S, template, unit=template.unit**-1, variance=res.depth, mask=mask,
                       step=("AZCOADD", text + ", score image S"), extra_meta=meta)
    image = to_ccddata(res.R, template, unit=u.dimensionless_unscaled,
                       variance=res.R_variance, mask=mask, step=("AZCOADD", text),
                       extra_meta=meta)
    # calibrated = R / local_scale, local_scale = F_R sqrt(depth / depth_full); in place
    inv_scale = np.where(res.mask, 1.0, frac)
    np.sqrt(inv_scale, out=inv_scale)
    inv_scale *= res.F_R
    np.divide(1.0, inv_scale, out=inv_scale)
    calibrated_variance = res.R_variance * inv_scale
    calibrated_variance *= inv_scale
    calibrated_variance[res.mask] = np.inf
    calibrated_data = inv_scale.astype(res.R.dtype, copy=False)
    calibrated_data *= res.R
    calibrated = to_ccddata(calibrated_data, template, variance=calibrated_variance,
                            mask=mask, step=("AZCOADD", text + ", divided by F_R"),
                            extra_meta=meta)
    return CoaddResult(
        image=image,
        score=score,
        calibrated=calibrated,
        psf=res.P_R,
        flux_scale=res.F_R,
        frames=frames,
        depth=frac,
        n_used=res.n_used,
        rejected=rejected,
        snr_full=float(np.sqrt(res.depth_full)),
    )
