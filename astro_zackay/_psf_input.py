"""The one place where a user's PSF (model, array, FWHM or None) becomes a function of position.

`as_psf_sampler` turns what a user gave into a `PSFSampler`; `find_image_stars` and
`estimate_image_psf` find the stars of one image of
`~astro_zackay.subtraction.subtract` or `~astro_zackay.coaddition.coadd` (once) and
estimate its PSF from them when nothing was given, and `ImageWarnings`
re-issues the package's warnings about one image with the image named, once each.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import astropy.units as u
import numpy as np
from astropy.modeling import Model
from astropy.table import Table

from ._ccd import ImageData, to_image
from ._warnings import AstroZackayWarning, user_stacklevel
from .profiles import psf_stamp

__all__ = ["ImageWarnings", "PSFSampler", "as_psf_sampler", "estimate_image_psf",
           "find_image_stars"]

log = logging.getLogger(__name__)

_POSITION_PARAMETERS = (("x_0", "y_0"), ("x_mean", "y_mean"))
#: The meta key `~astro_zackay.coaddition.coadd` records: the image is a proper coadd.
_COADD_KEY = "AZCOADD"
#: The star-table columns of the single-Moffat fits (`~astro_zackay.stars.find_psf_stars`).
_MOFFAT_COLUMNS = ("fwhm", "beta")


@dataclass(frozen=True)
class PSFSampler:
    """A PSF as a function of position: ``sampler(x, y)`` is a unit-sum odd stamp.

    Attributes
    ----------
    sample : callable
        ``(x, y) -> ndarray``, the PSF at 0-based pixel ``(x, y)`` (x the column),
        centred on the stamp's central pixel, summing to one.
    varying : bool
        False when the PSF is the same everywhere (one evaluation serves the image).
    source : str
        What the PSF came from, for the log and the meta record.
    shape : tuple of int or None
        The stamp's shape when it is known without sampling (a FWHM's Gaussian, built
        on its first use), so that a stamp larger than the image is refused before it
        is built (`astro_zackay._prepare.check_image_size`); None otherwise.
    sample_many : callable or None
        ``(x, y) -> ndarray`` of shape ``(N, ny, nx)`` for arrays of positions, each
        stamp unit-sum: one batched evaluation (a `~astro_zackay.psf.KLPSFModel`'s
        ``psf_at``); None when the PSF is sampled one position at a time.
    model : object or None
        The PSF model sampled (a `~astro_zackay.psf.KLPSFModel`), for the checks that
        need its own attributes (the image it was fitted on); None for other PSFs.
    """

    sample: Callable[[float, float], np.ndarray]
    varying: bool
    source: str
    shape: tuple[int, int] | None = None
    sample_many: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    model: Any = None

    def __call__(self, x: float, y: float) -> np.ndarray:
        return self.sample(x, y)

    def at_positions(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The stamps at many positions, ``(N, ny, nx)`` (``x`` columns, ``y`` rows, 0-based).

        One batched evaluation when the PSF offers one (`sample_many`), else one
        `sample` per position.

        Examples
        --------
        >>> import numpy as np
        >>> from astro_zackay._psf_input import as_psf_sampler
        >>> as_psf_sampler(3.0).at_positions(np.array([1.0, 9.0]), np.array([2.0, 4.0])).shape
        (2, 17, 17)
        """
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if self.sample_many is not None:
            return self.sample_many(x, y)
        return np.array([self.sample(xi, yi) for xi, yi in zip(x.tolist(), y.tolist())])


def _unit_sum(stamp: np.ndarray, what: str) -> np.ndarray:
    kind = np.asarray(stamp).dtype
    if kind.kind not in "iuf":  # a complex stamp lost its imaginary part with a ComplexWarning
        raise TypeError(f"{what} must hold real numbers, got an array of dtype {kind}")
    stamp = np.asarray(stamp, dtype=np.float64)
    if stamp.ndim != 2 or stamp.shape[0] % 2 == 0 or stamp.shape[1] % 2 == 0:
        raise ValueError(
            f"{what} must be a 2-D stamp with odd sides (centred on its central pixel), "
            f"got shape {stamp.shape}"
        )
    return _unit_sum_stack(stamp[None], what)[0]


def _unit_sum_stack(stamps: np.ndarray, what: str) -> np.ndarray:
    """`_unit_sum` of each stamp of an ``(N, ny, nx)`` stack, in one pass."""
    stamps = np.asarray(stamps, dtype=np.float64)
    if stamps.ndim != 3:
        raise ValueError(f"{what} must give a stack of 2-D stamps, got shape {stamps.shape}")
    if stamps.shape[0] == 0:
        return stamps
    if stamps.shape[1] % 2 == 0 or stamps.shape[2] % 2 == 0:
        raise ValueError(
            f"{what} must be a 2-D stamp with odd sides (centred on its central pixel), "
            f"got shape {stamps.shape[1:]}"
        )
    if not np.all(np.isfinite(stamps)):
        raise ValueError(f"{what} has non-finite values")
    totals = stamps.sum(axis=(1, 2))
    if not np.all(totals > 0):
        raise ValueError(f"{what} sums to {totals.min()}; a PSF must have a positive sum")
    if np.any(np.abs(totals - 1.0) > 1e-3):
        log.info("%s sums to %.6g; normalised to unit sum", what, totals[np.argmax(
            np.abs(totals - 1.0))])
    return stamps / totals[:, None, None]


#: Largest offset (px) of a given PSF stamp's centroid from its central pixel.
MAX_CENTRE_OFFSET = 0.5
#: Largest negative pixel of a given PSF stamp, as a fraction of its peak, and largest
#: negative flux, as a fraction of its positive flux (noise is fine).
MAX_NEGATIVE_FRACTION = 0.1
#: The core of a stamp whose centroid is measured: pixels above this fraction of the peak.
_CORE_FRACTION = 0.05


def _check_stamp_shape(stamp: np.ndarray, what: str) -> None:
    """Raise a ValueError for a unit-sum stamp not centred or too negative to be a PSF.

    The centroid is that of the core (pixels above 5 % of the peak), so that noise in
    the wings does not move it; a PSF 4 px off its central pixel would otherwise shift
    every source of the difference image and leave thousands of false pixels.
    """
    peak = stamp.max()
    if stamp.min() < -MAX_NEGATIVE_FRACTION * peak:
        raise ValueError(
            f"{what} has a pixel of {stamp.min():.3g} against a peak of {peak:.3g} (after "
            "normalising to unit sum): a PSF must be non-negative up to its noise; give a "
            "background-subtracted, non-negative stamp"
        )
    negative = -stamp[stamp < 0].sum()
    if negative > MAX_NEGATIVE_FRACTION * (1.0 + negative):
        raise ValueError(
            f"{what} has {negative:.3g} of its unit sum in negative pixels (more than "
            f"{MAX_NEGATIVE_FRACTION:g} of its positive flux): a PSF must be non-negative up to "
            "its noise; give a background-subtracted, non-negative stamp"
        )
    core = np.where(stamp > _CORE_FRACTION * peak, stamp, 0.0)
    ny, nx = stamp.shape
    yy, xx = np.mgrid[:ny, :nx]
    dx = round(float((core * xx).sum() / core.sum()) - nx // 2, 2) + 0.0  # no "-0.00"
    dy = round(float((core * yy).sum() / core.sum()) - ny // 2, 2) + 0.0
    if math.hypot(dx, dy) > MAX_CENTRE_OFFSET:
        raise ValueError(
            f"{what} is not centred: its centroid is ({dx:+.2f}, {dy:+.2f}) px (x, y) from its "
            f"central pixel ({nx // 2}, {ny // 2}), more than {MAX_CENTRE_OFFSET} px; recentre "
            "the stamp on its central pixel (e.g. scipy.ndimage.shift) or give a PSF model"
        )


def _model_sampler(model: Model, stamp_shape: tuple[int, int]) -> PSFSampler:
    names = next(
        (pair for pair in _POSITION_PARAMETERS if all(n in model.param_names for n in pair)),
        None,
    )
    if names is None:
        raise TypeError(
            f"the PSF model {type(model).__name__} has no x_0/y_0 or x_mean/y_mean parameters; "
            "give a photutils PSF model, an astropy 2-D model with a position, or an array"
        )
    ny, nx = stamp_shape
    dy, dx = np.mgrid[: ny, : nx]
    dy = dy - ny // 2
    dx = dx - nx // 2

    def sample(x: float, y: float) -> np.ndarray:
        copy = model.copy()
        setattr(copy, names[0], x)
        setattr(copy, names[1], y)
        return _unit_sum(copy(x + dx, y + dy), f"the PSF model at ({x:.1f}, {y:.1f})")

    # photutils' GriddedPSFModel changes with position; analytic models do not
    varying = type(model).__name__ == "GriddedPSFModel"
    return PSFSampler(sample, varying, type(model).__name__)


#: A PSF given as a FWHM is a Gaussian stamp reaching this many FWHM from its centre
#: (1 - 2e-8 of the profile).
FWHM_STAMP_REACH = 2.5


class _GaussianStamp:
    """``(x, y) -> stamp``: one Gaussian stamp of ``fwhm`` px, built on the first call.

    Built lazily so that its shape can be checked against the image first
    (`astro_zackay._prepare.check_image_size`); a class, not a closure, so that a sampler pickles.
    """

    def __init__(self, side: int, fwhm: float) -> None:
        self.side, self.fwhm = side, fwhm
        self.stamp: np.ndarray | None = None

    def __call__(self, x: float, y: float) -> np.ndarray:
        if self.stamp is None:
            self.stamp = psf_stamp(self.side, self.fwhm)
        return self.stamp


def _fwhm_sampler(fwhm: float) -> PSFSampler:
    """A circular pixel-integrated Gaussian of ``fwhm`` pixels, the same everywhere."""
    if not (math.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"a PSF given as a FWHM must be a positive number of pixels, got {fwhm}")
    side = 2 * max(3, math.ceil(FWHM_STAMP_REACH * fwhm)) + 1
    return PSFSampler(_GaussianStamp(side, fwhm), False, f"Gaussian of FWHM {fwhm:g} px",
                      (side, side))


def _fwhm_quantity(psf: u.Quantity) -> float:
    """A FWHM given as a Quantity: in pixels (or dimensionless), as a plain number."""
    if psf.ndim != 0:
        raise ValueError(f"a PSF given as a Quantity must be one FWHM in pixels, got a "
                         f"Quantity of shape {psf.shape}: give a stamp as a plain array")
    if psf.unit.physical_type != "dimensionless" and psf.unit != u.pix:
        raise u.UnitConversionError(f"a PSF given as a Quantity is a FWHM in pixels, got "
                                    f"{psf}: give the FWHM as a number of pixels (or in u.pix)")
    return float(psf.to_value(u.pix if psf.unit == u.pix else u.dimensionless_unscaled))


def as_psf_sampler(psf: Any, *, stamp_shape: tuple[int, int] = (25, 25)) -> PSFSampler:
    """Turn a PSF given by a user into a `PSFSampler`.

    Parameters
    ----------
    psf : PSFSampler, KLPSFModel, astropy/photutils model, `~numpy.ndarray` or float
        A `PSFSampler` (returned as it is), a model with a ``psf_at(x, y)`` method
        (`~astro_zackay.psf.KLPSFModel`), an astropy 2-D model with ``x_0``/``y_0``
        (photutils PSF models) or
        ``x_mean``/``y_mean`` (`~astropy.modeling.functional_models.Gaussian2D`), an
        odd-sized stamp centred on its central pixel (normalised to unit sum; its
        centroid within `MAX_CENTRE_OFFSET` px of that pixel), or a
        FWHM in pixels (a number, or a Quantity in ``u.pix``): a circular
        pixel-integrated Gaussian of that FWHM (`~astro_zackay.profiles.psf_stamp`) on
        a stamp reaching 2.5 FWHM from its centre, built on its first use.
    stamp_shape : tuple of int
        The odd stamp shape for astropy models, which have no stamp of their own.

    Returns
    -------
    PSFSampler

    Raises
    ------
    TypeError
        For a PSF of none of these kinds.
    ValueError
        For an even-sized or non-finite stamp, one without a positive sum, with a
        centroid more than `MAX_CENTRE_OFFSET` px from its central pixel or a pixel
        below ``-MAX_NEGATIVE_FRACTION`` times its peak, a FWHM that is not positive,
        or a Quantity that is not one value.
    astropy.units.UnitConversionError
        For a FWHM given as a Quantity in a unit other than pixels (a ValueError too).

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.modeling.models import Gaussian2D
    >>> from astro_zackay._psf_input import as_psf_sampler
    >>> sampler = as_psf_sampler(Gaussian2D(1, 0, 0, 1.5, 1.5), stamp_shape=(15, 15))
    >>> stamp = sampler(40.3, 12.0)
    >>> stamp.shape, round(float(stamp.sum()), 12), bool(stamp[7, 7] == stamp.max())
    ((15, 15), 1.0, True)

    A FWHM in pixels gives a Gaussian PSF:

    >>> gaussian = as_psf_sampler(3.0)
    >>> gaussian.source, gaussian(10.0, 20.0).shape, gaussian.varying
    ('Gaussian of FWHM 3 px', (17, 17), False)
    """
    if isinstance(psf, PSFSampler):
        return psf
    if hasattr(psf, "psf_at"):
        varying = bool(getattr(psf, "is_varying", True))
        return PSFSampler(lambda x, y: _unit_sum(psf.psf_at(x, y), "the PSF"), varying,
                          type(psf).__name__,
                          sample_many=lambda x, y: _unit_sum_stack(psf.psf_at(x, y), "the PSF"),
                          model=psf)
    if isinstance(psf, Model):
        if any(n % 2 == 0 for n in stamp_shape):
            raise ValueError(f"stamp_shape must be odd, got {stamp_shape}")
        return _model_sampler(psf, tuple(stamp_shape))
    if isinstance(psf, numbers.Real) and not isinstance(psf, bool):
        return _fwhm_sampler(float(psf))
    if isinstance(psf, u.Quantity):
        return _fwhm_sampler(_fwhm_quantity(psf))
    if isinstance(psf, np.ndarray | list | tuple):
        stamp = _unit_sum(psf, "the PSF array")
        _check_stamp_shape(stamp, "the PSF array")
        return PSFSampler(lambda x, y: stamp, False, "array")
    raise TypeError(
        f"cannot use a {type(psf).__name__} as a PSF: give a KLPSFModel, an astropy or "
        "photutils PSF model, an odd-sized 2-D array, or a FWHM in pixels"
    )


class ImageWarnings:
    """Re-issue the warnings raised while one image is processed, naming it, once each.

    A context manager, entered around each step of one image (``with named: ...``,
    as many times as needed). The package's warnings
    (`~astro_zackay._warnings.AstroZackayWarning`) are re-issued as
    ``"<name>: <message>"`` and others unchanged, each (category, message) once over
    all the blocks of this object, at the user's line (`user_stacklevel`). Nothing
    is swallowed: the filters in force outside the blocks decide what is shown.

    Parameters
    ----------
    name : str
        The image as the user knows it ("reference image", a file name, ...).

    Examples
    --------
    >>> import warnings
    >>> from astro_zackay._psf_input import ImageWarnings
    >>> from astro_zackay._warnings import FewStarsWarning
    >>> named = ImageWarnings("science image")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     for _ in range(2):
    ...         with named:
    ...             warnings.warn("3 stars: a Moffat PSF", FewStarsWarning)
    >>> [str(w.message) for w in caught]
    ['science image: 3 stars: a Moffat PSF']
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._issued: set[tuple[type, str]] = set()
        self._catcher: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []

    def __enter__(self) -> ImageWarnings:
        if self._catcher is not None:
            raise RuntimeError("an ImageWarnings block cannot be nested in itself")
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._catcher.__exit__(*exc_info)
        self._catcher = None
        for record in self._caught:
            category, text = record.category, str(record.message)
            if issubclass(category, AstroZackayWarning):
                text = f"{self.name}: {text}"
            if (category, text) not in self._issued:
                self._issued.add((category, text))
                warnings.warn(text, category, stacklevel=user_stacklevel())


def _cannot_estimate(name: str, reason: Any, option: str | None) -> ValueError:
    """The error for an image whose PSF cannot be estimated: it says what to pass."""
    text = f"{name}: {reason}"
    if option is not None and option not in text:
        text += (f"; pass {option} (a PSF model, an odd-sized array, or the FWHM in pixels "
                 "of a Gaussian PSF)")
    return ValueError(text)


def _drop_profile_fits(stars: Table) -> Table:
    """``stars`` without their single-Moffat fits, so that the flux matching uses the PSF.

    `~astro_zackay.fluxmatch.match_stars` takes the aperture correction from the
    stars' Moffat fits when the table has them, else from the PSF stamp. A proper
    coadd's PSF (its P_R) is exact, while one Moffat profile misdescribes its mixture
    of seeings: the DECam 5+5 coadds' flux ratio came out 1.084 from the fits, 1.039
    from P_R, against 1.033 from apertures of 3 FWHM.
    """
    stars.remove_columns([column for column in _MOFFAT_COLUMNS if column in stars.colnames])
    return stars


def _coerced(image: Any) -> ImageData:
    """The image as `~astro_zackay._ccd.ImageData`: as it is when it is one already."""
    return image if isinstance(image, ImageData) else to_image(image)


def find_image_stars(
    image: Any, background: Any, *, name: str, option: str | None, detection: Any = None
) -> Table | None:
    """The stars of one image of a subtraction or coadd, found once for all their uses.

    `~astro_zackay.stars.find_psf_stars` at S/N >= `~astro_zackay.fluxmatch.MATCH_SNR_MIN`
    (the flux matching's cut; `~astro_zackay.psf.estimate_psf` cuts harder for the
    PSF itself).

    Parameters
    ----------
    image : `~astro_zackay._ccd.ImageData` or `~astropy.nddata.CCDData`
        The image as coerced at the boundary (used as it is), or a CCDData view of it.
    background : `~astro_zackay.background.BackgroundResult`
        Its background.
    name : str
        The image as the user knows it, for the log and the error.
    option : str or None
        The argument that gives this image's PSF when the PSF depends on the stars:
        the finder's error is then raised, naming the image and this option. None
        when the PSF was given: a failure then gives None (the stars only serve the
        flux matching, which has a fallback). For a proper coadd (``meta`` holds
        ``AZCOADD``) with its PSF given, the table then lacks the stars' Moffat fits
        (``fwhm``, ``beta``), so that the flux matching's aperture correction comes
        from the given, exact, PSF.
    detection : `~astro_zackay.background._Detection`, optional
        The sources that the estimate of ``background`` detected on this image
        (`~astro_zackay.background._estimate_from`): reused, not detected again.

    Returns
    -------
    `~astropy.table.Table` or None
        None when no star was found and none is required.
    """
    from .fluxmatch import MATCH_SNR_MIN
    from .stars import _find_stars

    image = _coerced(image)
    try:
        stars = _find_stars(image, snr_min=MATCH_SNR_MIN, background=background,
                            detection=detection)
    except ValueError as exc:
        if option is not None:
            raise _cannot_estimate(name, exc, option) from None
        log.info("%s: no stars found (%s)", name, exc)
        return None
    if not len(stars):
        return None
    if option is None and _COADD_KEY in image.meta:
        return _drop_profile_fits(stars)
    return stars


def estimate_image_psf(image: Any, stars: Table | None, *, name: str, option: str) -> Any:
    """Estimate the PSF of one image of a subtraction or coadd from the stars found in it.

    `~astro_zackay.psf.estimate_psf` chooses the model from the stars (its
    degradation ladder, each step down announced with a
    `~astro_zackay._warnings.FewStarsWarning`); when it cannot build any PSF the
    error names the image and the option that gives its PSF.

    Parameters
    ----------
    image : `~astro_zackay._ccd.ImageData` or `~astropy.nddata.CCDData`
        The image as coerced at the boundary (used as it is), or a CCDData view of it.
    stars : `~astropy.table.Table` or None
        The stars found in it (`~astro_zackay.stars.find_psf_stars`); None or
        empty when none was found.
    name : str
        The image as the user knows it ("reference image", a file name, ...).
    option : str
        The argument through which the user can give this image's PSF.

    Returns
    -------
    `~astro_zackay.psf.KLPSFModel`

    Raises
    ------
    ValueError
        When no PSF can be estimated (no usable star).
    """
    from .psf.estimate import _estimate_psf

    if stars is None or len(stars) == 0:
        raise _cannot_estimate(name, "no usable PSF star", option)
    try:
        model = _estimate_psf(_coerced(image), stars)
    except ValueError as exc:
        raise _cannot_estimate(name, exc, option) from None
    log.info("%s: PSF estimated from %d stars: %r", name, len(stars), model)
    return model
