"""W&B receiver: one W&B run per site, each written by its own OS process, exactly once across crashes.

The facade (:class:`WandBReceiver`, in the receiver actor) starts a process per site when the site's first
record arrives (at most ``max_processes`` at once: the one used least recently ends to make room, and the
run is resumed by id when that site logs again) and feeds it through a multiprocessing queue; the process
owns the site's ``wandb`` run and replies on a pipe: an ack per flush, its error, or its end. Site
processes are forked from a multiprocessing fork server that has imported ``wandb`` and this module once
(a fresh interpreter per process took about 2 s of CPU for the same imports); each starts with the
environment its receiver has when it starts it, as a spawned process would.

Mapping: metrics are history rows against the custom step metric ``fl_step`` (W&B's own ``_step`` only
counts rows, so a record with a lower step than the last is kept, never dropped); params go to
``run.config``; tags to ``run.config["tags/<key>"]`` (W&B's native tags are plain labels, not
key/value); texts to a one-row ``wandb.Table`` (columns ``step``, ``text``) logged under their key at
their step (0 when none). The only records W&B cannot hold are metrics and texts named like a history
column it fills itself (``fl_step``, ``_step``, ``_runtime``, ``_timestamp``): those are counted per
site under ``dropped`` and named once in a warning. The fork server imports this module (``fl_ray``
loads lazily, so not torch), ``wandb``, ``psutil`` and, as any multiprocessing child does, the
receiver's main module (in a Ray worker, Ray's).

**Durability.** wandb-core writes a run's transaction log (``run-<id>.wandb``) in 32 KiB blocks and
the last, partial block only when the run finishes; W&B has no other flush, and a killed wandb-core
loses that block. So :meth:`WandBReceiver.flush` finishes each site's run (exit code 0) and fsyncs its
``.wandb`` file before returning; the next record resumes the run under the same id. A site's run is
thus one run id, ``<job id>-<site>-<hash>``, stored as *segments*, one directory per flush with records
and per receiver life (``<dir>/wandb/offline-run-<time>-<id>[-n]``), each starting with the config so
far and continuing ``_step``; ``wandb sync <dir>/wandb/offline-run-*`` syncs a run's segments one after
the other in start order (so its help says for resumed runs; not tried against a server here). A flush
costs about 45 ms per site with records (finish, fsync, the next ``wandb.init``; sites in parallel)
plus W&B's time to write them, and a directory: ``buffer_flush_time`` (default 30 s) keeps segments few.

**Exactly once after a crash.** :meth:`~WandBReceiver.checkpoint` holds, per site, how many metric and
text records (history entries) the run had when the last flush returned. After a restart, a site's
first process takes the run's lock file (``<dir>/wandb/fl_ray-<run id>.lock``, held for its life),
SIGKILLing the previous owner (a site process of the dead receiver, still running or finishing) and
that process's wandb-core, so nothing else writes the run; it then counts the history entries of all
the run's segments (up to the first incomplete record) and skips that many, less the checkpoint's, of
the metrics and texts replayed from the mark: the run holds them already. The lock file also names the
owner's receiver generation (when its life began, on the machine's monotonic clock), so a process of a
dead receiver that was still starting never takes the run from a newer one: it quits. Params and tags
are written again: the config updates set the same values in the same order.

Guaranteed with ``mode="offline"`` (tested in tests/test_wandb_receiver.py): once ``flush`` returns,
every record written before it is in its site's run on disk; after crashes at any moments (between
write and mark, during flush, during close, repeatedly) and restarts from the checkpoint saved with the
mark, each site's run holds every metric and text record once, in delivery order, and the params' and
tags' last values. This needs the hub to replay the records past the mark in the same order and the
segments to be left alone, on one machine; a run found holding fewer entries than its checkpoint (a
segment deleted, a machine crash before the fsync) is reported under ``lost``. Online (not tested: no
network here), each flush's finish waits for W&B's upload, so whatever was marked delivered is on
W&B's server, and a restart resumes the same run; but records a crashed life wrote after its last flush
may be on the server and not yet in the local transaction log the count comes from, or the reverse, so
those can be missing or twice on the server.

Files a site logs (artifacts, and a model's files under the model's name) are uploaded with its run
(``run.save``; offline, into the run's ``files/`` folder): a copy at the file's own path under
``<dir>/fl_ray_files/<run id>/``, saved again with the same content when replayed after a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import queue
import re
import shutil
import struct
import sys
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import IO, Any, Iterator, Sequence, cast

import psutil

from fl_ray.receivers.base import FINISHED, Receiver, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.spool import SPOOL_DIR, blob_path, fsync_path

log = logging.getLogger(__name__)

STEP_METRIC = "fl_step"
# History columns W&B (or, for fl_step, this receiver) fills itself: a metric or text so named is dropped.
RESERVED_KEYS = frozenset({STEP_METRIC, "_step", "_runtime", "_timestamp"})
MODES = ("online", "offline", "disabled")
# Queue and pipe messages are (tag, payload) tuples of plain values. Parent -> site: BATCH, FLUSH, END.
# Site -> parent: RESUMED (what the run held when the process took it over), ACK, ERROR, DONE.
_BATCH, _FLUSH, _END, _RESUMED, _ACK, _ERROR, _DONE = "batch", "flush", "end", "resumed", "ack", "error", "done"
_HISTORY_KINDS = ("metric", "text")
_FILE = "file"  # a site's file (an artifact, or one file of a model) for the run's files
# W&B settings for a site's run: system metrics and host metadata would describe the receiver's host,
# not the site, and console capture or code saving have nothing to show.
_SETTINGS = {
    "console": "off",
    "silent": True,
    "x_disable_stats": True,
    "x_disable_meta": True,
    "x_save_requirements": False,
    "disable_git": True,
    "save_code": False,
}


def run_id(job_id: str, site: str) -> str:
    """The site's W&B run id: legal for W&B (at most 64 of ``[A-Za-z0-9_.-]``), readable, and unique per
    (job, site) by a hash of both."""
    digest = hashlib.sha1(f"{job_id}\0{site}".encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', f'{job_id}-{site}')[:55]}-{digest}"


@dataclass
class _Site:
    """The parent's handle on one site process."""

    name: str
    process: Any  # multiprocessing's SpawnProcess
    inbox: Any  # multiprocessing.Queue of messages to the process
    replies: Connection
    written: Any  # RawValue('q'): records of this life on disk in the run (skipped ones included)
    sent: int = 0
    history_sent: int = 0  # metric and text records sent (the run's position, less the checkpoint's)
    acked: int = 0  # highest flush token acknowledged
    resumed: dict[str, int] | None = None
    error: str | None = None
    done: dict[str, Any] | None = None
    gone: bool = False  # its pipe hit EOF: the process ended
    used: int = 0  # when a record was last queued to it (the receiver's write clock)

    @property
    def not_written(self) -> int:
        return self.sent - self.written.value


@dataclass
class _Closed:
    """What a site's processes that were closed to make room wrote in this receiver life."""

    history: int = 0  # metric and text records
    written: int = 0  # records of every kind
    resumed: dict[str, int] | None = None  # what the run held when the site's first process took it over


class WandBReceiver(Receiver):
    """Writes each site's records to its own W&B run (project = ``project`` or the job name).

    ``mode`` is ``online``, ``offline`` or ``disabled``; by default online when ``WANDB_API_KEY``
    is set, else offline (runs under ``<dir>/wandb/offline-run-*``, to upload with ``wandb sync``).
    ``dir`` defaults to the job directory. ``close_timeout`` bounds, in seconds, both how long
    :meth:`flush` waits for the site processes and how long :meth:`close` lets them finish.
    ``buffer_flush_time`` is the seconds between deliveries: each flush starts a new segment per site.
    ``max_processes`` caps the site processes alive at once (each with its wandb-core): with that many
    running, a site's first record ends the process used least recently, after it finished its run on
    disk with all it was sent; that site's next record starts a process that resumes its run by id.
    """

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        mode: str | None = None,
        dir: str | None = None,
        close_timeout: float = 60.0,
        buffer_flush_time: float = 30.0,
        max_processes: int = 16,
    ) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise ImportError("WandBReceiver needs the wandb package, a dependency of fl_ray: pip install wandb")
        if mode is not None and mode not in MODES:
            raise ValueError(f"WandBReceiver: mode must be one of {', '.join(MODES)} or unset, got {mode!r}")
        for name, value, what in (
            ("close_timeout", close_timeout, "positive"),
            ("buffer_flush_time", buffer_flush_time, "non-negative"),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value < 0
                or (value == 0 and what == "positive")
            ):
                raise ValueError(f"WandBReceiver: {name} must be a {what} number of seconds, got {value!r}")
        if isinstance(max_processes, bool) or not isinstance(max_processes, int) or max_processes < 1:
            raise ValueError(f"WandBReceiver: max_processes must be a whole number >= 1, got {max_processes!r}")
        self.max_processes = max_processes
        self.project, self.entity, self.mode, self.dir = project, entity, mode, dir
        self.close_timeout = float(close_timeout)
        self.buffer_flush_time = float(buffer_flush_time)
        self._ctx: ReceiverContext | None = None
        self._mode: str | None = None
        self._dir: Path | None = None
        self._sites: dict[str, _Site] = {}
        self._base: dict[str, int] = {}  # site -> history entries in its run at the checkpoint resumed from
        self._positions: dict[str, int] = {}  # site -> history entries in its run at the last good flush
        self._closed: dict[str, _Closed] = {}  # site -> what its processes closed in this life wrote
        self._used = 0  # a clock of writes: the live process used least recently is closed first
        self._unflushed: list[tuple[str, int]] = []  # (site, seq) written since the last good flush
        self._flushes = 0
        self._dropped: dict[str, dict[str, int]] = {}  # site -> reserved key -> records left out
        self._summary: dict[str, Any] | None = None
        self._lock = threading.RLock()  # close() may come from another thread while a flush waits
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload(["__main__", "wandb", __name__])  # once, when the server starts
        self._generation: tuple[str, int] = ("", 0)  # this receiver's life, later than any before it

    def open(self, ctx: ReceiverContext) -> None:
        """Resolve mode and directory; site processes start with each site's first record."""
        self._ctx = ctx
        self._mode = self.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self._dir = Path(self.dir) if self.dir else Path(ctx.job_dir)
        (self._dir / "wandb").mkdir(parents=True, exist_ok=True)
        self._generation = _generation()

    def _blob(self, sha: str) -> Path:
        """Where the job's spool keeps the file of hash ``sha`` (the site process copies it from there)."""
        assert self._ctx is not None  # write() checked that the receiver is open
        return blob_path(Path(self._ctx.job_dir) / SPOOL_DIR, sha)

    def resume(self, state: dict[str, Any]) -> None:
        """Take the per-site history counts of the checkpoint that delivery restarts from."""
        with self._lock:
            self._base = {site: int(n) for site, n in state.get("sites", {}).items()}
            self._positions = dict(self._base)

    def checkpoint(self) -> dict[str, Any]:
        """``{"sites": {site: history entries in its run}}`` as of the last successful flush."""
        with self._lock:
            return {"sites": dict(self._positions)}

    def write(self, events: Sequence[TrackingEvent]) -> None:
        """Queue each record to its site's process; raise if a site process has failed.

        A batch that repeats what was written since the last successful flush (a retry after a
        failed flush) is not queued twice: only what follows that prefix is. A metric or text
        under a name in :data:`RESERVED_KEYS` is counted, not queued.
        """
        with self._lock:
            self._check_open()
            self._receive(0)
            self._raise_errors()
            ids = [(e.site, e.seq) for e in events]
            skip = len(self._unflushed) if ids[: len(self._unflushed)] == self._unflushed else 0
            batches: dict[str, list[tuple[str, str, Any, int | None]]] = {}
            dropped: list[TrackingEvent] = []
            for e in events[skip:]:
                kind = EventKind(e.kind)
                if e.key in RESERVED_KEYS and kind in (EventKind.METRIC, EventKind.TEXT):
                    dropped.append(e)
                elif kind in (EventKind.ARTIFACT, EventKind.MODEL):  # a model's files go under its name
                    files = (
                        {e.key: e.value}
                        if kind is EventKind.ARTIFACT
                        else {f"{e.key}/{rel}": sha for rel, sha in sorted(json.loads(e.value)["files"].items())}
                    )
                    missing = [sha for sha in files.values() if not self._blob(sha).is_file()]
                    if missing:
                        self.set_aside(e, f"file {missing[0]} is not in the job's spool")
                        continue
                    batches.setdefault(e.site, []).extend(
                        (_FILE, key, str(self._blob(sha)), None) for key, sha in files.items()
                    )
                else:
                    batches.setdefault(e.site, []).append((kind.value, e.key, e.value, e.step))
            for name, items in batches.items():
                site = self._sites.get(name) or self._start(name)
                self._used += 1
                site.used = self._used
                site.inbox.put((_BATCH, items))
                site.sent += len(items)
                site.history_sent += sum(kind in _HISTORY_KINDS for kind, *_ in items)
            for e in dropped:
                self._drop(e)
            self._unflushed += ids[skip:]

    def flush(self) -> None:
        """Block until every site process has finished its run with all it was sent, on disk.

        Raises RuntimeError naming the site if a site process failed, TimeoutError if one has not
        caught up within ``close_timeout``.
        """
        with self._lock:
            self._check_open()
            self._flushes += 1
            token = self._flushes
            sites = [s for s in self._sites.values() if s.error is None]
            for site in sites:
                site.inbox.put((_FLUSH, token))
            deadline = time.monotonic() + self.close_timeout
            while any(s.acked < token and s.error is None for s in sites) and time.monotonic() < deadline:
                self._receive(deadline - time.monotonic())
            self._raise_errors()
            late = [s for s in sites if s.acked < token]
            if late:
                raise TimeoutError(
                    "W&B site process(es) did not write their queued records within "
                    f"{self.close_timeout:g} s: " + ", ".join(f"{s.name!r} ({s.not_written} pending)" for s in late)
                )
            self._unflushed.clear()
            for name in {*self._closed, *(site.name for site in sites)}:
                self._positions[name] = self._history_base(name) + (
                    self._sites[name].history_sent if name in self._sites else 0
                )

    def close(self, status: str) -> dict[str, Any]:
        """Finish every site's run (exit code 0 for FINISHED, else 1) and report what each wrote.

        Each process gets ``close_timeout`` seconds to write what is queued and finish its run; one
        still going then is terminated and reported under ``errors`` with its ``not_written`` count.
        ``skipped`` counts, per site, records replayed after a restart that the run already held.
        Safe to call twice.
        """
        with self._lock:
            if self._summary is not None:
                return self._summary
            sites = list(self._sites.values())
            for site in sites:
                if site.error is None and not site.gone:
                    site.inbox.put((_END, 0 if status == FINISHED else 1))
            deadline = time.monotonic() + self.close_timeout
            while any(s.done is None and s.error is None and not s.gone for s in sites) and time.monotonic() < deadline:
                self._receive(deadline - time.monotonic())
            for site in sites:
                site.process.join(max(0.0, deadline - time.monotonic()))
                if site.process.is_alive():
                    if site.done is None and site.error is None:
                        site.error = f"still running {self.close_timeout:g} s after close; terminated"
                    _stop(site.process)
                site.inbox.close()
                site.inbox.cancel_join_thread()
                site.replies.close()
            resumed = {
                **{n: c.resumed for n, c in self._closed.items() if c.resumed},
                **{s.name: s.resumed for s in sites if s.resumed and s.name not in self._closed},
            }
            written = {n: c.written for n, c in self._closed.items()}
            for s in sites:
                written[s.name] = written.get(s.name, 0) + s.written.value
            job_id = self._ctx.job_id if self._ctx else ""
            self._summary = {
                "mode": self._mode,
                "dir": str(self._dir) if self._dir else None,
                "runs": {name: run_id(job_id, name) for name in sorted({*self._positions, *self._sites})},
                "written": written,
                "not_written": {s.name: s.not_written for s in sites if s.not_written},
                "skipped": {n: r["on_disk"] - r["base"] for n, r in resumed.items() if r["on_disk"] > r["base"]},
                "lost": {n: r["base"] - r["on_disk"] for n, r in resumed.items() if r["on_disk"] < r["base"]},
                "errors": {s.name: s.error for s in sites if s.error},
                "dropped": {name: dict(keys) for name, keys in self._dropped.items()},
            }
            return self._summary

    def _check_open(self) -> None:
        if self._ctx is None:
            raise RuntimeError("WandBReceiver: open() must be called before write() or flush()")
        if self._summary is not None:
            raise RuntimeError("WandBReceiver is closed")

    def _history_base(self, name: str) -> int:
        """History entries the site's run holds before its live process: at the checkpoint resumed from,
        plus what its processes closed in this life wrote."""
        closed = self._closed.get(name)
        return self._base.get(name, 0) + (closed.history if closed else 0)

    def _start(self, name: str) -> _Site:
        assert self._ctx is not None and self._dir is not None
        if len(self._sites) >= self.max_processes:
            self._close_process(min(self._sites.values(), key=lambda s: s.used))
        rid = run_id(self._ctx.job_id, name)
        init = {
            "project": self.project or self._ctx.job_name,
            "entity": self.entity,
            "group": self._ctx.job_id,
            "name": name,
            "id": rid,
            "resume": "allow",
            "dir": str(self._dir),
            "mode": self._mode,
            "settings": _SETTINGS,
        }
        inbox, (replies, reply_end), written = self._mp.Queue(), self._mp.Pipe(duplex=False), self._mp.RawValue("q", 0)
        process = self._mp.Process(
            target=_site_main,
            args=(name, dict(os.environ), init, self._history_base(name), self._generation, inbox, reply_end, written),
            name=f"fl_ray-wandb-{name}",
            daemon=True,
        )
        process.start()
        reply_end.close()  # the child holds the only write end: its exit reads as EOF here
        site = self._sites[name] = _Site(name, process, inbox, replies, written)
        self._positions.setdefault(name, self._base.get(name, 0))
        return site

    def _close_process(self, site: _Site) -> None:
        """End ``site``'s process (its run finished, on disk, with all it was sent) to make room for another;
        the site's next record starts a new process that resumes the run by id.

        Raises RuntimeError naming the site if the process failed or did not end within ``close_timeout``.
        """
        site.inbox.put((_END, 0))
        deadline = time.monotonic() + self.close_timeout
        while site.done is None and site.error is None and not site.gone and time.monotonic() < deadline:
            self._receive(deadline - time.monotonic())
        if site.done is None:
            self._raise_errors()
            raise RuntimeError(
                f"W&B site process failed: site {site.name!r}: did not finish its run within "
                f"{self.close_timeout:g} s to make room (max_processes={self.max_processes})"
            )
        site.process.join(max(0.0, deadline - time.monotonic()))
        if site.process.is_alive():
            _stop(site.process)
        site.inbox.close()
        site.inbox.cancel_join_thread()
        site.replies.close()
        closed = self._closed.setdefault(site.name, _Closed(resumed=site.resumed))
        closed.history += site.history_sent
        closed.written += site.written.value
        del self._sites[site.name]

    def _drop(self, e: TrackingEvent) -> None:
        """Count a record W&B cannot hold; name its key in a warning the first time."""
        if not any(e.key in keys for keys in self._dropped.values()):
            log.warning(
                "W&B receiver: %s %r (first from site %r) is not written: W&B fills the history column "
                "%r itself. Rename it; the records left out are counted per site under 'dropped' in the "
                "receiver's summary in result.json",
                EventKind(e.kind).value,
                e.key,
                e.site,
                e.key,
            )
        keys = self._dropped.setdefault(e.site, {})
        keys[e.key] = keys.get(e.key, 0) + 1

    def _receive(self, timeout: float) -> None:
        """Take every reply that arrives within ``timeout`` seconds (0: only those already there)."""
        live = {s.replies: s for s in self._sites.values() if not s.gone}
        for ready in wait(list(live), max(0.0, timeout)):
            conn = cast(Connection, ready)
            site = live[conn]
            try:
                while conn.poll():
                    tag, payload = conn.recv()
                    if tag == _ACK:
                        site.acked = max(site.acked, payload)
                    elif tag == _RESUMED:
                        site.resumed = payload
                        if payload["on_disk"] < payload["base"]:
                            log.warning(
                                "W&B receiver: the run of site %r holds %d metric/text records, %d fewer "
                                "than its checkpoint counts (a segment under %s removed?); they are lost "
                                "and counted under 'lost'",
                                site.name,
                                payload["on_disk"],
                                payload["base"] - payload["on_disk"],
                                self._dir,
                            )
                    elif tag == _ERROR:
                        site.error = payload
                    else:
                        site.done = payload
            except (EOFError, OSError):
                site.gone = True
                if site.done is None and site.error is None:
                    site.process.join(1.0)
                    site.error = f"process exited unexpectedly (exit code {site.process.exitcode})"

    def _raise_errors(self) -> None:
        failed = [s for s in self._sites.values() if s.error]
        if failed:
            raise RuntimeError(
                "W&B site process failed: "
                + "; ".join(f"site {s.name!r}: {s.error} ({s.not_written} record(s) not written)" for s in failed)
            )


def _stop(process: Any) -> None:
    process.terminate()
    process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join()


# ---- the site process -------------------------------------------------------------------------------


def _site_main(
    site: str,
    environment: dict[str, str],
    init: dict[str, Any],
    base: int,
    generation: tuple[str, int],
    inbox: Any,
    replies: Connection,
    written: Any,
) -> None:
    """Own one site's W&B run: take it over, log each batch in order, finish it at each flush and on END.

    ``environment`` is the receiver's when it started this process (the fork server's may be older). If the
    parent process dies, the run is finished with exit code 1 and the process exits.
    """
    writer = None
    try:
        os.environ.clear()
        os.environ.update(environment)
        os.environ.pop("WANDB_SERVICE", None)  # a wandb-core of our own, so a successor can tell it is ours
        import wandb

        writer = _RunWriter(wandb, init, base, generation, written)
        replies.send((_RESUMED, {"base": base, "on_disk": writer.on_disk}))
        parent = multiprocessing.parent_process()
        while True:
            try:
                tag, payload = inbox.get(timeout=1.0)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    raise RuntimeError("the receiver process died") from None
                continue
            if tag == _BATCH:
                writer.log(payload)
            elif tag == _FLUSH:
                writer.finish(0)
                replies.send((_ACK, payload))
            else:
                writer.end(payload)
                replies.send((_DONE, {"run_id": init["id"]}))
                return
    except BaseException as exc:
        print(f"fl_ray: the W&B process of site {site!r} failed\n{traceback.format_exc()}", file=sys.stderr)
        with contextlib.suppress(Exception):
            replies.send((_ERROR, f"{type(exc).__name__}: {exc}"))
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.finish(1)


class _RunWriter:
    """The site's run, seen from its process: segments opened on demand, finished (on disk) at each flush."""

    def __init__(self, wandb: Any, init: dict[str, Any], base: int, generation: tuple[str, int], written: Any) -> None:
        self.wandb, self.init, self.written = wandb, init, written
        self.lock = _take_over(Path(init["dir"]) / "wandb" / f"fl_ray-{init['id']}.lock", generation)  # for life
        held = scan_run(Path(init["dir"]) / "wandb", init["id"]) if init["mode"] != "disabled" else RunContents()
        self.on_disk = held.entries
        self.skip = max(0, held.entries - base)  # replayed metric/text records the run already holds
        self.rows = held.rows  # history rows in the run: the next segment's first _step
        self.config = held.config  # the run's config so far: each segment starts with it
        self.run: Any = None
        self.pending = 0  # records logged into the open segment

    def log(self, items: list[tuple]) -> None:
        """Log a batch, less the records the run already holds: runs of metrics/texts at one step share a
        history row; config changes go last."""
        row: dict[str, Any] = {}
        config: dict[str, Any] = {}
        files: list[tuple[str, str]] = []
        for kind, key, value, step in items:
            if kind == _FILE:
                files.append((key, value))
            elif kind in _HISTORY_KINDS:
                if self.skip:
                    self.skip -= 1
                    self.written.value += 1
                    continue
                at = step or 0
                if row and (row[STEP_METRIC] != at or key in row):
                    self._log_row(row)
                    row = {}
                row[STEP_METRIC] = at
                row[key] = value if kind == "metric" else self.wandb.Table(columns=["step", "text"], data=[[at, value]])
            else:
                config[key if kind == "param" else f"tags/{key}"] = value
            self.pending += 1
        if row:
            self._log_row(row)
        if config:
            self._segment().config.update(config, allow_val_change=True)
            self.config.update(config)
        for key, blob in files:  # a copy under the file's own path, uploaded with the run
            base = Path(self.init["dir"]) / "fl_ray_files" / self.init["id"]
            (base / key).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(blob, base / key)
            self._segment().save(str(base / key), base_path=str(base), policy="now")

    def finish(self, exit_code: int) -> None:
        """Finish the open segment, if any, and sync its transaction log to disk."""
        if self.run is None:
            return
        run, self.run = self.run, None
        run.finish(exit_code=exit_code)
        if self.init["mode"] != "disabled":
            fsync_path(Path(run.settings.sync_file))
        self.written.value += self.pending
        self.pending = 0

    def end(self, exit_code: int) -> None:
        """Finish the run for good; a failed end of a run that exists is recorded in a segment of its own."""
        if exit_code and self.run is None and (self.rows or self.config):
            self._segment()
        self.finish(exit_code)

    def _segment(self) -> Any:
        """The open segment, started (resuming the run) if there is none."""
        if self.run is None:
            self.run = self.wandb.init(config=dict(self.config), **self.init)
            self.run.define_metric(STEP_METRIC)
            self.run.define_metric("*", step_metric=STEP_METRIC)
            self.rows = max(self.rows, self.run.step)  # online, a resumed run's step is the server's
        return self.run

    def _log_row(self, row: dict[str, Any]) -> None:
        # step= continues _step across segments; fl_step, not _step, is the x-axis, so no row is ever below it
        self._segment().log(row, step=self.rows, commit=True)
        self.rows += 1


def _generation() -> tuple[str, int]:
    """When a receiver life began: (this boot's id, system-wide monotonic clock), so a later life compares
    greater on this machine, whatever the wall clock does."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = str(psutil.boot_time())
    return boot, time.monotonic_ns()


def _take_over(path: Path, generation: tuple[str, int]) -> IO[str]:
    """Hold ``path``'s lock for this process's life, after killing whoever held it before (a site process
    of a dead receiver) and that process's wandb-core, so that no one else writes the run any more.

    The lock file names its last owner and that owner's receiver generation; a process of an older
    generation (one of a dead receiver that was still starting) never kills a newer owner nor writes
    after it: it raises RuntimeError instead.
    """
    me = psutil.Process()
    mine = {"pid": me.pid, "started": me.create_time(), "generation": list(generation)}
    lock = open(path, "a+")
    try:
        while True:
            owner = _owner(lock)
            _check_not_superseded(owner, generation)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _process(owner) if owner and owner["pid"] != me.pid else None
                if holder is not None:
                    with contextlib.suppress(psutil.Error):
                        holder.kill()
                time.sleep(0.05)
        owner = _owner(lock)
        _check_not_superseded(owner, generation)
    except BaseException:
        lock.close()
        raise
    if owner and owner["pid"] != me.pid:
        _kill_wandb_core_of(owner)
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps(mine))
    lock.flush()
    return lock


def _owner(lock: IO[str]) -> dict[str, Any] | None:
    """The last owner the lock file names (pid, start time, generation), if any."""
    lock.seek(0)
    with contextlib.suppress(ValueError):
        owner = json.loads(lock.read())
        if isinstance(owner, dict) and {"pid", "started", "generation"} <= owner.keys():
            return owner
    return None


def _check_not_superseded(owner: dict[str, Any] | None, generation: tuple[str, int]) -> None:
    if owner and owner["generation"][0] == generation[0] and owner["generation"][1] > generation[1]:
        raise RuntimeError(f"superseded: the run belongs to a newer receiver's site process (pid {owner['pid']})")


def _process(owner: dict[str, Any]) -> psutil.Process | None:
    """The owner's process if it is still the one that started at its start time (running or a zombie)."""
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(owner["pid"])
        if process.create_time() == owner["started"]:
            return process
    return None


def _kill_wandb_core_of(owner: dict[str, Any]) -> None:
    """SIGKILL the wandb-core the owner's process launched (``--pid <pid>``) and wait until it is dead (a
    zombie writes nothing); a wandb-core whose parent is a later process with that pid is left alone."""
    pid, cores = owner["pid"], []
    for process in psutil.process_iter(["cmdline", "ppid"]):
        cmd = process.info["cmdline"] or []
        if (
            cmd
            and Path(cmd[0]).name.startswith("wandb-core")
            and "--pid" in cmd[:-1]
            and cmd[cmd.index("--pid") + 1] == str(pid)
            and (process.info["ppid"] != pid or _process(owner) is not None)
        ):
            with contextlib.suppress(psutil.Error):
                process.kill()
                cores.append(process)
    deadline = time.monotonic() + 10
    while any(_running(core) for core in cores) and time.monotonic() < deadline:
        time.sleep(0.01)


def _running(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.status() != psutil.STATUS_ZOMBIE
    return False


# ---- what a run holds on disk -----------------------------------------------------------------------

_FILE_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class RunContents:
    """What the segments of one run hold: history entries (metric/text records), rows, last config."""

    entries: int = 0
    rows: int = 0
    config: dict[str, Any] = field(default_factory=dict)


def scan_run(wandb_dir: Path, rid: str) -> RunContents:
    """Count what every segment (``*/run-<rid>.wandb``, not the ``latest-run`` link) of a run holds, merging
    configs in start order."""
    total = RunContents()
    segments = []
    for path in wandb_dir.glob(f"*/run-{rid}.wandb"):
        if path.parent.is_symlink():
            continue
        segment, started = RunContents(), 0
        for record in read_records(path):
            what = record.WhichOneof("record_type")
            if what == "history":
                segment.rows += 1
                names = {item.key or item.nested_key[0] for item in record.history.item}
                segment.entries += len(names - RESERVED_KEYS)
            elif what == "run":
                started = record.run.start_time.ToNanoseconds()
                _update_config(segment.config, record.run.config)
            elif what == "config":
                _update_config(segment.config, record.config)
        segments.append((started, path.parent.name, segment))
    for _, _, segment in sorted(segments, key=lambda s: s[:2]):
        total.entries += segment.entries
        total.rows += segment.rows
        total.config.update(segment.config)
    return total


def _update_config(config: dict[str, Any], record: Any) -> None:
    for item in record.update:
        key = item.key or ".".join(item.nested_key)
        if key != "_wandb":
            config[key] = json.loads(item.value_json)


def read_records(path: Path) -> Iterator[Any]:
    """Yield the complete records of a ``.wandb`` transaction log (LevelDB log format in 32 KiB blocks
    after a 7-byte header), stopping at the first incomplete or damaged one, as ``wandb sync`` does."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if not data.startswith(_FILE_HEADER):
        return
    pos, pending, inside = len(_FILE_HEADER), bytearray(), False
    while pos + _CHUNK_HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos) if room >= _CHUNK_HEADER.size else (0, 0, 0)
        if kind == 0 and length == 0 and crc == 0:  # zero padding to the end of the block
            pos += room
            continue
        payload = data[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
        pos += _CHUNK_HEADER.size + length
        if (
            len(payload) != length
            or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc
            or kind not in (_FULL, _FIRST, _MIDDLE, _LAST)
            or (kind in (_MIDDLE, _LAST)) != inside
        ):
            return
        pending += payload
        inside = kind in (_FIRST, _MIDDLE)
        if not inside:
            record = pb.Record()  # type: ignore[attr-defined]
            record.ParseFromString(bytes(pending))
            pending = bytearray()
            yield record
