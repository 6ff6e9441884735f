"""A site's MLflow tracking URI, set for the site's work without importing MLflow.

While a site's work runs (a client actor's life, or one task of a pool worker), ``fl-ray://<site>`` is the
tracking and registry URI in the process's environment, where MLflow and Lightning's ``MLFlowLogger`` read
it once the site's code imports MLflow; MLflow then finds :mod:`fl_ray.tracking.mlflow_plugin` through its
entry points. A site whose code never imports MLflow never loads it (seconds of every process's start).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from fl_ray.tracking.credentials import SITE_URI_SCHEME
from fl_ray.tracking.site import SiteTracking

_active: dict[str, SiteTracking] = {}
_restores: dict[str, Callable[[], None]] = {}  # site -> what puts MLflow's own URIs back


def site_uri(site: str) -> str:
    """The tracking URI of ``site`` inside its work: ``fl-ray://<site>``."""
    return f"{SITE_URI_SCHEME}://{site}"


def active_tracking(site: str) -> SiteTracking | None:
    """The tracking of ``site`` while its work runs in this process, else None."""
    return _active.get(site)


@contextmanager
def site_scope(tracking: SiteTracking) -> Iterator[None]:
    """Within: MLflow's tracking and registry URI is ``fl-ray://<site>``, writing to ``tracking``, and MLflow's
    usage telemetry is off (a site makes no network call). On the way out the MLflow runs the site's code
    left open are ended, its child runs' streams delivered and closed, and the previous URIs restored."""
    site = tracking.sender.site
    env = {
        "MLFLOW_TRACKING_URI": site_uri(site),
        "MLFLOW_REGISTRY_URI": site_uri(site),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _active[site] = tracking
    if "mlflow" in sys.modules:
        pin_mlflow(site)
    try:
        yield
    finally:
        try:
            plugin = sys.modules.get("fl_ray.tracking.mlflow_plugin")
            if plugin is not None:  # the site's code used MLflow
                plugin.end_site(site)
        finally:
            _active.pop(site, None)
            restore = _restores.pop(site, None)
            if restore is not None:
                restore()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def pin_mlflow(site: str) -> None:
    """While ``site``'s work runs, set MLflow's own tracking and registry URI to the site's (each MLflow call
    then reads them without looking up the environment); put back when the work ends."""
    if site in _active and site not in _restores:
        _restores[site] = _point_mlflow_at(site_uri(site))


def _point_mlflow_at(uri: str) -> Callable[[], None]:
    """Set MLflow's own tracking and registry URI (which win over the environment's) to ``uri``, and stop
    its telemetry; returns what puts the previous ones back."""
    import mlflow
    from mlflow.telemetry.client import set_telemetry_client
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils

    previous = utils._tracking_uri, registry._registry_uri  # None when none was set
    set_telemetry_client()  # none, with telemetry disabled
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # no registry on a site (and no look for Spark at every call)

    def restore() -> None:
        mlflow.set_tracking_uri(previous[0])  # type: ignore[arg-type]  # None unsets it
        mlflow.set_registry_uri(previous[1])  # type: ignore[arg-type]

    return restore
