"""ReceiverActor: the one place per job that holds tracking credentials and writes to back ends.

It runs on the driver's node with ``num_cpus=0``, handles one batch at a time (Ray runs an actor's
calls one by one), and is restarted by Ray if it dies; the :class:`~fl_ray.tracking.hub.TrackingHub`
inside recovers everything from the spool. Credentials reach it, and only it, as a constructor argument
whose repr shows no values (Ray keeps it for restarts, and neither logs it nor shows it in its state
API), set into this process's environment only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fl_ray.receivers.base import ReceiverContext, build_receivers
from fl_ray.tracking.credentials import ReceiverCredentials
from fl_ray.tracking.events import TrackingEvent
from fl_ray.tracking.hub import TrackingHub

if TYPE_CHECKING:
    from fl_ray.checkpoint import BestModel


@ray.remote(concurrency_groups={"watch": 2})  # type: ignore[call-overload]  # wait_open may wait while status answers
class ReceiverActor:
    """Accepts every site's tracking batches and fans them out to the configured receivers.

    Calls run one at a time, but for ``wait_open`` and ``status``, which run in their own thread (the
    ``watch`` group) so the driver can follow start-up and the final delivery while the actor works.
    """

    def __init__(self, ctx: ReceiverContext, specs: list[dict[str, Any]], credentials: ReceiverCredentials) -> None:
        os.environ.update(credentials.resolve())  # this process only; MLflow and W&B read them from here
        self.hub = TrackingHub(ctx, build_receivers(specs))

    def open_site(self, site: str) -> dict[str, Any]:
        return self.hub.open_site(site)

    def open_sites(self, sites: list[str]) -> dict[str, dict[str, Any]]:
        return self.hub.open_sites(sites)

    def put_chunk(self, sha: str, offset: int, chunk: bytes, size: int) -> bool:
        return self.hub.put_chunk(sha, offset, chunk, size)

    def submit(self, site: str, events: list[TrackingEvent]) -> int:
        return self.hub.submit(site, events)

    @ray.method(concurrency_group="watch")
    def wait_open(self, timeout: float) -> dict[str, Any]:
        """Per receiver: opened (store ready, job run created) or why not, once known (see TrackingHub)."""
        return self.hub.wait_open(timeout)

    @ray.method(concurrency_group="watch")
    def status(self) -> dict[str, Any]:
        return self.hub.status()

    def close(self, status: str, timeout: float) -> dict[str, Any]:
        return self.hub.close(status, timeout)

    def log_table(self, artifact_file: str, table: dict[str, list], timeout: float) -> dict[str, Any]:
        """Log a table (columns) to the job's parent run, in every receiver that logs tables."""
        return self.hub.log_table(artifact_file, table, timeout)

    def log_artifact(self, local_path: str, artifact_path: str | None, timeout: float) -> dict[str, Any]:
        """Log a file of this node (e.g. the job's ``summary.png``) to the job's parent run, in every receiver
        that logs files."""
        return self.hub.log_artifact(local_path, artifact_path, timeout)

    def log_model(
        self, site: str, model: BestModel, registered_model_name: str | None, timeout: float
    ) -> dict[str, Any]:
        """Log the best global ``model`` into ``site``'s run: here, where credentials are."""
        return self.hub.log_model(site, model, registered_model_name, timeout)


def receiver_actor_name(job_id: str) -> str:
    """The Ray name of a job's receiver actor (sites look it up by this name)."""
    return f"fl_ray-receiver-{job_id}"


def start_receiver(
    ctx: ReceiverContext,
    specs: list[dict[str, Any]],
    credentials: ReceiverCredentials | Mapping[str, str],
    placement: NodeAffinitySchedulingStrategy,
    max_restarts: int = 5,
) -> Any:
    """Start the job's receiver actor where ``placement`` says (the driver's node). ``credentials`` (or a
    plain mapping of credential variables) go as a constructor argument, which Ray keeps for restarts
    but neither logs nor shows, unlike ``runtime_env``."""
    if not isinstance(credentials, ReceiverCredentials):
        credentials = ReceiverCredentials(configured=dict(credentials))
    return ReceiverActor.options(  # type: ignore[attr-defined]
        num_cpus=0,
        max_restarts=max_restarts,
        name=receiver_actor_name(ctx.job_id),
        scheduling_strategy=placement,
    ).remote(ctx, specs, credentials)
