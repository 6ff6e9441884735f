"""Site-local tracking: a receiver actor on a site's own node, and what the site shares with the server.

A site named in ``tracking.site_receivers`` logs to a :class:`SiteReceiverActor` instead of the job's
receiver actor. It runs on the node of the site's client actor (both are placed through one bundle of a
placement group, spread or packed as ``resources.placement`` says, so a restarted client stays on that
node), with its own :class:`~fl_ray.tracking.hub.TrackingHub` and spool in
``<tracking.site_workspace>/<site>/<job_id>`` there: the same dedup, durable acknowledgement and
exactly-once delivery as the server's. Its receivers are the site's own plus :class:`ShareReceiver`,
which hands the records whose key matches ``tracking.share`` on to the job's receiver actor. The site's
credentials come from ``tracking.site_credentials_file``, a file on the site's node that only this actor
opens; it drops every other tracking credential at start.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Sequence

import ray
import yaml
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from fl_ray.config import ConfigError, JobConfig
from fl_ray.receivers.base import Receiver, ReceiverContext, build_receivers
from fl_ray.tracking.credentials import drop_credentials, read_credentials_file
from fl_ray.tracking.events import TrackingEvent, event_files
from fl_ray.tracking.hub import TrackingHub
from fl_ray.tracking.sender import send_file
from fl_ray.tracking.spool import SPOOL_DIR, blob_path
from fl_ray.tracking.state import INCARNATION_BITS

SHARE_RECEIVER = "server"  # the name of a site hub's receiver that feeds the server's receiver actor
SHARED_BLOCK = 1 << 30  # the seq block of shared records at the server: above any incarnation a site gets there


class ShareReceiver(Receiver):
    """Sends the site's records whose key matches one of ``patterns`` to the job's receiver actor.

    A shared record is sent with a seq of its own: its place among the shared records of the site's spool, in
    a block of seqs (``SHARED_BLOCK``) that no incarnation of the site uses. That place never changes, so a
    record sent again after a failure or a crash has the same ``(site, seq)`` and the server's hub drops it,
    and the server sees one unbroken run of seqs per site. The files a shared record names (an artifact's, a
    model's) go to the server's spool first, from the site's. ``checkpoint`` keeps how many records were
    shared before the progress mark.
    """

    def __init__(self, receiver_name: str, patterns: Sequence[str], flush_time: float, batch_size: int) -> None:
        self.receiver_name = receiver_name
        self.patterns = list(patterns)
        self.buffer_flush_time = flush_time
        self.batch_size = batch_size
        self.shared = 0  # records shared before the progress mark
        self._pending: list[TrackingEvent] = []
        self._actor: Any = None
        self._spool = Path()

    def shares(self, key: str) -> bool:
        """Whether a record under ``key`` goes to the server."""
        return any(fnmatchcase(key, p) for p in self.patterns)

    def open(self, ctx: ReceiverContext) -> None:
        self._actor = ray.get_actor(self.receiver_name)
        self._spool = Path(ctx.job_dir) / SPOOL_DIR

    def write(self, events: Sequence[TrackingEvent]) -> None:
        for e in events:
            if self.shares(e.key):
                seq = (SHARED_BLOCK << INCARNATION_BITS) + self.shared + len(self._pending)
                self._pending.append(e._replace(seq=seq))

    def flush(self) -> None:
        """Wait until the server's hub has stored every pending record (an error: all are sent again)."""
        pending, self._pending = self._pending, []
        for sha in {sha for e in pending for sha in event_files(e)}:
            send_file(self._actor, blob_path(self._spool, sha), f"site {pending[0].site!r}", sha)
        n = self.batch_size
        refs = [self._actor.submit.remote(pending[0].site, pending[i : i + n]) for i in range(0, len(pending), n)]
        ray.get(refs)
        self.shared += len(pending)

    def close(self, status: str) -> dict[str, Any]:
        return {"shared": self.shared, "patterns": self.patterns}

    def checkpoint(self) -> dict[str, Any]:
        return {"shared": self.shared}

    def resume(self, state: dict[str, Any]) -> None:
        self.shared = int(state.get("shared", 0))


@ray.remote
class SiteReceiverActor:
    """One site's receiver actor, on the site's node: its spool, its receivers, and what it shares."""

    def __init__(
        self,
        ctx: ReceiverContext,
        site: str,
        specs: list[dict[str, Any]],
        share: ShareReceiver,
        site_workspace: str,
        credentials_file: str | None,
    ) -> None:
        drop_credentials()  # the server's credentials, should this node's environment hold them
        if credentials_file is not None:
            path = Path(credentials_file).expanduser()
            if not path.is_file():
                raise ConfigError(
                    f"tracking.site_credentials_file: {site}: no such file {str(path)!r} on the node of {site}"
                )
            os.environ.update(read_credentials_file(str(path)))  # this process only
        home = Path(site_workspace).expanduser().resolve() / site
        ctx = dataclasses.replace(ctx, job_dir=home / ctx.job_id, workspace=home, sites=(site,))
        ctx.job_dir.mkdir(parents=True, exist_ok=True)
        (ctx.job_dir / "config.yaml").write_text(yaml.safe_dump(site_job_config(ctx.config, specs), sort_keys=False))
        self.hub = TrackingHub(ctx, [*build_receivers(specs), (SHARE_RECEIVER, share)])

    def open_site(self, site: str) -> dict[str, Any]:
        return self.hub.open_site(site)

    def submit(self, site: str, events: list[TrackingEvent]) -> int:
        return self.hub.submit(site, events)

    def put_chunk(self, sha: str, offset: int, chunk: bytes, size: int) -> bool:
        return self.hub.put_chunk(sha, offset, chunk, size)

    def close(self, status: str, timeout: float) -> dict[str, Any]:
        """Deliver the site's spool to its receivers and share what it shares (up to ``timeout`` seconds),
        end its runs, and report, with the job directory and node it wrote on."""
        report = self.hub.close(status, timeout)
        return {**report, "job_dir": str(self.hub.ctx.job_dir), "node_id": ray.get_runtime_context().get_node_id()}


def site_job_config(config: dict[str, Any], specs: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's ``config`` as a site's job directory keeps it: the site's receivers are its receivers, so that
    ``fl-ray replay`` run on the site's node delivers what they did not get (what the site shares goes to the
    job's receiver actor only while the job runs)."""
    site_tracking = {"receivers": specs, "site_receivers": {}, "share": [], "site_credentials_file": {}}
    return {**config, "tracking": {**config.get("tracking", {}), **site_tracking}}


def site_receiver_name(job_id: str, site: str) -> str:
    """The Ray name of a site's own receiver actor (its client looks it up by this name)."""
    return f"fl_ray-receiver-{job_id}-{site}"


class SitePlacementError(RuntimeError):
    """The sites with their own receivers could not be placed in time."""


@dataclass
class SiteReceivers:
    """The sites with receivers of their own: where each runs and its receiver actor."""

    group: PlacementGroup
    strategies: dict[str, PlacementGroupSchedulingStrategy]  # for the site's client actor
    actors: dict[str, Any]

    def remove(self) -> None:
        """Free the sites' reserved resources (their actors must have ended)."""
        ray.util.remove_placement_group(self.group)


def start_site_receivers(
    cfg: JobConfig, ctx: ReceiverContext, receiver_name: str, max_restarts: int = 5
) -> SiteReceivers:
    """Reserve a node for each site of ``tracking.site_receivers`` (one bundle of the site's client resources
    each, spread or packed as ``resources.placement`` says) and start its receiver actor there, whose records
    ``tracking.share`` selects for the job's receiver actor (``receiver_name``)."""
    tracking, res = cfg.tracking, cfg.resources
    sites = [s for s in cfg.site_names if s in tracking.site_receivers]
    bundle = {"CPU": res.client_cpus, **({"GPU": res.client_gpus} if res.client_gpus else {})}
    group = placement_group([dict(bundle) for _ in sites], strategy="SPREAD" if res.placement == "spread" else "PACK")
    ready, _ = ray.wait([group.ready()], timeout=res.schedule_timeout)
    if not ready:
        ray.util.remove_placement_group(group)
        raise SitePlacementError(
            f"the {len(sites)} site(s) with tracking.site_receivers {sites} could not be placed within "
            f"resources.schedule_timeout={res.schedule_timeout:g} s; each asks for {bundle}; free now: "
            f"{ray.available_resources()}"
        )
    bundle_nodes = placement_group_table(group)["bundles_to_node_id"]
    nodes = {site: bundle_nodes[i] for i, site in enumerate(sites)}
    actors = {
        site: SiteReceiverActor.options(  # type: ignore[attr-defined]
            num_cpus=0,
            max_restarts=max_restarts,
            name=site_receiver_name(ctx.job_id, site),
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[site], soft=False),
        ).remote(
            ctx,
            site,
            [{"type": r.type, **r.params} for r in tracking.site_receivers[site]],
            ShareReceiver(receiver_name, tracking.share, tracking.flush_interval, tracking.batch_size),
            tracking.site_workspace,
            tracking.site_credentials_file.get(site),
        )
        for site in sites
    }
    strategies = {
        site: PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i) for i, site in enumerate(sites)
    }
    return SiteReceivers(group, strategies, actors)
