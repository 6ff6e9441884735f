"""Run metadata for the job's parent run: fl_ray version, git commit and dirtiness, command line (its
secrets masked), the Ray cluster's resources and the job's description (MLflow shows
``mlflow.note.content`` as the run's description). This module imports no Ray: the job passes
``ray.cluster_resources()`` in."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from fl_ray.tracking.credentials import masked_argv


def git_state(cwd: Path | None = None) -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"/"false"}`` when ``cwd`` is inside a git work tree, else ``{}``."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": str(dirty).lower()}


MAX_TAG_LENGTH = 5000  # MLflow keeps tag values up to 8000 characters; leave room


def cluster_resources_tag(resources: dict[str, float]) -> str:
    """``ray.cluster_resources()`` as compact, sorted JSON; past MAX_TAG_LENGTH characters the per-node
    ``node:<ip>`` markers (one per node, each 1.0) give way to a ``nodes`` count."""
    text = json.dumps(dict(sorted(resources.items())), separators=(",", ":"))
    if len(text) <= MAX_TAG_LENGTH:
        return text
    kept = {k: v for k, v in sorted(resources.items()) if not k.startswith("node:")}
    kept["nodes"] = sum(1 for k in resources if k.startswith("node:") and k != "node:__internal_head__")
    return json.dumps(kept, separators=(",", ":"))[:MAX_TAG_LENGTH]


def run_tags(job_id: str, description: str = "", cluster_resources: dict[str, float] | None = None) -> dict[str, str]:
    """Tags for the job's parent run (the command line with its secrets masked); ``description`` (if any)
    as MLflow's run description."""
    from fl_ray import __version__

    tags = {
        "fl_ray.job_id": job_id,
        "fl_ray.version": __version__,
        "fl_ray.command": shlex.join(masked_argv([Path(sys.argv[0]).name, *sys.argv[1:]]))[:5000],
    }
    git = git_state()
    if git:
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["fl_ray.git_dirty"] = git["dirty"]
    if cluster_resources is not None:
        tags["fl_ray.ray_resources"] = cluster_resources_tag(cluster_resources)
    if description:
        tags["mlflow.note.content"] = description
    return tags
