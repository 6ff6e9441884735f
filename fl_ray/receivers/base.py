"""The Receiver contract: where tracking records end up.

A receiver is a sink for :class:`~fl_ray.tracking.events.TrackingEvent` batches. The receiver actor
opens each configured receiver once per job, calls :meth:`Receiver.write` with batches read from the
durable spool, then :meth:`Receiver.flush`, and only after ``flush`` returns counts the batch as
delivered: it then saves the receiver's progress mark, together with what :meth:`Receiver.checkpoint`
returns, atomically. A receiver that raises is retried with back-off from the same place. After a
crash, the receiver is opened again and handed, by :meth:`Receiver.resume`, the checkpoint saved with
the mark it restarts from; records past that mark are written again, so a receiver whose back end
cannot tell a repeated record (an event file, a W&B history) uses its checkpoint to cut back what it
wrote past the mark. A record the back end refuses for good (a 4xx, or the same error for the same
record again and again) is not raised: the receiver passes it to :meth:`Receiver.set_aside` with the
reason, and the hub keeps it in the job's dead-letter file instead of holding up everything after it.

Writing your own::

    class PrintReceiver(Receiver):
        def open(self, ctx: ReceiverContext) -> None: ...
        def write(self, events: Sequence[TrackingEvent]) -> None:
            for e in events:
                print(e.site, e.key, e.value, e.step)
        def flush(self) -> None: ...
        def close(self, status: str) -> dict: return {}

and name it in the config as ``tracking.receivers: [{type: mypkg.mymod:PrintReceiver}]``; the other
keys of the entry are passed to its constructor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fl_ray.importing import import_object
from fl_ray.tracking.events import TrackingEvent

# Run status names, as MLflow spells them.
FINISHED = "FINISHED"
FAILED = "FAILED"
KILLED = "KILLED"


@dataclass(frozen=True)
class ReceiverContext:
    """What a receiver learns about the job when it is opened."""

    job_id: str
    job_name: str
    job_dir: Path
    workspace: Path
    sites: tuple[str, ...]
    config: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    life: str = "first"  # one run of the job: its first start or a --resume (see TrackingHub)


class Receiver(ABC):
    """A tracking back end: ``open`` once, ``write``/``flush`` batches, ``close`` once.

    Optional capabilities have defaults here: ``buffer_flush_time`` (seconds between deliveries;
    0: deliver as records arrive), ``destination`` (where records go, when the receiver can be
    pointed elsewhere: progress marks are kept per destination), ``checkpoint``/``resume``, and
    ``log_model``/``log_table`` (a receiver that does not override them does not log models or tables).
    """

    buffer_flush_time: float = 0.0

    @property
    def destination(self) -> str | None:
        """Where records go (known once opened), or None when there is only one place."""
        return None

    @abstractmethod
    def open(self, ctx: ReceiverContext) -> None:
        """Prepare the back end (create runs, files, processes)."""

    @abstractmethod
    def write(self, events: Sequence[TrackingEvent]) -> None:
        """Take a batch of events (any sites, any kinds, in arrival order)."""

    @abstractmethod
    def flush(self) -> None:
        """Make every event written so far durable in the back end; raise if that failed."""

    @abstractmethod
    def close(self, status: str) -> dict[str, Any]:
        """End the job's runs with ``status`` (FINISHED, FAILED or KILLED); return a summary for result.json."""

    def checkpoint(self) -> dict[str, Any]:
        """JSON-able state that goes with the progress mark after each successful ``flush``."""
        return {}

    def resume(self, state: dict[str, Any]) -> None:
        """Called once after ``open`` with the checkpoint saved with the mark delivery restarts from
        (``{}`` when there is none): everything written after that checkpoint is written again."""

    def log_model(self, site: str, checkpoint: str, registered_model_name: str | None) -> dict[str, Any] | None:
        """Log the model saved at ``checkpoint`` into ``site``'s run (a receiver that can overrides this)."""
        return None

    def log_table(self, artifact_file: str, table: dict[str, list]) -> dict[str, Any] | None:
        """Log ``table`` (column name -> values) to the job's parent run (a receiver that can overrides this)."""
        return None

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> dict[str, Any] | None:
        """Log the file at ``local_path`` (on the receiver actor's node) to the job's parent run, under the
        folder ``artifact_path`` (default: the run's root); a receiver that can overrides this."""
        return None

    def set_aside(self, event: TrackingEvent, reason: str) -> None:
        """Report ``event`` as refused for good by the back end (called from ``write`` or ``flush``); the
        hub moves it to the job's dead-letter file once the flush has returned."""
        self.__dict__.setdefault("_set_aside", []).append((event, reason))

    def take_set_aside(self) -> list[tuple[TrackingEvent, str]]:
        """The records set aside since the last call, with their reasons (the hub calls this)."""
        return self.__dict__.pop("_set_aside", [])


class MemoryReceiver(Receiver):
    """Keeps every event in a list: a ready receiver for tests and for custom pipelines."""

    def __init__(self) -> None:
        self.events: list[TrackingEvent] = []
        self.status: str | None = None

    def open(self, ctx: ReceiverContext) -> None:
        self.ctx = ctx

    def write(self, events: Sequence[TrackingEvent]) -> None:
        self.events.extend(events)

    def flush(self) -> None:
        pass

    def close(self, status: str) -> dict[str, Any]:
        self.status = status
        return {"events": len(self.events)}


BUILTIN_RECEIVERS = {
    "mlflow": "fl_ray.receivers.mlflow:MLflowReceiver",
    "tensorboard": "fl_ray.receivers.tensorboard:TensorBoardReceiver",
    "wandb": "fl_ray.receivers.wandb:WandBReceiver",
    "memory": "fl_ray.receivers.base:MemoryReceiver",
}


def build_receiver(type_: str, params: dict[str, Any]) -> Receiver:
    """Instantiate a receiver from its config entry (``type`` plus constructor parameters)."""
    cls = import_object(BUILTIN_RECEIVERS.get(type_, type_), "tracking.receivers[].type")
    receiver = cls(**params)
    if not isinstance(receiver, Receiver):
        raise TypeError(f"receiver {type_!r} is a {type(receiver).__name__}, not a subclass of "
                        "fl_ray.receivers.base.Receiver (open, write, flush, close)")
    return receiver
