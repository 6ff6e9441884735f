"""The spool under damage and a full disk: acknowledged means durable, damage costs only itself, marks
never point past the data. Faults are real: bytes flipped or cut in the file, a real file-size limit."""

import json
import math
import subprocess
import sys
import textwrap
import time

from fl_ray.receivers.base import MemoryReceiver, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.hub import TrackingHub
from fl_ray.tracking.state import SiteState
from fl_ray.tracking.spool import EVENTS_FILE, Spool, load_progress, spool_report, spooled_events

from conftest import REPO


def ctx(tmp_path, life="first"):
    return ReceiverContext(
        job_id="job-1", job_name="job", job_dir=tmp_path, workspace=tmp_path, sites=("site-1",), config={}, life=life
    )


def metric(seq, step=None, value=1.0, key="loss", site="site-1"):
    return TrackingEvent(
        site, seq, EventKind.METRIC, key, value, seq if step is None else step, 1_700_000_000_000 + seq
    )


def spool_file(tmp_path):
    return tmp_path / "spool" / EVENTS_FILE


def counts(entry):
    return {k: entry[k] for k in ("delivered", "undelivered")}


def delivered_once(hub, sink, expected, timeout=10.0):
    report = hub.close("FINISHED", timeout=timeout)
    assert sorted(e.seq for e in sink.events) == sorted(expected)
    return report


def test_records_round_trip_with_odd_values(tmp_path):
    """NaN, infinities, newlines, quotes and non-ASCII text come back as they went in."""
    events = [
        metric(0, value=math.nan),
        metric(1, value=math.inf),
        metric(2, value=-math.inf),
        TrackingEvent("site-1", 3, EventKind.TEXT, "notes.txt", 'line 1\n"quoted"\tß ✓', None, 5, None),
        TrackingEvent("site-1", 4, EventKind.METRIC, "grp/a", 2.5, 7, 6, "grp"),
    ]
    spool = Spool(tmp_path)
    spool.append(events)
    back = list(Spool(tmp_path))
    assert math.isnan(back[0].value) and back[1].value == math.inf and back[2].value == -math.inf
    assert back[3:] == events[3:] and all(isinstance(e.kind, EventKind) for e in back)
    assert (tmp_path / EVENTS_FILE).read_bytes().count(b"\n") == 5  # one line per record, newlines escaped


def test_every_append_is_synced_before_it_returns(tmp_path):
    """Each accepted batch costs one sync (group commit), counted for the benchmarks."""
    hub = TrackingHub(ctx(tmp_path), [])
    for i in range(5):
        hub.submit("site-1", [metric(10 * i + j) for j in range(10)])
    hub.submit("site-1", [metric(0)])  # a duplicate only: nothing to store, no sync
    status = hub.status()["spool"]
    assert status["syncs"] == 5 and status["records"] == 50 and status["sync_seconds"] > 0


def test_a_torn_tail_is_cut_off_and_appends_continue(tmp_path):
    """A last record cut short by a crash (never acknowledged) is dropped; the whole ones stay."""
    spool = Spool(tmp_path)
    spool.append([metric(0), metric(1)])
    spool.close()
    data = (tmp_path / EVENTS_FILE).read_bytes()
    (tmp_path / EVENTS_FILE).write_bytes(data[:-5])
    reopened = Spool(tmp_path)
    assert [e.seq for e in reopened] == [0] and reopened.events == 1 and not reopened.damaged
    reopened.append([metric(2), metric(3)])
    assert [e.seq for e in Spool(tmp_path)] == [0, 2, 3]


def test_a_damaged_record_in_the_middle_costs_only_itself(tmp_path):
    """One flipped byte in record 3 of 1,000: it is reported (offset, length) and skipped, and the 999
    intact records, before and after it, are all delivered; counts stay true."""
    hub = TrackingHub(ctx(tmp_path), [])
    for i in range(10):
        hub.submit("site-1", [metric(100 * i + j) for j in range(100)])
    hub.close("FINISHED", timeout=5)
    path = spool_file(tmp_path)
    data = bytearray(path.read_bytes())
    lines = data.split(b"\n")
    offset = sum(len(line) + 1 for line in lines[:3])
    data[offset + 20] ^= 0x01
    path.write_bytes(bytes(data))

    sink = MemoryReceiver()
    hub = TrackingHub(ctx(tmp_path), [("memory", sink)])
    assert hub.spool.damaged == [(offset, len(lines[3]) + 1)]
    assert hub.status()["spool"]["damaged"] == [{"offset": offset, "bytes": len(lines[3]) + 1}]
    report = delivered_once(hub, sink, [s for s in range(1000) if s != 3])
    assert counts(report["receivers"]["memory"]) == {"delivered": 999, "undelivered": 0}
    assert len(spooled_events(tmp_path / "spool")) == 999


def test_a_mark_past_the_end_neither_hangs_nor_loses(tmp_path):
    """A progress mark beyond the valid end (the spool was cut back: machine crash, torn tail) resumes
    after the records it counts; new records are delivered, the pump does not spin, counts stay >= 0."""
    hub = TrackingHub(ctx(tmp_path), [])
    hub.submit("site-1", [metric(i) for i in range(10)])
    hub.close("FINISHED", timeout=5)
    progress = tmp_path / "spool" / "progress-memory.json"
    progress.write_text(json.dumps({"offset": 10**9, "events": 6}))

    sink = MemoryReceiver()
    hub = TrackingHub(ctx(tmp_path), [("memory", sink)])
    hub.submit("site-1", [metric(i) for i in range(10, 15)])
    started = time.process_time()
    report = delivered_once(hub, sink, range(6, 15))
    assert time.process_time() - started < 2.0  # no busy loop
    assert counts(report["receivers"]["memory"]) == {"delivered": 15, "undelivered": 0}
    assert load_progress(tmp_path / "spool", "memory")["events"] == 15


def test_a_mark_off_a_record_boundary_resumes_after_the_records_it_counts(tmp_path):
    """A mark whose offset falls inside a record is not trusted: delivery resumes after its record count."""
    hub = TrackingHub(ctx(tmp_path), [])
    hub.submit("site-1", [metric(i) for i in range(10)])
    hub.close("FINISHED", timeout=5)
    (tmp_path / "spool" / "progress-memory.json").write_text(json.dumps({"offset": 7, "events": 4}))
    sink = MemoryReceiver()
    hub = TrackingHub(ctx(tmp_path), [("memory", sink)])
    delivered_once(hub, sink, range(4, 10))


def test_spool_report_from_disk_never_counts_below_zero(tmp_path):
    """The counts the job falls back on when the receiver actor cannot close are bounded by the spool."""
    hub = TrackingHub(ctx(tmp_path), [])
    hub.submit("site-1", [metric(i) for i in range(3)])
    hub.close("FINISHED", timeout=5)
    (tmp_path / "spool" / "progress-memory.json").write_text(json.dumps({"offset": 10**6, "events": 50}))
    report = spool_report(tmp_path / "spool", ["memory", "other"])
    assert report["receivers"] == {
        "memory": {"delivered": 3, "undelivered": 0},
        "other": {"delivered": 0, "undelivered": 3},
    }


_FSIZE_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from fl_ray.receivers.base import MemoryReceiver, ReceiverContext
    from fl_ray.tracking.events import EventKind, TrackingEvent
    from fl_ray.tracking.hub import TrackingHub
    from fl_ray.tracking.spool import SpoolError, spooled_events

    job = Path(sys.argv[1])
    ctx = ReceiverContext(job_id="j", job_name="j", job_dir=job, workspace=job, sites=("site-1",), config={})
    sink = MemoryReceiver()
    hub = TrackingHub(ctx, [("memory", sink)])
    batches = [[TrackingEvent("site-1", 100 * b + i, EventKind.METRIC, "loss", 0.5, 100 * b + i, 1) for i in range(100)]
               for b in range(60)]
    hub.submit("site-1", batches[0])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hub.spool.end + 20_000, hard))  # a real limit: room for ~2 batches
    acked, errors, pending = 1, [], []
    for batch in batches[1:]:
        try:
            hub.submit("site-1", batch)
            acked += 1
        except SpoolError as exc:
            errors.append(str(exc))
            pending.append(batch)
    failed_status = hub.status()["spool"]
    size_while_full = hub.spool.path.stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space returns: the sites send again
    resent = [hub.submit("site-1", batch) for batch in pending]
    again = [hub.submit("site-1", batch) for batch in batches]  # and any batch once more: all duplicates now
    report = hub.close("FINISHED", timeout=10)
    print(json.dumps({"acked_while_full": acked, "errors": errors, "status": failed_status,
                      "size_while_full": size_while_full, "end_while_full": failed_status["bytes"],
                      "resent": resent, "again": again, "delivered": sorted(e.seq for e in sink.events),
                      "spooled": len(spooled_events(job / "spool")), "report": report["receivers"]["memory"]}))
""")


def test_a_full_disk_acknowledges_nothing_it_did_not_store(tmp_path):
    """With a real file-size limit on the spool, appends that do not fit fail: nothing of them counts as
    accepted (no seq is marked seen), the file holds no partial record, the error names the file and what
    waits; once there is room again the same batches are accepted, and every record is delivered once."""
    out = subprocess.run(
        [sys.executable, "-c", _FSIZE_SCRIPT, str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1 < result["acked_while_full"] < 60 and result["errors"]
    assert str(spool_file(tmp_path)) in result["errors"][0] and "100 tracking record(s)" in result["errors"][0]
    assert "File too large" in result["errors"][0]
    assert result["status"]["error"]["waiting"] == 100 * len(result["errors"])
    assert result["size_while_full"] == result["end_while_full"]  # failed appends were cut back
    assert result["resent"] == [100] * len(result["errors"]) and result["again"] == [0] * 60
    assert result["delivered"] == list(range(6000)) and result["spooled"] == 6000
    assert counts(result["report"]) == {"delivered": 6000, "undelivered": 0}


def test_after_resume_a_step_recorded_by_an_earlier_life_is_not_recorded_again(tmp_path):
    """A job resumed after kill -9 re-runs the cut-off round: its metrics and texts at (key, step) pairs the
    first life recorded are dropped (the first value stays); new steps, params and tags are kept."""
    hub = TrackingHub(ctx(tmp_path), [])
    seq0 = SiteState.from_snapshot("site-1", hub.open_site("site-1")).seq
    hub.submit(
        "site-1",
        [metric(seq0 + i, step=i) for i in range(5)]
        + [TrackingEvent("site-1", seq0 + 5, EventKind.PARAM, "lr", "0.1", None, 0)],
    )
    hub.spool.close()  # killed: no close

    sink = MemoryReceiver()
    hub = TrackingHub(ctx(tmp_path, life="resume-1"), [("memory", sink)])
    restarted = SiteState.from_snapshot("site-1", hub.open_site("site-1"))
    seq1 = restarted.seq
    assert restarted.steps == {"loss": 5} and restarted.params == {"lr": "0.1"}
    rerun = [metric(seq1 + i, step=3 + i) for i in range(4)]  # steps 3, 4 again, then 5, 6
    rerun.append(TrackingEvent("site-1", seq1 + 4, EventKind.PARAM, "lr", "0.1", None, 0))
    assert hub.submit("site-1", rerun) == 3
    hub.close("FINISHED", timeout=5)
    steps_logged = sorted(e.step for e in sink.events if e.kind == EventKind.METRIC)
    assert steps_logged == [0, 1, 2, 3, 4, 5, 6]

    restarted = TrackingHub(ctx(tmp_path, life="resume-1"), [])  # the resumed life's receiver restarts
    assert restarted.submit("site-1", [metric(seq1 + 10, step=5)]) == 1  # same life: not an earlier step
