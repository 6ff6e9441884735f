"""The receiver actor's core without Ray: dedup by (site, seq), the spool, per-receiver delivery and recovery."""

import time

import pytest
import yaml

from fl_ray.receivers.base import MemoryReceiver, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.hub import TrackingHub
from fl_ray.tracking.state import INCARNATION_BITS, SiteState
from fl_ray.tracking.spool import Spool

from user_receivers import FlakyReceiver, RefusesKey


def ctx(tmp_path):
    return ReceiverContext(
        job_id="job-1", job_name="job", job_dir=tmp_path, workspace=tmp_path, sites=("site-1", "site-2"), config={}
    )


def metric(site, seq, step, value=1.0, key="loss"):
    return TrackingEvent(site, seq, EventKind.METRIC, key, value, step, 1_700_000_000_000 + seq)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_duplicates_are_dropped_by_site_and_seq(tmp_path):
    """A batch sent twice, or overlapping batches, reach the receiver once per (site, seq)."""
    sink = MemoryReceiver()
    hub = TrackingHub(ctx(tmp_path), [("memory", sink)])
    batch = [metric("site-1", i, i) for i in range(5)]
    assert hub.submit("site-1", batch) == 5
    assert hub.submit("site-1", batch) == 0
    assert hub.submit("site-1", batch[3:] + [metric("site-1", 5, 5)]) == 1
    assert hub.submit("site-2", [metric("site-2", 0, 0)]) == 1  # same seq, other site: new
    hub.close("FINISHED", timeout=10)
    assert sorted((e.site, e.seq) for e in sink.events) == [("site-1", i) for i in range(6)] + [("site-2", 0)]
    assert hub.duplicates == 5 + 2


def test_out_of_order_batches_are_all_kept(tmp_path):
    """A retried batch arriving after a later one is still accepted (no watermark loss)."""
    hub = TrackingHub(ctx(tmp_path), [])
    assert hub.submit("site-1", [metric("site-1", 3, 3)]) == 1
    assert hub.submit("site-1", [metric("site-1", i, i) for i in range(4)]) == 3
    assert hub.accepted == 4


def test_restart_recovers_from_the_spool(tmp_path):
    """A new hub on the same job dir knows what was accepted, resumes delivery, and continues steps."""
    first_sink = MemoryReceiver()
    hub = TrackingHub(ctx(tmp_path), [("memory", first_sink)])
    first_seq = SiteState.from_snapshot("site-1", hub.open_site("site-1")).seq
    hub.submit("site-1", [metric("site-1", first_seq + i, 10 + i) for i in range(3)])
    wait_until(lambda: len(first_sink.events) == 3)
    for pump in hub.pumps:  # the actor "crashes": delivery stops; a last batch is spooled, not delivered
        pump._abandon.set()
        pump._thread.join(2)
    hub.submit("site-1", [metric("site-1", first_seq + 3, 13)])
    hub.spool.close()

    sink = MemoryReceiver()
    again = TrackingHub(ctx(tmp_path), [("memory", sink)])
    assert again.accepted == 4
    assert again.submit("site-1", [metric("site-1", first_seq + i, 10 + i) for i in range(4)]) == 0
    restarted = SiteState.from_snapshot("site-1", again.open_site("site-1"))
    assert restarted.seq == 1 << INCARNATION_BITS and restarted.steps == {"loss": 14}
    again.close("FINISHED", timeout=10)
    delivered = [e.seq for e in first_sink.events] + [e.seq for e in sink.events]
    assert sorted(delivered) == [first_seq + i for i in range(4)]


def test_open_sites_gives_each_site_a_fresh_block_and_its_steps_once_for_all(tmp_path):
    """open_sites opens several sites' streams in one call: each a new incarnation, steps continued, kept
    for a hub restarted on the same job dir."""
    hub = TrackingHub(ctx(tmp_path), [("memory", MemoryReceiver())])
    first = hub.open_site("site-1")["incarnation"] << INCARNATION_BITS
    hub.submit("site-1", [metric("site-1", first + i, 10 + i) for i in range(2)])
    opened = hub.open_sites(["site-1", "site-2"])
    assert {s: (o["incarnation"], o["steps"]) for s, o in opened.items()} == {
        "site-1": (1, {"loss": 12}),
        "site-2": (0, {}),
    }
    hub.close("FINISHED", timeout=10)
    again = TrackingHub(ctx(tmp_path), [("memory", MemoryReceiver())])
    opened = again.open_sites(["site-2", "site-1"])
    assert {s: (o["incarnation"], o["steps"]) for s, o in opened.items()} == {
        "site-2": (1, {}),
        "site-1": (2, {"loss": 12}),
    }
    again.close("FINISHED", timeout=10)


def test_a_failing_receiver_is_retried_without_loss_or_holding_up_others(tmp_path):
    """A back end that fails twice gets every event after its retries; the healthy one is not held up."""
    flaky, healthy = FlakyReceiver(fail_times=2), MemoryReceiver()
    hub = TrackingHub(ctx(tmp_path), [("flaky", flaky), ("healthy", healthy)])
    hub.submit("site-1", [metric("site-1", i, i) for i in range(100)])
    wait_until(lambda: len(healthy.events) == 100, timeout=2)
    assert flaky.events == []
    report = hub.close("FINISHED", timeout=20)
    assert [e.seq for e in flaky.events] == list(range(100))
    assert report["receivers"]["flaky"] == {"delivered": 100, "undelivered": 0, "events": 100, "attempts": 3}


def test_undeliverable_records_stay_in_the_spool_and_are_reported(tmp_path):
    """A back end that never recovers: close reports what is undelivered; the spool still holds it."""
    hub = TrackingHub(ctx(tmp_path), [("down", FlakyReceiver(fail_times=10**6))])
    hub.submit("site-1", [metric("site-1", i, i) for i in range(7)])
    report = hub.close("FINISHED", timeout=1.5)
    entry = report["receivers"]["down"]
    assert entry["delivered"] == 0 and entry["undelivered"] == 7 and "ConnectionError" in entry["error"]
    assert len(list(Spool(tmp_path / "spool"))) == 7


def test_buffer_flush_time_batches_deliveries(tmp_path):
    """With buffer_flush_time, several small batches reach the back end in one write."""

    class Timed(MemoryReceiver):
        buffer_flush_time = 0.5
        writes = 0

        def write(self, events):
            Timed.writes += 1
            super().write(events)

    sink = Timed()
    hub = TrackingHub(ctx(tmp_path), [("timed", sink)])
    hub.submit("site-1", [metric("site-1", 0, 0)])
    wait_until(lambda: len(sink.events) == 1)
    for i in range(1, 6):
        hub.submit("site-1", [metric("site-1", i, i)])
    wait_until(lambda: len(sink.events) == 6)
    assert Timed.writes == 2
    hub.close("FINISHED", timeout=5)


def test_a_full_batch_is_delivered_without_waiting_for_buffer_flush_time(tmp_path):
    """Once a whole batch (10,000 records) waits, it goes out at once, not at the next flush time."""

    class Slow(MemoryReceiver):
        buffer_flush_time = 60.0

    sink = Slow()
    hub = TrackingHub(ctx(tmp_path), [("slow", sink)])
    hub.submit("site-1", [metric("site-1", 0, 0)])
    wait_until(lambda: len(sink.events) == 1)  # the first delivery opens the receiver: 60 s until the next
    hub.submit("site-1", [metric("site-1", i, i) for i in range(1, 4)])
    time.sleep(0.3)
    assert len(sink.events) == 1  # a part batch waits for the flush time...
    hub.submit("site-1", [metric("site-1", i, i) for i in range(4, 10_004)])
    wait_until(lambda: len(sink.events) == 10_001, timeout=10)  # ...a full one (10,000 records) does not
    hub.close("FINISHED", timeout=5)


def test_a_receiver_slower_than_buffer_flush_time_is_fed_back_to_back(tmp_path):
    """The flush time counts from the start of the last delivery: a long delivery is not followed by a pause."""

    class Busy(MemoryReceiver):
        buffer_flush_time = 0.5
        spans: list = []

        def write(self, events):
            start = time.monotonic()
            time.sleep(0.8)
            super().write(events)
            Busy.spans.append((start, time.monotonic()))

    sink = Busy()
    hub = TrackingHub(ctx(tmp_path), [("busy", sink)])
    for i in range(3):
        hub.submit("site-1", [metric("site-1", i, i)])
        time.sleep(0.1)  # arrives while the previous delivery is under way
    wait_until(lambda: len(sink.events) == 3)
    hub.close("FINISHED", timeout=5)
    gaps = [start - end for (_, end), (start, _) in zip(Busy.spans, Busy.spans[1:])]
    assert gaps and all(gap < 0.3 for gap in gaps), gaps


@pytest.mark.parametrize("kind", [EventKind.PARAM, EventKind.TAG, EventKind.TEXT])
def test_non_metric_events_do_not_move_step_counters(tmp_path, kind):
    """Only metrics advance the steps handed to a restarted site."""
    hub = TrackingHub(ctx(tmp_path), [])
    hub.submit("site-1", [TrackingEvent("site-1", 0, kind, "k", "v", 7, 0)])
    assert hub.open_site("site-1")["steps"] == {}


class Picky(MemoryReceiver):
    """A back end that refuses every record under the key "bad" for good, until told to accept it."""

    accept_bad = False

    def write(self, events):
        for e in events:
            if e.key == "bad" and not self.accept_bad:
                self.set_aside(e, "400 BAD_REQUEST: no")
            else:
                self.events.append(e)


def test_records_refused_for_good_are_set_aside_and_can_be_retried(tmp_path):
    """Refused records go to dead_letters.jsonl with the reason, are reported, do not hold up the rest,
    survive a restart without counting twice, and a retry delivers them once the back end takes them."""
    sink = Picky()
    hub = TrackingHub(ctx(tmp_path), [("picky", sink)])
    hub.submit("site-1", [metric("site-1", 0, 0), metric("site-1", 1, 1, key="bad"), metric("site-1", 2, 2)])
    report = hub.close("FINISHED", timeout=5)["receivers"]["picky"]
    assert [e.seq for e in sink.events] == [0, 2]
    assert report["undelivered"] == 0 and report["dead_letters"] == 1
    assert report["dead_letter_replay"].endswith("--to picky --dead-letters")
    lines = (tmp_path / "dead_letters.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"reason": "400 BAD_REQUEST: no"' in lines[0] and '"key": "bad"' in lines[0]
    with open(tmp_path / "dead_letters.jsonl", "a") as f:  # written again by a receiver that crashed before its mark
        f.write(lines[0] + "\n")

    retry = Picky()
    retry.accept_bad = True
    hub = TrackingHub(ctx(tmp_path), [("picky", retry)])
    assert hub.status()["receivers"]["picky"]["dead_letters"] == 1
    assert hub.retry_dead_letters(timeout=5) == {"picky": {"retried": 1, "delivered": 1, "set_aside": 0}}
    report = hub.close("FINISHED", timeout=5)["receivers"]["picky"]
    assert [(e.seq, e.key) for e in retry.events] == [(1, "bad")] and "dead_letters" not in report
    assert (tmp_path / "dead_letters.jsonl").read_text() == ""


class Stateful(MemoryReceiver):
    """Counts the records it has flushed and keeps that count in its checkpoint."""

    def __init__(self):
        super().__init__()
        self.flushed = 0
        self.resumed_with = None

    def flush(self):
        self.flushed = len(self.events)

    def checkpoint(self):
        return {"flushed": self.flushed}

    def resume(self, state):
        self.resumed_with = state
        self.flushed = state.get("flushed", 0)


def test_a_receiver_resumes_from_the_checkpoint_saved_with_its_mark(tmp_path):
    """The checkpoint a receiver returns after a flush goes with its progress mark; a restarted receiver
    gets it back through resume(), and a fresh one gets {}."""
    first = Stateful()
    hub = TrackingHub(ctx(tmp_path), [("s", first)])
    hub.submit("site-1", [metric("site-1", i, i) for i in range(7)])
    hub.close("FINISHED", timeout=5)
    assert first.resumed_with == {}
    second = Stateful()
    hub = TrackingHub(ctx(tmp_path), [("s", second)])
    hub.submit("site-1", [metric("site-1", 7, 7)])
    hub.close("FINISHED", timeout=5)
    assert second.resumed_with == {"flushed": 7} and [e.seq for e in second.events] == [7]


def test_replay_with_dead_letters_delivers_what_was_set_aside(tmp_path, capsys):
    """scripts/replay_spool.py --dead-letters tries the set-aside records again: delivered now that the back
    end takes them, removed from the dead-letter file, reported; without the flag they are left alone."""
    from test_delivery_faults import load_replay_script

    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {"name": "job", "tracking": {"receivers": [{"type": "user_receivers:RefusesKey", "key": "bad"}]}}
        )
    )
    hub = TrackingHub(ctx(tmp_path), [("user_receivers_RefusesKey", RefusesKey("bad"))])
    hub.submit("site-1", [metric("site-1", 0, 0), metric("site-1", 1, 1, key="bad")])
    assert hub.close("FINISHED", timeout=5)["receivers"]["user_receivers_RefusesKey"]["dead_letters"] == 1
    replay = load_replay_script()

    assert replay.main([str(tmp_path)]) == 0  # nothing past the mark; the dead letter stays
    assert "set aside: 1 record(s) refused for good" in capsys.readouterr().out
    (tmp_path / "backend-accepts").write_text("")
    report = replay.replay(tmp_path, dead_letters=True)
    entry = report["receivers"]["user_receivers_RefusesKey"]
    assert entry["dead_letters_retried"] == {"retried": 1, "delivered": 1, "set_aside": 0}
    assert [tuple(e)[:2] for e in entry["echo"]] == [("site-1", 1)] and "dead_letters" not in entry
    assert (tmp_path / "dead_letters.jsonl").read_text() == ""


class TableReceiver(MemoryReceiver):
    """Declares that it logs tables, and keeps them."""

    logs_tables = True

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict] = {}

    def log_table(self, artifact_file, table):
        self.tables[artifact_file] = table
        return {"artifact_file": artifact_file}


def test_the_hub_calls_only_the_capabilities_a_receiver_declares(tmp_path):
    """log_table reaches the receiver that declares logs_tables, once it is open, and no other; log_model
    reaches none of them (neither declares logs_models)."""
    tables, plain = TableReceiver(), MemoryReceiver()
    hub = TrackingHub(ctx(tmp_path), [("tables", tables), ("plain", plain)])
    hub.submit("site-1", [metric("site-1", 0, 0)])
    table = {"site": ["site-1"], "accuracy": [0.5]}
    assert hub.log_table("matrix.json", table, timeout=10) == {"tables": {"artifact_file": "matrix.json"}}
    assert tables.tables == {"matrix.json": table}
    assert hub.log_model("server", object(), None, timeout=10) == {}
    with pytest.raises(NotImplementedError, match="MemoryReceiver does not log tables"):
        plain.log_table("matrix.json", table)
    hub.close("FINISHED", timeout=10)
