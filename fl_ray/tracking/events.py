"""The tracking record that crosses process boundaries, and the checks a writer runs on its input.

A :class:`TrackingEvent` is what every writer syntax (MLflow, TensorBoard, W&B) turns a call into.
It is a plain named tuple of picklable, back-end-legal values, so it is cheap to build inside a
training loop and cheap to ship to the receiver actor. ``(site, seq)`` identifies an event for
exactly-once delivery.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import posixpath
import re
from enum import Enum
from argparse import Namespace
from typing import Any, Mapping, NamedTuple, cast


class EventKind(str, Enum):
    """What a record holds. Every writer maps its calls onto these kinds."""

    METRIC = "metric"
    PARAM = "param"
    TAG = "tag"
    TEXT = "text"
    ARTIFACT = "artifact"  # a file: value = its content hash, the blob is in the job's spool
    MODEL = "model"  # a logged model: value = JSON {"files": {relative path: content hash}, ...}


class TrackingEvent(NamedTuple):
    """One tracking record from one site.

    ``value`` is a float for metrics, a string for params, tags and texts, the content hash (sha256
    hex) of an artifact's file, and a JSON manifest for a model. ``key`` is the metric, param or tag
    name, or the artifact path for a text, a file or a model. ``step`` is set for metrics (and for
    texts written with a step); ``timestamp`` is the client's wall clock in milliseconds.
    """

    site: str
    seq: int
    kind: EventKind
    key: str
    value: Any
    step: int | None
    timestamp: int
    group: str | None = None  # add_scalars' main tag: TensorBoard keeps such series side by side


# MLflow's rule for metric, param and tag names: alphanumerics, underscores, dashes, periods, spaces,
# colons and slashes, at most 250 characters, and a plain relative path: no "." or ".." part, no
# leading, trailing or doubled "/", not starting with ".." (MLflow refuses any name that
# ``posixpath.normpath`` changes, and any that starts with ".." or "/").
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_INT64 = 2**63 - 1  # steps and timestamps are 64-bit integers in every back end
_KEY_RE = re.compile(r"[\w\-. :/]{1,250}")


def check_key(key: Any, what: str = "key") -> str:
    """Return ``key`` if MLflow accepts it as a name, else raise TypeError/ValueError naming it."""
    if type(key) is not str:
        raise TypeError(f"{what} must be a string, got {key!r} ({type(key).__name__})")
    if _KEY_RE.fullmatch(key) is None or posixpath.normpath(key) != key or key == "." or key.startswith(("/", "..")):
        raise ValueError(
            f"{what} {key!r} is not a valid name: expected 1-{MAX_KEY_LENGTH} characters of "
            "letters, digits, '_', '-', '.', ' ', ':' or '/', forming a relative path: not starting with '/' "
            "or '..', with no '.' or '..' part and no trailing or doubled '/'"
        )
    return key


def check_artifact_path(path: Any, what: str = "artifact_file") -> str:
    """Return ``path`` if it is a plain relative POSIX path (no ``..`` part, no leading or doubled ``/``)."""
    if type(path) is not str:
        raise TypeError(f"{what} must be a string, got {path!r} ({type(path).__name__})")
    if (
        not path
        or len(path) > 1000
        or posixpath.normpath(path) != path
        or path.startswith("/")
        or ".." in path.split("/")
        or "\\" in path
        or "\x00" in path
    ):
        raise ValueError(
            f"{what} {path!r} is not a valid artifact path: expected a relative path of 1-1000 characters, "
            "not starting with '/', with no '..' or '.' part, backslash or doubled '/'"
        )
    return check_unicode(what, path, path)


def check_metric_value(key: str, value: Any) -> float:
    """Return ``value`` as a float if it is a real number (NaN and infinities allowed, as MLflow does)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        # numpy / torch scalars of size one are numbers too, but only through .item()
        item = getattr(value, "item", None)
        if item is not None and getattr(value, "ndim", 1) == 0:
            return check_metric_value(key, item())
        raise TypeError(f"metric {key!r}: value must be a real number, got {value!r} ({type(value).__name__})")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"metric {key!r}: value {value!r:.80} is too large for a 64-bit float") from None


def check_step(key: str, step: Any) -> int:
    """Return ``step`` if it is a non-negative integer, else raise naming the metric."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"metric {key!r}: step must be a non-negative integer, got {step!r} ({type(step).__name__})")
    if not 0 <= int(step) <= MAX_INT64:
        raise ValueError(f"metric {key!r}: step must be a non-negative 64-bit integer (0 to 2**63-1), got {step!r:.80}")
    return int(step)


def check_timestamp(key: str, timestamp: Any) -> int:
    """Return ``timestamp`` (milliseconds since the epoch) as an int, else raise naming the metric."""
    if (
        isinstance(timestamp, bool)
        or not isinstance(timestamp, numbers.Real)
        or (not isinstance(timestamp, numbers.Integral) and not math.isfinite(timestamp))
    ):
        raise TypeError(f"metric {key!r}: timestamp must be milliseconds since the epoch, got {timestamp!r:.80}")
    value = cast(float, timestamp)  # a real number, checked above
    if not 0 <= value <= MAX_INT64:
        raise ValueError(
            f"metric {key!r}: timestamp must be a non-negative 64-bit integer of milliseconds, got {timestamp!r:.80}"
        )
    return int(value)


def check_text_value(what: str, key: str, value: Any, max_length: int) -> str:
    """Return ``value`` as the string a param or tag stores, refusing values MLflow would reject."""
    if isinstance(value, (dict, list, tuple, set)) and what == "param":
        raise TypeError(f"param {key!r}: value must be a scalar, got {type(value).__name__} {value!r:.80}")
    try:
        text = str(value)
    except Exception as exc:  # a user object whose __str__ fails
        raise TypeError(
            f"{what} {key!r}: value of type {type(value).__name__} cannot be turned into a string "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if len(text) > max_length:
        raise ValueError(f"{what} {key!r}: value is {len(text)} characters, more than the {max_length} allowed")
    return check_unicode(what, key, text)


def check_unicode(what: str, key: str, text: str) -> str:
    """Return ``text`` if it can be stored as UTF-8 (no lone surrogates), else raise ValueError naming it."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} {key!r}: value is not valid Unicode text (character {text[exc.start]!r} at "
            f"position {exc.start} cannot be stored as UTF-8)"
        ) from None
    return text


def flatten(data: Mapping[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (and argparse Namespaces) as one level: ``{"a": {"b": 1}}`` -> ``{"a<sep>b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            out.update(flatten(value, sep, name + sep))
        else:
            out[name] = value
    return out


def event_files(event: TrackingEvent) -> list[str]:
    """The content hashes of the files a record names: an artifact's one, a model's each (none for others)."""
    if event.kind is EventKind.ARTIFACT:
        return [event.value]
    if event.kind is EventKind.MODEL:
        return sorted(set(json.loads(event.value)["files"].values()))
    return []


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of the file at ``path``: the name a logged file is stored and sent under."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
