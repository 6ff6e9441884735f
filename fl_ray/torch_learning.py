"""The PyTorch side of learning: weights to and from NumPy, the validation split, scoring, SCAFFOLD's
gradient correction. Imported only where a model runs (site, worker and server actors), never by the
driver: :mod:`fl_ray.learners` builds and checks a learner without importing PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, cast

import numpy as np
import torch
from torch import nn

from fl_ray.strategies.scaffold import gradient_correction, initial_control, site_control_update

if TYPE_CHECKING:
    from fl_ray.learners import LearnerContext


def model_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """A module's state dict as NumPy arrays (on the CPU)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load NumPy ``weights`` into ``model`` (read-only arrays from the object store are fine)."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})


def split_validation(
    ctx: LearnerContext,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``ctx.data`` as (train, validation) tensor pairs: a seeded ``dataset.val_fraction`` share is held out
    on a site; the server keeps all of its data (the test split) on the training side."""
    x = torch.from_numpy(np.array(ctx.data.x))
    y = torch.from_numpy(np.array(ctx.data.y))
    n_val = int(len(y) * ctx.config.dataset.val_fraction) if ctx.site != "server" else 0
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(ctx.seed))
    return (x[order[n_val:]], y[order[n_val:]]), (x[order[:n_val]], y[order[:n_val]])


def as_input(x: torch.Tensor) -> torch.Tensor:
    """Inputs as the model takes them: uint8 images scaled to [-1, 1], anything else as it is."""
    if x.dtype == torch.uint8:  # CIFAR-10 images: to [-1, 1], as hello-pt normalizes them
        return (x.float() / 255.0 - 0.5) / 0.5
    return x


@torch.no_grad()
def score(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], device: torch.device, scale_uint8: bool = True
) -> dict[str, float]:
    """Cross-entropy ``loss`` and ``accuracy`` of ``model``'s class logits on ``data`` (in eval mode, in batches
    of 1024); with ``scale_uint8``, uint8 images are scaled to [-1, 1] first, as the built-in learner trains."""
    model.eval()
    x, y = data
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), 1024):
        xb = x[start : start + 1024]
        xb, yb = (as_input(xb) if scale_uint8 else xb).to(device), y[start : start + 1024].to(device)
        out = model(xb)
        loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    n = max(1, len(y))
    return {"loss": loss_sum / n, "accuracy": correct / n}


class Scaffold:
    """SCAFFOLD on a site (Karimireddy et al. 2020, option II): each gradient gets ``c - c_i``; after
    training the site's control ``c_i`` is updated in ``ctx.site_state`` and its change returned."""

    def __init__(self, model: nn.Module, weights: Mapping[str, np.ndarray], ctx: LearnerContext, lr: float) -> None:
        control = cast(dict[str, np.ndarray], ctx.payload["control"])
        site_control = cast(dict[str, np.ndarray], ctx.site_state.get("control") or initial_control(control))
        self.model, self.weights, self.ctx, self.lr = model, weights, ctx, lr
        self.control, self.site_control = control, site_control
        names = dict(model.named_parameters())
        self.corrections = [
            (names[k], torch.as_tensor(v, dtype=names[k].dtype, device=names[k].device))
            for k, v in gradient_correction(control, site_control).items()
            if k in names
        ]

    def correct(self) -> None:
        for param, correction in self.corrections:
            if param.grad is not None:
                param.grad.add_(correction)

    def finish(self, new_weights: Mapping[str, np.ndarray], steps: int) -> dict[str, Any]:
        site_control, delta = site_control_update(
            self.site_control, self.control, self.weights, new_weights, max(steps, 1), self.lr
        )
        self.ctx.site_state["control"] = site_control
        return {"control_delta": delta}


class ScaledInputModel(nn.Module):
    """A model that takes uint8 images and scales them to [-1, 1] first, as the built-in learner trains."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(as_input(x))


class SGD:
    """Stochastic gradient descent with momentum, step for step as ``torch.optim.SGD(params, lr, momentum)``
    computes it (no dampening, weight decay or Nesterov). The built-in learner uses it because building any
    ``torch.optim`` optimizer imports ``torch._dynamo``: over 2 s of CPU in every process that trains."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.0) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if self.momentum:
                buffer = self.buffers[i]
                if buffer is None:
                    buffer = self.buffers[i] = torch.clone(grad).detach()
                else:
                    buffer.mul_(self.momentum).add_(grad)
                grad = buffer
            param.add_(grad, alpha=-self.lr)
