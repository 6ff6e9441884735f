"""Writers: the logging syntaxes training code already knows, turned into tracking events.

``MLflowWriter`` mimics ``mlflow``'s logging functions, ``SummaryWriter`` torch's TensorBoard writer
and ``WandBWriter`` ``wandb.log`` / ``wandb.config``. None of them talks to a tracking server: each
call validates its input, raising ``TypeError``/``ValueError`` that names the key and the value, and
appends events to the site's :class:`~fl_ray.tracking.sender.EventSender`; a call that logs a file
(an artifact, a figure, a model) first waits while the sender hands the file to the receiver actor in
chunks. Any writer can feed any receiver; see docs/tracking.md for how each call maps onto MLflow,
TensorBoard and W&B.

Steps: where a call gives no step, MLflow and TensorBoard syntax take a per-site, per-key counter
one past the largest step logged for that key so far (so curves continue across rounds); W&B syntax
keeps W&B's own per-run step that advances on each committed ``log``. Both, and the params already
logged, live in the site's :class:`~fl_ray.tracking.state.SiteState` (``writer.state``), shared by the
site's writers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Mapping

from fl_ray.tracking.events import (
    MAX_INT64,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    EventKind,
    check_artifact_path,
    check_key,
    check_metric_value,
    check_step,
    check_text_value,
    check_timestamp,
    check_unicode,
    flatten,
)
from fl_ray.tracking.sender import EventSender
from fl_ray.tracking.state import SiteState

METRIC, PARAM, TAG, TEXT = EventKind.METRIC, EventKind.PARAM, EventKind.TAG, EventKind.TEXT
ARTIFACT, MODEL = EventKind.ARTIFACT, EventKind.MODEL
DEFAULT_MAX_ARTIFACT_BYTES = 100 << 20  # tracking.max_artifact_mb's default


def _now_ms() -> int:
    return int(time.time() * 1000)


class _SiteWriter:
    """Validation shared by every syntax; caches names already checked, for a cheap hot path."""

    def __init__(self, sender: EventSender) -> None:
        self._sender = sender
        self._state = sender.state  # the site's steps and params, shared by its writers (and restored on restart)
        self._valid_keys: set[str] = set()

    @property
    def state(self) -> SiteState:
        """The site's tracking state (steps per key, params logged), shared by all its writers."""
        return self._state

    @property
    def site(self) -> str:
        """The site this writer logs for."""
        return self._sender.site

    def auto_step(self, key: str) -> int:
        """The step a metric ``key`` logged without one would get now: 0, or one past the largest so far
        (also across a restarted or resumed site)."""
        return self._state.auto_step(key)

    def _key(self, key: Any, what: str) -> str:
        if key.__class__ is str and key in self._valid_keys:
            return key
        check_key(key, what)
        self._valid_keys.add(key)
        return key

    def _metric(self, key: Any, value: Any, step: Any, timestamp: Any, group: str | None = None) -> tuple:
        key = self._key(key, "metric name")
        value = value if value.__class__ is float else check_metric_value(key, value)
        if step is None:
            if self._state.auto_step(key) > MAX_INT64:
                raise ValueError(f"metric {key!r}: the next automatic step would pass 2**63-1; give a step")
        else:
            step = check_step(key, step)
        timestamp = _now_ms() if timestamp is None else check_timestamp(key, timestamp)
        return key, value, step, timestamp, group

    def _emit_metrics(self, checked: list[tuple]) -> None:
        sender, state = self._sender, self._state
        for key, value, step, timestamp, group in checked:
            sender.record(METRIC, key, value, state.next_step(key, step), timestamp, group)

    def _param(self, key: Any, value: Any) -> tuple[str, str] | None:
        key = self._key(key, "param name")
        text = check_text_value("param", key, value, MAX_PARAM_VALUE_LENGTH)
        old = self._state.param(key)
        if old is not None:
            if old != text:
                raise ValueError(
                    f"param {key!r} was already logged for site {self.site!r} with value {old!r}; "
                    f"a param cannot change (got {text!r}). Log a metric or a tag for values that change."
                )
            return None
        return key, text

    def _emit_params(self, checked: list[tuple[str, str] | None]) -> None:
        now = _now_ms()
        for item in checked:
            if item is not None:
                self._state.set_param(item[0], item[1])
                self._sender.record(PARAM, item[0], item[1], None, now)

    def _text(self, name: Any, text: Any, step: Any, what: str) -> None:
        name = self._key(name, what)
        if not isinstance(text, str):
            raise TypeError(f"{what} {name!r}: text must be a string, got {type(text).__name__}")
        text = check_unicode(what, name, str.__str__(text))  # a plain str, whatever subclass came in
        step = None if step is None else check_step(name, step)
        self._sender.record(TEXT, name, text, step, _now_ms())

    def flush(self, timeout: float | None = None) -> None:
        """Send what is buffered and wait until the receiver actor has it."""
        self._sender.flush(timeout)


class MLflowWriter(_SiteWriter):
    """``mlflow``-style logging for one site: same names, signatures and meaning where they overlap.

    Files (``log_artifact(s)``, ``log_figure``, a model's files) go to the job's spool in chunks before the
    record naming them is sent; one over ``max_artifact_bytes`` (``tracking.max_artifact_mb``) raises
    ValueError at the call, with its size and the limit.
    """

    def __init__(self, sender: EventSender, max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> None:
        super().__init__(sender)
        self.max_artifact_bytes = max_artifact_bytes

    def log_metric(self, key: str, value: float, step: int | None = None, timestamp: int | None = None) -> None:
        """Log one metric point; ``timestamp`` in milliseconds since the epoch (default: now)."""
        self._emit_metrics([self._metric(key, value, step, timestamp)])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, timestamp: int | None = None) -> None:
        """Log several metrics at one step; all are checked before any is logged."""
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping of name to number, got {type(metrics).__name__}")
        self._emit_metrics([self._metric(k, v, step, timestamp) for k, v in metrics.items()])

    def log_param(self, key: str, value: Any) -> Any:
        """Log a parameter (stored as a string); returns ``value`` as ``mlflow.log_param`` does."""
        self._emit_params([self._param(key, value)])
        return value

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log several parameters; all are checked before any is logged."""
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping of name to value, got {type(params).__name__}")
        self._emit_params([self._param(k, v) for k, v in params.items()])

    def set_tag(self, key: str, value: Any) -> None:
        """Set a tag on the site's run (a later value replaces an earlier one)."""
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags; all are checked before any is set."""
        if not isinstance(tags, Mapping):
            raise TypeError(f"tags must be a mapping of name to value, got {type(tags).__name__}")
        checked = [
            (self._key(k, "tag name"), check_text_value("tag", k, v, MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()
        ]
        now = _now_ms()
        for key, text in checked:
            self._sender.record(TAG, key, text, None, now)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file`` (a relative path) of the site's run."""
        self._text(artifact_file, text, None, "artifact_file")

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Store ``dictionary`` as the artifact ``artifact_file``: YAML for ``.yaml``/``.yml``, else JSON."""
        if not isinstance(dictionary, Mapping):
            raise TypeError(f"log_dict: dictionary must be a mapping, got {type(dictionary).__name__}")
        if isinstance(artifact_file, str) and artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(dict(dictionary), default_flow_style=False)
        else:
            text = json.dumps(dictionary, indent=2, default=str)
        self._text(artifact_file, text, None, "artifact_file")

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Store the file ``local_path`` in the site's run, under the folder ``artifact_path`` (default: the
        run's root)."""
        if not os.path.isfile(local_path):
            raise ValueError(f"log_artifact: local_path {local_path!r} is not a file")
        name = os.path.basename(local_path)
        path = check_artifact_path(f"{artifact_path}/{name}" if artifact_path else name, "artifact path")
        self._check_size(local_path, f"artifact {path!r}")
        self._sender.record(ARTIFACT, path, self._sender.put_file(local_path), None, _now_ms())

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        """Store every file under ``local_dir`` in the site's run, keeping its layout under ``artifact_path``."""
        for rel in self._files_under(local_dir):
            folder = os.path.dirname(rel)
            joined = "/".join(p for p in (artifact_path, folder) if p)
            self.log_artifact(os.path.join(local_dir, rel), joined or None)

    def log_figure(self, figure: Any, artifact_file: str, *, save_kwargs: dict[str, Any] | None = None) -> None:
        """Store a matplotlib figure (anything with ``savefig``) as the image ``artifact_file``."""
        path = check_artifact_path(artifact_file)
        if not hasattr(figure, "savefig"):
            raise TypeError(f"log_figure: expected a matplotlib figure, got {type(figure).__name__}")
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            figure.savefig(local, **(save_kwargs or {}))
            self.log_artifact(local, os.path.dirname(path) or None)

    def log_model(self, pytorch_model: Any, name: str = "model", *, step: int = 0, **save_kwargs: Any) -> None:
        """Log a torch module as an MLflow model named ``name`` in the site's run (``mlflow.pytorch.log_model``:
        saved here with ``mlflow.pytorch.save_model(**save_kwargs)``, logged as a model by the receivers)."""
        import mlflow.pytorch

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "model")
            mlflow.pytorch.save_model(pytorch_model, local, **save_kwargs)
            self.log_model_dir(local, name, step=step)

    def log_model_dir(
        self,
        local_dir: str,
        name: str,
        *,
        step: int | None = 0,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Log the saved MLflow model in ``local_dir`` (an ``MLmodel`` file and the rest) as the model ``name``."""
        name = self._key(name, "model name")
        files = self._files_under(local_dir)
        if "MLmodel" not in files:
            raise ValueError(f"model {name!r}: {local_dir} holds no MLmodel file (not a saved MLflow model)")
        for rel in files:  # all checked before anything is sent
            check_artifact_path(rel, f"model {name!r} file")
            self._check_size(os.path.join(local_dir, rel), f"model {name!r}")
        hashes = {rel: self._sender.put_file(os.path.join(local_dir, rel)) for rel in files}
        manifest = {"files": hashes, "step": step or 0, "params": dict(params or {}), "tags": dict(tags or {})}
        self._sender.record(MODEL, name, json.dumps(manifest, sort_keys=True), None, _now_ms())

    def _check_size(self, path: str, what: str) -> None:
        """Raise ValueError with the size and the limit if the file at ``path`` is over ``max_artifact_bytes``."""
        size = os.path.getsize(path)
        if size > self.max_artifact_bytes:
            raise ValueError(
                f"{what}: {path} is {size / 2**20:.3g} MB, over the limit of tracking.max_artifact_mb = "
                f"{self.max_artifact_bytes / 2**20:.3g} MB"
            )

    @staticmethod
    def _files_under(local_dir: str) -> list[str]:
        """Every file under ``local_dir``, as sorted POSIX paths relative to it."""
        if not os.path.isdir(local_dir):
            raise ValueError(f"{local_dir!r} is not a directory")
        return sorted(
            os.path.relpath(os.path.join(root, f), local_dir).replace(os.sep, "/")
            for root, _, names in os.walk(local_dir)
            for f in names
        )


class SummaryWriter(_SiteWriter):
    """``torch.utils.tensorboard.SummaryWriter``-style logging for one site."""

    def add_scalar(
        self, tag: str, scalar_value: float, global_step: int | None = None, walltime: float | None = None
    ) -> None:
        """Log one scalar; ``walltime`` in seconds since the epoch (default: now)."""
        ts = None if walltime is None else _walltime_ms(tag, walltime)
        self._emit_metrics([self._metric(tag, scalar_value, global_step, ts)])

    def add_scalars(
        self,
        main_tag: str,
        tag_scalar_dict: Mapping[str, float],
        global_step: int | None = None,
        walltime: float | None = None,
    ) -> None:
        """Log several related scalars; each becomes the metric ``main_tag/key``."""
        main_tag = self._key(main_tag, "main_tag")
        if not isinstance(tag_scalar_dict, Mapping):
            raise TypeError(
                f"add_scalars({main_tag!r}): tag_scalar_dict must be a mapping, got {type(tag_scalar_dict).__name__}"
            )
        ts = None if walltime is None else _walltime_ms(main_tag, walltime)
        self._emit_metrics(
            [self._metric(f"{main_tag}/{k}", v, global_step, ts, main_tag) for k, v in tag_scalar_dict.items()]
        )

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None:
        """Log a text under ``tag``."""
        self._text(tag, text_string, global_step, "text tag")

    def close(self) -> None:
        """Flush (the site's tracking stays open for other writers)."""
        self.flush()


def _walltime_ms(tag: str, walltime: Any) -> int:
    if isinstance(walltime, bool) or not isinstance(walltime, (int, float)):
        raise TypeError(f"scalar {tag!r}: walltime must be seconds since the epoch, got {walltime!r}")
    return check_timestamp(tag, walltime * 1000)


class _WandBConfig:
    """``wandb.config``-like: ``update(dict)`` and item assignment log params of the site's run."""

    def __init__(self, writer: WandBWriter) -> None:
        self._writer = writer

    def update(self, values: Mapping[str, Any], allow_val_change: bool = False) -> None:
        """Add config entries (nested mappings flatten to ``a.b``). ``allow_val_change`` is taken for
        wandb's signature only: an entry is a param in every back end, and a param never changes, so a
        new value for an entry already set raises ValueError, whatever allow_val_change says."""
        if not isinstance(values, Mapping):
            raise TypeError(f"config.update takes a mapping, got {type(values).__name__}")
        flat = flatten(values, ".")
        self._writer._emit_params([self._writer._param(k, v) for k, v in flat.items()])

    def __setitem__(self, key: str, value: Any) -> None:
        self.update({key: value})


class WandBWriter(_SiteWriter):
    """``wandb.log``-style logging for one site, with W&B's step semantics."""

    def __init__(self, sender: EventSender) -> None:
        super().__init__(sender)
        self.config = _WandBConfig(self)

    def log(self, data: Mapping[str, Any], step: int | None = None, commit: bool | None = None) -> None:
        """Log a dict of numbers (nested dicts flatten to ``a/b``) at ``step`` or the run's current step.

        As in W&B, a call without ``step`` advances the step unless ``commit=False``; a call with
        ``step`` uses it and moves the run's step past it. Lower steps are kept, not dropped.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"log takes a mapping of name to number, got {type(data).__name__}")
        state = self._state
        at = check_step("step", state.run_step if step is None else step)
        checked = [self._metric(k, v, at, None) for k, v in flatten(data, "/").items()]
        self._emit_metrics(checked)
        if step is None:
            if commit is not False:
                state.run_step = at + 1
        else:
            state.run_step = max(state.run_step, at + 1 if commit else at)
