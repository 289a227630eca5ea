"""Result files: subtractions, candidate tables, ds9 regions and coadds on disk.

One multi-extension FITS file holds a whole subtraction (`write_subtraction`, read
back by `read_subtraction` or extension by extension with
``CCDData.read(path, hdu=...)``); candidates go to an ECSV table that defines its
flag bits (`write_candidates`) and to a ds9 region file (`write_regions`); a coadd
goes to one FITS file whose primary image is the flux-calibrated coadd, so that it
can be given as the reference of a subtraction as it is (`write_coadd`, read back
whole by `read_coadd`); a background estimate goes to one FITS file of its maps and
numbers (`write_background`, `read_background`). Every
file records the package version, the input files, the parameters and the fitted
quantities (``HISTORY`` cards and short keys), so that a result can be traced back
to what made it. Each reader gives back a result equal to the one written: values,
dtypes, masks, uncertainties, units, WCS, meta and the fitted numbers exactly.
"""

from __future__ import annotations

import datetime
import logging
import numbers
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.nddata import CCDData, InverseVariance, StdDevUncertainty, VarianceUncertainty
from astropy.table import Table

from ._ccd import _check_fits_file
from ._version import version
from .background import BackgroundResult
from .coaddition import CoaddResult
from .subtraction import SubtractionResult
from .transients import FLAGS, describe_flags

__all__ = [
    "coadd_psf",
    "read_background",
    "read_coadd",
    "read_subtraction",
    "write_background",
    "write_candidates",
    "write_coadd",
    "write_regions",
    "write_subtraction",
]

log = logging.getLogger(__name__)

#: Extensions of a subtraction file holding images on the science grid, and their result field.
SUBTRACTION_IMAGES = {"DIFF": "difference", "SCORR": "score", "FLUX": "flux",
                      "FLUXERR": "flux_error"}
#: What each extension of a subtraction file holds (its EXTNAME comment).
_SUBTRACTION_TEXT = {
    "DIFF": "proper difference D (unit noise)",
    "SCORR": "corrected score Scorr (sigma units)",
    "FLUX": "point-source flux at each pixel (alpha)",
    "FLUXERR": "1-sigma error of FLUX",
    "PSF": "P_D: unit-sum PSF of D at the centre",
    "MASK": "1 where the outputs are masked (NaN)",
    "TILES": "tiles of constant PSF, fitted values",
    "TILEPSF": "P_D of each tile (rows of TILES)",
    "INMASK": "1 where an input is masked or saturated",
    "SOURCES": "sources of both images, their S/N",
}
#: Most HISTORY text per card (a FITS card holds 72 characters of it).
_HISTORY_WIDTH = 72


def _check_result(result: Any, kind: type, producer: str, writer: str) -> None:
    """A TypeError naming ``writer``'s ``result`` unless it is a ``kind`` (before any work)."""
    if not isinstance(result, kind):
        raise TypeError(f"{writer}: result must be a {kind.__name__} (what {producer} returns), "
                        f"got {type(result).__name__}")


def _provenance(
    kind: str, inputs: Sequence[Any], parameters: Mapping[str, Any] | None
) -> fits.Header:
    """Header cards saying what made a file: version, date, inputs and every parameter.

    Each input is an ``AZIN<n>`` key (its file name) and each parameter an
    ``AZPAR<n>`` key (``name=value``); ``HISTORY`` repeats them in words.
    """
    header = fits.Header()
    header["AZKIND"] = (kind, "astro_zackay result: subtraction, coadd, ...")
    header["AZVERS"] = (version, "astro_zackay version")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    header["DATE"] = (stamp, "file written (UTC)")
    history = [f"astro_zackay {version} {kind}, {stamp} UTC"]
    for n, item in enumerate(inputs, start=1):
        name = os.fspath(item) if isinstance(item, str | os.PathLike) else str(item)
        header[f"AZIN{n}"] = (os.path.basename(name), f"input {n}")
        history.append(f"input {n}: {name}")
    for n, (name, value) in enumerate((parameters or {}).items(), start=1):
        header[f"AZPAR{n}"] = f"{name}={value}"
        history.append(f"parameter {name} = {value}")
    for line in history:
        _add_history(header, line)
    return header


def _add_history(header: fits.Header, text: str) -> None:
    """``text`` as HISTORY cards, wrapped at word boundaries."""
    for part in textwrap.wrap(text, _HISTORY_WIDTH, break_on_hyphens=False):
        header.add_history(part)


def _fitted_table(result: SubtractionResult) -> fits.BinTableHDU:
    """The fitted scalars of a subtraction as a one-row table: exact float64 values."""
    values = {"flux_scale": result.flux_scale, "flux_ratio": result.flux_ratio,
              "flux_ratio_error": result.flux_ratio_error, "shift_x": result.shift[0],
              "shift_y": result.shift[1], "background_offset": result.background_offset,
              "astrometric_noise_x": result.astrometric_noise[0],
              "astrometric_noise_y": result.astrometric_noise[1]}
    table = Table({name: np.array([value], dtype=float) for name, value in values.items()})
    return _named(fits.table_to_hdu(table), "FITTED", "fitted scalars (exact values)")


def _fitted(result: SubtractionResult) -> fits.Header:
    """The fitted quantities of a subtraction as short keys, and a HISTORY line."""
    header = fits.Header()
    tiles = result.tiles
    sigma_ref = float(np.median(tiles["sigma_ref"])) if len(tiles) else np.nan
    sigma_sci = float(np.median(tiles["sigma_sci"])) if len(tiles) else np.nan
    cards = {
        "AZBETA": (result.flux_ratio, "flux ratio science / reference"),
        "AZBETAE": (result.flux_ratio_error, "1-sigma error of AZBETA"),
        "AZDX": (result.shift[0], "science - reference x shift removed (pix)"),
        "AZDY": (result.shift[1], "science - reference y shift removed (pix)"),
        "AZBKGOFF": (result.background_offset, "background offset removed"),
        "AZFD": (result.flux_scale, "flux zero point F_D of D at the centre"),
        "AZASTX": (result.astrometric_noise[0], "astrometric noise x (pix)"),
        "AZASTY": (result.astrometric_noise[1], "astrometric noise y (pix)"),
        "AZSIGR": (sigma_ref, "median background noise, reference"),
        "AZSIGS": (sigma_sci, "median background noise, science"),
        "AZNTILE": (len(tiles), "tiles of constant PSF"),
    }
    for key, (value, comment) in cards.items():
        value = value if isinstance(value, int) else float(value)
        # FITS headers hold no NaN or inf: those are written as text ('nan')
        header[key] = (value if np.isfinite(value) else str(value), comment)
    _add_history(
        header,
        f"fitted: flux ratio {result.flux_ratio:.6g} +- {result.flux_ratio_error:.2g}, "
        f"shift ({result.shift[0]:.4f}, {result.shift[1]:.4f}) px, background offset "
        f"{result.background_offset:.4g}, noise {sigma_ref:.4g} (ref) {sigma_sci:.4g} (sci), "
        f"{len(tiles)} tile(s)"
    )
    return header


def _image_hdu(ccd: CCDData, name: str, extra: fits.Header) -> fits.ImageHDU:
    """``ccd``'s data, unit, WCS and meta, updated by ``extra``'s cards (HISTORY appended)."""
    hdu = ccd.to_hdu(hdu_mask=None, hdu_uncertainty=None, as_image_hdu=True)[0]
    if _same_unit(ccd.meta.get("BUNIT"), ccd.unit):
        # the meta's spelling of the unit (e.g. '1' for dimensionless, which to_hdu
        # writes as '' or '1' depending on how the unit object was made) stays as it was
        hdu.header["BUNIT"] = ccd.meta["BUNIT"]
    hdu.header.extend(extra, update=True)
    hdu.name = name
    return hdu


def _same_unit(text: Any, unit: Any) -> bool:
    """Whether a BUNIT card's text names ``unit``."""
    if not isinstance(text, str) or unit is None:
        return False
    try:
        return u.Unit(text) == unit
    except ValueError:
        return False


def _named(hdu: fits.FitsHDU, name: str, text: str) -> fits.FitsHDU:
    hdu.name = name
    hdu.header["EXTNAME"] = (name, text)
    return hdu


def _table_hdu(table: Table, name: str, text: str) -> fits.BinTableHDU:
    plain = table.copy(copy_data=False)
    plain.meta = {}
    return _named(fits.table_to_hdu(plain), name, text)


#: Header keys that describe an HDU's layout, not the image: dropped from a meta read back.
_STRUCTURE_KEYS = ("SIMPLE", "EXTEND", "XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT",
                   "EXTNAME")


def _exact_hdu(hdus: Sequence[fits.FitsHDU]) -> fits.BinTableHDU:
    """The float header cards of the named image HDUs as exact float64 values.

    A FITS card holds at most 20 characters of a number, so a float64 card may lose its
    last digits on disk; this table (``EXTNAME``, ``KEY``, ``VALUE``) gives them back.
    """
    rows = [(hdu.name, key, float(value)) for hdu in hdus if hdu.is_image and hdu.name
            for key, value in hdu.header.items()
            if isinstance(value, float) and key not in ("", "HISTORY", "COMMENT")]
    table = Table(rows=rows or None, names=("EXTNAME", "KEY", "VALUE"),
                  dtype=(str, str, float))
    return _named(fits.table_to_hdu(table), "EXACT", "exact float64 values of header cards")


def _exact_values(hdul: fits.HDUList) -> dict[str, dict[str, float]]:
    """``{extname: {key: value}}`` from the EXACT table (empty for files without one)."""
    exact: dict[str, dict[str, float]] = {}
    if "EXACT" in hdul and hdul["EXACT"].data is not None:
        for row in hdul["EXACT"].data:
            exact.setdefault(str(row["EXTNAME"]), {})[str(row["KEY"])] = float(row["VALUE"])
    return exact


def _native(array: np.ndarray) -> np.ndarray:
    """``array`` in native byte order (FITS stores big-endian), the same dtype otherwise."""
    array = np.asarray(array)
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _read_image(path: str | os.PathLike, name: str, exact: Mapping[str, Mapping[str, float]],
                **kwargs: Any) -> CCDData:
    """Extension ``name`` as a CCDData in native byte order, its meta as it was written:
    the layout keys dropped and the float cards exact."""
    ccd = CCDData.read(path, hdu=name, **kwargs)
    ccd.data = _native(ccd.data)
    if ccd.uncertainty is not None:
        ccd.uncertainty.array = _native(ccd.uncertainty.array)
    for key in list(ccd.meta):
        if key.rstrip("0123456789") in _STRUCTURE_KEYS:
            del ccd.meta[key]
    for key, value in exact.get(name, {}).items():
        if key in ccd.meta:
            ccd.meta[key] = value
    return ccd


def _read_table(hdu: fits.BinTableHDU) -> Table:
    """A table extension as it was written: native byte order, no EXTNAME in its meta."""
    table = Table.read(hdu)
    for name in table.colnames:
        if table[name].dtype.kind in "iufb" and not table[name].dtype.isnative:
            table[name] = table[name].astype(table[name].dtype.newbyteorder("="))
    for key in _STRUCTURE_KEYS:
        table.meta.pop(key, None)
    return table


def write_subtraction(
    result: SubtractionResult,
    path: str | os.PathLike,
    *,
    inputs: Sequence[Any] = (),
    parameters: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a subtraction to one multi-extension FITS file.

    Extensions: ``DIFF`` (D), ``SCORR``, ``FLUX``, ``FLUXERR`` (images on the science
    grid with its WCS; masked pixels NaN), ``PSF`` (P_D), ``MASK`` (1 where masked),
    ``TILES`` (table), ``FITTED`` (the fitted scalars as exact float64 values: header
    cards may round the last digit), ``TILEPSF`` (P_D per tile), ``INMASK`` (the
    inputs' masked pixels), when there are any, ``SOURCES``, and ``EXACT`` (the header
    cards' float values, which a card may round). The primary header and each
    image's header hold the package version, the inputs (``AZIN<n>``), the
    parameters (``AZPAR<n>``), the fitted quantities (``AZBETA``, ``AZBETAE``,
    ``AZDX``, ``AZDY``, ``AZBKGOFF``, ``AZFD``, ``AZASTX``, ``AZASTY``, ``AZSIGR``,
    ``AZSIGS``, ``AZNTILE``), the flag bits of the candidates (``AZFLAG<bit>``) and
    ``HISTORY`` in words. Each image reads back with ``CCDData.read(path, hdu=name)``
    (its mask from ``MASK``); the whole result with `read_subtraction`.

    Parameters
    ----------
    result : `~astro_zackay.subtraction.SubtractionResult`
        What `~astro_zackay.subtract` returned.
    path : str or path-like
        The FITS file to write.
    inputs : sequence of str or path-like, optional
        The reference and science files (or descriptions), recorded in the headers.
    parameters : mapping, optional
        The options of the subtraction, recorded as ``name=value``.
    overwrite : bool, optional
        Replace an existing file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from astropy.nddata import CCDData
    >>> from astro_zackay import subtract
    >>> from astro_zackay.files import read_subtraction, write_subtraction
    >>> from astro_zackay.simulation import simulate_pair
    >>> pair = simulate_pair((256, 256), n_stars=40, flux_range=(2e3, 2e5), seed=6)
    >>> result = subtract(pair.reference.ccd, pair.science.ccd)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "diff.fits"
    >>> write_subtraction(result, path, inputs=["ref.fits", "new.fits"],
    ...                   parameters={"threshold": 5.0})
    >>> score = CCDData.read(path, hdu="SCORR")
    >>> score.meta["AZIN2"], score.meta["AZPAR1"], score.shape
    ('new.fits', 'threshold=5.0', (256, 256))
    >>> back = read_subtraction(path)
    >>> bool(back.flux_ratio == result.flux_ratio)
    True
    """
    _check_result(result, SubtractionResult, "subtract", "write_subtraction")
    header = _provenance("subtraction", inputs, parameters)
    header.extend(_fitted(result), update=True)
    for name, (bit, text) in FLAGS.items():
        header[f"AZFLAG{bit}"] = f"{name}: {text}"
    mask = np.asarray(result.score.mask if result.score.mask is not None
                      else np.zeros(result.score.shape, bool))
    hdus: list[fits.FitsHDU] = [fits.PrimaryHDU(header=header)]
    for name, field in SUBTRACTION_IMAGES.items():
        hdu = _image_hdu(getattr(result, field), name, header)
        hdu.header["EXTNAME"] = (name, _SUBTRACTION_TEXT[name])
        hdus.append(hdu)
    hdus += [
        _named(fits.ImageHDU(np.asarray(result.psf, float)), "PSF", _SUBTRACTION_TEXT["PSF"]),
        _named(fits.ImageHDU(mask.astype(np.uint8)), "MASK", _SUBTRACTION_TEXT["MASK"]),
        _table_hdu(result.tiles, "TILES", _SUBTRACTION_TEXT["TILES"]),
        _fitted_table(result),
    ]
    if result.tile_psfs is not None:
        hdus.append(_named(fits.ImageHDU(np.asarray(result.tile_psfs, float)), "TILEPSF",
                           _SUBTRACTION_TEXT["TILEPSF"]))
    if result.input_mask is not None:
        hdus.append(_named(fits.ImageHDU(np.asarray(result.input_mask, np.uint8)), "INMASK",
                           _SUBTRACTION_TEXT["INMASK"]))
    if result.sources is not None and len(result.sources):
        hdus.append(_table_hdu(result.sources, "SOURCES", _SUBTRACTION_TEXT["SOURCES"]))
    hdus.append(_exact_hdu(hdus))
    fits.HDUList(hdus).writeto(path, overwrite=overwrite)
    log.debug("wrote the subtraction to %s", os.fspath(path))


def _check_result_file(path: str | os.PathLike, kind: str, writer: str) -> str:
    """The path of a readable FITS file as a string, or an error naming it and what to do.

    A missing file, a directory and a file that is no FITS file (empty, garbage,
    truncated) are refused before astropy reads it, so the error names the path.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise IsADirectoryError(f"{name!r} is a directory, not a {kind} file: give the path of "
                                f"a file written by {writer}")
    if not os.path.exists(name):
        raise FileNotFoundError(f"no {kind} file at {name!r}: check the path, or write one "
                                f"with {writer}")
    _check_fits_file(name)
    return name


def _check_subtraction_file(hdul: fits.HDUList, path: str | os.PathLike) -> None:
    """Raise a ValueError unless ``hdul`` is a subtraction file with every extension."""
    if hdul[0].header.get("AZKIND") != "subtraction":
        raise ValueError(f"{os.fspath(path)!r} is not an astro_zackay subtraction file "
                         "(no AZKIND = 'subtraction' in its primary header)")
    missing = [name for name in (*SUBTRACTION_IMAGES, "PSF", "MASK", "TILES", "FITTED")
               if name not in hdul]
    if missing:
        raise ValueError(f"{os.fspath(path)!r} lacks the extension(s) {', '.join(missing)}: "
                         "it is truncated or was not written by write_subtraction")


def read_subtraction(path: str | os.PathLike) -> SubtractionResult:
    """Read a subtraction written by `write_subtraction`.

    Parameters
    ----------
    path : str or path-like
        The FITS file.

    Returns
    -------
    `~astro_zackay.subtraction.SubtractionResult`
        Equal to the result written: the images (their dtype in native byte order)
        with their masks (NaN where masked), uncertainties, units and WCS, the fitted
        quantities as exact float64 values, P_D, the tiles with their P_D, the input
        mask and the sources; its ``find_transients`` vets candidates as the original
        did. Each image's ``meta`` holds every card of the original (floats exact)
        and the provenance cards `write_subtraction` added (``AZVERS``, ``AZIN<n>``,
        ``AZPAR<n>``, ``HISTORY``, ...); the cards of the FITS layout (``NAXIS``,
        ``EXTNAME``, ...) are dropped.

    Raises
    ------
    FileNotFoundError
        When there is no such file.
    IsADirectoryError
        When the path is a directory.
    OSError
        When the file is not a readable FITS file (empty, corrupt or truncated).
    ValueError
        When the file is not a subtraction file or lacks an extension.

    Examples
    --------
    See `write_subtraction`.
    """
    _check_result_file(path, "subtraction", "write_subtraction")
    with fits.open(path) as hdul:
        _check_subtraction_file(hdul, path)
        fitted = {name: float(hdul["FITTED"].data[name][0])
                  for name in hdul["FITTED"].columns.names}
        psf = np.array(hdul["PSF"].data, dtype=float)
        tiles = _read_table(hdul["TILES"])
        tile_psfs = np.array(hdul["TILEPSF"].data, float) if "TILEPSF" in hdul else None
        input_mask = np.array(hdul["INMASK"].data, bool) if "INMASK" in hdul else None
        sources = _read_table(hdul["SOURCES"]) if "SOURCES" in hdul else None
        exact = _exact_values(hdul)
    images = {field: _read_image(path, name, exact, hdu_uncertainty=None)
              for name, field in SUBTRACTION_IMAGES.items()}
    error = images["flux_error"].data
    for field in ("difference", "score"):
        unit_noise = np.where(np.isnan(error), np.nan, 1.0).astype(error.dtype)
        images[field].uncertainty = StdDevUncertainty(unit_noise)
    images["flux"].uncertainty = StdDevUncertainty(error.copy())
    return SubtractionResult(
        **images,
        psf=psf,
        flux_scale=fitted["flux_scale"],
        flux_ratio=fitted["flux_ratio"],
        flux_ratio_error=fitted["flux_ratio_error"],
        shift=(fitted["shift_x"], fitted["shift_y"]),
        background_offset=fitted["background_offset"],
        astrometric_noise=(fitted["astrometric_noise_x"], fitted["astrometric_noise_y"]),
        tiles=tiles,
        input_mask=input_mask,
        sources=sources,
        tile_psfs=tile_psfs,
    )


def write_candidates(
    candidates: Table,
    path: str | os.PathLike,
    *,
    inputs: Sequence[Any] = (),
    parameters: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a candidate table to ECSV with its flag definitions and provenance in the meta.

    Parameters
    ----------
    candidates : `~astropy.table.Table`
        From `~astro_zackay.subtraction.SubtractionResult.find_transients`.
    path : str or path-like
        The ``.ecsv`` file to write.
    inputs : sequence of str or path-like, optional
        The input files, recorded as ``inputs``.
    parameters : mapping, optional
        Recorded as ``parameters``.
    overwrite : bool, optional
        Replace an existing file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from astropy.table import Table
    >>> from astro_zackay.files import write_candidates
    >>> table = Table({"x": [10.0], "y": [20.0], "score": [7.5], "flags": [0],
    ...                "good": [True]})
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "cands.ecsv"
    >>> write_candidates(table, path, inputs=["ref.fits", "new.fits"])
    >>> back = Table.read(path)
    >>> back.meta["FLAG_SHARP"], back.meta["inputs"]
    ('4: sharper than the difference PSF (cosmic ray, hot pixel)', ['ref.fits', 'new.fits'])
    """
    table = candidates.copy(copy_data=False)
    table.meta = dict(candidates.meta)
    table.meta.update({f"FLAG_{name}": f"{bit}: {text}" for name, (bit, text) in FLAGS.items()})
    table.meta["astro_zackay_version"] = version
    table.meta["inputs"] = [os.fspath(item) if isinstance(item, os.PathLike) else str(item)
                            for item in inputs]
    if parameters:
        table.meta["parameters"] = {key: _plain(value) for key, value in parameters.items()}
    table.write(path, format="ascii.ecsv", overwrite=overwrite)


def _plain(value: Any) -> Any:
    """A value ECSV's YAML meta can hold: numbers, strings, lists of them."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return str(value)


#: The columns `write_regions` reads.
_REGION_COLUMNS = ("x", "y", "score", "flags", "good")


def write_regions(
    candidates: Table, path: str | os.PathLike, *, radius: float | None = None,
    overwrite: bool = False,
) -> None:
    """Write candidates as a ds9 region file: circles, good in green, flagged in red.

    Each circle is labelled with the candidate's ``id`` and score, and a flagged one
    with the names of its flags (e.g. ``SHARP,EDGE``). Positions are in image
    pixels (ds9's are 1-based: ``x + 1``, ``y + 1``).

    Parameters
    ----------
    candidates : `~astropy.table.Table`
        With ``x``, ``y``, ``score``, ``flags`` and ``good`` (and ``id``).
    path : str or path-like
        The ``.reg`` file to write.
    radius : float, optional
        Circle radius in pixels; default twice the table's ``meta['fwhm']`` (5 px
        without one).
    overwrite : bool, optional
        Replace an existing file.

    Raises
    ------
    OSError
        When the file exists and ``overwrite`` is False.
    TypeError
        When ``candidates`` is not a Table.
    ValueError
        When ``candidates`` lacks a column the regions need, or ``radius`` (or the
        table's ``meta['fwhm']``) is not a positive finite number.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from astropy.table import Table
    >>> from astro_zackay.files import write_regions
    >>> table = Table({"id": [1, 2], "x": [10.0, 40.0], "y": [20.0, 5.0],
    ...                "score": [7.5, -6.0], "flags": [0, 4 | 16], "good": [True, False]})
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "cands.reg"
    >>> write_regions(table, path, radius=4)
    >>> print(path.read_text().splitlines()[-1])
    circle(41.00,6.00,4.00) # color=red text={2: -6.0 SHARP,EDGE}
    """
    if not isinstance(candidates, Table):
        raise TypeError(f"candidates must be an astropy Table (from find_transients), got "
                        f"{type(candidates).__name__}")
    missing = [name for name in _REGION_COLUMNS if name not in candidates.colnames]
    if missing:
        raise ValueError(f"candidates lacks the columns {missing} that write_regions needs "
                         f"({', '.join(_REGION_COLUMNS)}): give the table find_transients made")
    if radius is None:
        radius = 2.0 * float(candidates.meta.get("fwhm", 2.5))
        what = "twice the table's meta['fwhm']"
    else:
        what = "radius"
    if not (isinstance(radius, numbers.Real) and not isinstance(radius, bool | np.bool_)
            and np.isfinite(radius) and radius > 0):
        raise ValueError(f"{what} must be a positive finite circle radius in pixels, got "
                         f"{radius!r}")
    if os.path.exists(path) and not overwrite:
        raise OSError(f"{os.fspath(path)!r} already exists (pass overwrite=True)")
    lines = ["# Region file format: DS9 version 4.1",
             f"# astro_zackay {version} transient candidates: green good, red flagged",
             'global font="helvetica 10 normal roman" width=1', "image"]
    ids = candidates["id"] if "id" in candidates.colnames else range(1, len(candidates) + 1)
    for ident, row in zip(ids, candidates):
        good = bool(row["good"])
        text = f"{ident}: {float(row['score']):.1f}"
        if not good:
            text += " " + ",".join(describe_flags(row["flags"]))
        lines.append(f"circle({float(row['x']) + 1:.2f},{float(row['y']) + 1:.2f},"
                     f"{radius:.2f}) # color={'green' if good else 'red'} text={{{text}}}")
    with open(path, "w") as stream:
        stream.write("\n".join(lines) + "\n")


def write_coadd(
    result: Any,
    path: str | os.PathLike,
    *,
    inputs: Sequence[Any] = (),
    parameters: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a proper coadd to one FITS file, usable as a subtraction's reference.

    The primary HDU is the flux-calibrated coadd (``result.calibrated``, in the first
    image's unit) with its ``UNCERT`` and ``MASK`` extensions, so ``CCDData.read(path)``
    and `~astro_zackay.subtract` read it as an image with its noise. Masked pixels are
    NaN in the coadd and in its uncertainty, and in ``PROPER`` and ``SCORE``. Then ``PROPER``
    (R, unit noise), ``SCORE`` (S), ``PSF`` (P_R, the PSF of both images), ``DEPTH``
    (the fraction of the full depth reached at each pixel), ``NUSED`` (images used per
    pixel), ``REJECTED`` (images whose pixel was rejected as an outlier), ``FRAMES``
    (one row per input image), ``PROPERUN`` and ``SCOREUN`` (the uncertainties of
    ``PROPER`` and ``SCORE``), ``MASKED`` (the masked pixels, their mask in each image
    and the values shown there as NaN), ``FITTED`` (F_R and ``snr_full`` as exact
    float64 values) and ``EXACT`` (the header cards' float values, which a card may
    round). The primary header holds the version, the inputs (``AZIN<n>``), the
    parameters (``AZPAR<n>``), ``AZFR`` (F_R), ``AZSNR1`` and ``HISTORY``.
    `read_coadd` reads the whole result back.

    Parameters
    ----------
    result : `~astro_zackay.coaddition.CoaddResult`
        What `~astro_zackay.coadd` returned.
    path : str or path-like
        The FITS file to write.
    inputs : sequence of str or path-like, optional
        The input files, recorded in the header; default the ``name`` column of
        ``result.frames``.
    parameters : mapping, optional
        The options of the coadd, recorded as ``name=value``.
    overwrite : bool, optional
        Replace an existing file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from astropy.io import fits
    >>> from astropy.nddata import CCDData
    >>> from astro_zackay import coadd
    >>> from astro_zackay.files import write_coadd
    >>> from astro_zackay.simulation import simulate_image
    >>> stars = simulate_image((128, 128), n_stars=20, flux_range=(1e4, 1e5), seed=0).truth
    >>> frames = [simulate_image((128, 128), psf=fwhm, stars=stars["x", "y", "flux"],
    ...                          seed=j).ccd for j, fwhm in enumerate((2.5, 3.5))]
    >>> result = coadd(frames, psfs=[2.5, 3.5])
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "coadd.fits"
    >>> write_coadd(result, path, inputs=["a.fits", "b.fits"])
    >>> image = CCDData.read(path)
    >>> image.shape, image.meta["AZIN2"], fits.getdata(path, "PSF").sum().round(6)
    ((128, 128), 'b.fits', np.float64(1.0))
    """
    _check_result(result, CoaddResult, "coadd", "write_coadd")
    header = _provenance("coadd", inputs or list(result.frames["name"]), parameters)
    header["AZFR"] = (float(result.flux_scale), "flux zero point F_R of PROPER")
    header["AZSNR1"] = (float(result.snr_full), "S/N of a unit-flux point source")
    header["NCOMBINE"] = (len(result.frames), "images combined")
    primary = _blanked(result.calibrated).to_hdu(hdu_mask="MASK", hdu_uncertainty="UNCERT")
    primary[0].header.extend(header, update=True)
    image, score = _blanked(result.image), _blanked(result.score)
    hdus = [
        *primary,
        _named(_image_hdu(image, "PROPER", header), "PROPER", "proper coadd R (unit noise)"),
        _named(_image_hdu(score, "SCORE", header), "SCORE", "score image S"),
        _named(fits.ImageHDU(np.asarray(result.psf, float)), "PSF", "P_R, unit-sum PSF"),
        _named(fits.ImageHDU(np.asarray(result.depth)), "DEPTH",
               "fraction of the full depth reached"),
        _named(fits.ImageHDU(np.asarray(result.n_used)), "NUSED", "images used at each pixel"),
        _named(fits.ImageHDU(np.asarray(result.rejected)), "REJECTED",
               "images whose pixel was rejected"),
        _table_hdu(result.frames, "FRAMES", "one row per input image"),
        _named(fits.ImageHDU(image.uncertainty.array), "PROPERUN",
               "1-sigma uncertainty of PROPER"),
        _named(fits.ImageHDU(score.uncertainty.array), "SCOREUN",
               "1-sigma uncertainty of SCORE (sqrt(G))"),
        _masked_values(result),
        _named(fits.table_to_hdu(Table({"flux_scale": [float(result.flux_scale)],
                                        "snr_full": [float(result.snr_full)]})),
               "FITTED", "F_R, S/N of a unit flux (exact values)"),
    ]
    hdus.append(_exact_hdu(hdus))
    fits.HDUList(hdus).writeto(path, overwrite=overwrite)
    log.debug("wrote the coadd to %s", os.fspath(path))


#: The images of a coadd result and their extension in a coadd file.
_COADD_IMAGES = {"calibrated": "PRIMARY", "image": "PROPER", "score": "SCORE"}
#: Extensions that every coadd file has.
_COADD_EXTENSIONS = ("UNCERT", "MASK", "PROPER", "SCORE", "PSF", "DEPTH", "NUSED", "REJECTED",
                     "FRAMES", "PROPERUN", "SCOREUN", "MASKED", "FITTED")


def _masked_values(result: Any) -> fits.BinTableHDU:
    """The pixels masked in any image of a coadd, their mask in each and the values
    that the file shows as NaN: the data and uncertainty of every image there."""
    masks = {field: np.asarray(getattr(result, field).mask if getattr(result, field).mask
                               is not None else np.zeros(result.image.shape, bool))
             for field in _COADD_IMAGES}
    rows, cols = np.nonzero(np.logical_or.reduce(list(masks.values())))
    columns: dict[str, Any] = {"y": rows, "x": cols}
    for field in _COADD_IMAGES:
        ccd = getattr(result, field)
        columns[f"{field}_mask"] = masks[field][rows, cols]
        columns[field] = ccd.data[rows, cols]
        columns[f"{field}_error"] = ccd.uncertainty.array[rows, cols]
    return _named(fits.table_to_hdu(Table(columns)), "MASKED",
                  "masked pixels: their masks and values")


def read_coadd(path: str | os.PathLike) -> CoaddResult:
    """Read a coadd written by `write_coadd` (or `~astro_zackay.coaddition.CoaddResult.write`).

    Parameters
    ----------
    path : str or path-like
        The FITS file.

    Returns
    -------
    `~astro_zackay.coaddition.CoaddResult`
        Equal to the result written: ``image``, ``score`` and ``calibrated`` with
        their data (the values under their masks too, although the file shows those
        pixels as NaN), masks, uncertainties, units and WCS; ``psf``, ``depth``,
        ``n_used`` and ``rejected`` with their dtypes; ``flux_scale`` and ``snr_full``
        as exact float64 values; the ``frames`` table. Each image's ``meta`` holds
        every card of the original (floats exact) and the provenance cards that
        `write_coadd` added; the cards of the FITS layout are dropped.

    Raises
    ------
    FileNotFoundError
        When there is no such file.
    IsADirectoryError
        When the path is a directory.
    OSError
        When the file is not a readable FITS file (empty, corrupt or truncated).
    ValueError
        When the file is not a coadd file (no ``AZKIND = 'coadd'`` in its primary
        header) or lacks one of its extensions (the message names them).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from astro_zackay import coadd
    >>> from astro_zackay.files import read_coadd, write_coadd
    >>> from astro_zackay.simulation import simulate_image
    >>> frames = [simulate_image((64, 64), psf=3.0, n_stars=5, seed=j).ccd for j in range(2)]
    >>> result = coadd(frames, psfs=[3.0, 3.0], flux_scales=[1.0, 1.0])
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "coadd.fits"
    >>> write_coadd(result, path)
    >>> back = read_coadd(path)
    >>> bool(back.flux_scale == result.flux_scale), back.frames["name"].tolist()
    (True, ['image 0', 'image 1'])
    >>> bool(np.array_equal(back.image.data, result.image.data))
    True
    """
    name = _check_result_file(path, "coadd", "write_coadd")
    with fits.open(path) as hdul:
        if hdul[0].header.get("AZKIND") != "coadd":
            raise ValueError(f"{name!r} is not an astro_zackay coadd file (no AZKIND = "
                             "'coadd' in its primary header; write one with write_coadd)")
        missing = [ext for ext in _COADD_EXTENSIONS if ext not in hdul]
        if missing:
            raise ValueError(f"{name!r} lacks the extension(s) {', '.join(missing)}: it is "
                             "truncated or was not written by write_coadd")
        arrays = {field: _native(hdul[ext].data) for field, ext in
                  (("psf", "PSF"), ("depth", "DEPTH"), ("n_used", "NUSED"),
                   ("rejected", "REJECTED"), ("image", "PROPERUN"), ("score", "SCOREUN"))}
        frames = _read_table(hdul["FRAMES"])
        masked = _read_table(hdul["MASKED"])
        fitted = {key: float(hdul["FITTED"].data[key][0]) for key in ("flux_scale", "snr_full")}
        exact = _exact_values(hdul)
    images = {"calibrated": _read_image(path, "PRIMARY", exact, hdu_mask="MASK",
                                        hdu_uncertainty="UNCERT")}
    for field in ("image", "score"):
        ccd = _read_image(path, _COADD_IMAGES[field], exact, hdu_mask=None,
                          hdu_uncertainty=None)
        ccd.uncertainty = StdDevUncertainty(arrays.pop(field))
        images[field] = ccd
    rows, cols = np.asarray(masked["y"]), np.asarray(masked["x"])
    for field, ccd in images.items():
        mask = np.zeros(ccd.shape, bool)
        mask[rows, cols] = masked[f"{field}_mask"]
        ccd.mask = mask
        ccd.data[rows, cols] = masked[field]
        ccd.uncertainty.array[rows, cols] = masked[f"{field}_error"]
    return CoaddResult(**images, frames=frames, **arrays, **fitted)


def _blanked(ccd: CCDData) -> CCDData:
    """A copy of ``ccd`` whose masked pixels are NaN, so that no viewer shows them as sources.

    Their uncertainty is NaN too: a NaN value has no meaningful error.
    """
    blank = ccd.copy()
    if ccd.mask is not None and np.any(ccd.mask):
        blank.data = np.where(ccd.mask, np.nan, ccd.data).astype(ccd.data.dtype, copy=False)
        if blank.uncertainty is not None:
            error = blank.uncertainty.array
            blank.uncertainty.array = np.where(ccd.mask, np.nan, error).astype(error.dtype,
                                                                                 copy=False)
    return blank


def coadd_psf(path: str | os.PathLike) -> np.ndarray | None:
    """The PSF stored in a coadd file written by `write_coadd`, or None for another file.

    Parameters
    ----------
    path : str or path-like
        A FITS file.

    Returns
    -------
    `~numpy.ndarray` or None
        P_R (unit sum) when ``path`` is a coadd file, else None.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from astropy.io import fits
    >>> from astro_zackay.files import coadd_psf
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "image.fits"
    >>> fits.PrimaryHDU(np.zeros((8, 8))).writeto(path)
    >>> coadd_psf(path) is None
    True
    """
    with fits.open(path) as hdul:
        if hdul[0].header.get("AZKIND") != "coadd" or "PSF" not in hdul:
            return None
        return np.array(hdul["PSF"].data, dtype=float)



#: Uncertainty classes a background file can hold, by the name in its UTYPE card.
_UNCERTAINTY_CLASSES = {cls.__name__: cls for cls in
                        (StdDevUncertainty, VarianceUncertainty, InverseVariance)}
#: The maps of a background result and their extension in a background file.
_BACKGROUND_IMAGES = {"sky": "SKY", "rms": "RMS"}


def _ccd_hdus(ccd: CCDData, name: str, header: fits.Header) -> list[fits.FitsHDU]:
    """``ccd`` as extension ``name`` (data, unit, WCS, meta), with ``<name>MSK`` for
    its mask and ``<name>UNC`` for its uncertainty (class in ``UTYPE``) when it has them."""
    hdus: list[fits.FitsHDU] = [_image_hdu(ccd, name, header)]
    if ccd.mask is not None:
        hdus.append(_named(fits.ImageHDU(np.asarray(ccd.mask, np.uint8)), f"{name}MSK",
                           f"1 where {name} is masked"))
    if ccd.uncertainty is not None:
        unc = _named(fits.ImageHDU(np.asarray(ccd.uncertainty.array)), f"{name}UNC",
                     f"uncertainty of {name}")
        unc.header["UTYPE"] = type(ccd.uncertainty).__name__
        hdus.append(unc)
    return hdus


def _read_ccd(path: str | os.PathLike, hdul: fits.HDUList, name: str,
              exact: Mapping[str, Mapping[str, float]]) -> CCDData:
    """Extension ``name`` written by `_ccd_hdus`, with its mask and uncertainty if any."""
    ccd = _read_image(path, name, exact, hdu_mask=None, hdu_uncertainty=None)
    if f"{name}MSK" in hdul:
        ccd.mask = np.array(hdul[f"{name}MSK"].data, bool)
    if f"{name}UNC" in hdul:
        unc = hdul[f"{name}UNC"]
        cls = _UNCERTAINTY_CLASSES.get(unc.header.get("UTYPE"), StdDevUncertainty)
        ccd.uncertainty = cls(_native(unc.data))
    return ccd


def write_background(
    result: BackgroundResult,
    path: str | os.PathLike,
    *,
    inputs: Sequence[Any] = (),
    parameters: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a background estimate to one FITS file (read it back with `read_background`).

    Extensions: ``SKY`` and ``RMS`` (the maps with their unit, WCS and meta;
    ``SKYMSK``/``RMSMSK`` and ``SKYUNC``/``RMSUNC`` for their masks and uncertainties
    when they have them), ``FITTED`` (``global_sky``, ``global_rms``,
    ``masked_fraction``, ``box_size``, ``filter_size`` and ``method``, exact) and
    ``EXACT`` (the header cards' float values). The primary header holds the version,
    the inputs (``AZIN<n>``), the parameters (``AZPAR<n>``) and ``HISTORY``.

    Parameters
    ----------
    result : `~astro_zackay.background.BackgroundResult`
        What `~astro_zackay.background.estimate_background` returned.
    path : str or path-like
        The FITS file to write.
    inputs : sequence of str or path-like, optional
        The image files (or descriptions), recorded in the headers.
    parameters : mapping, optional
        The options of the estimate, recorded as ``name=value``.
    overwrite : bool, optional
        Replace an existing file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from astro_zackay.background import estimate_background
    >>> from astro_zackay.files import read_background, write_background
    >>> from astro_zackay.simulation import simulate_image
    >>> result = estimate_background(simulate_image((64, 64), n_stars=5, seed=1).ccd)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "background.fits"
    >>> write_background(result, path, inputs=["image.fits"])
    >>> back = read_background(path)
    >>> back.box_size == result.box_size, bool(back.global_rms == result.global_rms)
    (True, True)
    >>> bool(np.array_equal(back.sky.data, result.sky.data)), back.sky.unit
    (True, Unit("electron"))
    """
    _check_result(result, BackgroundResult, "estimate_background", "write_background")
    header = _provenance("background", inputs, parameters)
    hdus: list[fits.FitsHDU] = [fits.PrimaryHDU(header=header)]
    for field, name in _BACKGROUND_IMAGES.items():
        hdus += _ccd_hdus(getattr(result, field), name, header)
    fitted = Table({
        "global_sky": [float(result.global_sky)], "global_rms": [float(result.global_rms)],
        "masked_fraction": [float(result.masked_fraction)],
        "box_size": [np.array(result.box_size, np.int64)],
        "filter_size": [np.array(result.filter_size, np.int64)],
        "method": [str(result.method)],
    })
    hdus += [_named(fits.table_to_hdu(fitted), "FITTED", "fitted numbers and options (exact)")]
    hdus.append(_exact_hdu(hdus))
    fits.HDUList(hdus).writeto(path, overwrite=overwrite)
    log.debug("wrote the background to %s", os.fspath(path))


def read_background(path: str | os.PathLike) -> BackgroundResult:
    """Read a background estimate written by `write_background`.

    Parameters
    ----------
    path : str or path-like
        The FITS file.

    Returns
    -------
    `~astro_zackay.background.BackgroundResult`
        Equal to the result written: the sky and rms maps (dtype, unit, WCS, mask,
        uncertainty; their ``meta`` with the provenance cards added and the FITS layout
        cards dropped) and the numbers and options, exact.

    Raises
    ------
    FileNotFoundError
        When there is no such file.
    IsADirectoryError
        When the path is a directory.
    OSError
        When the file is not a readable FITS file (empty, corrupt or truncated).
    ValueError
        When the file is not a background file or lacks one of its extensions.

    Examples
    --------
    See `write_background`.
    """
    name = _check_result_file(path, "background", "write_background")
    with fits.open(path) as hdul:
        if hdul[0].header.get("AZKIND") != "background":
            raise ValueError(f"{name!r} is not an astro_zackay background file (no AZKIND = "
                             "'background' in its primary header; write one with "
                             "write_background)")
        missing = [ext for ext in (*_BACKGROUND_IMAGES.values(), "FITTED") if ext not in hdul]
        if missing:
            raise ValueError(f"{name!r} lacks the extension(s) {', '.join(missing)}: it is "
                             "truncated or was not written by write_background")
        exact = _exact_values(hdul)
        row = hdul["FITTED"].data[0]
        maps = {field: _read_ccd(path, hdul, ext, exact)
                for field, ext in _BACKGROUND_IMAGES.items()}
        return BackgroundResult(
            **maps,
            global_sky=float(row["global_sky"]), global_rms=float(row["global_rms"]),
            method=str(row["method"]).strip(),
            box_size=tuple(int(n) for n in row["box_size"]),
            filter_size=tuple(int(n) for n in row["filter_size"]),
            masked_fraction=float(row["masked_fraction"]),
        )
