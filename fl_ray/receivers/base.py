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

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from fl_ray.plugins import build_plugin, plugin_class
from fl_ray.tracking.events import TrackingEvent

if TYPE_CHECKING:
    from fl_ray.checkpoint import BestModel

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

    Optional capabilities are declared here with their defaults, and a receiver overrides those it has:

    * ``buffer_flush_time``: seconds between deliveries (0: deliver as records arrive);
    * ``destination`` and ``destination_param``: where records go, when the receiver can be pointed
      elsewhere (progress marks are kept per destination), and the constructor parameter that points it
      (a replay passes the destination of the job's mark, or ``--destination``, through it);
    * ``checkpoint``/``resume``: state saved with each progress mark, handed back after a crash;
    * ``logs_models``/``log_model``, ``logs_tables``/``log_table`` and ``logs_artifacts``/``log_artifact``: the
      hub calls these only on a receiver that declares the flag;
    * ``prepare_process``: once, in the process that runs receivers of this class, before any is built
      (its client library's settings: retries, log levels).
    """

    buffer_flush_time: float = 0.0
    destination_param: ClassVar[str | None] = None
    logs_models: ClassVar[bool] = False
    logs_tables: ClassVar[bool] = False
    logs_artifacts: ClassVar[bool] = False

    @classmethod
    def prepare_process(cls) -> None:
        """Set up this process for receivers of this class (called before the first is built)."""

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

    def log_model(self, site: str, model: BestModel, registered_model_name: str | None) -> dict[str, Any]:
        """Log ``model`` (the best global model: module, input example, round and metrics) into ``site``'s run;
        a report (``model_uri``, ...). Only called when ``logs_models`` is declared."""
        raise NotImplementedError(f"{type(self).__name__} does not log models (logs_models is False)")

    def log_table(self, artifact_file: str, table: dict[str, list]) -> dict[str, Any]:
        """Log ``table`` (column name -> values) to the job's parent run; a report. Only called when
        ``logs_tables`` is declared."""
        raise NotImplementedError(f"{type(self).__name__} does not log tables (logs_tables is False)")

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> dict[str, Any]:
        """Log the file at ``local_path`` (on the receiver actor's node) to the job's parent run, under the
        folder ``artifact_path`` (default: the run's root); a report. Only called when ``logs_artifacts`` is
        declared."""
        raise NotImplementedError(f"{type(self).__name__} does not log files (logs_artifacts is False)")

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


def receiver_class(type_: str, field: str = "tracking.receivers[].type") -> type[Receiver]:
    """The Receiver subclass a config entry's ``type`` names (a built-in name or an import path)."""
    return plugin_class("receiver", type_, field)


def build_receivers(specs: list[dict[str, Any]]) -> list[tuple[str, Receiver]]:
    """Each config entry (``type`` plus constructor parameters) built, with its name (see
    :func:`receiver_names`); every receiver class prepares the process once, before its first receiver."""
    classes = [receiver_class(spec["type"], f"tracking.receivers.{i}.type") for i, spec in enumerate(specs)]
    for cls in dict.fromkeys(classes):
        cls.prepare_process()
    return [
        (name, build_receiver(spec["type"], receiver_params(spec), f"tracking.receivers.{i}"))
        for i, (name, spec) in enumerate(zip(receiver_names(specs), specs))
    ]


def build_receiver(type_: str, params: dict[str, Any], field: str = "tracking.receivers[]") -> Receiver:
    """Instantiate a receiver from its config entry (``type`` plus constructor parameters)."""
    return build_plugin("receiver", type_, params, f"{field}.type", field)


def receiver_params(spec: dict[str, Any]) -> dict[str, Any]:
    """A receiver entry's constructor parameters: everything but ``type``."""
    return {k: v for k, v in spec.items() if k != "type"}


def receiver_names(specs: list[dict[str, Any]]) -> list[str]:
    """A name per receiver entry (its type; numbered when a type repeats) for progress marks and reports."""
    types = [re.sub(r"[^A-Za-z0-9_.-]", "_", s["type"]) for s in specs]
    return [t if types.count(t) == 1 else f"{t}-{i}" for i, t in enumerate(types)]
