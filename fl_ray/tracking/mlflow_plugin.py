"""MLflow's own API on a site: a tracking store and an artifact repository for the ``fl-ray`` URI scheme.

Inside a site's work (a client actor's life, or one task of a pool worker)
:func:`~fl_ray.tracking.mlflow_scope.site_scope` makes ``fl-ray://<site>`` MLflow's tracking URI, so
``import mlflow`` and its fluent API, ``MlflowClient``, autologging and Lightning's ``MLFlowLogger``
write through :class:`SiteStore` and :class:`SiteArtifactRepository` into the site's
:class:`~fl_ray.tracking.writers.MLflowWriter`: the same records, sender, spool and exactly-once delivery
as ``ctx.mlflow``, with no network call and no credentials on the site. MLflow finds both classes through
the ``mlflow.tracking_store`` and ``mlflow.artifact_repository`` entry points (setup.cfg).

* ``start_run()`` gives the site's run of this job (the same run every round); a nested run
  (``start_run(nested=True)``) is a child run of its parent on the server, named ``<parent>/<run name>``
  in the records (its own stream). Ending a run changes nothing: the server ends the job's runs.
* Metrics, params and tags become METRIC, PARAM and TAG records at MLflow's step (0 when none is given)
  and timestamp; MLflow's context tags (``mlflow.*``) given when a run starts are left out.
* Files (``log_artifact(s)``, ``log_text``, ``log_dict``, ``log_figure``, ``log_table``, ``log_image``)
  become ARTIFACT records, and ``mlflow.<flavor>.log_model`` a MODEL record with the saved model's files.
* Anything that reads back (searching runs, metric histories, another site's runs, downloading
  artifacts) raises :class:`~mlflow.exceptions.MlflowException` saying why: the records are on the server.
"""

from __future__ import annotations


# MLflow loads the entry points while it is imported, which may be while this module imports MLflow: the
# entry points are these two builders, defined before any import of MLflow, so they are there either way.
def tracking_store(store_uri: str, artifact_uri: str | None = None) -> SiteStore:
    """The ``mlflow.tracking_store`` entry point of the ``fl-ray`` scheme."""
    return SiteStore(store_uri, artifact_uri)


def artifact_repository(
    artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None
) -> SiteArtifactRepository:
    """The ``mlflow.artifact_repository`` entry point of the ``fl-ray`` scheme."""
    return SiteArtifactRepository(artifact_uri, tracking_uri, registry_uri)


import hashlib  # noqa: E402
import os  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from mlflow.entities import (  # noqa: E402
    Experiment,
    LifecycleStage,
    LoggedModel,
    LoggedModelStatus,
    Run,
    RunData,
    RunInfo,
    RunStatus,
)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST  # noqa: E402
from mlflow.store.artifact.artifact_repo import ArtifactRepository  # noqa: E402
from mlflow.store.tracking.abstract_store import AbstractStore  # noqa: E402

from fl_ray.tracking.credentials import SITE_URI_SCHEME  # noqa: E402
from fl_ray.tracking.mlflow_scope import active_tracking, pin_mlflow, site_uri  # noqa: E402
from fl_ray.tracking.site import SiteTracking  # noqa: E402
from fl_ray.tracking.writers import MLflowWriter  # noqa: E402

EXPERIMENT_ID = "0"  # the one experiment a site sees: the server's experiment of the job
PARENT_TAG, NAME_TAG = "mlflow.parentRunId", "mlflow.runName"


def site_run_id(site: str) -> str:
    """The id the site's own run has on the site (the server's run id is the receiver's business)."""
    return hashlib.sha1(f"fl_ray\0{site}".encode()).hexdigest()[:32]


@dataclass
class _Run:
    """A run as the site knows it: its record stream, writer and MLflow entity."""

    stream: str  # the site, or ``<parent stream>/<name>`` for a child run
    writer: MLflowWriter
    info: RunInfo
    tracking: SiteTracking | None = None  # a child run's own stream, closed when the site's work ends


@dataclass
class _Scope:
    """One site's MLflow state in this process while its work runs."""

    tracking: SiteTracking
    runs: dict[str, _Run] = field(default_factory=dict)  # run id -> run
    models: dict[str, tuple[LoggedModel, int]] = field(default_factory=dict)  # model id -> model, step


_scopes: dict[str, _Scope] = {}


def end_site(site: str) -> None:
    """End the MLflow runs the site's code left open and close its child runs' streams: its work is over."""
    import mlflow

    try:
        while mlflow.active_run() is not None:
            mlflow.end_run()
    finally:
        scope = _scopes.pop(site, None)
        if scope is not None:
            for run in scope.runs.values():
                if run.tracking is not None:
                    run.tracking.close(scope.tracking.cfg.close_timeout)


def _site_of(uri: str) -> str:
    prefix = f"{SITE_URI_SCHEME}://"
    if not uri.startswith(prefix) or not uri[len(prefix) :]:
        raise MlflowException(f"{uri!r} is not an fl_ray site URI: expected {prefix}<site>", INVALID_PARAMETER_VALUE)
    return uri[len(prefix) :].split("/", 1)[0]


def _scope(site: str) -> _Scope:
    """The site's MLflow state in this process, begun the first time its code uses MLflow in its work."""
    tracking = active_tracking(site)
    scope = _scopes.get(site)
    if scope is not None and scope.tracking is tracking:
        return scope
    if tracking is None:
        raise MlflowException(
            f"{site_uri(site)} is the MLflow tracking URI of site {site!r} while fl_ray runs its work, and that "
            "work is not running in this process: set another tracking URI to log outside a site"
        )
    info = RunInfo(
        site_run_id(site),
        EXPERIMENT_ID,
        "",
        RunStatus.to_string(RunStatus.RUNNING),
        0,
        None,
        LifecycleStage.ACTIVE,
        f"{site_uri(site)}/runs/{site_run_id(site)}",
        site,
    )
    scope = _scopes[site] = _Scope(tracking)
    scope.runs[info.run_id] = _Run(site, tracking.mlflow, info)
    pin_mlflow(site)
    return scope


def _not_on_a_site(what: str) -> MlflowException:
    return MlflowException(
        f"{what} is not available on an fl_ray site: a site only writes to its own runs, whose records go to "
        "the server's tracking back end; read them there (e.g. with MlflowClient on the server's tracking URI)"
    )


class SiteStore(AbstractStore):
    """MLflow's tracking store on a site: writes into the site's writer, reads only what the site logged."""

    def __init__(self, store_uri: str, artifact_uri: str | None = None) -> None:
        super().__init__()
        self.site = _site_of(store_uri)

    def _run(self, run_id: str) -> _Run:
        run = _scope(self.site).runs.get(run_id)
        if run is None:
            raise MlflowException(
                f"run {run_id!r} is not a run of site {self.site!r} in this job: a site reads and writes only its "
                "own runs",
                RESOURCE_DOES_NOT_EXIST,
            )
        return run

    # -- experiments: the site sees the job's one experiment, whatever its name ------------------------
    def get_experiment(self, experiment_id: str) -> Experiment:
        return Experiment(EXPERIMENT_ID, "fl_ray job", site_uri(self.site), LifecycleStage.ACTIVE)

    def get_experiment_by_name(self, experiment_name: str) -> Experiment:
        return Experiment(EXPERIMENT_ID, experiment_name, site_uri(self.site), LifecycleStage.ACTIVE)

    def create_experiment(self, name: str, artifact_location: str | None = None, tags: Any = None) -> str:
        return EXPERIMENT_ID

    def set_experiment_tag(self, experiment_id: str, tag: Any) -> None:
        """Experiments belong to the server: a site's experiment tags are dropped."""

    # -- runs -------------------------------------------------------------------------------------------
    def create_run(self, experiment_id: str, user_id: str, start_time: int, tags: Any, run_name: str | None) -> Run:
        """The site's run; with a ``mlflow.parentRunId`` tag, a child run of that (one of the site's)."""
        scope = _scope(self.site)
        given = {t.key: t.value for t in tags or []}
        parent_id = given.get(PARENT_TAG)
        if parent_id is None:
            run = scope.runs[site_run_id(self.site)]
        else:
            parent = self._run(parent_id)
            name = run_name or given.get(NAME_TAG) or f"child-{len(scope.runs)}"
            stream = f"{parent.stream}/{name.replace('/', '_')}"
            run = next((r for r in scope.runs.values() if r.stream == stream), None) or self._child(scope, stream)
        user_tags = {k: v for k, v in given.items() if not k.startswith("mlflow.")}
        if user_tags:
            self._call(run.writer.set_tags, user_tags)
        return Run(run.info, RunData(tags=[]))

    def _child(self, scope: _Scope, stream: str) -> _Run:
        parent = scope.tracking
        tracking = SiteTracking(stream, parent.receiver, parent.cfg)
        run_id = uuid.uuid4().hex
        info = RunInfo(
            run_id,
            EXPERIMENT_ID,
            "",
            RunStatus.to_string(RunStatus.RUNNING),
            0,
            None,
            LifecycleStage.ACTIVE,
            f"{site_uri(self.site)}/runs/{run_id}",
            stream.rsplit("/", 1)[1],
        )
        run = scope.runs[run_id] = _Run(stream, tracking.mlflow, info, tracking)
        return run

    def get_run(self, run_id: str) -> Run:
        """The run with the params the site logged to it (metrics and tags are read on the server)."""
        from mlflow.entities import Param

        run = self._run(run_id)
        params = [Param(k, v) for k, v in run.writer.state.params.items()]
        return Run(run.info, RunData(params=params))

    def update_run_info(self, run_id: str, run_status: Any, end_time: int | None, run_name: str | None) -> RunInfo:
        """Nothing changes: the server ends the job's runs. Ending a child run delivers its records (its stream
        is closed with the site's work)."""
        run = self._run(run_id)
        if run.tracking is not None and RunStatus.is_terminated(run_status):  # MLflow passes the status as an int
            run.tracking.flush()
        return run.info

    def log_metric(self, run_id: str, metric: Any) -> None:
        self._call(self._run(run_id).writer.log_metric, metric.key, metric.value, metric.step, metric.timestamp)

    def log_batch(self, run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        writer = self._run(run_id).writer
        if params:
            self._call(writer.log_params, {p.key: p.value for p in params})
        if tags:
            self._call(writer.set_tags, {t.key: t.value for t in tags})
        for m in metrics or []:
            self._call(writer.log_metric, m.key, m.value, m.step, m.timestamp)

    @staticmethod
    def _call(method: Any, *args: Any, **kwargs: Any) -> None:
        """A writer call; its TypeError/ValueError (a bad name, a param that changed) as MLflow's own error."""
        try:
            method(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None

    def log_inputs(self, run_id: str, datasets: Any = None, models: Any = None) -> None:
        """Dataset lineage stays on the site (the server's run does not get it)."""
        self._run(run_id)

    def log_outputs(self, run_id: str, models: Any) -> None:
        """Notes the step each model is logged at (sent with the model's files)."""
        scope = _scope(self.site)
        for output in models:
            if output.model_id in scope.models:
                scope.models[output.model_id] = (scope.models[output.model_id][0], output.step)

    def record_logged_model(self, run_id: str, mlflow_model: Any) -> None:
        """MLflow 2's model history tag: the server's logged model replaces it."""

    # -- logged models: made here, sent (with their files) when MLflow uploads the files -----------------
    def create_logged_model(
        self,
        experiment_id: str = EXPERIMENT_ID,
        name: str | None = None,
        source_run_id: str | None = None,
        tags: Any = None,
        params: Any = None,
        model_type: str | None = None,
    ) -> LoggedModel:
        scope = _scope(self.site)
        if source_run_id is None:
            raise _not_on_a_site("logging a model outside a run")
        self._run(source_run_id)
        model_id = f"m-{uuid.uuid4().hex}"
        model = LoggedModel(
            experiment_id=EXPERIMENT_ID,
            model_id=model_id,
            name=name or "model",
            artifact_location=f"{site_uri(self.site)}/models/{model_id}",
            creation_timestamp=0,
            last_updated_timestamp=0,
            model_type=model_type,
            source_run_id=source_run_id,
            status=LoggedModelStatus.PENDING,
            tags={t.key: t.value for t in tags or []},
            params={p.key: p.value for p in params or []},
        )
        scope.models[model_id] = (model, 0)
        return model

    def get_logged_model(self, model_id: str, allow_deleted: bool = False) -> LoggedModel:
        found = _scope(self.site).models.get(model_id)
        if found is None:
            raise MlflowException(f"model {model_id!r} was not logged by site {self.site!r}", RESOURCE_DOES_NOT_EXIST)
        return found[0]

    def finalize_logged_model(self, model_id: str, status: Any) -> LoggedModel:
        model = self.get_logged_model(model_id)
        model.status = status
        return model

    def set_logged_model_tags(self, model_id: str, tags: Any) -> None:
        self.get_logged_model(model_id).tags.update({t.key: t.value for t in tags})

    def delete_logged_model_tag(self, model_id: str, key: str) -> None:
        self.get_logged_model(model_id).tags.pop(key, None)

    def log_logged_model_params(self, model_id: str, params: Any) -> None:
        self.get_logged_model(model_id).params.update({p.key: p.value for p in params})

    def upload_model(self, model_id: str, local_dir: str) -> None:
        """Send the saved model in ``local_dir`` as a MODEL record of its source run."""
        model, step = _scope(self.site).models[model_id]
        writer = self._run(model.source_run_id or "").writer
        self._call(writer.log_model_dir, local_dir, model.name, step=step, params=model.params, tags=model.tags)

    # -- what a site cannot do: each refuses with the reason -------------------------------------------
    def search_experiments(self, *args: Any, **kwargs: Any) -> Any:
        raise _not_on_a_site("searching experiments")

    def delete_experiment(self, experiment_id: str) -> None:
        raise _not_on_a_site("deleting an experiment")

    def restore_experiment(self, experiment_id: str) -> None:
        raise _not_on_a_site("restoring an experiment")

    def rename_experiment(self, experiment_id: str, new_name: str) -> None:
        raise _not_on_a_site("renaming an experiment")

    def delete_run(self, run_id: str) -> None:
        raise _not_on_a_site("deleting a run")

    def restore_run(self, run_id: str) -> None:
        raise _not_on_a_site("restoring a run")

    def get_metric_history(self, *args: Any, **kwargs: Any) -> Any:
        raise _not_on_a_site("reading a metric's history")

    def _search_runs(self, *args: Any, **kwargs: Any) -> Any:
        raise _not_on_a_site("searching runs")

    def link_traces_to_run(self, trace_ids: list[str], run_id: str) -> None:
        raise _not_on_a_site("linking traces")


# The rest of MLflow's store API (traces, datasets, prompts, ...): MLflow's base class would do nothing
# silently; on a site each raises saying why.
_KEPT = {
    "log_param",
    "set_tag",
    "log_metric_async",
    "log_param_async",
    "set_tag_async",
    "log_batch_async",
    "end_async_logging",
    "flush_async_logging",
    "shut_down_async_logging",
}


def _refuse(name: str) -> Any:
    def method(self: SiteStore, *args: Any, **kwargs: Any) -> Any:
        raise _not_on_a_site(f"MLflow's {name}")

    method.__name__ = name
    return method


for _name, _member in vars(AbstractStore).items():
    if callable(_member) and not _name.startswith("_") and _name not in _KEPT and _name not in vars(SiteStore):
        setattr(SiteStore, _name, _refuse(_name))


class SiteArtifactRepository(ArtifactRepository):
    """MLflow's artifact repository on a site: files go, in chunks, to the job's spool; nothing is read back.

    ``fl-ray://<site>/runs/<run id>`` holds a run's artifacts, ``fl-ray://<site>/models/<model id>`` a
    logged model's files (uploaded whole, as MLflow does, then sent as one MODEL record).
    """

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
        super().__init__(artifact_uri, tracking_uri, registry_uri)
        self.site = _site_of(artifact_uri)
        parts = artifact_uri[len(site_uri(self.site)) :].strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ("runs", "models"):
            raise MlflowException(
                f"{artifact_uri!r} is not an fl_ray artifact location: expected {site_uri(self.site)}/runs/<run id> "
                "or /models/<model id>",
                INVALID_PARAMETER_VALUE,
            )
        self.kind, self.id = parts
        self.store = SiteStore(site_uri(self.site))

    def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None:
        if self.kind == "models":
            raise _not_on_a_site("adding a file to a logged model")
        SiteStore._call(self.store._run(self.id).writer.log_artifact, local_file, artifact_path)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        if self.kind == "models":
            self.store.upload_model(self.id, os.path.join(local_dir, artifact_path or ""))
        else:
            SiteStore._call(self.store._run(self.id).writer.log_artifacts, local_dir, artifact_path)

    def list_artifacts(self, path: str | None = None) -> list[Any]:
        """None: a site keeps no files once sent (``log_table`` asks, to append to an existing table)."""
        return []

    def _download_file(self, remote_file_path: str, local_path: str) -> None:
        raise _not_on_a_site("downloading artifacts")

    def delete_artifacts(self, artifact_path: str | None = None) -> None:
        raise _not_on_a_site("deleting artifacts")
