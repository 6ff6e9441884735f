"""FedAvg (McMahan et al., 2017): the new global model is the sample-weighted average of the results.

The average streams with :class:`fl_ray.fedavg.StreamingAverage` (one model's worth of memory however
many sites report). :class:`MeanAggregation` ends with the strategy's :meth:`FedAvg.server_step`, which
the server-optimiser strategies (FedAvgM, FedOpt) and FedProx build on.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fl_ray.fedavg import StreamingAverage
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

ServerStep = Callable[[Weights, dict[str, np.ndarray]], tuple[dict[str, np.ndarray], dict[str, float]]]


class MeanAggregation(Aggregation):
    """The sample-weighted streaming mean of a round's results, handed to ``step`` with the round's weights."""

    def __init__(self, weights: Weights, step: ServerStep) -> None:
        self._weights = weights
        self._step = step
        self._mean = StreamingAverage()

    def add(self, result: FitResult) -> None:
        check_result(result, self._weights)
        self._mean.add(result.weights, result.num_samples)

    @property
    def count(self) -> int:
        return self._mean.count

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if not self.count:
            raise StrategyError("no results to aggregate")
        average = {k: cast_like(v, self._weights[k]) for k, v in self._mean.result().items()}
        return self._step(self._weights, average)


class FedAvg(Strategy):
    """Sample-weighted average of the sites' weights; reports ``update_norm``."""

    name = "fedavg"

    def aggregation(self, round_: int, weights: Weights) -> Aggregation:
        return MeanAggregation(weights, self.server_step)

    def server_step(
        self, weights: Weights, average: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The new global weights from the round's weighted ``average``: the average itself for FedAvg."""
        return average, {"update_norm": update_norm(average, weights)}
