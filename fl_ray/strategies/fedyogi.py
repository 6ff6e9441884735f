"""FedYogi (Reddi et al., 2021): FedOpt with Yogi's second moment
``v = v - (1 - beta_2) * delta^2 * sign(v - delta^2)``, which grows ``v`` no faster than Adam's."""

from __future__ import annotations

from typing import Any

import numpy as np

from fl_ray.strategies.base import check_float
from fl_ray.strategies.fedopt import FedOpt


def yogi_second_moment(v: np.ndarray, delta: np.ndarray, beta_2: float) -> np.ndarray:
    """``v - (1 - beta_2) * delta**2 * sign(v - delta**2)``."""
    squared = np.square(delta)
    return v - (1 - beta_2) * squared * np.sign(v - squared)


class FedYogi(FedOpt):
    """Yogi on the server (see :mod:`fl_ray.strategies.fedopt`)."""

    name = "fedyogi"

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
        return yogi_second_moment(v, delta, self.beta_2)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta_2": self.beta_2}
