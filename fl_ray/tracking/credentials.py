"""Tracking credentials: which environment variables they are, and who may hold them.

Only the receiver actor gets these variables (from the driver's environment or the job config);
client and server actors drop them at start, so no site ever holds a tracking-server credential.
"""

from __future__ import annotations

import os
from typing import Mapping

CREDENTIAL_VARS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "WANDB_API_KEY",
)


def receiver_env(configured: Mapping[str, str]) -> dict[str, str]:
    """The credentials for the receiver actor: the driver's environment, overridden by the config."""
    env = {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
    env.update(configured)
    return env


def drop_credentials() -> None:
    """Remove every tracking credential from this process's environment."""
    for name in CREDENTIAL_VARS:
        os.environ.pop(name, None)
