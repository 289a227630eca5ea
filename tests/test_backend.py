"""The array backend of the subtraction core: what goes to the device and what comes back.

CuPy is optional. The logic of the device path is tested on the CPU through the same
`~astro_zackay.fourier.ArrayBackend` interface: a backend whose arrays carry a marker
type counts every image-sized array (or stack) that crosses between host and "device",
and every use of a "device" array on the host.
"""

import sys
import types
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

from astro_zackay import subtract
from astro_zackay._zogy_field import zogy_field
from astro_zackay.fourier import ArrayBackend, convolve_fft, floored_inv_sqrt, psf_rfft
from astro_zackay.simulation import simulate_pair
from astro_zackay.zogy import zogy


class DeviceArray(np.ndarray):
    """A numpy array marked as living on the test backend's "device".

    Every use that would bring a device array to the host outside the backend's
    ``to_numpy`` is recorded in ``SYNCS`` while a `CountingBackend` runs: a host numpy
    function applied to it (not through the backend's ``xp``), and its conversion to a
    Python number, list or bool (a GPU synchronisation each).  ``np.asarray`` of a
    subclass cannot be intercepted; on CuPy it raises, which
    ``test_cupy_field_equals_numpy`` catches on a GPU.
    """

    def __array_function__(self, func, types, args, kwargs):
        if not _OnDeviceModule.active and func.__name__ not in _METADATA:
            _record("host " + func.__name__, self)
        return super().__array_function__(func, types, args, kwargs)

    def _synced(self, name):
        _record(name, self)
        return getattr(np.ndarray, name)

    def __float__(self):
        return self._synced("__float__")(self)

    def __int__(self):
        return self._synced("__int__")(self)

    def __bool__(self):
        return self._synced("__bool__")(self)

    def __index__(self):
        return self._synced("__index__")(self)

    def item(self, *args):
        return self._synced("item")(self, *args)

    def tolist(self):
        return self._synced("tolist")(self)


#: numpy functions that read only an array's metadata (no data leaves the device).
_METADATA = {"shape", "ndim", "size"}

#: The host uses of device arrays recorded while a `CountingBackend` runs, or None.
SYNCS = None


def _record(what, a):
    if SYNCS is not None:
        SYNCS.append((what, np.ndarray.__getattribute__(a, "shape")))


class _OnDeviceModule:
    """A module (numpy, scipy.ndimage) run "on the device": its new arrays are `DeviceArray`."""

    active = False

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if isinstance(attr, types.ModuleType):  # xp.lib.stride_tricks, xp.fft, ...
            return _OnDeviceModule(attr)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def on_device(*args, **kwargs):
            outer, _OnDeviceModule.active = _OnDeviceModule.active, True
            try:
                out = attr(*args, **kwargs)
            finally:
                _OnDeviceModule.active = outer
            return out.view(DeviceArray) if type(out) is np.ndarray else out

        return on_device


@dataclass(frozen=True)
class CountingBackend(ArrayBackend):
    """numpy "on a device": every host <-> device crossing of an array of ``ndim >= 2``
    and ``min_size`` elements is recorded ("up", "down"), as is every host use of a
    device array outside ``to_numpy`` ("host", see `DeviceArray`; any size).
    """

    min_size: int = 1
    moves: dict = field(default_factory=lambda: {"up": [], "down": []})

    def _big(self, a) -> bool:
        return np.ndim(a) >= 2 and np.size(a) >= self.min_size

    def asarray(self, a, dtype=None):
        if not isinstance(a, DeviceArray) and self._big(a):
            self.moves["up"].append(np.shape(a))
        return np.asarray(a, dtype=dtype).view(DeviceArray)

    def to_numpy(self, a):
        if a is None or np.isscalar(a):
            return a
        if self._big(a):
            self.moves["down"].append(np.shape(a))
        return np.asarray(a).view(np.ndarray)

    def rfft2(self, a, s=None, workers=None):
        return super().rfft2(a, s=s, workers=workers).view(DeviceArray)

    def irfft2(self, a, s, workers=None):
        return super().irfft2(a, s=s, workers=workers).view(DeviceArray)


def counting(min_size):
    return CountingBackend("numpy", _OnDeviceModule(np), scipy.fft,
                           _OnDeviceModule(scipy.ndimage), min_size=min_size)


@pytest.fixture
def host_uses():
    """The host uses of device arrays (`DeviceArray`) recorded during one test."""
    global SYNCS
    SYNCS = []
    try:
        yield SYNCS
    finally:
        SYNCS = None


def gaussian(sigma, size=15):
    h = size // 2
    y, x = np.mgrid[-h:h + 1, -h:h + 1]
    p = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return p / p.sum()


@pytest.fixture(scope="module")
def inputs():
    shape = (120, 150)
    rng = np.random.default_rng(2)
    sky = np.zeros(shape)
    sky[rng.integers(10, 110, 20), rng.integers(10, 140, 20)] = rng.uniform(1e3, 1e4, 20)
    new = convolve_fft(sky, psf_rfft(gaussian(2.0), shape)) + rng.normal(0, 2, shape)
    ref = convolve_fft(sky, psf_rfft(gaussian(1.5), shape)) + rng.normal(0, 1, shape)
    mask = np.zeros(shape, bool)
    mask[60:62, 70:73] = True

    def psf_new(x, y):
        return gaussian(1.8 + 0.5 * x / 150)

    return dict(new=new, ref=ref, psf_new=psf_new, psf_ref=lambda x, y: gaussian(1.5),
                varying=(True, False), rms_new=np.full(shape, 2.0), rms_ref=np.full(shape, 1.0),
                var_new=4.0 + new.clip(0), var_ref=1.0 + ref.clip(0), mask_new=mask,
                mask_ref=np.zeros(shape, bool), flux_ratio=1.0, flux_ratio_error=0.01,
                shift_ref=(0.4, -0.3), astrometric_noise=(0.02, 0.02), psf_error=(0.01, 0.01),
                tiles=64)


def test_field_moves_only_inputs_up_and_results_down(inputs, host_uses):
    """Only the 4 images and 3 masks go up; only the 5 result images come down; same numbers.

    No grid-sized array or stack of tiles (PSF transform, phase ramp, kernel, tile
    output) crosses, and no device array is used on the host.
    """
    shape = inputs["new"].shape
    be = counting(min_size=shape[0] * shape[1] // 4)
    on_device = zogy_field(**inputs, backend=be)
    assert host_uses == []
    on_host = zogy_field(**inputs, backend="numpy")
    assert be.moves["up"] == [shape] * 7  # new, ref, 2 variances, 2 bad-pixel masks, good mask
    # the S kernels' windows within the 15 px stamp's reach of their origin (each tile's,
    # for the mask growth), then D, S, Scorr, alpha, alpha_err
    window = (len(on_device.tiles), 31, 31)
    assert be.moves["down"] == [window] * 2 + [shape] * 5
    for name in ("D", "S", "Scorr", "alpha", "alpha_err", "mask", "psf_d", "tile_psfs"):
        np.testing.assert_array_equal(getattr(on_device, name), getattr(on_host, name))


def test_zogy_backend_uploads_once(inputs, host_uses):
    """zogy(backend=...) uploads its (padded) inputs once and brings back its outputs."""
    be = counting(min_size=inputs["new"].size // 4)
    kw = dict(sigma_new=2.0, sigma_ref=1.0, var_new=inputs["var_new"],
              var_ref=inputs["var_ref"], shift_ref=(0.4, -0.3), pad=True)
    res = zogy(inputs["new"], inputs["ref"], gaussian(2.0), gaussian(1.5), backend=be, **kw)
    # four numbers synchronise: the filters' floor and F_S, the two kernels' noise
    assert host_uses == [("__float__", ())] * 4
    plain = zogy(inputs["new"], inputs["ref"], gaussian(2.0), gaussian(1.5), **kw)
    assert len(be.moves["up"]) == 4
    # D, S, Scorr, V_SN, V_SR, P_D (the full grid: zogy's psf_d_at_origin)
    assert len(be.moves["down"]) == 6
    np.testing.assert_array_equal(res.Scorr, plain.Scorr)


def test_cupy_backend_without_cupy_names_the_wheel():
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed: the error for a missing CuPy cannot be raised")
    pair = simulate_pair((64, 64), n_stars=5, seed=1)
    with pytest.raises(ImportError, match="pip install cupy-cuda12x"):
        subtract(pair.reference.ccd, pair.science.ccd, backend="cupy")


def test_unknown_backend_is_rejected_before_any_work(monkeypatch):
    import astro_zackay.subtraction as sub

    def no_work(*args, **kwargs):
        raise AssertionError("the images were coerced before the backend was checked")

    monkeypatch.setattr(sub, "to_image", no_work)
    with pytest.raises(ValueError, match="backend"):
        subtract(np.zeros((32, 32)), np.zeros((32, 32)), backend="torch")


def test_cupy_field_equals_numpy(inputs):
    """On a GPU: the same results as numpy within 1e-3 sigma (float32)."""
    pytest.importorskip("cupy", reason="CuPy (and a CUDA GPU) is needed for the device path")
    gpu = zogy_field(**inputs, backend="cupy", dtype=np.float32)
    cpu = zogy_field(**inputs, backend="numpy", dtype=np.float32)
    good = ~cpu.mask
    assert np.max(np.abs(gpu.Scorr - cpu.Scorr)[good]) < 1e-3
    np.testing.assert_array_equal(gpu.mask, cpu.mask)


def test_each_image_is_coerced_once(monkeypatch):
    """subtract passes each input through the CCDData boundary (to_image) exactly once."""
    import astro_zackay._ccd as ccd

    original, calls = ccd.to_image, []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("astro_zackay") and getattr(module, "to_image", None) is original:
            monkeypatch.setattr(module, "to_image", counted)
    pair = simulate_pair((192, 192), n_stars=40, flux_range=(2e3, 1e5), seed=3)
    with warnings.catch_warnings():  # only the coercions are counted here
        warnings.simplefilter("ignore")
        subtract(pair.reference.ccd, pair.science.ccd)
    assert len(calls) == 2


def test_device_filters_are_formed_in_one_block_with_top_uploaded_once(monkeypatch, host_uses):
    """On a device backend the filters are one block, not CPU-cache-sized ones (a dozen
    kernel launches each): the denominator is floored once per grid of tiles, at
    per-tile tops uploaded once (already on the device), with the numbers of numpy's
    blocks.
    """
    from astro_zackay import _zogy_field

    calls = []

    def floored(den, per_tile=False, top=None):
        calls.append((np.shape(den), isinstance(top, DeviceArray)))
        return floored_inv_sqrt(den, per_tile=per_tile, top=top)

    monkeypatch.setattr(_zogy_field, "floored_inv_sqrt", floored)
    shape = (512, 512)
    rng = np.random.default_rng(4)
    new, ref = rng.normal(0, 2, shape), rng.normal(0, 1, shape)
    kw = dict(psf_new=lambda x, y: gaussian(1.8 + 0.5 * x / 512),
              psf_ref=lambda x, y: gaussian(1.5), varying=(True, False),
              rms_new=np.full(shape, 2.0), rms_ref=np.ones(shape), var_new=None, var_ref=None,
              mask_new=np.zeros(shape, bool), mask_ref=np.zeros(shape, bool), flux_ratio=1.0,
              tiles=128)
    on_host = zogy_field(new, ref, **kw, backend="numpy")
    blocks = len(calls)
    calls.clear()
    be = CountingBackend("cupy", _OnDeviceModule(np), scipy.fft, _OnDeviceModule(scipy.ndimage),
                         min_size=shape[0] * shape[1] // 4)
    on_device = zogy_field(new, ref, **kw, backend=be)
    n_tiles = len(on_device.tiles)
    # one call per grid of tiles (the filters' and a smaller one's), each of every tile and
    # frequency, at tops already on the device; numpy took cache-sized blocks
    grids = {den[1:] for den, _ in calls}
    assert len(calls) == len(grids) < blocks
    assert all(den[0] == n_tiles and den[1] in (2 * den[2] - 2, 2 * den[2] - 1)  # square grids
               for den, _ in calls)
    assert all(uploaded for _, uploaded in calls)
    assert host_uses == []
    np.testing.assert_allclose(on_device.Scorr, on_host.Scorr, rtol=1e-5, atol=1e-5)
