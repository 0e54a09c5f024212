"""Scale-out for real: a tracking server on PostgreSQL with artifacts proxied to S3 (moto).

The pipeline runs against it over HTTP with no AWS credentials of its own, its models land in
the bucket, `mlflow models serve` loads the champion through the server, and no secret the
client or server was given appears in any param, tag, artifact or log. Two tuning workers share
one PostgreSQL study, each under its own parent run, and `train --params_from` takes the global
best.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from e2e_utils import ROOT, run_entry
from served_model import post
from servers import (
    SERVER_AWS_ACCESS_KEY_ID,
    SERVER_AWS_SECRET_ACCESS_KEY,
    client_env,
    free_port,
    pg_url,
    postgres_database,
    process_group,
    tracking_server,
    wait_http,
)
from serving_helpers import b64_file

import cars_ml

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

CLIENT_AWS_SECRET = "cars-ml-client-fake-aws-secret-77d2"
DB_PASSWORD = "S3cretPw123"
TINY = ["--image_size", "32", "--weights", "none", "--max_per_class", "8"]


@pytest.fixture(scope="module")
def scaleout_server(tmp_path_factory):
    """One tracking server (PostgreSQL + moto S3) shared by this module's tests."""
    with tracking_server(tmp_path_factory.mktemp("scaleout")) as server:
        yield server


@pytest.fixture()
def client(scaleout_server, monkeypatch):
    """This process talks to the server too (for the assertions), never to S3 directly."""
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", scaleout_server.uri)
    mlflow.set_tracking_uri(scaleout_server.uri)
    yield mlflow.MlflowClient(scaleout_server.uri)
    mlflow.set_tracking_uri(None)


def _experiment_runs(client: mlflow.MlflowClient, experiment_name: str | None = None):
    experiments = client.search_experiments()
    if experiment_name:
        experiments = [e for e in experiments if e.name == experiment_name]
    ids = [e.experiment_id for e in experiments]
    return client.search_runs(ids, max_results=5000) if ids else []


def _files_with(folder: Path, secrets: dict[str, str]) -> tuple[list[str], int]:
    """Files under ``folder`` whose bytes contain a secret, and how many files were read."""
    found, count = [], 0
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        count += 1
        data = path.read_bytes()
        found += [
            f"{path.relative_to(folder)}: {name}"
            for name, value in secrets.items()
            if value.encode() in data
        ]
    return found, count


def scan_for_secrets(client: mlflow.MlflowClient, secrets: dict[str, str], workdir: Path):
    """Every param, tag, metric name and artifact of every run and logged model, and the
    registry's tags, searched for each secret value. Returns (findings, artifact files read)."""
    findings: list[str] = []
    files_read = 0
    experiments = client.search_experiments()
    for run in _experiment_runs(client):
        rid = run.info.run_id
        texts = {
            **{f"param {k}": f"{k}={v}" for k, v in run.data.params.items()},
            **{f"tag {k}": f"{k}={v}" for k, v in run.data.tags.items()},
            "metric names": " ".join(run.data.metrics),
            "run name": run.info.run_name or "",
        }
        findings += [
            f"run {rid} {where}: {name}"
            for where, text in texts.items()
            for name, value in secrets.items()
            if value in text
        ]
        dst = workdir / "runs" / rid
        dst.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(run_id=rid, dst_path=str(dst))
        hits, count = _files_with(dst, secrets)
        findings += [f"run {rid} artifact {h}" for h in hits]
        files_read += count
    models = mlflow.search_logged_models(
        experiment_ids=[e.experiment_id for e in experiments], output_format="list"
    )
    for model in models:
        texts = {**model.params, **model.tags}
        findings += [
            f"logged model {model.model_id} {k}: {name}"
            for k, v in texts.items()
            for name, value in secrets.items()
            if value in f"{k}={v}"
        ]
        dst = workdir / "models" / model.model_id
        dst.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model.model_id}", dst_path=str(dst)
        )
        hits, count = _files_with(dst, secrets)
        findings += [f"logged model {model.model_id} artifact {h}" for h in hits]
        files_read += count
    for registered in client.search_registered_models():
        texts = {f"model tag {k}": f"{k}={v}" for k, v in registered.tags.items()}
        for version in client.search_model_versions(f"name = '{registered.name}'"):
            texts.update(
                {f"v{version.version} tag {k}": f"{k}={v}" for k, v in version.tags.items()}
            )
            texts[f"v{version.version} description"] = version.description or ""
        findings += [
            f"registry {registered.name} {where}: {name}"
            for where, text in texts.items()
            for name, value in secrets.items()
            if value in text
        ]
    return findings, files_read, len(models)


def test_pipeline_on_tracking_server_lands_models_in_s3_serves_champion_leaks_no_secret(
    scaleout_server, client, car_photos, tmp_path
):
    server = scaleout_server
    secrets = {
        "client AWS secret": CLIENT_AWS_SECRET,
        "database password": DB_PASSWORD,
        "server AWS secret": SERVER_AWS_SECRET_ACCESS_KEY,
        "server AWS key id": SERVER_AWS_ACCESS_KEY_ID,
    }
    # The client has a (fake) AWS secret but no key id and no S3 endpoint: were it to write to
    # S3 itself instead of through the server's artifact proxy, it would fail.
    # The database password travels in PGPASSWORD, never in the storage URL: an entry point
    # refuses a URL with a password, since `mlflow run` would log it in plain text.
    env = client_env(
        server.uri,
        AWS_SECRET_ACCESS_KEY=CLIENT_AWS_SECRET,
        PGPASSWORD=DB_PASSWORD,
        CARS_ML_CACHE=str(tmp_path / "cache"),
    )
    with postgres_database("cars_ml_optuna") as optuna_db:
        storage = pg_url(optuna_db)
        started = time.monotonic()
        proc = run_entry(
            "main",
            "--models",
            "vgg16",
            "--distill_students",
            "mobilenet",
            "--n_trials",
            "1",
            "--max_epochs",
            "1",
            "--epochs",
            "1",
            "--fine_tune_epochs",
            "0",
            *TINY,
            "--max_size_mb",
            "none",
            "--max_latency_ms",
            "none",
            "--max_int8_f1_drop",
            "none",
            "--storage",
            storage,
            env=env,
            timeout=420,
        )
        print(f"pipeline against the tracking server: {time.monotonic() - started:.0f} s")

    # Model files landed in the bucket, under the server's artifacts destination.
    keys = server.s3.keys("mlflow/")
    names = {Path(k).name for k in keys}
    assert {"model.keras", "MLmodel", "labels.json"} <= names, sorted(names)[:50]
    assert sum(k.endswith("/model.keras") for k in keys) >= 2, "the backbone and its student"
    assert any(k.endswith(".tflite") for k in keys)

    # The champion alias exists and points at one of the pipeline's versions: VGG16's and its
    # student's. The named student is no backbone of the run: it gets a study, no plain training.
    name, alias = cars_ml.REGISTERED_MODEL_NAME, cars_ml.CHAMPION_ALIAS
    champion = client.get_model_version_by_alias(name, alias)
    versions = {v.version for v in client.search_model_versions(f"name='{name}'")}
    assert versions == {"1", "2"}, versions
    assert champion.version in versions
    runs = _experiment_runs(client)
    assert [r.data.tags["backbone"] for r in runs if r.data.tags.get("step") == "train"] == [
        "vgg16"
    ]

    # The tune runs logged the storage URL (the positive control for the scan below).
    tune_runs = [
        r
        for r in runs
        if r.data.tags.get("step") == "tune"
        and r.data.tags.get("study_name", "").startswith("pipeline-")
    ]
    assert len(tune_runs) == 2
    for run in tune_runs:
        assert run.data.params["storage"] == storage
    # The student trained with its own study's best params.
    (student,) = [r for r in runs if r.data.tags.get("step") == "distill"]
    studies = {r.data.tags["study_name"] for r in tune_runs}
    assert student.data.tags["params_from"] in studies
    assert student.data.tags["params_from"].startswith("pipeline-mobilenet-")

    # No secret anywhere: params, tags, artifacts, logged models, registry, and the client log.
    findings, files_read, n_models = scan_for_secrets(client, secrets, tmp_path / "scan")
    log_text = proc.stdout + proc.stderr
    findings += [f"pipeline output: {n}" for n, v in secrets.items() if v in log_text]
    assert not findings, findings
    assert files_read >= 20 and n_models >= 2, (files_read, n_models)

    # `mlflow models serve` loads the champion through the server and answers a real photo.
    labels_dir = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}@{alias}", dst_path=str(tmp_path / "champion")
    )
    (labels_file,) = Path(labels_dir).rglob("labels.json")
    labels = json.loads(labels_file.read_text())
    class_names = labels if isinstance(labels, list) else labels.get("class_names", labels)
    port = free_port()
    serve_cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{name}@{alias}",
        "--env-manager",
        "local",
        "-p",
        str(port),
    ]
    serve_env = client_env(server.uri)
    with process_group(serve_cmd, serve_env, tmp_path / "serve.log") as serving:
        wait_http(f"http://127.0.0.1:{port}/ping", serving, tmp_path / "serve.log", timeout_s=120)
        photo = car_photos[0]
        body = {"dataframe_split": {"columns": ["image"], "data": [[b64_file(photo)]]}}
        reply = post(port, body, timeout=60)
    assert reply.status == 200, reply.text
    (prediction,) = reply.json()["predictions"]
    assert prediction["label"] in class_names


def test_two_tune_workers_share_a_study_and_train_takes_the_global_best(
    scaleout_server, client, tmp_path
):
    # Both workers run the same command (same seed), as the replicas of a Kubernetes Job do.
    study_name = "scaleout-shared"
    env = client_env(scaleout_server.uri, CARS_ML_CACHE=str(tmp_path / "cache"))
    with postgres_database("cars_ml_optuna") as optuna_db:
        storage = pg_url(optuna_db)
        args = [
            "--model",
            "mobilenet",
            *TINY,
            "--max_classes",
            "3",
            "--max_epochs",
            "1",
            "--n_trials",
            "2",
            "--pruner",
            "none",
            "--study_name",
            study_name,
            "--storage",
            storage,
        ]
        started = time.monotonic()
        workers = [
            subprocess.Popen(
                [sys.executable, str(ROOT / "entrypoints" / "tune.py"), *args],
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for _ in range(2)
        ]
        outputs = [w.communicate(timeout=300)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], [o[-3000:] for o in outputs]
        print(f"two tune workers: {time.monotonic() - started:.0f} s")

        study = optuna.load_study(study_name=study_name, storage=storage)
        numbers = [t.number for t in study.trials]
        assert sorted(numbers) == [0, 1, 2, 3], "trials add up and none repeats"
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        drawn = [tuple(sorted(t.params.items())) for t in study.trials]
        assert len(set(drawn)) == 4, f"two workers drew the same params: {drawn}"

        # Each worker has its own parent run holding exactly its own two trials.
        runs = _experiment_runs(client)
        parents = [
            r
            for r in runs
            if r.data.tags.get("step") == "tune" and r.data.tags.get("study_name") == study_name
        ]
        assert len(parents) == 2
        children = {
            p.info.run_id: {
                r.info.run_id
                for r in runs
                if r.data.tags.get("mlflow.parentRunId") == p.info.run_id
            }
            for p in parents
        }
        assert [len(c) for c in children.values()] == [2, 2]
        trial_runs = {t.user_attrs["mlflow_run_id"] for t in study.trials}
        assert trial_runs == set().union(*children.values())
        assert all(p.info.status == "FINISHED" for p in parents)

        train = run_entry(
            "train",
            "--model",
            "mobilenet",
            *TINY,
            "--max_classes",
            "3",
            "--epochs",
            "1",
            "--fine_tune_epochs",
            "0",
            "--register",
            "false",
            "--export_tflite",
            "false",
            "--params_from",
            study_name,
            "--storage",
            storage,
            env=env,
            timeout=300,
        )
        best = study.best_trial
    assert "Training with the best params" in train.stderr + train.stdout
    (run,) = [
        r
        for r in _experiment_runs(client)
        if r.data.tags.get("step") == "train" and r.data.params.get("params_from") == study_name
    ]
    assert run.info.status == "FINISHED"
    for key, value in best.params.items():
        if key in run.data.params:
            assert run.data.params[key] == str(value), (key, run.data.params[key], value)
    shared = set(best.params) & set(run.data.params)
    assert shared, "train logged none of the tuned params"
