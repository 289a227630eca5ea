"""The option checks of `subtract` and `coadd`, run before any image is read.

`check_subtract_options` and `check_coadd_options` are what `~astro_zackay.subtract`
and `~astro_zackay.coadd` run first. The functions that run them on a Dask cluster
(`~astro_zackay.parallel.subtract_batch`, `~astro_zackay.parallel.coadd_batch`, and
the tiled and tree functions) run them before a cluster starts, so that an option that
would fail every task fails the call at once, with the message `subtract` or `coadd`
gives.

Both take the options as keywords, so that a caller holding them in a mapping writes
``check_subtract_options(**options)``. Each option given is checked and one left out
is not (its default is valid); a name that `subtract` (or `coadd`) does not take is a
TypeError. They check what can be checked without the images: options whose meaning
depends on the images (the number of ``psfs`` of a coadd against the number of images,
an image too small for its PSF) are checked by `subtract` and `coadd` once the images'
shapes or number are known.

The small validators they share (`is_positive`, `is_non_negative`, `is_whole`,
`check_choice`, `check_flag`, `as_pair`, `per_image_values`) and `named_errors`, which
puts an image's name ahead of the message of an error about it, serve the rest of the
package too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from astropy import units as u
from astropy.modeling import Model

from ._ccd import _as_float, _parse_unit
from ._psf_input import as_psf_sampler
from ._zogy_field import check_tiles
from .coadd_algebra import check_depth_fraction, working_dtype
from .fourier import get_array_module

__all__ = [
    "ALIGN_CHOICES",
    "as_pair",
    "check_align",
    "check_choice",
    "check_coadd_options",
    "check_flag",
    "check_subtract_options",
    "check_workers",
    "is_non_negative",
    "is_per_image_gain",
    "is_positive",
    "is_whole",
    "named_errors",
    "per_image_values",
]

#: What ``align=`` takes, in `subtract` and `coadd` alike (True means 'stars').
ALIGN_CHOICES = (None, False, True, "stars", "wcs")


# --- the small validators ---------------------------------------------------------------------
def is_positive(value: Any) -> bool:
    """Whether ``value`` is one finite real number > 0 (not a bool, a string or an array).

    Examples
    --------
    >>> from astro_zackay._checks import is_positive
    >>> is_positive(2.5), is_positive(0), is_positive(float("inf")), is_positive("3")
    (True, False, False, False)
    """
    return (isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
            and math.isfinite(value) and value > 0)


def is_non_negative(value: Any) -> bool:
    """Whether ``value`` is one finite real number >= 0 (not a bool, a string or an array)."""
    return is_positive(value) or (isinstance(value, numbers.Real)
                                  and not isinstance(value, bool | np.bool_) and value == 0)


def is_whole(value: Any, low: int = 0) -> bool:
    """Whether ``value`` is one finite whole number >= ``low`` (2.0 is; 2.5, inf and "2" not).

    Examples
    --------
    >>> from astro_zackay._checks import is_whole
    >>> is_whole(3), is_whole(3.0), is_whole(2.5), is_whole(-1), is_whole(True)
    (True, True, False, False, False)
    """
    return (isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
            and math.isfinite(value) and value == int(value) and value >= low)


def _is_choice(value: Any, choice: Any) -> bool:
    """Whether ``value`` is ``choice``: None and the bools by identity, others by type and value.

    So ``1`` is not True and ``0`` not False, while numpy's bools count as bools.
    """
    if choice is None:
        return value is None
    if isinstance(choice, bool):
        return isinstance(value, bool | np.bool_) and bool(value) is choice
    return isinstance(value, type(choice)) and value == choice


def check_choice(value: Any, name: str, choices: Iterable[Any], shown: str) -> None:
    """A ValueError ``"<name> must be <shown>, got <value>"`` unless ``value`` is a choice.

    Examples
    --------
    >>> from astro_zackay._checks import check_choice
    >>> check_choice("pink", "noise", ("auto", "white"), "'auto' or 'white'")
    Traceback (most recent call last):
    ...
    ValueError: noise must be 'auto' or 'white', got 'pink'
    """
    if not any(_is_choice(value, choice) for choice in choices):
        raise ValueError(f"{name} must be {shown}, got {value!r}")


def check_flag(value: Any, name: str, error: type[Exception] = ValueError) -> None:
    """An ``error`` ``"<name> must be True or False, got <value>"`` unless ``value`` is a bool."""
    if not isinstance(value, bool | np.bool_):
        raise error(f"{name} must be True or False, got {value!r}")


def as_pair(value: Any, name: str, pair: str = "(reference, science)") -> tuple[Any, Any]:
    """A two-valued option: one value for both, or a ``pair`` (default one per image).

    ``pair`` names the two values in the error for a sequence of another length.

    Examples
    --------
    >>> from astro_zackay._checks import as_pair
    >>> as_pair(1.5, "gain"), as_pair((1.5, 2.0), "gain")
    ((1.5, 1.5), (1.5, 2.0))
    """
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value or a {pair} pair, got {len(value)} "
                             f"values: {value!r}")
        return value[0], value[1]
    return value, value


def per_image_values(values: Any, name: str) -> list[Any] | None:
    """A per-image option of `coadd` as a list (None when not given).

    A TypeError for a single value: a string, a model, a number, or for ``psfs`` one
    2-D stamp.
    """
    if values is None:
        return None
    ndim = values.ndim if isinstance(values, np.ndarray) else None
    single = isinstance(values, str | Model) or not isinstance(values, Iterable)
    if single or ndim == 0 or (name == "psfs" and ndim == 2):
        raise TypeError(f"{name} must give one value per image (a list or array), got a single "
                        f"{type(values).__name__}")
    return list(values)


@contextmanager
def named_errors(name: str) -> Iterator[None]:
    """Put ``name`` ahead of the message of an error about one input, in the error's class.

    A bad input (a corrupt file, an unparsable unit, negative uncertainties, a bad PSF)
    is then reported as ``"science image: ..."``, ``"image 3: ..."`` or
    ``"night2.fits: ..."``. OSError, TypeError and ValueError (and their subclasses) are
    named; an error class that cannot be made from one message is raised as it is.

    Examples
    --------
    >>> from astro_zackay._checks import named_errors
    >>> with named_errors("image 2"):
    ...     float("x")
    Traceback (most recent call last):
    ...
    ValueError: image 2: could not convert string to float: 'x'
    """
    try:
        yield
    except (OSError, TypeError, ValueError) as exc:
        try:
            named = type(exc)(f"{name}: {exc}")
        except TypeError:  # an exception class that needs other arguments: kept as it is
            raise exc from None
        raise named from exc


def _check_level(value: Any, name: str) -> None:
    """A gain, read noise or saturation: None, or one positive finite number or Quantity.

    As the CCDData boundary (`~astro_zackay._ccd.to_image`) refuses them, before any
    image is read; a saturation of +inf (masking nothing) is taken.
    """
    raw = value.value if isinstance(value, u.Quantity) else value
    if name == "saturation" and isinstance(raw, numbers.Real) and np.isposinf(raw):
        return
    _as_float(value, None, name)


def _check_the_options(
    given: dict[str, Any], checks: dict[str, Callable[[Any], None]], function: str
) -> None:
    """Run the check of each option given, in the order of ``checks``; unknown names refused."""
    unknown = [name for name in given if name not in checks]
    if unknown:
        raise TypeError(f"{function}() does not take the option(s) "
                        f"{', '.join(map(repr, unknown))}; it takes {', '.join(checks)}")
    for name, check in checks.items():
        if name in given:
            check(given[name])


# --- subtract ---------------------------------------------------------------------------------
def _check_noise(noise: Any) -> None:
    check_choice(noise, "noise", ("auto", "white"), "'auto' or 'white'")


def _check_psf_error(psf_error: Any) -> None:
    if isinstance(psf_error, str) or psf_error is None:
        if psf_error not in ("auto", None):
            raise ValueError(f"psf_error must be 'auto', None or numbers, got {psf_error!r}")
        return
    if not all(is_non_negative(value) for value in as_pair(psf_error, "psf_error")):
        raise ValueError(f"psf_error must be >= 0 (one number, or a (reference, science) "
                         f"pair), got {psf_error!r}")


def _check_flux_ratio(flux_ratio: Any) -> None:
    if flux_ratio is not None and not is_positive(flux_ratio):
        raise ValueError(
            f"flux_ratio must be a positive finite number (science / reference flux), got "
            f"{flux_ratio!r}; pass None to fit it"
        )


def _check_astrometric_noise(value: Any) -> None:
    if value is None or (isinstance(value, str) and value == "auto"):
        return
    values = as_pair(value, "astrometric_noise", "(sigma_x, sigma_y)")
    if not all(is_non_negative(v) for v in values):
        raise ValueError(
            f"astrometric_noise must be 'auto', None, or finite sigmas >= 0 in pixels (one "
            f"value or an (x, y) pair), got {value!r}; pass 0 for no registration noise"
        )


def check_align(align: Any) -> None:
    """``align=`` of `subtract` and `coadd`: False (or None), True (= 'stars'), 'stars', 'wcs'."""
    check_choice(align, "align", ALIGN_CHOICES, "False, 'stars' or 'wcs'")


def _check_subtract_dtype(dtype: Any) -> None:
    """`coadd`'s check of ``dtype`` (`working_dtype`), as the ValueError `subtract` raises."""
    try:
        working_dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be numpy.float32 or numpy.float64, got {dtype!r}") from None


def check_workers(workers: Any) -> None:
    """``workers=`` of `subtract` (its FFT threads): None, or a whole number other than 0.

    As `scipy.fft` takes it: a negative number counts back from the cores
    (-1 all of them, -2 all but one).

    Examples
    --------
    >>> from astro_zackay._checks import check_workers
    >>> check_workers(4), check_workers(-1), check_workers(None)
    (None, None, None)
    >>> try:
    ...     check_workers(0)
    ... except ValueError as exc:
    ...     print(str(exc)[:55])
    workers must be None (all the cores) or a whole number
    """
    if workers is None:
        return
    if not isinstance(workers, numbers.Integral) or isinstance(workers, bool | np.bool_):
        raise TypeError(f"workers must be None (all the cores) or a whole number of FFT "
                        f"threads, got {workers!r} ({type(workers).__name__}): give an int")
    if workers == 0:
        raise ValueError("workers must be None (all the cores) or a whole number of FFT "
                         "threads other than 0 (-1 all the cores, -2 all but one), got 0")


def _psf_check(name: str) -> Callable[[Any], None]:
    """The check of ``reference_psf`` or ``science_psf``: None, or a PSF, named in its error."""

    def check(psf: Any) -> None:
        if psf is not None:
            with named_errors(name):
                as_psf_sampler(psf)

    return check


def _per_image_check(name: str, check: Callable[[Any], None]) -> Callable[[Any], None]:
    """The check of a ``(reference, science)`` option: its form, then each value, named.

    The science image's value first: `subtract` reads the science image first.
    """

    def check_pair(value: Any) -> None:
        values = as_pair(value, name)
        for image, one in (("science image", values[1]), ("reference image", values[0])):
            with named_errors(image):
                check(one)

    return check_pair


_SUBTRACT_CHECKS: dict[str, Callable[[Any], None]] = {
    "noise": _check_noise,
    "psf_error": _check_psf_error,
    "backend": get_array_module,  # an unknown name, or cupy without CuPy
    "tiles": check_tiles,
    "flux_ratio": _check_flux_ratio,
    "astrometric_noise": _check_astrometric_noise,
    "fit_shift": lambda value: check_flag(value, "fit_shift"),
    "align": check_align,
    "dtype": _check_subtract_dtype,
    "reference_psf": _psf_check("reference_psf"),
    "science_psf": _psf_check("science_psf"),
    "unit": _per_image_check("unit", _parse_unit),
    "gain": _per_image_check("gain", lambda value: _check_level(value, "gain")),
    "read_noise": _per_image_check("read_noise", lambda value: _check_level(value, "read_noise")),
    "saturation": _per_image_check("saturation", lambda value: _check_level(value, "saturation")),
    "workers": check_workers,
}


def check_subtract_options(**options: Any) -> None:
    """Refuse, before any work, an option of `~astro_zackay.subtract` that it does not take.

    Parameters
    ----------
    **options
        Any of `~astro_zackay.subtract`'s keywords (``reference_psf``, ``flux_ratio``,
        ``tiles``, ``unit``, ``psf_error``, ...), as it takes them; those left out are
        not checked. A mapping of options is given as ``**options``.

    Raises
    ------
    ValueError
        For an option's value that `~astro_zackay.subtract` refuses, with its message:
        the option, what was wrong and what to give; a per-image option's message
        starts with the image (``"science image: unit='x' is not a unit ..."``), a PSF's
        with its option (``"reference_psf: ..."``).
    TypeError
        For a name that `~astro_zackay.subtract` does not take, or a PSF of no kind it
        knows.
    ImportError
        For ``backend='cupy'`` without CuPy (the message names the pip package).

    Examples
    --------
    >>> from astro_zackay._checks import check_subtract_options
    >>> check_subtract_options(flux_ratio=0.8, tiles=256, unit=("adu", "electron"))
    >>> check_subtract_options(**{"tiles": 16})
    Traceback (most recent call last):
    ...
    ValueError: tiles must be 'auto', None or an integer side >= 32 px, got 16
    """
    _check_the_options(options, _SUBTRACT_CHECKS, "subtract")


# --- coadd ------------------------------------------------------------------------------------
def _check_border(border: Any) -> None:
    if border is not None and not is_whole(border):
        raise ValueError(f"border must be a non-negative whole number of pixels, got {border!r}")


def _check_reject(reject: Any) -> None:
    if reject is not None and reject is not False and not is_positive(reject):
        raise ValueError(f"reject must be a positive threshold in sigma or None, got {reject!r}")


def _check_reject_grow(grow: Any) -> None:
    if not is_whole(grow):
        raise ValueError(f"reject_grow must be a non-negative integer, got {grow!r}")


def _check_reject_model_error(model_error: Any) -> None:
    if not is_non_negative(model_error):
        raise ValueError(f"reject_model_error must be >= 0, got {model_error!r}")


def _positive_values(name: str) -> Callable[[Any], None]:
    """The check of ``flux_scales`` or ``sigmas``: one positive number (or None) per image."""

    def check(values: Any) -> None:
        for j, value in enumerate(per_image_values(values, name) or []):
            number = value.value if isinstance(value, u.Quantity) else value
            if value is not None and not is_positive(number):
                raise ValueError(f"{name}[{j}] must be a positive number (or None to measure "
                                 f"it), got {value!r}")

    return check


def _check_coadd_gain(gain: Any) -> None:
    """One gain for every image, or one per image (each None or a positive number)."""
    if not is_per_image_gain(gain):
        _check_level(gain, "gain")
        return
    for j, value in enumerate(gain):
        _check_level(value, f"gain[{j}]")


def is_per_image_gain(gain: Any) -> bool:
    """Whether ``gain`` gives one value per image (else one value, or None, for all)."""
    if gain is None or isinstance(gain, str | u.Quantity) and np.ndim(gain) == 0:
        return False
    return isinstance(gain, Iterable) and np.ndim(gain) == 1


def _coadd_checks(image_names: Sequence[str] | None) -> dict[str, Callable[[Any], None]]:
    """The checks of `coadd`'s options, in the order `coadd` has always run them."""

    def check_psfs(values: Any) -> None:
        for j, value in enumerate(per_image_values(values, "psfs") or []):
            if value is not None:
                name = image_names[j] if image_names is not None and j < len(image_names) \
                    else f"image {j}"
                with named_errors(f"psfs[{j}] ({name})"):
                    as_psf_sampler(value)

    return {
        "dtype": working_dtype,
        "min_depth_fraction": check_depth_fraction,
        "align": check_align,
        "border": _check_border,
        "unit": _parse_unit,
        "saturation": lambda value: _check_level(value, "saturation"),
        "flux_scales": _positive_values("flux_scales"),
        "sigmas": _positive_values("sigmas"),
        "psfs": check_psfs,
        "gain": _check_coadd_gain,
        "reject": _check_reject,
        "reject_grow": _check_reject_grow,
        "reject_model_error": _check_reject_model_error,
        "backend": get_array_module,  # an unknown name, or cupy without CuPy
    }


def check_coadd_options(*, image_names: Sequence[str] | None = None, **options: Any) -> None:
    """Refuse, before any work, an option of `~astro_zackay.coadd` that it does not take.

    Parameters
    ----------
    image_names : sequence of str, optional
        Not an option: the images' names, for the message about a bad PSF of ``psfs``
        (``"psfs[1] (night2.fits): ..."``); default ``image <j>``.
    **options
        Any of `~astro_zackay.coadd`'s keywords, as it takes them (``psfs``,
        ``flux_scales`` and ``sigmas`` one value per image, ``gain`` one value or one
        per image); those left out are not checked. A mapping of options is given as
        ``**options``. The number of per-image values is not checked here: it depends
        on the images.

    Raises
    ------
    ValueError
        For an option's value that `~astro_zackay.coadd` refuses, with its message.
    TypeError
        For a name that `~astro_zackay.coadd` does not take, a per-image option given
        as one value, a PSF of no kind it knows, or a ``dtype`` other than float32 and
        float64.
    ImportError
        For ``backend='cupy'`` without CuPy (the message names the pip package).

    Examples
    --------
    >>> from astro_zackay._checks import check_coadd_options
    >>> check_coadd_options(psfs=[3.0, 2.5], flux_scales=[1.0, None], reject=None)
    >>> check_coadd_options(flux_scales=[1.0, -1.0])
    Traceback (most recent call last):
    ...
    ValueError: flux_scales[1] must be a positive number (or None to measure it), got -1.0
    """
    _check_the_options(options, _coadd_checks(image_names), "coadd")
