"""The server's files in ``<job>/``: checkpoints, the best model so far and the rounds' summaries.

Everything is plain arrays and JSON, readable with NumPy and ``json`` alone (no fl_ray class, no pickle):

* ``checkpoints/last.npz`` + ``last.json``: what ``--resume`` continues from, rewritten atomically after
  every round: the global weights, the strategy's state and what each site keeps between its rounds
  (arrays, in the ``.npz``), the last completed round and the sampling generator's state (in the
  ``.json``). Its size follows the model and the strategy, not the rounds or the sites' results.
* ``checkpoints/best.npz`` + ``best.json``: the best global model so far by ``server.key_metric``: its
  weights and an input example, its round and metrics. The job has the server's learner rebuild the
  module from it (``Learner.export_model``) and the receivers log that.
* ``rounds.jsonl``: one line per completed round, appended as each ends (its summary, as in result.json).

In a ``.json`` file an array stands as ``{"$array": "<name in the .npz>"}``; :func:`load_tree` puts the
arrays back. The ``.npz`` also holds the ``.json``'s text (as UTF-8 bytes, ``"$tree"``) and is what
:func:`load_tree` reads: one file replaced atomically, so what is read back is always one save, even
after a crash between the two files (the ``.json``, written second for people and other programs, is
then one save behind).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fl_ray.strictjson import plain, strict_json

LAST = "last"
BEST = "best"
ROUNDS_FILE = "rounds.jsonl"
ARRAY = "$array"
TREE = "$tree"  # the .json's text inside the .npz


# --- arrays + JSON ---------------------------------------------------------------------------------


def save_tree(directory: Path, name: str, tree: dict[str, Any]) -> Path:
    """Write ``tree`` (nested dicts of arrays and JSON values) as ``<name>.npz`` + ``<name>.json``, each
    atomically (the ``.npz`` first); returns the ``.json`` path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    text = json.dumps(_split_arrays(tree, "", arrays), allow_nan=False)
    arrays[TREE] = np.frombuffer(text.encode(), dtype=np.uint8)
    tmp = directory / f"{name}.tmp.npz"
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, directory / f"{name}.npz")
    _write_atomic(directory / f"{name}.json", text)
    return directory / f"{name}.json"


def load_tree(directory: Path, name: str) -> dict[str, Any] | None:
    """The tree saved by :func:`save_tree` as ``name`` in ``directory``, or None if there is none."""
    path = Path(directory) / f"{name}.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if TREE in arrays:
        skeleton = json.loads(arrays.pop(TREE).tobytes())
    else:  # written before the .npz held the tree
        skeleton = json.loads(path.with_suffix(".json").read_text())
    return _join_arrays(skeleton, arrays)


def _split_arrays(node: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(node, np.ndarray):
        arrays[path] = node
        return {ARRAY: path}
    if isinstance(node, dict):
        return {str(k): _split_arrays(v, f"{path}/{k}" if path else str(k), arrays) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_split_arrays(v, f"{path}/{i}", arrays) for i, v in enumerate(node)]
    return plain(node)


def _join_arrays(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(node, dict):
        if set(node) == {ARRAY}:
            return arrays[node[ARRAY]]
        return {k: _join_arrays(v, arrays) for k, v in node.items()}
    if isinstance(node, list):
        return [_join_arrays(v, arrays) for v in node]
    return node


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- what --resume continues from ------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Everything the server needs to continue a job after ``round``."""

    round: int
    weights: dict[str, np.ndarray]
    rng_state: dict[str, Any]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    site_states: dict[str, dict[str, Any]] = field(default_factory=dict)  # what each site keeps between rounds


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` as ``<directory>/last.npz`` + ``last.json``."""
    return save_tree(
        directory,
        LAST,
        {
            "round": checkpoint.round,
            "weights": checkpoint.weights,
            "rng_state": checkpoint.rng_state,
            "strategy_state": checkpoint.strategy_state,
            "site_states": checkpoint.site_states,
        },
    )


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The last checkpoint in ``directory``, or None if the job completed no round."""
    tree = load_tree(directory, LAST)
    if tree is None:
        return None
    return Checkpoint(tree["round"], tree["weights"], tree["rng_state"], tree["strategy_state"], tree["site_states"])


# --- the rounds' summaries -------------------------------------------------------------------------


def append_round(job_dir: Path, summary: dict[str, Any]) -> None:
    """Append one round's summary to ``<job_dir>/rounds.jsonl`` (strict JSON, one line), synced to disk."""
    line = strict_json(summary, indent=None) + "\n"
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(job_dir) / ROUNDS_FILE, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def load_rounds(job_dir: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The summaries in ``<job_dir>/rounds.jsonl`` in round order, the last line for a round written twice
    (a round run again after a crash), only rounds up to ``upto`` when given; a torn last line is skipped."""
    path = Path(job_dir) / ROUNDS_FILE
    if not path.exists():
        return []
    by_round: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            summary = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash: that round was not checkpointed, and runs again
        if upto is None or summary["round"] <= upto:
            by_round[summary["round"]] = summary
    return [by_round[r] for r in sorted(by_round)]


# --- the best global model so far, by server.key_metric ---------------------------------------------


@dataclass
class BestRecord:
    """The best global model so far as saved: its round and metrics, weights and an input example."""

    round: int
    key_metric: str
    key_mode: str
    metrics: dict[str, float]
    weights: dict[str, np.ndarray]
    input_example: np.ndarray

    @property
    def score(self) -> float:
        """The value of the key metric."""
        return self.metrics[self.key_metric]


@dataclass
class BestModel:
    """The best global model ready to log: a standalone ``torch.nn.Module`` (from ``Learner.export_model``),
    an input example (a small batch, as the data holds it), its round and metrics."""

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


def save_best(directory: Path, best: BestRecord) -> Path:
    """Write ``best`` as ``<directory>/best.npz`` + ``best.json``; returns the ``.json`` path."""
    return save_tree(
        directory,
        BEST,
        {
            "round": best.round,
            "key_metric": best.key_metric,
            "key_mode": best.key_mode,
            "metrics": best.metrics,
            "weights": best.weights,
            "input_example": best.input_example,
        },
    )


def load_best(directory: Path) -> BestRecord | None:
    """The best model saved in ``directory`` (a job's ``checkpoints``), or None if none is."""
    tree = load_tree(directory, BEST)
    if tree is None:
        return None
    return BestRecord(
        tree["round"], tree["key_metric"], tree["key_mode"], tree["metrics"], tree["weights"], tree["input_example"]
    )
