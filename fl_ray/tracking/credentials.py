"""Tracking credentials: which environment variables they are, how only the receiver actor gets them,
and how they are masked wherever a command line is shown.

Only the receiver actor holds them. They travel to it as a constructor argument
(:class:`ReceiverCredentials`, whose repr shows no value), which Ray keeps for the actor's restarts but
neither logs nor shows in its state API (``runtime_env`` variables it does both); the actor puts them
into its own ``os.environ``, where MLflow and W&B read them. A Ray that the job starts locally starts
without them (:func:`without_credentials`), so none of its daemons and workers inherits them.
``tracking.credentials_file`` is opened by the receiver actor only, so the driver need not hold them
at all. Client and server actors still drop them at start, in case a node's environment has them.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from fl_ray.config import CREDENTIAL_VARS, ConfigError

log = logging.getLogger(__name__)

MASK = "***"
SITE_URI_SCHEME = "fl-ray"  # a site's own MLflow tracking URI, fl-ray://<site>, which is no credential

# A KEY=VALUE argument is secret when its key or value names a credential; a URL's password always is.
_SECRET_WORD = re.compile(r"(?<![a-z])(credentials?|passw(?:or)?d|secret|token|api_?key|auth)(?![a-z])", re.I)
_URL_PASSWORD = re.compile(r"(?<=://)([^/@:\s]*):([^/@\s]+)@")


@dataclass(frozen=True)
class ReceiverCredentials:
    """The receiver actor's credentials on their way to it; the repr shows no value.

    Later sources win per variable: ``environment`` (the driver's), ``file`` (read where the receiver
    actor runs, when it starts and whenever Ray restarts it), ``configured`` (``tracking.credentials``).
    """

    environment: dict[str, str] = field(default_factory=dict, repr=False)
    configured: dict[str, str] = field(default_factory=dict, repr=False)
    file: str | None = None

    def resolve(self) -> dict[str, str]:
        """The variables to set in the receiver actor's environment."""
        values = dict(self.environment)
        if self.file is not None:
            values.update(read_credentials_file(self.file))
        values.update(self.configured)
        return values


def receiver_credentials(configured: Mapping[str, str], file: str | None = None) -> ReceiverCredentials:
    """The receiver actor's credentials: the driver's credential variables, ``file`` (``~`` expanded;
    the receiver actor runs on this node) and ``configured``. The file is not opened here; ConfigError
    if it does not exist."""
    environment = {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
    if file is None:
        return ReceiverCredentials(environment, dict(configured))
    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"tracking.credentials_file: no such file {str(path)!r}")
    if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("tracking.credentials_file %s can be read by other users; chmod 600 it", path)
    return ReceiverCredentials(environment, dict(configured), str(path))


def read_credentials_file(path: str) -> dict[str, str]:
    """The ``NAME=value`` lines of ``path``: one credential variable each; blank lines, ``#`` comments,
    ``export`` prefixes and quotes around a value are allowed. Errors name lines, never values."""
    values: dict[str, str] = {}
    problems = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        name, value = name.strip(), value.strip()
        if not sep:
            problems.append(f"line {number} is not NAME=value")
        elif name not in CREDENTIAL_VARS:
            problems.append(f"line {number}: unknown credential {name!r}")
        else:
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[name] = value
    if problems:
        raise ValueError(
            f"tracking.credentials_file {path}: {'; '.join(problems)}; "
            f"expected NAME=value lines with NAME one of {', '.join(CREDENTIAL_VARS)}"
        )
    return values


@contextmanager
def without_credentials() -> Iterator[None]:
    """Take the credential variables out of ``os.environ`` for the block, then put them back: processes
    started in it (such as a local Ray's daemons, and through them its workers) never inherit them."""
    saved = {k: os.environ.pop(k) for k in CREDENTIAL_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def held_credentials() -> list[str]:
    """The names of the credential variables in this process's environment. A site's own
    ``fl-ray://<site>`` tracking URI (MLflow's fluent API and Lightning read it there) is none."""
    return sorted(
        k for k in CREDENTIAL_VARS if k in os.environ and not os.environ[k].startswith(f"{SITE_URI_SCHEME}://")
    )


def drop_credentials() -> None:
    """Remove every tracking credential from this process's environment."""
    for name in CREDENTIAL_VARS:
        os.environ.pop(name, None)


def _secret_argument(arg: str) -> tuple[str, str] | None:
    """``(KEY=, VALUE)`` of a ``KEY=VALUE`` or ``--flag=KEY=VALUE`` argument that is secret, else None."""
    prefix = ""
    if arg.startswith("-"):
        flag, sep, arg = arg.partition("=")
        prefix = flag + sep
    key, sep, value = arg.partition("=")
    if sep and (_SECRET_WORD.search(key) or _SECRET_WORD.search(value)):
        return prefix + key + sep, value
    return None


def masked_argv(argv: list[str]) -> list[str]:
    """``argv`` with secrets masked: the value of every ``KEY=VALUE`` argument whose key or value names
    a credential (``tracking.credentials.*``, ``...password``, ``...token``, ...) and every URL's password."""
    masked = []
    for arg in argv:
        secret = _secret_argument(arg)
        masked.append(secret[0] + MASK if secret else _URL_PASSWORD.sub(rf"\1:{MASK}@", arg))
    return masked


def argv_secrets(argv: list[str]) -> list[str]:
    """The secret values in ``argv`` (see :func:`masked_argv`), also as YAML reads them, for :func:`mask`."""
    found: list[str] = []
    for arg in argv:
        found.extend(m.group(2) for m in _URL_PASSWORD.finditer(arg))
        secret = _secret_argument(arg)
        if secret and secret[1]:
            found.append(secret[1])
            try:
                found.extend(_leaves(yaml.safe_load(secret[1])))
            except yaml.YAMLError:
                pass
    return sorted({s for s in found if s}, key=len, reverse=True)


def _leaves(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    elif value is not None:
        yield str(value)


def mask(text: str, secrets: list[str]) -> str:
    """``text`` with every one of ``secrets``, and every URL's password, replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return _URL_PASSWORD.sub(rf"\1:{MASK}@", text)
