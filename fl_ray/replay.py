"""Replaying a job's spool: deliver the tracking records its receivers did not get (e.g. the server was down).

:func:`replay` rebuilds the job's receivers from ``<job dir>/config.yaml`` (or only the one named) and
sends each one every record of ``<job dir>/spool/`` past its progress mark, through the same delivery
pumps the receiver actor uses. Marks move as records are delivered, so replaying again sends nothing
twice. A receiver that can be pointed elsewhere declares a destination (MLflow: its tracking URI) and
keeps a mark per destination: it replays to where the job sent its records, or to ``destination``, which
then gets everything, once. With ``dead_letters``, the records a receiver refused for good (``dead_letters.jsonl``) are tried
again first. Credentials come from the environment (MLFLOW_TRACKING_USERNAME, ...), as for the job.
``fl-ray replay`` and ``scripts/replay_spool.py`` are its command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from fl_ray.config import ConfigError, parse_config
from fl_ray.receivers.base import KILLED, ReceiverContext, build_receivers, receiver_class, receiver_names
from fl_ray.tracking.hub import TrackingHub
from fl_ray.tracking.spool import EVENTS_FILE, load_progress

STATUSES = ("FINISHED", "FAILED", "KILLED")


class ReplayError(Exception):
    """A job directory or command line that cannot be replayed; the message says why."""


def load_job(job_dir: Path) -> tuple[dict[str, Any], Any, str | None]:
    """The job's config as it was written (plain data), the parsed config, and its status if it ended."""
    if not (job_dir / "config.yaml").is_file():
        raise ReplayError(f"{job_dir} is not a job directory: it has no config.yaml")
    if not (job_dir / "spool" / EVENTS_FILE).is_file():
        raise ReplayError(f"{job_dir} has no spool ({job_dir / 'spool' / EVENTS_FILE}); nothing to replay")
    try:
        raw = yaml.safe_load((job_dir / "config.yaml").read_text()) or {}
        cfg = parse_config(raw)
    except (yaml.YAMLError, ConfigError) as exc:
        raise ReplayError(f"{job_dir / 'config.yaml'}: {exc}") from None
    try:
        status = json.loads((job_dir / "result.json").read_text()).get("status")
    except (OSError, ValueError):
        status = None
    return raw, cfg, status if status in STATUSES else None


def select_receivers(cfg: Any, to: str | None) -> list[tuple[str, dict[str, Any]]]:
    """``(progress name, spec)`` of each receiver to replay to: the job's, or those ``to`` names."""
    specs = [{"type": r.type, **r.params} for r in cfg.tracking.receivers]
    named = list(zip(receiver_names(specs), specs))
    if to is None:
        return named
    chosen = [(name, spec) for name, spec in named if to in (name, spec["type"])]
    return chosen or [(receiver_names([{"type": to}])[0], {"type": to})]


def plan(job_dir: Path, cfg: Any, to: str | None, destination: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The receivers to build. One that declares a destination parameter goes to ``destination``, else to
    its entry's, else where the job sent its records; its pump keeps a separate progress mark per
    destination, so sending elsewhere sends everything there."""
    planned = []
    for name, spec in select_receivers(cfg, to):
        spec = dict(spec)
        try:
            param = receiver_class(spec["type"]).destination_param
        except ValueError as exc:
            raise ReplayError(f"receiver {name!r}: {exc}") from None
        if param is not None:
            mark = load_progress(job_dir / "spool", name)
            spec[param] = destination or spec.get(param) or mark.get("destination")
        planned.append((name, spec))
    if destination and not any(receiver_class(spec["type"]).destination_param for _, spec in planned):
        raise ReplayError("--destination was given but no receiver replayed to takes one (see --to)")
    return planned


def replay(
    job_dir: Path,
    to: str | None = None,
    destination: str | None = None,
    timeout: float = 120.0,
    status: str | None = None,
    console: Console | None = None,
    dead_letters: bool = False,
) -> dict[str, Any]:
    """Deliver ``job_dir``'s spool past each receiver's mark (and, with ``dead_letters``, try its set-aside
    records again); returns the hub's close report plus counts."""
    console = console or Console(stderr=True)
    job_dir = job_dir.resolve()
    raw, cfg, job_status = load_job(job_dir)
    if status is None:
        status = job_status or KILLED
        if job_status is None:
            console.print(
                f"[yellow]note:[/] {job_dir / 'result.json'} is missing (a job that was killed, or one "
                "still running: do not replay a running job); runs end as KILLED"
            )
    planned = plan(job_dir, cfg, to, destination)
    try:
        built = build_receivers([spec for _, spec in planned])
    except (TypeError, ValueError) as exc:
        raise ReplayError(f"receivers {[name for name, _ in planned]}: {exc}") from None
    receivers = [(name, receiver) for (name, _), (_, receiver) in zip(planned, built)]
    from fl_ray.metadata import run_tags

    ctx = ReceiverContext(
        job_id=job_dir.name,
        job_name=cfg.name,
        job_dir=job_dir,
        workspace=job_dir.parent,
        sites=tuple(cfg.site_names),
        config=raw,
        tags=run_tags(job_dir.name),
    )
    hub = TrackingHub(ctx, receivers)
    retried = hub.retry_dead_letters(timeout) if dead_letters else {}
    report = hub.close(status, timeout)
    for pump in hub.pumps:
        report["receivers"][pump.name]["replayed"] = pump.sent
        if pump.name in retried:
            report["receivers"][pump.name]["dead_letters_retried"] = retried[pump.name]
    return report
