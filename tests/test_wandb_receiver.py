"""WandBReceiver against real offline W&B runs, read back from their run files with tests/wandb_reader.

Site processes are slow to start, so one receiver runs a whole job (two sites) once per module and
the tests check what it left behind; failing and hanging site processes get a receiver each.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from fl_ray.receivers.base import FAILED, FINISHED, ReceiverContext
from fl_ray.receivers.wandb import RESERVED_KEYS, WandBReceiver
from fl_ray.tracking.events import EventKind, TrackingEvent
from wandb_reader import WandbRun, read_runs

M, P, G, X = EventKind.METRIC, EventKind.PARAM, EventKind.TAG, EventKind.TEXT
_seq: dict[str, int] = {}


def _ev(site: str, kind: EventKind, key: str, value, step=None, group=None) -> TrackingEvent:
    seq = _seq[site] = _seq.get(site, -1) + 1
    return TrackingEvent(site, seq, kind, key, value, step, 1_700_000_000_000 + seq, group)


def _ctx(job_dir: Path) -> ReceiverContext:
    return ReceiverContext(job_id="job-7", job_name="fl-wandb-test", job_dir=job_dir, workspace=job_dir.parent,
                           sites=("site-1", "site-2"), config={})


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
    first = [_ev("site-1", P, "lr", "0.01"), _ev("site-1", M, "loss", 1.5, 5), _ev("site-1", M, "acc", 0.5, 5),
             _ev("site-1", M, "loss", 2.5, 2), _ev("site-1", X, "report", "round one", 1),
             _ev("site-1", G, "phase", "train"), _ev("site-2", M, "loss", 3.0, 0),
             _ev("site-2", M, "loss/train", 0.25, 1, group="loss"), _ev("site-2", M, "loss/val", 0.75, 1, group="loss")]
    second = [_ev("site-1", P, "batch.size", "32"), _ev("site-1", G, "phase", "eval"), _ev("site-1", M, "loss", 0.5, 6),
              _ev("site-2", X, "model/summary.txt", "two layers"),
              # names W&B fills itself: counted, never logged; site-3 has nothing else, so gets no run
              _ev("site-1", M, "fl_step", 7.0, 6), _ev("site-2", X, "_timestamp", "when", 2),
              _ev("site-1", M, "fl_step", 8.0, 7), _ev("site-3", M, "_runtime", 1.0, 0)]
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
        rx.write(second)
        rx.write(second + third)  # a retry after a failed flush: `second` must not be logged twice
        summary = rx.close(FINISHED)
    finally:
        logging.getLogger("fl_ray.receivers.wandb").removeHandler(handler)
    return SimpleNamespace(summary=summary, runs=read_runs(job_dir / "wandb"), events=first + second + third,
                           after_flush=after_flush, warnings=warnings)


def _rows(run: WandbRun) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in run.history]


def test_one_run_per_site_named_and_grouped(job):
    """Each site has its own run named after it, grouped by job id, in the job-named project, finished."""
    summary, runs = job.summary, job.runs
    assert sorted(runs) == ["site-1", "site-2"]
    for name, run in runs.items():
        assert (run.name, run.group, run.project, run.exit_code) == (name, "job-7", "fl-wandb-test", 0)
        assert summary["runs"][name] == str(run.path.parent)
    assert summary["mode"] == "offline"


def test_flush_returns_once_everything_queued_is_logged(job):
    """When flush() returns, each site process has handed every record it was sent to wandb."""
    assert job.after_flush == {"site-1": (6, 6), "site-2": (3, 3)}


def test_history_keeps_lower_steps_in_order(job):
    """Metrics at one step share a row; a lower step after a higher one is kept, in arrival order."""
    runs = job.runs
    metrics = [r for r in _rows(runs["site-1"]) if "report" not in r]
    assert metrics == [{"fl_step": 5, "loss": 1.5, "acc": 0.5}, {"fl_step": 2, "loss": 2.5},
                       {"fl_step": 6, "loss": 0.5}]
    assert _rows(runs["site-2"])[:2] == [{"fl_step": 0, "loss": 3.0},
                                         {"fl_step": 1, "loss/train": 0.25, "loss/val": 0.75}]


def test_params_and_tags_in_config(job):
    """Params are config entries; tags are config entries under 'tags/', a later value replacing."""
    runs = job.runs
    assert runs["site-1"].config == {"lr": "0.01", "batch.size": "32", "tags/phase": "eval"}
    assert runs["site-2"].config == {}


def test_texts_are_tables_at_their_step(job):
    """A text is a one-row table (step, text) logged under its key at its step, 0 when it has none."""
    runs = job.runs
    for site, key, step, text in (("site-1", "report", 1, "round one"),
                                   ("site-2", "model/summary.txt", 0, "two layers")):
        run = runs[site]
        [row] = [r for r in run.history if key in r]
        assert row["fl_step"] == step and row[key]["_type"] == "table-file"
        table = json.loads((run.path.parent / "files" / row[key]["path"]).read_text())
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
    assert job.summary["dropped"] == {"site-1": {"fl_step": 2}, "site-2": {"_timestamp": 1},
                                      "site-3": {"_runtime": 1}}
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
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install wandb"):
        WandBReceiver()
