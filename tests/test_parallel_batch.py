"""Batches on a real Dask LocalCluster (2 worker processes on the loopback interface).

The batch results are compared with serial runs of the same functions on the same
files; failures (a truncated file, a missing one, a worker killed mid-task) must fail
or retry only their own row.
"""

import os
import signal
import socket
import sys
import threading
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table

distributed = pytest.importorskip(
    "distributed", reason="batches run on dask.distributed (the 'all' extra)")

from _dask_cluster import local_cluster  # noqa: E402

from astro_zackay import coadd, subtract  # noqa: E402
from astro_zackay.cli import main  # noqa: E402
from astro_zackay.files import read_subtraction  # noqa: E402
from astro_zackay.parallel import coadd_batch, subtract_batch  # noqa: E402
from astro_zackay.simulation import simulate_image, simulate_pair  # noqa: E402

RATIOS = (0.85, 1.0, 1.2)


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes on 127.0.0.1, closed after the module."""
    with local_cluster(2) as pair:
        yield pair


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three 256^2 pairs of known flux ratio, a truncated science file and a missing one."""
    folder = tmp_path_factory.mktemp("pairs")
    for j, ratio in enumerate(RATIOS):
        pair = simulate_pair((256, 256), n_stars=60, flux_range=(2e3, 2e5), flux_ratio=ratio,
                             seed=5 + j)
        pair.reference.ccd.write(folder / f"ref{j}.fits")
        pair.science.ccd.write(folder / f"new{j}.fits")
    whole = (folder / "new0.fits").read_bytes()
    (folder / "cut.fits").write_bytes(whole[: len(whole) // 3])
    return folder


def good_pairs(folder):
    return [(folder / f"ref{j}.fits", folder / f"new{j}.fits") for j in range(len(RATIOS))]


@pytest.fixture(scope="module")
def batch(cluster, files, tmp_path_factory):
    """The three pairs, the truncated one and a missing one, through the cluster."""
    out = tmp_path_factory.mktemp("batch")
    (out / ".new1.attempts").write_text("host:1\n")  # left by an interrupted earlier run
    pairs = [*good_pairs(files), (files / "ref0.fits", files / "cut.fits"),
             (files / "ref1.fits", files / "gone.fits")]
    summary = subtract_batch(pairs, out, client=cluster[1], progress=False, threshold=5.0)
    return summary, out


def test_a_batch_equals_the_serial_subtractions(batch, files):
    summary, out = batch
    assert list(summary["name"][:3]) == ["new0", "new1", "new2"]
    for j, (reference, science) in enumerate(good_pairs(files)):
        row = summary[j]
        assert row["status"] == "ok" and row["error"] == "" and row["retries"] == 0
        serial = subtract(reference, science, workers=1)
        written = read_subtraction(row["output"])
        assert written.flux_ratio == pytest.approx(serial.flux_ratio, rel=1e-9)
        assert row["flux_ratio"] == pytest.approx(serial.flux_ratio, rel=1e-9)
        assert abs(row["flux_ratio"] - RATIOS[j]) < 0.03
        score = CCDData.read(row["output"], hdu="SCORR")
        expected = np.where(serial.score.mask, np.nan, serial.score.data)
        np.testing.assert_allclose(score.data, expected, rtol=0, atol=1e-5, equal_nan=True)
        candidates = Table.read(row["candidates"])
        good = serial.find_transients(threshold=5.0)["good"]
        assert row["n_candidates"] == int(np.sum(good)) == int(np.sum(candidates["good"]))
        assert fits.getheader(row["output"])["AZIN2"] == f"new{j}.fits"
        assert 0 < row["seconds"] < 120


def test_a_corrupt_or_missing_file_fails_only_its_row(batch):
    summary, out = batch
    assert list(summary["status"]) == ["ok", "ok", "ok", "failed", "failed"]
    truncated, missing = summary[3], summary[4]
    assert "cut.fits" in truncated["error"] and "truncated" in truncated["error"]
    assert "gone.fits" in missing["error"] and "does not exist" in missing["error"]
    assert summary["flux_ratio"].mask[3:].all() and summary["n_candidates"].mask[3:].all()
    assert not summary["flux_ratio"].mask[:3].any()
    # nothing written for the failed rows, no temporary or marker file left behind
    assert sorted(os.listdir(out)) == sorted(
        [f"new{j}{end}" for j in range(3) for end in (".fits", "_candidates.ecsv")])


def test_the_summary_round_trips_through_ecsv(batch, tmp_path):
    summary, _ = batch
    summary.write(tmp_path / "summary.ecsv")
    back = Table.read(tmp_path / "summary.ecsv")
    assert list(back["status"]) == list(summary["status"])
    assert back["n_candidates"].mask.tolist() == summary["n_candidates"].mask.tolist()
    assert back["seconds"].unit == "s"


def wait_for_first_attempt(marker, timeout):
    """The ``host:pid`` line the first attempt writes to ``marker``, once it is whole.

    The worker opens the marker (creating it) and then appends its line with a trailing
    newline, so the file can be seen empty or half written; it is unlinked when the task
    ends. Polls until the first line is complete, for at most ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = marker.read_text()
        except FileNotFoundError:  # not created yet (or already removed)
            text = ""
        if "\n" in text:
            return text.split("\n", 1)[0]
        time.sleep(0.01)
    raise AssertionError(f"no whole 'host:pid' line in {marker} after {timeout} s "
                         f"(last read: {text!r}): the task never started on a worker, "
                         f"or ended and removed it between two reads")


def kill_mid_task(client, folder):
    """Subtract one large pair, SIGKILL the worker process running it; the batch's row."""
    pair = simulate_pair((768, 768), n_stars=300, flux_range=(2e3, 2e5), seed=9)
    pair.reference.ccd.write(folder / "ref.fits")
    pair.science.ccd.write(folder / "new.fits")
    out = folder / "out"
    marker = out / ".new.attempts"  # each attempt writes its host:pid there first
    done = {}

    def run():
        done["summary"] = subtract_batch([(folder / "ref.fits", folder / "new.fits")], out,
                                         client=client, progress=False)

    thread = threading.Thread(target=run)
    thread.start()
    first = wait_for_first_attempt(marker, timeout=60)
    host, pid = first.rsplit(":", 1)
    assert host == socket.gethostname() and int(pid) != os.getpid()
    # the task unlinks its marker when it ends: both say the attempt is still running
    assert thread.is_alive() and marker.exists(), (
        "the batch finished before its worker could be killed: the test needs a task "
        "that runs longer than the wait for its marker (make the pair larger)")
    os.kill(int(pid), signal.SIGKILL)  # a worker process that our own cluster started
    thread.join(timeout=120)
    assert not marker.exists()
    return done["summary"][0]


def test_a_worker_killed_mid_task_is_rerun_and_the_row_says_so(cluster, tmp_path):
    """Dask reruns the task on a live worker; the row is ok and counts the rerun."""
    row = kill_mid_task(cluster[1], tmp_path)
    assert row["status"] == "ok", row["error"]
    assert row["retries"] == 1 and "died" in row["note"]
    cluster[1].wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker


def test_a_task_whose_worker_dies_too_often_fails_its_row(tmp_path):
    """With no failure allowed, Dask gives up (KilledWorker): the row says the worker died."""
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        local = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                         host="127.0.0.1", dashboard_address="127.0.0.1:0")
    with local, distributed.Client(local) as client:
        row = kill_mid_task(client, tmp_path)
    assert row["status"] == "failed" and row["retries"] == 0
    assert "worker died each of the 1 time(s)" in row["error"] and "KilledWorker" in row["error"]
    assert row["flux_ratio"] is np.ma.masked


def test_inputs_are_checked_before_any_cluster_starts(files, tmp_path):
    out = tmp_path / "out"
    pairs = good_pairs(files)
    with pytest.raises(TypeError, match=r"'threshhold'.*subtract\(\) does not take"):
        subtract_batch(pairs, out, threshhold=5)
    with pytest.raises(ValueError, match=r"flux_ratio must be a positive"):
        subtract_batch(pairs, out, flux_ratio=-1.0)
    with pytest.raises(ValueError, match=r"pairs\[1\] is .*two paths"):
        subtract_batch([pairs[0], (files / "ref1.fits",)], out)
    with pytest.raises(TypeError, match=r"pairs must be a list .* got int"):
        subtract_batch(3, out)
    with pytest.raises(ValueError, match=r"rows 1 and 2 have the same name 'a'"):
        subtract_batch(Table({"reference": [str(p[0]) for p in pairs[:2]],
                              "science": [str(p[1]) for p in pairs[:2]], "name": ["a", "a"]}),
                       out)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) 'science'"):
        subtract_batch(Table({"reference": ["a.fits"], "new": ["b.fits"]}), out)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"output_dir .* is a file"):
        subtract_batch(pairs, tmp_path / "file")
    with pytest.raises(ValueError, match=r"n_workers must be a whole number >= 1"):
        subtract_batch(pairs, out, n_workers=0)
    with pytest.raises(TypeError, match=r"'images'.*coadd\(\) does not take"):
        coadd_batch({"g": [files / "new0.fits", files / "new1.fits"]}, out, images=[])
    with pytest.raises(ValueError, match=r"group 'g' has 1 file"):
        coadd_batch({"g": [files / "new0.fits"]}, out)
    with pytest.raises(ValueError, match=r"psfs gives 3 values but group 'g' has 2"):
        coadd_batch({"g": [files / "new0.fits", files / "new1.fits"]}, out,
                    psfs=[2.0, 2.0, 2.0])
    assert not out.exists()  # nothing made: each mistake was found before any work


class _NoCluster:
    """A client that must not be used: a task submitted to it fails the test."""

    def submit(self, *args, **kwargs):
        raise AssertionError("a task was submitted")


def _placeholders(folder):
    """Files that exist (so that their rows would be submitted) but are never read."""
    paths = [folder / name for name in ("ref.fits", "new.fits", "old.fits")]
    for path in paths:
        path.write_text("never read")
    return paths


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tiles": 16}, r"tiles must be 'auto', None or an integer side >= 32 px, got 16"),
        ({"unit": "notaunit"}, r"science image: unit='notaunit' is not a unit astropy can "
                               r"parse"),
        ({"psf_error": -3}, r"psf_error must be >= 0 .*, got -3"),
        ({"gain": (1.4, 0.0)}, r"science image: gain must be a positive finite number"),
    ],
)
def test_subtract_options_that_would_fail_every_row_fail_before_any_task(
        tmp_path, options, match):
    """They passed the batch's checks and failed each row on the workers."""
    ref, new, _ = _placeholders(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        subtract_batch([(ref, new)], out, client=_NoCluster(), progress=False, **options)
    assert not out.exists()
    # the same pair with valid options reaches the client: the check above came first
    with pytest.raises(AssertionError, match=r"a task was submitted"):
        subtract_batch([(ref, new)], out, client=_NoCluster(), progress=False, tiles=64)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"psfs": -3.0}, ValueError, r"psfs\[0\] \(image 0\): "),
        ({"flux_scales": 0.0}, ValueError, r"flux_scales\[0\] must be a positive number"),
        ({"psfs": np.ones((5, 5))}, TypeError, r"psfs must give one value per image"),
        ({"sigmas": [1.0, np.nan]}, ValueError, r"sigmas\[1\] must be a positive number"),
        ({"unit": "notaunit"}, ValueError, r"unit='notaunit' is not a unit astropy can parse"),
        ({"reject": -1.0}, ValueError, r"reject must be a positive threshold"),
        ({"min_depth_fraction": 2}, ValueError, r"min_depth_fraction must be a fraction"),
        ({"dtype": np.int32}, TypeError, r"dtype must be numpy.float32 or numpy.float64"),
    ],
)
def test_coadd_options_that_would_fail_every_row_fail_before_any_task(
        tmp_path, options, error, match):
    """A per-image option given as one number is checked as every image's value."""
    paths = _placeholders(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        coadd_batch({"g": paths[:2]}, out, client=_NoCluster(), progress=False, **options)
    assert not out.exists()
    with pytest.raises(AssertionError, match=r"a task was submitted"):
        coadd_batch({"g": paths[:2]}, out, client=_NoCluster(), progress=False, psfs=3.0,
                    flux_scales=[1.0, 2.0])


def test_existing_outputs_are_refused_before_any_work(batch, files, cluster):
    summary, out = batch
    before = os.stat(summary["output"][0]).st_mtime_ns
    with pytest.raises(FileExistsError, match=r"6 output file\(s\) exist.*overwrite=True"):
        subtract_batch(good_pairs(files), out, client=cluster[1], progress=False)
    assert os.stat(summary["output"][0]).st_mtime_ns == before


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Five registered 128^2 frames of one field with FWHM from 2.5 to 4.0."""
    folder = tmp_path_factory.mktemp("frames")
    stars = simulate_image((128, 128), n_stars=20, flux_range=(1e4, 1e5), seed=0).truth
    for j, fwhm in enumerate((2.5, 3.5, 3.0, 4.0, 2.8)):
        sim = simulate_image((128, 128), psf=fwhm, stars=stars["x", "y", "flux"], seed=j)
        sim.ccd.write(folder / f"frame{j}.fits")
    return folder


def test_a_coadd_batch_equals_the_serial_coadds(cluster, frames, tmp_path, capsys):
    pytest.importorskip("tqdm", reason="the progress bar needs tqdm (the 'all' extra)")
    groups = Table({"group": ["a", "b", "a", "b", "b"],
                    "path": [str(frames / f"frame{j}.fits") for j in range(5)]})
    groups.write(tmp_path / "groups.csv")
    summary = coadd_batch(tmp_path / "groups.csv", tmp_path / "out", client=cluster[1],
                          progress=True, psfs=3.0, reject=None)
    assert "coadd" in capsys.readouterr().err  # the bar, on stderr
    assert list(summary["group"]) == ["a", "b"] and list(summary["n_images"]) == [2, 3]
    assert list(summary["status"]) == ["ok", "ok"], list(summary["error"])
    for row, members in zip(summary, ([0, 2], [1, 3, 4])):
        serial = coadd([str(frames / f"frame{j}.fits") for j in members],
                       psfs=[3.0] * len(members), reject=None)
        written = CCDData.read(row["output"], hdu="PROPER")
        expected = np.where(serial.image.mask, np.nan, serial.image.data)
        np.testing.assert_allclose(written.data, expected, rtol=0, atol=1e-5, equal_nan=True)
        assert row["flux_scale"] == pytest.approx(serial.flux_scale, rel=1e-6)
        assert fits.getheader(row["output"])["NCOMBINE"] == len(members)


def test_cli_batch_writes_the_summary_and_exits_1_on_a_failed_row(
        cluster, files, tmp_path, capsys):
    pairs = Table({"reference": [str(files / "ref0.fits"), str(files / "ref1.fits")],
                   "science": [str(files / "new0.fits"), str(files / "cut.fits")],
                   "name": ["good", "bad"]})
    pairs.write(tmp_path / "pairs.csv")
    address = cluster[0].scheduler_address
    args = ["batch", str(tmp_path / "pairs.csv"), "--outdir", str(tmp_path / "out"),
            "--scheduler", address, "--threshold", "6"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "failed bad" in err and "cut.fits" in err and "Traceback" not in err
    summary = Table.read(tmp_path / "out" / "summary.ecsv")
    assert list(summary["status"]) == ["ok", "failed"] and list(summary["name"]) == ["good", "bad"]
    assert summary.meta["threshold"] == 6.0
    # a second run refuses to overwrite, before any work: exit 2
    assert main(args) == 2
    assert "summary.ecsv" in (err := capsys.readouterr().err) and "--overwrite" in err
    # every row ok: exit 0, the summary replaced with --overwrite
    pairs[:1].write(tmp_path / "good.csv")
    assert main(["-q", "batch", str(tmp_path / "good.csv"), "--outdir", str(tmp_path / "out"),
                 "--scheduler", address, "--overwrite"]) == 0
    assert list(Table.read(tmp_path / "out" / "summary.ecsv")["name"]) == ["good"]


def test_cli_coadd_batch_on_its_own_local_cluster(frames, tmp_path, capsys, monkeypatch):
    """Its own cluster, closed at the end; Dask's nanny leaves our environment as it was."""
    for name in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    (tmp_path / "groups.csv").write_text(
        "group,path\n" + "".join(f"all,{frames / f'frame{j}.fits'}\n" for j in range(3)))
    assert main(["-q", "coadd-batch", str(tmp_path / "groups.csv"), "--outdir",
                 str(tmp_path / "out"), "--workers", "1", "--fwhm", "3", "--no-reject"]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no progress, no info line
    assert dict(os.environ) == before
    summary = Table.read(tmp_path / "out" / "summary.ecsv")
    assert list(summary["status"]) == ["ok"] and summary["n_images"][0] == 3
    assert fits.getheader(tmp_path / "out" / "all.fits")["NCOMBINE"] == 3


def test_the_one_local_cluster_of_the_parallel_functions(monkeypatch):
    """subtract_batch, coadd_batch, subtract_tiled and coadd_tree share it: sized to the
    tasks, workers without Dask's malloc trim threshold, the caller's environment kept."""
    from astro_zackay.parallel import _batch, _coadd_tree, _tiled
    from astro_zackay.parallel._cluster import cluster_client

    assert _batch.cluster_client is _tiled.cluster_client is _coadd_tree.cluster_client
    for name in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    with cluster_client(None, n_tasks=1) as client:
        seen = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        info = client.scheduler_info()
        assert str(client.scheduler.address).startswith("tcp://127.0.0.1:")
    assert list(seen.values()) == [None]  # one worker (one task), no trim threshold
    assert all(w["nthreads"] == 1 for w in info["workers"].values())
    assert client.status == "closed"
    assert dict(os.environ) == before
    with cluster_client(client) as same:  # a given client is used as is, left as it was
        assert same is client


def test_cli_usage_errors_exit_2_before_any_work(files, tmp_path, capsys):
    assert main(["batch", str(tmp_path / "none.csv"), "--outdir", str(tmp_path / "o")]) == 2
    assert "none.csv" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("ref,new\na.fits,b.fits\n")
    assert main(["batch", str(tmp_path / "bad.csv"), "--outdir", str(tmp_path / "o")]) == 2
    assert "'reference', 'science'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["batch", str(tmp_path / "bad.csv"), "--outdir", "o", "--workers", "2",
              "--scheduler", "tcp://127.0.0.1:1"])
    assert "not allowed with" in capsys.readouterr().err
    (tmp_path / "pairs.csv").write_text("reference,science\na.fits,b.fits\n")
    assert main(["batch", str(tmp_path / "pairs.csv"), "--outdir", str(tmp_path / "o"),
                 "--scheduler", "tcp://127.0.0.1:9", "--timeout", "1"]) == 2
    assert "no Dask scheduler answered" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_batch_of_missing_files_writes_its_summary_and_exits_1(tmp_path, capsys):
    """No row can run: no cluster starts, and the summary still says why."""
    (tmp_path / "pairs.csv").write_text("reference,science\na.fits,b.fits\n")
    assert main(["batch", str(tmp_path / "pairs.csv"), "--outdir", str(tmp_path / "o")]) == 1
    summary = Table.read(tmp_path / "o" / "summary.ecsv")
    assert summary["status"][0] == "failed" and "'a.fits' does not exist" in summary["error"][0]
    assert "failed b" in capsys.readouterr().err


def test_the_package_imports_and_refuses_batches_clearly_without_dask(tmp_path):
    """With Dask absent, the package imports; a batch is refused with what to install."""
    import subprocess

    code = f"""
import sys
for name in ("dask", "distributed"):
    sys.modules[name] = None  # as if not installed: importing them raises ImportError
import astro_zackay.cli, astro_zackay.parallel
try:
    astro_zackay.parallel.subtract_batch([("a.fits", "b.fits")], {str(tmp_path)!r})
except ImportError as exc:
    print("refused:", exc)
sys.exit(astro_zackay.cli.main(["batch", "pairs.csv", "--outdir", {str(tmp_path)!r}]))
"""
    (tmp_path / "pairs.csv").write_text("reference,science\na.fits,b.fits\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "refused: batches run on dask.distributed" in done.stdout
    assert "pip install 'dask[distributed]'" in done.stderr
    assert os.listdir(tmp_path) == ["pairs.csv"]
