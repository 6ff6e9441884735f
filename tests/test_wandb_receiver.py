"""WandBReceiver against real offline W&B runs, read back from their run files with tests/wandb_reader.

Site processes are slow to start, so one receiver runs a whole job (two sites) once per module and
the tests check what it left behind; failing and hanging site processes get a receiver each. Crashes
are simulated in this process: a receiver abandoned without close at some point of a delivery, its
site processes killed with SIGKILL or left running, then a new one resumed from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import multiprocessing
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from fl_ray.receivers.base import FAILED, FINISHED, ReceiverContext
from fl_ray.receivers.wandb import RESERVED_KEYS, WandBReceiver, run_id
from fl_ray.tracking.events import EventKind, TrackingEvent
from wandb_reader import WandbRun, read_run, read_runs

M, P, G, X = EventKind.METRIC, EventKind.PARAM, EventKind.TAG, EventKind.TEXT
_seq: dict[str, int] = {}


def _ev(site: str, kind: EventKind, key: str, value, step=None, group=None) -> TrackingEvent:
    seq = _seq[site] = _seq.get(site, -1) + 1
    return TrackingEvent(site, seq, kind, key, value, step, 1_700_000_000_000 + seq, group)


def _ctx(job_dir: Path) -> ReceiverContext:
    return ReceiverContext(
        job_id="job-7",
        job_name="fl-wandb-test",
        job_dir=job_dir,
        workspace=job_dir.parent,
        sites=("site-1", "site-2"),
        config={},
    )


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """No credentials, no network, W&B's own config and cache in a temporary home."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
            mp.delenv(name, raising=False)
        for name in ("HOME", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(home))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing answers there
        yield mp


@pytest.fixture(scope="module")
def job(wandb_env, tmp_path_factory):
    """Run one two-site job through a WandBReceiver.

    Returns the close summary, the runs by site, the events sent, (written, sent) per site right
    after the first flush, and the warnings the receiver logged.
    """
    job_dir = tmp_path_factory.mktemp("job")
    first = [
        _ev("site-1", P, "lr", "0.01"),
        _ev("site-1", M, "loss", 1.5, 5),
        _ev("site-1", M, "acc", 0.5, 5),
        _ev("site-1", M, "loss", 2.5, 2),
        _ev("site-1", X, "report", "round one", 1),
        _ev("site-1", G, "phase", "train"),
        _ev("site-2", M, "loss", 3.0, 0),
        _ev("site-2", M, "loss/train", 0.25, 1, group="loss"),
        _ev("site-2", M, "loss/val", 0.75, 1, group="loss"),
    ]
    second = [
        _ev("site-1", P, "batch.size", "32"),
        _ev("site-1", G, "phase", "eval"),
        _ev("site-1", M, "loss", 0.5, 6),
        _ev("site-2", X, "model/summary.txt", "two layers"),
        # names W&B fills itself: counted, never logged; site-3 has nothing else, so gets no run
        _ev("site-1", M, "fl_step", 7.0, 6),
        _ev("site-2", X, "_timestamp", "when", 2),
        _ev("site-1", M, "fl_step", 8.0, 7),
        _ev("site-3", M, "_runtime", 1.0, 0),
    ]
    third = [_ev("site-2", M, "val/acc", i / 1000, 10 + i) for i in range(300)]
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("fl_ray.receivers.wandb").addHandler(handler)
    try:
        rx = WandBReceiver(close_timeout=60)
        rx.open(_ctx(job_dir))
        rx.write(first)
        rx.flush()
        after_flush = {name: (site.written.value, site.sent) for name, site in rx._sites.items()}
        on_disk_after_flush = {name: _rows(run) for name, run in read_runs(job_dir / "wandb").items()}
        rx.write(second)
        rx.write(second + third)  # a retry after a failed flush: `second` must not be logged twice
        summary = rx.close(FINISHED)
    finally:
        logging.getLogger("fl_ray.receivers.wandb").removeHandler(handler)
    return SimpleNamespace(
        summary=summary,
        runs=read_runs(job_dir / "wandb"),
        events=first + second + third,
        after_flush=after_flush,
        on_disk_after_flush=on_disk_after_flush,
        warnings=warnings,
    )


def _rows(run: WandbRun) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in run.history]


def test_one_run_per_site_named_and_grouped(job):
    """Each site has its own run named after it, grouped by job id, in the job-named project, finished."""
    summary, runs = job.summary, job.runs
    assert sorted(runs) == ["site-1", "site-2"]
    for name, run in runs.items():
        assert (run.name, run.group, run.project, run.exit_code) == (name, "job-7", "fl-wandb-test", 0)
        assert summary["runs"][name] == run.run_id == run_id("job-7", name)
    assert summary["mode"] == "offline"


def test_flush_returns_once_everything_written_is_on_disk(job):
    """When flush() returns, every record each site process was sent is in its run's files on disk."""
    assert job.after_flush == {"site-1": (6, 6), "site-2": (3, 3)}
    assert [r.get("loss") for r in job.on_disk_after_flush["site-1"]] == [1.5, 2.5, None]
    assert job.on_disk_after_flush["site-2"] == [
        {"fl_step": 0, "loss": 3.0},
        {"fl_step": 1, "loss/train": 0.25, "loss/val": 0.75},
    ]


def test_history_keeps_lower_steps_in_order(job):
    """Metrics at one step share a row; a lower step after a higher one is kept, in arrival order."""
    runs = job.runs
    metrics = [r for r in _rows(runs["site-1"]) if "report" not in r]
    assert metrics == [
        {"fl_step": 5, "loss": 1.5, "acc": 0.5},
        {"fl_step": 2, "loss": 2.5},
        {"fl_step": 6, "loss": 0.5},
    ]
    assert _rows(runs["site-2"])[:2] == [
        {"fl_step": 0, "loss": 3.0},
        {"fl_step": 1, "loss/train": 0.25, "loss/val": 0.75},
    ]


def test_params_and_tags_in_config(job):
    """Params are config entries; tags are config entries under 'tags/', a later value replacing."""
    runs = job.runs
    assert runs["site-1"].config == {"lr": "0.01", "batch.size": "32", "tags/phase": "eval"}
    assert runs["site-2"].config == {}


def test_texts_are_tables_at_their_step(job):
    """A text is a one-row table (step, text) logged under its key at its step, 0 when it has none."""
    runs = job.runs
    for site, key, step, text in (
        ("site-1", "report", 1, "round one"),
        ("site-2", "model/summary.txt", 0, "two layers"),
    ):
        run = runs[site]
        [row] = [r for r in run.history if key in r]
        assert row["fl_step"] == step and row[key]["_type"] == "table-file"
        table = json.loads(run.file(row[key]["path"]).read_text())
        assert (table["columns"], table["data"]) == (["step", "text"], [[step, text]])


def test_everything_queued_before_close_is_written_once(job):
    """close() lets each process log all it was sent, retried batches only once, and counts it."""
    summary, runs = job.summary, job.runs
    assert [r["fl_step"] for r in _rows(runs["site-2"]) if "val/acc" in r] == list(range(10, 310))
    assert [r.get("loss") for r in _rows(runs["site-1"])].count(0.5) == 1
    per_site = {s: sum(e.site == s and e.key not in RESERVED_KEYS for e in job.events) for s in ("site-1", "site-2")}
    assert summary["written"] == per_site
    assert summary["not_written"] == {} and summary["errors"] == {}


def test_reserved_history_names_are_counted_and_warned_once(job):
    """Metrics and texts named like a column W&B fills (fl_step, _timestamp, ...) are left out, counted
    per site in the close summary, and each name is warned about once; the columns keep their meaning."""
    assert job.summary["dropped"] == {"site-1": {"fl_step": 2}, "site-2": {"_timestamp": 1}, "site-3": {"_runtime": 1}}
    assert sorted(w.split("'")[1] for w in job.warnings) == ["_runtime", "_timestamp", "fl_step"]
    assert all("dropped" in w for w in job.warnings)
    assert [r["fl_step"] for r in job.runs["site-1"].history if "loss" in r] == [5, 2, 6]
    assert all(r["_timestamp"] > 1e9 for run in job.runs.values() for r in run.history)


def test_site_process_error_is_raised_and_reported(wandb_env, tmp_path):
    """A site whose run cannot start (online, no API key) fails flush() and write() by name; close() reports it."""
    rx = WandBReceiver(mode="online", close_timeout=30)
    rx.open(_ctx(tmp_path))
    rx.write([_ev("site-x", M, "loss", 1.0, 0)])
    with pytest.raises(RuntimeError, match=r"site 'site-x': UsageError: .*API key.*\(1 record\(s\) not written\)"):
        rx.flush()
    with pytest.raises(RuntimeError, match="site-x"):
        rx.write([_ev("site-x", M, "loss", 2.0, 1)])
    summary = rx.close(FAILED)
    assert "API key" in summary["errors"]["site-x"]
    assert summary["not_written"] == {"site-x": 1} and summary["written"] == {"site-x": 0}


def test_hung_site_process_is_terminated_and_reported(wandb_env, tmp_path):
    """A site stuck starting its run (server never answers) times flush() out; close() kills it and counts."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    wandb_env.setenv("WANDB_API_KEY", "x" * 40)
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
    try:
        rx = WandBReceiver(mode="online", close_timeout=1.5)
        rx.open(_ctx(tmp_path))
        rx.write([_ev("site-h", M, "loss", float(i), i) for i in range(3)])
        with pytest.raises(TimeoutError, match=r"'site-h' \(3 pending\)"):
            rx.flush()
        summary = rx.close(FINISHED)
        process = rx._sites["site-h"].process
    finally:
        wandb_env.delenv("WANDB_API_KEY")
        wandb_env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
        silent.close()
    assert "terminated" in summary["errors"]["site-h"]
    assert summary["not_written"] == {"site-h": 3}
    assert not process.is_alive()
    assert rx.close(FINISHED) is summary  # close twice is safe


def test_bad_settings_and_missing_wandb(monkeypatch):
    """An unknown mode or a bad close_timeout is refused; without wandb installed the error says to install it."""
    with pytest.raises(ValueError, match="'cloud'"):
        WandBReceiver(mode="cloud")
    with pytest.raises(ValueError, match="close_timeout"):
        WandBReceiver(close_timeout=0)
    with pytest.raises(ValueError, match="buffer_flush_time"):
        WandBReceiver(buffer_flush_time=-0.5)
    with pytest.raises(ValueError, match="max_processes must be a whole number >= 1, got 0"):
        WandBReceiver(max_processes=0)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install wandb"):
        WandBReceiver()


@pytest.mark.slow
def test_at_most_max_processes_site_processes_and_every_run_resumed_whole(wandb_env, tmp_path):
    """Three sites with max_processes=2, each logging in two rounds (round robin; a flush after the first,
    close after the second): never more than two site processes alive, and each site's one run holds all its
    metrics once, in order, its _step counting on across the processes that wrote it."""
    sites = [f"site-{i}" for i in range(1, 4)]
    live, sampling = [0], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            live[0] = max(live[0], sum(p.name.startswith("fl_ray-wandb-") for p in multiprocessing.active_children()))
            time.sleep(0.005)

    events = [_ev(site, M, "loss", float(r * 10 + i), r) for r in range(2) for i, site in enumerate(sites)]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rx = WandBReceiver(close_timeout=60, max_processes=2)
    rx.open(
        ReceiverContext(
            job_id="job-7",
            job_name="fl-wandb-test",
            job_dir=tmp_path,
            workspace=tmp_path,
            sites=tuple(sites),
            config={},
        )
    )
    try:
        for r in range(2):
            for site in sites:
                rx.write([e for e in events if e.site == site and e.step == r])
            if r == 0:
                rx.flush()
                checkpoint = rx.checkpoint()
        summary = rx.close(FINISHED)
    finally:
        sampling.set()
        sampler.join()
    assert live[0] == 2
    assert summary["errors"] == {} and summary["written"] == dict.fromkeys(sites, 2)
    runs = read_runs(tmp_path / "wandb")
    assert sorted(runs) == sites
    for i, site in enumerate(sites):
        assert [(row["fl_step"], row["loss"]) for row in runs[site].history] == [(r, r * 10 + i) for r in range(2)]
        assert [row["_step"] for row in runs[site].history] == [0, 1]
        assert runs[site].run_id == run_id("job-7", site)
    assert checkpoint == {"sites": dict.fromkeys(sites, 1)}


# ---- crashes: a receiver abandoned without close, then a new one resumed from the last checkpoint ----------

SITES = ("site-1", "site-2")
HISTORY = (EventKind.METRIC, EventKind.TEXT)


def _stream(n: int, seed: int) -> list[TrackingEvent]:
    """``n`` records of two sites: metrics (three keys per step, so rows are shared), now and then a text,
    a param whose value changes, or a tag. Every (site, key, step) is unique, so each can be counted."""
    rng, steps, out = random.Random(seed), dict.fromkeys(SITES, 0), []
    for i in range(n):
        site = SITES[rng.random() < 0.4]
        step = steps[site] // 3
        roll = rng.random()
        if roll < 0.03:
            out.append(_ev(site, P, f"p{i % 3}", f"v{i}"))
        elif roll < 0.04:
            out.append(_ev(site, G, "phase", f"t{i}"))
        elif roll < 0.06:
            out.append(_ev(site, X, f"note{i}", f"text {i}", step))
        else:
            out.append(_ev(site, M, ("loss", "acc", "val/loss")[steps[site] % 3], float(i), step))
            steps[site] += 1
    return out


class _Hub:
    """What the hub does for one receiver: deliver from the mark (write, flush, then the mark and the
    receiver's checkpoint together); a crash leaves the mark and checkpoint where they were."""

    def __init__(self, job_dir: Path, events: list[TrackingEvent]) -> None:
        self.job_dir, self.events = job_dir, events
        self.mark, self.state = 0, {}
        self.abandoned: list[WandBReceiver] = []
        self.survivors = 0  # processes of abandoned receivers (or their wandb-core) alive at the end

    def receiver(self) -> WandBReceiver:
        rx = WandBReceiver(close_timeout=60)
        rx.open(_ctx(self.job_dir))
        rx.resume(self.state)
        return rx

    def next_batch(self, size: int) -> list[TrackingEvent]:
        return self.events[self.mark : self.mark + size]

    def deliver(self, rx: WandBReceiver, size: int) -> None:
        batch = self.next_batch(size)
        rx.write(batch)
        rx.flush()
        self.mark += len(batch)
        self.state = json.loads(json.dumps(rx.checkpoint()))  # saved as JSON with the mark

    def crash(self, rx: WandBReceiver, how: str, point: str, size: int, rng: random.Random) -> None:
        """Abandon ``rx`` at ``point`` (after_write, after_flush, during_flush, during_close) of the next
        batch, its site processes killed with SIGKILL or left running (``how``)."""
        rx.write(self.next_batch(size))
        if point == "after_flush":
            rx.flush()
        elif point in ("during_flush", "during_close"):
            call = rx.flush if point == "during_flush" else lambda: rx.close(FINISHED)
            threading.Thread(target=_quietly, args=(call,), daemon=True).start()
            time.sleep(rng.uniform(0.0, 0.3))
        if how == "sigkill":
            for site in rx._sites.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(site.process.pid, signal.SIGKILL)
        self.abandoned.append(rx)

    def finish(self, rx: WandBReceiver, size: int) -> dict[str, Any]:
        """Deliver the rest, close, and count (then kill) what is left of the abandoned receivers."""
        while self.mark < len(self.events):
            self.deliver(rx, size)
        summary = rx.close(FINISHED)
        pids = {str(site.process.pid) for old in self.abandoned for site in old._sites.values()}
        cmds = {p: p.info["cmdline"] or [] for p in psutil.process_iter(["cmdline"])}
        cores = [
            p
            for p, cmd in cmds.items()
            if "--pid" in cmd[:-1] and "wandb-core" in cmd[0] and cmd[cmd.index("--pid") + 1] in pids
        ]
        for core in cores:
            with contextlib.suppress(psutil.Error):
                self.survivors += core.status() != psutil.STATUS_ZOMBIE  # killed, not yet reaped by init
                core.kill()
        for old in self.abandoned:  # anything a successor had no reason to take over
            for site in old._sites.values():
                self.survivors += site.process.is_alive()
                site.process.kill()
                site.process.join()
        return summary


def _quietly(call) -> None:
    with contextlib.suppress(Exception):
        call()


def _assert_every_record_once(job_dir: Path, events: list[TrackingEvent]) -> None:
    """Each site has one run id, whose segments hold each of its metrics and texts once, in delivery order,
    with W&B's _step counting on across segments, and its params' and tags' last values as config."""
    runs = read_runs(job_dir / "wandb")  # raises if two run ids share a site's name
    ids = {read_run(p).run_id for p in (job_dir / "wandb").glob("*/run-*.wandb")} - {""}
    assert ids == {run_id("job-7", site) for site in SITES}
    for site in SITES:
        run = runs[site]
        mine = [e for e in events if e.site == site and e.kind in HISTORY]
        want = {(e.key, e.step or 0): (i, e.value) for i, e in enumerate(mine)}  # (key, step) -> (order, value)
        got = [
            [(k, row["fl_step"], v) for k, v in row.items() if k[0] != "_" and k != "fl_step"] for row in run.history
        ]
        counts = Counter((k, s) for row in got for k, s, _ in row)
        twice = sorted(item for item, n in counts.items() if n > 1)
        missing = sorted(set(want) - set(counts))
        assert not twice and not missing, (
            f"{site}: {len(twice)} twice {twice[:5]}, {len(missing)} missing {missing[:5]}"
        )
        # in delivery order (W&B keeps no order of the keys within a row)
        assert [i for row in got for i in sorted(want[k, s][0] for k, s, _ in row)] == list(range(len(want)))
        assert all(v == want[k, s][1] for row in got for k, s, v in row if isinstance(v, float))
        assert [row["_step"] for row in run.history] == list(range(len(run.history)))
        config = {
            (e.key if e.kind == P else f"tags/{e.key}"): e.value for e in events if e.site == site and e.kind in (P, G)
        }
        assert run.config == config


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, how",
    [
        ("after_write", "sigkill"),
        ("after_flush", "left_running"),
        ("during_flush", "sigkill"),
        ("during_close", "left_running"),
    ],
)
def test_crash_then_resume_writes_every_record_once(wandb_env, tmp_path, point, how):
    """A receiver abandoned at ``point`` (its site processes killed or left running) and a new one resumed
    from the last checkpoint: each site's one run holds every metric and text once, in order; the records
    the old run already held are skipped, not written again. (Every point with either kind of crash is in the
    randomized test below.)"""
    events = _stream(600, seed=len(point) + len(how))
    hub, rng = _Hub(tmp_path, events), random.Random(1)
    rx = hub.receiver()
    hub.deliver(rx, 200)
    hub.crash(rx, how, point, 250, rng)
    summary = hub.finish(hub.receiver(), 250)
    _assert_every_record_once(tmp_path, events)
    assert hub.survivors == 0  # the new receiver's site processes killed the old ones and their wandb-core
    assert summary["errors"] == {} and summary["not_written"] == {} and summary["lost"] == {}
    assert sorted(summary["runs"]) == list(SITES)
    if point == "after_flush":  # everything past the mark was on disk already
        assert sum(summary["skipped"].values()) == sum(e.kind in HISTORY for e in events[200:450])


@pytest.mark.slow
def test_repeated_crashes_at_random_points_under_heavy_logging(wandb_env, tmp_path):
    """Seeded: 6,000 records delivered in batches of 50-600 by receivers that crash six times at random
    points (this seed: each point, after a write, after a flush before its mark, during a flush, during
    close, their site processes killed or left running); every record ends in its site's one run once."""
    rng = random.Random(11)
    events = _stream(6000, seed=7)
    hub = _Hub(tmp_path, events)
    for _ in range(6):
        rx = hub.receiver()
        for _ in range(rng.randrange(0, 4)):
            hub.deliver(rx, rng.randrange(50, 600))
        how = rng.choice(["sigkill", "left_running"])
        hub.crash(
            rx,
            how,
            rng.choice(["after_write", "after_flush", "during_flush", "during_close"]),
            rng.randrange(50, 600),
            rng,
        )
    summary = hub.finish(hub.receiver(), 600)
    assert hub.mark == len(events)
    _assert_every_record_once(tmp_path, events)
    assert hub.survivors == 0 and summary["errors"] == {} and summary["lost"] == {}


def test_a_late_process_of_an_older_receiver_never_takes_the_run(wandb_env, tmp_path):
    """A site process of a receiver that died while it was starting reaches the run's lock after the new
    receiver's process owns it: it quits (superseded) instead of killing the owner or writing."""
    old, new = WandBReceiver(close_timeout=60), WandBReceiver(close_timeout=60)
    old.open(_ctx(tmp_path))  # opened first: an older receiver life
    new.open(_ctx(tmp_path))
    new.write([_ev("site-1", M, "loss", 1.0, 1)])
    new.flush()
    old.write([_ev("site-1", M, "loss", 9.0, 9)])
    with pytest.raises(RuntimeError, match="superseded"):
        old.flush()
    new.write([_ev("site-1", M, "loss", 2.0, 2)])
    new.flush()
    assert new.close(FINISHED)["errors"] == {}
    old.close(FAILED)
    assert _rows(read_runs(tmp_path / "wandb")["site-1"]) == [{"fl_step": 1, "loss": 1.0}, {"fl_step": 2, "loss": 2.0}]
