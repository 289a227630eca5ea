"""Warning classes of astro_zackay.

Every warning the package emits is a subclass of
`~astropy.utils.exceptions.AstropyUserWarning`, so users can filter all of
them with one line::

    import warnings
    from astro_zackay import AstroZackayWarning
    warnings.simplefilter("ignore", AstroZackayWarning)
"""

from astropy.utils.exceptions import AstropyUserWarning

__all__ = [
    "AstroZackayWarning",
    "FewStarsWarning",
    "NoiseEstimateWarning",
    "PSFQualityWarning",
    "SaturationWarning",
]


class AstroZackayWarning(AstropyUserWarning):
    """Base class of every warning emitted by astro_zackay."""


class NoiseEstimateWarning(AstroZackayWarning):
    """A noise level had to be estimated or is unreliable."""


class PSFQualityWarning(AstroZackayWarning):
    """A PSF could not be estimated to the requested quality."""


class FewStarsWarning(PSFQualityWarning):
    """Fewer PSF stars were found than a reliable PSF model needs."""


class SaturationWarning(AstroZackayWarning):
    """Saturation was detected in the data (no keyword or ``saturation=`` gave it) and masked."""
