"""Secrets are scrubbed from everything logged, and refused as entry-point parameters."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cars_ml import tracking
from cars_ml.tracking import has_credentials, redact

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "entrypoints"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:pw@host/db", "postgresql://u:***@host/db"),
        # An empty user name still has a password.
        ("postgresql://:pw@host/db", "postgresql://:***@host/db"),
        # An unescaped `@` inside the password: everything up to the last `@` of the authority.
        ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u:p@s@s@host:5432/db", "postgresql://u:***@host:5432/db"),
        ("mysql+pymysql://u:p/ss@host/db", "mysql+pymysql://u:***@host/db"),
        # An `@` later in the path or query is not part of the password.
        (
            "postgresql://u:pw@host/db?application_name=a@b",
            "postgresql://u:***@host/db?application_name=a@b",
        ),
        ("postgresql://u@host/db?password=pw", "postgresql://u@host/db?password=***"),
        (
            "postgresql://u@host/db?sslmode=require&password=pw&x=1",
            "postgresql://u@host/db?sslmode=require&password=***&x=1",
        ),
        ("http://host:5000/x?PASSWORD=pw", "http://host:5000/x?PASSWORD=***"),
        (
            "https://s3/b/k?X-Amz-Security-Token=abc&v=1",
            "https://s3/b/k?X-Amz-Security-Token=***&v=1",
        ),
        ("host=h user=u password=pw dbname=d", "host=h user=u password=*** dbname=d"),
        ("storage='postgresql://u:pw@h/db' is bad", "storage='postgresql://u:***@h/db' is bad"),
        (
            "a postgresql://u:pw@h/db and http://v:pw2@h2:5000",
            "a postgresql://u:***@h/db and http://v:***@h2:5000",
        ),
    ],
)
def test_redact_url_passwords(text, expected):
    assert redact(text) == expected
    assert has_credentials(text)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://u@host:5432/db",
        "http://127.0.0.1:5000",
        "sqlite:////tmp/optuna.db",
        "models:/cars@champion",
        "runs:/abc/model",
        "synthetic",
        "/data/stanford cars",
        "mobilenet,vgg16",
        "postgresql://u:@host/db",
    ],
)
def test_plain_values_are_left_alone(text):
    assert redact(text) == text
    assert not has_credentials(text)


@pytest.mark.parametrize(
    "name", ["POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "PGPASSWORD"]
)
def test_secret_environment_values_are_scrubbed(name, monkeypatch):
    monkeypatch.setenv(name, "s3cr3t-value")
    assert redact("connect with s3cr3t-value now") == "connect with *** now"


def test_logged_tables_are_redacted(tracking_uri, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MINIO_ROOT_PASSWORD", "minio-root-pw")
    frame = pd.DataFrame(
        {"storage": ["postgresql://u:tablepw@h/db", "ok"], "note": ["minio-root-pw", 3]}
    )
    with tracking.start_run("table"):
        tracking.log_table(frame, "secrets")
        run_id = tracking.active_run_id()
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "dl"))
    for name in ("secrets.csv", "secrets.html"):
        text = (Path(folder) / name).read_text()
        assert "tablepw" not in text and "minio-root-pw" not in text, text
        assert "postgresql://u:***@h/db" in text
    # The caller's frame is left as it was.
    assert frame.loc[0, "storage"] == "postgresql://u:tablepw@h/db"


# Entry points and the parameter that may carry a URL with credentials.
ENTRY_URLS = [
    ("tune", "--storage", "postgresql://u:secretpw@127.0.0.1:5432/x"),
    ("train", "--storage", "postgresql://:secretpw@127.0.0.1/x"),
    ("main", "--storage", "postgresql://u@127.0.0.1/x?password=secretpw"),
    ("predict", "--model_uri", "http://u:secretpw@host/model"),
    ("serve", "--model_uri", "https://u:secretpw@host/model"),
    ("benchmark", "--model_uri", "https://u:secretpw@host/model"),
    ("prepare_data", "--data", "https://u:secretpw@host/cars.tgz"),
    ("promote", "--model_name", "postgresql://u:secretpw@h/x"),
]


@pytest.mark.parametrize(("entry", "flag", "value"), ENTRY_URLS)
def test_every_entry_point_refuses_passwords_in_parameters(entry, flag, value, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    parser = importlib.import_module(entry).build_parser()
    with pytest.raises(ValueError) as err:
        parser.parse_args([flag, value])
    message = str(err.value)
    assert "secretpw" not in message
    assert "PGPASSWORD" in message and "rotate" in message
    assert "\n" not in message


def test_refused_parameter_deletes_the_mlflow_run_holding_it(tracking_uri, monkeypatch, capsys):
    """Under `mlflow run` the run MLflow created (and logged the param to) is deleted once MLflow
    has marked it failed, which it always does after the entry point exits."""
    import mlflow

    client = mlflow.MlflowClient()
    run = client.create_run("0")
    client.log_param(run.info.run_id, "storage", "postgresql://u:secretpw@h/x")
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    parser = importlib.import_module("tune").build_parser()
    with pytest.raises(ValueError, match="PGPASSWORD"):
        parser.parse_args(["--storage", "postgresql://u:secretpw@h/x"])
    err = capsys.readouterr().err
    assert f"mlflow gc --backend-store-uri {tracking_uri} --run-ids {run.info.run_id}" in err
    assert "secretpw" not in err
    assert "purged from the store for good" in err
    # What `mlflow run` does when the entry point has exited 2.
    client.set_terminated(run.info.run_id, "FAILED")
    deadline = time.monotonic() + 60
    while _stored_params(client, run.info.run_id) is not None:
        assert time.monotonic() < deadline, "the run was not purged within 60 s"
        time.sleep(0.2)


def _stored_params(client, run_id: str) -> dict | None:
    """The params the store still holds for ``run_id`` (deleted or not); None once purged."""
    import mlflow

    try:
        return client.get_run(run_id).data.params
    except mlflow.exceptions.MlflowException:
        return None


def test_discard_ends_a_run_nobody_ends(tracking_uri):
    import mlflow

    from cars_ml.tracking.discard import discard

    client = mlflow.MlflowClient()
    run = client.create_run("0")
    client.log_param(run.info.run_id, "storage", "postgresql://u:secretpw@h/x")
    assert discard(run.info.run_id, wait_s=0)
    assert _stored_params(client, run.info.run_id) is None  # purged, params and all
