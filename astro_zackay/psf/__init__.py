"""Point-spread functions: Karhunen-Loeve (Lauer 2002), constant and analytic models.

`estimate_psf` turns an image and its stars into a `KLPSFModel`, a spatially varying,
unit-sum PSF that is also an astropy ``Fittable2DModel`` (parameters ``x_0``, ``y_0``,
``flux``) usable as the model of `photutils.psf.PSFPhotometry`.
"""

from .estimate import estimate_psf
from .model import KLPSFModel

__all__ = ["KLPSFModel", "estimate_psf"]
