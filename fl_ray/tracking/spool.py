"""The spool: an append-only file of accepted tracking batches, and each receiver's progress mark.

The receiver actor appends a batch here before it acknowledges it, so a batch a client saw
acknowledged survives a receiver-actor crash (appends are flushed to the OS, not fsynced: a crash of
the process loses nothing, a crash of the machine may lose the last batches). Each frame is
``<length:4><crc32:4><pickle>``; a frame cut short by a crash is ignored and overwritten on the next
append. Each receiver keeps its own progress mark (a byte offset, and the destination it delivers
to when it tells one) in ``progress-<name>.json``, written atomically after the receiver has flushed
what came before it, so a receiver that stops resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, Iterator

from fl_ray.tracking.events import TrackingEvent

_HEADER = struct.Struct(">II")
EVENTS_FILE = "events.bin"


class Spool:
    """Durable, append-only log of event batches under ``directory``: ``end`` is the offset after the last
    whole batch and ``events`` the number of events before it."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / EVENTS_FILE
        self.path.touch(exist_ok=True)
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self.end, self.events = self._valid_end()
        with open(self.path, "r+b") as f:  # drop a frame a crash cut short
            f.truncate(self.end)
        self._file = open(self.path, "ab")

    def _valid_end(self) -> tuple[int, int]:
        end = events = 0
        for batch, offset in self._frames(0, None):
            end, events = offset, events + len(batch)
        return end, events

    def append(self, events: list[TrackingEvent]) -> int:
        """Append one batch durably (flushed to the OS) and return the new end offset."""
        payload = pickle.dumps([tuple(e) for e in events], protocol=pickle.HIGHEST_PROTOCOL)
        frame = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        with self.changed:
            self._file.write(frame)
            self._file.flush()
            self.end += len(frame)
            self.events += len(events)
            self.changed.notify_all()
            return self.end

    def read(self, offset: int, max_events: int) -> tuple[list[TrackingEvent], int]:
        """Events of whole batches from ``offset`` (about ``max_events`` at most) and the offset after them."""
        events: list[TrackingEvent] = []
        end = offset
        for batch, after in self._frames(offset, self.end):
            events.extend(batch)
            end = after
            if len(events) >= max_events:
                break
        return events, end

    def __iter__(self) -> Iterator[TrackingEvent]:
        """Every event in the spool, in order."""
        for batch, _ in self._frames(0, self.end):
            yield from batch

    def _frames(self, offset: int, limit: int | None) -> Iterator[tuple[list[TrackingEvent], int]]:
        return _frames(self.path, offset, limit)

    def close(self) -> None:
        """Close the append handle."""
        with self._lock:
            self._file.close()

    # -- progress marks ----------------------------------------------------------------------------
    def progress_path(self, name: str) -> Path:
        """Where receiver ``name`` keeps its progress mark."""
        return progress_path(self.directory, name)

    def load_progress(self, name: str) -> dict:
        """Receiver ``name``'s mark (see :func:`load_progress`)."""
        return load_progress(self.directory, name)

    def save_progress(self, name: str, offset: int, events: int, destination: str | None = None) -> None:
        """Record atomically that receiver ``name`` has everything before ``offset``."""
        mark: dict[str, Any] = {"offset": offset, "events": events}
        if destination is not None:
            mark["destination"] = destination
        write_json_atomic(self.progress_path(name), mark)


def spooled_events(directory: Path) -> list[TrackingEvent]:
    """Every event in the spool under ``directory``, read without opening it for appends."""
    return [e for batch, _ in _frames(Path(directory) / EVENTS_FILE, 0, None) for e in batch]


def _frames(path: Path, offset: int, limit: int | None) -> Iterator[tuple[list[TrackingEvent], int]]:
    """Each complete frame's events from ``offset`` (up to ``limit``), with the offset after it."""
    with open(path, "rb") as f:
        f.seek(offset)
        while limit is None or offset < limit:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            size, crc = _HEADER.unpack(header)
            payload = f.read(size)
            if len(payload) < size or zlib.crc32(payload) != crc:
                return
            offset += _HEADER.size + size
            yield [TrackingEvent(*t) for t in pickle.loads(payload)], offset


def progress_path(directory: Path, name: str) -> Path:
    """Where receiver ``name`` keeps its progress mark in the spool ``directory``."""
    return Path(directory) / f"progress-{name}.json"


def load_progress(directory: Path, name: str) -> dict:
    """Receiver ``name``'s mark: ``{"offset": bytes, "events": count}`` (zeros if none yet), and the
    ``destination`` it was delivering to when the receiver tells one (an MLflow tracking URI)."""
    mark = read_json(progress_path(directory, name), {})
    if not isinstance(mark, dict) or not isinstance(mark.get("offset"), int) or \
            not isinstance(mark.get("events"), int):
        return {"offset": 0, "events": 0}
    return mark


def read_json(path: Path, default: Any) -> Any:
    """The JSON in ``path``, or ``default`` if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` so a reader sees the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
