"""A user's own strategy, loaded by import path (``user_strategies:ClippedMean``): the example in docs/strategies.md."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fl_ray.fedavg import StreamingAverage
from fl_ray.strategies.base import (
    Aggregation,
    FitResult,
    Strategy,
    Weights,
    cast_like,
    check_float,
    check_result,
    update_norm,
)


class ClippedMean(Strategy):
    """FedAvg of the sites' updates, each clipped to L2 norm ``max_norm`` first (norm bounding against
    poisoned updates, Sun et al., 2019); counts the clipped results over the whole job."""

    name = "clipped_mean"

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = check_float("max_norm", max_norm, low=0, low_open=True)
        self.clipped_total = 0

    def aggregation(self, round_: int, weights: Weights) -> Aggregation:
        return ClippedMeanAggregation(self, weights)

    def state(self) -> dict[str, Any]:
        return {"clipped_total": self.clipped_total}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.clipped_total = state["clipped_total"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_norm": self.max_norm}


class ClippedMeanAggregation(Aggregation):
    """A streaming sample-weighted mean of clipped updates: O(model) memory."""

    def __init__(self, strategy: ClippedMean, weights: Weights) -> None:
        self.strategy, self.weights = strategy, weights
        self.mean = StreamingAverage()
        self.clipped = 0

    def add(self, result: FitResult) -> None:
        check_result(result, self.weights)  # keys, shapes, finite values, sample count: raises StrategyError
        norm = update_norm(result.weights, self.weights)
        scale = min(1.0, self.strategy.max_norm / norm) if norm > 0 else 1.0
        self.mean.add(
            {k: (np.asarray(v, np.float64) - self.weights[k]) * scale for k, v in result.weights.items()},
            result.num_samples,
        )
        self.clipped += scale < 1

    @property
    def count(self) -> int:
        return self.mean.count

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        mean_update = self.mean.result()
        new = {k: cast_like(w + mean_update[k], w) for k, w in self.weights.items()}
        self.strategy.clipped_total += self.clipped  # state changes only here, once per round
        return new, {"results_clipped": float(self.clipped), "update_norm": update_norm(new, self.weights)}
