"""MLflowReceiver: every site's records into MLflow, batched, one run per site under the job's run.

Run structure: a parent run per job (named after the job id; the resolved config as params; tags for
the job id, the fl_ray version and, when known, the git commit), made when the receiver opens, with one
nested run per site and one named ``server``, each made the first time records of that site are
delivered (the runs of all sites new in a delivery together). A new sqlite store is made from a
template (:mod:`fl_ray.mlflow_store`). Run ids are kept in ``<job>/mlflow_runs.json``, per tracking URI, so a restarted
receiver (or a resumed job, or ``scripts/replay_spool.py``) writes into the same runs. Creating a run
is idempotent beyond that file too: the run is first looked up by its tags (``fl_ray.job_id``, and
``fl_ray.site`` for a site's run), and after creating one the receiver looks again and keeps the
earliest, so a create whose answer was lost (and was sent again by MLflow's HTTP client, or by a
retried ``open``) leaves no second run: empty extras are ended and deleted.

Metrics, params and tags go in with ``MlflowClient.log_batch``, in requests within MLflow's limits
(1000 metrics, 100 params and 100 tags a request); texts with ``log_text``, files with ``log_artifact``
(read from the job's spool by content hash) and models as MLflow logged models of the site's run (made
once per record: a retried delivery finds the model by its ``fl_ray.record`` tag); to a tracking server, the
requests of different runs go out concurrently. Metric timestamps are the client's, so writing the
same batch twice adds nothing; a param keeps its first value, as in MLflow.

Every record remembers its event, so a failure can be pinned on the record that causes it: a request
that MLflow answers with an error is split until the failing records are alone (at most
:data:`MAX_SPLITS` splits a delivery). A record MLflow refuses (a 4xx other than a timeout or rate
limit: a bad name, a param whose value changed; in a local store, a text path that clashes with
another) is set aside at once; one that fails with the same 5xx in :data:`MAX_SERVER_ERRORS`
deliveries in a row (a text at ``notes/a.txt`` after one at ``notes``) is set aside then, and sent
alone in between, while ``flush`` raises so the batch is written again. Both only while MLflow takes
other writes (a write of the same delivery succeeded, or a probe write does): when no write succeeds,
or MLflow does not answer at all, that is an outage, nothing is set aside and ``flush`` raises.
Records set aside go to :meth:`~fl_ray.receivers.base.Receiver.set_aside` and are left out while the
same batch is written again after a failed ``flush``. At the end of a job, ``log_model`` logs the best
global model into the ``server`` run as an MLflow model (and registers it when asked).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence, Union

from fl_ray.mlflow_store import prepare_sqlite_store, sqlite_path
from fl_ray.receivers.base import FINISHED, KILLED, Receiver, ReceiverContext
from fl_ray.tracking.events import MAX_PARAM_VALUE_LENGTH, EventKind, TrackingEvent, flatten
from fl_ray.tracking.spool import SPOOL_DIR, blob_path, read_json, write_json_atomic

if TYPE_CHECKING:
    from mlflow.entities import Metric, Param, Run, RunTag

    from fl_ray.checkpoint import BestModel

log = logging.getLogger(__name__)

RUNS_FILE = "mlflow_runs.json"
SERVER_RUN = "server"
JOB_TAG, SITE_TAG, PARENT_TAG = "fl_ray.job_id", "fl_ray.site", "mlflow.parentRunId"
HTTP_CONCURRENCY = 4  # log_batch requests in flight at once to a tracking server (one per run)
MAX_SERVER_ERRORS = 3  # deliveries in a row a record may fail with the same 5xx before it is set aside
MAX_SPLITS = 32  # splits of failing requests per delivery, to find the records that fail
# Answers that say "later", not "never": a request timeout and a rate limit.
TRANSIENT_STATUSES = frozenset({408, 429})
# Local artifact stores: a text path that clashes with another ("notes" and "notes/a.txt").
PATH_CLASHES = (NotADirectoryError, IsADirectoryError, FileExistsError)


# MLflow's HTTP client retries for minutes by default; the pumps retry on their own, without blocking.
# And a receiver has no one to show MLflow's "View run at" links to. Set where not set already.
PROCESS_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


def sites_tag(sites: Sequence[str]) -> str:
    """The parent run's ``fl_ray.sites`` tag: the sites, comma-separated, within MLflow's tag length (8,000
    characters); a list too long ends with ``,... (<n> sites)`` after the names that fit."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    whole = ",".join(sites)
    if len(whole) <= MAX_TAG_VAL_LENGTH:
        return whole
    end = f",... ({len(sites)} sites)"
    return whole[: MAX_TAG_VAL_LENGTH - len(end) + 1].rpartition(",")[0] + end


def default_tracking_uri(workspace: Path) -> str:
    """``sqlite:///<workspace>/mlflow.db``: one store for every job of a workspace, so runs compare."""
    return f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


class _Text(NamedTuple):
    """A text artifact to log."""

    path: str
    text: str


class _File(NamedTuple):
    """A file artifact to log: its path in the run and its content hash (the blob in the job's spool)."""

    path: str
    sha: str


class _Model(NamedTuple):
    """A model to log: its name and manifest (files by content hash, step, params, tags)."""

    name: str
    manifest: dict[str, Any]


class _Record(NamedTuple):
    """What goes to MLflow for one event, with the event it came from."""

    event: TrackingEvent
    entity: Union[Metric, Param, RunTag, _Text, _File, _Model]


@dataclass
class _Batch:
    """One site's records waiting for ``flush``."""

    metrics: list[_Record] = field(default_factory=list)
    params: dict[str, _Record] = field(default_factory=dict)  # the first value of each key
    tags: dict[str, _Record] = field(default_factory=dict)  # the last value of each key
    singles: list[_Record] = field(default_factory=list)  # texts, files and models: one request each


class _Failure(NamedTuple):
    """A request MLflow answered with an error: its records, the HTTP status and what MLflow said."""

    records: list[_Record]
    status: int
    error: str


class _Delivery:
    """What one ``flush`` learned, from the threads that send each run's records."""

    def __init__(self, probe_write: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._probe_write = probe_write
        self._takes_writes: bool | None = None
        self._splits = MAX_SPLITS
        self.failures: list[_Failure] = []
        self.unanswered: list[Exception] = []  # no answer, a timeout, a rate limit: an outage for now
        self.delivered: list[_Record] = []  # records sent alone that got through

    def succeeded(self, records: list[_Record]) -> None:
        with self._lock:
            self._takes_writes = True
            if len(records) == 1:
                self.delivered.append(records[0])

    def takes_writes(self) -> bool:
        """True once a write of this delivery succeeded; else tries one probe write (once a delivery)."""
        with self._lock:
            if self._takes_writes is None:
                try:
                    self._probe_write()
                    self._takes_writes = True
                except Exception as exc:  # noqa: BLE001 - whatever it is, MLflow does not take writes now
                    log.debug("MLflow probe write failed: %s", exc)
                    self._takes_writes = False
            return self._takes_writes

    def may_split(self) -> bool:
        """Whether a failing request may be split further (splits are left)."""
        with self._lock:
            self._splits -= 1
            return self._splits >= 0


class MLflowReceiver(Receiver):
    """Writes tracking events to an MLflow tracking server or store."""

    destination_param = "tracking_uri"
    logs_models = True
    logs_tables = True
    logs_artifacts = True

    @classmethod
    def prepare_process(cls) -> None:
        """MLflow's HTTP settings for a receiver (:data:`PROCESS_ENV_DEFAULTS`), and no log line per HTTP retry:
        a pump says once that its receiver fails."""
        for key, value in PROCESS_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

    def __init__(
        self, tracking_uri: str | None = None, experiment_name: str | None = None, buffer_flush_time: float = 1.0
    ) -> None:
        if buffer_flush_time < 0:
            raise ValueError(f"buffer_flush_time must be >= 0 seconds, got {buffer_flush_time}")
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.buffer_flush_time = buffer_flush_time
        self._pending: dict[str, _Batch] = {}
        self._strikes: dict[tuple[str, int], tuple[int, int]] = {}  # (site, seq): (5xx status, deliveries in a row)
        self._given_up: set[tuple[str, int]] = set()  # (site, seq) set aside since the last flush that returned
        self._pool: ThreadPoolExecutor | None = None
        self._runs_lock = threading.Lock()

    def open(self, ctx: ReceiverContext) -> None:
        from mlflow.tracking import MlflowClient

        self._ctx = ctx
        self.tracking_uri = (
            self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(ctx.workspace)
        )
        store = sqlite_path(self.tracking_uri)
        if store is not None:
            prepare_sqlite_store(store, Path(ctx.workspace) / "mlartifacts")
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
            self.parent_run_id, self.run_ids, self._complete = "", {}, False
            self.parent_run_id = self._find_or_create_runs([None])[None]
            self._save_runs()  # before anything else, so a retried open reuses this parent run
        else:
            self.parent_run_id, self.run_ids, self._complete = (
                saved["parent_run_id"],
                dict(saved["run_ids"]),
                saved.get("complete", True),
            )
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
        saved[self.tracking_uri] = {
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "run_ids": self.run_ids,
            "complete": self._complete,
        }
        write_json_atomic(self._runs_path, saved)

    def _set_up_runs(self, ctx: ReceiverContext) -> None:
        """The parent run's params and tags; safe to repeat until it has completed once."""
        from mlflow.entities import Param, RunTag

        params = [Param(k, str(v)[:MAX_PARAM_VALUE_LENGTH]) for k, v in flatten(ctx.config, ".").items()]
        self.client.log_batch(self.parent_run_id, params=params, tags=[RunTag("fl_ray.sites", sites_tag(ctx.sites))])
        self._complete = True
        self._save_runs()

    def _site_runs(self, sites: Sequence[str]) -> None:
        """Make sure each site in ``sites`` has its run in ``run_ids`` (and in mlflow_runs.json): the runs
        missing are looked up and made together."""
        with self._runs_lock:  # the delivery thread and log_model's
            wanted = {"/".join(parts[:i]) for parts in (s.split("/") for s in sites) for i in range(1, len(parts) + 1)}
            missing = [site for site in wanted if site not in self.run_ids]
            for depth in sorted({m.count("/") for m in missing}):  # a child run's parent first
                self.run_ids.update(self._find_or_create_runs([m for m in missing if m.count("/") == depth]))
                self._save_runs()

    def _find_or_create_runs(self, roles: Sequence[str | None]) -> dict[str | None, str]:
        """The run id of each role (a site, or None for the job's parent run): the job's existing run for it,
        else a new one. Of several runs for a role (a create sent twice), the earliest is kept."""
        found = self._job_runs()
        created = [self._create_run(role) for role in roles if role not in found]
        if created:
            found = self._job_runs()
            for role, run in created:  # in case a store's search does not show it yet
                if all(r.info.run_id != run.info.run_id for r in found.get(role, [])):
                    found.setdefault(role, []).append(run)
        return {role: self._keep_earliest(role, found[role]) for role in roles}

    def _job_runs(self) -> dict[str | None, list[Run]]:
        """This job's active runs in the experiment, by role (None: the parent run); a site's runs only
        under this job's parent run, once it is known."""
        from mlflow.entities import ViewType

        query = f"tags.`{JOB_TAG}` = {_quoted(self._ctx.job_id)}"
        runs: dict[str | None, list[Run]] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], query, ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
            )
            for run in page:
                site = run.data.tags.get(SITE_TAG)
                if site is None or run.data.tags.get(PARENT_TAG) in (self.parent_run_id, *self.run_ids.values()):
                    runs.setdefault(site, []).append(run)
            token = page.token
            if not token:
                return runs

    def _create_run(self, role: str | None) -> tuple[str | None, Run]:
        if role is None:
            run = self.client.create_run(
                self.experiment_id, run_name=self._ctx.job_id, tags={JOB_TAG: self._ctx.job_id, **self._ctx.tags}
            )
        else:  # a site's run, or a child run a site started (``<site>/<name>``) under its parent's
            parent, _, name = role.rpartition("/")
            tags = {PARENT_TAG: self.run_ids[parent] if parent else self.parent_run_id, SITE_TAG: role}
            run = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, JOB_TAG: self._ctx.job_id})
        return role, run

    def _keep_earliest(self, role: str | None, runs: list[Run]) -> str:
        """The earliest of ``runs`` (by start time, then id); the others, when empty, are ended and deleted."""
        keep, *extras = sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))
        for extra in extras:
            if extra.data.metrics or extra.data.params:
                log.warning(
                    "MLflow run %s is a second run for %s of job %s but holds data; it is left as it is",
                    extra.info.run_id,
                    role or "the parent run",
                    self._ctx.job_id,
                )
                continue
            self.client.set_terminated(extra.info.run_id, KILLED)
            self.client.delete_run(extra.info.run_id)
        return keep.info.run_id

    def write(self, events: Sequence[TrackingEvent]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        given_up = self._given_up
        for e in events:
            if given_up and (e.site, e.seq) in given_up:
                continue
            batch = self._pending.get(e.site) or self._pending.setdefault(e.site, _Batch())
            if e.kind == EventKind.METRIC:
                batch.metrics.append(_Record(e, Metric(e.key, e.value, e.timestamp, e.step or 0)))
            elif e.kind == EventKind.PARAM:
                first = batch.params.setdefault(e.key, _Record(e, Param(e.key, e.value)))
                if first.entity.value != e.value:  # type: ignore[union-attr]
                    self._give_up(
                        e,
                        f"param {e.key!r} was logged as {first.entity.value!r:.80} earlier in the "  # type: ignore[union-attr]
                        "same batch: MLflow keeps a param's first value",
                    )
            elif e.kind == EventKind.TAG:
                batch.tags[e.key] = _Record(e, RunTag(e.key, e.value))
            elif e.kind == EventKind.ARTIFACT:
                batch.singles.append(_Record(e, _File(e.key, e.value)))
            elif e.kind == EventKind.MODEL:
                batch.singles.append(_Record(e, _Model(e.key, json.loads(e.value))))
            else:
                batch.singles.append(_Record(e, _Text(text_artifact(e.key, e.step), e.value)))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        if pending:
            try:
                self._site_runs(list(pending))
            except Exception as exc:  # the batch is written again and flushed after a back-off
                first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
                raise DeliveryError(
                    f"MLflow at {self.tracking_uri} takes no writes now: the runs of "
                    f"{sorted(s for s in pending if s not in self.run_ids)} could not be made "
                    f"({type(exc).__name__}: {first})"
                ) from exc
            delivery = _Delivery(self._probe_write)
            runs = [(delivery, self.run_ids[site], batch) for site, batch in pending.items()]
            if self._pool is None or len(runs) < 2:
                for run in runs:
                    self._send_run(*run)
            else:  # a tracking server answers requests for different runs at once
                for future in [self._pool.submit(self._send_run, *run) for run in runs]:
                    future.result()
            self._settle(delivery)
        self._given_up.clear()  # the batch is through: a record set aside is sent again only if written again

    def _probe_write(self) -> None:
        """A write MLflow takes whenever it takes writes: the parent run's ``fl_ray.sites`` tag, again."""
        self.client.set_tag(self.parent_run_id, "fl_ray.sites", sites_tag(self._ctx.sites))

    def _send_run(self, delivery: _Delivery, run_id: str, batch: _Batch) -> None:
        """Send one run's records: batched within MLflow's limits, texts and records under suspicion alone;
        stop at the first request MLflow does not answer."""
        from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

        def suspect(record: _Record) -> bool:
            return (record.event.site, record.event.seq) in self._strikes

        metrics, params, tags = batch.metrics, list(batch.params.values()), list(batch.tags.values())
        alone = [[r] for r in (*metrics, *params, *tags) if suspect(r)] if self._strikes else []
        if alone:
            metrics, params, tags = ([r for r in rs if not suspect(r)] for rs in (metrics, params, tags))
        requests: list[list[_Record]] = []
        while metrics or params or tags:
            p, params = params[:MAX_PARAMS_TAGS_PER_BATCH], params[MAX_PARAMS_TAGS_PER_BATCH:]
            t, tags = tags[:MAX_PARAMS_TAGS_PER_BATCH], tags[MAX_PARAMS_TAGS_PER_BATCH:]
            room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(p) - len(t))
            m, metrics = metrics[:room], metrics[room:]
            requests.append([*m, *p, *t])
        requests += alone
        requests += ([r] for r in batch.singles)
        for records in requests:
            if not self._send(delivery, run_id, records):
                return

    def _send(self, delivery: _Delivery, run_id: str, records: list[_Record]) -> bool:
        """Send ``records`` in one request; if MLflow answers with an error while it takes other writes,
        split them until the failing records are alone. False when the run's other requests should wait:
        MLflow did not answer, or it takes no writes."""
        try:
            entity = records[0].entity
            if isinstance(entity, _Text):
                self.client.log_text(run_id, entity.text, entity.path)
            elif isinstance(entity, _File):
                self._log_file(run_id, entity)
            elif isinstance(entity, _Model):
                self._log_site_model(run_id, records[0].event, entity)
            else:
                from mlflow.entities import Metric, Param, RunTag

                self.client.log_batch(
                    run_id,
                    metrics=[r.entity for r in records if type(r.entity) is Metric],
                    params=[r.entity for r in records if type(r.entity) is Param],
                    tags=[r.entity for r in records if type(r.entity) is RunTag],
                )
        except Exception as exc:
            answer = _answer(exc)
            if answer is None:
                delivery.unanswered.append(exc)
                return False
            takes_writes = delivery.takes_writes()
            if takes_writes and len(records) > 1 and delivery.may_split():
                half = len(records) // 2
                return self._send(delivery, run_id, records[:half]) and self._send(delivery, run_id, records[half:])
            delivery.failures.append(_Failure(records, *answer))
            return takes_writes  # when MLflow takes no writes, the run's other requests wait too
        delivery.succeeded(records)
        return True

    def _blob(self, sha: str) -> Path:
        path = blob_path(Path(self._ctx.job_dir) / SPOOL_DIR, sha)
        if not path.is_file():
            raise MissingFileError(f"file {sha} is not in the job's spool ({path})")
        return path

    def _log_file(self, run_id: str, file: _File) -> None:
        """Log a site's file (its blob, under its own name) as the artifact ``file.path`` of ``run_id``."""
        folder, name = posixpath.split(file.path)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            shutil.copyfile(self._blob(file.sha), local)
            self.client.log_artifact(run_id, str(local), folder or None)

    def _log_site_model(self, run_id: str, event: TrackingEvent, model: _Model) -> None:
        """Log a site's saved model as an MLflow logged model of ``run_id``, once: a model already tagged with
        this record (a retried delivery) is only completed."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        record = f"{event.site}/{event.seq}"
        found = self.client.search_logged_models(
            experiment_ids=[self.experiment_id], filter_string=f"tags.`fl_ray.record` = '{record}'"
        )
        if found and found[0].status == LoggedModelStatus.READY:
            return
        manifest = model.manifest
        logged = (
            found[0]
            if found
            else self.client.create_logged_model(
                self.experiment_id,
                name=model.name,
                source_run_id=run_id,
                tags={**manifest["tags"], "fl_ray.record": record, SITE_TAG: event.site},
                params=manifest["params"] or None,
            )
        )
        with tempfile.TemporaryDirectory() as tmp:
            for rel, sha in manifest["files"].items():
                local = Path(tmp, rel)
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self._blob(sha), local)
            saved = Model.load(str(Path(tmp) / "MLmodel"))  # the site's ids in it become the server's
            saved.run_id, saved.model_id, saved.artifact_path = run_id, logged.model_id, logged.artifact_location
            saved.model_uuid = logged.model_id
            saved.save(str(Path(tmp) / "MLmodel"))
            self.client.log_model_artifacts(logged.model_id, tmp)
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=manifest["step"])])

    def _settle(self, delivery: _Delivery) -> None:
        """Set aside the records refused for good, count the 5xx strikes, and raise if anything is to be retried."""
        for record in delivery.delivered:
            self._strikes.pop((record.event.site, record.event.seq), None)
        if delivery.unanswered:
            raise delivery.unanswered[0]
        if not delivery.failures:
            return
        if not delivery.takes_writes():
            first = delivery.failures[0]
            raise DeliveryError(
                f"MLflow at {self.tracking_uri} takes no writes now: every request failed, e.g. "
                f"{_describe(first.records[0].event)} with {first.error}"
            )
        retry: list[_Failure] = []
        for failure in delivery.failures:
            if len(failure.records) > 1:  # no splits left: try again next time
                retry.append(failure)
                continue
            event = failure.records[0].event
            if failure.status < 500:
                self._give_up(event, f"MLflow refused it: {failure.error}")
                continue
            status, times = self._strikes.get((event.site, event.seq), (failure.status, 0))
            times = times + 1 if status == failure.status else 1
            if times >= MAX_SERVER_ERRORS:
                self._strikes.pop((event.site, event.seq), None)
                self._give_up(event, f"MLflow failed on it {times} times in a row: {failure.error}")
            else:
                self._strikes[(event.site, event.seq)] = (failure.status, times)
                retry.append(failure)
        if retry:
            first = retry[0]
            raise DeliveryError(
                f"{sum(len(f.records) for f in retry)} record(s) failed in MLflow at "
                f"{self.tracking_uri} and are sent again, e.g. {_describe(first.records[0].event)}: "
                f"{first.error}"
            )

    def _give_up(self, event: TrackingEvent, reason: str) -> None:
        self._given_up.add((event.site, event.seq))
        self.set_aside(event, reason)

    def close(self, status: str = FINISHED) -> dict[str, Any]:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for run_id in (*self.run_ids.values(), self.parent_run_id):
            self.client.set_terminated(run_id, status)
        return {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "run_ids": dict(self.run_ids),
            "ui": ui_command(str(self.tracking_uri)),
            "view": f"experiment {self.experiment_id}, run {self.parent_run_id}; view with: "
            f"{ui_command(str(self.tracking_uri))}",
        }

    def log_table(self, artifact_file: str, table: dict[str, list]) -> dict[str, Any]:
        """Log ``table`` (columns) as an MLflow table artifact of the job's parent run."""
        self.client.log_table(self.parent_run_id, data=table, artifact_file=artifact_file)
        return {"run_id": self.parent_run_id, "artifact_file": artifact_file}

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> dict[str, Any]:
        """Log the file ``local_path`` as an artifact of the job's parent run."""
        self.client.log_artifact(self.parent_run_id, local_path, artifact_path)
        name = Path(local_path).name
        return {"run_id": self.parent_run_id, "artifact_file": f"{artifact_path}/{name}" if artifact_path else name}

    def log_model(self, site: str, model: BestModel, registered_model_name: str | None = None) -> dict[str, Any]:
        """Log the best global ``model`` into ``site``'s run with ``mlflow.pytorch.log_model`` and, given
        ``registered_model_name``, register it.

        MLflow 3 saves it in the ``pt2`` format (``torch.export``), traced with the model's input
        example, whose batch dimension stays free; the pip requirements are MLflow's defaults for the
        flavor (inferring them would load the model again in a subprocess). Called from the receiver
        actor's own thread, beside the delivery thread: it only reads the run ids set up by ``open``.
        """
        import mlflow

        pytorch_flavor = import_pytorch_flavor()
        if site not in self._ctx.sites and site != SERVER_RUN:
            raise KeyError(f"no MLflow run for {site!r} in this job")
        self._site_runs([site])
        run_id = self.run_ids[site]
        mlflow.set_tracking_uri(str(self.tracking_uri))  # this process writes to MLflow only through receivers
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = pytorch_flavor.log_model(
                model.model,
                name="model",
                input_example=model.input_example.copy(),  # writable: Ray hands arrays over read-only
                step=model.round,
                registered_model_name=registered_model_name,
                pip_requirements=pytorch_flavor.get_default_pip_requirements(),
                tags={
                    "fl_ray.job_id": self._ctx.job_id,
                    "fl_ray.round": str(model.round),
                    "fl_ray.key_metric": model.key_metric,
                    "fl_ray.key_value": str(model.score),
                },
                metadata={
                    "fl_ray": {
                        "job_id": self._ctx.job_id,
                        "round": model.round,
                        "key_metric": model.key_metric,
                        "key_mode": model.key_mode,
                        "metrics": model.metrics,
                    }
                },
            )
        report = {"model_uri": info.model_uri, "model_id": info.model_id, "run_id": run_id}
        if registered_model_name:
            report.update(
                registered_model_name=registered_model_name,
                registered_model_version=str(info.registered_model_version),  # an int from a sqlite store
            )
        return report


def import_pytorch_flavor() -> ModuleType:
    """``mlflow.pytorch`` for the receiver actor, imported without the Lightning part of its autologging.

    Where pytorch-lightning is installed (the ``lightning`` extra brings it), ``import mlflow.pytorch`` imports
    it too, with torchmetrics and torchvision's models, for a checkpoint callback that only autologging uses:
    seconds of CPU, at the end of a job, that logging a model never needs. MLflow skips that part when
    pytorch-lightning cannot be imported; here, for the length of the import, it cannot. Only the receiver
    actor imports it this way: its process runs no training code that could want the callback.
    """
    if "mlflow.pytorch" not in sys.modules and "pytorch_lightning" not in sys.modules:
        sys.modules["pytorch_lightning"] = None  # type: ignore[assignment]  # None: ``import`` raises ImportError
        try:
            import mlflow.pytorch
        finally:
            del sys.modules["pytorch_lightning"]
    import mlflow.pytorch

    return mlflow.pytorch


class MissingFileError(FileNotFoundError):
    """A record names a file that is not in the job's spool: MLflow cannot log it, ever."""


class DeliveryError(RuntimeError):
    """Records MLflow did not take in this delivery; the batch is to be written and flushed again."""


def _answer(exc: Exception) -> tuple[int, str] | None:
    """What MLflow answered to a failed write: the HTTP status (as MLflow maps its error code; 400 for a
    local path clash) and the error, or None when it gave no usable answer (no connection, a timeout, a
    rate limit: try again later)."""
    import requests
    from mlflow.exceptions import MlflowException

    message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (*PATH_CLASHES, MissingFileError)):
        return 400, f"{type(exc).__name__}: {message}"
    status = None
    cause: BaseException | None = exc
    while cause is not None and status is None:
        if isinstance(cause, requests.exceptions.RetryError):  # the same 5xx until MLflow's client gave up
            found = re.search(r"too many (\d{3}) error responses", str(cause))
            if found is None:
                return None
            status = int(found[1])
        elif isinstance(cause, requests.exceptions.HTTPError) and cause.response is not None:
            status = cause.response.status_code
        elif isinstance(cause, requests.exceptions.RequestException):  # refused, dropped, timed out
            return None
        cause = cause.__cause__ or cause.__context__
    if status is not None:
        error = f"HTTP {status}: {message}"
    elif isinstance(exc, MlflowException):  # MLflow's error code (from a server's answer, or a local store)
        status = exc.get_http_status_code()
        error = message if message.startswith(exc.error_code) else f"{exc.error_code}: {message}"
    else:
        return None
    if status in TRANSIENT_STATUSES or not 400 <= status < 600:
        return None
    return status, error


def _describe(event: TrackingEvent) -> str:
    """A record, for messages: ``site-1 metric 'loss' at step 3 (seq 17)``."""
    step = f" at step {event.step}" if event.step is not None else ""
    return f"{event.site} {EventKind(event.kind).value} {event.key!r}{step} (seq {event.seq})"


def _quoted(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search MLflow for {value!r}: it holds both kinds of quotes")


def text_artifact(key: str, step: int | None) -> str:
    """The artifact path of a text: its name, or ``<name>/step_<step>.txt`` for a text with a step."""
    return key if step is None else f"{key}/step_{step}.txt"


def ui_command(tracking_uri: str) -> str:
    """How to look at the runs: the ``mlflow ui`` command line (its executable by full path), or the
    server's address."""
    from fl_ray.viewers import mlflow_ui_command, shell_line

    command = mlflow_ui_command(tracking_uri)
    return shell_line(command) if command else f"open {tracking_uri}"
