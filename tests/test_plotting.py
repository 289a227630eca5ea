"""Figures of astro_zackay.plotting: panels, titles, masked pixels and candidate marks."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
from astropy.table import Table

from astro_zackay import AstroZackayWarning, KLPSFModel, coadd, subtract
from astro_zackay.simulation import simulate_image, simulate_pair

matplotlib = pytest.importorskip("matplotlib", reason="plotting tests need matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from astro_zackay.plotting import (  # noqa: E402
    MASK_COLOUR,
    plot_candidates,
    plot_coadd,
    plot_psf_basis,
    plot_psf_coefficients,
    plot_subtraction,
)

MASKED_BOX = (slice(60, 80), slice(150, 190))  # rows, columns of the science image


@pytest.fixture(scope="module")
def subtraction():
    """A 256^2 pair with 4 transients, a masked box in the science image and one
    transient next to it (so flagged MASKED)."""
    pair = simulate_pair((256, 256), n_transients=4, transient_snr=15, seed=5)
    ref, new = pair.reference.ccd, pair.science.ccd.copy()
    truth = pair.transients
    mask = np.zeros(new.shape, dtype=bool)
    row, col = round(truth["y"][0]), round(truth["x"][0])
    mask[MASKED_BOX] = True
    mask[row + 4:row + 8, col - 2:col + 3] = True  # just beside transient 0
    new.mask = mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstroZackayWarning)
        result = subtract(ref, new)
    candidates = result.find_transients(5.0)
    yield result, ref, new, candidates, truth
    plt.close("all")


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def _drawn_colours(ax):
    """The RGBA colour drawn for each pixel of the axes' image."""
    image = ax.images[0]
    return image.to_rgba(image.get_array())


def test_subtraction_panels_titles_and_colour_bars(subtraction):
    result, ref, new, candidates, _ = subtraction
    fig = plot_subtraction(result, ref, new, candidates, threshold=4.5)
    axes = _image_axes(fig)
    assert [ax.get_title().splitlines()[0] for ax in axes] == [
        "reference", "new", "D", "Scorr, threshold 4.5 sigma"]
    n_good = int(np.sum(candidates["good"]))
    assert axes[3].get_title().splitlines()[1] == f"{len(candidates)} candidates ({n_good} good)"
    one = plot_subtraction(result, ref, new, candidates[:1], threshold=4.5)
    assert _image_axes(one)[3].get_title().endswith(
        f"1 candidate ({int(candidates['good'][0])} good)")
    colour_bars = [ax for ax in fig.axes if not ax.images]
    assert len(colour_bars) == 4
    assert all(cb.get_ylabel() for cb in colour_bars)
    assert all(ax.get_xlabel() == "x (pixel)" and ax.get_ylabel() == "y (pixel)" for ax in axes)
    # the Scorr stretch spans +-threshold
    assert axes[3].images[0].get_clim() == (-4.5, 4.5)


def test_subtraction_draws_masked_pixels_in_the_mask_colour(subtraction):
    result, ref, new, candidates, _ = subtraction
    fig = plot_subtraction(result, ref, new, candidates)
    axes = _image_axes(fig)
    magenta = np.array(to_rgba(MASK_COLOUR))
    for ax in axes[1:]:  # new, D and Scorr all lose the box
        drawn = _drawn_colours(ax)
        assert np.allclose(drawn[MASKED_BOX], magenta)
    # unmasked pixels of the reference and the centre of D are never that colour
    assert not np.any(np.all(np.isclose(_drawn_colours(axes[0]), magenta), axis=-1))
    centre = _drawn_colours(axes[2])[100:140, 100:140]
    assert not np.any(np.all(np.isclose(centre, magenta), axis=-1))


def test_subtraction_circles_candidates_at_their_positions(subtraction):
    result, ref, new, candidates, truth = subtraction
    # every injected transient is found, and the one beside the mask is flagged
    dist = np.hypot(candidates["x"][:, None] - truth["x"], candidates["y"][:, None] - truth["y"])
    assert np.all(dist.min(axis=0) < 2.0)  # the masked pixels pull one peak by ~1.7 px
    beside = np.argmin(dist[:, 0])
    assert not candidates["good"][beside]
    assert np.sum(candidates["good"]) >= 3
    fig = plot_subtraction(result, ref, new, candidates)
    for ax in _image_axes(fig):
        circles = ax.patches
        assert len(circles) == len(candidates)
        centres = np.array([c.center for c in circles])
        assert np.allclose(centres, np.column_stack([candidates["x"], candidates["y"]]))
        kinds = [c.get_gid() for c in circles]
        assert kinds == ["good" if g else "flagged" for g in candidates["good"]]
        flagged = circles[beside]
        good = circles[int(np.flatnonzero(candidates["good"])[0])]
        assert flagged.get_linestyle() == "--" and good.get_linestyle() == "-"
        assert to_rgba(flagged.get_edgecolor()) != to_rgba(good.get_edgecolor())


def test_subtraction_without_candidates_and_on_a_given_figure(subtraction):
    result, ref, new, _, _ = subtraction
    fig = plt.figure()
    backend = matplotlib.get_backend()
    assert plot_subtraction(result, ref, new, fig=fig) is fig
    assert matplotlib.get_backend() == backend
    axes = _image_axes(fig)
    assert len(axes) == 4 and not any(ax.patches for ax in axes)
    assert axes[3].get_title() == "Scorr, threshold 5 sigma"


def test_candidate_stamps(subtraction):
    result, ref, new, candidates, _ = subtraction
    fig = plot_candidates(result, ref, new, candidates, size=15, max_candidates=3)
    axes = _image_axes(fig)
    assert len(axes) == 3 * 4
    assert [ax.get_title() for ax in axes[:4]] == ["reference", "new", "D", "Scorr"]
    for i, row in enumerate(candidates[:3]):
        col, line = round(row["x"]), round(row["y"])
        for ax in axes[4 * i:4 * i + 4]:
            left, right, bottom, top = ax.images[0].get_extent()
            assert (right - left, top - bottom) == (15, 15)
            assert (left + 7.5, bottom + 7.5) == (col, line)  # centred on the candidate
            (ring,) = ax.patches
            assert ring.center == (row["x"], row["y"])
            assert to_rgba(ring.get_edgecolor()) == to_rgba("lime" if row["good"] else "red")
        # the stamp holds the image's pixels: its centre is the new image's pixel there
        assert axes[4 * i + 1].images[0].get_array()[7, 7] == new.data[line, col]
        label = axes[4 * i].get_ylabel()
        assert label.startswith(f"#{row['id']} ")
        assert ("good" in label) == bool(row["good"])
    assert "3 of" in fig._suptitle.get_text()
    colour_bars = [ax for ax in fig.axes if not ax.images]
    assert len(colour_bars) == 1 and colour_bars[0].get_ylabel() == "Scorr (sigma)"


def test_candidate_stamps_at_the_edge_are_masked(subtraction):
    result, ref, new, _, _ = subtraction
    corner = Table({"x": [1.2], "y": [2.0], "good": [False]})
    fig = plot_candidates(result, ref, new, corner, size=9)
    drawn = _drawn_colours(_image_axes(fig)[1])
    magenta = np.array(to_rgba(MASK_COLOUR))
    assert np.allclose(drawn[:2], magenta)  # rows below the image
    assert np.allclose(drawn[:, :3], magenta)  # columns left of it
    assert not np.any(np.all(np.isclose(drawn[2:, 3:], magenta), axis=-1))


def test_coadd_panels():
    stars = simulate_image((128, 128), n_stars=30, flux_range=(2e3, 5e4), seed=1).truth
    frames = [simulate_image((128, 128), stars=stars, psf=w, seed=s).ccd
              for s, w in [(2, 2.5), (3, 4.0)]]
    frames[1].mask = np.zeros((128, 128), dtype=bool)
    frames[1].mask[40:50, 40:50] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstroZackayWarning)
        result = coadd(frames)
    fig = plot_coadd(result)
    axes = _image_axes(fig)
    titles = [ax.get_title() for ax in axes]
    assert titles[:2] == ["coadd R (zscale)", "PSF P_R (core)"]
    assert titles[2] == f"depth (lowest {result.depth[~result.image.mask].min():.2f})"
    # the PSF panel is the centred core of P_R, in pixel offsets from its centre
    core = axes[1].images[0].get_array()
    half_y, half_x = core.shape[0] // 2, core.shape[1] // 2
    cy, cx = result.psf.shape[0] // 2, result.psf.shape[1] // 2
    centre = result.psf[cy - half_y:cy + half_y + 1, cx - half_x:cx + half_x + 1]
    assert np.array_equal(core, centre)
    assert core.shape[0] >= 11 and core.sum() > 0.99 * result.psf.sum()
    assert axes[1].images[0].get_extent() == [-half_x - 0.5, half_x + 0.5, -half_y - 0.5,
                                              half_y + 0.5]
    assert np.array_equal(np.ma.getdata(axes[2].images[0].get_array()), result.depth)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)
    assert "2 images" in fig._suptitle.get_text()
    # a pixel masked in one frame only is shallower, not masked
    assert result.depth[45, 45] < 0.9
    plt.close(fig)


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": 0.0}, "threshold must be a positive"),
    ({"threshold": np.nan}, "threshold must be a positive"),
    ({"candidates": Table({"x": [1.0]})}, r"missing \['y'\]"),
])
def test_subtraction_rejects_bad_options(subtraction, kwargs, match):
    result, ref, new, _, _ = subtraction
    with pytest.raises(ValueError, match=match):
        plot_subtraction(result, ref, new, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 20}, "size must be an odd integer"),
    ({"size": 3}, "size must be an odd integer"),
    ({"max_candidates": 0}, "max_candidates must be a positive integer"),
])
def test_candidates_rejects_bad_options(subtraction, kwargs, match):
    result, ref, new, candidates, _ = subtraction
    with pytest.raises(ValueError, match=match):
        plot_candidates(result, ref, new, candidates, **kwargs)


@pytest.mark.parametrize("plot", ["subtraction", "candidates", "coadd", "psf_basis"])
def test_clear_import_error_without_matplotlib(subtraction, monkeypatch, plot):
    result, ref, new, candidates, _ = subtraction
    calls = {
        "subtraction": lambda: plot_subtraction(result, ref, new, candidates),
        "candidates": lambda: plot_candidates(result, ref, new, candidates),
        "coadd": lambda: plot_coadd(result),  # fails before reading any attribute
        "psf_basis": lambda: plot_psf_basis(
            KLPSFModel(np.ones((2, 5, 5)) / 25, np.ones((2, 1)), image_shape=(50, 50), degree=0)),
    }
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"needs matplotlib.*pip install matplotlib"):
        calls[plot]()


def test_package_imports_without_matplotlib():
    """Importing the package, its plotting module and the CLI never needs matplotlib."""
    code = ("import sys; sys.modules['matplotlib'] = None; "
            "import astro_zackay, astro_zackay.plotting, astro_zackay.cli; "
            "print('matplotlib' in [m.split('.')[0] for m in sys.modules if sys.modules[m]])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_psf_figures_label_axes_and_colour_bars():
    model = KLPSFModel(np.ones((2, 5, 5)) / 25, [[1.0, 0.1, 0.0], [0.0, 0.2, 0.1]],
                       image_shape=(50, 80), degree=1)
    for fig in (plot_psf_basis(model), plot_psf_coefficients(model, n_grid=8)):
        panels = _image_axes(fig)
        assert len(panels) == 2
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in panels)
        assert all(ax.get_ylabel() for ax in fig.axes if not ax.images)  # colour bars
        plt.close(fig)
