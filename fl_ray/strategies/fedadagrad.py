"""FedAdagrad (Reddi et al., 2021): FedOpt with Adagrad's second moment ``v = v + delta^2`` (no ``beta_2``)."""

from __future__ import annotations

import numpy as np

from fl_ray.strategies.fedopt import FedOpt


def adagrad_second_moment(v: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``v + delta**2``."""
    return v + np.square(delta)


class FedAdagrad(FedOpt):
    """Adagrad on the server (see :mod:`fl_ray.strategies.fedopt`)."""

    name = "fedadagrad"

    def __init__(self, eta: float = 0.1, eta_l: float | None = None, beta_1: float = 0.9, tau: float = 0.001) -> None:
        super().__init__(eta, eta_l, beta_1, tau)

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return adagrad_second_moment(v, delta)
