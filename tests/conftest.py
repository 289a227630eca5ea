"""Shared fixtures and helpers of the test suite."""

import os
import warnings
from pathlib import Path

import pytest

#: Where the real FITS images live: $ASTRO_ZACKAY_DATA, else ../shared/data beside the checkout.
_DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA_ROOT = Path(os.environ.get("ASTRO_ZACKAY_DATA", _DEFAULT_DATA))


def data_path(*parts: str) -> Path:
    """Path of a real data file under DATA_ROOT, skipping the test when it is absent."""
    path = DATA_ROOT.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"real data {path} not found: set ASTRO_ZACKAY_DATA to the folder holding "
            "properimage/, decam-sfft/ and nircam-a2744/"
        )
    return path


def record_warnings(call):
    """``call()`` and every warning it issued (each one, however often it repeats)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, caught


@pytest.fixture
def record_transform_workers(monkeypatch):
    """A function that starts recording the ``workers`` of every array-backend transform.

    Calling it patches `~astro_zackay.fourier.ArrayBackend`'s ``rfft2`` and ``irfft2``
    (for this test only) and returns the list that each transform from then on appends
    its ``workers`` to.
    """
    from astro_zackay import fourier

    def start() -> list:
        threads = []

        def counted(original):
            def transform(self, a, s=None, workers=None):
                threads.append(workers)
                return original(self, a, s=s, workers=workers)
            return transform

        for name in ("rfft2", "irfft2"):
            original = getattr(fourier.ArrayBackend, name)
            monkeypatch.setattr(fourier.ArrayBackend, name, counted(original))
        return threads

    return start


def ccd_state(ccd) -> tuple:
    """Copies of a CCDData's data, mask, uncertainty and meta, for `assert_ccd_unchanged`."""
    import copy

    unc = None if ccd.uncertainty is None else ccd.uncertainty.array.copy()
    mask = None if ccd.mask is None else ccd.mask.copy()
    return ccd.data.copy(), mask, unc, copy.deepcopy(dict(ccd.meta))


def assert_ccd_unchanged(ccd, before: tuple) -> None:
    """The caller's CCDData is as `ccd_state` saw it: no input is ever mutated."""
    import numpy as np

    data, mask, unc, meta = before
    np.testing.assert_array_equal(ccd.data, data)
    for now, then in ((ccd.mask, mask),
                      (None if ccd.uncertainty is None else ccd.uncertainty.array, unc)):
        assert (now is None) == (then is None)
        if then is not None:
            np.testing.assert_array_equal(now, then)
    assert dict(ccd.meta) == meta
