"""Server-side tracking into MLflow, end to end: a user learner logs known values through every
MLflowWriter method on 3 sites; MLflow (a sqlite store, and a real `mlflow server` on loopback) is
read back with MlflowClient."""

import pytest
from mlflow.tracking import MlflowClient

from fl_ray import JobConfig, run_job

from conftest import NO_DATA, SESSION_CREDENTIALS
from user_learners import INVALID_CALLS, expected_known, site_number

ROUNDS, SITES, AUTO = 2, ("site-1", "site-2", "site-3"), 3


def known_config(receivers, name="known-values"):
    return JobConfig.model_validate(
        {
            "name": name,
            "num_rounds": ROUNDS,
            "sites": 3,
            "min_clients": 3,
            "learner": "user_learners:KnownValuesLearner",
            "learner_args": {"auto_points": AUTO},
            "dataset": NO_DATA,
            "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
            "tracking": {"receivers": receivers},
        }
    )


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_known_values_in_mlflow(result):
    """Every site's run holds exactly what KnownValuesLearner logged; the server run the global metrics."""
    info = result.tracking["receivers"]["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.run_name == result.job_id and parent.info.status == "FINISHED"
    assert parent.data.tags["fl_ray.job_id"] == result.job_id and "fl_ray.version" in parent.data.tags
    assert parent.data.params["num_rounds"] == str(ROUNDS) and parent.data.params["learner_args.auto_points"] == "3"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == sorted([*SITES, "server"])
    assert all(r.info.status == "FINISHED" for r in children)

    for site in SITES:
        run = client.get_run(info["run_ids"][site])
        assert run.info.run_name == site and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert history(client, run.info.run_id, "known") == [(r, expected_known(site, r)) for r in range(1, ROUNDS + 1)]
        assert history(client, run.info.run_id, "auto") == [
            ((r - 1) * AUTO + i, r * 10 + i) for r in range(1, ROUNDS + 1) for i in range(AUTO)
        ]
        assert history(client, run.info.run_id, "pair_a") == [(r, r) for r in range(1, ROUNDS + 1)]
        assert history(client, run.info.run_id, "pair_b") == [(r, 2 * r) for r in range(1, ROUNDS + 1)]
        assert run.data.params == {"lr": "0.1", "bs": "32", "site_name": site}
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
        assert tags == {
            "role": "client",
            "site_no": str(site_number(site)),
            "credentials_seen": "none",
            "invalid_calls_raised": str(INVALID_CALLS),
            "fl_ray.site": site,
            "fl_ray.job_id": result.job_id,
        }
        text = client.download_artifacts(run.info.run_id, "notes/hello.txt")
        assert open(text).read() == f"hello from {site}"

    server = info["run_ids"]["server"]
    assert history(client, server, "global_loss") == [(r, pytest.approx(1.0 / r)) for r in range(1, ROUNDS + 1)]
    assert [v for _, v in history(client, server, "sites_completed")] == [3.0] * ROUNDS
    # clients_known: the sample-weighted mean (weights 10, 20, 30) of what each site reported
    for r, value in history(client, server, "clients_known"):
        expected = sum(expected_known(s, r) * site_number(s) * 10 for s in SITES) / 60
        assert value == pytest.approx(expected)


def test_known_values_reach_the_default_sqlite_store_and_only_the_receiver_holds_credentials(
    ray_session, tmp_path, monkeypatch
):
    """Default receiver: sqlite:///<workspace>/mlflow.db, artifacts under <workspace>/mlartifacts. Every worker
    of the session starts with tracking credentials; clients drop them (they log credentials_seen=none), the
    receiver actor keeps them and also gets the driver's."""
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "driver-token")
    cfg = known_config([{"type": "mlflow"}, {"type": "user_receivers:CredentialProbe"}])
    result = run_job(cfg, workspace=tmp_path, show_progress=False)
    assert result.tracking["receivers"]["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert_known_values_in_mlflow(result)
    assert any((tmp_path / "mlartifacts").rglob("hello.txt"))
    probe = result.tracking["receivers"]["user_receivers_CredentialProbe"]
    assert probe["credentials"] == sorted([*SESSION_CREDENTIALS, "MLFLOW_TRACKING_TOKEN"])


def test_known_values_reach_a_real_mlflow_server(ray_session, mlflow_server, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI in the driver's environment sends everything to a real `mlflow server`."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    result = run_job(
        known_config([{"type": "mlflow", "buffer_flush_time": 0.5}], name="known-values-server"),
        workspace=tmp_path,
        show_progress=False,
    )
    assert result.tracking["receivers"]["mlflow"]["tracking_uri"] == mlflow_server.uri
    assert_known_values_in_mlflow(result)
    assert not (tmp_path / "mlflow.db").exists()
