"""Fail fast when the tracking store cannot be used: before any work, not after a long retry.

HTTP servers are asked for ``/health`` and then for one authenticated call (``/health`` answers
without credentials); database stores (PostgreSQL, MySQL, MSSQL) get one connection, because
MLflow itself retries an unreachable database for ~100 s. Every failure is a ``ConnectionError``
that names the (password-scrubbed) URI and what to do.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request

from cars_ml.tracking.redaction import redact

_DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def _check_database(uri: str, timeout_s: float) -> None:
    """One connection to a database tracking store; ``ConnectionError`` naming it on failure."""
    import sqlalchemy

    connect_args = {}
    if uri.startswith(("postgresql", "mysql")):
        connect_args["connect_timeout"] = max(1, int(timeout_s))
    try:
        engine = sqlalchemy.create_engine(
            uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool
        )
        with engine.connect():
            pass
    except Exception as exc:  # Drivers raise many types; every one means "cannot use it".
        first_line = redact(str(exc)).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConnectionError(
            f"MLflow tracking database at {redact(uri)} is unreachable ({type(exc).__name__}: "
            f"{first_line}). Start the database, check the URL and credentials, or point "
            "MLFLOW_TRACKING_URI elsewhere; unset it to use the local sqlite:///mlflow.db."
        ) from exc


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail within seconds, naming the URI, when the tracking server or database does not answer.

    HTTP servers are asked for ``/health``; database URIs (PostgreSQL, MySQL, MSSQL) get one
    connection attempt, because MLflow itself retries an unreachable database for ~100 s.
    """
    if uri.split(":", 1)[0].split("+", 1)[0] in _DATABASE_SCHEMES:
        _check_database(uri, timeout_s)
        return
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            if response.status >= 500:
                raise ConnectionError(f"status {response.status}")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise ConnectionError(
                f"MLflow tracking server at {redact(uri)} answered {exc.code}; check its logs."
            ) from exc
    except (OSError, ConnectionError) as exc:
        raise ConnectionError(
            f"MLflow tracking server at {redact(uri)} is unreachable ({exc}). Start it "
            "(`mlflow server ...`) or point MLFLOW_TRACKING_URI at one that runs; unset it to "
            "use the local sqlite:///mlflow.db."
        ) from exc
    _check_credentials(uri, timeout_s)


def _check_credentials(uri: str, timeout_s: float) -> None:
    """One authenticated API call; ``ConnectionError`` naming the URI and the variables to set
    when the server (e.g. behind MLflow's basic-auth app) refuses our credentials.

    ``/health`` answers without credentials, so without this a wrong password would surface
    only later, as a stack trace from the first MLflow call.
    """
    request = urllib.request.Request(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    )
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):  # noqa: S310
            return
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            return
        body = redact(exc.read(300).decode("utf-8", "replace")).strip()
        if "Host header" in body:
            raise ConnectionError(
                f"MLflow tracking server at {redact(uri)} rejected the host name ({body}). Add "
                "it to the server's --allowed-hosts (or MLFLOW_SERVER_ALLOWED_HOSTS)."
            ) from exc
        who = f"user {user!r}" if user else "no credentials"
        raise ConnectionError(
            f"MLflow tracking server at {redact(uri)} refused {who} ({exc.code}). Set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
            "to an account the server knows; see README, 'Scale-out', for the set-up."
        ) from exc
    except OSError:
        return  # /health answered; leave other failures to MLflow's own retries and messages.
