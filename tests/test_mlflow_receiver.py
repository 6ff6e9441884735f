"""MLflowReceiver against a real `mlflow server`: run creation that survives lost answers (through a
faulty proxy on loopback), and records that keep failing set aside without holding up the others,
while an outage sets nothing aside."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
from mlflow.entities import RunStatus, ViewType
from mlflow.tracking import MlflowClient

from fl_ray.receivers.base import ReceiverContext
from fl_ray.receivers.mlflow import MAX_SERVER_ERRORS, MLflowReceiver
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.receivers.mlflow import PROCESS_ENV_DEFAULTS

SITES = ("site-1", "site-2")
CREATE = "/api/2.0/mlflow/runs/create"
_names = itertools.count()


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that forwards every request, but for the first
    ``times`` POSTs to ``path`` whose JSON body passes ``match`` closes the connection without answering
    (after the server has handled it); with ``fail_all`` set it answers 503 to everything instead."""

    def __init__(self, upstream: str) -> None:
        self.upstream_uri = upstream
        self.upstream = upstream.removeprefix("http://")
        self.rules: list[list] = []  # [path, match, times left]
        self.dropped = 0
        self.fail_all = False
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.fail_all:
                    self._answer(503, {"Content-Type": "text/plain"}, b"unavailable")
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if proxy._drop(self.command, self.path, body):
                    self.close_connection = True  # the server did it; the client never hears
                    return
                kept = {
                    k: v
                    for k, v in resp.getheaders()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length")
                }
                self._answer(resp.status, kept, data)

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def drop_answers(self, path: str, times: int = 1, match: Callable[[dict], bool] = lambda body: True) -> None:
        self.rules.append([path, match, times])

    def _drop(self, method: str, path: str, body: bytes) -> bool:
        with self._lock:
            for rule in self.rules:
                if method == "POST" and path == rule[0] and rule[2] > 0 and rule[1](json.loads(body or b"{}")):
                    rule[2] -= 1
                    self.dropped += 1
                    return True
        return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_env(monkeypatch):
    """The receiver actor's MLflow client settings (few HTTP retries, short timeouts)."""
    for name, value in PROCESS_ENV_DEFAULTS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def quick_retries(receiver_env, monkeypatch):
    """The receiver actor's settings, its HTTP retries at most 0.1 s apart instead of seconds (as many of them):
    the tests that fail requests on purpose wait less."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.1")


@pytest.fixture
def proxy(mlflow_server):
    proxy = FaultyProxy(mlflow_server.uri)
    yield proxy
    proxy.close()


def context(tmp_path: Path, sites: tuple[str, ...] = SITES) -> ReceiverContext:
    name = f"receiver-{tmp_path.name}-{next(_names)}"
    return ReceiverContext(
        job_id=f"{name}-job",
        job_name=name,
        job_dir=tmp_path,
        workspace=tmp_path,
        sites=sites,
        config={"lr": 0.1, "model": {"width": 8}},
    )


def events(site: str, first_seq: int, kind: EventKind, items: list[tuple]) -> list[TrackingEvent]:
    """TrackingEvents of one kind from ``(key, value, step)`` items, with client timestamps."""
    return [
        TrackingEvent(site, first_seq + i, kind, key, value, step, 1_700_000_000_000 + first_seq + i)
        for i, (key, value, step) in enumerate(items)
    ]


def metrics(site: str, first_seq: int, n: int, key: str = "loss") -> list[TrackingEvent]:
    return events(site, first_seq, EventKind.METRIC, [(key, float(i), i) for i in range(n)])


def record_set_aside(receiver: MLflowReceiver) -> list[tuple[TrackingEvent, str]]:
    """Every (event, reason) the receiver sets aside, also passed on to the Receiver default."""
    seen: list[tuple[TrackingEvent, str]] = []
    original = receiver.set_aside

    def set_aside(event: TrackingEvent, reason: str) -> None:
        seen.append((event, reason))
        original(event, reason)

    receiver.set_aside = set_aside
    return seen


def deliver(
    receiver: MLflowReceiver, batch: list[TrackingEvent], tries: int = MAX_SERVER_ERRORS + 2
) -> list[Exception]:
    """Write and flush ``batch`` as the hub's pump does, again until a flush returns; the failed flushes' errors."""
    errors: list[Exception] = []
    for _ in range(tries):
        receiver.write(batch)
        try:
            receiver.flush()
            return errors
        except Exception as exc:  # noqa: BLE001 - the pump retries whatever a flush raises
            errors.append(exc)
    raise AssertionError(f"no flush succeeded in {tries} tries; the last error: {errors[-1]!r}")


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def job_runs(client: MlflowClient, experiment_id: str, view: int) -> list:
    return client.search_runs([experiment_id], run_view_type=view, max_results=1000)


@pytest.mark.parametrize(
    "role, times, open_fails",
    [
        ("parent", 1, False),  # MLflow's HTTP client sends the create again
        ("site-1", 1, False),
        ("parent", 3, True),  # every try of the create loses its answer: open raises and is retried, as the pump does
    ],
    ids=["parent-answer-lost", "site-answer-lost", "parent-open-retried"],
)
def test_a_lost_create_answer_leaves_one_run_per_role(quick_retries, proxy, tmp_path, role, times, open_fails):
    ctx = context(tmp_path)
    name = ctx.job_id if role == "parent" else role
    proxy.drop_answers(CREATE, times, match=lambda body: body.get("run_name") == name)
    receiver = MLflowReceiver(tracking_uri=proxy.uri, buffer_flush_time=0)
    if open_fails:
        with pytest.raises(Exception, match="runs/create"):
            receiver.open(ctx)
        receiver = MLflowReceiver(tracking_uri=proxy.uri, buffer_flush_time=0)
    receiver.open(ctx)
    batch = [*metrics("site-1", 0, 50), *metrics("site-2", 0, 50), *metrics("server", 0, 3, "global_loss")]
    assert deliver(receiver, batch) == []  # a site's run is made here, with its first records
    assert proxy.dropped == times
    report = receiver.close("FINISHED")

    client = MlflowClient(proxy.upstream_uri)
    active = job_runs(client, report["experiment_id"], ViewType.ACTIVE_ONLY)
    by_role: dict[str, list] = {}
    for run in active:
        by_role.setdefault(run.data.tags.get("fl_ray.site", "parent"), []).append(run.info.run_id)
    assert by_role == {"parent": [report["parent_run_id"]], **{s: [report["run_ids"][s]] for s in (*SITES, "server")}}
    assert all(run.info.status == "FINISHED" for run in active)
    for site in SITES:
        run = client.get_run(report["run_ids"][site])
        assert run.data.tags["mlflow.parentRunId"] == report["parent_run_id"]
        assert history(client, run.info.run_id, "loss") == [(i, float(i)) for i in range(50)]
    assert client.get_run(report["parent_run_id"]).data.params["model.width"] == "8"

    extras = times if not open_fails else times - 1  # every create sent reached the server; one run is kept
    deleted = job_runs(client, report["experiment_id"], ViewType.DELETED_ONLY)
    assert len(deleted) == extras
    assert all(run.info.status == "KILLED" and not run.data.metrics and not run.data.params for run in deleted)
    assert all(run.data.tags.get("fl_ray.site", "parent") == role for run in deleted)
    everything = job_runs(client, report["experiment_id"], ViewType.ALL)
    assert len(everything) == len(active) + extras
    assert not [r for r in everything if r.info.status == RunStatus.to_string(RunStatus.RUNNING)]

    again = MLflowReceiver(tracking_uri=proxy.uri)  # a resumed job: the same runs, from mlflow_runs.json
    again.open(ctx)
    assert (again.parent_run_id, again.run_ids) == (report["parent_run_id"], report["run_ids"])
    again.close("FINISHED")


def test_runs_are_found_by_their_tags_without_mlflow_runs_json(receiver_env, mlflow_server, tmp_path):
    """A receiver whose mlflow_runs.json is gone (another machine, a lost job dir) finds the job's runs."""
    ctx = context(tmp_path)
    batch = [*metrics("site-1", 0, 5), *metrics("site-2", 0, 5), *metrics("server", 0, 2, "global_loss")]
    first = MLflowReceiver(tracking_uri=mlflow_server.uri)
    first.open(ctx)
    assert deliver(first, batch) == []
    (tmp_path / "mlflow_runs.json").unlink()
    second = MLflowReceiver(tracking_uri=mlflow_server.uri)
    second.open(ctx)
    assert second.parent_run_id == first.parent_run_id
    assert deliver(second, batch) == []
    assert second.run_ids == first.run_ids
    second.close("FINISHED")
    client = MlflowClient(mlflow_server.uri)
    assert len(job_runs(client, second.experiment_id, ViewType.ALL)) == 1 + len(SITES) + 1
    assert history(client, second.run_ids["site-1"], "loss") == [(i, float(i)) for i in range(5)]


def test_a_sites_run_is_made_when_its_first_records_arrive(workspace, tmp_path):
    """Opening makes the job's parent run only; a site's run is made in the first delivery holding its
    records (the runs of all sites new in that delivery together), and a site that logs nothing has none."""
    ctx = context(tmp_path, sites=("site-1", "site-2", "site-3"))
    receiver = MLflowReceiver(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}", buffer_flush_time=0)
    receiver.open(ctx)
    client = MlflowClient(receiver.tracking_uri)
    assert [r.info.run_id for r in job_runs(client, receiver.experiment_id, ViewType.ALL)] == [receiver.parent_run_id]
    assert client.get_run(receiver.parent_run_id).data.params["model.width"] == "8"

    assert deliver(receiver, [*metrics("site-1", 0, 3), *metrics("server", 0, 1, "global_loss")]) == []
    assert sorted(receiver.run_ids) == ["server", "site-1"]
    assert deliver(receiver, metrics("site-2", 0, 2)) == []
    report = receiver.close("FINISHED")
    assert sorted(report["run_ids"]) == ["server", "site-1", "site-2"]
    runs = job_runs(client, receiver.experiment_id, ViewType.ALL)
    assert sorted(r.data.tags.get("fl_ray.site", "parent") for r in runs) == ["parent", "server", "site-1", "site-2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert history(client, report["run_ids"]["site-2"], "loss") == [(0, 0.0), (1, 1.0)]


def test_a_text_mlflow_fails_on_every_time_is_set_aside_and_the_rest_delivered(quick_retries, mlflow_server, tmp_path):
    """The field case: a text at ``notes`` then one at ``notes/inner.txt`` (the server answers 500 to the
    second upload forever) among thousands of metrics (more than one request's worth for each run): the metrics and the first text arrive, the second
    text is set aside after MAX_SERVER_ERRORS deliveries, and the runs end. A param refused in the first
    delivery is set aside then, once: the deliveries after it leave it out."""
    ctx = context(tmp_path)
    receiver = MLflowReceiver(tracking_uri=mlflow_server.uri, buffer_flush_time=0)
    receiver.open(ctx)
    set_aside = record_set_aside(receiver)
    assert deliver(receiver, events("site-1", 2, EventKind.PARAM, [("lr", "0.1", None)])) == []
    texts = events("site-1", 0, EventKind.TEXT, [("notes", "outer", None), ("notes/inner.txt", "inner", None)])
    changed = events("site-1", 3, EventKind.PARAM, [("lr", "0.2", None)])
    batch = [
        *metrics("site-1", 10, 1200),
        *texts,
        *changed,
        *metrics("site-1", 5000, 400, "acc"),
        *metrics("site-2", 0, 1200),
    ]
    started = time.monotonic()
    errors = deliver(receiver, batch)

    assert len(errors) == MAX_SERVER_ERRORS - 1, errors
    assert all("notes/inner.txt" in str(e) and "HTTP 500" in str(e) for e in errors), errors
    assert [(e.site, e.seq) for e, _ in set_aside] == [("site-1", 3), ("site-1", 1)]
    assert "INVALID_PARAMETER_VALUE" in set_aside[0][1]
    reason = set_aside[1][1]
    assert f"{MAX_SERVER_ERRORS} times in a row" in reason and "HTTP 500" in reason, reason
    client = MlflowClient(mlflow_server.uri)
    site1, site2 = receiver.run_ids["site-1"], receiver.run_ids["site-2"]
    assert history(client, site1, "loss") == [(i, float(i)) for i in range(1200)]
    assert history(client, site1, "acc") == [(i, float(i)) for i in range(400)]
    assert history(client, site2, "loss") == [(i, float(i)) for i in range(1200)]
    assert client.download_artifacts(site1, "notes", str(tmp_path)) and (tmp_path / "notes").read_text() == "outer"
    assert time.monotonic() - started < 90

    again = [e for e in batch if e.site != "site-1" or e.seq not in (1, 3)]
    assert deliver(receiver, again) == [] and len(set_aside) == 2  # the same records again add nothing
    assert len(client.get_metric_history(site1, "loss")) == 1200
    report = receiver.close("FINISHED")
    assert "refused" not in report and "refused_examples" not in report
    assert {client.get_run(r).info.status for r in (*report["run_ids"].values(), report["parent_run_id"])} == {
        "FINISHED"
    }


def test_records_mlflow_refuses_are_set_aside_at_once(receiver_env, mlflow_server, tmp_path):
    """A param whose value changed, a name MLflow refuses and a param logged twice in one batch with two
    values: each set aside in the first flush with MLflow's reason; everything else in the batch arrives."""
    ctx = context(tmp_path, sites=("site-1",))
    receiver = MLflowReceiver(tracking_uri=mlflow_server.uri, buffer_flush_time=0)
    receiver.open(ctx)
    set_aside = record_set_aside(receiver)
    assert deliver(receiver, events("site-1", 0, EventKind.PARAM, [("lr", "0.1", None)])) == []
    good = metrics("site-1", 10, 1500)
    refused = [
        *events("site-1", 1, EventKind.PARAM, [("lr", "0.2", None)]),
        *events("site-1", 2, EventKind.METRIC, [("a//b", 1.0, 0)]),
    ]
    twice = events("site-1", 3, EventKind.PARAM, [("width", "8", None), ("width", "16", None)])
    tag = events("site-1", 5, EventKind.TAG, [("t", "x", None)])
    batch = [*good[:700], *refused, *twice, *good[700:], *tag]
    assert deliver(receiver, batch) == []

    reasons = {(e.site, e.seq): reason for e, reason in set_aside}
    assert sorted(reasons) == [("site-1", 1), ("site-1", 2), ("site-1", 4)]
    assert "INVALID_PARAMETER_VALUE" in reasons[("site-1", 1)] and "'lr'" in reasons[("site-1", 1)]
    assert "a//b" in reasons[("site-1", 2)]
    assert "'width'" in reasons[("site-1", 4)] and "first value" in reasons[("site-1", 4)]
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(receiver.run_ids["site-1"])
    assert history(client, run.info.run_id, "loss") == [(i, float(i)) for i in range(1500)]
    assert run.data.params == {"lr": "0.1", "width": "8"} and run.data.tags["t"] == "x"

    assert deliver(receiver, batch) == []  # written again (a retry of the set-aside records): refused again
    assert len(set_aside) == 6 and {(e.site, e.seq) for e, _ in set_aside[3:]} == set(reasons)
    assert history(client, run.info.run_id, "loss") == [(i, float(i)) for i in range(1500)]
    receiver.close("FINISHED")


def test_a_path_clash_in_a_local_store_is_set_aside_at_once(workspace, tmp_path):
    """The default sqlite store with local artifacts: ``notes`` then ``notes/inner.txt`` clash on disk."""
    ctx = ReceiverContext(
        job_id="local-job", job_name="local", job_dir=tmp_path, workspace=workspace, sites=("site-1",), config={}
    )
    receiver = MLflowReceiver(buffer_flush_time=0)
    receiver.open(ctx)
    set_aside = record_set_aside(receiver)
    texts = events("site-1", 0, EventKind.TEXT, [("notes", "outer", None), ("notes/inner.txt", "inner", None)])
    assert deliver(receiver, [*texts, *metrics("site-1", 2, 100)]) == []
    assert [(e.seq, reason.split(":")[0]) for e, reason in set_aside] == [(1, "MLflow refused it")]
    assert len(MlflowClient(receiver.tracking_uri).get_metric_history(receiver.run_ids["site-1"], "loss")) == 100
    receiver.close("FINISHED")


def test_an_outage_sets_nothing_aside(quick_retries, mlflow_server, tmp_path):
    """The server is stopped with a batch (and a text MLflow cannot store) waiting: every flush fails while
    it is down, more times than the bound, and nothing is set aside; once it is back, the batch arrives."""
    from test_delivery_faults import start_again

    ctx = context(tmp_path)
    receiver = MLflowReceiver(tracking_uri=mlflow_server.uri, buffer_flush_time=0)
    receiver.open(ctx)
    set_aside = record_set_aside(receiver)
    assert deliver(receiver, metrics("site-1", 0, 10)) == []
    batch = [
        *metrics("site-1", 10, 2000),
        *metrics("site-2", 0, 2000),
        *events("site-2", 5000, EventKind.TEXT, [("report.txt", "fine", None)]),
    ]
    try:
        mlflow_server.stop()
        for _ in range(MAX_SERVER_ERRORS + 1):
            receiver.write(batch)
            with pytest.raises(Exception, match="Connection refused|Max retries"):
                receiver.flush()
        assert set_aside == []
    finally:
        start_again(mlflow_server)
    assert deliver(receiver, batch) == [] and set_aside == []
    client = MlflowClient(mlflow_server.uri)
    assert len(client.get_metric_history(receiver.run_ids["site-1"], "loss")) == 10 + 2000
    assert history(client, receiver.run_ids["site-2"], "loss") == [(i, float(i)) for i in range(2000)]
    receiver.close("FINISHED")


def test_a_server_failing_every_request_sets_nothing_aside(quick_retries, proxy, tmp_path):
    """Every request answered 503 (a proxy in front of a server that is down): more flushes than the bound
    fail, nothing is set aside; when the server answers again, the batch arrives."""
    ctx = context(tmp_path)
    receiver = MLflowReceiver(tracking_uri=proxy.uri, buffer_flush_time=0)
    receiver.open(ctx)
    set_aside = record_set_aside(receiver)
    batch = [
        *metrics("site-1", 0, 1500),
        *metrics("site-2", 0, 10),
        *events("site-1", 5000, EventKind.TEXT, [("report.txt", "fine", None)]),
    ]
    proxy.fail_all = True
    for _ in range(MAX_SERVER_ERRORS):
        receiver.write(batch)
        with pytest.raises(Exception, match="takes no writes"):
            receiver.flush()
    assert set_aside == []
    proxy.fail_all = False
    assert deliver(receiver, batch) == [] and set_aside == []
    client = MlflowClient(proxy.upstream_uri)
    assert history(client, receiver.run_ids["site-1"], "loss") == [(i, float(i)) for i in range(1500)]
    receiver.close("FINISHED")


def test_the_parent_runs_sites_tag_fits_mlflow_for_thousands_of_sites(tmp_path):
    """2,000 sites: the parent run's ``fl_ray.sites`` tag holds the names that fit in MLflow's 8,000
    characters, whole, and says how many sites there are (MLflow would cut the list mid-name)."""
    sites = tuple(f"site-{i}" for i in range(1, 2001))
    receiver = MLflowReceiver(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    receiver.open(context(tmp_path, sites))
    tag = MlflowClient(receiver.tracking_uri).get_run(receiver.parent_run_id).data.tags["fl_ray.sites"]
    receiver.close("FINISHED")
    names, _, count = tag.rpartition(",... ")
    assert len(tag) <= 8000 and count == "(2000 sites)"
    listed = names.split(",")
    assert len(listed) > 500 and listed == list(sites[: len(listed)])
