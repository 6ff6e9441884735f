"""Learners that tests load by import path (``user_learners:Name``), as a user's own code would be."""

from __future__ import annotations

import os

import numpy as np

from fl_ray.learners import Learner, LearnerContext, TrainResult
from fl_ray.tracking.credentials import CREDENTIAL_VARS

INVALID_CALLS = 4


def site_number(site: str) -> int:
    return int(site.rsplit("-", 1)[1])


def expected_known(site: str, round_: int) -> float:
    """The value KnownValuesLearner logs as ``known`` at step ``round_``."""
    return site_number(site) * 100 + round_ + 0.5


class KnownValuesLearner(Learner):
    """Trains nothing; logs known values through every MLflowWriter method, and tries invalid calls."""

    def __init__(self, auto_points: int = 3) -> None:
        self.auto_points = auto_points

    def setup(self, ctx: LearnerContext) -> None:
        self.weights = {"w": np.zeros(3, dtype=np.float32)}

    def get_weights(self):
        return self.weights

    def train(self, weights, ctx: LearnerContext) -> TrainResult:
        site, r, w = ctx.site, ctx.round, ctx.mlflow
        w.log_metric("known", expected_known(site, r), step=r)
        for i in range(self.auto_points):
            w.log_metric("auto", r * 10 + i)
        w.log_metrics({"pair_a": r, "pair_b": 2 * r}, step=r)
        if r == 1:
            w.log_param("lr", 0.1)
            w.log_params({"bs": 32, "site_name": site})
            w.set_tag("role", "client")
            w.set_tags({"site_no": site_number(site), "credentials_seen": ",".join(
                k for k in CREDENTIAL_VARS if k in os.environ) or "none"})
            w.log_text(f"hello from {site}", "notes/hello.txt")
            raised = 0
            for bad in (lambda: w.log_metric("known", "not a number"), lambda: w.log_metric("bad key!", 1.0),
                        lambda: w.log_metric("known", 1.0, step=-1), lambda: w.log_param("lr", 0.2)):
                try:
                    bad()
                except (TypeError, ValueError):
                    raised += 1
            w.set_tag("invalid_calls_raised", raised)
        new = {"w": np.asarray(weights["w"]) + site_number(site)}
        return TrainResult(new, num_samples=site_number(site) * 10, metrics={"known": expected_known(site, r)})

    def evaluate(self, weights, ctx):
        return {"loss": 1.0 / ctx.round, "accuracy": float(np.asarray(weights["w"])[0])}


class NotALearner:
    """Has the right shape but does not subclass fl_ray.Learner."""


class FaultyLearner(KnownValuesLearner):
    """KnownValuesLearner with faults on cue: ``faults`` maps "site:round" to raise, exit, or sleep:<s>."""

    def __init__(self, faults: dict[str, str], auto_points: int = 3) -> None:
        super().__init__(auto_points)
        self.faults = faults

    def train(self, weights, ctx):
        fault = self.faults.get(f"{ctx.site}:{ctx.round}", "")
        if fault == "raise":
            raise RuntimeError(f"{ctx.site} broke in round {ctx.round}")
        if fault == "exit":
            ctx.mlflow.flush()
            os._exit(1)  # the actor process dies mid-round
        if fault.startswith("sleep:"):
            import time

            time.sleep(float(fault.split(":", 1)[1]))
        return super().train(weights, ctx)
