"""TensorBoardReceiver against real event files, read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

import json
import os
import random
import re
import struct
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.util import tensor_util

from fl_ray.receivers import tensorboard as tb_module
from fl_ray.receivers.base import FINISHED, ReceiverContext
from fl_ray.receivers.tensorboard import TensorBoardReceiver
from fl_ray.tracking.events import EventKind, TrackingEvent

T0 = 1_700_000_000_000  # ms


def _ctx(tmp_path: Path) -> ReceiverContext:
    return ReceiverContext(
        job_id="job-1",
        job_name="tb-test",
        job_dir=tmp_path / "job",
        workspace=tmp_path,
        sites=("site-1", "site-2"),
        config={},
    )


def _ev(site: str, seq: int, kind: EventKind, key: str, value, step=None, group=None) -> TrackingEvent:
    return TrackingEvent(site, seq, kind, key, value, step, T0 + seq * 1000, group)


def _load(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float, float]]:
    """(step, value, wall time) of each point; test values are exact in float32, as TensorBoard stores them."""
    return [(s.step, s.value, s.wall_time) for s in acc.Scalars(tag)]


def _texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(t.step, tensor_util.make_ndarray(t.tensor_proto).item().decode()) for t in acc.Tensors(tag)]


M, P, G, X = EventKind.METRIC, EventKind.PARAM, EventKind.TAG, EventKind.TEXT


def test_scalars_per_site_with_step_and_walltime(tmp_path):
    """Every metric lands in its site's run at its step, value and wall time, lower steps included."""
    rx = TensorBoardReceiver()
    rx.open(_ctx(tmp_path))
    rx.write(
        [
            _ev("site-1", 0, M, "loss", 0.875, 0),
            _ev("site-2", 0, M, "loss", 0.625, 0),
            _ev("site-1", 1, M, "loss", 0.5, 5),
        ]
    )
    rx.write([_ev("site-1", 2, M, "loss", 0.75, 3), _ev("site-2", 1, M, "val/acc", 0.25, 1)])
    summary = rx.close(FINISHED)

    base = tmp_path / "job" / "tb_events"
    assert summary == {
        "log_dir": str(base),
        "sites": ["site-1", "site-2"],
        "scalars": 5,
        "texts": 0,
        "images": 0,
        "skipped": 0,
    }
    s1, s2 = _load(base / "site-1"), _load(base / "site-2")
    assert _scalars(s1, "loss") == [(0, 0.875, 1_700_000_000.0), (5, 0.5, 1_700_000_001.0), (3, 0.75, 1_700_000_002.0)]
    assert _scalars(s2, "loss") == [(0, 0.625, 1_700_000_000.0)]
    assert _scalars(s2, "val/acc") == [(1, 0.25, 1_700_000_001.0)]
    assert s1.Tags()["scalars"] == ["loss"]


def test_add_scalars_layout(tmp_path):
    """add_scalars series go where torch puts them: sub-run <site>/<main_tag, '/' as '_'>_<series>, tag main_tag."""
    rx = TensorBoardReceiver(log_dir=str(tmp_path / "tb"))
    rx.open(_ctx(tmp_path))
    rx.write(
        [
            _ev("site-1", 0, M, "loss/train", 1.0, 2, group="loss"),
            _ev("site-1", 1, M, "loss/val", 2.0, 2, group="loss"),
            _ev("site-1", 2, M, "eval/acc/top1", 0.5, 4, group="eval/acc"),
        ]
    )
    rx.close(FINISHED)

    site = tmp_path / "tb" / "site-1"
    assert sorted(p.name for p in site.iterdir() if p.is_dir()) == ["eval_acc_top1", "loss_train", "loss_val"]
    assert _scalars(_load(site / "loss_train"), "loss") == [(2, 1.0, 1_700_000_000.0)]
    assert _scalars(_load(site / "loss_val"), "loss") == [(2, 2.0, 1_700_000_001.0)]
    assert _scalars(_load(site / "eval_acc_top1"), "eval/acc") == [(4, 0.5, 1_700_000_002.0)]
    assert _load(site).Tags()["scalars"] == []


def test_texts_params_and_tags(tmp_path):
    """Texts keep their tag and step (0 when none); params and tags become markdown tables per flush."""
    rx = TensorBoardReceiver()
    rx.open(_ctx(tmp_path))
    rx.write(
        [
            _ev("site-1", 0, X, "report", "round one", 1),
            _ev("site-1", 1, X, "model/summary.txt", "a|b"),
            _ev("site-1", 2, P, "lr", "0.01"),
            _ev("site-1", 3, G, "phase", "train"),
        ]
    )
    rx.flush()
    rx.write([_ev("site-1", 4, P, "batch|size", "32"), _ev("site-1", 5, G, "phase", "eval")])
    rx.close(FINISHED)

    acc = _load(tmp_path / "job" / "tb_events" / "site-1")
    assert _texts(acc, "report") == [(1, "round one")]
    assert _texts(acc, "model/summary.txt") == [(0, "a|b")]
    header = "| name | value |\n| --- | --- |\n"
    assert _texts(acc, "params") == [
        (0, header + "| lr | 0.01 |"),
        (1, header + "| batch\\|size | 32 |\n| lr | 0.01 |"),
    ]
    assert _texts(acc, "tags") == [(0, header + "| phase | train |"), (1, header + "| phase | eval |")]


def test_flush_leaves_files_readable_before_close(tmp_path):
    """After flush() returns, everything written so far can be read from disk while writers stay open."""
    rx = TensorBoardReceiver(flush_secs=300)
    rx.open(_ctx(tmp_path))
    rx.write([_ev("site-2", i, M, "loss", float(i), i) for i in range(50)])
    rx.flush()
    acc = _load(tmp_path / "job" / "tb_events" / "site-2")
    assert [s.step for s in acc.Scalars("loss")] == list(range(50))
    rx.write([_ev("site-2", 50, M, "loss", 50.0, 50)])
    rx.close(FINISHED)
    assert len(_load(tmp_path / "job" / "tb_events" / "site-2").Scalars("loss")) == 51


def test_lifecycle_and_bad_input(tmp_path):
    """write before open or after close, a bad flush_secs and a site that is no directory name are refused."""
    with pytest.raises(ValueError, match="flush_secs"):
        TensorBoardReceiver(flush_secs=-1)
    assert TensorBoardReceiver(flush_secs=0).buffer_flush_time == 0.0  # flush_secs is the hub's delivery interval
    rx = TensorBoardReceiver()
    with pytest.raises(RuntimeError, match="open"):
        rx.write([])
    rx.open(_ctx(tmp_path))
    with pytest.raises(ValueError, match=r"'\.\./x'"):
        rx.write([_ev("../x", 0, M, "loss", 1.0, 0)])
    assert rx.close(FINISHED)["sites"] == []
    assert rx.close(FINISHED)["scalars"] == 0  # close twice is safe
    with pytest.raises(RuntimeError, match="closed"):
        rx.write([])


# --- exactly once after a crash ------------------------------------------------------------------------------------
# A "crash" abandons a receiver object without close(); the next life is a new object that opens and resumes from the
# checkpoint saved with the last mark (JSON round trip, as the spool stores it) and is handed every batch past it.


class Killed(BaseException):
    """The receiver's process dies here (nothing catches it, as nothing catches a SIGKILL)."""


class FaultyOS:
    """``os`` for the receiver module, failing at its ``n``-th ``write`` or ``fsync`` call; a failing write puts
    half its bytes on disk first, a failing fsync leaves the bytes written but not synced."""

    def __init__(self, n: int, exc: BaseException) -> None:
        self.n, self.exc, self.fired = n, exc, False

    def __getattr__(self, name: str):
        return getattr(os, name)

    def _due(self) -> bool:
        self.n -= 1
        self.fired = self.fired or self.n == 0
        return self.n == 0

    def write(self, fd: int, data) -> int:
        if self._due():
            os.write(fd, bytes(data[: len(data) // 2]))
            raise self.exc
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self._due():
            raise self.exc
        os.fsync(fd)


@contextmanager
def failing_at(n: int, exc: BaseException | None = None):
    """The receiver's n-th write/fsync from here on fails (with ``Killed`` unless ``exc`` is given)."""
    faulty = FaultyOS(n, exc or Killed())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tb_module, "os", faulty)
        yield faulty


class Delivery:
    """The hub's side: batches from a mark, the checkpoint saved with the mark, a receiver per life."""

    def __init__(self, tmp_path: Path, batches: list[list[TrackingEvent]]) -> None:
        self.tmp_path, self.batches = tmp_path, batches
        self.mark, self.state, self.lives = 0, {}, 0

    def life(self) -> TensorBoardReceiver:
        rx = TensorBoardReceiver(flush_secs=0)
        rx.open(_ctx(self.tmp_path))
        rx.resume(json.loads(json.dumps(self.state)))
        self.lives += 1
        return rx

    def deliver(self, rx: TensorBoardReceiver) -> None:
        """The next batch: write, flush, then save the mark with the checkpoint."""
        rx.write(self.batches[self.mark])
        rx.flush()
        self.saved(rx)

    def saved(self, rx: TensorBoardReceiver) -> None:
        self.state = json.loads(json.dumps(rx.checkpoint()))
        self.mark += 1

    def finish(self) -> dict:
        """A last life delivers the rest and closes."""
        rx = self.life()
        while self.mark < len(self.batches):
            self.deliver(rx)
        return rx.close(FINISHED)


def _records(path: Path) -> list[Event]:
    """Every record of an event file, checked strictly: whole records, good CRCs, nothing after the last."""
    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        assert len(data) - at >= 12, f"{path}: torn record header at byte {at}"
        (length,), (header_crc,) = struct.unpack_from("<Q", data, at), struct.unpack_from("<I", data, at + 8)
        assert header_crc == masked_crc32c(data[at : at + 8]), f"{path}: bad header CRC at byte {at}"
        body = data[at + 12 : at + 12 + length]
        assert len(body) == length and len(data) >= at + 16 + length, f"{path}: torn record at byte {at}"
        assert struct.unpack_from("<I", data, at + 12 + length)[0] == masked_crc32c(body), f"{path}: bad CRC at {at}"
        records.append(Event.FromString(body))
        at += 16 + length
    return records


def _stored(base: Path) -> Counter:
    """(run, tag, step, value) of every scalar and text in the event files under ``base`` (tables included), each
    file checked whole, one event file per run starting with its only file_version event; read back with
    EventAccumulator, which keeps repeated points."""
    stored: Counter = Counter()
    for run_dir in sorted({p.parent for p in base.rglob("*tfevents*")}):
        files = list(run_dir.glob("*tfevents*"))
        assert len(files) == 1, f"{run_dir} holds {len(files)} event files"
        versions = [r.file_version for r in _records(files[0]) if r.file_version]
        assert versions == ["brain.Event:2"] and _records(files[0])[0].file_version, files[0]
        acc, run = _load(run_dir), run_dir.relative_to(base).as_posix()
        stored.update((run, tag, s.step, s.value) for tag in acc.Tags()["scalars"] for s in acc.Scalars(tag))
        stored.update((run, tag, step, text) for tag in acc.Tags()["tensors"] for step, text in _texts(acc, tag))
    return stored


def _three_batches() -> list[list[TrackingEvent]]:
    """A first batch, and two that open new runs (a site, an add_scalars sub-run) and change the params table."""
    return [
        [_ev("site-1", 0, M, "loss", 1.0, 0), _ev("site-1", 1, P, "lr", "0.1"), _ev("site-1", 2, X, "note", "a", 0)],
        [
            _ev("site-1", 3, M, "loss", 2.0, 1),
            _ev("site-2", 0, M, "loss", 3.0, 0),
            _ev("site-1", 4, M, "pair/a", 4.0, 1, group="pair"),
            _ev("site-1", 5, P, "bs", "32"),
            _ev("site-2", 1, G, "phase", "train"),
        ],
        [
            _ev("site-1", 6, M, "loss", 5.0, 2),
            _ev("site-1", 7, M, "pair/b", 6.0, 2, group="pair"),
            _ev("site-2", 2, X, "note", "b", 1),
            _ev("site-2", 3, G, "phase", "eval"),
        ],
    ]


def _reference(tmp_path: Path, batches: list[list[TrackingEvent]]) -> Counter:
    """What one life, never crashing, stores for ``batches``."""
    ref = Delivery(tmp_path / "reference", batches)
    ref.finish()
    return _stored(ref.tmp_path / "job" / "tb_events")


def _check_once(tmp_path: Path, batches: list[list[TrackingEvent]]) -> None:
    stored = _stored(tmp_path / "job" / "tb_events")
    assert max(stored.values()) == 1, [k for k, n in stored.items() if n > 1][:10]
    assert stored == _reference(tmp_path, batches)


HEADER = "| name | value |\n| --- | --- |\n"


def test_checkpoint_lists_flushed_lengths_and_resume_appends_to_the_same_files(tmp_path):
    """checkpoint() is what the last flush made durable; a new life continues the very same files."""
    batches = _three_batches()
    d = Delivery(tmp_path, batches)
    rx = d.life()
    assert rx.checkpoint() == {
        "files": {},
        "tables": {},
        "sites": [],
        "scalars": 0,
        "texts": 0,
        "images": 0,
        "skipped": 0,
    }
    d.deliver(rx)
    rx.write(batches[1])  # not flushed: not in the checkpoint
    base = tmp_path / "job" / "tb_events"
    (name,) = [p.name for p in (base / "site-1").iterdir()]
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\.fl_ray\.job-1", name)
    assert d.state == {
        "files": {f"site-1/{name}": (base / "site-1" / name).stat().st_size},
        "tables": {"site-1": {"params": {"version": 1, "rows": {"lr": "0.1"}}}},
        "sites": ["site-1"],
        "scalars": 1,
        "texts": 1,
        "images": 0,
        "skipped": 0,
    }

    assert d.finish() == {
        "log_dir": str(base),
        "sites": ["site-1", "site-2"],
        "scalars": 6,
        "texts": 2,
        "images": 0,
        "skipped": 0,
    }
    assert [p.name for p in (base / "site-1").iterdir() if p.is_file()] == [name]
    _check_once(tmp_path, batches)
    acc = _load(base / "site-1")
    assert _texts(acc, "params") == [(0, HEADER + "| lr | 0.1 |"), (1, HEADER + "| bs | 32 |\n| lr | 0.1 |")]
    assert _texts(_load(base / "site-2"), "tags") == [
        (0, HEADER + "| phase | train |"),
        (1, HEADER + "| phase | eval |"),
    ]


def test_crash_after_write_before_flush(tmp_path):
    """Records written but never flushed are simply written again by the next life."""
    batches = _three_batches()
    d = Delivery(tmp_path, batches)
    rx = d.life()
    d.deliver(rx)
    rx.write(batches[1])  # crash
    d.finish()
    _check_once(tmp_path, batches)


def test_crash_after_flush_before_the_mark(tmp_path):
    """Flushed past the saved checkpoint: resume cuts the files back and removes the runs that were new since."""
    batches = _three_batches()
    d = Delivery(tmp_path, batches)
    rx = d.life()
    d.deliver(rx)
    rx.write(batches[1])
    rx.flush()  # crash before the mark: site-2 and site-1/pair_a exist on disk, past the checkpoint
    base = tmp_path / "job" / "tb_events"
    assert (base / "site-2").is_dir() and (base / "site-1" / "pair_a").is_dir()
    d.life()  # resumes and crashes at once
    ((rel, length),) = d.state["files"].items()
    assert sorted(p.relative_to(base).as_posix() for p in base.rglob("*")) == ["site-1", rel]
    assert (base / rel).stat().st_size == length
    d.finish()
    _check_once(tmp_path, batches)


@pytest.mark.parametrize("n", range(1, 11))
def test_crash_in_the_middle_of_a_flush(tmp_path, n):
    """Killed at each of the 10 writes and fsyncs of a flush that appends to three files (two of them new, in new
    directories, so four directories get fsynced): whatever reached the files (a torn record, records never
    fsynced, files whose directory entries were never synced) is cut back, then written once."""
    batches = _three_batches()
    d = Delivery(tmp_path, batches)
    rx = d.life()
    d.deliver(rx)
    rx.write(batches[1])
    with failing_at(n) as faulty, pytest.raises(Killed):
        rx.flush()
    assert faulty.fired
    rx = d.life()
    d.deliver(rx)
    rx.write(batches[2])
    with failing_at(n) as faulty:
        try:
            rx.flush()
        except Killed:
            pass
        else:
            d.saved(rx)  # this flush has fewer calls than n: it completed and the mark moved
    d.finish()
    _check_once(tmp_path, batches)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_crash_during_close(tmp_path, n):
    """close() flushes what is pending; killed in there, the next life cuts it back and delivers it once."""
    batches = _three_batches()
    d = Delivery(tmp_path, batches)
    rx = d.life()
    d.deliver(rx)
    rx.write(batches[1])
    with failing_at(n), pytest.raises(Killed):
        rx.close(FINISHED)
    rx = d.life()
    d.deliver(rx)
    d.deliver(rx)
    with failing_at(1):
        assert rx.close(FINISHED)["scalars"] == 6  # nothing pending: close writes nothing, so cannot be killed
    d.finish()
    _check_once(tmp_path, batches)


def test_crash_before_the_first_mark_leaves_nothing_behind(tmp_path):
    """resume({}) removes the job's event files of a life that never got a mark, and only those: other jobs' and
    other writers' event files in the same log_dir stay."""
    log_dir = tmp_path / "shared"
    foreign = [
        log_dir / "site-1" / "events.out.tfevents.1700000000.host.1.0",
        log_dir / "site-1" / "events.out.tfevents.1700000000.fl_ray.other-job",
    ]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"theirs")
    batches = _three_batches()
    for _ in range(2):
        rx = TensorBoardReceiver(flush_secs=0, log_dir=str(log_dir))
        rx.open(_ctx(tmp_path))
        rx.resume({})
        rx.write(batches[0] + batches[1])
        rx.flush()  # no mark saved: crash
        assert len(list(log_dir.rglob("*fl_ray.job-1"))) == 3  # site-1, site-1/pair_a, site-2: never more
    rx = TensorBoardReceiver(flush_secs=0, log_dir=str(log_dir))
    rx.open(_ctx(tmp_path))
    rx.resume({})
    assert sorted(p.relative_to(log_dir).as_posix() for p in log_dir.rglob("*")) == [
        "site-1",
        *sorted(f"site-1/{p.name}" for p in foreign),
    ]
    assert all(p.read_bytes() == b"theirs" for p in foreign)


@pytest.mark.parametrize("resumed", [True, False], ids=["resumed", "never-resumed"])
@pytest.mark.parametrize("n", range(1, 11))
def test_a_failed_flush_is_rolled_back_before_the_retry(tmp_path, n, resumed):
    """The hub retries a batch whose flush raised (a full disk, say) on the same receiver, from the same mark:
    what the failed attempt put on disk is cut back first, so nothing is stored twice (resume() called or not)."""
    batches = _three_batches()
    d = Delivery(tmp_path, batches)
    if resumed:
        rx = d.life()
    else:
        rx = TensorBoardReceiver(flush_secs=0)
        rx.open(_ctx(tmp_path))
    d.deliver(rx)
    rx.write(batches[1])
    with failing_at(n, OSError(28, "No space left on device")), pytest.raises(OSError, match="No space"):
        rx.flush()
    rx.write(batches[1])
    rx.flush()
    d.saved(rx)
    d.deliver(rx)
    rx.close(FINISHED)
    _check_once(tmp_path, batches)


def test_resume_refuses_a_bad_checkpoint_and_damaged_files(tmp_path):
    """A checkpoint that is not this receiver's, or files shorter than it says, are errors naming what and where."""
    d = Delivery(tmp_path, _three_batches())
    rx = d.life()
    d.deliver(rx)
    rel = next(iter(d.state["files"]))
    rx = TensorBoardReceiver()
    rx.open(_ctx(tmp_path))
    for bad, match in [
        ({"files": {"../x/events.out.tfevents.1.fl_ray.job-1": 0}}, r"'\.\./x/"),
        ({"files": {"site-1/events.out.tfevents.1.other": 0}}, "not an event file of job 'job-1'"),
        ({"files": {rel: -1}}, "length of"),
        ({"tables": {"site-1": {"params": {}}}}, "'tables'"),
        ({"scalars": "3"}, "'scalars'"),
    ]:
        with pytest.raises(ValueError, match=match):
            rx.resume(bad)
    path = tmp_path / "job" / "tb_events" / rel
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(path))} is \d+ bytes, shorter than"):
        rx.resume({**d.state, "files": {rel: d.state["files"][rel] + 1}})
    path.unlink()
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(path))} is missing"):
        rx.resume(d.state)


def _heavy_batches(rng: random.Random, records: int) -> list[list[TrackingEvent]]:
    """Seeded heavy logging from four sites: scalars, add_scalars groups, texts, params and tags, in batches of
    1 to 400 records."""
    sites = ["site-1", "site-2", "site-3", "server"]
    seqs = dict.fromkeys(sites, 0)
    steps: Counter = Counter()
    events = []
    for _ in range(records):
        site, roll = rng.choice(sites), rng.random()
        if roll < 0.7:
            key, group = rng.choice(["loss", "acc", "val/loss", "lr"]), None
        elif roll < 0.85:
            key, group = rng.choice([("pair/a", "pair"), ("pair/b", "pair"), ("eval/acc/top1", "eval/acc")])
        else:
            key, group = None, None
        if key is not None:
            step = steps[site, key]
            steps[site, key] += 1
            event = _ev(site, seqs[site], M, key, rng.randrange(1 << 16) / 256, step, group)
        elif roll < 0.92:
            key = rng.choice(["report", "notes/round"])
            event = _ev(site, seqs[site], X, key, f"text {seqs[site]} | {rng.random()}", steps[site, key])
            steps[site, key] += 1
        else:
            kind = P if roll < 0.97 else G
            event = _ev(site, seqs[site], kind, f"k{rng.randrange(30)}", str(rng.randrange(1000)))
        seqs[site] += 1
        events.append(event)
    batches = []
    while events:
        size = rng.randint(1, 400)
        batches.append(events[:size])
        events = events[size:]
    return batches


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_crashes_under_heavy_logging(tmp_path, seed):
    """Thousands of records delivered through dozens of crashes at random points (after write, after flush,
    killed in a flush or in close, a flush failing and retried in place): every (run, tag, step) is stored
    once and the files hold exactly what one life that never crashed writes."""
    rng = random.Random(seed)
    batches = _heavy_batches(rng, 6000)
    d = Delivery(tmp_path, batches)
    crashes: Counter = Counter()
    rx = d.life()
    while d.mark < len(batches):
        how = rng.choice(["none"] * 4 + ["after write", "after flush", "in flush", "in close", "failed flush"])
        rx.write(batches[d.mark])
        try:
            if how == "after write":
                raise Killed
            if how == "failed flush":
                with failing_at(rng.randint(1, 12), OSError(5, "I/O error")):
                    try:
                        rx.flush()
                    except OSError:
                        crashes[how] += 1
                        rx.write(batches[d.mark])  # the hub retries from the same mark, same receiver
                        rx.flush()
            elif how in ("in flush", "in close"):
                with failing_at(rng.randint(1, 12)):
                    rx.flush() if how == "in flush" else rx.close(FINISHED)
            else:
                rx.flush()
            if how == "after flush":
                raise Killed
            if how == "in close":  # close had nothing left to kill: it finished, the mark never moved
                raise Killed
        except Killed:
            crashes[how] += 1
            rx = d.life()
            continue
        d.saved(rx)
    rx.close(FINISHED)

    assert sum(crashes.values()) >= 20 and len(crashes) == 5, crashes
    stored = _stored(tmp_path / "job" / "tb_events")
    assert max(stored.values()) == 1
    assert sum(1 for run, tag, *_ in stored if tag not in ("params", "tags", "report", "notes/round")) == sum(
        1 for b in batches for e in b if e.kind is M
    )
    assert stored == _reference(tmp_path, batches)
    params = {e.key: e.value for b in batches for e in b if e.site == "site-2" and e.kind is P}
    last = max((k for k in stored if k[:2] == ("site-2", "params")), key=lambda k: k[2])
    assert last[3] == HEADER + "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))


def test_files_become_texts_and_images_and_a_missing_file_is_set_aside(tmp_path):
    """A text file is a text summary, an image an image summary, a model and other files are skipped, and a
    record whose file is not in the spool is set aside (a replay after the files were removed)."""
    import hashlib
    import io

    from PIL import Image

    from fl_ray.tracking.spool import Spool

    spool = Spool(tmp_path / "job" / "spool")
    png = io.BytesIO()
    Image.new("RGB", (3, 2), "red").save(png, format="PNG")
    blobs = {}
    for name, data in {"notes.md": b"# hi", "plot.png": png.getvalue(), "data.bin": b"\0"}.items():
        blobs[name] = hashlib.sha256(data).hexdigest()
        spool.put_chunk(blobs[name], 0, data, len(data))
    rx = TensorBoardReceiver(flush_secs=0)
    rx.open(_ctx(tmp_path))
    gone = _ev("site-1", 3, EventKind.ARTIFACT, "old.txt", "0" * 64)
    rx.write(
        [
            _ev("site-1", 0, EventKind.ARTIFACT, "docs/notes.md", blobs["notes.md"]),
            _ev("site-1", 1, EventKind.ARTIFACT, "plots/plot.png", blobs["plot.png"]),
            _ev("site-1", 2, EventKind.ARTIFACT, "data.bin", blobs["data.bin"]),
            gone,
            _ev("site-1", 4, EventKind.MODEL, "model", json.dumps({"files": {}})),
        ]
    )
    rx.flush()
    assert [(e, reason.split(" (")[0]) for e, reason in rx.take_set_aside()] == [
        (gone, f"file {'0' * 64} is not in the job's spool")
    ]
    summary = rx.close(FINISHED)
    assert (summary["texts"], summary["images"], summary["skipped"]) == (1, 1, 2)
    acc = EventAccumulator(str(tmp_path / "job" / "tb_events" / "site-1"), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    assert acc.Tags()["tensors"] == ["docs/notes.md"] and acc.Tags()["images"] == ["plots/plot.png"]
    [image] = acc.Images("plots/plot.png")
    assert (image.width, image.height, image.encoded_image_string) == (3, 2, png.getvalue())
