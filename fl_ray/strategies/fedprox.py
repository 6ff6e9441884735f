"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks").

The server aggregates as FedAvg and sends each sampled site ``{"mu": mu}`` in its round config; the
site adds the proximal term ``mu / 2 * ||w - w_global||^2`` to its local loss (its gradient adds
``mu * (w - w_global)``), which keeps local models near the global one on heterogeneous data.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from fl_ray.strategies.base import RoundPlan, Weights, check_float
from fl_ray.strategies.fedavg import FedAvg

log = logging.getLogger(__name__)


class FedProx(FedAvg):
    """FedAvg aggregation; every sampled site receives the proximal coefficient ``mu`` (>= 0)."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = check_float("mu", mu, low=0)
        if self.mu == 0:
            log.warning("strategy fedprox with mu=0 adds no proximal term: it is fedavg")

    def configure_round(
        self, round_: int, weights: Weights, sites: Sequence[str], count: int, rng: np.random.Generator
    ) -> RoundPlan:
        plan = super().configure_round(round_, weights, sites, count, rng)
        plan.config = {site: {"mu": self.mu} for site in plan.sites}
        return plan

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mu": self.mu}
