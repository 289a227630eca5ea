"""No public call mutates its inputs, and the package's warnings point at the caller's line.

Every public call (and a few refused ones) runs on hashed inputs
(`conftest.input_hash`: data, mask, uncertainty array and class, meta and WCS header of
each CCDData; the columns and meta of tables; the bytes of the files read); the hashes
must be the same after the call. Each public function that can warn is made to warn,
and its `~astro_zackay.AstroZackayWarning` must name this file, not the package.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
from astropy.nddata import CCDData, StdDevUncertainty, VarianceUncertainty
from astropy.table import Table
from conftest import assert_inputs_unchanged, input_hash

from astro_zackay import (
    AstroZackayWarning,
    FewStarsWarning,
    KLPSFModel,
    NoiseEstimateWarning,
    SaturationWarning,
    align,
    coadd,
    estimate_background,
    estimate_psf,
    find_psf_stars,
    find_transients,
    match_stars,
    subtract,
    subtract_background,
)
from astro_zackay._warnings import UncertaintyWarning
from astro_zackay.cli import main
from astro_zackay.files import read_subtraction, write_subtraction
from astro_zackay.profiles import psf_stamp
from astro_zackay.simulation import (
    inject_sources,
    simulate_bright_star_pair,
    simulate_image,
    simulate_mosaic,
    simulate_pair,
    tutorial2_frame,
)


class FileContent:
    """A file as an input: its hash (through ``repr``) is that of its bytes at the time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"FileContent({hashlib.sha256(self.path.read_bytes()).hexdigest()})"


def _zero_patch(ccd: CCDData) -> CCDData:
    sigma = ccd.uncertainty.array.copy()
    sigma[60:70, 60:70] = 0.0
    return CCDData(ccd.data.copy(), unit=ccd.unit, mask=ccd.mask.copy(), wcs=ccd.wcs,
                   uncertainty=StdDevUncertainty(sigma), meta=dict(ccd.meta))


@pytest.fixture(scope="module")
def world(small_pair, tmp_path_factory):
    """Everything the calls take, made once: images, tables, PSFs, files."""
    folder = tmp_path_factory.mktemp("mutation")
    ref, sci = small_pair.reference.ccd, small_pair.science.ccd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewStarsWarning)  # 10-13 stars: tested below
        stars = find_psf_stars(sci)
        model = estimate_psf(sci, stars)
        result = subtract(ref, sci)
    model.write(folder / "psf.fits")
    write_subtraction(result, folder / "sub.fits")
    ref.write(folder / "ref.fits")
    sci.write(folder / "new.fits")
    return {
        "ref": ref, "sci": sci, "stars": stars, "ref_stars": find_psf_stars(ref),
        "model": model, "result": result, "folder": folder,
        "variance": CCDData(sci.data.copy(), unit=sci.unit, mask=sci.mask.copy(), wcs=sci.wcs,
                            uncertainty=VarianceUncertainty(sci.uncertainty.array**2),
                            meta=dict(sci.meta)),
        "transients": Table({"x": [30.2], "y": [50.7], "flux": [4000.0]}),
        "constant": CCDData(np.full(ref.shape, 100.0), unit="electron",
                            uncertainty=StdDevUncertainty(np.full(ref.shape, 10.0))),
        "stamp": psf_stamp(15, 3.0),
    }


def _files(world, *names):
    return [FileContent(world["folder"] / name) for name in names]


#: name -> world -> (call, inputs): every public entry point with good inputs.
GOOD = {
    "estimate_background": lambda w: (lambda: estimate_background(w["sci"]), [w["sci"]]),
    "subtract_background": lambda w: (lambda: subtract_background(w["variance"]),
                                      [w["variance"]]),
    "subtract_background(background=)": lambda w: (
        lambda: subtract_background(w["sci"], estimate_background(w["sci"])), [w["sci"]]),
    "find_psf_stars": lambda w: (lambda: find_psf_stars(w["variance"]), [w["variance"]]),
    "estimate_psf": lambda w: (lambda: estimate_psf(w["variance"]), [w["variance"]]),
    "subtract": lambda w: (lambda: subtract(w["ref"], w["sci"]), [w["ref"], w["sci"]]),
    "subtract(paths)": lambda w: (
        lambda: subtract(w["folder"] / "ref.fits", w["folder"] / "new.fits"),
        _files(w, "ref.fits", "new.fits")),
    "coadd(default)": lambda w: (lambda: coadd([w["ref"], w["sci"], w["ref"]]),
                                 [w["ref"], w["sci"]]),
    "estimate_psf(stars)": lambda w: (lambda: estimate_psf(w["sci"], w["stars"]),
                                      [w["sci"], w["stars"]]),
    "align(stars)": lambda w: (lambda: align(w["sci"], w["ref"]), [w["sci"], w["ref"]]),
    "align(wcs)": lambda w: (lambda: align(w["sci"], w["ref"], method="wcs"),
                             [w["sci"], w["ref"]]),
    "subtract(given PSFs)": lambda w: (
        lambda: subtract(w["ref"], w["variance"], reference_psf=w["stamp"],
                         science_psf=w["model"]),
        [w["ref"], w["variance"], w["stamp"]]),
    "subtract(align=wcs)": lambda w: (
        lambda: subtract(w["ref"], w["sci"], align="wcs", reference_psf=2.5, science_psf=3.5),
        [w["ref"], w["sci"]]),
    "coadd": lambda w: (lambda: coadd([w["ref"], w["variance"]], psfs=[2.5, w["model"]]),
                        [w["ref"], w["variance"]]),
    "find_transients": lambda w: (lambda: find_transients(w["result"].score),
                                  [w["result"].score]),
    "SubtractionResult.find_transients": lambda w: (
        lambda: w["result"].find_transients(4.0),
        [w["result"].score, w["result"].difference, w["result"].flux]),
    "match_stars": lambda w: (lambda: match_stars(w["ref_stars"], w["stars"]),
                              [w["ref_stars"], w["stars"]]),
    "KLPSFModel.evaluate": lambda w: (
        lambda: w["model"](np.arange(5.0), np.arange(5.0)),
        [w["model"].basis, w["model"].fields, w["model"].stars]),
    "KLPSFModel.read": lambda w: (lambda: KLPSFModel.read(w["folder"] / "psf.fits"),
                                  _files(w, "psf.fits")),
    "read_subtraction": lambda w: (lambda: read_subtraction(w["folder"] / "sub.fits"),
                                   _files(w, "sub.fits")),
    "simulate_image(stars=)": lambda w: (
        lambda: simulate_image(64, stars=w["transients"], seed=1), [w["transients"]]),
    "simulate_pair(transients=)": lambda w: (
        lambda: simulate_pair(64, n_stars=5, transients=w["transients"], seed=1),
        [w["transients"]]),
    "simulate_mosaic": lambda w: (lambda: simulate_mosaic(32, [2.5, 3.0], grid=(1, 2),
                                                          n_stars=3, seed=1), []),
    "simulate_bright_star_pair": lambda w: (
        lambda: simulate_bright_star_pair(64, n_stars=3, seed=1), []),
    "tutorial2_frame": lambda w: (lambda: tutorial2_frame(64, n_stars=3, seed=1), []),
    "inject_sources": lambda w: (
        lambda: inject_sources(w["sci"], w["transients"], w["stamp"], seed=1),
        [w["sci"], w["transients"], w["stamp"]]),
}


@pytest.mark.filterwarnings("ignore::astro_zackay.FewStarsWarning")
@pytest.mark.parametrize("name", GOOD)
def test_good_calls_leave_their_inputs_unchanged(world, name):
    call, inputs = GOOD[name](world)
    result = assert_inputs_unchanged(call, *inputs)
    assert result is not None


@pytest.mark.parametrize("command", [
    ["subtract", "{ref}", "{new}", "--reference-fwhm", "2.5", "--science-fwhm", "3.5"],
    ["coadd", "{ref}", "{new}", "--fwhm", "2.5,3.5"],
    ["psf", "{new}"],
])
def test_cli_leaves_its_files_and_arguments_unchanged(world, tmp_path, command):
    files = _files(world, "ref.fits", "new.fits")
    paths = {"ref": world["folder"] / "ref.fits", "new": world["folder"] / "new.fits"}
    argv = [a.format(**paths) for a in command] + ["-o", str(tmp_path / "out.fits"), "-q"]
    frozen = list(argv)
    with redirect_stderr(io.StringIO()):
        status = assert_inputs_unchanged(lambda: main(argv), *files)
    assert status == 0 and argv == frozen
    assert (tmp_path / "out.fits").exists()


def _far(ccd: CCDData) -> CCDData:
    moved = CCDData(ccd.data.copy(), unit=ccd.unit, uncertainty=ccd.uncertainty,
                    wcs=ccd.wcs.deepcopy(), meta=dict(ccd.meta))
    moved.wcs.wcs.crval = [ccd.wcs.wcs.crval[0] + 10.0, ccd.wcs.wcs.crval[1]]
    return moved


def _all_nan(ccd: CCDData) -> CCDData:
    return CCDData(np.full(ccd.shape, np.nan), unit=ccd.unit, uncertainty=ccd.uncertainty,
                   mask=ccd.mask.copy(), meta=dict(ccd.meta))


#: name -> world -> (call, inputs, error, match): refused calls leave their inputs too.
REFUSED = {
    "subtract(all NaN)": lambda w: (lambda: subtract(w["ref"], _all_nan(w["sci"])), [w["ref"]],
                                    ValueError, r"science image: .* has no usable pixel"),
    "subtract(flux_ratio=-1)": lambda w: (lambda: subtract(w["ref"], w["sci"], flux_ratio=-1.0),
                                          [w["ref"], w["sci"]], ValueError, r"flux_ratio"),
    "coadd(1-D frame)": lambda w: (
        lambda: coadd([w["ref"], w["sci"], CCDData(np.ones(9), unit="electron")]),
        [w["ref"], w["sci"]], ValueError, r"image 2 \(9,\)"),
    "align(wcs, apart)": lambda w: (
        lambda: align(_far(w["ref"]), w["sci"], method="wcs"), [w["sci"]], ValueError,
        r"no overlap between the images' footprints"),
    "estimate_psf(constant)": lambda w: (lambda: estimate_psf(w["constant"]), [w["constant"]],
                                         ValueError, r"no sources detected"),
    "find_transients(constant)": lambda w: (
        lambda: find_transients(w["constant"]), [w["constant"]], ValueError,
        r"score is constant"),
    "match_stars(radius=-1)": lambda w: (
        lambda: match_stars(w["ref_stars"], w["stars"], radius=-1.0),
        [w["ref_stars"], w["stars"]], ValueError, r"radius must be a positive finite number"),
    "estimate_background(box_size=1)": lambda w: (
        lambda: estimate_background(w["sci"], box_size=1), [w["sci"]], ValueError, r"box"),
    "KLPSFModel.read(an image)": lambda w: (
        lambda: KLPSFModel.read(w["folder"] / "ref.fits"), _files(w, "ref.fits"), ValueError,
        r"is not an astro_zackay PSF file"),
    "read_subtraction(an image)": lambda w: (
        lambda: read_subtraction(w["folder"] / "new.fits"), _files(w, "new.fits"), ValueError,
        r"is not an astro_zackay subtraction file"),
}


@pytest.mark.filterwarnings("ignore::astro_zackay.FewStarsWarning")
@pytest.mark.filterwarnings("ignore::astro_zackay.NoiseEstimateWarning")
@pytest.mark.parametrize("name", REFUSED)
def test_refused_calls_leave_their_inputs_unchanged(world, name):
    call, inputs, error, match = REFUSED[name](world)
    with pytest.raises(error, match=match):
        assert_inputs_unchanged(call, *inputs)


def _clipped(ccd: CCDData) -> CCDData:
    """The image clipped at a level its brightest stars reach, with no SATURATE keyword."""
    return CCDData(np.minimum(ccd.data, 1500.0), unit=ccd.unit, uncertainty=ccd.uncertainty,
                   mask=ccd.mask.copy(), meta={})


def _adu_without_noise(ccd: CCDData) -> CCDData:
    return CCDData(ccd.data.copy(), unit="adu", wcs=ccd.wcs, meta={})


#: name -> world -> (call, the warning, words of its message): each public call that warns.
WARNS = {
    "estimate_background(constant)": lambda w: (
        lambda: estimate_background(w["constant"]), NoiseEstimateWarning, r"rms is 0"),
    "subtract_background(constant)": lambda w: (
        lambda: subtract_background(w["constant"]), NoiseEstimateWarning, r"rms is 0"),
    "find_psf_stars(clipped)": lambda w: (
        lambda: find_psf_stars(_clipped(w["sci"])), SaturationWarning,
        r"saturation found in the data"),
    "find_psf_stars(zero uncertainties)": lambda w: (
        lambda: find_psf_stars(_zero_patch(w["sci"])), UncertaintyWarning,
        r"the CCDData's StdDevUncertainty has 100 pixels with a zero uncertainty"),
    "estimate_psf": lambda w: (lambda: estimate_psf(w["sci"]), FewStarsWarning,
                               r"usable PSF stars"),
    "align(zero uncertainties)": lambda w: (
        lambda: align(_zero_patch(w["sci"]), w["ref"]), UncertaintyWarning,
        r"100 pixels are masked"),
    "subtract": lambda w: (lambda: subtract(w["ref"], w["sci"]), FewStarsWarning,
                           r"^science image: .*usable PSF stars"),
    "subtract(ADU without noise)": lambda w: (
        lambda: subtract(_adu_without_noise(w["ref"]), _adu_without_noise(w["sci"]),
                         reference_psf=2.5, science_psf=3.5),
        NoiseEstimateWarning, r"^reference image: no uncertainty and no gain"),
    "subtract(zero uncertainties)": lambda w: (
        lambda: subtract(w["ref"], _zero_patch(w["sci"]), reference_psf=2.5,
                         science_psf=3.5),
        UncertaintyWarning, r"^science image: the CCDData's StdDevUncertainty has 100 pixels"),
    "coadd": lambda w: (lambda: coadd([w["ref"], w["sci"]]), FewStarsWarning,
                        r"^image 1: .*usable PSF stars"),
    "coadd(clipped)": lambda w: (
        lambda: coadd([w["ref"], _clipped(w["sci"])], psfs=[2.5, 3.5]), SaturationWarning,
        r"^image 1: saturation found in the data"),
}


@pytest.mark.parametrize("name", WARNS)
def test_warnings_point_at_the_callers_line(world, name):
    call, category, match = WARNS[name](world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    ours = [w for w in caught if issubclass(w.category, AstroZackayWarning)]
    assert any(issubclass(w.category, category) and re.search(match, str(w.message))
               for w in ours), [str(w.message) for w in ours]
    assert [w.filename for w in ours] == [__file__] * len(ours)


# ---------------------------------------------------------------------------------------
# the hash itself: each thing it must see


def _hashed_ccd(small_pair) -> CCDData:
    ccd = small_pair.science.ccd
    return CCDData(ccd.data.copy(), unit=ccd.unit, mask=ccd.mask.copy(),
                   uncertainty=StdDevUncertainty(ccd.uncertainty.array.copy()),
                   wcs=ccd.wcs.deepcopy(), meta=dict(ccd.meta))


def _edit_data(c):
    c.data[3, 3] += 1.0


def _edit_mask(c):
    c.mask[3, 3] = ~c.mask[3, 3]


def _edit_uncertainty(c):
    c.uncertainty.array[3, 3] *= 2.0


def _edit_uncertainty_class(c):
    c.uncertainty = VarianceUncertainty(c.uncertainty.array.copy())


def _edit_meta(c):
    c.meta["AZNEW"] = 1


def _edit_wcs(c):
    c.wcs.wcs.crpix = [c.wcs.wcs.crpix[0] + 0.5, c.wcs.wcs.crpix[1]]


def _edit_dtype(c):
    c.data = c.data.astype(np.float32)


@pytest.mark.parametrize("edit", [_edit_data, _edit_mask, _edit_uncertainty,
                                  _edit_uncertainty_class, _edit_meta, _edit_wcs, _edit_dtype])
def test_input_hash_sees_every_part_of_a_ccddata(small_pair, edit):
    ccd = _hashed_ccd(small_pair)
    before = input_hash(ccd)
    assert input_hash(_hashed_ccd(small_pair)) == before  # equal copies hash alike
    with pytest.raises(AssertionError, match=r"inputs \[0\] were mutated by the call"):
        assert_inputs_unchanged(lambda: edit(ccd), ccd)


def test_input_hash_sees_a_table_and_a_file(tmp_path):
    table = Table({"x": [1.0, 2.0]})
    with pytest.raises(AssertionError, match=r"inputs \[0\] were mutated"):
        assert_inputs_unchanged(lambda: table["x"].__setitem__(0, 5.0), table)
    path = tmp_path / "a.fits"
    path.write_bytes(b"a")
    with pytest.raises(AssertionError, match=r"inputs \[1\] were mutated"):
        assert_inputs_unchanged(lambda: path.write_bytes(b"b"), table, FileContent(path))
