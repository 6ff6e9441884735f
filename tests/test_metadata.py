"""Run metadata on the job's parent run: command line (secrets masked), git commit and dirtiness (in a repository only),
the Ray cluster's resources and the config's description as MLflow's run description."""

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from fl_ray import JobConfig, run_job
from fl_ray.metadata import MAX_TAG_LENGTH, cluster_resources_tag, run_tags

from conftest import new_workspace

DESCRIPTION = "Checking whether two sites reach 0.9 on digits in one round."


def git(repo, *args):
    return subprocess.run(
        [
            "git",
            "-c",
            "user.name=fl-ray-test",
            "-c",
            "user.email=test@example.invalid",
            "-c",
            "commit.gpgsign=false",
            *args,
        ],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def outside_git(tmp_path, monkeypatch):
    """A working directory that is no git repository (git is not to look above tmp_path)."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    return plain


def test_cluster_resources_tag_is_json_within_mlflow_limits():
    """Small clusters: all of ray.cluster_resources(); huge ones: node markers become a count."""
    small = {"CPU": 4.0, "memory": 1e9, "node:10.0.0.1": 1.0, "node:__internal_head__": 1.0}
    assert json.loads(cluster_resources_tag(small)) == small
    huge = {
        "CPU": 4000.0,
        "GPU": 8.0,
        **{f"node:10.0.{i // 250}.{i % 250}": 1.0 for i in range(1000)},
        "node:__internal_head__": 1.0,
    }
    tag = cluster_resources_tag(huge)
    assert len(tag) <= MAX_TAG_LENGTH and json.loads(tag) == {"CPU": 4000.0, "GPU": 8.0, "nodes": 1000}


def test_outside_a_repository_there_is_no_commit_tag(outside_git):
    """Outside a git work tree: no mlflow.source.git.commit and no fl_ray.git_dirty; the rest is there."""
    tags = run_tags("job-1", "a note", {"CPU": 2.0})
    assert "mlflow.source.git.commit" not in tags and "fl_ray.git_dirty" not in tags
    assert tags["mlflow.note.content"] == "a note" and json.loads(tags["fl_ray.ray_resources"]) == {"CPU": 2.0}
    assert tags["fl_ray.command"] and tags["fl_ray.job_id"] == "job-1"
    assert "mlflow.note.content" not in run_tags("job-1")


def test_the_command_line_tag_masks_secrets(outside_git, monkeypatch):
    """Credentials given with --set, and a URL's password, show as *** in fl_ray.command; the rest as typed."""
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "/repo/scripts/run_fedavg.py",
            "--set",
            "num_rounds=2",
            "--set",
            "tracking.credentials.MLFLOW_TRACKING_PASSWORD=s3cret-pw",
            "--address",
            "ray://ann:pw-2@head:10001",
        ],
    )
    assert run_tags("job-1")["fl_ray.command"] == (
        "run_fedavg.py --set num_rounds=2 --set "
        "'tracking.credentials.MLFLOW_TRACKING_PASSWORD=***' "
        "--address 'ray://ann:***@head:10001'"
    )


def test_parent_run_holds_commit_dirtiness_resources_and_description(ray_session, tmp_path, mlflow_store, monkeypatch):
    """A job started in a dirty git repository: the parent run's tags name its commit, dirty=true, the
    command line, the Ray cluster's resources (JSON) and the config's description."""
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    git(repo, "init", "-q")
    (repo / "train.py").write_text("print('v1')\n")
    git(repo, "add", "train.py")
    git(repo, "commit", "-q", "-m", "first")
    commit = git(repo, "rev-parse", "HEAD")
    (repo / "train.py").write_text("print('v2')\n")  # uncommitted change: dirty
    monkeypatch.chdir(repo)

    cfg = JobConfig.model_validate(
        {
            "name": "metadata",
            "num_rounds": 1,
            "sites": 2,
            "min_clients": 2,
            "description": DESCRIPTION,
            "learner_args": {"model": "digits_cnn"},
            "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
            "tracking": {"system_metrics": False, "log_model": False},
        }
    )
    result = run_job(cfg, workspace=new_workspace(tmp_path / "ws", mlflow_store), show_progress=False)
    assert result.status == "FINISHED"

    info = result.tracking["receivers"]["mlflow"]
    parent = MlflowClient(info["tracking_uri"]).get_run(info["parent_run_id"])
    tags = parent.data.tags
    assert tags["mlflow.source.git.commit"] == commit and tags["fl_ray.git_dirty"] == "true"
    assert tags["mlflow.note.content"] == DESCRIPTION and parent.data.params["description"] == DESCRIPTION
    assert tags["fl_ray.command"].split()[0] and tags["fl_ray.job_id"] == result.job_id
    resources = json.loads(tags["fl_ray.ray_resources"])
    assert resources["CPU"] == ray_session.cluster_resources()["CPU"] == 4.0 and "memory" in resources
    # tracking.log_model: false keeps the best model as a checkpoint and logs none
    assert result.tracking["model"]["round"] == 1 and "model_uri" not in result.tracking["model"]
