"""Batches of subtractions and coadds on a Dask cluster: one file-based task per input.

Each task gets paths, reads its FITS files on the worker, runs the package's function
and writes the results under the output folder (to a temporary name first, renamed
when complete, so a worker that dies mid-write leaves no half file behind). It returns
a small dict; the caller assembles the summary table in input order.

A row whose task the worker died while running is run again by Dask (up to the
scheduler's ``distributed.scheduler.allowed-failures`` more times, 3 by default); each
attempt appends a line to a hidden marker file beside the outputs, so the row can say
how many times it ran (its ``retries``: the runs after the first, as Dask counts them).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import MaskedColumn, Table

from ._cluster import cluster_client

__all__ = ["coadd_batch", "subtract_batch"]

# The examples start a LocalCluster, which needs dask.distributed (the `all` extra).
__doctest_requires__ = {("subtract_batch", "coadd_batch"): ["distributed"]}

log = logging.getLogger(__name__)

#: File name endings stripped from an input's name to make a row's default name.
_FITS_ENDINGS = (".fits", ".fit", ".fts")
_COMPRESSED = (".gz", ".fz", ".bz2")
#: Keywords of `subtract_batch` itself, which `subtract` must not receive.
#: Options of `coadd` that take one value per image.
_PER_IMAGE = ("psfs", "flux_scales", "sigmas", "gain")


@dataclass(frozen=True)
class _Job:
    """One row of a batch: its name, input files, output files and any input problem."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    problem: str | None = None


# --- the tasks (run on the workers) -----------------------------------------------------------
def _marker(output_dir: str, name: str) -> Path:
    return Path(output_dir) / f".{name}.attempts"


def _record_attempt(marker: Path) -> int:
    """Append this process to the row's marker file; the number of attempts so far."""
    with open(marker, "a") as stream:
        stream.write(f"{socket.gethostname()}:{os.getpid()}\n")
    return len(marker.read_text().splitlines())


def _part(path: str) -> str:
    """A temporary name beside ``path`` for one process's partial output."""
    folder, name = os.path.split(path)
    stem, ending = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.part-{os.getpid()}{ending}")


def _write_then_rename(write: Callable[[str], None], path: str) -> None:
    """Write to a temporary file, then rename it to ``path`` (atomic on one file system)."""
    part = _part(path)
    try:
        write(part)
        os.replace(part, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(part)


def _run_task(job: _Job, output_dir: str, work: Callable[[_Job], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work(job)`` on a worker: never raises for a bad input; times it and counts attempts.

    The library's warnings are collected into the row (``catch_warnings`` is process
    state: with several threads per worker, the warnings of concurrent tasks may mix).
    """
    start = time.perf_counter()
    marker = _marker(output_dir, job.name)
    attempts = _record_attempt(marker)
    row: dict[str, Any] = {"status": "ok", "error": ""}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            row.update(work(job))
        except Exception as exc:  # one bad input fails its own row, never the batch
            row = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    messages = dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught)
    row.update(attempts=attempts, seconds=time.perf_counter() - start,
               warnings="; ".join(messages))
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    return row


def _subtract_one(job: _Job, threshold: float, kwargs: Mapping[str, Any],
                  parameters: Mapping[str, Any]) -> dict[str, Any]:
    from ..files import write_candidates, write_subtraction
    from ..subtraction import subtract

    result = subtract(job.inputs[0], job.inputs[1], **kwargs)
    candidates = result.find_transients(threshold=threshold)
    output, catalog = job.outputs
    _write_then_rename(lambda path: write_subtraction(
        result, path, inputs=job.inputs, parameters=parameters, overwrite=True), output)
    _write_then_rename(lambda path: write_candidates(
        candidates, path, inputs=job.inputs, parameters=parameters, overwrite=True), catalog)
    return {"flux_ratio": float(result.flux_ratio),
            "n_candidates": int(np.sum(candidates["good"])) if len(candidates) else 0}


def _subtract_task(job: _Job, output_dir: str, threshold: float, kwargs: Mapping[str, Any],
                   parameters: Mapping[str, Any]) -> dict[str, Any]:
    return _run_task(job, output_dir,
                     lambda j: _subtract_one(j, threshold, kwargs, parameters))


def _coadd_one(job: _Job, kwargs: Mapping[str, Any],
               parameters: Mapping[str, Any]) -> dict[str, Any]:
    from ..coaddition import coadd
    from ..files import write_coadd

    result = coadd(list(job.inputs), **_per_group(kwargs, len(job.inputs)))
    _write_then_rename(lambda path: write_coadd(
        result, path, inputs=job.inputs, parameters=parameters, overwrite=True), job.outputs[0])
    return {"flux_scale": float(result.flux_scale), "snr_full": float(result.snr_full)}


def _per_group(kwargs: Mapping[str, Any], n_images: int) -> dict[str, Any]:
    """``coadd``'s per-image options, a single number repeated for each image of the group."""
    options = dict(kwargs)
    for name in _PER_IMAGE:
        value = options.get(name)
        if value is not None and _single_number(value):
            options[name] = [value] * n_images
    return options


def _single_number(value: Any) -> bool:
    return np.ndim(value) == 0 and isinstance(value, int | float | np.number)


def _coadd_task(job: _Job, output_dir: str, kwargs: Mapping[str, Any],
                parameters: Mapping[str, Any]) -> dict[str, Any]:
    return _run_task(job, output_dir, lambda j: _coadd_one(j, kwargs, parameters))


# --- the inputs, checked before any work ------------------------------------------------------
def _read_csv(path: str | os.PathLike, what: str) -> Table:
    text = os.fspath(path)
    if not os.path.isfile(text):
        raise FileNotFoundError(f"{what} {text!r} is not a file: give the CSV table of the "
                                "batch (or a Table, or a list)")
    try:
        return Table.read(text, format="ascii.csv")
    except Exception as exc:
        raise ValueError(f"{what} {text!r} is not a readable CSV table ({exc})") from None


def _cell(table: Table, column: str, index: int, what: str) -> str:
    value = table[column][index]
    if np.ma.is_masked(value) or not str(value).strip():
        raise ValueError(f"{what}: row {index + 1} has an empty {column!r}: every row needs one")
    return str(value).strip()


def _check_columns(table: Table, needed: Sequence[str], what: str) -> None:
    missing = [name for name in needed if name not in table.colnames]
    if missing:
        raise ValueError(f"{what} lacks the column(s) {', '.join(map(repr, missing))} (it has "
                         f"{', '.join(map(repr, table.colnames)) or 'none'}): name the columns "
                         f"{', '.join(map(repr, needed))} in its first line")
    if len(table) == 0:
        raise ValueError(f"{what} has no rows: there is nothing to run")


def _is_path(value: Any) -> bool:
    return isinstance(value, str | os.PathLike)


def _pair_rows(pairs: Any) -> list[tuple[str, str, str | None]]:
    """(reference, science, name or None) per row of ``pairs``."""
    if _is_path(pairs):
        pairs = _read_csv(pairs, "pairs")
    if isinstance(pairs, Table):
        _check_columns(pairs, ("reference", "science"), "the pairs table")
        named = "name" in pairs.colnames
        return [(_cell(pairs, "reference", j, "pairs"), _cell(pairs, "science", j, "pairs"),
                 _cell(pairs, "name", j, "pairs") if named else None)
                for j in range(len(pairs))]
    if isinstance(pairs, Mapping | bytes) or not isinstance(pairs, Iterable):
        raise TypeError(f"pairs must be a list of (reference, science) paths, a Table or the "
                        f"path of a CSV table, got {type(pairs).__name__}")
    rows = []
    for j, item in enumerate(pairs):
        if (_is_path(item) or not isinstance(item, Sequence) or len(item) != 2
                or not all(_is_path(path) for path in item)):
            raise ValueError(f"pairs[{j}] is {item!r}: each pair must be two paths, "
                             "(reference, science)")
        rows.append((os.fspath(item[0]), os.fspath(item[1]), None))
    if not rows:
        raise ValueError("pairs is empty: there is nothing to run")
    return rows


def _group_rows(groups: Any) -> list[tuple[str, list[str]]]:
    """(name, paths) per group, in the order the groups first appear."""
    if _is_path(groups):
        groups = _read_csv(groups, "groups")
    if isinstance(groups, Table):
        _check_columns(groups, ("group", "path"), "the groups table")
        found: dict[str, list[str]] = {}
        for j in range(len(groups)):
            found.setdefault(_cell(groups, "group", j, "groups"), []).append(
                _cell(groups, "path", j, "groups"))
        return list(found.items())
    items = groups.items() if isinstance(groups, Mapping) else groups
    if isinstance(groups, bytes) or _is_path(groups) or not isinstance(items, Iterable):
        raise TypeError(f"groups must be a mapping of name to paths, a list of (name, paths), "
                        f"a Table or the path of a CSV table, got {type(groups).__name__}")
    rows = []
    for j, item in enumerate(items):
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], Sequence) and not _is_path(item[1])
                and all(_is_path(path) for path in item[1])):
            raise ValueError(f"group {j} is {item!r}: each group must be a name and a list of "
                             "paths, (name, [path, ...])")
        rows.append((item[0], [os.fspath(path) for path in item[1]]))
    if not rows:
        raise ValueError("groups is empty: there is nothing to run")
    return rows


def _stem(path: str) -> str:
    """A file's name without its FITS (and compression) endings: ``night1/a.fits.gz`` -> a."""
    name = os.path.basename(path)
    for endings in (_COMPRESSED, _FITS_ENDINGS):
        for ending in endings:
            if name.lower().endswith(ending) and len(name) > len(ending):
                name = name[: -len(ending)]
                break
    return name


def _names(given: Sequence[str | None], defaults: Sequence[str], what: str) -> list[str]:
    """Each row's name: the given one, else its default, with ``_<row>`` where defaults clash."""
    counts: dict[str, int] = {}
    for default in defaults:
        counts[default] = counts.get(default, 0) + 1
    names = []
    for j, (name, default) in enumerate(zip(given, defaults)):
        if name is None:
            name = default if counts[default] == 1 else f"{default}_{j + 1}"
        if (os.path.basename(name) != name or name in (".", "..") or name.startswith(".")
                or "/" in name or "\\" in name):
            raise ValueError(f"{what} {name!r} (row {j + 1}) cannot name a file in the output "
                             "folder: give a name without folders or a leading dot")
        names.append(name)
    seen: dict[str, int] = {}
    for j, name in enumerate(names):
        if name in seen:
            raise ValueError(f"rows {seen[name] + 1} and {j + 1} have the same {what} {name!r}: "
                             "their outputs would overwrite each other; give different names")
        seen[name] = j
    return names


def _input_problem(paths: Sequence[str], labels: Sequence[str]) -> str | None:
    """Why an input of a row cannot be read (missing, a folder, no permission), or None."""
    for label, path in zip(labels, paths):
        if not os.path.exists(path):
            return f"{label} {path!r} does not exist"
        if os.path.isdir(path):
            return f"{label} {path!r} is a directory, not a FITS file"
        if not os.access(path, os.R_OK):
            return f"{label} {path!r} cannot be read (permission denied)"
    return None


def _check_output_dir(output_dir: str | os.PathLike) -> str:
    folder = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"output_dir {folder!r} is a file: give a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"output_dir {folder!r} is not writable: give a folder you "
                                  "can write to")
    else:
        parent = os.path.dirname(folder)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"output_dir {folder!r} cannot be created: {parent!r} is "
                                  "not writable")
    return folder


def _check_outputs(jobs: Sequence[_Job], overwrite: bool) -> None:
    inputs = {os.path.realpath(path) for job in jobs for path in job.inputs}
    clash = [path for job in jobs for path in job.outputs if os.path.realpath(path) in inputs]
    if clash:
        raise ValueError(f"the output {clash[0]!r} is also an input: give another output_dir")
    if overwrite:
        return
    there = [path for job in jobs for path in job.outputs if os.path.exists(path)]
    if there:
        shown = ", ".join(map(repr, there[:3])) + (", ..." if len(there) > 3 else "")
        raise FileExistsError(f"{len(there)} output file(s) exist already ({shown}): pass "
                              "overwrite=True to replace them, or give another output_dir")


def _check_keywords(function: Callable[..., Any], kwargs: Mapping[str, Any],
                    caller: str) -> None:
    """A TypeError for a keyword that ``function`` does not take (or that the batch sets)."""
    keywords = [name for name, parameter in inspect.signature(function).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = [name for name in kwargs if name not in keywords]
    if unknown:
        raise TypeError(f"{caller}() got the keyword(s) {', '.join(map(repr, unknown))}, which "
                        f"{function.__name__}() does not take; it takes {', '.join(keywords)}")


def _check_batch_options(progress: Any, overwrite: Any, retries: Any,
                         n_workers: Any, client: Any) -> None:
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise ImportError("batches run on dask.distributed, which is not installed: pip "
                          "install 'dask[distributed]' (or 'astro-zackay[all]')") from exc
    for name, value in (("progress", progress), ("overwrite", overwrite)):
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    for name, value, low in (("retries", retries, 0), ("n_workers", n_workers, 1)):
        if value is None and name == "n_workers":
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    if client is not None:
        if not callable(getattr(client, "submit", None)):
            raise TypeError(f"client must be a distributed.Client (or None to start a "
                            f"LocalCluster), got {type(client).__name__}")
        if n_workers is not None:
            raise ValueError("n_workers sizes the LocalCluster started when client is None: "
                             "do not give it with a client")


def _plain_parameters(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The options as header-friendly values (arrays and models by their type name)."""
    simple = (bool, int, float, str, type(None), np.number, np.bool_)
    plain = {}
    for name, value in kwargs.items():
        ok = isinstance(value, simple) or (isinstance(value, tuple | list) and len(value) <= 8
                                           and all(isinstance(v, simple) for v in value))
        plain[name] = value if ok else f"<{type(value).__name__}>"
    return plain


# --- running ----------------------------------------------------------------------------------
def _progress_bar(iterable: Iterable[Any], total: int, enabled: bool, what: str) -> Iterable[Any]:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        log.debug("no progress bar: tqdm is not installed")
        return iterable
    return tqdm(iterable, total=total, desc=what, unit="task", file=sys.stderr)


def _run(jobs: Sequence[_Job], output_dir: str, task: Callable[..., dict[str, Any]],
         arguments: tuple[Any, ...], *, client: Any, n_workers: int | None, retries: int,
         progress: bool, what: str) -> list[dict[str, Any]]:
    """Submit the jobs without an input problem; a result dict per job, in order."""
    rows: list[dict[str, Any]] = [
        {"status": "failed", "error": job.problem, "attempts": 0, "seconds": 0.0,
         "warnings": ""} if job.problem else {} for job in jobs]
    todo = [j for j, job in enumerate(jobs) if not job.problem]
    if not todo:
        return rows
    os.makedirs(output_dir, exist_ok=True)
    for j in todo:  # a marker of an interrupted earlier run would count as attempts
        with contextlib.suppress(FileNotFoundError):
            _marker(output_dir, jobs[j].name).unlink()
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    with cluster_client(client, len(todo), n_workers) as dask_client:
        futures = {dask_client.submit(task, jobs[j], output_dir, *arguments, pure=False,
                                      retries=retries, key=f"{what}-{jobs[j].name}-{token}"): j
                   for j in todo}
        for future in _progress_bar(as_completed(futures), len(futures), progress, what):
            j = futures[future]
            try:
                rows[j] = future.result()
            except Exception as exc:  # the worker died too often, or Dask failed the task
                rows[j] = _lost_task(jobs[j], output_dir, exc)
            future.release()
    return rows


def _lost_task(job: _Job, output_dir: str, exc: Exception) -> dict[str, Any]:
    """The row of a task that Dask gave up on (KilledWorker: its worker died each time)."""
    marker = _marker(output_dir, job.name)
    attempts = len(marker.read_text().splitlines()) if marker.exists() else 0
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    if type(exc).__name__ == "KilledWorker":
        error = (f"the worker died each of the {attempts} time(s) it ran this row (Dask's "
                 f"KilledWorker: out of memory, or killed?): {exc}")
    else:
        error = f"Dask could not run this row: {type(exc).__name__}: {exc}"
    return {"status": "failed", "error": error, "attempts": attempts, "seconds": float("nan"),
            "warnings": ""}


def _table(jobs: Sequence[_Job], rows: Sequence[dict[str, Any]], first: dict[str, list[Any]],
           numbers: Mapping[str, type], meta: dict[str, Any]) -> Table:
    """The summary: ``first``'s columns, then status, error, retries, note, seconds, numbers."""
    table = Table(first, meta=meta)
    table["status"] = [row["status"] for row in rows]
    table["error"] = [row["error"] or "" for row in rows]
    retries = [max(int(row["attempts"]) - 1, 0) for row in rows]
    table["retries"] = retries
    table["note"] = [
        f"the worker died while running it; Dask ran it {n} more time(s)" if n else ""
        for n in retries]
    table["seconds"] = [float(row["seconds"]) for row in rows]
    for name, kind in numbers.items():
        values = [row.get(name) for row in rows]
        table[name] = MaskedColumn([kind(0) if v is None else v for v in values], dtype=kind,
                                   mask=[v is None for v in values])
    table["warnings"] = [row["warnings"] for row in rows]
    table["seconds"].unit = "s"
    failed = [f"{job.name}: {row['error']}" for job, row in zip(jobs, rows)
              if row["status"] != "ok"]
    log.info("%d of %d row(s) ok", len(rows) - len(failed), len(rows))
    for line in failed:
        log.warning("failed %s", line)
    return table


def subtract_batch(
    pairs: Any,
    output_dir: str | os.PathLike,
    *,
    client: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    threshold: float = 5.0,
    retries: int = 1,
    n_workers: int | None = None,
    **subtract_kwargs: Any,
) -> Table:
    """ZOGY subtractions of many pairs of FITS files on a Dask cluster, one task per pair.

    Each task reads its two files on the worker, runs `~astro_zackay.subtract` and
    `~astro_zackay.SubtractionResult.find_transients`, writes ``<name>.fits``
    (`~astro_zackay.files.write_subtraction`) and ``<name>_candidates.ecsv``
    (`~astro_zackay.files.write_candidates`) in ``output_dir`` and returns a small
    summary: no image goes through the scheduler. The files must therefore be
    readable, and ``output_dir`` writable, at the same paths from the caller and from
    every worker (the same machine, or a shared file system).

    Everything that can be checked without reading the images is checked before any
    work and before a cluster starts: the ``pairs`` argument, the keywords of
    `~astro_zackay.subtract` and their values (as `~astro_zackay.subtract` checks them
    first), ``output_dir`` and the outputs. An input that is missing,
    a folder or not readable fails its own row (not submitted), and so does an error
    on a worker (a corrupt file, too few stars...): its message is kept in the row and
    the other rows go on.

    Parameters
    ----------
    pairs : list of (reference, science) paths, `~astropy.table.Table` or path of a CSV table
        The pairs, in order. A table (or the CSV file of one, with a header line) has the
        columns ``reference`` and ``science`` and optionally ``name``.
    output_dir : str or path-like
        The folder of the outputs, created if needed.
    client : `distributed.Client`, optional
        The client of a running cluster, used as it is and left open. By default a
        `distributed.LocalCluster` is started on this machine (worker processes of one
        thread each, on the loopback interface only, no dashboard, without Dask's
        ``MALLOC_TRIM_THRESHOLD_``, which makes a subtraction 2.5 times as costly) and
        closed at the end, also on error; the caller's environment variables are kept.
    progress : bool, optional
        Show a progress bar (tqdm, on stderr; when tqdm is installed).
    overwrite : bool, optional
        Replace outputs that exist; without it, any existing output is an error before
        any work.
    threshold : float, optional
        Detection threshold of the candidates on ``|Scorr|`` in sigma (default 5).
    retries : int, optional
        Dask's ``retries`` (of `distributed.Client.submit`): how many more times, after
        the first, a task that raised is run (default 1: at most two runs). A task raises
        only for an error outside the subtraction, such as an ``output_dir`` that its
        worker cannot write; an error of the subtraction itself (a corrupt file, too few
        stars) fails its row at once, never retried. A task whose worker *died* is run
        again whatever ``retries`` is, up to the scheduler's
        ``distributed.scheduler.allowed-failures`` more times (3 by default): the row's
        ``retries`` counts those runs after the first.
    n_workers : int, optional
        Worker processes of the LocalCluster started when ``client`` is None (default:
        the number of cores, at most one per pair).
    **subtract_kwargs
        Keywords of `~astro_zackay.subtract` (``unit``, ``gain``, ``saturation``,
        ``reference_psf``, ...), the same for every pair. ``workers`` (its FFT threads)
        defaults to 1 here, as the cluster gives each task one core.

    Returns
    -------
    `~astropy.table.Table`
        One row per pair, in input order: ``name``, ``reference``, ``science``,
        ``output``, ``candidates`` (the paths written), ``status`` (``"ok"`` or
        ``"failed"``), ``error`` (the message of a failure, else empty), ``retries`` and
        ``note`` (how many more times than once the row's task ran: Dask ran it again
        after its worker died), ``seconds`` (on the worker),
        ``flux_ratio`` (fitted) and ``n_candidates`` (good candidates: no flag set),
        both masked in failed rows, and ``warnings`` (the library's warnings, joined
        by semicolons).

    Raises
    ------
    TypeError
        For a keyword that `~astro_zackay.subtract` does not take, or a ``pairs`` or
        ``client`` of the wrong type.
    ValueError
        For a malformed ``pairs`` (not two paths per pair, columns missing, names
        clashing) or an option that `~astro_zackay.subtract` refuses.
    ImportError
        When ``distributed`` is not installed.
    FileExistsError
        When an output exists and ``overwrite`` is False.
    OSError
        When ``output_dir`` is a file or cannot be written, or the CSV is missing.

    See Also
    --------
    coadd_batch : the same for coadds.

    Notes
    -----
    Rows whose name is not given are named after the science file (``new.fits`` ->
    ``new``), with ``_<row>`` appended where two science files share a name. Relative
    paths are relative to the current folder of the caller (the workers get absolute
    paths); the summary shows them as given.

    Examples
    --------
    Three simulated pairs, written as FITS files, subtracted by two worker processes;
    the third science file is not a FITS file and fails only its own row:

    >>> import pathlib, tempfile
    >>> from astro_zackay.parallel import subtract_batch
    >>> from astro_zackay.simulation import simulate_pair
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> pairs = []
    >>> for j in range(3):
    ...     pair = simulate_pair((128, 128), n_stars=25, flux_range=(3e3, 1e5), seed=j)
    ...     pair.reference.ccd.write(folder / f"ref{j}.fits")
    ...     pair.science.ccd.write(folder / f"new{j}.fits")
    ...     pairs.append((folder / f"ref{j}.fits", folder / f"new{j}.fits"))
    >>> _ = (folder / "new2.fits").write_text("not a FITS file")
    >>> from distributed import Client, LocalCluster
    >>> cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
    ...                        host="127.0.0.1", dashboard_address="127.0.0.1:0")
    >>> client = Client(cluster)
    >>> summary = subtract_batch(pairs, folder / "out", client=client, progress=False)
    >>> summary["status"].tolist(), summary["name"].tolist()
    (['ok', 'ok', 'failed'], ['new0', 'new1', 'new2'])
    >>> "new2.fits" in summary["error"][2]
    True
    >>> bool(abs(summary["flux_ratio"][0] - 1) < 0.05)
    True
    >>> client.close(); cluster.close()

    Without a client, a LocalCluster sized to the machine starts and closes with the
    call (a few seconds)::

        summary = subtract_batch("pairs.csv", "results", unit="adu", gain=1.4)
    """
    _check_batch_options(progress, overwrite, retries, n_workers, client)
    from .._checks import check_subtract_options, is_positive
    from ..subtraction import subtract

    _check_keywords(subtract, subtract_kwargs, "subtract_batch")
    check_subtract_options(**subtract_kwargs)  # what would fail every row, before any work
    if not is_positive(threshold):
        raise ValueError(f"threshold must be a finite number of sigma > 0, got {threshold!r}")
    rows = _pair_rows(pairs)
    folder = _check_output_dir(output_dir)
    names = _names([name for _, _, name in rows], [_stem(science) for _, science, _ in rows],
                   "name")
    jobs = [_Job(name, (os.path.abspath(reference), os.path.abspath(science)),
                 (os.path.join(folder, f"{name}.fits"),
                  os.path.join(folder, f"{name}_candidates.ecsv")),
                 _input_problem((reference, science), ("reference", "science")))
            for name, (reference, science, _) in zip(names, rows)]
    _check_outputs(jobs, overwrite)
    kwargs = {"workers": 1, **subtract_kwargs}
    parameters = {**_plain_parameters(subtract_kwargs), "threshold": float(threshold)}
    results = _run(jobs, folder, _subtract_task, (float(threshold), kwargs, parameters),
                   client=client, n_workers=n_workers, retries=int(retries),
                   progress=bool(progress), what="subtract")
    first = {"name": names, "reference": [reference for reference, _, _ in rows],
             "science": [science for _, science, _ in rows],
             "output": [job.outputs[0] for job in jobs],
             "candidates": [job.outputs[1] for job in jobs]}
    return _table(jobs, results, first, {"flux_ratio": float, "n_candidates": int},
                  {"kind": "subtract_batch", "output_dir": folder, "threshold": float(threshold),
                   "parameters": parameters})


def coadd_batch(
    groups: Any,
    output_dir: str | os.PathLike,
    *,
    client: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    retries: int = 1,
    n_workers: int | None = None,
    **coadd_kwargs: Any,
) -> Table:
    """Proper coadds of many groups of FITS files on a Dask cluster, one task per group.

    Each task reads its group's files on the worker, runs `~astro_zackay.coadd` and
    writes ``<group>.fits`` (`~astro_zackay.files.write_coadd`) in ``output_dir``.
    Inputs, checks, failures and the cluster are as in `subtract_batch`.

    Parameters
    ----------
    groups : mapping, list of (name, paths), `~astropy.table.Table` or path of a CSV table
        The groups: ``{name: [path, ...]}``, a list of ``(name, [path, ...])``, or a table
        (or CSV file) with one row per file and the columns ``group`` and ``path``; the
        groups keep the order in which they first appear.
    output_dir : str or path-like
        The folder of the outputs, created if needed.
    client : `distributed.Client`, optional
        As in `subtract_batch`: used as is, or a LocalCluster started and closed.
    progress : bool, optional
        Show a progress bar (tqdm, on stderr).
    overwrite : bool, optional
        Replace outputs that exist (else an error before any work).
    retries : int, optional
        Dask's ``retries``: how many more times, after the first, a task that raised
        outside the coadd is run (default 1; see `subtract_batch`).
    n_workers : int, optional
        Worker processes of the LocalCluster started when ``client`` is None.
    **coadd_kwargs
        Keywords of `~astro_zackay.coadd` (``psfs``, ``unit``, ``gain``, ``reject``,
        ...), the same for every group. A per-image option (``psfs``, ``flux_scales``,
        ``sigmas``, ``gain``) given as one number is used for every image of each group
        (``psfs=3.0``: Gaussian PSFs of FWHM 3 pixels); given as a list, every group
        must have that many images.

    Returns
    -------
    `~astropy.table.Table`
        One row per group, in order: ``group``, ``n_images``, ``inputs`` (the paths,
        comma-separated), ``output``, ``status``, ``error``, ``retries``, ``note``,
        ``seconds``, ``flux_scale`` (F_R of the proper coadd) and ``snr_full`` (the S/N
        of a unit-flux point source), both masked in failed rows, and ``warnings``.

    Raises
    ------
    TypeError
        For a keyword that `~astro_zackay.coadd` does not take, or a ``groups`` or
        ``client`` of the wrong type.
    ValueError
        For a malformed ``groups`` (a group of fewer than two files included), or an
        option that `~astro_zackay.coadd` refuses (a per-image option given as one
        number is checked as the value of every image).
    ImportError, FileExistsError, OSError
        As `subtract_batch` raises them: no ``distributed``, an existing output
        without ``overwrite``, an unusable ``output_dir`` or a missing CSV.

    See Also
    --------
    subtract_batch : the same for subtractions.

    Examples
    --------
    Two groups of two simulated frames of one field (Gaussian PSFs of FWHM 3 pixels),
    coadded by one worker process:

    >>> import pathlib, tempfile
    >>> from astro_zackay.parallel import coadd_batch
    >>> from astro_zackay.simulation import simulate_image
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> stars = simulate_image((128, 128), n_stars=20, flux_range=(1e4, 1e5), seed=0).truth
    >>> for j in range(4):
    ...     frame = simulate_image((128, 128), psf=3.0, stars=stars["x", "y", "flux"], seed=j)
    ...     frame.ccd.write(folder / f"frame{j}.fits")
    >>> groups = {"early": [folder / "frame0.fits", folder / "frame1.fits"],
    ...           "late": [folder / "frame2.fits", folder / "frame3.fits"]}
    >>> from distributed import Client, LocalCluster
    >>> cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
    ...                        host="127.0.0.1", dashboard_address="127.0.0.1:0")
    >>> client = Client(cluster)
    >>> summary = coadd_batch(groups, folder / "coadds", client=client, progress=False,
    ...                       psfs=3.0)
    >>> summary["group"].tolist(), summary["status"].tolist(), summary["n_images"].tolist()
    (['early', 'late'], ['ok', 'ok'], [2, 2])
    >>> client.close(); cluster.close()
    """
    _check_batch_options(progress, overwrite, retries, n_workers, client)
    from .._checks import check_coadd_options
    from ..coaddition import coadd

    _check_keywords(coadd, coadd_kwargs, "coadd_batch")
    # what would fail every row, before any work: a per-image option given as one number
    # is checked as the list of one value that each image of a group gets
    check_coadd_options(**_per_group(coadd_kwargs, 1))
    rows = _group_rows(groups)
    for name, paths in rows:
        if len(paths) < 2:
            raise ValueError(f"group {name!r} has {len(paths)} file(s): a coadd needs at least "
                             "two")
        for option in _PER_IMAGE:
            value = coadd_kwargs.get(option)
            if (value is not None and not _single_number(value) and not isinstance(value, str)
                    and np.ndim(value) >= 1 and len(value) != len(paths)):
                raise ValueError(f"{option} gives {len(value)} values but group {name!r} has "
                                 f"{len(paths)} images: give one value for every image, or "
                                 "groups of that many images")
    folder = _check_output_dir(output_dir)
    names = _names([name for name, _ in rows], [name for name, _ in rows], "group")
    jobs = [_Job(name, tuple(map(os.path.abspath, paths)), (os.path.join(folder, f"{name}.fits"),),
                 _input_problem(paths, ["image"] * len(paths)))
            for name, (_, paths) in zip(names, rows)]
    _check_outputs(jobs, overwrite)
    parameters = _plain_parameters(coadd_kwargs)
    results = _run(jobs, folder, _coadd_task, (dict(coadd_kwargs), parameters), client=client,
                   n_workers=n_workers, retries=int(retries), progress=bool(progress),
                   what="coadd")
    first = {"group": names, "n_images": [len(job.inputs) for job in jobs],
             "inputs": [",".join(paths) for _, paths in rows],
             "output": [job.outputs[0] for job in jobs]}
    return _table(jobs, results, first, {"flux_scale": float, "snr_full": float},
                  {"kind": "coadd_batch", "output_dir": folder, "parameters": parameters})
