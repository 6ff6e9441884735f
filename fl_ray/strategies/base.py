"""The Strategy contract: how the server runs one federated algorithm, with no Ray and no torch.

Each round the round engine asks the strategy to :meth:`Strategy.configure_round` (which sites train,
what each one receives besides the global weights: a per-site ``config`` dict of plain values such as
``mu`` or ``lr``, and ``payload`` arrays shared by every sampled site such as SCAFFOLD's server
control variate), then feeds each site's :class:`FitResult` to the round's :class:`Aggregation` as it
arrives, and takes the new global weights and the metrics the strategy reports for the ``server`` run
from :meth:`Aggregation.result`. Whatever the strategy keeps between rounds (momentum, optimiser
moments, control variates) is in :meth:`Strategy.state`, saved with every checkpoint and handed back
by :meth:`Strategy.load_state` on ``--resume``, so a resumed job continues exactly.

A site-side counterpart reads ``ctx.round_config`` and ``ctx.payload`` and may keep arrays across its
rounds in ``ctx.site_state`` (the engine stores them per site, so they survive a client restart);
``TrainResult.extras`` carries arrays back to the aggregation (SCAFFOLD's control delta). Payload,
site state and extras values are arrays or dicts of arrays keyed like the weights.

Writing your own: subclass :class:`Strategy`, implement :meth:`Strategy.aggregation`, and name it in
the config as ``strategy: {class: package.module:Class, ...constructor arguments}``. The helpers below
(:func:`check_result`, :func:`cast_like`, :func:`update_norm`, :func:`check_float`, ...) are the ones the
built-in strategies use.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence, Union

import numpy as np

from fl_ray.fedavg import sample_sites

Weights = Mapping[str, np.ndarray]
Arrays = Union[np.ndarray, dict[str, np.ndarray]]  # a payload, extras or site-state entry


class StrategyError(ValueError):
    """A strategy argument or a result a strategy cannot use; the message names it."""


@dataclass
class RoundPlan:
    """What a round asks of which sites."""

    sites: list[str]
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # per site: plain values (mu, lr, ...)
    payload: dict[str, Arrays] = field(default_factory=dict)  # what every sampled site receives (control)


@dataclass
class FitResult:
    """One site's answer to a training round."""

    site: str
    weights: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Arrays] = field(default_factory=dict)


class Aggregation(ABC):
    """One round's aggregation: ``add`` each result as it arrives, then ``result`` once.

    ``add`` either folds a result in or raises StrategyError and leaves the aggregation as it was, so
    the engine can drop that one result and go on. Only ``result`` changes the strategy's state.
    """

    @abstractmethod
    def add(self, result: FitResult) -> None:
        """Fold in one site's result (raise StrategyError for one that cannot be used)."""

    @property
    @abstractmethod
    def count(self) -> int:
        """How many results were added."""

    @abstractmethod
    def result(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The new global weights, and what the strategy reports for this round (logged to the server run)."""


class Strategy(ABC):
    """A federated algorithm on the server: round configuration, aggregation and server state.

    ``needs_all_results`` is True for aggregators that must see every result of a round at once (the
    coordinate-wise median, say): they keep O(sampled sites x model) memory; the others O(model).
    """

    name: ClassVar[str] = ""
    needs_all_results: ClassVar[bool] = False

    def initialize(self, weights: Weights, sites: Sequence[str]) -> None:
        """Called once, with the initial global weights and every site, when a job starts (not on resume)."""

    def configure_round(
        self, round_: int, weights: Weights, sites: Sequence[str], count: int, rng: np.random.Generator
    ) -> RoundPlan:
        """Which sites train in round ``round_`` and what they receive; by default ``count`` sites sampled
        with ``rng`` (in their configured order), no config and no payload."""
        return RoundPlan(sample_sites(sites, count, rng))

    @abstractmethod
    def aggregation(self, round_: int, weights: Weights) -> Aggregation:
        """A fresh aggregation for round ``round_``, whose global weights before the round are ``weights``."""

    def state(self) -> dict[str, Any]:
        """What the strategy keeps between rounds: arrays and plain values, for the checkpoint."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Take back what :meth:`state` returned (on ``--resume``)."""

    def describe(self) -> dict[str, Any]:
        """The strategy's name and arguments, logged as params of the parent run."""
        return {"name": self.name or type(self).__name__}


def is_float(array: np.ndarray) -> bool:
    """Whether an entry is a floating-point parameter (integer and bool entries are counters)."""
    return np.issubdtype(np.asarray(array).dtype, np.floating)


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``value`` in the dtype of ``like``: rounded to the nearest integer first for integer and bool entries."""
    dtype = np.asarray(like).dtype
    value = np.asarray(value)
    if not np.issubdtype(dtype, np.floating) and np.issubdtype(value.dtype, np.floating):
        value = np.rint(value)
    return value.astype(dtype)


def state_dtype(like: np.ndarray) -> np.dtype:
    """The dtype a strategy keeps per-entry server state in (momentum, moments, controls): the entry's, at
    least float32."""
    return np.promote_types(np.asarray(like).dtype, np.float32)


def copy_arrays(arrays: Mapping[str, Any] | None) -> dict[str, np.ndarray] | None:
    """A copy of a saved dict of arrays, for :meth:`Strategy.load_state` (None stays None)."""
    return None if arrays is None else {key: np.array(value) for key, value in arrays.items()}


def global_norm(arrays: Weights) -> float:
    """The L2 norm of all ``arrays`` together, as if flattened into one vector."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in arrays.values()))


def update_norm(new: Weights, old: Weights) -> float:
    """The L2 norm of ``new - old`` over the floating entries of ``old`` (how far the global model moved)."""
    return global_norm({k: np.asarray(new[k], np.float64) - old[k] for k in old if is_float(old[k])})


def check_arrays(site: str, what: str, arrays: Any, like: Weights) -> None:
    """Raise StrategyError unless ``arrays`` has exactly the keys and shapes of ``like`` (naming the key)."""
    if not isinstance(arrays, Mapping):
        raise StrategyError(
            f"site {site!r}: {what} must be a dict of arrays keyed like the weights, got {type(arrays).__name__}"
        )
    if set(arrays) != set(like):
        missing, extra = sorted(set(like) - set(arrays)), sorted(set(arrays) - set(like))
        raise StrategyError(
            f"site {site!r}: {what} keys differ from the global weights: missing {missing}, unexpected {extra}"
        )
    for key, ref in like.items():
        shape = np.shape(arrays[key])
        if shape != np.shape(ref):
            raise StrategyError(f"site {site!r}: {what} {key!r} has shape {shape}, expected {np.shape(ref)}")
        if is_float(ref) and not np.all(np.isfinite(arrays[key])):
            raise StrategyError(f"site {site!r}: {what} {key!r} holds NaN or infinite values")


def check_result(result: FitResult, weights: Weights) -> None:
    """Raise StrategyError unless ``result`` has a positive integer sample count and finite weights with
    the keys and shapes of the round's global ``weights``."""
    n = result.num_samples
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise StrategyError(f"site {result.site!r}: num_samples must be a positive integer, got {n!r}")
    check_arrays(result.site, "weights", result.weights, weights)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float, or StrategyError naming ``strategy.<name>``, the value and the expected range.

    Ints are accepted; bools, strings and non-finite numbers are not.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            expected = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            expected = f"a number {'>' if low_open else '>='} {low}"
        elif high is not None:
            expected = f"a number {'<' if high_open else '<='} {high}"
        else:
            expected = "a finite number"
        raise StrategyError(f"strategy.{name}: expected {expected}, got {value!r}")
    return float(value)
