"""Bad inputs of the image steps and of the result readers: each refused by name.

Each refusal is checked for its exception class and for a message naming the input
(the frame of a coadd, the path of a file), what was wrong and what to do.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.nddata import CCDData

from astro_zackay.files import read_background, read_coadd, read_subtraction
from astro_zackay.psf.model import KLPSFModel

#: Each reader of a result file, with the kind of file it reads and its writer.
READERS = {
    "subtraction": (read_subtraction, "write_subtraction"),
    "coadd": (read_coadd, "write_coadd"),
    "background": (read_background, "write_background"),
}


def _bad_files(tmp_path):
    """A garbage file, an empty file and a FITS file cut short."""
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"x" * 3000)
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    image = tmp_path / "image.fits"
    CCDData(np.ones((64, 64)), unit="adu").write(image)
    cut = tmp_path / "cut.fits"
    cut.write_bytes(image.read_bytes()[:4000])
    return {"garbage": garbage, "empty": empty, "cut": cut}


@pytest.mark.parametrize("kind", sorted(READERS))
def test_result_readers_name_a_bad_file(kind, tmp_path):
    read, writer = READERS[kind]
    for label, path in _bad_files(tmp_path).items():
        what = "truncated" if label == "cut" else "empty or corrupt"
        with pytest.raises(OSError, match=rf"{label}.fits' is not a readable FITS file .*"
                                          rf"{what}"):
            read(path)
    with pytest.raises(IsADirectoryError, match=rf"is a directory, not a {kind} file: give the "
                                                rf"path of a file written by {writer}"):
        read(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"no {kind} file at .*absent.fits.*: check the "
                                                rf"path, or write one with {writer}"):
        read(tmp_path / "absent.fits")


def test_psf_model_read_names_a_bad_file(tmp_path):
    for label, path in _bad_files(tmp_path).items():
        what = "truncated" if label == "cut" else "empty or corrupt"
        with pytest.raises(ValueError, match=rf"{label}.fits' is not a FITS file \(.*{what}"):
            KLPSFModel.read(path)
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a PSF file: give the path "
                                                r"of a file written by KLPSFModel.write"):
        KLPSFModel.read(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no PSF file at .*absent.fits.*: check the "
                                                r"path, or write one with KLPSFModel.write"):
        KLPSFModel.read(tmp_path / "absent.fits")
