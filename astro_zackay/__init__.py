"""astro_zackay: proper image subtraction, proper coaddition and KL PSFs on CCDData."""

try:
    from ._version import version as __version__
except ImportError:  # pragma: no cover - only in a source tree that was never built
    __version__ = "0.0.0"

from ._warnings import AstroZackayWarning, NoiseEstimateWarning, PSFQualityWarning

__all__ = ["AstroZackayWarning", "NoiseEstimateWarning", "PSFQualityWarning", "__version__"]
