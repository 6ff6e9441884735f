"""ScriptLearner: a user's training script as a site's learner (``learner: script``).

The script is run, as ``__main__``, once per round on every sampled site, in the site's process: it
gets the round's global weights and the site's data from :mod:`fl_ray.client` and hands back its new
weights, sample count and metrics with ``fl_ray.client.send``. Whatever it logs with ``mlflow`` lands in
the site's run (the site's tracking URI is ``fl-ray://<site>``). The model class the script defines
(``learner_args.model``, default ``Net``) gives the server its initial weights and evaluates the global
model; the script's file is read (not run as ``__main__``) to find it.

    learner: script
    learner_args: {script: examples/mlflow_script/train_federated.py, model: Net}
"""

from __future__ import annotations

import copy
import runpy
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from fl_ray import client
from fl_ray.learners import Learner, LearnerContext, TrainResult, load_weights, model_weights, score


class ScriptLearner(Learner):
    """Runs ``script`` per site and round; ``model`` names its ``torch.nn.Module`` class, built with ``model_args``."""

    def __init__(self, script: str, model: str = "Net", model_args: dict[str, Any] | None = None) -> None:
        path = Path(script).expanduser()
        if not path.is_file():
            raise ValueError(
                f"learner_args.script: {script!r} is not a file; expected the path of a Python training script, "
                "absolute or relative to the directory the job starts in"
            )
        self.path = str(path.resolve())
        self.model_name = model
        self.model_args = dict(model_args or {})

    def setup(self, ctx: LearnerContext) -> None:
        namespace = runpy.run_path(self.path, run_name="fl_ray_script")  # definitions only: no __main__ block
        cls = namespace.get(self.model_name)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"learner_args.model: {self.path} defines no torch.nn.Module class {self.model_name!r}")
        torch.manual_seed(ctx.config.seed)  # every site and the server start from the same weights
        self.device = ctx.device
        self.model = cls(**self.model_args).to(ctx.device)
        self.example = np.ascontiguousarray(ctx.data.x[:8])

    def get_weights(self) -> dict[str, np.ndarray]:
        return model_weights(self.model)

    def train(self, weights: Mapping[str, np.ndarray], ctx: LearnerContext) -> TrainResult:
        """Run the script as ``__main__`` with this round's task in :mod:`fl_ray.client`."""
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        client._task = client.SiteTask(ctx.site, ctx.round, tensors, (ctx.data.x, ctx.data.y), ctx.device)
        client._result = None
        argv, path = sys.argv, list(sys.path)
        sys.argv, sys.path = [self.path], [str(Path(self.path).parent), *sys.path]  # as `python script.py` has
        try:
            runpy.run_path(self.path, run_name="__main__")
        finally:
            sys.argv, sys.path = argv, path
            result, client._task, client._result = client._result, None, None
        if result is None:
            raise RuntimeError(
                f"training script {self.path} ended without calling fl_ray.client.send(...) "
                f"(site {ctx.site!r}, round {ctx.round})"
            )
        return TrainResult(result.weights, result.num_samples, result.metrics)

    def evaluate(self, weights: Mapping[str, np.ndarray], ctx: LearnerContext) -> dict[str, float]:
        """``loss`` and ``accuracy`` of the script's model class holding ``weights`` on ``ctx.data``."""
        load_weights(self.model, weights)
        data = (torch.from_numpy(np.array(ctx.data.x)), torch.from_numpy(np.array(ctx.data.y)))
        return score(self.model, data, self.device, scale_uint8=False)

    def export_model(self, weights: Mapping[str, np.ndarray]) -> tuple[nn.Module, np.ndarray]:
        model = copy.deepcopy(self.model).cpu()
        load_weights(model, weights)
        return model.eval(), self.example
