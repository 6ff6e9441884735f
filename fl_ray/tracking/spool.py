"""The spool: an append-only log of accepted tracking records, and each receiver's progress mark.

The receiver actor appends a batch here and acknowledges it only once the batch is on disk
(``fdatasync`` per appended batch: one group commit per acknowledged batch). The file,
``events.jsonl``, holds one record per line, ``<crc32 hex> <JSON array>``, so a person can read it
with any text tool (``cut -d' ' -f2- events.jsonl | jq -c .``) and a damaged record costs only
itself: on open, a line whose checksum fails is reported (position, length) and skipped, and every
intact record after it is kept; a last line cut short by a crash (never acknowledged) is cut off.
An append that fails (disk full, file size limit) is undone (the file is cut back to where it
was) and raised as :class:`SpoolError`, so nothing half-written stays and nothing counts as accepted.

Each receiver keeps its own progress mark in ``progress-<name>.json``: the byte offset it has
delivered up to, the number of records before it, the destination it delivered to (when the
receiver tells one) and the receiver's own checkpoint. Marks are written atomically and fsynced
after the data they point to, and checked against the spool when read: a mark past the valid end or
off a record boundary (the spool was cut back, or damaged) is replaced by the position after the
records it counts, never by anything past the data.

Files that sites log (artifacts, models' files) are kept beside the log, in ``blobs/<sha256>``: written
in chunks to ``blobs/<sha256>.part``, checked against their hash and fsynced when the last chunk
arrives, then renamed, so a blob that exists is whole. A record names its file by that hash; the blobs
stay until every receiver has delivered every record (the hub then removes them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

from fl_ray.tracking.events import EventKind, TrackingEvent, file_sha256

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"  # the spool's folder in a job's directory
EVENTS_FILE = "events.jsonl"
BLOBS_DIR = "blobs"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KINDS = frozenset(k.value for k in EventKind)
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class SpoolError(OSError):
    """Records could not be stored in the spool (the message says what, where and why)."""


def encode_event(event: TrackingEvent) -> bytes:
    """One spool line for ``event``: checksum, space, JSON array, newline."""
    value = event.value
    if isinstance(value, float) and not math.isfinite(value):
        value = {"float": repr(value)}  # strict JSON has no NaN or infinities
    payload = _ENCODE(
        (event.site, event.seq, event.kind, event.key, value, event.step, event.timestamp, event.group)
    ).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_event(line: bytes) -> TrackingEvent | None:
    """The record of one spool line (without its newline), or None if the line is damaged."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        site, seq, kind, key, value, step, timestamp, group = json.loads(payload)
    except (ValueError, TypeError):
        return None
    if kind not in _KINDS:
        return None
    if isinstance(value, dict):
        value = float(value["float"])
    return TrackingEvent(site, seq, EventKind(kind), key, value, step, timestamp, group)


class Spool:
    """Durable, append-only log of records under ``directory``: ``end`` is the offset after the last
    whole record and ``events`` the number of intact records before it; ``damaged`` lists the
    ``(offset, length)`` of each damaged line found when the spool was opened."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / EVENTS_FILE
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if created:
            fsync_path(self.directory)
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self.damaged: list[tuple[int, int]] = []
        self.end = self.events = 0
        self.syncs, self.sync_seconds = 0, 0.0
        for _, offset, damaged in _lines(self.path, 0, None):
            if damaged:
                self.damaged.append((self.end, offset - self.end))
            else:
                self.events += 1
            self.end = offset
        size = os.fstat(self._fd).st_size
        if size > self.end:  # a last line without its newline: a crash cut it short, it was never acknowledged
            log.warning(
                "tracking spool %s: cut off %d byte(s) of a record left unfinished at offset %d",
                self.path,
                size - self.end,
                self.end,
            )
            os.ftruncate(self._fd, self.end)
        for offset, length in self.damaged:
            log.warning(
                "tracking spool %s: damaged record at offset %d (%d bytes) is skipped; the records after it are kept",
                self.path,
                offset,
                length,
            )

    def append(self, events: list[TrackingEvent]) -> int:
        """Append records and sync them to disk; return the new end offset.

        Raises SpoolError (with the file cut back to where it was) if they could not be stored.
        """
        data = b"".join(encode_event(e) for e in events)
        with self.changed:
            start = time.perf_counter()
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                os.fdatasync(self._fd)
            except OSError as exc:
                _undo(self._fd, self.end)
                raise SpoolError(
                    exc.errno,
                    f"cannot store {len(events)} tracking record(s) in {self.path} "
                    f"({len(data)} bytes): {exc.strerror or exc}",
                ) from exc
            self.syncs += 1
            self.sync_seconds += time.perf_counter() - start
            self.end += len(data)
            self.events += len(events)
            self.changed.notify_all()
            return self.end

    def read(self, offset: int, max_events: int) -> tuple[list[TrackingEvent], int]:
        """Intact records from ``offset`` (at most ``max_events``) and the offset after them."""
        events: list[TrackingEvent] = []
        end = offset
        if max_events <= 0:
            return events, end
        for event, after, _ in _lines(self.path, offset, self.end):
            end = after
            if event is not None:
                events.append(event)
                if len(events) >= max_events:
                    break
        return events, end

    def records(self) -> Iterator[tuple[TrackingEvent, int]]:
        """Every intact record in the spool, in order, with the offset after it."""
        for event, after, _ in _lines(self.path, 0, self.end):
            if event is not None:
                yield event, after

    def __iter__(self) -> Iterator[TrackingEvent]:
        """Every intact record in the spool, in order."""
        for event, _ in self.records():
            yield event

    def close(self) -> None:
        """Close the file (safe twice)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- files ---------------------------------------------------------------------------------------
    def put_chunk(self, sha: str, offset: int, chunk: bytes, size: int) -> bool:
        """Store ``chunk`` at ``offset`` of the file of hash ``sha`` (``size`` bytes in all); True once the
        whole file is stored (at once when it already was). Raises ValueError when the chunks received do
        not hash to ``sha`` (the part is discarded, so the site's next try starts clean)."""
        if _SHA256.fullmatch(sha) is None or not 0 <= offset <= offset + len(chunk) <= size:
            raise ValueError(f"file chunk: bad hash {sha!r:.80} or range {offset}+{len(chunk)} of {size} bytes")
        path = blob_path(self.directory, sha)
        if path.exists():
            return True
        path.parent.mkdir(exist_ok=True)
        part = path.with_name(sha + ".part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, chunk, offset)
            if offset + len(chunk) < size:
                return False
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        if file_sha256(part) != sha:
            part.unlink()
            raise ValueError(f"file {sha}: the {size} bytes received do not match the hash; send it again")
        os.replace(part, path)
        fsync_path(path.parent)
        return True

    def remove_blobs(self) -> None:
        """Remove every stored file (the hub calls this once every receiver has every record)."""
        shutil.rmtree(self.directory / BLOBS_DIR, ignore_errors=True)

    # -- progress marks ----------------------------------------------------------------------------
    def progress_path(self, name: str) -> Path:
        """Where receiver ``name`` keeps its progress mark."""
        return progress_path(self.directory, name)

    def load_progress(self, name: str) -> dict[str, Any]:
        """Receiver ``name``'s mark (see :func:`load_progress`), checked against this spool: a mark past
        the end or off a record boundary moves to the position after the records it counts."""
        mark = load_progress(self.directory, name)
        offset, events = mark["offset"], mark["events"]
        if offset == 0 or (offset <= self.end and self._at_boundary(offset)):
            return mark
        fixed, counted = self.position_after(events)
        log.warning(
            "tracking spool %s: the progress mark of %r (offset %d, %d records) does not fit the spool "
            "(%d bytes, %d records); it resumes after record %d instead",
            self.path,
            name,
            offset,
            events,
            self.end,
            self.events,
            counted,
        )
        return {**mark, "offset": fixed, "events": counted}

    def position_after(self, count: int) -> tuple[int, int]:
        """The offset after the first ``count`` intact records, and how many there were (fewer at the end)."""
        seen = offset = 0
        if count <= 0:
            return 0, 0
        for event, after, _ in _lines(self.path, 0, self.end):
            offset = after
            seen += event is not None
            if seen >= count:
                break
        return offset, seen

    def _at_boundary(self, offset: int) -> bool:
        return os.pread(self._fd, 1, offset - 1) == b"\n"

    def save_progress(
        self, name: str, offset: int, events: int, destination: str | None = None, state: dict[str, Any] | None = None
    ) -> None:
        """Record atomically and durably that receiver ``name`` has everything before ``offset``, with its
        checkpoint ``state``."""
        mark: dict[str, Any] = {"offset": offset, "events": events}
        if destination is not None:
            mark["destination"] = destination
        if state:
            mark["state"] = state
        write_json_atomic(self.progress_path(name), mark)


def blob_path(directory: Path, sha: str) -> Path:
    """Where the spool ``directory`` keeps the file of content hash ``sha``."""
    return Path(directory) / BLOBS_DIR / sha


def spooled_events(directory: Path) -> list[TrackingEvent]:
    """Every intact record in the spool under ``directory``, read without opening it for appends."""
    return [e for e, _, _ in _lines(Path(directory) / EVENTS_FILE, 0, None) if e is not None]


def spool_report(directory: Path, receivers: list[str]) -> dict[str, Any]:
    """Counts read from a spool on disk (no receiver running): records accepted, and per receiver how many
    its progress mark says were delivered and how many were not."""
    accepted = len(spooled_events(directory))
    report: dict[str, Any] = {
        "accepted": accepted,
        "spool": {"path": str(Path(directory) / EVENTS_FILE)},
        "receivers": {},
    }
    for name in receivers:
        delivered = min(load_progress(directory, name)["events"], accepted)
        report["receivers"][name] = {"delivered": delivered, "undelivered": accepted - delivered}
    return report


def _lines(path: Path, offset: int, limit: int | None) -> Iterator[tuple[TrackingEvent | None, int, bool]]:
    """Each whole line from ``offset`` (up to ``limit``): its record (None if damaged), the offset after
    it, and whether it is damaged. A last line without its newline is not yielded."""
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n") or (limit is not None and offset + len(line) > limit):
                return
            offset += len(line)
            event = decode_event(line[:-1])
            yield event, offset, event is None


def _undo(fd: int, end: int) -> None:
    """Cut the file back to ``end`` after a failed append (a partial line must not stay)."""
    try:
        os.ftruncate(fd, end)
    except OSError as exc:  # the next open finds the partial line and cuts it off
        log.warning("tracking spool: could not cut a failed append back to offset %d: %s", end, exc)


def fsync_path(path: Path) -> None:
    """Sync a file, or a directory's entries, to disk by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def progress_path(directory: Path, name: str) -> Path:
    """Where receiver ``name`` keeps its progress mark in the spool ``directory``."""
    return Path(directory) / f"progress-{name}.json"


def load_progress(directory: Path, name: str) -> dict[str, Any]:
    """Receiver ``name``'s mark as saved: ``{"offset": bytes, "events": count}`` (zeros if none yet), the
    ``destination`` it was delivering to when the receiver tells one, and its checkpoint ``state``."""
    mark = read_json(progress_path(directory, name), {})
    if (
        not isinstance(mark, dict)
        or not isinstance(mark.get("offset"), int)
        or not isinstance(mark.get("events"), int)
        or mark["offset"] < 0
        or mark["events"] < 0
    ):
        return {"offset": 0, "events": 0}
    return mark


def read_json(path: Path, default: Any) -> Any:
    """The JSON in ``path``, or ``default`` if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` durably, so a reader sees the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
