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
