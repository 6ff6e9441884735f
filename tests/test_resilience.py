"""Client failures, stragglers, failed rounds, Ctrl+C and resume."""

import json
import signal
import time

import pytest
from mlflow.tracking import MlflowClient

from fl_ray import JobConfig, run_job
from fl_ray.rounds import RoundError

from conftest import NO_DATA, new_workspace, start_job_process


def faulty_config(faults, **overrides):
    data = {
        "name": "faulty",
        "num_rounds": 3,
        "sites": 3,
        "min_clients": 2,
        "learner": "user_learners:FaultyLearner",
        "learner_args": {"faults": faults},
        "dataset": NO_DATA,
        "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
        "tracking": {"system_metrics": False},
    }
    data.update(overrides)
    return JobConfig.model_validate(data)


def server_history(result, key):
    info = result.tracking["receivers"]["mlflow"]
    return sorted(
        (m.step, m.value) for m in MlflowClient(info["tracking_uri"]).get_metric_history(info["run_ids"]["server"], key)
    )


@pytest.fixture(scope="module")
def faulty_job(ray_session, tmp_path_factory, mlflow_store):
    """One job, three faults: site-1 is slow in round 2 (with a 2 s grace period once min_clients
    results are in), site-2 raises in round 3, and site-3's process dies in round 4."""
    faults = {"site-1:2": "sleep:10", "site-2:3": "raise", "site-3:4": "exit"}
    cfg = faulty_config(faults, num_rounds=5, wait_after_min_results=2.0)
    workspace = new_workspace(tmp_path_factory.mktemp("faulty"), mlflow_store)
    return run_job(cfg, workspace=workspace, show_progress=False)


def test_a_raising_client_does_not_fail_the_round(faulty_job):
    """site-2 raises in round 3: the round completes with 2 results; the failure is in result.json
    and in the server run."""
    result = faulty_job
    r3 = result.rounds[2]
    assert r3["completed"] == ["site-1", "site-3"]
    assert (
        list(r3["failures"]) == ["site-2 (attempt 1)"]
        and "site-2 broke in round 3" in r3["failures"]["site-2 (attempt 1)"]
    )
    saved = json.loads((result.job_dir / "result.json").read_text())
    assert saved["rounds"][2]["failures"] == r3["failures"]
    assert server_history(result, "sites_failed") == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 0.0)]
    info = result.tracking["receivers"]["mlflow"]
    text = MlflowClient(info["tracking_uri"]).download_artifacts(info["run_ids"]["server"], "failures/round_3.txt")
    assert "site-2 broke in round 3" in open(text).read()


def test_a_dead_client_is_restarted_for_later_rounds(faulty_job):
    """site-3's process dies in round 4: the round goes on without it, Ray restarts the actor, and
    site-3 trains again in round 5 with its step counters continued."""
    result = faulty_job
    assert result.status == "FINISHED"
    assert (
        result.rounds[3]["completed"] == ["site-1", "site-2"] and "site-3 (attempt 1)" in result.rounds[3]["failures"]
    )
    assert result.rounds[4]["completed"] == ["site-1", "site-2", "site-3"]
    info = result.tracking["receivers"]["mlflow"]
    auto = MlflowClient(info["tracking_uri"]).get_metric_history(info["run_ids"]["site-3"], "auto")
    steps = sorted(m.step for m in auto)
    assert steps == sorted(set(steps)) and len(steps) == 12  # rounds 1-3 and 5, 3 points each, no step reused


def test_stragglers_are_left_behind_after_the_grace_period(faulty_job):
    """With wait_after_min_results, a slow site does not hold the round up; it is reported as a straggler."""
    r2 = faulty_job.rounds[1]
    assert r2["completed"] == ["site-2", "site-3"]
    assert "straggler" in r2["failures"]["site-1 (attempt 1)"]
    assert r2["seconds"] < 8  # not the 10 s site-1 took


def test_below_min_clients_the_round_is_retried_then_the_job_fails(ray_session, workspace):
    """Every site fails round 2 (and its retry): the job fails with a clear error, result.json says
    FAILED, and round 1's tracking records are still in MLflow."""
    faults = {f"site-{i}:2": "raise" for i in (1, 2, 3)}
    with pytest.raises(RoundError, match=r"round 2: fewer than min_clients=2 .* in 2 attempt"):
        run_job(faulty_config(faults, round_retries=1), workspace=workspace, show_progress=False)
    job_dir = next(p for p in workspace.iterdir() if p.is_dir() and p.name.startswith("faulty"))
    saved = json.loads((job_dir / "result.json").read_text())
    assert saved["status"] == "FAILED" and "RoundError" in saved["error"]
    assert [r["round"] for r in saved["rounds"]] == [1]
    info = saved["tracking"]["receivers"]["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    assert [m.step for m in client.get_metric_history(info["run_ids"]["site-1"], "known")] == [1]
    assert client.get_run(info["run_ids"]["server"]).info.status == "FAILED"


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.2)


DIGITS = [
    "--set",
    "num_rounds=4",
    "--set",
    "sites=2",
    "--set",
    "local_epochs=1",
    "--set",
    "seed=11",
    "--set",
    "tracking.system_metrics=false",
    "--set",
    "tracking.log_model=false",
]


def test_ctrl_c_then_resume_matches_an_uninterrupted_run(ray_session, tmp_path, mlflow_store):
    """Ctrl+C after round 2 of 10: runs end KILLED and result.json is written; --resume finishes the rounds left
    in the same job and MLflow runs, and every round's global metrics equal an uninterrupted run's.
    Steps continue for every metric: training metrics, and system metrics (sampled once per life here,
    at the end: step 0 before the Ctrl+C, step 1 after the resume)."""
    ws = new_workspace(tmp_path / "ws", mlflow_store)
    proc = start_job_process(
        ws,
        *DIGITS,
        "--set",
        "num_rounds=10",  # rounds take well under a second: room for the Ctrl+C to land before the last
        "--set",
        "tracking.system_metrics=true",
        "--set",
        "tracking.system_metrics_interval=3600",
    )
    _wait_for(lambda: any(ws.glob("*/checkpoints/last.json")), timeout=240)
    checkpoint = next(ws.glob("*/checkpoints/last.json"))
    _wait_for(lambda: checkpoint.stat().st_size and _round_of(checkpoint) >= 2, timeout=120)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, out
    job_dir = checkpoint.parent.parent
    assert f"run --resume {job_dir}" in out, out  # the hint names the real job directory
    stopped = json.loads((job_dir / "result.json").read_text())
    assert stopped["status"] == "KILLED" and len(stopped["rounds"]) < 10
    mlflow = stopped["tracking"]["receivers"]["mlflow"]
    client = MlflowClient(mlflow["tracking_uri"])
    assert client.get_run(mlflow["parent_run_id"]).info.status == "KILLED"

    resumed = start_job_process(ws, "--resume", str(job_dir))
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    final = json.loads((job_dir / "result.json").read_text())
    assert final["status"] == "FINISHED" and [r["round"] for r in final["rounds"]] == list(range(1, 11))
    assert final["tracking"]["receivers"]["mlflow"]["run_ids"] == mlflow["run_ids"]

    config = JobConfig.model_validate(__import__("yaml").safe_load((job_dir / "config.yaml").read_text()))
    uninterrupted = run_job(config, workspace=new_workspace(tmp_path / "ref", mlflow_store), show_progress=False)
    assert [r["global"] for r in final["rounds"]] == [r["global"] for r in uninterrupted.rounds]
    history = client.get_metric_history(mlflow["run_ids"]["server"], "global_accuracy")
    assert sorted((m.step, m.value) for m in history) == [
        (r["round"], r["global"]["accuracy"]) for r in uninterrupted.rounds
    ]
    for site in ("site-1", "site-2"):
        steps = [m.step for m in client.get_metric_history(mlflow["run_ids"][site], "train_loss")]
        assert len(steps) == len(set(steps)), f"{site}: a step was written twice"
        system = client.get_metric_history(mlflow["run_ids"][site], "system/cpu_utilization_percentage")
        assert sorted(m.step for m in system) == [0, 1], f"{site}: system metric steps {[m.step for m in system]}"


def _round_of(path):
    from fl_ray.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path.parent).round
    except Exception:  # being replaced right now
        return 0


def test_a_second_ctrl_c_exits_at_once(ray_session, tmp_path):
    """While the first Ctrl+C waits on a tracking server that is down, a second one exits at once. (The learner
    trains nothing: what is tested is the driver's, and each round takes a fraction of a second.)"""
    ws = tmp_path / "ws"
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    proc = start_job_process(
        ws,
        "--set",
        "num_rounds=1000",
        "--set",
        "sites=2",
        "--set",
        "learner=user_learners:KnownValuesLearner",
        "--set",
        "learner_args={}",
        "--set",
        "dataset={name: synthetic, num_samples: 100}",
        "--set",
        "resources={client_cpus: 0.25, server_cpus: 0.25}",
        "--set",
        "tracking.system_metrics=false",
        "--set",
        "tracking.close_timeout=600",
        "--set",
        f"tracking.receivers=[{{type: mlflow, tracking_uri: '{dead}'}}]",
    )
    _wait_for(lambda: any(ws.glob("*/checkpoints/last.json")), timeout=240)
    proc.send_signal(signal.SIGINT)
    time.sleep(3)
    assert proc.poll() is None, "the first Ctrl+C should still be waiting on the tracking server"
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - start < 10
