#!/usr/bin/env python3
"""Benchmark: many virtual sites on a pool of workers: memory, start-up, round time, tracking.

For each ``--sampled`` count, runs a real job of ``--sites`` sites (synthetic data, ``--per-site`` samples
each, or digits, whose 1,437 training samples leave about one per site of 1,000; the built-in learner and
its small CNN; ``--rounds`` rounds; MLflow tracking into a
sqlite store) on a fresh local Ray, with ``resources.workers`` as ``--workers`` says (default: what the
machine holds). A thread samples, every ``--interval`` seconds, the memory of all the job's processes
together (this driver and every process Ray started: GCS, raylet, agents, workers): PSS (proportional
set size: a page shared by several processes counts once in all) and RSS summed. It reports the peak of
each, start-up (Ray's start, and from the job's start to its first round), seconds per round, MLflow runs
created and records lost (recorded by the sites, the workers and the server, less those MLflow got).
The baseline, measured in the same run: the sites of the job's first round, trained one after another in
this one process (no Ray, no tracking), round after round. ``--also-10k`` adds a job of 10,000 sites (20
synthetic samples each) with 100 sampled per round, which has to complete. ``--cluster`` runs the jobs on the
test suite's two-node loopback cluster instead (``tests/loopback_cluster.py``: two ``ray start`` nodes on
this host, 2 CPUs each, token authentication): each job's driver is a process of this script joining it
by address, and memory counts the cluster's processes and that driver. The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import ray
import torch
from rich.console import Console

import fl_ray.job as job_module
from sequential_baseline import sequential_rounds

from fl_ray.config import JobConfig
from fl_ray.data import load_dataset, partition
from fl_ray.learners import ImageClassificationLearner, LearnerContext
from fl_ray.progress import RoundProgress

TARGET_PSS_GB, TARGET_STARTUP_S, TARGET_RATIO = 4.0, 30.0, 2.0


def bench_config(sites: int, sampled: int, rounds: int, workers: int | None, dataset: str, per_site: int) -> JobConfig:
    data = {"name": "digits"} if dataset == "digits" else {"name": "synthetic", "num_samples": per_site * sites}
    return JobConfig.model_validate(
        {
            "name": f"bench-scale-{sites}-{sampled}",
            "num_rounds": rounds,
            "sites": sites,
            "min_clients": sampled,
            "sample_fraction": sampled / sites,
            "dataset": data,
            "learner_args": {"model": "digits_cnn"},
            "resources": {"workers": workers, "client_cpus": 0.5, "server_cpus": 0.5, "schedule_timeout": 600},
            "tracking": {"log_model": False, "system_metrics_interval": 30.0, "close_timeout": 900},
        }
    )


class MemorySampler:
    """Peak PSS and summed RSS of this process and all its descendants (Ray's processes), and of what
    ``others`` lists (a cluster's processes), sampled."""

    def __init__(self, interval: float, others: Callable[[], list[psutil.Process]] = list) -> None:
        self.interval, self.others, self.peak_pss, self.peak_rss, self.processes = interval, others, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        me = psutil.Process()
        pss = rss = count = 0
        procs = {p.pid: p for p in [me, *me.children(recursive=True), *self.others()]}
        for proc in procs.values():
            try:
                info = proc.memory_full_info()
            except psutil.Error:  # gone, or not ours to read
                continue
            pss, rss, count = pss + info.pss, rss + info.rss, count + 1
        if pss > self.peak_pss:
            self.peak_pss, self.processes = pss, count
        self.peak_rss = max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


class _TimedProgress(RoundProgress):
    """The job's progress display, noting when each round ended (the start-up is what precedes round 1)."""

    ends: list[float] = []

    def round_done(self, summary: dict[str, Any]) -> None:
        _TimedProgress.ends.append(time.monotonic())
        super().round_done(summary)


def run_one(cfg: JobConfig, interval: float, address: str | None = None) -> dict[str, Any]:
    """One job, measured: on a fresh local Ray, or joining the cluster at ``address``."""
    from mlflow.tracking import MlflowClient

    _TimedProgress.ends = []
    job_module.RoundProgress = _TimedProgress
    with MemorySampler(interval) as memory, tempfile.TemporaryDirectory(prefix="fl_ray_bench_") as tmp:
        started = time.monotonic()
        if address is None:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
        ray_seconds = time.monotonic() - started
        job_start = time.monotonic()
        try:
            result = job_module.run_job(cfg, workspace=Path(tmp), show_progress=False)
        finally:
            memory.sample()
            ray.shutdown()
        total = time.monotonic() - job_start
        client = MlflowClient(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(cfg.name)
        runs = (
            []
            if experiment is None
            else client.search_runs(
                [experiment.experiment_id], f"tags.`fl_ray.job_id` = '{result.job_id}'", max_results=50_000
            )
        )
    rounds = [r["seconds"] for r in result.rounds]
    tasks = [c["seconds"] for r in result.rounds[1:] for c in r["clients"].values()]
    steady = rounds[1:] or rounds
    senders = result.tracking["senders"].values()
    recorded = sum(s.get("recorded", 0) + s.get("sites_recorded", 0) for s in senders)
    delivered = result.tracking["receivers"]["mlflow"]["delivered"]
    return {
        "sites": len(cfg.site_names),
        "sampled": cfg.clients_per_round,
        "rounds": cfg.num_rounds,
        "workers": len(result.workers) or len(cfg.site_names),
        "status": result.status,
        "peak_pss_gb": round(memory.peak_pss / 2**30, 3),
        "peak_rss_sum_gb": round(memory.peak_rss / 2**30, 3),
        "processes_at_peak": memory.processes,
        "ray_start_seconds": round(ray_seconds, 2),
        "job_startup_seconds": round(_TimedProgress.ends[0] - rounds[0] - job_start, 2),
        "startup_seconds": round(_TimedProgress.ends[0] - rounds[0] - started, 2),
        "first_round_seconds": round(rounds[0], 3),
        "round_seconds_median": round(statistics.median(steady), 3),
        "task_seconds_median": round(statistics.median(tasks or [float("nan")]), 4),
        "job_seconds": round(total, 1),
        "mlflow_runs_created": len(runs),
        "records_recorded": recorded,
        "records_delivered_to_mlflow": delivered,
        "records_lost": recorded - delivered,
        "first_round_sites": result.rounds[0]["sampled"],
        "final_accuracy": round(result.final_metrics["accuracy"], 4),
    }


def sequential_baseline(cfg: JobConfig, sites: list[str], rounds: int) -> list[float]:
    """``sites`` trained one after another in this process, no Ray and no tracking: seconds per round."""
    torch.set_num_threads(1)
    names = cfg.site_names
    dataset = load_dataset(cfg.dataset, cfg.seed)
    parts = partition(cfg.dataset, dataset.train.y, len(names), cfg.seed)

    def learner(site: str) -> tuple[ImageClassificationLearner, LearnerContext]:
        data = dataset.test if site == "server" else dataset.train.subset(parts[names.index(site)])
        ctx = LearnerContext(
            site=site,
            config=cfg,
            data=data,
            num_classes=dataset.num_classes,
            input_shape=dataset.input_shape,
        )
        lrn = ImageClassificationLearner(**cfg.learner_args)
        lrn.setup(ctx)
        return lrn, ctx

    clients = [learner(s) for s in sites]
    server, server_ctx = learner("server")
    return sequential_rounds(clients, server, server_ctx, rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000, help="sites (default %(default)s)")
    parser.add_argument("--sampled", type=int, nargs="+", default=[10, 100], help="sites per round, one job each")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per job (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="resources.workers (default: what fits)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument(
        "--dataset",
        choices=("synthetic", "digits"),
        default="synthetic",
        help="synthetic (default; --per-site samples a site) or digits (1,437 training samples "
        "shared by all the sites)",
    )
    parser.add_argument("--per-site", type=int, default=100, help="synthetic samples per site (default %(default)s)")
    parser.add_argument("--also-10k", action="store_true", help="also 10,000 sites with 100 sampled per round")
    parser.add_argument("--cluster", action="store_true", help="on a two-node loopback cluster (see above)")
    parser.add_argument("--join", help=argparse.SUPPRESS)  # internal: run the first job as a driver of this cluster
    args = parser.parse_args(argv)
    if args.join:
        cfg = bench_config(args.sites, args.sampled[0], args.rounds, args.workers, args.dataset, args.per_site)
        print(json.dumps(run_one(cfg, args.interval, args.join)))
        return 0
    console = Console(stderr=True)
    cluster = start_cluster(console) if args.cluster else None
    try:
        return run_all(args, console, cluster)
    finally:
        if cluster is not None:
            survivors = cluster.stop()
            if survivors:
                console.print(f"[red]cluster processes left running: {survivors}")


def start_cluster(console: Console) -> Any:
    """The test suite's two-node loopback cluster, started."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from loopback_cluster import LocalCluster

    console.print("starting a two-node loopback cluster...")
    cluster = LocalCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def on_cluster(args: argparse.Namespace, cluster: Any, sites: int, sampled: int, per_site: int) -> dict[str, Any]:
    """One job whose driver is a process of this script joining ``cluster``; memory is the cluster's and the
    driver's, sampled here."""
    cmd = [sys.executable, __file__, "--join", cluster.gcs_address, "--sites", str(sites), "--sampled", str(sampled)]
    cmd += ["--rounds", str(args.rounds), "--dataset", args.dataset, "--per-site", str(per_site)]
    cmd += ["--interval", str(args.interval)] + (["--workers", str(args.workers)] if args.workers else [])
    env = {
        **cluster.env,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), cluster.env["PYTHONPATH"]]),
    }
    with MemorySampler(args.interval, cluster.processes) as memory:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the cluster job's driver failed:\n{proc.stderr[-3000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    measured.update(
        peak_pss_gb=round(memory.peak_pss / 2**30, 3),
        peak_rss_sum_gb=round(memory.peak_rss / 2**30, 3),
        processes_at_peak=memory.processes,
    )
    return measured


def run_all(args: argparse.Namespace, console: Console, cluster: Any) -> int:
    jobs = [(args.sites, n, args.per_site) for n in args.sampled] + ([(10_000, 100, 20)] if args.also_10k else [])
    figures: dict[str, Any] = {"cluster": "two loopback nodes" if cluster is not None else None, "jobs": []}
    for sites, sampled, per_site in jobs:
        console.print(f"{sites} sites, {sampled} sampled per round, {args.rounds} rounds...")
        if cluster is None:
            cfg = bench_config(sites, sampled, args.rounds, args.workers, args.dataset, per_site)
            measured = run_one(cfg, args.interval)
        else:
            measured = on_cluster(args, cluster, sites, sampled, per_site)
        console.print({k: v for k, v in measured.items() if k != "first_round_sites"})
        figures["jobs"].append(measured)
    first = figures["jobs"][0]
    console.print(
        f"baseline: the {first['sampled']} sites of the first job's first round, sequentially in one process..."
    )
    cfg = bench_config(first["sites"], first["sampled"], args.rounds, args.workers, args.dataset, args.per_site)
    base = sequential_baseline(cfg, first.pop("first_round_sites"), min(args.rounds, 5))
    for measured in figures["jobs"]:
        measured.pop("first_round_sites", None)
    base_median = statistics.median(base[1:] or base)
    ratio = first["round_seconds_median"] / base_median
    figures.update(
        {
            "baseline_round_seconds_median": round(base_median, 3),
            "round_ratio_to_baseline": round(ratio, 2),
            "targets": {"peak_pss_gb": TARGET_PSS_GB, "startup_seconds": TARGET_STARTUP_S, "round_ratio": TARGET_RATIO},
            "meets_pss": all(j["peak_pss_gb"] <= TARGET_PSS_GB for j in figures["jobs"] if j["sites"] == args.sites),
            "meets_startup": all(
                j["startup_seconds"] <= TARGET_STARTUP_S for j in figures["jobs"] if j["sites"] == args.sites
            ),
            "meets_round_ratio": ratio <= TARGET_RATIO,
            "all_finished": all(j["status"] == "FINISHED" for j in figures["jobs"]),
            "no_records_lost": all(j["records_lost"] == 0 for j in figures["jobs"]),
        }
    )
    console.print(
        f"round with {first['sampled']} sampled: {first['round_seconds_median']:.3f} s; baseline "
        f"{base_median:.3f} s: {ratio:.2f}x (target <= {TARGET_RATIO:g}x)"
    )
    print(json.dumps(figures))
    ok = all(figures[k] for k in ("meets_pss", "meets_startup", "meets_round_ratio", "all_finished", "no_records_lost"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
