"""Bad inputs of the image steps and of the result readers: each refused by name.

Each refusal is checked for its exception class and for a message naming the input
(the frame of a coadd, the path of a file), what was wrong and what to do.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.nddata import CCDData

from astro_zackay import coadd, subtract
from astro_zackay.files import read_background, read_coadd, read_subtraction
from astro_zackay.psf.model import KLPSFModel
from astro_zackay.simulation import psf_stamp

#: A path that does not exist: an error raised with it came before any reading.
MISSING = "/nonexistent/frame.fits"

#: Each reader of a result file, with the kind of file it reads and its writer.
READERS = {
    "subtraction": (read_subtraction, "write_subtraction"),
    "coadd": (read_coadd, "write_coadd"),
    "background": (read_background, "write_background"),
}


def _bad_files(tmp_path):
    """A garbage file, an empty file and a FITS file cut short."""
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"x" * 3000)
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    image = tmp_path / "image.fits"
    CCDData(np.ones((64, 64)), unit="adu").write(image)
    cut = tmp_path / "cut.fits"
    cut.write_bytes(image.read_bytes()[:4000])
    return {"garbage": garbage, "empty": empty, "cut": cut}


@pytest.mark.parametrize("kind", sorted(READERS))
def test_result_readers_name_a_bad_file(kind, tmp_path):
    read, writer = READERS[kind]
    for label, path in _bad_files(tmp_path).items():
        what = "truncated" if label == "cut" else "empty or corrupt"
        with pytest.raises(OSError, match=rf"{label}.fits' is not a readable FITS file .*"
                                          rf"{what}"):
            read(path)
    with pytest.raises(IsADirectoryError, match=rf"is a directory, not a {kind} file: give the "
                                                rf"path of a file written by {writer}"):
        read(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"no {kind} file at .*absent.fits.*: check the "
                                                rf"path, or write one with {writer}"):
        read(tmp_path / "absent.fits")


def test_psf_model_read_names_a_bad_file(tmp_path):
    for label, path in _bad_files(tmp_path).items():
        what = "truncated" if label == "cut" else "empty or corrupt"
        with pytest.raises(ValueError, match=rf"{label}.fits' is not a FITS file \(.*{what}"):
            KLPSFModel.read(path)
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a PSF file: give the path "
                                                r"of a file written by KLPSFModel.write"):
        KLPSFModel.read(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no PSF file at .*absent.fits.*: check the "
                                                r"path, or write one with KLPSFModel.write"):
        KLPSFModel.read(tmp_path / "absent.fits")


def _frame(ccd, **changes):
    """A copy of ``ccd`` with its data or mask replaced."""
    out = ccd.copy()
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def _known(n):
    """PSFs and flux scales given for ``n`` frames: no star is looked for in the good ones."""
    return {"psfs": [2.5] * n, "flux_scales": [1.0] * n}


def test_coadd_names_the_frame_that_cannot_be_used(small_pair):
    ref = small_pair.reference.ccd
    nan = _frame(ref, data=np.full(ref.shape, np.nan))
    with pytest.raises(ValueError, match=r"^image 3: the CCDData has no usable pixel: .* 9216 "
                                         r"not finite .*check the data, the mask"):
        coadd([ref, ref, ref, nan], **_known(4))
    masked = _frame(ref, mask=np.ones(ref.shape, bool))
    with pytest.raises(ValueError, match=r"^image 2: the CCDData has no usable pixel: .* 9216 "
                                         r"masked by its mask"):
        coadd([ref, ref, masked], **_known(3))
    with pytest.raises(ValueError, match=r"^image 1: a plain array has no unit: pass unit="):
        coadd([ref, np.asarray(ref.data)], **_known(2))
    huge = _frame(ref, data=ref.data * 1e39)
    with pytest.raises(ValueError, match=r"^image 1: the CCDData's data has 9216 values .* "
                                         r"outside the range of float32 .*dtype=np.float64"):
        coadd([ref, huge], dtype=np.float32, **_known(2))


def test_coadd_refuses_bad_options_by_name_before_reading(small_pair):
    ref = small_pair.reference.ccd
    # the missing file would fail when read: these errors come first
    with pytest.raises(ValueError, match=r"unit='foo' is not a unit astropy can parse: pass "):
        coadd([MISSING, MISSING], unit="foo")
    with pytest.raises(TypeError, match=r"^psfs\[1\] \(frame.fits\): cannot use a str as a "
                                        r"PSF: give a KLPSFModel"):
        coadd([ref, MISSING], psfs=[2.5, "3"])
    with pytest.raises(ValueError, match=r"^psfs\[0\] \(image 0\): the PSF array must .*odd"):
        coadd([ref, MISSING], psfs=[np.ones((4, 4)), None])
    with pytest.raises(TypeError, match=r"^psfs\[1\] \(image 1\): cannot use a str"):
        coadd(iter([ref, ref]), psfs=[2.5, "3"])


def test_an_image_smaller_than_its_psf_or_a_box_is_refused_by_name(small_pair):
    ref, sci = small_pair.reference.ccd, small_pair.science.ccd
    tiny, stamp = ref[:9, :9], psf_stamp((25, 25), 3.0)
    with pytest.raises(ValueError, match=r"^reference image: its shape \(9, 9\) is smaller than "
                                         r"the PSF stamp \(25, 25\) of reference_psf=: give a "
                                         r"larger image"):
        subtract(tiny, tiny, reference_psf=stamp, science_psf=psf_stamp((9, 9), 3.0),
                 flux_ratio=1.0, fit_shift=False, astrometric_noise=0.0)
    # the science image is checked first, before the reference is read
    with pytest.raises(ValueError, match=r"^science image: its shape \(9, 9\) is smaller than "
                                         r"the PSF stamp \(25, 25\) of science_psf="):
        subtract(tiny, tiny, reference_psf=stamp, science_psf=stamp, flux_ratio=1.0,
                 fit_shift=False, astrometric_noise=0.0)
    for psf, side in ((psf_stamp((201, 201), 3.0), 201), (60.0, 301)):
        with pytest.raises(ValueError, match=rf"^science image: its shape \(96, 96\) is smaller "
                                             rf"than the PSF stamp \({side}, {side}\) of "
                                             r"science_psf=: .*smaller FWHM"):
            subtract(ref, sci, reference_psf=3.0, science_psf=psf)
    with pytest.raises(ValueError, match=r"^image 0: its shape \(9, 9\) is smaller than the PSF "
                                         r"stamp \(25, 25\) of psfs="):
        coadd([tiny, tiny], psfs=[stamp, stamp], flux_scales=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"^image 0: its shape \(6, 96\) is too small: each side "
                                         r"needs at least 8 px for a background map; give a "
                                         r"larger image"):
        coadd([ref[:6], ref[:6]], **_known(2))


def test_coadd_refuses_a_frame_too_small_before_any_reading(small_pair):
    ref = small_pair.reference.ccd
    # a frame of the list too small for its PSF is refused before the missing file is read
    with pytest.raises(ValueError, match=r"^image 1: its shape \(9, 9\) is smaller than the PSF "
                                         r"stamp \(17, 17\) of psfs="):
        coadd([MISSING, ref[:9, :9]], psfs=[None, 3.0])


def _kl_model(fitted_on, varying):
    """A KLPSFModel on a 9x9 stamp fitted on an image of shape ``fitted_on``: a FWHM 3 px
    Gaussian, and with ``varying`` a second component widening it across the image."""
    core = psf_stamp((9, 9), 3.0)
    if not varying:
        return KLPSFModel(core[None], [[1.0]], image_shape=fitted_on, degree=0)
    basis = np.array([core, psf_stamp((9, 9), 3.3) - core])
    model = KLPSFModel(basis, [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], image_shape=fitted_on,
                       degree=1)
    assert model.is_varying
    return model


def test_subtract_refuses_a_varying_psf_model_fitted_on_a_smaller_image(small_pair, monkeypatch):
    """A varying model fitted on a 40x40 image, given for the 96x96 images, is refused by its
    option before any image is prepared (it failed inside, in psf_at, naming no option)."""
    import astro_zackay.subtraction as subtraction

    ref, sci = small_pair.reference.ccd, small_pair.science.ccd
    small = _kl_model((40, 40), varying=True)
    with monkeypatch.context() as patch:
        def no_work(*args, **kwargs):
            raise AssertionError("an image was prepared before the PSF model was checked")

        patch.setattr(subtraction, "prepare_image", no_work)
        patch.setattr(KLPSFModel, "psf_at", no_work)  # nor sampled
        for option, image in (("science_psf", "science image"),
                              ("reference_psf", "reference image")):
            with pytest.raises(ValueError, match=rf"^{option}: the KLPSFModel was fitted on a "
                                                 rf"40x40 image but the {image} is 96x96; .*"
                                                 rf"Estimate the PSF on the {image} .*, or leave "
                                                 rf"{option}=None"):
                subtract(ref, sci, **{option: small})
    # a constant model serves any image, and a varying one fitted on an image 6 px smaller
    # covers these within its margin (as before): both subtract
    for given in (_kl_model((40, 40), varying=False), _kl_model((90, 90), varying=True)):
        result = subtract(ref, sci, reference_psf=given, science_psf=given, flux_ratio=1.0,
                          fit_shift=False, astrometric_noise=0.0)
        assert result.difference.shape == (96, 96)


def test_coadd_and_tiled_subtract_refuse_a_varying_psf_model_fitted_on_a_smaller_image(
        small_pair, tmp_path, monkeypatch):
    """coadd's psfs= and subtract_tiled's PSFs go through the same check as subtract's: the
    model is refused by its option, naming the image, before any frame is prepared."""
    import astro_zackay._prepare as prepare

    ref, sci = small_pair.reference.ccd, small_pair.science.ccd
    small = _kl_model((40, 40), varying=True)

    def no_work(*args, **kwargs):
        raise AssertionError("an image was prepared before the PSF model was checked")

    monkeypatch.setattr(prepare, "prepare_image", no_work)
    monkeypatch.setattr(KLPSFModel, "psf_at", no_work)
    with pytest.raises(ValueError, match=r"^psfs: the KLPSFModel was fitted on a 40x40 image "
                                         r"but the image 1 is 96x96"):
        coadd([ref, sci], psfs=[None, small])
    pytest.importorskip("dask")
    from astro_zackay.parallel import subtract_tiled

    paths = []
    for name, image in (("ref", ref), ("sci", sci)):
        paths.append(tmp_path / f"{name}.fits")
        image.write(paths[-1])
    with pytest.raises(ValueError, match=r"^science_psf: the KLPSFModel was fitted on a 40x40 "
                                         r"image"):
        subtract_tiled(paths[0], paths[1], tmp_path / "out.fits", science_psf=small)
