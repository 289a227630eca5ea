"""The BLAS thread limit is scoped to the package's calls."""

from threadpoolctl import threadpool_info

from astro_zackay._threads import single_threaded_blas


def _blas_threads():
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_blas_is_single_threaded_inside_and_restored_after():
    before = _blas_threads()
    seen = []

    @single_threaded_blas
    def work():
        seen.extend(_blas_threads())
        return "done"

    assert work() == "done"
    assert seen and all(n == 1 for n in seen)
    assert _blas_threads() == before


def test_thread_pools_are_found_again_after_an_import(monkeypatch):
    """The loaded pools are found once (2-3 ms a search) and again after any import: a
    BLAS loaded since (by importing the module that links it) is limited too.
    """
    import sys
    import types

    from astro_zackay import _threads

    first = _threads._controller(len(sys.modules))
    assert _threads._controller(len(sys.modules)) is first
    monkeypatch.setitem(sys.modules, "_newly_imported_blas_user", types.ModuleType("m"))
    again = _threads._controller(len(sys.modules))
    assert again is not first
    assert {p.filepath for p in again.lib_controllers} >= {
        p.filepath for p in first.lib_controllers}
