"""SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning"), option II: control variates correct each site's drift towards its own optimum.

The server keeps the global weights ``x`` and a control variate ``c`` (zeros at first), sent to every
sampled site as payload ``"control"``. Site ``i`` keeps its own ``c_i`` in ``ctx.site_state["control"]``
(zeros at first: :func:`initial_control`), takes ``K`` local SGD steps from ``x`` with learning rate
``lr`` on the corrected gradient ``g + (c - c_i)`` (:func:`gradient_correction`), ending at ``y_i``,
then computes ``c_i+ = c_i - c + (x - y_i) / (K * lr)`` (:func:`site_control_update`), keeps ``c_i+``
and returns ``y_i`` with extras ``"control_delta" = c_i+ - c_i``. The server, over the round's results
``S`` out of ``N`` sites::

    x = x + eta_g * mean_S(y_i - x)
    c = c + |S| / N * mean_S(control_delta_i)

Both means are unweighted, as in the paper. Controls cover the floating entries of the weights;
integer and bool entries (counters) take the rounded sample-weighted average, as in FedAvg. Memory:
O(model) on the server, one control per site (O(sites x model) in all) in the sites' state.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, cast

import numpy as np

from fl_ray.fedavg import StreamingAverage
from fl_ray.strategies.base import (
    Aggregation,
    FitResult,
    RoundPlan,
    Strategy,
    StrategyError,
    Weights,
    cast_like,
    check_arrays,
    check_float,
    check_result,
    copy_arrays,
    global_norm,
    is_float,
    state_dtype,
    update_norm,
)


def initial_control(weights: Weights) -> dict[str, np.ndarray]:
    """Zeros for every floating entry of ``weights``: the server's ``c`` and a site's ``c_i`` before their
    first round."""
    return {key: np.zeros(np.shape(w), state_dtype(w)) for key, w in weights.items() if is_float(w)}


def gradient_correction(control: Weights, site_control: Weights) -> dict[str, np.ndarray]:
    """``c - c_i`` per entry: what a site adds to the gradient of that entry at every local step.

    Entries without a gradient (BatchNorm's running statistics) ignore theirs.
    """
    return {key: np.asarray(c) - site_control[key] for key, c in control.items()}


def site_control_update(
    site_control: Weights, control: Weights, global_weights: Weights, local_weights: Weights, steps: int, lr: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Option II's new site control after ``steps`` local SGD steps with learning rate ``lr``.

    ``c_i+ = c_i - c + (x - y_i) / (steps * lr)`` per entry of ``control``, with ``x`` the round's
    ``global_weights`` and ``y_i`` the ``local_weights`` after training. Returns ``(c_i+, c_i+ - c_i)``:
    the site keeps the first in ``ctx.site_state["control"]`` and returns the second as
    ``TrainResult.extras["control_delta"]``. Assumes plain SGD at a constant ``lr``.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: expected the number of local steps taken (an integer >= 1), got {steps!r}")
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"lr: expected the local learning rate (a number > 0), got {lr!r}")
    new, delta = {}, {}
    for key, c in control.items():
        c_i = np.asarray(site_control[key], np.float64)
        drift = (np.asarray(global_weights[key], np.float64) - local_weights[key]) / (steps * lr)
        updated = c_i - c + drift
        new[key] = updated.astype(np.asarray(site_control[key]).dtype)
        delta[key] = (updated - c_i).astype(new[key].dtype)
    return new, delta


def scaffold_server_step(
    weights: np.ndarray,
    mean_weights: np.ndarray,
    control: np.ndarray,
    mean_control_delta: np.ndarray,
    eta_g: float,
    sampled: int,
    total: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One entry's server step, in float64: ``x + eta_g * (mean(y) - x)`` and ``c + sampled/total * mean(dc)``."""
    x = np.asarray(weights, np.float64)
    return x + eta_g * (mean_weights - x), control + sampled / total * np.asarray(mean_control_delta, np.float64)


class ScaffoldAggregation(Aggregation):
    """Unweighted streaming means of the results' weights and control deltas (O(model))."""

    def __init__(self, strategy: Scaffold, weights: Weights) -> None:
        self._strategy = strategy
        self._weights = weights
        self._params = StreamingAverage()  # floating entries, unweighted
        self._counters = StreamingAverage()  # integer and bool entries, sample-weighted
        self._deltas = StreamingAverage()  # control deltas, unweighted

    def add(self, result: FitResult) -> None:
        check_result(result, self._weights)
        if "control_delta" not in result.extras:
            raise StrategyError(
                f"site {result.site!r}: scaffold needs extras['control_delta'] (c_i+ - c_i), "
                f"got extras {sorted(result.extras)}"
            )
        delta = cast(dict[str, np.ndarray], result.extras["control_delta"])
        check_arrays(result.site, "extras['control_delta']", delta, self._strategy.ready_control())
        self._params.add({k: v for k, v in result.weights.items() if is_float(self._weights[k])}, 1)
        self._counters.add(
            {k: v for k, v in result.weights.items() if not is_float(self._weights[k])}, result.num_samples
        )
        self._deltas.add(delta, 1)

    @property
    def count(self) -> int:
        return self._params.count

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if not self.count:
            raise StrategyError("no results to aggregate")
        strategy = self._strategy
        mean_params, mean_deltas = self._params.result(), self._deltas.result()
        new = {k: cast_like(v, self._weights[k]) for k, v in self._counters.result().items()}
        control = {}
        for key, c in strategy.ready_control().items():
            x, c_new = scaffold_server_step(
                self._weights[key],
                mean_params[key],
                c,
                mean_deltas[key],
                strategy.eta_g,
                self.count,
                int(strategy.num_sites or 0),
            )
            new[key], control[key] = x.astype(self._weights[key].dtype), c_new.astype(c.dtype)
        strategy.control = control
        return {k: new[k] for k in self._weights}, {
            "update_norm": update_norm(new, self._weights),
            "control_norm": global_norm(control),
            "server_lr": strategy.eta_g,
        }


class Scaffold(Strategy):
    """SCAFFOLD option II with server learning rate ``eta_g``; reports ``update_norm``, ``control_norm``
    and ``server_lr``."""

    name = "scaffold"

    def __init__(self, eta_g: float = 1.0) -> None:
        self.eta_g = check_float("eta_g", eta_g, low=0, low_open=True)
        self.control: dict[str, np.ndarray] | None = None
        self.num_sites: int | None = None

    def initialize(self, weights: Weights, sites: Sequence[str]) -> None:
        self.control = initial_control(weights)
        self.num_sites = len(sites)

    def configure_round(
        self, round_: int, weights: Weights, sites: Sequence[str], count: int, rng: np.random.Generator
    ) -> RoundPlan:
        plan = super().configure_round(round_, weights, sites, count, rng)
        plan.payload = {"control": self.ready_control()}
        return plan

    def aggregation(self, round_: int, weights: Weights) -> Aggregation:
        control = self.ready_control()
        params = {k for k, w in weights.items() if is_float(w)}
        if set(control) != params:
            raise StrategyError(
                f"scaffold: the server control covers {sorted(control)}, but the weights' "
                f"floating entries are {sorted(params)}"
            )
        return ScaffoldAggregation(self, weights)

    def ready_control(self) -> dict[str, np.ndarray]:
        """The server control variate; StrategyError before ``initialize`` (or ``load_state``)."""
        if self.control is None or not self.num_sites:
            raise StrategyError("scaffold: no server control yet; call initialize() (or load_state()) first")
        return self.control

    def state(self) -> dict[str, Any]:
        return {"control": self.control, "num_sites": self.num_sites}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.control, self.num_sites = copy_arrays(state["control"]), state["num_sites"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eta_g": self.eta_g}
