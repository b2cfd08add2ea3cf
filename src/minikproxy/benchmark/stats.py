"""Summary statistics of a benchmark's samples."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, interpolating linearly between the two
    nearest ranks (numpy's default method). Raises ValueError on no values or a bad ``q``."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Median, extremes and tail percentiles of ``rounds`` samples."""

    median: float
    min: float
    max: float
    p95: float
    p99: float
    rounds: int


def summarize(values: Sequence[float]) -> Summary:
    """Summarize ``values`` (at least one)."""
    if not values:
        raise ValueError("no samples to summarize")
    return Summary(
        median=statistics.median(values),
        min=min(values),
        max=max(values),
        p95=percentile(values, 95),
        p99=percentile(values, 99),
        rounds=len(values),
    )
