"""The tracking server as deploy/ runs it: basic auth, PostgreSQL, S3 proxy, allowed hosts.

The command and environment come from deploy/Dockerfile.mlflow and the users' database from
deploy/auth/basic_auth.ini; only addresses are made local. The set-up README describes is done
for real: the admin creates the service account, a wrong password fails an entry point within
seconds with a message that names what to set, and the right one logs with secrets scrubbed.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import mlflow
import pytest
from e2e_utils import run_entry
from servers import PGPASSWORD_VALUE, client_env, deployed_tracking_server

from cars_ml import tracking

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

USER, USER_PASSWORD = "cars-ml", "cars-ml-user-pw-5a9d31"


def _api_status(uri: str, host: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    import base64

    request = urllib.request.Request(uri + "/api/2.0/mlflow/experiments/search?max_results=1")
    request.add_header("Host", host)
    if auth:
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture()
def server(tmp_path):
    pytest.importorskip(
        "flask_wtf", reason="MLflow's basic-auth app needs `pip install mlflow[auth]`"
    )
    with deployed_tracking_server(tmp_path / "srv") as srv:
        yield srv


def test_deployed_server_requires_login_and_clients_fail_fast_or_log_scrubbed(
    server, tmp_path, monkeypatch
):
    uri = server.uri
    port = uri.rsplit(":", 1)[1]
    # The compose/Kubernetes service name on its port is the allowed Host; any other is refused.
    assert _api_status(uri, f"mlflow:{port}")[0] == 401
    for foreign in (f"evil.example.com:{port}", f"mlflow.evil.example.com:{port}", "mlflow:1"):
        status, body = _api_status(uri, foreign)
        assert status == 403 and "Host header" in body, foreign
    assert _api_status(uri, f"127.0.0.1:{port}", ("admin", server.admin_password))[0] == 200

    # README's set-up: the admin creates the service account the jobs use.
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.admin_password)
    from mlflow.server import get_app_client

    get_app_client("basic-auth", tracking_uri=uri).create_user(USER, USER_PASSWORD)

    # A wrong password: the entry point stops at once with what to set, and never echoes it.
    wrong = "wrong-password-4477aa"
    env = client_env(uri, MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=wrong)
    started = time.monotonic()
    proc = run_entry("promote", "--dry_run", "true", env=env, check=False, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"MLflow tracking server at {uri} refused user 'cars-ml' (401)" in proc.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in proc.stderr and "Traceback" not in proc.stderr
    assert wrong not in proc.stdout + proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"

    # The right one: runs log through the proxy; secrets in logged text are scrubbed.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER_PASSWORD)
    monkeypatch.setenv("PGPASSWORD", PGPASSWORD_VALUE)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "cars-ml")
    mlflow.set_tracking_uri(uri)
    try:
        tracking.check_tracking_server()
        with tracking.start_run("auth-check") as run:
            tracking.log_params(
                {
                    "note": f"login {USER_PASSWORD}",
                    "storage": f"postgresql://u:{PGPASSWORD_VALUE}@db/optuna",
                }
            )
            tracking.log_dict({"db": PGPASSWORD_VALUE}, "settings.json")
        stored = mlflow.get_run(run.info.run_id)
    finally:
        mlflow.set_tracking_uri(None)
    assert stored.data.params["note"] == "login ***"
    assert stored.data.params["storage"] == "postgresql://u:***@db/optuna"
    keys = server.s3.keys("mlflow/")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/settings.json") for k in keys), keys
    body = server.s3.client().get_object(
        Bucket=server.s3.bucket, Key=[k for k in keys if k.endswith("settings.json")][0]
    )
    assert PGPASSWORD_VALUE not in body["Body"].read().decode()
