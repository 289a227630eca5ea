"""Saturation found in the data (astro_zackay.saturation) and masked by to_image."""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from conftest import data_path
from scipy.spatial import cKDTree

from astro_zackay._ccd import as_ccddata, to_image
from astro_zackay._warnings import AstroZackayWarning, SaturationWarning
from astro_zackay.saturation import detect_saturation
from astro_zackay.simulation import PSFField, simulate_image
from astro_zackay.stars import find_psf_stars

FULL_WELL = 6e4  # e-, the sky (200 e-) included


def _saturated_field(seed=11, profile="gaussian"):
    """A 512^2 field whose brightest stars saturate, as a raw frame: no SATURATE keyword
    and no mask (the simulation masks its clipped pixels)."""
    sim = simulate_image((512, 512), psf=PSFField(3.0, profile=profile), n_stars=150,
                         flux_range=(2e3, 3e6), flux_distribution="loguniform",
                         saturation=FULL_WELL, n_cosmic_rays=20, seed=seed)
    ccd = sim.ccd.copy()
    del ccd.meta["SATURATE"]
    ccd.mask = None
    return sim, ccd


def test_pile_up_detected_masked_and_warned_once():
    sim, ccd = _saturated_field()
    clipped = np.asarray(ccd.data) >= FULL_WELL  # the simulation clips at the full well
    assert sim.truth["saturated"].sum() >= 5 and clipped.sum() >= 20
    with pytest.warns(SaturationWarning, match=rf"{clipped.sum()} pixels at or above 60000") as rec:
        img = to_image(ccd)
    assert len(rec) == 1 and rec[0].filename == __file__  # points at the caller's line
    assert img.saturation == FULL_WELL
    assert np.array_equal(img.mask & clipped, clipped)
    # coerced a second time (as every step does with as_ccddata): no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = to_image(as_ccddata(img))
        assert np.array_equal(again.mask, img.mask)
        # disabled: nothing masked, no warning
        off = to_image(ccd, saturation=np.inf)
    assert off.saturation is None and not off.mask.any()
    assert issubclass(SaturationWarning, AstroZackayWarning)


@pytest.mark.parametrize("profile", ["gaussian", "moffat"])
def test_saturated_stars_never_selected_without_keyword(profile):
    sim, ccd = _saturated_field(seed=12, profile=profile)
    with pytest.warns(SaturationWarning):
        stars = find_psf_stars(ccd)
    assert stars.meta["saturation"] == FULL_WELL
    assert stars.meta["n_rejected_saturated"] >= sim.truth["saturated"].sum() - 2
    truth = sim.truth
    dist, idx = cKDTree(np.column_stack([truth["x"], truth["y"]])).query(
        np.column_stack([stars["x"], stars["y"]]))
    assert np.all(dist < 0.5) and not truth["saturated"][idx].any()


def test_flat_topped_cores_without_a_pile_up():
    """Saturated cores that vary by ~1 % (a flat field applied after clipping): no two
    pixels share the highest value, yet the flat tops are found."""
    _, ccd = _saturated_field(seed=13)
    rng = np.random.default_rng(0)
    data = np.asarray(ccd.data) * rng.normal(1.0, 0.003, ccd.shape)
    clipped = np.asarray(ccd.data) >= FULL_WELL
    assert np.count_nonzero(data == data.max()) == 1
    level = detect_saturation(data)
    assert level is not None and 0.98 * FULL_WELL < level <= data[clipped].min() + 1e-9
    assert np.count_nonzero(data >= level) >= 0.9 * clipped.sum()


@pytest.mark.parametrize("profile", ["gaussian", "moffat"])
def test_no_false_detection_on_unsaturated_fields(profile):
    """Stars up to 1e7 e- (peaks ~1e6 e-), cosmic rays and hot pixels, no saturation."""
    for seed in range(3):
        sim = simulate_image((256, 256), psf=PSFField(2.5 + seed, profile=profile),
                             n_stars=60, flux_range=(1e3, 1e7), flux_distribution="loguniform",
                             n_cosmic_rays=15, n_bad_pixels=20, seed=seed)
        assert detect_saturation(np.asarray(sim.ccd.data)) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error", SaturationWarning)
            assert to_image(sim.ccd).saturation is None


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        detect_saturation(np.zeros(10))
    with pytest.raises(ValueError, match="mask shape"):
        detect_saturation(np.zeros((4, 4)), np.zeros((3, 3), bool))
    assert detect_saturation(np.full((8, 8), 5.0)) is None  # flat: nothing stands out


def test_real_properimage_image_pile_up_at_65535():
    """properimage's sample frame: 67 pixels at exactly 65535 ADU, no SATURATE keyword."""
    path = data_path("properimage", "aligned_eso085-030-004.fit")
    data = fits.getdata(path).astype(float)
    assert detect_saturation(data) == 65535.0
    with pytest.warns(SaturationWarning, match="67 pixels at or above 65535 adu"):
        stars = find_psf_stars(CCDData(data, unit="adu"))
    assert stars.meta["saturation"] == 65535.0
    # the stars with clipped cores: none is selected
    yy, xx = np.nonzero(data >= 65535.0)
    dist, _ = cKDTree(np.column_stack([xx, yy])).query(
        np.column_stack([stars["x"], stars["y"]]))
    assert np.all(dist > 3 * stars.meta["fwhm"])
    assert stars.meta["n_rejected_saturated"] >= 3


@pytest.mark.parametrize(
    "parts",
    [
        ("decam-sfft", "input_data", "DEC-OBS04a.mini.fits"),
        ("decam-sfft", "input_data", "DEC-OBS18a.mini.fits"),
        ("decam-sfft", "4check", "Stack-DEC-OBS04.fits"),
        ("nircam-a2744", "input_data",
         "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp.fits"),
        ("nircam-a2744", "input_data",
         "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp.fits"),
    ],
)
def test_no_false_detection_on_real_unsaturated_images(parts):
    """The DECam stamps peak at 9-22 kADU against SATURATE 46 kADU, and the JWST stamps'
    brightest pixels are single (no plateau): nothing is saturated in frame."""
    path = data_path(*parts)
    with fits.open(path) as hdul:
        hdu = next(h for h in hdul if h.data is not None and h.data.ndim == 2)
        data = hdu.data.astype(float)
        keyword = hdu.header.get("SATURATE")
    good = np.isfinite(data)
    if keyword is not None:
        assert data[good].max() < 0.5 * keyword  # verified unsaturated
    assert np.count_nonzero(data[good] >= 0.98 * data[good].max()) <= 2
    assert detect_saturation(data) is None


def test_symmetric_peaks_and_noiseless_images_are_not_saturation():
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 5.0, (64, 64))
    yy, xx = np.mgrid[:64, :64]
    # a bright star centred on a pixel corner: its 4 central pixels are equal
    star = 1e5 * np.exp(-0.5 * ((xx - 31.5) ** 2 + (yy - 31.5) ** 2) / 1.5**2)
    image[30:34, 30:34] = 100.0 + star[30:34, 30:34]
    image[31:33, 31:33] = image[31, 31]
    assert detect_saturation(image) is None
    # a noiseless model, even with a clipped star, is not a detector image
    model = 100.0 + np.minimum(star, 5e4)
    assert detect_saturation(model) is None


def test_flat_top_clumps_as_the_dense_labelling():
    """The flat tops are found among the few pixels near the top only; on fields of small
    clipped cores at the borders and beside masked pixels, they are those that a
    labelling of the whole image (scipy.ndimage) finds: the same level or None.
    """
    from scipy import ndimage

    from astro_zackay.saturation import _FLAT_CLUMP, _FLAT_ONE

    def dense(data, bad):
        good = ~bad
        top = data[good].max()
        near = good & (data >= 100.0 + 0.98 * (top - 100.0))
        near &= ~ndimage.binary_dilation(bad, structure=np.ones((3, 3), bool))
        labels, _ = ndimage.label(near, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel())[1:]
        clumps = np.flatnonzero(sizes >= _FLAT_CLUMP) + 1
        if not (clumps.size >= 2 or (clumps.size == 1 and sizes[clumps[0] - 1] >= _FLAT_ONE)):
            return None
        return float(data[np.isin(labels, clumps)].min())

    rng = np.random.default_rng(5)
    levels = []
    for _ in range(80):
        data = rng.normal(100.0, 5.0, (96, 96))
        bad = np.zeros(data.shape, bool)
        for _ in range(rng.integers(1, 5)):  # ragged cores (diagonal links), some on a border
            y, x = rng.integers(-2, 94, 2)
            core = (slice(max(y, 0), max(y + 5, 0)), slice(max(x, 0), max(x + 5, 0)))
            hot = rng.random(data[core].shape) < 0.5
            data[core][hot] = 6e4 * (1.0 - 0.015 * rng.random(hot.sum()))
            bad[core] |= rng.random(hot.shape) < 0.04  # a few masked pixels beside them
        expected = dense(data, bad)
        assert detect_saturation(data, bad) == expected
        levels.append(expected)
    assert 10 < sum(level is not None for level in levels) < 70  # both outcomes tested
    # two pairs at opposite borders of adjacent rows are no clump of 4: with one true
    # clump of 3, no saturation
    data = rng.normal(100.0, 5.0, (96, 96))
    for row, col in ((10, 94), (10, 95), (11, 0), (11, 1), (50, 50), (50, 51), (51, 52)):
        data[row, col] = 6e4
    data[50, 50] = 6.01e4  # not a pile-up at the highest value
    bad = np.zeros(data.shape, bool)
    assert dense(data, bad) is None and detect_saturation(data) is None


# clumps of absurd values (1e30 from a broken pipeline): two adjacent pixels, a 2x2 block
SPIKE_CLUMPS = {"pair": (50, slice(50, 52)), "2x2 block": (slice(50, 52), slice(50, 52))}


@pytest.mark.parametrize("where", SPIKE_CLUMPS.values(), ids=SPIKE_CLUMPS.keys())
def test_small_clumps_of_absurd_pixels_are_spikes(where):
    """A clump of up to 4 pixels of 1e30 is masked like a single one: on a field of
    unsaturated stars the level is the clump's value, and it leaves the level of clipped
    cores (pile-up or flat tops) as it was without it."""
    sim = simulate_image((128, 128), psf=PSFField(2.5), n_stars=30, flux_range=(1e3, 1e6),
                         flux_distribution="loguniform", n_cosmic_rays=5, seed=21)
    data = np.asarray(sim.ccd.data, dtype=float).copy()
    assert detect_saturation(data) is None
    data[where] = 1e30
    assert detect_saturation(data) == 1e30  # as for one spike: the clump is at the level
    # with a pile-up of clipped cores: their level, which masks the clump as well
    _, ccd = _saturated_field()
    clipped = np.asarray(ccd.data, dtype=float)
    assert detect_saturation(clipped) == FULL_WELL
    clipped[where] = 1e30
    assert detect_saturation(clipped) == FULL_WELL
    # flat tops (no two clipped pixels equal): the same level as without the clump
    flat = clipped * np.random.default_rng(0).normal(1.0, 0.003, clipped.shape)
    flat[where] = np.nan
    level = detect_saturation(flat)
    assert level is not None and 0.98 * FULL_WELL < level < FULL_WELL
    flat[where] = 1e30
    assert detect_saturation(flat) == level


def test_spike_clumps_stop_at_four_pixels_and_spare_stars():
    """A clump of 5 pixels is no spike (it stays a pile-up at its value), nor is a small
    saturated core, however high, whose rim is at tens of per cent of its level."""
    from astro_zackay.saturation import _spikes

    rng = np.random.default_rng(7)
    image = rng.normal(100.0, 5.0, (64, 64))
    image[30:33, 30:34] = 65535.0  # clipped cores
    four = image.copy()
    four[10, 10:14] = 1e30
    assert _spikes(four, np.ones(four.shape, bool), 100.0, 5.0).sum() == 4
    assert detect_saturation(four) == 65535.0
    five = image.copy()
    five[10, 10:15] = 1e30
    assert not _spikes(five, np.ones(five.shape, bool), 100.0, 5.0).any()
    assert detect_saturation(five) == 1e30  # a pile-up of 5 at the highest value
    # a 2x2 core clipped at 1e12 (2e11 sigma) with its rim at 30 %: a star, not a spike
    core = rng.normal(100.0, 5.0, (64, 64))
    core[19:23, 39:43] = 3e11
    core[20:22, 40:42] = 1e12
    assert not _spikes(core, np.ones(core.shape, bool), 100.0, 5.0).any()
    # the ring decides: a pair at 1e9 (2e8 sigma) is a spike on the sky, but not beside
    # a pixel of 4e7 (below the 1e7 sigma of the candidates, yet within 100x of the pair)
    pair = rng.normal(100.0, 5.0, (64, 64))
    pair[40, 40:42] = 1e9
    assert detect_saturation(pair) == 1e9
    pair[41, 42] = 4e7
    assert detect_saturation(pair) is None
    bad = np.zeros(pair.shape, bool)
    bad[41, 42] = True  # masked, the ring pixel no longer counts
    assert detect_saturation(pair, bad) == 1e9
    # an absurd pixel beside the pair joins its clump (of 3): the lowest is the level
    pair[41, 42] = 1e8
    assert detect_saturation(pair) == 1e8


@pytest.mark.filterwarnings("ignore::astro_zackay._warnings.FewStarsWarning")
@pytest.mark.filterwarnings("ignore::astro_zackay._warnings.AstroZackayWarning")
@pytest.mark.parametrize("where", SPIKE_CLUMPS.values(), ids=SPIKE_CLUMPS.keys())
def test_subtract_with_a_clump_of_1e30_pixels_masks_it(small_pair, where):
    """Two adjacent 1e30 pixels (or a 2x2 block) in the science image are masked as
    saturated, and the score off the mask is finite with the robust std of the clean
    subtraction's (before, no source was detected in the image)."""
    from astropy.stats import mad_std

    from astro_zackay import subtract

    science = small_pair.science.ccd
    data = science.data.copy()
    data[where] = 1e30
    n_clump = np.count_nonzero(data == 1e30)
    hot = CCDData(data, unit=science.unit, uncertainty=science.uncertainty,
                  meta=dict(science.meta))
    with pytest.warns(SaturationWarning, match=rf"{n_clump} pixels at or above 1e\+30"):
        result = subtract(small_pair.reference.ccd, hot)
    clean = subtract(small_pair.reference.ccd, science).score
    score = result.score
    off = ~score.mask
    assert score.mask[where].all() and result.difference.mask[where].all()
    assert np.isfinite(score.data[off]).all()
    robust = mad_std(score.data[off])
    assert 0.7 < robust < 1.5
    assert abs(robust / mad_std(clean.data[~clean.mask]) - 1) < 0.1
    assert np.abs(score.data[off]).max() < 50
