"""Bad inputs found by a held-out check of `subtract`, `coadd`, their options and the CLI.

Each is refused before any work with an error naming the input, what was wrong and
what to do, or now does the right thing (a FWHM in ``u.pix``, ``psfs`` as a generator).
"""

from __future__ import annotations

import time

import astropy.units as u
import numpy as np
import pytest
from astropy.nddata import CCDData, StdDevUncertainty
from conftest import assert_ccd_unchanged, ccd_state

from astro_zackay import coadd, subtract
from astro_zackay._ccd import check_not_constant, to_image
from astro_zackay._checks import check_subtract_options, check_workers
from astro_zackay._psf_input import as_psf_sampler
from astro_zackay.cli import main
from astro_zackay.parallel import subtract_batch

#: Paths that do not exist: a parameter error raised with them proves it came before any work.
MISSING = ("/nonexistent/reference.fits", "/nonexistent/science.fits")


def _copy(ccd: CCDData, **changes) -> CCDData:
    """A copy of ``ccd`` with some of its parts replaced."""
    parts = {"data": ccd.data.copy(), "unit": ccd.unit, "uncertainty": ccd.uncertainty,
             "mask": ccd.mask, "meta": dict(ccd.meta), "wcs": ccd.wcs}
    parts.update(changes)
    return CCDData(**parts)


# --- a FWHM as a PSF ----------------------------------------------------------------------------
def test_a_fwhm_stamp_larger_than_the_image_is_refused_before_it_is_built(small_pair):
    """A FWHM of 1e4 px asked numpy for 466 GiB (MemoryError) while the options were checked."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"^science image: its shape \(96, 96\) is smaller "
                                         r"than the PSF stamp \(50001, 50001\) of science_psf=: "
                                         r"give a larger image, or .*smaller FWHM"):
        subtract(small_pair.reference.ccd, small_pair.science.ccd, science_psf=1e4)
    with pytest.raises(ValueError, match=r"^reference image: its shape \(96, 96\) is smaller "
                                         r"than the PSF stamp \(201, 201\) of reference_psf="):
        subtract(small_pair.reference.ccd, small_pair.science.ccd, reference_psf=40.0)
    assert time.perf_counter() - start < 30  # no 50001^2 stamp was built (a loose bound)


def test_a_fwhm_sampler_knows_its_stamp_shape_and_builds_it_once():
    sampler = as_psf_sampler(1e4)  # a 50001^2 stamp: not built here
    assert sampler.shape == (50001, 50001)
    small = as_psf_sampler(3.0)
    assert small.shape == (17, 17)
    assert small(1.0, 2.0) is small(50.0, 60.0)  # one stamp, built on the first use
    assert as_psf_sampler(np.ones((5, 5))).shape is None  # an array: no shape promised


def test_coadd_refuses_a_fwhm_larger_than_its_image(small_pair):
    images = [small_pair.reference.ccd, small_pair.science.ccd]
    with pytest.raises(ValueError, match=r"^image 1: its shape \(96, 96\) is smaller than the "
                                         r"PSF stamp \(50001, 50001\) of psfs="):
        coadd(images, psfs=[3.0, 1e4])


def test_a_fwhm_in_pixels_as_a_quantity_is_the_number():
    """3.5 * u.pix was read as a 0-d stamp ("must be a 2-D stamp ..., got shape ()")."""
    quantity, number = as_psf_sampler(3.5 * u.pix), as_psf_sampler(3.5)
    assert quantity.source == number.source == "Gaussian of FWHM 3.5 px"
    np.testing.assert_array_equal(quantity(0.0, 0.0), number(0.0, 0.0))
    check_subtract_options(science_psf=3.5 * u.pix, reference_psf=2.0 * u.dimensionless_unscaled)


@pytest.mark.parametrize(
    ("psf", "error", "match"),
    [
        (1.0 * u.s, u.UnitsError, r"^science_psf: a PSF given as a Quantity is a FWHM in "
                                  r"pixels, got 1.0 s: give the FWHM as a number of pixels"),
        (1.0 * u.arcsec, u.UnitsError, r"^science_psf: a PSF given as a Quantity is a FWHM in "
                                       r"pixels, got 1.0 arcsec"),
        ([3.0, 3.0] * u.pix, ValueError, r"^science_psf: a PSF given as a Quantity must be one "
                                         r"FWHM in pixels, got a Quantity of shape \(2,\)"),
    ],
)
def test_a_quantity_that_is_not_a_fwhm_in_pixels_is_refused_before_any_read(psf, error, match):
    with pytest.raises(error, match=match):
        subtract(*MISSING, science_psf=psf)


# --- workers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("workers", "error", "match"),
    [
        (0, ValueError, r"^workers must be None \(all the cores\) or a whole number of FFT "
                        r"threads other than 0 \(-1 all the cores, -2 all but one\), got 0$"),
        (2.5, TypeError, r"^workers must be None .* a whole number of FFT threads, got 2.5 "
                         r"\(float\): give an int$"),
        ("2", TypeError, r"^workers must be None .*, got '2' \(str\): give an int$"),
        (True, TypeError, r"^workers must be None .*, got True \(bool\)"),
    ],
)
def test_workers_is_checked_before_any_image_is_read(workers, error, match):
    """scipy refused them at the first FFT, after both PSFs were estimated."""
    with pytest.raises(error, match=match):
        subtract(*MISSING, workers=workers)


def test_workers_takes_scipys_counts():
    for workers in (None, 1, 4, -1, -2, np.int64(3)):
        check_workers(workers)  # no error
    with pytest.raises(ValueError, match=r"other than 0"):
        check_workers(np.int32(0))


class _NoCluster:
    """A client that must not be used: a task submitted to it fails the test."""

    def submit(self, *args, **kwargs):
        raise AssertionError("a task was submitted")


def test_subtract_batch_refuses_workers_before_any_task(tmp_path):
    """Each row was submitted and failed on a worker with scipy's 'workers must not be zero'."""
    pytest.importorskip("distributed", reason="batches run on dask.distributed (the 'all' extra)")
    ref, new = tmp_path / "ref.fits", tmp_path / "new.fits"
    for path in (ref, new):
        path.write_text("never read")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"^workers must be None .* other than 0"):
        subtract_batch([(ref, new)], out, client=_NoCluster(), progress=False, workers=0)
    assert not out.exists()


def test_subtract_batch_with_valid_workers_reaches_the_client(tmp_path):
    """The sentinel client of the test above is reached by valid options (so it proves it)."""
    pytest.importorskip("distributed", reason="batches run on dask.distributed (the 'all' extra)")
    ref, new = tmp_path / "ref.fits", tmp_path / "new.fits"
    for path in (ref, new):
        path.write_text("never read")
    with pytest.raises(AssertionError, match=r"a task was submitted"):
        subtract_batch([(ref, new)], tmp_path / "out", client=_NoCluster(), progress=False,
                       workers=2)


# --- the image boundary ------------------------------------------------------------------------
def test_an_uncertainty_of_another_shape_is_not_broadcast(small_pair):
    """A (96,) uncertainty on a 96x96 image was broadcast along the rows without a word."""
    science = _copy(small_pair.science.ccd, uncertainty=StdDevUncertainty(np.full(96, 20.0)))
    before = ccd_state(science)
    with pytest.raises(ValueError, match=r"^science image: the StdDevUncertainty's shape "
                                         r"\(96,\) does not match the image \(96, 96\): give "
                                         r"one uncertainty per pixel"):
        subtract(small_pair.reference.ccd, science)
    assert_ccd_unchanged(science, before)
    with pytest.raises(ValueError, match=r"shape \(\) does not match the image \(4, 4\)"):
        to_image(np.ones((4, 4)), unit="adu", uncertainty=StdDevUncertainty(np.float64(2.0)))


@pytest.mark.parametrize("masked", [False, True])
def test_an_object_array_gets_the_packages_message(small_pair, masked):
    """astropy's 'could not convert data to numpy array.' said neither why nor what to do."""
    data = small_pair.science.ccd.data.astype(object)
    image = np.ma.masked_array(data) if masked else data
    kind = "MaskedArray" if masked else "ndarray"
    with pytest.raises(TypeError, match=rf"^science image: the {kind} holds object values, not "
                                        r"real numbers: give the pixel values as integers or "
                                        r"floats \(e.g. array.astype\(float\)\)$"):
        subtract(small_pair.reference.ccd, image, unit="electron")


@pytest.mark.parametrize("uncertainty", [None, 1.0])
def test_a_constant_image_is_refused_with_why(small_pair, uncertainty):
    """It failed far downstream with 'the background noise must be positive, got nan' (or 0)."""
    shape = small_pair.science.ccd.shape
    unc = None if uncertainty is None else StdDevUncertainty(np.full(shape, uncertainty))
    zeros = CCDData(np.zeros(shape), unit="electron", uncertainty=unc)
    with pytest.raises(ValueError, match=r"^science image: all its 9216 unmasked pixels are 0 "
                                         r"\(a constant image\): it has no sky noise to "
                                         r"measure; check that the right image"):
        subtract(small_pair.reference.ccd, zeros, reference_psf=2.5, science_psf=3.5,
                 flux_ratio=1.0)
    with pytest.raises(ValueError, match=r"^image 1: all its 9216 unmasked pixels are 0"):
        coadd([small_pair.reference.ccd, zeros], psfs=[2.5, 3.5], flux_scales=[1.0, 1.0])


def test_a_constant_image_with_its_varying_part_masked_is_still_constant():
    data = np.full((8, 8), 5.0)
    data[0, 0] = 100.0
    check_not_constant(to_image(data, unit="adu"), "image 0")  # two values: passes
    with pytest.raises(ValueError, match=r"^image 0: all its 63 unmasked pixels are 5 "):
        check_not_constant(to_image(data, unit="adu", mask=data > 50), "image 0")


# --- coadd's inputs -----------------------------------------------------------------------------
def test_coadd_refuses_a_dict_of_images(small_pair):
    """Its keys were read as file names ('a: no FITS file at 'a'')."""
    images = {"a": small_pair.reference.ccd, "b": small_pair.science.ccd}
    with pytest.raises(TypeError, match=r"^images must be a list, a generator or a ccdproc "
                                        r"ImageFileCollection, got a dict \(its keys would be "
                                        r"read as images\): give list\(images.values\(\)\)$"):
        coadd(images)


def test_coadd_takes_per_image_options_as_generators(small_pair):
    """psfs=<generator> was consumed by the option checks: 'psfs has 0 entries for 2 images'."""
    images = [small_pair.reference.ccd, small_pair.science.ccd]
    from_lists = coadd(images, psfs=[2.5, 3.0], flux_scales=[1.0, 1.0], reject=None)
    from_generators = coadd(images, psfs=(p for p in (2.5, 3.0)),
                            flux_scales=iter([1.0, 1.0]), reject=None)
    np.testing.assert_array_equal(from_generators.image.data, from_lists.image.data)
    np.testing.assert_array_equal(from_generators.psf, from_lists.psf)


# --- the CLI ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["coadd", "coadd-batch"])
def test_cli_reject_and_no_reject_contradict(tmp_path, capsys, command):
    """coadd --reject 5 --no-reject ran with the last one given and exited 0."""
    out = tmp_path / "x.fits"
    args = (["coadd", "a.fits", "b.fits", "-o", str(out)] if command == "coadd" else
            ["coadd-batch", "groups.csv", "--outdir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--reject", "5", "--no-reject"])
    assert exit_info.value.code == 2
    assert "argument --no-reject: not allowed with argument --reject" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "o").exists()
