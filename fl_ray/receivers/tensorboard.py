"""TensorBoard receiver: each site's records as event files under ``<job_dir>/tb_events/<site>/``.

Every run directory (``<site>``, or an ``add_scalars`` sub-run ``<site>/<main_tag>_<series>``) holds one
event file of the job, ``events.out.tfevents.<creation time>.fl_ray.<job id>``, so ``tensorboard
--logdir <job_dir>/tb_events`` shows one run per site. Metrics are scalars at their step and wall time;
``add_scalars`` series get the layout torch's ``SummaryWriter.add_scalars`` makes (tag ``main_tag`` in
the sub-run), so curves of one group share a chart. Texts are text summaries. Params and tags are
gathered per site and written, when they changed, as one markdown table each (text tags ``params``
and ``tags``, step = version) at every flush. Files a site logs are written where TensorBoard can show
them: a text file (``.txt``, ``.json``, ``.yaml``, ...) as a text summary, an image (``.png``, ``.jpg``,
a logged figure) as an image summary, both under the file's path at step 0; other files and models are
counted as ``skipped``. A child run a site started (``<site>/<name>``) is the sub-run ``<site>/<name>``.

Exactly once: :meth:`write` only encodes records (TensorBoard's record format, in memory);
:meth:`flush` appends them to the files, fsyncs each file and each new directory, and notes every
file's length. Those lengths, with the tables and counters, are the :meth:`checkpoint` the hub saves
with the progress mark. :meth:`resume` cuts each file back to its checkpointed length and deletes the
job's event files the checkpoint does not list (they hold only records past the mark), so the records
written again after a crash are stored once. A ``write`` or ``flush`` that raised is rolled back to the
last flush the same way before the receiver goes on, since the hub retries it from the same mark.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from tensorboard.compat.proto.event_pb2 import Event, SourceMetadata
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.record_writer import RecordWriter

from fl_ray.receivers.base import Receiver, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.spool import SPOOL_DIR, blob_path

# Text tags of the per-site tables, keyed by the kind of record they gather.
_TABLE_TAGS = {EventKind.PARAM: "params", EventKind.TAG: "tags"}
TEXT_FILES = (".txt", ".json", ".yaml", ".yml", ".md", ".csv", ".log")
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")


@dataclass
class _EventFile:
    """One run directory's event file: its path under the base, bytes durable on disk, records not yet flushed."""

    path: str  # relative to the base directory, POSIX form
    length: int
    on_disk: bool  # False until its first flush created it (its directory entry then needs an fsync)
    pending: io.BytesIO = field(default_factory=io.BytesIO)

    def add(self, event: Event) -> None:
        RecordWriter(self.pending).write(event.SerializeToString())


class TensorBoardReceiver(Receiver):
    """Writes every site's metrics, texts, params and tags as TensorBoard event files, exactly once.

    ``log_dir`` replaces the default ``<job_dir>/tb_events``; ``flush_secs`` is how often the files are
    brought up to date: the hub delivers (writes, flushes and fsyncs) at most this often, 0 for as
    records arrive, and everything at the end.
    """

    def __init__(self, flush_secs: float = 5.0, log_dir: str | None = None) -> None:
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, (int, float)) or not 0 <= flush_secs < math.inf:
            raise ValueError(f"TensorBoardReceiver: flush_secs must be a number of seconds >= 0, got {flush_secs!r}")
        self.buffer_flush_time = float(flush_secs)
        self.log_dir = log_dir
        self._base: Path | None = None
        self._own_name: re.Pattern[str] | None = None  # names of this job's event files
        self._job_tag = ""
        self._closed = False
        self._files: dict[str, _EventFile] = {}  # run directory (relative, POSIX) -> its event file
        self._tables: dict[tuple[str, str], dict[str, str]] = {}  # (site, "params"/"tags") -> rows
        self._versions: dict[tuple[str, str], int] = {}  # versions written: the table's next step
        self._dirty: set[tuple[str, str]] = set()
        self._sites: set[str] = set()
        self._scalars = 0
        self._texts = 0
        self._images = 0
        self._skipped = 0  # files and models TensorBoard cannot show
        self._blobs: Path | None = None
        self._committed: dict[str, Any] = self._snapshot()  # the state as of the last flush (or resume)
        self._resumed = False  # the committed state accounts for every event file of the job
        self._failed = False  # files and state may be past the committed state (a write or flush raised, or a resume)

    def open(self, ctx: ReceiverContext) -> None:
        """Choose the base directory (``log_dir`` or ``<job_dir>/tb_events``) and create it."""
        self._base = Path(self.log_dir) if self.log_dir else Path(ctx.job_dir) / "tb_events"
        self._base.mkdir(parents=True, exist_ok=True)
        self._blobs = Path(ctx.job_dir) / SPOOL_DIR
        self._job_tag = re.sub(r"[^A-Za-z0-9_.-]", "_", ctx.job_id)
        self._own_name = re.compile(rf"events\.out\.tfevents\.\d+\.fl_ray\.{re.escape(self._job_tag)}")

    def write(self, events: Sequence[TrackingEvent]) -> None:
        """Encode each record for its run's file (params and tags wait for the next flush); nothing is written yet."""
        self._check_open()
        self._recover()
        try:
            for e in events:
                kind = EventKind(e.kind)
                if kind is EventKind.METRIC:
                    self._scalar(e)
                elif kind is EventKind.TEXT:
                    self._run_file(e.site).add(
                        Event(wall_time=e.timestamp / 1000, step=e.step or 0, summary=text_pb(e.key, e.value))
                    )
                    self._texts += 1
                elif kind is EventKind.ARTIFACT:
                    self._artifact(e)
                elif kind is EventKind.MODEL:
                    self._run_file(e.site)
                    self._skipped += 1
                else:
                    self._run_file(e.site)  # the site's run exists from its first record on
                    table = (e.site, _TABLE_TAGS[kind])
                    self._tables.setdefault(table, {})[e.key] = str(e.value)
                    self._dirty.add(table)
        except BaseException:
            self._failed = True
            raise

    def flush(self) -> None:
        """Write changed params/tags tables and every pending record, fsync the files and new directories."""
        self._check_open()
        self._recover()
        try:
            self._flush()
        except BaseException:
            self._failed = True
            raise

    def checkpoint(self) -> dict[str, Any]:
        """The state as of the last flush: ``files`` (each event file's path under the base: its length),
        ``tables`` (per site, ``params``/``tags``: next ``version`` and ``rows``), ``sites``, ``scalars``, ``texts``."""
        return _copy(self._committed)

    def resume(self, state: dict[str, Any]) -> None:
        """Go on from ``state`` (a :meth:`checkpoint`, or ``{}``): cut every listed file back to its length,
        delete the job's other event files, and restore tables and counters."""
        self._check_open()
        self._committed = self._parse(state)
        self._resumed = self._failed = True
        self._recover()

    def close(self, status: str) -> dict[str, Any]:
        """Flush what is pending; return where the files are and what was written."""
        if not self._closed and self._base is not None:
            self.flush()
        self._closed = True
        return {
            "log_dir": str(self._base),
            "sites": sorted(self._sites),
            "scalars": self._scalars,
            "texts": self._texts,
            "images": self._images,
            "skipped": self._skipped,
        }

    def _check_open(self) -> None:
        if self._base is None:
            raise RuntimeError("TensorBoardReceiver: open() must be called before write(), flush() or resume()")
        if self._closed:
            raise RuntimeError(f"TensorBoardReceiver for {self._base} is closed")

    def _artifact(self, e: TrackingEvent) -> None:
        """A site's file: a text summary for a text file, an image summary for an image, else skipped."""
        file = self._run_file(e.site)
        suffix = PurePosixPath(e.key).suffix.lower()
        if suffix not in TEXT_FILES + IMAGE_FILES:
            self._skipped += 1
            return
        assert self._blobs is not None
        path = blob_path(self._blobs, e.value)
        if not path.is_file():
            self.set_aside(e, f"file {e.value} is not in the job's spool ({path})")
            return
        data = path.read_bytes()
        if suffix in TEXT_FILES:
            summary = text_pb(e.key, data.decode("utf-8", errors="replace"))
            self._texts += 1
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
            picture = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=data)
            summary = Summary(value=[Summary.Value(tag=e.key, image=picture)])
            self._images += 1
        file.add(Event(wall_time=e.timestamp / 1000, step=0, summary=summary))

    def _run_file(self, stream: str) -> _EventFile:
        """The event file of a record stream: a site's run, or a child run ``<site>/<name>`` as its sub-run."""
        site, _, child = _split(stream)
        return self._file(site, child.replace("/", "_") or None)

    def _scalar(self, e: TrackingEvent) -> None:
        site, _, child = _split(e.site)
        if e.group:
            # add_scalars: series ``main_tag/k`` lives in sub-run ``<main_tag>_<k>`` under tag main_tag
            series = e.key[len(e.group) + 1 :] if e.key.startswith(e.group + "/") else e.key
            sub_run = f"{e.group.replace('/', '_')}_{series}"
            file, tag = self._file(site, f"{child.replace('/', '_')}_{sub_run}" if child else sub_run), e.group
        else:
            file, tag = self._run_file(e.site), e.key
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=e.value)])
        file.add(Event(wall_time=e.timestamp / 1000, step=e.step or 0, summary=summary))
        self._scalars += 1

    def _file(self, site: str, sub_run: str | None = None) -> _EventFile:
        """The event file of ``site`` (or of its sub-run), started with a file_version event if new."""
        run = site if sub_run is None else f"{site}/{sub_run}"
        file = self._files.get(run)
        if file is None:
            if site not in self._sites:
                _check_site(site)
                self._sites.add(site)
            assert self._base is not None
            stamp = int(time.time())
            while (self._base / run / self._file_name(stamp)).exists():  # a file of an earlier life, not resumed
                stamp += 1
            file = self._files[run] = _EventFile(f"{run}/{self._file_name(stamp)}", 0, on_disk=False)
            file.add(
                Event(
                    wall_time=time.time(), file_version="brain.Event:2", source_metadata=SourceMetadata(writer="fl_ray")
                )
            )
        return file

    def _file_name(self, stamp: int) -> str:
        return f"events.out.tfevents.{stamp:010d}.fl_ray.{self._job_tag}"

    def _flush(self) -> None:
        assert self._base is not None
        now = time.time()
        for site, tag in sorted(self._dirty):
            table = _markdown_table(("name", "value"), sorted(self._tables[site, tag].items()))
            version = self._versions.get((site, tag), 0)
            self._run_file(site).add(Event(wall_time=now, step=version, summary=text_pb(tag, table)))
            self._versions[site, tag] = version + 1
        self._dirty.clear()
        new_entries: set[Path] = set()  # directories whose entries changed: fsynced once the files are
        for file in self._files.values():
            data = file.pending.getvalue()
            if not data:
                continue
            path = self._base / file.path
            if not file.on_disk:
                new_entries |= _make_dirs(path.parent)
            file.length = _append_durably(path, data, file.length)
            file.on_disk = True
            file.pending = io.BytesIO()
        for directory in new_entries:
            _fsync_dir(directory)
        self._committed = self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        tables: dict[str, dict[str, Any]] = {}
        for (site, tag), rows in sorted(self._tables.items()):
            tables.setdefault(site, {})[tag] = {"version": self._versions.get((site, tag), 0), "rows": dict(rows)}
        return {
            "files": {f.path: f.length for f in self._files.values() if f.on_disk},
            "tables": tables,
            "sites": sorted(self._sites),
            "scalars": self._scalars,
            "texts": self._texts,
            "images": self._images,
            "skipped": self._skipped,
        }

    def _recover(self) -> None:
        """After a failure (or on resume), make the files and the state what the committed checkpoint says."""
        if not self._failed:
            return
        assert self._base is not None
        state = self._committed
        for rel, length in state["files"].items():
            path = self._base / rel
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise RuntimeError(
                    f"TensorBoardReceiver: event file {path} is missing, but {length} bytes of "
                    "delivered records were flushed to it"
                ) from None
            if size < length:
                raise RuntimeError(
                    f"TensorBoardReceiver: event file {path} is {size} bytes, shorter than the "
                    f"{length} bytes of delivered records flushed to it"
                )
            if size > length:
                os.truncate(path, length)
        stale = {self._base / f.path for f in self._files.values() if f.path not in state["files"]}
        if self._resumed:
            stale |= {p for p in self._job_files() if p.relative_to(self._base).as_posix() not in state["files"]}
        for path in stale:
            path.unlink(missing_ok=True)
            _remove_empty_dirs(path.parent, self._base)
        self._files = {
            str(PurePosixPath(rel).parent): _EventFile(rel, length, on_disk=True)
            for rel, length in state["files"].items()
        }
        self._tables = {(site, tag): dict(t["rows"]) for site, ts in state["tables"].items() for tag, t in ts.items()}
        self._versions = {(site, tag): t["version"] for site, ts in state["tables"].items() for tag, t in ts.items()}
        self._dirty.clear()
        self._sites = set(state["sites"])
        self._scalars, self._texts = state["scalars"], state["texts"]
        self._images, self._skipped = state["images"], state["skipped"]
        self._failed = False

    def _job_files(self) -> list[Path]:
        """Every event file of this job under the base directory."""
        assert self._base is not None and self._own_name is not None
        return [
            Path(root, name)
            for root, _, names in os.walk(self._base)
            for name in names
            if self._own_name.fullmatch(name)
        ]

    def _parse(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` checked and completed (``{}``: nothing delivered), or ValueError naming what is wrong."""
        assert self._own_name is not None
        where = f"TensorBoardReceiver for {self._base}: checkpoint"
        if not isinstance(state, dict):
            raise ValueError(f"{where} must be a dict, got {type(state).__name__}")
        files, tables = state.get("files", {}), state.get("tables", {})
        sites, scalars, texts = state.get("sites", []), state.get("scalars", 0), state.get("texts", 0)
        images, skipped = state.get("images", 0), state.get("skipped", 0)
        if not isinstance(files, dict):
            raise ValueError(f"{where} 'files' must map event file paths to lengths, got {files!r:.200}")
        for rel, length in files.items():
            path = PurePosixPath(rel) if isinstance(rel, str) else None
            if (
                path is None
                or path.is_absolute()
                or ".." in path.parts
                or len(path.parts) < 2
                or not self._own_name.fullmatch(path.name)
            ):
                raise ValueError(
                    f"{where} lists {rel!r}, which is not an event file of job {self._job_tag!r} in a run directory"
                )
            if not _count(length):
                raise ValueError(f"{where}: length of {rel!r} must be an integer >= 0, got {length!r}")
        if not isinstance(tables, dict) or not all(
            isinstance(ts, dict)
            and set(ts) <= set(_TABLE_TAGS.values())
            and all(
                isinstance(t, dict) and _count(t.get("version")) and isinstance(t.get("rows"), dict)
                for t in ts.values()
            )
            for ts in tables.values()
        ):
            raise ValueError(
                f"{where} 'tables' must map sites to {{'params'/'tags': {{'version': int, 'rows': "
                f"dict}}}}, got {tables!r:.200}"
            )
        if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
            raise ValueError(f"{where} 'sites' must be a list of site names, got {sites!r:.200}")
        if not all(_count(n) for n in (scalars, texts, images, skipped)):
            raise ValueError(
                f"{where} 'scalars', 'texts', 'images' and 'skipped' must be integers >= 0, got "
                f"{scalars!r}, {texts!r}, {images!r} and {skipped!r}"
            )
        return {
            "files": dict(files),
            "tables": _copy(tables),
            "sites": list(sites),
            "scalars": scalars,
            "texts": texts,
            "images": images,
            "skipped": skipped,
        }


def _append_durably(path: Path, data: bytes, length: int) -> int:
    """Append ``data`` to ``path`` (created if missing), which must be ``length`` bytes long, and fsync it.

    Returns the new length.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size != length:
            raise RuntimeError(
                f"TensorBoardReceiver: event file {path} is {size} bytes, expected {length}: "
                "it was changed outside this receiver"
            )
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return length + len(data)


def _make_dirs(directory: Path) -> set[Path]:
    """Create ``directory`` and missing parents; the directories whose entries changed (to fsync), itself included."""
    changed = {directory}
    missing = directory
    while not missing.exists():
        changed.add(missing.parent)
        missing = missing.parent
    directory.mkdir(parents=True, exist_ok=True)
    return changed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_empty_dirs(directory: Path, base: Path) -> None:
    """Remove ``directory`` and its parents below ``base`` while they are empty."""
    while directory != base and base in directory.parents:
        try:
            directory.rmdir()
        except OSError:  # not empty (or already gone): stop here
            return
        directory = directory.parent


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a checkpoint-shaped dict that shares no dicts or lists with it."""
    return {k: _copy(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v for k, v in state.items()}


def _split(stream: Any) -> tuple[str, str, str]:
    """A record stream's site and child run (``<site>/<name>``), refusing a stream no directory can name."""
    if not isinstance(stream, str) or any(part in ("", ".", "..") for part in stream.split("/")):
        raise ValueError(f"TensorBoardReceiver: site {stream!r} cannot name a directory")
    return stream.partition("/")


def _check_site(site: Any) -> None:
    if not isinstance(site, str) or not site or site in (".", "..") or "/" in site or "\\" in site:
        raise ValueError(f"TensorBoardReceiver: site {site!r} cannot name a directory")


def _markdown_table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in rows]
    return "\n".join(lines)
