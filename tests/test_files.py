"""Result files: what is written reads back whole, with its provenance; bad files are named."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table

import astro_zackay
from astro_zackay import coadd, subtract
from astro_zackay.files import (
    coadd_psf,
    read_subtraction,
    write_candidates,
    write_coadd,
    write_regions,
    write_subtraction,
)
from astro_zackay.psf import KLPSFModel, estimate_psf
from astro_zackay.simulation import simulate_image, simulate_pair
from astro_zackay.transients import FLAGS


@pytest.fixture(scope="module")
def subtraction():
    transient = Table({"x": [80.0], "y": [170.0], "flux": [5000.0]})
    pair = simulate_pair((256, 256), n_stars=50, flux_range=(2e3, 2e5), flux_ratio=0.9,
                         transients=transient, seed=8)
    science = pair.science.ccd.copy()
    science.mask = np.zeros(science.shape, bool)
    science.mask[120:124, 40:44] = True
    return pair, subtract(pair.reference.ccd, science)


def _same(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


def test_subtraction_file_reads_back_whole(subtraction, tmp_path):
    pair, result = subtraction
    path = tmp_path / "diff.fits"
    write_subtraction(result, path, inputs=["ref.fits", "new.fits"],
                      parameters={"threshold": 5.0, "gain": (1.4, 1.2)})
    back = read_subtraction(path)
    for field in ("difference", "score", "flux", "flux_error"):
        written, read = getattr(result, field), getattr(back, field)
        assert _same(written.data, read.data) and _same(written.mask, read.mask)
        assert written.unit == read.unit
        assert np.isnan(read.data[121, 41])  # a masked input pixel: NaN in every image
    assert _same(result.flux.uncertainty.array, back.flux.uncertainty.array)
    for field in ("psf", "tile_psfs", "input_mask"):
        assert _same(getattr(result, field), getattr(back, field))
    for field in ("flux_ratio", "flux_ratio_error", "shift", "background_offset",
                  "astrometric_noise", "flux_scale"):
        assert getattr(back, field) == getattr(result, field)
    for name in result.tiles.colnames:
        assert _same(result.tiles[name], back.tiles[name])
    for name in result.sources.colnames:
        assert _same(result.sources[name], back.sources[name])
    first, again = result.find_transients(5.0), back.find_transients(5.0)
    assert len(first) >= 1 and np.hypot(first["x"][0] - 80.0, first["y"][0] - 170.0) < 1.0
    for name in ("x", "y", "score", "flux", "flags"):
        assert _same(first[name], again[name])


def test_subtraction_file_headers_hold_the_provenance(subtraction, tmp_path):
    pair, result = subtraction
    path = tmp_path / "diff.fits"
    write_subtraction(result, path, inputs=["/data/ref.fits", "/data/new.fits"],
                      parameters={"threshold": 5.0, "gain": (1.4, 1.2)})
    score = CCDData.read(path, hdu="SCORR")
    assert score.wcs.wcs.crval.tolist() == pair.science.ccd.wcs.wcs.crval.tolist()
    header = score.meta
    assert header["AZVERS"] == astro_zackay.__version__ and header["AZKIND"] == "subtraction"
    assert (header["AZIN1"], header["AZIN2"]) == ("ref.fits", "new.fits")
    assert (header["AZPAR1"], header["AZPAR2"]) == ("threshold=5.0", "gain=(1.4, 1.2)")
    assert header["AZBETA"] == result.flux_ratio and abs(header["AZBETA"] - 0.9) < 0.03
    assert header["AZNTILE"] == len(result.tiles)
    assert header["AZSIGS"] == float(np.median(result.tiles["sigma_sci"]))
    history = "\n".join(header["HISTORY"])
    assert "input 1: /data/ref.fits" in history and "parameter gain = (1.4, 1.2)" in history
    assert "fitted: flux ratio" in history
    for name, (bit, text) in FLAGS.items():
        assert header[f"AZFLAG{bit}"] == f"{name}: {text}"


def test_bad_subtraction_files_are_named(subtraction, tmp_path):
    _, result = subtraction
    other = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((8, 8))).writeto(other)
    with pytest.raises(ValueError, match="is not an astro_zackay subtraction file"):
        read_subtraction(other)
    path = tmp_path / "diff.fits"
    write_subtraction(result, path)
    with fits.open(path) as hdul:
        del hdul["TILES"]
        hdul.writeto(tmp_path / "cut.fits")
    with pytest.raises(ValueError, match="lacks the extension.* TILES"):
        read_subtraction(tmp_path / "cut.fits")
    with pytest.raises(OSError, match="already exists"):
        write_subtraction(result, path)


def test_candidates_ecsv_and_regions(subtraction, tmp_path):
    _, result = subtraction
    candidates = result.find_transients(4.0)
    assert len(candidates) >= 1
    candidates["good"][-1] = False
    candidates["flags"][-1] |= FLAGS["SHARP"][0] | FLAGS["EDGE"][0]
    write_candidates(candidates, tmp_path / "c.ecsv", inputs=["a.fits", "b.fits"],
                     parameters={"threshold": 4.0, "align": None})
    back = Table.read(tmp_path / "c.ecsv")
    assert back.colnames == candidates.colnames and _same(back["x"], candidates["x"])
    assert back.meta["FLAG_SHARP"] == f"{FLAGS['SHARP'][0]}: {FLAGS['SHARP'][1]}"
    assert back.meta["parameters"] == {"threshold": 4.0, "align": None}
    assert back.meta["inputs"] == ["a.fits", "b.fits"]
    write_regions(candidates, tmp_path / "c.reg")
    lines = (tmp_path / "c.reg").read_text().splitlines()
    circles = [line for line in lines if line.startswith("circle(")]
    assert len(circles) == len(candidates)
    x, y = candidates["x"][0] + 1, candidates["y"][0] + 1
    assert circles[0].startswith(f"circle({x:.2f},{y:.2f},")
    assert ("color=green" in circles[0]) == bool(candidates["good"][0])
    assert "color=red" in circles[-1] and "SHARP,EDGE" in circles[-1]
    with pytest.raises(OSError, match="already exists"):
        write_regions(candidates, tmp_path / "c.reg")


def test_coadd_file(tmp_path):
    stars = simulate_image((128, 128), n_stars=20, flux_range=(1e4, 1e5), seed=0).truth
    frames = [simulate_image((128, 128), psf=fwhm, stars=stars["x", "y", "flux"], seed=j).ccd
              for j, fwhm in enumerate((2.5, 3.5))]
    for frame in frames:
        frame.mask = np.zeros(frame.shape, bool)
        frame.mask[10:13, 20:23] = True  # masked in every frame: masked in the coadd
    result = coadd(frames, psfs=[2.5, 3.5])
    path = tmp_path / "coadd.fits"
    result.write(path, parameters={"reject": 6.0})
    image = CCDData.read(path)
    good = ~result.calibrated.mask
    assert result.calibrated.mask[10:13, 20:23].all() and _same(image.mask, ~good)
    assert np.isnan(image.data[~good]).all()  # masked pixels are NaN in the file
    assert _same(image.data[good], result.calibrated.data[good])
    assert image.unit == result.calibrated.unit
    error = image.uncertainty.array  # NaN where the coadd is NaN, exact elsewhere
    assert np.isnan(error[~good]).all()
    assert _same(error[good], result.calibrated.uncertainty.array[good])
    assert np.isfinite(result.calibrated.uncertainty.array).all()  # the result is untouched
    assert image.meta["AZIN1"] == "image 0" and image.meta["AZPAR1"] == "reject=6.0"
    assert image.meta["AZFR"] == result.flux_scale and image.meta["NCOMBINE"] == 2
    assert _same(coadd_psf(path), result.psf)
    assert _same(fits.getdata(path, "DEPTH"), result.depth)
    assert _same(fits.getdata(path, "REJECTED"), result.rejected)
    proper = CCDData.read(path, hdu="PROPER", hdu_uncertainty=None).data
    assert _same(proper[good], result.image.data[good]) and np.isnan(proper[~good]).all()
    assert list(Table.read(path, hdu="FRAMES")["flux_scale"]) == list(
        result.frames["flux_scale"])
    write_coadd(result, tmp_path / "named.fits", inputs=["a.fits", "b.fits"])
    assert fits.getheader(tmp_path / "named.fits")["AZIN2"] == "b.fits"


def test_psf_file_is_lossless(tmp_path):
    sim = simulate_image((256, 256), psf=3.0, n_stars=60, flux_range=(2e4, 2e5),
                         min_separation=15, seed=2)
    model = estimate_psf(sim.ccd, method="kl")
    model.x_0, model.y_0, model.flux = 101.25, 57.5, 1234.5
    model.fixed["flux"] = True
    model.bounds["x_0"] = (100.0, 103.0)
    path = tmp_path / "psf.fits"
    model.write(path)
    back = KLPSFModel.read(path)
    assert list(back.parameters) == list(model.parameters)
    assert back.fixed == model.fixed and back.bounds == model.bounds
    for name in ("basis", "fields", "eigenvalues", "selection", "scaling"):
        assert _same(getattr(back, name), getattr(model, name))
    assert (back.wing is None) == (model.wing is None)
    if model.wing is not None:
        assert _same(back.wing, model.wing)
    assert dict(back.meta) == dict(model.meta) and dict(back.quality) == dict(model.quality)
    assert (back.method, back.degree, back.image_shape) == (
        model.method, model.degree, model.image_shape)
    x, y = np.mgrid[50:54, 99:104]
    assert _same(back(x, y), model(x, y))


def test_bad_psf_files_are_named(tmp_path):
    text = tmp_path / "notes.fits"
    text.write_text("not a FITS file")
    with pytest.raises(ValueError, match="is not a FITS file"):
        KLPSFModel.read(text)
    with pytest.raises(FileNotFoundError, match="absent.fits"):
        KLPSFModel.read(tmp_path / "absent.fits")
    model = KLPSFModel(np.ones((1, 3, 3)) / 9, [[1.0]], image_shape=(20, 20), degree=0)
    model.write(tmp_path / "psf.fits")
    with fits.open(tmp_path / "psf.fits") as hdul:
        del hdul["FIELDS"]
        hdul.writeto(tmp_path / "cut.fits")
    with pytest.raises(ValueError, match="lacks FIELDS"):
        KLPSFModel.read(tmp_path / "cut.fits")
    image = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((8, 8))).writeto(image)
    with pytest.raises(ValueError, match="not an astro_zackay PSF file"):
        KLPSFModel.read(image)
