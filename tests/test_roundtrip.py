"""Every result type and PSF model through its file and back, compared field by field.

Each reader must give back what was written: every field of the result (found by
`dataclasses.fields`, so a field added later is compared too), each image's data with
its dtype, mask, uncertainty (class, values, dtype, unit), unit, WCS and meta, the
tables with their column dtypes, units and meta, and the fitted numbers exactly (not
to the digits a FITS card holds). The writers' own provenance cards may be added to
an image's meta; nothing of the original may change or go, apart from the cards of
the layout of the FITS file the inputs were read from (``SIMPLE``, ``BITPIX``,
``NAXISn``, ``BZERO``...), which a result file replaces by its own.
"""

import dataclasses

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.nddata import CCDData, InverseVariance, StdDevUncertainty, VarianceUncertainty
from astropy.table import Table
from conftest import data_path, record_warnings

from astro_zackay import coadd, subtract
from astro_zackay._warnings import SaturationWarning
from astro_zackay.background import BackgroundResult, estimate_background
from astro_zackay.coaddition import CoaddResult
from astro_zackay.files import (
    read_background,
    read_coadd,
    read_subtraction,
    write_background,
    write_candidates,
    write_coadd,
    write_subtraction,
)
from astro_zackay.psf import KLPSFModel, estimate_psf
from astro_zackay.simulation import simulate_image, simulate_pair
from astro_zackay.subtraction import SubtractionResult

#: Cards a writer adds to each image's meta (provenance, fitted numbers, flag bits).
_PROVENANCE = ("AZKIND", "AZVERS", "DATE", "AZIN", "AZPAR", "AZFLAG", "AZBETA", "AZBETAE",
               "AZDX", "AZDY", "AZBKGOFF", "AZFD", "AZASTX", "AZASTY", "AZSIGR", "AZSIGS",
               "AZNTILE", "AZFR", "AZSNR1", "NCOMBINE", "BUNIT", "HISTORY")

#: Cards of a FITS file's layout, which describe the file an image was read from (its
#: BITPIX, NAXISn, SIMPLE...), not the image: a result file has its own.
#: Commentary cards: compared as lists of lines (the original lines first).
_COMMENTARY = ("HISTORY", "COMMENT", "")
_LAYOUT = ("SIMPLE", "EXTEND", "XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "EXTNAME",
           "BSCALE", "BZERO")


# --------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------

def assert_array_same(written, read, what):
    written, read = np.asarray(written), np.asarray(read)
    assert read.dtype == written.dtype, f"{what}: dtype {read.dtype} != {written.dtype}"
    assert read.dtype.isnative, f"{what}: not in native byte order"
    assert read.shape == written.shape, f"{what}: shape {read.shape} != {written.shape}"
    assert np.array_equal(read, written, equal_nan=read.dtype.kind in "fc"), what


def assert_meta_kept(written, read, what, added_keys=_PROVENANCE):
    """Every card of ``written`` is in ``read`` with the same (exact) value; the cards
    ``read`` adds start with one of ``added_keys`` (the writer's provenance); the
    original HISTORY comes first."""
    for key, value in written.items():
        if key in _COMMENTARY or key.rstrip("0123456789") in _LAYOUT:
            continue
        assert key in read, f"{what}: meta lost {key}"
        assert read[key] == value and type(read[key]) is type(value), (
            f"{what}: meta {key} = {read[key]!r}, written {value!r}")
    added = set(read) - set(written)
    assert all(key.startswith(added_keys) for key in added), f"{what}: {sorted(added)}"
    for key in _COMMENTARY:
        if key in written:
            original = [str(line) for line in written[key]] if key else [written[key]]
            kept = [str(line) for line in read[key]] if key else [read[key]]
            assert kept[:len(original)] == original, f"{what}: {key or 'blank'} cards"


def assert_ccd_same(written, read, what):
    assert isinstance(read, CCDData), what
    assert_array_same(written.data, read.data, f"{what}.data")
    assert read.unit == written.unit, f"{what}.unit"
    if written.mask is None:
        assert read.mask is None or not np.any(read.mask), f"{what}.mask"
    else:
        assert_array_same(np.asarray(written.mask, bool), read.mask, f"{what}.mask")
    if written.uncertainty is None:
        assert read.uncertainty is None, f"{what}.uncertainty"
    else:
        assert type(read.uncertainty) is type(written.uncertainty), f"{what}.uncertainty"
        assert_array_same(written.uncertainty.array, read.uncertainty.array,
                          f"{what}.uncertainty")
        assert read.uncertainty.unit == written.uncertainty.unit, f"{what}.uncertainty.unit"
    assert (read.wcs is None) == (written.wcs is None), f"{what}.wcs"
    if written.wcs is not None:
        assert read.wcs.to_header() == written.wcs.to_header(), f"{what}.wcs"
        # the file's NAXISn give the read WCS the image's pixel shape if it had none
        assert read.wcs.pixel_shape in (written.wcs.pixel_shape, written.shape[::-1]), what
    assert_meta_kept(written.meta, read.meta, f"{what}.meta")


def assert_table_same(written, read, what, meta_added=()):
    """Columns (names, dtypes, units, values) and meta; ``meta_added``: the keys that
    the writer may add to the meta."""
    assert isinstance(read, Table), what
    assert read.colnames == written.colnames, f"{what}: columns"
    for name in written.colnames:
        assert read[name].unit == written[name].unit, f"{what}[{name!r}].unit"
        assert_array_same(written[name], read[name], f"{what}[{name!r}]")
    assert_meta_kept(dict(written.meta), dict(read.meta), f"{what}.meta", tuple(meta_added))


def _state(result):
    """Copies of every array, table and meta of a result, to show a writer left it alone."""
    state = {}
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if isinstance(value, CCDData):
            state[field.name] = (value.data.copy(), dict(value.meta),
                                 None if value.mask is None else value.mask.copy(),
                                 None if value.uncertainty is None
                                 else value.uncertainty.array.copy())
        elif isinstance(value, Table):
            state[field.name] = (value.copy(), dict(value.meta))
        elif isinstance(value, np.ndarray):
            state[field.name] = value.copy()
        else:
            state[field.name] = value
    return state


def assert_unchanged(result, state):
    for name, before in state.items():
        value = getattr(result, name)
        if isinstance(value, CCDData):
            data, meta, mask, error = before
            assert np.array_equal(value.data, data, equal_nan=True), name
            assert dict(value.meta) == meta, f"{name}.meta changed"
            assert (value.mask is None) == (mask is None), name
            if mask is not None:
                assert np.array_equal(value.mask, mask), name
            if error is not None:
                assert np.array_equal(value.uncertainty.array, error, equal_nan=True), name
        elif isinstance(value, Table):
            table, meta = before
            assert value.colnames == table.colnames and dict(value.meta) == meta, name
            for col in table.colnames:
                assert np.array_equal(np.asarray(value[col]), np.asarray(table[col])), name
        elif isinstance(value, np.ndarray):
            assert np.array_equal(value, before, equal_nan=True), name
        else:
            assert value == before, name


def assert_same(written, read, what="result"):
    """Compare a value of any type a result holds, recursing into dataclasses."""
    if dataclasses.is_dataclass(written):
        assert type(read) is type(written), what
        for field in dataclasses.fields(written):
            assert_same(getattr(written, field.name), getattr(read, field.name),
                        f"{what}.{field.name}")
    elif isinstance(written, CCDData):
        assert_ccd_same(written, read, what)
    elif isinstance(written, Table):
        assert_table_same(written, read, what)
    elif isinstance(written, np.ndarray):
        assert_array_same(written, read, what)
    elif written is None:
        assert read is None, what
    elif isinstance(written, tuple):
        assert isinstance(read, tuple) and len(read) == len(written), what
        for j, (a, b) in enumerate(zip(written, read)):
            assert_same(a, b, f"{what}[{j}]")
    elif isinstance(written, float | np.floating):
        assert isinstance(read, float | np.floating), what
        assert read == written or (np.isnan(read) and np.isnan(written)), (
            f"{what}: {read!r} != {written!r}")
    else:
        assert type(read) is type(written) and read == written, f"{what}: {read!r}"


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def subtraction():
    transient = Table({"x": [80.0], "y": [170.0], "flux": [5000.0]})
    pair = simulate_pair((256, 256), n_stars=50, flux_range=(2e3, 2e5), flux_ratio=0.9,
                         transients=transient, seed=8)
    science = pair.science.ccd.copy()
    science.mask = np.zeros(science.shape, bool)
    science.mask[120:124, 40:44] = True
    return subtract(pair.reference.ccd, science, astrometric_noise=(0.03, 0.02))


def test_subtraction_round_trip(subtraction, tmp_path):
    path = tmp_path / "diff.fits"
    state = _state(subtraction)
    write_subtraction(subtraction, path, inputs=["ref.fits", "new.fits"],
                      parameters={"threshold": 5.0})
    assert_unchanged(subtraction, state)
    back = read_subtraction(path)
    assert isinstance(back, SubtractionResult)
    assert_same(subtraction, back, "subtraction")
    # the fitted numbers have more digits than a header card holds: compared exactly
    assert back.shift == subtraction.shift and back.flux_scale == subtraction.flux_scale
    assert back.score.meta["AZIN2"] == "new.fits"
    # what the reader gives back writes an equal file again
    write_subtraction(back, tmp_path / "again.fits")
    assert_same(subtraction, read_subtraction(tmp_path / "again.fits"), "written twice")


def test_comparison_catches_a_change(subtraction, tmp_path):
    """The comparison itself can fail: a changed fitted number, meta card or dtype."""
    path = tmp_path / "diff.fits"
    write_subtraction(subtraction, path)
    back = read_subtraction(path)
    changed = dataclasses.replace(back, flux_ratio=np.nextafter(back.flux_ratio, 2.0))
    with pytest.raises(AssertionError, match=r"subtraction.flux_ratio"):
        assert_same(subtraction, changed, "subtraction")
    back.score.meta["AZBETA"] = float(np.float32(back.score.meta["AZBETA"]))
    with pytest.raises(AssertionError, match=r"subtraction.score.meta: meta AZBETA"):
        assert_same(subtraction, back, "subtraction")
    back.score.meta["AZBETA"] = subtraction.score.meta["AZBETA"]
    back.flux.data = back.flux.data.astype(">f4")
    with pytest.raises(AssertionError, match=r"subtraction.flux.data: dtype >f4 != float32"):
        assert_same(subtraction, back, "subtraction")


@pytest.fixture(scope="module")
def coadd_result():
    stars = simulate_image((128, 128), n_stars=20, flux_range=(1e4, 1e5), seed=0).truth
    frames = [simulate_image((128, 128), psf=fwhm, stars=stars["x", "y", "flux"],
                             seed=j).ccd for j, fwhm in enumerate((2.5, 3.5, 3.0))]
    for frame in frames:
        frame.mask = np.zeros(frame.shape, bool)
        frame.mask[10:13, 20:23] = True  # masked in every frame: masked in the coadd
    frames[1].data[60, 70] += 5e4  # a cosmic ray in one frame: rejected
    return coadd(frames, psfs=[2.5, 3.5, 3.0])


def test_coadd_round_trip(coadd_result, tmp_path):
    result = coadd_result
    assert result.image.mask.any() and result.rejected.any()  # both are written
    path = tmp_path / "coadd.fits"
    state = _state(result)
    write_coadd(result, path, parameters={"reject": 6.0})
    assert_unchanged(result, state)  # the masked pixels were blanked in copies
    back = read_coadd(path)
    assert isinstance(back, CoaddResult)
    assert_same(result, back, "coadd")
    # the values under the mask come back though the file shows them as NaN
    masked = result.calibrated.mask
    assert np.isnan(fits.getdata(path)[masked]).all()
    assert np.isfinite(back.calibrated.data[masked]).all()
    assert back.weights.tolist() == result.weights.tolist()
    assert_array_same(result.snr.data, back.snr.data, "snr")
    # CoaddResult.write is the same file
    result.write(tmp_path / "method.fits")
    assert_same(result, read_coadd(tmp_path / "method.fits"), "coadd via write")
    write_coadd(back, tmp_path / "again.fits")
    assert_same(result, read_coadd(tmp_path / "again.fits"), "coadd written twice")


def test_coadd_file_errors_name_the_file(coadd_result, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no coadd file at .*absent.fits"):
        read_coadd(tmp_path / "absent.fits")
    image = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((8, 8))).writeto(image)
    with pytest.raises(ValueError, match=r"image.fits' is not an astro_zackay coadd file"):
        read_coadd(image)
    path = tmp_path / "coadd.fits"
    write_coadd(coadd_result, path)
    for name in ("MASKED", "PROPERUN"):
        with fits.open(path) as hdul:
            del hdul[name]
            hdul.writeto(tmp_path / f"cut-{name}.fits")
        with pytest.raises(ValueError, match=rf"cut-{name}.fits' lacks the extension\(s\) "
                                             rf"{name}: it is truncated"):
            read_coadd(tmp_path / f"cut-{name}.fits")


@pytest.mark.parametrize("method", ["sep", "photutils"])
def test_background_round_trip(method, tmp_path):
    image = simulate_image((96, 80), n_stars=8, seed=4).ccd
    image.mask = np.zeros(image.shape, bool)
    image.mask[5:9, 5:9] = True
    result = estimate_background(image, method=method, box_size=(16, 20))
    path = tmp_path / "background.fits"
    state = _state(result)
    write_background(result, path, inputs=["image.fits"], parameters={"method": method})
    assert_unchanged(result, state)
    back = read_background(path)
    assert isinstance(back, BackgroundResult)
    assert_same(result, back, "background")
    assert back.sky.meta["AZIN1"] == "image.fits"


@pytest.mark.parametrize("cls", [StdDevUncertainty, VarianceUncertainty, InverseVariance])
def test_background_maps_with_any_uncertainty(cls, tmp_path):
    """Maps with an uncertainty (of any class) and no mask keep both states."""
    rng = np.random.default_rng(1)
    sky = CCDData(rng.normal(100.0, 1.0, (16, 12)), unit="adu",
                  uncertainty=cls(rng.uniform(1.0, 2.0, (16, 12))), meta={"NOTE": "x"})
    rms = CCDData(np.full((16, 12), 3.0, np.float32), unit="adu")
    result = BackgroundResult(sky=sky, rms=rms, global_sky=100.0, global_rms=3.0,
                              method="sep", box_size=(8, 8), filter_size=(3, 3),
                              masked_fraction=0.125)
    write_background(result, tmp_path / "bkg.fits")
    assert_same(result, read_background(tmp_path / "bkg.fits"), "background")


def test_background_file_errors_name_the_file(tmp_path):
    image = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((8, 8))).writeto(image)
    with pytest.raises(ValueError, match=r"image.fits' is not an astro_zackay background"):
        read_background(image)
    with pytest.raises(FileNotFoundError, match=r"no background file at .*absent.fits"):
        read_background(tmp_path / "absent.fits")
    result = estimate_background(simulate_image((64, 64), n_stars=4, seed=2).ccd)
    write_background(result, tmp_path / "bkg.fits")
    with fits.open(tmp_path / "bkg.fits") as hdul:
        del hdul["RMS"]
        hdul.writeto(tmp_path / "cut.fits")
    with pytest.raises(ValueError, match=r"cut.fits' lacks the extension\(s\) RMS"):
        read_background(tmp_path / "cut.fits")


def test_candidates_ecsv_keeps_units_and_meta(subtraction, tmp_path):
    candidates = subtraction.find_transients(5.0)
    assert len(candidates) >= 1
    candidates["x"].unit = u.pix  # units of any column are kept
    candidates["flux"].unit = u.electron
    candidates.meta["note"] = "field 7"
    path = tmp_path / "cands.ecsv"
    write_candidates(candidates, path, inputs=["ref.fits", "new.fits"],
                     parameters={"threshold": 5.0})
    back = Table.read(path)
    added = ["FLAG_", "astro_zackay_version", "inputs", "parameters"]
    assert_table_same(candidates, back, "candidates", meta_added=added)
    assert back.meta["parameters"] == {"threshold": 5.0}
    assert back["x"].unit == u.pix and back.meta["note"] == "field 7"


# --------------------------------------------------------------------------------------
# PSF models
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def star_image():
    return simulate_image((256, 256), psf=3.0, n_stars=60, flux_range=(2e4, 2e5),
                          min_separation=15, seed=2).ccd


def assert_psf_same(model, back):
    assert isinstance(back, KLPSFModel)
    assert back.param_names == model.param_names
    for name in model.param_names:
        assert getattr(back, name).value == getattr(model, name).value, name
    assert back.fixed == model.fixed and back.bounds == model.bounds
    for name in ("basis", "fields", "eigenvalues", "selection", "scaling"):
        assert_array_same(getattr(model, name), getattr(back, name), name)
    if model.wing is None:
        assert back.wing is None
    else:
        assert_array_same(model.wing, back.wing, "wing")
    for name in ("meta", "quality"):
        written, read = dict(getattr(model, name)), dict(getattr(back, name))
        assert read == written, name
        assert {k: type(v) for k, v in read.items()} == {k: type(v)
                                                         for k, v in written.items()}, name
    assert (back.method, back.degree, back.image_shape, back.stamp_shape) == (
        model.method, model.degree, model.image_shape, model.stamp_shape)
    if model.stars is None:
        assert back.stars is None
    else:
        assert_table_same(model.stars, back.stars, "stars")
    assert repr(back) == repr(model)
    x, y = np.mgrid[50:54, 99:104]
    assert_array_same(model(x, y), back(x, y), "evaluated")


@pytest.mark.parametrize("method", ["kl", "moffat", "gaussian", "constant"])
def test_psf_model_round_trip(star_image, method, tmp_path):
    model = estimate_psf(star_image, method=method)
    model.x_0, model.y_0, model.flux = 101.25, 57.5, 1234.5
    model.fixed["flux"] = True
    model.bounds["x_0"] = (100.0, 103.0)
    model.bounds["y_0"] = (None, 60.0)
    path = tmp_path / "psf.fits"
    model.write(path)
    assert_psf_same(model, KLPSFModel.read(path))


def test_psf_model_with_a_wing_and_defaults(tmp_path):
    """A hand-made model: a wing, no stars, no quality, default parameters."""
    core = np.zeros((2, 5, 5))
    core[0, 2, 2], core[1, 1:4, 1:4] = 1.0, 1.0 / 9
    wing = np.zeros((9, 9))
    wing[0, :], wing[-1, :] = 0.01, 0.01
    model = KLPSFModel(core, [[1.0, 0.1, 0.0], [0.5, 0.0, 0.2]], image_shape=(40, 60),
                       degree=1, wing=wing, method="kl", meta={"reason": "test", "n": 3})
    model.write(tmp_path / "psf.fits")
    back = KLPSFModel.read(tmp_path / "psf.fits")
    assert_psf_same(model, back)
    assert (back.x_0.value, back.y_0.value, back.flux.value) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("missing", ["QUALITY", "META", "BASIS", "FIELDS", "EIGEN", "SELECT"])
def test_psf_file_without_an_extension_is_named(missing, tmp_path):
    model = KLPSFModel(np.ones((1, 3, 3)) / 9, [[1.0]], image_shape=(20, 20), degree=0)
    model.write(tmp_path / "psf.fits")
    with fits.open(tmp_path / "psf.fits") as hdul:
        del hdul[missing]
        hdul.writeto(tmp_path / "cut.fits")
    with pytest.raises(ValueError, match=rf"cut.fits' lacks {missing}: the PSF file is "
                                         r"truncated or damaged"):
        KLPSFModel.read(tmp_path / "cut.fits")


def test_psf_model_fitted_by_photutils_after_reading(star_image, tmp_path):
    """The model read back is a photutils PSF model as the original was: fitting one
    star gives the same position and flux, and fixed parameters stay fixed."""
    from photutils.psf import PSFPhotometry

    model = estimate_psf(star_image, method="kl")
    model.write(tmp_path / "psf.fits")
    back = KLPSFModel.read(tmp_path / "psf.fits")
    star = model.stars[0]
    init = Table({"x": [float(star["x"]) + 0.3], "y": [float(star["y"]) - 0.2]})
    data = np.asarray(star_image.data) - np.median(star_image.data)
    fits_ = [PSFPhotometry(m, (11, 11), aperture_radius=4)(data, init_params=init)
             for m in (model, back)]
    for name in ("x_fit", "y_fit", "flux_fit"):
        assert float(fits_[0][name][0]) == float(fits_[1][name][0]), name
    assert abs(float(fits_[1]["x_fit"][0]) - float(star["x"])) < 0.2


# --------------------------------------------------------------------------------------
# the real properimage pair
# --------------------------------------------------------------------------------------

def test_real_pair_subtraction_round_trip(tmp_path):
    reference = data_path("properimage", "aligned_eso085-030-004.fit")
    science = data_path("properimage", "aligned_eso085-030-005.fit")
    result, caught = record_warnings(
        lambda: subtract(reference, science, unit="adu", gain=1.4))
    assert any(issubclass(w.category, SaturationWarning) for w in caught)
    assert result.score.mask.any() and result.input_mask.any()
    path = tmp_path / "real.fits"
    write_subtraction(result, path, inputs=[reference, science])
    back = read_subtraction(path)
    assert_same(result, back, "real subtraction")
    candidates, again = result.find_transients(5.0), back.find_transients(5.0)
    assert_table_same(candidates, again, "real candidates")
    write_candidates(candidates, tmp_path / "real.ecsv")
    table = Table.read(tmp_path / "real.ecsv")
    for name in candidates.colnames:
        assert table[name].unit == candidates[name].unit
        assert_array_same(candidates[name], table[name], name)
