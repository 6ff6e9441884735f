"""Server checkpoints: the global weights, the last completed round, the sampling generator's state
and the round summaries so far, saved atomically after every round under ``<job>/checkpoints/``."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
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
