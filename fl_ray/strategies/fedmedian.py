"""FedMedian: the coordinate-wise median of the results (Yin et al., 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates").

Each entry of the new global model is the median, coordinate by coordinate, of the sites' values,
unweighted (sample counts are ignored: a site cannot buy influence by claiming many samples). It
needs every result of the round at once: O(sampled sites x model) memory. :class:`RobustAggregation`
is shared with FedTrimmedAvg.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fl_ray.strategies.base import (
    Aggregation,
    FitResult,
    Strategy,
    StrategyError,
    Weights,
    cast_like,
    check_result,
    update_norm,
)

# A coordinate-wise statistic over stacked results (axis 0), and how many results it left out.
Statistic = Callable[[np.ndarray], tuple[np.ndarray, int]]


def coordinate_median(stacked: np.ndarray) -> tuple[np.ndarray, int]:
    """The median over axis 0 (n results), and how many results each coordinate's median leaves out:
    n - 1 for odd n (one middle value), n - 2 for even n (the mean of the two middle values)."""
    n = stacked.shape[0]
    return np.median(stacked, axis=0), n - 1 if n % 2 else n - 2


class RobustAggregation(Aggregation):
    """Keeps every result of the round; ``result`` applies ``statistic`` entry by entry, in float64.

    Reports ``results_trimmed`` (how many results each coordinate's statistic left out) and
    ``update_norm``.
    """

    def __init__(self, weights: Weights, statistic: Statistic) -> None:
        self._weights = weights
        self._statistic = statistic
        self._results: list[dict[str, np.ndarray]] = []

    def add(self, result: FitResult) -> None:
        check_result(result, self._weights)
        self._results.append(result.weights)

    @property
    def count(self) -> int:
        return len(self._results)

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if not self._results:
            raise StrategyError("no results to aggregate")
        new, trimmed = {}, 0
        for key, w in self._weights.items():
            value, trimmed = self._statistic(np.stack([np.asarray(r[key], np.float64) for r in self._results]))
            new[key] = cast_like(value, w)
        return new, {"results_trimmed": float(trimmed), "update_norm": update_norm(new, self._weights)}


class FedMedian(Strategy):
    """Coordinate-wise median of the round's results."""

    name = "fedmedian"
    needs_all_results = True

    def aggregation(self, round_: int, weights: Weights) -> Aggregation:
        return RobustAggregation(weights, coordinate_median)
