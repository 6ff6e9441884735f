"""MLflow's own API on a site, end to end: ``FluentLearner`` (tests/mlflow_learners.py) logs with ``import
mlflow`` and ``ctx.mlflow``'s file methods on two virtual sites of a one-worker pool; what it logged is read
back from MLflow (sqlite), TensorBoard's event files and W&B's offline runs, each item once."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_ray import JobConfig, run_job

from conftest import NO_DATA
from wandb_reader import read_runs

SITES = ("site-1", "site-2")


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory, mlflow_store):
    from conftest import new_workspace

    workspace = new_workspace(tmp_path_factory.mktemp("plugin") / "ws", mlflow_store)
    cfg = JobConfig.model_validate(
        {
            "name": "mlflow-plugin",
            "num_rounds": 2,
            "sites": 2,
            "min_clients": 2,
            "learner": "mlflow_learners:FluentLearner",
            "dataset": NO_DATA,
            "resources": {"client_cpus": 0.25, "server_cpus": 0.25, "workers": 1, "schedule_timeout": 600},
            "tracking": {
                "receivers": [{"type": "mlflow"}, {"type": "tensorboard", "flush_secs": 0}, {"type": "wandb"}],
                "system_metrics": False,
                "max_artifact_mb": 0.02,
            },
        }
    )
    result = run_job(cfg, workspace=workspace, show_progress=False)
    assert result.status == "FINISHED", result.error
    return result


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact(run_id, path):
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def test_every_fluent_call_lands_in_the_site_run_once(job):
    info = job.tracking["receivers"]["mlflow"]
    assert info["undelivered"] == 0 and "dead_letters" not in info
    client = MlflowClient(info["tracking_uri"])
    mlflow.set_tracking_uri(info["tracking_uri"])
    for site in SITES:
        run = client.get_run(info["run_ids"][site])
        assert run.data.params == {"site_name": site, "lr": "0.1", "layers": "2"}
        assert history(client, run.info.run_id, "fluent") == [(0, 10.0), (0, 20.0)]
        stepped = client.get_metric_history(run.info.run_id, "stepped")
        assert sorted((m.step, m.value, m.timestamp) for m in stepped) == [
            (1, 1.5, 1_700_000_000_001),
            (2, 2.5, 1_700_000_000_002),
        ]
        assert history(client, run.info.run_id, "pair_b") == [(1, 2.0), (2, 4.0)]
        assert run.data.tags["role"] == "fluent" and run.data.tags["last_round"] == "2"
        assert artifact(run.info.run_id, "notes/hello.txt").read_text() == f"hello from {site}"
        assert json.loads(artifact(run.info.run_id, "meta/site.json").read_text()) == {"site": site}
        assert artifact(run.info.run_id, "plots/curve.png").read_bytes()[:4] == b"\x89PNG"
        assert artifact(run.info.run_id, "files/data.csv").read_text() == "a,b\n1,2\n"
        assert artifact(run.info.run_id, "tree/sub/leaf.bin").read_bytes() == bytes(range(256)) * 4
        assert json.loads(artifact(run.info.run_id, "table.json").read_text())["data"] == [[2, site]]
        assert artifact(run.info.run_id, "writer/d.yaml").read_text() == "k:\n- 1\n- 2\n"
        assert artifact(run.info.run_id, "writer/data.csv").read_text() == "a,b\n1,2\n"
        assert artifact(run.info.run_id, "writer/fig.png").read_bytes()[:4] == b"\x89PNG"

        [child] = client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        )
        assert child.info.run_name == "inner" and history(client, child.info.run_id, "inner_metric") == [(1, 1), (2, 2)]

        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        assert sorted(m.name for m in models) == ["fluent_model", "writer_model"]  # each once
        for model in models:
            loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}")
            out = loaded(torch.from_numpy(np.ones((4, 2), dtype=np.float32)))
            assert out.shape == (4, 2 if model.name == "fluent_model" else 3)


def test_what_a_site_cannot_do_fails_with_the_reason(job):
    info = job.tracking["receivers"]["mlflow"]
    tags = MlflowClient(info["tracking_uri"]).get_run(info["run_ids"]["site-1"]).data.tags
    assert "search_runs is not available on an fl_ray site" in tags["search_error"]
    assert "is not a run of site 'site-1'" in tags["other_run_error"]
    for key in ("limit_error", "writer_limit_error"):
        assert "big.bin is 0.0286 MB, over the limit of tracking.max_artifact_mb = 0.02 MB" in tags[key], tags[key]


def test_tensorboard_shows_texts_and_images_of_files(job):
    for site in SITES:
        acc = EventAccumulator(str(job.job_dir / "tb_events" / site), size_guidance={"tensors": 0, "images": 0})
        acc.Reload()
        assert {"notes/hello.txt", "meta/site.json", "files/data.csv"} <= set(acc.Tags()["tensors"])
        assert {"plots/curve.png", "writer/fig.png"} <= set(acc.Tags()["images"])
        inner = EventAccumulator(str(job.job_dir / "tb_events" / site / "inner"), size_guidance={"scalars": 0})
        inner.Reload()
        assert [(s.step, s.value) for s in inner.Scalars("inner_metric")] == [(1, 1.0), (2, 2.0)]
    summary = job.tracking["receivers"]["tensorboard"]
    assert summary["images"] == 2 * 2 * 1 + 2 * 1 and summary["skipped"] > 0


def test_wandb_runs_hold_the_files(job):
    """Each file is in the run's files/ of the segment (delivery) that logged it: once a round when logged
    each round."""

    def copies(run, relative):
        return [p.parent / "files" / relative for p in run.segments if (p.parent / "files" / relative).exists()]

    runs = read_runs(job.job_dir / "wandb")
    for site in SITES:
        run = runs[site]
        hello = copies(run, "notes/hello.txt")
        assert hello and all(p.read_text() == f"hello from {site}" for p in hello)
        leaf = copies(run, "tree/sub/leaf.bin")
        assert leaf and all(p.read_bytes() == bytes(range(256)) * 4 for p in leaf)
        assert len(copies(run, "writer_model/MLmodel")) == 1 and len(copies(run, "writer/data.csv")) == 1


def test_the_spool_keeps_files_only_until_every_receiver_has_them(job):
    assert not (job.job_dir / "spool" / "blobs").exists()


def test_lightning_mlflow_logger_and_autolog_reach_the_site_run(ray_session, workspace):
    pytest.importorskip("lightning")
    cfg = JobConfig.model_validate(
        {
            "name": "mlflow-lightning",
            "num_rounds": 2,
            "sites": 1,
            "min_clients": 1,
            "learner": "mlflow_learners:LightningMLflowLearner",
            "dataset": {"name": "digits"},
            "resources": {"client_cpus": 0.5, "server_cpus": 0.25, "schedule_timeout": 600},
            "tracking": {"system_metrics": False},
        }
    )
    result = run_job(cfg, workspace=workspace, show_progress=False)
    assert result.status == "FINISHED", result.error
    info = result.tracking["receivers"]["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_ids"]["site-1"])
    assert {"lr", "momentum", "num_classes"} <= set(run.data.params)  # MLFlowLogger: the module's hparams
    assert {"epochs", "optimizer_name"} <= set(run.data.params)  # autolog's
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2  # one epoch each round
    [model] = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert model.status == LoggedModelStatus.READY
