"""ClientActor: one site. Runs the configured learner on the site's data and logs through its writers.

The actor drops every tracking credential from its environment at start, picks CUDA when Ray gave it
a GPU (else the CPU), samples system metrics (CPU, memory, GPUs via NVML) into its run, and flushes
its tracking records at the end of each round. For its whole life MLflow's tracking URI in it is
``fl-ray://<site>`` (:mod:`fl_ray.tracking.mlflow_plugin`), so ``import mlflow`` logs into the site's run.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Mapping

import numpy as np
import ray

from fl_ray.actors.context import make_context
from fl_ray.learners import load_learner
from fl_ray.rounds import Task, run_task
from fl_ray.strategies.base import Arrays
from fl_ray.system_metrics import SystemMetricsSampler, gpu_description
from fl_ray.tracking.credentials import held_credentials
from fl_ray.tracking.mlflow_scope import site_scope


@ray.remote
class ClientActor:
    """A site: local training each round it is sampled."""

    def __init__(self, site: str, site_index: int, config: dict[str, Any], receiver_name: str) -> None:
        self.ctx, self.tracking = make_context(
            site, site_index, config, receiver_name, config["resources"]["client_cpus"]
        )
        self.mlflow_scope = contextlib.ExitStack()
        self.mlflow_scope.enter_context(site_scope(self.tracking))
        self.learner = load_learner(self.ctx.config.learner, self.ctx.config.learner_args)
        self.learner.setup(self.ctx)
        self.system_metrics = None
        tracking_cfg = self.ctx.config.tracking
        if tracking_cfg.system_metrics:
            self.tracking.mlflow.log_text(gpu_description(), "system/gpu_info.txt")
            self.system_metrics = SystemMetricsSampler(
                self.tracking.mlflow, tracking_cfg.system_metrics_interval, warn_no_gpu=False
            ).start()

    def run(self, task: Task, weights: Mapping[str, np.ndarray], payload: Mapping[str, Arrays]) -> dict[str, Any]:
        """Train or evaluate the round's global ``weights`` as ``task`` says; the site's tracking records of
        the task are sent before it returns."""
        start = time.perf_counter()
        result = run_task(self.learner, self.ctx, task, weights, payload)
        self.tracking.flush()
        return {
            **result,
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": self.ctx.device_name,
            "seconds": time.perf_counter() - start,
        }

    def info(self) -> dict[str, Any]:
        """Where this site runs: node, device, which tracking credentials it holds (names), and why it
        samples no GPU metrics ("" when it does, or samples none)."""
        return {
            "site": self.ctx.site,
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": self.ctx.device_name,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "credentials": held_credentials(),
            "no_gpu_metrics": self.system_metrics.no_gpu if self.system_metrics is not None else "",
        }

    def close(self, timeout: float) -> dict[str, int]:
        """Take a last system sample, deliver every tracking record and stop; returns the sender's counters."""
        if self.system_metrics is not None:
            self.system_metrics.stop()
        self.mlflow_scope.close()
        return self.tracking.close(timeout)
