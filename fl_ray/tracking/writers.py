"""Writers: the logging syntaxes training code already knows, turned into tracking events.

``MLflowWriter`` mimics ``mlflow``'s logging functions, ``SummaryWriter`` torch's TensorBoard writer
and ``WandBWriter`` ``wandb.log`` / ``wandb.config``. None of them talks to a tracking server: each
call validates its input, raising ``TypeError``/``ValueError`` that names the key and the value, and
appends events to the site's :class:`~fl_ray.tracking.sender.EventSender`. Any writer can feed any
receiver; see docs/tracking.md for how each call maps onto MLflow, TensorBoard and W&B.

Steps: where a call gives no step, MLflow and TensorBoard syntax take a per-site, per-key counter
one past the largest step logged for that key so far (so curves continue across rounds); W&B syntax
keeps W&B's own per-run step that advances on each committed ``log``. Both, and the params already
logged, live in the site's :class:`~fl_ray.tracking.state.SiteState` (``writer.state``), shared by the
site's writers.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from fl_ray.tracking.events import (
    MAX_INT64,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    EventKind,
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
    """``mlflow``-style logging for one site: same names, signatures and meaning where they overlap."""

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
