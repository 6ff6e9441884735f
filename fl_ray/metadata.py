"""Run metadata for the job's parent run: fl_ray version, git commit and dirtiness, command line."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path


def git_state(cwd: Path | None = None) -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"/"false"}`` when ``cwd`` is inside a git work tree, else ``{}``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": str(dirty).lower()}


def run_tags(job_id: str) -> dict[str, str]:
    """Tags for the job's parent run."""
    from fl_ray import __version__

    tags = {"fl_ray.job_id": job_id, "fl_ray.version": __version__,
            "fl_ray.command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:5000]}
    git = git_state()
    if git:
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["fl_ray.git_dirty"] = git["dirty"]
    return tags
