"""What each process of a job imports: nothing heavy that only another process (or one back end) needs.

The driver builds and checks the learner, strategy and receivers without PyTorch, MLflow or matplotlib;
the server and the sites import no tracking back end (a site loads MLflow only when its own code imports
it, and MLflow's API then writes through the ``fl-ray://`` store); the receiver actor imports no PyTorch. Real Ray:
each actor's own ``sys.modules`` is read inside it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from conftest import NO_DATA
from fl_ray.config import parse_config

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "mlflow", "matplotlib", "pandas", "sqlalchemy", "wandb", "tensorboard", "lightning")


def heavy_modules() -> list[str]:
    """The heavy packages this process has imported."""
    return sorted(m for m in HEAVY if m in sys.modules)


def fresh_python(code: str, cwd: Path) -> Any:
    """Run ``code`` in a new interpreter that imports fl_ray from this checkout; the JSON on its last line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_driver_checks_a_job_without_torch_or_back_ends(tmp_path):
    """Importing the job and every actor class, and checking a config with an MLflow receiver, imports
    none of the heavy packages (a fresh interpreter, as `fl-ray run` starts)."""
    config = {
        "sites": 2,
        "dataset": {"name": "synthetic", "num_samples": 200, "shape": [3, 32, 32]},
        "learner_args": {"model": "hello_pt_cnn"},
        "tracking": {"receivers": [{"type": "mlflow"}]},
    }
    code = (
        "import json, sys\n"
        "import fl_ray.cli, fl_ray.job\n"
        "from fl_ray.actors import client, pool, receiver, server, worker\n"
        "from fl_ray.config import parse_config\n"
        "from fl_ray.job import _check_plugins\n"
        f"_check_plugins(parse_config(json.loads({json.dumps(json.dumps(config))})))\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    assert fresh_python(code, tmp_path) == []


@pytest.mark.skipif(importlib.util.find_spec("pytorch_lightning") is None, reason="needs pytorch-lightning installed")
def test_the_receiver_logs_models_without_importing_lightning(tmp_path):
    """The receiver actor's ``mlflow.pytorch`` comes without Lightning, torchmetrics or torchvision, though
    pytorch-lightning is installed (``import mlflow.pytorch`` alone would bring all three), and leaves
    pytorch-lightning importable for whoever wants it later."""
    code = (
        "import json, sys\n"
        "from fl_ray.receivers.mlflow import import_pytorch_flavor\n"
        "flavor = import_pytorch_flavor()\n"
        "assert callable(flavor.log_model) and callable(flavor.get_default_pip_requirements)\n"
        "assert sys.modules.get('pytorch_lightning', 'absent') == 'absent'\n"
        "print(json.dumps(sorted(m for m in ('pytorch_lightning', 'lightning', 'torchmetrics', 'torchvision') "
        "if m in sys.modules)))\n"
    )
    assert fresh_python(code, tmp_path) == []


def test_the_model_names_the_driver_checks_are_the_models_there_are():
    from fl_ray.model_names import MODEL_NAMES
    from fl_ray.models import MODELS

    assert sorted(MODEL_NAMES) == sorted(MODELS)


@pytest.fixture
def receiver(ray_session, tmp_path, workspace):
    """A job's receiver actor with an MLflow receiver on the workspace's sqlite store, opened."""
    from fl_ray.actors.receiver import start_receiver
    from fl_ray.receivers.base import ReceiverContext

    job_dir = workspace / f"imports-{os.getpid()}"
    job_dir.mkdir()
    ctx = ReceiverContext(
        job_id=job_dir.name, job_name="imports", job_dir=job_dir, workspace=workspace, sites=("site-1",), config={}
    )
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = start_receiver(ctx, [{"type": "mlflow"}], {}, here)
    opened = ray.get(actor.wait_open.remote(120))
    assert opened["mlflow"]["opened"], opened
    yield actor, ctx
    ray.get(actor.close.remote("FINISHED", 60))
    ray.kill(actor, no_restart=True)


def _imported(actor) -> list[str]:
    return ray.get(actor.__ray_call__.remote(lambda self: heavy_modules()))


def test_server_sites_and_receiver_import_only_what_they_use(receiver, tmp_path):
    """The receiver (MLflow open) has no PyTorch; the server and a site have PyTorch but no back end, though
    the site's tracking URI is ready for MLflow's own API; a site whose learner is not PyTorch has neither."""
    from fl_ray.actors.client import ClientActor
    from fl_ray.actors.receiver import receiver_actor_name
    from fl_ray.actors.server import RayExecutor, ServerActor

    actor, ctx = receiver
    imported = _imported(actor)
    assert "mlflow" in imported
    assert not {"torch", "matplotlib", "wandb", "tensorboard", "lightning"} & set(imported)
    name = receiver_actor_name(ctx.job_id)
    torch_job = parse_config(
        {"sites": 1, "dataset": NO_DATA, "learner_args": {"model": "mlp"}, "tracking": {"system_metrics": False}}
    ).to_dict()
    server = ServerActor.options(num_cpus=0).remote(torch_job, name, str(tmp_path / "checkpoints"))
    server.use.remote(RayExecutor({}))
    site = ClientActor.options(num_cpus=0).remote("site-1", 0, torch_job, name)
    numpy_job = parse_config(
        {
            "sites": 1,
            "dataset": NO_DATA,
            "learner": "user_learners:KnownValuesLearner",
            "tracking": {"system_metrics": False},
        }
    ).to_dict()
    numpy_site = ClientActor.options(num_cpus=0).remote("site-1", 0, numpy_job, name)
    try:
        assert _imported(numpy_site) == []  # its learner trains no PyTorch model
        # before _imported, whose function brings this module, and so conftest, into the actor
        uri = ray.get(site.__ray_call__.remote(lambda self: os.environ.get("MLFLOW_TRACKING_URI")))
        assert uri == "fl-ray://site-1"
        assert _imported(server) == ["torch"]
        on_site = set(_imported(site))
        assert "torch" in on_site and not {"mlflow", "wandb", "tensorboard", "lightning", "matplotlib"} & on_site
        threads = ray.get(site.__ray_call__.remote(lambda self: sys.modules["torch"].get_num_threads()))
        assert threads == 1  # client_cpus, though PyTorch loaded after the actor set it
    finally:
        for a in (server, site, numpy_site):
            ray.kill(a, no_restart=True)
