"""Federated strategies: the built-in ones by name, and :func:`build_strategy` for a config's ``strategy:``.

``{"name": "fedadam", "eta": 0.01}`` builds a built-in strategy; ``{"class": "package.module:Class",
...}`` a user's own :class:`Strategy` subclass, each with its constructor arguments. Every problem
raises :class:`StrategyError` naming the field (``strategy.name``, ``strategy.<arg>``), the value and
what was expected.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from fl_ray.importing import import_object
from fl_ray.strategies.base import Aggregation, FitResult, RoundPlan, Strategy, StrategyError
from fl_ray.strategies.fedadagrad import FedAdagrad
from fl_ray.strategies.fedadam import FedAdam
from fl_ray.strategies.fedavg import FedAvg
from fl_ray.strategies.fedavgm import FedAvgM
from fl_ray.strategies.fedmedian import FedMedian
from fl_ray.strategies.fedprox import FedProx
from fl_ray.strategies.fedtrimmedavg import FedTrimmedAvg
from fl_ray.strategies.fedyogi import FedYogi
from fl_ray.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, Scaffold, FedMedian, FedTrimmedAvg)}

__all__ = ["Aggregation", "FitResult", "RoundPlan", "STRATEGIES", "Strategy", "StrategyError", "build_strategy"]


def build_strategy(spec: Mapping[str, Any]) -> Strategy:
    """The strategy ``spec`` names (``name`` or ``class``), built with the rest of ``spec`` as arguments."""
    if not isinstance(spec, Mapping):
        raise StrategyError(f"strategy: expected a mapping with 'name' (one of {', '.join(STRATEGIES)}) or "
                            f"'class' (package.module:Class), got {spec!r}")
    args = {str(k): v for k, v in spec.items() if k not in ("name", "class")}
    if ("name" in spec) == ("class" in spec):
        raise StrategyError(f"strategy: expected exactly one of 'name' (one of {', '.join(STRATEGIES)}) or "
                            f"'class' (package.module:Class), got keys {sorted(map(str, spec))}")
    if "name" in spec:
        cls = STRATEGIES.get(spec["name"]) if isinstance(spec["name"], str) else None
        if cls is None:
            raise StrategyError(f"strategy.name: expected one of {', '.join(STRATEGIES)}, got {spec['name']!r}")
        label = spec["name"]
    else:
        label = spec["class"]
        if not isinstance(label, str):
            raise StrategyError(f"strategy.class: expected an import path 'package.module:Class', got {label!r}")
        try:
            cls = import_object(label, "strategy.class")
        except ValueError as exc:
            raise StrategyError(str(exc)) from None
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise StrategyError(f"strategy.class: expected a subclass of fl_ray.strategies.Strategy, got {label!r} "
                                f"({cls!r})")
    _check_arguments(cls, label, args)
    return cls(**args)


def _check_arguments(cls: type[Strategy], label: str, args: dict[str, Any]) -> None:
    params = list(inspect.signature(cls).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes = f"{label} takes {', '.join(accepted)}" if accepted else f"{label} takes no arguments"
    for name, value in args.items():
        if name not in accepted:
            raise StrategyError(f"strategy.{name}: unknown argument (got {value!r}); {takes}")
    for p in params:
        if p.name in accepted and p.default is p.empty and p.name not in args:
            raise StrategyError(f"strategy.{p.name}: missing; {label} requires it ({takes})")
