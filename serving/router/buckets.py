"""Fixed log-spaced latency buckets, the same on every router replica, so histograms merge
exactly (counts add) and a percentile read from merged buckets is within one bucket of the
exact nearest-rank value.

Bucket 0 holds everything under FLOOR_S; bucket i >= 1 holds [FLOOR_S * RATIO**(i-1),
FLOOR_S * RATIO**i); the last bucket also holds everything above CEILING_S. A bucket is 5% wide,
so the error of a percentile is at most 5% of its value.
"""

from __future__ import annotations

import math

FLOOR_S = 0.001  # proxying overhead below a millisecond is not what the gates judge
CEILING_S = 600.0  # ten minutes: the longest generation worth telling apart
RATIO = 1.05
_LOG_RATIO = math.log(RATIO)
LAST_BUCKET = math.ceil(math.log(CEILING_S / FLOOR_S) / _LOG_RATIO)


def bucket_of(seconds: float) -> int:
    if seconds < FLOOR_S:
        return 0
    return min(LAST_BUCKET, int(math.log(seconds / FLOOR_S) / _LOG_RATIO) + 1)


def upper_bound(bucket: int) -> float:
    return FLOOR_S * RATIO**bucket


def lower_bound(bucket: int) -> float:
    return 0.0 if bucket == 0 else FLOOR_S * RATIO ** (bucket - 1)


def nearest_rank(counts: dict[int, int], percent: float, maximum: float) -> float | None:
    """The nearest-rank percentile of the values counted in `counts` (bucket -> count): the
    upper bound of the bucket holding that rank, never more than the largest value seen."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(percent / 100 * total))
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            # the last bucket is open-ended: only the largest value bounds it
            return maximum if bucket == LAST_BUCKET else min(upper_bound(bucket), maximum)
    raise AssertionError("unreachable: the ranks end at the total")
