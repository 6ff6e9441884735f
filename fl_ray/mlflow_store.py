"""A fresh sqlite MLflow store in well under a second: a copy of a template made once per MLflow schema.

MLflow creates the tables of a new sqlite store by running every schema migration, which takes
seconds of CPU. :func:`prepare_sqlite_store` instead copies a template database that this MLflow
made once, kept in the user's cache directory (``$XDG_CACHE_HOME/fl_ray``, else ``~/.cache/fl_ray``)
under a name holding the MLflow version and its schema revision (the head of its alembic migrations).
A template is used only if its ``alembic_version`` row is that head revision (MLflow checks the same
again whenever it opens a store), and is made atomically (written aside, checked, then renamed), so
concurrent jobs and other MLflow versions never see a half-made or foreign one. After the copy, the
store's ``Default`` experiment is pointed at the workspace's artifact folder, as if MLflow had made
the store there. Whatever goes wrong, the store is left for MLflow to create as usual.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where fl_ray keeps files it can make again: ``$XDG_CACHE_HOME/fl_ray``, else ``~/.cache/fl_ray``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fl_ray"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for any other URI, or an in-memory one)."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in ("sqlite:///", "sqlite:///:memory:"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])


def schema_revision(path: Path) -> str | None:
    """The alembic revision the sqlite MLflow store at ``path`` is at (None if it has none)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _head_revision() -> str:
    """The schema revision this MLflow creates and expects (the head of its migrations)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def template_store() -> Path:
    """The cached template store for this MLflow version and schema revision, made now if there is none."""
    import mlflow

    head = _head_revision()
    template = cache_dir() / f"mlflow-{mlflow.__version__}-{head}.db"
    if schema_revision(template) == head:
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{template.name}.", dir=template.parent)
    os.close(fd)
    os.unlink(tmp)  # MLflow creates the file itself
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(f"sqlite:///{tmp}", (Path(tmp).parent / "mlartifacts").as_uri())
        store.engine.dispose()
        found = schema_revision(Path(tmp))
        if found != head:
            raise RuntimeError(f"MLflow made a store at schema revision {found}, expected {head}")
        os.replace(tmp, template)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return template


def prepare_sqlite_store(path: Path, artifact_root: Path) -> bool:
    """Create the sqlite MLflow store at ``path``, unless one exists, as a copy of the template store;
    its ``Default`` experiment keeps artifacts under ``artifact_root``. True if the store was made here;
    False if it existed, or if the template could not be used (MLflow then creates the store itself)."""
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        return False
    try:
        template = template_store()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        now = int(time.time() * 1000)
        with sqlite3.connect(tmp) as db:
            db.execute(
                "UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                "WHERE experiment_id = 0",
                (Path(artifact_root).resolve().as_uri(), now, now),
            )
        db.close()
        try:
            os.link(tmp, path)  # never replaces a store another process made meanwhile
        except FileExistsError:
            if path.stat().st_size > 0:
                return False
            os.replace(tmp, path)  # an empty file: nothing to keep
        finally:
            tmp.unlink(missing_ok=True)
    except Exception as exc:  # noqa: BLE001 - the template is a shortcut; MLflow can always make the store
        log.warning(
            "could not make the MLflow store %s from a template (%s: %s); MLflow creates it instead",
            path,
            type(exc).__name__,
            exc,
        )
        return False
    return True
