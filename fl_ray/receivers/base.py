"""The Receiver protocol: where tracking records end up.

A receiver is a sink for :class:`~fl_ray.tracking.events.TrackingEvent` batches. The receiver actor
opens each configured receiver once per job, calls :meth:`Receiver.write` with batches read from the
durable spool, then :meth:`Receiver.flush`, and only after ``flush`` returns counts the batch as
delivered. A receiver that raises is retried with back-off from the same place, so ``write`` +
``flush`` should be idempotent for a batch it has already seen (or at least never lose records).

Writing your own::

    class PrintReceiver:
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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

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


@runtime_checkable
class Receiver(Protocol):
    """A tracking back end: ``open`` once, ``write``/``flush`` batches, ``close`` once."""

    def open(self, ctx: ReceiverContext) -> None:
        """Prepare the back end (create runs, files, processes)."""

    def write(self, events: Sequence[TrackingEvent]) -> None:
        """Take a batch of events (any sites, any kinds, in arrival order)."""

    def flush(self) -> None:
        """Make every event written so far durable in the back end; raise if that failed."""

    def close(self, status: str) -> dict[str, Any]:
        """End the job's runs with ``status`` (FINISHED, FAILED or KILLED); return a summary for result.json."""


class MemoryReceiver:
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
    missing = [m for m in ("open", "write", "flush", "close") if not callable(getattr(receiver, m, None))]
    if missing:
        raise TypeError(f"receiver {type_!r} lacks the method(s) {', '.join(missing)} of the Receiver protocol")
    return receiver
