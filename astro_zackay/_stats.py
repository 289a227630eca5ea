"""Robust statistics that several modules share, written once.

The robust standard deviation from the median absolute deviation (MAD), the
median and spread of an image's pixels from a regular subsample, and the
sigma-clipped mean of each row of an array with unused values as NaN (the
background in an annulus around each of many stars). Arrays in, numbers or arrays
out.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAD_TO_SIGMA", "MAP_LEVEL_SAMPLES", "clipped_row_stats", "good_sample", "mad_std",
           "median_and_std", "positive_median", "sampled_median"]

#: The standard deviation of a Gaussian over its median absolute deviation, 1 / Phi^-1(3/4).
MAD_TO_SIGMA = 1.4826
#: Values from which `sampled_median` reads the level of a smooth map (a background rms
#: spline through boxes of tens of pixels): read on a regular grid, 2^20 of them give its
#: median far within the map's own error, at a fraction of a large image's cost.
MAP_LEVEL_SAMPLES = 2**20


def mad_std(values: np.ndarray, centre: float | None = None) -> float:
    """Robust standard deviation: `MAD_TO_SIGMA` times the median of ``|values - centre|``.

    Parameters
    ----------
    values : `~numpy.ndarray`
        The values (any shape; all of them are used, NaN included), in their own
        precision.
    centre : float, optional
        The value the deviations are taken from; default the median of ``values``.

    Returns
    -------
    float
        The standard deviation of a Gaussian with that median absolute deviation.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._stats import mad_std
    >>> mad_std(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    1.4826
    >>> mad_std(np.array([-2.0, 1.0, 3.0]), centre=0.0)
    2.9652
    """
    values = np.asarray(values)
    if centre is None:
        centre = float(np.median(values))
    return MAD_TO_SIGMA * float(np.median(np.abs(values - centre)))


def good_sample(
    values: np.ndarray, good: np.ndarray | None = None, max_values: int | None = None
) -> np.ndarray:
    """The ``good`` ``values`` among a regular subsample of about ``max_values`` of them.

    Parameters
    ----------
    values : `~numpy.ndarray`
        The values (an image; any shape).
    good : `~numpy.ndarray` of bool, optional
        Which values to use (all by default).
    max_values : int, optional
        Keep about ``max_values`` values at most: the good ones among every
        ``values.size // max_values``-th value of the flattened array (all the good
        ones if none of those is), with no copy of the whole image.  On an image of
        rows longer than the stride, every ``gcd(stride, nx)``-th column is read: a
        smooth map is read across its whole width.

    Returns
    -------
    `~numpy.ndarray`
        The kept values, 1-D (a new array when ``good`` is given).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._stats import good_sample
    >>> good_sample(np.arange(10.0), max_values=5).tolist()
    [0.0, 2.0, 4.0, 6.0, 8.0]
    >>> good_sample(np.arange(10.0), np.arange(10) == 7, max_values=5).tolist()  # no good one
    [7.0]
    """
    values = np.asarray(values).ravel()
    step = 1 if max_values is None else max(values.size // int(max_values), 1)
    sample = values[::step]
    if good is None:
        return sample
    good = np.asarray(good, dtype=bool).ravel()
    sample = sample[good[::step]]
    return values[good] if sample.size == 0 else sample


def sampled_median(
    values: np.ndarray, good: np.ndarray | None = None, max_values: int | None = None
) -> float:
    """The median of `good_sample` (the level of a smooth map, read on a subsample).

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._stats import sampled_median
    >>> sampled_median(np.arange(12.0).reshape(3, 4), max_values=6)  # 0, 2, 4, ..., 10
    5.0
    """
    return float(np.median(good_sample(values, good, max_values)))


#: Values of a regular sample that brackets the median in `positive_median`.
_BRACKET_SAMPLE = 2**16
#: Half-width of that bracket in the sample's ranks, in binomial standard deviations
#: (sqrt(n) / 2): a median outside it has a chance below 1e-20, and is then taken the
#: slow way.
_BRACKET_SIGMAS = 10.0


def positive_median(values: np.ndarray) -> float | None:
    """The exact median of the finite positive values (None when there are none).

    Equal to ``np.median(values[np.isfinite(values) & (values > 0)])``, but for a large
    array only the values between two bounds read from a regular sample (ranks far
    on either side of the sample's median) are partitioned; the counts on either side
    tell which of them hold the middle ranks.  On a 4096^2 float32 frame: a few
    comparison passes instead of copying and partitioning 16 million values.  When
    the bounds miss the middle (a pathological layout), the plain median is taken.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._stats import positive_median
    >>> values = np.random.default_rng(0).random((700, 700)).astype(np.float32)
    >>> values[::3] = np.nan
    >>> positive_median(values) == float(np.median(values[np.isfinite(values) & (values > 0)]))
    True
    >>> positive_median(np.array([-1.0, 0.0, np.inf])) is None
    True
    """
    flat = np.asarray(values).ravel()
    good = (flat > 0) & (flat < np.inf)  # NaN is neither
    n = int(np.count_nonzero(good))
    if n == 0:
        return None
    if n <= 16 * _BRACKET_SAMPLE:
        return float(np.median(flat[good]))
    sample = flat[:: max(1, flat.size // _BRACKET_SAMPLE)]
    sample = np.sort(sample[(sample > 0) & (sample < np.inf)])
    margin = int(np.ceil(_BRACKET_SIGMAS * np.sqrt(sample.size) / 2))
    middle = sample.size // 2
    if sample.size < 1000 or middle - margin < 0 or middle + margin >= sample.size:
        return float(np.median(flat[good]))
    low, high = sample[middle - margin], sample[middle + margin]
    del good
    below = int(np.count_nonzero((flat > 0) & (flat < low)))
    inside = flat[(flat >= low) & (flat <= high)]
    first, second = (n - 1) // 2 - below, n // 2 - below
    if first < 0 or second >= inside.size:
        return float(np.median(flat[(flat > 0) & (flat < np.inf)]))
    part = np.partition(inside, [first, second])
    # np.median's own arithmetic: the mean of the middle one or two, in their dtype
    return float(np.mean(part[first : second + 1]))


def median_and_std(
    values: np.ndarray, good: np.ndarray | None = None, max_values: int | None = None
) -> tuple[float, float]:
    """Median and robust standard deviation (`mad_std`) of the ``good`` ``values``.

    Parameters
    ----------
    values : `~numpy.ndarray`
        The values (an image; any shape).
    good : `~numpy.ndarray` of bool, optional
        Which values to use (all by default).
    max_values : int, optional
        Use about ``max_values`` of them at most (`good_sample`).  The medians of
        whole images are slow, and 10^5 values give both numbers to ~0.3 %.

    Returns
    -------
    median, std : float

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._stats import median_and_std
    >>> median_and_std(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    (3.0, 1.4826)
    >>> median_and_std(np.arange(10.0), max_values=5)  # the values 0, 2, 4, 6, 8
    (4.0, 2.9652)
    >>> median_and_std(np.arange(10.0), np.arange(10) < 5)
    (2.0, 1.4826)
    """
    sample = good_sample(values, good, max_values)
    median = float(np.median(sample))
    return median, mad_std(sample, median)


def _sorted_median(ordered: np.ndarray, first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Median of ``count`` values from column ``first`` of each row of a row-sorted array."""
    last = ordered.shape[1] - 1
    low = np.minimum(first + np.maximum((count - 1) // 2, 0), last)
    high = np.minimum(first + np.maximum(count // 2, 0), last)
    pick = np.take_along_axis
    middle = 0.5 * (pick(ordered, low[:, None], axis=1)[:, 0]
                    + pick(ordered, high[:, None], axis=1)[:, 0])
    return np.where(count > 0, middle, np.nan)


def clipped_row_stats(
    values: np.ndarray, nsigma: float = 3.0, iterations: int = 5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigma-clipped mean, standard deviation and count of each row, NaN for unused values.

    Values farther than ``nsigma`` standard deviations from their row's median are
    left out, and the median and deviation measured again, until no value leaves
    (or ``iterations`` rounds). Each row is sorted once: its kept values are always
    one run of its sorted values, so each round reads the medians off the sorted
    rows and the sums off their running sums (taken about the first median, so
    that the variance loses no precision to a large mean), and costs no more
    passes over the values than finding the run's new ends.

    Parameters
    ----------
    values : `~numpy.ndarray`
        Shape ``(n, ...)``: ``n`` rows (the pixels of an annulus around each of
        ``n`` stars), NaN for values not to use.
    nsigma : float
        Clipping threshold in standard deviations.
    iterations : int
        Most clipping rounds.

    Returns
    -------
    mean, std, count : `~numpy.ndarray`
        Per row: the kept values' mean and standard deviation (NaN for a row with
        none) and their number.

    Examples
    --------
    >>> import numpy as np
    >>> from astro_zackay._stats import clipped_row_stats
    >>> rows = np.array([[1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 3.0, 2.0, 50.0],
    ...                  [5.0, 5.0, np.nan, 7.0, 7.0, np.nan, np.nan, np.nan, np.nan]])
    >>> mean, std, count = clipped_row_stats(rows, nsigma=2.0)
    >>> mean.tolist(), count.tolist()
    ([2.0, 6.0], [8, 4])
    """
    ordered = np.sort(np.asarray(values, dtype=float).reshape(len(values), -1), axis=1)
    rows = np.arange(len(ordered))
    first = np.zeros(len(ordered), int)  # the kept run: columns first to first + count - 1
    count = np.count_nonzero(~np.isnan(ordered), axis=1)
    origin = _sorted_median(ordered, first, count)
    deviation = np.nan_to_num(ordered - origin[:, None])  # NaN (unused) -> 0, after the run
    sums = [np.zeros((len(ordered), ordered.shape[1] + 1)) for _ in range(2)]
    np.cumsum(deviation, axis=1, out=sums[0][:, 1:])
    np.cumsum(deviation * deviation, axis=1, out=sums[1][:, 1:])
    for round_ in range(iterations + 1):
        with np.errstate(divide="ignore", invalid="ignore"):
            total, square = (s[rows, first + count] - s[rows, first] for s in sums)
            offset = total / count
            std = np.sqrt(np.maximum(square / count - offset * offset, 0.0))
        if round_ == iterations:
            break
        centre = _sorted_median(ordered, first, count)[:, None]
        reach = nsigma * std[:, None]
        with np.errstate(invalid="ignore"):
            below = np.count_nonzero(ordered < centre - reach, axis=1)
            above = np.count_nonzero(ordered <= centre + reach, axis=1)
        below = np.maximum(below, first)  # values once left out stay out
        above = np.maximum(np.minimum(above, first + count), below)
        if np.array_equal(below, first) and np.array_equal(above, first + count):
            break
        first, count = below, above - below
    return origin + offset, std, count
