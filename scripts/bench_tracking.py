#!/usr/bin/env python3
"""Benchmark: K sites each log M metric points as fast as they can into a real `mlflow server`.

Each site is a Ray actor with the real tracking path (MLflowWriter -> EventSender -> ReceiverActor ->
spool -> MLflowReceiver -> `mlflow server` on loopback, started here with its default number of
workers unless ``--server-workers`` says otherwise; runs are created before the clock starts).
Reports the writer call's median cost inside an actor, end-to-end points per second until every
point is readable in MLflow, points lost or duplicated, HTTP requests per 1,000 points, the cost of
the spool's durability (its synced appends: how many, and their time in all), and a
baseline measured in the same run against the same server: one process calling
``MlflowClient.log_metric`` once per point (a sample, extrapolated). The last line printed is one
JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from rich.console import Console

from fl_ray.actors.receiver import receiver_actor_name, start_receiver
from fl_ray.config import TrackingConfig
from fl_ray.mlflow_server import LocalMlflowServer
from fl_ray.receivers.base import FINISHED, ReceiverContext
from fl_ray.tracking.site import SiteTracking
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0.1)
class BenchSite:
    """A site that logs ``points`` metric points in a tight loop and times each writer call."""

    def __init__(self, site: str, receiver_name: str) -> None:
        self.tracking = SiteTracking(site, ray.get_actor(receiver_name), TrackingConfig())

    def log(self, points: int, key: str = "bench_metric") -> list[int]:
        log_metric, clock = self.tracking.mlflow.log_metric, time.perf_counter_ns
        costs = []
        for i in range(points):
            start = clock()
            log_metric(key, i * 0.5, step=i)
            costs.append(clock() - start)
        self.tracking.flush()
        return costs

    def close(self) -> dict[str, int]:
        return self.tracking.close()


def baseline(uri: str, sample: int) -> float:
    """Points per second of one process calling MlflowClient.log_metric once per point."""
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"baseline-{time.time_ns()}")).info.run_id
    start = time.perf_counter()
    for i in range(sample):
        client.log_metric(run_id, "baseline_metric", i * 0.5, step=i)
    return sample / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=8, help="client actors (default %(default)s)")
    parser.add_argument("--points", type=int, default=5000, help="metric points per site (default %(default)s)")
    parser.add_argument("--baseline-sample", type=int, default=300,
                        help="points the baseline logs one by one, then extrapolates (default %(default)s)")
    parser.add_argument("--server-workers", type=int, default=None,
                        help="worker processes of the mlflow server (default: mlflow server's own default)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    total = args.sites * args.points
    sites = [f"site-{i}" for i in range(1, args.sites + 1)]

    with tempfile.TemporaryDirectory(prefix="fl_ray_bench_") as tmp:
        root = Path(tmp)
        workers = "default" if args.server_workers is None else str(args.server_workers)
        console.print(f"starting mlflow server ({workers} workers) and Ray; "
                      f"{args.sites} sites x {args.points} points = {total:,}")
        with LocalMlflowServer(root / "server", workers=args.server_workers) as server:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            ctx = ReceiverContext(job_id="bench", job_name="bench-tracking", job_dir=root / "job",
                                  workspace=root, sites=tuple(sites), config={"sites": args.sites})
            ctx.job_dir.mkdir()
            receiver = start_receiver(ctx, [{"type": "mlflow", "tracking_uri": server.uri}], {}, here)
            actors = [BenchSite.remote(s, receiver_actor_name("bench")) for s in sites]
            ray.get([a.log.remote(1, "warmup") for a in actors])  # actors up...
            deadline = time.monotonic() + 300
            while (status := ray.get(receiver.status.remote())["receivers"]["mlflow"])["pending"]:  # ...runs made
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the warm-up points did not reach MLflow within 300 s: {status}")
                time.sleep(0.05)
            requests_before = server.requests_served()

            start = time.perf_counter()
            costs = [c for per_site in ray.get([a.log.remote(args.points) for a in actors]) for c in per_site]
            ray.get([a.close.remote() for a in actors])
            report = ray.get(receiver.close.remote(FINISHED, 600))
            elapsed = time.perf_counter() - start
            requests = server.requests_served() - requests_before

            run_ids = report["receivers"]["mlflow"]["run_ids"]
            spool = report["spool"]
            client = MlflowClient(server.uri)
            found = dupes = 0
            for site in sites:
                points = {(m.step, m.value) for m in client.get_metric_history(run_ids[site], "bench_metric")}
                history = client.get_metric_history(run_ids[site], "bench_metric")
                found += len(points & {(i, i * 0.5) for i in range(args.points)})
                dupes += len(history) - len(points)
            lost = total - found
            ray.shutdown()

            console.print("measuring the baseline (MlflowClient.log_metric per point)...")
            base = baseline(server.uri, args.baseline_sample)

    points_per_s = total / elapsed
    result = {
        "sites": args.sites, "points_per_site": args.points, "points": total, "server_workers": args.server_workers,
        "seconds": round(elapsed, 3), "points_per_s": round(points_per_s, 1), "lost": lost, "duplicated": dupes,
        "http_requests": requests, "http_requests_per_1000_points": round(requests * 1000 / total, 3),
        "writer_call_us_median": round(statistics.median(costs) / 1000, 3),
        "writer_call_us_p99": round(sorted(costs)[int(len(costs) * 0.99)] / 1000, 3),
        "baseline_points_per_s": round(base, 1), "baseline_seconds_extrapolated": round(total / base, 1),
        "speedup": round(points_per_s / base, 1),
        "spool_syncs": spool["syncs"], "spool_sync_seconds": spool["sync_seconds"],
        "spool_sync_share": round(spool["sync_seconds"] / elapsed, 4),
    }
    console.print(f"end to end: {total:,} points in {elapsed:.2f} s = {points_per_s:,.0f} points/s; "
                  f"lost {lost}, duplicated {dupes}")
    console.print(f"writer call: median {result['writer_call_us_median']} µs, p99 {result['writer_call_us_p99']} µs")
    console.print(f"HTTP requests: {requests} ({result['http_requests_per_1000_points']} per 1,000 points)")
    console.print(f"spool: {spool['syncs']} synced appends (one per acknowledged batch) took "
                  f"{spool['sync_seconds']:.3f} s in all, {result['spool_sync_share']:.1%} of the run")
    console.print(f"baseline: {base:,.0f} points/s, {1000 / base:.0f} ms a call (would take {total / base:,.0f} s); "
                  f"speedup {result['speedup']}x")
    print(json.dumps(result))
    return 0 if lost == 0 and dupes == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
