"""Tests of the astro-zackay command line."""

import numpy as np
import pytest
from astropy.nddata import CCDData
from astropy.table import Table

from astro_zackay.cli import main

pytest.importorskip("matplotlib", reason="the demo's PNG needs matplotlib (the 'all' extra)")


def test_demo_writes_outputs_and_recovers_the_transients(tmp_path):
    # a smaller field than the default demo; with seed 2016 at this size the faintest
    # transient sits on a 4-sigma downward noise excursion (Scorr 4.99), so seed 3
    status = main(["demo", "--outdir", str(tmp_path), "--size", "512", "--stars", "150",
                   "--seed", "3"])
    assert status == 0  # 0 only when every injected transient was recovered
    for name in ("difference.fits", "score.fits", "flux.fits", "subtraction.png"):
        assert (tmp_path / name).stat().st_size > 0
    score = CCDData.read(tmp_path / "score.fits")
    good = ~score.mask
    assert abs(np.std(score.data[good]) - 1.0) < 0.05  # Scorr is in sigma units
    candidates = Table.read(tmp_path / "candidates.ecsv")
    assert {"x", "y", "score", "flux", "flux_err", "ra", "dec", "flags", "good"} <= set(
        candidates.colnames)
    assert len(candidates) >= 3


def test_subtract_command_on_fits_files(tmp_path):
    from astro_zackay.simulation import simulate_pair

    pair = simulate_pair((384, 384), n_stars=100, flux_range=(2e3, 2e5), seed=3)
    pair.reference.ccd.write(tmp_path / "ref.fits")
    pair.science.ccd.write(tmp_path / "sci.fits")
    out = tmp_path / "out"
    assert main(["subtract", str(tmp_path / "ref.fits"), str(tmp_path / "sci.fits"),
                 "--outdir", str(out)]) == 0
    difference = CCDData.read(out / "difference.fits")
    assert difference.shape == (384, 384)
    assert "AZSUB" in difference.meta


def test_subtract_command_writes_flags_and_blank_masked_pixels(tmp_path):
    """Masked pixels are NaN in the FITS; the flag bits are defined in header and table."""
    from astro_zackay.simulation import simulate_pair
    from astro_zackay.transients import FLAGS

    pair = simulate_pair((256, 256), n_stars=40, flux_range=(2e3, 2e5), seed=6)
    science = pair.science.ccd.copy()
    science.data[100, 60] += 5000.0  # a cosmic ray: a flagged candidate
    science.mask = np.zeros(science.shape, bool)
    science.mask[30:34, 200] = True  # a few bad pixels: masked (NaN) outputs
    pair.reference.ccd.write(tmp_path / "ref.fits")
    science.write(tmp_path / "sci.fits")
    out = tmp_path / "out"
    assert main(["subtract", str(tmp_path / "ref.fits"), str(tmp_path / "sci.fits"),
                 "--reference-fwhm", "2.5", "--science-fwhm", "3.5", "--outdir", str(out)]) == 0
    for name in ("difference.fits", "score.fits", "flux.fits"):
        image = CCDData.read(out / name)
        assert image.mask[30:34, 200].all()
        assert np.isnan(image.data[image.mask]).all()
        assert np.isfinite(image.data[~image.mask]).all()
    header = CCDData.read(out / "score.fits").meta
    candidates = Table.read(out / "candidates.ecsv")
    for name, (bit, text) in FLAGS.items():
        assert header[f"AZFLAG{bit}"] == f"{name}: {text}"
        assert candidates.meta[f"FLAG_{name}"] == f"{bit}: {text}"
    cosmic = candidates[np.hypot(candidates["x"] - 60, candidates["y"] - 100) < 1.5]
    assert len(cosmic) == 1 and not cosmic["good"][0] and cosmic["flags"][0] & FLAGS["SHARP"][0]


def test_subtract_command_on_files_without_bunit(tmp_path):
    """Raw frames with no BUNIT and no uncertainty: --unit and --gain make them usable."""
    from astropy.io import fits

    from astro_zackay.simulation import simulate_pair

    pair = simulate_pair((384, 384), n_stars=100, flux_range=(2e3, 2e5), seed=4)
    for name, sim in (("ref.fits", pair.reference), ("sci.fits", pair.science)):
        fits.PrimaryHDU(sim.ccd.data).writeto(tmp_path / name)
    out = tmp_path / "out"
    assert main(["subtract", str(tmp_path / "ref.fits"), str(tmp_path / "sci.fits"),
                 "--unit", "adu", "--gain", "1.0", "--outdir", str(out)]) == 0
    flux = CCDData.read(out / "flux.fits")
    assert flux.unit == "adu"
    assert (out / "subtraction.png").stat().st_size > 0


def test_subtract_command_with_psf_fwhms(tmp_path):
    """--reference-fwhm/--science-fwhm give Gaussian PSFs: the transient is found where it is."""
    from astro_zackay.simulation import simulate_pair

    transient = Table({"x": [100.0], "y": [140.0], "flux": [5000.0]})
    pair = simulate_pair((256, 256), n_stars=40, flux_range=(2e3, 2e5), transients=transient,
                         seed=5)
    pair.reference.ccd.write(tmp_path / "ref.fits")
    pair.science.ccd.write(tmp_path / "sci.fits")
    out = tmp_path / "out"
    assert main(["subtract", str(tmp_path / "ref.fits"), str(tmp_path / "sci.fits"),
                 "--reference-fwhm", "2.5", "--science-fwhm", "3.5", "--outdir", str(out)]) == 0
    candidates = Table.read(out / "candidates.ecsv")
    best = candidates[np.argmax(candidates["score"])]
    assert np.hypot(best["x"] - 100.0, best["y"] - 140.0) < 1.0


def test_coadd_command_with_psf_fwhms(tmp_path):
    """--fwhm gives one Gaussian PSF per image; the coadd's PSF is between them."""
    from astro_zackay.simulation import simulate_image

    stars = simulate_image((128, 128), n_stars=20, flux_range=(1e4, 1e5), seed=0).truth
    names = []
    for j, fwhm in enumerate((2.5, 3.5)):
        sim = simulate_image((128, 128), psf=fwhm, stars=stars["x", "y", "flux"], seed=j)
        names.append(str(tmp_path / f"frame{j}.fits"))
        sim.ccd.write(names[-1])
    out = tmp_path / "out"
    assert main(["coadd", *names, "--fwhm", "2.5", "3.5", "--outdir", str(out)]) == 0
    image = CCDData.read(out / "coadd.fits")
    assert image.shape == (128, 128)
    assert image.meta["NCOMBINE"] == 2


def test_bad_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("command", ["subtract", "coadd"])
def test_backend_option_reaches_the_core_before_any_file_is_written(tmp_path, command):
    """--backend cupy is passed down: without CuPy the error names the wheel, nothing is written."""
    import importlib.util

    from astro_zackay.simulation import simulate_image

    names = []
    for j in range(2):
        names.append(str(tmp_path / f"frame{j}.fits"))
        simulate_image((96, 96), n_stars=10, flux_range=(1e4, 1e5), seed=j).ccd.write(names[-1])
    out = tmp_path / "out"
    args = [command, *names, "--backend", "cupy", "--outdir", str(out)]
    if importlib.util.find_spec("cupy") is not None:
        assert main(args) == 0
        return
    with pytest.raises(ImportError, match="cupy-cuda12x"):
        main(args)
    assert not out.exists()


def test_unknown_backend_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["subtract", "ref.fits", "sci.fits", "--backend", "torch"])
    assert exit_info.value.code == 2
