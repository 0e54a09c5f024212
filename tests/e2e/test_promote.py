"""`promote` end to end on a temporary SQLite registry: alias, stage, audit trail, artifacts,
dry run, rollback, an empty registry, and two promotes racing for the champion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
import pytest
from mlflow import MlflowClient
from servers import free_port, mlflow_server_command, process_group, wait_http

from cars_ml import SERVING_CODE_TAG, SERVING_CODE_VERSION
from cars_ml.promotion.lock import promotion_lock
from cars_ml.promotion.policy import PromotionConfig
from cars_ml.promotion.run import PROMOTION_EXPERIMENT, run_promote

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MODEL = "stanford-cars-classifier"
GOOD = {
    "test_f1_macro": 0.70,
    "test_f1_weighted": 0.71,
    "test_accuracy": 0.72,
    "test_top5_accuracy": 0.9,
    "latency_ms_p50": 20.0,
    "latency_ms_p95": 30.0,
    "throughput_img_per_s": 50.0,
    "model_size_mb": 17.0,
    "num_params": 4.2e6,
    "tflite_int8_size_mb": 4.3,
    "tflite_int8_latency_ms_p50": 4.0,
    "tflite_int8_test_f1_macro": 0.69,
    "int8_f1_drop": 0.01,
}


class Echo(mlflow.pyfunc.PythonModel):
    """The cheapest registrable model: promotion never loads it."""

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


@pytest.fixture()
def train_experiment(tracking_uri, tmp_path, monkeypatch) -> str:
    # Every artifact (this process's and the promote subprocesses') lands under tmp_path.
    monkeypatch.chdir(tmp_path)
    return mlflow.create_experiment("train", artifact_location=(tmp_path / "artifacts").as_uri())


def register(experiment_id: str, backbone: str = "mobilenet", **metrics: float) -> str:
    """Log a run with the training metric schema and register a trivial model from it."""
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.log_param("backbone", backbone)
        mlflow.log_metrics({**GOOD, **metrics})
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=Echo(),
            pip_requirements=["mlflow"],
            registered_model_name=MODEL,
        )
    version = str(info.registered_model_version)
    # As the train step registers: with the record of the current serving code.
    MlflowClient().set_model_version_tag(MODEL, version, SERVING_CODE_TAG, SERVING_CODE_VERSION)
    return version


def promote_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(ROOT / "entrypoints" / "promote.py"),
        "--model_name",
        MODEL,
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def champion() -> str:
    return str(MlflowClient().get_model_version_by_alias(MODEL, "champion").version)


def stages() -> dict[str, str]:
    return {
        str(v.version): v.current_stage
        for v in MlflowClient().search_model_versions(f"name='{MODEL}'")
    }


def history() -> list[dict]:
    return json.loads(MlflowClient().get_registered_model(MODEL).tags["champion_history"])


def promote_runs() -> pd.DataFrame:
    return mlflow.search_runs(experiment_names=[PROMOTION_EXPERIMENT], order_by=["start_time ASC"])


def snapshot() -> dict:
    client = MlflowClient()
    model = client.get_registered_model(MODEL)
    versions = client.search_model_versions(f"name='{MODEL}'")
    return {
        "aliases": dict(model.aliases),
        "model_tags": dict(model.tags),
        "versions": {str(v.version): (v.current_stage, dict(v.tags)) for v in versions},
    }


def test_promote_moves_alias_and_stage_with_audit_trail_then_rolls_back(train_experiment, tmp_path):
    v1 = register(train_experiment, test_f1_macro=0.70)
    assert run_promote(PromotionConfig(), MODEL).action == "promote"
    v2 = register(train_experiment, "xception", test_f1_macro=0.95, latency_ms_p95=150.0)
    v3 = register(train_experiment, "mobilenet_v2", test_f1_macro=0.80)

    done = promote_cli("--min_improvement", "0.05")
    assert done.returncode == 0, done.stderr
    assert "Decision: PROMOTE (champion: 1 -> 3)" in done.stdout
    assert champion() == v3
    assert stages() == {v1: "Archived", v2: "None", v3: "Production"}

    run = promote_runs().iloc[-1]
    assert run["tags.decision"] == "promote" and run["tags.champion_version"] == v3
    assert run["params.policy.max_latency_ms"] == "100.0"
    assert run["metrics.candidates"] == 3 and run["metrics.eligible"] == 2
    tags = MlflowClient().get_model_version(MODEL, v3).tags
    assert tags["promoted_from_version"] == v1
    assert tags["promotion_run_id"] == run["run_id"]
    assert "beats champion v1 by test_f1_macro +0.1" in tags["promotion_reason"]
    assert tags["promoted_at"].startswith(time.strftime("%Y"))
    assert MlflowClient().get_model_version(MODEL, v1).tags["replaced_by_version"] == v3
    # The registry page explains itself: the model, its champion, how to serve it; each version
    # its backbone, headline metrics and the budgets it passed or failed.
    model_text = MlflowClient().get_registered_model(MODEL).description
    assert "**Champion:** version 3 (mobilenet_v2)" in model_text
    assert f"mlflow models serve -m models:/{MODEL}@champion --env-manager local" in model_text
    described = {v: MlflowClient().get_model_version(MODEL, v).description for v in (v2, v3)}
    assert described[v3].startswith("**mobilenet_v2** — the current **champion**")
    assert "| test macro-F1 | 0.8000 |" in described[v3]
    assert "| latency p95 (ms) | 30.0 |" in described[v3]
    assert "passes every promotion budget" in described[v3]
    assert described[v2].startswith("**xception**\n")
    assert "fails the promotion budgets: " in described[v2] and "latency" in described[v2]
    assert [(e["action"], e["version"], e["previous"]) for e in history()] == [
        ("promote", v1, None),
        ("promote", v3, v1),
    ]

    artifacts = Path(
        mlflow.artifacts.download_artifacts(run_id=run["run_id"], dst_path=str(tmp_path / "dl"))
    )
    assert {"candidates.csv", "candidates.html", "candidates_plot.png"} <= {
        p.name for p in artifacts.iterdir()
    }
    table = pd.read_csv(artifacts / "candidates.csv", dtype={"version": str}).set_index("version")
    assert table.loc[v2, "latency_reason"] == "latency_ms_p95 150.0 > max_latency_ms 100.0"
    assert not table.loc[v2, "latency_pass"] and table.loc[v3, "eligible"]
    assert (
        "latency_ms_p95 150.0 &gt; max_latency_ms 100.0"
        in (artifacts / "candidates.html").read_text()
    )
    assert (artifacts / "candidates_plot.png").read_bytes()[:4] == b"\x89PNG"

    back = promote_cli("--rollback", "true")
    assert back.returncode == 0, back.stderr
    assert champion() == v1
    assert stages() == {v1: "Production", v2: "None", v3: "Archived"}
    tags = MlflowClient().get_model_version(MODEL, v1).tags
    assert (tags["promotion_action"], tags["promoted_from_version"]) == ("rollback", v3)
    assert history()[-1] == {**history()[-1], "action": "rollback", "version": v1, "previous": v3}
    assert promote_runs().iloc[-1]["tags.decision"] == "rollback"

    # The version rolled away from is excluded, so the next promote does not bring it back.
    assert (
        "rolled back from champion"
        in MlflowClient().get_model_version(MODEL, v3).tags["promotion_excluded"]
    )
    again = run_promote(PromotionConfig(), MODEL)
    assert (again.action, again.new_champion) == ("keep", v1)
    assert (
        again.table.set_index("version")
        .loc[v3, "excluded_reason"]
        .startswith("excluded: rolled back")
    )

    # v1 was the first champion: there is nothing earlier, and nothing moves.
    with pytest.raises(ValueError, match="Nothing to roll back to"):
        run_promote(PromotionConfig(rollback=True), MODEL)
    assert champion() == v1 and len(history()) == 3


def test_dry_run_reports_the_decision_and_changes_nothing(train_experiment):
    register(train_experiment, test_f1_macro=0.70)
    run_promote(PromotionConfig(), MODEL)
    register(train_experiment, test_f1_macro=0.90)
    before = snapshot()

    done = promote_cli("--dry_run", "true")
    assert done.returncode == 0, done.stderr
    assert "Decision: PROMOTE (champion: 1 -> 2, not applied: dry run)" in done.stdout
    assert snapshot() == before
    run = promote_runs().iloc[-1]
    assert (run["tags.decision"], run["tags.dry_run"], run["tags.challenger_version"]) == (
        "promote",
        "true",
        "2",
    )
    assert run["tags.champion_version"] == "1"
    names = {a.path for a in MlflowClient().list_artifacts(run["run_id"])}
    assert {"candidates.csv", "candidates.html", "candidates_plot.png"} <= names


def test_empty_registry_exits_non_zero_with_the_command_to_fix_it(
    tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    done = promote_cli()
    assert done.returncode == 2
    assert f"Registered model '{MODEL}' has no versions" in done.stderr
    assert (
        "train and register a model first: `mlflow run . -e train --env-manager local`"
        in done.stderr
    )
    assert "Traceback" not in done.stderr


def _race_two_promotes(train_experiment: str) -> None:
    """Two promote processes wait on the lock held here, then race: one promotes, one keeps."""
    v1 = register(train_experiment, test_f1_macro=0.70)
    run_promote(PromotionConfig(), MODEL)
    register(train_experiment, test_f1_macro=0.80)
    v3 = register(train_experiment, test_f1_macro=0.90)

    # Hold the lock so both promotes are demonstrably waiting, then let them race for it.
    with promotion_lock(MODEL):
        procs = [
            subprocess.Popen(
                [sys.executable, str(ROOT / "entrypoints" / "promote.py"), "--model_name", MODEL],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 60
        while (promote_runs()["status"] == "RUNNING").sum() < 2:
            assert time.monotonic() < deadline, [
                p.communicate() for p in procs if p.poll() is not None
            ]
            time.sleep(0.2)
        time.sleep(0.5)
        assert champion() == v1, "a promote moved the champion while another held the lock"
    outputs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    assert champion() == v3
    assert [s for s in stages().values()].count("Production") == 1
    runs = promote_runs().iloc[1:]
    assert sorted(runs["tags.decision"]) == ["keep", "promote"]
    winner = runs[runs["tags.decision"] == "promote"].iloc[0]
    assert [(e["action"], e["version"], e["previous"]) for e in history()] == [
        ("promote", v1, None),
        ("promote", v3, v1),
    ]
    assert history()[-1]["run_id"] == winner["run_id"]
    assert MlflowClient().get_model_version(MODEL, v3).tags["promotion_run_id"] == winner["run_id"]
    assert MODEL + "--promote-lock" not in {
        m.name for m in MlflowClient().search_registered_models()
    }


def test_two_promotes_at_once_leave_one_champion_and_one_story(train_experiment):
    _race_two_promotes(train_experiment)


@pytest.fixture()
def postgres_store(postgres_url, monkeypatch) -> str:
    """A fresh PostgreSQL database (tests/e2e/conftest.py) as the tracking + registry store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_url)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(postgres_url)
    yield postgres_url
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.mark.postgres
def test_two_promotes_at_once_on_postgres_leave_one_champion(postgres_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = mlflow.create_experiment("train", artifact_location=(tmp_path / "a").as_uri())
    _race_two_promotes(experiment)


@pytest.fixture()
def http_store(tmp_path, monkeypatch) -> str:
    """A real `mlflow server` (one worker) on a free loopback port, stopped afterwards."""
    port = free_port()
    store, served = f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "served")
    command = mlflow_server_command(port, store, "--artifacts-destination", served)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    uri = f"http://127.0.0.1:{port}"
    with process_group(command, env, tmp_path / "server.log") as server:
        wait_http(uri + "/health", server, tmp_path / "server.log", timeout_s=60)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            monkeypatch.delenv(var, raising=False)
        mlflow.set_tracking_uri(uri)
        yield uri
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_two_promotes_at_once_on_a_tracking_server_leave_one_champion(
    http_store, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _race_two_promotes(mlflow.create_experiment("train"))


def test_slice_guard_refuses_a_challenger_that_loses_a_make(train_experiment):
    slices = {"slice_make_audi_f1_macro": 0.81, "slice_body_type_sedan_f1_macro": 0.70}
    v1 = register(train_experiment, **slices)
    run_promote(PromotionConfig(), MODEL)
    worse_audi = {**slices, "slice_make_audi_f1_macro": 0.62}
    v2 = register(train_experiment, test_f1_macro=0.90, **worse_audi)

    done = promote_cli("--max_slice_regression", "0.05")
    assert done.returncode == 0, done.stderr
    assert champion() == v1
    assert f"slice make=audi f1 0.62 < champion v{v1} 0.81 - 0.05" in done.stdout
    run = promote_runs().iloc[-1]
    assert run["tags.decision"] == "keep"
    # Off (the default), the better overall F1 wins.
    done = promote_cli("--max_slice_regression", "none")
    assert done.returncode == 0, done.stderr
    assert champion() == v2
