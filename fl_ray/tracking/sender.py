"""EventSender: the transport between a site's writers and the receiver actor.

A writer call ends in :meth:`EventSender.record`, which stamps the event with the site and the next
sequence number (from the site's :class:`~fl_ray.tracking.state.SiteState`, ``sender.state``, which
also holds its steps and params) and appends it to a buffer: no network, no Ray call. A background thread ships the
buffer to the receiver actor in batches, when ``batch_size`` events are waiting or every
``flush_interval`` seconds, keeping at most ``max_in_flight`` batches unacknowledged. A batch is sent
again until the receiver actor acknowledges it (the receiver drops duplicates by ``(site, seq)``), so
a receiver-actor restart loses nothing. When the buffer is full (``max_buffered``), ``record`` waits:
back-pressure instead of unbounded memory.

Files (artifacts, models' files) do not ride in batches: :func:`send_file` (:meth:`EventSender.put_file`)
sends one to the receiver actor's spool in chunks of at most :data:`CHUNK_BYTES`, where it is kept by content hash, before
the record naming that hash is recorded; a chunk sent twice is stored once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray

from fl_ray.tracking.events import EventKind, TrackingEvent, file_sha256
from fl_ray.tracking.state import SiteState

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # largest piece of a file in one call to the receiver actor
PUT_ATTEMPTS = 20  # calls of one chunk while the receiver actor restarts, before put_file gives up


@dataclass
class SenderStats:
    """Counters of one sender, for result.json and benchmarks."""

    recorded: int = 0
    acknowledged: int = 0
    batches_sent: int = 0
    retries: int = 0


class EventSender:
    """Buffers one site's events and delivers them to the receiver actor, at least once, in batches."""

    def __init__(
        self,
        state: SiteState | str,
        receiver: Any,
        *,
        batch_size: int = 1000,
        flush_interval: float = 0.2,
        max_in_flight: int = 4,
        max_buffered: int = 50_000,
    ) -> None:
        self.state = state if isinstance(state, SiteState) else SiteState(state)  # seqs, steps, params
        self.site = self.state.site
        self._receiver = receiver
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_in_flight = max_in_flight
        self._max_buffered = max(max_buffered, batch_size)
        self._buffer: list[TrackingEvent] = []
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._in_flight: deque[tuple[Any, list[TrackingEvent]]] = deque()
        self._closed = False
        self._failures = 0  # batches resent since the last acknowledgement
        self.stats = SenderStats()
        self._thread = threading.Thread(target=self._run, name=f"fl_ray-sender-{self.site}", daemon=True)
        self._thread.start()

    # -- hot path -----------------------------------------------------------------------------------
    def record(
        self, kind: EventKind, key: str, value: Any, step: int | None, timestamp: int, group: str | None = None
    ) -> None:
        """Append one validated event to the buffer (waits only when the buffer is full)."""
        with self._cond:
            if self._closed:
                raise RuntimeError(f"tracking for site {self.site!r} is closed; no more records are accepted")
            while len(self._buffer) >= self._max_buffered:
                self._cond.notify_all()
                self._cond.wait(0.05)
            self._buffer.append(
                TrackingEvent(self.site, self.state.next_seq(), kind, key, value, step, timestamp, group)
            )
            self.stats.recorded += 1
            if len(self._buffer) == self._batch_size:
                self._cond.notify_all()

    def put_file(self, path: str) -> str:
        """Store the file at ``path`` in the job's spool, in chunks, by its content hash (returned: sha256 hex)."""
        return send_file(self._receiver, path, f"site {self.site!r}")

    # -- delivery -----------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> int:
        """Send everything buffered and wait for the receiver to acknowledge it.

        Returns the number of events still unacknowledged (0 unless ``timeout`` ran out).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._drain(deadline=deadline)
        with self._cond:
            return len(self._buffer) + sum(len(b) for _, b in self._in_flight)

    def close(self, timeout: float | None = 60.0) -> int:
        """Flush, stop the background thread and refuse further records; returns events not delivered."""
        left = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        return left

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                if len(self._buffer) < self._batch_size:
                    self._cond.wait(self._flush_interval)
                if self._closed:
                    return
            try:
                self._drain(deadline=None, wait_acks=False)
            except Exception:  # the thread must outlive any one failure; unacknowledged batches are resent
                log.exception("site %s: sending tracking events failed; will retry", self.site)
                time.sleep(self._flush_interval)

    def _drain(self, deadline: float | None, wait_acks: bool = True) -> None:
        """Send the whole buffer in batches; with ``wait_acks``, wait (until ``deadline``) for every acknowledgement."""
        with self._send_lock:
            while True:
                with self._cond:
                    if not self._buffer:
                        break
                    batch = self._buffer[: self._batch_size]
                    del self._buffer[: self._batch_size]
                    self._cond.notify_all()
                while len(self._in_flight) >= self._max_in_flight:
                    self._reap_oldest(deadline)
                self._submit(batch)
            if wait_acks:
                while self._in_flight:
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    self._reap_oldest(deadline)
            else:
                self._reap_ready()

    def _submit(self, batch: list[TrackingEvent]) -> None:
        self._in_flight.append((self._receiver.submit.remote(self.site, batch), batch))
        self.stats.batches_sent += 1

    def _reap_ready(self) -> None:
        while self._in_flight:
            ready, _ = ray.wait([self._in_flight[0][0]], timeout=0)
            if not ready:
                return
            self._reap_oldest(None)

    def _reap_oldest(self, deadline: float | None) -> None:
        ref, batch = self._in_flight[0]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait([ref], timeout=timeout)
        if not ready:
            return
        self._in_flight.popleft()
        try:
            ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.RayTaskError) as exc:
            # The receiver actor died or is restarting: send the same batch again; it drops duplicates.
            self.stats.retries += 1
            self._failures += 1
            if self._failures == 1:  # once per outage, not once per batch
                log.warning(
                    "site %s: a batch of %d events was not acknowledged (%s); the site keeps it and sends "
                    "it again until the receiver actor stores it",
                    self.site,
                    len(batch),
                    _reason(exc),
                )
            time.sleep(min(2.0, 0.1 * self._failures))
            self._in_flight.appendleft((self._receiver.submit.remote(self.site, batch), batch))
            return
        self.stats.acknowledged += len(batch)
        if self._failures:
            log.warning(
                "site %s: the receiver actor acknowledges again, after %d batch(es) were resent",
                self.site,
                self._failures,
            )
            self._failures = 0


def send_file(receiver: Any, path: str | os.PathLike[str], who: str, sha: str | None = None) -> str:
    """Store the file at ``path`` in ``receiver``'s spool (a receiver actor's ``put_chunk``), in chunks, by its
    content hash ``sha`` (computed when not given; returned). ``who`` names the sender in errors."""
    size = os.path.getsize(path)
    sha = sha or file_sha256(path)
    with open(path, "rb") as f:
        offset = 0
        while True:
            chunk = f.read(CHUNK_BYTES)
            if _put_chunk(receiver, who, sha, offset, chunk, size) or not chunk:
                return sha
            offset += len(chunk)


def _put_chunk(receiver: Any, who: str, sha: str, offset: int, chunk: bytes, size: int) -> bool:
    """One chunk to the receiver actor, again while it restarts; True once it holds the whole file."""
    for attempt in range(PUT_ATTEMPTS):
        try:
            return bool(ray.get(receiver.put_chunk.remote(sha, offset, chunk, size)))
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
            time.sleep(min(2.0, 0.1 * (attempt + 1)))
    raise RuntimeError(f"{who}: the receiver actor took no file chunk in {PUT_ATTEMPTS} attempts")


def _reason(exc: Exception) -> str:
    """Why a batch was not acknowledged: the receiver's own error (a full spool, say), else the Ray error's type."""
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else None
    return f"{type(cause).__name__}: {cause}" if cause is not None else type(exc).__name__
