"""Federated averaging math: no Ray, no torch, only NumPy.

:class:`StreamingAverage` folds client results into a running weighted sum as they arrive, so memory
is one model's worth, not one per site. Floating-point entries are summed in float64 and returned in
their own dtype. Integer entries (counters such as BatchNorm's ``num_batches_tracked``) are averaged
the same way and rounded to the nearest integer of their dtype, so they stay counters.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

Weights = Mapping[str, np.ndarray]


class AggregationError(ValueError):
    """Client results that cannot be averaged together (mismatched keys or shapes, bad weights)."""


class StreamingAverage:
    """A running weighted average of state dicts: ``add`` each result, then ``result``."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, weights: Weights, weight: float) -> None:
        """Add one client's ``weights`` with ``weight`` (its sample count)."""
        if not (isinstance(weight, (int, float, np.integer, np.floating)) and math.isfinite(weight) and weight > 0):
            raise AggregationError(f"weight must be a positive finite number (a sample count), got {weight!r}")
        if self._sums and set(weights) != set(self._sums):
            missing, extra = sorted(set(self._sums) - set(weights)), sorted(set(weights) - set(self._sums))
            raise AggregationError(f"result keys differ from earlier results: missing {missing}, unexpected {extra}")
        for key, value in weights.items():
            arr = np.asarray(value)
            if key not in self._sums:
                self._sums[key] = arr.astype(np.float64) * weight
                self._dtypes[key] = arr.dtype
                continue
            if arr.shape != self._sums[key].shape:
                raise AggregationError(
                    f"{key!r}: shape {arr.shape} differs from earlier results' {self._sums[key].shape}"
                )
            self._sums[key] += arr.astype(np.float64) * weight
        self.total_weight += float(weight)
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        """The weighted average so far, each entry in the dtype it came in."""
        if not self.count:
            raise AggregationError("no results to average")
        out = {}
        for key, total in self._sums.items():
            mean = total / self.total_weight
            dtype = self._dtypes[key]
            if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
                mean = np.rint(mean)
            out[key] = mean.astype(dtype)
        return out


def weighted_average(results: Sequence[tuple[Weights, float]]) -> dict[str, np.ndarray]:
    """Average ``(weights, sample_count)`` pairs in one call."""
    avg = StreamingAverage()
    for weights, n in results:
        avg.add(weights, n)
    return avg.result()


def weighted_metrics(results: Sequence[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """Sample-weighted mean of each metric over the results that report it."""
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for metrics, n in results:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                sums[key] = sums.get(key, 0.0) + float(value) * n
                totals[key] = totals.get(key, 0.0) + n
    return {k: sums[k] / totals[k] for k in sums}


def sample_sites(sites: Sequence[str], count: int, rng: np.random.Generator) -> list[str]:
    """Choose ``count`` distinct sites with ``rng``, returned in their configured order."""
    if not 1 <= count <= len(sites):
        raise ValueError(f"cannot sample {count} of {len(sites)} sites")
    chosen = set(rng.choice(len(sites), size=count, replace=False).tolist())
    return [s for i, s in enumerate(sites) if i in chosen]
