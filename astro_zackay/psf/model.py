"""`KLPSFModel`: a spatially varying PSF as an astropy model usable by photutils.

The model holds eigen-PSFs ``P_k`` (stamps of odd shape), polynomial fields of their
coefficients in scaled image coordinates, and what was learned while estimating
them (the stars, the held-out quality). It is a `~astropy.modeling.Fittable2DModel`
with parameters ``x_0``, ``y_0`` and ``flux``, so it is the ``psf_model`` of
`photutils.psf.PSFPhotometry` as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.modeling import Fittable2DModel, Parameter
from astropy.nddata import NDData
from astropy.table import Table
from scipy.ndimage import map_coordinates

from .._ccd import _check_fits_file
from .._checks import is_whole
from .kl import (
    design_matrix,
    evaluate_psf,
    image_scaling,
    polynomial_terms,
    scale_coordinates,
)

__all__ = ["KLPSFModel"]

log = logging.getLogger(__name__)

_FORMAT_VERSION = 2
#: Extensions and primary-header keys that every PSF file has.
_REQUIRED_EXTENSIONS = ("BASIS", "FIELDS", "EIGEN", "SELECT", "QUALITY", "META")
_REQUIRED_KEYS = ("METHOD", "DEGREE", "IMNY", "IMNX", "XC", "XS", "YC", "YS")
#: positions up to this fraction of the image's side outside it are evaluated (the
#: polynomials barely extrapolated); further out a varying model refuses them
POSITION_MARGIN = 0.1


class _PSFState:
    """The immutable arrays of a PSF model, shared (not copied) by model copies.

    `photutils.psf.PSFPhotometry` copies its model for every star; the arrays are
    read-only, so sharing them is safe and keeps those copies cheap.
    """

    def __init__(self, **arrays: Any) -> None:
        for name, value in arrays.items():
            if isinstance(value, np.ndarray):
                value = value.copy()
                value.flags.writeable = False
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the PSF state is immutable")

    def __deepcopy__(self, memo: dict) -> _PSFState:
        return self


class KLPSFModel(Fittable2DModel):
    """A spatially varying, unit-sum PSF from a Karhunen-Loeve basis.

    ``PSF(x, y) = sum_k a_k(x, y) P_k / sum_k a_k(x, y) sum(P_k)``, with each
    ``a_k`` a polynomial of total degree ``degree`` in ``u = (x - xc) / xs``,
    ``v = (y - yc) / ys`` (the image spans ``[-1, 1]``). Evaluated as a model, it is
    that PSF at ``(x_0, y_0)``, shifted to ``(x_0, y_0)`` by cubic-spline interpolation
    of the stamp (`scipy.ndimage.map_coordinates`, order 3) and scaled by ``flux``;
    zero outside the stamp. Usually made by `~astro_zackay.psf.estimate_psf`.

    Parameters
    ----------
    basis : array-like
        ``(K, ny, nx)`` eigen-PSFs, odd ``ny`` and ``nx``.
    fields : array-like
        ``(K, n_terms)`` polynomial coefficients of ``a_k`` (terms of
        `~astro_zackay.psf.kl.polynomial_terms`).
    image_shape : tuple of int
        ``(ny, nx)`` of the image the model describes.
    degree : int, optional
        Total degree of the coefficient polynomials.
    scaling : sequence of float, optional
        ``(xc, xs, yc, ys)``; default: the image centre and half-size.
    eigenvalues : array-like, optional
        The eigen-spectrum (squared singular values) of the star stamps.
    stars : `~astropy.table.Table`, optional
        The stars used, with a ``subset`` column (``'train'``/``'holdout'``).
    quality : dict, optional
        Held-out quality summary (see `quality`).
    selection : array-like, optional
        Median held-out chi2/dof for K = 1, 2, ... (when K was chosen that way).
    method : str, optional
        ``'kl'``, ``'constant'``, ``'gaussian'`` or ``'moffat'``.
    meta : dict, optional
        Extra numbers and notes (e.g. the fitted analytic ``fwhm``, ``ellipticity``,
        ``theta``, ``beta``; how the model was chosen).
    wing : array-like, optional
        ``(my, mx)`` outer wing, larger than the basis stamps and zero over the disk
        inscribed in them (or over the whole basis stamp), that holds the PSF's flux
        beyond that disk (its sum is that fraction): the PSF is then the core's pixels
        where the wing is zero, scaled to ``1 - sum(wing)``, plus the wing, on the wing's
        stamp (the core stamp's noisy corners come from the wing law).
    x_0, y_0, flux : float, optional
        The model parameters.
    **kwargs
        Passed to `~astropy.modeling.Fittable2DModel` (e.g. ``fixed``, ``bounds``).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay.psf import KLPSFModel
    >>> stamp = np.zeros((5, 5)); stamp[2, 2] = 0.6; stamp[2, 1] = stamp[2, 3] = 0.2
    >>> model = KLPSFModel(stamp[None], [[1.0]], image_shape=(100, 100), degree=0,
    ...                    x_0=12.0, y_0=30.0, flux=10.0)
    >>> float(model.psf_at(10.0, 20.0).sum())
    1.0
    >>> float(model(12.0, 30.0)), float(model(13.0, 30.0))
    (6.0, 2.0)
    """

    x_0 = Parameter(default=0.0, description="x position of the star (column)")
    y_0 = Parameter(default=0.0, description="y position of the star (row)")
    flux = Parameter(default=1.0, description="total flux of the star")

    def __init__(
        self,
        basis: Any,
        fields: Any,
        *,
        image_shape: tuple[int, int],
        degree: int = 2,
        scaling: Sequence[float] | None = None,
        eigenvalues: Any = None,
        stars: Table | None = None,
        quality: Mapping[str, float] | None = None,
        selection: Any = None,
        method: str = "kl",
        meta: Mapping[str, Any] | None = None,
        wing: Any = None,
        x_0: float = x_0.default,
        y_0: float = y_0.default,
        flux: float = flux.default,
        **kwargs: Any,
    ) -> None:
        basis = np.array(basis, dtype=float)
        fields = np.array(fields, dtype=float)
        if basis.ndim != 3 or basis.shape[1] % 2 == 0 or basis.shape[2] % 2 == 0:
            raise ValueError(f"basis must be (K, ny, nx) with odd ny, nx; got {basis.shape}")
        terms = polynomial_terms(int(degree))
        if fields.shape != (basis.shape[0], len(terms)):
            raise ValueError(
                f"fields must have shape (K, n_terms) = {(basis.shape[0], len(terms))} for "
                f"degree {degree}; got {fields.shape}"
            )
        wing = _check_wing(wing, basis.shape[1:])
        ny, nx = (int(n) for n in image_shape)
        if scaling is None:
            scaling = image_scaling((ny, nx))
        self._state = _PSFState(
            basis=basis,
            fields=fields,
            terms=terms,
            degree=int(degree),
            image_shape=(ny, nx),
            scaling=np.array(scaling, dtype=float),
            eigenvalues=np.array([] if eigenvalues is None else eigenvalues, dtype=float),
            stars=None if stars is None else Table(stars, copy=True),
            quality=MappingProxyType(dict(quality or {})),
            selection=np.array([] if selection is None else selection, dtype=float),
            method=str(method),
            meta=MappingProxyType(dict(meta or {})),
            wing=wing,
        )
        if kwargs.get("n_models", 1) > 1:
            raise ValueError("KLPSFModel does not support model sets (n_models > 1)")
        super().__init__(x_0=x_0, y_0=y_0, flux=flux, **kwargs)

    # --- read-only views of the state -------------------------------------------------
    @property
    def basis(self) -> np.ndarray:
        """``(K, ny, nx)`` eigen-PSFs (read-only)."""
        return self._state.basis

    @property
    def fields(self) -> np.ndarray:
        """``(K, n_terms)`` polynomial coefficients of the coefficient fields (read-only)."""
        return self._state.fields

    @property
    def eigenvalues(self) -> np.ndarray:
        """The eigen-spectrum (squared singular values) of the star stamps, largest first."""
        return self._state.eigenvalues

    @property
    def stars(self) -> Table | None:
        """A copy of the stars used, ``subset`` marking ``'train'`` / ``'holdout'``."""
        return None if self._state.stars is None else self._state.stars.copy()

    @property
    def quality(self) -> Mapping[str, float]:
        """Held-out quality: ``chi2_dof`` (median), ``residual_fraction`` and its noise
        floor ``noise_fraction`` (medians of ``sum|residual| / flux``),
        ``ellipticity_rms`` and ``size_error`` (median fractional) against the stars'
        own windowed moments, ``n_train``, ``n_holdout``."""
        return self._state.quality

    @property
    def selection(self) -> np.ndarray:
        """Median held-out chi2/dof for K = 1, 2, ... (empty when K was not chosen so)."""
        return self._state.selection

    @property
    def method(self) -> str:
        """How the model was made: ``'kl'``, ``'constant'``, ``'gaussian'``, ``'moffat'``."""
        return self._state.method

    @property
    def meta(self) -> Mapping[str, Any]:
        """Extra numbers of the model: how it was chosen (``method_used``, ``n_stars``,
        ``reason``), the analytic fit parameters, the wing law, if any."""
        return self._state.meta

    @property
    def wing(self) -> np.ndarray | None:
        """The outer wing stamp (zero over the core's inscribed disk), or None (read-only)."""
        return self._state.wing

    @property
    def core_shape(self) -> tuple[int, int]:
        """Shape ``(ny, nx)`` of the eigen-PSFs (the core of the PSF)."""
        return self._state.basis.shape[1:]

    @property
    def n_components(self) -> int:
        """The number of eigen-PSFs K."""
        return self._state.basis.shape[0]

    @property
    def is_varying(self) -> bool:
        """Whether the PSF changes across the image (more than one component and degree > 0).

        With one component the unit-sum normalisation removes the coefficient field,
        so the PSF is the same everywhere.
        """
        return self.n_components > 1 and self.degree > 0

    @property
    def degree(self) -> int:
        """Total degree of the coefficient polynomials."""
        return self._state.degree

    @property
    def stamp_shape(self) -> tuple[int, int]:
        """Shape ``(ny, nx)`` of the PSF stamps (core and wing)."""
        wing = self._state.wing
        return self.core_shape if wing is None else wing.shape

    @property
    def image_shape(self) -> tuple[int, int]:
        """Shape ``(ny, nx)`` of the image the model describes."""
        return self._state.image_shape

    @property
    def scaling(self) -> np.ndarray:
        """``(xc, xs, yc, ys)``: scaled coordinates are ``((x - xc)/xs, (y - yc)/ys)``."""
        return self._state.scaling

    # --- the PSF field ----------------------------------------------------------------
    @property
    def position_margin(self) -> tuple[float, float]:
        """``(margin_x, margin_y)``: how far outside the image a position may lie, in pixels.

        ``POSITION_MARGIN`` of the image's side (the polynomials in scaled coordinates
        reach at most ``1 + 2 * POSITION_MARGIN``), and at least half the stamp's side
        (any star whose stamp overlaps the image). Further out a varying model refuses
        positions (see `psf_at`).
        """
        (sy, sx), (ny, nx) = self.stamp_shape, self.image_shape
        return (max(float(sx // 2), POSITION_MARGIN * nx),
                max(float(sy // 2), POSITION_MARGIN * ny))

    def _design(self, x: Any, y: Any, *, bounded: bool) -> tuple[np.ndarray, bool]:
        """The design matrix at ``(x, y)`` (checked), and whether both were scalars.

        ``bounded``: refuse positions beyond `position_margin` outside the image.
        """
        scalar = np.ndim(x) == 0 and np.ndim(y) == 0
        x, y = _positions(x, y)
        if bounded:
            self._check_inside(x, y)
        u, v = scale_coordinates(x, y, self._state.scaling)
        return design_matrix(u, v, self._state.terms), scalar

    def _check_inside(self, x: np.ndarray, y: np.ndarray) -> None:
        """Refuse positions beyond `position_margin` outside the image (ValueError)."""
        (ny, nx), (mx, my) = self.image_shape, self.position_margin
        x_range, y_range = (-mx, nx - 1 + mx), (-my, ny - 1 + my)
        outside = ((x < x_range[0]) | (x > x_range[1]) | (y < y_range[0]) | (y > y_range[1]))
        if outside.any():
            i = int(np.argmax(outside))
            many = f" ({int(outside.sum())} of {x.size} positions)" if x.size > 1 else ""
            raise ValueError(
                f"x, y = ({x[i]:g}, {y[i]:g}) lies outside the {ny}x{nx} image the PSF model "
                f"was fitted on{many}: x must be in [{x_range[0]:g}, {x_range[1]:g}] and y in "
                f"[{y_range[0]:g}, {y_range[1]:g}] (the image and a margin around it); "
                "the coefficient polynomials are not extrapolated further. Give positions "
                "on the image, or estimate the PSF on the image you evaluate it on"
            )

    def coefficients(self, x: Any, y: Any) -> np.ndarray:
        """The coefficients ``a_k`` at ``(x, y)``: ``(K,)`` for scalars, else ``(K, N)``.

        Parameters
        ----------
        x, y : float or array-like
            Position(s): x column, y row, 0-based; finite real numbers of shapes that
            broadcast together.

        Returns
        -------
        `~numpy.ndarray`
            ``(K,)`` for scalars, else ``(K, N)`` (N the broadcast size).

        Raises
        ------
        TypeError
            When ``x`` or ``y`` is not made of real numbers.
        ValueError
            When ``x`` or ``y`` is not finite, their shapes do not broadcast, or (degree
            > 0, the coefficients depend on the position) a position lies further
            outside the image than `position_margin`: the polynomials were fitted
            over the image only and are not extrapolated.

        Examples
        --------
        >>> import numpy as np
        >>> from astro_zackay.psf import KLPSFModel
        >>> model = KLPSFModel(np.ones((1, 3, 3)) / 9, [[1.0, 0.5, 0.0]],
        ...                    image_shape=(11, 11), degree=1)
        >>> model.coefficients(10.0, 5.0).tolist()
        [1.5]
        """
        design, scalar = self._design(x, y, bounded=self.degree > 0)
        coef = self._state.fields @ design.T
        return coef[:, 0] if scalar else coef

    def psf_at(self, x: Any, y: Any) -> np.ndarray:
        """The unit-sum PSF at ``(x, y)``, centred on the stamp's central pixel.

        Parameters
        ----------
        x, y : float or array-like
            Position(s): x column, y row, 0-based; finite real numbers of shapes that
            broadcast together.

        Returns
        -------
        `~numpy.ndarray`
            ``(ny, nx)`` for scalars, else ``(N, ny, nx)``.

        Raises
        ------
        TypeError
            When ``x`` or ``y`` is not made of real numbers.
        ValueError
            When ``x`` or ``y`` is not finite, their shapes do not broadcast, or, for a
            varying model (`is_varying`), a position lies further outside the image
            ``(0..nx-1, 0..ny-1)`` than `position_margin` (a tenth of its side): the
            coefficient polynomials were fitted over the image only, and far outside
            they give a wrong PSF (refused, never extrapolated or clamped silently).
            A model that does not vary is the same PSF at any finite position.
        """
        design, scalar = self._design(x, y, bounded=self.is_varying)

        k = self.n_components
        psf = evaluate_psf(self._state.basis.reshape(k, -1), self._state.fields, design)
        psf = psf.reshape(-1, *self.core_shape)
        wing = self._state.wing
        if wing is not None:
            full = np.broadcast_to(wing, (len(psf), *wing.shape)).copy()
            (cy, cx), (wy, wx) = self.core_shape, wing.shape
            oy, ox = (wy - cy) // 2, (wx - cx) // 2
            disk = wing[oy : oy + cy, ox : ox + cx] == 0.0
            core = psf * disk
            core *= ((1.0 - wing.sum()) / core.sum(axis=(1, 2)))[:, None, None]
            full[:, oy : oy + cy, ox : ox + cx] += core
            psf = full
        return psf[0] if scalar else psf

    def evaluate(self, x, y, x_0, y_0, flux):
        """Evaluate ``flux`` times the PSF at ``(x_0, y_0)`` centred there, at ``(x, y)``."""
        x0, y0 = float(np.ravel(x_0)[0]), float(np.ravel(y_0)[0])
        psf = self.psf_at(x0, y0)
        ny, nx = psf.shape
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        coords = np.array([(y - y0 + ny // 2).ravel(), (x - x0 + nx // 2).ravel()])
        values = map_coordinates(psf, coords, order=3, mode="grid-constant", cval=0.0)
        outside = (np.abs(coords[0] - ny // 2) > ny / 2) | (np.abs(coords[1] - nx // 2) > nx / 2)
        values[outside] = 0.0
        return np.ravel(flux)[0] * values.reshape(np.shape(x))

    @property
    def bounding_box(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """``((y_min, y_max), (x_min, x_max))``: the stamp around ``(x_0, y_0)``."""
        ny, nx = self.stamp_shape
        return (
            (self.y_0.value - ny / 2, self.y_0.value + ny / 2),
            (self.x_0.value - nx / 2, self.x_0.value + nx / 2),
        )

    # --- conversions ------------------------------------------------------------------
    def to_gridded(
        self,
        grid_shape: tuple[int, int] = (3, 3),
        *,
        positions: Sequence[tuple[float, float]] | None = None,
        oversampling: int = 1,
    ):
        """A `photutils.psf.GriddedPSFModel` sampling this PSF on a grid of positions.

        Parameters
        ----------
        grid_shape : tuple of int, optional
            ``(n_y, n_x)`` nodes spread evenly from edge to edge of the image.
        positions : sequence of (x, y), optional
            Explicit node positions (must form a rectangular grid); overrides
            ``grid_shape``.
        oversampling : int, optional
            Oversampling of the ePSFs, a whole number >= 1 (an integral float such as
            ``2.0`` is accepted): values sampled every ``1/oversampling`` pixel by
            cubic-spline interpolation, as the model itself is evaluated.

        Returns
        -------
        `photutils.psf.GriddedPSFModel`

        Raises
        ------
        ValueError
            When ``grid_shape`` is not two positive integers, ``oversampling`` is not a
            whole number >= 1 (both checked before any work), or a position is refused
            by `psf_at` (not finite, or far outside the image for a varying model).
        """
        from photutils.psf import GriddedPSFModel

        if not is_whole(oversampling, 1):
            raise ValueError(
                f"oversampling must be a whole number >= 1 (the ePSF samples per pixel, "
                f"1 for none), got {oversampling!r}"
            )
        oversampling = int(oversampling)
        if positions is None:
            ny, nx = self.image_shape
            gy, gx = _grid_shape(grid_shape)
            xs, ys = np.meshgrid(np.linspace(0, nx - 1, gx), np.linspace(0, ny - 1, gy))
            positions = np.column_stack([xs.ravel(), ys.ravel()])
        positions = np.asarray(positions, dtype=float).reshape(-1, 2)
        psfs = self.psf_at(positions[:, 0], positions[:, 1])
        if oversampling > 1:
            # odd grids of (n - 1) * oversampling + 1 nodes, the centre node on the star
            sny, snx = self.stamp_shape
            fy = np.arange((sny - 1) * oversampling + 1) / oversampling
            fx = np.arange((snx - 1) * oversampling + 1) / oversampling
            yy, xx = np.meshgrid(fy, fx, indexing="ij")
            psfs = np.array(
                [
                    map_coordinates(p, [yy, xx], order=3, mode="grid-constant", cval=0.0)
                    for p in psfs
                ]
            )
        nddata = NDData(psfs, meta={"grid_xypos": positions.tolist(), "oversampling": oversampling})
        return GriddedPSFModel(nddata)

    # --- FITS I/O ---------------------------------------------------------------------
    def write(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the model to a FITS file (read it back with `KLPSFModel.read`).

        The file holds everything the model is made of, so that `KLPSFModel.read`
        gives back an equal model: the primary header (method, degree, image shape,
        scaling), ``BASIS`` ``(K, ny, nx)``, ``FIELDS`` ``(K, n_terms)``, ``EIGEN``
        (eigen-spectrum), ``SELECT`` (held-out chi2/dof by K), ``QUALITY`` and
        ``META`` (one-row tables), ``PARAMS`` (the parameters ``x_0``, ``y_0``,
        ``flux`` with their ``fixed`` flags and bounds), ``WING`` (when there is one)
        and ``STARS`` (when known).

        Parameters
        ----------
        path : str or path-like
            The FITS file to write.
        overwrite : bool, optional
            Replace an existing file.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> import numpy as np
        >>> from astro_zackay.psf import KLPSFModel
        >>> model = KLPSFModel(np.ones((1, 3, 3)) / 9, [[1.0]], image_shape=(50, 60),
        ...                    degree=0, x_0=12.5, y_0=30.25, flux=7.0)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "psf.fits"
        >>> model.write(path)
        >>> back = KLPSFModel.read(path)
        >>> [float(p) for p in back.parameters], back.image_shape
        ([12.5, 30.25, 7.0], (50, 60))
        """
        s = self._state
        header = fits.Header()
        header["AZPSFVER"] = (_FORMAT_VERSION, "astro_zackay PSF file format")
        header["METHOD"] = (s.method, "how the PSF was estimated")
        header["NCOMP"] = (self.n_components, "number of eigen-PSFs K")
        header["DEGREE"] = (s.degree, "total degree of the coefficient polynomials")
        header["IMNY"], header["IMNX"] = s.image_shape
        for key, value in zip(("XC", "XS", "YC", "YS"), s.scaling):
            header[key] = (float(value), "scaled coords: u=(x-XC)/XS, v=(y-YC)/YS")
        hdus = [
            fits.PrimaryHDU(header=header),
            fits.ImageHDU(np.asarray(s.basis), name="BASIS"),
            fits.ImageHDU(np.asarray(s.fields), name="FIELDS"),
            fits.ImageHDU(np.asarray(s.eigenvalues), name="EIGEN"),
            fits.ImageHDU(np.asarray(s.selection), name="SELECT"),
            _mapping_to_hdu(s.quality, "QUALITY"),
            _mapping_to_hdu(s.meta, "META"),
            self._parameters_hdu(),
        ]
        if s.wing is not None:
            hdus.append(fits.ImageHDU(np.asarray(s.wing), name="WING"))
        if s.stars is not None:
            hdus.append(_stars_to_hdu(s.stars))
        fits.HDUList(hdus).writeto(path, overwrite=overwrite)

    def _parameters_hdu(self) -> fits.BinTableHDU:
        """The parameters' values, ``fixed`` flags and bounds (NaN: unbounded) as a table."""
        bounds = [self.bounds[name] for name in self.param_names]
        table = Table({
            "name": list(self.param_names),
            "value": [float(getattr(self, name).value) for name in self.param_names],
            "fixed": [bool(self.fixed[name]) for name in self.param_names],
            "min": [np.nan if low is None else float(low) for low, _ in bounds],
            "max": [np.nan if high is None else float(high) for _, high in bounds],
        })
        hdu = fits.table_to_hdu(table)
        hdu.name = "PARAMS"
        return hdu

    @classmethod
    def read(cls, path: str | os.PathLike) -> KLPSFModel:
        """Read a model written by `KLPSFModel.write`.

        Parameters
        ----------
        path : str or path-like
            The FITS file.

        Returns
        -------
        KLPSFModel
            Equal to the model written: arrays, tables, quality, meta, and the
            parameters with their ``fixed`` flags and bounds.

        Raises
        ------
        FileNotFoundError
            When there is no such file.
        IsADirectoryError
            When the path is a directory.
        ValueError
            When the file is not a readable FITS file (empty, corrupt or truncated),
            not a PSF file (no ``AZPSFVER`` key in its primary header) or lacks one
            of the extensions or keys of the format.

        Examples
        --------
        See `KLPSFModel.write`.
        """
        name = os.fspath(path)
        if os.path.isdir(name):
            raise IsADirectoryError(f"{name!r} is a directory, not a PSF file: give the path "
                                    "of a file written by KLPSFModel.write")
        if not os.path.exists(name):
            raise FileNotFoundError(f"no PSF file at {name!r}: check the path, or write one "
                                    "with KLPSFModel.write")
        try:
            _check_fits_file(name)
        except PermissionError:
            raise
        except OSError as exc:  # its message begins with the path: said once
            why = str(exc).removeprefix(f"{name!r} is not a readable FITS file ")
            raise ValueError(f"{name!r} is not a FITS file {why}") from None
        with fits.open(name) as hdul:
            header = hdul[0].header
            if "AZPSFVER" not in header:
                raise ValueError(f"{name!r} is not an astro_zackay PSF file (no AZPSFVER key "
                                 "in its primary header; write one with KLPSFModel.write)")
            missing = [ext for ext in _REQUIRED_EXTENSIONS if ext not in hdul]
            missing += [key for key in _REQUIRED_KEYS if key not in header]
            if missing:
                raise ValueError(f"{name!r} lacks {', '.join(missing)}: the PSF file is "
                                 "truncated or damaged")
            stars = _stars_from_hdu(hdul["STARS"]) if "STARS" in hdul else None
            model = cls(
                np.array(hdul["BASIS"].data, dtype=float),
                np.array(hdul["FIELDS"].data, dtype=float),
                image_shape=(header["IMNY"], header["IMNX"]),
                degree=header["DEGREE"],
                scaling=[header[k] for k in ("XC", "XS", "YC", "YS")],
                eigenvalues=_optional_array(hdul["EIGEN"].data),
                selection=_optional_array(hdul["SELECT"].data),
                stars=stars,
                quality=_mapping_from_hdu(hdul["QUALITY"]),
                method=header["METHOD"],
                meta=_mapping_from_hdu(hdul["META"]),
                wing=np.array(hdul["WING"].data, dtype=float) if "WING" in hdul else None,
            )
            if "PARAMS" in hdul:  # files of format 1 have none: the defaults stay
                _set_parameters(model, hdul["PARAMS"].data)
        return model

    # --- reporting --------------------------------------------------------------------
    def quality_report(self) -> str:
        """A short human-readable summary of the held-out quality."""
        q = self.quality
        if not q.get("measured", bool(q)):
            reason = self.meta.get("reason", "no stars were held out")
            return (
                f"{self.method} PSF, K={self.n_components}, degree={self.degree}, "
                f"{q.get('n_train', '?')} training stars: quality unmeasured ({reason})"
            )
        lines = [
            f"{self.method} PSF, K={self.n_components}, degree={self.degree}, "
            f"{q.get('n_train', '?')} training / {q.get('n_holdout', '?')} held-out stars",
            f"  median chi2/dof (held out)     {q.get('chi2_dof', np.nan):.3f}",
            f"  residual |flux| fraction      {q.get('residual_fraction', np.nan):.4f}"
            f" (noise floor {q.get('noise_fraction', np.nan):.4f})",
            f"  rms ellipticity error         {q.get('ellipticity_rms', np.nan):.4f}",
            f"  median size error dT/T        {q.get('size_error', np.nan):+.4f}",
        ]
        if self.selection.size:
            scores = ", ".join(f"{v:.3f}" for v in self.selection)
            lines.append(f"  chi2/dof for K=1..{self.selection.size}: {scores}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        q = self.quality
        chi2 = f" chi2/dof={q['chi2_dof']:.3f}" if np.isfinite(q.get("chi2_dof", np.nan)) else ""
        n_stars = "" if self._state.stars is None else f" stars={len(self._state.stars)}"
        return (
            f"<KLPSFModel method={self.method!r} K={self.n_components} degree={self.degree} "
            f"stamp={self.stamp_shape} image={self.image_shape}{n_stars}{chi2} "
            f"x_0={self.x_0.value:g} y_0={self.y_0.value:g} flux={self.flux.value:g}>"
        )


def _positions(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` as flat float arrays of one length, refused by name unless they are
    finite real numbers of shapes that broadcast together."""
    arrays = []
    for name, value in (("x", x), ("y", y)):
        array = np.asarray(value)
        if array.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be a real number or an array of them (a pixel "
                            f"position, 0-based), got {value!r:.60}")
        arrays.append(np.atleast_1d(array).astype(float, copy=False))
    try:
        x, y = np.broadcast_arrays(*arrays)
    except ValueError:
        raise ValueError(f"x and y must have the same length (or broadcast together), got "
                         f"shapes {np.shape(arrays[0])} and {np.shape(arrays[1])}") from None
    x, y = x.ravel(), y.ravel()
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"x and y must be finite pixel positions, got x={x[i]}, y={y[i]} "
                         f"({int(bad.sum())} of {x.size} not finite)")
    return x, y


def _grid_shape(grid_shape: Any) -> tuple[int, int]:
    """``grid_shape`` as two positive integers, refused by name otherwise."""
    values = np.asarray(grid_shape) if isinstance(grid_shape, (tuple, list)) else None
    if (values is None or values.shape != (2,) or values.dtype.kind not in "iu"
            or (values < 1).any()):
        raise ValueError(f"grid_shape must be two positive integers (n_y, n_x), the nodes "
                         f"along each axis, got {grid_shape!r}")
    return int(values[0]), int(values[1])


def _check_wing(wing: Any, core_shape: tuple[int, int]) -> np.ndarray | None:
    if wing is None:
        return None
    wing = np.array(wing, dtype=float)
    (cy, cx), shape = core_shape, wing.shape
    if (
        wing.ndim != 2
        or any(n % 2 == 0 for n in shape)
        or shape[0] <= cy
        or shape[1] <= cx
        or not 0.0 <= wing.sum() < 1.0
    ):
        raise ValueError(
            f"wing must be an odd 2-D stamp larger than the {core_shape} basis, with a sum "
            f"(the flux fraction outside the core) in [0, 1); got shape {shape}"
        )
    return wing


def _mapping_to_hdu(mapping: Mapping[str, Any], name: str) -> fits.BinTableHDU:
    """A one-row table of numbers and strings (exact float64 / int64 / bool round trip).

    Strings get one padding space (FITS has no empty string column), gone on reading.
    """
    table = Table(
        {key: [value + " " if isinstance(value, str) else value] for key, value in mapping.items()}
    )
    hdu = fits.table_to_hdu(table) if mapping else fits.BinTableHDU()
    hdu.name = name
    return hdu


def _mapping_from_hdu(hdu: fits.BinTableHDU) -> dict[str, Any]:
    if hdu.data is None:
        return {}
    values = {}
    for name in hdu.columns.names:
        value = hdu.data[name][0]
        # FITS drops a string's trailing spaces on reading, the padding one with them
        values[name] = value.removesuffix(" ") if isinstance(value, str) else value.item()
    return values


def _stars_to_hdu(stars: Table) -> fits.BinTableHDU:
    """The stars as a FITS table; units go to ``AZUNITn`` cards (any unit, no warnings)."""
    plain = stars.copy(copy_data=False)
    plain.meta = {}
    units = {}
    for i, name in enumerate(plain.colnames, start=1):
        if plain[name].unit is not None:
            units[f"AZUNIT{i}"] = plain[name].unit.to_string()
            plain[name].unit = None
    hdu = fits.table_to_hdu(plain)
    hdu.name = "STARS"
    hdu.header.update(units)
    return hdu


def _stars_from_hdu(hdu: fits.BinTableHDU) -> Table:
    """The stars as written: their units, native byte order, no header cards as meta."""
    stars = Table.read(hdu)
    stars.meta = {}
    for i, name in enumerate(stars.colnames, start=1):
        if stars[name].dtype.kind in "iufb" and not stars[name].dtype.isnative:
            stars[name] = stars[name].astype(stars[name].dtype.newbyteorder("="))
        if f"AZUNIT{i}" in hdu.header:
            stars[name].unit = u.Unit(hdu.header[f"AZUNIT{i}"])
    return stars


def _set_parameters(model: KLPSFModel, params: fits.FITS_rec) -> None:
    """Set ``model``'s parameter values, fixed flags and bounds from the PARAMS rows."""
    for row in params:
        name = str(row["name"]).strip()
        low, high = float(row["min"]), float(row["max"])
        setattr(model, name, float(row["value"]))
        model.fixed[name] = bool(row["fixed"])
        model.bounds[name] = (None if np.isnan(low) else low, None if np.isnan(high) else high)


def _optional_array(data: np.ndarray | None) -> np.ndarray:
    return np.array([] if data is None else data, dtype=float)
