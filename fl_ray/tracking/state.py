"""SiteState: the one owner of what a site's tracking remembers.

For each site: its incarnation (a restarted site sends seqs from a fresh block, so late batches of an
earlier incarnation never collide), the next seq, the next automatic step of each metric key (so curves
continue across rounds and restarts), the params already logged (a param never changes), and W&B
syntax's per-run step. Every writer syntax, the Lightning logger and the built-in learner read and move
it through the site's sender (``sender.state``); the hub keeps one per site too, built from the records it
accepted, and hands a restarted site its :meth:`SiteState.snapshot`, so the site continues where it was.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from fl_ray.tracking.events import EventKind, TrackingEvent

INCARNATION_BITS = 32  # seqs of incarnation i are i << INCARNATION_BITS and up


@dataclass
class SiteState:
    """One site's tracking state; safe to use from several threads."""

    site: str
    incarnation: int = 0
    steps: dict[str, int] = field(default_factory=dict)  # metric key -> its next automatic step
    params: dict[str, str] = field(default_factory=dict)  # param key -> the value logged
    run_step: int = 0  # W&B syntax: the run's current step
    seq: int = -1  # the next seq; -1: the first of the incarnation's block

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        if self.seq < 0:
            self.seq = self.incarnation << INCARNATION_BITS

    # -- what a restarted site continues from ------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Plain data: the incarnation, steps, params and run step (what the hub sends a restarted site)."""
        with self._lock:
            return {
                "incarnation": self.incarnation,
                "steps": dict(self.steps),
                "params": dict(self.params),
                "run_step": self.run_step,
            }

    @classmethod
    def from_snapshot(cls, site: str, snapshot: dict[str, Any]) -> SiteState:
        """The state a site starts from, given the hub's :meth:`snapshot` for it."""
        return cls(
            site,
            int(snapshot["incarnation"]),
            dict(snapshot["steps"]),
            dict(snapshot["params"]),
            int(snapshot.get("run_step", 0)),
        )

    def observe(self, event: TrackingEvent) -> None:
        """Take in an accepted record (the hub's copy): its metric step, its param."""
        with self._lock:
            if event.kind == EventKind.METRIC and event.step is not None:
                if event.step >= self.steps.get(event.key, 0):
                    self.steps[event.key] = event.step + 1
            elif event.kind == EventKind.PARAM:
                self.params.setdefault(event.key, event.value)

    # -- the site's side ------------------------------------------------------------------------------------
    def next_seq(self) -> int:
        """The next sequence number of this incarnation."""
        with self._lock:
            seq = self.seq
            self.seq += 1
            return seq

    def next_step(self, key: str, explicit: int | None = None) -> int:
        """The step to use for ``key``: ``explicit`` when given, else one past the largest so far.

        Counters are per site and key and never restart, so curves continue across rounds.
        """
        with self._lock:
            step = self.steps.get(key, 0) if explicit is None else explicit
            if step >= self.steps.get(key, 0):
                self.steps[key] = step + 1
            return step

    def auto_step(self, key: str) -> int:
        """The step ``next_step(key)`` would give without an explicit one (nothing changes)."""
        with self._lock:
            return self.steps.get(key, 0)

    def after(self, keys: Iterable[str]) -> int:
        """One past the largest step logged for any of ``keys`` (0 if none was)."""
        with self._lock:
            return max((self.steps.get(k, 0) for k in keys), default=0)

    def param(self, key: str) -> str | None:
        """The value logged for param ``key``, or None."""
        with self._lock:
            return self.params.get(key)

    def set_param(self, key: str, value: str) -> None:
        """Remember that param ``key`` was logged with ``value``."""
        with self._lock:
            self.params.setdefault(key, value)
