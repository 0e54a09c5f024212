"""Champion moves interrupted at every write: SIGKILL right after write n of a promote or a
rollback (``CARS_ML_FAULT_AFTER_WRITE=n``, in the promote entry point as a subprocess), then a
re-run. The re-run must end where an uninterrupted run would: alias and Production stage on the
same, correct version, one history event per move, the audit trail naming who moved what, and a
rollback never putting the bad version back.

Every write point is tried on SQLite (each on a copy of one seeded store); a subset against a
real ``mlflow server``, where both the killed run and the re-run go through HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from servers import sqlite_tracking_server

from cars_ml import SERVING_CODE_TAG, SERVING_CODE_VERSION
from cars_ml.promotion import moves, registry
from cars_ml.promotion.lock import LOCK_SUFFIX
from cars_ml.promotion.policy import PromotionConfig
from cars_ml.promotion.run import decide_now, run_promote

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MODEL = "stanford-cars-classifier"
MOVER = "alice"  # MLFLOW_TRACKING_USERNAME of the interrupted runs.
# The writes of each move below, intent and its clearing included; the tests past the last one
# check that no write goes uncounted.
PROMOTE_WRITES = 15  # v2 -> v3
ROLLBACK_WRITES = 16  # v3 -> v2
METRICS = {"latency_ms_p95": 30.0, "model_size_mb": 17.0, "int8_f1_drop": 0.01}
CURRENT_SERVING_CODE = {SERVING_CODE_TAG: str(SERVING_CODE_VERSION)}


def seed(model: str, champion_v3: bool) -> None:
    """Three versions (test F1 0.7, 0.8, 0.9) with v1 then v2 promoted; v3 too if asked."""
    client = MlflowClient()
    experiment = client.create_experiment(f"train-{uuid.uuid4().hex[:8]}")
    client.create_registered_model(model)
    for f1 in (0.70, 0.80, 0.90):
        run_id = client.create_run(experiment).info.run_id
        values = {**METRICS, "test_f1_macro": f1}
        client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in values.items()])
        client.set_terminated(run_id)
        client.create_model_version(
            model, source=f"runs:/{run_id}/model", run_id=run_id, tags=CURRENT_SERVING_CODE
        )
    moves.apply_promotion(model, "1", "seed", previous=None)
    moves.apply_promotion(model, "2", "seed", previous="1")
    if champion_v3:
        moves.apply_promotion(model, "3", "seed", previous="2")


def promote_entry(model: str, *args: str, fault: int | None, tracking_uri: str, cwd: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_TRACKING_USERNAME=MOVER)
    if fault is not None:
        env[moves.FAULT_ENV] = str(fault)
    command = [sys.executable, str(ROOT / "entrypoints" / "promote.py"), "--model_name", model]
    return subprocess.run(
        [*command, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def state(model: str) -> dict:
    client = MlflowClient()
    registered = client.get_registered_model(model)
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{model}'")}
    return {
        "champion": str(registered.aliases.get("champion")),
        "production": sorted(v for v, mv in versions.items() if mv.current_stage == "Production"),
        "history": json.loads(registered.tags["champion_history"]),
        "pending": registered.tags.get(moves.PENDING_TAG),
        "tags": {v: dict(mv.tags) for v, mv in versions.items()},
        "locked": bool(client.search_registered_models(f"name = '{model}{LOCK_SUFFIX}'")),
    }


def history_moves(history: list[dict]) -> list[tuple]:
    return [(e["action"], e["version"], e["previous"]) for e in history]


def assert_promoted_v3(model: str) -> None:
    """The final state of the promote v2 -> v3, whether interrupted or not."""
    now = state(model)
    assert (now["champion"], now["production"]) == ("3", ["3"])
    assert history_moves(now["history"]) == [
        ("promote", "1", None),
        ("promote", "2", "1"),
        ("promote", "3", "2"),
    ]
    assert len({e["id"] for e in now["history"]}) == 3
    last = now["history"][-1]
    assert last["by"] == f"mlflow:{MOVER}"
    v3, v2 = now["tags"]["3"], now["tags"]["2"]
    assert (v3["promoted_from_version"], v3["promotion_action"]) == ("2", "promote")
    assert (v3["promoted_by"], v3["promotion_move_id"]) == (last["by"], last["id"])
    assert v3["promoted_at"] == last["at"] and v3["promotion_run_id"] == last["run_id"]
    assert (v2["replaced_by_version"], v2["replaced_at"]) == ("3", last["at"])
    assert now["pending"] is None and not now["locked"]


def assert_rolled_back_to_v2(model: str) -> None:
    """The final state of the rollback v3 -> v2: v3 excluded, never champion again."""
    now = state(model)
    assert (now["champion"], now["production"]) == ("2", ["2"])
    assert history_moves(now["history"])[2:] == [("promote", "3", "2"), ("rollback", "2", "3")]
    assert len({e["id"] for e in now["history"]}) == 4
    last = now["history"][-1]
    assert last["by"] == f"mlflow:{MOVER}"
    v2, v3 = now["tags"]["2"], now["tags"]["3"]
    assert (v2["promotion_action"], v2["promoted_from_version"]) == ("rollback", "3")
    assert (v2["promoted_by"], v2["promotion_move_id"]) == (last["by"], last["id"])
    assert last["id"] in v3["promotion_excluded"] and v3["replaced_by_version"] == "2"
    assert registry.EXCLUDED_TAG not in v2
    assert now["pending"] is None and not now["locked"]
    # And the next promote keeps v2: the version rolled away from stays out.
    again = decide_now(PromotionConfig(), model)
    assert (again.action, again.new_champion) == ("keep", "2")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> dict[str, Path]:
    """Two SQLite stores to copy: champion v2 (to promote v3) and champion v3 (to roll back)."""
    stores = {}
    for name, champion_v3 in (("promote", False), ("rollback", True)):
        folder = tmp_path_factory.mktemp(f"seed-{name}")
        mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
        try:
            seed(MODEL, champion_v3)
        finally:
            mlflow.set_tracking_uri(None)
        stores[name] = folder / "mlflow.db"
    return stores


@pytest.fixture()
def store_copy(seeded, tmp_path, monkeypatch):
    """A fresh copy of a seeded store, selected for this process (``use("promote")``)."""

    def use(name: str) -> str:
        shutil.copy(seeded[name], tmp_path / "mlflow.db")
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            monkeypatch.delenv(var, raising=False)
        mlflow.set_tracking_uri(uri)
        return uri

    yield use
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _interrupt(model: str, args: tuple[str, ...], n: int, uri: str, cwd: Path, writes: int):
    """Run the entry point killed after write ``n``; past the last write it must finish."""
    done = promote_entry(model, *args, fault=n, tracking_uri=uri, cwd=cwd)
    if n <= writes:
        assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-3000:])
        # Until the last write (clearing it) the intent says what to finish.
        assert (state(model)["pending"] is None) == (n == writes)
    else:
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("n", range(1, PROMOTE_WRITES + 2))
def test_a_promote_killed_after_any_write_is_finished_by_the_next_promote(store_copy, tmp_path, n):
    uri = store_copy("promote")
    _interrupt(MODEL, (), n, uri, tmp_path, PROMOTE_WRITES)
    decision = run_promote(PromotionConfig(), MODEL, lock_timeout_s=10)
    assert (decision.action, decision.new_champion) == ("keep", "3")
    assert_promoted_v3(MODEL)


@pytest.mark.parametrize("n", range(1, ROLLBACK_WRITES + 2))
def test_a_rollback_killed_after_any_write_is_finished_not_repeated_by_its_rerun(
    store_copy, tmp_path, n
):
    uri = store_copy("rollback")
    _interrupt(MODEL, ("--rollback", "true"), n, uri, tmp_path, ROLLBACK_WRITES)
    if n < ROLLBACK_WRITES:
        # Killed before the intent was cleared: the re-run completes the rollback that was
        # asked for, not a second step back. (After its last write the rollback is complete,
        # and a re-run is a rollback of its own.)
        decision = run_promote(PromotionConfig(rollback=True), MODEL, lock_timeout_s=10)
        assert (decision.action, decision.new_champion) == ("rollback", "2")
    else:
        decision = run_promote(PromotionConfig(), MODEL, lock_timeout_s=10)
        assert (decision.action, decision.new_champion) == ("keep", "2")
    assert_rolled_back_to_v2(MODEL)


def test_a_promote_after_an_interrupted_rollback_finishes_it_and_keeps_the_bad_version_out(
    store_copy, tmp_path
):
    uri = store_copy("rollback")
    _interrupt(MODEL, ("--rollback", "true"), 3, uri, tmp_path, ROLLBACK_WRITES)
    decision = run_promote(PromotionConfig(), MODEL, lock_timeout_s=10)
    assert (decision.action, decision.new_champion) == ("keep", "2")
    assert decision.reason.startswith("Finished the interrupted rollback v3 -> v2")
    assert_rolled_back_to_v2(MODEL)


def test_a_dry_run_reports_an_interrupted_move_and_decides_as_if_finished(store_copy, tmp_path):
    uri = store_copy("rollback")
    _interrupt(MODEL, ("--rollback", "true"), 2, uri, tmp_path, ROLLBACK_WRITES)
    before = state(MODEL)
    assert before["champion"] == "3"  # Only the intent and v3's exclusion are written.
    decision = run_promote(PromotionConfig(dry_run=True), MODEL)
    assert (decision.action, decision.new_champion) == ("keep", "2")
    assert "interrupted rollback v3 -> v2" in decision.reason and "is pending" in decision.reason
    again = run_promote(PromotionConfig(dry_run=True, rollback=True), MODEL)
    assert (again.action, again.challenger) == ("rollback", "2")
    assert state(MODEL) == before
    run = mlflow.search_runs(experiment_names=["stanford-cars-promotion"]).iloc[0]
    assert json.loads(run["tags.pending_move"])["to"] == "2"


def test_an_interrupted_move_whose_target_was_deleted_is_undone(store_copy, tmp_path):
    uri = store_copy("promote")
    _interrupt(MODEL, (), 3, uri, tmp_path, PROMOTE_WRITES)  # The alias is on v3 now.
    MlflowClient().delete_model_version(MODEL, "3")
    decision = run_promote(PromotionConfig(), MODEL, lock_timeout_s=10)
    assert decision.reason.startswith("Undid the interrupted promote v2 -> v3")
    assert (decision.action, decision.new_champion) == ("keep", "2")
    now = state(MODEL)
    assert (now["champion"], now["production"], now["pending"]) == ("2", ["2"], None)
    assert history_moves(now["history"]) == [("promote", "1", None), ("promote", "2", "1")]


def test_a_sigterm_before_the_history_write_does_not_let_a_rollback_rerun_restore_v3(
    store_copy, monkeypatch
):
    """SIGTERM reaches the entry point as KeyboardInterrupt (entrypoints/_common.py): here it
    lands just before ``champion_history`` is written, after the alias moved to v2. Replaying an
    unchanged history, a re-run would see v3 as the last recorded champion and restore it."""
    store_copy("rollback")
    real = MlflowClient.set_registered_model_tag

    def interrupted(self, name, key, value):
        if key == registry.HISTORY_TAG:
            raise KeyboardInterrupt
        return real(self, name, key, value)

    monkeypatch.setattr(MlflowClient, "set_registered_model_tag", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_promote(PromotionConfig(rollback=True), MODEL, lock_timeout_s=10)
    monkeypatch.setattr(MlflowClient, "set_registered_model_tag", real)
    assert state(MODEL)["champion"] == "2"
    decision = run_promote(PromotionConfig(rollback=True), MODEL, lock_timeout_s=10)
    assert decision.new_champion == "2"
    now = state(MODEL)
    assert (now["champion"], now["production"]) == ("2", ["2"])
    assert history_moves(now["history"])[-1] == ("rollback", "2", "3")


def test_a_move_records_the_os_user_without_an_mlflow_user(store_copy, monkeypatch):
    import getpass
    import socket

    store_copy("promote")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.setenv("HOME", str(Path.cwd()))  # No ~/.mlflow/credentials either.
    run_promote(PromotionConfig(), MODEL, lock_timeout_s=10)
    expected = f"os:{getpass.getuser()}@{socket.gethostname()}"
    assert state(MODEL)["history"][-1]["by"] == expected
    assert state(MODEL)["tags"]["3"]["promoted_by"] == expected


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with sqlite_tracking_server(tmp_path_factory.mktemp("crash-server")) as running:
        yield running


@pytest.fixture()
def on_server(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(server.uri)
    yield server.uri
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize(
    ("action", "n"),
    [("promote", 2), ("promote", PROMOTE_WRITES - 1), ("rollback", 3), ("rollback", 9)],
)
def test_a_move_killed_on_a_tracking_server_is_finished_by_the_rerun(
    on_server, tmp_path, action, n
):
    model = f"crash-{action}-{n}-{uuid.uuid4().hex[:6]}"
    seed(model, champion_v3=action == "rollback")
    args = ("--rollback", "true") if action == "rollback" else ()
    writes = ROLLBACK_WRITES if action == "rollback" else PROMOTE_WRITES
    _interrupt(model, args, n, on_server, tmp_path, writes)
    rerun = promote_entry(model, *args, fault=None, tracking_uri=on_server, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if action == "rollback":
        assert_rolled_back_to_v2(model)
    else:
        assert_promoted_v3(model)
