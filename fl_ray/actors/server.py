"""ServerActor: owns the global weights and runs FedAvg rounds over the client actors.

Each round it samples sites with a seeded generator, puts the global weights in the object store
once, folds client results into a streaming weighted average as they arrive (``ray.wait``), evaluates
the new global model on the held-out test split and logs the round into the ``server`` run through
the same tracking path as the sites, then checkpoints (weights, round, generator state) so the
job can resume after the last completed round. When the learner can export a model, the global
model that is best so far by ``server.key_metric`` / ``key_mode`` is kept as ``best.pt`` beside the
checkpoint (this actor runs on the driver's node, so the job can hand it to the receiver actor,
which logs it to MLflow: this actor holds no tracking credentials). A client that fails or times
out does not fail the round while ``min_clients`` results arrive; below that the round is tried
again, then the job fails.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from fl_ray.actors.client import make_context
from fl_ray.checkpoint import BestModel, Checkpoint, improves, load_best, load_checkpoint, save_best, save_checkpoint
from fl_ray.config import ConfigError
from fl_ray.fedavg import StreamingAverage, sample_sites, weighted_metrics
from fl_ray.learners import Learner, load_learner


RESTART_GRACE = 60.0  # seconds a round waits for a site that Ray is restarting


class RoundError(RuntimeError):
    """A round in which fewer than ``min_clients`` sites returned a result, after every retry."""


@ray.remote
class ServerActor:
    """The FedAvg server of one job."""

    def __init__(self, config: dict[str, Any], receiver_name: str, clients: dict[str, Any],
                 checkpoint_dir: str) -> None:
        self.ctx, self.tracking = make_context("server", None, config, receiver_name,
                                               config["resources"]["server_cpus"])
        self.cfg = self.ctx.config
        self.learner = load_learner(self.cfg.learner, self.cfg.learner_args)
        self.learner.setup(self.ctx)
        self.clients = clients
        self.checkpoint_dir = Path(checkpoint_dir)
        self.rng = np.random.default_rng(self.cfg.seed)
        resumed = load_checkpoint(self.checkpoint_dir)
        if resumed is None:
            self.weights, self.rounds = self.learner.get_weights(), []
        else:
            self.weights, self.rounds = resumed.weights, resumed.rounds
            self.rng.bit_generator.state = resumed.rng_state
        # the learner can export a model (it overrides Learner.export_model): keep the best one
        self.exports = type(self.learner).export_model is not Learner.export_model
        best = load_best(self.checkpoint_dir) if resumed is not None else None
        self.best_score = best.score if best is not None else None

    def completed_rounds(self) -> list[dict[str, Any]]:
        """Summaries of the rounds completed so far (from the checkpoint when the job resumed)."""
        return list(self.rounds)

    def run_round(self, round_: int) -> dict[str, Any]:
        """Run round ``round_`` (1-based) and return its summary."""
        start = time.perf_counter()
        sampled = sample_sites(list(self.clients), self.cfg.clients_per_round, self.rng)
        weights_ref = ray.put(self.weights)  # one copy in the object store, read by every sampled client
        failures: dict[str, str] = {}
        for attempt in range(1, self.cfg.round_retries + 2):
            avg, results, failed = self._collect(weights_ref, sampled, round_)
            failures.update({f"{site} (attempt {attempt})": why for site, why in failed.items()})
            if avg.count >= min(self.cfg.min_clients, len(sampled)):
                break
        else:
            self.tracking.mlflow.log_text(_failure_text(round_, failures), f"failures/round_{round_}.txt")
            self.tracking.flush()
            raise RoundError(f"round {round_}: fewer than min_clients={self.cfg.min_clients} of the sampled sites "
                             f"{sampled} returned a result in {self.cfg.round_retries + 1} attempt(s); "
                             f"failures: {failures}")
        self.weights = avg.result()
        self.ctx.round = round_
        global_metrics = self.learner.evaluate(self.weights, self.ctx)
        self._keep_if_best(round_, global_metrics)
        client_mean = weighted_metrics([(r["metrics"], r["num_samples"]) for r in results.values()])
        logged = {f"global_{k}": v for k, v in global_metrics.items()}
        logged.update({f"clients_{k}": v for k, v in client_mean.items()})
        logged.update({"sites_completed": float(len(results)), "sites_failed": float(len(failures))})
        self.tracking.mlflow.log_metrics(logged, step=round_)
        if failures:
            self.tracking.mlflow.log_text(_failure_text(round_, failures), f"failures/round_{round_}.txt")
        self.tracking.flush()
        summary = {"round": round_, "sampled": sampled, "completed": sorted(results), "failures": failures,
                   "global": global_metrics, "client_mean": client_mean, "clients": results,
                   "seconds": time.perf_counter() - start}
        self.rounds.append(summary)
        save_checkpoint(self.checkpoint_dir, Checkpoint(round_, self.weights, self.rng.bit_generator.state,
                                                        self.rounds))
        return summary

    def _keep_if_best(self, round_: int, metrics: dict[str, float]) -> None:
        """Save the global model as ``best.pt`` if it beats the best so far on ``server.key_metric``."""
        if not self.exports:
            return
        key, mode = self.cfg.server.key_metric, self.cfg.server.key_mode
        if key not in metrics:
            raise ConfigError(f"server.key_metric: {key!r} is not one of the global metrics the learner's evaluate "
                              f"returns ({', '.join(sorted(metrics)) or 'none'}); set server.key_metric to one of them")
        value = float(metrics[key])
        if not improves(value, self.best_score, mode):
            return
        exported = self.learner.export_model(self.weights)
        if exported is None:  # this learner exports no model after all; the job says so at the end
            self.exports = False
            return
        model, example = exported
        save_best(self.checkpoint_dir, BestModel(round_, key, mode, {k: float(v) for k, v in metrics.items()},
                                                 model, np.asarray(example)))
        self.best_score = value

    def _reachable(self, sites: list[str], failed: dict[str, str]) -> list[str]:
        """The sites that answer; waits (up to RESTART_GRACE seconds) for those Ray is restarting."""
        deadline = time.monotonic() + RESTART_GRACE
        pending, alive = list(sites), []
        while pending:
            refs = {self.clients[s].info.remote(): s for s in pending}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                site = refs[ref]
                try:
                    ray.get(ref)
                    alive.append(site)
                except ray.exceptions.ActorUnavailableError:
                    continue  # restarting: ask again
                except ray.exceptions.RayError as exc:
                    failed[site] = _reason(exc)
                pending.remove(site)
            if pending and time.monotonic() >= deadline:
                failed.update({s: f"unreachable: still restarting after {RESTART_GRACE:g} s" for s in pending})
                break
            if pending:
                time.sleep(0.2)
        return [s for s in sites if s in alive]

    def _collect(self, weights_ref: Any, sites: list[str], round_: int):
        avg, results, failed = StreamingAverage(), {}, {}
        pending = {self.clients[s].train.remote(weights_ref, round_): s for s in self._reachable(sites, failed)}
        deadline = None if self.cfg.round_timeout is None else time.monotonic() + self.cfg.round_timeout
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:
                break
            site = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                failed[site] = _reason(exc)
                continue
            avg.add(result.pop("weights"), result["num_samples"])
            results[site] = result
            grace = self.cfg.wait_after_min_results
            if grace is not None and avg.count == self.cfg.min_clients:
                deadline = min(time.monotonic() + grace, deadline or float("inf"))
        for ref, site in pending.items():
            failed[site] = "timed out (straggler): no result within the round's time limit"
            ray.cancel(ref)
        return avg, results, failed

    def get_weights(self) -> dict[str, np.ndarray]:
        """The current global weights."""
        return self.weights

    def close(self, timeout: float) -> dict[str, int]:
        """Deliver the server's tracking records and stop."""
        return self.tracking.close(timeout)


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"


def _failure_text(round_: int, failures: dict[str, str]) -> str:
    return "\n".join([f"round {round_}: {len(failures)} client failure(s)"] +
                     [f"{site}: {why}" for site, why in sorted(failures.items())]) + "\n"
