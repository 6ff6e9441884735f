"""FedTrimmedAvg: the coordinate-wise trimmed mean of the results (Yin et al., 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates").

For each coordinate the ``k = floor(beta * n)`` largest and ``k`` smallest of the ``n`` sites' values
are dropped and the rest averaged, unweighted. ``beta`` in ``[0, 0.5)`` is the fraction trimmed at
each end; with fewer than ``1 / beta`` results nothing is trimmed (the ``results_trimmed`` metric says
so). Needs every result of the round at once: O(sampled sites x model) memory.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

import numpy as np

from fl_ray.strategies.base import Aggregation, Strategy, Weights, check_float
from fl_ray.strategies.fedmedian import RobustAggregation

log = logging.getLogger(__name__)


def trimmed_mean(stacked: np.ndarray, beta: float) -> tuple[np.ndarray, int]:
    """The mean over axis 0 of the values left after dropping the ``floor(beta * n)`` largest and as many
    smallest per coordinate, and how many results that drops (``2 * floor(beta * n)``)."""
    n = stacked.shape[0]
    k = min(math.floor(beta * n + 1e-9), (n - 1) // 2)  # the tolerance: 0.29 * 100 is 28.999999999999996
    return np.sort(stacked, axis=0)[k : n - k].mean(axis=0), 2 * k


class FedTrimmedAvg(Strategy):
    """Coordinate-wise trimmed mean of the round's results, ``beta`` trimmed at each end."""

    name = "fedtrimmedavg"
    needs_all_results = True

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = check_float("beta", beta, low=0, high=0.5, high_open=True)
        if self.beta == 0:
            log.warning("strategy fedtrimmedavg with beta=0 trims nothing: the unweighted mean")

    def aggregation(self, round_: int, weights: Weights) -> Aggregation:
        return RobustAggregation(weights, partial(trimmed_mean, beta=self.beta))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta": self.beta}
