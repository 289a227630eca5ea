"""Point-spread functions: Karhunen-Loeve (Lauer 2002), constant and analytic models.

`estimate_psf` turns an image and its stars into a `KLPSFModel`, a spatially varying,
unit-sum PSF that is also an astropy ``Fittable2DModel`` (parameters ``x_0``, ``y_0``,
``flux``) usable as the model of `photutils.psf.PSFPhotometry`.

Modules: ``stamps`` (cutting, backgrounds, recentring, neighbours, offsets, moments),
``ladder`` (which model the usable stars support), ``builders`` (one per method:
KL, constant, analytic, Gaussian of a given FWHM), ``kl`` (the Karhunen-Loeve algebra),
``analytic`` (profile fits through `astro_zackay.profiles`), ``wings`` (the analytic
outer wing), ``model`` (`KLPSFModel`) and ``estimate`` (the image-level step).
"""

from .estimate import estimate_psf
from .model import KLPSFModel

__all__ = ["KLPSFModel", "estimate_psf"]
