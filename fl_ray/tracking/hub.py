"""TrackingHub: what the receiver actor does, without Ray.

It accepts batches from sites, drops events it has already accepted (by ``(site, seq)``), appends
the new ones to the :class:`~fl_ray.tracking.spool.Spool` and only then acknowledges. One
:class:`DeliveryPump` thread per receiver reads the spool from that receiver's progress mark and
hands it batches (``write`` then ``flush``) at most every ``buffer_flush_time`` seconds; a receiver
that fails is retried with back-off from the same mark, without holding up sites or other
receivers. Everything it needs to go on after a crash (accepted seqs, step counters, site
incarnations) is recovered from the spool directory.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fl_ray.receivers.base import Receiver, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.spool import Spool, read_json, write_json_atomic

log = logging.getLogger(__name__)

INCARNATION_BITS = 32  # a restarted site sends seqs from a fresh block, so late batches never collide


@dataclass
class _SeenSeqs:
    """The seqs accepted from one site incarnation: a contiguous watermark plus the ones above it."""

    next: int
    above: set[int] = field(default_factory=set)

    def add(self, seq: int) -> bool:
        if seq < self.next or seq in self.above:
            return False
        if seq == self.next:
            self.next += 1
            while self.next in self.above:
                self.above.remove(self.next)
                self.next += 1
        else:
            self.above.add(seq)
        return True


class DeliveryPump:
    """Delivers the spool to one receiver from its progress mark, retrying failures with back-off."""

    def __init__(self, name: str, receiver: Receiver, ctx: ReceiverContext, spool: Spool,
                 max_batch: int = 10_000, max_backoff: float = 30.0) -> None:
        self.name = name
        self.receiver = receiver
        self.flush_time = float(getattr(receiver, "buffer_flush_time", 0) or 0)
        self._ctx = ctx
        self._spool = spool
        self._max_batch = max_batch
        self._max_backoff = max_backoff
        mark = spool.load_progress(name)
        self.offset: int = mark["offset"]
        self.delivered: int = mark["events"]
        self.opened = False
        self.error: str | None = None
        self.failures = 0
        self._draining = False
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fl_ray-deliver-{name}", daemon=True)
        self._thread.start()

    def _wait_for_work(self, last_delivery: float) -> bool:
        spool = self._spool
        with spool.changed:
            while not self._abandon.is_set():
                if self.offset < spool.end:
                    due = last_delivery + self.flush_time - time.monotonic()
                    if self._draining or due <= 0:
                        return True
                    spool.changed.wait(due)
                elif self._draining:
                    return False
                else:
                    spool.changed.wait(1.0)
            return False

    def _run(self) -> None:
        last_delivery = 0.0
        while self._wait_for_work(last_delivery):
            try:
                if not self.opened:
                    self.receiver.open(self._ctx)
                    self.opened = True
                events, end = self._spool.read(self.offset, self._max_batch)
                self.receiver.write(events)
                self.receiver.flush()
            except Exception as exc:  # a back end failing must never stop the job: retry later
                self.failures += 1
                if self.error is None:
                    log.warning("tracking receiver %r cannot deliver (%s: %s); records stay in the spool at %s "
                                "and delivery is retried with back-off", self.name, type(exc).__name__, exc,
                                self._spool.directory)
                self.error = f"{type(exc).__name__}: {exc}"
                self._abandon.wait(min(self._max_backoff, 0.5 * 2 ** min(self.failures - 1, 6)))
                continue
            self._spool.save_progress(self.name, end, self.delivered + len(events))
            self.offset, self.delivered = end, self.delivered + len(events)
            if self.error is not None:
                log.warning("tracking receiver %r delivers again after %d failed attempt(s)", self.name, self.failures)
            self.error, self.failures = None, 0
            last_delivery = time.monotonic()

    def drain(self, deadline: float) -> bool:
        """Deliver everything spooled so far, giving up at ``deadline``; True if all was delivered."""
        with self._spool.changed:
            self._draining = True
            self._spool.changed.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()
            with self._spool.changed:
                self._spool.changed.notify_all()
            self._thread.join(1.0)
        return self.offset >= self._spool.end and not self._thread.is_alive()


class TrackingHub:
    """Dedup, spool and fan-out of every site's tracking events to every receiver."""

    def __init__(self, ctx: ReceiverContext, receivers: list[tuple[str, Receiver]]) -> None:
        self.ctx = ctx
        self.spool = Spool(ctx.job_dir / "spool")
        self._sites_path = self.spool.directory / "sites.json"
        self._seen: dict[tuple[str, int], _SeenSeqs] = {}
        self._next_step: dict[str, dict[str, int]] = {}
        self.accepted = 0
        self.duplicates = 0
        for event in self.spool:
            self._accept(event)
        self._incarnations: dict[str, int] = read_json(self._sites_path, {})
        self.pumps = [DeliveryPump(name, r, ctx, self.spool) for name, r in receivers]

    def _accept(self, event: TrackingEvent) -> bool:
        block = event.seq >> INCARNATION_BITS
        seen = self._seen.get((event.site, block))
        if seen is None:
            seen = self._seen[(event.site, block)] = _SeenSeqs(block << INCARNATION_BITS)
        if not seen.add(event.seq):
            return False
        if event.kind == EventKind.METRIC and event.step is not None:
            steps = self._next_step.setdefault(event.site, {})
            if event.step >= steps.get(event.key, 0):
                steps[event.key] = event.step + 1
        self.accepted += 1
        return True

    def open_site(self, site: str) -> tuple[int, dict[str, int]]:
        """Start (or restart) a site's sender: its first seq, and the next step of each metric so far."""
        incarnation = self._incarnations.get(site, -1) + 1
        self._incarnations[site] = incarnation
        write_json_atomic(self._sites_path, self._incarnations)
        return incarnation << INCARNATION_BITS, dict(self._next_step.get(site, {}))

    def submit(self, site: str, events: list[TrackingEvent]) -> int:
        """Accept a batch from ``site``: spool what is new, then acknowledge with the count accepted."""
        fresh = [e for e in events if self._accept(e)]
        self.duplicates += len(events) - len(fresh)
        if fresh:
            self.spool.append(fresh)
        return len(fresh)

    def status(self) -> dict[str, Any]:
        """Counts so far: accepted, duplicates dropped, and per receiver delivered and last error."""
        return {
            "accepted": self.accepted,
            "duplicates_dropped": self.duplicates,
            "receivers": {p.name: {"delivered": p.delivered, "pending": self.accepted - p.delivered,
                                   "error": p.error} for p in self.pumps},
        }

    def close(self, status: str, timeout: float) -> dict[str, Any]:
        """Deliver what is spooled (up to ``timeout`` seconds), end every receiver's runs, and report."""
        deadline = time.monotonic() + timeout
        report: dict[str, Any] = {"accepted": self.accepted, "duplicates_dropped": self.duplicates,
                                  "spool": str(self.spool.directory), "receivers": {}}
        for pump in self.pumps:
            complete = pump.drain(deadline)
            entry: dict[str, Any] = {"delivered": pump.delivered, "undelivered": self.accepted - pump.delivered}
            if not complete:
                entry["error"] = pump.error or f"delivery did not finish within {timeout:.0f} s"
                log.warning("tracking receiver %r: %d record(s) not delivered (%s); they stay in %s, "
                            "replay them with scripts/replay_spool.py", pump.name, entry["undelivered"],
                            entry["error"], self.spool.directory)
            if pump.opened:
                try:
                    entry.update(pump.receiver.close(status) or {})
                except Exception as exc:
                    entry["close_error"] = f"{type(exc).__name__}: {exc}"
                    log.warning("tracking receiver %r failed to close: %s", pump.name, exc)
            report["receivers"][pump.name] = entry
        self.spool.close()
        return report
