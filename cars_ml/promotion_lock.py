"""A lock that serialises promotions of one registered model across processes and hosts.

Two ``promote`` runs at the same time must leave one champion and one consistent
``champion_history``: each takes this lock, re-reads the registry, decides and applies, then
lets go. The mechanism follows the registry URI:

- ``sqlite:///path``: an exclusive ``fcntl.flock`` on ``path.promote-lock`` beside the database.
  The kernel drops it when the holder dies, so a killed promote never blocks the next one.
  Limit: processes on the same host (which SQLite needs anyway); POSIX only.
- ``postgresql://``: a session-level ``pg_try_advisory_lock`` on a dedicated connection, keyed by
  the model name. PostgreSQL drops it when the holder's connection ends (process killed,
  network lost); ``verify()`` notices a lost connection before anything is written.
- anything else (``http(s)://`` tracking servers, other SQL stores): a lock *registered model*
  named ``<model>--promote-lock``. Creating a registered model is atomic (the name is the
  primary key in the server's database), so exactly one creator wins; the holder deletes it on
  release. Owner and expiry are tags: a lock left by a killed process is taken over after
  ``ttl_s``. Limits: the lock model is briefly visible in the registry UI, and two waiters that
  take over the same expired lock at the same instant can race; ``verify()`` re-reads the
  owner just before writing, so the loser aborts rather than writes.

``CARS_ML_PROMOTE_LOCK=file|postgres|registry`` forces a mechanism (tests, unusual stores).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_SUFFIX = "--promote-lock"
METHODS = ("auto", "file", "postgres", "registry")
_POLL_S = 0.1


class LockLostError(RuntimeError):
    """The promotion lock is no longer held: another process may be promoting."""


def lock_method(registry_uri: str, method: str = "auto") -> str:
    """The mechanism for ``registry_uri``: file (sqlite), postgres, or registry."""
    method = os.environ.get("CARS_ML_PROMOTE_LOCK", method) if method == "auto" else method
    if method not in METHODS:
        raise ValueError(f"lock method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    if registry_uri.startswith("sqlite:") and _sqlite_path(registry_uri) is not None:
        return "file"
    if registry_uri.startswith(("postgresql:", "postgresql+", "postgres:")):
        return "postgres"
    return "registry"


def _sqlite_path(uri: str) -> Path | None:
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _timeout(model_name: str, timeout_s: float) -> TimeoutError:
    return TimeoutError(
        f"Another promote of {model_name!r} held the promotion lock for over {timeout_s:.0f} s. "
        "Wait for it to finish and retry; if no promote is running, see README 'Promotion' "
        "(locking) for clearing a stale lock."
    )


class _Held:
    """What ``promotion_lock`` yields: the method and a way to check the lock is still ours."""

    def __init__(self, method: str, owner: str, verify, **details) -> None:
        self.method = method
        self.owner = owner
        self.details = details  # e.g. the PostgreSQL backend pid holding the advisory lock
        self._verify = verify

    def verify(self) -> None:
        """Raise ``LockLostError`` if the lock is no longer held by this process."""
        self._verify()


@contextlib.contextmanager
def _file_lock(path: Path, model_name: str, timeout_s: float) -> Iterator[_Held]:
    import fcntl

    lock_path = path.with_name(path.name + ".promote-lock")
    deadline = time.monotonic() + timeout_s
    with open(lock_path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _timeout(model_name, timeout_s) from None
                time.sleep(_POLL_S)
        try:
            yield _Held("file", _owner(), lambda: None)
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _postgres_driver(uri: str):
    """``uri`` with a driver that is installed: SQLAlchemy 2.1 maps a bare ``postgresql://`` to
    psycopg 3 (which the project pins); fall back to psycopg2 where only that is installed."""
    import importlib.util

    from sqlalchemy.engine import make_url

    url = make_url(uri)
    if url.drivername in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is None:
        url = url.set(drivername="postgresql+psycopg2")
    return url


@contextlib.contextmanager
def _postgres_lock(uri: str, model_name: str, timeout_s: float) -> Iterator[_Held]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    # A signed 64-bit key derived from the model name: one lock per registered model.
    digest = hashlib.blake2b(f"cars_ml.promote:{model_name}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "big", signed=True)
    engine = sqlalchemy.create_engine(_postgres_driver(uri), poolclass=NullPool)
    deadline = time.monotonic() + timeout_s
    try:
        with engine.connect() as conn:
            try_lock = sqlalchemy.text("SELECT pg_try_advisory_lock(:k)")
            while not conn.execute(try_lock, {"k": key}).scalar():
                conn.rollback()
                if time.monotonic() > deadline:
                    raise _timeout(model_name, timeout_s)
                time.sleep(_POLL_S)
            conn.commit()

            def verify() -> None:
                held = sqlalchemy.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND pid = pg_backend_pid() AND granted"
                    " AND ((classid::bigint << 32) | objid::bigint) = :k"
                )
                try:
                    ok = conn.execute(held, {"k": key}).scalar() > 0
                    conn.commit()
                except sqlalchemy.exc.DBAPIError as exc:
                    raise LockLostError(f"promotion lock connection lost: {exc}") from exc
                if not ok:
                    raise LockLostError("promotion advisory lock is no longer held")

            try:
                pid = conn.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
                conn.commit()
                yield _Held("postgres", _owner(), verify, backend_pid=pid, key=key)
            finally:
                # A dead connection has already dropped the lock together with the session.
                with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
    finally:
        engine.dispose()


def _registry_lock_owner(client, lock_name: str) -> tuple[str | None, float]:
    """(owner, expires_at) of the lock model, or (None, 0) when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock_name).tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, 0.0
        raise
    return tags.get("owner"), float(tags.get("expires_at", "0") or 0)


@contextlib.contextmanager
def _registry_lock(model_name: str, timeout_s: float, ttl_s: float) -> Iterator[_Held]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    lock_name = model_name + LOCK_SUFFIX
    owner = _owner()
    deadline = time.monotonic() + timeout_s
    while True:
        tags = {"owner": owner, "expires_at": f"{time.time() + ttl_s:.3f}"}
        try:
            client.create_registered_model(
                lock_name, tags=tags, description=f"Promotion lock for {model_name}; do not use."
            )
            break
        except MlflowException as exc:
            # MLflow's SQL store answers a duplicate name by re-reading the existing model: when
            # the holder released it in between, that read fails with RESOURCE_DOES_NOT_EXIST.
            # Either way the lock was busy a moment ago and may be free now: try again.
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder, expires_at = _registry_lock_owner(client, lock_name)
        if holder is not None and expires_at < time.time():
            # The holder died without releasing. Re-read right before deleting so that a lock
            # freshly re-taken by another waiter is not deleted.
            if _registry_lock_owner(client, lock_name)[0] == holder:
                log.warning("taking over stale promotion lock of %s (expired)", holder)
                with contextlib.suppress(MlflowException):
                    client.delete_registered_model(lock_name)
            continue
        if time.monotonic() > deadline:
            raise _timeout(model_name, timeout_s)
        time.sleep(_POLL_S)

    def verify() -> None:
        holder, _ = _registry_lock_owner(client, lock_name)
        if holder != owner:
            raise LockLostError(f"promotion lock {lock_name!r} is now held by {holder}")

    try:
        yield _Held("registry", owner, verify)
    finally:
        if _registry_lock_owner(client, lock_name)[0] == owner:
            client.delete_registered_model(lock_name)
        else:
            log.error("promotion lock %r was taken over while held", lock_name)


@contextlib.contextmanager
def promotion_lock(
    model_name: str,
    *,
    registry_uri: str | None = None,
    method: str = "auto",
    timeout_s: float = 120.0,
    ttl_s: float = 600.0,
) -> Iterator[_Held]:
    """Hold the promotion lock of ``model_name``; TimeoutError after ``timeout_s`` of waiting.

    ``ttl_s`` only matters for the registry lock: after it, a lock is considered abandoned.
    """
    if registry_uri is None:
        import mlflow

        registry_uri = mlflow.get_registry_uri()
    chosen = lock_method(registry_uri, method)
    if chosen == "file":
        path = _sqlite_path(registry_uri)
        if path is None:
            raise ValueError(f"file lock needs a sqlite:///path registry URI, got {registry_uri}")
        manager = _file_lock(path, model_name, timeout_s)
    elif chosen == "postgres":
        manager = _postgres_lock(registry_uri, model_name, timeout_s)
    else:
        manager = _registry_lock(model_name, timeout_s, ttl_s)
    with manager as held:
        log.info("promotion lock of %s taken (%s, %s)", model_name, chosen, held.owner)
        yield held
