#!/usr/bin/env python3
"""Benchmark: the spool's format against SQLite in WAL mode, for the same records and batches.

Appends B batches of N metric records, each batch made durable before the next (as the receiver actor
does before it acknowledges), then reads everything back; once with fl_ray's spool (one checksummed
JSON line per record, ``fdatasync`` per batch) and once with SQLite (WAL, ``synchronous=FULL``, one
transaction per batch, one row per record). Prints records per second for both and their ratio; the
last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.spool import Spool


def batches(count: int, size: int) -> list[list[TrackingEvent]]:
    return [
        [
            TrackingEvent(
                f"site-{b % 8}", b * size + i, EventKind.METRIC, "train/loss", 0.5 + i * 1e-3, i, 1_700_000_000_000 + i
            )
            for i in range(size)
        ]
        for b in range(count)
    ]


def spool_run(root: Path, data: list[list[TrackingEvent]]) -> tuple[float, float]:
    spool = Spool(root / "spool")
    start = time.perf_counter()
    for batch in data:
        spool.append(batch)
    wrote = time.perf_counter() - start
    start = time.perf_counter()
    read = sum(1 for _ in spool)
    spool.close()
    assert read == sum(map(len, data))
    return wrote, time.perf_counter() - start


def sqlite_run(root: Path, data: list[list[TrackingEvent]]) -> tuple[float, float]:
    db = sqlite3.connect(root / "spool.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, site TEXT, seq INTEGER, kind TEXT, key TEXT, "
        "value, step INTEGER, timestamp INTEGER, grp TEXT)"
    )
    start = time.perf_counter()
    for batch in data:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO events (site, seq, kind, key, value, step, timestamp, grp) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(*e[:2], e.kind.value, *e[3:]) for e in batch],
        )
        db.execute("COMMIT")
    wrote = time.perf_counter() - start
    start = time.perf_counter()
    read = sum(1 for row in db.execute("SELECT * FROM events ORDER BY id") if TrackingEvent(*row[1:]))
    db.close()
    assert read == sum(map(len, data))
    return wrote, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100, help="durable appends; default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=1000, help="records per append; default: %(default)s")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, the median is kept; default: %(default)s")
    args = parser.parse_args(argv)
    data = batches(args.batches, args.batch_size)
    total = args.batches * args.batch_size
    figures = {}
    for name, run in (("spool", spool_run), ("sqlite_wal", sqlite_run)):
        runs = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="fl_ray_bench_spool_") as tmp:
                runs.append(run(Path(tmp), data))
        write, read = sorted(w for w, _ in runs)[len(runs) // 2], sorted(r for _, r in runs)[len(runs) // 2]
        figures[name] = {
            "append_records_per_s": round(total / write),
            "read_records_per_s": round(total / read),
            "ms_per_durable_batch": round(write / args.batches * 1000, 3),
        }
        print(
            f"{name}: append {total / write:,.0f} records/s ({figures[name]['ms_per_durable_batch']} ms per "
            f"synced batch of {args.batch_size}), read {total / read:,.0f} records/s"
        )
    ratio = figures["spool"]["append_records_per_s"] / figures["sqlite_wal"]["append_records_per_s"]
    print(f"spool / SQLite WAL append throughput: {ratio:.2f}x")
    print(json.dumps({"records": total, "batch_size": args.batch_size, **figures, "append_ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
