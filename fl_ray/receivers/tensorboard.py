"""TensorBoard receiver: each site's records as event files under ``<job_dir>/tb_events/<site>/``.

One :class:`~tensorboard.summary.writer.event_file_writer.EventFileWriter` per site is opened when
the site's first record arrives, so ``tensorboard --logdir <job_dir>/tb_events`` shows one run per
site. Metrics are scalars at their step and wall time; ``add_scalars`` series get the layout torch's
``SummaryWriter.add_scalars`` makes (a sub-run ``<site>/<main_tag>_<series>`` holding tag
``main_tag``), so curves of one group share a chart. Texts are text summaries. Params and tags are
gathered per site and written, when they changed, as one markdown table each (text tags ``params``
and ``tags``) at every flush.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from fl_ray.receivers.base import Receiver, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent

# Text tags of the per-site tables, keyed by the kind of record they gather.
_TABLE_TAGS = {EventKind.PARAM: "params", EventKind.TAG: "tags"}


class TensorBoardReceiver(Receiver):
    """Writes every site's metrics, texts, params and tags as TensorBoard event files.

    ``log_dir`` replaces the default ``<job_dir>/tb_events``; ``flush_secs`` is how often the
    writers' background threads flush on their own between :meth:`flush` calls.
    """

    def __init__(self, flush_secs: float = 5.0, log_dir: str | None = None) -> None:
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, (int, float)) or flush_secs <= 0:
            raise ValueError(f"TensorBoardReceiver: flush_secs must be a positive number, got {flush_secs!r}")
        self.flush_secs = float(flush_secs)
        self.log_dir = log_dir
        self._base: Path | None = None
        self._closed = False
        self._writers: dict[tuple[str, ...], EventFileWriter] = {}  # (site, sub-run...) -> writer
        self._tables: dict[tuple[str, EventKind], dict[str, str]] = {}
        self._table_writes: dict[tuple[str, EventKind], int] = {}  # versions written: the table's next step
        self._dirty: set[tuple[str, EventKind]] = set()
        self._sites: set[str] = set()
        self._scalars = 0
        self._texts = 0

    def open(self, ctx: ReceiverContext) -> None:
        """Choose the base directory (``log_dir`` or ``<job_dir>/tb_events``) and create it."""
        self._base = Path(self.log_dir) if self.log_dir else Path(ctx.job_dir) / "tb_events"
        self._base.mkdir(parents=True, exist_ok=True)

    def write(self, events: Sequence[TrackingEvent]) -> None:
        """Hand each record to its site's writer (params and tags wait for the next flush)."""
        self._check_open()
        for e in events:
            kind = EventKind(e.kind)
            if kind is EventKind.METRIC:
                self._scalar(e)
            elif kind is EventKind.TEXT:
                self._writer(e.site).add_event(
                    Event(wall_time=e.timestamp / 1000, step=e.step or 0, summary=text_pb(e.key, e.value)))
                self._texts += 1
            else:
                self._writer(e.site)  # the site's run exists from its first record on
                self._tables.setdefault((e.site, kind), {})[e.key] = str(e.value)
                self._dirty.add((e.site, kind))

    def flush(self) -> None:
        """Write changed params/tags tables, then flush every writer so the files are readable."""
        self._check_open()
        now = time.time()
        for site, kind in sorted(self._dirty):
            step = self._table_writes.get((site, kind), 0)
            table = _markdown_table(("name", "value"), sorted(self._tables[site, kind].items()))
            self._writer(site).add_event(Event(wall_time=now, step=step, summary=text_pb(_TABLE_TAGS[kind], table)))
            self._table_writes[site, kind] = step + 1
        self._dirty.clear()
        for writer in self._writers.values():
            writer.flush()

    def close(self, status: str) -> dict[str, Any]:
        """Flush and close every writer; return where the files are and what was written."""
        if not self._closed and self._base is not None:
            self.flush()
            for writer in self._writers.values():
                writer.close()
        self._closed = True
        return {"log_dir": str(self._base), "sites": sorted(self._sites),
                "scalars": self._scalars, "texts": self._texts}

    def _check_open(self) -> None:
        if self._base is None:
            raise RuntimeError("TensorBoardReceiver: open() must be called before write() or flush()")
        if self._closed:
            raise RuntimeError(f"TensorBoardReceiver for {self._base} is closed")

    def _scalar(self, e: TrackingEvent) -> None:
        if e.group:
            # add_scalars: series ``main_tag/k`` lives in sub-run ``<main_tag>_<k>`` under tag main_tag
            series = e.key[len(e.group) + 1:] if e.key.startswith(e.group + "/") else e.key
            writer, tag = self._writer(e.site, f"{e.group.replace('/', '_')}_{series}"), e.group
        else:
            writer, tag = self._writer(e.site), e.key
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=e.value)])
        writer.add_event(Event(wall_time=e.timestamp / 1000, step=e.step or 0, summary=summary))
        self._scalars += 1

    def _writer(self, site: str, sub_run: str | None = None) -> EventFileWriter:
        key = (site,) if sub_run is None else (site, sub_run)
        writer = self._writers.get(key)
        if writer is None:
            if site not in self._sites:
                _check_site(site)
                self._sites.add(site)
            assert self._base is not None
            writer = EventFileWriter(str(self._base.joinpath(*key)), flush_secs=self.flush_secs)
            self._writers[key] = writer
        return writer


def _check_site(site: Any) -> None:
    if not isinstance(site, str) or not site or site in (".", "..") or "/" in site or "\\" in site:
        raise ValueError(f"TensorBoardReceiver: site {site!r} cannot name a directory")


def _markdown_table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in rows]
    return "\n".join(lines)
