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
