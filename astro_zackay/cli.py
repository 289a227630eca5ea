"""The ``astro-zackay`` command: a demo on simulated data, and subtract / coadd on FITS files."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy.nddata import CCDData
from astropy.table import Table

__all__ = ["main"]

log = logging.getLogger("astro_zackay.cli")


def _write_png(
    path: Path, science: CCDData, result, candidates: Table, truth: Table | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.visualization import ImageNormalize, ZScaleInterval

    panels = [
        ("science", science.data, ImageNormalize(science.data, interval=ZScaleInterval())),
        ("difference D (sigma)", result.difference.data, ImageNormalize(vmin=-4, vmax=4)),
        ("Scorr (sigma)", result.score.data, ImageNormalize(vmin=-6, vmax=6)),
    ]
    good = np.asarray(candidates["good"], bool) if len(candidates) else np.zeros(0, bool)
    order = np.argsort(~good, kind="stable")  # zoom on good candidates first, flagged last
    marks = truth if truth is not None and len(truth) else candidates[order][:3]
    n_zoom = min(len(marks), 3)
    fig, axes = plt.subplots(2 if n_zoom else 1, 3, figsize=(15, 10.5 if n_zoom else 5.4),
                             constrained_layout=True, squeeze=False)
    for ax, (title, data, norm) in zip(axes[0], panels):
        shown = ax.imshow(data, origin="lower", cmap="gray", norm=norm)
        ax.set_title(title)
        fig.colorbar(shown, ax=ax, shrink=0.8)
        if truth is not None and len(truth):
            ax.scatter(truth["x"], truth["y"], s=250, facecolors="none", edgecolors="tab:green",
                       label="injected")
        if good.any():
            ax.scatter(candidates["x"][good], candidates["y"][good], s=90, marker="x",
                       color="tab:red", label="good candidate (|Scorr| > threshold, no flag)")
        if (~good).any():
            ax.scatter(candidates["x"][~good], candidates["y"][~good], s=60, marker="+",
                       color="tab:orange", label="flagged candidate")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncol=2)
    half = 24
    for ax, row in zip(axes[1] if n_zoom else [], marks[:n_zoom]):
        x, y = int(round(float(row["x"]))), int(round(float(row["y"])))
        cut = (slice(max(y - half, 0), y + half + 1), slice(max(x - half, 0), x + half + 1))
        extent = (cut[1].start - 0.5, cut[1].stop - 0.5, cut[0].start - 0.5, cut[0].stop - 0.5)
        shown = ax.imshow(result.score.data[cut], origin="lower", cmap="gray",
                          norm=ImageNormalize(vmin=-6, vmax=12), extent=extent)
        peak = float(result.score.data[y, x])
        ax.set_title(f"Scorr around ({x}, {y}): {peak:.1f} sigma")
        fig.colorbar(shown, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _flag_cards() -> dict[str, str]:
    """FITS header cards defining the candidates' flag bits: ``AZFLAG<bit>`` = name: meaning."""
    from .transients import FLAGS

    return {f"AZFLAG{bit}": f"{name}: {text}" for name, (bit, text) in FLAGS.items()}


def _save_result(result, outdir: Path, threshold: float, science: CCDData,
                 truth: Table | None = None) -> Table:
    """Write D, Scorr (with the flag definitions in its header), alpha, the candidates, a PNG.

    Masked pixels are NaN in the FITS images (the mask extension says which). The
    candidate table (ECSV) carries the flag definitions and thresholds in its meta.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    result.difference.write(outdir / "difference.fits", overwrite=True)
    score = result.score.to_hdu()
    score[0].header.update(_flag_cards())
    score.writeto(outdir / "score.fits", overwrite=True)
    result.flux.write(outdir / "flux.fits", overwrite=True)
    candidates = result.find_transients(threshold=threshold)
    candidates.write(outdir / "candidates.ecsv", overwrite=True)
    _write_png(outdir / "subtraction.png", science, result, candidates, truth)
    return candidates


def _demo(args: argparse.Namespace) -> int:
    from .simulation import simulate_pair
    from .subtraction import subtract
    from .transients import describe_flags

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
    pair = simulate_pair(
        (args.size, args.size),
        n_stars=args.stars,
        flux_range=(2e3, 2e5),
        reference_psf=2.5,
        science_psf=3.5,
        flux_ratio=0.85,
        shift=(0.3, -0.2),
        transients=transients,
        seed=args.seed,
    )
    truth = pair.transients
    log.info("simulated a %dx%d pair with %d stars and %d transient(s) at %s",
             args.size, args.size, args.stars, len(truth),
             [(round(float(x), 1), round(float(y), 1)) for x, y in zip(truth["x"], truth["y"])])
    result = subtract(pair.reference.ccd, pair.science.ccd)
    log.info("%r", result)
    outdir = Path(args.outdir)
    candidates = _save_result(result, outdir, args.threshold, pair.science.ccd, truth)
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
    log.info("%d candidate(s) above %.1f sigma (%d good), %d of %d injected transient(s) "
             "recovered; wrote difference.fits, score.fits, flux.fits, candidates.ecsv and "
             "subtraction.png to %s", len(candidates), args.threshold,
             int(np.sum(candidates["good"])), found, len(truth), outdir)
    return 0 if found == len(truth) else 1


def _subtract(args: argparse.Namespace) -> int:
    from ._ccd import as_ccddata, to_image
    from .subtraction import subtract

    result = subtract(args.reference, args.science, reference_psf=args.reference_fwhm,
                      science_psf=args.science_fwhm, unit=args.unit, gain=args.gain,
                      saturation=args.saturation, backend=args.backend)
    log.info("%r", result)
    science = as_ccddata(to_image(args.science, unit=args.unit))
    candidates = _save_result(result, Path(args.outdir), args.threshold, science)
    log.info("%d candidate(s) above %.1f sigma (%d good: no flag set) written to %s",
             len(candidates), args.threshold, int(np.sum(candidates["good"])), args.outdir)
    return 0


def _coadd(args: argparse.Namespace) -> int:
    from .coaddition import coadd

    result = coadd(args.images, unit=args.unit, psfs=args.fwhm, backend=args.backend)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    result.image.write(outdir / "coadd.fits", overwrite=True)
    _append_rejected(outdir / "coadd.fits", result.rejected)
    result.score.write(outdir / "coadd_score.fits", overwrite=True)
    log.info("%r written to %s", result, outdir)
    return 0


def _append_rejected(path: Path, rejected: np.ndarray) -> None:
    """Add the outlier map of `coadd` to its FITS file as the REJECTED extension."""
    from astropy.io import fits

    header = fits.Header({"EXTNAME": "REJECTED"})
    header["COMMENT"] = "number of images whose pixel was rejected as an outlier"
    fits.append(path, rejected.astype(np.int16), header)


def _add_backend_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                         help="array backend of the FFT algebra: numpy (CPU, default) or cupy "
                              "(a CUDA GPU; needs CuPy, e.g. pip install cupy-cuda12x)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astro-zackay",
        description="Proper image subtraction (ZOGY) and proper coaddition on FITS images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="subtract a simulated pair with an injected transient")
    demo.add_argument("--outdir", default="demo-output", help="folder for the FITS, table and PNG")
    demo.add_argument("--size", type=int, default=1024, help="image side in pixels")
    demo.add_argument("--stars", type=int, default=500, help="number of stars")
    demo.add_argument("--seed", type=int, default=2016, help="random seed")
    demo.add_argument("--threshold", type=float, default=5.0, help="detection threshold (sigma)")
    demo.set_defaults(func=_demo)

    sub = commands.add_parser("subtract", help="ZOGY subtraction of two registered FITS images")
    sub.add_argument("reference")
    sub.add_argument("science")
    sub.add_argument("--outdir", default="subtraction-output")
    sub.add_argument("--unit", default=None, help="data unit when the files have no BUNIT")
    sub.add_argument("--gain", type=float, default=None, help="e-/ADU when there is no GAIN")
    sub.add_argument("--saturation", type=float, default=None, help="saturation level")
    for image in ("reference", "science"):
        sub.add_argument(f"--{image}-fwhm", type=float, default=None, metavar="PIXELS",
                         help=f"FWHM of a Gaussian {image} PSF (default: estimated from "
                              "its stars)")
    sub.add_argument("--threshold", type=float, default=5.0)
    _add_backend_option(sub)
    sub.set_defaults(func=_subtract)

    add = commands.add_parser("coadd", help="proper coaddition of registered FITS images")
    add.add_argument("images", nargs="+")
    add.add_argument("--outdir", default="coadd-output")
    add.add_argument("--unit", default=None)
    add.add_argument("--fwhm", type=float, nargs="+", default=None, metavar="PIXELS",
                     help="FWHM of a Gaussian PSF for each image, in order (default: "
                          "estimated from their stars)")
    _add_backend_option(add)
    add.set_defaults(func=_coadd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``astro-zackay`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success; for ``demo``, 1 when the injected transient
        was not recovered.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
