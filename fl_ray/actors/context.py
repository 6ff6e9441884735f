"""What client and server actors share at start-up: no credentials, threads, data, device, tracking.

PyTorch is imported by the learner that uses it (or when Ray gives the actor a GPU), not here: the driver
imports the actor classes without it, and a site whose learner trains no PyTorch model never loads it."""

from __future__ import annotations

import os
import sys
from typing import Any

import ray

from fl_ray.config import JobConfig
from fl_ray.data import site_data
from fl_ray.learners import LearnerContext
from fl_ray.tracking.credentials import drop_credentials
from fl_ray.tracking.site import SiteTracking


def select_device() -> str:
    """``cuda:0`` when Ray assigned this worker a GPU (Ray sets CUDA_VISIBLE_DEVICES) that PyTorch sees, else
    ``cpu``. PyTorch is imported only in the first case."""
    if ray.get_gpu_ids():
        import torch

        if torch.cuda.is_available():
            return "cuda:0"
    return "cpu"


def set_threads(cpus: float) -> None:
    """PyTorch's intra-op threads: the CPUs Ray gave this actor (at least one); set now if PyTorch is loaded,
    else through ``OMP_NUM_THREADS``, which it reads when a learner first imports it (a learner that trains
    no PyTorch model never loads it)."""
    threads = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def make_context(
    site: str, site_index: int | None, config: dict[str, Any], receiver_name: str, cpus: float
) -> tuple[LearnerContext, SiteTracking]:
    """Shared start-up of client and server actors: no credentials, threads, data, device, tracking.

    The receiver actor is found by name (a handle as a constructor argument would keep Ray from
    restarting the actor safely).
    """
    drop_credentials()
    set_threads(cpus)
    cfg = JobConfig.model_validate(config)
    data, dataset = site_data(cfg.dataset, cfg.seed, len(cfg.site_names), site_index)
    tracking = SiteTracking(site, ray.get_actor(receiver_name), cfg.tracking)
    ctx = LearnerContext(
        site=site,
        device_name=select_device(),
        config=cfg,
        data=data,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        mlflow=tracking.mlflow,
        tensorboard=tracking.tensorboard,
        wandb=tracking.wandb,
    )
    return ctx, tracking
