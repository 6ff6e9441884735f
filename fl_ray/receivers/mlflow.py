"""MLflowReceiver: every site's records into MLflow, batched, one run per site under the job's run.

Run structure: a parent run per job (named after the job id; the resolved config as params; tags for
the job id, the fl_ray version and, when known, the git commit), with one nested run per site and one
named ``server``. Metrics, params and tags go in with ``MlflowClient.log_batch`` (which splits a
batch within MLflow's limits of 1000 metrics, 100 params and 100 tags a call); texts with
``log_text``. Metric timestamps are the client's, so writing the same batch twice adds nothing.
Run ids are kept in ``<job>/mlflow_runs.json`` so a restarted receiver (or a resumed job) writes into
the same runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from fl_ray.receivers.base import FINISHED, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.spool import read_json, write_json_atomic

RUNS_FILE = "mlflow_runs.json"
SERVER_RUN = "server"


def default_tracking_uri(workspace: Path) -> str:
    """``sqlite:///<workspace>/mlflow.db``: one store for every job of a workspace, so runs compare."""
    return f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"a.b": "value"}`` params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): str(data)[:6000]}


class MLflowReceiver:
    """Writes tracking events to an MLflow tracking server or store."""

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None,
                 buffer_flush_time: float = 1.0) -> None:
        if buffer_flush_time < 0:
            raise ValueError(f"buffer_flush_time must be >= 0 seconds, got {buffer_flush_time}")
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.buffer_flush_time = buffer_flush_time
        self._pending: dict[str, tuple[list, list, list, list]] = {}

    def open(self, ctx: ReceiverContext) -> None:
        from mlflow.tracking import MlflowClient

        self._ctx = ctx
        self.tracking_uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            default_tracking_uri(ctx.workspace)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        name = self.experiment_name or ctx.job_name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        else:
            artifacts = None
            if self.tracking_uri.startswith("sqlite:"):
                artifacts = (Path(ctx.workspace).resolve() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        self._runs_path = Path(ctx.job_dir) / RUNS_FILE
        saved = read_json(self._runs_path, {})
        if saved.get("tracking_uri") == self.tracking_uri and saved.get("experiment_id") == self.experiment_id:
            self.parent_run_id, self.run_ids = saved["parent_run_id"], saved["run_ids"]
            for run_id in (self.parent_run_id, *self.run_ids.values()):
                self.client.update_run(run_id, status="RUNNING")
        else:
            self._create_runs(ctx)

    def _create_runs(self, ctx: ReceiverContext) -> None:
        from mlflow.entities import Param, RunTag

        tags = {"fl_ray.job_id": ctx.job_id, **ctx.tags}
        parent = self.client.create_run(self.experiment_id, run_name=ctx.job_id, tags=tags)
        self.parent_run_id = parent.info.run_id
        params = [Param(k, v) for k, v in flatten(ctx.config).items()]
        self.client.log_batch(self.parent_run_id, params=params)
        self.run_ids: dict[str, str] = {}
        for site in (*ctx.sites, SERVER_RUN):
            self._site_run(site)
        self.client.log_batch(self.parent_run_id, tags=[RunTag("fl_ray.sites", ",".join(ctx.sites))])

    def _site_run(self, site: str) -> str:
        run_id = self.run_ids.get(site)
        if run_id is None:
            tags = {"mlflow.parentRunId": self.parent_run_id, "fl_ray.site": site, "fl_ray.job_id": self._ctx.job_id}
            run_id = self.client.create_run(self.experiment_id, run_name=site, tags=tags).info.run_id
            self.run_ids[site] = run_id
            write_json_atomic(self._runs_path, {"tracking_uri": self.tracking_uri,
                                                "experiment_id": self.experiment_id,
                                                "parent_run_id": self.parent_run_id, "run_ids": self.run_ids})
        return run_id

    def write(self, events: Sequence[TrackingEvent]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        for e in events:
            metrics, params, tags, texts = self._pending.setdefault(e.site, ([], [], [], []))
            if e.kind == EventKind.METRIC:
                metrics.append(Metric(e.key, e.value, e.timestamp, e.step))
            elif e.kind == EventKind.PARAM:
                params.append(Param(e.key, e.value))
            elif e.kind == EventKind.TAG:
                tags.append(RunTag(e.key, e.value))
            else:
                texts.append((e.value, text_artifact(e.key, e.step)))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for site, (metrics, params, tags, texts) in pending.items():
            run_id = self._site_run(site)
            self.client.log_batch(run_id, metrics=metrics, params=_last_per_key(params), tags=_last_per_key(tags))
            for text, artifact_file in texts:
                self.client.log_text(run_id, text, artifact_file)

    def close(self, status: str = FINISHED) -> dict[str, Any]:
        for run_id in (*self.run_ids.values(), self.parent_run_id):
            self.client.set_terminated(run_id, status)
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id, "run_ids": dict(self.run_ids),
                "ui": ui_command(self.tracking_uri)}


def text_artifact(key: str, step: int | None) -> str:
    """The artifact path of a text: its name, or ``<name>/step_<step>.txt`` for a text with a step."""
    return key if step is None else f"{key}/step_{step}.txt"


def ui_command(tracking_uri: str) -> str:
    """How to look at the runs: the ``mlflow ui`` command line, or the server's address."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _last_per_key(items: list) -> list:
    """MLflow refuses a batch that sets one param or tag twice; keep the last value of each key."""
    return list({item.key: item for item in items}.values())
