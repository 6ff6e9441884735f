"""FedOpt (Reddi et al., 2021, "Adaptive Federated Optimization"): an adaptive optimiser on the server.

Each round, with ``x`` the global weights and ``delta = avg - x`` (``avg`` the sample-weighted average
of the results; the paper's Algorithm 2 takes the unweighted mean of the client updates):

    m = beta_1 * m + (1 - beta_1) * delta
    v = second_moment(v, delta)                      (Adagrad, Adam or Yogi: see their modules)
    x = x + eta * m / (sqrt(v) + tau)

with ``m`` starting at zero and ``v`` at ``tau**2``, the smallest start the paper's Algorithm 2 allows
(``v_{-1} >= tau^2``); there is no bias correction, as in the paper. Integer and bool entries
(counters) take the rounded weighted average, as in FedAvg. When ``eta_l`` is set, every sampled site
receives ``{"lr": eta_l}``, its local learning rate.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Mapping, Sequence

import numpy as np

from fl_ray.strategies.base import (
    RoundPlan,
    Weights,
    check_float,
    copy_arrays,
    global_norm,
    is_float,
    state_dtype,
    update_norm,
)
from fl_ray.strategies.fedavg import FedAvg


def first_moment(m: np.ndarray, delta: np.ndarray, beta_1: float) -> np.ndarray:
    """``beta_1 * m + (1 - beta_1) * delta``."""
    return beta_1 * m + (1 - beta_1) * delta


def fedopt_update(weights: np.ndarray, m: np.ndarray, v: np.ndarray, eta: float, tau: float) -> np.ndarray:
    """``weights + eta * m / (sqrt(v) + tau)``."""
    return weights + eta * m / (np.sqrt(v) + tau)


class FedOpt(FedAvg):
    """The shared server optimiser: first moment, update and state; subclasses give the second moment.

    Reports ``pseudo_gradient_norm`` (of ``delta``), ``server_lr`` (``eta``) and ``update_norm``.
    """

    def __init__(self, eta: float, eta_l: float | None, beta_1: float, tau: float) -> None:
        self.eta = check_float("eta", eta, low=0, low_open=True)
        self.eta_l = None if eta_l is None else check_float("eta_l", eta_l, low=0, low_open=True)
        self.beta_1 = check_float("beta_1", beta_1, low=0, high=1, high_open=True)
        self.tau = check_float("tau", tau, low=0, low_open=True)
        self.m: dict[str, np.ndarray] | None = None
        self.v: dict[str, np.ndarray] | None = None

    @abstractmethod
    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """The new second moment from the previous ``v`` and this round's ``delta``."""

    def configure_round(
        self, round_: int, weights: Weights, sites: Sequence[str], count: int, rng: np.random.Generator
    ) -> RoundPlan:
        plan = super().configure_round(round_, weights, sites, count, rng)
        if self.eta_l is not None:
            plan.config = {site: {"lr": self.eta_l} for site in plan.sites}
        return plan

    def server_step(
        self, weights: Weights, average: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        new, ms, vs, deltas = dict(average), {}, {}, {}
        for key, x in weights.items():
            if not is_float(x):
                continue
            delta = deltas[key] = np.asarray(average[key], np.float64) - x
            m = first_moment(self.m[key] if self.m else np.zeros_like(delta), delta, self.beta_1)
            v = self.second_moment(self.v[key] if self.v else np.full_like(delta, self.tau**2), delta)
            new[key] = fedopt_update(np.asarray(x, np.float64), m, v, self.eta, self.tau).astype(x.dtype)
            ms[key], vs[key] = m.astype(state_dtype(x)), v.astype(state_dtype(x))
        self.m, self.v = ms, vs
        return new, {
            "pseudo_gradient_norm": global_norm(deltas),
            "server_lr": self.eta,
            "update_norm": update_norm(new, weights),
        }

    def state(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.m, self.v = copy_arrays(state["m"]), copy_arrays(state["v"])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eta": self.eta, "eta_l": self.eta_l, "beta_1": self.beta_1, "tau": self.tau}
