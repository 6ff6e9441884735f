#!/usr/bin/env python3
"""Benchmark: K sites each log M metric points as fast as they can, into MLflow, through fl_ray.

Each site is a Ray actor with the real tracking path (MLflowWriter -> EventSender -> ReceiverActor ->
spool -> MLflowReceiver -> MLflow), timed from the first writer call until every point is stored
(the receiver actor has delivered and closed; runs are created before the clock starts). Reports the
writer call's median cost inside an actor, end-to-end points per second, points lost or duplicated,
and the cost of the spool's durability (its synced appends: how many, and their time in all). Before
the clock starts, each site also logs ``--fluent-points`` points with MLflow's own ``mlflow.log_metric``
(through the site's ``fl-ray://`` store): that call's median cost (target: at most 30 µs) and whether
every point arrived once. Its baseline, in the same run and as many actors at once: the same call into a
tracking store that does nothing, MLflow's own cost of the call (what fl_ray's store adds is the difference).

``--store server`` (the default): into a real `mlflow server` on loopback, started here with its
default number of workers unless ``--server-workers`` says otherwise; also HTTP requests per 1,000
points. Its baseline, in the same run and against the same server: one process calling
``MlflowClient.log_metric`` once per point (a sample, extrapolated).

``--store sqlite``: into a fresh sqlite store (the default store of a workspace). Its baseline, in the
same run (before and after fl_ray's run, the mean of both): one process calling ``MlflowClient.log_batch``
with 1,000 metrics a call into another fresh sqlite store, the same points into as many runs: what
MLflow itself can take; fl_ray's target is 0.8 of it. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from mlflow.entities import Experiment, LifecycleStage, Run, RunData, RunInfo
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.tracking import MlflowClient
from rich.console import Console

from fl_ray.actors.receiver import receiver_actor_name, start_receiver
from fl_ray.config import TrackingConfig
from fl_ray.mlflow_server import LocalMlflowServer
from fl_ray.mlflow_store import prepare_sqlite_store
from fl_ray.receivers.base import FINISHED, ReceiverContext
from fl_ray.tracking.mlflow_scope import site_scope
from fl_ray.tracking.site import SiteTracking
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


FLUENT_KEY = "fluent_metric"
FLUENT_TARGET_US = 30.0


@ray.remote(num_cpus=0.1)
class BenchSite:
    """A site that logs ``points`` metric points in a tight loop and times each writer call."""

    def __init__(self, site: str, receiver_name: str) -> None:
        self.tracking = SiteTracking(site, ray.get_actor(receiver_name), TrackingConfig())
        self.scope = contextlib.ExitStack()  # MLflow's tracking URI is the site's, as in a client actor
        self.scope.enter_context(site_scope(self.tracking))

    def log(self, points: int, key: str = "bench_metric") -> list[int]:
        """``ctx.mlflow.log_metric`` in a tight loop: each call's cost."""
        costs = _timed_calls(self.tracking.mlflow.log_metric, key, points)
        self.tracking.flush()
        return costs

    def log_fluent(self, points: int, key: str = FLUENT_KEY) -> list[int]:
        """``mlflow.log_metric`` in a tight loop, in the site's run: each call's cost."""
        import mlflow

        with mlflow.start_run(log_system_metrics=False):
            costs = _timed_calls(mlflow.log_metric, key, points)
        self.tracking.flush()
        return costs

    def close(self) -> dict[str, int]:
        self.scope.close()
        return self.tracking.close()


class NullStore(AbstractStore):
    """A tracking store that keeps nothing: what ``mlflow.log_metric`` costs before any store's work."""

    INFO = RunInfo("0" * 32, "0", "", "RUNNING", 0, None, LifecycleStage.ACTIVE, "null://runs", "null")

    def get_experiment(self, experiment_id: str) -> Experiment:
        return Experiment("0", "null", "null://", LifecycleStage.ACTIVE)

    def get_experiment_by_name(self, experiment_name: str) -> Experiment:
        return Experiment("0", experiment_name, "null://", LifecycleStage.ACTIVE)

    def create_run(self, *args: Any, **kwargs: Any) -> Run:
        return Run(self.INFO, RunData())

    def get_run(self, run_id: str) -> Run:
        return Run(self.INFO, RunData())

    def update_run_info(self, *args: Any, **kwargs: Any) -> RunInfo:
        return self.INFO

    def log_metric(self, run_id: str, metric: Any) -> None:
        pass


@ray.remote(num_cpus=0.1)
class NullStoreSite:
    """An actor timing ``mlflow.log_metric`` into :class:`NullStore`: the baseline of the fluent call."""

    def log_fluent(self, points: int) -> list[int]:
        import mlflow
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # what entry points fill

        _tracking_store_registry.register("null", lambda store_uri=None, artifact_uri=None: NullStore())
        mlflow.set_tracking_uri("null://")
        mlflow.set_registry_uri("null://")  # as a site's scope does: no registry look-up on each call
        with mlflow.start_run(log_system_metrics=False):
            return _timed_calls(mlflow.log_metric, FLUENT_KEY, points)


def _timed_calls(log_metric: Any, key: str, points: int) -> list[int]:
    """Nanoseconds of each of ``points`` calls ``log_metric(key, i * 0.5, step=i)``."""
    clock, costs = time.perf_counter_ns, []
    for i in range(points):
        start = clock()
        log_metric(key, i * 0.5, step=i)
        costs.append(clock() - start)
    return costs


def baseline(uri: str, sample: int) -> float:
    """Points per second of one process calling MlflowClient.log_metric once per point."""
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"baseline-{time.time_ns()}")).info.run_id
    start = time.perf_counter()
    for i in range(sample):
        client.log_metric(run_id, "baseline_metric", i * 0.5, step=i)
    return sample / (time.perf_counter() - start)


def batch_baseline(uri: str, runs: int, points: int) -> float:
    """Points per second of one process calling ``MlflowClient.log_batch`` with 1,000 metrics a call, the
    points of each of ``runs`` runs (the same key, steps and client timestamps as the sites log)."""
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"baseline-{time.time_ns()}")
    run_ids = [client.create_run(experiment).info.run_id for _ in range(runs)]
    now = int(time.time() * 1000)
    start = time.perf_counter()
    for run_id in run_ids:
        for first in range(0, points, 1000):
            client.log_batch(
                run_id,
                metrics=[Metric("bench_metric", i * 0.5, now + i, i) for i in range(first, min(first + 1000, points))],
            )
    return runs * points / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument(
        "--store",
        choices=("server", "sqlite"),
        default="server",
        help="where the points go: a local `mlflow server`, or a sqlite store (default %(default)s)",
    )
    parser.add_argument("--sites", type=int, default=8, help="client actors (default %(default)s)")
    parser.add_argument("--points", type=int, default=5000, help="metric points per site (default %(default)s)")
    parser.add_argument(
        "--fluent-points",
        type=int,
        default=2000,
        help="points per site logged with mlflow.log_metric before the timed run (default %(default)s)",
    )
    parser.add_argument(
        "--baseline-sample",
        type=int,
        default=300,
        help="server: points the baseline logs one by one, then extrapolates (default %(default)s)",
    )
    parser.add_argument(
        "--server-workers",
        type=int,
        default=None,
        help="server: worker processes of the mlflow server (default: mlflow server's own default)",
    )
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    total = args.sites * args.points

    with tempfile.TemporaryDirectory(prefix="fl_ray_bench_") as tmp:
        root = Path(tmp)
        if args.store == "sqlite":
            console.print(f"sqlite store; {args.sites} sites x {args.points} points = {total:,}")
            uri = f"sqlite:///{root / 'fl_ray' / 'mlflow.db'}"
            rates = []
            for when in ("before", "after"):  # the load of a shared machine drifts: the mean of both
                if when == "after":
                    figures = pipeline(args, console, root, uri, None)
                console.print(f"baseline {when} (MlflowClient.log_batch, 1,000 metrics a call, fresh sqlite store)...")
                base_db = root / f"baseline-{when}" / "mlflow.db"
                prepare_sqlite_store(base_db, base_db.parent / "mlartifacts")
                rates.append(batch_baseline(f"sqlite:///{base_db}", args.sites, args.points))
            base = statistics.mean(rates)
        else:
            workers = "default" if args.server_workers is None else str(args.server_workers)
            console.print(
                f"starting mlflow server ({workers} workers) and Ray; "
                f"{args.sites} sites x {args.points} points = {total:,}"
            )
            with LocalMlflowServer(root / "server", workers=args.server_workers) as server:
                figures = pipeline(args, console, root, server.uri, server)
                console.print("measuring the baseline (MlflowClient.log_metric per point)...")
                base = baseline(server.uri, args.baseline_sample)

    points_per_s = figures["points_per_s"]
    figures.update(
        {
            "store": args.store,
            "server_workers": args.server_workers,
            "baseline_points_per_s": round(base, 1),
            "baseline_seconds_extrapolated": round(total / base, 1),
            "speedup": round(points_per_s / base, 2),
        }
    )
    if args.store == "sqlite":
        figures.update(
            baseline="MlflowClient.log_batch, 1000 metrics a call",
            baseline_runs_points_per_s=[round(r, 1) for r in rates],
            target_ratio=0.8,
            meets_target=points_per_s >= 0.8 * base,
        )
    console.print(
        f"end to end: {total:,} points in {figures['seconds']:.2f} s = {points_per_s:,.0f} points/s; "
        f"lost {figures['lost']}, duplicated {figures['duplicated']}"
    )
    console.print(f"writer call: median {figures['writer_call_us_median']} µs, p99 {figures['writer_call_us_p99']} µs")
    console.print(
        f"fluent mlflow.log_metric on a site: median {figures['fluent_call_us_median']} µs, p99 "
        f"{figures['fluent_call_us_p99']} µs (target <= {FLUENT_TARGET_US:g} µs: "
        f"{'met' if figures['fluent_meets_target'] else 'NOT met'})"
    )
    console.print(
        f"  baseline: the same call into a store that does nothing, median {figures['fluent_null_store_us_median']} "
        f"µs: fl_ray's store adds {figures['fluent_store_us']} µs"
    )
    if args.store == "server":
        console.print(
            f"HTTP requests: {figures['http_requests']} ({figures['http_requests_per_1000_points']} per 1,000 points)"
        )
    console.print(
        f"spool: {figures['spool_syncs']} synced appends (one per acknowledged batch) took "
        f"{figures['spool_sync_seconds']:.3f} s in all, {figures['spool_sync_share']:.1%} of the run"
    )
    if args.store == "sqlite":
        console.print(
            f"baseline (log_batch, 1,000 metrics a call): {base:,.0f} points/s; fl_ray reaches "
            f"{figures['speedup']:.2f} of it (target 0.8: {'met' if figures['meets_target'] else 'NOT met'})"
        )
    else:
        console.print(
            f"baseline: {base:,.0f} points/s, {1000 / base:.0f} ms a call (would take {total / base:,.0f} s); "
            f"speedup {figures['speedup']}x"
        )
    print(json.dumps(figures))
    return 0 if figures["lost"] == 0 and figures["duplicated"] == 0 else 1


def pipeline(
    args: argparse.Namespace, console: Console, root: Path, uri: str, server: LocalMlflowServer | None
) -> dict[str, Any]:
    """fl_ray's path, from the sites' writer calls to points stored in MLflow at ``uri``: the figures."""
    total = args.sites * args.points
    sites = [f"site-{i}" for i in range(1, args.sites + 1)]
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ctx = ReceiverContext(
        job_id="bench",
        job_name="bench-tracking",
        job_dir=root / "job",
        workspace=root,
        sites=tuple(sites),
        config={"sites": args.sites},
    )
    ctx.job_dir.mkdir()
    receiver = start_receiver(ctx, [{"type": "mlflow", "tracking_uri": uri}], {}, here)
    actors = [BenchSite.remote(s, receiver_actor_name("bench")) for s in sites]
    ray.get([a.log.remote(1, "warmup") for a in actors])  # actors up...
    fluent = [c for per_site in ray.get([a.log_fluent.remote(args.fluent_points) for a in actors]) for c in per_site]
    null_sites = [NullStoreSite.remote() for _ in sites]
    floor = [c for per in ray.get([a.log_fluent.remote(args.fluent_points) for a in null_sites]) for c in per]
    del null_sites
    deadline = time.monotonic() + 300
    while (status := ray.get(receiver.status.remote())["receivers"]["mlflow"])["pending"]:  # ...runs made
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm-up points did not reach MLflow within 300 s: {status}")
        time.sleep(0.05)
    requests_before = server.requests_served() if server else 0

    start = time.perf_counter()
    costs = [c for per_site in ray.get([a.log.remote(args.points) for a in actors]) for c in per_site]
    ray.get([a.close.remote() for a in actors])
    report = ray.get(receiver.close.remote(FINISHED, 600))
    elapsed = time.perf_counter() - start
    requests = server.requests_served() - requests_before if server else None

    run_ids = report["receivers"]["mlflow"]["run_ids"]
    spool = report["spool"]
    client = MlflowClient(uri)
    found = dupes = fluent_found = fluent_dupes = 0
    for site in sites:
        history = client.get_metric_history(run_ids[site], "bench_metric")
        points = {(m.step, m.value) for m in history}
        found += len(points & {(i, i * 0.5) for i in range(args.points)})
        dupes += len(history) - len(points)
        history = client.get_metric_history(run_ids[site], FLUENT_KEY)
        points = {(m.step, m.value) for m in history}
        fluent_found += len(points & {(i, i * 0.5) for i in range(args.fluent_points)})
        fluent_dupes += len(history) - len(points)
    ray.shutdown()
    fluent_median = statistics.median(fluent) / 1000 if fluent else float("nan")
    floor_median = statistics.median(floor) / 1000 if floor else float("nan")
    return {
        "sites": args.sites,
        "points_per_site": args.points,
        "points": total,
        "seconds": round(elapsed, 3),
        "points_per_s": round(total / elapsed, 1),
        "lost": total - found + args.sites * args.fluent_points - fluent_found,
        "duplicated": dupes + fluent_dupes,
        "http_requests": requests,
        "http_requests_per_1000_points": round(requests * 1000 / total, 3) if requests is not None else None,
        "writer_call_us_median": round(statistics.median(costs) / 1000, 3),
        "writer_call_us_p99": round(sorted(costs)[int(len(costs) * 0.99)] / 1000, 3),
        "fluent_points_per_site": args.fluent_points,
        "fluent_call_us_median": round(fluent_median, 3),
        "fluent_call_us_p99": round(sorted(fluent)[int(len(fluent) * 0.99)] / 1000, 3) if fluent else None,
        "fluent_target_us": FLUENT_TARGET_US,
        "fluent_meets_target": fluent_median <= FLUENT_TARGET_US,
        "fluent_null_store_us_median": round(floor_median, 3),
        "fluent_store_us": round(fluent_median - floor_median, 3),
        "spool_syncs": spool["syncs"],
        "spool_sync_seconds": spool["sync_seconds"],
        "spool_sync_share": round(spool["sync_seconds"] / elapsed, 4),
    }


if __name__ == "__main__":
    sys.exit(main())
