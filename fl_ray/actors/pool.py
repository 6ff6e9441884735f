"""A pool of worker actors for many virtual sites: how many workers, and the executor that feeds them.

With ``resources.workers`` below the number of sites, sites are virtual: the round engine's tasks go
to :class:`PoolExecutor`, which hands each free :class:`~fl_ray.actors.worker.WorkerActor` the next
task (one at a time per worker, so a slow task holds up only its worker) and gives results back as
they finish. A task whose worker dies under it (a crash, an out-of-memory kill, ``ray.kill``) is
not the site's fault: it goes back to the queue for any worker up to ``MAX_ATTEMPTS`` times, and the
dead worker gets no task until Ray has restarted it and it answers again; a learner's own error fails
the site as with one actor per site. A worker that keeps dying more times in a row than Ray restarts it
is dropped from the pool.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Mapping, Sequence

import numpy as np
import ray

from fl_ray.config import JobConfig
from fl_ray.rounds import Executor, Running, Task
from fl_ray.strategies.base import Arrays

MAX_ATTEMPTS = 3  # runs of one task on workers that die under it before the site fails
PROBE_INTERVAL = 0.2  # seconds between asks whether a restarting worker is back


def worker_count(cfg: JobConfig, cluster: Mapping[str, float]) -> int:
    """How many actors run the sites: ``resources.workers`` when set, else one per site when the
    ``cluster`` (its total resources) holds them at ``client_cpus``/``client_gpus`` besides the server
    (or holds not even one), else as many as it holds. At least the number of sites means one actor per site."""
    res, sites = cfg.resources, len(cfg.site_names)
    if res.workers is not None:
        return res.workers
    if res.autoscale:  # the autoscaler adds nodes for every site
        return sites
    fits = [(cluster.get("CPU", 0.0) - res.server_cpus) / res.client_cpus]
    if res.client_gpus:
        fits.append(cluster.get("GPU", 0.0) / res.client_gpus)
    capacity = math.floor(min(fits) + 1e-9)
    return sites if sites <= capacity or capacity < 1 else capacity  # none fits: the resource check says why


class PoolExecutor(Executor):
    """Runs the sites' tasks as work items on ``workers``; ``sites`` is the configured order (the index a
    worker takes a site's data by). ``max_restarts`` is how often Ray restarts a worker. Each run opens the
    tracking streams of all its sites with one call to the receiver actor (``receiver_name``)."""

    def __init__(self, workers: Sequence[Any], sites: Sequence[str], max_restarts: int, receiver_name: str) -> None:
        self.workers = list(workers)
        self.receiver_name = receiver_name
        self.index = {site: i for i, site in enumerate(sites)}
        self.max_restarts = max_restarts
        self.deaths = [0] * len(self.workers)  # tasks in a row that each worker died under
        self.dropped: set[int] = set()

    def run(
        self,
        tasks: list[Task],
        weights: Mapping[str, np.ndarray],
        payload: Mapping[str, Arrays],
        failed: dict[str, str],
    ) -> Running:
        receiver = ray.get_actor(self.receiver_name)
        opened: Any = ray.get(receiver.open_sites.remote(sorted({t.site for t in tasks})))
        return _PoolRunning(self, tasks, ray.put(dict(weights)), ray.put(dict(payload)), opened)

    def live_workers(self) -> list[int]:
        """Indices of the workers still in the pool."""
        return [w for w in range(len(self.workers)) if w not in self.dropped]

    def worker_died(self, worker: int, exc: ray.exceptions.RayActorError) -> None:
        """Count a task that ``worker`` died under; drop the worker once Ray will not restart it again."""
        if isinstance(exc, ray.exceptions.ActorUnavailableError):  # restarting or unreachable for a moment
            return
        self.deaths[worker] += 1
        if self.deaths[worker] > self.max_restarts:
            self.dropped.add(worker)


class _PoolRunning(Running):
    def __init__(
        self,
        pool: PoolExecutor,
        tasks: list[Task],
        weights_ref: Any,
        payload_ref: Any,
        opened: dict[str, dict[str, Any]],
    ) -> None:
        self._pool = pool
        self._opened = opened  # each site's tracking stream, for the first time its task is sent
        self._queue: deque[tuple[Task, int]] = deque((t, 1) for t in tasks)
        self._refs = weights_ref, payload_ref
        self._busy: dict[Any, tuple[Task, int, int]] = {}  # ref -> (task, attempt, worker)
        self._probing: dict[Any, int] = {}  # ref of an info() call -> worker whose task died, until it answers
        self._free = pool.live_workers()

    def _dispatch(self) -> None:
        while self._queue and self._free:
            worker = self._free.pop(0)
            task, attempt = self._queue.popleft()
            opened = self._opened.pop(task.site, None)  # once: a task sent again opens a fresh stream
            ref = self._pool.workers[worker].run.remote(
                task.site, self._pool.index[task.site], task, *self._refs, opened
            )
            self._busy[ref] = (task, attempt, worker)

    def _probe(self, worker: int) -> None:
        """Give ``worker`` no task until it answers again (Ray is restarting it), unless it is out of the pool."""
        if worker not in self._pool.dropped:
            self._probing[self._pool.workers[worker].info.remote()] = worker

    def next(self, timeout: float | None) -> tuple[str, dict[str, Any] | Exception] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatch()
            if not self._busy and not self._probing:
                if self._queue:
                    task, _ = self._queue.popleft()
                    return task.site, RuntimeError(
                        "no pool worker is left to run the task: each died more times "
                        "than resources.max_client_restarts lets Ray restart it"
                    )
                return None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait([*self._busy, *self._probing], num_returns=1, timeout=left)
            if not ready:
                return None
            if ready[0] in self._probing:
                worker = self._probing.pop(ready[0])
                try:
                    ray.get(ready[0])
                    self._free.append(worker)
                except ray.exceptions.RayActorError as exc:
                    self._pool.worker_died(worker, exc)
                    time.sleep(PROBE_INTERVAL)
                    self._probe(worker)
                continue
            task, attempt, worker = self._busy.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:  # the worker died under the task: run it elsewhere
                self._pool.worker_died(worker, exc)
                self._probe(worker)
                if isinstance(
                    exc, ray.exceptions.ActorUnavailableError
                ):  # refused by a restarting worker: no attempt spent
                    self._queue.appendleft((task, attempt))
                    continue
                if attempt < MAX_ATTEMPTS:
                    self._queue.appendleft((task, attempt + 1))
                    continue
                return task.site, exc
            except ray.exceptions.RayError as exc:
                self._free.append(worker)
                return task.site, exc
            self._pool.deaths[worker] = 0
            self._free.append(worker)
            return task.site, result

    @property
    def pending(self) -> list[str]:
        return [t.site for t, _ in self._queue] + [t.site for t, _, _ in self._busy.values()]

    def cancel(self) -> None:
        self._queue.clear()
        for ref in self._busy:
            ray.cancel(ref)
        self._busy.clear()
        self._probing.clear()


def start_workers(cfg: JobConfig, job_id: str, count: int, parts_ref: Any, receiver_name: str) -> dict[str, Any]:
    """Start ``count`` pool workers, by tracking name (``worker-1`` ...); ``parts_ref`` is the object holding
    every site's partition indices, in configured order (the caller keeps it alive for the workers' restarts)."""
    from fl_ray.actors.worker import WorkerActor

    res, config = cfg.resources, cfg.to_dict()
    strategy = "SPREAD" if res.placement == "spread" else "DEFAULT"
    names = [f"worker-{i}" for i in range(1, count + 1)]
    return {
        name: WorkerActor.options(  # type: ignore[attr-defined]
            num_cpus=res.client_cpus,
            num_gpus=res.client_gpus,
            max_restarts=res.max_client_restarts,
            scheduling_strategy=strategy,
            name=f"fl_ray-{job_id}-{name}",
        ).remote(name, config, receiver_name, [parts_ref])
        for name in names
    }
