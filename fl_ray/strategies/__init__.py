"""Federated strategies: the built-in ones by name (listed in :mod:`fl_ray.plugins`), and :func:`build_strategy`
for a config's ``strategy:``.

``{"name": "fedadam", "eta": 0.01}`` builds a built-in strategy; ``{"class": "package.module:Class",
...}`` a user's own :class:`Strategy` subclass, each with its constructor arguments. Every problem
raises :class:`StrategyError` naming the field (``strategy.name``, ``strategy.<arg>``), the value and
what was expected.
"""

from __future__ import annotations

from typing import Any, Mapping

from fl_ray.importing import import_object
from fl_ray.plugins import BUILTINS, PluginError, check_arguments, plugin_class
from fl_ray.strategies.base import Aggregation, FitResult, RoundPlan, Strategy, StrategyError

STRATEGIES: dict[str, type[Strategy]] = {
    name: import_object(path, "strategy.name") for name, path in BUILTINS["strategy"].items()
}

__all__ = ["Aggregation", "FitResult", "RoundPlan", "STRATEGIES", "Strategy", "StrategyError", "build_strategy"]


def build_strategy(spec: Mapping[str, Any]) -> Strategy:
    """The strategy ``spec`` names (``name`` or ``class``), built with the rest of ``spec`` as arguments."""
    if not isinstance(spec, Mapping):
        raise StrategyError(
            f"strategy: expected a mapping with 'name' (one of {', '.join(STRATEGIES)}) or "
            f"'class' (package.module:Class), got {spec!r}"
        )
    args = {str(k): v for k, v in spec.items() if k not in ("name", "class")}
    if ("name" in spec) == ("class" in spec):
        raise StrategyError(
            f"strategy: expected exactly one of 'name' (one of {', '.join(STRATEGIES)}) or "
            f"'class' (package.module:Class), got keys {sorted(map(str, spec))}"
        )
    field = "strategy.name" if "name" in spec else "strategy.class"
    label = spec["name"] if "name" in spec else spec["class"]
    if "name" in spec and label not in STRATEGIES:
        raise StrategyError(f"strategy.name: expected one of {', '.join(STRATEGIES)}, got {label!r}")
    if "class" in spec and (not isinstance(label, str) or label in STRATEGIES):
        raise StrategyError(f"strategy.class: expected an import path 'package.module:Class', got {label!r}")
    try:
        cls = plugin_class("strategy", label, field)
        check_arguments(cls, label, args, "strategy")
    except PluginError as exc:
        raise StrategyError(str(exc)) from None
    return cls(**args)
