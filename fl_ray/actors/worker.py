"""WorkerActor: one actor of a pool that runs many virtual sites' tasks, one at a time.

A worker loads the dataset once and serves every site from it, by the partition indices the driver
computed once (one object in the object store, whose reference the constructor gets inside a list: the
driver holds it for the job, so a restarted worker finds it again). For each task it
builds the site's learner and context afresh: the learner gets the site's data, its own tracking stream
(a new ``(site, seq)`` incarnation from the receiver actor, so a site moving between workers never
reuses a seq, and the step counters the receiver holds for it) and ``ctx.site_state`` from the task;
everything a site keeps between rounds thus lives with the server, not here, and a worker that dies
loses nothing but the task it was running. The site's run gets the tag ``fl_ray.worker`` (the worker
that ran its latest task); from its first task on, the worker logs its own system metrics to the run
``worker-<n>``. During a site's task, and only then, MLflow's tracking URI is ``fl-ray://<site>``
(:mod:`fl_ray.tracking.mlflow_plugin`), so ``import mlflow`` logs into that site's run.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import numpy as np
import ray

from fl_ray.actors.context import select_device, set_threads
from fl_ray.config import JobConfig
from fl_ray.data import load_dataset
from fl_ray.learners import LearnerContext, load_learner
from fl_ray.rounds import Task, run_task
from fl_ray.strategies.base import Arrays
from fl_ray.system_metrics import SystemMetricsSampler, gpu_description
from fl_ray.tracking.credentials import drop_credentials, held_credentials
from fl_ray.tracking.mlflow_scope import site_scope
from fl_ray.tracking.site import SiteTracking

WORKER_TAG = "fl_ray.worker"


@ray.remote
class WorkerActor:
    """A pool worker: runs any site's train or evaluate task on the dataset it loaded once."""

    def __init__(self, name: str, config: dict[str, Any], receiver_name: str, parts: list[Any]) -> None:
        drop_credentials()
        self.cfg = JobConfig.model_validate(config)
        set_threads(self.cfg.resources.client_cpus)
        self.name = name
        self.parts: list[np.ndarray] = ray.get(parts[0])  # every site's indices, in configured order
        self.dataset = load_dataset(self.cfg.dataset, self.cfg.seed)
        self.device_name = select_device()
        self.receiver = ray.get_actor(receiver_name)
        self.sent = {"recorded": 0, "acknowledged": 0, "retries": 0, "undelivered": 0}  # its sites' streams
        self.tracking: SiteTracking | None = None  # its own stream, from its first task on
        self.system_metrics: SystemMetricsSampler | None = None

    def _open_tracking(self) -> None:
        """The worker's own stream and system metrics: opened with its first task, so that starting a worker
        never waits for the receiver actor (busy setting up its back ends while the workers start)."""
        self.tracking = SiteTracking(self.name, self.receiver, self.cfg.tracking)
        if self.cfg.tracking.system_metrics:
            self.tracking.mlflow.log_text(gpu_description(), "system/gpu_info.txt")
            self.system_metrics = SystemMetricsSampler(
                self.tracking.mlflow, self.cfg.tracking.system_metrics_interval
            ).start()

    def run(
        self,
        site: str,
        index: int,
        task: Task,
        weights: Mapping[str, np.ndarray],
        payload: Mapping[str, Arrays],
        opened: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Run ``task`` for the site at ``index`` of the configured sites, on the tracking stream ``opened`` for
        it (else opened here); its tracking records are delivered before it returns."""
        start = time.perf_counter()
        if self.tracking is None:
            self._open_tracking()
        tracking = SiteTracking(site, self.receiver, self.cfg.tracking, opened)
        try:
            with site_scope(tracking):
                result = self._run_site(site, index, task, weights, payload, tracking)
        finally:
            for key, value in tracking.close(self.cfg.tracking.close_timeout).items():
                self.sent[key] += value
        return {
            **result,
            "worker": self.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": self.device_name,
            "seconds": time.perf_counter() - start,
        }

    def _run_site(
        self,
        site: str,
        index: int,
        task: Task,
        weights: Mapping[str, np.ndarray],
        payload: Mapping[str, Arrays],
        tracking: SiteTracking,
    ) -> dict[str, Any]:
        """The site's learner, built and set up for this task, runs it."""
        tracking.mlflow.set_tag(WORKER_TAG, self.name)
        ds = self.dataset
        ctx = LearnerContext(
            site=site,
            device_name=self.device_name,
            config=self.cfg,
            data=ds.train.subset(self.parts[index]),
            num_classes=ds.num_classes,
            input_shape=ds.input_shape,
            mlflow=tracking.mlflow,
            tensorboard=tracking.tensorboard,
            wandb=tracking.wandb,
        )
        learner = load_learner(self.cfg.learner, self.cfg.learner_args)
        learner.setup(ctx)
        return run_task(learner, ctx, task, weights, payload)

    def info(self) -> dict[str, Any]:
        """Where this worker runs: node, device, process id, and which tracking credentials it holds (names)."""
        return {
            "worker": self.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "device": self.device_name,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "credentials": held_credentials(),
        }

    def close(self, timeout: float) -> dict[str, int]:
        """Take a last system sample and deliver the worker's own records; returns the counters of its own
        stream and, under ``sites_*``, of the site streams it ran (this life of the worker)."""
        if self.tracking is None:  # no task since it started (or Ray restarted it): still one sample
            self._open_tracking()
        assert self.tracking is not None
        if self.system_metrics is not None:
            self.system_metrics.stop()
        return {**self.tracking.close(timeout), **{f"sites_{k}": v for k, v in self.sent.items()}}
