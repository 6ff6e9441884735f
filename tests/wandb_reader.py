"""Reads offline W&B runs back from their ``run-<id>.wandb`` files, for tests.

wandb 0.31 ships no reader for its transaction log (the old ``wandb.sdk.internal.datastore`` is gone
with the move to wandb-core), so this parses it: a 7-byte file header (``:W&B``, magic 0xBEE1,
version 0), then the LevelDB log format in 32 KiB blocks, each record chunk preceded by a 7-byte
header (IEEE CRC-32 of type byte + payload, payload length, chunk type FULL/FIRST/MIDDLE/LAST).
Each reassembled payload is a ``wandb_internal_pb2.Record``. It is kept apart from the receiver's own
reader (``fl_ray.receivers.wandb.read_records``), as an independent check, and strict: a damaged chunk raises.

A run resumed under the same id (the W&B receiver's segments: one directory per flush and per receiver
life) is read back as one :class:`WandbRun`, its segments in start order.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

_FILE_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    """What a run file holds: identity, config, history rows in logged order, final summary."""

    run_id: str = ""
    name: str = ""
    group: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    path: Path | None = None  # the (last) segment's .wandb file
    started: int = 0  # start time, ns
    segments: list[Path] = field(default_factory=list)  # every segment's .wandb file, in start order

    def file(self, relative: str) -> Path:
        """A run file (a table's JSON, say) by its path under ``files/`` in whichever segment holds it."""
        [found] = [p.parent / "files" / relative for p in self.segments if (p.parent / "files" / relative).exists()]
        return found


def iter_records(path: Path) -> Iterator[pb.Record]:
    """Yield every record of a ``.wandb`` file, checking each chunk's CRC."""
    data = Path(path).read_bytes()
    if data[: len(_FILE_HEADER)] != _FILE_HEADER:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, pending = len(_FILE_HEADER), bytearray()
    while pos + _CHUNK_HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER.size:  # block trailer: zero padding
            pos += room
            continue
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        payload = data[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
        pos += _CHUNK_HEADER.size + length
        if kind == 0 and length == 0:  # preallocated, never written
            continue
        if len(payload) != length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: corrupt chunk ending at byte {pos}")
        if kind in (_FULL, _FIRST):
            pending = bytearray(payload)
        else:
            pending += payload
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(bytes(pending))
            yield record


def read_run(path: Path) -> WandbRun:
    """Replay one run file into a :class:`WandbRun`."""
    run = WandbRun(path=Path(path))
    for record in iter_records(path):
        what = record.WhichOneof("record_type")
        if what == "run":
            r = record.run
            run.run_id, run.name, run.group, run.project = r.run_id, r.display_name, r.run_group, r.project
            run.started = r.start_time.ToNanoseconds()
            _apply(run.config, r.config.update, r.config.remove)
        elif what == "config":
            _apply(run.config, record.config.update, record.config.remove)
        elif what == "history":
            row: dict[str, Any] = {}
            _apply(row, record.history.item, ())
            run.history.append(row)
        elif what == "summary":
            _apply(run.summary, record.summary.update, record.summary.remove)
        elif what == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    run.segments = [run.path]
    return run


def read_runs(wandb_dir: Path) -> dict[str, WandbRun]:
    """Read every ``offline-run-*/run-*.wandb`` under a W&B folder, keyed by run name, the segments of a run
    id merged (history concatenated, config and summary updated, exit code of the last); raises if two run
    ids share a name. A segment whose run record never reached the disk (its life was killed at once) has
    nothing to add and is left out."""
    segments = [read_run(p) for p in Path(wandb_dir).glob("offline-run-*/run-*.wandb")]
    by_id: dict[str, list[WandbRun]] = {}
    for segment in sorted((s for s in segments if s.run_id), key=lambda s: (s.started, s.path.parent.name)):
        by_id.setdefault(segment.run_id, []).append(segment)
    runs: dict[str, WandbRun] = {}
    for parts in by_id.values():
        run = WandbRun(**{**vars(parts[0]), "config": {}, "history": [], "summary": {}, "segments": []})
        for part in parts:
            run.config.update(part.config)
            run.history += part.history
            run.summary.update(part.summary)
            run.exit_code, run.path = part.exit_code, part.path
            run.segments.append(part.path)
        if run.name in runs:
            raise ValueError(f"two W&B runs named {run.name!r}: {runs[run.name].run_id} and {run.run_id}")
        runs[run.name] = run
    return runs


def _apply(target: dict[str, Any], updates: Any, removes: Any) -> None:
    for item in updates:
        path = [item.key] if item.key else list(item.nested_key)
        node = target
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    for item in removes:
        path = [item.key] if item.key else list(item.nested_key)
        node = target
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
