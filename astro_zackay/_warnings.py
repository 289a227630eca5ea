"""Warning classes of astro_zackay.

Every warning the package emits is a subclass of
`~astropy.utils.exceptions.AstropyUserWarning`, so users can filter all of
them with one line::

    import warnings
    from astro_zackay import AstroZackayWarning
    warnings.simplefilter("ignore", AstroZackayWarning)

`user_stacklevel` gives the ``stacklevel`` with which the package's warnings
point at the user's line.
"""

import sys
from pathlib import Path

from astropy.utils.exceptions import AstropyUserWarning

__all__ = [
    "AstroZackayWarning",
    "FewStarsWarning",
    "NoiseEstimateWarning",
    "PSFQualityWarning",
    "SaturationWarning",
    "UncertaintyWarning",
    "UnitConversionWarning",
    "user_stacklevel",
]

_PACKAGE_DIR = str(Path(__file__).resolve().parent)


class AstroZackayWarning(AstropyUserWarning):
    """Base class of every warning emitted by astro_zackay."""


class NoiseEstimateWarning(AstroZackayWarning):
    """A noise level had to be estimated or is unreliable."""


class UncertaintyWarning(NoiseEstimateWarning):
    """Pixels of a given uncertainty could not be used (zero or a few negative) and were masked."""


class UnitConversionWarning(AstroZackayWarning):
    """A unit conversion used a value that was not given for it (another image's keyword)."""


class PSFQualityWarning(AstroZackayWarning):
    """A PSF could not be estimated to the requested quality."""


class FewStarsWarning(PSFQualityWarning):
    """Fewer PSF stars were found than a reliable PSF model needs."""


class SaturationWarning(AstroZackayWarning):
    """Saturation was detected in the data (no keyword or ``saturation=`` gave it) and masked."""


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller point at the user's code.

    Counts the frames from the function that calls this one up to the first frame
    whose code lies outside the astro_zackay package (decorators and private
    helpers included), so that a warning names the user's line however deep in the
    package it is issued.

    Returns
    -------
    int
        The ``stacklevel`` to pass to `warnings.warn` in the calling function.

    Examples
    --------
    Called from outside the package, the caller's own frame is the user's:

    >>> from astro_zackay._warnings import user_stacklevel
    >>> user_stacklevel()
    1
    """
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
