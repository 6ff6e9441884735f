"""What client and server actors share at start-up: no credentials, threads, data, device, tracking."""

from __future__ import annotations

from typing import Any

import ray
import torch

from fl_ray.config import JobConfig
from fl_ray.data import site_data
from fl_ray.learners import LearnerContext
from fl_ray.tracking.credentials import drop_credentials
from fl_ray.tracking.site import SiteTracking


def select_device() -> torch.device:
    """CUDA when Ray assigned this worker a GPU (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def make_context(
    site: str, site_index: int | None, config: dict[str, Any], receiver_name: str, cpus: float
) -> tuple[LearnerContext, SiteTracking]:
    """Shared start-up of client and server actors: no credentials, threads, data, device, tracking.

    The receiver actor is found by name (a handle as a constructor argument would keep Ray from
    restarting the actor safely).
    """
    drop_credentials()
    torch.set_num_threads(max(1, int(cpus)))
    cfg = JobConfig.model_validate(config)
    data, dataset = site_data(cfg.dataset, cfg.seed, len(cfg.site_names), site_index)
    tracking = SiteTracking(site, ray.get_actor(receiver_name), cfg.tracking)
    ctx = LearnerContext(
        site=site,
        device=select_device(),
        config=cfg,
        data=data,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        mlflow=tracking.mlflow,
        tensorboard=tracking.tensorboard,
        wandb=tracking.wandb,
    )
    return ctx, tracking
