"""The ``fl-ray`` command: ``run`` a job, ``replay`` a job's spool, open the workspace's runs in a ``ui``.

``fl-ray run`` is what ``scripts/run_fedavg.py`` runs and ``fl-ray replay`` what ``scripts/replay_spool.py``
runs (the scripts call :func:`run_main` and :func:`replay_main`). Exit status: 0 on success, 1 if the job
(or a delivery) failed, 2 for a bad config or command line, 130 after Ctrl+C. Secrets given on the command
line (``--set tracking.credentials.MLFLOW_TRACKING_PASSWORD=...``) are masked in what it prints. Output
that goes to a file or a pipe is plain text: no colour codes, and no line broken in the middle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

from fl_ray.config import DEFAULT_CONFIG, ConfigError, load_config
from fl_ray.tracking.credentials import argv_secrets, mask

RUN_EXAMPLE = "--set num_rounds=10 --set dataset.partition=dirichlet --set dataset.alpha=0.3"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose error messages mask ``secrets``."""

    def __init__(self, *args: Any, secrets: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secrets = secrets or []

    def error(self, message: str) -> NoReturn:
        super().error(mask(message, self.secrets))


def console(stderr: bool = True) -> Console:
    """A console that never breaks a line itself (a long command stays pastable); colour only on a terminal."""
    return Console(stderr=stderr, soft_wrap=True, highlight=False)


def _plain_output() -> None:
    """Ray's prefixes of forwarded worker lines carry colour codes unless told otherwise: not into a file."""
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


# -- run -----------------------------------------------------------------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fl-ray run`` (and scripts/run_fedavg.py)."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"job config (YAML); default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])}",
    )
    parser.add_argument(
        "--workspace",
        metavar="DIR",
        default="workspace",
        help="where jobs write (<DIR>/<job_id>/...) and the default MLflow store lives; default: %(default)s",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        default=None,
        help="join an existing Ray cluster (e.g. 'auto' or 'ray://head:10001'); RAY_ADDRESS works "
        "too; default: start Ray locally",
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        dest="overrides",
        action="append",
        default=[],
        help="override a config key (dotted, repeatable; VALUE is YAML, typed by the schema), "
        "e.g. --set num_rounds=5 --set resources.client_gpus=0.25",
    )
    parser.add_argument(
        "--resume",
        metavar="JOB_DIR",
        default=None,
        help="continue a stopped job after its last completed round, in the same job directory "
        "and MLflow runs (its config.yaml is the config; --set still applies)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own start-up messages")


def run_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``fl-ray run``: run a federated job (default: the default job, fl_ray/configs/default.yaml, on a local Ray)."""
    argv = sys.argv[1:] if argv is None else argv
    secrets = argv_secrets(argv)
    parser = _Parser(
        prog=prog,
        secrets=secrets,
        description="Run a federated learning job on Ray.",
        epilog=f"Example: %(prog)s {RUN_EXAMPLE}",
    )
    add_run_arguments(parser)
    return _run(parser.parse_args(argv), secrets)


def _run(args: argparse.Namespace, secrets: list[str]) -> int:
    out = console()
    _plain_output()
    if args.resume is not None and args.config is not None:
        out.print("[red]error:[/] --resume takes the job's own config.yaml; drop --config (use --set to change it)")
        return 2
    config = Path(args.resume) / "config.yaml" if args.resume is not None else args.config
    try:
        cfg = load_config(config, args.overrides)
    except ConfigError as exc:
        out.print(f"[red]error:[/] {escape(mask(str(exc), secrets))}")
        return 2
    if not cfg.tracking.receivers:
        out.print(
            "[yellow]note:[/] tracking.receivers is empty: tracking is off (no MLflow, TensorBoard or W&B "
            "records; result.json and summary.png still have every round)"
        )
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and not Path(args.workspace).is_absolute() and not args.resume:
        out.print(
            f"[yellow]warning:[/] under `ray job submit` the relative workspace {args.workspace!r} lies in "
            "the job's temporary working directory; pass an absolute --workspace to keep the results"
        )
    from fl_ray.job import run_job  # Ray and torch load only once the config is known to be good

    try:
        result = run_job(
            cfg,
            workspace=args.workspace,
            address=args.address,
            resume=args.resume,
            show_progress=not args.quiet,
            verbose=args.verbose,
            console=out,
        )
    except ConfigError as exc:
        out.print(f"[red]error:[/] {escape(mask(str(exc), secrets))}")
        return 2
    except KeyboardInterrupt as exc:
        out.print("[yellow]interrupted:[/] tracking was flushed, runs are marked KILLED and result.json is written")
        _print_stopped(exc, out, secrets)
        return 130
    except Exception as exc:
        out.print(f"[red]job failed:[/] {type(exc).__name__}: {escape(mask(str(exc), secrets))}")
        _print_stopped(exc, out, secrets)
        return 1
    print_summary(result.to_dict(), out, secrets)
    return 0


def _print_stopped(exc: BaseException, out: Console, secrets: list[str]) -> None:
    """The summary of a job that stopped (from its result.json), with the command that resumes it."""
    from fl_ray.viewers import fl_ray_command

    job_dir = getattr(exc, "job_dir", None)
    if job_dir is None:  # it stopped before it had a job directory: nothing to resume
        return
    try:
        data = json.loads((job_dir / "result.json").read_text())
    except (OSError, ValueError):
        out.print(f"resume:   {fl_ray_command()} run --resume {job_dir}")
        return
    print_summary(data, out, secrets)


def print_summary(data: dict[str, Any], out: Console, secrets: list[str]) -> None:
    """The end-of-job summary: the rounds table, where the results and the picture are, how to open the
    tracking records (commands that work pasted into a new shell), and what went wrong with tracking."""
    from fl_ray.progress import summary_table
    from fl_ray.viewers import fl_ray_command, view_hints

    tracking = data.get("tracking", {})
    out.print(summary_table(data))
    out.print(f"results:  {Path(data['job_dir']) / 'result.json'}")
    if data.get("picture"):
        out.print(f"picture:  {data['picture']}")
    for label, text in view_hints(data):
        out.print(f"{label + ':':<9} {escape(mask(text, secrets))}")
    model = tracking.get("model")
    if model and model.get("model_uri"):
        registered = (
            f", registered as {model['registered_model_name']} v{model['registered_model_version']}"
            if model.get("registered_model_version")
            else ""
        )
        out.print(
            f"model:    {model['model_uri']} (round {model['round']}, {model['key_metric']} "
            f"{model['value']:.4f}){registered}"
        )
    spool = tracking.get("spool", {})
    replay = f"{fl_ray_command()} replay {data['job_dir']}"
    for name, r in tracking.get("receivers", {}).items():
        if r.get("undelivered"):
            out.print(
                f"[yellow]warning:[/] {r['undelivered']} tracking record(s) not delivered to {name} "
                f"({mask(str(r.get('error')), secrets)}); they are kept in {spool.get('path')}; "
                f"deliver them later with: {replay} --to {name}"
            )
        if r.get("dead_letters"):
            out.print(
                f"[yellow]warning:[/] {name} refused {r['dead_letters']} record(s) for good; they are set "
                f"aside with the reasons in {r['dead_letter_file']}; try them again with: "
                f"{replay} --to {name} --dead-letters"
            )
    if spool.get("error"):
        failed = spool["error"]
        out.print(
            f"[yellow]warning:[/] the tracking spool {failed['path']} could not store records "
            f"({failed['error']}); {failed['waiting']} record(s) were still waiting on the sites"
        )
    for damage in spool.get("damaged", []):
        out.print(
            f"[yellow]warning:[/] a damaged tracking record in {spool['path']} at offset {damage['offset']} "
            f"({damage['bytes']} bytes) was skipped"
        )


# -- replay --------------------------------------------------------------------------------------------
def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fl-ray replay`` (and scripts/replay_spool.py)."""
    from fl_ray.replay import STATUSES

    parser.add_argument("job_dir", type=Path, help="the job's directory (<workspace>/<job_id>)")
    parser.add_argument(
        "--to",
        metavar="NAME",
        default=None,
        help="only this receiver: a type (mlflow, tensorboard, wandb, memory or module:Class) or the "
        "name of one of the job's receivers as result.json reports it; default: every receiver "
        "of the job's config",
    )
    parser.add_argument(
        "--destination",
        "--tracking-uri",
        metavar="URI",
        dest="destination",
        default=None,
        help="send the records here instead of where the job sent them (for a receiver that "
        "declares a destination: MLflow's tracking URI)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=120.0,
        help="give up on a receiver that still fails after this long; default: %(default)s",
    )
    parser.add_argument(
        "--dead-letters",
        action="store_true",
        help="also try again the records each receiver set aside as refused (dead_letters.jsonl)",
    )
    parser.add_argument(
        "--status",
        choices=STATUSES,
        default=None,
        help="status the runs end with; default: the job's, from result.json (KILLED without one)",
    )


REPLAY_DESCRIPTION = (
    "Deliver the tracking records a job spooled but its receivers did not get (e.g. the server "
    "was down). Marks move as records are delivered, so running it again sends nothing twice."
)
REPLAY_EXAMPLE = "workspace/fedavg-20250101-120000-000 --to mlflow --tracking-uri http://127.0.0.1:5000"


def replay_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``fl-ray replay``: deliver a job's spooled tracking records; 0 when all were delivered, 1 if some
    could not be, 2 for a bad job directory or command line."""
    parser = _Parser(prog=prog, description=REPLAY_DESCRIPTION, epilog=f"Example: %(prog)s {REPLAY_EXAMPLE}")
    add_replay_arguments(parser)
    return _replay(parser.parse_args(argv))


def _replay(args: argparse.Namespace) -> int:
    from fl_ray.replay import ReplayError, replay

    err = console()
    _plain_output()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = replay(args.job_dir, args.to, args.destination, args.timeout, args.status, err, args.dead_letters)
    except ReplayError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return 2
    out = console(stderr=False)
    spool = report["spool"]
    out.print(f"spool: {spool['path']} ({report['accepted']} record(s))")
    for damage in spool.get("damaged", []):
        out.print(
            f"  [yellow]warning:[/] a damaged record at offset {damage['offset']} ({damage['bytes']} bytes) was skipped"
        )
    failed = False
    for name, entry in report["receivers"].items():
        line = (
            f"{name}: {entry['replayed']} record(s) delivered now, {entry['delivered']} in all, "
            f"{entry['undelivered']} undelivered"
        )
        if entry.get("view"):  # where to look, as the receiver's close report says
            line += f" -> {entry['view']}"
        out.print(line)
        if entry["undelivered"] or entry.get("error"):
            failed = True
            out.print(f"  [red]error:[/] {entry.get('error')}")
        elif entry.get("close_error"):  # everything was delivered; only ending the runs failed
            out.print(f"  [yellow]warning:[/] {entry['close_error']}")
        retried = entry.get("dead_letters_retried")
        if retried:
            out.print(
                f"  dead letters: {retried['retried']} tried again, {retried['delivered']} delivered"
                + (f" ({retried['error']})" if retried.get("error") else "")
            )
        if entry.get("dead_letters"):
            out.print(
                f"  [yellow]set aside:[/] {entry['dead_letters']} record(s) refused for good, in "
                f"{entry['dead_letter_file']} (try again with --dead-letters)"
            )
    return 1 if failed else 0


# -- ui ------------------------------------------------------------------------------------------------
def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fl-ray ui``."""
    parser.add_argument(
        "--workspace", metavar="DIR", default="workspace", help="the workspace whose runs to show; default: %(default)s"
    )
    parser.add_argument(
        "--job",
        metavar="JOB_DIR",
        default=None,
        help="show where this job's records went (default: the workspace's latest job)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the viewer listens on; default: %(default)s")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="port the viewer listens on; default: 5000 for MLflow, 6006 for TensorBoard",
    )


def ui_plan(workspace: Path, job_dir: Path | None = None) -> tuple[str, str]:
    """``(viewer, where)`` for a workspace: ``("mlflow", tracking URI)`` when its jobs track to MLflow (an
    ``http`` URI is a server with its own UI), else ``("tensorboard", log dir)``; ValueError when neither."""
    from fl_ray.receivers.mlflow import default_tracking_uri

    results = (
        [job_dir / "result.json"]
        if job_dir
        else sorted(workspace.glob("*/result.json"), key=lambda p: p.stat().st_mtime)
    )
    for path in reversed(results):
        try:
            receivers = json.loads(path.read_text()).get("tracking", {}).get("receivers", {})
        except (OSError, ValueError):
            continue
        for entry in receivers.values():
            if entry.get("tracking_uri") and "parent_run_id" in entry:
                return "mlflow", entry["tracking_uri"]
        for entry in receivers.values():
            if entry.get("log_dir"):
                return "tensorboard", str(workspace if job_dir is None else entry["log_dir"])
    if (workspace / "mlflow.db").is_file():
        return "mlflow", default_tracking_uri(workspace)
    raise ValueError(
        f"{workspace}: no job there tracked to MLflow or TensorBoard (no result.json says so and there is no mlflow.db)"
    )


def ui_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``fl-ray ui``: open the viewer for the workspace's tracking store and print its URL."""
    parser = _Parser(
        prog=prog,
        description="Open the workspace's runs: `mlflow ui` on its MLflow store (or "
        "TensorBoard over its event files), printing the URL to open.",
    )
    add_ui_arguments(parser)
    return _ui(parser.parse_args(argv))


def _ui(args: argparse.Namespace) -> int:
    from fl_ray.viewers import mlflow_ui_command, shell_line, tensorboard_command

    out = console()
    workspace = Path(args.workspace).resolve()
    try:
        viewer, where = ui_plan(workspace, Path(args.job).resolve() if args.job else None)
    except ValueError as exc:
        out.print(f"[red]error:[/] {escape(str(exc))}")
        return 2
    if viewer == "mlflow":
        command = mlflow_ui_command(where)
        if not command:
            out.print(f"the runs are on the MLflow server {where}: open {where}")
            return 0
        command += ["--host", args.host, "--port", str(args.port or 5000), "--workers", "1"]  # one viewer, one worker
    else:
        command = tensorboard_command(where) + ["--host", args.host, "--port", str(args.port or 6006)]
    out.print(f"starting: {shell_line(command)}")
    out.print(f"open http://{args.host}:{args.port or (5000 if viewer == 'mlflow' else 6006)} (Ctrl+C stops it)")
    proc = subprocess.Popen(command, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 0


# -- fl-ray --------------------------------------------------------------------------------------------
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "run": (
        "run a federated job (default: the default job, fl_ray/configs/default.yaml, on a local Ray)",
        add_run_arguments,
        f"Example: fl-ray run {RUN_EXAMPLE}",
    ),
    "replay": (
        "deliver a job's spooled tracking records to its receivers",
        add_replay_arguments,
        f"Example: fl-ray replay {REPLAY_EXAMPLE}",
    ),
    "ui": (
        "open the workspace's runs in MLflow's UI (or TensorBoard) and print the URL",
        add_ui_arguments,
        "Example: fl-ray ui --workspace workspace --port 5001",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """``fl-ray <command> ...``."""
    argv = sys.argv[1:] if argv is None else argv
    secrets = argv_secrets(argv)
    parser = _Parser(
        prog="fl-ray",
        secrets=secrets,
        description="Federated learning on Ray, with every site's training tracked in one place.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,replay,ui}", parser_class=_Parser)
    for name, (summary, add_arguments, epilog) in COMMANDS.items():
        add_arguments(
            commands.add_parser(
                name, help=summary, description=summary[0].upper() + summary[1:] + ".", epilog=epilog, secrets=secrets
            )
        )
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args, secrets)
    if args.command == "replay":
        return _replay(args)
    return _ui(args)


if __name__ == "__main__":
    sys.exit(main())
