"""Tests of the tile layout used for spatially varying PSFs."""

import numpy as np
import pytest

from astro_zackay._tiles import tile_layout


@pytest.mark.parametrize("shape,size,border", [((1000, 700), 256, 30), ((64, 64), 64, 10),
                                               ((513, 2049), 500, 0)])
def test_inner_regions_cover_the_image_exactly_once(shape, size, border):
    cover = np.zeros(shape, int)
    for tile in tile_layout(shape, size, border):
        cover[tile.inner] += 1
        sub = np.zeros(shape, bool)[tile.outer]
        assert sub[tile.inner_in_outer].shape == cover[tile.inner].shape
        ny, nx = cover[tile.inner].shape
        assert ny <= size and nx <= size
        # the border is there unless the image edge cuts it
        assert tile.outer[0].start == max(tile.inner[0].start - border, 0)
        assert tile.outer[1].stop == min(tile.inner[1].stop + border, shape[1])
        x, y = tile.centre
        assert tile.inner[1].start <= x < tile.inner[1].stop
        assert tile.inner[0].start <= y < tile.inner[0].stop
    np.testing.assert_array_equal(cover, 1)


def test_bad_layout_arguments():
    with pytest.raises(ValueError, match="tile_size"):
        tile_layout((10, 10), 0, 2)
