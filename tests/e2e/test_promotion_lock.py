"""The promotion lock with real processes: it excludes, it times out with a clear message, and a
holder killed with SIGKILL (or a stale registry lock) does not block the next promote."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cars_ml.promotion_lock import LOCK_SUFFIX, LockLostError, lock_method, promotion_lock

ROOT = Path(__file__).resolve().parents[2]
MODEL = "stanford-cars-classifier"

HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from cars_ml.promotion_lock import promotion_lock
with promotion_lock(sys.argv[3], registry_uri=sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize(
    ("uri", "method"),
    [
        ("sqlite:///mlflow.db", "file"),
        ("sqlite:////tmp/x/mlflow.db", "file"),
        ("sqlite://", "registry"),  # in-memory: no file to lock beside
        ("postgresql://u:p@db:5432/mlflow", "postgres"),
        ("postgresql+psycopg2://db/mlflow", "postgres"),
        ("http://127.0.0.1:5000", "registry"),
        ("https://mlflow.example.com", "registry"),
        ("mysql://db/mlflow", "registry"),
    ],
)
def test_lock_method_follows_the_registry_uri(uri, method, monkeypatch):
    monkeypatch.delenv("CARS_ML_PROMOTE_LOCK", raising=False)
    assert lock_method(uri) == method


def test_unknown_lock_method_is_refused(monkeypatch):
    monkeypatch.setenv("CARS_ML_PROMOTE_LOCK", "carrier-pigeon")
    with pytest.raises(ValueError, match="lock method must be one of"):
        lock_method("sqlite:///mlflow.db")


def _hold(uri: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(ROOT), uri, MODEL], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _killed_holder_does_not_block(uri: str) -> None:
    holder = _hold(uri)
    try:
        with (
            pytest.raises(TimeoutError, match="held the promotion lock"),
            promotion_lock(MODEL, registry_uri=uri, timeout_s=0.3),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    start = time.monotonic()
    with promotion_lock(MODEL, registry_uri=uri, timeout_s=10) as held:
        held.verify()
    assert time.monotonic() - start < 5


@pytest.mark.e2e
def test_file_lock_excludes_and_dies_with_its_holder(tmp_path, monkeypatch):
    monkeypatch.delenv("CARS_ML_PROMOTE_LOCK", raising=False)
    _killed_holder_does_not_block(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.e2e
def test_registry_lock_excludes_releases_and_takes_over_a_stale_lock(tracking_uri):
    client = MlflowClient()
    lock_name = MODEL + LOCK_SUFFIX
    with promotion_lock(MODEL, method="registry") as held:
        assert client.get_registered_model(lock_name).tags["owner"] == held.owner
        with pytest.raises(TimeoutError), promotion_lock(MODEL, method="registry", timeout_s=0.3):
            pass
    assert lock_name not in {m.name for m in client.search_registered_models()}

    # A holder that died long ago: its lock has expired and is taken over.
    client.create_registered_model(lock_name, tags={"owner": "ghost:1:x", "expires_at": "1.0"})
    with promotion_lock(MODEL, method="registry", timeout_s=5) as held:
        held.verify()
        # Someone else taking the lock over is noticed before anything is written.
        client.set_registered_model_tag(lock_name, "owner", "thief:2:y")
        with pytest.raises(LockLostError, match="thief"):
            held.verify()


@pytest.mark.e2e
def test_registry_lock_released_while_the_store_checks_the_duplicate(tracking_uri, monkeypatch):
    """MLflow's SQL store answers a duplicate name by reading the existing model again. When the
    holder releases the lock exactly then, that read says "not found": the waiter must retry and
    take the lock, not fail (a real interleaving, seen about once in ten two-promote races)."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    client = MlflowClient()
    lock_name = MODEL + LOCK_SUFFIX
    future = f"{time.time() + 600:.3f}"
    client.create_registered_model(lock_name, tags={"owner": "other:1:x", "expires_at": future})
    real_get = SqlAlchemyStore.get_registered_model
    real_delete = SqlAlchemyStore.delete_registered_model
    released = []

    def get_after_release(store, name):
        if name == lock_name and not released:
            released.append(name)
            real_delete(store, name)  # The holder lets go between the insert and the re-read.
        return real_get(store, name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", get_after_release)
    with promotion_lock(MODEL, method="registry", timeout_s=5) as held:
        assert released == [lock_name]
        held.verify()
    assert lock_name not in {m.name for m in client.search_registered_models()}


@pytest.mark.e2e
@pytest.mark.postgres
def test_postgres_advisory_lock_excludes_and_dies_with_its_holder(postgres_url):
    _killed_holder_does_not_block(postgres_url)


@pytest.mark.e2e
@pytest.mark.postgres
def test_postgres_lock_lost_with_its_connection_is_noticed(postgres_url):
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    with promotion_lock(MODEL, registry_uri=postgres_url) as held:
        held.verify()
        with engine.connect() as conn:
            # Drop the lock holder's session, as a failed network or server restart would.
            conn.execute(
                sqlalchemy.text("SELECT pg_terminate_backend(:pid)"),
                {"pid": held.details["backend_pid"]},
            )
            conn.commit()
        time.sleep(0.2)
        with pytest.raises(LockLostError):
            held.verify()
    engine.dispose()
