"""The client API of a training script that runs as an fl_ray site (``learner: script``).

A script written to train centrally becomes a site with a few lines::

    import fl_ray.client as flare

    x, y = flare.receive().data                      # the site's share of the job's dataset
    model.load_state_dict(flare.receive().weights)   # the round's global model
    ...                                              # train as before, log with mlflow as before
    flare.send(model.state_dict(), len(x_train), {"val_accuracy": acc})

The script runs once per round the site is sampled, in the site's process, with MLflow's tracking URI
pointing into the site's run (see :mod:`fl_ray.tracking.mlflow_plugin`). :func:`receive` returns the
same :class:`SiteTask` every time within a run of the script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch


@dataclass(frozen=True)
class SiteTask:
    """What the script gets for this round."""

    site: str
    round: int  # 1-based
    weights: dict[str, torch.Tensor]  # the global model, ready for ``model.load_state_dict``
    data: tuple[np.ndarray, np.ndarray]  # the site's training inputs and labels, as the dataset holds them
    device: torch.device


@dataclass
class SiteResult:
    """What the script hands back with :func:`send`."""

    weights: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


_task: SiteTask | None = None
_result: SiteResult | None = None


def receive() -> SiteTask:
    """The round's task: global weights, round, the site's data and device. Only inside an fl_ray site."""
    if _task is None:
        raise RuntimeError(
            "fl_ray.client.receive(): this script is not running as an fl_ray site (run it with learner: script)"
        )
    return _task


def send(weights: Mapping[str, Any], num_samples: int, metrics: Mapping[str, float] | None = None) -> None:
    """Hand back the new weights (a state dict of tensors or arrays), the number of samples they were trained
    on (the weight in the average) and metrics of this round."""
    receive()
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"fl_ray.client.send: num_samples must be an integer >= 0, got {num_samples!r}")
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(f"fl_ray.client.send: weights must be a non-empty state dict, got {type(weights).__name__}")
    global _result
    _result = SiteResult(
        {
            k: v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v)
            for k, v in weights.items()
        },
        num_samples,
        {k: float(v) for k, v in (metrics or {}).items()},
    )


def is_running() -> bool:
    """True while the script runs as an fl_ray site."""
    return _task is not None
