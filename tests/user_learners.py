"""Learners that tests load by import path (``user_learners:Name``), as a user's own code would be."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from fl_ray.learners import Learner, LearnerContext, TrainResult
from fl_ray.tracking.credentials import held_credentials

INVALID_CALLS = 4


def site_number(site: str) -> int:
    return int(site.rsplit("-", 1)[1])


def expected_known(site: str, round_: int) -> float:
    """The value KnownValuesLearner logs as ``known`` at step ``round_``."""
    return site_number(site) * 100 + round_ + 0.5


class UntrainedLearner(Learner):
    """A learner whose model is one zero vector ``w`` of ``size`` float32s (its train decides the update)."""

    size = 2

    def setup(self, ctx: LearnerContext) -> None:
        self.weights = {"w": np.zeros(self.size, dtype=np.float32)}

    def get_weights(self):
        return self.weights


class KnownValuesLearner(UntrainedLearner):
    """Trains nothing; logs known values through every MLflowWriter method, and tries invalid calls."""

    size = 3

    def __init__(self, auto_points: int = 3) -> None:
        self.auto_points = auto_points

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
            w.set_tags(
                {
                    "site_no": site_number(site),
                    "credentials_seen": ",".join(held_credentials()) or "none",
                }
            )
            w.log_text(f"hello from {site}", "notes/hello.txt")
            raised = 0
            for bad in (
                lambda: w.log_metric("known", "not a number"),
                lambda: w.log_metric("bad key!", 1.0),
                lambda: w.log_metric("known", 1.0, step=-1),
                lambda: w.log_param("lr", 0.2),
            ):
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
            time.sleep(float(fault.split(":", 1)[1]))
        return super().train(weights, ctx)


def stream_value(site: str, round_: int, i: int) -> float:
    """The value StreamLearner logs as ``stream`` for point ``i`` of a round: distinct for every point."""
    return site_number(site) * 1_000_000 + round_ * 1_000 + i + 0.25


def expected_stream(site: str, rounds: int, points: int, sign: float = 1.0) -> list[tuple[int, float]]:
    """``(step, value)`` of every ``stream`` point (``stream_neg`` with ``sign=-1``) a site logs in ``rounds``."""
    return [
        ((r - 1) * points + i, sign * stream_value(site, r, i)) for r in range(1, rounds + 1) for i in range(points)
    ]


class StreamLearner(UntrainedLearner):
    """Trains nothing; each round logs ``points`` points of ``stream`` and ``stream_neg`` with explicit
    steps, spread over ``seconds``, so that a job keeps logging through a tracking-server outage or a
    receiver-actor crash."""

    def __init__(self, points: int = 100, seconds: float = 2.0) -> None:
        self.points = points
        self.seconds = seconds

    def train(self, weights, ctx: LearnerContext) -> TrainResult:
        w = ctx.mlflow
        if ctx.round == 1:
            w.log_params({"points": self.points, "site_name": ctx.site})
        for i in range(self.points):
            value = stream_value(ctx.site, ctx.round, i)
            w.log_metrics({"stream": value, "stream_neg": -value}, step=(ctx.round - 1) * self.points + i)
            time.sleep(self.seconds / self.points)
        w.set_tag("last_round", ctx.round)
        return TrainResult({"w": np.asarray(weights["w"]) + 1}, num_samples=10, metrics={"points": self.points})

    def evaluate(self, weights, ctx):
        return {"loss": 1.0 / ctx.round}


SYNTAXES = ("mlflow", "tensorboard", "wandb")
SYNTAX_PARAMS = {"lr": "0.125", "optimizer": "sgd"}


def logged_in_round(site: str, round_: int) -> dict[str, list[tuple[int, float]]]:
    """What SyntaxLearner logs on ``site`` in round ``round_``: {key: [(step, value), ...]}.

    Values are exact in float32 (TensorBoard stores scalars as float32), so every back end reads them back equal.
    """
    n, r = site_number(site), round_
    return {
        "loss": [(2 * r - 2, n + r / 4), (2 * r - 1, n + r / 4 + 1 / 8)],
        "acc": [(r, n / 2 + r / 16)],
        "pair/a": [(r, r / 2)],
        "pair/b": [(r, -n * r / 2)],
        "fl_step": [(r, float(r))],
    }


def expected_series(site: str, rounds: int) -> dict[str, list[tuple[int, float]]]:
    """Everything SyntaxLearner logs on ``site`` in ``rounds`` rounds, by key, in step order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in range(1, rounds + 1):
        for key, points in logged_in_round(site, r).items():
            series.setdefault(key, []).extend(points)
    return {key: sorted(points) for key, points in series.items()}


class SyntaxLearner(UntrainedLearner):
    """Trains nothing; logs :func:`logged_in_round` with explicit steps, and params, in one writer ``syntax``
    (or, given ``{site: syntax}``, in each site's own).

    Each round: ``loss`` at steps 2r-2 and 2r-1, then ``acc`` at step r (below the last loss step from
    round 2 on), the pair ``pair/a``, ``pair/b`` (TensorBoard syntax: ``add_scalars``) and a metric
    named ``fl_step`` (a column W&B fills itself). In round 1 the params (not in TensorBoard syntax,
    which has no params call). The server reports ``loss`` = 2**-round.
    """

    def __init__(self, syntax: str | dict[str, str] = "mlflow") -> None:
        for value in [syntax] if isinstance(syntax, str) else syntax.values():
            if value not in SYNTAXES:
                raise ValueError(f"syntax must be one of {SYNTAXES}, got {value!r}")
        self.syntax = syntax

    def train(self, weights, ctx: LearnerContext) -> TrainResult:
        r, values = ctx.round, logged_in_round(ctx.site, ctx.round)
        syntax = self.syntax if isinstance(self.syntax, str) else self.syntax[ctx.site]
        loss = values["loss"]
        [(_, acc)], [(_, a)], [(_, b)], [(_, marker)] = (values[k] for k in ("acc", "pair/a", "pair/b", "fl_step"))
        if syntax == "mlflow":
            for step, value in loss:
                ctx.mlflow.log_metric("loss", value, step=step)
            ctx.mlflow.log_metric("acc", acc, step=r)
            ctx.mlflow.log_metrics({"pair/a": a, "pair/b": b}, step=r)
            ctx.mlflow.log_metric("fl_step", marker, step=r)
            if r == 1:
                ctx.mlflow.log_params(SYNTAX_PARAMS)
        elif syntax == "tensorboard":
            for step, value in loss:
                ctx.tensorboard.add_scalar("loss", value, global_step=step)
            ctx.tensorboard.add_scalar("acc", acc, global_step=r)
            ctx.tensorboard.add_scalars("pair", {"a": a, "b": b}, global_step=r)
            ctx.tensorboard.add_scalar("fl_step", marker, global_step=r)
        else:
            for step, value in loss:
                ctx.wandb.log({"loss": value}, step=step)
            ctx.wandb.log({"acc": acc}, step=r)
            ctx.wandb.log({"pair": {"a": a, "b": b}}, step=r)
            ctx.wandb.log({"fl_step": marker}, step=r)
            if r == 1:
                ctx.wandb.config.update(SYNTAX_PARAMS)
        return TrainResult({"w": np.asarray(weights["w"]) + 1}, num_samples=10)

    def evaluate(self, weights, ctx):
        return {"loss": 2.0**-ctx.round}


class CountingLearner(UntrainedLearner):
    """Counts each site's trainings in ``ctx.site_state`` and logs the count as ``times_trained`` at the round.

    ``die`` ("site:round") makes that task SIGKILL its own process, once: the first time, before it logs
    anything (a file under ``marker_dir`` remembers it), so a pool worker dies under a running task.
    """

    def __init__(self, die: str = "", marker_dir: str = "") -> None:
        self.die, self.marker_dir = die, marker_dir

    def train(self, weights, ctx: LearnerContext) -> TrainResult:
        if f"{ctx.site}:{ctx.round}" == self.die:
            marker = Path(self.marker_dir) / "killed"
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        count = int(ctx.site_state.get("trained", np.zeros(1, dtype=np.int64))[0]) + 1
        ctx.site_state["trained"] = np.array([count], dtype=np.int64)
        ctx.mlflow.log_metric("times_trained", count, step=ctx.round)
        return TrainResult({"w": np.asarray(weights["w"]) + 1}, num_samples=10, metrics={"times_trained": count})

    def evaluate(self, weights, ctx):
        return {"loss": 0.0}
