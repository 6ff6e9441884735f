"""FedAdam (Reddi et al., 2021): FedOpt with Adam's second moment ``v = beta_2 * v + (1 - beta_2) * delta^2``."""

from __future__ import annotations

from typing import Any

import numpy as np

from fl_ray.strategies.base import check_float
from fl_ray.strategies.fedopt import FedOpt


def adam_second_moment(v: np.ndarray, delta: np.ndarray, beta_2: float) -> np.ndarray:
    """``beta_2 * v + (1 - beta_2) * delta**2``."""
    return beta_2 * v + (1 - beta_2) * np.square(delta)


class FedAdam(FedOpt):
    """Adam on the server (see :mod:`fl_ray.strategies.fedopt`)."""

    name = "fedadam"

    def __init__(
        self,
        eta: float = 0.01,
        eta_l: float | None = None,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 0.001,
    ) -> None:
        super().__init__(eta, eta_l, beta_1, tau)
        self.beta_2 = check_float("beta_2", beta_2, low=0, high=1, high_open=True)

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return adam_second_moment(v, delta, self.beta_2)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta_2": self.beta_2}
