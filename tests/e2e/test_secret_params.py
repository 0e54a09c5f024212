"""A password given as an `mlflow run` parameter is refused and leaves no visible run holding it.

`mlflow run` logs every -P parameter on the run it creates before the entry point starts, so
redaction cannot help there: the entry point must refuse the value and delete that run.
"""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
from e2e_utils import ROOT, run_entry
from mlflow.entities import ViewType

pytestmark = pytest.mark.e2e

SECRET = "secretpw"
STORAGE = f"postgresql://u:{SECRET}@127.0.0.1:5432/x"


def _runs(client: mlflow.MlflowClient, view: int) -> list:
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(experiments, run_view_type=view)


def _holds_secret(run) -> bool:
    fields = {**run.data.params, **run.data.tags}
    return any(SECRET in f"{key}={value}" for key, value in fields.items())


def test_mlflow_run_with_a_password_in_storage_is_refused_and_its_run_deleted(
    sub_env, tmp_path, tracking_uri
):
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "tune",
        "-P",
        f"storage={STORAGE}",
        "--env-manager",
        "local",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=sub_env, capture_output=True, text=True, timeout=600
    )
    # MLflow turns any failed entry point into its own exit code 1; the entry point's own exit
    # code (2) is checked below, without MLflow in between.
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "put the password in PGPASSWORD" in proc.stderr, proc.stderr[-3000:]
    assert "rotate" in proc.stderr
    client = mlflow.MlflowClient(tracking_uri)
    active = _runs(client, ViewType.ACTIVE_ONLY)
    assert not [r.info.run_id for r in active if _holds_secret(r)]
    # The run MLflow created is purged for good, params and all: neither active nor deleted.
    # The deleting process holds the captured stderr open until it is done, so it is gone here.
    assert "purged from the store for good" in proc.stderr
    assert _runs(client, ViewType.ALL) == []
    assert (tmp_path / "mlflow.db").exists()


def test_entry_point_exits_2_with_one_line(sub_env, tracking_uri):
    proc = run_entry("tune", "--storage", STORAGE, env=sub_env, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "PGPASSWORD" in lines[0] and "rotate" in lines[0], proc.stderr
    assert SECRET not in proc.stderr + proc.stdout
    client = mlflow.MlflowClient(tracking_uri)
    assert _runs(client, ViewType.ALL) == []
