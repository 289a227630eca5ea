"""Outlier rejection across frames in `coadd`, and subtraction of two coadds.

Simulated fields of one sky seen through five frames of different seeing, sky and flux
scale: the truth is known, so every rejected pixel can be told apart as junk that one
frame holds (cosmic rays, a satellite trail) or as light that is really there.
"""

import numpy as np
import pytest
from astropy.table import Table
from conftest import data_path
from scipy import ndimage

from astro_zackay import coadd, subtract
from astro_zackay.simulation import simulate_image

#: The estimated PSFs of the brightest stars (3e5 e-) do not reach chi2/dof 1 and say
#: so; their errors are part of what the rejection must withstand.
pytestmark = pytest.mark.filterwarnings("ignore::astro_zackay.PSFQualityWarning")

N = 256
READ_NOISE = 5.0
#: Per frame of each group: FWHM (px), sky (e-) and flux scale.
SEEING = {"reference": (3.0, 3.6, 2.6, 4.2, 3.3), "science": (3.4, 2.8, 4.5, 3.1, 3.8)}
SKY = {"reference": (300.0, 200.0, 400.0, 250.0, 350.0),
       "science": (250.0, 380.0, 220.0, 300.0, 330.0)}
SCALE = {"reference": (1.0, 0.9, 1.15, 0.8, 1.05), "science": (1.0, 1.1, 0.85, 0.95, 1.2)}
#: The frame of the science group that holds the cosmic rays and the satellite trail.
JUNK_FRAME = 2
#: A real transient, in every science frame: (x, y, flux in e- of a frame of scale 1).
TRANSIENT = (180.0, 70.0, 4000.0)


def _stars(seed=5, n_stars=60):
    """One star field: random positions away from the edges, fluxes 1e3-3e5 e-."""
    rng = np.random.default_rng(seed)
    return Table({"x": rng.uniform(20, N - 20, n_stars), "y": rng.uniform(20, N - 20, n_stars),
                  "flux": 10 ** rng.uniform(3.0, 5.5, n_stars)})


def _trail(shape, x0, y0, angle, peak, width=1.3):
    """A satellite trail: a straight line with a Gaussian cross-section (sigma ``width``)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    distance = (xx - x0) * np.sin(angle) - (yy - y0) * np.cos(angle)
    return peak * np.exp(-0.5 * (distance / width) ** 2)


def _frames(group, *, transient_flux=None, junk=False, seed=0, saturation=None):
    """The five frames of a group (CCDData in electrons with uncertainty).

    ``transient_flux`` gives the transient's flux per frame (scale 1); ``junk`` puts 40
    cosmic rays and a trail of peak 6 sky sigma into frame `JUNK_FRAME`.
    """
    stars = _stars()
    frames = []
    for j, (fwhm, sky, scale) in enumerate(zip(SEEING[group], SKY[group], SCALE[group])):
        table = stars.copy()
        if transient_flux is not None and transient_flux[j] > 0:
            table.add_row((TRANSIENT[0], TRANSIENT[1], transient_flux[j]))
        table["flux"] *= scale
        hit = junk and j == JUNK_FRAME
        sim = simulate_image((N, N), psf=fwhm, stars=table, sky=sky, read_noise=READ_NOISE,
                             n_cosmic_rays=40 if hit else 0, seed=seed + 10 * j, wcs=False,
                             saturation=saturation)
        ccd = sim.ccd
        if hit:
            rng = np.random.default_rng(seed + 99)
            trail = _trail((N, N), 40.0, 0.0, 1.1, 6.0 * np.sqrt(sky + READ_NOISE**2))
            ccd = ccd.copy()
            ccd.data += rng.poisson(trail)
            frames.append((ccd, sim))
            continue
        frames.append((ccd, sim))
    return frames


def _near(candidates, mask, radius=3):
    """Candidates within ``radius`` px of a True pixel of ``mask``."""
    grown = ndimage.binary_dilation(mask, iterations=radius)
    x = np.clip(np.round(candidates["x"]).astype(int), 0, N - 1)
    y = np.clip(np.round(candidates["y"]).astype(int), 0, N - 1)
    return candidates[grown[y, x]]


@pytest.fixture(scope="module")
def junk_field():
    """Reference group clean, science group with a transient and junk in one frame."""
    flux = [TRANSIENT[2]] * 5
    reference = [ccd for ccd, _ in _frames("reference", seed=110)]
    science = _frames("science", transient_flux=flux, junk=True, seed=200)
    junk = _trail((N, N), 40.0, 0.0, 1.1, 1.0) > 0.05
    cosmic = science[JUNK_FRAME][1].cosmic_rays
    junk[cosmic["y"], cosmic["x"]] = True
    coadds = {}
    for reject in (6.0, None):
        ref = coadd(reference, reject=reject)
        sci = coadd([ccd for ccd, _ in science], reject=reject)
        coadds[reject] = (ref, sci, subtract(ref, sci))
    clean = [ccd for ccd, _ in _frames("science", transient_flux=flux, seed=200)]
    coadds["clean"] = (None, None, subtract(coadds[6.0][0], coadd(clean, reject=None)))
    return coadds, junk


def test_trail_and_cosmic_rays_leave_no_candidate(junk_field):
    """The coadd difference: junk candidates without rejection, none with it.

    The transient (in every science frame) is found either way; with rejection as
    strongly as in the difference with a science stack without the junk.
    """
    coadds, junk = junk_field
    found = {}
    for key, (_, _, diff) in coadds.items():
        candidates = diff.find_transients(5.0)
        found[key] = (len(_near(candidates, junk)), candidates)
    assert found[None][0] >= 20  # without rejection the junk is there to be found (39)
    assert found[6.0][0] == 0
    assert len(found[6.0][1]) == 1  # the transient alone
    score = {}
    for key, (_, candidates) in found.items():
        distance = np.hypot(candidates["x"] - TRANSIENT[0], candidates["y"] - TRANSIENT[1])
        assert distance.min() < 1.5, key
        score[key] = candidates["score"][np.argmin(distance)]
    assert score[6.0] == pytest.approx(score["clean"], rel=0.02)


def test_rejected_pixels_are_the_junk(junk_field):
    """Only the junk frame loses pixels, nearly all on the junk; the rest keep theirs."""
    coadds, junk = junk_field
    ref, sci, _ = coadds[6.0]
    assert ref.frames["n_rejected"].tolist() == [0] * 5
    counts = sci.frames["n_rejected"].tolist()
    assert counts[JUNK_FRAME] > 300
    assert sum(counts) - counts[JUNK_FRAME] == 0
    rejected = sci.rejected > 0
    on_junk = ndimage.binary_dilation(junk, iterations=3)
    assert (rejected & ~on_junk).sum() <= 0.02 * rejected.sum()
    assert rejected.sum() == counts[JUNK_FRAME]
    assert (sci.n_used == 5).all()  # replaced by the prediction, not masked
    assert coadds[None][1].rejected.sum() == 0
    assert coadds[None][1].frames["n_rejected"].tolist() == [0] * 5


@pytest.mark.parametrize("saturation", [None, 2.5e4])
def test_snr_of_real_sources_kept_on_a_clean_stack(saturation):
    """A clean stack of bright stars and different seeing: no star core is rejected.

    The S/N of the stars (score / sqrt(G) at their positions) stays within 2 % of the
    coadd without rejection (PSFs estimated: their errors must not read as outliers;
    with saturation, the brightest cores are masked in the sharpest frames only).
    """
    frames = [ccd for ccd, _ in _frames("science", seed=300, saturation=saturation)]
    if saturation is not None:
        assert sum(int(ccd.mask.sum()) for ccd in frames) > 0
    stars = _stars()
    with_rejection = coadd(frames)
    without = coadd(frames, reject=None)
    x, y = np.round(stars["x"]).astype(int), np.round(stars["y"]).astype(int)
    snr = [result.snr.data[y, x] for result in (with_rejection, without)]
    measurable = snr[1] > 10
    assert measurable.sum() > 30
    ratio = snr[0][measurable] / snr[1][measurable]
    assert np.abs(ratio - 1.0).max() < 0.02
    yy, xx = np.mgrid[:N, :N]
    cores = np.min([np.hypot(xx - x0, yy - y0) for x0, y0 in zip(stars["x"], stars["y"])],
                   axis=0) < 8
    assert with_rejection.rejected[cores].sum() == 0
    assert with_rejection.rejected.sum() <= 18  # at most two 3x3 spots elsewhere


def test_transient_in_several_frames_and_variable_star_are_kept():
    """A transient that appears in the last three frames, and one that varies by 2x.

    Each is in several frames, so no pixel is rejected (the coadd is the one without
    rejection), and each is found in the difference with the clean reference.
    """
    reference = [ccd for ccd, _ in _frames("reference", seed=400)]
    flux = np.array([0.0, 0.0, 1.0, 1.0, 1.0]) * 6000.0
    rising = [ccd for ccd, _ in _frames("science", transient_flux=flux, seed=500)]
    varying = [ccd for ccd, _ in _frames("science", seed=500,
                                         transient_flux=[3000, 6000, 4000, 3000, 6000])]
    ref = coadd(reference)
    assert ref.rejected.sum() == 0
    for science in (rising, varying):
        sci = coadd(science)
        assert sci.rejected.sum() == 0
        candidates = subtract(ref, sci).find_transients(5.0)
        distance = np.hypot(candidates["x"] - TRANSIENT[0], candidates["y"] - TRANSIENT[1])
        assert distance.min() < 1.5
        assert candidates["score"][np.argmin(distance)] > 20


def test_inputs_not_mutated_and_options_checked():
    frames = [ccd for ccd, _ in _frames("science", junk=True, seed=600)]
    before = [ccd.data.copy() for ccd in frames]
    psfs = list(SEEING["science"])
    result = coadd(frames, psfs=psfs)
    assert result.frames["n_rejected"][JUNK_FRAME] > 0
    for ccd, data in zip(frames, before):
        np.testing.assert_array_equal(ccd.data, data)
    for bad in ({"reject": -1.0}, {"reject": True}, {"reject_grow": -1},
                {"reject_grow": 1.5}, {"reject_model_error": -0.1}):
        with pytest.raises(ValueError, match="reject"):
            coadd(frames, psfs=psfs, **bad)


def _decam(name):
    return data_path("decam-sfft", "input_data", f"DEC-OBS{name}.mini.fits")


#: The source that changed between the DECam epochs (tests/test_real_data.py).
DECAM_CHANGE = (129.0, 128.0)


def test_decam_coadd_difference_keeps_only_the_change():
    """Real DECam stamps, 5 + 5 frames: the coadd difference without rejection holds
    the tracks and cosmic rays of single frames (a satellite-like track in 04e, another
    in 04c, hits in 04d, 18c-e); with it, only the change between the epochs remains,
    as strong as before, and the stars keep their S/N."""
    found = {}
    for reject in (6.0, None):
        groups = [coadd([_decam(f"{group}{letter}") for letter in "abcde"], unit="adu",
                        reject=reject) for group in ("18", "04")]
        candidates = subtract(*groups).find_transients(5.0)
        distance = np.hypot(candidates["x"] - DECAM_CHANGE[0], candidates["y"] - DECAM_CHANGE[1])
        assert distance.min() < 2.0
        found[reject] = (len(candidates), candidates["score"][np.argmin(distance)], groups)
    assert found[None][0] >= 10
    assert found[6.0][0] == 1
    assert found[6.0][1] == pytest.approx(found[None][1], rel=0.02)
    for with_rejection, without in zip(found[6.0][2], found[None][2]):
        assert with_rejection.frames["n_rejected"][4] > 100  # 18e and the 04e track
        junk = ndimage.binary_dilation(with_rejection.rejected > 0, iterations=6)
        bright = (without.snr.data > 50) & ~junk
        assert bright.sum() > 300
        np.testing.assert_allclose(with_rejection.snr.data[bright], without.snr.data[bright],
                                   rtol=0.02)
