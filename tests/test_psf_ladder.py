"""The PSF degradation ladder: every star count gives a PSF (or a clear error), announced."""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.table import Table
from conftest import data_path

from astro_zackay import FewStarsWarning, find_psf_stars
from astro_zackay.profiles import psf_stamp
from astro_zackay.psf import builders, estimate_psf
from astro_zackay.psf import estimate as psf_estimate
from astro_zackay.psf.analytic import BETA_EDGE, ProfileFitError, fit_profile, render_profile
from astro_zackay.psf.builders import TrainingSet, build_analytic
from astro_zackay.psf.ladder import plan_model, spread_ok
from astro_zackay.psf.stamps import stamp_moments
from astro_zackay.simulation import PSFField, simulate_image

FWHM = 3.0


@pytest.fixture(scope="module")
def field():
    """A 256^2 field of 60 bright, well separated stars (Gaussian FWHM 3 px, e = 0.1)."""
    psf = PSFField(fwhm=FWHM, ellipticity=0.1, theta=0.3)
    return simulate_image((256, 256), psf=psf, n_stars=60, flux_range=(5e4, 5e5), seed=4,
                          min_separation=18)


def _peak_error(model, sim):
    """Largest difference between the model and the true PSF, relative to the peak."""
    ny, nx = model.image_shape
    psf = model.psf_at(nx / 2, ny / 2)
    truth = sim.psf.stamp(nx / 2, ny / 2, psf.shape)
    return np.abs(psf - truth).max() / truth.max()


def _bright(sim, n):
    return sim.truth[np.argsort(-np.asarray(sim.truth["flux"]))[:n]]


def test_three_stars_give_a_fitted_moffat(field):
    with pytest.warns(FewStarsWarning, match=r"3 usable PSF stars .* Moffat profile"):
        model = estimate_psf(field.ccd, _bright(field, 3))
    assert model.method == "moffat" and model.meta["method_used"] == "moffat"
    assert model.meta["n_stars"] == 3 and "quality unmeasured" in model.meta["reason"]
    assert model.quality["measured"] is False and np.isnan(model.quality["chi2_dof"])
    assert "quality unmeasured" in model.quality_report()
    # a Moffat fitted to a Gaussian: the FWHM (along the major axis) to 5 %, e to 0.03
    assert model.meta["fwhm"] == pytest.approx(FWHM, rel=0.05)
    assert model.meta["ellipticity"] == pytest.approx(0.1, abs=0.03)
    assert _peak_error(model, field) < 0.05


def test_eight_stars_give_a_constant_psf(field):
    with pytest.warns(FewStarsWarning, match="a constant PSF .* instead of a KL PSF of degree"):
        model = estimate_psf(field.ccd, _bright(field, 8))
    assert model.method == "constant" and model.n_components == 1 and not model.is_varying
    assert model.quality["n_train"] == 8 and model.quality["n_holdout"] == 0
    assert _peak_error(model, field) < 0.02


def test_enough_stars_hold_out_and_measure(field):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewStarsWarning)  # nothing to step down from
        model = estimate_psf(field.ccd, field.truth)
    assert model.method == "kl" and model.meta["reason"] == ""
    assert model.quality["measured"] is True and model.quality["n_holdout"] == 15
    assert model.quality["chi2_dof"] < 1.1
    assert model.degree <= 3
    assert _peak_error(model, field) < 0.02


def test_explicit_choices_work_with_few_stars(field):
    stars = _bright(field, 6)
    with pytest.warns(FewStarsWarning, match="quality unmeasured"):
        model = estimate_psf(field.ccd, stars, method="constant")
    assert model.method == "constant"
    with pytest.warns(FewStarsWarning, match="quality unmeasured"):
        model = estimate_psf(field.ccd, stars, method="moffat")
    assert model.method == "moffat"
    with pytest.warns(FewStarsWarning, match="Moffat profile"):
        model = estimate_psf(field.ccd, stars[:2], method="constant")
    assert model.method == "moffat"
    with pytest.warns(FewStarsWarning, match=r"6 given, 0 without .*: no stars held out"):
        model = estimate_psf(field.ccd, stars, degree=0, n_components=2)
    assert (model.method, model.degree, model.n_components) == ("kl", 0, 2)
    with pytest.warns(FewStarsWarning, match="K=6 instead of n_components=8"):
        model = estimate_psf(field.ccd, stars, degree=0, n_components=8)
    assert model.n_components == 6 and "K=6" in model.meta["reason"]
    with pytest.warns(FewStarsWarning, match=r"degree 2 instead of 3 \(degree 3 needs 23"):
        model = estimate_psf(field.ccd, field.truth[:20], degree=3, holdout_fraction=0)
    assert model.degree == 2
    # no hold-out asked: no warning, K from the eigen-spectrum, quality unmeasured
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewStarsWarning)
        model = estimate_psf(field.ccd, field.truth, holdout_fraction=0)
    assert model.method == "kl" and model.quality["measured"] is False
    assert _peak_error(model, field) < 0.02


def test_degree_lowered_when_stars_cover_one_corner():
    sim = simulate_image((256, 256), psf=FWHM, n_stars=120, flux_range=(5e4, 5e5), seed=5,
                         min_separation=12)
    corner = sim.truth[(sim.truth["x"] < 110) & (sim.truth["y"] < 110)]
    assert len(corner) >= 20
    with pytest.warns(FewStarsWarning, match="do not cover the field"):
        model = estimate_psf(sim.ccd, corner, degree=2, holdout_fraction=0)
    assert model.degree < 2


def test_spread_measure():
    rng = np.random.default_rng(0)
    u, v = rng.uniform(-1, 1, 40), rng.uniform(-1, 1, 40)
    assert spread_ok(u, v, 2) and spread_ok(u, v, 3)
    assert not spread_ok(0.1 * u + 0.5, 0.1 * v + 0.5, 1)  # a clump
    assert not spread_ok(u, 0.3 * u, 1)  # a line


def test_no_star_needs_a_fwhm(field):
    blank = CCDData(np.random.default_rng(1).normal(0.0, 5.0, (128, 128)), unit="adu")
    empty = Table({"x": np.zeros(0), "y": np.zeros(0)})
    with pytest.raises(ValueError, match=r"reference_psf= / science_psf=.*fwhm="):
        estimate_psf(blank, empty)
    with pytest.warns(FewStarsWarning, match="Gaussian of the given FWHM"):
        model = estimate_psf(blank, empty, fwhm=3.2)
    assert model.method == "gaussian" and model.meta["fwhm"] == 3.2
    size, e1, _ = stamp_moments(model.psf_at(64, 64))
    assert np.sqrt(size / 2) * 2.3548 == pytest.approx(3.2, rel=0.03) and abs(e1) < 1e-9
    with pytest.raises(ValueError, match="fwhm must be a positive"):
        estimate_psf(field.ccd, empty, fwhm=-1.0)


def test_plan_without_stars_raises():
    with pytest.raises(ValueError, match="no usable PSF star"):
        plan_model(np.zeros(0), np.zeros(0), method="kl", degree=None, holdout_fraction=0.25,
                   have_fwhm=False)


def test_stamp_shrinks_before_edge_stars_are_lost():
    """Stars 8-9 px from the edges: a +-3 FWHM (10 px) stamp loses them, +-2 FWHM keeps them."""
    n = 12
    x = np.concatenate([np.full(n // 2, 8.4), np.linspace(40.3, 215.6, n // 2)])
    y = np.concatenate([np.linspace(30, 220, n // 2), np.full(n // 2, 247.2)])
    stars = Table({"x": x, "y": y, "flux": np.full(n, 2e5)})
    sim = simulate_image((256, 256), psf=FWHM, stars=stars, seed=8)
    with pytest.warns(FewStarsWarning, match=rf"{n} usable PSF stars \({n} given, 0 without"):
        model = estimate_psf(sim.ccd, sim.truth[["x", "y"]])
    assert model.core_shape[0] < 2 * int(np.ceil(3 * FWHM)) + 1
    assert model.meta["n_stars"] == n
    assert _peak_error(model, sim) < 0.02


def test_user_stamp_shape_is_kept_and_edge_stars_dropped():
    stars = Table({"x": [8.4, 60.0, 120.0, 180.0, 60.0, 120.0, 180.0],
                   "y": [128.0, 60.0, 60.0, 60.0, 190.0, 190.0, 190.0],
                   "flux": np.full(7, 2e5)})
    sim = simulate_image((256, 256), psf=FWHM, stars=stars, seed=9)
    with pytest.warns(FewStarsWarning, match=r"6 usable PSF stars \(7 given, 1 without a clean "
                                             r"21x21 stamp\)"):
        model = estimate_psf(sim.ccd, sim.truth[["x", "y"]], stamp_shape=21)
    assert model.stamp_shape == (21, 21) and model.wing is None


# --- real data: the default calls run and say what they did ---------------------------


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["DEC-OBS18a.mini.fits", "DEC-OBS04a.mini.fits"])
def test_decam_stamps_default_call(name):
    """256^2 DECam stamps with ~5 usable stars: a constant PSF, announced, unit sum."""
    path = data_path("decam-sfft", "input_data", name)
    ccd = CCDData(fits.getdata(path).astype(float), unit="adu")
    stars = find_psf_stars(ccd)
    with pytest.warns(FewStarsWarning, match="usable PSF stars"):
        model = estimate_psf(ccd, stars)
    assert model.method in ("constant", "moffat")
    assert model.quality["measured"] is False
    psf = model.psf_at(128, 128)
    assert abs(psf.sum() - 1) < 1e-12
    assert psf[psf.shape[0] // 2, psf.shape[1] // 2] == psf.max()
    # the model's FWHM (a Moffat fitted to its core) agrees with the stars' own
    fit = fit_profile(psf, "moffat")
    assert fit["fwhm"] * np.sqrt(1 - fit["ellipticity"]) == pytest.approx(
        stars.meta["fwhm"], rel=0.15)


@pytest.mark.realdata
@pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")
def test_jwst_stamp_default_call():
    """The JWST NIRCam F200W stamp: a PSF of FWHM 2.0-2.4 px from a handful of stars."""
    path = data_path("nircam-a2744", "input_data",
                     "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp.fits")
    with pytest.warns(FewStarsWarning, match="usable PSF stars"):
        model = estimate_psf(path)
    assert 2.0 <= model.meta["fwhm_stars"] <= 2.4
    assert model.meta["n_stars"] < 15 and model.quality["measured"] is False
    assert abs(model.psf_at(450, 450).sum() - 1) < 1e-12


def _pedestal_stamp(fwhm, pedestal):
    """A unit-sum elliptical Gaussian star on a flat pedestal (``pedestal`` per pixel)."""
    stamp = render_profile((33, 33), fwhm, 0.2, 0.4) + pedestal
    return stamp / stamp.sum()


def test_failed_moffat_fit_is_reported_not_rendered():
    """A pedestal drives the Moffat index to 1 (the flux diverges): a ProfileFitError
    that says why, never a beta <= 1 handed to the renderer; a clean star still fits."""
    with pytest.raises(ProfileFitError, match="Moffat index ran down"):
        fit_profile(_pedestal_stamp(3.0, 2e-3), "moffat")
    fit = fit_profile(_pedestal_stamp(3.0, 0.0), "moffat")
    assert fit["beta"] > 1.0 + BETA_EDGE
    assert fit["fwhm"] == pytest.approx(3.0, rel=1e-2)


@pytest.mark.parametrize("pedestal, used", [(2e-3, "an elliptical Gaussian"),
                                            (1e-2, "a round Gaussian")])
def test_failed_fit_steps_down_the_ladder(pedestal, used):
    """A failed Moffat fit gives an elliptical Gaussian fit, and a failed Gaussian fit a
    round Gaussian of the stars' FWHM: each says what was used and why."""
    stamp = _pedestal_stamp(3.0, pedestal).reshape(1, -1)
    train = TrainingSet(stamp, np.ones_like(stamp), np.ones(1), np.zeros(1), np.zeros(1),
                        (33, 33))
    built = build_analytic(train, "moffat", 2.9)
    assert built.method == "gaussian"
    assert built.steps[0].startswith(f"using {used}")
    assert "Moffat index ran down" in built.steps[0]
    # the model keeps the star's size (truth: a major-axis FWHM of 3 px, 2.9 px measured)
    assert built.meta["fwhm"] == pytest.approx(3.0, rel=0.05)
    assert abs(built.basis.sum() - 1) < 1e-12


def test_heavy_halo_keeps_its_moffat_fit():
    """Three stars of a 3 px core in a 12 px halo of 4 times its flux: the Moffat fit
    converges at an index near 1 (1.03), a finite one, and is kept (only an index run to
    1 is a failed fit); the model is close to the true profile."""
    pos = [(32.3, 40.6), (90.2, 30.1), (64.7, 96.4)]
    image = np.zeros((128, 128))
    for x, y in pos:
        image += 1e5 * (0.2 * psf_stamp((128, 128), 3.0, center=(x, y))
                        + 0.8 * psf_stamp((128, 128), 12.0, center=(x, y)))
    variance = image + 100.0
    noise = np.random.default_rng(0).normal(0.0, np.sqrt(variance))
    ccd = CCDData(image + noise, unit="electron", uncertainty=StdDevUncertainty(np.sqrt(variance)))
    stars = Table({"x": [p[0] for p in pos], "y": [p[1] for p in pos]})
    with pytest.warns(FewStarsWarning, match="quality unmeasured"):
        model = estimate_psf(ccd, stars, method="moffat")
    assert model.method == "moffat" and 1.0 < model.meta["beta"] < 1.2
    psf = model.psf_at(64, 64)
    truth = 0.2 * psf_stamp(psf.shape, 3.0) + 0.8 * psf_stamp(psf.shape, 12.0)
    assert np.abs(psf - truth / truth.sum()).sum() < 0.35


def test_failed_moffat_fit_steps_down_in_estimate_psf(field, monkeypatch):
    """When the Moffat fit fails inside `estimate_psf` (forced here: the field's stars
    would fit), the ladder goes on to an elliptical Gaussian, the FewStarsWarning and
    the model say so, and the Gaussian field's PSF is recovered."""
    def no_moffat(stamp, profile):
        if profile == "moffat":
            raise ProfileFitError("the moffat fit to the mean stamp failed: forced")
        return fit_profile(stamp, profile)

    monkeypatch.setattr(builders, "fit_profile", no_moffat)
    with pytest.warns(FewStarsWarning, match="using an elliptical Gaussian fitted .* forced"):
        model = estimate_psf(field.ccd, _bright(field, 3))
    assert model.method == "gaussian" and model.meta["method_used"] == "gaussian"
    assert "forced" in model.meta["reason"]
    assert model.meta["fwhm"] == pytest.approx(FWHM, rel=0.03)
    assert model.meta["ellipticity"] == pytest.approx(0.1, abs=0.03)
    assert _peak_error(model, field) < 0.05


def test_failed_profile_fit_skips_the_recentring_correction(field, monkeypatch):
    """When no Moffat profile fits the training stars' mean (forced here), the stamps
    are recentred without the correction of the recentring error, which the warning
    says; a 3 px Gaussian is sampled well enough for the PSF still to be close."""
    def failing(stamp, profile):
        raise ProfileFitError(f"the {profile} fit to the mean stamp failed: forced")

    monkeypatch.setattr(psf_estimate, "fit_profile", failing)
    with pytest.warns(FewStarsWarning, match="without the correction of the recentring error"):
        model = estimate_psf(field.ccd, _bright(field, 8))
    assert model.method == "constant"
    assert _peak_error(model, field) < 0.05
