"""A fresh sqlite MLflow store from the cached template: ready for MlflowClient and `mlflow server`, at
MLflow's own schema revision, and never a template that does not match it."""

from __future__ import annotations

import sqlite3

import pytest
from mlflow.tracking import MlflowClient

from fl_ray import mlflow_store
from fl_ray.mlflow_store import prepare_sqlite_store, schema_revision, template_store


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache directory of this module's own, with the template made once."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(path))
        template_store()
        yield path


@pytest.fixture
def in_cache(cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache / "fl_ray"


def test_a_store_made_from_the_template_works_with_mlflow(in_cache, tmp_path):
    """The copy is at MLflow's head revision; runs, metrics and params go in and come back; its Default
    experiment keeps artifacts under the workspace, as a store MLflow made there would."""
    db = tmp_path / "ws" / "mlflow.db"
    assert prepare_sqlite_store(db, tmp_path / "ws" / "mlartifacts")
    assert schema_revision(db) == mlflow_store._head_revision()
    client = MlflowClient(f"sqlite:///{db}")
    default = client.get_experiment("0")
    assert default.name == "Default" and default.artifact_location == (tmp_path / "ws" / "mlartifacts").as_uri()
    run = client.create_run(client.create_experiment("e")).info.run_id
    client.log_metric(run, "loss", 0.5, step=3)
    client.log_param(run, "lr", "0.1")
    got = client.get_run(run).data
    assert got.metrics == {"loss": 0.5} and got.params == {"lr": "0.1"}


def test_an_existing_store_is_left_alone(in_cache, tmp_path):
    db = tmp_path / "mlflow.db"
    assert prepare_sqlite_store(db, tmp_path)
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.create_experiment("kept")
    assert not prepare_sqlite_store(db, tmp_path)
    assert client.get_experiment_by_name("kept").experiment_id == experiment


def test_a_template_at_another_revision_is_made_again(in_cache, tmp_path):
    """A cached template whose alembic revision is not MLflow's head is never copied: it is made again."""
    template = template_store()
    with sqlite3.connect(template) as db:
        db.execute("UPDATE alembic_version SET version_num = 'not-this-one'")
    db.close()
    assert schema_revision(template) == "not-this-one"
    target = tmp_path / "mlflow.db"
    assert prepare_sqlite_store(target, tmp_path)
    assert schema_revision(target) == schema_revision(template) == mlflow_store._head_revision()


def test_mlflow_server_reads_a_store_made_from_the_template(mlflow_server):
    """`mlflow server` (what `mlflow ui` runs) serves a template-made store (the session's server runs on one):
    runs written to the store beside it, and new writes through it."""
    db = mlflow_server.root / "mlflow.db"
    assert schema_revision(db) == mlflow_store._head_revision()
    local = MlflowClient(f"sqlite:///{db}")
    run = local.create_run(local.create_experiment("written-beside-the-server")).info.run_id
    local.log_metric(run, "loss", 1.5, step=0)
    remote = MlflowClient(mlflow_server.uri)
    assert remote.get_run(run).data.metrics == {"loss": 1.5}
    new = remote.create_run(remote.get_run(run).info.experiment_id).info.run_id
    remote.log_metric(new, "acc", 0.9, step=1)
    assert [m.value for m in remote.get_metric_history(new, "acc")] == [0.9]
    assert [m.value for m in local.get_metric_history(new, "acc")] == [0.9]
