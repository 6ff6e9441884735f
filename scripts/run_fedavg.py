#!/usr/bin/env python3
"""Run a federated averaging job on Ray.

With no arguments: the default job (fl_ray/configs/default.yaml, inside the package) on a local Ray instance, results under ./workspace.
Exit status: 0 on success, 1 if the job failed, 2 for a bad config or command line. Secrets given on the
command line (``--set tracking.credentials.MLFLOW_TRACKING_PASSWORD=...``) are masked in what it prints.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from fl_ray.config import ConfigError, load_config
from fl_ray.tracking.credentials import argv_secrets, mask


class _Parser(argparse.ArgumentParser):
    """An argument parser whose error messages mask ``secrets``."""

    def __init__(self, secrets: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.secrets = secrets

    def error(self, message: str) -> NoReturn:
        super().error(mask(message, self.secrets))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(
        argv_secrets(sys.argv[1:] if argv is None else argv),
        description=__doc__.splitlines()[0],
        epilog="Example: %(prog)s --set num_rounds=10 --set dataset.partition=dirichlet --set dataset.alpha=0.3",
    )
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="job config (YAML); default: the default job shipped in the package (fl_ray/configs/default.yaml)")
    parser.add_argument("--workspace", metavar="DIR", default="workspace",
                        help="where jobs write (<DIR>/<job_id>/...) and the default MLflow store lives; "
                             "default: %(default)s")
    parser.add_argument("--address", metavar="ADDR", default=None,
                        help="join an existing Ray cluster (e.g. 'auto' or 'ray://head:10001'); RAY_ADDRESS works "
                             "too; default: start Ray locally")
    parser.add_argument("--set", metavar="KEY=VALUE", dest="overrides", action="append", default=[],
                        help="override a config key (dotted, repeatable; VALUE is YAML, typed by the schema), "
                             "e.g. --set num_rounds=5 --set resources.client_gpus=0.25")
    parser.add_argument("--resume", metavar="JOB_DIR", default=None,
                        help="continue a stopped job after its last completed round, in the same job directory "
                             "and MLflow runs (its config.yaml is the config; --set still applies)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    secrets = argv_secrets(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    console = Console(stderr=True)
    if args.resume is not None and args.config is not None:
        console.print("[red]error:[/] --resume takes the job's own config.yaml; drop --config (use --set to change it)")
        return 2
    config = Path(args.resume) / "config.yaml" if args.resume is not None else args.config
    try:
        cfg = load_config(config, args.overrides)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {mask(str(exc), secrets)}", highlight=False)
        return 2
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and not Path(args.workspace).is_absolute() and not args.resume:
        console.print(f"[yellow]warning:[/] under `ray job submit` the relative workspace {args.workspace!r} lies in "
                      "the job's temporary working directory; pass an absolute --workspace to keep the results")
    from fl_ray.job import run_job  # Ray and torch load only once the config is known to be good
    from fl_ray.progress import summary_table

    try:
        result = run_job(cfg, workspace=args.workspace, address=args.address, resume=args.resume,
                         show_progress=not args.quiet)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {mask(str(exc), secrets)}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] tracking was flushed, runs are marked KILLED and result.json is "
                      "written; continue with --resume <job dir>")
        return 130
    except Exception as exc:
        console.print(f"[red]job failed:[/] {type(exc).__name__}: {mask(str(exc), secrets)}", highlight=False)
        return 1
    data = result.to_dict()
    console.print(summary_table(data))
    console.print(f"results:  {result.job_dir / 'result.json'}")
    for name, r in result.tracking.get("receivers", {}).items():
        if r.get("view"):  # where to look, as the receiver's close report says
            console.print(f"{name}: {mask(r['view'], secrets)}", highlight=False, soft_wrap=True)
    model = result.tracking.get("model")
    if model and model.get("model_uri"):
        registered = (f", registered as {model['registered_model_name']} v{model['registered_model_version']}"
                      if model.get("registered_model_version") else "")
        console.print(f"model:    {model['model_uri']} (round {model['round']}, {model['key_metric']} "
                      f"{model['value']:.4f}){registered}", highlight=False)
    spool = result.tracking.get("spool", {})
    for name, r in result.tracking.get("receivers", {}).items():
        if r.get("undelivered"):
            console.print(f"[yellow]warning:[/] {r['undelivered']} tracking record(s) not delivered to {name} "
                          f"({mask(str(r.get('error')), secrets)}); they are kept in {spool.get('path')}; "
                          f"deliver them later with: python scripts/replay_spool.py {result.job_dir}", highlight=False)
        if r.get("dead_letters"):
            console.print(f"[yellow]warning:[/] {name} refused {r['dead_letters']} record(s) for good; they are set "
                          f"aside with the reasons in {r['dead_letter_file']}; try them again with: "
                          f"{r['dead_letter_replay']}", highlight=False)
    if spool.get("error"):
        failed = spool["error"]
        console.print(f"[yellow]warning:[/] the tracking spool {failed['path']} could not store records "
                      f"({failed['error']}); {failed['waiting']} record(s) were still waiting on the sites",
                      highlight=False)
    for damage in spool.get("damaged", []):
        console.print(f"[yellow]warning:[/] a damaged tracking record in {spool['path']} at offset {damage['offset']} "
                      f"({damage['bytes']} bytes) was skipped", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
