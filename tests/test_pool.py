"""Virtual sites on a pool of workers: how many workers a job gets, and 200 sites on 2 workers end to end."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fl_ray import JobConfig, run_job
from fl_ray.actors.pool import worker_count
from fl_ray.actors.worker import WORKER_TAG
from fl_ray.fedavg import sample_sites
from fl_ray.receivers.mlflow import JOB_TAG, SITE_TAG


@pytest.mark.parametrize(
    "sites, resources, cluster, expected",
    [
        (4, {}, {"CPU": 4.0}, 4),  # (4 - 0.5) / 0.5 = 7 fit: one actor per site
        (200, {}, {"CPU": 4.0}, 7),  # a pool of what fits
        (200, {"client_gpus": 0.5}, {"CPU": 4.0, "GPU": 2.0}, 4),  # GPUs hold fewer than CPUs
        (200, {"client_gpus": 1.0}, {"CPU": 4.0}, 200),  # not one fits: the resource check says so
        (200, {"workers": 3}, {"CPU": 4.0}, 3),
        (3, {"workers": 8}, {"CPU": 4.0}, 8),  # at least the sites: one actor per site
        (200, {"autoscale": True}, {"CPU": 4.0}, 200),
    ],
)
def test_worker_count_defaults_to_sites_when_they_fit_else_what_the_cluster_holds(sites, resources, cluster, expected):
    """resources.workers when set; unset, one per site if the cluster holds them, else as many as it holds."""
    cfg = JobConfig.model_validate({"sites": sites, "resources": resources})
    assert worker_count(cfg, cluster) == expected


def test_200_virtual_sites_on_2_workers_with_a_worker_killed(ray_session, workspace, tmp_path):
    """200 sites, 20 sampled per round, on 2 workers; in round 2 one site's task SIGKILLs its worker. Every
    sampled site trains (the killed task runs again), each site's count kept in ctx.site_state goes on from
    its last round on whichever worker runs it, each site that logged has one MLflow run holding all it
    logged and naming its worker, and each worker logs its system metrics to its own run."""
    cfg = {
        "name": "pool-200",
        "seed": 7,
        "num_rounds": 3,
        "sites": 200,
        "sample_fraction": 0.1,
        "learner": "user_learners:CountingLearner",
        "dataset": {"name": "synthetic", "num_samples": 1000},
        "resources": {"workers": 2, "client_cpus": 0.5, "server_cpus": 0.5},
        "tracking": {"log_model": False, "system_metrics_interval": 60.0},
    }
    rng, names = np.random.default_rng(cfg["seed"]), JobConfig.model_validate(cfg).site_names
    first, second = sample_sites(names, 20, rng), sample_sites(names, 20, rng)
    victim = sorted(set(first) & set(second))[0]  # trained in rounds 1 and 2: its second count must be 2
    cfg["learner_args"] = {"die": f"{victim}:2", "marker_dir": str(tmp_path)}

    result = run_job(JobConfig.model_validate(cfg), workspace=workspace, show_progress=False)

    assert result.status == "FINISHED"
    assert (tmp_path / "killed").exists()  # the worker did die under the victim's task
    assert [r["sampled"] for r in result.rounds[:2]] == [first, second]
    trained: dict[str, int] = {}
    for r in result.rounds:
        assert len(r["sampled"]) == 20 and r["completed"] == sorted(r["sampled"]) and not r["failures"]
        for site in r["sampled"]:
            trained[site] = trained.get(site, 0) + 1
            assert r["clients"][site]["metrics"]["times_trained"] == trained[site]
    assert max(trained.values()) >= 2 and trained[victim] >= 2
    assert {c["worker"] for r in result.rounds for c in r["clients"].values()} == {"worker-1", "worker-2"}
    assert sorted(result.workers) == ["worker-1", "worker-2"] and result.sites[victim]["num_samples"] == 4

    mlflow = result.tracking["receivers"]["mlflow"]
    client = MlflowClient(mlflow["tracking_uri"])
    runs = client.search_runs([mlflow["experiment_id"]], f"tags.`{JOB_TAG}` = '{result.job_id}'", max_results=1000)
    by_site: dict[str, list] = {}
    for run in runs:
        if SITE_TAG in run.data.tags:
            by_site.setdefault(run.data.tags[SITE_TAG], []).append(run)
    assert all(len(found) == 1 for found in by_site.values())
    for site in trained:
        [run] = by_site[site]
        history = client.get_metric_history(run.info.run_id, "times_trained")
        rounds = [r["round"] for r in result.rounds if site in r["sampled"]]
        assert sorted((m.step, m.value) for m in history) == [(r, i + 1) for i, r in enumerate(rounds)]
        assert run.data.tags[WORKER_TAG] in ("worker-1", "worker-2")
    for worker in ("worker-1", "worker-2"):
        [run] = by_site[worker]
        assert "system/cpu_utilization_percentage" in run.data.metrics
