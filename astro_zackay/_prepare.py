"""Prepare one image for subtraction or coaddition: the stage both pipelines share.

One coerced image (`~astro_zackay._ccd.ImageData`) goes in; out comes a
`PreparedImage`: its background (estimated once), its stars (found once, for the PSF
and the flux matching), its PSF (given, else estimated from those stars), its
background-subtracted data with masked pixels set to 0, its background rms map and
its background noise ``sigma``.

Memory.  The image passed in is owned by the caller, freshly coerced at the
CCDData boundary (`~astro_zackay._ccd.to_image` always copies the input's pixels), so
the background is subtracted in its own data array, in place, once the stars and the
PSF have been measured on the original pixels: no second frame-sized array is made.
The `PreparedImage` holds that same image (its cached sky maps, of the original
pixels, dropped), whose ``data`` is then the background-subtracted one; the caller
must not keep using the original pixels.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy import units as u
from astropy.table import Table

from ._ccd import ImageData
from ._psf_input import PSFSampler, as_psf_sampler, estimate_image_psf, find_image_stars
from ._stats import MAP_LEVEL_SAMPLES, sampled_median
from .background import MIN_BOX_SIZE, _estimate_from

__all__ = ["BACKGROUND_CLIP", "PreparedImage", "check_image_size", "prepare_image"]

log = logging.getLogger(__name__)

#: Pixels brighter than this many background rms above the sky are not background
#: pixels when the noise is taken from the uncertainty (see `prepare_image`).
BACKGROUND_CLIP = 3.0


@dataclass(frozen=True, repr=False)
class PreparedImage:
    """One image made ready for the numerical core.

    Attributes
    ----------
    image : `~astro_zackay._ccd.ImageData`
        The coerced image; its ``data`` is background-subtracted, masked pixels 0
        (the same array as `data`); variance, mask, unit, WCS and meta unchanged; no
        cached sky maps (those were of the original pixels).
    rms : `~numpy.ndarray`
        The background rms map, in the data's dtype.
    sigma : float
        The background noise: the given value, else the median of the variance over
        unmasked background pixels, or of ``rms`` when the variance was estimated.
    psf : `~astro_zackay._psf_input.PSFSampler`
        The PSF (given or estimated), sampled at any position.
    stars : `~astropy.table.Table` or None
        The stars found once (None when not needed, or none found and none required).
    name : str
        The image as the user knows it (for logs and errors).
    """

    image: ImageData
    rms: np.ndarray
    sigma: float
    psf: PSFSampler
    stars: Table | None
    name: str

    @property
    def data(self) -> np.ndarray:
        """The background-subtracted data, masked pixels 0 (``image.data``)."""
        return self.image.data

    def psf_stamp(self) -> np.ndarray:
        """The PSF stamp at the centre of the image."""
        ny, nx = self.image.shape
        return self.psf((nx - 1) / 2.0, (ny - 1) / 2.0)

    def __repr__(self) -> str:
        ny, nx = self.image.shape
        n_stars = "none" if self.stars is None else len(self.stars)
        return (f"<PreparedImage {self.name!r} {ny}x{nx} sigma={self.sigma:.6g} "
                f"stars={n_stars} psf={self.psf.source}>")


def _given_sigma(sigma: Any, unit: u.UnitBase, name: str) -> float:
    """A given background noise as a float in the image unit, checked positive and finite."""
    if isinstance(sigma, u.Quantity):
        try:
            value = float(sigma.to_value(unit))
        except u.UnitsError as exc:
            raise u.UnitConversionError(
                f"{name}: sigma={sigma!r} is not in a unit of the image ({unit}): {exc}"
            ) from None
    else:
        value = float(sigma)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: the background noise must be positive, got {value}")
    return value


def _background_sigma(image: ImageData, rms: np.ndarray) -> float:
    """The median background noise of a background-subtracted image.

    The uncertainty over unmasked pixels less than `BACKGROUND_CLIP` rms above the
    sky; the rms map itself when the variance was estimated from the data, read on a
    regular sample of `~astro_zackay._stats.MAP_LEVEL_SAMPLES` pixels of a large image
    (the map is smooth: a spline through box values).
    """
    good = ~image.mask
    if image.variance_estimated:
        return sampled_median(rms, good, MAP_LEVEL_SAMPLES)
    with np.errstate(invalid="ignore"):
        background = good & (image.data < BACKGROUND_CLIP * rms)
    return float(np.sqrt(np.median(image.variance[background])))


def check_image_size(
    shape: tuple[int, ...], psf: Any, name: str, option: str
) -> PSFSampler | None:
    """Refuse an image too small to prepare, before any work on it.

    An image needs at least one background box (`MIN_BOX_SIZE` px) on each side and
    must hold the stamp of its given PSF (evaluated at the image centre); a given
    varying PSF model must have been fitted on an image that covers it
    (`check_psf_covers_image`).

    Parameters
    ----------
    shape : tuple of int
        The image's shape ``(ny, nx)``.
    psf : any PSF input or None
        The PSF given for the image (`~astro_zackay._psf_input.as_psf_sampler`); None
        when it is to be estimated.
    name : str
        The image as the user knows it ("science image", a file name).
    option : str
        The argument that gives this image's PSF (``"science_psf="``).

    Returns
    -------
    PSFSampler or None
        The given PSF as a sampler; None without one.

    Raises
    ------
    ValueError
        Naming the image, what it is too small for and what to do.

    Examples
    --------
    >>> from astro_zackay._prepare import check_image_size
    >>> check_image_size((64, 64), 3.0, "image 0", "psfs=").source
    'Gaussian of FWHM 3 px'
    >>> try:
    ...     check_image_size((9, 9), 3.0, "image 0", "psfs=")
    ... except ValueError as exc:
    ...     print(str(exc)[:64])
    image 0: its shape (9, 9) is smaller than the PSF stamp (17, 17)
    """
    if min(shape) < MIN_BOX_SIZE:
        raise ValueError(f"{name}: its shape {tuple(shape)} is too small: each side needs at "
                         f"least {MIN_BOX_SIZE} px for a background map; give a larger image")
    if psf is None:
        return None
    check_psf_covers_image(psf, shape, option, name)
    sampler = as_psf_sampler(psf)
    stamp = sampler.shape  # a FWHM's stamp is known before it is built (1e4 px: 50001^2)
    if stamp is None:
        stamp = np.shape(sampler((shape[1] - 1) / 2, (shape[0] - 1) / 2))
    if stamp[0] > shape[0] or stamp[1] > shape[1]:
        raise ValueError(f"{name}: its shape {tuple(shape)} is smaller than the PSF stamp "
                         f"{stamp} of {option}: give a larger image, or a PSF on a smaller "
                         "stamp (a smaller FWHM)")
    return sampler


def check_psf_covers_image(psf: Any, shape: tuple[int, ...], option: str, image: str) -> None:
    """Refuse a varying PSF model fitted on an image that does not cover this one.

    A varying model (a `~astro_zackay.psf.KLPSFModel` with ``is_varying``) is not
    extrapolated beyond the image it was fitted on and its `position_margin`: given for
    a larger image, it would fail deep inside `subtract`, at the first position beyond
    it. This refuses it once the image's shape is known, before any work on the image,
    naming the option (`check_image_size` runs it on every given PSF). A constant PSF
    (and anything that is not such a model) serves any image; a model fitted on a
    larger image covers a smaller one.

    Parameters
    ----------
    psf : any PSF input or None
        The PSF as the user gave it, or its `~astro_zackay._psf_input.PSFSampler` (whose
        ``model`` is then checked).
    shape : tuple of int
        The image's shape ``(ny, nx)``.
    option : str
        The option that gave the PSF (``"science_psf"``; a trailing ``=`` is dropped).
    image : str
        The image as the user knows it (``"science image"``).

    Raises
    ------
    ValueError
        Naming the option, both shapes and what to give instead.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._prepare import check_psf_covers_image
    >>> from astro_zackay.psf import KLPSFModel
    >>> basis = np.zeros((2, 5, 5))
    >>> basis[:, 2, 2] = 1.0
    >>> model = KLPSFModel(basis, [[1.0, 0.0, 0.0], [0.0, 0.1, 0.0]], image_shape=(100, 100),
    ...                    degree=1)
    >>> check_psf_covers_image(model, (100, 105), "science_psf", "science image")
    >>> try:
    ...     check_psf_covers_image(model, (256, 256), "science_psf", "science image")
    ... except ValueError as exc:
    ...     print(str(exc)[:90])
    science_psf: the KLPSFModel was fitted on a 100x100 image but the science image is 256x256
    """
    if isinstance(psf, PSFSampler):
        psf = psf.model
    if not (bool(getattr(psf, "is_varying", False)) and hasattr(psf, "image_shape")
            and hasattr(psf, "position_margin")):
        return
    option = option.rstrip("=")
    (fit_y, fit_x), (ny, nx) = psf.image_shape, shape[-2:]
    margin_x, margin_y = psf.position_margin
    if nx - 1 <= fit_x - 1 + margin_x and ny - 1 <= fit_y - 1 + margin_y:
        return
    raise ValueError(
        f"{option}: the {type(psf).__name__} was fitted on a {fit_y}x{fit_x} image but the "
        f"{image} is {ny}x{nx}; a varying PSF model is not extrapolated beyond the image it "
        f"was fitted on (and a margin of {margin_x:g} x {margin_y:g} px). Estimate the PSF "
        f"on the {image} (astro_zackay.psf.estimate_psf), or leave {option}=None to have "
        "it estimated there"
    )


def prepare_image(
    image: ImageData,
    psf: Any,
    *,
    name: str,
    option: str,
    need_stars: bool = True,
    sigma: Any = None,
) -> PreparedImage:
    """Background, stars, PSF and noise of one image; its background subtracted in place.

    Parameters
    ----------
    image : `~astro_zackay._ccd.ImageData`
        The image as coerced at the boundary, owned by the caller: its ``data`` array
        becomes the background-subtracted data (masked pixels 0) of the result.
    psf : any PSF input or None
        A PSF model, stamp or FWHM (`~astro_zackay._psf_input.as_psf_sampler`); None
        to estimate it from the image's stars.
    name : str
        The image as the user knows it ("reference image", a file name).
    option : str
        The argument that gives this image's PSF (``"psfs="``), named in the error
        when the PSF cannot be estimated.
    need_stars : bool, optional
        Find the stars even when the PSF is given (for the flux matching).
    sigma : float or `~astropy.units.Quantity`, optional
        The background noise in the image unit; default measured (`PreparedImage.sigma`).

    Returns
    -------
    PreparedImage

    Raises
    ------
    ValueError
        When the image is smaller than one background box or than the given PSF's
        stamp (checked before any work), when the PSF must be estimated and cannot be
        (the message names the image and ``option``), or for a background noise that
        is not positive and finite (a given one is checked before any work).
    astropy.units.UnitConversionError
        For a given ``sigma`` in a unit that does not convert to the image's.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.nddata import CCDData
    >>> from astro_zackay._ccd import to_image
    >>> from astro_zackay._prepare import prepare_image
    >>> rng = np.random.default_rng(0)
    >>> img = to_image(CCDData(100.0 + rng.normal(0.0, 2.0, (128, 128)), unit="electron"))
    >>> prep = prepare_image(img, 3.0, name="image 0", option="psfs=", need_stars=False)
    >>> prep.data is img.data, round(prep.sigma, 1), abs(float(prep.data.mean())) < 0.5
    (True, 2.0, True)
    """
    given = None if sigma is None else _given_sigma(sigma, image.unit, name)  # before any work
    given_psf = check_image_size(image.shape, psf, name, option)
    background, detection = _estimate_from(image)  # on the coerced image: no second copy
    stars = None
    if psf is None or need_stars:
        # the coerced image itself, not a CCDData that each step would coerce again
        stars = find_image_stars(image, background, name=name,
                                 option=option if psf is None else None, detection=detection)
    if psf is None:
        psf = estimate_image_psf(image, stars, name=name, option=option)
    sampler = as_psf_sampler(psf) if given_psf is None else given_psf
    log.info("%s PSF: %s", name, sampler.source)
    data = image.data
    np.subtract(data, background.sky.data, out=data, casting="same_kind")
    data[image.mask] = 0.0
    # the sky maps cached at coercion are those of the old pixels: no later step may reuse them
    image = dataclasses.replace(image, sky_maps=None)
    rms = np.asarray(background.rms.data, dtype=data.dtype)
    del background
    if given is not None:
        return PreparedImage(image, rms, given, sampler, stars, name)
    s = _background_sigma(image, rms)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"{name}: the background noise must be positive, got {s}")
    return PreparedImage(image, rms, s, sampler, stars, name)
