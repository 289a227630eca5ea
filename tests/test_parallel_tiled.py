"""subtract_tiled: the out-of-core tiled path on a real LocalCluster equals the in-memory one."""

import numpy as np
import pytest
from astropy.io import fits

from astro_zackay._zogy_field import zogy_field
from astro_zackay.profiles import psf_stamp
from astro_zackay.simulation import simulate_pair

distributed = pytest.importorskip("distributed")

from _dask_cluster import local_cluster  # noqa: E402

from astro_zackay.parallel._tiled import subtract_tiled  # noqa: E402

SHAPE = (512, 512)


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes on 127.0.0.1, closed after the module."""
    with local_cluster(2) as (_, c):
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A background-free pair (known noise) written as float32 FITS."""
    pair = simulate_pair(SHAPE, n_stars=150, flux_range=(2e3, 2e5), flux_ratio=0.8,
                         subtract_sky=True, seed=3, reference_sky=100.0, science_sky=100.0,
                         reference_psf=2.5, science_psf=3.0)
    d = tmp_path_factory.mktemp("tiled")
    paths = []
    for name, ccd in (("ref", pair.reference.ccd), ("sci", pair.science.ccd)):
        path = d / f"{name}.fits"
        fits.writeto(path, np.asarray(ccd.data, np.float32))
        paths.append(path)
    return paths


def _noise(path):
    data = fits.getdata(path).astype(float)
    from astropy.stats import mad_std
    return data, float(mad_std(data))


def test_tiled_equals_in_memory_core(client, files, tmp_path):
    ref, s_r = _noise(files[0])
    sci, s_n = _noise(files[1])
    pr, pn = psf_stamp(21, 2.5), psf_stamp(21, 3.0)
    out = tmp_path / "out.fits"
    table = subtract_tiled(files[0], files[1], out, client=client, tile=256, reference_psf=pr,
                           science_psf=pn, flux_ratio=0.8, fit_shift=False,
                           astrometric_noise=0.0, psf_error=None, background="none",
                           sigmas=(s_r, s_n), dtype=np.float64)
    assert len(table) == 4
    no = np.zeros(SHAPE, bool)
    res = zogy_field(sci, ref, lambda x, y: pn, lambda x, y: pr, varying=(False, False),
                     rms_new=np.full(SHAPE, s_n), rms_ref=np.full(SHAPE, s_r), var_new=None,
                     var_ref=None, mask_new=no, mask_ref=no, flux_ratio=0.8, tiles=256,
                     dtype=np.float64)
    with fits.open(out) as hdul:
        d, scorr = hdul["DIFF"].data.astype(float), hdul["SCORR"].data.astype(float)
        flux = hdul["FLUX"].data.astype(float)
    masked = np.isnan(d)
    np.testing.assert_array_equal(masked, res.mask)
    good = ~masked
    assert good.mean() > 0.9
    # float32 output: a few 1e-7 of the values' scale
    assert np.abs(scorr - res.Scorr)[good].max() < 1e-4
    assert np.abs(d - res.D)[good].max() < 1e-4
    assert np.abs(flux - res.alpha)[good].max() < 1e-4 * np.median(res.alpha_err)
    np.testing.assert_allclose(table["background_offset"],
                               [row[-1] for row in res.tiles], rtol=1e-6, atol=1e-9)


def test_everything_estimated_equals_subtract(client, tmp_path):
    """PSFs, flux ratio, shift and each tile's background estimated: Scorr as subtract's.

    At 1024^2 in 16 tiles of 256 px, each tile's window (its grid, the margin and 3
    background boxes on each side, on the boxes of the whole image) is smaller than the
    image; the plan's cutout is the whole image.
    """
    from astropy.nddata import CCDData

    from astro_zackay import subtract

    n = 1024
    pair = simulate_pair((n, n), n_stars=600, flux_range=(2e3, 2e5), flux_ratio=0.8, seed=4)
    paths = []
    for name, ccd in (("ref", pair.reference.ccd), ("sci", pair.science.ccd)):
        paths.append(tmp_path / f"{name}.fits")
        fits.writeto(paths[-1], np.asarray(ccd.data, np.float32))
    images = [CCDData(fits.getdata(p), unit="electron") for p in paths]
    expected = subtract(*images, tiles=256, noise="white")
    table = subtract_tiled(*paths, tmp_path / "out.fits", client=client, tile=256)
    assert len(table) == 16
    # the cutout is read in float64, subtract's images are float32
    assert table.meta["AZBETA"] == pytest.approx(expected.flux_ratio, rel=1e-6)
    assert (table.meta["AZDX"], table.meta["AZDY"]) == pytest.approx(expected.shift, abs=1e-5)
    with fits.open(tmp_path / "out.fits") as hdul:
        scorr = hdul["SCORR"].data.astype(float)
    np.testing.assert_array_equal(np.isnan(scorr), expected.score.mask)
    good = ~expected.score.mask
    # measured: 1.2e-4 sigma at 512^2 (4 tiles), 5.7e-4 at 1536^2 (9 tiles of 512)
    worst = np.abs(scorr - expected.score.data)[good].max()
    assert worst < 5e-3


def test_without_a_client_a_local_cluster_does_the_same(files, tmp_path):
    """client=None starts its own LocalCluster: the same output as on a given cluster."""
    _, s_r = _noise(files[0])
    _, s_n = _noise(files[1])
    kw = dict(tile=256, reference_psf=psf_stamp(21, 2.5), science_psf=psf_stamp(21, 3.0),
              flux_ratio=0.8, fit_shift=False, astrometric_noise=0.0, psf_error=None,
              background="none", sigmas=(s_r, s_n))
    subtract_tiled(files[0], files[1], tmp_path / "own.fits", client=None, **kw)
    with local_cluster(1, processes=False) as (_, given):
        subtract_tiled(files[0], files[1], tmp_path / "given.fits", client=given, **kw)
    with fits.open(tmp_path / "own.fits") as own, fits.open(tmp_path / "given.fits") as ref:
        np.testing.assert_array_equal(own["SCORR"].data, ref["SCORR"].data)


@pytest.fixture(scope="module")
def starry_pair(tmp_path_factory):
    """A 1024^2 pair of 600 stars (flux ratio 0.8) written as float32 FITS."""
    folder = tmp_path_factory.mktemp("starry")
    pair = simulate_pair((1024, 1024), n_stars=600, flux_range=(2e3, 2e5), flux_ratio=0.8,
                         seed=6)
    paths = []
    for name, ccd in (("ref", pair.reference.ccd), ("sci", pair.science.ccd)):
        paths.append(folder / f"{name}.fits")
        fits.writeto(paths[-1], np.asarray(ccd.data, np.float32))
    return paths


def test_plan_from_a_grid_of_cutouts(client, starry_pair, tmp_path):
    """Stars matched in 2 x 2 cutouts of 512 px: a flux ratio as good as the whole image's."""
    from astropy.nddata import CCDData

    from astro_zackay import subtract

    paths = starry_pair
    whole = subtract(*[CCDData(fits.getdata(p), unit="electron") for p in paths],
                     noise="white")
    kw = dict(client=client, tile=512, plan_size=512, reference_psf=psf_stamp(21, 2.5),
              science_psf=psf_stamp(21, 3.5))
    central = subtract_tiled(*paths, tmp_path / "c.fits", plan_grid=1, **kw).meta
    grid = subtract_tiled(*paths, tmp_path / "g.fits", plan_grid=2, **kw).meta
    # four times the stars of the central cutout: about half its error
    assert grid["AZBETAE"] < 0.75 * central["AZBETAE"]
    assert grid["AZBETAE"] == pytest.approx(whole.flux_ratio_error, rel=0.3)
    assert abs(grid["AZBETA"] - whole.flux_ratio) < 2 * whole.flux_ratio_error
    assert abs(grid["AZBETA"] - 0.8) < 3 * grid["AZBETAE"]


def test_compressed_and_table_hdus_are_refused(files, tmp_path):
    comp = tmp_path / "comp.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(fits.getdata(files[0]))]).writeto(comp)
    with pytest.raises(ValueError, match="tile-compressed"):
        subtract_tiled(comp, files[1], tmp_path / "o.fits", hdu=1, background="none",
                       sigmas=(1.0, 1.0))
    table = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column(name="a", format="E", array=np.zeros(3))])]).writeto(table)
    with pytest.raises(ValueError, match="not a 2-D image"):
        subtract_tiled(table, files[1], tmp_path / "o.fits", hdu=1, background="none",
                       sigmas=(1.0, 1.0))
    assert not (tmp_path / "o.fits").exists()


def test_bad_options_are_refused_before_work(files, tmp_path):
    with pytest.raises(ValueError, match="needs sigmas"):
        subtract_tiled(files[0], files[1], tmp_path / "o.fits", background="none")
    with pytest.raises(ValueError, match="background must be"):
        subtract_tiled(files[0], files[1], tmp_path / "o.fits", background="flat")
    with pytest.raises(ValueError, match="tiles must be"):
        subtract_tiled(files[0], files[1], tmp_path / "o.fits", tile=16)
    with pytest.raises(ValueError, match="plan_grid must be an integer >= 1"):
        subtract_tiled(files[0], files[1], tmp_path / "o.fits", plan_grid=0)
    with pytest.raises(TypeError, match="field_psf must be True or False, got 'yes'"):
        subtract_tiled(files[0], files[1], tmp_path / "o.fits", field_psf="yes")
    small = tmp_path / "small.fits"
    fits.writeto(small, np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        subtract_tiled(files[0], small, tmp_path / "o.fits")
    assert not (tmp_path / "o.fits").exists()


def test_estimated_psfs_come_from_the_whole_field(client, starry_pair, tmp_path):
    """With plan_grid > 1 the PSFs are estimated from the stars of cutouts covering the
    image, as one model over its coordinates: Scorr then follows `subtract`'s (PSFs
    from the whole image) far closer than with the central cutout's PSFs."""
    from astropy.nddata import CCDData

    from astro_zackay import subtract

    paths = starry_pair
    whole = subtract(*[CCDData(fits.getdata(p), unit="electron") for p in paths],
                     noise="white", tiles=512)
    expected = np.where(whole.score.mask, np.nan, np.asarray(whole.score.data, float))
    rms = {}
    for grid in (1, 2):
        out = tmp_path / f"g{grid}.fits"
        subtract_tiled(*paths, out, client=client, tile=512, plan_size=512, plan_grid=grid)
        with fits.open(out) as h:
            diff = h["SCORR"].data.astype(float) - expected
        rms[grid] = float(np.nanstd(diff))
    # measured: 0.014 sigma rms from the whole field, 0.043 from the central cutout
    # (the stars within a stamp of a cutout's inner edges are not found in any cutout)
    assert rms[2] < 0.025
    assert rms[2] < 0.5 * rms[1]


def test_mask_and_uncertainty_extensions_as_subtract_reads_them(client, tmp_path):
    """Files written by CCDData.write (MASK, UNCERT and GAIN/RDNOISE keywords): the tiles
    read them as `subtract` reads the same files.  Without the extensions: 0.51 sigma
    and 5724 pixels of mask apart; with them, measured 8.7e-5 sigma and the same mask."""
    from astropy.nddata import VarianceUncertainty

    from astro_zackay import subtract

    n = 512
    pair = simulate_pair((n, n), n_stars=150, flux_range=(2e3, 2e5), flux_ratio=0.8, seed=4)
    paths = []
    for name, ccd in (("ref", pair.reference.ccd), ("sci", pair.science.ccd)):
        ccd = ccd.copy()
        ccd.mask = np.zeros(ccd.shape, bool)
        ccd.mask[300, 200:210] = True
        if name == "sci":
            ccd.mask[100:104, 50:300] = True
        else:  # the reference's uncertainty as a variance: its class is honoured
            ccd.uncertainty = VarianceUncertainty(ccd.uncertainty.array ** 2)
        paths.append(tmp_path / f"{name}.fits")
        ccd.write(paths[-1])
    with fits.open(paths[0]) as hdul:
        assert hdul["UNCERT"].header["UTYPE"] == "VarianceUncertainty"
    expected = subtract(*paths, tiles=256, noise="white")
    table = subtract_tiled(*paths, tmp_path / "out.fits", client=client, tile=256)
    assert table.meta["AZBETA"] == pytest.approx(expected.flux_ratio, rel=1e-6)
    with fits.open(tmp_path / "out.fits") as hdul:
        scorr = hdul["SCORR"].data.astype(float)
    np.testing.assert_array_equal(np.isnan(scorr), expected.score.mask)
    assert np.isnan(scorr[100:104, 60:290]).all()
    good = ~expected.score.mask
    assert np.abs(scorr - expected.score.data)[good].max() < 5e-3


@pytest.fixture(scope="module")
def small_ccd(tmp_path_factory):
    """A 256^2 background-free pair written by CCDData.write, with a MASK extension (and
    for the science image an UNCERT one, zero at one pixel)."""
    from astropy.nddata import CCDData, StdDevUncertainty

    pair = simulate_pair((256, 256), n_stars=40, flux_range=(2e3, 2e5), flux_ratio=0.8,
                         subtract_sky=True, seed=8, reference_psf=2.5, science_psf=3.0)
    folder = tmp_path_factory.mktemp("small")
    paths = []
    for name, ccd in (("ref", pair.reference.ccd), ("sci", pair.science.ccd)):
        mask = np.zeros(ccd.shape, bool)
        mask[40:44, 20:120] = name == "sci"
        std = None
        if name == "sci":
            std = np.full(ccd.shape, 5.0)
            std[220, 220] = 0.0  # no pixel is noiseless: masked
        paths.append(folder / f"{name}.fits")
        CCDData(np.asarray(ccd.data, np.float32), unit="electron", mask=mask,
                uncertainty=None if std is None else StdDevUncertainty(std)).write(paths[-1])
    return paths


def _psf_model(fwhm, *, warn=False, fail_beyond=None):
    """A PSF model (``psf_at``) that warns away from the image centre (so only on the
    workers) or fails for the tile beyond ``fail_beyond`` px: defined here, so that
    Dask ships the class by value."""
    import warnings

    from astropy.utils.exceptions import AstropyUserWarning

    class Model:
        is_varying = True

        def psf_at(self, x, y):
            if fail_beyond is not None and min(x, y) > fail_beyond:
                raise ValueError(f"no PSF at ({x:.0f}, {y:.0f}) in this test")
            if warn and (x, y) != (127.5, 127.5):
                warnings.warn("a warning of a tile's task", AstropyUserWarning, stacklevel=1)
            return psf_stamp(21, fwhm)

    return Model()


def test_mask_honoured_and_tile_warnings_reach_the_caller(client, small_ccd, tmp_path):
    """background='none': the MASK extension's pixels, and the pixel of zero uncertainty,
    are NaN in the outputs; the warning
    that each of the 4 tiles' tasks issues reaches the caller once, at its line."""
    from astropy.utils.exceptions import AstropyUserWarning

    out = tmp_path / "out.fits"
    with pytest.warns(AstropyUserWarning, match="a warning of a tile's task") as caught:
        subtract_tiled(*small_ccd, out, client=client, tile=128,
                       reference_psf=_psf_model(2.5), science_psf=_psf_model(3.0, warn=True),
                       flux_ratio=0.8, fit_shift=False, astrometric_noise=0.0,
                       psf_error=None, background="none", sigmas=(5.0, 5.0))
    ours = [w for w in caught if "a warning of a tile's task" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].filename == __file__
    with fits.open(out) as hdul:
        scorr = hdul["SCORR"].data
    assert np.isnan(scorr[40:44, 20:120]).all()
    assert np.isnan(scorr[220, 220])
    assert np.isfinite(scorr[128:200, 128:200]).all()


def test_a_failed_run_leaves_no_partial_output(client, small_ccd, tmp_path):
    """One tile's task fails: its error is raised, the output that was there is intact
    and no temporary file is left."""
    out = tmp_path / "out.fits"
    out.write_bytes(b"the previous output")
    with pytest.raises(ValueError, match=r"no PSF at \(192, 192\) in this test"):
        subtract_tiled(*small_ccd, out, client=client, tile=128, overwrite=True,
                       reference_psf=_psf_model(2.5),
                       science_psf=_psf_model(3.0, fail_beyond=150), flux_ratio=0.8,
                       fit_shift=False, astrometric_noise=0.0, psf_error=None,
                       background="none", sigmas=(5.0, 5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fits"]
    assert out.read_bytes() == b"the previous output"


@pytest.mark.parametrize("options, error, match", [
    ({"dtype": np.int32}, ValueError, "dtype must be numpy.float32 or numpy.float64"),
    ({"psf_error": -1.0}, ValueError, "psf_error must be >= 0"),
    ({"gain": (1.0, 2.0, 3.0)}, ValueError, r"gain must be one value or a \(reference, "),
    ({"gain": -2.0}, ValueError, "gain must be a positive finite number"),
    ({"saturation": "high"}, ValueError, "saturation must be one positive finite number"),
    ({"unit": "notaunit"}, ValueError, "is not a unit astropy can parse"),
    ({"flux_ratio": -1.0}, ValueError, "flux_ratio must be a positive finite number"),
    ({"sigmas": (1.0, 1.0)}, ValueError, "used only with background='none'"),
    ({"reference_psf": np.ones((4, 4))}, ValueError, "reference_psf"),
    ({"hdu": 1.5}, TypeError, "hdu must be an HDU index or name"),
])
def test_options_refused_before_any_cluster_or_pixel(files, tmp_path, monkeypatch, options,
                                                      error, match):
    from astro_zackay.parallel import _tiled

    def forbidden(*args, **kwargs):
        raise AssertionError("a cluster was started or pixels read before the checks")

    monkeypatch.setattr(_tiled, "cluster_client", forbidden)
    monkeypatch.setattr(_tiled, "_read", forbidden)
    with pytest.raises(error, match=match):
        subtract_tiled(files[0], files[1], tmp_path / "o.fits", **options)
    with pytest.raises(FileNotFoundError, match="does not exist: create it first"):
        subtract_tiled(files[0], files[1], tmp_path / "no" / "o.fits")
    assert list(tmp_path.iterdir()) == []


def test_output_wcs_unreadable_is_left_out_with_a_warning():
    from astro_zackay._warnings import AstroZackayWarning
    from astro_zackay.parallel._tiled import _output_wcs

    good = fits.Header({"NAXIS": 2, "NAXIS1": 8, "NAXIS2": 8, "CTYPE1": "RA---TAN",
                        "CTYPE2": "DEC--TAN"})
    assert _output_wcs(good, "science image")["CTYPE2"] == "DEC--TAN"
    bad = good.copy()  # SIP distortion of one axis only
    bad.update({"CTYPE1": "RA---TAN-SIP", "CTYPE2": "DEC--TAN-SIP", "A_ORDER": 2})
    with pytest.warns(AstroZackayWarning, match="the WCS of the science image cannot be read"):
        assert len(_output_wcs(bad, "science image")) == 0


def test_a_tile_writes_its_bytes_and_no_others(tmp_path):
    """Each row of the cell is written at its place: every other byte is untouched."""
    from astro_zackay.parallel._tiled import _write_cell

    path = tmp_path / "f.bin"
    path.write_bytes(b"\xab" * (100 + 6 * 7 * 4))
    block = np.arange(6, dtype=np.float32).reshape(2, 3)
    _write_cell(str(path), {"SCORR": 100}, 7, (slice(2, 4), slice(3, 6)), {"SCORR": block})
    raw = path.read_bytes()
    image = np.frombuffer(raw[100:], ">f4").reshape(6, 7)
    np.testing.assert_array_equal(image[2:4, 3:6], block)
    untouched = np.ones((6, 7), bool)
    untouched[2:4, 3:6] = False
    assert raw[:100] == b"\xab" * 100
    assert all(image[untouched].view(np.uint8) == 0xAB)
