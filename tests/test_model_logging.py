"""The global model as an MLflow model: the server keeps the best round's model by server.key_metric /
key_mode as <job>/checkpoints/best.npz + best.json, the receiver actor logs it into the `server` run with
mlflow.pytorch.log_model (pt2) and registers it when tracking.register_model_name is set; loaded back,
it reproduces the accuracy the job reported for that round on the test split."""

import json
import uuid

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from fl_ray import ConfigError, JobConfig, run_job
from fl_ray.checkpoint import improves, load_best
from fl_ray.config import parse_config
from fl_ray.data import ArrayData, site_data


def small_job(name, server=None, **tracking):
    """Digits, 2 sites, 2 rounds, small CPU shares, no system metrics: a few seconds of training."""
    return JobConfig.model_validate(
        {
            "name": name,
            "seed": 1,
            "num_rounds": 2,
            "sites": 2,
            "min_clients": 2,
            "dataset": {"name": "digits"},
            "learner_args": {"model": "digits_cnn"},
            "resources": {"client_cpus": 0.25, "server_cpus": 0.25},
            "server": server or {},
            "tracking": {"system_metrics": False, **tracking},
        }
    )


def best_round(result, key, mode):
    """The first round with the best value of the global metric ``key``."""
    values = [r["global"][key] for r in result.rounds]
    best = max(values) if mode == "max" else min(values)
    return result.rounds[values.index(best)]


def accuracy_on_test_split(model, cfg):
    """Accuracy of a loaded model on the job's test split (as the server evaluates it)."""
    test, _ = site_data(cfg.dataset, cfg.seed, len(cfg.site_names), None)
    with torch.no_grad():
        predicted = model(torch.from_numpy(np.asarray(test.x))).argmax(1).numpy()
    return float((predicted == np.asarray(test.y)).mean())


def assert_logged_to_server_run(client, result, model_info):
    """The model is an output of the job's `server` run, saved in the pt2 format."""
    import mlflow

    server_run = result.tracking["receivers"]["mlflow"]["run_ids"]["server"]
    logged = client.get_logged_model(model_info["model_id"])
    assert logged.source_run_id == server_run
    assert model_info["model_id"] in [o.model_id for o in client.get_run(server_run).outputs.model_outputs]
    assert logged.tags["fl_ray.round"] == str(model_info["round"]) and logged.tags["fl_ray.job_id"] == result.job_id
    files = mlflow.artifacts.list_artifacts(artifact_uri=f"{logged.artifact_location}/data")
    assert [f.path.rsplit("/", 1)[-1] for f in files] == ["model.pt2"]


def test_improves_ranks_by_mode():
    """max keeps the higher value, min the lower; the first value always counts, a tie or NaN never does."""
    assert improves(0.5, None, "max") and improves(0.5, None, "min")
    assert improves(0.6, 0.5, "max") and not improves(0.4, 0.5, "max") and not improves(0.5, 0.5, "max")
    assert improves(0.4, 0.5, "min") and not improves(0.6, 0.5, "min") and not improves(0.5, 0.5, "min")
    assert not improves(float("nan"), None, "max") and not improves(float("nan"), 0.5, "min")
    with pytest.raises(ValueError, match="key_mode"):
        improves(0.5, 0.4, "largest")


def test_model_settings_are_validated():
    """An unknown key_mode, an empty key_metric, or a registry name without log_model are ConfigErrors."""
    with pytest.raises(ConfigError, match=r"server\.key_mode: expected 'max' or 'min', got 'biggest'"):
        parse_config({"server": {"key_mode": "biggest"}})
    with pytest.raises(ConfigError, match=r"server\.key_metric"):
        parse_config({"server": {"key_metric": ""}})
    with pytest.raises(ConfigError, match=r"tracking\.register_model_name: 'm' needs tracking\.log_model: true"):
        parse_config({"tracking": {"register_model_name": "m", "log_model": False}})
    cfg = parse_config({})
    assert (cfg.server.key_metric, cfg.server.key_mode, cfg.tracking.log_model) == ("accuracy", "max", True)


def test_uint8_images_export_with_their_scaling(tmp_path):
    """CIFAR-like uint8 input: the exported module scales it as training does, and survives pt2 save/load."""
    import mlflow.pytorch

    from fl_ray.learners import ImageClassificationLearner, LearnerContext

    rng = np.random.default_rng(0)
    data = ArrayData(rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 20))
    learner = ImageClassificationLearner(model="hello_pt_cnn")
    learner.setup(
        LearnerContext(
            site="server",
            config=JobConfig(),
            data=data,
            num_classes=10,
            input_shape=(3, 32, 32),
        )
    )
    model, example = learner.export_model(learner.get_weights())
    assert example.dtype == np.uint8 and example.shape == (8, 3, 32, 32)

    mlflow.pytorch.save_model(
        model, tmp_path / "model", input_example=example, pip_requirements=mlflow.pytorch.get_default_pip_requirements()
    )
    assert (tmp_path / "model" / "data" / "model.pt2").exists()
    loaded = mlflow.pytorch.load_model(str(tmp_path / "model"))
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        expected = learner.model.eval()((x.float() / 255.0 - 0.5) / 0.5)
        assert torch.allclose(loaded(x), expected, atol=1e-5)


def test_best_model_is_logged_registered_and_reproduces_its_round(ray_session, workspace, monkeypatch):
    """The default sqlite store, server.key_metric loss / key_mode min and tracking.register_model_name: the
    best model (checkpoints/best.npz) is logged to the server run and result.json records its URI; the
    registered version exists and points at the server run; loaded back, the model scores the accuracy the
    job reported for that round. (The default key, accuracy / max: test_model_settings_are_validated.)"""
    import mlflow.pytorch

    name = f"fl-ray-digits-{uuid.uuid4().hex[:8]}"
    cfg = small_job("best-model", server={"key_metric": "loss", "key_mode": "min"}, register_model_name=name)
    result = run_job(cfg, workspace=workspace, show_progress=False)
    assert result.status == "FINISHED"

    best = best_round(result, "loss", "min")
    model_info = result.tracking["model"]
    assert (model_info["round"], model_info["key_metric"], model_info["key_mode"]) == (best["round"], "loss", "min")
    assert model_info["value"] == best["global"]["loss"]
    assert model_info["registered_model_name"] == name and model_info["registered_model_version"] == "1"
    saved = load_best(workspace / result.job_id / "checkpoints")
    assert saved.round == best["round"] and saved.metrics == best["global"]
    on_disk = json.loads((workspace / result.job_id / "result.json").read_text())["tracking"]["model"]
    assert on_disk["model_uri"] == model_info["model_uri"] and model_info["model_uri"].startswith("models:/")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.tracking["receivers"]["mlflow"]["tracking_uri"])
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{name}'")
    assert [(str(v.version), v.run_id, v.source) for v in versions] == [  # an int from sqlite
        ("1", result.tracking["receivers"]["mlflow"]["run_ids"]["server"], f"models:/{model_info['model_id']}")
    ]
    assert_logged_to_server_run(client, result, model_info)
    for uri in (model_info["model_uri"], f"models:/{name}/1"):
        model = mlflow.pytorch.load_model(uri)
        assert accuracy_on_test_split(model, cfg) == pytest.approx(best["global"]["accuracy"], abs=1e-12)
