"""
Plain-number histograms: what a sans-IO layer observes, for a driver to export. Pure.

A :class:`Histogram` is a list of bucket counts and a sum, so an observation costs a
bisection and two additions (no lock, no label lookup). ``roombus.node.metrics``
turns them into Prometheus histograms at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from itertools import pairwise
from typing import Final, Generic, TypeVar

K = TypeVar("K")


class Counts(Generic[K]):
    """
    Counts by a key from a small, bounded set (an error code, a close code, a status):
    one dict lookup and addition per :meth:`add`.
    """

    __slots__ = ("_by",)

    def __init__(self) -> None:
        self._by: dict[K, int] = {}

    def add(self, key: K) -> None:
        """Count one more *key*."""
        by = self._by
        by[key] = by.get(key, 0) + 1

    def __getitem__(self, key: K) -> int:
        return self._by.get(key, 0)

    def items(self) -> list[tuple[K, int]]:
        """``(key, count)`` of every key counted, in first-counted order."""
        return list(self._by.items())


class Histogram:
    """
    Counts of observations by bucket, Prometheus style: bucket *i* counts the values
    ``<= bounds[i]`` not counted by an earlier one; the last counts the rest (``+Inf``).

    Args:
        bounds: The buckets' upper bounds, increasing.

    Raises:
        ValueError: if *bounds* is empty or not increasing.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds: Final = tuple(float(b) for b in bounds)
        if not self.bounds or any(a >= b for a, b in pairwise(self.bounds)):
            raise ValueError(f"bucket bounds must be increasing and not empty: {self.bounds}")
        #: Observations per bucket, not cumulative; one more than ``bounds`` (``+Inf``).
        self.counts = [0] * (len(self.bounds) + 1)
        #: The sum of every observed value.
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count *value* in its bucket."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_all(self, values: list[float] | list[int]) -> None:
        """Count each of *values* (one call for a batch: the fan-out's queues)."""
        counts = self.counts
        bounds = self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        self.sum += sum(values)

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, values <= it)`` per bucket, ``+Inf`` last (Prometheus ``le``)."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


#: Messages replayed per join with a position.
REPLAY_BUCKETS: Final = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000)
