"""How to look at a job's results: the command lines that open its MLflow, TensorBoard and W&B records.

Every command names its executable by full path, from the Python environment the job runs in (the one
``sys.executable`` belongs to), so it works when pasted into a new shell where that environment is not
activated. :func:`view_hints` turns a job's result (``result.json``) into ``(label, text)`` lines for the
end-of-job summary; :func:`mlflow_ui_command` is also what ``fl-ray ui`` starts.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import Any


def executable(name: str) -> str:
    """The full path of console script ``name`` in this Python environment (beside ``sys.executable``), else
    where ``PATH`` finds it, else the bare name."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    return shutil.which(name) or name


def fl_ray_command() -> str:
    """How to call ``fl-ray`` here: its console script, or ``python -m fl_ray.cli`` where the environment
    was installed before the script existed (``pip install -e .`` again adds it)."""
    script = Path(sys.executable).parent / "fl-ray"
    return str(script) if script.is_file() else f"{shlex.quote(sys.executable)} -m fl_ray.cli"


def mlflow_ui_command(tracking_uri: str) -> list[str]:
    """``mlflow ui`` on a local store (sqlite or a folder); empty for a tracking server, which is its own UI."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return []
    return [executable("mlflow"), "ui", "--backend-store-uri", tracking_uri]


def tensorboard_command(log_dir: str | Path) -> list[str]:
    """``tensorboard --logdir``: TensorBoard over a job's (or a workspace's) event files."""
    return [executable("tensorboard"), "--logdir", str(log_dir)]


def wandb_sync_command(wandb_dir: str | Path) -> str:
    """``wandb sync`` of every offline run under ``<dir>/wandb`` (a shell line: the glob is the shell's)."""
    return f"{shlex.quote(executable('wandb'))} sync {shlex.quote(str(Path(wandb_dir) / 'wandb'))}/offline-run-*"


def shell_line(argv: list[str]) -> str:
    """``argv`` quoted for a POSIX shell."""
    return shlex.join(argv)


def view_hints(result: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, text)`` lines saying how to open each receiver's records and, for a job that did not finish,
    how to resume it."""
    hints: list[tuple[str, str]] = []
    for entry in result.get("tracking", {}).get("receivers", {}).values():
        if "parent_run_id" in entry and entry.get("tracking_uri"):
            where = f"experiment {entry['experiment_id']}, run {entry['parent_run_id']}"
            ui = mlflow_ui_command(entry["tracking_uri"])
            hints.append(
                ("MLflow", f"{where}; view with: {shell_line(ui)}" if ui else f"{where}; open {entry['tracking_uri']}")
            )
        elif "log_dir" in entry and entry.get("log_dir"):
            hints.append(("TensorBoard", f"view with: {shell_line(tensorboard_command(entry['log_dir']))}"))
        elif "mode" in entry and entry.get("dir"):
            runs = Path(entry["dir"]) / "wandb"
            if entry["mode"] == "offline":
                hints.append(("W&B", f"offline runs in {runs}; upload with: {wandb_sync_command(entry['dir'])}"))
            else:
                hints.append(("W&B", f"runs synced to W&B ({entry['mode']}); local files in {runs}"))
    if result.get("status") in ("KILLED", "FAILED") and result.get("job_dir"):
        hints.append(("resume", f"{fl_ray_command()} run --resume {shlex.quote(str(result['job_dir']))}"))
    return hints
