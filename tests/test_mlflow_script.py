"""A training script written for MLflow runs unchanged but for a few lines as an fl_ray site
(examples/mlflow_script): the federated form runs end to end on the session's Ray, and every item it
logs with mlflow is read back from the job's MLflow sqlite store."""

import difflib
from pathlib import Path

import torch
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from fl_ray import JobConfig, run_job

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mlflow_script"
SITES = ("site-1", "site-2")


def test_the_federated_form_differs_from_the_centralised_one_in_at_most_six_lines():
    central = (EXAMPLE / "train.py").read_text().splitlines()
    federated = (EXAMPLE / "train_federated.py").read_text().splitlines()
    changed = [
        line
        for line in difflib.unified_diff(central, federated, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert 0 < len(changed) <= 6, changed


def test_the_federated_script_logs_everything_into_each_site_run(ray_session, workspace, monkeypatch):
    import mlflow.pytorch  # here: with pytorch-lightning installed it imports Lightning too, seconds of CPU

    monkeypatch.chdir(EXAMPLE.parent.parent)  # job.yaml's script path is relative to the repository
    config = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    # fl_ray's own sampler off: system/ metrics are the script's; the best global model is test_model_logging's
    config["tracking"] = {"system_metrics": False, "log_model": False}
    config["resources"]["schedule_timeout"] = 600  # sites import torch and mlflow: slow on a busy machine
    result = run_job(JobConfig.model_validate(config), workspace=workspace, show_progress=False)
    assert result.status == "FINISHED", result
    info = result.tracking["receivers"]["mlflow"]
    assert info["undelivered"] == 0
    client = MlflowClient(info["tracking_uri"])
    mlflow.set_tracking_uri(info["tracking_uri"])  # this test's process reads the job's store
    for site in SITES:
        run = client.get_run(info["run_ids"][site])
        assert run.data.params["lr"] == "0.05" and run.data.params["epochs"] == "3"
        for key in ("train_loss", "val_loss", "val_accuracy"):
            points = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in points) == [0, 0, 1, 1, 2, 2], key  # 3 epochs a round, 2 rounds
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), run.data.metrics
        text = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="gpu-info.txt"))
        assert "GPU" in text.read_text()
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        assert len(models) == 2 and all(m.status == LoggedModelStatus.READY for m in models)  # one a round
        loaded = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
        assert loaded(torch.zeros((3, 1, 8, 8))).shape == (3, 10)
