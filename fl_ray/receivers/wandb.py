"""W&B receiver: one W&B run per site, each written by its own OS process.

The facade (:class:`WandBReceiver`, in the receiver actor) starts a "spawn" process per site when
the site's first record arrives and feeds it through a multiprocessing queue; the process owns the
site's ``wandb`` run (name = site, group = job id) and replies on a pipe: an ack per flush, its
error, or its end. W&B keeps one run per process, so sites never share a run and need no
``reinit``. Mapping: metrics are history rows against the custom step metric ``fl_step`` (W&B's own
``_step`` only counts rows, so a record with a lower step than the last is kept, never dropped);
params go to ``run.config``; tags to ``run.config["tags/<key>"]`` (W&B's native tags are plain
labels, not key/value); texts to a one-row ``wandb.Table`` (columns ``step``, ``text``) logged
under their key at their step (0 when none). The only records W&B cannot hold are metrics and texts
named like a history column it fills itself (``fl_step``, ``_step``, ``_runtime``, ``_timestamp``):
those are counted per site under ``dropped`` and named once in a warning. The site process imports
this module (``fl_ray`` loads lazily, so not Ray or torch) and ``wandb``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Sequence

from fl_ray.receivers.base import FINISHED, Receiver, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent

log = logging.getLogger(__name__)

STEP_METRIC = "fl_step"
# History columns W&B (or, for fl_step, this receiver) fills itself: a metric or text so named is dropped.
RESERVED_KEYS = frozenset({STEP_METRIC, "_step", "_runtime", "_timestamp"})
MODES = ("online", "offline", "disabled")
# Queue and pipe messages are (tag, payload) tuples of plain values.
# Parent -> site: BATCH, FLUSH, END. Site -> parent: ACK, ERROR, DONE.
_BATCH, _FLUSH, _END, _ACK, _ERROR, _DONE = "batch", "flush", "end", "ack", "error", "done"
# W&B settings for a site's run: system metrics and host metadata would describe the receiver's host,
# not the site, and console capture or code saving have nothing to show.
_SETTINGS = {"console": "off", "silent": True, "x_disable_stats": True, "x_disable_meta": True,
             "x_save_requirements": False, "disable_git": True, "save_code": False}


@dataclass
class _Site:
    """The parent's handle on one site process."""

    name: str
    process: Any  # multiprocessing's SpawnProcess
    inbox: Any  # multiprocessing.Queue of messages to the process
    replies: Connection
    written: Any  # RawValue('q'): records the process has handed to wandb
    sent: int = 0
    acked: int = 0  # highest flush token acknowledged
    error: str | None = None
    done: dict[str, Any] | None = None
    gone: bool = False  # its pipe hit EOF: the process ended

    @property
    def not_written(self) -> int:
        return self.sent - self.written.value


class WandBReceiver(Receiver):
    """Writes each site's records to its own W&B run (project = ``project`` or the job name).

    ``mode`` is ``online``, ``offline`` or ``disabled``; by default online when ``WANDB_API_KEY``
    is set, else offline (runs under ``<dir>/wandb/offline-run-*``, to upload with ``wandb sync``).
    ``dir`` defaults to the job directory. ``close_timeout`` bounds, in seconds, both how long
    :meth:`flush` waits for the site processes and how long :meth:`close` lets them finish.
    """

    def __init__(self, project: str | None = None, entity: str | None = None, mode: str | None = None,
                 dir: str | None = None, close_timeout: float = 60.0) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise ImportError("WandBReceiver needs the wandb package, a dependency of fl_ray: pip install wandb")
        if mode is not None and mode not in MODES:
            raise ValueError(f"WandBReceiver: mode must be one of {', '.join(MODES)} or unset, got {mode!r}")
        if isinstance(close_timeout, bool) or not isinstance(close_timeout, (int, float)) or close_timeout <= 0:
            raise ValueError(f"WandBReceiver: close_timeout must be a positive number of seconds, "
                             f"got {close_timeout!r}")
        self.project, self.entity, self.mode, self.dir = project, entity, mode, dir
        self.close_timeout = float(close_timeout)
        self._ctx: ReceiverContext | None = None
        self._mode: str | None = None
        self._dir: Path | None = None
        self._sites: dict[str, _Site] = {}
        self._unflushed: list[tuple[str, int]] = []  # (site, seq) written since the last good flush
        self._flushes = 0
        self._dropped: dict[str, dict[str, int]] = {}  # site -> reserved key -> records left out
        self._summary: dict[str, Any] | None = None
        self._lock = threading.RLock()  # close() may come from another thread while a flush waits
        self._mp = multiprocessing.get_context("spawn")

    def open(self, ctx: ReceiverContext) -> None:
        """Resolve mode and directory; site processes start with each site's first record."""
        self._ctx = ctx
        self._mode = self.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self._dir = Path(self.dir) if self.dir else Path(ctx.job_dir)
        self._dir.mkdir(parents=True, exist_ok=True)

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
            skip = len(self._unflushed) if ids[:len(self._unflushed)] == self._unflushed else 0
            batches: dict[str, list[tuple[str, str, Any, int | None]]] = {}
            dropped: list[TrackingEvent] = []
            for e in events[skip:]:
                kind = EventKind(e.kind)
                if e.key in RESERVED_KEYS and kind in (EventKind.METRIC, EventKind.TEXT):
                    dropped.append(e)
                else:
                    batches.setdefault(e.site, []).append((kind.value, e.key, e.value, e.step))
            for name, items in batches.items():
                site = self._sites.get(name) or self._start(name)
                site.inbox.put((_BATCH, items))
                site.sent += len(items)
            for e in dropped:
                self._drop(e)
            self._unflushed += ids[skip:]

    def flush(self) -> None:
        """Block until every site process has handed all its queued records to wandb.

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
                raise TimeoutError("W&B site process(es) did not log their queued records within "
                                   f"{self.close_timeout:g} s: "
                                   + ", ".join(f"{s.name!r} ({s.not_written} pending)" for s in late))
            self._unflushed.clear()

    def close(self, status: str) -> dict[str, Any]:
        """Finish every site's run (exit code 0 for FINISHED, else 1) and report what each wrote.

        Each process gets ``close_timeout`` seconds to log what is queued and finish its run; one
        still going then is terminated and reported under ``errors`` with its ``not_written`` count.
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
            while any(s.done is None and s.error is None and not s.gone for s in sites) \
                    and time.monotonic() < deadline:
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
            self._summary = {
                "mode": self._mode,
                "dir": str(self._dir) if self._dir else None,
                "written": {s.name: s.written.value for s in sites},
                "not_written": {s.name: s.not_written for s in sites if s.not_written},
                "errors": {s.name: s.error for s in sites if s.error},
                "dropped": {name: dict(keys) for name, keys in self._dropped.items()},
                "runs": {s.name: s.done["run_dir"] for s in sites if s.done and "run_dir" in s.done},
            }
            return self._summary

    def _check_open(self) -> None:
        if self._ctx is None:
            raise RuntimeError("WandBReceiver: open() must be called before write() or flush()")
        if self._summary is not None:
            raise RuntimeError("WandBReceiver is closed")

    def _start(self, name: str) -> _Site:
        assert self._ctx is not None
        init = {"project": self.project or self._ctx.job_name, "entity": self.entity, "group": self._ctx.job_id,
                "name": name, "dir": str(self._dir), "mode": self._mode, "settings": _SETTINGS}
        inbox, (replies, reply_end), written = self._mp.Queue(), self._mp.Pipe(duplex=False), self._mp.RawValue("q", 0)
        process = self._mp.Process(target=_site_main, args=(name, init, inbox, reply_end, written),
                                   name=f"fl_ray-wandb-{name}", daemon=True)
        process.start()
        reply_end.close()  # the child holds the only write end: its exit reads as EOF here
        site = self._sites[name] = _Site(name, process, inbox, replies, written)
        return site

    def _drop(self, e: TrackingEvent) -> None:
        """Count a record W&B cannot hold; name its key in a warning the first time."""
        if not any(e.key in keys for keys in self._dropped.values()):
            log.warning("W&B receiver: %s %r (first from site %r) is not written: W&B fills the history column "
                        "%r itself. Rename it; the records left out are counted per site under 'dropped' in the "
                        "receiver's summary in result.json", EventKind(e.kind).value, e.key, e.site, e.key)
        keys = self._dropped.setdefault(e.site, {})
        keys[e.key] = keys.get(e.key, 0) + 1

    def _receive(self, timeout: float) -> None:
        """Take every reply that arrives within ``timeout`` seconds (0: only those already there)."""
        live = {s.replies: s for s in self._sites.values() if not s.gone}
        for conn in wait(list(live), max(0.0, timeout)):
            site = live[conn]
            try:
                while conn.poll():
                    tag, payload = conn.recv()
                    if tag == _ACK:
                        site.acked = max(site.acked, payload)
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
            raise RuntimeError("W&B site process failed: " + "; ".join(
                f"site {s.name!r}: {s.error} ({s.not_written} record(s) not written)" for s in failed))


def _stop(process: Any) -> None:
    process.terminate()
    process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join()


# ---- the site process -------------------------------------------------------------------------------


def _site_main(site: str, init: dict[str, Any], inbox: Any, replies: Connection, written: Any) -> None:
    """Own one site's W&B run: log each batch in order, ack flushes, finish the run on END.

    If the parent process dies, the run is finished with exit code 1 and the process exits.
    """
    run = None
    try:
        import wandb

        parent = multiprocessing.parent_process()
        while True:
            try:
                tag, payload = inbox.get(timeout=1.0)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    raise RuntimeError("the receiver process died") from None
                continue
            if tag == _BATCH:
                if run is None:
                    run = _start_run(wandb, init, payload)
                _log(wandb, run, payload, written)
            elif tag == _FLUSH:
                replies.send((_ACK, payload))
            else:
                done = {}
                if run is not None:
                    done = {"run_id": run.id}
                    if init["mode"] != "disabled":
                        done["run_dir"] = run.settings.sync_dir
                    run.finish(exit_code=payload)
                replies.send((_DONE, done))
                return
    except BaseException as exc:
        print(f"fl_ray: the W&B process of site {site!r} failed\n{traceback.format_exc()}", file=sys.stderr)
        with contextlib.suppress(Exception):
            replies.send((_ERROR, f"{type(exc).__name__}: {exc}"))
        if run is not None:
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)


def _start_run(wandb: Any, init: dict[str, Any], first: list[tuple]) -> Any:
    """``wandb.init`` with the params and tags of the site's first batch as config."""
    config = {_config_key(kind, key): value for kind, key, value, _ in first if kind in ("param", "tag")}
    run = wandb.init(config=config, **init)
    run.define_metric(STEP_METRIC)
    run.define_metric("*", step_metric=STEP_METRIC)
    return run


def _log(wandb: Any, run: Any, items: list[tuple], written: Any) -> None:
    """Log a batch: runs of metrics/texts at one step share a history row; config changes go last."""
    row: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for kind, key, value, step in items:
        if kind in ("metric", "text"):
            at = step or 0
            if row and (row[STEP_METRIC] != at or key in row):
                _log_row(run, row, written)
                row = {}
            row[STEP_METRIC] = at
            row[key] = value if kind == "metric" else wandb.Table(columns=["step", "text"], data=[[at, value]])
        else:
            config[_config_key(kind, key)] = value
    if row:
        _log_row(run, row, written)
    if config:
        run.config.update(config, allow_val_change=True)
        written.value += sum(kind in ("param", "tag") for kind, *_ in items)


def _log_row(run: Any, row: dict[str, Any], written: Any) -> None:
    run.log(row)  # no step=: W&B would drop a row whose step is below the run's current one
    written.value += len(row) - 1


def _config_key(kind: str, key: str) -> str:
    return key if kind == "param" else f"tags/{key}"
