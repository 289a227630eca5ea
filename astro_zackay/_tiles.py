"""Overlapping tiles for spatially varying PSFs: where each tile is cut and what it keeps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Tile", "tile_layout"]


@dataclass(frozen=True)
class Tile:
    """One tile: the region it is computed on (``outer``) and the region it keeps (``inner``).

    Attributes
    ----------
    outer : tuple of slice
        Slices of the full image that the tile is computed on (inner plus border,
        clipped at the image edges).
    inner : tuple of slice
        Slices of the full image that the tile's result is kept for; the inner
        regions of a layout cover the image exactly once.
    inner_in_outer : tuple of slice
        The inner region, relative to the outer cut-out.
    centre : tuple of float
        ``(x, y)`` of the inner region's centre (0-based, x the column), where the
        tile's PSFs are evaluated.
    """

    outer: tuple[slice, slice]
    inner: tuple[slice, slice]
    inner_in_outer: tuple[slice, slice]
    centre: tuple[float, float]


def _edges(length: int, n_tiles: int) -> list[int]:
    return [int(edge) for edge in np.round(np.linspace(0, length, n_tiles + 1))]


def tile_layout(shape: tuple[int, int], tile_size: int, border: int) -> list[Tile]:
    """Split an image into near-equal tiles of at most ``tile_size`` pixels plus a border.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the image.
    tile_size : int
        The largest inner side of a tile; the number of tiles along each axis is
        ``ceil(n / tile_size)`` and the inner sides are as equal as possible.
    border : int
        The overlap added on every side (clipped at the image edges), at least the
        radius of the convolution kernels so that inner pixels are exact.

    Returns
    -------
    list of Tile

    Examples
    --------
    >>> from astro_zackay._tiles import tile_layout
    >>> tiles = tile_layout((100, 250), tile_size=128, border=10)
    >>> len(tiles), tiles[0].inner, tiles[0].outer
    (2, (slice(0, 100, None), slice(0, 125, None)), (slice(0, 100, None), slice(0, 135, None)))
    """
    if tile_size < 1 or border < 0:
        raise ValueError(f"tile_size must be >= 1 and border >= 0, got {tile_size}, {border}")
    ny, nx = shape
    y_edges = _edges(ny, int(np.ceil(ny / tile_size)))
    x_edges = _edges(nx, int(np.ceil(nx / tile_size)))
    tiles = []
    for y0, y1 in zip(y_edges[:-1], y_edges[1:]):
        for x0, x1 in zip(x_edges[:-1], x_edges[1:]):
            oy0, oy1 = max(y0 - border, 0), min(y1 + border, ny)
            ox0, ox1 = max(x0 - border, 0), min(x1 + border, nx)
            tiles.append(
                Tile(
                    outer=(slice(oy0, oy1), slice(ox0, ox1)),
                    inner=(slice(y0, y1), slice(x0, x1)),
                    inner_in_outer=(slice(y0 - oy0, y1 - oy0), slice(x0 - ox0, x1 - ox0)),
                    centre=(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1)),
                )
            )
    return tiles
