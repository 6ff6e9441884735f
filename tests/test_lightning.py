"""fl_ray.lightning: FLRayLogger into a real MLflowWriter, and LightningLearner training real Lightning fits
on a slice of the digits dataset, without Ray.

The writer's sender is ``RecordingSender``, an in-memory stand-in with EventSender's ``site`` /
``record`` / ``next_step``; learner contexts are built by hand, as the client actor builds them.
"""

from __future__ import annotations

import importlib
import sys
from argparse import Namespace

import numpy as np
import pytest

pytest.importorskip("lightning")

from fl_ray.config import JobConfig  # noqa: E402
from fl_ray.data import ArrayData, load_dataset  # noqa: E402
from fl_ray.learners import LearnerContext, load_learner  # noqa: E402
from fl_ray.lightning import FLRayLogger, LightningLearner  # noqa: E402
from fl_ray.tracking.events import EventKind  # noqa: E402
from fl_ray.tracking.writers import MLflowWriter
from recording_sender import RecordingSender  # noqa: E402

MODULE = "fl_ray.lightning:DigitsLitModule"


@pytest.fixture(scope="module")
def digits() -> ArrayData:
    """400 digits samples (1x8x8 float32, int64 labels)."""
    train = load_dataset(JobConfig().dataset, seed=0).train
    return train.subset(np.arange(400))


def _ctx(data: ArrayData, site: str = "site-1", sender: RecordingSender | None = None, **cfg) -> LearnerContext:
    config = JobConfig(learner="fl_ray.lightning:LightningLearner", **{"local_epochs": 1, "batch_size": 32, **cfg})
    return LearnerContext(
        site=site,
        config=config,
        data=data,
        num_classes=10,
        input_shape=(1, 8, 8),
        round=1,
        mlflow=None if sender is None else MLflowWriter(sender),
    )


def test_logger_sends_metrics_and_hyperparams_through_the_writer():
    """log_metrics/log_hyperparams become METRIC/PARAM events; nested params flatten, bad name characters become _."""
    sender = RecordingSender()
    logger = FLRayLogger(MLflowWriter(sender), name="job")
    logger.log_hyperparams(Namespace(lr=0.1, optim={"name": "sgd", "betas": (0.9, 0.99)}, **{"a=b": 1}))
    logger.log_hyperparams({"lr": 0.1})  # Lightning logs the same hparams again every fit: no error, no event
    logger.log_metrics({"loss": 0.5, "val/acc": 0.25, "note": "text is dropped"}, step=3)

    assert (logger.name, logger.version, logger.experiment) == ("job", "site-1", logger.experiment)
    assert sender.logged_params() == {"lr": "0.1", "optim/name": "sgd", "optim/betas": "(0.9, 0.99)", "a_b": "1"}
    assert [(k, v, s) for kind, k, v, s, *_ in sender.events if kind == EventKind.METRIC] == [
        ("loss", 0.5, 3),
        ("val/acc", 0.25, 3),
    ]


def test_logger_steps_continue_after_each_fit():
    """After finalize (end of a fit) Lightning's steps restart at 0 but the logged steps keep increasing."""
    sender = RecordingSender()
    logger = FLRayLogger(MLflowWriter(sender))
    for step in (0, 9, 19):
        logger.log_metrics({"loss": 1.0}, step=step)
    logger.finalize("success")
    for step in (0, 9):
        logger.log_metrics({"loss": 1.0}, step=step)
    logger.finalize("success")
    logger.finalize("success")  # a fit that logged nothing moves nothing
    logger.log_metrics({"loss": 1.0}, step=0)
    assert sender.steps("loss") == [0, 9, 19, 20, 29, 30]
    assert logger.step_offset == 30


def test_learner_trains_rounds_and_logs_through_the_site_writer(digits, tmp_path, monkeypatch, recwarn):
    """Two rounds of real Lightning fits: weights change, metrics come back, logged steps increase across rounds."""
    monkeypatch.chdir(tmp_path)
    sender = RecordingSender()
    ctx = _ctx(digits, sender=sender, local_epochs=2)
    learner = load_learner(ctx.config.learner, {"module": MODULE, "module_args": {"lr": 0.1}})
    learner.setup(ctx)
    start = learner.get_weights()
    before = learner.evaluate(start, ctx)

    first = learner.train(start, ctx)
    ctx.round = 2
    second = learner.train(first.weights, ctx)
    after = learner.evaluate(second.weights, ctx)

    n_val = int(400 * ctx.config.dataset.val_fraction)
    assert first.num_samples == second.num_samples == 400 - n_val
    assert set(first.weights) == set(start) and not np.allclose(
        first.weights["model.fc2.weight"], start["model.fc2.weight"]
    )
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(second.metrics)
    assert set(after) == {"loss", "accuracy"} and after["loss"] < before["loss"] and after["accuracy"] > 0.5
    params = sender.logged_params()
    assert params["module"] == MODULE and params["max_epochs"] == "2" and params["val_samples"] == str(n_val)
    assert (params["lr"], params["num_classes"]) == ("0.1", "10")  # the module's save_hyperparameters()
    for key in ("train_loss", "val_accuracy"):
        steps = sender.steps(key)
        assert len(steps) >= 4 and steps == sorted(set(steps)), (key, steps)
    assert list(tmp_path.iterdir()) == []  # no checkpoints, no lightning_logs
    assert not [w for w in recwarn if "eval mode" in str(w.message)]  # evaluate() does not leak into training


def test_server_learner_starts_from_the_same_weights_and_scores_all_its_data(digits):
    """The server's learner (no writer) holds the clients' initial weights and evaluates on its whole split."""
    server = LightningLearner(MODULE)
    server.setup(_ctx(digits, site="server"))
    client = LightningLearner(MODULE)
    client.setup(_ctx(digits, sender=RecordingSender()))
    weights = server.get_weights()
    assert all(np.array_equal(weights[k], v) for k, v in client.get_weights().items())
    assert server.logger is None and len(server.train_data[1]) == 400
    scores = server.evaluate(weights, _ctx(digits, site="server"))
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["loss"] > 0


def test_trainer_arguments_combine_job_defaults_and_trainer_args(digits):
    """max_epochs overrides local_epochs, trainer_args reach the Trainer, the logger is always FLRayLogger."""
    learner = LightningLearner(MODULE, max_epochs=3, trainer_args={"precision": "bf16-mixed", "log_every_n_steps": 5})
    ctx = _ctx(digits, sender=RecordingSender(), local_epochs=1)
    learner.setup(ctx)
    kwargs = learner._trainer_kwargs(ctx)
    assert (kwargs["max_epochs"], kwargs["accelerator"], kwargs["devices"]) == (3, "cpu", 1)
    assert kwargs["precision"] == "bf16-mixed" and kwargs["log_every_n_steps"] == 5
    assert kwargs["enable_checkpointing"] is False
    assert isinstance(kwargs["logger"], FLRayLogger)
    cuda_ctx = _ctx(digits)
    cuda_ctx.device_name = "cuda:0"
    cuda_kwargs = learner._trainer_kwargs(cuda_ctx)
    assert (cuda_kwargs["accelerator"], cuda_kwargs["devices"]) == ("gpu", [0])


@pytest.mark.parametrize(
    "args, error, words",
    [
        ({"module": "fl_ray.lightning.DigitsLitModule"}, ValueError, ["learner_args.module", "package.module:Class"]),
        ({"module": MODULE, "max_epochs": 0}, ValueError, ["learner_args.max_epochs", "0"]),
        ({"module": MODULE, "module_args": [1]}, TypeError, ["learner_args.module_args", "[1]"]),
        ({"module": MODULE, "trainer_args": {"logger": True}}, ValueError, ["learner_args.trainer_args", "'logger'"]),
    ],
)
def test_bad_learner_args_are_refused_by_name(args, error, words):
    """Constructor arguments are checked at once; the error names the learner_args field and the value."""
    with pytest.raises(error) as err:
        LightningLearner(**args)
    assert all(w in str(err.value) for w in words)


@pytest.mark.parametrize(
    "module, module_args, words",
    [
        ("fl_ray.models:DigitsCNN", {}, ["learner_args.module", "'fl_ray.models:DigitsCNN'", "LightningModule"]),
        ("fl_ray.lightning:NoSuchModule", {}, ["learner_args.module", "NoSuchModule"]),
        (MODULE, {"hidden": 3}, ["learner_args.module_args", "'hidden'"]),
    ],
)
def test_bad_module_fails_setup_by_name(digits, module, module_args, words):
    """A path that is not a LightningModule, or arguments it does not take, fail setup naming the field."""
    learner = LightningLearner(module, module_args)
    with pytest.raises((TypeError, ValueError)) as err:
        learner.setup(_ctx(digits))
    assert all(w in str(err.value) for w in words)


def test_missing_lightning_names_the_extra(monkeypatch):
    """Without the lightning package, importing fl_ray.lightning says which extra to install."""
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "fl_ray.lightning")
    with pytest.raises(ImportError, match=r"pip install 'fl_ray\[lightning\]'"):
        importlib.import_module("fl_ray.lightning")
