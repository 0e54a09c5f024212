"""The ``serve`` step: check the model resolves, then become ``mlflow models serve``.

The process replaces itself (``os.execvp``) with the MLflow CLI, so signals (Ctrl-C, SIGTERM from
``mlflow run`` or a supervisor) reach the server directly; MLflow in turn makes its uvicorn child
die with it (``PR_SET_PDEATHSIG``). Under ``mlflow run`` the server also stops when ``mlflow run``
itself is killed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

from cars_ml import tracking
from cars_ml.serving.config import ServeConfig
from cars_ml.serving.model import PRECISION_ENV

log = logging.getLogger(__name__)


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
