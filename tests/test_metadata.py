"""Run metadata for the job's parent run: the command line (secrets masked), no commit tag outside a git
repository, the Ray cluster's resources as a tag within MLflow's limits. A real job's parent run (commit,
dirtiness, resources, description): tests/test_job.py."""

import json
import subprocess
import sys

import pytest

from fl_ray.metadata import MAX_TAG_LENGTH, cluster_resources_tag, run_tags


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
