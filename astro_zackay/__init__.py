"""astro_zackay: proper image subtraction, proper coaddition and KL PSFs on CCDData.

The public functions take `~astropy.nddata.CCDData` (or NDData, arrays with a unit,
FITS files and HDUs) and return new CCDData, tables or result objects:

- `estimate_background`, `subtract_background`: sky and rms maps;
- `find_psf_stars`: bright, isolated, unsaturated point sources;
- `estimate_psf` -> `KLPSFModel`: Karhunen-Loeve PSFs (Lauer 2002);
- `align`: registration by stars or WCS;
- `subtract` -> `SubtractionResult`: ZOGY (Zackay, Ofek & Gal-Yam 2016);
- `coadd` -> `CoaddResult`: proper coaddition (Zackay & Ofek 2017);
- `find_transients`: candidates in a score image;
- `simulation`: star fields and image pairs with known truth.
"""

try:
    from ._version import version as __version__
except ImportError:  # pragma: no cover - only in a source tree that was never built
    __version__ = "0.0.0"

from . import simulation
from ._warnings import (
    AstroZackayWarning,
    FewStarsWarning,
    NoiseEstimateWarning,
    PSFQualityWarning,
    SaturationWarning,
    UncertaintyWarning,
    UnitConversionWarning,
)
from .alignment import align
from .background import BackgroundResult, estimate_background, subtract_background
from .coaddition import CoaddResult, coadd
from .fluxmatch import StarMatch, match_stars
from .psf import KLPSFModel, estimate_psf
from .stars import find_psf_stars
from .subtraction import SubtractionResult, subtract
from .transients import find_transients

__all__ = [
    "AstroZackayWarning",
    "BackgroundResult",
    "CoaddResult",
    "FewStarsWarning",
    "KLPSFModel",
    "NoiseEstimateWarning",
    "PSFQualityWarning",
    "SaturationWarning",
    "StarMatch",
    "SubtractionResult",
    "UncertaintyWarning",
    "UnitConversionWarning",
    "__version__",
    "align",
    "coadd",
    "estimate_background",
    "estimate_psf",
    "find_psf_stars",
    "find_transients",
    "match_stars",
    "simulation",
    "subtract",
    "subtract_background",
]
