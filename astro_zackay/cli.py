"""The ``astro-zackay`` command: subtract, coadd, psf, batches on Dask and a demo.

Every option is checked, and every input file opened far enough to know its shape
and unit, before any work is done or any file written: a mistake costs one or two
lines on stderr that name the problem and the option that fixes it, and exit
status 2 (``--verbose`` adds the traceback). The results are written by
`astro_zackay.files`.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table
from astropy.wcs import FITSFixedWarning

from ._checks import as_pair, is_positive
from ._version import version

__all__ = ["main"]

log = logging.getLogger("astro_zackay.cli")

#: Exit status of a user mistake (a bad option, a missing or unreadable file).
USAGE_ERROR = 2
#: The files that ``demo`` writes to its --outdir (with the cut-outs beside the figure).
_DEMO_FILES = ("subtraction.fits", "candidates.ecsv", "candidates.reg", "subtraction.png")
#: FITS file name endings that a directory or glob given to ``coadd`` may hold.
FITS_PATTERNS = ("*.fits", "*.fit", "*.fts", "*.fits.gz", "*.fit.gz", "*.fts.gz")
#: The library's option names, as they appear in its messages, and the CLI options.
_OPTION_NAMES = {
    "backend='cupy' needs": "it needs",
    "backend='numpy'": "--backend numpy",
    "reference_psf=": "--reference-fwhm",
    "science_psf=": "--science-fwhm",
    "fwhm=": "--fwhm",
    "align='stars' (or 'wcs')": "--align stars (or --align wcs)",
    "align=True": "--align stars",
    "flux_ratio= and fit_shift=False": "--flux-ratio and --no-fit-shift",
    "flux_ratio=": "--flux-ratio",
    "fit_shift=False": "--no-fit-shift",
    "noise='white'": "--noise white",
    "read_noise=": "--read-noise",
    "saturation=np.inf": "--saturation inf",
    "saturation=": "--saturation",
    "unit='adu'": "--unit adu",
    "unit=": "--unit",
    "gain=": "--gain",
    "psfs=": "--fwhm",
}
#: Words of a library error about a PSF that cannot be estimated from an image's stars:
#: the keywords through which a Python caller gives the PSF instead.
_PSF_FAILURE = ("reference_psf=", "science_psf=", "psfs=", "fwhm=", "PSF star")
#: Where the library's advice starts in such an error (it names Python keywords and
#: parameters that the command does not have, such as ``snr_min``).
_LIBRARY_ADVICE = re.compile(r"[.;:]\s+(?:or\s+)?(?:try|give|pass)\b", re.IGNORECASE)
#: Each command's advice when an image's PSF cannot be estimated, in its own options.
_PSF_ADVICE = {
    "subtract": "give the PSFs as Gaussians of known FWHM in pixels "
                "(--reference-fwhm, --science-fwhm)",
    "coadd": "give Gaussian PSFs of known FWHM in pixels with --fwhm (one value, or one "
             "per image)",
    "psf": "give --fwhm, the FWHM in pixels of a Gaussian PSF to write instead",
}


class UsageError(Exception):
    """A user mistake found by the command line: the message names the option to use."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are two lines: the problem, and where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n"
                         f"see '{self.prog} --help' for the options and an example\n")
        sys.exit(USAGE_ERROR)


# --- option types: each rejects a bad value with a message naming it ------------------------
def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not is_positive(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _saturation(text: str) -> float:
    """A saturation level: a positive number, or inf to mask no pixel as saturated."""
    return np.inf if text.strip().lower() == "inf" else _positive(text)


def _unit(text: str) -> u.UnitBase:
    try:
        return u.Unit(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a unit astropy knows (e.g. adu, electron, electron/s, MJy/sr)"
        ) from None


def _per_image(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option type taking one value for both images, or ``REF,NEW``."""

    def parse_pair(text: str) -> Any:
        parts = text.split(",")
        if len(parts) > 2:
            raise argparse.ArgumentTypeError(f"give one value or REF,NEW; got {text!r}")
        values = tuple(parse(part.strip()) for part in parts)
        return values[0] if len(values) == 1 else values

    return parse_pair


def _per_frame(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option type taking one value for every image, or one per image (comma-separated)."""

    def parse_list(text: str) -> Any:
        values = [parse(part.strip()) for part in text.split(",")]
        return values[0] if len(values) == 1 else values

    return parse_list


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An option type taking an integer from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def _tiles(text: str) -> Any:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        side = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"give auto, none or a side in pixels, got {text!r}") from None
    if side < 32:
        raise argparse.ArgumentTypeError(f"a tile side must be at least 32 px, got {side}")
    return side


# --- progress ---------------------------------------------------------------------------------
def _progress_enabled(args: argparse.Namespace) -> bool:
    """Bars only on a terminal, without --quiet, and when tqdm is installed."""
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class _Stages:
    """A bar over the named stages of a command (nothing when bars are off)."""

    def __init__(self, names: Sequence[str], enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=len(names), unit="stage", leave=False, file=sys.stderr,
                             bar_format="{desc:<24}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.debug("%s", name)
        if self._bar is not None:
            self._bar.set_description_str(name)
        try:
            yield
        except BaseException:
            self.close()  # the error message goes on a line of its own
            raise
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _frames_bar(paths: Sequence[str], enabled: bool) -> Iterable[str]:
    """The paths, with a per-frame bar as ``coadd`` reads them when bars are on."""
    if not enabled:
        return paths
    from tqdm import tqdm

    return tqdm(paths, desc="reading frames", unit="frame", file=sys.stderr)


# --- checks of the inputs and outputs, before any work ---------------------------------------
@dataclass(frozen=True)
class _FitsImage:
    """What a FITS input holds: its path, image shape and data unit (None when unknown)."""

    path: str
    shape: tuple[int, ...]
    unit: u.UnitBase | None


def _image_header(path: str, label: str) -> fits.Header:
    """The header of the first image HDU with data; a UsageError for any unreadable file."""
    if not os.path.exists(path):
        raise UsageError(f"{label} {path!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{label} {path!r} is a directory, not a FITS file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{label} {path!r} cannot be read (permission denied)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(path) as hdul:
                headers = [hdu.header for hdu in hdul]
        except (OSError, ValueError) as exc:
            raise UsageError(f"{label} {path!r} is not a readable FITS file ({exc})") from None
    for warning in caught:
        if "truncated" in str(warning.message):
            detail = str(warning.message).split(": ", 1)[-1]
            raise UsageError(f"{label} {path!r} is truncated ({detail})")
    for header in headers:  # tables have NAXIS = 2 too
        if header.get("NAXIS", 0) == 2 and header.get("XTENSION", "IMAGE").strip() == "IMAGE":
            return header
    raise UsageError(f"{label} {path!r} holds no 2-D image")


def _check_image(path: str, label: str, unit: u.UnitBase | None) -> _FitsImage:
    """An input image's shape and unit; a UsageError naming --unit when it has none."""
    header = _image_header(path, label)
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    if unit is not None:
        return _FitsImage(path, shape, unit)
    bunit = header.get("BUNIT")
    if bunit is None or not str(bunit).strip():
        raise UsageError(f"{label} {path!r} has no BUNIT keyword, so its unit is unknown: "
                         "give it with --unit (e.g. --unit adu)")
    text = str(bunit).strip()
    try:
        parsed = u.Unit(text.lower() if text.lower() == "adu" else text)
    except ValueError:
        raise UsageError(f"{label} {path!r} has BUNIT = {text!r}, which astropy cannot parse: "
                         "give its unit with --unit") from None
    return _FitsImage(path, shape, parsed)


def _check_output(path: str | None, option: str, overwrite: bool, taken: set[str]) -> None:
    """An output path that can be written: its folder exists, not taken, not there already."""
    if path is None:
        return
    resolved = os.path.realpath(path)
    if resolved in taken:
        raise UsageError(f"{option} {path!r} is also an input or another output: "
                         "give a different file name")
    taken.add(resolved)
    folder = os.path.dirname(resolved)
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path!r}: the folder {folder!r} is not writable")
    if os.path.isdir(resolved):
        raise UsageError(f"{option} {path!r} is a directory: give a file name")
    if os.path.exists(resolved) and not overwrite:
        raise UsageError(f"{option} {path!r} already exists: pass --overwrite to replace it")


def _check_outputs(args: argparse.Namespace, options: Sequence[str], inputs: Iterable[str],
                   beside_plot: str | None = None) -> None:
    """Check the output options and, with ``--plot``, the figure ``beside_plot`` beside it."""
    taken = {os.path.realpath(path) for path in inputs}
    for option in options:
        _check_output(getattr(args, option.lstrip("-").replace("-", "_")), option,
                      args.overwrite, taken)
    if getattr(args, "plot", None) is not None:
        _check_plotting()
        if beside_plot is not None:
            _check_output(str(_beside(args.plot, beside_plot)), f"--plot's {beside_plot}",
                          args.overwrite, taken)


def _beside(path: str | Path, what: str) -> Path:
    """The second figure written beside the figure ``path``: ``OUT_<what>.png``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{what}{path.suffix}")


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: "
                         "pip install matplotlib (or drop --plot)") from None


def _check_backend(name: str) -> None:
    from .fourier import get_array_module

    try:
        get_array_module(name)
    except ImportError as exc:
        raise UsageError(f"--backend {name}: {exc}") from None


def _check_same_shape(images: Sequence[_FitsImage], align: str | None, what: str) -> None:
    first = images[0]
    for image in images[1:]:
        if image.shape != first.shape and not align:
            raise UsageError(
                f"{what} differ in shape: {first.path!r} is {first.shape[1]}x{first.shape[0]}, "
                f"{image.path!r} {image.shape[1]}x{image.shape[0]} (x by y): register them, or "
                "pass --align stars (or --align wcs)"
            )


@contextlib.contextmanager
def _psf_advice(command: str, label: str | None = None) -> Iterator[None]:
    """A library error about a PSF that cannot be estimated, as a UsageError.

    The library's diagnosis (which image, how many sources, why they were rejected) is
    kept, prefixed with ``label`` when given; its advice is replaced by ``command``'s
    options.
    """
    try:
        yield
    except ValueError as exc:
        text = str(exc)
        if not any(word in text for word in _PSF_FAILURE):
            raise
        diagnosis = _LIBRARY_ADVICE.split(text, maxsplit=1)[0].rstrip(". ")
        prefix = f"{label}: " if label else ""
        check = "" if "check" in diagnosis else "check its mask and --saturation, or "
        raise UsageError(f"{prefix}{diagnosis}; {check}{_PSF_ADVICE[command]}") from exc


# --- the subcommands --------------------------------------------------------------------------
def _subtract_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a subtraction, for the headers of its result files."""
    names = ("threshold", "unit", "gain", "read_noise", "saturation", "align", "psf_method",
             "reference_fwhm", "science_fwhm", "flux_ratio", "fit_shift", "tiles", "noise",
             "backend")
    return {name: getattr(args, name) for name in names}


def _psf_option(args: argparse.Namespace, path: str, fwhm: float | None, index: int) -> Any:
    """The PSF to give `subtract` for one image: a FWHM, a coadd's PSF, a model, or None."""
    from .files import coadd_psf

    if fwhm is not None:
        return fwhm
    stored = coadd_psf(path)
    if stored is not None:
        log.info("using the PSF stored in the coadd %s", path)
        return stored
    if args.psf_method == "auto":
        return None
    from .psf import estimate_psf

    units, gains = as_pair(args.unit, "--unit"), as_pair(args.gain, "--gain")
    saturations = as_pair(args.saturation, "--saturation")
    with _psf_advice("subtract", f"{('REF', 'NEW')[index]} {path!r}"):
        return estimate_psf(path, method=args.psf_method, unit=units[index], gain=gains[index],
                            saturation=saturations[index])


def _subtract(args: argparse.Namespace) -> int:
    from .files import write_candidates, write_regions, write_subtraction
    from .subtraction import subtract

    units = as_pair(args.unit, "--unit")
    images = [_check_image(args.reference, "REF", units[0]),
              _check_image(args.science, "NEW", units[1])]
    _check_same_shape(images, args.align, "REF and NEW")
    _check_outputs(args, ("--output", "--catalog", "--regions", "--plot"),
                   (args.reference, args.science), beside_plot="candidates")
    _check_backend(args.backend)

    stages = _Stages(["PSFs", "subtracting", "finding candidates", "writing"],
                     _progress_enabled(args))
    with stages("PSFs"):
        psfs = [_psf_option(args, path, fwhm, j) for j, (path, fwhm) in enumerate(
            ((args.reference, args.reference_fwhm), (args.science, args.science_fwhm)))]
    with stages("subtracting"), _psf_advice("subtract"):
        result = subtract(args.reference, args.science, reference_psf=psfs[0],
                          science_psf=psfs[1], flux_ratio=args.flux_ratio,
                          fit_shift=args.fit_shift, align=args.align or False, tiles=args.tiles,
                          unit=args.unit, gain=args.gain, read_noise=args.read_noise,
                          saturation=args.saturation, noise=args.noise, backend=args.backend)
    log.info("%r", result)
    with stages("finding candidates"):
        candidates = result.find_transients(threshold=args.threshold)
    inputs, parameters = (args.reference, args.science), _subtract_parameters(args)
    with stages("writing"):
        write_subtraction(result, args.output, inputs=inputs, parameters=parameters,
                          overwrite=args.overwrite)
        if args.catalog:
            write_candidates(candidates, args.catalog, inputs=inputs, parameters=parameters,
                             overwrite=args.overwrite)
        if args.regions:
            write_regions(candidates, args.regions, overwrite=args.overwrite)
        if args.plot:
            reference = CCDData.read(args.reference, unit=images[0].unit)
            science = CCDData.read(args.science, unit=images[1].unit)
            _plot_subtraction(args.plot, result, reference, science, candidates, args.threshold)
    stages.close()
    written = [p for p in (args.output, args.catalog, args.regions, args.plot) if p]
    log.info("%d candidate(s) above %g sigma (%d good: no flag set); wrote %s",
             len(candidates), args.threshold, int(np.sum(candidates["good"])),
             ", ".join(written))
    return 0


def _save(fig: Any, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_subtraction(path: str | Path, result: Any, reference: Any, science: Any,
                      candidates: Table, threshold: float) -> None:
    """The four-panel figure at ``path``; the candidates' cut-outs beside it, if any."""
    from .plotting import plot_candidates, plot_subtraction

    _save(plot_subtraction(result, reference, science, candidates, threshold=threshold), path)
    if len(candidates):
        cutouts = _beside(path, "candidates")
        _save(plot_candidates(result, reference, science, candidates), cutouts)
        log.info("candidate cut-outs in %s", cutouts)


def _expand_images(arguments: Sequence[str]) -> list[str]:
    """Files, directories and globs to FITS paths, listed by ccdproc's ImageFileCollection."""
    from ccdproc import ImageFileCollection

    paths: list[str] = []
    for argument in arguments:
        if os.path.isdir(argument):
            found = _collection_files(ImageFileCollection, argument, FITS_PATTERNS)
            if not found:
                raise UsageError(f"IMAGE {argument!r} is a directory with no FITS file in it")
        elif glob.has_magic(argument):
            folder, pattern = os.path.split(argument)
            found = []
            if os.path.isdir(folder or "."):
                found = _collection_files(ImageFileCollection, folder or ".", (pattern,))
            if not found:
                raise UsageError(f"IMAGE pattern {argument!r} matches no FITS file")
        else:
            found = [argument]
        paths.extend(found)
    return paths


def _collection_files(collection: type, folder: str, patterns: Sequence[str]) -> list[str]:
    files: set[str] = set()
    for pattern in patterns:
        if glob.glob(os.path.join(glob.escape(folder), pattern)):
            images = collection(location=folder, glob_include=pattern)
            files.update(images.files_filtered(include_path=True))
    return sorted(files)


def _coadd_parameters(args: argparse.Namespace) -> dict[str, Any]:
    names = ("unit", "gain", "saturation", "fwhm", "align", "reject", "backend")
    return {name: getattr(args, name) for name in names}


def _coadd(args: argparse.Namespace) -> int:
    from .coaddition import coadd
    from .files import write_coadd

    paths = _expand_images(args.images)
    if len(paths) < 2:
        raise UsageError(f"a coadd needs at least two images, got {len(paths)}")
    images = [_check_image(path, "IMAGE", args.unit) for path in paths]
    _check_same_shape(images, args.align, "the images")
    for option, values in (("--fwhm", args.fwhm), ("--gain", args.gain)):
        if isinstance(values, list) and len(values) != len(paths):
            raise UsageError(f"{option} gives {len(values)} values for {len(paths)} images: "
                             "give one value, or one per image separated by commas")
    _check_outputs(args, ("--output", "--plot"), paths)
    _check_backend(args.backend)
    log.info("coadding %d images", len(paths))
    enabled = _progress_enabled(args)
    fwhm = args.fwhm if isinstance(args.fwhm, list) or args.fwhm is None else [args.fwhm] * len(
        paths)
    with _psf_advice("coadd"):
        result = coadd(_frames_bar(paths, enabled), psfs=fwhm, unit=args.unit, gain=args.gain,
                       saturation=args.saturation, align=args.align or False,
                       reject=args.reject, backend=args.backend)
    log.info("%r", result)
    write_coadd(result, args.output, inputs=paths, parameters=_coadd_parameters(args),
                overwrite=args.overwrite)
    if args.plot:
        from .plotting import plot_coadd

        _save(plot_coadd(result), args.plot)
    log.info("wrote %s", ", ".join(p for p in (args.output, args.plot) if p))
    return 0


def _psf(args: argparse.Namespace) -> int:
    from .psf import estimate_psf

    _check_image(args.image, "IMAGE", args.unit)
    _check_outputs(args, ("--output", "--plot"), (args.image,), beside_plot="coefficients")
    with _psf_advice("psf", f"IMAGE {args.image!r}"):
        model = estimate_psf(args.image, method=args.method, degree=args.degree,
                             n_components=args.n_components, fwhm=args.fwhm, unit=args.unit,
                             gain=args.gain, saturation=args.saturation)
    log.info("%s", model.quality_report())
    model.write(args.output, overwrite=args.overwrite)
    if args.plot:
        from .plotting import plot_psf_basis, plot_psf_coefficients

        _save(plot_psf_basis(model), args.plot)
        if model.is_varying:
            fields = _beside(args.plot, "coefficients")
            _save(plot_psf_coefficients(model), fields)
            log.info("coefficient fields in %s", fields)
    log.info("wrote %s", ", ".join(p for p in (args.output, args.plot) if p))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .files import write_candidates, write_regions, write_subtraction
    from .subtraction import subtract
    from .transients import describe_flags

    outdir = _demo_outdir(args)
    stages = _Stages(["simulating", "subtracting", "finding candidates", "writing"],
                     _progress_enabled(args))
    with stages("simulating"):
        pair, truth = _demo_pair(args)
    log.info("simulated a %dx%d pair with %d stars and %d transient(s) at %s",
             args.size, args.size, args.stars, len(truth),
             [(round(float(x), 1), round(float(y), 1)) for x, y in zip(truth["x"], truth["y"])])
    with stages("subtracting"):
        result = subtract(pair.reference.ccd, pair.science.ccd)
    log.info("%r", result)
    with stages("finding candidates"):
        candidates = result.find_transients(threshold=args.threshold)
    inputs = ("simulated reference", "simulated science")
    parameters = {name: getattr(args, name) for name in ("size", "stars", "seed", "threshold")}
    with stages("writing"):
        write_subtraction(result, outdir / "subtraction.fits", inputs=inputs,
                          parameters=parameters, overwrite=args.overwrite)
        write_candidates(candidates, outdir / "candidates.ecsv", inputs=inputs,
                         parameters=parameters, overwrite=args.overwrite)
        write_regions(candidates, outdir / "candidates.reg", overwrite=args.overwrite)
        _plot_subtraction(outdir / "subtraction.png", result, pair.reference.ccd,
                          pair.science.ccd, candidates, args.threshold)
    stages.close()
    found = 0
    for x, y, flux in zip(truth["x"], truth["y"], truth["flux"]):
        distance = np.hypot(candidates["x"] - x, candidates["y"] - y) if len(candidates) else []
        best = int(np.argmin(distance)) if len(distance) else None
        if best is not None and distance[best] < 2.0:
            found += 1
            row = candidates[best]
            log.info("recovered the transient at (%.1f, %.1f): Scorr %.1f sigma, flux %.0f +- "
                     "%.0f e- (true %.0f), flags %s", row["x"], row["y"], row["score"],
                     row["flux"], row["flux_err"], flux, describe_flags(row["flags"]) or "none")
        else:
            log.warning("missed the transient at (%.1f, %.1f) of flux %.0f e-", x, y, flux)
    log.info("%d candidate(s) above %g sigma (%d good), %d of %d injected transient(s) "
             "recovered; wrote subtraction.fits, candidates.ecsv, candidates.reg and "
             "subtraction.png to %s", len(candidates), args.threshold,
             int(np.sum(candidates["good"])), found, len(truth), outdir)
    return 0 if found == len(truth) else 1


def _demo_outdir(args: argparse.Namespace) -> Path:
    """The demo's folder, created, after checking that its files can be written."""
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"--outdir {args.outdir!r} is a file: give a folder")
    _check_plotting()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--outdir {args.outdir!r} cannot be created ({exc.strerror}): "
                         "give a folder that can be written") from None
    taken: set[str] = set()
    for name in _DEMO_FILES:
        _check_output(str(outdir / name), "--outdir", args.overwrite, taken)
    _check_output(str(_beside(outdir / "subtraction.png", "candidates")), "--outdir",
                  args.overwrite, taken)
    return outdir


def _demo_pair(args: argparse.Namespace) -> tuple[Any, Table]:
    """A simulated pair with three transients of S/N 12, 25 and 50 in the science image."""
    from .simulation import simulate_pair

    rng = np.random.default_rng(args.seed)
    margin = args.size // 8
    transients = Table({
        "x": rng.uniform(margin, args.size - margin, 3),
        "y": rng.uniform(margin, args.size - margin, 3),
    })
    # fluxes for single-image S/N of 12, 25 and 50 in the science frame (sky 200 e-, FWHM 3.5)
    sigma_psf = 3.5 / 2.3548
    noise = np.sqrt(200.0 + 5.0**2) * np.sqrt(4 * np.pi * sigma_psf**2)
    transients["flux"] = np.array([12.0, 25.0, 50.0]) * noise
    pair = simulate_pair((args.size, args.size), n_stars=args.stars, flux_range=(2e3, 2e5),
                         reference_psf=2.5, science_psf=3.5, flux_ratio=0.85,
                         shift=(0.3, -0.2), transients=transients, seed=args.seed)
    return pair, pair.transients


# --- batches on a Dask cluster ----------------------------------------------------------------
#: The summary table that ``batch`` and ``coadd-batch`` write in --outdir.
SUMMARY = "summary.ecsv"
#: Seconds to wait for --scheduler to answer, without --timeout.
SCHEDULER_TIMEOUT = 30.0


def _batch_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and _progress_enabled(args)


def _batch_output(args: argparse.Namespace) -> str:
    """The summary file's path, checked before any work."""
    summary = os.path.join(args.outdir, SUMMARY)
    if os.path.exists(args.outdir) and not os.path.isdir(args.outdir):
        raise UsageError(f"--outdir {args.outdir!r} is a file: give a folder")
    if os.path.isdir(args.outdir):
        _check_output(summary, "--outdir's summary", args.overwrite, set())
    return summary


@contextlib.contextmanager
def _batch_client(args: argparse.Namespace) -> Iterator[Any]:
    """A client of the scheduler at --scheduler (closed at the end), or None."""
    if args.timeout is not None and args.scheduler is None:
        raise UsageError("--timeout is how long to wait for --scheduler to answer, and there "
                         "is no --scheduler: give both, or neither")
    try:
        import distributed
    except ImportError:
        raise UsageError("batches run on Dask, which is not installed: "
                         "pip install 'dask[distributed]' (or astro-zackay[all])") from None
    if args.scheduler is None:
        yield None
        return
    try:
        client = distributed.Client(args.scheduler, timeout=args.timeout or SCHEDULER_TIMEOUT)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--scheduler {args.scheduler!r}: no Dask scheduler answered "
                         f"({exc}); check the address (tcp://HOST:PORT) and that it runs") from None
    with client:
        yield client


def _finish_batch(summary: Table, path: str, overwrite: bool) -> int:
    """Write the summary; exit status 0 when every row is ok, else 1."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # none made if no row ran
    summary.write(path, format="ascii.ecsv", overwrite=overwrite)
    failed = int(np.sum(summary["status"] != "ok"))
    log.info("%d of %d row(s) ok; wrote %s", len(summary) - failed, len(summary), path)
    return 1 if failed else 0


def _batch(args: argparse.Namespace) -> int:
    from .parallel import subtract_batch

    summary_path = _batch_output(args)
    options = {"unit": args.unit, "gain": args.gain, "read_noise": args.read_noise,
               "saturation": args.saturation, "align": args.align or False,
               "reference_psf": args.reference_fwhm, "science_psf": args.science_fwhm,
               "flux_ratio": args.flux_ratio, "fit_shift": args.fit_shift,
               "tiles": args.tiles, "noise": args.noise}
    with _batch_client(args) as client:
        summary = subtract_batch(args.pairs, args.outdir, client=client,
                                 progress=_batch_progress(args), overwrite=args.overwrite,
                                 threshold=args.threshold, n_workers=args.workers, **options)
    return _finish_batch(summary, summary_path, args.overwrite)


def _coadd_batch(args: argparse.Namespace) -> int:
    from .parallel import coadd_batch

    summary_path = _batch_output(args)
    options = {"unit": args.unit, "gain": args.gain, "saturation": args.saturation,
               "psfs": args.fwhm, "align": args.align or False, "reject": args.reject}
    with _batch_client(args) as client:
        summary = coadd_batch(args.groups, args.outdir, client=client,
                              progress=_batch_progress(args), overwrite=args.overwrite,
                              n_workers=args.workers, **options)
    return _finish_batch(summary, summary_path, args.overwrite)



# --- the parser -------------------------------------------------------------------------------
_MAIN_EXAMPLE = """examples:
  astro-zackay subtract ref.fits new.fits -o diff.fits --catalog cands.ecsv --unit adu
  astro-zackay coadd frames/ -o coadd.fits
  astro-zackay psf image.fits -o psf.fits
  astro-zackay batch pairs.csv --outdir results --workers 2
  astro-zackay coadd-batch groups.csv --outdir coadds --scheduler tcp://HOST:8786
  astro-zackay demo --outdir demo-output"""
_SUBTRACT_EXAMPLE = """example:
  astro-zackay subtract ref.fits new.fits -o diff.fits --catalog cands.ecsv \\
      --regions cands.reg --plot diff.png --unit adu --gain 1.4 --saturation 65000

Writes D, Scorr, the flux and its error, P_D and the mask to diff.fits (read them with
CCDData.read("diff.fits", hdu="SCORR") or astro_zackay.files.read_subtraction), the
candidates above --threshold to the ECSV table and the ds9 regions, and a figure (with
the candidates' cut-outs in diff_candidates.png)."""
_COADD_EXAMPLE = """example:
  astro-zackay coadd frames/ -o coadd.fits --unit adu --gain 1.4 --plot coadd.png
  astro-zackay coadd 'night1/*.fits' extra.fits -o coadd.fits --fwhm 2.5,3.1,2.8

The primary image of coadd.fits is the flux-calibrated coadd with its uncertainty: give
it as the REF of 'astro-zackay subtract', which then uses the stored PSF."""
_PSF_EXAMPLE = """example:
  astro-zackay psf image.fits -o psf.fits --unit adu --gain 1.4 --plot psf.png

Read the model back with astro_zackay.psf.KLPSFModel.read("psf.fits")."""
_BATCH_EXAMPLE = """example:
  astro-zackay batch pairs.csv --outdir results --unit adu --gain 1.4 --workers 2

pairs.csv is a CSV table with a header line and the columns reference and science
(paths), and optionally name:

  reference,science,name
  ref/field1.fits,night3/field1.fits,field1

Each pair is one Dask task that writes NAME.fits and NAME_candidates.ecsv in --outdir;
the summary (one row per pair: status, error, seconds, flux ratio, good candidates)
goes to results/summary.ecsv. Exit status 0 when every pair succeeded, 1 when any
failed (its row holds the message; the others are done), 2 for a mistake found before
any work. Without --scheduler, a local cluster of --workers processes (default one
per core) runs on this machine; the files must be readable by the workers."""
_COADD_BATCH_EXAMPLE = """example:
  astro-zackay coadd-batch groups.csv --outdir coadds --unit adu --fwhm 2.5

groups.csv is a CSV table with a header line and the columns group and path, one row
per image; each group is coadded into coadds/GROUP.fits by one Dask task. The summary
goes to coadds/summary.ecsv; exit status as for 'astro-zackay batch'."""
_DEMO_EXAMPLE = """example:
  astro-zackay demo --outdir demo-output

Simulates a pair with three injected transients, subtracts it and writes
subtraction.fits, candidates.ecsv, candidates.reg and subtraction.png (with the
cut-outs in subtraction_candidates.png); exits 1 when an injected transient is missed.
Give --overwrite to replace the files of an earlier run."""


def _common(parser: argparse.ArgumentParser) -> None:
    """--verbose/--quiet, accepted before or after the subcommand."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log every step of the library (debug messages too) and show "
                            "the traceback of an error")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="only warnings and errors; no progress bars")


def _subcommand(commands: Any, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text, description=help_text, epilog=example,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(command)
    return command


def _add_io_options(command: argparse.ArgumentParser, per: Callable[[Any], Any],
                    per_gain: Callable[[Any], Any], meaning: str, gain_meaning: str) -> None:
    """--unit, --saturation (values ``per``) and --gain (``per_gain``), with their meanings."""
    command.add_argument("--unit", type=per(_unit), default=None,
                         help=f"data unit of files without BUNIT (e.g. adu){meaning}")
    command.add_argument("--gain", type=per_gain(_positive), default=None, metavar="G",
                         help="gain in e-/ADU (for the source noise of images in ADU)"
                              f"{gain_meaning}")
    command.add_argument("--saturation", type=per(_saturation), default=None, metavar="S",
                         help=f"saturation level in data units (inf: none){meaning}")


def _same(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """One value for every image."""
    return parse


def _add_backend(command: argparse.ArgumentParser) -> None:
    command.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                         help="where the FFT algebra runs: numpy (CPU, default) or cupy "
                              "(a CUDA GPU; needs pip install cupy-cuda12x)")


def _add_output(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("-o", "--output", required=True, metavar="OUT.fits",
                         help=f"the FITS file to write: {what}")
    command.add_argument("--overwrite", action="store_true",
                         help="replace output files that exist")


def _add_subtraction_options(command: argparse.ArgumentParser) -> None:
    """The options of `subtract` and of its candidates, shared by subtract and batch."""
    command.add_argument("--threshold", type=_positive, default=5.0, metavar="SIGMA",
                         help="detection threshold on |Scorr| in sigma (default 5)")
    per_image = "; one value, or REF,NEW"
    _add_io_options(command, _per_image, _per_image, per_image, per_image)
    command.add_argument("--read-noise", type=_per_image(_positive), default=None, metavar="RN",
                         help=f"read noise in electrons{per_image}")
    command.add_argument("--align", choices=("stars", "wcs"), default=None,
                         help="resample REF onto NEW's grid first: by matching stars or by WCS")
    for image in ("reference", "science"):
        command.add_argument(f"--{image}-fwhm", type=_positive, default=None, metavar="PIXELS",
                             help=f"a Gaussian {image} PSF of this FWHM instead of an estimate")
    command.add_argument("--flux-ratio", type=_positive, default=None, metavar="BETA",
                         help="science / reference flux ratio (default: fitted)")
    command.add_argument("--no-fit-shift", dest="fit_shift", action="store_false",
                         help="do not fit and remove a sub-pixel shift")
    command.add_argument("--tiles", type=_tiles, default="auto", metavar="auto|none|PIXELS",
                         help="tiles of constant PSF: auto (default), none, or a side in pixels")
    command.add_argument("--noise", choices=("auto", "white"), default="auto",
                         help="auto: measure correlated noise (resampled images); white: assume "
                              "none")


def _add_reject(command: argparse.ArgumentParser) -> None:
    """--reject and --no-reject, of coadd and coadd-batch: one or the other (they contradict)."""
    reject = command.add_mutually_exclusive_group()
    reject.add_argument("--reject", type=_positive, default=6.0, metavar="SIGMA",
                        help="reject what one image alone shows above SIGMA (default 6)")
    reject.add_argument("--no-reject", dest="reject", action="store_const", const=None,
                        help="keep every pixel (no outlier rejection)")


def _subtract_parser(commands: Any) -> None:
    sub = _subcommand(commands, "subtract", "ZOGY subtraction of two FITS images",
                      _SUBTRACT_EXAMPLE)
    sub.add_argument("reference", metavar="REF", help="the reference image (FITS)")
    sub.add_argument("science", metavar="NEW", help="the new (science) image (FITS)")
    _add_output(sub, "D, Scorr, flux, flux error, P_D and mask with provenance")
    sub.add_argument("--catalog", metavar="CANDS.ecsv", help="write the candidates (ECSV)")
    sub.add_argument("--regions", metavar="CANDS.reg",
                     help="write the candidates as ds9 regions (good green, flagged red)")
    sub.add_argument("--plot", metavar="OUT.png", help="write a figure (needs matplotlib)")
    _add_subtraction_options(sub)
    sub.add_argument("--psf-method", choices=("auto", "kl", "constant", "gaussian", "moffat"),
                     default="auto", help="PSF model estimated from each image's stars "
                     "(default auto: a varying KL PSF, stepping down when stars are few)")
    _add_backend(sub)
    sub.set_defaults(func=_subtract)


def _coadd_parser(commands: Any) -> None:
    add = _subcommand(commands, "coadd", "proper coaddition of registered FITS images",
                      _COADD_EXAMPLE)
    add.add_argument("images", nargs="+", metavar="IMAGE",
                     help="FITS files, directories of them, or quoted globs")
    _add_output(add, "the calibrated coadd, its PSF, score, depth and provenance")
    add.add_argument("--plot", metavar="OUT.png", help="write a figure (needs matplotlib)")
    _add_io_options(add, _same, _per_frame, "", "; one value, or one per image (comma-separated)")
    add.add_argument("--fwhm", type=_per_frame(_positive), default=None, metavar="PIXELS",
                     help="Gaussian PSFs of this FWHM (one, or one per image) instead of "
                          "estimates")
    add.add_argument("--align", choices=("stars", "wcs"), default=None,
                     help="resample every image onto the first one's grid")
    _add_reject(add)
    _add_backend(add)
    add.set_defaults(func=_coadd)


def _psf_parser(commands: Any) -> None:
    psf = _subcommand(commands, "psf", "estimate an image's PSF from its stars", _PSF_EXAMPLE)
    psf.add_argument("image", metavar="IMAGE", help="the image (FITS)")
    _add_output(psf, "the PSF model (astro_zackay.psf.KLPSFModel.read reads it)")
    psf.add_argument("--plot", metavar="OUT.png",
                     help="write the PSF basis (and its coefficient fields when it varies)")
    psf.add_argument("--method", choices=("kl", "constant", "gaussian", "moffat"), default="kl",
                     help="the model asked for (default kl, stepping down when stars are few)")
    psf.add_argument("--degree", type=_int_in(0, 3), default=None,
                     metavar="D",
                     help="degree of the coefficient fields (default: chosen from the stars)")
    psf.add_argument("--n-components", type=_int_in(1, 8), default=None,
                     metavar="K", help="number of eigen-PSFs, 1-8 (default: chosen)")
    psf.add_argument("--fwhm", type=_positive, default=None, metavar="PIXELS",
                     help="a Gaussian PSF of this FWHM when the image has no usable star")
    _add_io_options(psf, _same, _same, "", "")
    psf.set_defaults(func=_psf)


def _add_batch_options(command: argparse.ArgumentParser, table: str, meaning: str) -> None:
    """The CSV table, --outdir, where the tasks run, progress and --overwrite."""
    command.add_argument(table, metavar=f"{table.upper()}.csv", help=meaning)
    command.add_argument("--outdir", required=True, metavar="DIR",
                         help=f"folder of the results and of {SUMMARY} (created if needed)")
    where = command.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", default=None,
                       help="address of a running Dask scheduler (tcp://HOST:PORT); "
                            "default: a local cluster on this machine")
    where.add_argument("--workers", type=_int_in(1, 1024), default=None, metavar="N",
                       help="worker processes of the local cluster (default: one per core, "
                            "at most one per task)")
    command.add_argument("--timeout", type=_positive, default=None, metavar="SECONDS",
                         help="with --scheduler: how long to wait for it to answer (default "
                              f"{SCHEDULER_TIMEOUT:g})")
    command.add_argument("--no-progress", action="store_true",
                         help="no progress bar (there is none off a terminal or with --quiet)")
    command.add_argument("--overwrite", action="store_true",
                         help=f"replace the results and {SUMMARY} of an earlier run")


def _batch_parser(commands: Any) -> None:
    batch = _subcommand(commands, "batch", "ZOGY subtractions of many pairs on a Dask cluster",
                        _BATCH_EXAMPLE)
    _add_batch_options(batch, "pairs", "CSV table of the pairs: columns reference, science "
                                       "and optionally name")
    _add_subtraction_options(batch)
    batch.set_defaults(func=_batch)


def _coadd_batch_parser(commands: Any) -> None:
    add = _subcommand(commands, "coadd-batch",
                      "proper coadds of many groups of images on a Dask cluster",
                      _COADD_BATCH_EXAMPLE)
    _add_batch_options(add, "groups", "CSV table of the images: columns group and path, one "
                                      "row per image")
    _add_io_options(add, _same, _same, "", "")
    add.add_argument("--fwhm", type=_positive, default=None, metavar="PIXELS",
                     help="Gaussian PSFs of this FWHM for every image instead of estimates")
    add.add_argument("--align", choices=("stars", "wcs"), default=None,
                     help="resample every image onto its group's first image's grid")
    _add_reject(add)
    add.set_defaults(func=_coadd_batch)


def _demo_parser(commands: Any) -> None:
    demo = _subcommand(commands, "demo", "subtract a simulated pair with injected transients",
                       _DEMO_EXAMPLE)
    demo.add_argument("--outdir", default="demo-output",
                      help="folder for the FITS file, tables and PNG (default demo-output)")
    demo.add_argument("--size", type=_int_in(128, 8192), default=1024,
                      metavar="PIXELS", help="image side in pixels, 128-8192 (default 1024)")
    demo.add_argument("--stars", type=_int_in(0, 100000), default=500, metavar="N",
                      help="number of stars (default 500)")
    demo.add_argument("--seed", type=int, default=2016, help="random seed (default 2016)")
    demo.add_argument("--threshold", type=_positive, default=5.0, metavar="SIGMA",
                      help="detection threshold in sigma (default 5)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the files of an earlier run in --outdir")
    demo.set_defaults(func=_demo)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="astro-zackay",
        description="Proper image subtraction (ZOGY), proper coaddition and PSFs on FITS "
                    "images. Run 'astro-zackay COMMAND --help' for a command's options.",
        epilog=_MAIN_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"astro-zackay {version}")
    _common(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)
    _subtract_parser(commands)
    _coadd_parser(commands)
    _psf_parser(commands)
    _batch_parser(commands)
    _coadd_batch_parser(commands)
    _demo_parser(commands)
    return parser


# --- running ----------------------------------------------------------------------------------
def _cli_words(message: str) -> str:
    """The library's option names in a message replaced by the command's options."""
    for name, option in _OPTION_NAMES.items():
        # advice ("pass gain= or ..."), not a value ("flux_ratio=1.02", "unit=adu")
        value_follows = r"(?![\w'\"(\[]|[.+-]+\d)" if name.endswith("=") else ""
        message = re.sub(re.escape(name) + value_follows, option, message)
    return message


class _CLIFormatter(logging.Formatter):
    """Log lines with the library's option names replaced by the command's options."""

    def format(self, record: logging.LogRecord) -> str:
        return _cli_words(super().format(record))


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """Warnings as one log line each: ``WARNING <category>: <message>``.

    astropy's notes on the FITS headers it fixed are debug messages.
    """
    level = logging.DEBUG if issubclass(category, FITSFixedWarning) else logging.WARNING
    logging.getLogger("astro_zackay").log(level, "%s: %s", category.__name__, message)


def _log_through_bars(logger: logging.Logger, enabled: bool) -> Any:
    """Log lines written above the progress bars (tqdm's redirect) when bars are on."""
    if not enabled:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logger])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``astro-zackay`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success; 2 for a user mistake (a bad option, a missing,
        unreadable or unusable file: the message on stderr names the option that fixes
        it); for ``demo``, 1 when an injected transient was missed; for ``batch`` and
        ``coadd-batch``, 1 when any row of the summary failed.

    Examples
    --------
    >>> from astro_zackay.cli import main
    >>> main(["subtract", "no-such-ref.fits", "no-such-new.fits", "-o", "out.fits"])
    2
    """
    args = _parser().parse_args(argv)
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    args.quiet = quiet
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CLIFormatter("%(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("astro_zackay")
    # the command's own steps at INFO; the library's at INFO too only with --verbose
    levels = ((logging.DEBUG, logging.DEBUG) if verbose else
              (logging.WARNING, logging.WARNING) if quiet else (logging.WARNING, logging.INFO))
    astropy_log = logging.getLogger("astropy")  # its INFO notes ("first HDU with data ...")
    previous = package.level, package.propagate, log.level, astropy_log.level
    package.addHandler(handler)
    package.setLevel(levels[0])
    log.setLevel(levels[1])
    astropy_log.setLevel(logging.INFO if verbose else logging.WARNING)
    package.propagate = False  # one line per message, whatever handlers the root has
    try:
        with warnings.catch_warnings(), _log_through_bars(package, _progress_enabled(args)):
            warnings.simplefilter("default")
            warnings.showwarning = _log_warning
            return args.func(args)
    except (UsageError, ValueError, OSError, ImportError, u.UnitsError) as exc:
        if verbose:
            traceback.print_exc()
        sys.stderr.write(f"astro-zackay {args.command}: error: {_cli_words(str(exc))}\n")
        return USAGE_ERROR
    finally:
        package.removeHandler(handler)
        package.setLevel(previous[0])
        package.propagate = previous[1]
        log.setLevel(previous[2])
        astropy_log.setLevel(previous[3])
