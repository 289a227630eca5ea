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


def input_hash(value) -> str:
    """A digest of everything a public call could mutate in one input.

    For a CCDData or NDData: the data (values, dtype and shape), the mask, the
    uncertainty (its class and array), the meta and the WCS header; for a Table: its
    columns and meta; for an array: its bytes, dtype and shape; lists, tuples and dicts
    are hashed item by item; anything else by its ``repr``. Two equal digests before
    and after a call mean the call left the input as it was.
    """
    import hashlib

    import numpy as np
    from astropy.nddata import NDData
    from astropy.table import Table

    digest = hashlib.sha256()

    def array(a) -> None:
        a = np.asarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())

    def meta(m) -> None:
        digest.update(repr(sorted((str(k), repr(v)) for k, v in dict(m).items())).encode())

    def walk(v) -> None:
        digest.update(type(v).__name__.encode())
        if isinstance(v, NDData):
            array(v.data)
            digest.update(b"mask")
            if v.mask is not None:
                array(v.mask)
            digest.update(b"uncertainty")
            if v.uncertainty is not None:
                digest.update(type(v.uncertainty).__name__.encode())
                array(v.uncertainty.array)
            meta(v.meta)
            digest.update(b"wcs")
            if v.wcs is not None:
                with warnings.catch_warnings():  # a NaN or inf card is hashed all the same
                    warnings.simplefilter("ignore")
                    digest.update(v.wcs.to_header_string(relax=True).encode())
        elif isinstance(v, Table):
            for name in v.colnames:
                digest.update(name.encode())
                array(v[name])
            meta(v.meta)
        elif isinstance(v, np.ndarray):
            array(v)
        elif isinstance(v, list | tuple):
            for item in v:
                walk(item)
        elif isinstance(v, dict):
            meta(v)
        else:
            digest.update(repr(v).encode())

    walk(value)
    return digest.hexdigest()


def assert_inputs_unchanged(call, *inputs):
    """``call()``'s result after checking that it left every one of ``inputs`` unchanged.

    The inputs are hashed with `input_hash` before and after; an exception from
    ``call`` is re-raised after the same check, so a refused call is checked too.
    """
    before = [input_hash(v) for v in inputs]
    try:
        return call()
    finally:
        after = [input_hash(v) for v in inputs]
        changed = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if b != a]
        assert not changed, f"inputs {changed} were mutated by the call"


@pytest.fixture(scope="session")
def small_pair():
    """A small simulated pair (96x96 px, 25 stars in electrons, with WCS and uncertainty),
    shared by the bad-input matrix and the mutation tests: never modify it."""
    from astro_zackay.simulation import simulate_pair

    return simulate_pair((96, 96), n_stars=25, flux_range=(3e3, 2e5), seed=2)
