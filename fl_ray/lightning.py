"""PyTorch Lightning on fl_ray: a Lightning logger that writes through a site's tracking, and a learner
that trains a ``LightningModule`` each round.

:class:`FLRayLogger` turns ``self.log(...)`` and saved hyper-parameters into calls on the site's
:class:`~fl_ray.tracking.writers.MLflowWriter`, so Lightning code logs unchanged and every receiver
(MLflow, TensorBoard, W&B) gets it. :class:`LightningLearner` is the :class:`~fl_ray.learners.Learner`
that builds the module named in ``learner_args.module`` and runs a fresh ``lightning.Trainer`` on the
site's data each round; :class:`DigitsLitModule` is an example module for the digits dataset. Needs
the optional ``lightning`` package: ``pip install 'fl_ray[lightning]'``.
"""

from __future__ import annotations

import logging
import re
from argparse import Namespace
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.utilities import rank_zero_only
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as exc:
    raise ImportError(
        f"fl_ray.lightning needs PyTorch Lightning ({exc}); install the extra: pip install 'fl_ray[lightning]'"
    ) from exc

from fl_ray.importing import import_object
from fl_ray.learners import Learner, LearnerContext, TrainResult
from fl_ray.models import DigitsCNN
from fl_ray.torch_learning import load_weights, model_weights, score, split_validation
from fl_ray.tracking.events import MAX_PARAM_VALUE_LENGTH, flatten

if TYPE_CHECKING:
    from fl_ray.tracking.writers import MLflowWriter

log = logging.getLogger(__name__)

_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")  # what MLflow (and so every writer) refuses in a name
_TRAINER_DEFAULTS = {
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "log_every_n_steps": 10,
    "num_sanity_val_steps": 0,
}
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")


class FLRayLogger(Logger):
    """A Lightning logger that writes metrics and hyper-parameters through a site's ``MLflowWriter``.

    Steps: each new ``Trainer`` (one per round) counts its steps from 0 again, so this logger adds an
    offset, taken at the first record of each fit from the site's tracking state (``writer.state``): one
    past the largest step logged so far for the keys this logger logs. A site's curves then continue
    across rounds, and, since the receiver actor hands a restarted site its state back, across restarts.
    Metric and param names with characters MLflow refuses get ``_`` in their place; param values longer
    than MLflow allows are cut.
    """

    def __init__(self, writer: MLflowWriter, name: str = "fl_ray", version: str | None = None) -> None:
        super().__init__()
        self._writer = writer
        self._name = name
        self._version = writer.site if version is None else version
        self._keys: set[str] = set()  # the metric keys this logger logged
        self._offset: int | None = None  # added to Lightning's step in this fit; None until its first record

    @property
    def name(self) -> str:
        """The job name (Lightning's experiment name)."""
        return self._name

    @property
    def version(self) -> str:
        """The site name (Lightning's run version)."""
        return self._version

    @property
    def experiment(self) -> MLflowWriter:
        """The site's ``MLflowWriter``, for calls Lightning has no hook for (``log_text``, ``set_tag``)."""
        return self._writer

    @property
    def step_offset(self) -> int:
        """What is added to Lightning's step in the current fit (once it has logged)."""
        return self._offset or 0

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Log hyper-parameters as params; nested ones flatten to ``a/b``. The same value may be logged again."""
        nested = vars(params) if isinstance(params, Namespace) else params
        flat = {_clean_key(k): v for k, v in flatten(nested, "/").items()}
        texts = {}
        for key, value in flat.items():
            text = str(value)
            if len(text) > MAX_PARAM_VALUE_LENGTH:
                log.warning(
                    "hyper-parameter %r is %d characters; logging its first %d", key, len(text), MAX_PARAM_VALUE_LENGTH
                )
                text = text[:MAX_PARAM_VALUE_LENGTH]
            texts[key] = text
        self._writer.log_params(texts)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at Lightning's ``step`` plus the offset (without a step: the writer's next step per key)."""
        values = {_clean_key(k): v for k, v in metrics.items() if not isinstance(v, str)}
        if step is None:
            self._writer.log_metrics(values)
            return
        if self._offset is None:  # the fit's first record: continue after every step of these keys so far
            self._offset = self._writer.state.after(self._keys | set(values))
        self._keys.update(values)
        self._writer.log_metrics(values, step=self._offset + int(step))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """End of a fit (or validate/test): steps of the next one start after the largest logged so far."""
        self._offset = None


def _clean_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", str(key))


class LightningLearner(Learner):
    """Trains a ``LightningModule`` each round with a fresh ``lightning.Trainer`` that logs through
    :class:`FLRayLogger`.

    ``module``: import path ``package.module:Class`` of a ``lightning.pytorch.LightningModule``, built
    with ``module_args``. ``max_epochs``: epochs per round (default: the job's ``local_epochs``).
    ``trainer_args``: more ``Trainer`` arguments (``precision``, ``gradient_clip_val``, ...), overriding
    the learner's defaults; ``logger`` is the learner's own. The job's ``batch_size`` sizes the batches;
    the module's ``configure_optimizers`` sets the optimizer (the job's ``lr`` is not used). As the
    built-in learner does, each site holds out ``dataset.val_fraction`` of its data for validation
    (given to ``fit`` when the module has a ``validation_step``) and ``evaluate`` scores it there; the
    server scores its whole test split. ``evaluate`` reads the module's output as class logits.
    FedProx's ``mu`` (from the strategy) adds the proximal term's gradient before each optimizer step.
    """

    def __init__(
        self,
        module: str,
        module_args: dict[str, Any] | None = None,
        max_epochs: int | None = None,
        trainer_args: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(module, str) or ":" not in module:
            raise ValueError(f"learner_args.module: expected an import path 'package.module:Class', got {module!r}")
        if module_args is not None and not isinstance(module_args, Mapping):
            raise TypeError(
                f"learner_args.module_args: expected a mapping of argument names to values, got {module_args!r}"
            )
        if max_epochs is not None and (
            isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1
        ):
            raise ValueError(f"learner_args.max_epochs: expected a whole number >= 1, got {max_epochs!r}")
        if trainer_args is not None and not isinstance(trainer_args, Mapping):
            raise TypeError(f"learner_args.trainer_args: expected a mapping of Trainer arguments, got {trainer_args!r}")
        if trainer_args and "logger" in trainer_args:
            raise ValueError("learner_args.trainer_args: 'logger' is set by LightningLearner (FLRayLogger); remove it")
        self.module_path = module
        self.module_args = dict(module_args or {})
        self.max_epochs = max_epochs
        self.trainer_args = dict(trainer_args or {})

    def setup(self, ctx: LearnerContext) -> None:
        torch.manual_seed(ctx.config.seed)  # every site and the server start from the same weights
        self.module = _build_module(self.module_path, self.module_args)
        self.train_data, self.val = split_validation(ctx)
        self.logger = None
        if ctx.mlflow is not None and ctx.site != "server":
            self.logger = FLRayLogger(ctx.mlflow, name=ctx.config.name)
            ctx.mlflow.log_params(
                {
                    "module": self.module_path,
                    "batch_size": ctx.config.batch_size,
                    "max_epochs": self.max_epochs or ctx.config.local_epochs,
                    "train_samples": len(self.train_data[1]),
                    "val_samples": len(self.val[1]),
                    "device": str(ctx.device),
                }
            )

    def get_weights(self) -> dict[str, np.ndarray]:
        return model_weights(self.module)

    def train(self, weights: Mapping[str, np.ndarray], ctx: LearnerContext) -> TrainResult:
        load_weights(self.module, weights)
        self.module.train()  # Lightning keeps the mode it finds; evaluate() left the module in eval mode
        x, y = self.train_data
        train_loader = DataLoader(
            TensorDataset(x, y),
            batch_size=ctx.config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(ctx.seed),
        )
        val_loader = None
        if len(self.val[1]) and is_overridden("validation_step", self.module):
            val_loader = DataLoader(TensorDataset(*self.val), batch_size=ctx.config.batch_size)
        if "control" in ctx.payload:
            raise ValueError(
                "LightningLearner does not apply SCAFFOLD's control variates (they need plain SGD "
                "steps it does not control); use another strategy, or a learner that reads "
                "ctx.payload['control'] (see docs/strategies.md)"
            )
        kwargs = self._trainer_kwargs(ctx)
        mu = float(ctx.round_config.get("mu", 0.0))
        if mu:
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), _Proximal(self.module, mu)]
        with _quiet_lightning():
            trainer = pl.Trainer(**kwargs)
            trainer.fit(self.module, train_loader, val_loader)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        return TrainResult(self.get_weights(), len(y), metrics)

    def evaluate(self, weights: Mapping[str, np.ndarray], ctx: LearnerContext) -> dict[str, float]:
        load_weights(self.module, weights)
        data = self.val if ctx.site != "server" and len(self.val[1]) else self.train_data
        return score(self.module.to(ctx.device), data, ctx.device, scale_uint8=False)

    def _trainer_kwargs(self, ctx: LearnerContext) -> dict[str, Any]:
        cuda = ctx.device.type == "cuda"
        return {
            **_TRAINER_DEFAULTS,
            "max_epochs": self.max_epochs or ctx.config.local_epochs,
            "accelerator": "gpu" if cuda else "cpu",
            "devices": [ctx.device.index or 0] if cuda else 1,
            **self.trainer_args,
            "logger": self.logger or False,
        }


class _Proximal(pl.Callback):
    """FedProx's proximal term ``mu/2 * ||w - w_global||^2``, added to the gradients before each step."""

    def __init__(self, module: torch.nn.Module, mu: float) -> None:
        self.mu = mu
        self.anchor = [p.detach().clone() for p in module.parameters()]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for param, anchor in zip(module.parameters(), self.anchor):
            if param.grad is not None:
                param.grad.add_(param.detach() - anchor.to(param.device), alpha=self.mu)


def _build_module(path: str, args: dict[str, Any]) -> pl.LightningModule:
    cls = import_object(path, "learner_args.module")
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise TypeError(f"learner_args.module: {path!r} is not a subclass of lightning.pytorch.LightningModule")
    try:
        return cls(**args)
    except TypeError as exc:
        raise TypeError(f"learner_args.module_args: {args!r} do not fit {path}: {exc}") from None


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence the notices Lightning logs for every new Trainer (device banners, tips); warnings still show."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_INFO_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class DigitsLitModule(pl.LightningModule):
    """Example module: :class:`~fl_ray.models.DigitsCNN` trained with SGD; logs ``train_loss``,
    ``val_loss`` and ``val_accuracy`` with ``self.log``."""

    def __init__(self, num_classes: int = 10, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = DigitsCNN(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=self.hparams["momentum"])
