"""coadd_tree: partial accumulators merged on a real LocalCluster equal the streamed coadd."""

import numpy as np
import pytest
from astropy.io import fits

from astro_zackay.coadd_algebra import ProperCoaddAccumulator
from astro_zackay.coaddition import coadd
from astro_zackay.profiles import psf_stamp

distributed = pytest.importorskip("distributed")

from _dask_cluster import local_cluster  # noqa: E402

from astro_zackay.parallel._coadd_tree import coadd_tree  # noqa: E402


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    rng = np.random.default_rng(5)
    d = tmp_path_factory.mktemp("frames")
    sky = np.zeros((128, 128))
    for x, y, f in rng.uniform((12, 12, 3000), (116, 116, 30000), (40, 3)):
        sky[int(y), int(x)] += f
    from scipy.signal import fftconvolve
    paths = []
    for j, (fwhm, s) in enumerate([(2.5, 3.0), (3.0, 4.0), (3.5, 2.0), (2.8, 5.0), (4.0, 3.0)]):
        img = fftconvolve(sky, psf_stamp(21, fwhm), mode="same") + 50.0
        img += rng.normal(0, s, sky.shape)
        path = d / f"f{j}.fits"
        hdu = fits.PrimaryHDU(img.astype(np.float32))
        hdu.header["BUNIT"] = "electron"
        hdu.writeto(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes on 127.0.0.1, closed after the module."""
    with local_cluster(2) as (_, c):
        yield c


def test_tree_equals_streamed_coadd(frames, client, tmp_path):
    psfs = [psf_stamp(21, f) for f in (2.5, 3.0, 3.5, 2.8, 4.0)]
    streamed = coadd([str(p) for p in frames], psfs=psfs, reject=None, dtype=np.float64)
    out = tmp_path / "coadd.fits"
    tree = coadd_tree([[str(p) for p in frames[:2]], [str(frames[2])],
                       [str(p) for p in frames[3:]]], out, client=client, psfs=psfs,
                      dtype=np.float64)
    assert list(tree.frames["name"]) == list(streamed.frames["name"])
    np.testing.assert_allclose(tree.frames["flux_scale"], streamed.frames["flux_scale"],
                               rtol=1e-12)
    scale = np.abs(streamed.image.data).max()
    np.testing.assert_allclose(tree.image.data, streamed.image.data, atol=1e-9 * scale)
    np.testing.assert_allclose(tree.image.uncertainty.array,
                               streamed.image.uncertainty.array, rtol=1e-9)
    np.testing.assert_allclose(tree.psf, streamed.psf, atol=1e-12)
    assert tree.flux_scale == pytest.approx(streamed.flux_scale, rel=1e-12)
    assert out.exists()


def test_flat_list_is_cut_over_the_workers(frames, client):
    psfs = [psf_stamp(21, f) for f in (2.5, 3.0, 3.5, 2.8, 4.0)]
    streamed = coadd([str(p) for p in frames], psfs=psfs, flux_scales=[1.0] * 5, reject=None)
    tree = coadd_tree([str(p) for p in frames], client=client, psfs=psfs,
                      flux_scales=[1.0] * 5)
    # float32 sums in another order: R has unit noise, so 1e-3 is a thousandth of a sigma
    np.testing.assert_allclose(tree.image.data, streamed.image.data, rtol=0, atol=1e-3)


def test_unmergeable_and_bad_options_are_refused(frames):
    with pytest.raises(ValueError, match="outlier rejection compares each frame"):
        coadd_tree([str(p) for p in frames], reject=6.0)
    with pytest.raises(TypeError, match="options that coadd does not take"):
        coadd_tree([str(p) for p in frames], tiles=3)
    with pytest.raises(ValueError, match="empty"):
        coadd_tree([])
    psfs = np.array([psf_stamp(21, 3.0)] * 4)  # an array of 4 stamps for 5 frames
    with pytest.raises(ValueError, match=r"psfs must give one value per frame \(5 frames\)"):
        coadd_tree([str(p) for p in frames], psfs=psfs)
    with pytest.raises(TypeError, match="mixes paths and groups"):
        coadd_tree([str(frames[0]), [str(frames[1])]])


def test_merge_refuses_other_grids_and_itself():
    a = ProperCoaddAccumulator((16, 16))
    with pytest.raises(ValueError, match="different shape"):
        a.merge(ProperCoaddAccumulator((16, 18)))
    with pytest.raises(ValueError, match="different dtype"):
        a.merge(ProperCoaddAccumulator((16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="with itself"):
        a.merge(a)
    with pytest.raises(TypeError, match="only a ProperCoaddAccumulator"):
        a.merge(np.zeros((16, 16)))


def test_merge_sums_every_quantity_with_masks_and_variances():
    rng = np.random.default_rng(2)
    psf = psf_stamp(9, 2.5)
    shape = (40, 40)
    frames = []
    for s in (1.0, 2.0, 1.5):
        img = rng.normal(0, s, shape)
        mask = rng.random(shape) < 0.02
        frames.append((img, s, mask, np.full(shape, s * s) + np.abs(img)))
    whole = ProperCoaddAccumulator(shape, border=9)
    parts = [ProperCoaddAccumulator(shape, border=9) for _ in range(2)]
    for j, (img, s, mask, var) in enumerate(frames):
        whole.add(img, psf, s, mask=mask, variance=var)
        parts[min(j, 1)].add(img, psf, s, mask=mask, variance=var)
    import pickle
    merged = pickle.loads(pickle.dumps(parts[0])).merge(pickle.loads(pickle.dumps(parts[1])))
    a, b = merged.finalize(), whole.finalize()
    for name in ("R", "S", "depth", "R_variance", "n_used"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    assert a.n_frames == b.n_frames == 3
