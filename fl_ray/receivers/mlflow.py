"""MLflowReceiver: every site's records into MLflow, batched, one run per site under the job's run.

Run structure: a parent run per job (named after the job id; the resolved config as params; tags for
the job id, the fl_ray version and, when known, the git commit), with one nested run per site and one
named ``server``. Metrics, params and tags go in with ``MlflowClient.log_batch`` (which splits a
batch within MLflow's limits of 1000 metrics, 100 params and 100 tags a call); texts with
``log_text``; to a tracking server, the batches of different runs go out concurrently. Metric
timestamps are the client's, so writing the same batch twice adds nothing. Run ids are kept in
``<job>/mlflow_runs.json``, per tracking URI, so a restarted receiver (or a resumed job, or
``scripts/replay_spool.py``) writes into the same runs. A record MLflow refuses for good
(``INVALID_PARAMETER_VALUE``, e.g. a param whose value changed after a site restarted) is found by
splitting the batch, left out and reported, so it cannot hold up the records around it; any other
failure is raised and the whole batch is retried. At the end of a job, ``log_model`` logs the
best global model into the ``server`` run as an MLflow model (and registers it when asked).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from fl_ray.receivers.base import FINISHED, Receiver, ReceiverContext
from fl_ray.tracking.events import EventKind, TrackingEvent
from fl_ray.tracking.spool import read_json, write_json_atomic

log = logging.getLogger(__name__)

RUNS_FILE = "mlflow_runs.json"
SERVER_RUN = "server"
# MLflow error codes that mean "this record will never be accepted", as opposed to "try again later".
REFUSED = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST"})
MAX_REPORTED_REFUSALS = 20
HTTP_CONCURRENCY = 4  # log_batch requests in flight at once to a tracking server (one per run)


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


class MLflowReceiver(Receiver):
    """Writes tracking events to an MLflow tracking server or store."""

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None,
                 buffer_flush_time: float = 1.0) -> None:
        if buffer_flush_time < 0:
            raise ValueError(f"buffer_flush_time must be >= 0 seconds, got {buffer_flush_time}")
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.buffer_flush_time = buffer_flush_time
        self._pending: dict[str, tuple[list, list, list, list]] = {}
        self.refused: list[str] = []  # the first MAX_REPORTED_REFUSALS records MLflow refused, described
        self.refused_count = 0
        self._refused_seen: set[str] = set()
        self._refusal_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def open(self, ctx: ReceiverContext) -> None:
        from mlflow.tracking import MlflowClient

        self._ctx = ctx
        self.tracking_uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            default_tracking_uri(ctx.workspace)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.tracking_uri.startswith(("http://", "https://")) and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=HTTP_CONCURRENCY, thread_name_prefix="fl_ray-mlflow")
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
        saved = self._saved_runs()
        if saved is None:
            parent = self.client.create_run(self.experiment_id, run_name=ctx.job_id,
                                            tags={"fl_ray.job_id": ctx.job_id, **ctx.tags})
            self.parent_run_id, self.run_ids, self._complete = parent.info.run_id, {}, False
            self._save_runs()  # before anything else, so a retried open reuses this parent run
        else:
            self.parent_run_id, self.run_ids, self._complete = \
                saved["parent_run_id"], dict(saved["run_ids"]), saved.get("complete", True)
            for run_id in (self.parent_run_id, *self.run_ids.values()):
                self.client.update_run(run_id, status="RUNNING")
        if not self._complete:
            self._set_up_runs(ctx)

    @property
    def destination(self) -> str | None:
        """Where records go (the tracking URI, once opened): progress marks are kept per destination."""
        return self.tracking_uri

    def _saved_runs(self) -> dict[str, Any] | None:
        saved = read_json(self._runs_path, {})
        entry = saved.get(self.tracking_uri) if isinstance(saved, dict) else None
        if isinstance(entry, dict) and entry.get("experiment_id") == self.experiment_id:
            return entry
        return None

    def _save_runs(self) -> None:
        saved = read_json(self._runs_path, {})
        saved = saved if isinstance(saved, dict) else {}
        saved[self.tracking_uri] = {"experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id,
                                    "run_ids": self.run_ids, "complete": self._complete}
        write_json_atomic(self._runs_path, saved)

    def _set_up_runs(self, ctx: ReceiverContext) -> None:
        """The parent run's params and tags and a run per site; safe to repeat until it has completed once."""
        from mlflow.entities import Param, RunTag

        params = [Param(k, v) for k, v in flatten(ctx.config).items()]
        self.client.log_batch(self.parent_run_id, params=params)
        for site in (*ctx.sites, SERVER_RUN):
            self._site_run(site)
        self.client.log_batch(self.parent_run_id, tags=[RunTag("fl_ray.sites", ",".join(ctx.sites))])
        self._complete = True
        self._save_runs()

    def _site_run(self, site: str) -> str:
        run_id = self.run_ids.get(site)
        if run_id is None:
            tags = {"mlflow.parentRunId": self.parent_run_id, "fl_ray.site": site, "fl_ray.job_id": self._ctx.job_id}
            run_id = self.client.create_run(self.experiment_id, run_name=site, tags=tags).info.run_id
            self.run_ids[site] = run_id
            self._save_runs()
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
        runs = [(site, self._site_run(site), *lists) for site, lists in pending.items()]
        if self._pool is None or len(runs) < 2:
            for run in runs:
                self._flush_run(*run)
        else:  # a tracking server answers requests for different runs at once
            for future in [self._pool.submit(self._flush_run, *run) for run in runs]:
                future.result()

    def _flush_run(self, site: str, run_id: str, metrics: list, params: list, tags: list, texts: list) -> None:
        from mlflow.exceptions import MlflowException

        self._log_batch(site, run_id, metrics, _last_per_key(params), _last_per_key(tags))
        for text, artifact_file in texts:
            try:
                self.client.log_text(run_id, text, artifact_file)
            except (NotADirectoryError, IsADirectoryError, FileExistsError, MlflowException) as exc:
                # refused, or a file-store path clash ("notes" and "notes/a.txt"): it will never succeed
                if isinstance(exc, MlflowException) and exc.error_code not in REFUSED:
                    raise
                self._refuse(site, _Text(artifact_file, text), exc)

    def _log_batch(self, site: str, run_id: str, metrics: list, params: list, tags: list) -> None:
        """``log_batch``; if MLflow refuses the batch, split it until the refused records are isolated."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
            return
        except MlflowException as exc:
            if exc.error_code not in REFUSED:
                raise
            error = exc
        items = [*metrics, *params, *tags]
        if len(items) == 1:
            self._refuse(site, items[0], error)
            return
        from mlflow.entities import Metric, Param, RunTag

        for half in (items[: len(items) // 2], items[len(items) // 2:]):
            self._log_batch(site, run_id, [i for i in half if isinstance(i, Metric)],
                            [i for i in half if isinstance(i, Param)], [i for i in half if isinstance(i, RunTag)])

    def _refuse(self, site: str, item: Any, error: Exception) -> None:
        kind = type(item).__name__.lower().lstrip("_")
        what = f"{site}: {kind} {item.key!r} = {str(item.value)[:80]!r}" + \
            (f" at step {item.step}" if kind == "metric" else "")
        with self._refusal_lock:
            if what in self._refused_seen:  # the same batch again, after a failure elsewhere in it
                return
            self._refused_seen.add(what)
            self.refused_count += 1
            report = len(self.refused) < MAX_REPORTED_REFUSALS
        if report:
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            self.refused.append(f"{what}: {reason}")
            log.warning("MLflow refused a record, which is left out: %s (%s)", what, reason)

    def close(self, status: str = FINISHED) -> dict[str, Any]:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for run_id in (*self.run_ids.values(), self.parent_run_id):
            self.client.set_terminated(run_id, status)
        report = {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                  "parent_run_id": self.parent_run_id, "run_ids": dict(self.run_ids),
                  "ui": ui_command(self.tracking_uri)}
        if self.refused_count:
            report.update(refused=self.refused_count, refused_examples=list(self.refused))
        return report

    def log_model(self, site: str, checkpoint: str, registered_model_name: str | None = None) -> dict[str, Any]:
        """Log the model saved at ``checkpoint`` (a :class:`~fl_ray.checkpoint.BestModel`, ``best.pt``) into
        ``site``'s run with ``mlflow.pytorch.log_model`` and, given ``registered_model_name``, register it.

        MLflow 3 saves it in the ``pt2`` format (``torch.export``), traced with the checkpoint's input
        example, whose batch dimension stays free; the pip requirements are MLflow's defaults for the
        flavor (inferring them would load the model again in a subprocess). Called from the receiver
        actor's own thread, beside the delivery thread: it only reads the run ids set up by ``open``.
        """
        import mlflow
        import mlflow.pytorch

        from fl_ray.checkpoint import load_best

        best = load_best(checkpoint)
        if best is None:
            raise FileNotFoundError(f"no saved model at {checkpoint}")
        run_id = self.run_ids.get(site)
        if run_id is None:
            raise KeyError(f"no MLflow run for {site!r} in this job")
        mlflow.set_tracking_uri(self.tracking_uri)  # this process writes to MLflow only through receivers
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pytorch.log_model(
                best.model, name="model", input_example=best.input_example, step=best.round,
                registered_model_name=registered_model_name,
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                tags={"fl_ray.job_id": self._ctx.job_id, "fl_ray.round": str(best.round),
                      "fl_ray.key_metric": best.key_metric, "fl_ray.key_value": str(best.score)},
                metadata={"fl_ray": {"job_id": self._ctx.job_id, "round": best.round, "key_metric": best.key_metric,
                                     "key_mode": best.key_mode, "metrics": best.metrics}},
            )
        report = {"model_uri": info.model_uri, "model_id": info.model_id, "run_id": run_id}
        if registered_model_name:
            report.update(registered_model_name=registered_model_name,
                          registered_model_version=info.registered_model_version)
        return report


class _Text(NamedTuple):
    """A text artifact, described like a Metric, Param or RunTag when MLflow refuses it."""

    key: str
    value: str


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
