"""Real servers for the scale-out tests: a fresh PostgreSQL database, a moto S3 endpoint and an
MLflow tracking server on PostgreSQL with artifacts proxied to S3.

Each is a context manager that starts a real process in its own process group and kills the
whole group afterwards, so no stray uvicorn or moto worker outlives a test. Importable from the
e2e tests because pytest puts this folder on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# One process-group helper for the library and the tests; re-exported for the e2e tests.
from cars_ml.measure.processes import free_port, process_group  # noqa: F401

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"

# Dummy but recognisable credentials of the *server* side: the secret scan looks for them too,
# and a client that needed them (instead of the artifact proxy) would fail without them.
SERVER_AWS_ACCESS_KEY_ID = "CARSMLSERVERKEYID0001"
SERVER_AWS_SECRET_ACCESS_KEY = "cars-ml-server-side-secret-4f1c9e"
START_TIMEOUT_S = 90


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = START_TIMEOUT_S):
    """Poll ``url`` until it answers; fail with the process log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: process exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {timeout_s:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@contextlib.contextmanager
def postgres_database(prefix: str = "cars_ml_scaleout") -> Iterator[str]:
    """A fresh database at 127.0.0.1:5432 (trust auth), dropped afterwards; skip if unreachable."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(
            host=PG_HOST,
            port=PG_PORT,
            user=PG_USER,
            dbname="postgres",
            connect_timeout=3,
            autocommit=True,
        )
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}: {exc}")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


def pg_url(database: str, password: str | None = None) -> str:
    """``postgresql://`` URL of ``database``; trust auth ignores a password if one is given."""
    auth = f"{PG_USER}:{password}" if password else PG_USER
    return f"postgresql://{auth}@{PG_HOST}:{PG_PORT}/{database}"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    def client(self):
        """A boto3 S3 client with the server-side dummy credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=SERVER_AWS_ACCESS_KEY_ID,
            aws_secret_access_key=SERVER_AWS_SECRET_ACCESS_KEY,
            region_name="us-east-1",
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``."""
        paginator = self.client().get_paginator("list_objects_v2")
        return [
            obj["Key"]
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        ]


@contextlib.contextmanager
def moto_s3(workdir: Path, bucket: str = "cars-ml-artifacts") -> Iterator[S3Server]:
    """``python -m moto.server`` on a free loopback port with ``bucket`` created in it."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with process_group(command, dict(os.environ), workdir / "moto.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/moto-api/", proc, workdir / "moto.log", timeout_s=60)
        server = S3Server(url, bucket)
        server.client().create_bucket(Bucket=bucket)
        yield server


@dataclass(frozen=True)
class TrackingServer:
    uri: str
    backend_db: str
    s3: S3Server
    artifacts_destination: str
    log_path: Path


def server_env(s3: S3Server) -> dict:
    """The tracking server's environment: S3 endpoint and credentials, no job runner."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(
        MLFLOW_S3_ENDPOINT_URL=s3.endpoint_url,
        AWS_ACCESS_KEY_ID=SERVER_AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=SERVER_AWS_SECRET_ACCESS_KEY,
        AWS_DEFAULT_REGION="us-east-1",
        # One worker and no job runner: 2 processes instead of ~3 GB of them (FACTS.md).
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    return env


def mlflow_server_command(port: int, backend_store_uri: str, *options: str) -> list[str]:
    """``mlflow server`` with one worker on loopback ``port`` (``options``: e.g. where artifacts
    go). One worker: 2 processes instead of ~3 GB of them (FACTS.md)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri]
    return [*command, *options, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


@contextlib.contextmanager
def tracking_server(workdir: Path) -> Iterator[TrackingServer]:
    """``mlflow server`` on a fresh PostgreSQL database, artifacts proxied to a moto bucket."""
    workdir.mkdir(parents=True, exist_ok=True)
    with moto_s3(workdir) as s3, postgres_database() as db:
        port = free_port()
        destination = f"s3://{s3.bucket}/mlflow"
        command = mlflow_server_command(port, pg_url(db), "--artifacts-destination", destination)
        log_path = workdir / "mlflow-server.log"
        with process_group(command, server_env(s3), log_path) as proc:
            uri = f"http://127.0.0.1:{port}"
            wait_http(uri + "/health", proc, log_path)
            yield TrackingServer(uri, db, s3, destination, log_path)


def client_env(tracking_uri: str, **extra: str) -> dict:
    """A child-process environment that reaches MLflow only through ``tracking_uri``.

    No AWS credentials and no S3 endpoint: artifacts must travel through the server's proxy.
    """
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri,
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    )
    return env


# --- The tracking server exactly as deploy/Dockerfile.mlflow runs it, on local services ---------

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ADMIN_PASSWORD = "cars-ml-admin-pw-0c7e1b"  # >= 12 characters, as MLflow asks
PGPASSWORD_VALUE = "cars-ml-pg-pw-ignored-by-trust"


def deploy_image_command_and_env() -> tuple[list[str], dict[str, str]]:
    """``CMD`` and ``ENV`` of ``deploy/Dockerfile.mlflow``."""
    import json
    import re
    import shlex

    text = (DEPLOY / "Dockerfile.mlflow").read_text().replace("\\\n", " ")
    (raw,) = re.findall(r"^CMD (\[.*\])\s*$", text, re.MULTILINE)
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", text, re.MULTILINE):
        env.update(dict(item.split("=", 1) for item in shlex.split(line)))
    return json.loads(raw), env


@dataclass(frozen=True)
class AuthServer:
    uri: str
    s3: S3Server
    admin_password: str


@contextlib.contextmanager
def deployed_tracking_server(workdir: Path) -> Iterator[AuthServer]:
    """The deploy image's command and environment with only the addresses made local: basic
    auth (users in PostgreSQL, from deploy/auth/basic_auth.ini), PostgreSQL backend, S3 proxy."""
    import configparser

    workdir.mkdir(parents=True, exist_ok=True)
    command, image_env = deploy_image_command_and_env()
    with (
        moto_s3(workdir) as s3,
        postgres_database() as db,
        postgres_database("cars_ml_auth") as users,
    ):
        local = {
            "--backend-store-uri": pg_url(db),
            "--artifacts-destination": f"s3://{s3.bucket}/mlflow",
            "--host": "127.0.0.1",
            "--port": str(free_port()),
            "--workers": "1",
        }
        for flag, value in local.items():
            command[command.index(flag) + 1] = value
        config = configparser.ConfigParser()
        config.read(DEPLOY / "auth" / "basic_auth.ini")
        config["mlflow"]["database_uri"] = pg_url(users)
        ini = workdir / "basic_auth.ini"
        with open(ini, "w") as handle:
            config.write(handle)
        # The image's exact Host names, on this server's port.
        hosts = image_env["MLFLOW_SERVER_ALLOWED_HOSTS"].replace(":5000", f":{local['--port']}")
        env = {
            **server_env(s3),
            **image_env,
            "MLFLOW_SERVER_ALLOWED_HOSTS": hosts,
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "PGPASSWORD": PGPASSWORD_VALUE,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
        }
        assert command[0] == "mlflow"
        log_path = workdir / "mlflow-auth-server.log"
        with process_group([sys.executable, "-m", *command], env, log_path) as proc:
            uri = f"http://127.0.0.1:{local['--port']}"
            wait_http(uri + "/health", proc, log_path)
            yield AuthServer(uri, s3, ADMIN_PASSWORD)


@dataclass(frozen=True)
class SqliteTrackingServer:
    uri: str
    database_uri: str  # The same store, reached directly.
    log_path: Path


@contextlib.contextmanager
def sqlite_tracking_server(workdir: Path) -> Iterator[SqliteTrackingServer]:
    """``mlflow server`` (one worker, no job runner) on a SQLite store in ``workdir``: the
    lightest real tracking server, and a store that clients can also open by its URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    database_uri = f"sqlite:///{workdir / 'server.db'}"
    port = free_port()
    command = mlflow_server_command(
        port, database_uri, "--artifacts-destination", str(workdir / "served")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log_path = workdir / "mlflow-server.log"
    with process_group(command, env, log_path) as proc:
        uri = f"http://127.0.0.1:{port}"
        wait_http(uri + "/health", proc, log_path)
        yield SqliteTrackingServer(uri, database_uri, log_path)
