"""The ``serve`` step: check the model resolves, then become ``mlflow models serve``.

The process replaces itself (``os.execvp``) with the MLflow CLI, so signals (Ctrl-C, SIGTERM from
``mlflow run`` or a supervisor) reach the server directly; MLflow in turn makes its uvicorn child
die with it (``PR_SET_PDEATHSIG``). Under ``mlflow run`` the server also stops when ``mlflow run``
itself is killed.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import signal
import sys
from dataclasses import dataclass

from cars_ml import CHAMPION_ALIAS, REGISTERED_MODEL_NAME, tracking
from cars_ml.serving.model import PRECISION_ENV

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Which registered model to serve and where; ``model_uri`` overrides name and alias."""

    model_name: str = REGISTERED_MODEL_NAME
    alias: str = CHAMPION_ALIAS
    model_uri: str = ""
    port: int = 5001
    host: str = "127.0.0.1"
    workers: int = 1
    precision: str = "float32"  # the TFLite file the server runs: float32 or int8
    # Serve a version registered with serving code older than this release's minimum.
    allow_old_serving_code: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "int8"):
            raise ValueError(f"precision={self.precision!r} must be float32 or int8.")
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port} must be between 1 and 65535.")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1.")
        if not self.model_uri and not (self.model_name and self.alias):
            raise ValueError("pass model_uri, or both model_name and alias.")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ValueError(
                    f"host={self.host!r} is not an IP address; use 127.0.0.1 (this machine only) "
                    "or 0.0.0.0 (every interface; put authentication in front of it)."
                ) from None

    @property
    def uri(self) -> str:
        return self.model_uri or f"models:/{self.model_name}@{self.alias}"


def serve_command(cfg: ServeConfig) -> list[str]:
    """The ``mlflow models serve`` command line for ``cfg`` (same Python as this process)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        cfg.uri,
        "--env-manager",
        "local",
        "-p",
        str(cfg.port),
        "-h",
        cfg.host,
        "-w",
        str(cfg.workers),
    ]


def _stop_with_parent() -> None:
    """Ask Linux to SIGTERM this process (and so the server it becomes) when its parent dies.

    ``mlflow run`` does not pass SIGTERM on to its child: killing it would orphan a server that
    keeps the port. The setting survives ``exec``. Only used under ``mlflow run``, so a server
    started from a shell with ``nohup`` still outlives that shell.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError as exc:
        log.warning("Could not tie the server's life to mlflow run (%s).", exc)


def serve(cfg: ServeConfig) -> None:
    """Fail fast if the tracking server or the model is missing, then exec the MLflow server."""
    tracking.check_tracking_server()
    tracking.check_model_uri(cfg.uri)
    tracking.check_serving_code(cfg.uri, cfg.allow_old_serving_code)
    command = serve_command(cfg)
    # The served model reads this when it loads, in the server process this one becomes.
    os.environ[PRECISION_ENV] = cfg.precision
    if os.environ.get("MLFLOW_RUN_ID"):
        _stop_with_parent()
    log.info(
        "Serving %s (%s) on http://%s:%d (POST /invocations)",
        cfg.uri,
        cfg.precision,
        cfg.host,
        cfg.port,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)
