"""Held-out bad inputs of the star finder, background, alignment, flux matching, files,
saturation and coadd tree: each refused by name before any work, or handled right."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.nddata import CCDData

from astro_zackay._warnings import SaturationWarning
from astro_zackay.saturation import detect_saturation
from astro_zackay.stars import find_psf_stars


def _with_hot_pixel(ccd: CCDData, value: float = 1e30) -> CCDData:
    """A copy of ``ccd`` with one pixel of ``value`` between the stars."""
    data = ccd.data.copy()
    data[50, 50] = value
    return CCDData(data, unit=ccd.unit, uncertainty=ccd.uncertainty, meta=dict(ccd.meta))


def test_detect_saturation_masks_an_isolated_spike_only():
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 5.0, (64, 64))
    assert detect_saturation(image) is None
    image[20, 40] = 1e30
    assert detect_saturation(image) == 1e30
    # with clipped cores too, the cores' level (which masks the spike as well)
    image[30:33, 30:34] = 65535.0
    assert detect_saturation(image) == 65535.0


def test_detect_saturation_keeps_a_bright_star_and_a_cosmic_ray():
    rng = np.random.default_rng(4)
    image = rng.normal(100.0, 5.0, (64, 64))
    yy, xx = np.mgrid[:64, :64]
    image += 1e9 * np.exp(-((xx - 20) ** 2 + (yy - 20) ** 2) / (2 * 0.6**2))  # sharp star
    image[40, 40] = 1e5  # a cosmic ray of 2e4 sigma
    assert detect_saturation(image) is None


def test_find_psf_stars_with_a_1e30_pixel_finds_the_stars(small_pair):
    science = small_pair.science.ccd
    clean = find_psf_stars(science)
    with pytest.warns(SaturationWarning, match=r"1 pixels at or above 1e\+30"):
        hot = find_psf_stars(_with_hot_pixel(science))
    assert len(hot) >= len(clean) - 2
    assert np.isfinite(hot["flux"]).all()
    assert hot.meta["saturation"] == 1e30


@pytest.mark.filterwarnings("ignore::astro_zackay._warnings.FewStarsWarning")
def test_subtract_with_a_1e30_pixel_masks_it(small_pair):
    from astro_zackay import subtract

    with pytest.warns(SaturationWarning, match=r"1 pixels at or above 1e\+30"):
        result = subtract(small_pair.reference.ccd, _with_hot_pixel(small_pair.science.ccd))
    difference = result.difference
    assert difference.mask[50, 50]
    assert np.nanmax(np.abs(difference.data[~difference.mask])) < 1e6


@pytest.mark.parametrize("max_stars", [2.5, "3", 0, True])
def test_find_psf_stars_refuses_a_max_stars_not_whole(small_pair, max_stars):
    with pytest.raises(ValueError, match="max_stars must be a whole number >= 1"):
        find_psf_stars(small_pair.science.ccd, max_stars=max_stars)


@pytest.mark.parametrize("call", ["estimate_background", "subtract_background"])
def test_background_refuses_a_detect_sources_not_bool(small_pair, call):
    from astro_zackay import background

    with pytest.raises(TypeError, match="detect_sources must be True or False, got 'no'"):
        getattr(background, call)(small_pair.science.ccd, detect_sources="no")


@pytest.fixture(scope="module")
def pair_stars(small_pair):
    return [find_psf_stars(small_pair.reference.ccd), find_psf_stars(small_pair.science.ccd)]


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"images": "one"}, ValueError, "images must be the two images .* got 'one'"),
    ({"psfs": "gauss"}, ValueError, "psfs= is used only with images="),
])
def test_match_stars_refuses_bad_images_and_psfs(pair_stars, kwargs, error, match):
    from astro_zackay.fluxmatch import match_stars

    with pytest.raises(error, match=match):
        match_stars(*pair_stars, **kwargs)


def test_match_stars_refuses_one_image_and_psfs_not_stamps(small_pair, pair_stars):
    from astro_zackay.fluxmatch import match_stars

    ref = small_pair.reference.ccd
    with pytest.raises(ValueError, match=r"images must be the two images .* got 1 values"):
        match_stars(*pair_stars, images=(ref,))
    with pytest.raises(TypeError, match="psfs must be a .reference, image. pair"):
        match_stars(*pair_stars, images=(ref, small_pair.science.ccd), psfs="gauss")
    with pytest.raises(TypeError, match="psfs: the image's PSF must be a 2-D array"):
        match_stars(*pair_stars, images=(ref, small_pair.science.ccd), psfs=(None, 2.5))


def test_match_stars_takes_ccddata_images(small_pair, pair_stars):
    from astro_zackay.fluxmatch import match_stars

    images = (small_pair.reference.ccd, small_pair.science.ccd)
    matched = match_stars(*pair_stars, radius=2.0, min_matches=3, images=images)
    assert matched.n_matched >= 3
    assert np.isfinite(matched.flux_ratio) and matched.flux_ratio > 0


def test_align_refuses_a_shape_as_target_and_names_the_target(small_pair):
    from astro_zackay.alignment import align

    science = small_pair.science.ccd
    with pytest.raises(TypeError, match=r"target must be the image .* got the numbers \(96, 96\)"):
        align(science, (96, 96))
    with pytest.raises(ValueError, match="^target: a plain array has no unit"):
        align(science, np.ones((96, 96)))


@pytest.mark.parametrize(("writer", "result", "match"), [
    ("write_subtraction", "x", "write_subtraction: result must be a SubtractionResult .* got str"),
    ("write_coadd", "sub", "write_coadd: result must be a CoaddResult .* got SubtractionResult"),
    ("write_background", "ccd", "write_background: result must be a BackgroundResult .* "
                                "got CCDData"),
])
def test_writers_refuse_the_wrong_result_type(small_pair, tmp_path, writer, result, match):
    from astro_zackay import files
    from astro_zackay.subtraction import SubtractionResult

    values = {"x": "x", "ccd": small_pair.science.ccd,
              "sub": SubtractionResult.__new__(SubtractionResult)}
    with pytest.raises(TypeError, match=match):
        getattr(files, writer)(values[result], tmp_path / "out.fits")
    assert not (tmp_path / "out.fits").exists()


def _candidates():
    from astropy.table import Table

    return Table({"id": [1], "x": [10.0], "y": [20.0], "score": [7.5], "flags": [0],
                  "good": [True]})


@pytest.mark.parametrize(("table", "kwargs", "error", "match"), [
    ("no_xy", {}, ValueError, r"candidates lacks the columns \['x', 'y', 'score', 'flags', "
                              r"'good'\]"),
    ("good", {"radius": -1.0}, ValueError, "radius must be a positive finite circle radius"),
    ("good", {"radius": np.nan}, ValueError, "radius must be a positive finite circle radius"),
    ("good", {"radius": "4"}, ValueError, "radius must be a positive finite circle radius"),
    ("bad_fwhm", {}, ValueError, r"twice the table's meta\['fwhm'\] must be a positive"),
    ("array", {}, TypeError, "candidates must be an astropy Table"),
])
def test_write_regions_refuses_bad_tables_and_radii(tmp_path, table, kwargs, error, match):
    from astropy.table import Table

    from astro_zackay.files import write_regions

    good = _candidates()
    bad_fwhm = _candidates()
    bad_fwhm.meta["fwhm"] = -2.0
    tables = {"no_xy": Table({"a": [1]}), "good": good, "bad_fwhm": bad_fwhm,
              "array": np.ones((3, 2))}
    with pytest.raises(error, match=match):
        write_regions(tables[table], tmp_path / "c.reg", **kwargs)
    assert not (tmp_path / "c.reg").exists()


class _NoClient:
    """A Dask client stand-in that fails the test if any task is submitted."""

    def nthreads(self):
        return {"worker": 1}

    def submit(self, *args, **kwargs):
        raise AssertionError("a task was submitted before the frames were checked")


@pytest.mark.parametrize("bad", ["missing", "garbage", "folder"])
def test_coadd_tree_checks_the_frames_before_any_task(small_pair, tmp_path, bad):
    from astro_zackay.parallel import coadd_tree

    good = tmp_path / "ref.fits"
    small_pair.reference.ccd.write(good)
    paths = {"missing": tmp_path / "no_such_image.fits", "garbage": tmp_path / "garbage.fits",
             "folder": tmp_path / "folder"}
    (tmp_path / "garbage.fits").write_bytes(b"x" * 3000)
    (tmp_path / "folder").mkdir()
    frames = [str(good), str(paths[bad])]
    match = {"missing": "frame 1 .*no_such_image.fits' does not exist",
             "garbage": "garbage.fits' is not a readable FITS file",
             "folder": "folder' is a directory"}[bad]
    with pytest.raises(OSError, match=match):
        coadd_tree(frames, client=_NoClient())
