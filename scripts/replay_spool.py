#!/usr/bin/env python3
"""Deliver the tracking records a job spooled but its receivers did not get (e.g. the server was down).

Rebuilds the job's receivers from <job dir>/config.yaml (or only the one named with --to) and sends
each one every record of <job dir>/spool/ past its progress mark, through the same delivery pumps the
receiver actor uses. Marks move as records are delivered, so running this again sends nothing twice.
A receiver that can be pointed elsewhere (it declares a destination, as MLflow's tracking URI) keeps a
mark per destination: it replays to where the job sent its records, or with --destination (for MLflow
also spelled --tracking-uri) elsewhere, and then delivers everything there, once. With --dead-letters, the records a receiver refused for good (<job dir>/dead_letters.jsonl)
are tried again first; those refused again stay there. Credentials come from the environment
(MLFLOW_TRACKING_USERNAME, ...), as for the job.
Exit status: 0 when everything was delivered, 1 when some records could not be, 2 for a bad job
directory or command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Example: %(prog)s workspace/fedavg-20250101-120000-000 --to mlflow "
               "--tracking-uri http://127.0.0.1:5000",
    )
    parser.add_argument("job_dir", type=Path, help="the job's directory (<workspace>/<job_id>)")
    parser.add_argument("--to", metavar="NAME", default=None,
                        help="only this receiver: a type (mlflow, tensorboard, wandb, memory or module:Class) or the "
                             "name of one of the job's receivers as result.json reports it; default: every receiver "
                             "of the job's config")
    parser.add_argument("--destination", "--tracking-uri", metavar="URI", dest="destination", default=None,
                        help="send the records here instead of where the job sent them (for a receiver that "
                             "declares a destination: MLflow's tracking URI)")
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=120.0,
                        help="give up on a receiver that still fails after this long; default: %(default)s")
    parser.add_argument("--dead-letters", action="store_true",
                        help="also try again the records each receiver set aside as refused (dead_letters.jsonl)")
    parser.add_argument("--status", choices=STATUSES, default=None,
                        help="status the runs end with; default: the job's, from result.json (KILLED without one)")
    return parser.parse_args(argv)


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


def replay(job_dir: Path, to: str | None = None, destination: str | None = None, timeout: float = 120.0,
           status: str | None = None, console: Console | None = None, dead_letters: bool = False) -> dict[str, Any]:
    """Deliver ``job_dir``'s spool past each receiver's mark (and, with ``dead_letters``, try its set-aside
    records again); returns the hub's close report plus counts."""
    console = console or Console(stderr=True)
    job_dir = job_dir.resolve()
    raw, cfg, job_status = load_job(job_dir)
    if status is None:
        status = job_status or KILLED
        if job_status is None:
            console.print(f"[yellow]note:[/] {job_dir / 'result.json'} is missing (a job that was killed, or one "
                          "still running: do not replay a running job); runs end as KILLED")
    planned = plan(job_dir, cfg, to, destination)
    try:
        built = build_receivers([spec for _, spec in planned])
    except (TypeError, ValueError) as exc:
        raise ReplayError(f"receivers {[name for name, _ in planned]}: {exc}") from None
    receivers = [(name, receiver) for (name, _), (_, receiver) in zip(planned, built)]
    from fl_ray.metadata import run_tags

    ctx = ReceiverContext(job_id=job_dir.name, job_name=cfg.name, job_dir=job_dir, workspace=job_dir.parent,
                          sites=tuple(cfg.site_names), config=raw, tags=run_tags(job_dir.name))
    hub = TrackingHub(ctx, receivers)
    retried = hub.retry_dead_letters(timeout) if dead_letters else {}
    report = hub.close(status, timeout)
    for pump in hub.pumps:
        report["receivers"][pump.name]["replayed"] = pump.sent
        if pump.name in retried:
            report["receivers"][pump.name]["dead_letters_retried"] = retried[pump.name]
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = replay(args.job_dir, args.to, args.destination, args.timeout, args.status, console,
                        args.dead_letters)
    except ReplayError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    out = Console()
    spool = report["spool"]
    out.print(f"spool: {spool['path']} ({report['accepted']} record(s))", highlight=False)
    for damage in spool.get("damaged", []):
        out.print(f"  [yellow]warning:[/] a damaged record at offset {damage['offset']} ({damage['bytes']} bytes) "
                  "was skipped", highlight=False)
    failed = False
    for name, entry in report["receivers"].items():
        line = (f"{name}: {entry['replayed']} record(s) delivered now, {entry['delivered']} in all, "
                f"{entry['undelivered']} undelivered")
        if entry.get("view"):  # where to look, as the receiver's close report says
            line += f" -> {entry['view']}"
        out.print(line, highlight=False, soft_wrap=True)
        if entry["undelivered"] or entry.get("error"):
            failed = True
            out.print(f"  [red]error:[/] {entry.get('error')}", highlight=False, soft_wrap=True)
        elif entry.get("close_error"):  # everything was delivered; only ending the runs failed
            out.print(f"  [yellow]warning:[/] {entry['close_error']}", highlight=False, soft_wrap=True)
        retried = entry.get("dead_letters_retried")
        if retried:
            out.print(f"  dead letters: {retried['retried']} tried again, {retried['delivered']} delivered"
                      + (f" ({retried['error']})" if retried.get("error") else ""), highlight=False, soft_wrap=True)
        if entry.get("dead_letters"):
            out.print(f"  [yellow]set aside:[/] {entry['dead_letters']} record(s) refused for good, in "
                      f"{entry['dead_letter_file']} (try again with --dead-letters)", highlight=False, soft_wrap=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
