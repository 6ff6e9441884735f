"""A learner that logs with MLflow's own API (``import mlflow``) and ``ctx.mlflow``'s file methods, loaded by
import path (``mlflow_learners:FluentLearner``) as a user's code would be."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import torch

from fl_ray.learners import LearnerContext, TrainResult

from user_learners import UntrainedLearner

matplotlib.use("Agg")
EXAMPLE = np.zeros((2, 2), dtype=np.float32)


def figure():
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 2), dpi=50)
    plt.plot([1, 2, 3])
    return fig


class _Learner(UntrainedLearner):
    def evaluate(self, weights, ctx):
        """On the server (and anywhere but a site's work) MLflow keeps its own tracking URI."""
        import mlflow

        assert not mlflow.get_tracking_uri().startswith("fl-ray:"), mlflow.get_tracking_uri()
        return {"loss": 1.0, "accuracy": 0.0}


class FluentLearner(_Learner):
    """Every MLflow call a training script makes, on the site, and what the site cannot do, noted as tags."""

    def train(self, weights, ctx: LearnerContext) -> TrainResult:
        import mlflow
        import mlflow.pytorch

        from mlflow.telemetry.client import get_telemetry_client

        r = ctx.round
        assert mlflow.get_tracking_uri() == f"fl-ray://{ctx.site}", mlflow.get_tracking_uri()
        assert get_telemetry_client() is None  # MLflow's usage telemetry would call out from the site
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run():
            mlflow.log_param("site_name", ctx.site)
            mlflow.log_params({"lr": 0.1, "layers": 2})
            mlflow.log_metric("fluent", 10.0 * r)  # MLflow's step: 0
            mlflow.log_metric("stepped", r + 0.5, step=r, timestamp=1_700_000_000_000 + r)
            mlflow.log_metrics({"pair_a": r, "pair_b": 2 * r}, step=r)
            mlflow.set_tag("role", "fluent")
            mlflow.set_tags({"last_round": r})
            mlflow.log_text(f"hello from {ctx.site}", "notes/hello.txt")
            mlflow.log_dict({"site": ctx.site}, "meta/site.json")
            mlflow.log_figure(figure(), "plots/curve.png")
            (Path(tmp) / "data.csv").write_text("a,b\n1,2\n")
            mlflow.log_artifact(str(Path(tmp) / "data.csv"), "files")
            (Path(tmp) / "tree" / "sub").mkdir(parents=True)
            (Path(tmp) / "tree" / "sub" / "leaf.bin").write_bytes(bytes(range(256)) * 4)
            mlflow.log_artifacts(str(Path(tmp) / "tree"), "tree")
            mlflow.log_table({"round": [r], "site": [ctx.site]}, "table.json")
            with mlflow.start_run(nested=True, run_name="inner"):
                mlflow.log_metric("inner_metric", r, step=r)
            if r == 1:
                mlflow.pytorch.log_model(
                    torch.nn.Linear(2, 2), name="fluent_model", input_example=EXAMPLE, pip_requirements=["torch"]
                )
                ctx.mlflow.log_model(
                    torch.nn.Linear(2, 3), "writer_model", input_example=EXAMPLE, pip_requirements=["torch"]
                )
                ctx.mlflow.log_dict({"k": [1, 2]}, "writer/d.yaml")
                ctx.mlflow.log_artifact(str(Path(tmp) / "data.csv"), "writer")
                ctx.mlflow.log_figure(figure(), "writer/fig.png")
                self.note_refusals(ctx, mlflow, Path(tmp))
        return TrainResult(dict(weights), 1, {})

    @staticmethod
    def note_refusals(ctx: LearnerContext, mlflow, tmp: Path) -> None:
        """What the site's store refuses, and its reason, as tags (the test reads them on the server)."""
        big = tmp / "big.bin"
        big.write_bytes(b"\0" * 30_000)  # over tracking.max_artifact_mb = 0.02 in the test's config
        for tag, call in {
            "search_error": lambda: mlflow.search_runs(),
            "other_run_error": lambda: mlflow.MlflowClient().get_run("f" * 32),
            "limit_error": lambda: mlflow.log_artifact(str(big)),
            "writer_limit_error": lambda: ctx.mlflow.log_artifact(str(big)),
        }.items():
            try:
                call()
            except Exception as exc:
                ctx.mlflow.set_tag(tag, f"{type(exc).__name__}: {exc}"[:500])


class LightningMLflowLearner(_Learner):
    """Lightning as scripts use it with MLflow: round 1 with Lightning's ``MLFlowLogger``, round 2 with
    ``mlflow.pytorch.autolog()``; both into the site's run."""

    def setup(self, ctx: LearnerContext) -> None:
        from fl_ray.lightning import DigitsLitModule

        torch.manual_seed(0)
        self.module = DigitsLitModule(lr=0.1)
        self.weights = {k: v.detach().numpy().copy() for k, v in self.module.state_dict().items()}

    def train(self, weights, ctx: LearnerContext) -> TrainResult:
        import lightning.pytorch as pl
        import mlflow
        from lightning.pytorch.loggers import MLFlowLogger
        from torch.utils.data import DataLoader, TensorDataset

        data = TensorDataset(torch.from_numpy(np.array(ctx.data.x[:256])), torch.from_numpy(np.array(ctx.data.y[:256])))
        logger = MLFlowLogger(experiment_name="lightning") if ctx.round == 1 else False
        if ctx.round == 2:
            # autolog infers the model's pip requirements by loading it again in a subprocess (seconds of
            # Lightning's and PyTorch's imports); cut short, MLflow logs its default requirements instead
            os.environ["MLFLOW_REQUIREMENTS_INFERENCE_TIMEOUT"] = "1"
            mlflow.pytorch.autolog(log_models=True, checkpoint=False)
        trainer = pl.Trainer(
            max_epochs=1,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(self.module, DataLoader(data, batch_size=64), DataLoader(data, batch_size=128))
        if ctx.round == 2:
            mlflow.pytorch.autolog(disable=True)
            del os.environ["MLFLOW_REQUIREMENTS_INFERENCE_TIMEOUT"]  # the actor's later work infers in full
        return TrainResult({k: v.detach().numpy().copy() for k, v in self.module.state_dict().items()}, len(data), {})
