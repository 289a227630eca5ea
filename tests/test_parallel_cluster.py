"""The cluster helper of astro_zackay.parallel: the caller's environment, workers' warnings."""

import os
import warnings

from astropy.utils.exceptions import AstropyUserWarning

from astro_zackay.parallel._cluster import _environment_kept, captured, reemit


class _Recorded(dict):
    """A stand-in for os.environ that records the keys written or removed."""

    def __init__(self, *args):
        super().__init__(*args)
        self.touched = []

    def __setitem__(self, key, value):
        self.touched.append(key)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.touched.append(key)
        super().__delitem__(key)

    def clear(self):
        self.touched.append("<all>")
        super().clear()


def test_environment_kept_restores_only_what_changed(monkeypatch):
    env = _Recorded({"KEPT": "1", "CHANGED": "a", "REMOVED": "x"})
    monkeypatch.setattr(os, "environ", env)
    with _environment_kept():
        env["CHANGED"] = "b"
        env["ADDED"] = "2"
        del env["REMOVED"]
        env.touched.clear()
    assert env == {"KEPT": "1", "CHANGED": "a", "REMOVED": "x"}
    assert sorted(env.touched) == ["ADDED", "CHANGED", "REMOVED"]


def test_captured_warnings_are_issued_once_at_the_callers_line():
    def task(n):
        for _ in range(n):
            warnings.warn("the same warning", AstropyUserWarning, stacklevel=1)
        warnings.warn("another", UserWarning, stacklevel=1)
        return n

    result, records = captured(task, 3)
    assert result == 3
    assert records == [(AstropyUserWarning, "the same warning"), (UserWarning, "another")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reemit(records + records)
    assert [str(w.message) for w in caught] == ["the same warning", "another"]
    assert all(w.filename == __file__ for w in caught)
