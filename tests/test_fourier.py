"""Tests of astro_zackay.fourier: PSF placement, padding, shifts and transforms."""

import numpy as np
import pytest
import scipy.fft

from astro_zackay.fourier import (
    abs2,
    convolve_fft,
    correlate_fft,
    fast_shape,
    floored_inv_sqrt,
    get_array_module,
    half_spectrum_sum,
    origin_to_stamp,
    pad_image,
    phase_ramp,
    psf_correlation_blocks,
    psf_rfft,
    psf_rfft_blocks,
    psf_to_origin,
    shift_image,
    unit_sum_psf,
)


def gaussian_stamp(sigma, size, x0=0.0, y0=0.0):
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    p = np.exp(-0.5 * ((x - x0) ** 2 + (y - y0) ** 2) / sigma**2)
    return p / p.sum()


def test_psf_to_origin_peak_and_equivalence_with_ifftshift():
    stamp = gaussian_stamp(1.5, 11)
    out = psf_to_origin(stamp, (40, 37))
    assert np.unravel_index(np.argmax(out), out.shape) == (0, 0)
    assert out.sum() == pytest.approx(1.0, abs=1e-14)
    # same as centring the stamp in the image and ifftshift (pitfall 1)
    centred = np.zeros((40, 37))
    centred[20 - 5 : 20 + 6, 18 - 5 : 18 + 6] = stamp
    np.testing.assert_array_equal(out, np.fft.ifftshift(centred))
    np.testing.assert_array_equal(origin_to_stamp(out, 11), stamp)


def test_psf_to_origin_known_offset():
    stamp = np.zeros((7, 9))
    stamp[3 + 2, 4 - 3] = 1.0  # two rows down, three columns left of the centre
    out = psf_to_origin(stamp, (16, 20))
    assert np.argwhere(out == 1.0).tolist() == [[2, 20 - 3]]


def test_delta_stamp_is_identity_convolution():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(30, 24))
    delta = np.zeros((5, 5))
    delta[2, 2] = 1.0
    k_h = psf_rfft(delta, img.shape)
    np.testing.assert_allclose(convolve_fft(img, k_h), img, atol=1e-13)
    np.testing.assert_allclose(correlate_fft(img, k_h), img, atol=1e-13)


def test_convolution_matches_direct_sum():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(20, 22))
    k = rng.normal(size=(5, 3))
    conv = convolve_fft(img, psf_rfft(k, img.shape))
    corr = correlate_fft(img, psf_rfft(k, img.shape))
    y, x = 7, 11
    direct_conv = sum(
        img[(y - i) % 20, (x - j) % 22] * k[i + 2, j + 1]
        for i in range(-2, 3)
        for j in range(-1, 2)
    )
    direct_corr = sum(
        img[(y + i) % 20, (x + j) % 22] * k[i + 2, j + 1]
        for i in range(-2, 3)
        for j in range(-1, 2)
    )
    assert conv[y, x] == pytest.approx(direct_conv, abs=1e-12)
    assert corr[y, x] == pytest.approx(direct_corr, abs=1e-12)


def test_even_or_oversized_stamp_rejected():
    with pytest.raises(ValueError, match="odd"):
        psf_to_origin(np.ones((4, 5)), (16, 16))
    with pytest.raises(ValueError, match="larger"):
        psf_to_origin(np.ones((21, 21)), (16, 16))
    with pytest.raises(ValueError, match="unit sum"):
        unit_sum_psf(np.ones((3, 3)))



def test_psf_rfft_blocks_checks_its_arguments_at_the_call():
    """Bad arguments raise when psf_rfft_blocks is called, not at the first block taken."""
    stamps = np.ones((2, 5, 5)) / 25
    with pytest.raises(ValueError, match=r"\(n, h, w\) stack"):
        psf_rfft_blocks(stamps[0], (16, 16), 4)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        psf_rfft_blocks(stamps, (16, 16), 0)
    with pytest.raises(ValueError, match=r"larger than the image grid \(.*\): give a PSF on a "
                                         r"stamp no larger than the image"):
        psf_rfft_blocks(stamps, (4, 16), 4)
    with pytest.raises(ValueError, match="odd sizes"):
        psf_rfft_blocks(np.ones((2, 4, 5)), (16, 16), 4)

@pytest.mark.parametrize("shape", [(64, 48), (33, 31), (9, 7)])
@pytest.mark.parametrize("shift", [(0.0, 0.0), (0.37, -1.6), (-3.0, 2.0)])
def test_psf_correlation_blocks_equal_the_conjugate_transform_times_the_ramp(shape, shift):
    """The direct DFT's blocks, joined, are conj(psf_rfft) x phase_ramp (odd and even
    sides, a stamp as large as a side, blocks that do not divide the rows)."""
    rng = np.random.default_rng(11)
    stamps = rng.random((2, 7, 7))
    joined = np.concatenate([b for _, b in psf_correlation_blocks(stamps, shape, shift, rows=5)],
                            axis=1)
    assert joined.dtype == np.complex64
    for stamp, got in zip(stamps, joined):
        expected = np.conj(psf_rfft(stamp, shape)) * phase_ramp(shape, *shift)
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def test_psf_correlation_blocks_correlate_and_move_an_image():
    """An image times the blocks, transformed back, is the image correlated with the
    stamp and moved by a whole-pixel shift (a direct sum)."""
    rng = np.random.default_rng(12)
    image = rng.normal(size=(20, 24))
    stamp = rng.random((3, 5))
    spectrum = scipy.fft.rfft2(image)
    for block, kernel in psf_correlation_blocks(stamp[None], image.shape, (2.0, -1.0), rows=7):
        spectrum[block] *= kernel[0]
    got = scipy.fft.irfft2(spectrum, s=image.shape)
    expected = np.zeros_like(image)
    for dy in range(-1, 2):
        for dx in range(-2, 3):
            expected += stamp[dy + 1, dx + 2] * np.roll(image, (-dy, -dx), axis=(0, 1))
    np.testing.assert_allclose(got, np.roll(expected, (-1, 2), axis=(0, 1)), atol=1e-5)


def test_psf_correlation_blocks_check_their_arguments_at_the_call():
    stamps = np.ones((2, 5, 5)) / 25
    with pytest.raises(ValueError, match=r"\(n, h, w\) stack"):
        psf_correlation_blocks(stamps[0], (16, 16))
    with pytest.raises(ValueError, match="rows must be >= 1"):
        psf_correlation_blocks(stamps, (16, 16), rows=0)
    with pytest.raises(ValueError, match=r"larger than the image grid \(.*\): give a PSF on a "
                                         r"stamp no larger than the image"):
        psf_correlation_blocks(stamps, (4, 16))
    with pytest.raises(ValueError, match="odd sizes"):
        psf_correlation_blocks(np.ones((2, 4, 5)), (16, 16))


def test_default_threads_follow_the_transform_size():
    """workers=None: one thread for a transform of fewer than THREADED_MIN_SIZE real
    values (a stamp), all cores (-1) for a larger one, counting a padded grid ``s`` and
    the stacked planes; an explicit number is passed on as it is."""
    import types

    from astro_zackay.fourier import THREADED_MIN_SIZE, ArrayBackend

    seen = []

    def recorded(name):
        def transform(a, s=None, workers=None):
            seen.append(workers)
            return getattr(scipy.fft, name)(a, s=s, workers=workers)
        return transform

    fake = types.SimpleNamespace(rfft2=recorded("rfft2"), irfft2=recorded("irfft2"))
    be = ArrayBackend("numpy", np, fake, None)
    side = int(np.sqrt(THREADED_MIN_SIZE))
    small = np.ones((side // 2, side // 2))
    spectrum = be.rfft2(small)
    be.irfft2(spectrum, s=small.shape)
    be.rfft2(small, s=(side, side))  # padded onto a grid of THREADED_MIN_SIZE values
    be.rfft2(np.ones((4, side // 2, side // 2)))  # four stacked planes: as many values
    be.rfft2(small, workers=3)
    assert seen == [1, 1, -1, -1, 3]


@pytest.mark.parametrize("shape,border", [((2049, 2049), 0), ((1000, 1500), 12), ((7, 13), 3)])
def test_fast_shape(shape, border):
    out = fast_shape(shape, border)
    for n, m in zip(shape, out):
        assert m >= n + 2 * border
        assert m == scipy.fft.next_fast_len(n + 2 * border, real=True)
        # nothing smaller between the minimum and the answer is 5-smooth
        for k in range(n + 2 * border, m):
            assert k != scipy.fft.next_fast_len(k, real=True)
    assert fast_shape((2049, 2049)) == (2160, 2160)  # 2**4 * 3**3 * 5


def test_pad_image_roundtrip_and_no_mutation():
    img = np.arange(12.0).reshape(3, 4)
    copy = img.copy()
    padded, inner = pad_image(img, (8, 9), fill=-1.0)
    np.testing.assert_array_equal(padded[inner], img)
    assert padded.sum() == img.sum() - (72 - 12)
    np.testing.assert_array_equal(img, copy)
    with pytest.raises(ValueError):
        pad_image(img, (2, 9))


@pytest.mark.parametrize("dx,dy", [(3, 0), (-2, 5), (7, -11)])
def test_integer_shift_equals_roll(dx, dy):
    rng = np.random.default_rng(2)
    img = rng.normal(size=(32, 27))
    np.testing.assert_allclose(
        shift_image(img, dx, dy), np.roll(img, (dy, dx), axis=(0, 1)), atol=1e-12
    )


def test_subpixel_shift_moves_centroid():
    n = 64
    y, x = np.mgrid[:n, :n]
    img = np.exp(-0.5 * ((x - 30.0) ** 2 + (y - 33.0) ** 2) / 2.5**2)
    out = shift_image(img, 0.37, -0.81)
    cx, cy = (out * x).sum() / out.sum(), (out * y).sum() / out.sum()
    assert cx == pytest.approx(30.37, abs=1e-4)
    assert cy == pytest.approx(33.0 - 0.81, abs=1e-4)
    expected = np.exp(-0.5 * ((x - 30.37) ** 2 + (y - 32.19) ** 2) / 2.5**2)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_half_spectrum_sum_is_parseval():
    rng = np.random.default_rng(3)
    for shape in [(10, 12), (9, 11)]:
        a = rng.normal(size=shape)
        total = half_spectrum_sum(abs2(scipy.fft.rfft2(a)), shape[1]) / a.size
        assert total == pytest.approx((a**2).sum(), rel=1e-12)


def test_psf_rfft_float32_keeps_small_values():
    stamp = gaussian_stamp(2.0, 21)
    p64 = psf_rfft(stamp, (64, 64))
    p32 = psf_rfft(stamp, (64, 64), dtype=np.float32)
    assert p32.dtype == np.complex64
    assert p64[0, 0] == pytest.approx(1.0)
    # relative (not absolute) precision even where the transform is tiny
    tiny = np.abs(p64) < 1e-10
    assert tiny.any()
    np.testing.assert_allclose(np.abs(p32[tiny]), np.abs(p64[tiny]), rtol=1e-5)


def test_floored_inv_sqrt_never_infinite():
    den = np.array([1.0, 1e-30, 0.0], dtype=np.float32)
    inv, good = floored_inv_sqrt(den)
    assert np.all(np.isfinite(inv))
    assert good.tolist() == [True, False, False]


def test_backend_shim():
    be = get_array_module("numpy")
    assert be.xp is np and be.fft is scipy.fft
    with pytest.raises(ValueError, match="numpy"):
        get_array_module("torch")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="CuPy"):
            get_array_module("cupy")


@pytest.mark.parametrize("size", [5, 31, 67])
def test_psf_rfft_direct_dft_equals_fft(size):
    rng = np.random.default_rng(4)
    stamp = rng.uniform(size=(size, size - 2 if size > 5 else 3))
    stamp /= stamp.sum()
    shape = (96, 81)
    expected = scipy.fft.rfft2(psf_to_origin(stamp, shape))
    np.testing.assert_allclose(psf_rfft(stamp, shape), expected, atol=1e-14)
