"""Malformed inputs at the image boundary and in `subtract`: each a specific, explaining error.

Every test checks the exception class and a message that names the input, what was
wrong and what to do, and that the caller's CCDData is left as it was.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, StdDevUncertainty, VarianceUncertainty
from conftest import assert_ccd_unchanged, ccd_state

from astro_zackay import subtract
from astro_zackay._ccd import to_image
from astro_zackay._checks import check_subtract_options
from astro_zackay._psf_input import as_psf_sampler
from astro_zackay._warnings import UncertaintyWarning
from astro_zackay.alignment import align
from astro_zackay.profiles import psf_stamp
from astro_zackay.psf import estimate_psf
from astro_zackay.simulation import simulate_pair

#: Paths that do not exist: a parameter error raised with them proves it came before any work.
MISSING = ("/nonexistent/reference.fits", "/nonexistent/science.fits")


@pytest.fixture(scope="module")
def pair():
    return simulate_pair((128, 128), n_stars=30, flux_range=(2e3, 2e5), seed=1)






def _write(pair, tmp_path) -> tuple:
    good = tmp_path / "good.fits"
    pair.science.ccd.write(good)
    return good, good.read_bytes()


@pytest.mark.parametrize("cut", [2880, None])
def test_truncated_fits_is_refused(pair, tmp_path, cut):
    good, raw = _write(pair, tmp_path)
    bad = tmp_path / "truncated.fits"
    bad.write_bytes(raw[: len(raw) - cut] if cut else raw[: len(raw) // 2])
    before = ccd_state(pair.science.ccd)
    with pytest.raises(OSError, match=r"reference image: .*truncated.fits.* is not a readable "
                                      r"FITS file .*truncated; copy or download it again"):
        subtract(str(bad), pair.science.ccd)
    assert_ccd_unchanged(pair.science.ccd, before)


@pytest.mark.parametrize("content", [b"", b"not a FITS file at all\n" * 200])
def test_empty_or_garbage_file_is_refused(pair, tmp_path, content):
    bad = tmp_path / "garbage.fits"
    bad.write_bytes(content)
    before = ccd_state(pair.reference.ccd)
    with pytest.raises(OSError, match=r"science image: .*garbage.fits.* is not a readable FITS "
                                      r"file .*empty or corrupt; check that it is a FITS image"):
        subtract(pair.reference.ccd, bad)
    assert_ccd_unchanged(pair.reference.ccd, before)


def test_directory_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a FITS file: give the "
                                                r"path of a FITS image"):
        estimate_psf(tmp_path)
    with pytest.raises(IsADirectoryError, match=r"science image: .* is a directory"):
        subtract(tmp_path, tmp_path)


@pytest.mark.filterwarnings("ignore::astro_zackay.FewStarsWarning")
@pytest.mark.parametrize("bunit", ["counts", "e-", "e-/s"])
def test_unparsable_bunit_is_named(pair, tmp_path, bunit):
    hdu = fits.PrimaryHDU(pair.science.ccd.data, header=fits.Header({"BUNIT": bunit}))
    path = tmp_path / "bunit.fits"
    hdu.writeto(path)
    expected = rf"has BUNIT = {re.escape(repr(bunit))}, which astropy cannot parse as a unit: " \
               r"pass unit= explicitly"
    with pytest.raises(ValueError, match=expected):
        estimate_psf(path)
    with pytest.raises(ValueError, match=expected):
        estimate_psf(hdu)
    # the advice works: the same file reads with the unit given
    assert estimate_psf(path, unit="electron").image_shape == (128, 128)


def test_off_centre_psf_array_is_refused(pair):
    ref, sci = pair.reference.ccd, pair.science.ccd
    before = ccd_state(ref), ccd_state(sci)
    stamp = psf_stamp(25, 3.5)
    with pytest.raises(ValueError, match=r"reference_psf: the PSF array is not centred: its "
                                         r"centroid is \(\+4.00, \+0.00\) px .*recentre"):
        subtract(ref, sci, reference_psf=np.roll(stamp, 4, axis=1), science_psf=stamp)
    assert_ccd_unchanged(ref, before[0])
    assert_ccd_unchanged(sci, before[1])


@pytest.mark.parametrize(
    ("psf", "match"),
    [
        (np.roll(psf_stamp(25, 3.5), -3, axis=0), r"not centred: .* is \(\+0.00, -3.00\)"),
        (psf_stamp(24, 3.5), r"odd sides .* got shape \(24, 24\)"),
        (np.where(np.arange(25)[:, None] == 0, np.nan, psf_stamp(25, 3.5)), "non-finite"),
        (psf_stamp(25, 3.5) - psf_stamp(25, 3.5).mean(), "in negative pixels .* must be non-neg"),
        (np.where(np.arange(25)[:, None] == 3, -0.01, psf_stamp(25, 3.5)), "a pixel of -"),
        (-psf_stamp(25, 3.5), "a PSF must have a positive sum"),
    ],
)
def test_bad_psf_arrays_are_refused_before_any_work(psf, match):
    # the images do not exist: the PSF is checked first
    with pytest.raises(ValueError, match=f"science_psf: .*({match})"):
        subtract(*MISSING, science_psf=psf)


def test_centred_psf_array_is_normalised():
    stamp = psf_stamp(25, 3.5)
    shifted = np.roll(stamp, 1, axis=0) * 0.2 + stamp * 0.8  # centroid 0.2 px off: accepted
    sampled = as_psf_sampler(3.0 * shifted)(10.0, 10.0)
    assert sampled.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(sampled, shifted / shifted.sum())


#: Options `subtract` refuses before any work: (option, value, the message's pattern).
BAD_OPTIONS = [
    ("astrometric_noise", np.nan, r"astrometric_noise must be .* finite sigmas >= 0"),
    ("astrometric_noise", -0.1, r"astrometric_noise must be .* got -0.1"),
    ("astrometric_noise", (0.1, np.inf), r"astrometric_noise must be .* got \(0.1, inf\)"),
    ("flux_ratio", 0.0, r"flux_ratio must be a positive finite number .* got 0.0"),
    ("flux_ratio", np.nan, r"flux_ratio must be a positive finite number .* got nan"),
    ("flux_ratio", -2.0, r"flux_ratio must be a positive finite number .* pass None"),
    ("flux_ratio", "1.0", r"flux_ratio must be a positive finite number .* got '1.0'"),
    ("tiles", 8, r"tiles must be .* >= 32 px, got 8"),
    ("fit_shift", "yes", r"fit_shift must be True or False, got 'yes'"),
    ("align", "sky", r"align must be False, 'stars' or 'wcs', got 'sky'"),
    ("align", 1, r"align must be False, 'stars' or 'wcs', got 1"),
    ("dtype", np.int32, r"dtype must be numpy.float32 or numpy.float64"),
    ("dtype", "foo", r"dtype must be numpy.float32 or numpy.float64, got 'foo'"),
    ("psf_error", -3, r"psf_error must be >= 0 .*, got -3"),
    ("noise", "pink", r"noise must be 'auto' or 'white', got 'pink'"),
    ("unit", "notaunit", r"^science image: unit='notaunit' is not a unit astropy can parse"),
    ("unit", ("notaunit", "adu"), r"^reference image: unit='notaunit' is not a unit"),
    ("unit", ("adu", "adu", "adu"), r"unit must be one value or a \(reference, science\) "
                                    r"pair, got 3 values"),
    ("gain", -1.0, r"^science image: gain must be a positive finite number, got -1.0"),
    ("read_noise", (2.0, "x"), r"^science image: read_noise must be one positive finite "
                               r"number, got 'x'"),
    ("saturation", np.nan, r"^science image: saturation must be a positive finite number"),
    ("science_psf", -3.0, r"^science_psf: "),
]


@pytest.mark.parametrize(("option", "value", "match"), BAD_OPTIONS)
def test_parameters_are_checked_before_any_work(option, value, match):
    with pytest.raises(ValueError, match=match):
        subtract(*MISSING, **{option: value})


@pytest.mark.parametrize(("option", "value", "match"), BAD_OPTIONS)
def test_check_subtract_options_refuses_what_subtract_refuses(option, value, match):
    """The check that the batch, tiled and tree functions run before a cluster starts: the
    options in a mapping, the same error as `subtract`'s."""
    options = {"flux_ratio": 1.0, "tiles": 64, option: value}
    with pytest.raises(ValueError, match=match):
        check_subtract_options(**options)


def test_check_subtract_options_takes_what_subtract_takes():
    check_subtract_options(**{name: p.default
                              for name, p in inspect.signature(subtract).parameters.items()
                              if p.kind is inspect.Parameter.KEYWORD_ONLY})
    check_subtract_options(saturation=np.inf, unit=("adu", "electron"), gain=(1.4, None),
                           astrometric_noise=(0.0, 0.05), psf_error=(0.01, 0.02),
                           science_psf=psf_stamp(25, 3.5), align=np.True_)
    with pytest.raises(TypeError, match=r"subtract\(\) does not take the option\(s\) "
                                        r"'threshold'; it takes noise, psf_error"):
        check_subtract_options(threshold=5.0)


@pytest.mark.filterwarnings("ignore::astro_zackay.FewStarsWarning")
def test_both_images_sizes_are_checked_before_either_is_prepared(pair, monkeypatch):
    """The science image too small for its PSF is refused before the reference's
    background, stars and PSF are measured (it was refused after)."""
    def no_preparing(*args, **kwargs):
        raise AssertionError("an image was prepared before both sizes were checked")

    monkeypatch.setattr("astro_zackay.subtraction.prepare_image", no_preparing)
    with pytest.raises(ValueError, match=r"^science image: its shape \(128, 128\) is smaller "
                                         r"than the PSF stamp \(201, 201\) of science_psf="):
        subtract(pair.reference.ccd, pair.science.ccd, science_psf=psf_stamp(201, 3.0))
    with pytest.raises(AssertionError, match=r"an image was prepared"):
        subtract(pair.reference.ccd, pair.science.ccd, science_psf=psf_stamp(25, 3.0))


@pytest.mark.filterwarnings("ignore::astro_zackay.FewStarsWarning")
def test_valid_astrometric_noise_is_reported_as_used(pair):
    result = subtract(pair.reference.ccd, pair.science.ccd, astrometric_noise=(0.0, 0.05),
                      noise="white")
    assert result.astrometric_noise == (0.0, 0.05)


@pytest.mark.parametrize("kind", [StdDevUncertainty, VarianceUncertainty])
def test_negative_uncertainty_is_refused(pair, kind):
    sci = pair.science.ccd.copy()
    values = pair.science.ccd.uncertainty.array.copy()
    values[10:30, 20:30] *= -1.0  # 200 pixels: 1.2 % of the image, a sign error
    sci.uncertainty = kind(values if kind is StdDevUncertainty else np.sign(values) * values**2)
    before = ccd_state(sci), ccd_state(pair.reference.ccd)
    with pytest.raises(ValueError, match=rf"science image: the {kind.__name__} has 200 negative "
                                         r"values .* must be >= 0; fix its sign"):
        subtract(pair.reference.ccd, sci)
    assert_ccd_unchanged(sci, before[0])
    assert_ccd_unchanged(pair.reference.ccd, before[1])


def test_few_negative_uncertainties_are_masked_not_taken_as_abs(pair):
    sci = pair.science.ccd.copy()
    values = pair.science.ccd.uncertainty.array.copy()
    values[10:12, 20:25] *= -1.0
    sci.uncertainty = StdDevUncertainty(values)
    with pytest.warns(UncertaintyWarning, match=r"the CCDData's StdDevUncertainty has 10 pixels "
                                                r"with a negative uncertainty: .* 10 pixels are "
                                                r"masked; give those pixels their true") as caught:
        img = to_image(sci)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert img.mask[10:12, 20:25].all()
    assert img.mask.sum() == to_image(pair.science.ccd).mask.sum() + 10
    np.testing.assert_array_equal(sci.uncertainty.array, values)


def _far_away(ccd: CCDData) -> CCDData:
    moved = ccd.copy()
    moved.wcs.wcs.crval = [ccd.wcs.wcs.crval[0] + 10.0, ccd.wcs.wcs.crval[1]]
    return moved


def test_align_wcs_without_overlap_is_refused(pair):
    ref, sci = _far_away(pair.reference.ccd), pair.science.ccd
    before = ccd_state(ref), ccd_state(sci)
    match = r"no overlap between the images' footprints on the sky.*check the WCS"
    with pytest.raises(ValueError, match=match):
        align(ref, sci, method="wcs")
    with pytest.raises(ValueError, match=f"reference image: method='wcs': {match}"):
        subtract(ref, sci, align="wcs")
    assert_ccd_unchanged(ref, before[0])
    assert_ccd_unchanged(sci, before[1])


def test_align_wcs_with_partial_overlap_still_works(pair):
    ref = pair.reference.ccd.copy()
    ref.wcs.wcs.crpix = [ref.wcs.wcs.crpix[0] + 100.0, ref.wcs.wcs.crpix[1]]  # 100 of 128 px off
    aligned = align(ref, pair.science.ccd, method="wcs")
    covered = ~aligned.mask
    assert 0.1 < covered.mean() < 0.35


def _zero_uncertainty(ccd: CCDData, where) -> CCDData:
    out = ccd.copy()
    values = ccd.uncertainty.array.copy()
    values[where] = 0.0
    out.uncertainty = StdDevUncertainty(values)
    return out


@pytest.mark.filterwarnings("ignore::astro_zackay.FewStarsWarning")
def test_zero_variance_patch_is_masked(pair):
    patch = (slice(40, 80), slice(40, 80))
    sci = _zero_uncertainty(pair.science.ccd, patch)
    before = ccd_state(sci)
    n_zero = int((~pair.science.ccd.mask[patch]).sum())  # masked ones are not counted
    with pytest.warns(UncertaintyWarning, match=rf"^science image: the CCDData's StdDevUncertainty "
                                                rf"has {n_zero} pixels with a zero uncertainty"
                      ) as caught:
        result = subtract(pair.reference.ccd, sci, noise="white")
    assert [w.filename for w in caught if w.category is UncertaintyWarning] == [__file__]
    assert result.score.mask[patch].all()
    outside = ~result.score.mask
    assert outside.mean() > 0.15  # the patch and the stars' cores of the small field
    assert 0.7 < np.std(result.score.data[outside]) < 1.3
    assert_ccd_unchanged(sci, before)


def test_scattered_zero_variance_names_the_masked_stars(pair):
    rng = np.random.default_rng(0)
    sci = _zero_uncertainty(pair.science.ccd, rng.random(pair.science.ccd.shape) < 0.5)
    with (pytest.warns(UncertaintyWarning, match=r"zero uncertainty: .* pixels are masked"),
          pytest.raises(ValueError, match=r"no PSF star passed the cuts .*masked: [1-9].* check "
                                          r"the mask")):
        estimate_psf(sci)


def test_select_n_components_refuses_infinite_chi2():
    from astro_zackay.psf.kl import select_n_components

    chi2 = np.array([[1.8, np.inf, 1.7], [1.2, np.inf, 1.3]])
    with pytest.raises(ValueError, match=r"chi2/dof are not all finite .* check the image's "
                                         r"uncertainty"):
        select_n_components(chi2)
