"""ServerActor: a thin Ray shell over the :class:`~fl_ray.rounds.RoundEngine`, and the Ray executor.

The actor builds the server's learner (initial weights, evaluation on the held-out test split, model
export) and the configured strategy, and runs rounds with the engine over the executor the job gives
it (a :class:`RayExecutor` over one client actor per site, or a :class:`~fl_ray.actors.pool.PoolExecutor`
over a pool of workers); it logs the rounds into the ``server`` run through the same tracking path as the
sites. It runs on the driver's node, so its files (checkpoints, the best model, rounds.jsonl) land in the
job directory, and it holds no tracking credentials (the receiver actor logs the best model).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import ray

from fl_ray.actors.context import make_context
from fl_ray.checkpoint import BestModel
from fl_ray.learners import load_learner
from fl_ray.rounds import Executor, RoundEngine, Running, Task, describe_failure
from fl_ray.strategies import build_strategy
from fl_ray.strategies.base import Arrays

RESTART_GRACE = 60.0  # seconds a round waits for a site that Ray is restarting


class RayExecutor(Executor):
    """Runs tasks on the client actors: the round's weights and payload go into the object store once."""

    def __init__(self, clients: Mapping[str, Any]) -> None:
        self.clients = clients

    def run(
        self,
        tasks: list[Task],
        weights: Mapping[str, np.ndarray],
        payload: Mapping[str, Arrays],
        failed: dict[str, str],
    ) -> Running:
        weights_ref, payload_ref = ray.put(dict(weights)), ray.put(dict(payload))
        alive = set(self._reachable([t.site for t in tasks], failed))
        return _RayRunning(
            {self.clients[t.site].run.remote(t, weights_ref, payload_ref): t.site for t in tasks if t.site in alive}
        )

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
                    failed[site] = describe_failure(exc)
                pending.remove(site)
            if pending and time.monotonic() >= deadline:
                failed.update({s: f"unreachable: still restarting after {RESTART_GRACE:g} s" for s in pending})
                break
            if pending:
                time.sleep(0.2)
        return [s for s in sites if s in alive]


class _RayRunning(Running):
    def __init__(self, refs: dict[Any, str]) -> None:
        self._refs = refs

    def next(self, timeout: float | None) -> tuple[str, dict[str, Any] | Exception] | None:
        if not self._refs:
            return None
        ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if not ready:
            return None
        site = self._refs.pop(ready[0])
        try:
            return site, ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            return site, exc

    @property
    def pending(self) -> list[str]:
        return list(self._refs.values())

    def cancel(self) -> None:
        for ref in self._refs:
            ray.cancel(ref)
        self._refs.clear()


@ray.remote
class ServerActor:
    """The server of one job: started before the sites' actors (so that its share of the driver's node, where
    it runs, is taken before they fill the node), then given their executor with :meth:`use`."""

    engine: RoundEngine

    def __init__(self, config: dict[str, Any], receiver_name: str, checkpoint_dir: str) -> None:
        self.ctx, self.tracking = make_context(
            "server", None, config, receiver_name, config["resources"]["server_cpus"]
        )
        self.learner = load_learner(self.ctx.config.learner, self.ctx.config.learner_args)
        self.learner.setup(self.ctx)
        self.checkpoint_dir = Path(checkpoint_dir)

    def use(self, executor: Executor) -> None:
        """Run the rounds' tasks on ``executor`` (the sites' actors); called once, before anything else."""
        cfg = self.ctx.config
        self.engine = RoundEngine(
            cfg, self.learner, self.ctx, build_strategy(cfg.strategy), executor, self.checkpoint_dir
        )

    def completed_rounds(self) -> int:
        """How many rounds are completed so far (from the checkpoint when the job resumed)."""
        return len(self.engine.rounds)

    def run_round(self, round_: int) -> dict[str, Any]:
        """Run round ``round_`` (1-based) and return its summary; its tracking records are sent before it returns."""
        try:
            return self.engine.run_round(round_)
        finally:
            self.tracking.flush()

    def best_model(self) -> BestModel | None:
        """The best global model so far, rebuilt by the server's learner to be logged (None: none kept)."""
        return self.engine.best_model()

    def cross_site_evaluation(self) -> dict[str, dict[str, Any]]:
        """Every site evaluates the final global model and each site's last local model (see RoundEngine)."""
        return self.engine.cross_site_evaluation()

    def close(self, timeout: float) -> dict[str, int]:
        """Deliver the server's tracking records and stop."""
        return self.tracking.close(timeout)
