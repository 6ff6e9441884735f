"""RecordingSender: EventSender's writer-facing surface, keeping events in a list (thread-safe, no Ray).

Unit tests give it to a real writer (MLflowWriter, ...) to see exactly which events a component logs.
"""

from __future__ import annotations

import threading

from fl_ray.tracking.events import EventKind
from fl_ray.tracking.state import SiteState


class RecordingSender:
    """Records ``(kind, key, value, step, timestamp, group)`` tuples; steps and params in a SiteState, as
    EventSender keeps them."""

    def __init__(self, site: str = "site-1", steps: dict[str, int] | None = None) -> None:
        self.site = site
        self.state = SiteState(site, steps=dict(steps or {}))  # a resumed site starts with some steps
        self.events: list[tuple] = []
        self._lock = threading.Lock()

    def record(self, kind, key, value, step, timestamp, group=None) -> None:
        with self._lock:
            self.events.append((kind, key, value, step, timestamp, group))

    def metrics(self) -> dict[str, list[tuple[int, float]]]:
        """Metric points by key, as (step, value)."""
        out: dict[str, list[tuple[int, float]]] = {}
        for kind, key, value, step, _, _ in list(self.events):
            if kind == EventKind.METRIC:
                out.setdefault(key, []).append((step, value))
        return out

    def logged_params(self) -> dict[str, str]:
        """Every PARAM event as {key: value}."""
        return {key: value for kind, key, value, *_ in self.events if kind == EventKind.PARAM}

    def steps(self, key: str) -> list[int]:
        """The steps of metric ``key``, in order."""
        return [step for kind, k, _, step, *_ in self.events if kind == EventKind.METRIC and k == key]
