"""End-to-end jobs on the session's local Ray: digits training, result.json, run metadata, determinism, user
learners."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from fl_ray import ConfigError, JobConfig, run_job

from conftest import NO_DATA, new_workspace
from test_metadata import git

DESCRIPTION = "Checking whether three sites reach 0.9 on digits in three rounds."


def digits_config(**overrides):
    data = {
        "name": "e2e-digits",
        "seed": 3,
        "num_rounds": 3,
        "sites": 3,
        "min_clients": 3,
        "local_epochs": 1,
        "lr": 0.05,
        "description": DESCRIPTION,
        "dataset": {"name": "digits"},
        "learner_args": {"model": "digits_cnn"},
        "resources": {"client_cpus": 0.5, "server_cpus": 0.5},
        "tracking": {"log_model": False, "system_metrics": False},
    }
    data.update(overrides)
    return JobConfig.model_validate(data)


@pytest.fixture(scope="module")
def digits_job(ray_session, tmp_path_factory, mlflow_store):
    """The job, started in a git repository with an uncommitted change; what it showed on its console is kept
    in the workspace's console.txt, the repository's commit in commit.txt."""
    ws = new_workspace(tmp_path_factory.mktemp("ws"), mlflow_store)
    repo = tmp_path_factory.mktemp("repo")
    git(repo, "init", "-q")
    (repo / "train.py").write_text("print('v1')\n")
    git(repo, "add", "train.py")
    git(repo, "commit", "-q", "-m", "first")
    (ws / "commit.txt").write_text(git(repo, "rev-parse", "HEAD"))
    (repo / "train.py").write_text("print('v2')\n")  # uncommitted change: dirty
    console = Console(file=io.StringIO(), width=200, color_system=None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GIT_CEILING_DIRECTORIES", str(repo.parent))
        patch.chdir(repo)
        result = run_job(digits_config(), workspace=ws, console=console)
    (ws / "console.txt").write_text(console.file.getvalue())
    return result, ws


def test_digits_job_learns(digits_job):
    """3 sites on digits: global accuracy rises over the rounds and ends >= 0.9."""
    result, _ = digits_job
    acc = [r["global"]["accuracy"] for r in result.rounds]
    assert result.status == "FINISHED"
    assert len(acc) == 3 and acc[-1] > acc[0] and acc[-1] >= 0.9, acc


def test_result_json_holds_rounds_sites_and_tracking(digits_job):
    """result.json: per-round global metrics (built from rounds.jsonl), per-site sample counts and results,
    final metrics, tracking."""
    result, ws = digits_job
    job_dir = ws / result.job_id
    data = json.loads((job_dir / "result.json").read_text())
    saved_cfg = yaml.safe_load((job_dir / "config.yaml").read_text())

    assert saved_cfg == digits_config().to_dict()
    assert data["status"] == "FINISHED" and data["final_metrics"] == data["rounds"][-1]["global"]
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    # result.json's rounds are rounds.jsonl's lines, one per round; the checkpoint holds none of them
    assert [json.loads(line) for line in (job_dir / "rounds.jsonl").read_text().splitlines()] == data["rounds"]
    assert "rounds" not in json.loads((job_dir / "checkpoints" / "last.json").read_text())
    for r in data["rounds"]:
        assert set(r["global"]) == {"loss", "accuracy"}
        assert r["sampled"] == r["completed"] == ["site-1", "site-2", "site-3"]
        for c in r["clients"].values():
            assert c["num_samples"] > 0 and "train_loss" in c["metrics"] and c["device"] == "cpu"
    assert sum(s["num_samples"] for s in data["sites"].values()) == 1797 - round(1797 * 0.2)
    mlflow = data["tracking"]["receivers"]["mlflow"]
    assert mlflow["tracking_uri"] == f"sqlite:///{ws.resolve() / 'mlflow.db'}"
    assert set(mlflow["run_ids"]) == {"site-1", "site-2", "site-3", "server"}
    assert data["tracking"]["receivers"]["mlflow"]["undelivered"] == 0


def test_every_phase_shows_a_line_and_its_time_goes_to_result_json(digits_job):
    """As each phase starts the job prints a line with the seconds since it began (Ray, starting the sites,
    the tracking receiver ready, the first and all sites ready, delivering tracking, writing results), and
    result.json's timings give each phase's start, in the order they happen."""
    result, ws = digits_job
    output = (ws / "console.txt").read_text()
    lines = [re.sub(r"\s+", " ", line).strip() for line in output.splitlines()]
    expected = [
        "using this process's Ray",
        "starting 3 site(s) (0.5 CPU, 0 GPU each), the server and the tracking receiver",
        "first site ready: site-",
        "all 3 sites ready, on 1 node (",
        "delivering tracking records",
        "writing results",
    ]
    at = [
        next((i for i, line in enumerate(lines) if re.match(r"^\d+\.\ds " + re.escape(text), line)), None)
        for text in expected
    ]
    assert None not in at and at == sorted(at), output
    assert any(re.match(r"^\d+\.\ds tracking: mlflow ready \(sqlite:///", line) for line in lines), output
    assert any(line.startswith(f"{result.job_id}: 3 round(s)") for line in lines), output

    timings = json.loads((ws / result.job_id / "result.json").read_text())["timings"]
    order = [
        "data",
        "ray",
        "actors",
        "first_site_ready",
        "sites_ready",
        "rounds",
        "first_round_done",
        "last_round_done",
        "tracking",
        "tracking_drained",
        "results",
    ]
    assert [timings[k] for k in order] == sorted(timings[k] for k in order), timings
    assert timings["actors"] <= timings["receiver_ready"] <= timings["tracking_drained"], timings
    assert result.timings == timings


def test_same_seed_on_a_pool_of_workers_trains_exactly_as_one_actor_per_site(digits_job, workspace):
    """The same config and seed, run again on a pool of 2 workers for its 3 sites, reproduces every round's
    global metrics, each site's metrics and the final weights of the job with one actor per site."""
    from fl_ray.checkpoint import load_checkpoint

    first, _ = digits_job
    pooled = run_job(
        digits_config(resources={"client_cpus": 0.5, "server_cpus": 0.5, "workers": 2}),
        workspace=workspace,
        show_progress=False,
    )
    assert sorted(pooled.workers) == ["worker-1", "worker-2"] and not first.workers
    assert [r["global"] for r in pooled.rounds] == [r["global"] for r in first.rounds]
    assert [{s: c["metrics"] for s, c in r["clients"].items()} for r in pooled.rounds] == [
        {s: c["metrics"] for s, c in r["clients"].items()} for r in first.rounds
    ]
    ours, theirs = (load_checkpoint(r.job_dir / "checkpoints").weights for r in (pooled, first))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_parent_run_holds_commit_dirtiness_resources_and_description(digits_job, ray_session):
    """Started in a dirty git repository: the parent run's tags name its commit, dirty=true, the command line,
    the Ray cluster's resources (JSON) and the config's description; tracking.log_model: false keeps the best
    model as a checkpoint and logs none."""
    from mlflow.tracking import MlflowClient

    result, ws = digits_job
    info = result.tracking["receivers"]["mlflow"]
    parent = MlflowClient(info["tracking_uri"]).get_run(info["parent_run_id"])
    tags = parent.data.tags
    assert tags["mlflow.source.git.commit"] == (ws / "commit.txt").read_text() and tags["fl_ray.git_dirty"] == "true"
    assert tags["mlflow.note.content"] == DESCRIPTION and parent.data.params["description"] == DESCRIPTION
    assert tags["fl_ray.command"].split()[0] and tags["fl_ray.job_id"] == result.job_id
    resources = json.loads(tags["fl_ray.ray_resources"])
    assert resources["CPU"] == ray_session.cluster_resources()["CPU"] == 4.0 and "memory" in resources
    best = max(result.rounds, key=lambda r: r["global"]["accuracy"])["round"]
    assert result.tracking["model"]["round"] == best and "model_uri" not in result.tracking["model"]


def test_user_learner_by_import_path_and_sampling(ray_session, workspace):
    """A learner from the user's own module runs; sampling picks max(min_clients, ceil(f*n)) sites."""
    cfg = JobConfig.model_validate(
        {
            "name": "user-learner",
            "num_rounds": 2,
            "sites": 4,
            "min_clients": 1,
            "sample_fraction": 0.5,
            "learner": "user_learners:KnownValuesLearner",
            "dataset": NO_DATA,
            "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
        }
    )
    result = run_job(cfg, workspace=workspace, show_progress=False)
    for r in result.rounds:
        assert len(r["sampled"]) == 2 and r["completed"] == r["sampled"]
        # FedAvg of w = 0 + site_number, weighted by site_number * 10 samples
        nums = [int(s.rsplit("-", 1)[1]) for s in r["sampled"]]
        assert r["global"]["accuracy"] == pytest.approx(
            sum(n * n for n in nums) / sum(nums) + (result.rounds[0]["global"]["accuracy"] if r["round"] == 2 else 0),
            rel=1e-6,
        )


@pytest.mark.parametrize(
    "path, words",
    [
        ("user_learners:NotALearner", ["NotALearner", "expected a subclass of fl_ray.learners.Learner"]),
        ("user_learners:Missing", ["has no attribute 'Missing'"]),
        ("no_such_module:Learner", ["cannot import module 'no_such_module'"]),
    ],
)
def test_a_bad_learner_path_is_a_config_error_before_ray(ray_session, tmp_path, path, words):
    """A learner path that does not name a Learner fails before any actor starts, naming the path."""
    cfg = JobConfig.model_validate({"name": "bad-learner", "num_rounds": 1, "sites": 1, "learner": path})
    with pytest.raises(ConfigError) as err:
        run_job(cfg, workspace=tmp_path / "ws", show_progress=False)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "ws").exists()


def test_result_json_is_strict_json():
    """NaN and infinities become null, NumPy values plain numbers and lists, paths strings: any parser reads it."""
    import math

    import numpy as np

    from fl_ray.job import strict_json

    text = strict_json(
        {
            "loss": math.nan,
            "rounds": [{"acc": np.float32(0.5), "w": np.arange(2)}],
            "bad": [math.inf, -math.inf],
            "dir": Path("/tmp/x"),
            1: True,
        }
    )
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "loss": None,
        "rounds": [{"acc": 0.5, "w": [0, 1]}],
        "bad": [None, None],
        "dir": "/tmp/x",
        "1": True,
    }
