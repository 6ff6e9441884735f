"""The Learner contract (what a site runs each round) and the built-in image-classification learner.

A learner is a plug-in (see :mod:`fl_ray.plugins`): named in the config by a built-in name
(``image_classification``, ``lightning``) or an import path (``learner: package.module:Class``) and
built with ``Class(**learner_args)``. Each client actor builds one and calls, in order:

* ``setup(ctx)`` once: build the model (on ``ctx.device``) and prepare ``ctx.data``, the site's
  training partition. The server actor builds one too, with ``ctx.site == "server"`` and the
  held-out test split as ``ctx.data``, to evaluate the global model.
* ``get_weights()``: the model's state as a dict of NumPy arrays (the server takes the initial
  global weights from its own learner).
* ``train(weights, ctx)`` each round the site is sampled: load the global ``weights``, train locally,
  return a :class:`TrainResult` (new weights, the sample count used to weight the average, metrics).
* ``evaluate(weights, ctx)``: metrics of ``weights`` on ``ctx.data`` (the server logs these).
* ``export_model(weights)`` (optional, server only): a torch module and an input example for the
  best global model, which the job logs as an MLflow model; the default, None, logs none.

``ctx.round`` is the current round (1-based); ``ctx.mlflow``, ``ctx.tensorboard`` and ``ctx.wandb``
are the site's writers. ``ctx.round_config`` and ``ctx.payload`` hold what the strategy sends the site
this round.

What a site keeps between its rounds: a learner declares it by putting it in ``ctx.site_state``
(arrays, or dicts of arrays: its own counters, optimiser state it wants to keep, SCAFFOLD's control
variate), which the server stores per site and hands back in the site's next task; by default a site
keeps nothing but the weights it is sent. Nothing else on the learner object may be relied on between
rounds: with a pool of workers (``resources.workers`` below the number of sites) a learner is built and
``setup`` for each task, on whichever worker runs it.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

import numpy as np

from fl_ray.data import ArrayData
from fl_ray.model_names import check_model_name
from fl_ray.plugins import plugin_class
from fl_ray.strategies.base import Arrays

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fl_ray.config import JobConfig
    from fl_ray.tracking.writers import MLflowWriter, SummaryWriter, WandBWriter


@dataclass
class LearnerContext:
    """What a learner knows about where and when it runs."""

    site: str
    config: JobConfig
    data: ArrayData
    num_classes: int
    input_shape: tuple[int, ...]
    device_name: str = "cpu"  # "cuda:0" when Ray gave the site a GPU
    round: int = 0
    round_config: dict[str, Any] = field(default_factory=dict)  # what the strategy sends this site this round
    payload: dict[str, Arrays] = field(default_factory=dict)  # arrays the strategy sends every sampled site
    site_state: dict[str, Arrays] = field(default_factory=dict)  # kept for the site until its next round
    mlflow: MLflowWriter | None = None
    tensorboard: SummaryWriter | None = None
    wandb: WandBWriter | None = None

    @property
    def device(self) -> torch.device:
        """The PyTorch device to train on (PyTorch loads on first use: a learner that trains no PyTorch model
        never loads it)."""
        import torch

        return torch.device(self.device_name)

    @property
    def seed(self) -> int:
        """A seed for this site and round, derived from the job's seed."""
        return int(np.random.SeedSequence([self.config.seed, _site_number(self.site), self.round]).generate_state(1)[0])


@dataclass
class TrainResult:
    """What ``Learner.train`` returns."""

    weights: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Arrays] = field(default_factory=dict)  # arrays for the strategy (SCAFFOLD's control delta)


class Learner(ABC):
    """Local training and evaluation for one site; see the module docstring for the call order."""

    def setup(self, ctx: LearnerContext) -> None:
        """Build the model and prepare data; called once per actor."""

    @abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]:
        """The current model state as NumPy arrays."""

    @abstractmethod
    def train(self, weights: Mapping[str, np.ndarray], ctx: LearnerContext) -> TrainResult:
        """Train from ``weights`` on the site's data; return the new weights, sample count and metrics."""

    @abstractmethod
    def evaluate(self, weights: Mapping[str, np.ndarray], ctx: LearnerContext) -> dict[str, float]:
        """Metrics of ``weights`` on ``ctx.data``."""

    def export_model(self, weights: Mapping[str, np.ndarray]) -> tuple[nn.Module, np.ndarray] | None:
        """A standalone CPU ``torch.nn.Module`` holding ``weights`` and an input example for it (a NumPy
        batch of a few inputs, more than one so the batch size stays free); called on the server for the
        best global model, which is then logged as an MLflow model. None (the default): no model is logged.
        """
        return None


W = TypeVar("W")


def _writer(writer: W | None) -> W:
    """A context's writer, which a learner logging on a site has (only bare test contexts lack them)."""
    if writer is None:
        raise RuntimeError("this learner context has no tracking writers")
    return writer


def _site_number(site: str) -> int:
    """A stable number for the whole site name (so ``eu-west-site-1`` and ``us-west-site-1`` differ)."""
    return int.from_bytes(hashlib.sha256(site.encode()).digest()[:8], "big")


LOG_SYNTAXES = ("mlflow", "tensorboard", "wandb")


class ImageClassificationLearner(Learner):
    """SGD on an image classifier from :mod:`fl_ray.models`, logging like a plain training script.

    Logs the hyper-parameters once per site, ``train_loss`` every ``log_every`` batches and
    ``val_accuracy`` after each local epoch (on the site's validation share), with steps that
    continue across rounds. ``log_syntax`` picks the writer it logs through, as a script written for
    that library would: ``mlflow`` (``log_params`` / ``log_metric``), ``tensorboard`` (the
    hyper-parameters as a markdown table with ``add_text("hparams", ...)``, then ``add_scalar``) or
    ``wandb`` (``config.update``, then ``log`` with a step counted per metric). Every configured
    receiver gets the records whatever the syntax.

    Building one imports no PyTorch (the driver checks ``learner_args`` by building one); its methods
    import it when a model is set up, in the actors.
    """

    def __init__(
        self, model: str = "digits_cnn", momentum: float = 0.9, log_every: int = 10, log_syntax: str = "mlflow"
    ) -> None:
        if log_syntax not in LOG_SYNTAXES:
            raise ValueError(f"learner_args.log_syntax: expected one of {', '.join(LOG_SYNTAXES)}, got {log_syntax!r}")
        self.model_name = check_model_name(model)
        self.momentum = momentum
        self.log_every = log_every
        self.log_syntax = log_syntax

    def setup(self, ctx: LearnerContext) -> None:
        import torch

        from fl_ray.models import build_model
        from fl_ray.torch_learning import split_validation

        torch.manual_seed(ctx.config.seed)  # every site and the server start from the same weights
        self.device = ctx.device
        self.model = build_model(self.model_name, ctx.input_shape, ctx.num_classes).to(self.device)
        self.train_data, self.val = split_validation(ctx)
        n_val = len(self.val[1])
        if ctx.mlflow is not None and ctx.site != "server":
            cfg = ctx.config
            self._log_params(
                ctx,
                {
                    "model": self.model_name,
                    "lr": cfg.lr,
                    "batch_size": cfg.batch_size,
                    "local_epochs": cfg.local_epochs,
                    "momentum": self.momentum,
                    "train_samples": len(self.train_data[1]),
                    "val_samples": n_val,
                    "device": str(self.device),
                },
            )

    def _log_params(self, ctx: LearnerContext, params: dict[str, Any]) -> None:
        """The hyper-parameters, once per site, in the chosen syntax."""
        if self.log_syntax == "mlflow":
            _writer(ctx.mlflow).log_params(params)
        elif self.log_syntax == "tensorboard":
            rows = "".join(f"\n| {k} | {v} |" for k, v in params.items())
            _writer(ctx.tensorboard).add_text("hparams", "| name | value |\n| --- | --- |" + rows)
        else:
            _writer(ctx.wandb).config.update(params)

    def _log_metric(self, ctx: LearnerContext, key: str, value: float) -> None:
        """One point of ``key`` at the step after its last one on this site."""
        if self.log_syntax == "mlflow":
            _writer(ctx.mlflow).log_metric(key, value)
        elif self.log_syntax == "tensorboard":
            _writer(ctx.tensorboard).add_scalar(key, value)
        else:  # W&B's own step is one per run; count per metric in the site's state, as the other two do
            wandb = _writer(ctx.wandb)
            wandb.log({key: value}, step=wandb.state.auto_step(key))

    def get_weights(self) -> dict[str, np.ndarray]:
        from fl_ray.torch_learning import model_weights

        return model_weights(self.model)

    def train(self, weights: Mapping[str, np.ndarray], ctx: LearnerContext) -> TrainResult:
        """Local SGD from the global ``weights``. What the strategy sends is applied: ``lr`` replaces the
        job's learning rate, ``mu`` adds FedProx's proximal term, and SCAFFOLD's ``control`` (payload)
        corrects each gradient by the site's control variate kept in ``ctx.site_state``."""
        import torch
        from torch import nn

        from fl_ray.torch_learning import SGD, Scaffold, as_input, load_weights, score

        cfg = ctx.config
        load_weights(self.model, weights)
        lr = float(ctx.round_config.get("lr", cfg.lr))
        mu = float(ctx.round_config.get("mu", 0.0))
        scaffold = Scaffold(self.model, weights, ctx, lr) if "control" in ctx.payload else None
        optimizer = SGD(self.model.parameters(), lr=lr, momentum=0.0 if scaffold else self.momentum)
        anchor = [p.detach().clone() for p in self.model.parameters()] if mu else []
        loss_fn = nn.CrossEntropyLoss()
        x, y = self.train_data
        gen = torch.Generator().manual_seed(ctx.seed)
        losses: list[float] = []
        val_acc = float("nan")
        self.model.train()
        for _ in range(cfg.local_epochs):
            running = 0.0
            for i, idx in enumerate(torch.randperm(len(y), generator=gen).split(cfg.batch_size)):
                xb, yb = as_input(x[idx]).to(self.device), y[idx].to(self.device)
                optimizer.zero_grad()
                loss = loss_fn(self.model(xb), yb)
                objective = (
                    loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(self.model.parameters(), anchor))
                    if mu
                    else loss
                )
                objective.backward()
                if scaffold:
                    scaffold.correct()
                optimizer.step()
                running += loss.item()
                losses.append(loss.item())
                if ctx.mlflow is not None and (i + 1) % self.log_every == 0:
                    self._log_metric(ctx, "train_loss", running / self.log_every)
                    running = 0.0
            if len(self.val[1]):
                val_acc = score(self.model, self.val, self.device)["accuracy"]
                if ctx.mlflow is not None:
                    self._log_metric(ctx, "val_accuracy", val_acc)
                self.model.train()
        metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan")}
        if len(self.val[1]):
            metrics["val_accuracy"] = val_acc
        new_weights = self.get_weights()
        extras = scaffold.finish(new_weights, len(losses)) if scaffold else {}
        return TrainResult(new_weights, len(y), metrics, extras)

    def evaluate(self, weights: Mapping[str, np.ndarray], ctx: LearnerContext) -> dict[str, float]:
        from fl_ray.torch_learning import load_weights, score

        load_weights(self.model, weights)
        return score(self.model, self.train_data if ctx.site == "server" else self.val, self.device)

    def export_model(self, weights: Mapping[str, np.ndarray]) -> tuple[nn.Module, np.ndarray]:
        """A CPU copy of the model holding ``weights``, in eval mode, and 8 inputs of this actor's data.

        The module takes inputs as the dataset holds them: CIFAR-10's uint8 images are scaled inside it
        (as training does), so the logged model needs no preprocessing.
        """
        from fl_ray.torch_learning import ScaledInputModel, load_weights

        model = copy.deepcopy(self.model).cpu()
        load_weights(model, weights)
        example = np.ascontiguousarray(self.train_data[0][:8].numpy())
        if example.dtype == np.uint8:
            model = ScaledInputModel(model)
        return model.eval(), example


def learner_class(name: str) -> type[Learner]:
    """The Learner subclass ``name`` stands for (a built-in name or an import path); PluginError names the field."""
    return plugin_class("learner", name, "learner")


def load_learner(path: str, args: dict[str, Any]) -> Learner:
    """Build the learner class at import ``path`` with ``args``; errors name the config field.

    The job calls this once in the driver before Ray starts, so an argument the constructor does not
    take, or refuses, stops the job there.
    """
    cls = learner_class(path)
    try:
        accepted = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read (a C extension): the constructor itself decides
        accepted = None
    if accepted is not None and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        names = [n for n, p in accepted.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for arg in args:
            if arg not in names:
                close = difflib.get_close_matches(arg, names, n=1)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else (f"it takes {', '.join(names)}" if names else "it takes no arguments")
                )
                raise TypeError(f"learner_args.{arg}: {cls.__name__} takes no argument {arg!r}; {hint}")
    try:
        return cls(**args)
    except TypeError as exc:
        raise TypeError(f"learner_args: {cls.__name__}(**learner_args) failed: {exc}") from None


_TORCH_HELPERS = ("model_weights", "load_weights", "split_validation", "score", "ScaledInputModel")


def __getattr__(name: str) -> Any:
    """The PyTorch helpers that lived here (now in :mod:`fl_ray.torch_learning`), still importable from this
    module: importing one loads PyTorch then, not when this module is imported."""
    if name in _TORCH_HELPERS:
        from fl_ray import torch_learning

        return getattr(torch_learning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
