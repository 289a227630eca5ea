"""Tests of astro_zackay.simulation against the truth it claims to produce."""

import math

import numpy as np
import pytest
from astropy import units as u
from astropy.convolution import discretize_model
from astropy.modeling.functional_models import Moffat2D
from astropy.nddata import CCDData, StdDevUncertainty, VarianceUncertainty
from astropy.table import Table
from scipy import special, stats

from astro_zackay import AstroZackayWarning
from astro_zackay import simulation as sim
from astro_zackay.simulation import (
    PSFField,
    SimulatedImage,
    inject_sources,
    psf_stamp,
    simulate_image,
    simulate_pair,
)

GAUSS = 2.0 * math.sqrt(2.0 * math.log(2.0))


def moments(img, window=None):
    """Centroid and central second moments (x = column)."""
    yy, xx = np.indices(img.shape, dtype=float)
    m0 = img.sum()
    xc, yc = (img * xx).sum() / m0, (img * yy).sum() / m0
    mxx = (img * (xx - xc) ** 2).sum() / m0
    myy = (img * (yy - yc) ** 2).sum() / m0
    mxy = (img * (xx - xc) * (yy - yc)).sum() / m0
    return xc, yc, mxx, myy, mxy


def shape_from_moments(mxx, myy, mxy, pixel_var=1.0 / 12.0):
    """Major-axis sigma, ellipticity 1-b/a and angle, pixel-box variance removed."""
    cov = np.array([[mxx - pixel_var, mxy], [mxy, myy - pixel_var]])
    lam, vec = np.linalg.eigh(cov)
    e = 1.0 - math.sqrt(lam[0] / lam[1])
    theta = math.atan2(vec[1, 1], vec[0, 1])
    return math.sqrt(lam[1]), e, theta


def angle_diff(a, b):
    """Difference of two axis angles (period pi), in radians."""
    return abs((a - b + math.pi / 2) % math.pi - math.pi / 2)


def moffat_moment(alpha, beta):
    """Per-axis second moment of a round Moffat (beta > 2)."""
    return alpha**2 / (2.0 * (beta - 2.0))


def single_star(x, y, flux, psf, shape=(64, 64)):
    stars = Table({"x": [x], "y": [y], "flux": [flux]})
    return simulate_image(
        shape, psf=psf, stars=stars, sky=0.0, read_noise=0.0, noise=False, wcs=False
    )


# ---------------------------------------------------------------------------
# psf_stamp
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("profile", "fwhm", "e", "theta"),
    [
        ("gaussian", 4.0, 0.0, 0.0),
        ("gaussian", 5.0, 0.3, 0.6),
        ("gaussian", 3.0, 0.15, -1.0),
        ("moffat", 4.0, 0.0, 0.0),
        ("moffat", 5.0, 0.25, 2.0),
    ],
)
def test_psf_stamp_moments(profile, fwhm, e, theta):
    beta = 4.765
    size = 121 if profile == "moffat" else 61
    p = psf_stamp(size, fwhm, profile=profile, ellipticity=e, theta=theta, beta=beta)
    assert abs(p.sum() - 1.0) < 1e-10
    assert p.min() >= 0
    xc, yc, mxx, myy, mxy = moments(p)
    assert abs(xc - (size - 1) / 2) < 1e-6 and abs(yc - (size - 1) / 2) < 1e-6
    sig_major, e_meas, th_meas = shape_from_moments(mxx, myy, mxy)
    if profile == "gaussian":
        fwhm_meas = GAUSS * sig_major
    else:
        alpha = math.sqrt(sig_major**2 * 2 * (beta - 2))
        fwhm_meas = 2 * alpha * math.sqrt(2 ** (1 / beta) - 1)
    assert fwhm_meas == pytest.approx(fwhm, rel=0.01)
    assert abs(e_meas - e) < 0.01
    if e > 0:
        assert angle_diff(th_meas, theta) < math.radians(2)


def test_psf_stamp_gaussian_matches_exact_erf_integral():
    # axis-aligned elliptical Gaussian: the pixel integral is a product of erf differences
    fwhm, e, cx, cy = 3.0, 0.4, 10.3, 9.6
    sx, sy = fwhm / GAUSS, fwhm * (1 - e) / GAUSS
    edges = np.arange(22) - 0.5

    def integ(c, s):
        cdf = 0.5 * (1 + special.erf((edges - c) / (math.sqrt(2) * s)))
        return np.diff(cdf)

    exact = np.outer(integ(cy, sy), integ(cx, sx))
    exact /= exact.sum()
    p = psf_stamp((21, 21), fwhm, ellipticity=e, center=(cx, cy), oversample=25)
    assert np.max(np.abs(p - exact)) < 2e-4 * exact.max()
    # the default 5x oversampling is within 0.5 % of the peak
    p5 = psf_stamp((21, 21), fwhm, ellipticity=e, center=(cx, cy))
    assert np.max(np.abs(p5 - exact)) < 5e-3 * exact.max()
    # theta = pi/2 swaps the axes
    p90 = psf_stamp(
        (21, 21), fwhm, ellipticity=e, theta=math.pi / 2, center=(cy, cx), oversample=25
    )
    np.testing.assert_allclose(p90, p.T, atol=1e-12)


def test_psf_stamp_moffat_matches_astropy():
    fwhm, beta = 3.0, 3.5
    p = psf_stamp(41, fwhm, profile="moffat", beta=beta, oversample=15)
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    ref = discretize_model(
        Moffat2D(1.0, 20, 20, alpha, beta), (0, 41), (0, 41), mode="oversample", factor=15
    )
    ref /= ref.sum()
    assert np.max(np.abs(p - ref)) < 1e-4 * ref.max()


def test_psf_stamp_center_and_errors():
    p = psf_stamp((21, 25), 3.0, center=(5.25, 14.5))
    xc, yc, *_ = moments(p)
    assert abs(xc - 5.25) < 1e-3 and abs(yc - 14.5) < 1e-3
    with pytest.raises(ValueError, match="fwhm must be a positive"):
        psf_stamp(11, -1.0)
    with pytest.raises(ValueError, match=r"ellipticity = 1 - b/a must be in \[0, 1\)"):
        psf_stamp(11, 2.0, ellipticity=1.0)
    with pytest.raises(ValueError, match="profile must be one of"):
        psf_stamp(11, 2.0, profile="airy")
    with pytest.raises(ValueError, match="beta must be a finite number > 1"):
        psf_stamp(11, 2.0, profile="moffat", beta=1.0)
    with pytest.raises(ValueError, match="shape must"):
        psf_stamp((0, 5), 2.0)
    with pytest.raises(ValueError, match="oversample"):
        psf_stamp(11, 2.0, oversample=0)


# ---------------------------------------------------------------------------
# PSFField
# ---------------------------------------------------------------------------
def test_psffield_corners_and_params():
    psf = PSFField(
        fwhm=3.0,
        fwhm_gradient=(0.4, -0.2),
        fwhm_quadratic=(0.1, 0.05, 0.0),
        ellipticity=0.1,
        ellipticity_gradient=(0.05, 0.05),
        theta=0.3,
        theta_gradient=(0.0, 0.2),
        shape=(100, 200),
    )
    # corners of the frame (outer pixel edges) are u, v = +-1
    x = np.array([-0.5, 199.5, -0.5, 199.5])
    y = np.array([-0.5, -0.5, 99.5, 99.5])
    uu = np.array([-1, 1, -1, 1.0])
    vv = np.array([-1, -1, 1, 1.0])
    fwhm, e, th = psf.params(x, y)
    np.testing.assert_allclose(fwhm, 3 + 0.4 * uu - 0.2 * vv + 0.1 * uu**2 + 0.05 * uu * vv)
    np.testing.assert_allclose(e, 0.1 + 0.05 * uu + 0.05 * vv)
    np.testing.assert_allclose(th, 0.3 + 0.2 * vv)
    f0, e0, t0 = psf.params(99.5, 49.5)
    assert (float(f0), float(e0), float(t0)) == pytest.approx((3.0, 0.1, 0.3))
    assert psf.max_fwhm == pytest.approx(3 + 0.4 + 0.2 + 0.1 - 0.05)  # at u=1, v=-1
    # stamp equals psf_stamp with the local parameters
    f1, e1, t1 = psf.params(20.0, 80.0)
    np.testing.assert_array_equal(
        psf.stamp(20.0, 80.0, 25),
        psf_stamp(25, float(f1), ellipticity=float(e1), theta=float(t1)),
    )
    assert psf.stamp(20.0, 80.0).shape == psf.stamp_shape
    assert psf.is_variable and not PSFField().is_variable


def test_psffield_half_size():
    g = PSFField(fwhm=3.0)
    assert g.half_size() >= 6 * 3.0 / GAUSS
    m = PSFField(fwhm=3.0, profile="moffat", beta=3.5)
    alpha = 3.0 / (2 * math.sqrt(2 ** (1 / 3.5) - 1))
    r999 = alpha * math.sqrt(1e-3 ** (1 / (1 - 3.5)) - 1)
    assert m.half_size() == math.ceil(r999)
    # fraction of a round Moffat's flux beyond r999 is 0.1 %
    assert (1 + r999**2 / alpha**2) ** (1 - 3.5) == pytest.approx(1e-3)
    assert PSFField(fwhm=3.0, profile="moffat", beta=1.2).half_size() == 45  # capped at 15 FWHM
    assert PSFField(fwhm=3.0, half_size_override=4).stamp_shape == (9, 9)


def test_psffield_validation():
    with pytest.raises(ValueError, match="FWHM must be > 0 everywhere"):
        PSFField(fwhm=1.0, fwhm_gradient=(1.5, 0.0), shape=(50, 50))
    with pytest.raises(ValueError, match=r"must stay in \[0, 1\)"):
        PSFField(ellipticity=0.1, ellipticity_gradient=(0.0, 0.2), shape=(50, 50))
    with pytest.raises(ValueError, match=r"must stay in \[0, 1\)"):
        PSFField(ellipticity=1.0)
    # quadratic minimum inside the frame is found
    with pytest.raises(ValueError, match="FWHM must be > 0"):
        PSFField(fwhm=0.5, fwhm_quadratic=(1.0, 0.0, 1.0), fwhm_gradient=(-1.5, 0.0), shape=(9, 9))
    with pytest.raises(ValueError, match="fwhm_gradient must be 2 finite"):
        PSFField(fwhm_gradient=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="beta"):
        PSFField(profile="moffat", beta=0.5)
    with pytest.raises(ValueError, match="has no shape"):
        PSFField(fwhm_gradient=(0.1, 0.0)).params(1.0, 1.0)
    with pytest.raises(ValueError, match=r"defined for a frame of shape \(50, 50\)"):
        simulate_image((60, 60), psf=PSFField(shape=(50, 50)), n_stars=1)
    with pytest.raises(TypeError, match="PSFField or a FWHM"):
        simulate_image((60, 60), psf="wide")


# ---------------------------------------------------------------------------
# simulate_image: noiseless truth
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "psf",
    [
        PSFField(fwhm=3.0),
        PSFField(fwhm=3.5, profile="moffat", beta=3.0, ellipticity=0.2, theta=1.0),
    ],
)
def test_noiseless_single_star_flux_and_centroid(psf):
    x, y, flux = 30.37, 25.81, 12345.0
    s = single_star(x, y, flux, psf)
    assert s.ccd.data.sum() == pytest.approx(flux, rel=1e-12)
    assert float(s.truth["flux"][0]) == flux
    xc, yc, *_ = moments(s.ccd.data)
    assert abs(xc - x) < 0.01 and abs(yc - y) < 0.01
    # the image is exactly flux * the true PSF stamp at the star
    h = s.psf.half_size()
    ix, iy = round(x), round(y)
    stamp = s.psf.stamp(x, y, center=(h + x - ix, h + y - iy))
    np.testing.assert_allclose(
        s.ccd.data[iy - h : iy + h + 1, ix - h : ix + h + 1], flux * stamp, rtol=1e-12, atol=1e-12
    )
    assert float(s.truth["peak"][0]) == pytest.approx(s.ccd.data.max(), rel=1e-12)


def test_varying_psf_rendered_with_local_parameters():
    psf = PSFField(
        fwhm=4.0,
        fwhm_gradient=(1.5, 0.5),
        ellipticity=0.1,
        ellipticity_gradient=(0.0, 0.1),
        theta=0.5,
        theta_gradient=(0.3, 0.0),
        shape=(160, 160),
    )
    stars = Table({"x": [25.2, 134.7, 80.0], "y": [30.6, 128.1, 80.0], "flux": [1e4] * 3})
    s = simulate_image((160, 160), psf=psf, stars=stars, sky=0, read_noise=0, noise=False)
    h = psf.half_size()
    for row in s.truth:
        ix, iy = round(row["x"]), round(row["y"])
        cut = s.ccd.data[iy - h : iy + h + 1, ix - h : ix + h + 1]
        xc, yc, mxx, myy, mxy = moments(cut)
        sig, e, th = shape_from_moments(mxx, myy, mxy)
        f_exp, e_exp, t_exp = psf.params(row["x"], row["y"])
        assert row["fwhm"] == pytest.approx(float(f_exp))
        assert GAUSS * sig == pytest.approx(float(f_exp), rel=0.01)
        assert abs(e - float(e_exp)) < 0.01
        assert angle_diff(th, float(t_exp)) < math.radians(2)
    assert s.truth["fwhm"][1] > s.truth["fwhm"][2] > s.truth["fwhm"][0]


def test_model_and_truth_fluxes_exact():
    s = simulate_image((128, 128), n_stars=40, sky=0.0, read_noise=0.0, noise=False, seed=3)
    # every stamp lies inside the frame by default, so the image holds all the flux
    assert s.ccd.data.sum() == pytest.approx(float(np.sum(s.truth["flux"])), rel=1e-12)
    h = s.psf.half_size()
    assert np.all((s.truth["x"] >= h) & (s.truth["x"] <= 127 - h))
    assert np.all((s.truth["y"] >= h) & (s.truth["y"] <= 127 - h))
    np.testing.assert_array_equal(s.model, s.ccd.data)
    assert s.truth["flux"].unit == u.electron


# ---------------------------------------------------------------------------
# simulate_image: noise and uncertainty
# ---------------------------------------------------------------------------
def test_background_statistics_and_uncertainty():
    sky, rn = 200.0, 5.0
    s = simulate_image((512, 512), n_stars=0, sky=sky, read_noise=rn, seed=11)
    d = s.ccd.data
    rms = math.sqrt(sky + rn**2)
    assert s.noise_rms == pytest.approx(rms)
    assert d.std() == pytest.approx(rms, rel=0.01)
    assert abs(d.mean() - sky) < 5 * rms / 512
    np.testing.assert_allclose(s.ccd.uncertainty.array, rms)
    assert isinstance(s.ccd.uncertainty, StdDevUncertainty)
    assert s.ccd.unit == u.electron
    assert len(s.truth) == 0 and "snr" in s.truth.colnames
    hdr = s.ccd.meta
    assert hdr["GAIN"] == 1.0 and hdr["RDNOISE"] == rn and hdr["SKYLEVEL"] == sky
    assert "SATURATE" not in hdr
    # Poisson sky: third cumulant sky, so skewness sky / (sky + rn**2)**1.5 (Gaussian: 0)
    assert stats.skew(d.ravel()) == pytest.approx(sky / rms**3, abs=0.015)


def test_uncertainty_is_true_model_variance_and_pulls_are_unit():
    rn = 4.0
    s = simulate_image(
        (256, 256), n_stars=60, flux_range=(1e4, 1e6), sky=50.0, read_noise=rn, seed=5
    )
    np.testing.assert_allclose(s.ccd.uncertainty.array, np.sqrt(s.model + rn**2), rtol=1e-12)
    pull = (s.ccd.data - s.model) / s.ccd.uncertainty.array
    assert pull.std() == pytest.approx(1.0, abs=0.01)
    assert abs(pull.mean()) < 0.01
    # on star pixels too (source noise included)
    bright = s.model > 50.0 + 200.0
    assert bright.sum() > 1000
    assert pull[bright].std() == pytest.approx(1.0, abs=0.05)


def test_adu_output_with_gain():
    g = 2.5
    s = simulate_image((256, 256), n_stars=0, sky=300.0, read_noise=6.0, gain=g, seed=2)
    assert s.ccd.unit == u.adu
    assert s.ccd.meta["GAIN"] == g and s.gain == g
    assert s.ccd.meta["SKYLEVEL"] == pytest.approx(300.0 / g)
    assert s.ccd.data.mean() * g == pytest.approx(300.0, abs=5 * s.noise_rms / 256)
    assert s.ccd.data.std() * g == pytest.approx(s.noise_rms, rel=0.02)
    np.testing.assert_allclose(s.ccd.uncertainty.array, s.noise_rms / g)


def test_snr_column_is_the_optimal_fit_snr():
    # Monte Carlo: the optimal weighted PSF fit with known PSF and position has
    # std(flux_hat) = flux / snr, with the source noise included.
    psf = PSFField(fwhm=3.0)
    stars = Table({"x": [16.2], "y": [15.7], "flux": [3000.0]})
    fits_ = []
    first = None
    for seed in range(300):
        s = simulate_image((33, 33), psf=psf, stars=stars, sky=100.0, read_noise=5.0, seed=seed)
        if first is None:
            first = s
            p = (s.model - 100.0) / 3000.0
            var = s.ccd.uncertainty.array**2
        fits_.append(np.sum(p * (s.ccd.data - 100.0) / var) / np.sum(p**2 / var))
    fits_ = np.array(fits_)
    snr = float(first.truth["snr"][0])
    assert snr == pytest.approx(3000.0 * math.sqrt(np.sum(p**2 / var)), rel=1e-10)
    assert fits_.std() == pytest.approx(3000.0 / snr, rel=0.12)
    assert abs(fits_.mean() - 3000.0) < 4 * 3000.0 / snr / math.sqrt(300)
    bg = float(first.truth["snr_background"][0])
    assert bg == pytest.approx(3000.0 * math.sqrt(np.sum(p**2)) / math.sqrt(125.0), rel=1e-10)
    assert bg > snr


# ---------------------------------------------------------------------------
# simulate_image: defects
# ---------------------------------------------------------------------------
def test_saturation_clipped_masked_and_flagged():
    stars = Table({"x": [20.0, 60.3], "y": [30.0, 50.8], "flux": [1e6, 1e3]})
    s = simulate_image((80, 80), stars=stars, sky=100.0, saturation=4e4, seed=1)
    d = s.ccd.data
    assert d.max() == 4e4
    sat = d >= 4e4
    assert sat.sum() > 5
    np.testing.assert_array_equal(s.ccd.mask, sat)
    assert s.ccd.meta["SATURATE"] == 4e4
    assert list(s.truth["saturated"]) == [True, False]
    assert s.truth["peak"][0] > 4e4
    # with sky subtraction SATURATE is the stored level of a saturated pixel
    s2 = simulate_image((80, 80), stars=stars, sky=100.0, saturation=4e4, subtract_sky=True, seed=1)
    assert s2.ccd.meta["SATURATE"] == pytest.approx(4e4 - 100.0)
    assert s2.ccd.data.max() == pytest.approx(4e4 - 100.0)


def test_bad_pixels_masked_cosmic_rays_not():
    s = simulate_image(
        (128, 128), n_stars=5, n_bad_pixels=30, n_cosmic_rays=20, noise=False, seed=4
    )
    bp = s.bad_pixels
    assert len(bp) == 30 and len(set(zip(bp["x"], bp["y"]))) == 30
    assert s.ccd.mask.sum() == 30
    assert np.all(s.ccd.mask[bp["y"], bp["x"]])
    np.testing.assert_array_equal(s.ccd.data[bp["y"], bp["x"]], bp["value"])
    assert set(bp["kind"]) <= {"hot", "dead"}
    assert np.all(bp["value"][bp["kind"] == "dead"] == 0)
    assert np.all(bp["value"][bp["kind"] == "hot"] > 1000)
    cr = s.cosmic_rays
    per_hit = np.bincount(cr["id"])
    assert per_hit.max() <= 3 and per_hit.min() >= 1
    # cosmic rays are the only difference from the model off the bad pixels
    diff = s.ccd.data - s.model
    diff[s.ccd.mask] = 0.0
    expected = np.zeros((128, 128))
    np.add.at(expected, (cr["y"], cr["x"]), cr["value"])
    expected[s.ccd.mask] = 0.0
    np.testing.assert_allclose(diff, expected, atol=1e-9)
    hit = expected > 0
    assert not np.any(s.ccd.mask[hit])  # not masked
    assert s.ccd.meta["NCOSMIC"] == 20
    assert np.all(cr["value"] > 50)


def test_background_subtracted():
    kw = dict(n_stars=10, sky=150.0, seed=8, saturation=5e4)
    s = simulate_image((64, 64), **kw)
    b = s.background_subtracted
    np.testing.assert_allclose(b.data, s.ccd.data - 150.0)
    assert b.meta["SKYSUB"] and not s.ccd.meta["SKYSUB"]
    assert b.meta["SATURATE"] == pytest.approx(5e4 - 150.0)
    s2 = simulate_image((64, 64), subtract_sky=True, **kw)
    np.testing.assert_array_equal(s2.ccd.data, b.data)
    np.testing.assert_array_equal(s2.ccd.uncertainty.array, s.ccd.uncertainty.array)
    assert s2.background_subtracted is s2.ccd
    assert s2.sky == 150.0


# ---------------------------------------------------------------------------
# simulate_image: random fields
# ---------------------------------------------------------------------------
def test_seed_reproducible():
    kw = dict(n_stars=20, n_bad_pixels=3, n_cosmic_rays=3)
    a = simulate_image((64, 64), seed=42, **kw)
    b = simulate_image((64, 64), seed=42, **kw)
    c = simulate_image((64, 64), seed=43, **kw)
    np.testing.assert_array_equal(a.ccd.data, b.ccd.data)
    np.testing.assert_array_equal(a.truth["flux"], b.truth["flux"])
    assert not np.array_equal(a.ccd.data, c.ccd.data)
    assert not np.array_equal(a.truth["x"], c.truth["x"])


def test_unpacking_repr_and_wcs():
    s = simulate_image((64, 64), n_stars=3, seed=0)
    ccd, truth = s
    assert ccd is s.ccd and truth is s.truth
    assert isinstance(s, SimulatedImage)
    assert "3 stars" in repr(s)
    assert ccd.wcs is not None and ccd.wcs.wcs.ctype[0] == "RA---TAN"
    assert simulate_image((64, 64), n_stars=3, seed=0, wcs=False).ccd.wcs is None
    assert set(sim._TRUTH_COLUMNS) == set(truth.colnames)


def test_flux_distributions():
    s = simulate_image((128, 128), n_stars=2000, flux_range=(100.0, 1e5), noise=False, seed=9)
    f = np.asarray(s.truth["flux"])
    assert f.min() >= 100.0 and f.max() <= 1e5
    lo, hi, k = 100.0, 1e5, -1.5  # dN/dF ~ F**-2.5

    def cdf(v):
        return (v**k - lo**k) / (hi**k - lo**k)

    assert stats.kstest(f, cdf).pvalue > 1e-3
    s = simulate_image(
        (64, 64), n_stars=2000, flux_range=(10.0, 1e4), flux_distribution="loguniform", seed=9
    )
    assert stats.kstest(np.log10(s.truth["flux"]), stats.uniform(1, 3).cdf).pvalue > 1e-3


def test_min_separation_and_isolation():
    s = simulate_image((200, 200), n_stars=150, min_separation=8.0, noise=False, seed=6)
    xy = np.column_stack([s.truth["x"], s.truth["y"]])
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    d[np.diag_indices(len(xy))] = np.inf
    assert d.min() >= 8.0
    with pytest.raises(ValueError, match="Could not place"):
        simulate_image((40, 40), n_stars=200, min_separation=10.0)
    # isolation: a bright star 5 px (< 3 FWHM) from a faint one spoils only the faint one
    # when the faint one has < 1 % of the bright flux; 80 px away is isolated
    stars = Table({"x": [30.0, 35.0, 110.0], "y": [40.0, 40.0, 100.0], "flux": [1e5, 5e2, 1e4]})
    t = simulate_image((150, 150), psf=3.0, stars=stars, seed=1).truth
    assert list(t["isolated"]) == [True, False, True]
    stars["flux"][1] = 2e3  # now > 1 % of the bright one: both spoiled
    t = simulate_image((150, 150), psf=3.0, stars=stars, seed=1).truth
    assert list(t["isolated"]) == [False, False, True]


def test_simulate_image_bad_inputs():
    with pytest.raises(ValueError, match="sky must be a finite number >= 0"):
        simulate_image((32, 32), sky=-1.0)
    with pytest.raises(ValueError, match="saturation .* must exceed the sky"):
        simulate_image((32, 32), sky=100.0, saturation=50.0)
    with pytest.raises(ValueError, match="flux_distribution must be one of"):
        simulate_image((32, 32), n_stars=2, flux_distribution="gaussian")
    with pytest.raises(ValueError, match="flux_range must be"):
        simulate_image((32, 32), n_stars=2, flux_range=(10.0, 1.0))
    with pytest.raises(ValueError, match="leaves no room"):
        simulate_image((16, 16), n_stars=2, edge=10)
    with pytest.raises(ValueError, match="n_stars must be a non-negative integer"):
        simulate_image((32, 32), n_stars=-3)
    with pytest.raises(ValueError, match="lacks column"):
        simulate_image((32, 32), stars=Table({"x": [1.0], "y": [2.0]}))
    with pytest.raises(ValueError, match="flux'\\] must be >= 0"):
        simulate_image((32, 32), stars=Table({"x": [1.0], "y": [2.0], "flux": [-5.0]}))
    with pytest.raises(ValueError, match="gain must be a finite number > 0"):
        simulate_image((32, 32), gain=0.0)
    with pytest.raises(ValueError, match="shape must"):
        simulate_image((32, 32, 3))


# ---------------------------------------------------------------------------
# simulate_pair
# ---------------------------------------------------------------------------
def _window_centroids(data, x, y, half):
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    offs = np.arange(-half, half + 1)
    cut = data[iy[:, None, None] + offs[None, :, None], ix[:, None, None] + offs[None, None, :]]
    tot = cut.sum(axis=(1, 2))
    cx = ix + (cut * offs[None, None, :]).sum(axis=(1, 2)) / tot
    cy = iy + (cut * offs[None, :, None]).sum(axis=(1, 2)) / tot
    return cx, cy, tot


def test_pair_shift_flux_ratio_and_transients():
    shift = (0.37, -0.62)
    beta = 0.7
    pair = simulate_pair(
        (400, 400),
        reference_psf=2.5,
        science_psf=PSFField(fwhm=3.5, ellipticity=0.1, theta=0.4),
        flux_ratio=beta,
        shift=shift,
        reference_sky=100.0,
        science_sky=300.0,
        read_noise=(4.0, 6.0),
        n_stars=60,
        flux_range=(1e4, 3e6),
        flux_distribution="loguniform",
        n_transients=5,
        transient_snr=(8.0, 12.0),
        min_separation=25.0,
        seed=21,
    )
    ref, sci = pair.reference, pair.science
    rt, st = ref.truth, sci.truth
    assert len(rt) == len(st) == 60
    np.testing.assert_allclose(st["x"], rt["x"] + shift[0])
    np.testing.assert_allclose(st["y"], rt["y"] + shift[1])
    np.testing.assert_allclose(st["flux"], beta * rt["flux"])
    assert pair.flux_ratio == beta and pair.shift == shift
    assert ref.sky == 100.0 and sci.sky == 300.0
    assert ref.read_noise == 4.0 and sci.read_noise == 6.0

    # measured shift from centroids of bright isolated stars
    good = rt["isolated"] & st["isolated"] & (rt["flux"] > 1e5)
    assert good.sum() >= 20
    half = 10
    rx, ry, rtot = _window_centroids(
        ref.ccd.data - ref.sky, np.asarray(rt["x"][good]), np.asarray(rt["y"][good]), half
    )
    sx, sy, stot = _window_centroids(
        sci.ccd.data - sci.sky, np.asarray(st["x"][good]), np.asarray(st["y"][good]), half
    )
    assert abs(np.median(sx - rx) - shift[0]) < 0.02
    assert abs(np.median(sy - ry) - shift[1]) < 0.02
    assert abs(np.median(rx - rt["x"][good])) < 0.01
    assert abs(np.median(sy - st["y"][good])) < 0.01
    # flux ratio from summed aperture fluxes
    assert stot.sum() / rtot.sum() == pytest.approx(beta, rel=0.01)

    # transients: science frame only, at the requested background-limited S/N
    tr = pair.transients
    assert len(tr) == 5
    assert np.all((tr["snr"] >= 8.0) & (tr["snr"] <= 12.0))
    h = sci.psf.half_size()
    for row in tr:
        ix, iy = round(row["x"]), round(row["y"])
        p = sci.psf.stamp(row["x"], row["y"], center=(h + row["x"] - ix, h + row["y"] - iy))
        expected = row["snr"] * sci.noise_rms / math.sqrt(np.sum(p**2))
        assert row["flux"] == pytest.approx(expected, rel=1e-10)
        # science model holds the transient, the reference model has nothing there
        sci_star = sci.model[iy, ix] - sci.sky
        ref_here = ref.model[round(row["y"] - shift[1]), round(row["x"] - shift[0])] - ref.sky
        assert sci_star > 0.5 * row["flux"] * p.max()
        assert ref_here < 1e-3 * row["flux"] * p.max()
    # total flux bookkeeping (all stamps inside the frame by default)
    assert (sci.model - sci.sky).sum() == pytest.approx(
        beta * float(np.sum(rt["flux"])) + float(np.sum(tr["flux"])), rel=1e-10
    )
    assert (ref.model - ref.sky).sum() == pytest.approx(float(np.sum(rt["flux"])), rel=1e-10)
    assert sci.ccd.meta["NTRANS"] == 5 and sci.ccd.meta["FLXRATIO"] == beta

    # WCS: a star has the same sky position in both frames
    c_ref = ref.ccd.wcs.pixel_to_world(np.asarray(rt["x"]), np.asarray(rt["y"]))
    xs, ys = sci.ccd.wcs.world_to_pixel(c_ref)
    np.testing.assert_allclose(xs, st["x"], atol=1e-6)
    np.testing.assert_allclose(ys, st["y"], atol=1e-6)


def test_pure_noise_pair_independent_and_reproducible():
    kw = dict(n_stars=0, reference_psf=2.0, science_psf=3.0, seed=5)
    a = simulate_pair((256, 256), **kw)
    b = simulate_pair((256, 256), **kw)
    np.testing.assert_array_equal(a.science.ccd.data, b.science.ccd.data)
    assert len(a.reference.truth) == 0 and len(a.transients) == 0
    r = a.reference.ccd.data - a.reference.sky
    s = a.science.ccd.data - a.science.sky
    assert abs(np.corrcoef(r.ravel(), s.ravel())[0, 1]) < 0.01
    assert "0 transients" in repr(a)


def test_pair_given_transients_and_errors():
    tr = Table({"x": [40.5], "y": [30.25], "flux": [5000.0]})
    pair = simulate_pair(
        (80, 80),
        n_stars=0,
        transients=tr,
        noise=False,
        science_sky=0.0,
        reference_sky=0.0,
        read_noise=0.0,
    )
    assert pair.science.ccd.data.sum() == pytest.approx(5000.0)
    assert pair.reference.ccd.data.sum() == 0.0
    xc, yc, *_ = moments(pair.science.ccd.data)
    assert abs(xc - 40.5) < 0.01 and abs(yc - 30.25) < 0.01
    with pytest.raises(ValueError, match="either transients or n_transients"):
        simulate_pair((80, 80), n_stars=0, transients=tr, n_transients=2)
    with pytest.raises(ValueError, match="flux_ratio must be a finite number > 0"):
        simulate_pair((80, 80), flux_ratio=0.0)
    with pytest.raises(ValueError, match="shift must be a"):
        simulate_pair((80, 80), shift=1.0)
    with pytest.raises(ValueError, match="read_noise must be a number or a"):
        simulate_pair((80, 80), read_noise=(1.0, 2.0, 3.0))
    with pytest.warns(AstroZackayWarning, match="outside the science image"):
        simulate_pair(
            (80, 80), n_stars=0, transients=Table({"x": [-20.0], "y": [3.0], "flux": [1.0]})
        )


# ---------------------------------------------------------------------------
# inject_sources
# ---------------------------------------------------------------------------
def _adu_ccd(shape=(100, 100), gain=2.0, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(500.0, 10.0, shape).astype(np.float32)
    return CCDData(
        data,
        unit="adu",
        uncertainty=StdDevUncertainty(np.full(shape, 10.0)),
        mask=np.zeros(shape, bool),
        meta={"GAIN": gain},
    )


def test_inject_does_not_mutate_and_adds_exact_flux():
    ccd = _adu_ccd()
    before = ccd.data.copy()
    unc_before = ccd.uncertainty.array.copy()
    src = Table({"x": [20.3, 70.8, 50.0], "y": [30.6, 60.1, 80.45], "flux": [1e4, 3e3, 5e4]})
    out = inject_sources(ccd, src, psf_stamp(21, 3.0), add_noise=False)
    np.testing.assert_array_equal(ccd.data, before)
    np.testing.assert_array_equal(ccd.uncertainty.array, unc_before)
    assert "NINJECT" not in ccd.meta and out.meta["NINJECT"] == 3
    added = out.data - before.astype(float)
    assert added.sum() == pytest.approx(float(np.sum(src["flux"])), rel=1e-9)
    np.testing.assert_array_equal(out.uncertainty.array, unc_before)  # no noise, no variance
    assert out.unit == u.adu and out.data.dtype == np.float64
    # centroids at the sub-pixel positions
    cx, cy, _ = _window_centroids(added, np.asarray(src["x"]), np.asarray(src["y"]), 9)
    np.testing.assert_allclose(cx, src["x"], atol=0.01)
    np.testing.assert_allclose(cy, src["y"], atol=0.01)
    # the Fourier-shifted stamp agrees with the analytic rendering of the same PSF
    analytic = inject_sources(ccd, src, PSFField(fwhm=3.0), add_noise=False).data - before
    assert np.max(np.abs(added - analytic)) < 0.01 * analytic.max()
    # even-sized stamps, and a callable giving the same stamp, give the same result
    out_c = inject_sources(ccd, src, lambda x, y: psf_stamp(21, 3.0), add_noise=False)
    np.testing.assert_allclose(out_c.data, out.data, atol=1e-9)
    even = inject_sources(ccd, src, psf_stamp(20, 3.0), add_noise=False).data - before
    assert even.sum() == pytest.approx(float(np.sum(src["flux"])), rel=1e-9)
    cx, cy, _ = _window_centroids(even, np.asarray(src["x"]), np.asarray(src["y"]), 9)
    np.testing.assert_allclose(cx, src["x"], atol=0.01)


def test_inject_poisson_noise_on_adu_image():
    g = 2.0
    ccd = _adu_ccd(shape=(300, 300), gain=g)
    rng = np.random.default_rng(1)
    n = 100
    src = Table(
        {"x": rng.uniform(15, 285, n), "y": rng.uniform(15, 285, n), "flux": np.full(n, 2e4)}
    )
    psf = PSFField(fwhm=3.0)
    clean = inject_sources(ccd, src, psf, add_noise=False)
    noisy = inject_sources(ccd, src, psf, seed=3)
    model = clean.data - ccd.data
    noise = noisy.data - clean.data
    # total added flux within Poisson noise: var(sum) = sum(model)/g  (ADU^2)
    assert abs(noise.sum()) < 5 * math.sqrt(model.sum() / g)
    on = model > 50.0
    pull = noise[on] / np.sqrt(model[on] / g)
    assert pull.std() == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(
        noisy.uncertainty.array**2, ccd.uncertainty.array**2 + model / g, rtol=1e-10
    )
    # reproducible with a seed; gain keyword overrides the header
    np.testing.assert_array_equal(inject_sources(ccd, src, psf, seed=3).data, noisy.data)
    noisy4 = inject_sources(ccd, src, psf, seed=3, gain=8.0)
    assert (noisy4.data - clean.data)[on].std() < noise[on].std()


def test_inject_variance_uncertainty_and_electron_image():
    ccd = CCDData(
        np.zeros((40, 40)), unit=u.electron, uncertainty=VarianceUncertainty(np.full((40, 40), 4.0))
    )
    src = Table({"x": [20.0], "y": [20.0], "flux": [1e3]})
    out = inject_sources(ccd, src, psf_stamp(15, 2.0), seed=0)  # gain 1 for electrons
    model = inject_sources(ccd, src, psf_stamp(15, 2.0), add_noise=False).data
    np.testing.assert_allclose(out.uncertainty.array, 4.0 + model, atol=1e-9)


def test_inject_errors_and_warnings():
    ccd = CCDData(np.zeros((40, 40)), unit="adu")
    src = Table({"x": [20.0], "y": [20.0], "flux": [1e3]})
    with pytest.raises(ValueError, match="needs the gain"):
        inject_sources(ccd, src, psf_stamp(11, 2.0))
    with pytest.raises(ValueError, match="lacks column"):
        inject_sources(ccd, Table({"x": [1.0]}), psf_stamp(11, 2.0))
    with pytest.raises(ValueError, match="2-D stamp"):
        inject_sources(ccd, src, np.ones(5), add_noise=False)
    with pytest.raises(TypeError, match="CCDData"):
        inject_sources(np.zeros((4, 4)), src, psf_stamp(11, 2.0))
    with pytest.warns(AstroZackayWarning, match="renormalised"):
        out = inject_sources(ccd, src, 2 * psf_stamp(11, 2.0), add_noise=False)
    assert out.data.sum() == pytest.approx(1e3)
    # sources near the edge are clipped, not wrapped
    edge = Table({"x": [0.0], "y": [20.0], "flux": [1e3]})
    out = inject_sources(ccd, edge, psf_stamp(11, 2.0), add_noise=False)
    sigma = 2.0 / GAUSS  # the flux at x >= -0.5 is Phi(0.5 / sigma)
    assert out.data.sum() == pytest.approx(1e3 * stats.norm.cdf(0.5 / sigma), rel=0.01)
    assert out.data[:, 30:].sum() == 0.0


# ---------------------------------------------------------------------------
# galaxies
# ---------------------------------------------------------------------------
def one_galaxy(r_eff, sersic_n, e, theta, psf, x=80.3, y=79.6, shape=(160, 160), flux=1e5):
    gal = Table(
        {
            "x": [x],
            "y": [y],
            "flux": [flux],
            "r_eff": [r_eff],
            "sersic_n": [sersic_n],
            "ellipticity": [e],
            "theta": [theta],
        }
    )
    return simulate_image(
        shape, psf=psf, stars=Table({"x": [], "y": [], "flux": []}), galaxies=gal,
        sky=0.0, read_noise=0.0, noise=False, wcs=False,
    )


def truncated_sersic_r2(r_eff, n, cut=5.0):
    """<r^2> (elliptical-radius units of r_eff = 1) of a Sersic profile cut at ``cut`` r_eff."""
    b = special.gammaincinv(2 * n, 0.5)
    edge = b * cut ** (1 / n)
    ratio = special.gamma(4 * n) * special.gammainc(4 * n, edge)
    ratio /= special.gamma(2 * n) * special.gammainc(2 * n, edge)
    return r_eff**2 * b ** (-2 * n) * ratio


@pytest.mark.parametrize(
    ("r_eff", "sersic_n", "e", "theta"),
    [(4.0, 1.0, 0.0, 0.0), (4.0, 1.0, 0.5, 0.7), (2.5, 4.0, 0.3, -1.1), (6.0, 0.6, 0.2, 2.0)],
)
def test_galaxy_flux_size_and_shape_against_analytic_moments(r_eff, sersic_n, e, theta):
    """Flux exact; moments = intrinsic truncated Sersic + pixel box + PSF (convolution)."""
    fwhm = 3.0
    img = one_galaxy(r_eff, sersic_n, e, theta, PSFField(fwhm=fwhm))
    model = img.model
    assert model.sum() == pytest.approx(1e5, rel=1e-10)
    assert model.min() >= 0
    g = img.galaxies
    assert len(g) == 1 and g["peak"][0] == pytest.approx(model.max(), rel=1e-12)
    xc, yc, mxx, myy, mxy = moments(model)
    # pixel-centre centroids of a cuspy (n = 4) profile carry a pixel-phase bias of ~0.02 px
    assert xc == pytest.approx(80.3, abs=0.03) and yc == pytest.approx(79.6, abs=0.03)
    # remove the PSF's variance (point-sampled Gaussian) and the pixel box, then compare
    psf_var = (fwhm / GAUSS) ** 2
    cov = np.array([[mxx, mxy], [mxy, myy]]) - (psf_var + 1 / 12) * np.eye(2)
    lam, vec = np.linalg.eigh(cov)
    r2 = truncated_sersic_r2(r_eff, sersic_n)
    assert lam[1] == pytest.approx(r2 / 2, rel=0.02)  # major axis
    assert lam[0] == pytest.approx(r2 / 2 * (1 - e) ** 2, rel=0.02)
    if e > 0:
        assert angle_diff(math.atan2(vec[1, 1], vec[0, 1]), theta) < 0.02


def test_galaxy_half_light_radius():
    """A round exponential galaxy under a narrow PSF holds half its (cut) light within r_eff."""
    from photutils.aperture import CircularAperture, aperture_photometry

    r_eff = 6.0
    img = one_galaxy(r_eff, 1.0, 0.0, 0.0, PSFField(fwhm=0.8))
    phot = aperture_photometry(img.model, CircularAperture((80.3, 79.6), r_eff), method="exact")
    b = special.gammaincinv(2.0, 0.5)
    expected = 0.5 / special.gammainc(2.0, b * 5.0)  # renormalised after the cut at 5 r_eff
    assert float(phot["aperture_sum"][0]) / 1e5 == pytest.approx(expected, abs=0.01)


def test_random_galaxies_truth_ranges_and_flux():
    sim = simulate_image(
        (256, 256), n_stars=20, n_galaxies=60, flux_range=(1e3, 1e5), galaxy_size_range=(1.5, 4.0),
        galaxy_sersic_range=(1.0, 4.0), galaxy_ellipticity_max=0.5, edge=30.0, min_separation=6.0,
        noise=False, sky=0.0, read_noise=0.0, seed=3,
    )
    g = sim.galaxies
    assert len(g) == 60 and len(sim.truth) == 20  # galaxies outnumber the stars 3:1
    assert sim.ccd.meta["NGALAXY"] == 60
    assert np.all((g["r_eff"] >= 1.5) & (g["r_eff"] <= 4.0))
    assert np.all((g["sersic_n"] >= 1.0) & (g["sersic_n"] <= 4.0))
    assert np.all((g["ellipticity"] >= 0) & (g["ellipticity"] < 0.5))
    assert np.all((g["flux"] >= 1e3) & (g["flux"] <= 1e5))
    assert np.all((g["x"] >= 30) & (g["x"] <= 225) & (g["y"] >= 30) & (g["y"] <= 225))
    # every source fully inside (edge 30 > 5 r_eff + PSF stamp): the image holds all flux
    total = sim.truth["flux"].sum() + g["flux"].sum()
    assert sim.model.sum() == pytest.approx(total, rel=1e-10)
    # galaxies keep min_separation from the stars and from each other
    xy = np.column_stack([np.r_[sim.truth["x"], g["x"]], np.r_[sim.truth["y"], g["y"]]])
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    assert d[np.triu_indices(len(xy), 1)].min() >= 6.0
    # a galaxy's peak is lower than that of a star of the same flux (it is extended)
    star_peak_per_flux = sim.truth["peak"] / sim.truth["flux"]
    assert np.all(g["peak"] / g["flux"] < star_peak_per_flux.min())


def test_galaxies_reproducible_and_noise_includes_them():
    kw = dict(shape=(128, 128), n_stars=5, n_galaxies=15, seed=11)
    a, b = simulate_image(**kw), simulate_image(**kw)
    assert np.array_equal(a.ccd.data, b.ccd.data)
    assert np.array_equal(np.asarray(a.galaxies["x"]), np.asarray(b.galaxies["x"]))
    c = simulate_image(**{**kw, "seed": 12})
    assert not np.allclose(np.asarray(a.galaxies["x"]), np.asarray(c.galaxies["x"]))
    # without galaxies the same seed gives the same stars and noise as before galaxies existed
    plain = simulate_image((128, 128), n_stars=5, seed=11)
    assert np.array_equal(np.asarray(plain.truth["x"]), np.asarray(a.truth["x"]))
    assert plain.galaxies is None and plain.ccd.meta["NGALAXY"] == 0
    # the uncertainty is the true model variance, galaxies included
    assert np.allclose(a.ccd.uncertainty.array ** 2, a.model + 25.0)


def test_pair_galaxies_identical_in_both_images():
    pair = simulate_pair(
        (192, 192), reference_psf=2.5, science_psf=3.5, flux_ratio=0.7, shift=(0.4, -0.3),
        n_stars=10, n_galaxies=30, noise=False, reference_sky=0.0, science_sky=0.0,
        read_noise=0.0, edge=40.0, seed=5,
    )
    rg, sg = pair.reference.galaxies, pair.science.galaxies
    assert len(rg) == len(sg) == 30
    assert np.allclose(sg["x"], rg["x"] + 0.4) and np.allclose(sg["y"], rg["y"] - 0.3)
    assert np.allclose(sg["flux"], 0.7 * rg["flux"])
    for col in ("r_eff", "sersic_n", "ellipticity", "theta"):
        assert np.array_equal(np.asarray(sg[col]), np.asarray(rg[col]))
    # the broader science PSF lowers every galaxy's peak
    assert np.all(sg["peak"] / sg["flux"] < rg["peak"] / rg["flux"])
    for img in (pair.reference, pair.science):
        total = img.truth["flux"].sum() + img.galaxies["flux"].sum()
        assert img.model.sum() == pytest.approx(total, rel=1e-10)


def test_galaxy_bad_inputs():
    with pytest.raises(ValueError, match="either galaxies or n_galaxies"):
        simulate_image(
            (64, 64), n_galaxies=2,
            galaxies=Table({c: [1.0] for c in sim._GALAXY_COLUMNS}),
        )
    with pytest.raises(ValueError, match="galaxy_size_range"):
        simulate_image((64, 64), n_galaxies=2, galaxy_size_range=(3.0, 1.0))
    with pytest.raises(ValueError, match="galaxy_sersic_range"):
        simulate_image((64, 64), n_galaxies=2, galaxy_sersic_range=(0.1, 4.0))
    with pytest.raises(ValueError, match="galaxy_ellipticity_max"):
        simulate_image((64, 64), n_galaxies=2, galaxy_ellipticity_max=1.0)
    with pytest.raises(ValueError, match="lacks column"):
        simulate_image((64, 64), galaxies=Table({"x": [1.0], "y": [1.0], "flux": [1.0]}))
    bad = Table({c: [1.0] for c in sim._GALAXY_COLUMNS})
    bad["r_eff"] = [0.0]
    with pytest.raises(ValueError, match="r_eff > 0"):
        simulate_image((64, 64), galaxies=bad)


# ---------------------------------------------------------------------------
# simulate_mosaic
# ---------------------------------------------------------------------------
def test_mosaic_tiles_truth_and_psf():
    psfs = [PSFField(fwhm=f, ellipticity=e, theta=t)
            for f, e, t in ((3.0, 0.0, 0.0), (4.0, 0.2, 0.5), (5.0, 0.3, 1.0), (6.0, 0.4, 2.0))]
    frame = sim.simulate_mosaic(
        (96, 128), psfs, n_stars=6, n_galaxies=3, n_cosmic_rays=2, n_bad_pixels=3, seed=4
    )
    assert frame.ccd.shape == (192, 256) and isinstance(frame.psf, sim.PSFMosaic)
    assert frame.ccd.wcs is not None and frame.ccd.meta["NTILES"] == 4
    truth = frame.truth
    assert len(truth) == 24 and np.array_equal(np.asarray(truth["id"]), np.arange(24))
    assert np.bincount(truth["tile"]).tolist() == [6, 6, 6, 6]
    assert np.bincount(frame.galaxies["tile"]).tolist() == [3, 3, 3, 3]
    # each star's truth PSF is its tile's PSF; the mosaic's params agree at its position
    fwhm, e, theta = frame.psf.params(truth["x"], truth["y"])
    assert np.allclose(fwhm, truth["fwhm"]) and np.allclose(e, truth["ellipticity"])
    assert np.allclose(fwhm, [psfs[k].fwhm for k in truth["tile"]])
    # the frame is the tiles side by side: star k of tile 3 (row 1, col 1) sits at +(128, 96)
    row = truth[truth["tile"] == 3][0]
    assert 128 <= row["x"] < 256 and 96 <= row["y"] < 192
    stamp = frame.psf.stamp(row["x"], row["y"], 31)
    assert np.allclose(stamp, psfs[3].stamp(row["x"] - 128, row["y"] - 96, 31))
    # a noiseless check of one tile: its model equals simulate_image with the same child seed
    child = np.random.default_rng(4).spawn(4)[3]
    tile = simulate_image((96, 128), psf=psfs[3], n_stars=6, n_galaxies=3, n_cosmic_rays=2,
                          n_bad_pixels=3, seed=child, wcs=False)
    assert np.array_equal(frame.model[96:, 128:], tile.model)
    assert np.array_equal(frame.ccd.data[96:, 128:], tile.ccd.data)
    assert np.array_equal(frame.ccd.mask[96:, 128:], tile.ccd.mask)
    bad = frame.bad_pixels[frame.bad_pixels["tile"] == 3]
    assert np.array_equal(np.asarray(bad["x"]) - 128, np.asarray(tile.bad_pixels["x"]))
    assert frame.ccd.meta["NSTARS"] == 24 and frame.ccd.meta["NGALAXY"] == 12


def test_mosaic_errors():
    with pytest.raises(ValueError, match="needs 4 PSFs"):
        sim.simulate_mosaic((32, 32), [3.0, 4.0], n_stars=1)
    with pytest.raises(ValueError, match="single"):
        sim.PSFMosaic((PSFField(3.0),), (1, 1), (32, 32)).stamp([1.0, 2.0], [1.0, 2.0])


def test_tutorial2_frame_matches_properimage_recipe():
    frame = sim.tutorial2_frame(128, n_stars=8, seed=3)
    assert frame.ccd.shape == (256, 256) and frame.sky == 100.0
    assert np.bincount(frame.truth["tile"]).tolist() == [8, 8, 8, 8]
    for field, angle in zip(frame.psf.fields, (0, 45, 105, 150)):
        # x-FWHM 5 + 6.5 a / 180 along the major axis, y-FWHM 5 along the minor one
        assert field.fwhm == pytest.approx(5 + 6.5 * angle / 180)
        assert field.fwhm * (1 - field.ellipticity) == pytest.approx(5.0)
        assert math.degrees(field.theta) == pytest.approx(angle)
    flux = np.asarray(frame.truth["flux"])
    assert flux.min() >= 1e3 and flux.max() <= 1e5
    # every star carries its quadrant's PSF
    tiles = np.asarray(frame.truth["tile"])
    assert np.allclose(frame.truth["fwhm"], [frame.psf.fields[k].fwhm for k in tiles])
    assert np.allclose(frame.truth["theta"], [frame.psf.fields[k].theta for k in tiles])


@pytest.mark.parametrize(("sersic_n", "tolerance"), [(1.0, 2e-4), (4.0, 5e-3)])
def test_galaxy_rendering_consistent_between_subpixel_phases(sersic_n, tolerance):
    """A galaxy moved by a sub-pixel shift equals the Fourier-shifted image of it (as a star).

    The two images of a pair render the same galaxy at different sub-pixel phases; on the
    pixel grid alone the cusp of n = 4 made them differ by 4 % of the peak, which
    `subtract` with the true PSFs found as false candidates.
    """
    from astro_zackay.fourier import shift_image

    def render(dx, dy):
        gal = Table({"x": [64.2 + dx], "y": [63.9 + dy], "flux": [1e6], "r_eff": [1.5],
                     "sersic_n": [sersic_n], "ellipticity": [0.3], "theta": [0.4]})
        return one_galaxy_table(gal, PSFField(fwhm=3.5, profile="moffat", beta=2.5)).model

    moved = render(0.37, -0.21)
    shifted = shift_image(render(0.0, 0.0), 0.37, -0.21)
    assert np.abs(shifted - moved).max() / moved.max() < tolerance


def one_galaxy_table(gal, psf):
    return simulate_image((160, 160), psf=psf, stars=Table({"x": [], "y": [], "flux": []}),
                          galaxies=gal, sky=0.0, read_noise=0.0, noise=False, wcs=False)
