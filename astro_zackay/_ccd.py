"""The CCDData boundary: the one place where inputs become arrays and results become CCDData.

Every public image-level function of astro_zackay calls :func:`to_image` on its
inputs and :func:`to_ccddata` on its outputs, so that all of them accept the
same things (`~astropy.nddata.CCDData`, `~astropy.nddata.NDData`, a plain
`~numpy.ndarray` with ``unit=``, a FITS path or an HDU) and return the same
things (a new `~astropy.nddata.CCDData` with unit, mask, uncertainty, WCS and a
record of the step in ``meta``). Inputs are never mutated.
"""

from __future__ import annotations

import logging
import numbers
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.nddata import (
    CCDData,
    InverseVariance,
    NDData,
    StdDevUncertainty,
    VarianceUncertainty,
)
from astropy.stats import sigma_clipped_stats
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS

from ._warnings import (
    NoiseEstimateWarning,
    SaturationWarning,
    UncertaintyWarning,
    UnitConversionWarning,
    user_stacklevel,
)
from .saturation import detect_saturation

__all__ = [
    "ImageData",
    "SkyMaps",
    "as_ccddata",
    "check_not_constant",
    "match_unit",
    "missing_source_noise",
    "record_step",
    "to_ccddata",
    "to_image",
    "warn_missing_source_noise",
]

log = logging.getLogger(__name__)

#: Header keywords searched, in order, for the gain (e-/ADU), read noise (e-) and saturation.
GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN")
READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "RON", "READNOISE")
SATURATION_KEYS = ("SATURATE", "SATURATN", "SATLEVEL")
EXPTIME_KEYS = ("EXPTIME", "EXPOSURE", "TEXPTIME")

_ELECTRON_UNITS = (u.electron, u.photon)


@dataclass(frozen=True, eq=False)
class SkyMaps:
    """sep's clipped sky and rms maps of an image (masked pixels set to 0), 3x3 filtered.

    ``data`` is the very array they were computed from: a copy of the image with other
    data (``dataclasses.replace``) does not match it, so the maps are not reused there.
    """

    data: np.ndarray
    box: int
    sky: np.ndarray
    rms: np.ndarray

    def matches(self, img: ImageData, box: int) -> bool:
        """Whether these are the maps of ``img.data`` (unmasked) in ``box`` px boxes."""
        return self.data is img.data and self.box == box


@dataclass(frozen=True, repr=False)
class ImageData:
    """An image as plain arrays, ready for the numerical core.

    Attributes
    ----------
    data : `~numpy.ndarray`
        Native-endian floating-point pixel values (a copy; never the caller's array).
    variance : `~numpy.ndarray`
        Per-pixel variance in ``unit**2``, from the input uncertainty or estimated
        from the data (see ``variance_estimated``).
    mask : `~numpy.ndarray`
        Boolean, True for bad pixels: the input mask, non-finite data or variance,
        and pixels at or above ``saturation``.
    unit : `~astropy.units.Unit`
        The unit of ``data``.
    wcs : `~astropy.wcs.WCS` or None
        The world coordinate system, if any.
    meta : dict
        A copy of the input metadata (a FITS header for FITS inputs).
    gain : float or None
        Electrons per data unit (1 for data in electrons), when known.
    read_noise : float or None
        Read noise in electrons, when known.
    saturation : float or None
        The saturation level in data units that was applied to the mask.
    variance_estimated : bool
        True when the variance was estimated from the data rather than propagated.
    sky_maps : `SkyMaps` or None
        sep's clipped sky and rms maps that estimated the variance, kept for reuse by
        source detection (None when the variance was not estimated from such maps).
    """

    data: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    unit: u.UnitBase
    wcs: WCS | None = None
    meta: dict = field(default_factory=dict)
    gain: float | None = None
    read_noise: float | None = None
    saturation: float | None = None
    variance_estimated: bool = False
    sky_maps: SkyMaps | None = field(default=None, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """The image shape ``(ny, nx)``."""
        return self.data.shape

    def filled(self, value: float = 0.0) -> np.ndarray:
        """Return a copy of the data with masked pixels replaced by ``value``."""
        return np.where(self.mask, value, self.data)

    def __repr__(self) -> str:
        ny, nx = self.shape
        return (
            f"<ImageData {ny}x{nx} {self.data.dtype} [{self.unit}] "
            f"masked={int(self.mask.sum())} variance_estimated={self.variance_estimated} "
            f"wcs={'yes' if self.wcs is not None else 'no'}>"
        )


def _header_float(meta: Any, keys: tuple[str, ...]) -> float | None:
    """First finite, positive float among ``keys`` in ``meta``, else None."""
    if meta is None:
        return None
    for key in keys:
        try:
            value = float(meta[key])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            return value
    return None


def _as_float(value: Any, unit: u.UnitBase | None = None, name: str = "value") -> float | None:
    """One positive finite float from a number or Quantity (in ``unit`` when a Quantity);
    a ValueError names ``name`` for anything else (a string, an array, NaN, 0 or less)."""
    if value is None:
        return None
    given = value
    if isinstance(value, u.Quantity):
        if unit is None:
            value = value.value
        else:
            try:
                value = value.to_value(unit)
            except u.UnitConversionError as exc:
                raise u.UnitsError(
                    f"{name}={given} cannot be converted to {unit}: {exc}"
                ) from None
    try:
        if np.ndim(value) != 0 or isinstance(value, str | bytes | bool):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be one positive finite number, got {given!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def _unparsable_bunit(values: list[Any], source: str) -> ValueError | None:
    """The error for the first BUNIT among ``values`` that astropy cannot parse, else None."""
    for value in values:
        if value is None:
            continue
        try:
            u.Unit(value)
        except ValueError:
            return ValueError(
                f"{source} has BUNIT = {value!r}, which astropy cannot parse as a unit: pass "
                "unit= explicitly (e.g. unit='electron' for 'e-', unit='electron/s' for "
                "'e-/s', unit='adu' for 'counts')"
            )
    return None


def _check_fits_file(path: str) -> None:
    """Raise a clear error for a path that is not a complete FITS file, before reading it.

    A directory, an empty, garbage or truncated file is named with what is wrong
    (astropy would ask for a ``format`` argument, fail with "buffer is too small", or
    read a truncated file as a valid image with a warning). Only the headers are read.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, not a FITS file: give the path of "
                                "a FITS image")
    what = f"{path!r} is not a readable FITS file"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyUserWarning)
            fits.open(path, memmap=False, lazy_load_hdus=False).close()  # headers only
    except PermissionError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise OSError(f"{what} ({exc}): it is empty or corrupt; check that it is a FITS "
                      "image, or copy or download it again") from None
    truncated = [str(w.message) for w in caught if "truncated" in str(w.message)]
    if truncated:
        raise OSError(f"{what} ({truncated[0]}): it is truncated; copy or download it again")


def _check_hdu(path: str, hdu: int | str) -> None:
    """Raise a ValueError naming the HDUs of ``path`` when it has no HDU ``hdu``."""
    with fits.open(path, memmap=False) as hdul:
        names = [h.name for h in hdul]
        try:
            hdul[hdu]
        except (KeyError, IndexError):
            raise ValueError(
                f"{path!r} has no HDU {hdu!r}: its HDUs are {names} (index 0 to "
                f"{len(names) - 1}); pass hdu= one of them"
            ) from None


def _read_fits(path: str | os.PathLike, hdu: int | str | None, unit: Any) -> CCDData:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no FITS file at {path!r}")
    _check_fits_file(path)
    kwargs: dict[str, Any] = {}
    if hdu is not None:
        _check_hdu(path, hdu)
        kwargs["hdu"] = hdu
    try:
        return CCDData.read(path, unit=unit, format="fits", **kwargs)
    except ValueError as exc:
        if "unit" not in str(exc).lower():
            raise
        with fits.open(path) as hdul:
            unparsable = _unparsable_bunit([h.header.get("BUNIT") for h in hdul], repr(path))
        if unparsable is not None:
            raise unparsable from None
        raise ValueError(
            f"{path!r} has no BUNIT keyword, so its unit is unknown: pass unit='adu' "
            "(or 'electron', ...) explicitly"
        ) from None


def _from_hdu(hdu: Any, unit: Any) -> CCDData:
    if isinstance(hdu, fits.HDUList):
        with_data = [h for h in hdu if getattr(h, "data", None) is not None and h.is_image]
        if not with_data:
            raise ValueError("the HDUList has no image HDU with data")
        hdu = with_data[0]
    if hdu.data is None:
        raise ValueError(f"the {type(hdu).__name__} has no data")
    header = hdu.header.copy()
    if unit is None:
        bunit = header.get("BUNIT")
        if bunit is None:
            raise ValueError(
                "the HDU has no BUNIT keyword, so its unit is unknown: pass unit='adu' "
                "(or 'electron', ...) explicitly"
            )
        unparsable = _unparsable_bunit([bunit], f"the {type(hdu).__name__}")
        if unparsable is not None:
            raise unparsable
        unit = u.Unit(bunit)
    wcs = None
    if header.get("CTYPE1"):
        wcs = WCS(header)
    return CCDData(np.array(hdu.data), unit=unit, meta=header, wcs=wcs)


def _as_nddata(image: Any, unit: Any, hdu: int | str | None) -> NDData:
    """Turn any accepted input into an NDData-like object (may share memory with the input)."""
    if isinstance(image, NDData):
        return image
    if isinstance(image, str | os.PathLike):
        return _read_fits(image, hdu, unit)
    if isinstance(image, fits.HDUList | fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
        return _from_hdu(image, unit)
    if isinstance(image, u.Quantity):
        return NDData(image.value, unit=image.unit)
    if isinstance(image, np.ndarray | list | tuple):
        if unit is None:
            raise ValueError(
                "a plain array has no unit: pass unit='adu' or unit='electron' (or give a CCDData)"
            )
        array = np.ma.getdata(image)
        if array.dtype.kind == "O":  # NDData refuses it with no word of why
            raise TypeError(
                f"the {type(image).__name__} holds object values, not real numbers: give the "
                "pixel values as integers or floats (e.g. array.astype(float))"
            )
        if isinstance(image, np.ma.MaskedArray):  # its mask is kept, not dropped
            return NDData(array, mask=np.ma.getmaskarray(image), unit=unit)
        return NDData(array, unit=unit)
    raise TypeError(
        f"cannot use a {type(image).__name__} as an image: give a CCDData, NDData, "
        "ndarray (with unit=), FITS path or FITS HDU"
    )


#: Largest fraction of an uncertainty's finite values that may be negative: those few are
#: masked (a pipeline's rounding, e.g. one pixel of JWST's ERR); more is an error of sign.
MAX_NEGATIVE_UNCERTAINTY_FRACTION = 0.01


def _negative_uncertainties(unc: Any) -> np.ndarray | None:
    """Where ``unc`` is negative (None: nowhere): masked when few, a ValueError when more
    (never ``|x|``)."""
    values = np.asarray(unc.array)
    with np.errstate(invalid="ignore"):
        negative = values < 0
    n_negative = int(np.count_nonzero(negative))
    if not n_negative:  # the common case: no count of the finite values, no masking
        return None
    if n_negative > MAX_NEGATIVE_UNCERTAINTY_FRACTION * max(int(np.isfinite(values).sum()), 1):
        raise ValueError(
            f"the {type(unc).__name__} has {n_negative} negative values (min "
            f"{float(np.nanmin(values)):.4g}) out of {values.size}: an uncertainty must be >= 0; "
            "fix its sign, or set the bad pixels' uncertainty to NaN (they are then masked)"
        )
    return negative


def _zero_variance(variance: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Pixels of a given uncertainty with zero variance: masked, as no pixel is noiseless.

    Their infinite weight would otherwise dominate every fit (a star's chi2 becomes
    infinite and the PSF model selection has no finite score to choose from).
    """
    return variance == 0


def _warn_unusable_uncertainty(
    what: str, kind: str, n_zero: int, negative: np.ndarray | None, bad: np.ndarray
) -> None:
    """One `~astro_zackay._warnings.UncertaintyWarning` for an image whose given
    uncertainty had zero or (a few) negative values that were masked.

    ``n_zero`` counts the zero-variance pixels that were not already masked;
    ``negative`` is where the uncertainty was negative (None: nowhere), ``bad`` the
    mask before either was applied.
    """
    n_negative = 0 if negative is None else int(np.count_nonzero(negative & ~bad))
    if not (n_zero or n_negative):
        return
    parts = []
    if n_zero:
        parts.append(f"{n_zero} pixels with a zero uncertainty")
    if n_negative:
        parts.append(f"{n_negative} pixels with a negative uncertainty")
    warnings.warn(
        f"{what}'s {kind} has {' and '.join(parts)}: such an uncertainty cannot weigh "
        f"a pixel, so {n_zero + n_negative} pixels are masked; give those pixels their "
        "true uncertainty, or set it to NaN or mask them yourself to silence this",
        UncertaintyWarning,
        stacklevel=user_stacklevel(),
    )


def _parse_unit(unit: Any) -> u.UnitBase | None:
    """``unit=`` as an astropy unit (None stays None); a ValueError names a string astropy
    cannot parse, with what to give instead."""
    if unit is None or isinstance(unit, u.UnitBase):
        return unit
    try:
        return u.Unit(unit)
    except (ValueError, TypeError):
        raise ValueError(
            f"unit={unit!r} is not a unit astropy can parse: pass "
            "e.g. unit='adu', unit='electron' or unit='electron/s' (write 'electron' for "
            "'e-', 'adu' for 'counts')"
        ) from None


def _check_narrowing(
    source: np.ndarray, cast: np.ndarray, what: str, name: str, good: np.ndarray | None = None
) -> None:
    """Refuse values that a narrower float type (float64 to float32) turns into inf or 0.

    ``good`` limits the check to the pixels that are used (default all). Nothing is
    checked (no pass over the arrays) when the type is not narrowed.
    """
    if not (np.issubdtype(source.dtype, np.floating)
            and source.dtype.itemsize > cast.dtype.itemsize):
        return
    with np.errstate(invalid="ignore"):
        lost = np.isfinite(source) & ~np.isfinite(cast)
        if name == "variance":  # positive values that became 0: an underflow
            lost |= (source > 0) & (cast == 0)
    if good is not None:
        lost &= good
    if lost.any():
        values = np.abs(source[lost])
        raise ValueError(
            f"{what}'s {name} has {int(lost.sum())} values (from {values.min():.3g} to "
            f"{values.max():.3g}) outside the range of {cast.dtype.name} (about 1e-38 to "
            f"3e38): rescale the image (e.g. to electrons, or by a power of 10) or pass "
            "dtype=np.float64"
        )


def _refuse_fully_masked(
    what: str, data: np.ndarray, own_mask: Any, mask: Any, saturation: float | None
) -> None:
    """The ValueError for an image none of whose pixels can be used, saying why."""
    reasons = [f"{int(np.count_nonzero(~np.isfinite(data)))} not finite (NaN or inf)"]
    for name, extra in (("its mask", own_mask), ("mask=", mask)):
        if extra is not None:
            reasons.append(f"{int(np.count_nonzero(extra))} masked by {name}")
    if saturation is not None:
        with np.errstate(invalid="ignore"):
            n_saturated = int(np.count_nonzero(data >= saturation))
        reasons.append(f"{n_saturated} at or above the saturation level {saturation:.6g}")
    raise ValueError(
        f"{what} has no usable pixel: of its {data.size} pixels, {', '.join(reasons)}; "
        "check the data, the mask and saturation= (an all-NaN or fully masked image "
        "cannot be used)"
    )


def _variance_from_uncertainty(
    unc: Any, shape: tuple[int, ...], unit: u.UnitBase
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The variance of ``unc`` in ``unit**2`` (None without one), and where ``unc`` was
    negative (None: nowhere; those pixels' variance is NaN)."""
    if unc is None:
        return None, None
    if isinstance(unc, StdDevUncertainty | VarianceUncertainty | InverseVariance):
        var = unc.represent_as(VarianceUncertainty)
    else:
        raise TypeError(
            f"uncertainty of type {type(unc).__name__} is not supported: use "
            "StdDevUncertainty, VarianceUncertainty or InverseVariance"
        )
    negative = _negative_uncertainties(unc)
    values = np.array(var.array, dtype=np.float64)
    if var.unit is not None and unit is not None and var.unit != unit**2:
        try:
            values = (values * var.unit).to_value(unit**2)
        except u.UnitConversionError:
            raise u.UnitsError(
                f"the uncertainty's unit ({var.unit}) does not match the data unit ({unit})"
            ) from None
    if values.shape != tuple(shape):  # not broadcast: a row of values is no pixel's noise
        raise ValueError(
            f"the {type(unc).__name__}'s shape {values.shape} does not match the image "
            f"{tuple(shape)}: give one uncertainty per pixel, of the image's shape"
        )
    if negative is not None:
        values[negative] = np.nan  # masked, never taken as |x|
    return values, negative


def _log_variance_estimate(background: float, gain: float | None) -> None:
    """Say how the variance was estimated (``background``: the median background variance)."""
    if gain is not None:
        log.info(
            "no uncertainty given: variance estimated as the local background variance "
            "(median %.4g) plus source Poisson noise with gain %.4g",
            background,
            gain,
        )
    else:
        log.info(
            "no uncertainty and no gain given: variance estimated as the local background "
            "variance (median %.4g), so source Poisson noise is ignored; pass gain= or an "
            "uncertainty (e.g. ccdproc.create_deviation) to include it",
            background,
        )


def _estimate_variance(
    data: np.ndarray, mask: np.ndarray, gain: float | None
) -> tuple[np.ndarray, SkyMaps | None]:
    """Variance from the data: local background variance plus Poisson noise of sources.

    The background variance is sep's rms map (64 px boxes, an eighth of a small
    image), not one global value: sky gradients and extended sources inflate a
    global MAD (by 1.6x in variance on properimage's sample pair, which left its
    off-star Scorr with a standard deviation of 0.79). The maps are returned too (None
    for an image too small for them).
    """
    good = ~mask & np.isfinite(data)
    if good.sum() < 16:
        raise ValueError(
            f"only {int(good.sum())} unmasked pixels, too few (16) to estimate the noise "
            "from the data; give an uncertainty"
        )
    box = min(64, max(8, min(data.shape) // 8))
    if min(data.shape) >= 4 * box:
        # imported here: the background module builds on this one
        from .background import _sep_maps

        sky, rms = _sep_maps(np.where(good, data, 0.0), ~good, (box, box), (3, 3))
        sky.flags.writeable = rms.flags.writeable = False  # shared through the maps
        maps = SkyMaps(data, box, sky, rms)
        variance = np.square(rms, dtype=np.result_type(rms, data))
    else:  # too small for a map: one clipped value
        _, median, std = sigma_clipped_stats(data[good], sigma=4.0, maxiters=10,
                                             stdfunc="mad_std")
        sky, variance = np.full(data.shape, median), np.full(data.shape, std**2)
        maps = None
    if log.isEnabledFor(logging.INFO):  # the median costs ~5 ms a frame: only when logged
        _log_variance_estimate(float(np.median(variance[good])), gain)
    if gain is not None:  # in place, in the data's precision: no frame-sized temporary more
        excess = np.subtract(data, sky, dtype=variance.dtype)
        excess[~np.isfinite(excess)] = 0.0  # one scan: nan_to_num makes three and a copy
        np.clip(excess, 0.0, None, out=excess)
        excess /= gain
        variance += excess
    return variance, maps


def to_image(
    image: Any,
    *,
    unit: Any = None,
    mask: np.ndarray | None = None,
    uncertainty: Any = None,
    gain: Any = None,
    read_noise: Any = None,
    saturation: Any = None,
    hdu: int | str | None = None,
    dtype: type = np.float64,
) -> ImageData:
    """Turn any accepted image into `ImageData` (plain native-endian arrays).

    Parameters
    ----------
    image : `~astropy.nddata.CCDData`, `~astropy.nddata.NDData`, `~numpy.ndarray`, str, path or HDU
        The image. A plain array needs ``unit``; a FITS file without BUNIT needs ``unit``.
    unit : str or `~astropy.units.Unit`, optional
        The unit of the data; overrides none that the input already has (a mismatch raises).
    mask : array-like of bool, optional
        Extra bad pixels, OR-combined with the input's own mask.
    uncertainty : `~astropy.nddata.NDUncertainty`, optional
        Overrides the input's uncertainty.
    gain : float or `~astropy.units.Quantity`, optional
        Electrons per data unit; default the GAIN header keyword. Data in electrons
        always have a gain of 1 (a gain given for them, e.g. one value for a pair of
        images of which the other is in ADU, is logged and not used). Used only to
        estimate source Poisson noise when there is no uncertainty.
    read_noise : float or `~astropy.units.Quantity`, optional
        Read noise in electrons; default the RDNOISE header keyword.
    saturation : float or `~astropy.units.Quantity`, optional
        Pixels at or above this level (data units) are masked; default the SATURATE
        header keyword, else the level found in the data by
        :func:`~astro_zackay.saturation.detect_saturation` (with a
        `~astro_zackay.SaturationWarning`); ``np.inf`` disables both.
    hdu : int or str, optional
        The HDU to read from a FITS file.
    dtype : numpy dtype, optional
        The floating-point type of the arrays (default float64).

    Returns
    -------
    ImageData

    Raises
    ------
    TypeError
        For inputs that are not images, or whose data are not real numbers (complex,
        boolean, strings).
    ValueError
        For inputs with no unit or an unparsable BUNIT (the value is named), not 2-D,
        of mismatched shapes (mask, uncertainty), with no usable pixel (all NaN, masked
        or saturated, or an uncertainty NaN, inf or 0 everywhere), with data or variance
        outside the range of ``dtype``, with more than 1 % negative uncertainties (fewer
        are masked), an HDU the file lacks, a non-float ``dtype``, or a gain, read noise
        or saturation that is not one positive number.
    OSError
        For a path that is a directory, or an empty, corrupt or truncated FITS file
        (`IsADirectoryError` for a directory).

    Warns
    -----
    SaturationWarning
        When the saturation level was found in the data (no ``saturation=`` and no
        keyword); pixels already masked never trigger it, so an image coerced twice
        warns once.
    UncertaintyWarning
        When the given uncertainty has zero values (no pixel is noiseless) or a few
        negative ones, once, with the count of pixels so masked.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._ccd import to_image
    >>> img = to_image(np.ones((4, 5)), unit="adu", saturation=10.0)
    >>> img.shape, str(img.unit), bool(img.mask.any())
    ((4, 5), 'adu', False)
    """
    try:
        float_type = np.issubdtype(np.dtype(dtype), np.floating)
    except TypeError:
        float_type = False
    if not float_type:
        raise ValueError(f"dtype must be a floating-point type (np.float32 or np.float64), "
                         f"got {dtype!r}")
    unit = _parse_unit(unit)
    nd = _as_nddata(image, unit, hdu)
    if nd.unit is None:
        if unit is None:
            raise ValueError(
                f"the {type(image).__name__} has no unit: pass unit='adu' or unit='electron'"
            )
        data_unit = u.Unit(unit)
    else:
        data_unit = u.Unit(nd.unit)
        if unit is not None and u.Unit(unit) != data_unit:
            raise u.UnitsError(f"unit={unit!r} contradicts the image's own unit {data_unit}")
    data = np.asarray(nd.data)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D image, got an array of shape {data.shape}")
    what = repr(os.fspath(image)) if isinstance(image, str | os.PathLike) else (
        f"the {type(image).__name__}")
    if data.dtype.kind not in "iuf":  # complex, bool (a mask?), strings, objects
        raise TypeError(
            f"{what} holds {data.dtype} values, not real numbers: give the pixel values "
            "(integers or floats)"
        )
    source = data
    with np.errstate(over="ignore"):
        data = np.array(data, dtype=np.dtype(dtype).newbyteorder("="), copy=True)
    _check_narrowing(source, data, what, "data")
    del source

    bad = ~np.isfinite(data)
    for extra in (nd.mask, mask):
        if extra is not None:
            extra = np.asarray(extra, dtype=bool)
            if extra.shape != data.shape:
                raise ValueError(f"mask shape {extra.shape} does not match image {data.shape}")
            bad |= extra

    meta = nd.meta
    gain_value = _data_gain(gain, meta, data_unit)
    read_noise_value = _as_float(read_noise, u.electron, "read_noise")
    if read_noise_value is None:
        read_noise_value = _header_float(meta, READ_NOISE_KEYS)
    saturation_value = _saturation_level(saturation, meta, data, bad, data_unit)
    if saturation_value is not None:
        with np.errstate(invalid="ignore"):
            bad |= data >= saturation_value
    if bad.all():
        _refuse_fully_masked(what, data, nd.mask, mask, saturation_value)

    if uncertainty is None:
        uncertainty = nd.uncertainty
    variance, negative = _variance_from_uncertainty(uncertainty, data.shape, data_unit)
    estimated = variance is None
    maps = None
    if estimated:
        variance, maps = _estimate_variance(data, bad, gain_value)
    source = variance
    with np.errstate(over="ignore", under="ignore"):
        variance = variance.astype(data.dtype, copy=False)
    _check_narrowing(source, variance, what, "variance", ~bad)
    del source
    invalid = ~np.isfinite(variance) | (variance < 0)
    if not estimated:
        zero = _zero_variance(variance, bad)
        invalid |= zero
        _warn_unusable_uncertainty(what, type(uncertainty).__name__,
                                   int(np.count_nonzero(zero & ~bad)), negative, bad)
    if maps is not None and np.any(invalid & ~bad):  # the maps were made with another mask
        maps = None
    if not estimated and np.all(invalid | bad):
        raise ValueError(
            f"{what}'s {type(uncertainty).__name__} leaves no usable pixel: it is NaN, inf, "
            f"zero or negative at all {int(np.count_nonzero(~bad))} pixels not already masked; "
            "give a valid uncertainty, or none (the noise is then estimated from the data)"
        )
    bad |= invalid

    wcs = nd.wcs if isinstance(nd.wcs, WCS) else None
    return ImageData(
        data=data,
        variance=variance,
        mask=bad,
        unit=data_unit,
        wcs=wcs.deepcopy() if wcs is not None else None,
        meta=_copy_meta(meta),
        gain=gain_value,
        read_noise=read_noise_value,
        saturation=saturation_value,
        variance_estimated=estimated,
        sky_maps=maps,
    )


def _data_gain(gain: Any, meta: Any, unit: u.UnitBase) -> float | None:
    """Electrons per data unit: 1 for data in electrons, else ``gain``, else the keyword."""
    if unit in _ELECTRON_UNITS:
        value = _as_float(gain, None, "gain")
        if value is not None and value != 1.0:
            log.info("the data are in %s, so their gain is 1: gain=%s is not used", unit, gain)
        return 1.0
    value = _as_float(gain, u.electron / unit, "gain")
    return _header_float(meta, GAIN_KEYS) if value is None else value


def check_not_constant(img: ImageData, name: str) -> None:
    """Refuse an image whose unmasked pixels all hold one value, before it is prepared.

    Such an image (a blank or zero-filled frame, a wrong extension) has no sky noise:
    its background rms is 0 and no pixel is background below it, so its noise would
    come out 0 or NaN far downstream.

    Parameters
    ----------
    img : ImageData
        The image as coerced at the boundary (`to_image`).
    name : str
        The image as the user knows it ("science image", a file name).

    Raises
    ------
    ValueError
        Naming the image and its one value, and what to check.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._ccd import check_not_constant, to_image
    >>> check_not_constant(to_image(np.arange(64.0).reshape(8, 8), unit="adu"), "image 0")
    >>> try:
    ...     check_not_constant(to_image(np.zeros((8, 8)), unit="adu"), "image 0")
    ... except ValueError as exc:
    ...     print(str(exc)[:50])
    image 0: all its 64 unmasked pixels are 0 (a const
    """
    good = ~img.mask
    low = np.min(img.data, where=good, initial=np.inf)
    if low == np.max(img.data, where=good, initial=-np.inf):
        raise ValueError(
            f"{name}: all its {int(good.sum())} unmasked pixels are {float(low):g} (a constant "
            "image): it has no sky noise to measure; check that the right image (or FITS "
            "extension) was read, not a blank or zero-filled frame, or mask its constant part"
        )


def missing_source_noise(img: ImageData) -> bool:
    """Whether ``img``'s variance, estimated without a gain, lacks the sources' Poisson noise.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._ccd import missing_source_noise, to_image
    >>> missing_source_noise(to_image(np.ones((8, 8)), unit="adu", saturation=np.inf))
    True
    >>> missing_source_noise(to_image(np.ones((8, 8)), unit="adu", gain=2.0, saturation=np.inf))
    False
    """
    return img.variance_estimated and img.gain is None


def warn_missing_source_noise(img: ImageData) -> None:
    """A `~astro_zackay.NoiseEstimateWarning` when `missing_source_noise` holds for ``img``.

    Issue it once per image, inside the image's `~astro_zackay._psf_input.ImageWarnings`
    block so that the message names the image.

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> from astro_zackay._ccd import to_image, warn_missing_source_noise
    >>> img = to_image(np.ones((8, 8)), unit="adu", saturation=np.inf)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_missing_source_noise(img)
    >>> caught[0].category.__name__, "gain=" in str(caught[0].message)
    ('NoiseEstimateWarning', True)
    """
    if missing_source_noise(img):
        warnings.warn(
            f"no uncertainty and no gain for data in {img.unit}: the variance is the "
            "background's alone, so the Poisson noise of the sources is missing (bright "
            "stars and transients score too high); pass gain= (e-/ADU), give a GAIN keyword, "
            "or give an uncertainty (e.g. ccdproc.create_deviation)",
            NoiseEstimateWarning,
            stacklevel=user_stacklevel(),
        )


def _saturation_level(
    saturation: Any, meta: Any, data: np.ndarray, bad: np.ndarray, unit: u.UnitBase
) -> float | None:
    """The saturation level: given, else the header keyword, else detected (with a warning).

    ``saturation=np.inf`` (or an infinite Quantity) disables masking and detection.
    """
    raw = saturation.value if isinstance(saturation, u.Quantity) else saturation
    if isinstance(raw, numbers.Real) and np.isposinf(raw):
        return None
    level = _as_float(saturation, unit, "saturation")
    if level is None:
        level = _header_float(meta, SATURATION_KEYS)
    if level is not None:
        return level
    level = detect_saturation(data, bad)
    if level is not None:
        with np.errstate(invalid="ignore"):
            n_pix = int(np.count_nonzero((data >= level) & ~bad))
        warnings.warn(
            f"saturation found in the data (no saturation= and no SATURATE keyword): "
            f"{n_pix} pixels at or above {level:.6g} {unit} are masked; pass saturation= "
            "to set the level, or saturation=np.inf to keep them",
            SaturationWarning,
            stacklevel=user_stacklevel(),
        )
    return level


def _copy_meta(meta: Any) -> dict:
    if meta is None:
        return {}
    if isinstance(meta, fits.Header):
        return meta.copy()
    return dict(meta)


def record_step(meta: Any, key: str, text: str) -> Any:
    """Record a processing step in ``meta`` under a short FITS-safe key.

    The spirit of ccdproc's ``log_to_metadata``: the key names the step, the
    value says what was done with which parameters. Keys are at most 8
    characters so that `~astropy.nddata.CCDData.write` needs no HIERARCH cards.

    Parameters
    ----------
    meta : dict or `~astropy.io.fits.Header`
        Updated in place (pass a copy you own).
    key : str
        Upper-case key of at most 8 characters, e.g. ``"AZSUB"``.
    text : str
        A printable-ASCII description of the step.

    Returns
    -------
    dict or `~astropy.io.fits.Header`
        ``meta``, for chaining.

    Examples
    --------
    >>> from astro_zackay._ccd import record_step
    >>> record_step({}, "AZSUB", "ZOGY difference, beta=0.98")
    {'AZSUB': 'ZOGY difference, beta=0.98'}
    """
    if len(key) > 8 or not key.isupper():
        raise ValueError(f"meta key {key!r} must be upper case and at most 8 characters")
    text = text.encode("ascii", "replace").decode("ascii")
    meta[key] = text
    return meta


def to_ccddata(
    data: np.ndarray,
    template: ImageData,
    *,
    unit: Any = None,
    variance: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    step: tuple[str, str] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> CCDData:
    """Wrap a result array into a new `~astropy.nddata.CCDData` like ``template``.

    Parameters
    ----------
    data : `~numpy.ndarray`
        The result, the same shape as the template image.
    template : ImageData
        Gives the WCS, a copy of the meta, and default unit and mask.
    unit : str or `~astropy.units.Unit`, optional
        The result's unit; default the template's.
    variance : `~numpy.ndarray`, optional
        The result's variance, stored as a `~astropy.nddata.StdDevUncertainty`.
    mask : `~numpy.ndarray`, optional
        The result's mask; default the template's mask. Non-finite results are masked too.
    step : (str, str), optional
        ``(key, text)`` recorded in meta with :func:`record_step`.
    extra_meta : dict, optional
        Further (short-keyed) entries for meta.

    Returns
    -------
    `~astropy.nddata.CCDData`

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._ccd import to_ccddata, to_image
    >>> from astropy.nddata import StdDevUncertainty
    >>> img = to_image(np.zeros((3, 3)), unit="electron",
    ...                uncertainty=StdDevUncertainty(np.ones((3, 3))))
    >>> out = to_ccddata(np.ones((3, 3)), img, variance=np.full((3, 3), 4.0),
    ...                  step=("AZTEST", "a test step"))
    >>> out.uncertainty.array[0, 0], out.meta["AZTEST"]
    (np.float64(2.0), 'a test step')
    """
    data = np.asarray(data)
    if data.shape != template.shape:
        raise ValueError(f"result shape {data.shape} differs from the image {template.shape}")
    out_mask = template.mask.copy() if mask is None else np.asarray(mask, dtype=bool).copy()
    out_mask |= ~np.isfinite(data)
    uncertainty = None
    if variance is not None:
        variance = np.asarray(variance)
        out_mask |= ~np.isfinite(variance)
        std = np.maximum(variance, 0.0)  # one frame-sized array: the square root in place
        uncertainty = StdDevUncertainty(np.sqrt(std, out=std))
    meta = _copy_meta(template.meta)
    if step is not None:
        record_step(meta, *step)
    for key, value in (extra_meta or {}).items():
        meta[key] = value
    out_unit = template.unit if unit is None else u.Unit(unit)
    # the input's BUNIT describes the input; CCDData.write writes the result's own unit,
    # except a dimensionless one, which astropy omits and CCDData.read then rejects
    meta.pop("BUNIT", None)
    if out_unit == u.dimensionless_unscaled:
        meta["BUNIT"] = "1"
    return CCDData(
        data,
        unit=out_unit,
        mask=out_mask,
        uncertainty=uncertainty,
        wcs=template.wcs.deepcopy() if template.wcs is not None else None,
        meta=meta,
    )


def as_ccddata(image: ImageData) -> CCDData:
    """A CCDData view of `ImageData` (no copy of the arrays), for steps that take images.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.nddata import StdDevUncertainty
    >>> from astro_zackay._ccd import as_ccddata, to_image
    >>> img = to_image(np.ones((2, 2)), unit="adu", uncertainty=StdDevUncertainty(np.ones((2, 2))))
    >>> as_ccddata(img).data is img.data
    True
    """
    return CCDData(
        image.data,
        unit=image.unit,
        mask=image.mask,
        uncertainty=StdDevUncertainty(np.sqrt(image.variance)),
        wcs=image.wcs,
        meta=image.meta,
    )


def _count_form(unit: u.UnitBase) -> tuple[u.UnitBase, float, bool] | None:
    """``(base, scale, rate)``: ``unit = scale * base`` (per second when ``rate``), else None.

    ``base`` is `~astropy.units.electron` (photons count as electrons, as in `to_image`)
    or `~astropy.units.adu`.
    """
    for base, aliases in ((u.electron, _ELECTRON_UNITS), (u.adu, (u.adu,))):
        for alias in aliases:
            for rate in (False, True):
                try:
                    return base, float(unit.to(alias / u.s if rate else alias)), rate
                except u.UnitConversionError:
                    continue
    return None


def _unit_gain(img: ImageData, gain: Any, name: str, target: str, unit: u.UnitBase) -> float:
    """The gain (e-/ADU) for converting ``img`` to ``unit``: given, the image's, or a keyword."""
    value = _as_float(gain, u.electron / u.adu, "gain")
    if value is None and img.unit == u.adu:
        value = img.gain
    if value is None:
        value = _header_float(img.meta, GAIN_KEYS)
        if value is not None and img.unit != u.adu:
            # the keyword of an image in electrons: a guess that it is the ADU side's gain
            warnings.warn(
                f"the {target} is in {unit} and the {name} in {img.unit}: the conversion "
                f"uses the {name}'s gain keyword ({value:.6g} e-/ADU) as the gain of the "
                f"{target}'s ADU; pass gain= for the {target} if it differs",
                UnitConversionWarning,
                stacklevel=user_stacklevel(),
            )
    if value is None:
        raise u.UnitsError(
            f"the {name} is in {img.unit} and the {target} in {unit}: converting between "
            f"electrons and ADU needs the {name}'s gain (e-/ADU); pass gain= or give the "
            "image a GAIN keyword"
        )
    return value


def _unit_factor(
    img: ImageData, unit: u.UnitBase, gain: Any, name: str, target: str
) -> tuple[float, str]:
    """The factor that takes ``img``'s data to ``unit``, and how it was made."""
    try:
        return float(img.unit.to(unit)), "scale"
    except u.UnitConversionError:
        pass
    source, goal = _count_form(img.unit), _count_form(unit)
    if source is None or goal is None:
        raise u.UnitsError(
            f"the {name} is in {img.unit} and the {target} in {unit}: no conversion between "
            "them is known (only electrons, ADU and their rates per second convert)"
        )
    factor, how = source[1] / goal[1], []
    if source[0] != goal[0]:
        value = _unit_gain(img, gain, name, target, unit)
        factor *= value if goal[0] == u.electron else 1.0 / value
        how.append(f"gain {value:.6g} e-/ADU")
    if source[2] != goal[2]:
        exptime = _header_float(img.meta, EXPTIME_KEYS)
        if exptime is None:
            raise u.UnitsError(
                f"the {name} is in {img.unit} and the {target} in {unit}: converting a count "
                f"rate needs the {name}'s exposure time, and it has no EXPTIME keyword"
            )
        factor *= exptime if source[2] else 1.0 / exptime
        how.append(f"exposure time {exptime:.6g} s")
    return factor, ", ".join(how)


def match_unit(
    img: ImageData, unit: u.UnitBase, *, gain: float | None, name: str, target: str
) -> ImageData:
    """``img`` in ``unit``: itself when already in it, else a converted copy.

    The data, variance, saturation level, gain and sky maps are converted; electrons
    and ADU convert through the gain, count rates (e.g. electron / s) and counts
    through the EXPTIME (or EXPOSURE) keyword. The conversion is logged and recorded
    in the copy's meta under ``AZUNIT``.

    Parameters
    ----------
    img : ImageData
        The image to convert (never modified).
    unit : `~astropy.units.UnitBase`
        The unit wanted, e.g. the other image's.
    gain : float or `~astropy.units.Quantity` or None
        Electrons per ADU of ``img`` (or of the ADU side of the conversion); default the
        image's own gain when it is in ADU, else its GAIN (EGAIN, CCDGAIN) keyword.
    name, target : str
        What ``img`` and the image giving ``unit`` are, for the messages, e.g.
        ``"science image"`` and ``"reference image"``.

    Returns
    -------
    ImageData

    Raises
    ------
    astropy.units.UnitsError
        When electrons and ADU must be converted without a gain, a count rate without
        an exposure time, or the units are not related at all.

    Warns
    -----
    UnitConversionWarning
        When ``img`` is in electrons and no ``gain`` is given, so that its own GAIN
        keyword is taken for the gain of the other image's ADU.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy import units as u
    >>> from astropy.nddata import StdDevUncertainty
    >>> from astro_zackay._ccd import match_unit, to_image
    >>> img = to_image(np.full((3, 3), 10.0), unit="adu", saturation=100.0,
    ...                uncertainty=StdDevUncertainty(np.ones((3, 3))))
    >>> out = match_unit(img, u.electron, gain=1.5, name="science image",
    ...                  target="reference image")
    >>> float(out.data[0, 0]), float(out.variance[0, 0]), out.saturation, str(out.unit)
    (15.0, 2.25, 150.0, 'electron')
    >>> out.meta["AZUNIT"]
    'science image: adu -> electron x1.5 (gain 1.5 e-/ADU)'
    >>> match_unit(img, u.adu, gain=None, name="science image", target="reference") is img
    True
    """
    unit = u.Unit(unit)
    factor, how = _unit_factor(img, unit, gain, name, target)
    if factor == 1.0 and how == "scale":
        return img
    if not (np.isfinite(factor) and factor > 0):
        raise u.UnitsError(f"the {name}'s unit {img.unit} gives a factor {factor} to {unit}")
    return _scaled(img, unit, factor, f"{name}: {img.unit} -> {unit} x{factor:.6g} ({how})")


def _scaled(img: ImageData, unit: u.UnitBase, factor: float, text: str) -> ImageData:
    """A copy of ``img`` with everything in data units multiplied by ``factor``."""
    log.info("unit conversion: %s", text)
    data = img.data * factor
    maps = img.sky_maps
    if maps is not None:
        maps = SkyMaps(data, maps.box, maps.sky * factor, maps.rms * factor)
    electrons = unit in _ELECTRON_UNITS
    return replace(
        img,
        data=data,
        variance=img.variance * factor**2,
        mask=img.mask.copy(),
        unit=unit,
        meta=record_step(_copy_meta(img.meta), "AZUNIT", text),
        gain=1.0 if electrons else (None if img.gain is None else img.gain / factor),
        saturation=None if img.saturation is None else img.saturation * factor,
        sky_maps=maps,
    )
