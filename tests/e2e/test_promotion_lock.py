"""The promotion lock with real processes: it excludes, it times out with a clear message, a
holder killed with SIGKILL (or a stale lock) does not block the next promote, a lock that cannot
be taken over waits with pauses until its timeout, the lock is the same however the store is
reached, and a holder keeps its lock past the lease by renewing it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, PERMISSION_DENIED
from servers import sqlite_tracking_server

from cars_ml.promotion.lock import LOCK_SUFFIX, LockLostError, lease_ttl_s, promotion_lock

ROOT = Path(__file__).resolve().parents[2]
MODEL = "stanford-cars-classifier"

HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from cars_ml.promotion.lock import promotion_lock
ttl = float(sys.argv[4]) if len(sys.argv) > 4 else None
with promotion_lock(sys.argv[3], registry_uri=sys.argv[2], ttl_s=ttl) as held:
    print("held", flush=True)
    # Hold until told (a line on stdin), or for two minutes.
    if len(sys.argv) > 5:
        sys.stdin.readline()
    else:
        time.sleep(120)
    held.verify()
    print("still ours", flush=True)
"""


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_lease_that_is_not_a_positive_number_is_refused(value, monkeypatch):
    monkeypatch.setenv("CARS_ML_PROMOTE_LOCK_TTL_S", value)
    with pytest.raises(ValueError, match="lease must be a number of seconds > 0"):
        lease_ttl_s()


def _hold(uri: str, model: str = MODEL, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(ROOT), uri, model, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
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
def test_sqlite_lock_excludes_and_dies_with_its_holder(tmp_path):
    # The holder's lease runs for a minute: only recognising its process as gone frees it.
    _killed_holder_does_not_block(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.e2e
def test_registry_lock_excludes_releases_and_takes_over_a_stale_lock(tracking_uri):
    client = MlflowClient()
    lock_name = MODEL + LOCK_SUFFIX
    with promotion_lock(MODEL) as held:
        assert client.get_registered_model(lock_name).tags["owner"] == held.owner
        with pytest.raises(TimeoutError), promotion_lock(MODEL, timeout_s=0.3):
            pass
    assert lock_name not in {m.name for m in client.search_registered_models()}

    # A holder that died long ago: its lock has expired and is taken over.
    client.create_registered_model(lock_name, tags={"owner": "ghost:1:x", "expires_at": "1.0"})
    with promotion_lock(MODEL, timeout_s=5) as held:
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
    with promotion_lock(MODEL, timeout_s=5) as held:
        assert released == [lock_name]
        held.verify()
    assert lock_name not in {m.name for m in client.search_registered_models()}


@pytest.mark.e2e
@pytest.mark.postgres
def test_postgres_lock_excludes_and_dies_with_its_holder(postgres_url):
    _killed_holder_does_not_block(postgres_url)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `mlflow server` on SQLite for the tests below; each uses its own model name."""
    with sqlite_tracking_server(tmp_path_factory.mktemp("lock-server")) as running:
        yield running


def _name() -> str:
    return f"lock-test-{uuid.uuid4().hex[:8]}"


@pytest.mark.e2e
@pytest.mark.parametrize("holder_via", ["database", "server"])
def test_the_lock_is_the_same_through_the_database_url_and_the_server(server, holder_via):
    """Promotes of one store may reach it both ways (a pod through the server, an operator with
    the database URL): a holder either way must block a waiter the other way."""
    holder_uri, waiter_uri = (server.database_uri, server.uri)
    if holder_via == "server":
        holder_uri, waiter_uri = waiter_uri, holder_uri
    model = _name()
    holder = _hold(holder_uri, model)
    try:
        with (
            pytest.raises(TimeoutError, match="held the promotion lock"),
            promotion_lock(model, registry_uri=waiter_uri, timeout_s=1),
        ):
            pass
        client = MlflowClient(tracking_uri=waiter_uri, registry_uri=waiter_uri)
        lock = client.get_registered_model(model + LOCK_SUFFIX)
        assert lock.tags["owner"].split(":")[1] == str(holder.pid)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.e2e
def test_a_move_longer_than_the_lease_keeps_its_lock(server):
    """The holder renews its 2 s lease while it works for longer than two leases (until the
    waiter has given up): the waiter must not take the lock over, and the holder still owns it."""
    model = _name()
    holder = _hold(server.uri, model, "2", "until-told")
    try:
        with (
            pytest.raises(TimeoutError, match="held the promotion lock"),
            promotion_lock(model, registry_uri=server.uri, timeout_s=5, ttl_s=2),
        ):
            pass
        out, _ = holder.communicate("done\n", timeout=30)
        assert (out.strip(), holder.returncode) == ("still ours", 0)
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    with promotion_lock(model, registry_uri=server.uri, timeout_s=2) as held:
        held.verify()


@pytest.mark.e2e
@pytest.mark.parametrize("code", [PERMISSION_DENIED, INTERNAL_ERROR], ids=["403", "500"])
def test_a_stale_lock_that_cannot_be_removed_waits_with_pauses_until_the_timeout(
    server, monkeypatch, code
):
    """An expired lock whose removal is refused (no permission) or fails (server error): the
    waiter must pause between attempts and give up at its timeout, naming the cause."""
    model = _name()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # As a promote run would have it.
    client = MlflowClient(registry_uri=server.uri)
    client.create_registered_model(
        model + LOCK_SUFFIX, tags={"owner": "ghost:1:x", "expires_at": "1.0"}
    )
    calls = []

    def refuse(self, name):
        calls.append(time.monotonic())
        if len(calls) > 40:  # Without pauses it would spin here for ever.
            pytest.fail(f"{len(calls)} deletes in {calls[-1] - calls[0]:.2f} s: no pause")
        raise MlflowException(f"delete of {name} refused", error_code=code)

    monkeypatch.setattr(MlflowClient, "delete_registered_model", refuse)
    start = time.monotonic()
    with (
        pytest.raises(TimeoutError, match="could not be removed") as caught,
        promotion_lock(model, registry_uri=server.uri, timeout_s=2),
    ):
        pass
    elapsed = time.monotonic() - start
    assert 2.0 <= elapsed < 3.5, elapsed  # At its timeout, not a pause early.
    assert 3 <= len(calls) <= 20, len(calls)
    assert model + LOCK_SUFFIX in str(caught.value)


def test_a_lock_taken_over_between_two_writes_stops_the_move_before_the_next(
    tracking_uri, monkeypatch
):
    """run_promote reads the lock's owner again before every write of its move, not only when
    the move starts: a takeover after write 3 (another promoter judging the lease stale) stops
    it before write 4, long before the lease's heartbeat would notice."""
    from mlflow.entities import Metric

    from cars_ml import SERVING_CODE_TAG, SERVING_CODE_VERSION
    from cars_ml.promotion import moves
    from cars_ml.promotion.policy import PromotionConfig
    from cars_ml.promotion.run import run_promote

    client = MlflowClient()
    client.create_registered_model(MODEL)
    run_id = client.create_run(client.create_experiment("train")).info.run_id
    metrics = {
        "test_f1_macro": 0.8,
        "latency_ms_p95": 30.0,
        "model_size_mb": 17.0,
        "int8_f1_drop": 0,
    }
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    tags = {SERVING_CODE_TAG: str(SERVING_CODE_VERSION)}
    client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id, tags=tags)
    write, written = moves._Writes.__call__, []

    def taken_over_after_three(self, *args):
        if self.count == 3:
            client.delete_registered_model(MODEL + LOCK_SUFFIX)
            client.create_registered_model(MODEL + LOCK_SUFFIX, tags={"owner": "other:1:x"})
        write(self, *args)
        written.append(self.count)

    monkeypatch.setattr(moves._Writes, "__call__", taken_over_after_three)
    with pytest.raises(LockLostError, match="now held by other:1:x"):
        run_promote(PromotionConfig(), MODEL, lock_timeout_s=5)
    assert written == [1, 2, 3]


def test_a_lock_squatted_by_a_party_that_may_not_promote_moves_away(tracking_uri, monkeypatch):
    """A read-only user may create registered models, so it can create the lock first with a
    lease for ever, and only it may delete that. The promoters confirm themselves on the
    promoted model (which it cannot edit): the unconfirmed lock is moved away from, and a real
    holder, confirmed, still excludes."""
    client = MlflowClient()
    client.create_registered_model(MODEL)
    squatted = MODEL + LOCK_SUFFIX
    client.create_registered_model(squatted, tags={"owner": "reader:1:x", "expires_at": "9e12"})
    delete = MlflowClient.delete_registered_model

    def only_its_owner_deletes_it(self, name):
        if name == squatted:
            raise MlflowException(f"no permission on {name}", error_code=PERMISSION_DENIED)
        return delete(self, name)

    monkeypatch.setattr(MlflowClient, "delete_registered_model", only_its_owner_deletes_it)
    with promotion_lock(MODEL, timeout_s=5, grace_s=0) as held:
        assert held.lock_name.startswith(squatted + "-")
        held.verify()
        assert client.get_registered_model(MODEL).tags["promote_lock_name"] == held.lock_name
        # A confirmed holder is not a squatter: another promoter waits for it.
        with pytest.raises(TimeoutError), promotion_lock(MODEL, timeout_s=0.5, grace_s=0):
            pass
        held.verify()
    with promotion_lock(MODEL, timeout_s=2, grace_s=0) as again:
        assert again.lock_name == held.lock_name  # the moved lock, taken at once
    assert client.get_registered_model(squatted).tags["owner"] == "reader:1:x"
