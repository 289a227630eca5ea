"""Run the peer packages that astro_zackay is benchmarked against, each in its own venv.

The peers (properimage, zogyp, sfft, ois) are *not* dependencies of astro_zackay and have
mutually incompatible pins (zogyp needs numpy 1.23, sfft numpy < 2.4, ...), so each lives in
its own virtual environment under ``PEERS_ROOT`` (default ``/work/peers``; override with the
``ASTRO_ZACKAY_PEERS`` environment variable).  See ``benchmarks/README.md`` for how the venvs
are built.

Every call here writes a small child script (kept as a string template in this module) and a
JSON spec into ``workdir`` and runs it with the peer venv's python in a subprocess.  The child

* times the peer import (``import_s``) and the peer call itself (``wall_s``) with
  ``time.perf_counter`` - FITS writing of outputs and ``.npy`` saving are outside ``wall_s``;
* records the peak RSS of the child (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and of its
  own children such as SExtractor/PSFEx/multiprocessing workers (``RUSAGE_CHILDREN``);
  ``peak_rss_mb`` is the larger of the two (both include the interpreter and the imports);
* saves the arrays it got back (real part where a peer returns complex) as ``.npy`` files in
  ``workdir`` and writes a ``result.json``.

Only the standard library, numpy and astropy are used here, so the benchmark scripts can import
this module from astro_zackay's own environment.

Public API
----------
``available_peers()``, ``run_peer_subtraction()``, ``run_peer_coadd()``, ``run_peer_psf()``,
``PeerResult``, ``PEER_NAMES``, ``PEERS_ROOT``, ``PEERS_BIN``.

Run ``python benchmarks/_peers.py [WORKROOT [PEER,PEER,... [REPEATS]]]`` to print
``available_peers()`` and a verification table on properimage's sample pair.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

__all__ = [
    "PEERS_BIN",
    "PEERS_ROOT",
    "PEER_NAMES",
    "PeerResult",
    "available_peers",
    "peer_python",
    "run_peer_coadd",
    "run_peer_psf",
    "run_peer_subtraction",
]

PEERS_ROOT = Path(os.environ.get("ASTRO_ZACKAY_PEERS", "/work/peers"))
#: Folder with the ``sextractor``/``sex`` symlinks to Debian's ``source-extractor``.
PEERS_BIN = PEERS_ROOT / "bin"
PEER_NAMES: tuple[str, ...] = ("properimage", "zogyp", "sfft", "ois")

#: Module imported by ``available_peers`` to check each venv.
_PEER_MODULE = {"properimage": "properimage", "zogyp": "zogyp.zip", "sfft": "sfft", "ois": "ois"}
#: External programs each peer shells out to.
_PEER_PROGRAMS = {"zogyp": ("sextractor", "psfex"), "sfft": ("sex",)}
_VARIANTS = ("default", "tutorial")
#: Keywords sfft's automatic preprocessing reads from the FITS header (the sample data have
#: neither; gain 1 is also what properimage assumes, 65000 ADU is properimage's saturation).
SFFT_HEADER_DEFAULTS = {"GAIN": 1.0, "SATURATE": 65000.0}
_REASON_TAIL = 1500


@dataclass
class PeerResult:
    """What one peer run brought back.

    Attributes
    ----------
    name : peer name (``"properimage"``, ``"zogyp"``, ``"sfft"``, ``"ois"``).
    available : True when the peer ran and returned its arrays.
    reason : ``"ok"`` or why not (missing venv, unsupported task, stderr/traceback tail).
    call : the peer call as executed in the child, for the benchmark report.
    wall_s : seconds spent in the peer call (timed inside the child); NaN if it failed.
    import_s : seconds to import the peer package in the child (numpy already imported).
    peak_rss_mb : max(child's own peak RSS, peak RSS of its largest descendant), in MiB.
    total_s : wall time of the whole subprocess as seen from the parent (start-up included).
    difference : D (subtraction) or R (coadd) as float ndarray, real part; None if absent.
    score : Scorr where the peer provides one (ZOGY peers), else None.
    arrays : every array the child saved (e.g. ``P``, ``mask``, ``S``, ``basis``).
    info : scalars the child reported (e.g. ``cpu_s`` - the child's own CPU seconds in the
        call, excluding its subprocesses; ``D_max_abs_imag``, shapes, flux scaling).
    workdir : folder holding the child script, spec, log, result.json and .npy files.
    """

    name: str
    available: bool
    reason: str
    call: str = ""
    wall_s: float = float("nan")
    import_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    total_s: float = float("nan")
    difference: np.ndarray | None = None
    score: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None


# --------------------------------------------------------------------------------------------
# Child script templates.  They are plain Python (no str.format placeholders); everything
# run-specific comes from the JSON spec whose path is argv[1].  A child script is
# _CHILD_PRELUDE + one body (defining do_import, do_call, collect) + _CHILD_EPILOGUE.
# --------------------------------------------------------------------------------------------

_CHILD_PRELUDE = r'''
import json
import os
import resource
import sys
import time
import traceback

import numpy as np

with open(sys.argv[1]) as _fh:
    SPEC = json.load(_fh)
RESULT = {"ok": False, "import_s": None, "wall_s": None, "arrays": [], "info": {}}


def save(name, arr):
    """Save an array as <name>.npy in the workdir (real part, masked -> NaN)."""
    if np.ma.isMaskedArray(arr):
        RESULT["info"][name + "_n_masked"] = int(np.ma.count_masked(arr))
        arr = np.ma.filled(arr.astype(np.result_type(arr.dtype, np.float64)), np.nan)
    arr = np.asarray(arr)
    if np.iscomplexobj(arr):
        imag = np.abs(arr.imag)
        RESULT["info"][name + "_max_abs_imag"] = float(np.nanmax(imag)) if arr.size else 0.0
        arr = arr.real
    np.save(os.path.join(SPEC["workdir"], name + ".npy"), arr)
    RESULT["arrays"].append(name)
    RESULT["info"][name + "_shape"] = list(arr.shape)
'''

_CHILD_EPILOGUE = r'''
def _peak_rss_mb():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return own, kids


try:
    _t0 = time.perf_counter()
    _mods = do_import()
    RESULT["import_s"] = time.perf_counter() - _t0
    _t0, _c0 = time.perf_counter(), time.process_time()
    _raw = do_call(_mods)
    RESULT["wall_s"] = time.perf_counter() - _t0
    RESULT["info"]["cpu_s"] = time.process_time() - _c0
    for _name, _arr in collect(_raw).items():
        save(_name, _arr)
    RESULT["ok"] = True
except BaseException:
    RESULT["error"] = traceback.format_exc()
finally:
    _own, _kids = _peak_rss_mb()
    RESULT["self_rss_mb"], RESULT["children_rss_mb"] = _own, _kids
    RESULT["peak_rss_mb"] = max(_own, _kids)
    with open(SPEC["result_json"], "w") as _fh:
        json.dump(RESULT, _fh, indent=1)
sys.exit(0 if RESULT["ok"] else 1)
'''

_BODY_PROPERIMAGE_SUBTRACT = r'''
def do_import():
    from properimage import operations as ops
    return ops


def do_call(ops):
    D, P, Scorr, mask = ops.subtract(ref=SPEC["reference"], new=SPEC["science"], **SPEC["kwargs"])
    return {"D": D, "P": P, "Scorr": Scorr, "mask": mask}


def collect(raw):
    return raw
'''

_BODY_PROPERIMAGE_COADD = r'''
def do_import():
    from properimage import operations as ops
    from properimage.single_image import SingleImage
    return ops, SingleImage


def do_call(mods):
    ops, SingleImage = mods
    si_list = [SingleImage(path) for path in SPEC["inputs"]]
    R, P, mask = ops.coadd(si_list, **SPEC["kwargs"])
    return {"R": R, "P": P, "mask": mask}


def collect(raw):
    return raw
'''

_BODY_PROPERIMAGE_PSF = r'''
def do_import():
    from properimage.single_image import SingleImage
    return SingleImage


def do_call(SingleImage):
    img = SingleImage(SPEC["inputs"][0])
    a_fields, basis = img.get_variable_psf(inf_loss=SPEC["kwargs"].get("inf_loss"))
    return img, a_fields, basis


def collect(raw):
    # Evaluated after the timed call.  properimage fits its a-fields in (row, col) pixel
    # coordinates (its stamps_pos is (y, x)) and get_psf_xy(x, y) takes (row, col) too.
    img, a_fields, basis = raw
    out = {"basis": np.array([np.asarray(b, dtype=float) for b in basis])}
    RESULT["info"]["n_basis"] = len(basis)
    RESULT["info"]["stamp_shape"] = list(np.asarray(basis[0]).shape)
    RESULT["info"]["n_stars"] = int(img.n_sources)
    positions = np.asarray(SPEC["positions"], dtype=float).reshape(-1, 2)  # (x_col, y_row)
    out["positions_xy"] = positions
    if a_fields[0] is None:
        out["afield_values"] = np.ones((len(basis), len(positions)))
    else:
        out["afield_values"] = np.array(
            [[float(af(yr, xc)) for xc, yr in positions] for af in a_fields])
    psfs = []
    for xc, yr in positions:
        psfs.append(np.asarray(img.get_psf_xy(yr, xc), dtype=float))
    out["psf_at_positions"] = np.array(psfs) if psfs else np.zeros((0,) + out["basis"].shape[1:])
    return out
'''

_BODY_ZOGYP_SUBTRACT = r'''
def do_import():
    import zogyp.zip as zip_
    return zip_


def do_call(zip_):
    # run_ZOGY works in ./Zoutput of the cwd (= workdir); inputs were copied there as *.fits.
    zip_.run_ZOGY(SPEC["science"], SPEC["reference"], **SPEC["kwargs"])
    return None


def collect(raw):
    from astropy.io import fits
    name = SPEC["kwargs"]["outname"]
    out = {}
    for key, stem in (("D", "_D1.fits"), ("S", "_S1.fits"), ("Scorr", "_Scorr1.fits")):
        out[key] = fits.getdata(os.path.join("Zoutput", name + stem)).astype(np.float64)
    return out
'''

_BODY_ZOGYP_COADD = r'''
def do_import():
    from zogyp.zo_coadd import prop_coad
    return prop_coad


def do_call(prop_coad):
    return prop_coad(list(SPEC["inputs"]), make_fits=False)


def collect(raw):
    return {"R": raw}
'''

_BODY_SFFT_SUBTRACT = r'''
def do_import():
    if SPEC["variant"] == "tutorial":
        from sfft.CustomizedPacket import Customized_Packet
        return Customized_Packet
    from sfft.EasyCrowdedPacket import Easy_CrowdedPacket
    return Easy_CrowdedPacket


def do_call(packet):
    kw = dict(SPEC["kwargs"])
    if SPEC["variant"] == "tutorial":
        out = packet.CP(FITS_REF=SPEC["reference"], FITS_SCI=SPEC["science"],
                        FITS_mREF=SPEC["reference"], FITS_mSCI=SPEC["science"],
                        FITS_DIFF=os.path.join(SPEC["workdir"], "sfft_diff.fits"), **kw)
        return {"D_xy": out[1]}
    out = packet.ECP(FITS_REF=SPEC["reference"], FITS_SCI=SPEC["science"],
                     FITS_DIFF=os.path.join(SPEC["workdir"], "sfft_diff.fits"), **kw)
    RESULT["info"]["flux_scaling"] = float(out[3])
    RESULT["info"]["fwhm_ref"] = float(out[1]["FWHM_REF"])
    RESULT["info"]["fwhm_sci"] = float(out[1]["FWHM_SCI"])
    return {"D_xy": out[0]}


def collect(raw):
    # sfft works in (x, y) = transposed numpy order; its own FITS writer transposes back.
    return {"D": np.asarray(raw["D_xy"]).T}
'''

_BODY_OIS_SUBTRACT = r'''
from astropy.io import fits

SCI = fits.getdata(SPEC["science"]).astype(np.float64)
REF = fits.getdata(SPEC["reference"]).astype(np.float64)


def do_import():
    import ois
    return ois


def do_call(ois):
    kw = dict(SPEC["kwargs"])
    if "kernelshape" in kw:
        kw["kernelshape"] = tuple(kw["kernelshape"])
    diff, opt, kernel, bkg = ois.optimal_system(SCI, REF, **kw)
    return {"D": diff, "kernel": kernel, "background": bkg}


def collect(raw):
    return raw
'''

# (peer, task) -> child body
_BODIES: dict[tuple[str, str], str] = {
    ("properimage", "subtract"): _BODY_PROPERIMAGE_SUBTRACT,
    ("properimage", "coadd"): _BODY_PROPERIMAGE_COADD,
    ("properimage", "psf"): _BODY_PROPERIMAGE_PSF,
    ("zogyp", "subtract"): _BODY_ZOGYP_SUBTRACT,
    ("zogyp", "coadd"): _BODY_ZOGYP_COADD,
    ("sfft", "subtract"): _BODY_SFFT_SUBTRACT,
    ("ois", "subtract"): _BODY_OIS_SUBTRACT,
}

# (peer, task, variant) -> keyword arguments passed to the peer call (JSON-serialisable).
_KWARGS: dict[tuple[str, str, str], dict[str, Any]] = {
    # properimage 0.7.2 operations.subtract(ref, new, align=False, inf_loss=0.25,
    #   smooth_psf=False, beta=True, shift=True, iterative=False, fitted_psf=True)
    ("properimage", "subtract", "default"): {},
    ("properimage", "subtract", "tutorial"): {  # Tutorial04
        "smooth_psf": False, "fitted_psf": True, "align": False, "iterative": False,
        "beta": False, "shift": False,
    },
    # operations.coadd(si_list, align=True, inf_loss=0.2, n_procs=2)
    ("properimage", "coadd", "default"): {},
    ("properimage", "coadd", "tutorial"): {"align": False, "inf_loss": 0.2, "n_procs": 2},
    # SingleImage.get_variable_psf(inf_loss=None, shape=None); None -> instance's 0.2
    ("properimage", "psf", "default"): {"inf_loss": None},
    ("properimage", "psf", "tutorial"): {"inf_loss": 0.15},
    # zogyp.zip.run_ZOGY(sci, ref, outname='data', xslice=1, yslice=1, align=False,
    #   clean_sci=0.75, clean_ref=0.75, sub_imagex=1, sub_imagey=1, blackout=False);
    # "tutorial" = what its CLI `ZOGY sci.fits ref.fits` passes (clean 0.25).
    ("zogyp", "subtract", "default"): {"outname": "zogyp", "align": False},
    ("zogyp", "subtract", "tutorial"): {
        "outname": "zogyp", "align": False, "clean_sci": 0.25, "clean_ref": 0.25,
    },
    ("zogyp", "coadd", "default"): {},
    ("zogyp", "coadd", "tutorial"): {},
    # sfft 1.7.3: default = Easy_CrowdedPacket.ECP (automatic SExtractor masking,
    # BGPolyOrder=2 handles the sky); tutorial = Customized_Packet.CP without masking,
    # kernel half-width 8, polynomial orders 2 (the configuration timed on GPU in PEERS.md).
    # NUM_CPU_THREADS_4SUBTRACT is set from the ``threads`` argument.
    ("sfft", "subtract", "default"): {"BACKEND_4SUBTRACT": "Numpy", "VERBOSE_LEVEL": 1},
    ("sfft", "subtract", "tutorial"): {
        "ForceConv": "REF", "GKerHW": 8, "KerPolyOrder": 2, "BGPolyOrder": 2,
        "ConstPhotRatio": True, "BACKEND_4SUBTRACT": "Numpy", "VERBOSE_LEVEL": 1,
    },
    # ois 0.2 optimal_system(image, refimage, kernelshape=(11, 11), bkgdegree=None,
    #   method="Bramich", gridshape=None); tutorial = Bramich 7x7 as measured in PEERS.md.
    ("ois", "subtract", "default"): {},
    ("ois", "subtract", "tutorial"): {"method": "Bramich", "kernelshape": [7, 7]},
}


def peer_python(peer: str) -> Path:
    """Path of the python interpreter of ``peer``'s virtual environment."""
    return PEERS_ROOT / peer / "bin" / "python"


def _child_env(workdir: Path, threads: int) -> dict[str, str]:
    """Environment for a child: peers/bin first on PATH, temp files and threads contained."""
    env = dict(os.environ)
    env["PATH"] = f"{PEERS_BIN}{os.pathsep}{env.get('PATH', '')}"
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmp)  # properimage pickles star stamps to a never-removed temp dir
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS", "PYFFTW_NUM_THREADS"):
        env[var] = str(threads)
    env["MPLBACKEND"] = "Agg"
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def _tail(text: str, n: int = _REASON_TAIL) -> str:
    """Last ``n`` characters of ``text`` (stripped)."""
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def _check_peer(peer: str) -> str:
    """Return ``"ok"`` or the reason ``peer`` cannot run (cheap: no peer import)."""
    if peer not in PEER_NAMES:
        return f"unknown peer {peer!r}; known: {', '.join(PEER_NAMES)}"
    python = peer_python(peer)
    if not python.exists():
        return f"no virtual environment: {python} missing (see benchmarks/README.md)"
    path = f"{PEERS_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    for prog in _PEER_PROGRAMS.get(peer, ()):
        if shutil.which(prog, path=path) is None:
            return (f"program {prog!r} not on PATH (apt-get install source-extractor psfex;"
                    f" symlink sextractor/sex in {PEERS_BIN})")
    return "ok"


def available_peers(*, import_check: bool = True, timeout: float = 120.0) -> dict[str, str]:
    """Map each peer name to ``"ok"`` or the reason it cannot be run.

    With ``import_check`` each venv's python imports the peer module (about 1-3 s per peer).
    """
    status: dict[str, str] = {}
    for peer in PEER_NAMES:
        reason = _check_peer(peer)
        if reason == "ok" and import_check:
            code = f"import {_PEER_MODULE[peer]}"
            try:
                with tempfile.TemporaryDirectory(prefix=f"peercheck_{peer}_") as tmp:
                    proc = subprocess.run(
                        [str(peer_python(peer)), "-c", code], capture_output=True, text=True,
                        timeout=timeout, cwd=tmp, env=_child_env(Path(tmp), 1),
                    )
            except subprocess.TimeoutExpired:
                reason = f"import {_PEER_MODULE[peer]} timed out after {timeout} s"
            else:
                if proc.returncode != 0:
                    reason = f"import failed: {_tail(proc.stderr, 600)}"
        status[peer] = reason
    return status


def _load_result(name: str, call: str, workdir: Path, proc_rc: int, log: str,
                 total_s: float) -> PeerResult:
    """Build a PeerResult from the child's result.json and .npy files."""
    result_json = workdir / "result.json"
    if not result_json.exists():
        return PeerResult(name, False, f"child exited {proc_rc} without result.json: "
                          f"{_tail(log)}", call=call, total_s=total_s, workdir=workdir)
    with open(result_json) as fh:
        res = json.load(fh)
    arrays = {key: np.load(workdir / f"{key}.npy") for key in res.get("arrays", [])}
    ok = bool(res.get("ok"))
    reason = "ok" if ok else _tail(res.get("error", "") or log)
    diff = arrays.get("D", arrays.get("R"))
    return PeerResult(
        name=name, available=ok, reason=reason, call=call,
        wall_s=float(res["wall_s"]) if res.get("wall_s") is not None else float("nan"),
        import_s=float(res["import_s"]) if res.get("import_s") is not None else float("nan"),
        peak_rss_mb=float(res.get("peak_rss_mb", float("nan"))), total_s=total_s,
        difference=diff, score=arrays.get("Scorr"), arrays=arrays,
        info={**res.get("info", {}), "self_rss_mb": res.get("self_rss_mb"),
              "children_rss_mb": res.get("children_rss_mb")},
        workdir=workdir,
    )


def _run_child(peer: str, task: str, variant: str, spec: dict[str, Any], workdir: Path,
               kwargs: dict[str, Any], timeout: float, threads: int) -> PeerResult:
    """Write the child script and spec into ``workdir``, run it, and collect the result."""
    call = _describe(peer, task, variant, kwargs)
    reason = _check_peer(peer)
    if reason != "ok":
        return PeerResult(peer, False, reason, call=call, workdir=workdir)
    if (peer, task) not in _BODIES:
        return PeerResult(peer, False, f"{peer} has no {task} call in this harness",
                          call=call, workdir=workdir)
    inputs = [spec[k] for k in ("reference", "science") if k in spec] + spec.get("inputs", [])
    missing = [str(p) for p in inputs if not (workdir / p).exists()]  # relative: in workdir
    if missing:
        return PeerResult(peer, False, f"input not found: {', '.join(missing)}", call=call,
                          workdir=workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", *(p.name for p in workdir.glob("*.npy"))):
        (workdir / stale).unlink(missing_ok=True)
    script = workdir / f"child_{peer}_{task}.py"
    script.write_text(_CHILD_PRELUDE + _BODIES[(peer, task)] + _CHILD_EPILOGUE)
    spec = {**spec, "workdir": str(workdir), "result_json": str(workdir / "result.json"),
            "variant": variant, "kwargs": kwargs}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = workdir / f"child_{peer}_{task}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [str(peer_python(peer)), str(script), str(spec_path)], stdout=log,
                stderr=subprocess.STDOUT, cwd=str(workdir), env=_child_env(workdir, threads),
                timeout=timeout,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -9
    total_s = time.perf_counter() - t0
    log_text = log_path.read_text(errors="replace")
    if rc == -9:
        return PeerResult(peer, False, f"timed out after {timeout} s: {_tail(log_text)}",
                          call=call, total_s=total_s, workdir=workdir)
    result = _load_result(peer, call, workdir, rc, log_text, total_s)
    if peer == "sfft":  # its own stage timings: numba compilation is part of wall_s
        patterns = {
            "sfft_compile_s": r"Function Compilations of SFFT-SUBTRACTION TAKES \[([0-9.]+) s\]",
            "sfft_subtract_s": r"Report: SFFT-SUBTRACTION TAKES \[([0-9.]+) s\]",
        }
        for key, pattern in patterns.items():
            match = re.search(pattern, log_text)
            if match:
                result.info[key] = float(match.group(1))
    return result


def _copy_fits(src: Path, dst: Path, extra_header: dict[str, Any] | None = None,
               dtype: str | None = None) -> None:
    """Copy the primary HDU of ``src`` to ``dst``, optionally as ``dtype``, adding header cards.

    Values are unchanged (a float32 copy of uint16 data is exact).
    """
    with fits.open(src) as hdul:
        data = hdul[0].data if dtype is None else hdul[0].data.astype(dtype)
        header = hdul[0].header.copy()
    for key in ("BZERO", "BSCALE"):
        if dtype is not None and key in header:
            del header[key]
    hdu = fits.PrimaryHDU(data=data, header=header)
    for key, value in (extra_header or {}).items():
        if key not in hdu.header:
            hdu.header[key] = value
    hdu.writeto(dst, overwrite=True)


def _kwargs(peer: str, task: str, variant: str,
            overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments for the peer call: the variant's, updated with ``overrides``."""
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    return {**_KWARGS.get((peer, task, variant), {}), **(overrides or {})}


def _describe(peer: str, task: str, variant: str, kwargs: dict[str, Any]) -> str:
    """Human-readable peer call used in reports."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    calls = {
        ("properimage", "subtract"): "properimage.operations.subtract(ref=REF, new=SCI{})",
        ("properimage", "coadd"): "properimage.operations.coadd([SingleImage(p) ...]{})",
        ("properimage", "psf"): "SingleImage(p).get_variable_psf({})",
        ("zogyp", "subtract"): "zogyp.zip.run_ZOGY(SCI, REF{})",
        ("zogyp", "coadd"): "zogyp.zo_coadd.prop_coad([p ...], make_fits=False{})",
        ("sfft", "subtract"): ("Customized_Packet.CP(REF, SCI, mREF=REF, mSCI=SCI{})"
                               if variant == "tutorial" else "Easy_CrowdedPacket.ECP(REF, SCI{})"),
        ("ois", "subtract"): "ois.optimal_system(SCI, REF{})",
    }
    template = calls.get((peer, task), f"{peer} {task}{{}}")
    if "({})" in template:
        return template.format(args)
    return template.format(", " + args if args else "")


def run_peer_subtraction(peer: str, reference_fits: str | os.PathLike[str],
                         science_fits: str | os.PathLike[str], *, variant: str = "default",
                         workdir: str | os.PathLike[str], timeout: float = 1800.0,
                         threads: int = 1,
                         overrides: dict[str, Any] | None = None) -> PeerResult:
    """Subtract ``reference_fits`` from ``science_fits`` with ``peer`` in its own venv.

    The pair must already be registered (no peer is asked to align).  Results follow the
    convention that a new source in the science image is positive in D.

    Parameters
    ----------
    peer : str
        One of ``PEER_NAMES``.
    reference_fits : path
        Reference FITS file (primary HDU image).
    science_fits : path
        Science ("new") FITS file, registered to the reference.
    variant : str
        ``"default"``: the peer's call with its default arguments; ``"tutorial"``: the call
        its tutorial/README (or PEERS.md) uses.  See ``_KWARGS``.
    workdir : path
        Folder for the child's files (created; reused files are overwritten).
    timeout : float
        Seconds before the child is killed.
    threads : int
        Value for the OMP/BLAS/numba/pyFFTW thread-count variables in the child (and sfft's
        ``NUM_CPU_THREADS_4SUBTRACT``).  1 by default: on this shared 2-core machine two
        BLAS threads made ois 2-7x slower whenever the other core was busy.
    overrides : dict, optional
        Keyword arguments merged over the variant's (JSON-serialisable), e.g.
        ``{"kernelshape": [9, 9]}`` for ois or ``{"inf_loss": 0.05}`` for properimage.

    Returns
    -------
    PeerResult with ``difference`` = D and ``score`` = Scorr (properimage, zogyp), both in the
    peer's own units, real part.  Per-peer inputs: properimage gets the original paths;
    zogyp gets float32 copies named ``sci.fits``/``ref.fits`` in workdir (it derives file
    names by replacing ``.fits``, byte-swaps what it reads, writes into ``workdir/Zoutput``);
    sfft gets copies with ``SFFT_HEADER_DEFAULTS`` added when absent; ois gets float64 arrays
    read by the child before the timed call.
    """
    kwargs = _kwargs(peer, "subtract", variant, overrides)
    if peer == "sfft":
        kwargs.setdefault("NUM_CPU_THREADS_4SUBTRACT", threads)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ref, sci = Path(reference_fits).resolve(), Path(science_fits).resolve()
    missing = [str(p) for p in (ref, sci) if not p.is_file()]
    if missing:
        return PeerResult(peer, False, f"input not found: {', '.join(missing)}",
                          call=_describe(peer, "subtract", variant, kwargs), workdir=workdir)
    if _check_peer(peer) == "ok":
        if peer == "zogyp":
            shutil.rmtree(workdir / "Zoutput", ignore_errors=True)
            # float32: zogyp byte-swaps what astropy reads, which only works for big-endian
            # (unscaled) data; uint16 (BZERO) data come back native and sep rejects them.
            _copy_fits(ref, workdir / "ref.fits", dtype="float32")
            _copy_fits(sci, workdir / "sci.fits", dtype="float32")
            ref, sci = Path("ref.fits"), Path("sci.fits")  # relative: zogyp builds names
        elif peer == "sfft":
            _copy_fits(ref, workdir / "sfft_ref.fits", SFFT_HEADER_DEFAULTS)
            _copy_fits(sci, workdir / "sfft_sci.fits", SFFT_HEADER_DEFAULTS)
            ref, sci = workdir / "sfft_ref.fits", workdir / "sfft_sci.fits"
    spec = {"reference": str(ref), "science": str(sci)}
    return _run_child(peer, "subtract", variant, spec, workdir, kwargs, timeout, threads)


def run_peer_coadd(peer: str, fits_list: Sequence[str | os.PathLike[str]], *,
                   variant: str = "default", workdir: str | os.PathLike[str],
                   timeout: float = 1800.0, threads: int = 1,
                   overrides: dict[str, Any] | None = None) -> PeerResult:
    """Proper-coadd ``fits_list`` with ``peer`` (properimage or zogyp).

    ``difference`` holds the coadd R (real part); ``arrays`` also has properimage's PSF of R
    (``P``) and mask.  properimage default aligns with astroalign (``align=True``); its
    "tutorial" variant uses ``align=False`` for pre-registered inputs.  zogyp's ``prop_coad``
    gets float32 copies named ``coadd_<i>.fits`` in workdir (catalogues are written there).
    ``workdir``, ``timeout``, ``threads`` and ``overrides`` are as in ``run_peer_subtraction``.
    """
    kwargs = _kwargs(peer, "coadd", variant, overrides)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p).resolve() for p in fits_list]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return PeerResult(peer, False, f"input not found: {', '.join(missing)}",
                          call=_describe(peer, "coadd", variant, kwargs), workdir=workdir)
    if peer == "zogyp" and _check_peer(peer) == "ok":
        copies = []
        for i, path in enumerate(paths):
            copies.append(workdir / f"coadd_{i}.fits")
            _copy_fits(path, copies[-1], dtype="float32")
        paths = copies
    spec = {"inputs": [str(p) for p in paths]}
    return _run_child(peer, "coadd", variant, spec, workdir, kwargs, timeout, threads)


def run_peer_psf(peer: str, image_fits: str | os.PathLike[str], *,
                 positions: Sequence[tuple[float, float]] = (), variant: str = "default",
                 workdir: str | os.PathLike[str], timeout: float = 900.0,
                 threads: int = 1, overrides: dict[str, Any] | None = None) -> PeerResult:
    """Estimate the spatially varying (KL) PSF of ``image_fits`` with ``peer`` (properimage).

    ``positions`` are 0-based ``(x, y)`` = (column, row) pixel positions.  Only
    ``get_variable_psf`` is timed; the evaluation at ``positions`` happens afterwards.
    ``arrays`` holds ``basis`` (n_basis, s, s), ``afield_values`` (n_basis, n_positions) -
    the a-field polynomials evaluated at the positions (ones when a single basis is kept),
    ``psf_at_positions`` (n_positions, s, s) from properimage's ``get_psf_xy`` (unit sum), and
    ``positions_xy``.  ``difference``/``score`` are None.  ``overrides={"inf_loss": x}``
    sets the information loss; ``workdir``, ``timeout``, ``threads`` as in
    ``run_peer_subtraction``.
    """
    kwargs = _kwargs(peer, "psf", variant, overrides)
    workdir = Path(workdir).resolve()
    spec = {"inputs": [str(Path(image_fits).resolve())],
            "positions": [[float(x), float(y)] for x, y in positions]}
    return _run_child(peer, "psf", variant, spec, workdir, kwargs, timeout, threads)


# --------------------------------------------------------------------------------------------
# Verification on properimage's sample pair.
# --------------------------------------------------------------------------------------------

SAMPLE_DIR = Path(os.environ.get("ASTRO_ZACKAY_SHARED", "/work/shared")) / "data" / "properimage"
SAMPLE_REFERENCE = SAMPLE_DIR / "aligned_eso085-030-004.fit"
SAMPLE_SCIENCE = SAMPLE_DIR / "aligned_eso085-030-005.fit"


def robust_std(values: np.ndarray) -> float:
    """1.4826 * median absolute deviation of the finite values."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(finite - np.median(finite))))


def _nanstd(values: np.ndarray | None) -> float:
    if values is None:
        return float("nan")
    return float(np.nanstd(np.asarray(values, dtype=float)))


def verification_rows(workroot: str | os.PathLike[str], *, peers: Sequence[str] = PEER_NAMES,
                      variants: Sequence[str] = _VARIANTS,
                      repeats: int = 1) -> list[dict[str, Any]]:
    """Run every peer/variant subtraction on the sample pair; return one summary per call.

    Runs are sequential (sfft alone needs 3-5 GB); each call is repeated ``repeats`` times.
    Each row has peer, variant, call, ok, reason, wall_s (minimum), wall_max_s, import_s,
    peak_rss_mb, shape and std/MAD-std of D and Scorr (from the last repeat).
    """
    rows = []
    for peer in peers:
        for variant in variants:
            walls = []
            for _ in range(max(1, repeats)):
                res = run_peer_subtraction(peer, SAMPLE_REFERENCE, SAMPLE_SCIENCE,
                                           variant=variant,
                                           workdir=Path(workroot) / f"{peer}_{variant}")
                walls.append(res.wall_s)
                if not res.available:
                    break
            rows.append({
                "peer": peer, "variant": variant, "call": res.call, "ok": res.available,
                "reason": res.reason, "wall_s": float(np.nanmin(walls)) if res.available
                else float("nan"), "wall_max_s": float(np.nanmax(walls)) if res.available
                else float("nan"), "import_s": res.import_s,
                "peak_rss_mb": res.peak_rss_mb,
                "shape": None if res.difference is None else tuple(res.difference.shape),
                "std_D": _nanstd(res.difference),
                "mad_std_D": robust_std(res.difference) if res.difference is not None
                else float("nan"),
                "std_Scorr": _nanstd(res.score),
                "mad_std_Scorr": robust_std(res.score) if res.score is not None
                else float("nan"),
            })
    return rows


if __name__ == "__main__":
    print("available_peers():")
    for _peer, _why in available_peers().items():
        print(f"  {_peer:12s} {_why}")
    _root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="peers_"))
    _peers = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else PEER_NAMES
    _repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    _rows = verification_rows(_root, peers=_peers, repeats=_repeats)
    print(f"\nverification on {SAMPLE_REFERENCE.name} (ref) / {SAMPLE_SCIENCE.name} (sci);"
          f" workdirs under {_root}")
    _hdr = ("peer", "variant", "wall s (min-max)", "import s", "RSS MB", "std(D)", "MADstd(D)",
            "std(Scorr)", "MADstd(Scorr)")
    print("| " + " | ".join(_hdr) + " |")
    print("|" + "---|" * len(_hdr))
    for _r in _rows:
        if not _r["ok"]:
            print(f"| {_r['peer']} | {_r['variant']} | FAILED: {_r['reason'][-300:]!r} |")
            continue
        print(f"| {_r['peer']} | {_r['variant']} | {_r['wall_s']:.2f}-{_r['wall_max_s']:.2f} | "
              f"{_r['import_s']:.2f} | "
              f"{_r['peak_rss_mb']:.0f} | {_r['std_D']:.4g} | {_r['mad_std_D']:.4g} | "
              f"{_r['std_Scorr']:.4g} | {_r['mad_std_Scorr']:.4g} |")
    print("\ncalls:")
    for _r in _rows:
        print(f"  {_r['peer']}/{_r['variant']}: {_r['call']}")
