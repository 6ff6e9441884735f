"""RoundEngine: the server's round logic, with no Ray.

Each round the engine asks the :class:`~fl_ray.strategies.base.Strategy` which sites train and what
they receive, hands the work to an :class:`Executor` (the Ray one runs it on client actors; an
in-process one runs learners in threads), folds results into the strategy's aggregation as they
arrive, leaves stragglers behind (``round_timeout``, and ``wait_after_min_results`` once
``min_clients`` results are in), retries a round that got fewer than ``min_clients`` results
(``round_retries``), evaluates the new global model on the server's test split (and, every
``evaluate_every`` rounds, on a fraction of the sites' own data), logs the round to the ``server``
run, keeps the best model, and checkpoints the weights, the sampling generator, the strategy's state
and each site's kept state, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from fl_ray.checkpoint import (
    BestModel,
    BestRecord,
    Checkpoint,
    append_round,
    improves,
    load_best,
    load_checkpoint,
    load_rounds,
    save_best,
    save_checkpoint,
)
from fl_ray.config import ConfigError, JobConfig
from fl_ray.fedavg import weighted_metrics
from fl_ray.learners import Learner, LearnerContext
from fl_ray.strategies.base import Aggregation, Arrays, FitResult, RoundPlan, Strategy, StrategyError

TRAIN, EVALUATE = "train", "evaluate"


class RoundError(RuntimeError):
    """A round in which fewer than ``min_clients`` sites returned a result, after every retry."""


@dataclass
class Task:
    """One site's work in a round: train or evaluate the round's global weights."""

    site: str
    kind: str
    round: int
    config: dict[str, Any] = field(default_factory=dict)
    site_state: dict[str, Arrays] = field(default_factory=dict)
    log: bool = True  # an evaluation logs its metrics to the site's run


class Running(ABC):
    """Work handed to an executor: results come back one at a time, as each site finishes."""

    @abstractmethod
    def next(self, timeout: float | None) -> tuple[str, dict[str, Any] | Exception] | None:
        """The next finished site and its result (or the error it failed with); None if none finished
        within ``timeout`` seconds or nothing is left."""

    @property
    @abstractmethod
    def pending(self) -> list[str]:
        """Sites whose work has not finished."""

    @abstractmethod
    def cancel(self) -> None:
        """Give up on the pending work."""

    def until(self, deadline: Callable[[], float | None]) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
        """Each finished site and its outcome, while work is pending and the ``time.monotonic()`` instant
        ``deadline()`` gives (asked again before each wait; None: no limit) has not passed."""
        while self.pending:
            at = deadline()
            item = self.next(None if at is None else max(0.0, at - time.monotonic()))
            if item is None:
                return
            yield item


class Executor(ABC):
    """Runs sites' train/evaluate tasks on the round's weights and payload, handing results back as they finish.

    A train result is a dict with ``weights``, ``num_samples``, ``metrics``, ``extras`` and ``site_state``
    (what the site keeps until its next round), plus anything the executor adds (node, device, seconds);
    an evaluate result has ``metrics`` and ``num_samples``.
    """

    @abstractmethod
    def run(
        self,
        tasks: list[Task],
        weights: Mapping[str, np.ndarray],
        payload: Mapping[str, Arrays],
        failed: dict[str, str],
    ) -> Running:
        """Start ``tasks``; a site that cannot be reached at all goes to ``failed`` with the reason instead."""


class ThreadExecutor(Executor):
    """Runs each site's learner in a thread of this process: for tests and for sites without Ray."""

    def __init__(
        self, learners: Mapping[str, Learner], contexts: Mapping[str, LearnerContext], max_workers: int = 4
    ) -> None:
        self.learners, self.contexts = learners, contexts
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fl_ray-site")

    def run(
        self,
        tasks: list[Task],
        weights: Mapping[str, np.ndarray],
        payload: Mapping[str, Arrays],
        failed: dict[str, str],
    ) -> Running:
        futures = {
            self._pool.submit(run_task, self.learners[t.site], self.contexts[t.site], t, weights, payload): t.site
            for t in tasks
        }
        return _FutureRunning(futures)

    def shutdown(self) -> None:
        """Stop taking work (running tasks finish in the background)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class _FutureRunning(Running):
    def __init__(self, futures: dict[Future, str]) -> None:
        self._futures = futures

    def next(self, timeout: float | None) -> tuple[str, dict[str, Any] | Exception] | None:
        if not self._futures:
            return None
        done, _ = wait(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
        if not done:
            return None
        future = next(iter(done))
        site = self._futures.pop(future)
        error = future.exception()
        return site, error if isinstance(error, Exception) else future.result()

    @property
    def pending(self) -> list[str]:
        return list(self._futures.values())

    def cancel(self) -> None:
        for future in self._futures:
            future.cancel()
        self._futures.clear()


def run_task(
    learner: Learner, ctx: LearnerContext, task: Task, weights: Mapping[str, np.ndarray], payload: Mapping[str, Arrays]
) -> dict[str, Any]:
    """Run one task with a site's learner and context (what a client actor does with a task)."""
    ctx.round, ctx.round_config, ctx.payload = task.round, dict(task.config), dict(payload)
    ctx.site_state = copy.deepcopy(dict(task.site_state))
    if task.kind == EVALUATE:
        metrics = {k: float(v) for k, v in learner.evaluate(weights, ctx).items()}
        if task.log and ctx.mlflow is not None:  # the site's own run gets its evaluation of the global model
            ctx.mlflow.log_metrics({f"federated_{k}": v for k, v in metrics.items()}, step=task.round)
        return {"metrics": metrics, "num_samples": len(ctx.data)}
    result = learner.train(weights, ctx)
    return {
        "weights": result.weights,
        "num_samples": int(result.num_samples),
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "extras": dict(result.extras),
        "site_state": ctx.site_state,
    }


class RoundEngine:
    """Runs the job's rounds with ``strategy`` over ``executor``; ``learner``/``ctx`` are the server's own
    (initial weights, evaluation on the test split, model export) and ``ctx.mlflow`` its ``server`` run."""

    def __init__(
        self,
        cfg: JobConfig,
        learner: Learner,
        ctx: LearnerContext,
        strategy: Strategy,
        executor: Executor,
        checkpoint_dir: Path,
    ) -> None:
        self.cfg, self.learner, self.ctx, self.strategy, self.executor = cfg, learner, ctx, strategy, executor
        if ctx.mlflow is None:
            raise ValueError("the server's learner context needs its writer (ctx.mlflow: the server run)")
        self.log = ctx.mlflow
        self.sites = list(cfg.site_names)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.job_dir = self.checkpoint_dir.parent  # where rounds.jsonl grows, a line per round
        self.rng = np.random.default_rng(cfg.seed)
        resumed = load_checkpoint(self.checkpoint_dir)
        if resumed is None:
            self.weights, self.rounds, self.site_states = learner.get_weights(), [], {}
            strategy.initialize(self.weights, self.sites)
        else:
            self.weights, self.site_states = resumed.weights, resumed.site_states
            self.rounds = load_rounds(self.job_dir, upto=resumed.round)
            self.rng.bit_generator.state = resumed.rng_state
            strategy.load_state(resumed.strategy_state)
        self._state_bytes = {site: state_bytes(state) for site, state in self.site_states.items()}
        self.local_weights: dict[str, dict[str, np.ndarray]] = {}  # each site's last result, for cross-site evaluation
        # the learner can export a model (it overrides Learner.export_model): keep the best one
        self.exports = type(learner).export_model is not Learner.export_model
        best = load_best(self.checkpoint_dir) if resumed is not None else None
        self.best_score = best.score if best is not None else None

    def run_round(self, round_: int) -> dict[str, Any]:
        """Run round ``round_`` (1-based), checkpoint, and return its summary."""
        start = time.perf_counter()
        plan = self.strategy.configure_round(round_, self.weights, self.sites, self.cfg.clients_per_round, self.rng)
        failures: dict[str, str] = {}
        needed = min(self.cfg.min_clients, len(plan.sites))
        for attempt in range(1, self.cfg.round_retries + 2):
            aggregation, results, states, failed = self._train(round_, plan)
            failures.update({f"{site} (attempt {attempt})": why for site, why in failed.items()})
            if len(results) >= needed:
                break
        else:
            self.log.log_text(failure_text(round_, failures), f"failures/round_{round_}.txt")
            raise RoundError(
                f"round {round_}: fewer than min_clients={self.cfg.min_clients} of the sampled sites "
                f"{plan.sites} returned a result in {self.cfg.round_retries + 1} attempt(s); "
                f"failures: {failures}"
            )
        self.weights, reported = aggregation.result()  # moves the strategy's state: only for the round kept
        self._keep_site_states(round_, states)
        self.ctx.round = round_
        global_metrics = {k: float(v) for k, v in self.learner.evaluate(self.weights, self.ctx).items()}
        self._keep_if_best(round_, global_metrics)
        client_mean = weighted_metrics([(r["metrics"], r["num_samples"]) for r in results.values()])
        logged = {f"global_{k}": v for k, v in global_metrics.items()}
        logged.update({f"clients_{k}": v for k, v in client_mean.items()})
        logged.update({f"strategy/{k}": float(v) for k, v in reported.items()})
        logged.update({"sites_completed": float(len(results)), "sites_failed": float(len(failures))})
        federated = self._evaluate_on_sites(round_)
        logged.update({f"federated_{k}": v for k, v in federated.get("mean", {}).items()})
        self.log.log_metrics(logged, step=round_)
        if failures:
            self.log.log_text(failure_text(round_, failures), f"failures/round_{round_}.txt")
        summary = {
            "round": round_,
            "sampled": plan.sites,
            "completed": sorted(results),
            "failures": failures,
            "global": global_metrics,
            "client_mean": client_mean,
            "strategy": reported,
            "clients": results,
            "seconds": time.perf_counter() - start,
        }
        if federated:
            summary["federated_evaluation"] = federated
        self.rounds.append(summary)
        append_round(self.job_dir, summary)  # before the checkpoint: a resume never lacks a round's summary
        save_checkpoint(
            self.checkpoint_dir,
            Checkpoint(
                round_, self.weights, dict(self.rng.bit_generator.state), self.strategy.state(), self.site_states
            ),
        )
        return summary

    def _train(
        self, round_: int, plan: RoundPlan
    ) -> tuple[Aggregation, dict[str, dict[str, Any]], dict[str, dict[str, Arrays]], dict[str, str]]:
        """One attempt at a round's training: the aggregation fed with every result in time, the results by
        site (without their weights), what each site keeps until its next round, and the failures."""
        aggregation = self.strategy.aggregation(round_, self.weights)
        tasks = [Task(s, TRAIN, round_, plan.config.get(s, {}), self.site_states.get(s, {})) for s in plan.sites]
        failed: dict[str, str] = {}
        running = self.executor.run(tasks, self.weights, plan.payload, failed)
        results: dict[str, dict[str, Any]] = {}
        states: dict[str, dict[str, Arrays]] = {}
        timeout = self.cfg.round_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        for site, outcome in running.until(lambda: deadline):  # noqa: B023 (the grace below moves the deadline)
            if isinstance(outcome, Exception):
                failed[site] = describe_failure(outcome)
                continue
            weights = outcome.pop("weights")
            if self.cfg.cross_site_evaluation:
                self.local_weights[site] = weights
            try:
                aggregation.add(
                    FitResult(site, weights, outcome["num_samples"], outcome["metrics"], outcome.pop("extras", {}))
                )
            except StrategyError as exc:  # a result the strategy cannot use fails this site, not the round
                failed[site] = f"result refused: {exc}"
                continue
            states[site] = outcome.pop("site_state", {})
            results[site] = outcome
            grace = self.cfg.wait_after_min_results
            if grace is not None and aggregation.count == self.cfg.min_clients:
                deadline = min(time.monotonic() + grace, deadline or float("inf"))
        for site in running.pending:
            failed[site] = "timed out (straggler): no result within the round's time limit"
        running.cancel()
        return aggregation, results, states, failed

    def _keep_site_states(self, round_: int, states: dict[str, dict[str, Arrays]]) -> None:
        """Keep what each site asked to keep until its next round, within ``resources.site_state_mb``."""
        self.site_states.update({site: state for site, state in states.items() if state})
        self._state_bytes.update({site: state_bytes(state) for site, state in states.items() if state})
        total, budget = sum(self._state_bytes.values()), self.cfg.resources.site_state_mb * 1e6
        if total > budget:
            raise RoundError(
                f"round {round_}: what the sites keep between their rounds (ctx.site_state) takes "
                f"{total / 1e6:.1f} MB for {len(self._state_bytes)} sites, over resources.site_state_mb="
                f"{self.cfg.resources.site_state_mb:g}; raise it if the driver's node has the memory "
                "(the server holds it and checkpoints it every round), or keep less per site"
            )

    def cross_site_evaluation(self) -> dict[str, dict[str, Any]]:
        """Every site evaluates the final global model and each site's last local model (of this run of the
        job) on its own data: ``{model: {site: metrics, or {"error": why}}}``, models ``global`` then sites."""
        models = {
            "global": self.weights,
            **{site: self.local_weights[site] for site in self.sites if site in self.local_weights},
        }
        round_ = len(self.rounds)
        matrix: dict[str, dict[str, Any]] = {}
        for name, weights in models.items():
            failed: dict[str, str] = {}
            results = self._run_all([Task(s, EVALUATE, round_, log=False) for s in self.sites], weights, failed)
            matrix[name] = {
                s: results[s]["metrics"] if s in results else {"error": failed.get(s, "no result")} for s in self.sites
            }
        return matrix

    def _run_all(
        self, tasks: list[Task], weights: Mapping[str, np.ndarray], failed: dict[str, str]
    ) -> dict[str, dict[str, Any]]:
        """Run evaluation ``tasks`` within ``round_timeout``; results by site, failures into ``failed``."""
        running = self.executor.run(tasks, weights, {}, failed)
        results: dict[str, dict[str, Any]] = {}
        deadline = None if self.cfg.round_timeout is None else time.monotonic() + self.cfg.round_timeout
        for site, outcome in running.until(lambda: deadline):
            if isinstance(outcome, Exception):
                failed[site] = describe_failure(outcome)
            else:
                results[site] = outcome
        failed.update({s: "timed out: no evaluation within the round's time limit" for s in running.pending})
        running.cancel()
        return results

    def _evaluate_on_sites(self, round_: int) -> dict[str, Any]:
        """Every ``evaluate_every`` rounds, a fraction of the sites evaluate the new global model on their
        own data: per-site metrics and their sample-weighted mean."""
        every = self.cfg.evaluate_every
        if not every or round_ % every:
            return {}
        count = max(1, round(self.cfg.evaluate_fraction * len(self.sites)))
        rng = np.random.default_rng([self.cfg.seed, round_])  # its own draw: training's sampling stays the same
        chosen = sorted(rng.choice(len(self.sites), size=count, replace=False).tolist())
        tasks = [Task(self.sites[i], EVALUATE, round_) for i in chosen]
        failed: dict[str, str] = {}
        results = self._run_all(tasks, self.weights, failed)
        mean = weighted_metrics([(r["metrics"], r["num_samples"]) for r in results.values()])
        return {"sites": results, "mean": mean, "failures": failed}

    def _keep_if_best(self, round_: int, metrics: dict[str, float]) -> None:
        """Save the global model as ``best.npz``/``.json`` if it beats the best so far on ``server.key_metric``."""
        if not self.exports:
            return
        key, mode = self.cfg.server.key_metric, self.cfg.server.key_mode
        if key not in metrics:
            raise ConfigError(
                f"server.key_metric: {key!r} is not one of the global metrics the learner's evaluate "
                f"returns ({', '.join(sorted(metrics)) or 'none'}); set server.key_metric to one of them"
            )
        value = float(metrics[key])
        if not improves(value, self.best_score, mode):
            return
        exported = self.learner.export_model(self.weights)
        if exported is None:  # this learner exports no model after all; the job says so at the end
            self.exports = False
            return
        save_best(
            self.checkpoint_dir, BestRecord(round_, key, mode, metrics, dict(self.weights), np.asarray(exported[1]))
        )
        self.best_score = value

    def best_model(self) -> BestModel | None:
        """The best global model so far rebuilt by the learner (``export_model``) to be logged; None if none."""
        best = load_best(self.checkpoint_dir)
        exported = self.learner.export_model(best.weights) if best is not None else None
        if best is None or exported is None:
            return None
        return BestModel(best.round, best.key_metric, best.key_mode, best.metrics, exported[0], best.input_example)


def state_bytes(state: Mapping[str, Arrays]) -> int:
    """The bytes of a site's kept arrays."""
    return sum(
        sum(np.asarray(a).nbytes for a in v.values()) if isinstance(v, Mapping) else np.asarray(v).nbytes
        for v in state.values()
    )


def describe_failure(exc: BaseException) -> str:
    """``Type: last line of the message`` (a remote traceback's last line says what went wrong)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1][:300] if text else ''}"


def failure_text(round_: int, failures: dict[str, str]) -> str:
    """The text logged to the server run for a round with failures."""
    return (
        "\n".join(
            [f"round {round_}: {len(failures)} client failure(s)"]
            + [f"{site}: {why}" for site, why in sorted(failures.items())]
        )
        + "\n"
    )
