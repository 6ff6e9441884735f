"""Server checkpoints: the global weights, the last completed round, the sampling generator's state,
the round summaries so far, the strategy's state and what each site keeps between its rounds, saved atomically after every round under ``<job>/checkpoints/``
(``last.pkl``); and the best global model so far by ``server.key_metric`` (``best.pt``), which the
receiver actor logs as an MLflow model at the end of the job."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LAST = "last.pkl"


@dataclass
class Checkpoint:
    """Everything the server needs to continue a job after ``round``."""

    round: int
    weights: dict[str, np.ndarray]
    rng_state: dict[str, Any]
    rounds: list[dict[str, Any]]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    site_states: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # what each site keeps between rounds


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` as ``<directory>/last.pkl`` so a crash leaves the old one or the new one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{LAST}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(checkpoint, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, directory / LAST)
    return directory / LAST


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The last checkpoint in ``directory``, or None if the job completed no round."""
    path = Path(directory) / LAST
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


# --- the best global model so far, by server.key_metric ---------------------------------------------

BEST = "best.pt"


@dataclass
class BestModel:
    """The best global model so far: its round and metrics, a standalone ``torch.nn.Module`` holding its
    weights (from ``Learner.export_model``) and an input example (a small batch, as the data holds it)."""

    round: int
    key_metric: str
    key_mode: str
    metrics: dict[str, float]
    model: Any
    input_example: np.ndarray

    @property
    def score(self) -> float:
        """The value of the key metric."""
        return self.metrics[self.key_metric]


def improves(value: float, best: float | None, mode: str) -> bool:
    """True if ``value`` beats ``best`` (None: nothing kept yet) under ``mode`` (``max`` or ``min``).

    A tie keeps the earlier round; NaN never improves.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"server.key_mode must be 'max' or 'min', got {mode!r}")
    if value != value:  # NaN
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def save_best(directory: Path, best: BestModel) -> Path:
    """Write ``best`` as ``<directory>/best.pt`` (``torch.save``), atomically like ``last.pkl``."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{BEST}.tmp"
    torch.save(best, tmp)
    os.replace(tmp, directory / BEST)
    return directory / BEST


def load_best(path: Path) -> BestModel | None:
    """The best model saved at ``path`` (a ``best.pt`` file, or the directory holding it); None if none is.

    The file is this job's own (``torch.load`` with ``weights_only=False``: it holds a module).
    """
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / BEST
    if not path.exists():
        return None
    return torch.load(path, weights_only=False)
