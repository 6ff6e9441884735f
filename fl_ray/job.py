"""run_job: start Ray (or join a cluster), start the job's actors, run the rounds, write the results.

The job directory ``<workspace>/<job_id>`` gets ``config.yaml`` (the resolved config) before anything
runs, ``rounds.jsonl`` a line per completed round, and ``result.json`` at the end, whatever the outcome
(strict JSON: NaN and infinities as null): the rounds (from rounds.jsonl), per-site sample counts, the
final metrics and where the tracking records went, including the best global model (``tracking.model``:
its round and key metric, ``checkpoints/best.npz``, and once a receiver that logs models has logged it,
its model URI and registered version).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import psutil
import ray
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

from fl_ray.checkpoint import BEST, BestModel, load_best, load_checkpoint, load_rounds
from fl_ray.config import ConfigError, JobConfig, load_config, parse_config
from fl_ray.data import load_dataset, partition
from fl_ray.job_summary import PICTURE, load_plotting, participation, participation_columns, plot_job
from fl_ray.learners import load_learner
from fl_ray.metadata import run_tags
from fl_ray.progress import DeliveryProgress, JobPhases, RoundProgress
from fl_ray.receivers.base import FAILED, FINISHED, KILLED, ReceiverContext, build_receiver, receiver_names
from fl_ray.strategies import build_strategy
from fl_ray.strictjson import strict_json
from fl_ray.tracking.credentials import masked_argv, receiver_credentials, without_credentials
from fl_ray.tracking.spool import spool_report

if TYPE_CHECKING:
    from fl_ray.actors.site_receiver import SiteReceivers

log = logging.getLogger(__name__)


CLOSE_ATTEMPTS = 3  # times the job asks a receiver actor that died while closing to close again
RESTART_TIMEOUT = 120.0  # seconds the job waits for Ray to restart a receiver actor that died while closing


class ResourceError(RuntimeError):
    """The cluster cannot place what the job asks for."""


@dataclass
class JobResult:
    """The outcome of :func:`run_job`: where the job wrote, its status and metrics."""

    job_id: str
    job_dir: Path
    status: str
    rounds: list[dict[str, Any]]
    final_metrics: dict[str, float]
    tracking: dict[str, Any]
    sites: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cross_site_evaluation: dict[str, Any] | None = None
    participation: dict[str, Any] = field(default_factory=dict)
    picture: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # each phase's start, in seconds since the job began
    workers: dict[str, Any] = field(default_factory=dict)  # with a pool of workers: where each runs

    def to_dict(self) -> dict[str, Any]:
        """The content of result.json."""
        return {
            "job_id": self.job_id,
            "job_dir": str(self.job_dir),
            "status": self.status,
            "error": self.error,
            "final_metrics": self.final_metrics,
            "rounds": self.rounds,
            "sites": self.sites,
            "participation": self.participation,
            "picture": self.picture,
            "tracking": self.tracking,
            "cross_site_evaluation": self.cross_site_evaluation,
            "timings": self.timings,
            "workers": self.workers,
        }


def new_job_id(name: str) -> str:
    """``<name>-<UTC timestamp>``, unique to the millisecond."""
    return f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S-%f')[:-3]}"


def _as_config(config: JobConfig | dict[str, Any] | str | Path | None) -> JobConfig:
    if isinstance(config, JobConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    return load_config(config)


def _check_plugins(cfg: JobConfig) -> list[Any]:
    """Build the learner (with learner_args), the strategy and each receiver, and load and split the dataset
    once here, so a bad name, path, argument or dataset fails before Ray starts; the dataset's partition by site."""
    try:
        load_learner(cfg.learner, cfg.learner_args)
        build_strategy(cfg.strategy)
        for i, spec in enumerate(cfg.tracking.receivers):
            build_receiver(spec.type, spec.params, f"tracking.receivers.{i}")
        for site, specs in cfg.tracking.site_receivers.items():
            for i, spec in enumerate(specs):
                build_receiver(spec.type, spec.params, f"tracking.site_receivers.{site}.{i}")
        dataset = load_dataset(cfg.dataset, cfg.seed)
        return partition(cfg.dataset, dataset.train.y, len(cfg.site_names), cfg.seed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid job config:\n  {exc}") from None


def _init_ray(address: str | None, phases: JobPhases, verbose: bool = False) -> bool:
    """Start or join Ray unless this process already did; True if this call started it.

    A Ray started here inherits no tracking credential, and the command line Ray records as the job's
    entrypoint (``ray list jobs``, the dashboard) has its secrets masked. Ray's own start-up messages
    show only when ``verbose``.
    """
    if ray.is_initialized():
        phases.mark("ray", "using this process's Ray")
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    phases.mark("ray", f"joining Ray at {address}" if address else "starting Ray locally")
    kwargs: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.ERROR}
    if address is None:
        kwargs["include_dashboard"] = False
    entrypoint = subprocess.list2cmdline(masked_argv(psutil.Process().cmdline()))
    with (
        without_credentials(),
        mock.patch.object(ray._private.utils, "get_entrypoint_name", lambda: entrypoint),
        mock.patch.object(ray._private.utils, "get_dashboard_dependency_error", _dashboard_dependency_error),
    ):
        context = ray.init(address=address, **kwargs)
    dashboard = getattr(context, "dashboard_url", None)
    have = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    phases.mark(
        "ray_ready",
        f"Ray ready: {have.get('CPU', 0):g} CPU(s), {have.get('GPU', 0):g} GPU(s) on {nodes} "
        f"node(s){f'; dashboard http://{dashboard}' if dashboard else ''}",
    )
    return True


DASHBOARD_PACKAGES = ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "opentelemetry", "prometheus_client")


def _dashboard_dependency_error() -> ImportError | None:
    """Ray's own check whether its dashboard's packages are installed (it then starts its dashboard and
    agent in full rather than minimal mode), answered by finding them instead of importing them: Ray's check
    imports aiohttp, OpenTelemetry and Prometheus into the driver, 1.5-2 s of CPU before Ray starts."""
    missing = [name for name in DASHBOARD_PACKAGES if importlib.util.find_spec(name) is None]
    return ImportError(f"missing {', '.join(missing)}") if missing else None


def _check_resources(cfg: JobConfig, n: int) -> None:
    """Fail at once, naming what was asked and what is there, if the whole cluster is too small for ``n``
    site actors (or pool workers) and the server.

    With ``resources.autoscale`` the job instead asks the autoscaler for their resources and relies on
    ``resources.schedule_timeout``.
    """
    res = cfg.resources
    if res.autoscale:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"CPU": res.client_cpus, "GPU": res.client_gpus}] * n)
        return
    actors = "sites" if n == len(cfg.site_names) else "workers"
    asked = {
        "CPU": (
            n * res.client_cpus + res.server_cpus,
            f"{n} {actors} x {res.client_cpus:g} + server {res.server_cpus:g}",
        ),
        "GPU": (n * res.client_gpus, f"{n} {actors} x {res.client_gpus:g}"),
    }
    have = ray.cluster_resources()
    short = [
        f"{total:g} {kind} ({how}) but the cluster has {have.get(kind, 0.0):g}"
        for kind, (total, how) in asked.items()
        if total > have.get(kind, 0.0) + 1e-9
    ]
    if short:
        raise ResourceError(
            f"the cluster cannot place this job: it asks for {'; '.join(short)}. "
            "Lower resources.client_cpus / client_gpus, use fewer sites or resources.workers, "
            "or add nodes."
        )


def _start_clients(
    cfg: JobConfig, job_id: str, config: dict[str, Any], receiver_name: str, local: SiteReceivers | None
) -> dict[str, Any]:
    """One long-lived client actor per site, by site name; a site with receivers of its own (``local``) runs
    in its reserved bundle and logs to its own receiver actor."""
    from fl_ray.actors.client import ClientActor
    from fl_ray.actors.site_receiver import site_receiver_name

    strategy = "SPREAD" if cfg.resources.placement == "spread" else "DEFAULT"
    local_sites = local.strategies if local is not None else {}
    return {
        site: ClientActor.options(  # type: ignore[attr-defined]
            num_cpus=cfg.resources.client_cpus,
            num_gpus=cfg.resources.client_gpus,
            max_restarts=cfg.resources.max_client_restarts,
            scheduling_strategy=local_sites.get(site, strategy),
            name=f"fl_ray-{job_id}-{site}",
        ).remote(site, index, config, site_receiver_name(job_id, site) if site in local_sites else receiver_name)
        for index, site in enumerate(cfg.site_names)
    }


class _StartUp:
    """Follows the actors as they start, all at once: each site's info, the server's completed rounds and
    the receiver actor's first open of each receiver, showing each as it comes (see :meth:`wait`)."""

    def __init__(self, cfg: JobConfig, clients: dict[str, Any], server: Any, receiver: Any, phases: JobPhases) -> None:
        self.cfg, self.phases = cfg, phases
        self.sites = {client.info.remote(): name for name, client in clients.items()}
        self.server = server.completed_rounds.remote()
        self.receiver = receiver.wait_open.remote(cfg.tracking.close_timeout)
        self.info: dict[str, Any] = {}
        self.done: int | None = None

    def wait(self) -> tuple[dict[str, Any], int]:
        """Wait (at most resources.schedule_timeout) until every site actor and the server run; returns the
        sites' info and the number of rounds completed so far. The receiver is not waited for: its back ends may be
        down, and records wait in the spool meanwhile."""
        deadline = time.monotonic() + self.cfg.resources.schedule_timeout
        pending = [*self.sites, self.server, self.receiver]
        while self.sites.keys() - self.info.keys() or self.done is None:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._not_placed()
            self._take(ready[0])
        self.check_receiver(0)
        return {self.sites[ref]: info for ref, info in self.info.items()}, self.done

    def check_receiver(self, timeout: float) -> None:
        """Show the receiver's line if it has opened (or failed) within ``timeout`` seconds."""
        if self.receiver is not None and ray.wait([self.receiver], timeout=timeout)[0]:
            self._take(self.receiver)

    def _take(self, ref: Any) -> None:
        if ref is self.server:
            self.done = ray.get(ref)
            self.phases.mark("server_ready")
        elif ref is self.receiver:
            self.receiver = None
            try:
                opened = ray.get(ref)
            except ray.exceptions.RayError as exc:
                self.phases.mark("receiver_ready", f"tracking receiver actor failed: {type(exc).__name__}")
                return
            for name, r in opened.items():
                where = f" ({r['destination']})" if r["destination"] else ""
                if r["opened"]:
                    self.phases.mark("receiver_ready", f"tracking: {name} ready{where}", at=r["at"])
                else:
                    self.phases.mark(
                        "receiver_ready",
                        f"tracking: {name} not ready ({r['error'] or 'not yet'}); its records wait in the spool",
                    )
        else:
            self.info[ref] = ray.get(ref)
            if len(self.info) == 1:
                self.phases.mark(
                    "first_site_ready", f"first site ready: {self.sites[ref]} (data loaded, learner set up)"
                )
            if len(self.info) == len(self.sites):
                where = _node_counts([i["node_id"] for i in self.info.values()])
                self.phases.mark("sites_ready", f"all {len(self.sites)} sites ready, on {where}")

    def _not_placed(self) -> None:
        res = self.cfg.resources
        missing = [name for ref, name in self.sites.items() if ref not in self.info]
        if not missing:
            raise ResourceError(
                f"the server actor did not start within resources.schedule_timeout="
                f"{res.schedule_timeout:g} s; it asks for {res.server_cpus:g} CPU on the driver's "
                f"node; free now: {ray.available_resources()}"
            )
        raise ResourceError(
            f"{len(missing)} site(s) could not be placed within resources.schedule_timeout="
            f"{res.schedule_timeout:g} s: {missing}. Each asks for {res.client_cpus:g} CPU and "
            f"{res.client_gpus:g} GPU; free now: {ray.available_resources()}"
        )


def _node_counts(node_ids: list[str]) -> str:
    """``1 node (10.0.0.5)`` or ``2 nodes (10.0.0.5: 3 sites, 10.0.0.6: 2 sites)``."""
    addresses = {n["NodeID"]: n.get("NodeManagerAddress", n["NodeID"][:8]) for n in ray.nodes()}
    counts: dict[str, int] = {}
    for node in node_ids:
        name = addresses.get(node, node[:8])
        counts[name] = counts.get(name, 0) + 1
    if len(counts) == 1:
        return f"1 node ({next(iter(counts))})"
    return f"{len(counts)} nodes ({', '.join(f'{a}: {n} sites' for a, n in counts.items())})"


def _note_no_gpu_metrics(placed: dict[str, Any]) -> None:
    """Say once per reason (not once per site) why sites sample no GPU metrics."""
    reasons: dict[str, list[str]] = {}
    for site, info in placed.items():
        if info.get("no_gpu_metrics"):
            reasons.setdefault(info["no_gpu_metrics"], []).append(site)
    for why, sites in reasons.items():
        where = "any site" if len(sites) == len(placed) else ", ".join(sites)
        log.warning("no GPU metrics on %s: %s; sampling CPU and memory only", where, why)


def _prepare_job_dir(cfg: JobConfig, workspace: Path, resume: Path | None) -> tuple[str, Path]:
    if resume is None:
        job_id = new_job_id(cfg.name)
        job_dir = workspace / job_id
        job_dir.mkdir(parents=True)
    else:
        job_dir, job_id = resume, resume.name
    (job_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return job_id, job_dir


def run_job(
    config: JobConfig | dict[str, Any] | str | Path | None = None,
    workspace: str | Path = "workspace",
    address: str | None = None,
    *,
    resume: str | Path | None = None,
    show_progress: bool = True,
    verbose: bool = False,
    console: Console | None = None,
) -> JobResult:
    """Run a FedAvg job and return its result (also written to ``<workspace>/<job_id>/result.json``).

    ``config`` is a JobConfig, a dict, or a YAML path (default: the default job, fl_ray/configs/default.yaml).
    ``address`` joins an existing Ray cluster (``RAY_ADDRESS`` does too); otherwise Ray starts locally.
    ``resume`` is a job directory: the job continues after its last completed round, in the same
    directory and tracking runs (``config`` then defaults to the job's own config.yaml).
    Whatever the outcome, the job directory gets ``summary.png`` (see fl_ray.job_summary), also logged to
    the parent run with the site x round participation table. An exception raised once the job directory
    exists carries it as ``exc.job_dir`` (for a ``--resume`` hint).
    ``verbose`` shows Ray's own start-up messages.
    Raises ConfigError for a bad config before Ray starts. Ctrl+C stops the job as KILLED, after
    tracking is flushed and result.json written; a second Ctrl+C exits at once.

    With ``show_progress`` the job prints a line on ``console`` (default: stderr) as each phase starts,
    a bar per round and one of the tracking records left per receiver at the end; result.json's
    ``timings`` gives each phase's start in seconds since the job began.
    """
    from fl_ray.actors.pool import PoolExecutor, start_workers, worker_count
    from fl_ray.actors.receiver import receiver_actor_name, start_receiver
    from fl_ray.actors.server import RayExecutor, ServerActor
    from fl_ray.rounds import Executor

    phases = JobPhases(console, enabled=show_progress)
    resume = Path(resume).resolve() if resume is not None else None
    if resume is not None and config is None:
        config = resume / "config.yaml"
    cfg = _as_config(config)
    phases.mark("data", f"loading {cfg.dataset.name} for {len(cfg.site_names)} site(s)")
    parts = _check_plugins(cfg)  # a bad plug-in or a missing dataset fails here, before Ray starts
    if resume is not None and not (resume / "config.yaml").exists():
        raise ConfigError(f"--resume {str(resume)!r}: not a job directory (it has no config.yaml)")
    sites = cfg.site_names
    job_id, job_dir = _prepare_job_dir(cfg, Path(workspace).resolve() if resume is None else resume.parent, resume)

    owns_ray = _init_ray(address, phases, verbose)
    site_info: dict[str, Any] = {}
    tracking: dict[str, Any] = {}
    status, error = FAILED, None
    cross_site: dict[str, Any] | None = None
    receiver = server = None
    local: SiteReceivers | None = None  # the sites with receivers of their own
    clients: dict[str, Any] = {}
    worker_info: dict[str, Any] = {}
    drawing = ThreadPoolExecutor(1, thread_name_prefix="fl_ray-picture")
    try:
        workers = worker_count(cfg, ray.cluster_resources())
        pooled = workers < len(sites)  # virtual sites on a pool of workers, else one actor per site
        _check_resources(cfg, min(workers, len(sites)))
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        ctx = ReceiverContext(
            job_id=job_id,
            job_name=cfg.name,
            job_dir=job_dir,
            workspace=job_dir.parent,
            sites=tuple(sites),
            config=cfg.to_dict(),
            tags=run_tags(job_id, cfg.description, ray.cluster_resources()),
            life="first" if resume is None else f"resume-{new_job_id('at')}",
        )
        receiver = start_receiver(
            ctx,
            [{"type": r.type, **r.params} for r in cfg.tracking.receivers],
            receiver_credentials(cfg.tracking.credentials, cfg.tracking.credentials_file),
            here,
        )
        if cfg.tracking.site_receivers:
            local = _start_site_receivers(cfg, ctx, pooled, receiver_actor_name(job_id))
        config_dict = cfg.to_dict()
        actors = f"{workers} worker(s) for {len(sites)} sites" if pooled else f"{len(sites)} site(s)"
        phases.mark(
            "actors",
            f"starting {actors} ({cfg.resources.client_cpus:g} CPU, {cfg.resources.client_gpus:g} "
            "GPU each), the server and the tracking receiver",
        )
        # the server first: pinned to this node, it takes its share here before the sites' actors fill the node
        server = ServerActor.options(  # type: ignore[attr-defined]
            num_cpus=cfg.resources.server_cpus, name=f"fl_ray-{job_id}-server", scheduling_strategy=here
        ).remote(config_dict, receiver_actor_name(job_id), str(job_dir / "checkpoints"))
        if pooled:
            parts_ref = ray.put(parts)  # held here for the whole job: restarted workers take it again
            clients = start_workers(cfg, job_id, workers, parts_ref, receiver_actor_name(job_id))
            executor: Executor = PoolExecutor(
                list(clients.values()), sites, cfg.resources.max_client_restarts, receiver_actor_name(job_id)
            )
        else:
            clients = _start_clients(cfg, job_id, config_dict, receiver_actor_name(job_id), local)
            executor = RayExecutor(clients)
        server.use.remote(executor)  # the server starts up while the clients do
        start_up = _StartUp(cfg, clients, server, receiver, phases)
        placed, done = start_up.wait()
        _note_no_gpu_metrics(placed)
        where = ("node_id", "device", "gpu_ids")
        if pooled:
            site_info = {s: {"num_samples": int(len(idx))} for s, idx in zip(sites, parts)}
            worker_info = {w: {k: placed[w][k] for k in where} for w in clients}
        else:
            site_info = {
                s: {"num_samples": int(len(idx)), **{k: placed[s][k] for k in where}} for s, idx in zip(sites, parts)
            }
        phases.mark("rounds")  # the round bar's first line
        drawing.submit(load_plotting)  # the picture's imports while the rounds run, not after them
        with RoundProgress(
            job_id, cfg.num_rounds, done=done, enabled=show_progress, console=phases.console
        ) as progress:
            for r in range(done + 1, cfg.num_rounds + 1):
                progress.round_done(ray.get(server.run_round.remote(r)))
                phases.mark("first_round_done")
                start_up.check_receiver(0)
        phases.mark("last_round_done")
        start_up.check_receiver(cfg.tracking.close_timeout)  # its line before delivery (rounds may outrun it)
        if cfg.cross_site_evaluation:
            cross_site = _cross_site_evaluation(cfg, server, receiver)
        status = FINISHED
    except KeyboardInterrupt as exc:
        status, error = KILLED, "interrupted (Ctrl+C)"
        exc.job_dir = job_dir  # type: ignore[attr-defined]
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        exc.job_dir = job_dir  # type: ignore[attr-defined]
        raise
    finally:
        previous = signal.signal(signal.SIGINT, _exit_now) if _in_main_thread() else None
        try:
            phases.mark("picture", "drawing the job's picture")
            rounds = _completed_rounds(job_dir)
            table = participation(sites, rounds)
            samples = {site: len(idx) for site, idx in zip(sites, parts)}
            with drawing:  # the picture is drawn while the actors flush
                drawn = drawing.submit(_draw_picture, job_dir, f"{job_id} ({status})", rounds, samples, table)
                tracking = _close(cfg, receiver, server, clients, local, status, job_dir, table, drawn, phases)
                picture = drawn.result()
            phases.mark("results", "writing results")
            result = JobResult(
                job_id,
                job_dir,
                status,
                rounds,
                dict(rounds[-1]["global"]) if rounds else {},
                tracking,
                site_info,
                error,
                cross_site,
                table,
                str(picture) if picture else None,
                timings=phases.timings,
                workers=worker_info,
            )
            result_data = result.to_dict()
            result_data["seconds"] = round(phases.seconds(), 3)
            result_data["started_at"] = phases.started_at
            if owns_ray:
                phases.mark("ray_shutdown", "stopping Ray")
            (job_dir / "result.json").write_text(strict_json(result_data))
            if owns_ray:
                ray.shutdown()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    return result


def _start_site_receivers(cfg: JobConfig, ctx: ReceiverContext, pooled: bool, receiver_name: str) -> SiteReceivers:
    """Place the sites of ``tracking.site_receivers`` and start their own receiver actors on their nodes."""
    from fl_ray.actors.site_receiver import SitePlacementError, start_site_receivers

    if pooled:
        raise ResourceError(
            f"tracking.site_receivers ({', '.join(cfg.tracking.site_receivers)}) needs one actor per site, but "
            f"the cluster holds only a pool of workers for the {len(cfg.site_names)} sites at "
            f"resources.client_cpus={cfg.resources.client_cpus:g} / client_gpus={cfg.resources.client_gpus:g}"
        )
    try:
        return start_site_receivers(cfg, ctx, receiver_name)
    except SitePlacementError as exc:
        raise ResourceError(str(exc)) from None


def _close_site_receivers(local: SiteReceivers, status: str, timeout: float) -> dict[str, Any]:
    """Have each site's own receiver actor deliver its spool and share what it shares, then end it; a report
    per site (its receivers, what it shared, where its spool is). One that dies while closing is asked again
    once Ray has restarted it (it recovers from its spool), up to ``CLOSE_ATTEMPTS`` times."""
    deadline = time.monotonic() + timeout + 60
    refs = {site: actor.close.remote(status, timeout) for site, actor in local.actors.items()}
    reports: dict[str, Any] = {}
    for site, ref in refs.items():
        deaths = 0
        while True:
            try:
                reports[site] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                break
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
                reports[site] = {"error": f"{type(exc).__name__}: the site's receiver actor did not close"}
                unavailable = isinstance(exc, ray.exceptions.ActorUnavailableError)  # restarting, or unreachable
                deaths += isinstance(exc, ray.exceptions.RayActorError) and not unavailable
                if (
                    not isinstance(exc, ray.exceptions.RayActorError)
                    or deaths >= CLOSE_ATTEMPTS
                    or time.monotonic() >= deadline
                ):
                    log.warning(
                        "site %s: its own tracking was not closed (%s); its records stay in its spool", site, exc
                    )
                    break
                time.sleep(0.5)
                ref = local.actors[site].close.remote(status, timeout)
    for actor in local.actors.values():
        ray.kill(actor, no_restart=True)
    return reports


def _completed_rounds(job_dir: Path) -> list[dict[str, Any]]:
    """The summaries of the rounds the last checkpoint holds, from ``rounds.jsonl``."""
    checkpoint = load_checkpoint(job_dir / "checkpoints")
    return load_rounds(job_dir, upto=checkpoint.round) if checkpoint is not None else []


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _exit_now(signum: int, frame: Any) -> None:
    """A second Ctrl+C while the job is shutting down: leave at once."""
    os._exit(130)


def _draw_picture(
    job_dir: Path, title: str, rounds: list[dict[str, Any]], samples: dict[str, int], table: dict[str, Any]
) -> Path | None:
    """``<job_dir>/summary.png``; None (with a warning) if it cannot be drawn: the results matter more."""
    try:
        return plot_job(job_dir / PICTURE, title, rounds, samples, table)
    except Exception as exc:
        log.warning("the job's picture %s was not drawn: %s: %s", job_dir / PICTURE, type(exc).__name__, exc)
        return None


def _log_summary(cfg: JobConfig, receiver: Any, table: dict[str, Any], drawn: Future[Path | None]) -> dict[str, Any]:
    """Have the receiver actor log the participation table and, once ``drawn``, the picture to the parent run."""
    timeout = cfg.tracking.close_timeout
    logged: dict[str, Any] = {}
    calls = {"participation": receiver.log_table.remote("participation.json", participation_columns(table), timeout)}
    picture = drawn.result()
    if picture is not None:
        calls["picture"] = receiver.log_artifact.remote(str(picture), None, timeout)
    for what, ref in calls.items():
        try:
            logged[what] = ray.get(ref, timeout=timeout + 30)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            logged[what] = {"receiver_actor": {"error": f"{type(exc).__name__}: the receiver actor did not log it"}}
    return logged


def _close(
    cfg: JobConfig,
    receiver: Any,
    server: Any,
    clients: dict[str, Any],
    local: SiteReceivers | None,
    status: str,
    job_dir: Path,
    table: dict[str, Any],
    drawn: Future[Path | None],
    phases: JobPhases,
) -> dict[str, Any]:
    """Flush every site's tracking, close the sites' own receiver actors (``local``: what they share reaches
    the job's receiver actor), have the receiver actor log the best model, the participation table and the
    picture (``drawn`` meanwhile), then deliver and end the runs."""
    timeout = cfg.tracking.close_timeout
    phases.mark("tracking", "delivering tracking records" if receiver is not None else "stopping the sites")
    senders: dict[str, Any] = {}
    best = _best_model(cfg, server, status)  # the server's learner rebuilds it, before the server goes
    actors = {name: a for name, a in [*clients.items(), ("server", server)] if a is not None}
    refs = {name: a.close.remote(timeout) for name, a in actors.items()}
    deadline = time.monotonic() + timeout + 10
    for name, ref in refs.items():
        while True:
            try:
                senders[name] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError:  # Ray is restarting it: ask the new one
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    ref = actors[name].close.remote(timeout)
                    continue
                senders[name] = {"error": "ActorUnavailableError: could not flush this site's tracking"}
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
                senders[name] = {"error": f"{type(exc).__name__}: could not flush this site's tracking"}
            break
    for actor in [*clients.values(), server]:
        if actor is not None:
            ray.kill(actor, no_restart=True)
    site_reports = _close_site_receivers(local, status, timeout) if local is not None else None
    if local is not None:
        local.remove()
    if receiver is None:
        return {"senders": senders}
    try:
        model = _log_best_model(cfg, receiver, job_dir, status, best)
        summary = _log_summary(cfg, receiver, table, drawn)
        report = _close_receiver(cfg, receiver, status, job_dir, phases)
    finally:
        ray.kill(receiver, no_restart=True)
    phases.mark("tracking_drained")
    report["senders"] = senders
    report["summary"] = summary
    if site_reports is not None:
        report["site_receivers"] = site_reports
    if model is not None:
        report["model"] = model
    return report


def _close_receiver(cfg: JobConfig, receiver: Any, status: str, job_dir: Path, phases: JobPhases) -> dict[str, Any]:
    """The receiver actor's close report, with a bar of the records each receiver has still to get while
    it delivers. An actor that dies while closing is restarted by Ray and asked again (it recovers from
    the spool); if it cannot close, the report says, from the spool on disk, what each receiver still
    has to get, and how to send it later."""
    timeout = cfg.tracking.close_timeout
    error = ""
    for attempt in range(1, CLOSE_ATTEMPTS + 1):
        try:
            closing = receiver.close.remote(status, timeout)
            _follow_delivery(receiver, closing, timeout + 60, phases)
            return ray.get(closing, timeout=timeout + 60)
        except ray.exceptions.GetTimeoutError:
            error = f"the receiver actor did not close within {timeout + 60:g} s"
            break
        except ray.exceptions.RayError as exc:
            error = f"{type(exc).__name__}: the receiver actor died while closing"
            restarted = attempt < CLOSE_ATTEMPTS and _wait_for_restart(receiver, RESTART_TIMEOUT)
            log.warning(
                "%s (attempt %d of %d)%s",
                error,
                attempt,
                CLOSE_ATTEMPTS,
                "; asking its restarted actor" if restarted else "",
            )
            if not restarted:
                break
    specs = [{"type": r.type, **r.params} for r in cfg.tracking.receivers]
    report = spool_report(job_dir / "spool", receiver_names(specs))
    for name, entry in report["receivers"].items():
        entry["replay"] = f"python scripts/replay_spool.py {job_dir} --to {name}"
    report["error"] = error
    log.warning(
        "tracking was not closed (%s); what each receiver still has to get is in result.json, and "
        "`python scripts/replay_spool.py %s` sends it",
        error,
        job_dir,
    )
    return report


def _wait_for_restart(receiver: Any, timeout: float) -> bool:
    """Whether the receiver actor answers again within ``timeout`` seconds after dying (Ray restarts it; calls
    made while it restarts fail at once with ``ActorUnavailableError``). False once Ray has given it up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(receiver.status.remote(), timeout=max(deadline - time.monotonic(), 0.1))
            return True
        except ray.exceptions.ActorDiedError:
            return False
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)  # restarting: ask again
    return False


def _follow_delivery(receiver: Any, closing: Any, timeout: float, phases: JobPhases) -> None:
    """Show the records each receiver has still to get until ``closing`` (the receiver actor's close) is
    done or ``timeout`` seconds have passed; the counts come from the actor's ``status``, which answers
    while it closes."""
    deadline = time.monotonic() + timeout
    if ray.wait([closing], timeout=0.2)[0]:
        return  # nothing much was left to deliver
    try:
        left = {name: r["pending"] for name, r in ray.get(receiver.status.remote(), timeout=10)["receivers"].items()}
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return  # the close's own answer says what happened
    with DeliveryProgress(left, phases.console, enabled=phases.enabled) as bar:
        while not ray.wait([closing], timeout=min(0.25, max(0.0, deadline - time.monotonic())))[0]:
            if time.monotonic() >= deadline:
                return
            try:
                status = ray.get(receiver.status.remote(), timeout=10)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                return
            bar.update({name: r["pending"] for name, r in status["receivers"].items()})
        bar.update({name: 0 for name in left})


def _cross_site_evaluation(cfg: JobConfig, server: Any, receiver: Any) -> dict[str, Any]:
    """Every site evaluates the final global model and each site's last local model: the matrix
    ``{model: {site: metrics}}``, also logged as a table to the parent run (``cross_site_evaluation.json``)."""
    matrix = ray.get(server.cross_site_evaluation.remote())
    rows = [
        {"model": model, "site": site, **metrics}
        for model, by_site in matrix.items()
        for site, metrics in by_site.items()
    ]
    columns = sorted({k for row in rows for k in row} - {"model", "site"})
    table = {
        "model": [r["model"] for r in rows],
        "site": [r["site"] for r in rows],
        **{c: [r.get(c) for r in rows] for c in columns},
    }
    logged = ray.get(receiver.log_table.remote("cross_site_evaluation.json", table, cfg.tracking.close_timeout))
    return {"matrix": matrix, "logged": logged}


def _best_model(cfg: JobConfig, server: Any, status: str) -> BestModel | Exception | None:
    """For a finished job with ``tracking.log_model``: the best global model, rebuilt by the server's learner
    (None when it exports none; the error when that failed)."""
    if server is None or status != FINISHED or not cfg.tracking.log_model:
        return None
    try:
        return ray.get(server.best_model.remote(), timeout=cfg.tracking.close_timeout)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
        return exc


def _log_best_model(
    cfg: JobConfig, receiver: Any, job_dir: Path, status: str, best_model: BestModel | Exception | None
) -> dict[str, Any] | None:
    """The best global model the server kept (``checkpoints/best.npz``: round, key metric) and, for a
    finished job with ``tracking.log_model``, where the receiver actor logged it (the model URI, and the
    registered version with ``tracking.register_model_name``); None when the learner exports no model."""
    path = job_dir / "checkpoints" / f"{BEST}.npz"
    try:
        best = load_best(path.parent)
    except Exception as exc:  # never keep the runs from being ended
        log.warning("cannot read the best model %s: %s: %s", path, type(exc).__name__, exc)
        return {"checkpoint": str(path), "error": f"{type(exc).__name__}: {exc}"}
    if best is None:
        if status == FINISHED:
            log.info(
                "the learner %s exports no model (Learner.export_model gives None): no model is logged", cfg.learner
            )
        return None
    report: dict[str, Any] = {
        "checkpoint": str(path),
        "round": best.round,
        "key_metric": best.key_metric,
        "key_mode": best.key_mode,
        "value": best.score,
    }
    if status != FINISHED or not cfg.tracking.log_model:
        return report
    timeout = cfg.tracking.close_timeout
    if isinstance(best_model, Exception) or best_model is None:
        why = (
            f"{type(best_model).__name__}: the server could not rebuild it"
            if best_model is not None
            else "the learner exported no model from the saved weights"
        )
        logged = {"server_actor": {"error": why}}
    else:
        try:
            logged = ray.get(
                receiver.log_model.remote("server", best_model, cfg.tracking.register_model_name, timeout),
                timeout=timeout + 120,
            )
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            logged = {"receiver_actor": {"error": f"{type(exc).__name__}: the receiver actor did not log the model"}}
    report["logged"] = logged
    for name, entry in logged.items():
        if "error" in entry:
            log.warning(
                "the best model (round %d) was not logged to %s: %s; its weights stay in %s",
                best.round,
                name,
                entry["error"],
                path,
            )
        elif "model_uri" in entry and "model_uri" not in report:
            report.update({k: v for k, v in entry.items() if k != "run_id"})
    return report
