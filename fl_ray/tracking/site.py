"""SiteTracking: one site's state, sender and three writers, as a client or the server holds them."""

from __future__ import annotations

from typing import Any

import ray

from fl_ray.config import TrackingConfig
from fl_ray.tracking.sender import EventSender
from fl_ray.tracking.state import SiteState
from fl_ray.tracking.writers import MLflowWriter, SummaryWriter, WandBWriter


class SiteTracking:
    """The tracking endpoint of one site: ``mlflow``, ``tensorboard`` and ``wandb`` writers on one sender."""

    def __init__(self, site: str, receiver: Any, cfg: TrackingConfig, opened: dict[str, Any] | None = None) -> None:
        """``opened``: what the receiver actor's ``open_site`` gave for this site, if it was asked already."""
        snapshot = opened if opened is not None else ray.get(receiver.open_site.remote(site))
        state = SiteState.from_snapshot(site, snapshot)
        self.sender = EventSender(
            state,
            receiver,
            batch_size=cfg.batch_size,
            flush_interval=cfg.flush_interval,
            max_in_flight=cfg.max_in_flight,
        )
        self.receiver, self.cfg = receiver, cfg
        self.mlflow = MLflowWriter(self.sender, int(cfg.max_artifact_mb * 2**20))
        self.tensorboard = SummaryWriter(self.sender)
        self.wandb = WandBWriter(self.sender)

    def flush(self, timeout: float | None = None) -> int:
        """Deliver everything recorded so far to the receiver actor; returns events left unacknowledged."""
        return self.sender.flush(timeout)

    def close(self, timeout: float | None = 60.0) -> dict[str, int]:
        """Flush and stop; returns the sender's counters and what was left undelivered."""
        left = self.sender.close(timeout)
        stats = self.sender.stats
        return {
            "recorded": stats.recorded,
            "acknowledged": stats.acknowledged,
            "retries": stats.retries,
            "undelivered": left,
        }
