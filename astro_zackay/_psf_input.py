"""The one place where a user's PSF (model, array or None) becomes a function of position."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.modeling import Model

__all__ = ["PSFSampler", "as_psf_sampler"]

log = logging.getLogger(__name__)

_POSITION_PARAMETERS = (("x_0", "y_0"), ("x_mean", "y_mean"))


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
    """

    sample: Callable[[float, float], np.ndarray]
    varying: bool
    source: str

    def __call__(self, x: float, y: float) -> np.ndarray:
        return self.sample(x, y)


def _unit_sum(stamp: np.ndarray, what: str) -> np.ndarray:
    stamp = np.asarray(stamp, dtype=np.float64)
    if stamp.ndim != 2 or stamp.shape[0] % 2 == 0 or stamp.shape[1] % 2 == 0:
        raise ValueError(
            f"{what} must be a 2-D stamp with odd sides (centred on its central pixel), "
            f"got shape {stamp.shape}"
        )
    if not np.all(np.isfinite(stamp)):
        raise ValueError(f"{what} has non-finite values")
    total = stamp.sum()
    if not total > 0:
        raise ValueError(f"{what} sums to {total}; a PSF must have a positive sum")
    if abs(total - 1.0) > 1e-3:
        log.info("%s sums to %.6g; normalised to unit sum", what, total)
    return stamp / total


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


def as_psf_sampler(psf: Any, *, stamp_shape: tuple[int, int] = (25, 25)) -> PSFSampler:
    """Turn a PSF given by a user into a `PSFSampler`.

    Parameters
    ----------
    psf : KLPSFModel, astropy/photutils model, or `~numpy.ndarray`
        A model with a ``psf_at(x, y)`` method (`~astro_zackay.psf.KLPSFModel`), an
        astropy 2-D model with ``x_0``/``y_0`` (photutils PSF models) or
        ``x_mean``/``y_mean`` (`~astropy.modeling.functional_models.Gaussian2D`), or
        an odd-sized stamp centred on its central pixel (normalised to unit sum).
    stamp_shape : tuple of int
        The odd stamp shape for models that have no stamp of their own.

    Returns
    -------
    PSFSampler

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.modeling.models import Gaussian2D
    >>> from astro_zackay._psf_input import as_psf_sampler
    >>> sampler = as_psf_sampler(Gaussian2D(1, 0, 0, 1.5, 1.5), stamp_shape=(15, 15))
    >>> stamp = sampler(40.3, 12.0)
    >>> stamp.shape, round(float(stamp.sum()), 12), bool(stamp[7, 7] == stamp.max())
    ((15, 15), 1.0, True)
    """
    if hasattr(psf, "psf_at"):
        varying = bool(getattr(psf, "is_varying", True))
        return PSFSampler(lambda x, y: _unit_sum(psf.psf_at(x, y), "the PSF"), varying,
                          type(psf).__name__)
    if isinstance(psf, Model):
        if any(n % 2 == 0 for n in stamp_shape):
            raise ValueError(f"stamp_shape must be odd, got {stamp_shape}")
        return _model_sampler(psf, tuple(stamp_shape))
    if isinstance(psf, np.ndarray | list | tuple):
        stamp = _unit_sum(psf, "the PSF array")
        return PSFSampler(lambda x, y: stamp, False, "array")
    raise TypeError(
        f"cannot use a {type(psf).__name__} as a PSF: give a KLPSFModel, an astropy or "
        "photutils PSF model, or an odd-sized 2-D array"
    )
