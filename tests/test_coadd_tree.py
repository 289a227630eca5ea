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


@pytest.mark.parametrize("options, error, match", [
    ({"reject_grow": 2}, ValueError, "reject_grow tunes the outlier rejection, which "
                                     "coadd_tree does not do"),
    ({"reject_model_error": 0.2, "reject_grow": 1}, ValueError,
     "reject_grow, reject_model_error tune the outlier rejection"),
    ({"border": -1}, ValueError, "border must be a non-negative whole number"),
    ({"dtype": np.int32}, TypeError, "dtype must be numpy.float32 or numpy.float64"),
    ({"flux_scales": [1.0, 1.0, 0.0, 1.0, 1.0]}, ValueError,
     r"flux_scales\[2\] must be a positive number"),
    ({"unit": "notaunit"}, ValueError, "is not a unit astropy can parse"),
    ({"backend": "nope"}, ValueError, "backend must be 'numpy' or 'cupy'"),
    ({"min_depth_fraction": 2}, ValueError, "min_depth_fraction must be a fraction"),
    ({"gain": -1.0}, ValueError, "gain must be a positive finite number"),
    ({"psfs": [3.0, 3.0, 3.0, 3.0, 200.0]}, ValueError, "f4.fits"),
])
def test_options_are_checked_before_a_cluster_starts(frames, monkeypatch, options, error,
                                                     match):
    from astro_zackay.parallel import _coadd_tree

    def forbidden(*args, **kwargs):
        raise AssertionError("a cluster was started before the checks")

    monkeypatch.setattr(_coadd_tree, "cluster_client", forbidden)
    with pytest.raises(error, match=match):
        coadd_tree([str(p) for p in frames], **options)


def test_output_and_frame_shapes_are_checked_before_a_cluster_starts(frames, tmp_path,
                                                                      monkeypatch):
    from astro_zackay.parallel import _coadd_tree

    monkeypatch.setattr(_coadd_tree, "cluster_client", None)  # calling it would fail
    out = tmp_path / "coadd.fits"
    out.write_bytes(b"there")
    with pytest.raises(FileExistsError, match="exists: pass overwrite=True"):
        coadd_tree([str(p) for p in frames], out)
    wide = tmp_path / "wide.fits"
    fits.writeto(wide, np.zeros((128, 140), np.float32))
    with pytest.raises(ValueError, match="registered frames of one shape"):
        coadd_tree([str(frames[0]), str(wide)])


def test_merge_leaves_its_inputs_unchanged():
    from astro_zackay.parallel._coadd_tree import _merge

    rng = np.random.default_rng(3)
    psf = psf_stamp(9, 2.5)
    parts = []
    for s in (1.0, 2.0):
        acc = ProperCoaddAccumulator((32, 32), border=9)
        acc.add(rng.normal(0, s, (32, 32)), psf, s)
        parts.append(((acc, [f"frame {s}"], None), []))
    before = parts[0][0][0].finalize().R.copy()
    (merged, rows, _), _ = _merge(*parts)
    assert merged is not parts[0][0][0]
    assert merged.finalize().n_frames == 2
    assert parts[0][0][0].finalize().n_frames == 1
    np.testing.assert_array_equal(parts[0][0][0].finalize().R, before)
    assert parts[0][0][1] == ["frame 1.0"] and rows == ["frame 1.0", "frame 2.0"]


def test_a_cluster_without_workers_is_refused_for_a_flat_list(frames):
    with (local_cluster(0, processes=False) as (_, empty),
          pytest.raises(ValueError, match="the cluster of client= has no workers")):
        coadd_tree([str(p) for p in frames], client=empty)


def test_frames_with_and_without_masks_and_variances(client, tmp_path):
    """Plain frames and frames with MASK and UNCERT extensions (standard deviations, or
    variances) in one tree: the streamed coadd of the same files; the UncertaintyWarning
    of a frame's zero uncertainties, issued on a worker, reaches the caller once."""
    from astropy.nddata import CCDData, StdDevUncertainty, VarianceUncertainty

    from astro_zackay._warnings import UncertaintyWarning

    rng = np.random.default_rng(9)
    sky = np.zeros((96, 96))
    for x, y, f in rng.uniform((10, 10, 3000), (86, 86, 30000), (25, 3)):
        sky[int(y), int(x)] += f
    from scipy.signal import fftconvolve
    paths, psfs = [], []
    for j, (fwhm, s) in enumerate([(2.5, 3.0), (3.0, 4.0), (3.5, 2.0), (2.8, 5.0)]):
        img = fftconvolve(sky, psf_stamp(21, fwhm), mode="same") + 50.0
        img += rng.normal(0, s, sky.shape)
        mask = uncertainty = None
        if j in (1, 3):
            mask = np.zeros(sky.shape, bool)
            mask[20 + 10 * j:24 + 10 * j, 5:60] = True
        if j == 1:
            std = np.full(sky.shape, s)
            std[70, 70:73] = 0.0  # masked, with an UncertaintyWarning
            uncertainty = StdDevUncertainty(std)
        elif j == 2:
            uncertainty = VarianceUncertainty(np.full(sky.shape, s * s) + np.abs(img) / 10)
        paths.append(str(tmp_path / f"m{j}.fits"))
        CCDData(img, unit="electron", mask=mask, uncertainty=uncertainty).write(paths[-1])
        psfs.append(psf_stamp(21, fwhm))
    with pytest.warns(UncertaintyWarning, match="3 pixels with a zero uncertainty"):
        streamed = coadd(paths, psfs=psfs, reject=None, dtype=np.float64)
    with pytest.warns(UncertaintyWarning, match="3 pixels with a zero uncertainty") as caught:
        tree = coadd_tree([paths[:2], paths[2:]], client=client, psfs=psfs, dtype=np.float64)
    ours = [w for w in caught if issubclass(w.category, UncertaintyWarning)]
    assert len(ours) == 1 and ours[0].filename == __file__
    assert list(tree.frames["n_masked"]) == list(streamed.frames["n_masked"])
    assert tree.frames["n_masked"][1] >= 4 * 55 + 3
    scale = np.abs(streamed.image.data).max()
    np.testing.assert_allclose(tree.image.data, streamed.image.data, atol=1e-9 * scale)
    np.testing.assert_allclose(tree.image.uncertainty.array,
                               streamed.image.uncertainty.array, rtol=1e-9)
    np.testing.assert_array_equal(tree.image.mask, streamed.image.mask)
