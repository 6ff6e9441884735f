"""FedAvgM (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification"): FedAvg with momentum on the server.

Each round the pseudo-gradient ``d = w - avg`` (``avg`` the sample-weighted average of the results)
feeds a heavy-ball step: ``m = momentum * m + d``, ``w = w - server_lr * m`` (``m`` starts at zero).
With ``momentum=0`` and ``server_lr=1`` this is FedAvg. Integer and bool entries (counters) take the
rounded weighted average, as in FedAvg.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from fl_ray.strategies.base import Weights, check_float, copy_arrays, global_norm, is_float, state_dtype, update_norm
from fl_ray.strategies.fedavg import FedAvg

log = logging.getLogger(__name__)


def server_momentum_step(
    weights: np.ndarray, average: np.ndarray, momentum_buffer: np.ndarray, server_lr: float, momentum: float
) -> tuple[np.ndarray, np.ndarray]:
    """One FedAvgM step on one entry, in float64: the new weights and the new momentum buffer."""
    weights = np.asarray(weights, np.float64)
    buffer = momentum * np.asarray(momentum_buffer, np.float64) + (weights - average)
    return weights - server_lr * buffer, buffer


class FedAvgM(FedAvg):
    """Server momentum over FedAvg's average; reports ``pseudo_gradient_norm``, ``momentum_norm``,
    ``server_lr`` and ``update_norm``."""

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = check_float("server_lr", server_lr, low=0, low_open=True)
        self.momentum = check_float("momentum", momentum, low=0, high=1, high_open=True)
        self.momentum_buffer: dict[str, np.ndarray] | None = None
        if self.momentum == 0 and self.server_lr == 1:
            log.warning("strategy fedavgm with momentum=0 and server_lr=1 is fedavg")

    def server_step(
        self, weights: Weights, average: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        new, buffer = dict(average), {}
        for key, w in weights.items():
            if is_float(w):
                previous = self.momentum_buffer[key] if self.momentum_buffer else np.zeros_like(w, np.float64)
                step, m = server_momentum_step(w, average[key], previous, self.server_lr, self.momentum)
                new[key], buffer[key] = step.astype(w.dtype), m.astype(state_dtype(w))
        self.momentum_buffer = buffer
        return new, {
            "pseudo_gradient_norm": update_norm(average, weights),
            "momentum_norm": global_norm(buffer),
            "server_lr": self.server_lr,
            "update_norm": update_norm(new, weights),
        }

    def state(self) -> dict[str, Any]:
        return {"momentum_buffer": self.momentum_buffer}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.momentum_buffer = copy_arrays(state["momentum_buffer"])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "server_lr": self.server_lr, "momentum": self.momentum}
