"""Tests of astro_zackay.coaddition: proper coaddition (Zackay & Ofek 2017) of CCDData."""

import os
import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.table import Table
from ccdproc import ImageFileCollection
from conftest import record_warnings

from astro_zackay._warnings import FewStarsWarning
from astro_zackay.coaddition import CoaddResult, coadd
from astro_zackay.fourier import correlate_fft, psf_rfft
from astro_zackay.simulation import inject_sources, psf_stamp, simulate_image

READ_NOISE = 5.0


def _grid(n, spacing, margin):
    """Integer (x, y) positions of a square grid of sources."""
    g = np.arange(margin, n - margin, spacing)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    return xx.ravel(), yy.ravel(), g


def _empty(n, g, radius, margin):
    """Pixels farther than ``radius`` (along x or y) from every grid line, inside ``margin``."""
    r = np.arange(n)
    far = np.min(np.abs(r[:, None] - g[None, :]), axis=1) > radius
    empty = far[:, None] | far[None, :]
    inner = np.zeros((n, n), bool)
    inner[margin:-margin, margin:-margin] = True
    return empty & inner


def _stack(n, fwhm, flux_scales, sky, *, f0=0.0, spacing=32, seed=0):
    """Frames with a grid of sources of flux ``f0 * F_j`` at integer pixels."""
    xs, ys, g = _grid(n, spacing, 24)
    frames, psfs = [], []
    for j, (w, f, b) in enumerate(zip(fwhm, flux_scales, sky)):
        stars = Table({"x": xs.astype(float), "y": ys.astype(float),
                       "flux": np.full(xs.size, f0 * f)})
        sim = simulate_image((n, n), psf=float(w), stars=stars, sky=float(b),
                             read_noise=READ_NOISE, seed=seed + j, wcs=False)
        frames.append(sim.ccd)
        psfs.append(sim.psf.stamp(n / 2, n / 2))
    return frames, psfs, xs, ys, g


def _pad(stamp, size):
    k = (size - stamp.shape[0]) // 2
    return np.pad(stamp, k)


def _weighted_mean_mf(frames, psfs, flux_scales, sky):
    """Inverse-variance weighted mean of the calibrated frames, then its matched filter."""
    s2 = np.asarray(sky) + READ_NOISE**2
    a = np.asarray(flux_scales) ** 2 / s2
    mean = sum(a_j * (fr.data - b) / f for a_j, fr, b, f in zip(a, frames, sky, flux_scales))
    mean /= a.sum()
    size = max(p.shape[0] for p in psfs)
    psf_mean = sum(a_j * _pad(p, size) for a_j, p in zip(a, psfs)) / a.sum()
    mf = correlate_fft(mean, psf_rfft(psf_mean, mean.shape))
    theory = np.sqrt(a.sum() * (psf_mean**2).sum())
    return mf, theory


def _measured_snr(score, xs, ys, empty):
    """Mean score at the sources above the empty-sky level, over the empty-sky noise."""
    sky = score[empty]
    return (score[ys, xs].mean() - sky.mean()) / sky.std()


def _theory(psfs, flux_scales, sky):
    s2 = np.asarray(sky) + READ_NOISE**2
    p2 = np.array([(p**2).sum() for p in psfs])
    return np.sqrt(np.sum(np.asarray(flux_scales) ** 2 / s2 * p2))


# --------------------------------------------------------------------------------------
# science: S/N, unit noise and the gain over a weighted mean


@pytest.fixture(scope="module")
def lognormal_stack():
    """10 frames of 1024^2 with lognormal seeing, different skies and flux scales."""
    rng = np.random.default_rng(42)
    nf, n = 10, 1024
    fwhm = 3.5 * np.exp(rng.normal(0.0, 0.2, nf))
    flux_scales = rng.uniform(0.6, 1.4, nf)
    flux_scales[0] = 1.0
    sky = rng.uniform(100.0, 400.0, nf)
    f0 = 480.0  # coadd S/N ~ 20 per source; 900 sources
    frames, psfs, xs, ys, g = _stack(n, fwhm, flux_scales, sky, f0=f0, seed=100)
    result = coadd(frames, psfs=psfs, flux_scales=flux_scales)
    return {"frames": frames, "psfs": psfs, "F": flux_scales, "sky": sky, "f0": f0,
            "result": result, "xs": xs, "ys": ys, "empty": _empty(n, g, 8, 40)}


def test_unit_variance_and_unit_sum_psf(lognormal_stack):
    res = lognormal_stack["result"]
    std = res.image.data[lognormal_stack["empty"]].std()
    assert abs(std - 1.0) < 0.003, std
    assert res.psf.sum() == pytest.approx(1.0, abs=1e-12)
    assert res.psf.shape[0] % 2 == 1 and np.argmax(res.psf) == res.psf.size // 2
    assert isinstance(res, CoaddResult)
    assert res.image.unit == u.dimensionless_unscaled
    assert not res.image.mask.any()
    # outlier rejection: at most one spot (3x3) in 10 Mpix of noise (a 6.9-sigma 3x3
    # excess of the simulated noise in frame 6)
    assert res.rejected.sum() <= 9
    assert (res.n_used == 10).all()  # outliers are replaced, not masked
    np.testing.assert_allclose(res.depth[50:-50, 50:-50], 1.0, atol=1e-6)


def test_snr_matches_theory(lognormal_stack):
    st = lognormal_stack
    res = st["result"]
    theory = st["f0"] * _theory(st["psfs"], st["F"], st["sky"])
    assert res.snr_full * st["f0"] == pytest.approx(theory, rel=1e-3)
    measured = _measured_snr(res.score.data, st["xs"], st["ys"], st["empty"])
    assert measured / theory == pytest.approx(1.0, abs=0.01)
    # the S/N map is calibrated: sigma units on empty sky
    snr = res.snr.data[st["empty"]]
    assert snr.std() == pytest.approx(1.0, abs=0.01)


def test_gain_over_weighted_mean_matches_theory(lognormal_stack):
    st = lognormal_stack
    res = st["result"]
    mf, theory_mf = _weighted_mean_mf(st["frames"], st["psfs"], st["F"], st["sky"])
    gain = _measured_snr(res.score.data, st["xs"], st["ys"], st["empty"]) / _measured_snr(
        mf, st["xs"], st["ys"], st["empty"])
    gain_theory = _theory(st["psfs"], st["F"], st["sky"]) / theory_mf
    assert gain_theory > 1.01  # lognormal seeing: a real gain to measure
    assert gain == pytest.approx(gain_theory, abs=0.01)


def test_no_gain_for_identical_psfs():
    n, nf = 512, 5
    flux_scales = [1.0, 0.8, 1.2, 1.1, 0.9]
    sky = [150.0, 300.0, 200.0, 250.0, 100.0]
    frames, psfs, xs, ys, g = _stack(n, [3.5] * nf, flux_scales, sky, f0=480.0, seed=7)
    res = coadd(frames, psfs=psfs, flux_scales=flux_scales)
    mf, theory_mf = _weighted_mean_mf(frames, psfs, flux_scales, sky)
    assert _theory(psfs, flux_scales, sky) == pytest.approx(theory_mf, rel=1e-12)
    empty = _empty(n, g, 8, 40)
    gain = _measured_snr(res.score.data, xs, ys, empty) / _measured_snr(mf, xs, ys, empty)
    assert gain == pytest.approx(1.0, abs=0.01)


def test_flux_scales_recovered():
    n = 512
    rng = np.random.default_rng(3)
    truth = simulate_image((n, n), n_stars=300, flux_range=(1e3, 3e5), seed=11).truth
    fwhm = [3.0, 4.5, 2.6, 3.8, 5.0]
    flux_scales = [1.0, 0.55, 1.6, 0.9, 1.25]
    frames, psfs = [], []
    for j, (w, f) in enumerate(zip(fwhm, flux_scales)):
        stars = Table({"x": truth["x"], "y": truth["y"], "flux": truth["flux"] * f})
        sim = simulate_image((n, n), psf=w, stars=stars, sky=rng.uniform(100, 400),
                             seed=50 + j)
        frames.append(sim.ccd)
        psfs.append(sim.psf.stamp(n / 2, n / 2))
    res = coadd(frames, psfs=psfs)
    fitted = np.asarray(res.frames["flux_scale"])
    errors = np.asarray(res.frames["flux_scale_err"])
    np.testing.assert_allclose(fitted, flux_scales, rtol=0.01)
    assert errors[0] == 0.0
    # aperture photometry of matched stars: honest errors below 1 %, truth within 3 sigma
    assert (errors[1:] < 0.01).all()
    assert (np.abs(fitted - flux_scales)[1:] < 3 * errors[1:]).all()


# --------------------------------------------------------------------------------------
# masks


def _noise_frames(n, nf, seed, sigma=(1.0, 1.5, 2.0, 2.5)):
    rng = np.random.default_rng(seed)
    return [CCDData(rng.normal(0.0, s, (n, n)), unit="electron",
                    uncertainty=StdDevUncertainty(np.full((n, n), s)))
            for s in sigma[:nf]]


def test_masked_and_nan_pixels_never_leak():
    n = 256
    frames = _noise_frames(n, 4, seed=5)
    psfs = [psf_stamp(15, w) for w in (2.5, 3.0, 3.5, 4.0)]
    # a hot pixel masked in frame 0, a NaN in frame 1, a block masked in frames 2 and 3
    frames[0].data[60, 70] = 1e7
    frames[0].mask = np.zeros((n, n), bool)
    frames[0].mask[60, 70] = True
    frames[1].data[130, 40] = np.nan
    for fr in frames[2:]:
        fr.mask = np.zeros((n, n), bool)
        fr.mask[150:200, 150:200] = True
    # one pixel and one small block masked in every frame
    for fr in frames:
        if fr.mask is None:
            fr.mask = np.zeros((n, n), bool)
        fr.mask[100, 200] = True
        fr.mask[30:33, 30:33] = True
    res = coadd(frames, psfs=psfs, flux_scales=[1.0] * 4, sigmas=[1.0, 1.5, 2.0, 2.5])
    for out in (res.image, res.score, res.calibrated):
        assert np.isfinite(out.data).all()
        assert np.isfinite(out.uncertainty.array[~out.mask]).all()
        assert out.mask[100, 200] and out.mask[30:33, 30:33].all()
        assert not out.mask[60, 70] and not out.mask[130, 40] and not out.mask[175, 175]
    assert res.image.mask.sum() == 10
    assert res.n_used[60, 70] == 3 and res.n_used[130, 40] == 3 and res.n_used[175, 175] == 2
    # the hot pixel does not leak; R stays white where frames were masked
    assert np.abs(res.image.data[50:71, 60:81]).max() < 5
    block = res.image.data[155:195, 155:195]
    assert abs(block.mean()) < 0.1 and block.std() == pytest.approx(1.0, abs=0.05)
    # the depth is recorded and the calibrated noise grows where frames are missing
    share = np.array([(p**2).sum() / s**2 for p, s in zip(psfs, (1.0, 1.5, 2.0, 2.5))])
    assert res.depth[175, 175] == pytest.approx(share[:2].sum() / share.sum(), rel=1e-6)
    assert res.depth[60, 70] < 1.0 and res.depth[20, 220] == pytest.approx(1.0)
    cal_err = res.calibrated.uncertainty.array
    assert cal_err[175, 175] > cal_err[20, 220] == pytest.approx(1.0 / res.flux_scale)


def test_masked_star_flux_unbiased():
    """A star under a mask in some frames is measured at its true flux by the others."""
    n, flux = 128, 4e4
    psfs = [psf_stamp(21, w) for w in (2.5, 3.0, 3.5, 4.0)]
    estimates = []
    for seed in range(8):
        frames = []
        for j, (fr, p) in enumerate(zip(_noise_frames(n, 4, seed=seed), psfs)):
            star = inject_sources(fr, Table({"x": [64.0], "y": [64.0], "flux": [flux]}), p,
                                  add_noise=False)
            if j < 2:
                star.mask = np.zeros((n, n), bool)
                star.mask[62:67, 60:70] = True
            frames.append(star)
        res = coadd(frames, psfs=psfs, flux_scales=[1.0] * 4, sigmas=[1.0, 1.5, 2.0, 2.5])
        estimates.append(res.score.data[64, 64] / res.score.uncertainty.array[64, 64] ** 2)
        assert res.depth[64, 64] < 0.6
    assert np.mean(estimates) == pytest.approx(flux, rel=0.005)


# --------------------------------------------------------------------------------------
# source noise in the uncertainties


def test_background_limited_uncertainty_unchanged():
    """Uncertainty == sigma everywhere: exactly the background-only calibrated noise."""
    n = 128
    frames = _noise_frames(n, 3, seed=9)
    frames[1].mask = np.zeros((n, n), bool)
    frames[1].mask[50:70, 40:90] = True
    psfs = [psf_stamp(15, w) for w in (2.5, 3.0, 3.5)]
    res = coadd(frames, psfs=psfs, flux_scales=[1.0, 0.8, 1.2], sigmas=[1.0, 1.5, 2.0])
    old = 1.0 / (res.flux_scale * np.sqrt(res.depth))
    good = ~res.calibrated.mask
    np.testing.assert_allclose(res.calibrated.uncertainty.array[good], old[good], rtol=1e-10)
    np.testing.assert_allclose(res.image.uncertainty.array[good], 1.0, rtol=1e-10)


def test_calibrated_uncertainty_includes_source_noise():
    """At bright-star peaks the uncertainty matches the scatter over noise realisations."""
    n, fwhm, scales, sky = 128, (3.0, 3.4, 3.8), [1.0, 0.8, 1.2], (150.0, 200.0, 250.0)
    stars = Table({"x": [40.0, 88.0, 40.0, 88.0, 64.0], "y": [40.0, 40.0, 88.0, 88.0, 64.0],
                   "flux": [2e5, 4e5, 8e5, 1.6e6, 3e5]})
    ys, xs = stars["y"].astype(int), stars["x"].astype(int)
    cal, err, bkg_err = [], [], []
    for r in range(40):
        frames, psfs = [], []
        for j in range(3):
            table = Table({"x": stars["x"], "y": stars["y"], "flux": stars["flux"] * scales[j]})
            sim = simulate_image((n, n), psf=fwhm[j], stars=table, sky=sky[j],
                                 read_noise=READ_NOISE, seed=1000 * r + j, wcs=False)
            frames.append(sim.ccd)
            psfs.append(sim.psf.stamp(n / 2, n / 2))
        res = coadd(frames, psfs=psfs, flux_scales=scales)
        cal.append(res.calibrated.data[ys, xs])
        err.append(res.calibrated.uncertainty.array[ys, xs])
        bkg_err.append(res.calibrated.uncertainty.array[5:25, 5:25] * res.flux_scale)
    cal, err = np.array(cal), np.array(err)
    pulls = (cal - cal.mean(axis=0)) / err * np.sqrt(40 / 39)
    assert pulls.std() == pytest.approx(1.0, abs=0.1)
    assert (err[0] * res.flux_scale > 8).all()  # source noise dominates at the peaks
    # background pixels keep the background-only noise 1 / F_R
    np.testing.assert_allclose(bkg_err, 1.0, rtol=1e-5)


# --------------------------------------------------------------------------------------
# input handling


def _small_frames(n=96, nf=3, seed=1):
    frames = _noise_frames(n, nf, seed)
    for fr in frames:
        fr.meta["OBJECT"] = "field"
        fr.meta["GAIN"] = 1.0
    return frames


def test_inputs_not_mutated():
    frames = _small_frames()
    frames[0].mask = np.zeros(frames[0].shape, bool)
    frames[0].data[5, 5] = np.nan
    before = [(fr.data.copy(), None if fr.mask is None else fr.mask.copy(),
               fr.uncertainty.array.copy(), dict(fr.meta)) for fr in frames]
    psfs = [psf_stamp(11, 2.5)] * 3
    scales = np.array([1.0, 1.0, 1.0])
    coadd(frames, psfs=psfs, flux_scales=scales)
    for fr, (data, mask, err, meta) in zip(frames, before):
        np.testing.assert_array_equal(fr.data, data)
        assert (fr.mask is None) == (mask is None)
        if mask is not None:
            np.testing.assert_array_equal(fr.mask, mask)
        np.testing.assert_array_equal(fr.uncertainty.array, err)
        assert dict(fr.meta) == meta
    np.testing.assert_array_equal(scales, [1.0, 1.0, 1.0])


def _field_frames(gain, n=128, seed=21):
    """Three frames of one star field in electrons, and the same with frame 1 in ADU."""
    stars = simulate_image((n, n), n_stars=40, flux_range=(2e3, 5e4), seed=seed,
                           wcs=False).truth["x", "y", "flux"]
    frames = []
    for j, scale in enumerate((1.0, 0.9, 1.2)):
        table = stars.copy()
        table["flux"] *= scale
        frames.append(simulate_image((n, n), stars=table, psf=3.0, sky=200.0, read_noise=5.0,
                                     seed=seed + 1 + j, wcs=False).ccd)
    adu = CCDData(frames[1].data / gain, unit=u.adu, mask=frames[1].mask,
                  uncertainty=StdDevUncertainty(frames[1].uncertainty.array / gain),
                  meta={**frames[1].meta, "GAIN": gain})
    return frames, [frames[0], adu, frames[2]]


def test_frames_in_other_units_are_converted_with_the_gain():
    """A frame in ADU among frames in electrons: converted with its gain (keyword or
    ``gain=``), it gives the coadd of the frames all in electrons; its flux scale is the
    truth 0.9, not 0.9 / gain. Without a gain: a UnitsError naming both units and gain=.
    """
    gain = 1.6
    electrons, mixed = _field_frames(gain)
    # float64: the conversion is exact to its round-off (float32's is ~5e-5 at the stars)
    kwargs = {"psfs": [3.0] * 3, "reject": None, "dtype": np.float64}
    truth = coadd(electrons, **kwargs)
    assert truth.frames["flux_scale"][1] == pytest.approx(0.9, abs=0.02)
    by_keyword = coadd(mixed, **kwargs)
    np.testing.assert_allclose(by_keyword.frames["flux_scale"], truth.frames["flux_scale"],
                               rtol=1e-6)
    np.testing.assert_allclose(by_keyword.image.data, truth.image.data, atol=1e-6)
    assert by_keyword.calibrated.unit == u.electron
    del mixed[1].meta["GAIN"]
    by_argument = coadd(mixed, gain=[None, gain, None], **kwargs)
    np.testing.assert_allclose(by_argument.image.data, truth.image.data, atol=1e-6)
    with pytest.raises(u.UnitsError, match="image 1 is in adu and the first image in "
                                           "electron.*pass gain="):
        coadd(mixed, **kwargs)
    with pytest.raises(ValueError, match="gain has 2 entries"):
        coadd(mixed, gain=[None, gain], **kwargs)


def test_generator_and_collection_inputs(tmp_path):
    frames = _small_frames()
    psfs = [psf_stamp(11, w) for w in (2.5, 3.0, 3.5)]
    kwargs = {"psfs": psfs, "flux_scales": [1.0, 0.9, 1.1]}
    ref = coadd(frames, **kwargs)
    gen = coadd((fr for fr in frames), **kwargs)
    np.testing.assert_allclose(gen.image.data, ref.image.data)
    for j, fr in enumerate(frames):
        fr.write(tmp_path / f"frame{j}.fits")
    collection = ImageFileCollection(os.fspath(tmp_path))
    col = coadd(collection, **kwargs)
    np.testing.assert_allclose(col.image.data, ref.image.data, atol=1e-12)
    assert list(col.frames["name"]) == ["frame0.fits", "frame1.fits", "frame2.fits"]
    paths = coadd(sorted(tmp_path.glob("*.fits")), **kwargs)
    np.testing.assert_allclose(paths.image.data, ref.image.data, atol=1e-12)


def test_result_metadata_and_repr():
    frames = _small_frames()
    res = coadd(frames, psfs=[psf_stamp(11, 2.5)] * 3, flux_scales=[1.0, 1.0, 1.0])
    assert repr(res).startswith("<CoaddResult 96x96 n_frames=3 unit=electron")
    for out in (res.image, res.score, res.calibrated):
        assert out.meta["NCOMBINE"] == 3 and "AZCOADD" in out.meta
        assert out.meta["OBJECT"] == "field" and "GAIN" not in out.meta
    assert res.calibrated.unit == u.electron and res.score.unit == u.electron**-1
    np.testing.assert_allclose(res.weights, [1.0, 1 / 1.5**2, 1 / 2.0**2])
    assert res.frames["depth_share"].sum() == pytest.approx(1.0)
    assert list(res.frames["sigma"]) == pytest.approx([1.0, 1.5, 2.0], rel=1e-12)


def test_clear_errors():
    frames = _small_frames()
    psfs = [psf_stamp(11, 2.5)] * 3
    with pytest.raises(ValueError, match="at least one image"):
        coadd([], psfs=[])
    with pytest.raises(ValueError, match="shape"):
        coadd([frames[0], frames[1][:80, :80]], psfs=psfs[:2])
    other = CCDData(frames[1].data, unit="adu",
                    uncertainty=StdDevUncertainty(np.ones((96, 96))))
    with pytest.raises(u.UnitsError, match="in adu and the first image in electron.*gain="):
        coadd([frames[0], other], psfs=psfs[:2])
    with pytest.raises(ValueError, match="psfs has 2 entries"):
        coadd(frames, psfs=psfs[:2], flux_scales=[1.0] * 3)
    with pytest.raises(ValueError, match="flux_scales has 4 entries"):
        coadd(frames, psfs=psfs, flux_scales=[1.0] * 4)
    with pytest.raises(ValueError, match="positive"):
        coadd(frames, psfs=psfs, flux_scales=[1.0, -1.0, 1.0])
    with pytest.raises(TypeError, match="iterable of images"):
        coadd(frames[0])
    with pytest.raises(TypeError, match="one value per image"):
        coadd(frames, psfs=psfs[0])
    with pytest.raises(ValueError, match="align"):
        coadd(frames, psfs=psfs, align="sideways")
    with pytest.raises(ValueError, match="no unit"):
        coadd([fr.data for fr in frames], psfs=psfs)
    with pytest.raises(ValueError, match="backend must be 'numpy' or 'cupy'"):
        coadd(frames, psfs=psfs, backend="torch")


def test_cupy_backend_without_cupy_names_the_package():
    """backend='cupy' fails before any image is read when CuPy is not installed."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed: the error for its absence cannot be raised")

    def never_read():
        raise AssertionError("an image was read before the backend was checked")
        yield

    with pytest.raises(ImportError, match="pip install cupy-cuda12x"):
        coadd(never_read(), backend="cupy")


# --------------------------------------------------------------------------------------
# few stars: the PSF ladder's errors, flux scales from few stars or a pixel fit


def _sparse_frames(flux_scales, n_stars=3, seed=31):
    """Frames of the same few bright stars, Gaussian FWHM 3 px, scaled by ``flux_scales``."""
    truth = simulate_image((256, 256), n_stars=n_stars, flux_range=(5e4, 2e5),
                           min_separation=50.0, edge=30.0, seed=seed).truth
    return [simulate_image((256, 256), psf=3.0, sky=200.0, seed=seed + 1 + j,
                           stars=Table({"x": truth["x"], "y": truth["y"],
                                        "flux": truth["flux"] * f})).ccd
            for j, f in enumerate(flux_scales)]


def test_frame_without_stars_names_it_and_the_option():
    frames = _noise_frames(128, 3, seed=30)
    with pytest.raises(ValueError, match=r"^image 0: .*psfs="):
        record_warnings(lambda: coadd(frames))


def test_flux_scales_from_few_stars_are_announced_and_right():
    """3 matched stars (fewer than MIN_SCALE_STARS): the scales are right, and said to be few."""
    scales = [1.0, 0.7, 1.3]
    result, caught = record_warnings(lambda: coadd(_sparse_frames(scales), psfs=[3.0] * 3))
    fitted = np.asarray(result.frames["flux_scale"])
    errors = np.asarray(result.frames["flux_scale_err"])
    assert (errors[1:] < 0.01).all()
    assert (np.abs(fitted - scales)[1:] < 3 * errors[1:] + 0.002).all()
    messages = sorted(str(w.message) for w in caught
                      if issubclass(w.category, FewStarsWarning) and "flux scale" in str(w.message))
    assert messages == [f"image {j}: the flux scale comes from only 3 star(s) matched with the "
                        "first image (5 wanted)" for j in (1, 2)]


def test_flux_scale_falls_back_to_a_pixel_fit(monkeypatch):
    """No star matches (the matching made to fail): the pixel fit gives the scale, announced."""
    import astro_zackay.coaddition as coaddition

    def no_match(*args, **kwargs):
        raise ValueError("only 0 stars match")

    monkeypatch.setattr(coaddition, "match_stars", no_match)
    result, caught = record_warnings(lambda: coadd(_sparse_frames([1.0, 0.7]), psfs=[3.0] * 2))
    fitted, error = result.frames["flux_scale"][1], result.frames["flux_scale_err"][1]
    assert fitted == pytest.approx(0.7, abs=3 * error + 0.005)
    messages = [str(w.message) for w in caught
                if issubclass(w.category, FewStarsWarning) and "flux scale" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith("image 1: no star matches the first image (only 0 stars")
    assert "pixel fit" in messages[0]


def test_frames_without_common_sources_need_flux_scales():
    """Frames of different stars: no match and no pixel fit, so flux_scales= is asked for."""
    frames = [simulate_image((128, 128), psf=3.0, n_stars=15, flux_range=(1e4, 1e5),
                             seed=40 + j).ccd for j in range(2)]
    with pytest.raises(ValueError, match=r"^image 1: the flux scale .* pass flux_scales="):
        record_warnings(lambda: coadd(frames, psfs=[3.0, 3.0]))


# --------------------------------------------------------------------------------------
# the coadd as the reference of subtract


def _at_origin(stamp, shape):
    full = np.zeros(shape)
    full[: stamp.shape[0], : stamp.shape[1]] = stamp
    return np.roll(full, (-(stamp.shape[0] // 2), -(stamp.shape[1] // 2)), (0, 1))


def test_coadd_as_subtraction_reference():
    """Coadd 10 references, subtract a new image with transients: Scorr = ZOGY's S/N."""
    from astro_zackay.subtraction import subtract

    n, nf = 512, 10
    rng = np.random.default_rng(8)
    truth = simulate_image((n, n), n_stars=60, flux_range=(2e3, 1e5), seed=21).truth
    fwhm = 3.5 * np.exp(rng.normal(0.0, 0.2, nf))
    flux_scales = rng.uniform(0.7, 1.3, nf)
    flux_scales[0] = 1.0
    sky = rng.uniform(100.0, 400.0, nf)
    frames, psfs = [], []
    for j in range(nf):
        stars = Table({"x": truth["x"], "y": truth["y"], "flux": truth["flux"] * flux_scales[j]})
        sim = simulate_image((n, n), psf=fwhm[j], stars=stars, sky=sky[j],
                             read_noise=READ_NOISE, seed=200 + j)
        frames.append(sim.ccd)
        psfs.append(sim.psf.stamp(n / 2, n / 2))
    ref = coadd(frames, psfs=psfs, flux_scales=flux_scales)

    f_new, sky_new = 0.8, 250.0
    stars = Table({"x": truth["x"], "y": truth["y"], "flux": truth["flux"] * f_new})
    sim = simulate_image((n, n), psf=4.0, stars=stars, sky=sky_new, read_noise=READ_NOISE,
                         seed=999)
    psf_new = sim.psf.stamp(n / 2, n / 2)
    # ZOGY's S/N of a transient of unit reference-frame flux (eq 17 with Fr = 1, sr = 1/F_R)
    pr2 = np.abs(np.fft.fft2(_at_origin(ref.psf, (n, n)))) ** 2
    pn2 = np.abs(np.fft.fft2(_at_origin(psf_new, (n, n)))) ** 2
    s_new2, s_ref2 = sky_new + READ_NOISE**2, 1.0 / ref.flux_scale**2
    f_s = np.sum(f_new**2 * pn2 * pr2 / (s_new2 * pr2 + s_ref2 * f_new**2 * pn2)) / n**2
    target = 8.0
    xs, ys, _ = _grid(n, 40, 40)
    keep = np.hypot(xs[:, None] - truth["x"][None, :],
                    ys[:, None] - truth["y"][None, :]).min(axis=1) > 12
    transients = Table({"x": xs.astype(float), "y": ys.astype(float),
                        "flux": np.full(xs.size, f_new * target / np.sqrt(f_s))})
    science = inject_sources(sim.ccd, transients, psf_new, add_noise=False)

    bright = truth[truth["flux"] > 1e4]
    yy, xx = np.mgrid[:n, :n]
    near_bright = np.zeros((n, n), bool)
    for star in bright:
        near_bright |= np.hypot(xx - star["x"], yy - star["y"]) < 6
    for x0, y0 in zip(xs, ys):  # not the transients injected next to stars
        near_bright &= np.hypot(xx - x0, yy - y0) > 8
    for reference, kwargs in ((ref, {}), (ref.calibrated, {"reference_psf": ref.psf})):
        sub = subtract(reference, science, science_psf=psf_new, flux_ratio=f_new,
                       fit_shift=False, astrometric_noise=None, **kwargs)
        scorr = sub.score.data[ys[keep], xs[keep]]
        assert keep.sum() > 80
        assert scorr.mean() / target == pytest.approx(1.0, abs=0.04)
        # the bright reference stars subtract cleanly: no |Scorr| > 5 residual near them
        assert len(bright) >= 8 and not (np.abs(sub.score.data[near_bright]) > 5).any()


def test_coadd_pair_flux_ratio_from_the_exact_psfs():
    """Two coadds of mixed seeing: the flux ratio's aperture correction comes from P_R.

    One Moffat profile per star misdescribes a mixture of seeings (FWHM 2 and 9 px):
    its aperture correction gave a ratio of 0.928 for the true 0.8; P_R gives 0.8005.
    """
    from astro_zackay.subtraction import subtract

    n = 384
    truth = simulate_image((n, n), n_stars=120, flux_range=(3e3, 3e5), seed=5, edge=20).truth

    def stack(fwhm, flux, seed):
        frames, psfs = [], []
        for j, w in enumerate(fwhm):
            stars = Table({"x": truth["x"], "y": truth["y"], "flux": truth["flux"] * flux})
            sim = simulate_image((n, n), psf=w, stars=stars, sky=200.0, seed=seed + j)
            frames.append(sim.ccd)
            psfs.append(sim.psf.stamp(n / 2, n / 2))
        return coadd(frames, psfs=psfs, flux_scales=[1.0] * len(fwhm))

    reference = stack([2.0, 2.0, 9.0], 1.0, 100)
    science = stack([3.0, 3.0], 0.8, 200)  # calibrated in its first frame's units: 0.8
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewStarsWarning)  # the ratio comes from the stars
        result = subtract(reference, science)
    assert result.flux_ratio == pytest.approx(0.8, abs=0.004)


def _negative_fraction(stamp):
    """The fraction of a stamp's sum in its negative pixels."""
    stamp = stamp / stamp.sum()
    return float(-stamp[stamp < 0].sum())


@pytest.mark.filterwarnings("ignore::astro_zackay._warnings.PSFQualityWarning")
@pytest.mark.filterwarnings("ignore::astro_zackay._warnings.FewStarsWarning")
def test_coadd_of_small_frames_subtracts(monkeypatch):
    """Four 96 px frames of 25 stars, PSFs estimated: their coadd goes into `subtract`.

    The estimated stamps hold noise in their wings (the noisiest here a third of its sum
    in negative pixels); P_R's zero-phase modulus spread it over a stamp twice the input
    stamps, which held 14 % of P_R's sum in negative pixels, and `subtract` refused it.
    Cut at the input stamps, P_R is no noisier than its inputs weighted by their depth,
    and the difference with a fifth frame has unit Scorr noise.
    """
    from astro_zackay.coadd_algebra import ProperCoaddAccumulator
    from astro_zackay.subtraction import subtract

    stamps = []
    add = ProperCoaddAccumulator.add

    def spy(self, image, psf, *args, **kwargs):
        stamps.append(np.array(psf))
        return add(self, image, psf, *args, **kwargs)

    monkeypatch.setattr(ProperCoaddAccumulator, "add", spy)
    fwhm = (2.5, 3.5, 3.0, 4.0)
    first = simulate_image((96, 96), n_stars=25, flux_range=(3e3, 2e5), psf=fwhm[0], seed=20,
                           wcs=False)
    frames = [first.ccd] + [simulate_image((96, 96), stars=first.truth, psf=w, seed=20 + j,
                                           wcs=False).ccd for j, w in enumerate(fwhm[1:], 1)]
    res = coadd(frames)
    assert len(stamps) == 4 and res.psf.shape == (max(s.shape[0] for s in stamps),) * 2
    inputs = np.dot(res.frames["depth_share"], [_negative_fraction(s) for s in stamps])
    assert _negative_fraction(res.psf) < inputs

    science = simulate_image((96, 96), stars=first.truth, psf=3.0, seed=29, wcs=False).ccd
    score = subtract(res, science).score
    values = score.data[~score.mask]
    robust_std = 1.4826 * np.median(np.abs(values - np.median(values)))
    assert 0.8 < robust_std < 1.3


# --------------------------------------------------------------------------------------
# the default path: background, noise, PSF and flux scales all estimated; alignment


def _same_field(n, fwhm, flux_scales, *, n_stars, shifts=None, seed=11):
    truth = simulate_image((n, n), n_stars=n_stars, flux_range=(2e3, 3e5), seed=seed).truth
    rng = np.random.default_rng(seed)
    frames, psfs = [], []
    for j, (w, f) in enumerate(zip(fwhm, flux_scales)):
        dx, dy = (0.0, 0.0) if shifts is None else shifts[j]
        stars = Table({"x": truth["x"] + dx, "y": truth["y"] + dy, "flux": truth["flux"] * f})
        sim = simulate_image((n, n), psf=w, stars=stars, sky=rng.uniform(100, 400),
                             seed=70 + j)
        frames.append(sim.ccd)
        psfs.append(sim.psf.stamp(n / 2, n / 2))
    return frames, psfs, truth


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::astro_zackay._warnings.PSFQualityWarning")
def test_default_estimates():
    flux_scales = [1.0, 0.6, 1.4, 0.9]
    frames, psfs, truth = _same_field(384, [3.0, 4.2, 2.7, 3.6], flux_scales, n_stars=250)
    res = coadd(frames)
    fitted = np.asarray(res.frames["flux_scale"])
    # loose: limited by estimate_psf, whose stamps come out 5-20 % too broad (sum P**2) here
    np.testing.assert_allclose(fitted, flux_scales, rtol=0.15)
    sigma_true = [np.median(fr.uncertainty.array) for fr in frames]
    np.testing.assert_allclose(res.frames["sigma"], sigma_true, rtol=0.02)
    assert res.psf.sum() == pytest.approx(1.0)
    bright = truth[np.argmax(truth["flux"])]
    iy, ix = np.unravel_index(np.argmax(res.snr.data), res.snr.shape)
    assert abs(ix - bright["x"]) <= 1 and abs(iy - bright["y"]) <= 1


def test_align_onto_first_image():
    shifts = [(0.0, 0.0), (3.0, -2.0), (-1.5, 2.5)]
    frames, psfs, truth = _same_field(192, [3.0, 3.5, 3.2], [1.0, 1.0, 1.0], n_stars=80,
                                      shifts=shifts, seed=4)
    kwargs = {"psfs": psfs, "flux_scales": [1.0, 1.0, 1.0]}
    aligned = coadd(frames, align=True, **kwargs)
    unaligned = coadd(frames, **kwargs)
    bright = truth[np.argsort(truth["flux"])[-5:]]
    xs, ys = np.round(bright["x"]).astype(int), np.round(bright["y"]).astype(int)
    # all three frames stack on the first image's stars only when aligned
    assert (aligned.snr.data[ys, xs] > 1.3 * unaligned.snr.data[ys, xs]).all()
    assert (aligned.n_used[20:-20, -2:] == 2).all() and aligned.n_used[96, 96] == 3


# --------------------------------------------------------------------------------------
# memory


def test_memory_does_not_grow_with_the_number_of_frames(tmp_path):
    """The peak memory over 12 frames is that over 3, with and without rejection.

    (Rejection reads the frames back from a temporary file one at a time.)
    """
    import tracemalloc

    n, nf = 256, 12
    rng = np.random.default_rng(12)
    paths = []
    for j in range(nf):
        ccd = CCDData(rng.normal(0.0, 2.0, (n, n)), unit="electron",
                      uncertainty=StdDevUncertainty(np.full((n, n), 2.0)))
        paths.append(tmp_path / f"frame{j:02d}.fits")
        ccd.write(paths[-1])
    psfs = [psf_stamp(15, 2.5 + 0.1 * j) for j in range(nf)]
    peaks = {}
    for reject in (None, 6.0):
        for k in (3, nf):
            tracemalloc.start()
            coadd(paths[:k], psfs=psfs[:k], flux_scales=[1.0] * k, reject=reject)
            peaks[reject, k] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peaks[None, nf] < 1.5 * peaks[None, 3]
    assert peaks[None, 3] < 20 * 8 * n * n  # a few frames' worth
    assert peaks[6.0, nf] < 1.5 * peaks[6.0, 3]
    assert peaks[6.0, 3] < 40 * 8 * n * n


def test_moffat_encircled_energy_limits():
    """The aperture correction of the flux scales: Gaussian limit and Moffat wings."""
    from astro_zackay.fluxmatch import moffat_encircled_energy

    # Gaussian: 1 - 2**(-4 (R/FWHM)**2)
    assert moffat_encircled_energy(4.0, 1e6, 6.0) == pytest.approx(1 - 2 ** (-4 * 1.5**2),
                                                                   rel=1e-4)
    # Moffat beta 2.5: alpha = FWHM / (2 sqrt(2**0.4 - 1)), EE = 1 - (1 + (R/alpha)**2)**-1.5
    alpha = 4.0 / (2 * np.sqrt(2**0.4 - 1))
    assert moffat_encircled_energy(4.0, 2.5, 6.0) == pytest.approx(
        1 - (1 + (6.0 / alpha) ** 2) ** -1.5, rel=1e-12)
    # more light outside for smaller beta, less for a larger radius
    assert moffat_encircled_energy(4.0, 2.0, 6.0) < moffat_encircled_energy(4.0, 4.0, 6.0)
    assert moffat_encircled_energy(4.0, 2.5, 6.0) < moffat_encircled_energy(4.0, 2.5, 8.0)


# --------------------------------------------------------------------------------------
# the preparation stage shared with subtraction


def test_prepare_image_subtracts_the_background_in_place():
    """Sky 200 e- and noise sqrt(200 + 25) e-: the prepared data is the coerced image's
    own array, background-subtracted (sky within 0.2 e-), masked pixels 0; sigma is
    the true background noise; the estimated PSF's core is the true one (L1 < 0.05 within 3 px)."""
    from astro_zackay._ccd import to_image
    from astro_zackay._prepare import prepare_image

    sim = simulate_image((256, 256), n_stars=80, flux_range=(2e3, 5e4), psf=3.0, sky=200.0,
                         read_noise=5.0, seed=8, wcs=False)
    ccd = sim.ccd
    ccd.mask = np.zeros(ccd.shape, bool)
    ccd.mask[10:14, 20:30] = True
    original = ccd.data.copy()
    img = to_image(ccd)
    prep = prepare_image(img, None, name="image 0", option="psfs=")
    np.testing.assert_array_equal(ccd.data, original)  # the input is not touched
    assert prep.data is img.data and prep.image.variance is img.variance
    assert prep.image.sky_maps is None  # those of the pixels before the subtraction
    assert (prep.data[10:14, 20:30] == 0).all()
    stars = sim.truth
    yy, xx = np.mgrid[:256, :256]
    far = np.min([np.hypot(xx - x, yy - y) for x, y in zip(stars["x"], stars["y"])],
                 axis=0) > 12
    assert abs(np.median(prep.data[far & ~img.mask])) < 0.2
    assert prep.sigma == pytest.approx(np.sqrt(200.0 + 25.0), rel=0.02)
    assert len(prep.stars) >= 20
    stamp = prep.psf_stamp()
    h = stamp.shape[0] // 2
    core = np.s_[h - 3:h + 4, h - 3:h + 4]  # the wings hold the estimate's noise
    assert np.abs(stamp - psf_stamp(stamp.shape[0], 3.0))[core].sum() < 0.05
