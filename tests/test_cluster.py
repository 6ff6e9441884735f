"""A real two-node Ray cluster on this machine (tests/loopback_cluster.py): a FedAvg job through `ray job
submit`, a job that asks too much, fractional GPUs, site-local tracking, credentials (test_secrets.py's
check, on the cluster). Every test on the cluster is here, so that it is started once."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import new_workspace
from loopback_cluster import tail
from test_secrets import check_credentials_reach_the_receiver_actor_only

REPO = Path(__file__).resolve().parent.parent
# Not uploaded with --working-dir: the virtualenv (GBs), job outputs, data, VCS and caches.
UPLOAD_EXCLUDES = [
    ".venv",
    ".git",
    "workspace",
    "data",
    "mlruns",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".hypothesis",
]
JOB_TIMEOUT = 300
GPU_SITES = 4  # sites at 0.25 GPU each: together, the one GPU of the worker node

pytestmark = pytest.mark.slow  # the two-node Ray cluster


def test_cluster_has_two_nodes(cluster):
    """The head and the worker node are separate raylets of one cluster, with their own resources."""
    nodes = {n["node_id"]: n for n in cluster.nodes() if n["state"] == "ALIVE"}

    assert set(nodes) == {cluster.head_id, cluster.worker_id}
    assert cluster.head_id != cluster.worker_id
    assert nodes[cluster.head_id]["resources_total"]["head"] == 1
    assert nodes[cluster.worker_id]["resources_total"]["worker"] == 1


def test_submitted_job_spreads_sites_over_both_nodes_and_tracks_to_mlflow(cluster, tmp_path, mlflow_store):
    """`ray job submit` runs 4 sites spread over both nodes; MLflow gets a parent run with 4 site runs + server."""
    from mlflow.tracking import MlflowClient

    workspace = new_workspace(tmp_path / "workspace", mlflow_store)
    submission_id = f"fl-ray-test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    res = cluster.ray(
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": UPLOAD_EXCLUDES}),
        "--",
        sys.executable,
        "scripts/run_fedavg.py",
        "--workspace",
        str(workspace),
        "--set",
        "sites=4",
        "--set",
        "num_rounds=2",
        "--set",
        "resources.client_cpus=0.5",
        "--set",
        "resources.placement=spread",
        "--set",
        "local_epochs=1",
        "--set",
        "tracking.log_model=false",
        "--quiet",  # the best model is tested in test_model_logging.py
        timeout=JOB_TIMEOUT,
    )
    seconds = time.monotonic() - started

    output = res.stdout + res.stderr
    assert res.returncode == 0, f"job failed after {seconds:.0f} s:\n{tail(output)}"
    assert f"Job '{submission_id}' succeeded" in output
    results = list(workspace.glob("*/result.json"))
    assert len(results) == 1, results
    result = json.loads(results[0].read_text())
    assert result["status"] == "FINISHED" and result["error"] is None
    assert len(result["rounds"]) == 2
    # Placement: every site ran, spread over both raylets, which are exactly this cluster's nodes.
    sites = result["sites"]
    assert sorted(sites) == ["site-1", "site-2", "site-3", "site-4"]
    assert {s["node_id"] for s in sites.values()} == {cluster.head_id, cluster.worker_id}
    assert all(s["device"] == "cpu" and s["num_samples"] > 0 for s in sites.values())
    # Tracking: the default store is in the workspace given on the command line.
    mlflow = result["tracking"]["receivers"]["mlflow"]
    assert mlflow["tracking_uri"] == f"sqlite:///{workspace / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=mlflow["tracking_uri"])
    parent = client.get_run(mlflow["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["fl_ray.job_id"] == result["job_id"]
    children = client.search_runs(
        [mlflow["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{mlflow['parent_run_id']}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"site-1", "site-2", "site-3", "site-4", "server"}
    assert {n: r.info.run_id for n, r in by_name.items()} == mlflow["run_ids"]
    for name in sites:
        run = by_name[name]
        assert run.info.status == "FINISHED"
        assert {"train_loss", "val_accuracy"} <= set(run.data.metrics), (name, run.data.metrics)
    history = client.get_metric_history(by_name["server"].info.run_id, "global_accuracy")
    assert sorted(m.step for m in history) == [1, 2]


def test_job_asking_for_gpus_the_cluster_lacks_fails_fast_with_asked_and_available(cluster, tmp_path):
    """A driver joining with --address and asking 1 GPU for each of 4 site actors (resources.workers=4: one per
    site) fails in bounded time, naming asked vs available."""
    workspace = tmp_path / "workspace"
    started = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "scripts/run_fedavg.py",
            "--address",
            cluster.gcs_address,
            "--workspace",
            str(workspace),
            "--set",
            "sites=4",
            "--set",
            "num_rounds=1",
            "--set",
            "resources.client_gpus=1",
            "--set",
            "resources.workers=4",
            "--quiet",
        ],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
    )
    seconds = time.monotonic() - started

    message = " ".join((res.stdout + res.stderr).split())  # rich wraps lines at the terminal width
    assert res.returncode == 1, f"exit {res.returncode}:\n{tail(res.stdout + res.stderr)}"
    assert seconds < 90, f"took {seconds:.0f} s to fail"
    # What was asked (total and how it adds up) and what the cluster has; the exact wording may change.
    assert re.search(r"job failed: ResourceError: .*\bask\w* for 4 GPU \(4 sites x 1\)", message), message
    assert re.search(r"\bcluster has 1\b", message), message
    result = json.loads(next(workspace.glob("*/result.json")).read_text())
    assert result["status"] == "FAILED"
    assert "ResourceError" in result["error"] and result["sites"] == {}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_fractional_gpus_and_site_local_tracking_on_the_site_node(cluster, tmp_path, mlflow_store):
    """4 sites at 0.25 GPU share the cluster's one GPU: all are placed on its node (the worker) and given GPU 0
    (Ray sets CUDA_VISIBLE_DEVICES; a site uses cuda:0 where CUDA exists, the CPU here). site-1 keeps its
    tracking at home (tracking.site_receivers): its own receiver actor runs on its node, the site's store gets
    every record of site-1, the server's store only the keys of tracking.share, and the site's credential,
    planted in its credentials file, reaches that actor and no other process, file or log; the other sites log
    to the server as usual."""
    import yaml
    from mlflow.tracking import MlflowClient

    from test_secrets import _file_leaks

    planted = {"site credential": f"planted-site-{secrets.token_hex(8)}"}
    creds = tmp_path / "site-1.env"
    creds.write_text(f"MLFLOW_TRACKING_PASSWORD={planted['site credential']}\n")
    creds.chmod(0o600)
    gate, site_home = tmp_path / "gate", tmp_path / "site-home"
    gate.mkdir()
    probe = {"type": "user_receivers:CredentialProbe"}
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "sitelocal",
                "num_rounds": 1,
                "sites": GPU_SITES,
                "min_clients": GPU_SITES,
                "dataset": {"name": "synthetic", "num_samples": 100},
                "learner": "test_secrets:GatedLearner",  # logs known values; waits in round 1 for the gate
                "learner_args": {"gate": str(gate)},
                "resources": {"client_cpus": 0.25, "client_gpus": 0.25, "server_cpus": 0.25},
                "tracking": {
                    "receivers": [{"type": "mlflow"}, probe],
                    "site_receivers": {"site-1": [{"type": "mlflow"}, probe]},
                    "share": ["known", "pair_*"],
                    "site_workspace": str(site_home),
                    "site_credentials_file": {"site-1": str(creds)},
                    "system_metrics": False,
                    "log_model": False,
                },
            }
        )
    )
    workspace = new_workspace(tmp_path / "workspace", mlflow_store)
    output = tmp_path / "driver.out"
    cmd = [sys.executable, "scripts/run_fedavg.py", "--address", cluster.gcs_address, "--config", str(config)]
    with output.open("wb") as out:
        driver = subprocess.Popen(
            [*cmd, "--workspace", str(workspace), "--quiet"], cwd=REPO, env=cluster.env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while len(list(gate.glob("ready-*"))) < GPU_SITES:  # every site is in round 1: every actor runs
            assert driver.poll() is None, f"the job ended early:\n{tail(output.read_text())}"
            assert time.monotonic() < deadline, f"the sites did not start:\n{tail(output.read_text())}"
            time.sleep(0.2)
        site_receiver = [p for p in cluster.processes(1) if "SiteReceiverActor" in " ".join(_cmdline(p))]
        assert len(site_receiver) == 1, "site-1's receiver actor is not one process of the worker node"
        holders = [
            f"{p.pid} {' '.join(_cmdline(p))[:80]}"
            for p in [*cluster.processes(), psutil.Process(driver.pid)]
            if p.pid != site_receiver[0].pid and _holds(p, planted["site credential"])
        ]
        assert not holders, holders
        (gate / "go").touch()
        assert driver.wait(JOB_TIMEOUT) == 0, tail(output.read_text())
    finally:
        (gate / "go").touch()
        if driver.poll() is None:
            driver.kill()
            driver.wait()

    result = json.loads(next(workspace.glob("sitelocal-*/result.json")).read_text())
    assert result["status"] == "FINISHED" and len(result["sites"]) == GPU_SITES
    for site, info in result["sites"].items():
        assert info["node_id"] == cluster.worker_id, site
        assert info["gpu_ids"] == ["0"], site
        assert info["device"] == ("cuda:0" if _has_cuda() else "cpu"), site
    tracking = result["tracking"]
    local = tracking["site_receivers"]["site-1"]
    assert local["node_id"] == cluster.worker_id and Path(local["job_dir"]).parent == site_home / "site-1"
    assert local["receivers"]["user_receivers_CredentialProbe"]["credentials"] == ["MLFLOW_TRACKING_PASSWORD"]
    assert tracking["receivers"]["user_receivers_CredentialProbe"]["credentials"] == []
    assert set(tracking["site_receivers"]) == {"site-1"}

    def site_run(receiver: dict[str, Any], site: str) -> Any:
        return MlflowClient(receiver["tracking_uri"]).get_run(receiver["run_ids"][site])

    home = local["receivers"]["mlflow"]
    assert home["tracking_uri"] == f"sqlite:///{site_home / 'site-1' / 'mlflow.db'}"
    at_home = site_run(home, "site-1").data
    assert set(at_home.metrics) == {"known", "auto", "pair_a", "pair_b"}
    assert set(at_home.params) == {"lr", "bs", "site_name"}
    assert at_home.tags["role"] == "client" and at_home.tags["credentials_seen"] == "none"
    history = MlflowClient(home["tracking_uri"]).get_metric_history(home["run_ids"]["site-1"], "auto")
    assert sorted(m.value for m in history) == [10, 11, 12]  # each point once
    server = tracking["receivers"]["mlflow"]
    shared = site_run(server, "site-1").data
    assert set(shared.metrics) == {"known", "pair_a", "pair_b"} and shared.params == {}
    assert "role" not in shared.tags and "credentials_seen" not in shared.tags
    for site in (f"site-{i}" for i in range(2, GPU_SITES + 1)):
        assert set(site_run(server, site).data.metrics) == {"known", "auto", "pair_a", "pair_b"}, site
    assert local["receivers"]["server"]["shared"] == 3

    for root in (workspace, site_home, Path(cluster.temp_dir)):
        assert not _file_leaks(root, planted), root
    assert planted["site credential"] not in output.read_text()


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _holds(p: psutil.Process, secret: str) -> bool:
    """Whether ``p``'s environment or command line holds ``secret`` (False for a process that ended)."""
    try:
        return (
            secret.encode() in Path(f"/proc/{p.pid}/environ").read_bytes() + Path(f"/proc/{p.pid}/cmdline").read_bytes()
        )
    except OSError:
        return False


def test_credentials_reach_the_receiver_actor_only_on_a_cluster(cluster, tmp_path, mlflow_store, request):
    """As on a local Ray (test_secrets.py), with the driver joining the two-node cluster, whose state API
    (actors, jobs, tasks, workers, runtime envs, ...) must not show the secrets either."""
    check_credentials_reach_the_receiver_actor_only(cluster, tmp_path, mlflow_store, request)
