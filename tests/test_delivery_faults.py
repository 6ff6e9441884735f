"""Nothing lost, nothing doubled: a tracking-server outage mid-job, and a tracking server unreachable from
the start (then scripts/replay_spool.py). Every check reads MLflow back with MlflowClient and compares it
with what the learner logged. Receiver-actor crashes: tests/test_exactly_once.py."""

import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from fl_ray import JobConfig, run_job
from fl_ray.mlflow_server import LocalMlflowServer, free_port
from fl_ray.tracking.spool import load_progress, spooled_events

from conftest import NO_DATA, REPO
from test_tracking_matrix import _f32, wandb_series
from user_learners import expected_stream

SITES = ("site-1", "site-2")


def stream_config(name, rounds, points, seconds, receivers, **tracking):
    return JobConfig.model_validate(
        {
            "name": name,
            "num_rounds": rounds,
            "sites": list(SITES),
            "min_clients": 2,
            "learner": "user_learners:StreamLearner",
            "learner_args": {"points": points, "seconds": seconds},
            "dataset": NO_DATA,
            "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
            "tracking": {"receivers": receivers, "system_metrics": False, **tracking},
        }
    )


class JobThread(threading.Thread):
    """run_job in the background, so the test can break things while the job runs."""

    def __init__(self, cfg, workspace: Path) -> None:
        super().__init__(daemon=True)
        self.cfg, self.workspace = cfg, workspace
        self.result, self.error = None, None

    def run(self) -> None:
        try:
            self.result = run_job(self.cfg, workspace=self.workspace, show_progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def job_dir(self, timeout: float = 120.0) -> Path:
        wait_for(lambda: any(p.is_dir() for p in self.workspace.glob("*/spool")), timeout, "the job's spool")
        return next(p.parent for p in self.workspace.glob("*/spool"))

    def finish(self, timeout: float):
        self.join(timeout)
        assert not self.is_alive(), f"the job did not end within {timeout:g} s"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.2)


def delivered(job_dir: Path, name: str = "mlflow") -> int:
    """Records the receiver ``name`` has delivered so far (its progress mark)."""
    return load_progress(job_dir / "spool", name)["events"]


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_learner_records_in_mlflow(tracking_uri, runs, rounds, points):
    """Every metric point StreamLearner logged is in its site's run exactly once (values and steps);
    params, tags and the server's per-round metrics are there too."""
    client = MlflowClient(tracking_uri)
    for site in SITES:
        run = client.get_run(runs["run_ids"][site])
        assert history(client, run.info.run_id, "stream") == expected_stream(site, rounds, points)
        assert history(client, run.info.run_id, "stream_neg") == expected_stream(site, rounds, points, sign=-1)
        assert run.data.params == {"points": str(points), "site_name": site}
        assert run.data.tags["last_round"] == str(rounds)
    assert history(client, runs["run_ids"]["server"], "global_loss") == [(r, 1.0 / r) for r in range(1, rounds + 1)]
    return client


def start_again(server: LocalMlflowServer, attempts: int = 5) -> None:
    """Start a stopped server on its old port and store; retry while the port cannot be bound yet."""
    for attempt in range(attempts):
        try:
            server.start()
            return
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            time.sleep(3)


def test_tracking_server_outage_mid_job_loses_and_doubles_nothing(ray_session, mlflow_server, tmp_path):
    """The `mlflow server` is stopped for >= 20 s while sites log, then started on the same store: the job
    trains on, finishes without hanging, and MLflow holds every point exactly once, including those
    logged while it was down."""
    rounds, points = 5, 60
    server = mlflow_server  # the session's server: stopped here, and running again whatever happens
    try:
        cfg = stream_config(
            "outage", rounds, points, 4.0, [{"type": "mlflow", "tracking_uri": server.uri, "buffer_flush_time": 0.5}]
        )
        job = JobThread(cfg, tmp_path)
        job.start()
        job_dir = job.job_dir()
        wait_for(lambda: delivered(job_dir) > 0, 120, "the first records in MLflow")
        down = time.time()
        server.stop()
        time.sleep(21)
        assert job.is_alive(), "the job should not have ended while the server was down"
        start_again(server)
        up = time.time()
        result = job.finish(timeout=240)
        assert time.time() - up < 120, "the job hung after the server came back"

        assert result.status == "FINISHED" and len(result.rounds) == rounds
        entry = result.tracking["receivers"]["mlflow"]
        assert entry["undelivered"] == 0 and "error" not in entry
        assert result.tracking["accepted"] == sum(s["recorded"] for s in result.tracking["senders"].values())
        runs = result.tracking["receivers"]["mlflow"]
        client = assert_learner_records_in_mlflow(server.uri, runs, rounds, points)
        during = [
            m
            for m in client.get_metric_history(runs["run_ids"]["site-1"], "stream")
            if down * 1000 <= m.timestamp <= up * 1000
        ]
        assert len(during) > points, "sites should have kept logging while the server was down"
        assert client.get_run(runs["parent_run_id"]).info.status == "FINISHED"
    finally:
        if server.proc is None:
            start_again(server)


def forwarded_output(capfd, expected: str, timeout: float = 15.0) -> list[str]:
    """Lines printed so far, once ``expected`` is among them (Ray forwards actors' logs asynchronously)."""
    text, deadline = "", time.monotonic() + timeout
    while expected not in text and time.monotonic() < deadline:
        time.sleep(0.5)
        out, err = capfd.readouterr()
        text += out + err
    time.sleep(1.0)
    out, err = capfd.readouterr()
    return (text + out + err).splitlines()


def load_replay_script():
    spec = importlib.util.spec_from_file_location("replay_spool", REPO / "scripts" / "replay_spool.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unreachable_tracking_server_keeps_records_for_replay(ray_session, mlflow_server, tmp_path, capfd):
    """MLflow is unreachable from the start: the job trains anyway, says so once, keeps every record in
    the spool; replay_spool.py then delivers them exactly once, and a second replay adds nothing; TensorBoard
    and W&B get them from the spool too."""
    rounds, points = 2, 30
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = stream_config("unreachable", rounds, points, 1.0, [{"type": "mlflow", "tracking_uri": dead}], close_timeout=6)
    started = time.monotonic()
    result = run_job(cfg, workspace=tmp_path, show_progress=False)
    assert time.monotonic() - started < 90
    assert result.status == "FINISHED" and len(result.rounds) == rounds
    accepted = result.tracking["accepted"]
    assert accepted == sum(s["recorded"] for s in result.tracking["senders"].values()) > 2 * rounds * points * 2
    entry = result.tracking["receivers"]["mlflow"]
    assert entry["delivered"] == 0 and entry["undelivered"] == accepted
    assert "Connection refused" in entry["error"] or "Max retries" in entry["error"]
    assert entry["replay"] == f"python scripts/replay_spool.py {result.job_dir} --to mlflow"
    assert len(spooled_events(result.job_dir / "spool")) == accepted
    logged = forwarded_output(capfd, "cannot deliver")
    warnings = [line for line in logged if "cannot deliver" in line and str(result.job_dir) in line]
    assert len(warnings) == 1, "\n".join(warnings)
    assert "replay_spool.py" in warnings[0] and not [line for line in logged if "Retrying (Retry" in line]

    cmd = [
        sys.executable,
        str(REPO / "scripts" / "replay_spool.py"),
        str(result.job_dir),
        "--to",
        "mlflow",
        "--tracking-uri",
        mlflow_server.uri,
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"mlflow: {accepted} record(s) delivered now, {accepted} in all, 0 undelivered" in first.stdout
    runs = json.loads((result.job_dir / "mlflow_runs.json").read_text())[mlflow_server.uri]
    client = assert_learner_records_in_mlflow(mlflow_server.uri, runs, rounds, points)
    assert client.get_run(runs["parent_run_id"]).info.status == "FINISHED"

    replay = load_replay_script()  # the same script in-process: again (nothing new), elsewhere, TensorBoard
    assert replay.main(cmd[2:]) == 0
    assert f"mlflow: 0 record(s) delivered now, {accepted} in all, 0 undelivered" in capfd.readouterr().out
    assert_learner_records_in_mlflow(mlflow_server.uri, runs, rounds, points)
    parents = client.search_runs([runs["experiment_id"]], filter_string=f"attributes.run_name = '{result.job_id}'")
    assert len(parents) == 1

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    for delivered_now in (accepted, 0):
        assert replay.main([str(result.job_dir), "--tracking-uri", elsewhere]) == 0
        assert f"{delivered_now} record(s) delivered now, {accepted} in all" in capfd.readouterr().out
    runs = json.loads((result.job_dir / "mlflow_runs.json").read_text())
    assert sorted(runs) == sorted([mlflow_server.uri, elsewhere])
    assert_learner_records_in_mlflow(elsewhere, runs[elsewhere], rounds, points)
    assert replay.main([str(result.job_dir), "--to", "tensorboard"]) == 0
    assert f"tensorboard: {accepted} record(s) delivered now" in capfd.readouterr().out
    assert replay.main([str(result.job_dir), "--to", "tensorboard"]) == 0
    assert "tensorboard: 0 record(s) delivered now" in capfd.readouterr().out
    assert sorted(p.name for p in (result.job_dir / "tb_events").iterdir()) == ["server", *SITES]
    assert replay.main([str(result.job_dir), "--to", "wandb"]) == 0  # site processes from this process
    assert f"wandb: {accepted} record(s) delivered now" in capfd.readouterr().out
    runs = wandb_series(result.job_dir)
    for site in SITES:
        assert runs[site]["stream"] == sorted((s, _f32(v)) for s, v in expected_stream(site, rounds, points))


def test_records_mlflow_refuses_do_not_hold_up_the_others(tmp_path):
    """A batch holding records MLflow will never take (a bad name, a param changed after a restart):
    those are set aside with MLflow's reason, everything else in the batch arrives, delivery goes on."""
    from fl_ray.receivers.base import ReceiverContext
    from fl_ray.receivers.mlflow import MLflowReceiver
    from fl_ray.tracking.events import EventKind, TrackingEvent
    from fl_ray.tracking.hub import TrackingHub

    def event(seq, kind, key, value, step=None):
        return TrackingEvent("site-1", seq, kind, key, value, step, 1_700_000_000_000 + seq)

    ctx = ReceiverContext(
        job_id="refused-1", job_name="refused", job_dir=tmp_path, workspace=tmp_path, sites=("site-1",), config={"a": 1}
    )
    receiver = MLflowReceiver(buffer_flush_time=0)
    hub = TrackingHub(ctx, [("mlflow", receiver)])
    hub.submit("site-1", [event(0, EventKind.PARAM, "lr", "0.1")])
    wait_for(lambda: hub.pumps[0].delivered == 1, 60, "the first batch")
    good = [event(2 + i, EventKind.METRIC, "loss", float(i), i) for i in range(40)]
    refused = [event(1, EventKind.PARAM, "lr", "0.2"), event(100, EventKind.METRIC, "a//b", 1.0, 0)]
    hub.submit("site-1", [*good[:20], *refused, *good[20:], event(101, EventKind.TAG, "t", "x")])
    report = hub.close("FINISHED", timeout=60)["receivers"]["mlflow"]
    assert report["undelivered"] == 0 and report["dead_letters"] == 2, report
    letters = hub.dead_letters.of("mlflow")
    assert [e.seq for e, _ in letters] == [1, 100], letters
    assert all("INVALID_PARAMETER_VALUE" in reason for _, reason in letters), letters
    client = MlflowClient(receiver.tracking_uri)
    run = client.get_run(report["run_ids"]["site-1"])
    assert history(client, run.info.run_id, "loss") == [(i, float(i)) for i in range(40)]
    assert run.data.params == {"lr": "0.1"} and run.data.tags["t"] == "x"
