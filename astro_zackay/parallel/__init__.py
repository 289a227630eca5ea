"""Scale-out on Dask: batches of subtractions and coadds on a ``dask.distributed`` cluster.

The functions here hand the work to an existing distributed engine, Dask, instead of a
scheduler of their own. They are file based: the tasks get paths, each worker reads its
own FITS files and writes its own results, and only a small summary of each task
travels back to the caller, so the scheduler never ships images.

- `subtract_batch`: one `~astro_zackay.subtract` (and its candidates) per pair of
  files;
- `coadd_batch`: one `~astro_zackay.coadd` per group of files;
- `subtract_tiled`: one subtraction of a pair larger than a worker's memory, read and
  written by sections, one task per tile of the in-memory path's tiling;
- `coadd_tree`: one coadd of many frames as partial accumulators merged on the workers.

The two batch functions return an `~astropy.table.Table` with one row per input (its
status, error message, timing and key fitted numbers) and never fail the batch for one
bad input. Dask and
``distributed`` (the ``all`` extra) are imported only when a function runs: the package
imports without them. See the "Scaling out with Dask" page of the documentation.
"""

from ._batch import coadd_batch, subtract_batch
from ._coadd_tree import coadd_tree
from ._tiled import subtract_tiled

__all__ = ["coadd_batch", "coadd_tree", "subtract_batch", "subtract_tiled"]
