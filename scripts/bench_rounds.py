#!/usr/bin/env python3
"""Benchmark: seconds per FedAvg round for many sites and tiny rounds, with tracking on.

Runs a real job (local Ray, one actor per site, MLflow tracking into a sqlite store) of ``--sites``
sites and ``--rounds`` tiny rounds (an MLP on a small synthetic dataset), and reports the median
and mean round time after the first (warm-up) round. The baseline, measured in the same run, is the
same rounds computed sequentially in this one process with no Ray and no tracking: the ratio shows
what the runtime adds on top of the training itself. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from sequential_baseline import sequential_rounds

from fl_ray.config import JobConfig
from fl_ray.data import site_data
from fl_ray.job import run_job
from fl_ray.learners import ImageClassificationLearner, LearnerContext


def bench_config(sites: int, rounds: int) -> JobConfig:
    return JobConfig.model_validate(
        {
            "name": "bench-rounds",
            "num_rounds": rounds,
            "sites": sites,
            "min_clients": sites,
            "local_epochs": 1,
            "batch_size": 32,
            "dataset": {"name": "synthetic", "num_samples": 100 * sites},
            "learner_args": {"model": "mlp"},
            "resources": {"client_cpus": 0.1, "server_cpus": 0.1},
            "tracking": {"system_metrics": False},
        }
    )


def sequential_baseline(cfg: JobConfig) -> list[float]:
    """The same rounds in one process, one site after another: no Ray, no tracking."""
    torch.set_num_threads(1)
    sites = cfg.site_names

    def learner(site: str, index: int | None) -> tuple[ImageClassificationLearner, LearnerContext]:
        data, ds = site_data(cfg.dataset, cfg.seed, len(sites), index)
        ctx = LearnerContext(
            site=site,
            config=cfg,
            data=data,
            num_classes=ds.num_classes,
            input_shape=ds.input_shape,
        )
        lrn = ImageClassificationLearner(**cfg.learner_args)
        lrn.setup(ctx)
        return lrn, ctx

    clients = [learner(s, i) for i, s in enumerate(sites)]
    server, server_ctx = learner("server", None)
    return sequential_rounds(clients, server, server_ctx, cfg.num_rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10, help="sites (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds (default %(default)s)")
    parser.add_argument("--target", type=float, default=0.5, help="seconds per round to beat (default %(default)s)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    cfg = bench_config(args.sites, args.rounds)

    console.print(f"{args.sites} sites x {args.rounds} rounds on Ray, tracking into MLflow (sqlite)...")
    with tempfile.TemporaryDirectory(prefix="fl_ray_bench_") as tmp:
        start = time.perf_counter()
        result = run_job(cfg, workspace=Path(tmp), show_progress=False)
        total = time.perf_counter() - start
        tracked = result.tracking["receivers"]["mlflow"]
    rounds = [r["seconds"] for r in result.rounds]
    steady = rounds[1:] or rounds
    console.print("baseline: the same rounds sequentially in one process, no Ray, no tracking...")
    base = sequential_baseline(cfg)[1:] or [float("nan")]

    figures = {
        "sites": args.sites,
        "rounds": args.rounds,
        "job_seconds_total": round(total, 2),
        "first_round_seconds": round(rounds[0], 3),
        "round_seconds_median": round(statistics.median(steady), 4),
        "round_seconds_mean": round(statistics.mean(steady), 4),
        "round_seconds_max": round(max(steady), 4),
        "baseline_round_seconds_median": round(statistics.median(base), 4),
        "overhead_ratio": round(statistics.median(steady) / statistics.median(base), 2),
        "tracking_records_delivered": tracked["delivered"],
        "tracking_records_undelivered": tracked["undelivered"],
        "final_accuracy": round(result.final_metrics["accuracy"], 4),
        "target_round_seconds": args.target,
        "meets_target": statistics.median(steady) <= args.target,
    }
    console.print(
        f"round time after warm-up: median {figures['round_seconds_median']:.3f} s, "
        f"mean {figures['round_seconds_mean']:.3f} s, max {figures['round_seconds_max']:.3f} s "
        f"(first round {figures['first_round_seconds']:.2f} s; whole job incl. Ray start {total:.1f} s)"
    )
    console.print(
        f"baseline (sequential, no Ray): median {figures['baseline_round_seconds_median']:.3f} s per round; "
        f"ratio {figures['overhead_ratio']}x"
    )
    console.print(f"target <= {args.target} s per round: {'met' if figures['meets_target'] else 'NOT met'}")
    print(json.dumps(figures))
    return 0 if figures["meets_target"] and not figures["tracking_records_undelivered"] else 1


if __name__ == "__main__":
    sys.exit(main())
