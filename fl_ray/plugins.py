"""Plug-ins: the four kinds of class a job config names, found and checked one way.

Each kind has a contract, an abstract base class that declares the methods a plug-in must implement
and the optional capabilities it may declare (see docs/architecture.md):

============  =====================================  ============================  ========================
kind          contract                               config field                  built-in names
============  =====================================  ============================  ========================
learner       :class:`fl_ray.learners.Learner`       ``learner``                   ``image_classification``
dataset       :class:`fl_ray.data.DatasetSource`     ``dataset.name``              ``digits`` ...
strategy      :class:`fl_ray.strategies.Strategy`    ``strategy.name``/``class``   ``fedavg`` ...
receiver      :class:`fl_ray.receivers.Receiver`     ``tracking.receivers[].type`` ``mlflow`` ...
============  =====================================  ============================  ========================

A config names a plug-in by a built-in name or by an import path ``package.module:Class``;
:func:`plugin_class` imports it and checks it against its contract, :func:`build_plugin` builds it
with the config's arguments. Built-ins are listed here by import path, so this module (and the
config, which checks names with :func:`check_plugin_name`) imports none of them.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from fl_ray.importing import import_object

Kind = Literal["learner", "dataset", "strategy", "receiver"]

CONTRACTS: dict[str, str] = {
    "learner": "fl_ray.learners:Learner",
    "dataset": "fl_ray.data:DatasetSource",
    "strategy": "fl_ray.strategies.base:Strategy",
    "receiver": "fl_ray.receivers.base:Receiver",
}

BUILTINS: dict[str, dict[str, str]] = {
    "learner": {
        "image_classification": "fl_ray.learners:ImageClassificationLearner",
        "lightning": "fl_ray.lightning:LightningLearner",
        "script": "fl_ray.script_learner:ScriptLearner",
    },
    "dataset": {
        "digits": "fl_ray.data:Digits",
        "cifar10": "fl_ray.data:Cifar10",
        "synthetic": "fl_ray.data:Synthetic",
    },
    "strategy": {
        "fedavg": "fl_ray.strategies.fedavg:FedAvg",
        "fedavgm": "fl_ray.strategies.fedavgm:FedAvgM",
        "fedprox": "fl_ray.strategies.fedprox:FedProx",
        "fedadam": "fl_ray.strategies.fedadam:FedAdam",
        "fedyogi": "fl_ray.strategies.fedyogi:FedYogi",
        "fedadagrad": "fl_ray.strategies.fedadagrad:FedAdagrad",
        "scaffold": "fl_ray.strategies.scaffold:Scaffold",
        "fedmedian": "fl_ray.strategies.fedmedian:FedMedian",
        "fedtrimmedavg": "fl_ray.strategies.fedtrimmedavg:FedTrimmedAvg",
    },
    "receiver": {
        "mlflow": "fl_ray.receivers.mlflow:MLflowReceiver",
        "tensorboard": "fl_ray.receivers.tensorboard:TensorBoardReceiver",
        "wandb": "fl_ray.receivers.wandb:WandBReceiver",
        "memory": "fl_ray.receivers.base:MemoryReceiver",
    },
}


class PluginError(ValueError):
    """A plug-in that cannot be found, is not of its kind, or does not take its arguments."""


def _expected(kind: str) -> str:
    return f"one of {', '.join(BUILTINS[kind])} or an import path 'package.module:Class'"


def check_plugin_name(kind: Kind, name: Any, field: str) -> str:
    """``name`` if it is a built-in name or has the form of an import path (nothing is imported); the
    message of the PluginError otherwise starts with ``field`` (none when empty: a config validator's)."""
    if not isinstance(name, str) or (name not in BUILTINS[kind] and not _is_path(name)):
        if not field:  # a config validator's message: the config names the field and the value
            raise PluginError(f"expected {_expected(kind)}")
        raise PluginError(
            f"{field}: {name!r} is not an import path 'package.module:Class' nor a built-in {kind}; "
            f"expected {_expected(kind)}"
        )
    return name


def _is_path(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr)


def plugin_class(kind: Kind, name: str, field: str) -> type:
    """The class ``name`` (built-in name or import path) stands for, checked to be a subclass of the kind's
    contract; PluginError names ``field``, the value and what was expected."""
    check_plugin_name(kind, name, field)
    try:
        cls = import_object(BUILTINS[kind].get(name, name), field)
    except ValueError as exc:
        raise PluginError(str(exc)) from None
    contract = import_object(CONTRACTS[kind], "contract")
    if not (isinstance(cls, type) and issubclass(cls, contract)):
        raise PluginError(
            f"{field}: expected a subclass of {CONTRACTS[kind].replace(':', '.')} (the {kind} "
            f"contract), got {name!r} ({cls!r})"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginError(f"{field}: {name!r} does not implement {missing} of the {kind} contract")
    return cls


def build_plugin(kind: Kind, name: str, args: dict[str, Any], field: str, args_field: str) -> Any:
    """``plugin_class(kind, name)(**args)``; arguments it does not take raise PluginError naming ``args_field``."""
    cls = plugin_class(kind, name, field)
    check_arguments(cls, name, args, args_field)
    return cls(**args)


def check_arguments(cls: type, label: str, args: dict[str, Any], args_field: str) -> None:
    """Raise PluginError naming ``args_field.<name>`` for an argument ``cls`` does not take or one it misses."""
    params = list(inspect.signature(cls).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes = f"{label} takes {', '.join(accepted)}" if accepted else f"{label} takes no arguments"
    for name, value in args.items():
        if name not in accepted:
            raise PluginError(f"{args_field}.{name}: unknown argument (got {value!r}); {takes}")
    for p in params:
        if p.name in accepted and p.default is p.empty and p.name not in args:
            raise PluginError(f"{args_field}.{p.name}: missing; {label} requires it ({takes})")
