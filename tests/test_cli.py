"""Tests of the astro-zackay command line: real runs in subprocesses, mistakes in-process."""

import importlib.util
import io
import logging
import re
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table
from conftest import data_path

import astro_zackay
from astro_zackay._stats import mad_std
from astro_zackay.cli import main
from astro_zackay.files import read_subtraction
from astro_zackay.psf import KLPSFModel
from astro_zackay.simulation import simulate_image, simulate_pair
from astro_zackay.transients import FLAGS

TRANSIENT = (100.0, 140.0)
COSMIC = (60, 100)  # (x, y) of a cosmic ray in the science image: a SHARP candidate
MASKED = (slice(30, 34), 200)  # bad pixels of the science image: NaN in the outputs


def _has(module):
    return importlib.util.find_spec(module) is not None


def run(*args, cwd):
    """``python -m astro_zackay ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "astro_zackay", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """A simulated 256^2 pair (flux ratio 0.85) with a transient, a cosmic ray, bad pixels."""
    folder = tmp_path_factory.mktemp("pair")
    transient = Table({"x": [TRANSIENT[0]], "y": [TRANSIENT[1]], "flux": [6000.0]})
    pair = simulate_pair((256, 256), n_stars=60, flux_range=(2e3, 2e5), flux_ratio=0.85,
                         transients=transient, seed=5)
    science = pair.science.ccd.copy()
    science.data[COSMIC[1], COSMIC[0]] += 5000.0
    science.mask = np.zeros(science.shape, bool)
    science.mask[MASKED] = True
    pair.reference.ccd.write(folder / "ref.fits")
    science.write(folder / "new.fits")
    return folder


def test_subtract_in_a_subprocess_writes_every_result_file(pair_files, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the 'all' extra)")
    done = run("subtract", pair_files / "ref.fits", pair_files / "new.fits", "-o", "diff.fits",
               "--catalog", "cands.ecsv", "--regions", "cands.reg", "--plot", "diff.png",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    # no bar off a terminal: no stage name and no carriage return of a redrawn bar
    assert "subtracting" not in done.stderr and "\r" not in done.stderr
    for name in ("DIFF", "SCORR", "FLUX", "FLUXERR"):
        image = CCDData.read(tmp_path / "diff.fits", hdu=name)
        assert image.shape == (256, 256) and image.wcs is not None
        assert image.mask[MASKED].all() and np.isnan(image.data[MASKED]).all()
        assert np.isfinite(image.data[~image.mask]).all()
        assert image.meta["AZVERS"] == astro_zackay.__version__
        assert image.meta["AZIN1"] == "ref.fits" and image.meta["AZIN2"] == "new.fits"
    score = CCDData.read(tmp_path / "diff.fits", hdu="SCORR")
    assert abs(mad_std(score.data[~score.mask]) - 1.0) < 0.1  # Scorr is in sigma units
    header = fits.getheader(tmp_path / "diff.fits")
    parameters = [header[key] for key in header if key.startswith("AZPAR")]
    assert "threshold=5.0" in parameters and "align=None" in parameters
    assert abs(header["AZBETA"] - 0.85) < 0.03 and header["AZNTILE"] >= 1
    assert any("input 2:" in line and "new.fits" in line for line in header["HISTORY"])
    assert abs(fits.getdata(tmp_path / "diff.fits", "PSF").sum() - 1.0) < 1e-6

    candidates = Table.read(tmp_path / "cands.ecsv")
    assert {"x", "y", "score", "flux", "flux_err", "ra", "dec", "flags", "good"} <= set(
        candidates.colnames)
    for name, (bit, text) in FLAGS.items():
        assert candidates.meta[f"FLAG_{name}"] == f"{bit}: {text}"
        assert header[f"AZFLAG{bit}"] == f"{name}: {text}"
    assert candidates.meta["astro_zackay_version"] == astro_zackay.__version__
    real = candidates[np.hypot(candidates["x"] - TRANSIENT[0], candidates["y"] - TRANSIENT[1])
                      < 1.0]
    cosmic = candidates[np.hypot(candidates["x"] - COSMIC[0], candidates["y"] - COSMIC[1]) < 1.5]
    assert len(real) == 1 and real["good"][0]
    assert len(cosmic) == 1 and not cosmic["good"][0] and cosmic["flags"][0] & FLAGS["SHARP"][0]

    regions = (tmp_path / "cands.reg").read_text().splitlines()
    assert regions[0].startswith("# Region file format: DS9")
    green = f"circle({TRANSIENT[0] + 1:.0f}."
    assert any(line.startswith(green[:-1]) and "color=green" in line for line in regions)
    red = [line for line in regions if line.startswith(f"circle({COSMIC[0] + 1}.")]
    assert len(red) == 1 and "color=red" in red[0] and "SHARP" in red[0]
    assert len([line for line in regions if line.startswith("circle(")]) == len(candidates)

    back = read_subtraction(tmp_path / "diff.fits")  # the file is the whole result
    again = back.find_transients(5.0)
    assert np.allclose(again["x"], candidates["x"]) and np.allclose(again["y"], candidates["y"])
    assert (tmp_path / "diff.png").stat().st_size > 0
    assert (tmp_path / "diff_candidates.png").stat().st_size > 0


def test_subtract_the_real_pair(tmp_path):
    """properimage's pair, 74 s apart, as its user would run it."""
    reference = data_path("properimage", "aligned_eso085-030-004.fit")
    science = data_path("properimage", "aligned_eso085-030-005.fit")
    done = run("subtract", reference, science, "-o", "diff.fits", "--catalog", "cands.ecsv",
               "--unit", "adu", "--gain", "1.4", "--saturation", "65000", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    score = CCDData.read(tmp_path / "diff.fits", hdu="SCORR")
    assert abs(mad_std(score.data[~score.mask]) - 1.0) < 0.1
    assert score.meta["AZIN1"] == "aligned_eso085-030-004.fit"
    assert abs(score.meta["AZBETA"] - 1.0) < 0.01  # wide-aperture photometry: 1.0015
    candidates = Table.read(tmp_path / "cands.ecsv")
    assert 1 <= len(candidates) <= 20 and np.sum(candidates["good"]) <= 3
    assert candidates.meta["parameters"]["gain"] == 1.4


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Three registered 128^2 frames of one field, FWHM 2.5, 3.5 and 3.0, in a folder."""
    folder = tmp_path_factory.mktemp("frames")
    stars = simulate_image((128, 128), n_stars=20, flux_range=(1e4, 1e5), seed=0).truth
    for j, fwhm in enumerate((2.5, 3.5, 3.0)):
        sim = simulate_image((128, 128), psf=fwhm, stars=stars["x", "y", "flux"], seed=j)
        sim.ccd.write(folder / f"frame{j}.fits")
    return folder


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_coadd_of_a_folder_with_bars_then_subtract_against_it(frames, tmp_path, monkeypatch):
    pytest.importorskip("tqdm", reason="progress bars need tqdm (the 'all' extra)")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    out = tmp_path / "coadd.fits"
    plot = ["--plot", str(tmp_path / "coadd.png")] if _has("matplotlib") else []
    assert main(["coadd", str(frames), "-o", str(out), "--fwhm", "2.5,3.5,3.0", *plot]) == 0
    assert "reading frames" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert not plot or (tmp_path / "coadd.png").stat().st_size > 0
    coadd = CCDData.read(out)  # the primary image: the calibrated coadd, with its noise
    assert coadd.unit == "electron" and coadd.uncertainty is not None
    assert coadd.meta["NCOMBINE"] == 3 and coadd.meta["AZIN3"] == "frame2.fits"
    psf = fits.getdata(out, "PSF")
    assert abs(psf.sum() - 1.0) < 1e-6
    depth = fits.getdata(out, "DEPTH")
    assert np.allclose(depth[32:96, 32:96], 1.0, atol=1e-3)
    assert list(Table.read(out, hdu="FRAMES")["name"]) == [f"frame{j}.fits" for j in range(3)]
    # the stored PSF is the reference's: a Gaussian of the coadd's PSF width is not needed
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    diff = tmp_path / "diff.fits"
    assert main(["-q", "subtract", str(out), str(frames / "frame0.fits"), "-o", str(diff),
                 "--science-fwhm", "2.5", "--noise", "white"]) == 0
    assert "coadd.fits" in fits.getheader(diff)["AZIN1"]
    assert abs(fits.getheader(diff)["AZBETA"] - 1.0) < 0.05


def test_coadd_of_a_glob(frames, tmp_path):
    out = tmp_path / "coadd.fits"
    assert main(["-q", "coadd", str(frames / "frame[01].fits"), "-o", str(out),
                 "--fwhm", "2.5,3.5", "--no-reject"]) == 0
    assert fits.getheader(out)["NCOMBINE"] == 2


def test_psf_command_writes_a_model_that_reads_back(frames, tmp_path):
    out = tmp_path / "psf.fits"
    plot = ["--plot", str(tmp_path / "psf.png")] if _has("matplotlib") else []
    assert main(["-q", "psf", str(frames / "frame1.fits"), "-o", str(out),
                 "--method", "constant", *plot]) == 0
    assert not plot or (tmp_path / "psf.png").stat().st_size > 0
    model = KLPSFModel.read(out)
    stamp = model.psf_at(64.0, 64.0)
    ny, nx = stamp.shape
    yy, xx = np.mgrid[:ny, :nx]
    sigma = np.sqrt(np.sum(stamp * ((xx - nx // 2) ** 2 + (yy - ny // 2) ** 2)) / 2.0)
    assert abs(sigma * 2.3548 / 3.5 - 1.0) < 0.1  # the frame's FWHM is 3.5 px


def test_help_shows_an_example_for_each_command(capsys):
    for command in ("subtract", "coadd", "psf", "batch", "coadd-batch", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"astro-zackay {command}" in capsys.readouterr().out.split("example:")[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"astro-zackay {astro_zackay.__version__}"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, pair_files):
    """Files a user might give by mistake."""
    folder = tmp_path_factory.mktemp("bad")
    good = fits.getdata(pair_files / "ref.fits")
    fits.PrimaryHDU(good).writeto(folder / "nounit.fits")
    hdu = fits.PrimaryHDU(good)
    hdu.header["BUNIT"] = "bananas"
    hdu.writeto(folder / "badunit.fits")
    data = (folder / "nounit.fits").read_bytes()
    (folder / "truncated.fits").write_bytes(data[: len(data) // 2])
    (folder / "notes.fits").write_text("not an image")
    Table({"x": [1.0, 2.0]}).write(folder / "table.fits")
    CCDData(good[:200], unit="electron").write(folder / "small.fits")
    rng = np.random.default_rng(1)
    CCDData(rng.normal(100.0, 10.0, (128, 128)), unit="electron").write(folder / "blank.fits")
    for seed in (4, 5):  # three stars of S/N 5-10 each: detected, too faint for a PSF
        sim = simulate_image((128, 128), n_stars=3, flux_range=(300.0, 600.0), seed=seed)
        sim.ccd.write(folder / f"faint{seed}.fits")
    return folder


MISTAKES = {
    "missing": (["subtract", "{pair}/nope.fits", "{pair}/new.fits"], ["does not exist"]),
    "directory": (["subtract", "{pair}", "{pair}/new.fits"], ["is a directory"]),
    "truncated": (["subtract", "{bad}/truncated.fits", "{pair}/new.fits"], ["is truncated"]),
    "not FITS": (["subtract", "{bad}/notes.fits", "{pair}/new.fits"], ["not a readable FITS"]),
    "a table": (["subtract", "{bad}/table.fits", "{pair}/new.fits"], ["holds no 2-D image"]),
    "no unit": (["subtract", "{bad}/nounit.fits", "{pair}/new.fits"], ["no BUNIT", "--unit"]),
    "bad BUNIT": (["subtract", "{bad}/badunit.fits", "{pair}/new.fits"], ["bananas", "--unit"]),
    "bad --unit": (["subtract", "{pair}/ref.fits", "{pair}/new.fits", "--unit", "bananas"],
                   ["--unit", "not a unit"]),
    "shapes": (["subtract", "{bad}/small.fits", "{pair}/new.fits"], ["shape", "--align"]),
    "threshold": (["subtract", "{pair}/ref.fits", "{pair}/new.fits", "--threshold", "-1"],
                  ["--threshold", "> 0"]),
    "gain 0": (["subtract", "{pair}/ref.fits", "{pair}/new.fits", "--gain", "0"],
               ["--gain", "> 0"]),
    "three gains": (["subtract", "{pair}/ref.fits", "{pair}/new.fits", "--gain", "1,2,3"],
                    ["--gain", "REF,NEW"]),
    "nan saturation": (["subtract", "{pair}/ref.fits", "{pair}/new.fits", "--saturation",
                        "nan"], ["--saturation", "finite"]),
    "read noise 0": (["subtract", "{pair}/ref.fits", "{pair}/new.fits", "--read-noise", "0"],
                     ["--read-noise", "> 0"]),
    "no stars": (["subtract", "{bad}/blank.fits", "{bad}/blank.fits"],
                 ["reference image", "--reference-fwhm"]),
    "cupy": (["subtract", "{pair}/ref.fits", "{pair}/new.fits", "--backend", "cupy"],
             ["--backend cupy", "cupy-cuda12x"]),
    "one frame": (["coadd", "{pair}/ref.fits"], ["at least two"]),
    "fwhm count": (["coadd", "{pair}/ref.fits", "{pair}/new.fits", "--fwhm", "2,3,4"],
                   ["--fwhm gives 3 values for 2 images"]),
    "empty glob": (["coadd", "{pair}/*.fts"], ["matches no FITS file"]),
    "psf of a blank": (["psf", "{bad}/blank.fits"], ["--fwhm"]),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_user_mistakes_are_two_lines_exit_2_and_write_nothing(
        mistake, pair_files, bad_files, tmp_path, capsys):
    if mistake == "cupy" and _has("cupy"):
        pytest.skip("CuPy is installed: --backend cupy is not a mistake here")
    args, words = MISTAKES[mistake]
    out = tmp_path / "out.fits"
    argv = [a.format(pair=pair_files, bad=bad_files) for a in args] + ["-o", str(out)]
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own checks
        status = exc.code
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert status == 2
    assert 1 <= len(message) <= 2 and "Traceback" not in err
    for word in words:
        assert word in message[0]
    assert not out.exists()


#: Images without a usable PSF star, given to each command: what its advice must name.
NO_PSF_STARS = {
    "subtract, no star": (["subtract", "blank.fits", "blank.fits"],
                          ["reference image: no sources detected", "--reference-fwhm",
                           "--science-fwhm"]),
    "subtract, faint stars": (["subtract", "faint4.fits", "faint5.fits"],
                              ["reference image: no PSF star passed the cuts", "low_snr: 3",
                               "--saturation", "--reference-fwhm", "--science-fwhm"]),
    "subtract --psf-method kl": (["subtract", "faint4.fits", "faint5.fits", "--psf-method",
                                  "kl"], ["REF", "faint4.fits", "--reference-fwhm"]),
    "coadd, no star": (["coadd", "blank.fits", "faint4.fits"], ["blank.fits", "--fwhm"]),
    "coadd, faint stars": (["coadd", "faint4.fits", "faint5.fits"],
                           ["faint4.fits: no PSF star", "--fwhm (one value, or one per image)"]),
    "psf, no star": (["psf", "blank.fits"], ["IMAGE", "no sources detected", "--fwhm"]),
    "psf, faint stars": (["psf", "faint4.fits"], ["IMAGE", "no PSF star", "--fwhm"]),
}


@pytest.mark.parametrize("case", NO_PSF_STARS)
def test_images_without_psf_stars_get_the_commands_own_advice(
        case, bad_files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(bad_files)
    args, words = NO_PSF_STARS[case]
    out = tmp_path / "out.fits"
    assert main([*args, "-o", str(out)]) == 2
    error = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith(f"astro-zackay {args[0]}: error: ")]
    assert len(error) == 1
    for word in words:
        assert word in error[0]
    # no Python keyword (``fwhm=``, ``stars=``) and no parameter the command lacks
    for python_only in ("=", "snr_min", "isolation", "stars with positions", "psfs"):
        assert python_only not in error[0]
    with pytest.raises(SystemExit, match="0"):
        main([args[0], "--help"])
    options = set(re.findall(r"--[a-z-]+", capsys.readouterr().out))
    named = set(re.findall(r"--[a-z-]+", error[0]))
    assert named and named <= options  # every option it names is one of this command's
    assert not out.exists()


def test_outputs_are_checked_before_any_work(pair_files, tmp_path, capsys):
    existing = tmp_path / "cands.ecsv"
    existing.write_text("keep me")
    args = ["subtract", str(pair_files / "ref.fits"), str(pair_files / "new.fits"),
            "-o", str(tmp_path / "diff.fits")]
    assert main([*args, "--catalog", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_text() == "keep me"
    assert main([*args, "--regions", str(tmp_path / "no" / "such" / "c.reg")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--catalog", str(pair_files / "ref.fits")]) == 2
    assert "also an input" in capsys.readouterr().err
    assert not (tmp_path / "diff.fits").exists()


@pytest.mark.skipif(not _has("matplotlib"), reason="--plot needs matplotlib (the 'all' extra)")
def test_the_figures_beside_a_plot_are_checked_too(pair_files, frames, tmp_path, capsys):
    cutouts = tmp_path / "diff_candidates.png"
    cutouts.write_text("keep me")
    assert main(["subtract", str(pair_files / "ref.fits"), str(pair_files / "new.fits"),
                 "-o", str(tmp_path / "diff.fits"), "--plot", str(tmp_path / "diff.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot's candidates" in err and "--overwrite" in err
    fields = tmp_path / "psf_coefficients.png"
    fields.write_text("keep me")
    assert main(["psf", str(frames / "frame0.fits"), "-o", str(tmp_path / "psf.fits"),
                 "--plot", str(tmp_path / "psf.png")]) == 2
    assert "--plot's coefficients" in capsys.readouterr().err
    assert cutouts.read_text() == fields.read_text() == "keep me"
    assert not list(tmp_path.glob("*.fits"))


@pytest.mark.parametrize("command", ["batch", "coadd-batch"])
def test_a_timeout_without_a_scheduler_is_refused(command, tmp_path, capsys):
    """--timeout waits for --scheduler only: alone, it was silently ignored."""
    (tmp_path / "table.csv").write_text("reference,science,group,path\n")
    args = [command, str(tmp_path / "table.csv"), "--outdir", str(tmp_path / "out")]
    assert main([*args, "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"astro-zackay {command}: error: --timeout is how long to wait "
                                "for --scheduler to answer, and there is no --scheduler: give "
                                "both, or neither"]
    assert not (tmp_path / "out").exists()


def test_demo_checks_its_folder_and_files_before_simulating(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the demo's PNG needs matplotlib (the 'all' extra)")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert main(["demo", "--outdir", str(tmp_path / "notes.txt" / "demo")]) == 2
    err = capsys.readouterr().err
    assert "--outdir" in err and "cannot be created" in err and "simulated" not in err
    (tmp_path / "candidates.reg").write_text("keep me")
    assert main(["demo", "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "candidates.reg' already exists: pass --overwrite" in err and "simulated" not in err
    assert (tmp_path / "candidates.reg").read_text() == "keep me"


def test_verbose_shows_the_traceback_in_a_subprocess(tmp_path):
    quiet = run("subtract", "nope.fits", "new.fits", "-o", "out.fits", cwd=tmp_path)
    loud = run("subtract", "nope.fits", "new.fits", "-o", "out.fits", "--verbose", cwd=tmp_path)
    assert quiet.returncode == loud.returncode == 2
    assert quiet.stderr.strip() == "astro-zackay subtract: error: REF 'nope.fits' does not exist"
    assert "Traceback" in loud.stderr and "does not exist" in loud.stderr.splitlines()[-1]


def test_demo_writes_outputs_and_recovers_the_transients(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the demo's PNG needs matplotlib (the 'all' extra)")
    # a smaller field than the default demo; with seed 2016 at this size the faintest
    # transient sits on a 4-sigma downward noise excursion (Scorr 4.99), so seed 3
    (tmp_path / "candidates.reg").write_text("an earlier run")
    status = main(["demo", "--outdir", str(tmp_path), "--size", "512", "--stars", "150",
                   "--seed", "3", "--overwrite"])
    assert status == 0  # 0 only when every injected transient was recovered
    assert (tmp_path / "candidates.reg").read_text().startswith("# Region file format: DS9")
    for name in ("subtraction.fits", "candidates.reg", "subtraction.png"):
        assert (tmp_path / name).stat().st_size > 0
    score = CCDData.read(tmp_path / "subtraction.fits", hdu="SCORR")
    assert abs(np.std(score.data[~score.mask]) - 1.0) < 0.05  # Scorr is in sigma units
    candidates = Table.read(tmp_path / "candidates.ecsv")
    assert len(candidates) >= 3 and candidates.meta["parameters"]["seed"] == 3
    assert "3 of 3 injected transient(s) recovered" in capsys.readouterr().err


@pytest.mark.parametrize(("message", "expected"), [
    ("pass gain= or read_noise=.", "pass --gain or --read-noise."),
    ("give unit='adu' or reference_psf= (a FWHM)", "give --unit adu or --reference-fwhm (a FWHM)"),
    ("<CoaddResult 64x64 unit=adu flux_scale=0.1>", "<CoaddResult 64x64 unit=adu flux_scale=0.1>"),
    ("flux_ratio=1.02, flux_ratio=-.5, gain=+2", "flux_ratio=1.02, flux_ratio=-.5, gain=+2"),
])
def test_library_keywords_become_options_but_values_stay(message, expected):
    """Advice naming a keyword takes the command's option; a value shown (a repr) is kept."""
    from astro_zackay.cli import _cli_words

    assert _cli_words(message) == expected


def test_astropy_info_notes_only_with_verbose(frames, tmp_path):
    """A file with its image in an extension: astropy's INFO note is not a line of output."""
    data = fits.getdata(frames / "frame1.fits")
    header = fits.getheader(frames / "frame1.fits")
    path = tmp_path / "extension.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header, name="SCI")]).writeto(path)
    astropy_log = logging.getLogger("astropy")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    astropy_log.addHandler(handler)
    before = astropy_log.level
    try:
        for flags, shown in (([], False), (["--verbose"], True)):
            records.clear()
            out = tmp_path / f"psf{len(flags)}.fits"
            assert main([*flags, "psf", str(path), "-o", str(out), "--fwhm", "3.0"]) == 0
            notes = [r for r in records if "first HDU with data" in r.getMessage()]
            assert bool(notes) is shown
            assert astropy_log.level == before
    finally:
        astropy_log.removeHandler(handler)


def test_python_dash_m_runs_the_command(monkeypatch, capsys):
    """``python -m astro_zackay`` is the same command (run in-process here)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["python -m astro_zackay", "--version"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("astro_zackay", run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"astro-zackay {astro_zackay.__version__}"


def test_quiet_keeps_the_warnings_and_errors_but_not_the_info_lines(tmp_path, capsys):
    """--quiet means what its help says: only warnings and errors."""
    few = simulate_image((128, 128), n_stars=8, flux_range=(1e4, 1e5), seed=0)
    few.ccd.write(tmp_path / "few.fits")
    args = ["psf", str(tmp_path / "few.fits"), "-o", str(tmp_path / "psf.fits"), "--overwrite"]
    assert main(["-q", *args]) == 0
    quiet = capsys.readouterr().err
    assert "WARNING astro_zackay: FewStarsWarning" in quiet and "INFO" not in quiet
    assert main(args) == 0
    loud = capsys.readouterr().err
    assert "FewStarsWarning" in loud and "INFO astro_zackay.cli: wrote" in loud
    assert "only warnings and errors" in _help_text(capsys)


def _help_text(capsys):
    with pytest.raises(SystemExit, match="0"):
        main(["psf", "--help"])
    return capsys.readouterr().out
