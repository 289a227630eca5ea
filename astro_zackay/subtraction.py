"""Proper image subtraction (ZOGY) of two CCDData images: the image-level step.

This module turns images into arrays, estimates what the user did not give
(background, PSFs, flux ratio, shift, astrometric noise), runs the array core
(`astro_zackay._zogy_field`, on tiles of constant PSF when the PSFs vary across the field),
and wraps the results back into `~astropy.nddata.CCDData`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from astropy import units as u
from astropy.nddata import CCDData
from astropy.table import Table

from ._ccd import (
    ImageData,
    as_ccddata,
    check_not_constant,
    match_unit,
    to_ccddata,
    to_image,
    warn_missing_source_noise,
)
from ._checks import as_pair, check_subtract_options, named_errors
from ._prepare import PreparedImage, check_image_size, prepare_image
from ._psf_input import (
    ImageWarnings,
    as_psf_sampler,
    user_stacklevel,
)
from ._threads import single_threaded_blas
from ._warnings import AstroZackayWarning, FewStarsWarning, NoiseEstimateWarning
from ._zogy_field import zogy_field
from .fluxmatch import StarMatch, match_stars
from .noise import NoiseSpectrum, measure_pair_noise
from .transients import bright_sources
from .zogy import _moved_mask, fit_flux_ratio
from .zogy import fit_shift as _fit_shift

__all__ = ["SubtractionResult", "subtract"]

log = logging.getLogger(__name__)

#: Matched stars needed to take the flux ratio, shift and astrometric noise from stars.
MIN_MATCHED_STARS = 5
#: Flux fraction of each PSF kept in the cores that the pixel fit of the flux ratio uses.
PIXEL_FIT_CORE = 0.995
#: Fractional error of a PSF model's matched-filter response to a star that
#: ``psf_error="auto"`` takes for each image. The held-out quality of the estimated
#: models does not measure it: their median residual ``|flux|`` fraction (1.4-2.1 on
#: the test bed's KL PSFs) is the noise of the stamps, within 1-2 % of its noise floor.
PSF_ERROR_FLOOR = 0.01


@dataclass(frozen=True, repr=False)
class SubtractionResult:
    """The outputs of `subtract`, on the science image's pixel grid.

    Attributes
    ----------
    difference : `~astropy.nddata.CCDData`
        The proper difference image D: white noise of unit variance (dimensionless);
        ``difference / flux_scale`` is in flux units.
    score : `~astropy.nddata.CCDData`
        Scorr, the matched-filter score corrected for source, astrometric and
        flux-ratio noise, in sigma units.
    flux : `~astropy.nddata.CCDData`
        The flux of a point source centred at each pixel (PSF photometry on the
        difference, ``alpha``), in the science image's units, with its uncertainty.
    flux_error : `~astropy.nddata.CCDData`
        The 1-sigma error of ``flux``.
    psf : `~numpy.ndarray`
        P_D, the unit-sum PSF of the difference image at the image centre.
    flux_scale : float
        F_D, the flux zero point of D at the image centre (science-image units).
    flux_ratio : float
        The science / reference flux ratio used (fitted unless given).
    flux_ratio_error : float
        Its 1-sigma error (0 when given by the user).
    shift : tuple of float
        ``(dx, dy)``: the science image's offset from the reference in pixels,
        fitted and removed by shifting the reference (``(0, 0)`` when not fitted).
    background_offset : float
        The residual background difference removed, in science-image units.
    astrometric_noise : tuple of float
        ``(sigma_x, sigma_y)`` registration noise in pixels per image used in Scorr.
    tiles : `~astropy.table.Table`
        One row per tile of constant PSF (``tiles=`` of `subtract`): its inner pixels
        (``x_start``, ``x_stop``, ``y_start``, ``y_stop``), its centre (``x_centre``,
        ``y_centre``), the background noises, F_D, F_S and the background offset there.
    input_mask : `~numpy.ndarray` of bool or None
        The masked and saturated pixels of either input image (the reference's
        shifted with it), before the growth that masks the outputs; the MASKED flag
        of `find_transients` is set near them.
    sources : `~astropy.table.Table` or None
        The sources of both images with their matched-filter S/N in each
        (`~astro_zackay.transients.bright_sources`), for the BRIGHT flag.
    tile_psfs : `~numpy.ndarray` or None
        P_D of each tile (one unit-sum stamp per row of ``tiles``); `psf_at` picks one.

    Notes
    -----
    Masked pixels of ``difference``, ``score``, ``flux`` and ``flux_error`` are NaN,
    with their ``mask`` set, so that no viewer shows them as sources.
    """

    difference: CCDData
    score: CCDData
    flux: CCDData
    flux_error: CCDData
    psf: np.ndarray
    flux_scale: float
    flux_ratio: float
    flux_ratio_error: float
    shift: tuple[float, float]
    background_offset: float
    astrometric_noise: tuple[float, float]
    tiles: Table = field(default_factory=Table)
    input_mask: np.ndarray | None = None
    sources: Table | None = None
    tile_psfs: np.ndarray | None = None

    def psf_at(self, x: float, y: float) -> np.ndarray:
        """P_D at a position: that of the tile holding it (its row of ``tiles``).

        Parameters
        ----------
        x, y : float
            0-based pixel position (x the column).

        Returns
        -------
        `~numpy.ndarray`
            The unit-sum stamp; ``psf`` (at the image centre) without per-tile stamps.
        """
        if self.tile_psfs is None or len(self.tile_psfs) != len(self.tiles):
            return self.psf
        t = self.tiles
        inside = ((np.asarray(t["x_start"]) <= x + 0.5) & (x + 0.5 < np.asarray(t["x_stop"]))
                  & (np.asarray(t["y_start"]) <= y + 0.5) & (y + 0.5 < np.asarray(t["y_stop"])))
        if not inside.any():
            raise ValueError(f"({x}, {y}) is outside the image")
        return self.tile_psfs[int(np.argmax(inside))]

    def find_transients(self, threshold: float = 5.0, **kwargs: Any) -> Table:
        """Transient candidates: local extrema of ``|score|`` above ``threshold`` sigma, vetted.

        Every vetting flag is computed: the difference image, its PSF (that of each
        candidate's tile), the input masks and the sources of both images are passed
        on (each can be replaced through ``kwargs``, e.g. ``sources=None`` to skip the
        BRIGHT flag).

        Parameters
        ----------
        threshold : float
            Detection threshold in sigma.
        **kwargs
            Passed to `astro_zackay.transients.find_transients` (``sign``,
            ``min_separation`` and the flags' thresholds, such as ``bright_snr``).

        Returns
        -------
        `~astropy.table.Table`
            ``id``, ``x``, ``y`` (0-based pixels), ``ra``, ``dec`` (with a WCS),
            ``score``, ``flux``, ``flux_err``, ``snr``, ``chi2_dof``, ``sharpness``,
            ``flags`` (`~astro_zackay.transients.FLAGS`) and ``good``, sorted by
            ``|score|``.
        """
        from .transients import find_transients

        inputs = {"flux": self.flux, "flux_error": self.flux_error,
                  "difference": self.difference, "psf": self.psf_at,
                  "bad_pixels": self.input_mask, "sources": self.sources}
        return find_transients(self.score, threshold=threshold, **(inputs | kwargs))

    def __repr__(self) -> str:
        ny, nx = self.score.shape
        return (
            f"<SubtractionResult {ny}x{nx} flux_ratio={self.flux_ratio:.5f}"
            f"+-{self.flux_ratio_error:.5f} shift=({self.shift[0]:+.3f}, {self.shift[1]:+.3f}) "
            f"astrometric_noise=({self.astrometric_noise[0]:.3f}, {self.astrometric_noise[1]:.3f})"
            f" F_D={self.flux_scale:.5g} tiles={len(self.tiles)}>"
        )


def _template(image: ImageData) -> ImageData:
    """``image`` without its pixels: what `~astro_zackay._ccd.to_ccddata` takes from it.

    Its frame-sized arrays become read-only broadcasts of one value (no memory), so
    that the image's own can be freed while the outputs are formed.
    """
    shape = image.shape
    return dataclasses.replace(image, data=np.broadcast_to(np.float32(0.0), shape),
                               variance=np.broadcast_to(np.float32(0.0), shape),
                               mask=np.broadcast_to(False, shape), sky_maps=None)


def _conversion_gain(sci: ImageData, ref: ImageData, gains: tuple[Any, Any]) -> Any:
    """The e-/ADU that converts between the images' units: that of the image in ADU.

    Its ``gain=`` value, else its own gain when it is in ADU (its GAIN keyword); None
    leaves `~astro_zackay._ccd.match_unit` to look for a keyword of the science image.
    """
    image, given = (sci, gains[1]) if u.adu in sci.unit.decompose().bases else (ref, gains[0])
    if given is not None:
        return given
    return image.gain if image.unit == u.adu else None


def _unpack_coadd(image: Any, psf: Any) -> tuple[Any, Any]:
    """A `~astro_zackay.coaddition.CoaddResult` gives its calibrated coadd and its PSF."""
    if hasattr(image, "calibrated") and hasattr(image, "psf"):
        return image.calibrated, image.psf if psf is None else psf
    return image, psf


def _psf_errors(psf_error: Any) -> tuple[float, float]:
    """``(reference, science)`` PSF errors for ZOGY's ``psf_error_*`` from ``psf_error=``."""
    if psf_error is None:
        return 0.0, 0.0
    if isinstance(psf_error, str):
        return PSF_ERROR_FLOOR, PSF_ERROR_FLOOR
    return tuple(float(v) for v in as_pair(psf_error, "psf_error"))


def _pair_noise(
    psci: PreparedImage, pref: PreparedImage, beta: float, shift: tuple[float, float], noise: str,
    workers: int | None,
) -> tuple[NoiseSpectrum | None, NoiseSpectrum | None]:
    """The (science, reference) pixel-noise spectra with ``noise='auto'``, else (None, None).

    Measured once, on the source-free pixels of both images, less the faint static sky
    they share (`~astro_zackay.noise.measure_pair_noise`), and logged.  A pair too
    small or too crowded to measure is taken as white, announced.
    """
    if noise == "white":
        return None, None
    try:
        spectra = measure_pair_noise(psci.data, pref.data, psci.image.mask, pref.image.mask,
                                     rms_new=psci.rms, rms_ref=pref.rms, flux_ratio=beta,
                                     shift=shift, workers=workers)
    except ValueError as exc:
        reason = str(exc).split(";")[0]  # measure_pair_noise's options are not subtract's
        warnings.warn(f"the noise correlation cannot be measured ({reason}): white noise is "
                      "assumed; pass noise='white' to skip the measure",
                      NoiseEstimateWarning, stacklevel=user_stacklevel())
        return None, None
    for name, spectrum in zip(("science image", "reference image"), spectra):
        rx, ry = spectrum.lag1
        used = "correlated: its spectrum is used" if spectrum.is_correlated else "white"
        log.info("%s noise: lag-1 correlation %.3f (x), %.3f (y) -> %s", name, rx, ry, used)
    return spectra


def _used(spectrum: NoiseSpectrum | None) -> NoiseSpectrum | None:
    """The spectrum that ZOGY uses: the measured one when correlated, else None (white)."""
    return spectrum if spectrum is not None and spectrum.is_correlated else None


def _noise_meta(spectra: tuple[NoiseSpectrum | None, NoiseSpectrum | None]) -> dict:
    """The measured lag-1 correlations as meta keys ``AZRHO[XY][SR]``."""
    meta = {}
    for suffix, spectrum in zip("SR", spectra):
        if spectrum is not None:
            meta[f"AZRHOX{suffix}"], meta[f"AZRHOY{suffix}"] = spectrum.lag1
    return meta


def _match(
    pref: PreparedImage, psci: PreparedImage, psfs: tuple[np.ndarray, np.ndarray], needs: list[str]
) -> StarMatch | None:
    """Stars matched between the images; None, announced, when fewer than MIN_MATCHED_STARS.

    ``needs`` names what the match would have measured; without a match the flux ratio
    and shift come from a ZOGY pixel fit through the PSFs and the astrometric noise is 0.
    """
    if not needs:
        return None
    reason = "no stars were found in one of the images"
    if pref.stars is not None and psci.stars is not None:
        try:
            return match_stars(pref.stars, psci.stars, radius=2.0, min_matches=MIN_MATCHED_STARS,
                               images=(pref.image, psci.image), psfs=psfs)
        except ValueError as exc:
            reason = str(exc)
    fitted = [what for what in needs if what != "astrometric noise"]
    used = []
    if fitted:
        verb = "come" if len(fitted) > 1 else "comes"
        used.append(f"the {' and '.join(fitted)} {verb} from a pixel fit through the PSFs")
    if "astrometric noise" in needs:
        used.append("the astrometric noise is taken as 0")
    warnings.warn(
        f"too few stars match between the images ({reason}): {'; '.join(used)}",
        FewStarsWarning, stacklevel=user_stacklevel(),
    )
    return None


def _pixel_fit(
    psci: PreparedImage,
    pref: PreparedImage,
    psfs: tuple[np.ndarray, np.ndarray],
    sigmas: tuple[float, float],
    bad: np.ndarray,
    flux_ratio: float | None,
    fit_shift: bool,
) -> tuple[tuple[float, float], float | None, float]:
    """``(shift, flux ratio, its error)`` from a ZOGY pixel fit through the PSF cores.

    When only the shift is wanted (``flux_ratio`` given) and the fit fails, as on a
    field without stars, the shift comes from the WCSs (0 without them), announced.
    """
    fitter = _fit_shift if fit_shift else fit_flux_ratio
    core_n, core_r = _common_core(psfs, PIXEL_FIT_CORE)
    try:
        fit = fitter(psci.data, pref.data, core_n, core_r, sigma_new=sigmas[0],
                     sigma_ref=sigmas[1], mask=bad, beta0=flux_ratio or 1.0)
        if not (np.isfinite(fit.beta) and fit.beta > 0):
            raise ValueError(f"it gives a flux ratio of {fit.beta:.4g}")
    except ValueError as exc:
        reason = str(exc).split(";")[0]  # the fitter's own options are not subtract's
        if flux_ratio is None:
            raise ValueError(
                f"cannot fit the flux ratio or shift: too few stars match and the pixel fit "
                f"failed ({reason}); pass flux_ratio= and fit_shift=False"
            ) from None
        shift, source = _wcs_shift(pref.image, psci.image)
        warnings.warn(
            f"the shift cannot be fitted (too few stars match and the pixel fit failed: "
            f"{reason}): it is taken {source}, ({shift[0]:.4f}, {shift[1]:.4f}) px; pass "
            "fit_shift=False to skip the fit", FewStarsWarning, stacklevel=user_stacklevel(),
        )
        return shift, flux_ratio, 0.0
    if not fit.converged:
        warnings.warn(
            f"the pixel fit of the flux ratio did not converge (beta={fit.beta:.5g}); "
            "give flux_ratio= if it is known", AstroZackayWarning,
            stacklevel=user_stacklevel(),
        )
    shift = (fit.dx, fit.dy) if fit_shift else (0.0, 0.0)
    return shift, fit.beta, fit.beta_err


def _wcs_shift(ref: ImageData, sci: ImageData) -> tuple[tuple[float, float], str]:
    """The science image's offset from the reference at its centre by the WCSs, and whence.

    ``(0, 0)`` unless both images have a WCS.
    """
    if ref.wcs is None or sci.wcs is None:
        return (0.0, 0.0), "as 0 (the images lack WCSs)"
    ny, nx = sci.shape
    x, y = (nx - 1) / 2.0, (ny - 1) / 2.0
    x_ref, y_ref = ref.wcs.world_to_pixel_values(*sci.wcs.pixel_to_world_values(x, y))
    return (float(x - x_ref), float(y - y_ref)), "from the WCSs"


def _core_half(psf: np.ndarray, fraction: float) -> int:
    """Half-side of the smallest centred square of ``psf`` holding ``fraction`` of its flux."""
    cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
    total = psf.sum()
    for half in range(min(cy, cx)):
        if psf[_centre_square(psf, half)].sum() >= fraction * total:
            return half
    return min(cy, cx)


def _centre_square(psf: np.ndarray, half: int) -> tuple[slice, slice]:
    """The slices of the centred square of ``psf`` of half-side at most ``half``."""
    cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
    hy, hx = min(half, cy), min(half, cx)
    return slice(cy - hy, cy + hy + 1), slice(cx - hx, cx + hx + 1)


def _cut(psf: np.ndarray, half: int) -> np.ndarray:
    """The centred square of ``psf`` of half-side at most ``half``, renormalised to unit sum."""
    core = psf[_centre_square(psf, half)]
    return core / core.sum()


def _common_core(psfs: tuple[np.ndarray, ...], fraction: float) -> tuple[np.ndarray, ...]:
    """The PSFs cut to one centred square holding ``fraction`` of each one's flux.

    The pixel fit of the flux ratio and shift leaves a PSF stamp free at the image
    edges: stamps extended to the faint wings would leave it no pixels on a small
    image (a 256^2 DECam stamp with 99x99 PSFs), while the cores fit the same bright
    pixels. Cut to the same size, each keeps all but ``1 - fraction`` of its flux, so
    the ratio is biased by less than that.
    """
    half = max(_core_half(psf, fraction) for psf in psfs)
    return tuple(_cut(psf, half) for psf in psfs)


@single_threaded_blas
def subtract(
    reference: Any,
    science: Any,
    *,
    reference_psf: Any = None,
    science_psf: Any = None,
    flux_ratio: float | None = None,
    fit_shift: bool = True,
    astrometric_noise: Literal["auto"] | tuple[float, float] | float | None = "auto",
    align: Literal["stars", "wcs"] | bool = False,
    tiles: Literal["auto"] | int | None = "auto",
    unit: Any = None,
    gain: Any = None,
    read_noise: Any = None,
    saturation: Any = None,
    noise: Literal["auto", "white"] = "auto",
    psf_error: Literal["auto"] | float | tuple[float, float] | None = "auto",
    dtype: type = np.float32,
    backend: Literal["numpy", "cupy"] = "numpy",
    workers: int | None = None,
) -> SubtractionResult:
    """Proper image subtraction (ZOGY) of a science image and a reference.

    Implements Zackay, Ofek & Gal-Yam (2016): the difference D has white noise of
    unit variance, and Scorr is the optimal point-source score corrected for the
    noise of the sources themselves (from the images' variance), for the
    registration noise and for the error of the flux ratio, so that it is in
    sigma units everywhere.

    Parameters
    ----------
    reference, science : `~astropy.nddata.CCDData` or any input of the CCDData boundary
        The two images, on the same pixel grid (or give ``align``). Either may
        also be a `~astro_zackay.coaddition.CoaddResult`, whose calibrated coadd
        and PSF are then used. Their uncertainties give the source noise;
        without one, the noise is estimated from the data (see ``gain``).
    reference_psf, science_psf : KLPSFModel, astropy/photutils model, array or float, optional
        The PSFs: a model, an odd-sized unit-sum stamp, or a FWHM in pixels (a
        Gaussian PSF). By default each is estimated from the stars of its image
        (`~astro_zackay.stars.find_psf_stars`, once per image, the same stars serving
        the matching) by `~astro_zackay.psf.estimate_psf`, which chooses the model
        from the number and spread of the usable stars: a spatially varying KL PSF,
        a constant one, or a Moffat profile fitted to a handful of stars, each step
        down announced with a `~astro_zackay._warnings.FewStarsWarning` that names
        the image.
    flux_ratio : float, optional
        The science / reference flux ratio (a ratio of fluxes: 0.5 when the science
        image records half the counts of the reference for the same star); fitted
        by default (properimage's ``beta=True``): from aperture photometry of the
        stars matched between the images, or, when fewer than 5 match, from a ZOGY
        pixel fit through the PSFs (announced with a FewStarsWarning).
    fit_shift : bool
        Fit a sub-pixel translation (from the matched stars, else jointly with the
        flux ratio in the pixel fit) and remove it by a Fourier shift of the
        reference (properimage's ``shift=True``).
    astrometric_noise : 'auto', float, (float, float) or None
        Registration noise ``(sigma_x, sigma_y)`` in pixels of each image; ``'auto'``
        measures it from the scatter of matched star positions (0 when fewer than 5
        stars match); None means 0.
    align : {'stars', 'wcs'} or False
        Resample the reference onto the science image's grid first, matching stars
        (astroalign) or through the WCSs (reproject).
    tiles : 'auto', int or None
        The image is cut into square tiles of constant PSF (the PSFs at each tile's
        centre), all subtracted at once as one stack of transforms: ``'auto'`` takes
        the largest side (1024 down to 128 px) over which neither PSF changes by more
        than 0.04 (L1 norm) from a tile's centre to its corners, and one tile when
        neither PSF varies; an integer fixes the side in pixels (at least 32); None
        uses the PSFs at the image centre for the whole image.
    unit, gain, read_noise, saturation : optional
        Passed to the CCDData boundary; each may be one value or a
        ``(reference, science)`` pair. ``gain`` (e-/ADU) lets the source noise be
        estimated for images in ADU without an uncertainty. When the two images
        differ in unit, the science image is converted to the reference's (electrons
        and ADU through the gain of the one in ADU: ``gain=``, else its GAIN or EGAIN
        keyword; count rates through the EXPTIME keyword), as recorded in the
        outputs' meta (``AZUNIT``); the flux ratio, ``flux`` and ``flux_error`` are
        then in the reference's unit.
    noise : {'auto', 'white'}
        ``'auto'`` measures each image's pixel-noise autocorrelation once, from the
        pixels that are source-free in both images, less the faint static sky that
        the images share (`~astro_zackay.noise.measure_pair_noise`); it logs the
        lag-1 correlations, records them in the outputs' meta (``AZRHOXR``,
        ``AZRHOYR``, ``AZRHOXS``, ``AZRHOYS``) and, for an image whose noise is
        correlated (lag-1 above `~astro_zackay.noise.CORRELATION_THRESHOLD`, 0.05:
        resampled images), uses its noise power spectrum in place of the white
        variance, so that D stays white and Scorr in sigma units; ``'white'``
        assumes white noise.
    psf_error : 'auto', float, (float, float) or None
        Fractional error ``eps`` of each PSF model's response to a star, one value or
        ``(reference, science)``: Scorr's variance gains ``(eps_r**2 + eps_s**2)``
        times the square of the matched-filter light present in both images, so that
        the residual cores of bright stars do not read as transients, while new
        sources keep their significance. ``'auto'`` takes `PSF_ERROR_FLOOR` (1 %)
        for both; None means 0.
    dtype : {numpy.float32, numpy.float64}
        Working precision of the image-sized FFT algebra (the PSF factors are always
        computed in float64; float32 changes Scorr by ~1e-3 sigma).
    backend : {'numpy', 'cupy'}
        Where the subtraction's image-sized arrays live: ``'cupy'`` keeps the images,
        their transforms and the ZOGY algebra on the GPU from upload to the final Scorr
        (needs CuPy, ``pip install cupy-cuda12x``).  The bad-pixel mask is not yet
        ported: it is grown on the host (``scipy.ndimage``) and then uploaded.
    workers : int, optional
        FFT threads (default: all the cores the process may use).

    Returns
    -------
    SubtractionResult
        On the science image's grid, with its WCS.

    Raises
    ------
    ValueError
        When the images differ in shape (and ``align`` is off), an option is invalid
        (every option is checked before any image is read, by
        `~astro_zackay._checks.check_subtract_options`), a given PSF array is not a
        centred, non-negative stamp with a positive sum, a given varying PSF model
        was fitted on an image smaller than the one it is given for (checked as soon
        as that image is read; the message names the option), an image is smaller than a
        background box or its given PSF's stamp (both images are checked before either
        is prepared), an image has negative uncertainties or
        an unparsable BUNIT, ``align='wcs'`` finds no overlap between the images'
        footprints, or a PSF must be estimated from an image with no usable star (the
        message names the image or the option).
    OSError
        When an image path is a directory, or an empty, corrupt or truncated FITS file.
    astropy.units.UnitsError
        When the images' units differ and cannot be converted: electrons and ADU
        without a gain (the message names both units and ``gain=``).

    Warns
    -----
    FewStarsWarning
        Once per image and step down of the PSF model, and when fewer than 5 stars
        match between the images (the pixel fit is then used); with ``flux_ratio``
        given, when the pixel fit of the shift fails too (a field without stars):
        the shift then comes from the WCSs, or is 0 without them.
    SaturationWarning
        Once per image whose saturation level was found in the data.
    PSFQualityWarning
        When a PSF does not describe its stars.
    NoiseEstimateWarning
        Once per image in ADU with neither a gain nor an uncertainty: its variance
        then lacks the Poisson noise of the sources. Also when an image's noise
        correlation cannot be measured (``noise='auto'`` on an image with fewer
        than 1000 source-free pixels): white noise is then assumed.

    Each warning about one image starts with ``"reference image: "`` or
    ``"science image: "``.

    Examples
    --------
    >>> from astro_zackay import subtract
    >>> from astro_zackay.simulation import simulate_pair
    >>> from astropy.table import Table
    >>> transient = Table({"x": [150.2], "y": [200.7], "flux": [3000.0]})
    >>> pair = simulate_pair((384, 384), n_stars=100, flux_range=(2e3, 2e5),
    ...                      flux_ratio=0.8, transients=transient, seed=4)
    >>> result = subtract(pair.reference.ccd, pair.science.ccd)
    >>> abs(result.flux_ratio - 0.8) < 0.02
    True
    >>> best = result.find_transients(5.0)[0]
    >>> round(float(best["x"])), round(float(best["y"])), bool(best["score"] > 20)
    (150, 201, True)
    """
    reference, reference_psf = _unpack_coadd(reference, reference_psf)
    science, science_psf = _unpack_coadd(science, science_psf)
    check_subtract_options(
        reference_psf=reference_psf, science_psf=science_psf, flux_ratio=flux_ratio,
        fit_shift=fit_shift, astrometric_noise=astrometric_noise, align=align, tiles=tiles,
        unit=unit, gain=gain, read_noise=read_noise, saturation=saturation, noise=noise,
        psf_error=psf_error, dtype=dtype, backend=backend, workers=workers,
    )
    reference_psf = None if reference_psf is None else as_psf_sampler(reference_psf)
    science_psf = None if science_psf is None else as_psf_sampler(science_psf)
    units, gains = as_pair(unit, "unit"), as_pair(gain, "gain")
    noises, saturations = as_pair(read_noise, "read_noise"), as_pair(saturation, "saturation")
    ref_warnings, sci_warnings = ImageWarnings("reference image"), ImageWarnings("science image")
    with sci_warnings, named_errors("science image"):
        sci = to_image(science, unit=units[1], gain=gains[1], read_noise=noises[1],
                       saturation=saturations[1], dtype=dtype)
        warn_missing_source_noise(sci)
    # its size and given PSF before the reference is read (a FWHM's stamp before it is built)
    check_image_size(sci.shape, science_psf, "science image", "science_psf=")
    with ref_warnings, named_errors("reference image"):
        if align:
            from .alignment import align as align_images

            method = "stars" if align is True else align
            reference = align_images(reference, as_ccddata(sci), method=method, unit=units[0],
                                     saturation=saturations[0])
        ref = to_image(reference, unit=units[0], gain=gains[0], read_noise=noises[0],
                       saturation=saturations[0], dtype=dtype)
        warn_missing_source_noise(ref)
    if ref.shape != sci.shape:
        raise ValueError(
            f"the reference ({ref.shape}) and science ({sci.shape}) images differ in shape: "
            "give registered images or pass align='stars' (or 'wcs')"
        )
    check_image_size(ref.shape, reference_psf, "reference image", "reference_psf=")
    check_not_constant(sci, "science image")
    check_not_constant(ref, "reference image")
    sci = match_unit(sci, ref.unit, gain=_conversion_gain(sci, ref, gains),
                     name="science image", target="reference image")

    needs = [what for what, needed in (("flux ratio", flux_ratio is None), ("shift", fit_shift),
                                        ("astrometric noise", astrometric_noise == "auto"))
             if needed]
    # one "prepare one image" stage, shared with coadd: each image's data becomes its
    # background-subtracted pixels (masked 0), in place in the freshly coerced copy
    with ref_warnings:
        pref = prepare_image(ref, reference_psf, name="reference image",
                             option="reference_psf=", need_stars=bool(needs))
    with sci_warnings:
        psci = prepare_image(sci, science_psf, name="science image", option="science_psf=",
                             need_stars=bool(needs))
    # the prepared images hold the same arrays without the sky maps cached at coercion
    # (two frame-sized maps each): only they stay alive from here on
    ref, sci = pref.image, psci.image
    bad = ref.mask | sci.mask
    ny, nx = sci.shape
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    psf_r0, psf_n0 = pref.psf(*centre), psci.psf(*centre)
    # the fits need the bright stars unsaturated: saturation is already in the masks
    match = _match(pref, psci, (psf_r0, psf_n0), needs)
    shift, beta, beta_err = (0.0, 0.0), flux_ratio, 0.0
    if match is not None:
        if fit_shift:
            shift = match.offset
        if flux_ratio is None:
            beta, beta_err = match.flux_ratio, match.flux_ratio_error
    elif fit_shift or flux_ratio is None:
        # the median background noises, needed only by the fit (two frame-sized medians)
        sigmas = (float(np.median(psci.rms[~bad])), float(np.median(pref.rms[~bad])))
        shift, beta, beta_err = _pixel_fit(psci, pref, (psf_n0, psf_r0), sigmas, bad,
                                           flux_ratio, fit_shift)
    if flux_ratio is not None:
        beta, beta_err = float(flux_ratio), 0.0

    # the shift is applied inside ZOGY (a phase ramp on the reference's transform): the
    # reference's data, variance and mask stay in its own frame; its mask moves by the
    # rounded shift, grown by a pixel, to mark the outputs
    bad = _moved_mask(ref.mask, shift) | sci.mask
    eps = _psf_errors(psf_error)
    spectra = _pair_noise(psci, pref, beta, shift, noise, workers)

    if astrometric_noise == "auto":
        # the matched-star scatter is that of both images together: half the variance each
        ast = (0.0, 0.0) if match is None else tuple(v / np.sqrt(2.0) for v in match.scatter)
    elif astrometric_noise is None:
        ast = (0.0, 0.0)
    else:
        ast = as_pair(astrometric_noise, "astrometric_noise", "(sigma_x, sigma_y)")
        ast = (float(ast[0]), float(ast[1]))

    # the BRIGHT flag needs both images on the science grid: bright_sources moves the
    # reference by the shift inside the transforms of its S/N maps; run before the core,
    # whose outputs would otherwise be alive under its transforms
    sources = bright_sources((pref.data, psci.data),
                             (np.where(ref.mask, 0.0, ref.variance), sci.variance),
                             (psf_r0, psf_n0), mask=bad, shift=shift, workers=workers)
    core = zogy_field(
        psci.data, pref.data, psci.psf, pref.psf, varying=(psci.psf.varying, pref.psf.varying),
        rms_new=psci.rms, rms_ref=pref.rms, var_new=sci.variance, var_ref=ref.variance,
        mask_new=sci.mask, mask_ref=ref.mask, flux_ratio=beta, flux_ratio_error=beta_err,
        shift_ref=shift, astrometric_noise=ast, psf_error=(eps[1], eps[0]),
        noise_spectra=(_used(spectra[0]), _used(spectra[1])), tiles=tiles, dtype=dtype,
        backend=backend, workers=workers,
    )
    # the images are not read again: their pixels are freed before the outputs are made,
    # which take only the science image's WCS, meta and unit
    sci = _template(sci)
    del pref, psci, ref
    out_bad = core.mask | bad
    offset = core.background_offset
    tiles_table = Table(
        rows=core.tiles,
        names=("x_start", "x_stop", "y_start", "y_stop", "x_centre", "y_centre",
               "sigma_ref", "sigma_sci", "F_D", "F_S", "background_offset"),
    )
    # D / F_D and S / F_S are reference-unit fluxes (Fr = 1); science units are beta times them
    tiles_table["F_D"] /= beta
    tiles_table["F_S"] /= beta
    flux_scale = core.F_D / beta
    n_tiles = len(core.tiles)
    text = (f"ZOGY: beta={beta:.6g}+-{beta_err:.2g} shift=({shift[0]:.4f},{shift[1]:.4f}) "
            f"ast=({ast[0]:.3f},{ast[1]:.3f}) tiles={n_tiles}")
    extra = {"AZBETA": beta, "AZBETAE": beta_err, "AZDX": shift[0], "AZDY": shift[1],
             "AZBKGOFF": offset, "AZFD": flux_scale, "AZNTILE": n_tiles}
    extra.update(_noise_meta(spectra))  # the measured noise correlations
    unit_variance = np.where(out_bad, np.nan, np.ones(1, dtype=core.D.dtype))
    flux_variance = np.square(core.alpha_err)

    def wrap(data: np.ndarray, unit: Any, variance: np.ndarray | None, key: str) -> CCDData:
        # masked pixels are NaN (mask set): no viewer shows them as sources; the core's
        # fresh outputs are blanked in place, not copied
        np.copyto(data, np.nan, where=out_bad)
        if variance is not None:
            np.copyto(variance, np.nan, where=out_bad)
        return to_ccddata(data, sci, unit=unit, variance=variance, mask=out_bad,
                          step=(key, text), extra_meta=extra)

    return SubtractionResult(
        difference=wrap(core.D, u.dimensionless_unscaled, unit_variance, "AZSUB"),
        score=wrap(core.Scorr, u.dimensionless_unscaled, unit_variance, "AZSCORR"),
        flux=wrap(core.alpha, sci.unit, flux_variance, "AZFLUX"),
        flux_error=wrap(core.alpha_err, sci.unit, None, "AZFLUXE"),
        psf=core.psf_d,
        flux_scale=float(flux_scale),
        flux_ratio=float(beta),
        flux_ratio_error=float(beta_err),
        shift=(float(shift[0]), float(shift[1])),
        background_offset=float(offset),
        astrometric_noise=ast,
        tiles=tiles_table,
        input_mask=bad.copy(),
        tile_psfs=core.tile_psfs,
        sources=sources,
    )
