"""fl_ray: federated learning on Ray, with every site's tracking delivered through the server.

The public names below load on first use, so that ``fl_ray.config`` (and a command line that only
checks a config) does not pay for importing Ray and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ArrayData": "fl_ray.data",
    "ConfigError": "fl_ray.config",
    "Dataset": "fl_ray.data",
    "DatasetSource": "fl_ray.data",
    "EventKind": "fl_ray.tracking.events",
    "ImageClassificationLearner": "fl_ray.learners",
    "JobConfig": "fl_ray.config",
    "JobResult": "fl_ray.job",
    "Learner": "fl_ray.learners",
    "LearnerContext": "fl_ray.learners",
    "MLflowWriter": "fl_ray.tracking.writers",
    "MemoryReceiver": "fl_ray.receivers.base",
    "Receiver": "fl_ray.receivers.base",
    "ReceiverContext": "fl_ray.receivers.base",
    "Strategy": "fl_ray.strategies",
    "SummaryWriter": "fl_ray.tracking.writers",
    "TrackingEvent": "fl_ray.tracking.events",
    "TrainResult": "fl_ray.learners",
    "WandBWriter": "fl_ray.tracking.writers",
    "load_config": "fl_ray.config",
    "run_job": "fl_ray.job",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fl_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
