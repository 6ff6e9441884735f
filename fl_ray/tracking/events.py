"""The tracking record that crosses process boundaries, and the checks a writer runs on its input.

A :class:`TrackingEvent` is what every writer syntax (MLflow, TensorBoard, W&B) turns a call into.
It is a plain named tuple of picklable, back-end-legal values, so it is cheap to build inside a
training loop and cheap to ship to the receiver actor. ``(site, seq)`` identifies an event for
exactly-once delivery.
"""

from __future__ import annotations

import math
import numbers
import re
from enum import Enum
from typing import Any, NamedTuple


class EventKind(str, Enum):
    """What a record holds. Every writer maps its calls onto these four kinds."""

    METRIC = "metric"
    PARAM = "param"
    TAG = "tag"
    TEXT = "text"


class TrackingEvent(NamedTuple):
    """One tracking record from one site.

    ``value`` is a float for metrics, a string for params, tags and texts. ``key`` is the metric,
    param or tag name, or the artifact file name for a text. ``step`` is set for metrics (and for
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
# colons and slashes, at most 250 characters, not a path that climbs out ("..") or starts at "/".
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
_KEY_RE = re.compile(r"^[\w\-. :/]{1,250}$")


def check_key(key: Any, what: str = "key") -> str:
    """Return ``key`` if MLflow accepts it as a name, else raise TypeError/ValueError naming it."""
    if type(key) is not str:
        raise TypeError(f"{what} must be a string, got {key!r} ({type(key).__name__})")
    if _KEY_RE.match(key) is None or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(
            f"{what} {key!r} is not a valid name: expected 1-{MAX_KEY_LENGTH} characters of "
            "letters, digits, '_', '-', '.', ' ', ':' or '/', not starting with '/' and with no '..' part"
        )
    return key


def check_metric_value(key: str, value: Any) -> float:
    """Return ``value`` as a float if it is a real number (NaN and infinities allowed, as MLflow does)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        # numpy / torch scalars of size one are numbers too, but only through .item()
        item = getattr(value, "item", None)
        if item is not None and getattr(value, "ndim", 1) == 0:
            return check_metric_value(key, item())
        raise TypeError(f"metric {key!r}: value must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_step(key: str, step: Any) -> int:
    """Return ``step`` if it is a non-negative integer, else raise naming the metric."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"metric {key!r}: step must be a non-negative integer, got {step!r} ({type(step).__name__})")
    if step < 0:
        raise ValueError(f"metric {key!r}: step must be a non-negative integer, got {step}")
    return int(step)


def check_timestamp(key: str, timestamp: Any) -> int:
    """Return ``timestamp`` (milliseconds since the epoch) as an int, else raise naming the metric."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, numbers.Real) or not math.isfinite(timestamp):
        raise TypeError(f"metric {key!r}: timestamp must be milliseconds since the epoch, got {timestamp!r}")
    if timestamp < 0:
        raise ValueError(f"metric {key!r}: timestamp must be non-negative, got {timestamp}")
    return int(timestamp)


def check_text_value(what: str, key: str, value: Any, max_length: int) -> str:
    """Return ``value`` as the string a param or tag stores, refusing values MLflow would reject."""
    if isinstance(value, (dict, list, tuple, set)) and what == "param":
        raise TypeError(f"param {key!r}: value must be a scalar, got {type(value).__name__} {value!r:.80}")
    text = str(value)
    if len(text) > max_length:
        raise ValueError(f"{what} {key!r}: value is {len(text)} characters, more than the {max_length} allowed")
    return text
