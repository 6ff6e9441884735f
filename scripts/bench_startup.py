#!/usr/bin/env python3
"""Benchmark: what a user waits for, from `python scripts/run_fedavg.py` to its exit, phase by phase.

Two workloads, each run as a fresh ``python scripts/run_fedavg.py`` process (local Ray started by the
job, a fresh workspace, so a fresh sqlite MLflow store):

* ``w1``: the hello-pt CNN on synthetic 3x32x32 data, 2 sites x 5 rounds, train loss logged every
  step and validation accuracy every round (plus the server's global metrics) to MLflow.
* ``w3``: 10 sites x 20 tiny rounds (an MLP on synthetic data), one actor per site, no tracking back end.
* ``w3pool``: the same job on a pool of 2 worker actors (``resources.workers: 2``).

For each it reports the whole job's wall time (process start to exit), the CPU seconds of every
process of the job together (the driver, Ray's daemons and workers: this machine has few cores, so
CPU is what start-up competes for), and each phase's start from result.json's ``timings`` (Ray
started, actors asked for, tracking receiver ready, first site ready, rounds, last round done,
tracking drained, Ray stopping, process exit). The baseline, measured in the same run, is the same
rounds run sequentially in one fresh process with no Ray and no tracking: its wall time to exit and
its rounds alone. ``store`` compares a fresh MLflow sqlite store made by MLflow (its migrations) with
one copied from fl_ray's template (:mod:`fl_ray.mlflow_store`) and with opening a store that exists. A
table goes to stderr; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from rich.console import Console
from rich.table import Table

from fl_ray.config import DEFAULT_CONFIG

REPO = Path(__file__).resolve().parent.parent
PHASES = [
    "ray",
    "ray_ready",
    "actors",
    "receiver_ready",
    "first_site_ready",
    "sites_ready",
    "rounds",
    "first_round_done",
    "last_round_done",
    "tracking",
    "tracking_drained",
    "ray_shutdown",
]
TARGETS = {"w1": 12.0, "w3": 30.0, "w3pool": 18.0}  # whole job, seconds, on the project's 2-core machine (issue 17)
FIRST_ROUND_TARGET = 8.0  # seconds from the start to the first line of round 1 (2 sites)


def workload(name: str) -> dict[str, Any]:
    """The job config of a workload."""
    if name == "w1":
        return {
            "name": "bench-w1",
            "num_rounds": 5,
            "sites": 2,
            "min_clients": 2,
            "local_epochs": 1,
            "batch_size": 32,
            "lr": 0.01,
            "dataset": {"name": "synthetic", "num_samples": 4000, "shape": [3, 32, 32]},
            "learner_args": {"model": "hello_pt_cnn", "log_every": 1},
            "resources": {"schedule_timeout": 600},
            "tracking": {"receivers": [{"type": "mlflow"}], "log_model": False},
        }
    if name == "w3pool":
        w3 = workload("w3")
        return {**w3, "name": "bench-w3pool", "resources": {**w3["resources"], "workers": 2}}
    if name == "w3":
        return {
            "name": "bench-w3",
            "num_rounds": 20,
            "sites": 10,
            "min_clients": 10,
            "local_epochs": 1,
            "batch_size": 32,
            "dataset": {"name": "synthetic", "num_samples": 1000},
            "learner_args": {"model": "mlp"},
            "resources": {"client_cpus": 0.1, "server_cpus": 0.1, "schedule_timeout": 600},
            "tracking": {"receivers": [], "system_metrics": False, "log_model": False},
        }
    if name == "digits":  # the default job, as the quick start runs it
        return {
            **yaml.safe_load(DEFAULT_CONFIG.read_text()),
            "resources": {"schedule_timeout": 600},
        }
    raise ValueError(f"unknown workload {name!r}; expected w1, w3, w3pool or digits")


def _become_subreaper() -> None:
    """Adopt the job's orphaned processes (Ray's daemons and workers), so their CPU time is counted."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


class CpuMeter:
    """CPU seconds of a process and everything it starts, by kind of process: sampled every 0.1 s from
    /proc while it runs (this process adopts the orphans, so Ray's workers stay in the tree), so a process
    that lives less than that, or its last 0.1 s, may be missed."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, float]] = {}

    def sample(self) -> None:
        for proc in psutil.Process().children(recursive=True):
            try:
                times = proc.cpu_times()
                kind = _kind(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.seen[proc.pid] = (kind, times.user + times.system)

    def by_kind(self) -> dict[str, float]:
        kinds: dict[str, float] = {}
        for kind, seconds in self.seen.values():
            kinds[kind] = round(kinds.get(kind, 0.0) + seconds, 2)
        return dict(sorted(kinds.items(), key=lambda item: -item[1]))


def _kind(cmdline: list[str]) -> str:
    """A short name for a process of the job: the driver, a Ray daemon, or the actor a worker runs."""
    text = " ".join(cmdline)
    if text.startswith("ray::"):
        return text.split()[0].split(".")[0]  # ray::ClientActor, ray::IDLE, ...
    for daemon in (
        "gcs_server",
        "raylet",
        "dashboard_agent",
        "agent_manager",
        "runtime_env",
        "log_monitor",
        "monitor.py",
        "dashboard.py",
    ):
        if daemon in text:
            return daemon
    return "driver" if "run_fedavg.py" in text else Path(cmdline[0]).name if cmdline else "?"


def _reap(timeout: float) -> None:
    """Wait (up to ``timeout`` seconds) for every adopted process to exit."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)


def run_process(
    cmd: list[str], env: dict[str, str]
) -> tuple[float, dict[str, float], float, subprocess.CompletedProcess]:
    """Run ``cmd``; its wall seconds to exit, the CPU seconds of it and everything it started (by kind of
    process), and the wall-clock time it started at."""
    meter = CpuMeter()
    started = time.time()
    start = time.perf_counter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) as popen:
        out: dict[str, str] = {}
        readers = [
            threading.Thread(target=lambda name, f: out.__setitem__(name, f.read()), args=(n, f), daemon=True)
            for n, f in (("stdout", popen.stdout), ("stderr", popen.stderr))
        ]
        for reader in readers:
            reader.start()
        while popen.poll() is None:
            meter.sample()
            time.sleep(0.1)
        wall = time.perf_counter() - start
        for reader in readers:
            reader.join()
    deadline = time.monotonic() + 30
    while psutil.Process().children() and time.monotonic() < deadline:  # Ray's processes, stopping
        meter.sample()
        _reap(0.1)
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out.get("stdout", ""), out.get("stderr", ""))
    return wall, meter.by_kind(), started, proc


def run_job(name: str, root: Path, env: dict[str, str], repo: Path) -> dict[str, Any]:
    """One fresh ``run_fedavg.py`` process of workload ``name`` (of the checkout ``repo``): wall, CPU, phases."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(workload(name)))
    wall, cpu, started, proc = run_process(
        [
            sys.executable,
            str(repo / "scripts" / "run_fedavg.py"),
            "--config",
            str(config),
            "--workspace",
            str(work / "ws"),
            "--quiet",
        ],
        {**env, "PYTHONPATH": str(repo)},
    )
    cpu_total = round(sum(cpu.values()), 2)
    results = list((work / "ws").glob("*/result.json"))
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"{name}: run_fedavg.py exited {proc.returncode}: {proc.stderr[-3000:]}")
    result = json.loads(results[0].read_text())
    phases = {}
    if "timings" in result:  # a checkout without phase timings (an older one) gives the wall time only
        offset = result["started_at"] - started  # the interpreter and imports before the job began
        phases = {k: round(v + offset, 3) for k, v in result["timings"].items()}
        phases["process_start_to_job"] = round(offset, 3)
    phases["exit"] = round(wall, 3)
    rounds = [r["seconds"] for r in result["rounds"]]
    delivered = {n: r.get("delivered") for n, r in result["tracking"].get("receivers", {}).items()}
    return {
        "wall": round(wall, 3),
        "cpu": cpu_total,
        "cpu_by_process": cpu,
        "phases": phases,
        "round_median": round(statistics.median(rounds[1:] or rounds), 4),
        "status": result["status"],
        "delivered": delivered,
        "undelivered": sum(r.get("undelivered", 0) for r in result["tracking"].get("receivers", {}).values()),
    }


def run_baseline(name: str, env: dict[str, str]) -> dict[str, Any]:
    """The same rounds sequentially in one fresh process, no Ray, no tracking: wall to exit, rounds alone."""
    wall, cpu, _, proc = run_process([sys.executable, __file__, "--baseline-of", name], env)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline {name} exited {proc.returncode}: {proc.stderr[-3000:]}")
    inner = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall": round(wall, 3), "cpu": round(sum(cpu.values()), 2), **inner}


def baseline_rounds(name: str) -> dict[str, Any]:
    """In this process: build every site's learner and run the workload's rounds one site after another."""
    import torch

    from fl_ray.config import JobConfig
    from fl_ray.data import site_data
    from sequential_baseline import sequential_rounds
    from fl_ray.learners import LearnerContext, load_learner

    torch.set_num_threads(1)
    cfg = JobConfig.model_validate(workload(name))
    sites = cfg.site_names

    def learner(site: str, index: int | None) -> tuple[Any, Any]:
        data, ds = site_data(cfg.dataset, cfg.seed, len(sites), index)
        ctx = LearnerContext(
            site=site,
            config=cfg,
            data=data,
            num_classes=ds.num_classes,
            input_shape=ds.input_shape,
        )
        lrn = load_learner(cfg.learner, cfg.learner_args)
        lrn.setup(ctx)
        return lrn, ctx

    clients = [learner(s, i) for i, s in enumerate(sites)]
    server, server_ctx = learner("server", None)
    start = time.perf_counter()
    times = sequential_rounds(clients, server, server_ctx, cfg.num_rounds)
    return {
        "rounds_seconds": round(time.perf_counter() - start, 3),
        "round_median": round(statistics.median(times[1:] or times), 4),
    }


def store_figures(root: Path, repeat: int) -> dict[str, Any]:
    """Seconds to a ready sqlite MLflow store, each in a fresh process: MLflow's own creation (its
    migrations), a copy of fl_ray's template (made first, once, if the cache has none), and opening that
    copy again as an existing store (the floor: what any job pays for a store that is already there).
    MLflow's import, its sqlite store's code included (SQLAlchemy, alembic, its table models: the same for
    a new store and an old one), is timed apart and left out of the three."""
    code = (
        "import sys, time; from pathlib import Path; t = time.perf_counter(); "
        "import mlflow.store.tracking.sqlalchemy_store; from mlflow.tracking import MlflowClient; "
        "from fl_ray.mlflow_store import prepare_sqlite_store; p = Path(sys.argv[2]); i = time.perf_counter() - t; "
        "t = time.perf_counter(); made = sys.argv[1] == 'template' and prepare_sqlite_store(p, p.parent / 'mlartifacts'); "
        "MlflowClient(f'sqlite:///{p}').search_experiments(); print(time.perf_counter() - t, i, made)"
    )
    figures: dict[str, list[float]] = {"mlflow": [], "template": [], "existing": [], "import": []}
    template_made = 0.0
    for i in range(repeat + 1):
        for how in ("mlflow", "template", "existing"):
            db = root / f"store-{'template' if how == 'existing' else how}-{i}" / "mlflow.db"
            db.parent.mkdir(exist_ok=True)
            out = subprocess.run(
                [sys.executable, "-c", code, how, str(db)],
                capture_output=True,
                text=True,
                cwd=REPO,
                env=os.environ.copy(),
            )
            if out.returncode != 0:
                raise RuntimeError(f"store ({how}): {out.stderr[-2000:]}")
            seconds, imported = (float(x) for x in out.stdout.split()[:2])
            if i == 0 and how == "template":
                template_made = seconds  # the cache may have been empty: the template was made here
            elif i > 0:
                figures[how].append(seconds)
                figures["import"].append(imported)
    mlflow_s, template_s = statistics.median(figures["mlflow"]), statistics.median(figures["template"])
    return {
        "mlflow_create_seconds": round(mlflow_s, 3),
        "template_copy_seconds": round(template_s, 3),
        "existing_open_seconds": round(statistics.median(figures["existing"]), 3),
        "mlflow_import_seconds": round(statistics.median(figures["import"]), 3),
        "first_use_seconds": round(template_made, 3),
        "speedup": round(mlflow_s / template_s, 1),
        "target_seconds": 1.0,
        "meets_target": template_s <= 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads",
        default="w1,w3",
        help="comma-separated: w1, w3, w3pool, digits (the default job) (default %(default)s)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each; medians are reported (default %(default)s)"
    )
    parser.add_argument("--no-store", action="store_true", help="leave out the MLflow store figures")
    parser.add_argument(
        "--repo",
        type=Path,
        default=REPO,
        help="run the jobs of another checkout (e.g. main's, for a before/after comparison; "
        "w1 needs dataset.shape); default: this one",
    )
    parser.add_argument("--baseline-of", help=argparse.SUPPRESS)  # internal: run one baseline in this process
    args = parser.parse_args(argv)
    if args.baseline_of:
        print(json.dumps(baseline_rounds(args.baseline_of)))
        return 0
    console = Console(stderr=True)
    _become_subreaper()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(var, None)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    figures: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "repo": str(args.repo.resolve()),
    }
    with tempfile.TemporaryDirectory(prefix="fl_ray_bench_startup_") as tmp:
        root = Path(tmp)
        for name in names:
            runs, bases = [], []
            for i in range(args.repeat):
                console.print(f"{name}: job {i + 1}/{args.repeat} (fresh run_fedavg.py process)...")
                runs.append(run_job(name, root, env, args.repo.resolve()))
                console.print(f"{name}: baseline {i + 1}/{args.repeat} (same rounds, one process, no Ray)...")
                bases.append(run_baseline(name, env))
            figures[name] = summarize(name, runs, bases)
            console.print(f"{name}: CPU seconds by process (first run): {runs[0]['cpu_by_process']}")
        if not args.no_store:
            console.print("store: MLflow's own creation against the template copy...")
            figures["store"] = store_figures(root, max(args.repeat, 3))
    figures["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    console.print(table(figures, names))
    print(json.dumps(figures))
    ok = all(figures[n]["meets_target"] for n in names) and figures.get("store", {}).get("meets_target", True)
    return 0 if ok else 1


def summarize(name: str, runs: list[dict[str, Any]], bases: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs of a workload, with its baseline and target."""

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    keys = sorted({k for r in runs for k in r["phases"]})
    phases = {k: med([r["phases"][k] for r in runs if k in r["phases"]]) for k in keys}
    wall = med([r["wall"] for r in runs])
    base_wall = med([b["wall"] for b in bases])
    out = {
        "wall": wall,
        "cpu": med([r["cpu"] for r in runs]),
        "phases": phases,
        "round_median": med([r["round_median"] for r in runs]),
        "status": [r["status"] for r in runs],
        "undelivered": sum(r["undelivered"] for r in runs),
        "baseline_wall": base_wall,
        "baseline_cpu": med([b["cpu"] for b in bases]),
        "baseline_rounds_seconds": med([b["rounds_seconds"] for b in bases]),
        "baseline_round_median": med([b["round_median"] for b in bases]),
        "ratio_to_baseline": round(wall / base_wall, 2),
        "target_wall": TARGETS.get(name),
        "runs": runs,
    }
    out["meets_target"] = name not in TARGETS or wall <= TARGETS[name]
    if name == "w1":
        first = phases.get("rounds")
        out["first_round_line"] = first
        out["meets_first_round_target"] = first is not None and first <= FIRST_ROUND_TARGET
        out["meets_target"] = out["meets_target"] and out["meets_first_round_target"]
    return out


def table(figures: dict[str, Any], names: list[str]) -> Table:
    """The figures as a table: phases as rows, a column per workload (seconds since the process started)."""
    t = Table(
        title=f"start-up phases, seconds since `python scripts/run_fedavg.py` started "
        f"({figures['cpus']} CPUs, load {figures['load_average_1m']})",
        title_justify="left",
    )
    t.add_column("phase")
    for name in names:
        t.add_column(name, justify="right")
    for phase in ["process_start_to_job", *PHASES, "exit"]:
        t.add_row(phase, *[_s(figures[n]["phases"].get(phase)) for n in names])
    t.add_row("CPU seconds, all processes", *[_s(figures[n]["cpu"]) for n in names])
    t.add_row("steady round (median)", *[_s(figures[n]["round_median"]) for n in names])
    t.add_row("baseline: one process, no Ray (wall to exit)", *[_s(figures[n]["baseline_wall"]) for n in names])
    t.add_row("baseline: its rounds alone", *[_s(figures[n]["baseline_rounds_seconds"]) for n in names])
    t.add_row("whole job / baseline", *[f"{figures[n]['ratio_to_baseline']}x" for n in names])
    t.add_row(
        "target (whole job)",
        *[
            f"<= {figures[n]['target_wall']:g}: {'met' if figures[n]['meets_target'] else 'NOT met'}"
            if figures[n]["target_wall"]
            else ""
            for n in names
        ],
    )
    if "store" in figures:
        s = figures["store"]
        t.add_row(
            "MLflow store: created by MLflow / template copy / an existing one opened (MLflow's import apart)",
            f"{s['mlflow_create_seconds']:.2f} / {s['template_copy_seconds']:.2f} / {s['existing_open_seconds']:.2f} "
            f"({s['speedup']}x; import {s['mlflow_import_seconds']:.2f})",
            *[""] * (len(names) - 1),
        )
    return t


def _s(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
