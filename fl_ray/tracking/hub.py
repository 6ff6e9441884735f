"""TrackingHub: what the receiver actor does, without Ray.

It accepts batches from sites, drops events it has already accepted (by ``(site, seq)``), appends
the new ones to the :class:`~fl_ray.tracking.spool.Spool`, synced to disk, and only then
acknowledges; an append that fails acknowledges nothing, so the site sends the batch again. One
:class:`DeliveryPump` thread per receiver reads the spool from that receiver's progress mark and
hands it batches (``write`` then ``flush``): a delivery starts ``buffer_flush_time`` seconds after the
last one started, or at once when a full batch waits, so a busy receiver is fed back to back; a receiver
that fails is retried with back-off from the same mark, without holding up sites or other
receivers, and is reported once per outage, not once per attempt. After a flush, the records the
receiver set aside as refused go to :class:`DeadLetters`, then the mark moves, with the receiver's
checkpoint. Everything it needs to go on after a crash (accepted seqs, step counters, site
incarnations, the job's lives) is recovered from the spool directory; what a receiver has not got when
the hub closes stays there for ``scripts/replay_spool.py``, which runs this same hub outside Ray. Files
that sites log arrive apart, chunk by chunk (:meth:`TrackingHub.put_chunk`), into the spool's blobs,
before the record that names them; they are removed when the hub closes with every record delivered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fl_ray.receivers.base import Receiver, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.spool import SPOOL_DIR, Spool, SpoolError, decode_event, encode_event, read_json, write_json_atomic
from fl_ray.tracking.state import INCARNATION_BITS, SiteState

if TYPE_CHECKING:
    from fl_ray.checkpoint import BestModel

log = logging.getLogger(__name__)


@dataclass
class _SeenSeqs:
    """The seqs accepted from one site incarnation: a contiguous watermark plus the ones above it."""

    next: int
    above: set[int] = field(default_factory=set)

    def new(self, seq: int) -> bool:
        return seq >= self.next and seq not in self.above

    def add(self, seq: int) -> bool:
        if not self.new(seq):
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
    """Delivers the spool to one receiver from its progress mark, retrying failures with back-off.

    A receiver's ``destination`` (MLflow: its tracking URI, known once opened) is saved with the mark. A mark made for another destination is not this one's: the pump then keeps
    its own, ``<name>@<hash of the destination>``, so records sent elsewhere (by a replay with another
    tracking URI, say) still all reach this destination, once.
    """

    def __init__(
        self,
        name: str,
        receiver: Receiver,
        ctx: ReceiverContext,
        spool: Spool,
        dead_letters: DeadLetters,
        max_batch: int = 10_000,
        max_backoff: float = 30.0,
    ) -> None:
        self.name = name
        self.receiver = receiver
        self.flush_time = float(receiver.buffer_flush_time or 0)
        self._ctx = ctx
        self._dead_letters = dead_letters
        self._spool = spool
        self._max_batch = max_batch
        self._max_backoff = max_backoff
        self.mark = name  # the progress mark this pump reads and moves
        mark = spool.load_progress(name)
        self.offset: int = mark["offset"]  # read again when the receiver opens (its destination picks the mark)
        self.delivered: int = mark["events"]
        self.sent = 0  # records delivered by this pump (since it started)
        self.opened = False
        self.opened_at: float | None = None  # wall-clock time the receiver opened
        self.first_try = threading.Event()  # set once the first open has succeeded or failed
        self.error: str | None = None
        self.failures = 0
        self.warned = False
        self._draining = False
        self._abandon = threading.Event()
        self._wake = threading.Event()  # cuts a back-off short (drain, abandon)
        self._thread = threading.Thread(target=self._run, name=f"fl_ray-deliver-{name}", daemon=True)
        self._thread.start()

    def _wait_for_work(self, last_start: float) -> bool:
        """Wait until there is work: records ``flush_time`` after the last delivery began (so a receiver
        slower than that is fed back to back), a full batch, a drain, or an unopened receiver."""
        spool = self._spool
        with spool.changed:
            while not self._abandon.is_set():
                if not self.opened:
                    return (
                        True  # open at once (store, runs), while the sites start; the mark may be another destination's
                    )
                if self.offset < spool.end:
                    due = last_start + self.flush_time - time.monotonic()
                    if self._draining or due <= 0 or spool.events - self.delivered >= self._max_batch:
                        return True
                    spool.changed.wait(due)
                elif self._draining:
                    return False
                else:
                    spool.changed.wait(1.0)
            return False

    def _run(self) -> None:
        last_start = 0.0
        while self._wait_for_work(last_start):
            last_start = time.monotonic()
            try:
                if not self.opened:
                    self._open()
                    if self.offset >= self._spool.end:
                        last_start = 0.0  # opened before any record came: the first ones go at once
                        continue
                events, end = self._spool.read(self.offset, self._max_batch)
                self.receiver.write(events)
                self.receiver.flush()
            except Exception as exc:  # a back end failing must never stop the job: retry later
                self.first_try.set()
                self.failures += 1
                self.error = _describe(exc)
                if not self.warned:  # one warning per outage, not one per attempt
                    self.warned = True
                    log.warning(
                        "tracking receiver %r cannot deliver (%s); nothing else waits for it: records are "
                        "kept in the spool %s and delivery is retried with back-off. Whatever is still "
                        "undelivered at the end can be sent later with: python scripts/replay_spool.py %s",
                        self.name,
                        self.error,
                        self._spool.directory,
                        self._ctx.job_dir,
                    )
                self._wake.wait(min(self._max_backoff, 0.5 * 2 ** min(self.failures - 1, 6)))
                self._wake.clear()
                continue
            self._commit(end, self.delivered + len(events))
            self.offset, self.delivered, self.sent = end, self.delivered + len(events), self.sent + len(events)
            if self.warned:
                log.warning("tracking receiver %r delivers again after %d failed attempt(s)", self.name, self.failures)
            self.error, self.failures, self.warned = None, 0, False

    def _commit(self, offset: int, delivered: int) -> None:
        """After a successful flush: keep what the receiver set aside, then move the mark with its checkpoint."""
        self._dead_letters.add(self.mark, self.receiver.take_set_aside())
        self._spool.save_progress(self.mark, offset, delivered, self.receiver.destination, self.receiver.checkpoint())

    def _open(self) -> None:
        self.receiver.open(self._ctx)
        destination = self.receiver.destination
        mark = self._spool.load_progress(self.name)
        if destination is not None and mark.get("destination") not in (None, destination):
            self.mark = f"{self.name}@{hashlib.sha1(str(destination).encode()).hexdigest()[:12]}"
            mark = self._spool.load_progress(self.mark)
        self.offset, self.delivered = mark["offset"], mark["events"]
        self.receiver.resume(mark.get("state") or {})
        self.opened, self.opened_at = True, time.time()
        self.first_try.set()

    def redeliver(self, letters: list[tuple[TrackingEvent, str]]) -> list[tuple[TrackingEvent, str]]:
        """Write and flush records set aside earlier (the thread must have stopped); those set aside again
        are returned, and the mark keeps the receiver's new checkpoint."""
        if not self.opened:
            self._open()
        self.receiver.write([event for event, _ in letters])
        self.receiver.flush()
        again = self.receiver.take_set_aside()
        self._spool.save_progress(
            self.mark, self.offset, self.delivered, self.receiver.destination, self.receiver.checkpoint()
        )
        return again

    def drain(self, deadline: float) -> bool:
        """Deliver everything spooled so far, giving up at ``deadline``; True if all was delivered."""
        with self._spool.changed:
            self._draining = True
            self._spool.changed.notify_all()
        self._wake.set()  # a receiver in back-off tries again now rather than at its next turn
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.abandon(1.0)
        return self.offset >= self._spool.end and not self._thread.is_alive()

    def abandon(self, timeout: float) -> None:
        """Stop delivering (after the current attempt) and wait up to ``timeout`` seconds for the thread."""
        self._abandon.set()
        self._wake.set()
        with self._spool.changed:
            self._spool.changed.notify_all()
        self._thread.join(timeout)

    @property
    def busy(self) -> bool:
        """True while the delivery thread runs (after an abandon: still inside a back-end call)."""
        return self._thread.is_alive()


class DeadLetters:
    """``<job_dir>/dead_letters.jsonl``: records a receiver refused for good, one JSON line each with the
    receiver's mark name and the reason, appended durably before the receiver's mark moves past them."""

    FILE = "dead_letters.jsonl"

    def __init__(self, job_dir: Path) -> None:
        self.path = Path(job_dir) / self.FILE
        self._lock = threading.Lock()
        self.entries: dict[tuple[str, str, int], tuple[TrackingEvent, str]] = {}
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
                event = decode_event(entry["event"].encode())
            except (ValueError, KeyError, AttributeError, TypeError):
                event = None
            if event is None:
                log.warning("dead-letter file %s: an unreadable line is skipped", self.path)
                continue
            self.entries[(entry["receiver"], event.site, event.seq)] = (event, entry["reason"])

    def add(self, receiver: str, letters: list[tuple[TrackingEvent, str]]) -> None:
        """Keep ``letters`` (record, reason) of ``receiver``; one written twice (after a crash) counts once."""
        if not letters:
            return
        with self._lock:
            with open(self.path, "ab") as f:
                for event, reason in letters:
                    f.write(_dead_letter_line(receiver, event, reason))
                f.flush()
                os.fsync(f.fileno())
            for event, reason in letters:
                if (receiver, event.site, event.seq) not in self.entries:
                    log.warning(
                        "tracking receiver %r refused a record for good; it is kept in %s: %s %r of site %r (%s)",
                        receiver,
                        self.path,
                        EventKind(event.kind).value,
                        event.key,
                        event.site,
                        reason,
                    )
                self.entries[(receiver, event.site, event.seq)] = (event, reason)

    def of(self, receiver: str) -> list[tuple[TrackingEvent, str]]:
        """The records ``receiver`` set aside, in spool order."""
        with self._lock:
            return sorted(
                ((e, r) for (name, _, _), (e, r) in self.entries.items() if name == receiver),
                key=lambda item: (item[0].site, item[0].seq),
            )

    def replace(self, receiver: str, letters: list[tuple[TrackingEvent, str]]) -> None:
        """Keep only ``letters`` for ``receiver`` (after a retry) and rewrite the file atomically."""
        with self._lock:
            self.entries = {k: v for k, v in self.entries.items() if k[0] != receiver}
            self.entries.update({(receiver, e.site, e.seq): (e, r) for e, r in letters})
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                for (name, _, _), (event, reason) in self.entries.items():
                    f.write(_dead_letter_line(name, event, reason))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def count(self, receiver: str) -> int:
        """How many records ``receiver`` has set aside."""
        return sum(name == receiver for name, _, _ in self.entries)


def _dead_letter_line(receiver: str, event: TrackingEvent, reason: str) -> bytes:
    entry = {
        "receiver": receiver,
        "site": event.site,
        "seq": event.seq,
        "kind": EventKind(event.kind).value,
        "key": event.key,
        "reason": reason,
        "event": encode_event(event)[:-1].decode(),
    }
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"


class TrackingHub:
    """Dedup, spool and fan-out of every site's tracking events to every receiver.

    ``ctx.life`` names one run of the job (a first start or a ``--resume``). After a resume, a metric or
    text at a ``(site, key, step)`` that an earlier life already accepted is dropped: the round cut off
    by the crash is run again, and each of its steps keeps the value the first life recorded.
    """

    def __init__(self, ctx: ReceiverContext, receivers: list[tuple[str, Receiver]]) -> None:
        self.ctx = ctx
        self.spool = Spool(ctx.job_dir / SPOOL_DIR)
        self.dead_letters = DeadLetters(ctx.job_dir)
        self._sites_path = self.spool.directory / "sites.json"
        self._seen: dict[tuple[str, int], _SeenSeqs] = {}
        self._sites: dict[str, SiteState] = {}  # what each site logged so far: steps, params
        self._earlier_lives: set[tuple[str, str, str, int | None] | None] = set()  # (site, kind, key, step)
        self.accepted = 0
        self.duplicates = 0
        self.resumed_duplicates = 0
        self.spool_error: dict[str, Any] | None = None  # the last failed append, while records wait for the spool
        self._refused: set[tuple[str, int]] = set()  # (site, seq) refused by a failing spool, not stored yet
        lives_path = self.spool.directory / "lives.json"
        lives = read_json(lives_path, {})
        if ctx.life not in lives:
            lives[ctx.life] = self.spool.end
            write_json_atomic(lives_path, lives)
        boundary = lives[ctx.life]
        for event, offset in self.spool.records():
            self._accept(event)
            if offset <= boundary and len(lives) > 1:
                self._earlier_lives.add(_step_key(event))
        self._earlier_lives.discard(None)
        self._incarnations: dict[str, int] = read_json(self._sites_path, {})
        self.pumps = [DeliveryPump(name, r, ctx, self.spool, self.dead_letters) for name, r in receivers]

    def _new(self, event: TrackingEvent) -> bool:
        seen = self._seen.get((event.site, event.seq >> INCARNATION_BITS))
        return seen is None or seen.new(event.seq)

    def _accept(self, event: TrackingEvent) -> None:
        block = event.seq >> INCARNATION_BITS
        seen = self._seen.get((event.site, block))
        if seen is None:
            seen = self._seen[(event.site, block)] = _SeenSeqs(block << INCARNATION_BITS)
        seen.add(event.seq)
        self._site(event.site).observe(event)
        self.accepted += 1

    def _site(self, site: str) -> SiteState:
        state = self._sites.get(site)
        if state is None:
            state = self._sites[site] = SiteState(site)
        return state

    def open_site(self, site: str) -> dict[str, Any]:
        """Start (or restart) a site's tracking: the :meth:`SiteState.snapshot` it continues from, with a new
        incarnation (so its seqs start a fresh block), the next step of each metric and the params so far."""
        return self.open_sites([site])[site]

    def open_sites(self, sites: list[str]) -> dict[str, dict[str, Any]]:
        """:meth:`open_site` for each of ``sites`` (distinct), with one write of the incarnations."""
        opened = {}
        for site in sites:
            incarnation = self._incarnations.get(site, -1) + 1
            self._incarnations[site] = incarnation
            opened[site] = {**self._site(site).snapshot(), "incarnation": incarnation}
        write_json_atomic(self._sites_path, self._incarnations)
        return opened

    def put_chunk(self, sha: str, offset: int, chunk: bytes, size: int) -> bool:
        """Store a chunk of a file a site logs (see :meth:`Spool.put_chunk`); True once the file is whole."""
        return self.spool.put_chunk(sha, offset, chunk, size)

    def submit(self, site: str, events: list[TrackingEvent]) -> int:
        """Accept a batch from ``site``: store what is new durably, then acknowledge with the count accepted.

        Raises :class:`~fl_ray.tracking.spool.SpoolError` if the spool cannot store it (disk full, say):
        then nothing of the batch counts as accepted, and the site sends it again.
        """
        fresh, ids = [], set()
        for e in events:
            if (e.site, e.seq) not in ids and self._new(e):
                ids.add((e.site, e.seq))
                fresh.append(e)
        self.duplicates += len(events) - len(fresh)
        if self._earlier_lives:
            kept = [e for e in fresh if _step_key(e) not in self._earlier_lives]
            for e in fresh:
                if _step_key(e) in self._earlier_lives:
                    self._mark_seen(e)
            self.resumed_duplicates += len(fresh) - len(kept)
            fresh = kept
        if fresh:
            try:
                self.spool.append(fresh)
            except SpoolError as exc:
                self._refused.update((e.site, e.seq) for e in fresh)
                if self.spool_error is None:
                    log.error(
                        "%s; the sites keep these records and send them again until the spool takes them", exc.strerror
                    )
                self.spool_error = {"error": exc.strerror, "path": str(self.spool.path), "waiting": len(self._refused)}
                raise
            self._refused.difference_update((e.site, e.seq) for e in fresh)
            if self.spool_error is not None and not self._refused:
                log.warning("tracking spool %s stores records again", self.spool.path)
                self.spool_error = None
            for e in fresh:
                self._accept(e)
        return len(fresh)

    def _mark_seen(self, event: TrackingEvent) -> None:
        block = event.seq >> INCARNATION_BITS
        self._seen.setdefault((event.site, block), _SeenSeqs(block << INCARNATION_BITS)).add(event.seq)

    def wait_open(self, timeout: float) -> dict[str, Any]:
        """Wait (up to ``timeout`` seconds) until every receiver has opened or failed its first open; per
        receiver: opened, when (wall clock), where its records go, and the error of a failed open."""
        deadline = time.monotonic() + timeout
        for pump in self.pumps:
            pump.first_try.wait(max(0.0, deadline - time.monotonic()))
        return {
            p.name: {"opened": p.opened, "at": p.opened_at, "destination": p.receiver.destination, "error": p.error}
            for p in self.pumps
        }

    def status(self) -> dict[str, Any]:
        """Counts so far: accepted, duplicates dropped, spool state, and per receiver delivered and last error."""
        return {
            "accepted": self.accepted,
            "duplicates_dropped": self.duplicates,
            "spool": self._spool_report(),
            "receivers": {
                p.name: {
                    "delivered": p.delivered,
                    "pending": self.accepted - p.delivered,
                    "dead_letters": self.dead_letters.count(p.mark),
                    "error": p.error,
                }
                for p in self.pumps
            },
        }

    def _spool_report(self) -> dict[str, Any]:
        spool = self.spool
        report: dict[str, Any] = {
            "path": str(spool.path),
            "records": spool.events,
            "bytes": spool.end,
            "syncs": spool.syncs,
            "sync_seconds": round(spool.sync_seconds, 4),
        }
        if spool.damaged:
            report["damaged"] = [{"offset": o, "bytes": n} for o, n in spool.damaged]
        if self.spool_error is not None:
            report["error"] = self.spool_error
        if self.resumed_duplicates:
            report["dropped_after_resume"] = self.resumed_duplicates
        return report

    def log_model(
        self, site: str, model: BestModel, registered_model_name: str | None, timeout: float
    ) -> dict[str, Any]:
        """Have every receiver that logs models (``logs_models``) log ``model`` into ``site``'s run; a report
        per such receiver (see :meth:`_each_open`)."""
        return self._each_open(
            "the model",
            timeout,
            [p for p in self.pumps if p.receiver.logs_models],
            lambda r: r.log_model(site, model, registered_model_name),
        )

    def log_table(self, artifact_file: str, table: dict[str, list], timeout: float) -> dict[str, Any]:
        """Have every receiver that logs tables (``logs_tables``) log ``table`` (columns) to the job's parent run."""
        return self._each_open(
            artifact_file,
            timeout,
            [p for p in self.pumps if p.receiver.logs_tables],
            lambda r: r.log_table(artifact_file, table),
        )

    def log_artifact(self, local_path: str, artifact_path: str | None, timeout: float) -> dict[str, Any]:
        """Have every receiver that logs files (``logs_artifacts``) log the one at ``local_path`` to the job's
        parent run."""
        return self._each_open(
            local_path,
            timeout,
            [p for p in self.pumps if p.receiver.logs_artifacts],
            lambda r: r.log_artifact(local_path, artifact_path),
        )

    def _each_open(
        self, what: str, timeout: float, pumps: list[DeliveryPump], call: Callable[[Receiver], dict[str, Any]]
    ) -> dict[str, Any]:
        """``call`` each of ``pumps``' receivers once it is open (up to ``timeout`` seconds for one that is not
        yet); its report, or its error (reported, never raised)."""
        deadline = time.monotonic() + timeout
        reports: dict[str, Any] = {}
        for pump in pumps:
            while not pump.opened and pump.error is None and pump.busy and time.monotonic() < deadline:
                time.sleep(0.1)
            if not pump.opened:
                why = pump.error or f"not open after {timeout:g} s"
                reports[pump.name] = {"error": f"{what} not logged: the receiver is not open ({why})"}
                continue
            try:
                reports[pump.name] = call(pump.receiver) or {}
            except Exception as exc:  # what was to be logged stays in the job directory; records are unaffected
                reports[pump.name] = {"error": _describe(exc)}
                log.warning("tracking receiver %r could not log %s: %s", pump.name, what, reports[pump.name]["error"])
        return reports

    def close(self, status: str, timeout: float) -> dict[str, Any]:
        """Deliver what is spooled (up to ``timeout`` seconds), end every receiver's runs, and report."""
        deadline = time.monotonic() + timeout
        report: dict[str, Any] = {
            "accepted": self.accepted,
            "duplicates_dropped": self.duplicates,
            "spool": self._spool_report(),
            "receivers": {},
        }
        for pump in self.pumps:
            complete = pump.drain(deadline)
            entry: dict[str, Any] = {"delivered": pump.delivered, "undelivered": self.accepted - pump.delivered}
            letters = self.dead_letters.count(pump.mark)
            if letters:
                entry.update(
                    dead_letters=letters,
                    dead_letter_file=str(self.dead_letters.path),
                    dead_letter_replay=f"python scripts/replay_spool.py {self.ctx.job_dir} --to {pump.name} "
                    "--dead-letters",
                )
            if not complete:
                entry["error"] = pump.error or f"delivery did not finish within {timeout:g} s"
                entry["replay"] = f"python scripts/replay_spool.py {self.ctx.job_dir} --to {pump.name}"
                if not pump.warned:  # a failing receiver has said so already; a slow one has not
                    log.warning(
                        "tracking receiver %r: %d record(s) not delivered (%s); they stay in %s, "
                        "send them later with: %s",
                        pump.name,
                        entry["undelivered"],
                        entry["error"],
                        self.spool.directory,
                        entry["replay"],
                    )
            if pump.busy:  # still inside a back-end call: closing under it would race; runs end at replay
                entry["close_error"] = "not closed: the receiver was still busy delivering"
            elif pump.opened:
                try:
                    entry.update(pump.receiver.close(status) or {})
                except Exception as exc:
                    entry["close_error"] = _describe(exc)
                    log.warning("tracking receiver %r failed to close: %s", pump.name, entry["close_error"])
            report["receivers"][pump.name] = entry
        if all(p.offset >= self.spool.end for p in self.pumps):  # every receiver has every file
            self.spool.remove_blobs()
        self.spool.close()
        return report

    def retry_dead_letters(self, timeout: float) -> dict[str, Any]:
        """Deliver again, to each receiver, the records it set aside; those refused again stay set aside.
        Call before :meth:`close`; a report per receiver: retried, delivered, still set aside, error."""
        report: dict[str, Any] = {}
        for pump in self.pumps:
            letters = self.dead_letters.of(pump.mark)
            if not letters:
                continue
            pump.drain(time.monotonic() + timeout)
            entry: dict[str, Any] = {"retried": len(letters)}
            try:
                again = pump.redeliver(letters)
            except Exception as exc:  # the back end still fails as a whole: nothing changes
                entry["error"] = _describe(exc)
                again = letters
            else:
                self.dead_letters.replace(pump.mark, again)
            entry.update(delivered=len(letters) - len(again), set_aside=len(again))
            report[pump.name] = entry
        return report


def _step_key(event: TrackingEvent) -> tuple[str, str, str, int | None] | None:
    """What a resumed job must not record twice: a metric's or text's (site, kind, key, step); None for
    params and tags, which setting again changes nothing."""
    if event.kind in (EventKind.METRIC, EventKind.TEXT):
        return event.site, EventKind(event.kind).value, event.key, event.step
    return None


def _describe(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (back-end errors can be pages long)."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
