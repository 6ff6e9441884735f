"""Shared fixtures: one local Ray instance per test session, a real `mlflow server` on loopback, and a
two-node Ray cluster of ``ray start`` processes (for test_cluster.py, the first module to run).

Under pytest-xdist (``-n 2``, as the README runs the suite) each worker is a test session of its own, with
its own Ray instance and `mlflow server`. Tests go to workers a module at a time (``--dist loadfile``), so
a job that a module's tests share runs once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fl_ray.mlflow_server import LocalMlflowServer

REPO = Path(__file__).resolve().parent.parent

# Tests must not inherit a developer's tracking setup or W&B credentials.
for _var in (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "WANDB_API_KEY",
):
    os.environ.pop(_var, None)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


# For test learners that ignore the data: a small synthetic set, so no actor imports a dataset library.
NO_DATA = {"name": "synthetic", "num_samples": 100}

SESSION_CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": "fl-ray-test", "MLFLOW_TRACKING_PASSWORD": "not-a-real-secret"}


@pytest.fixture(autouse=True)
def no_tracking_uri_left_behind():
    """A test that points MLflow at a job's store (``mlflow.set_tracking_uri`` also writes
    MLFLOW_TRACKING_URI into ``os.environ``) must not send later jobs, or the Ray daemons started
    after it, to that store."""
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None unsets it, and the variable
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs one (4 logical CPUs on this 2-core box)."""
    import logging

    import ray

    # Workers import the tests' own learner and receiver modules, as they would a user's code.
    tests_dir = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    # Every worker starts with tracking credentials in its environment, as on a cluster whose nodes have
    # them (Ray's daemons, and so its workers, inherit them from this process; a runtime_env would start
    # each worker through a set-up process, about a second of CPU more per actor): clients must drop
    # them, the receiver actor must keep them. This process does not keep them.
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SESSION_CREDENTIALS.items():
            patch.setenv(name, value)
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A running `mlflow server` on a free loopback port, for the whole session. Its store is made from fl_ray's
    template, as a job workspace's is (and the server starts without creating MLflow's tables)."""
    from fl_ray.mlflow_store import prepare_sqlite_store

    root = tmp_path_factory.mktemp("mlflow_server")
    prepare_sqlite_store(root / "mlflow.db", root / "artifacts")
    with LocalMlflowServer(root) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """A sqlite MLflow store whose tables exist, made from fl_ray's template (MLflow takes seconds of CPU
    to create them itself); job workspaces start from a copy (see ``workspace``)."""
    from fl_ray.mlflow_store import prepare_sqlite_store

    path = tmp_path_factory.mktemp("mlflow_store") / "mlflow.db"
    prepare_sqlite_store(path, path.parent / "mlartifacts")
    return path


@pytest.fixture(scope="module")
def cluster():
    """A two-node Ray cluster on this host (tests/loopback_cluster.py), stopped with nothing left behind."""
    from loopback_cluster import RAY, LocalCluster

    if not RAY.exists():
        pytest.skip(f"no ray CLI beside {sys.executable}")
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        survivors = c.stop()
        assert not survivors, f"processes of the test cluster still alive: {survivors}"


def new_workspace(path: Path, store: Path) -> Path:
    """A workspace directory at ``path`` holding a copy of the prepared ``store`` as its mlflow.db."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store, path / "mlflow.db")
    return path


@pytest.fixture
def workspace(tmp_path, mlflow_store):
    """A job workspace whose default MLflow store is ready (a copy of ``mlflow_store``)."""
    return new_workspace(tmp_path / "ws", mlflow_store)


def pytest_collection_modifyitems(items):
    """Tests that need Ray, a real `mlflow server` or W&B's processes are slow: `pytest -m "not slow"` is the
    unit tier. Modules run in this order, each module's tests together: the two-node cluster's (the longest)
    first, then the other modules with slow tests, then the unit tests' modules. Under pytest-xdist, one worker
    has the cluster while the other starts on the rest, and the short modules at the end let both finish at
    about the same time."""
    for item in items:
        if {"ray_session", "mlflow_server", "wandb_env", "cluster"} & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    rank: dict[Path, int] = {}
    for item in items:
        here = 0 if "cluster" in item.fixturenames else 1 if item.get_closest_marker("slow") else 2
        rank[item.path] = min(rank.get(item.path, 2), here)
    items.sort(key=lambda item: rank[item.path])


def _take_ctrl_c() -> None:
    """In a new job process, before it runs: Ctrl+C (SIGINT) back to its default. Where the tests run with it
    ignored (a pytest-xdist worker, a shell's background job), a child would inherit that, and Python would
    keep ignoring it instead of raising KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_job_process(workspace, *args):
    """run_fedavg.py in its own process (so it can get a SIGINT, even where the tests' process ignores it),
    on the session's Ray instance."""
    import ray

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "run_fedavg.py"),
            "--workspace",
            str(workspace),
            "--address",
            ray.get_runtime_context().gcs_address,
            "--quiet",
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_take_ctrl_c,
    )
