"""Helpers shared by the thin MLproject entry points: parsers that refuse passwords, logging,
signals, exit codes, and the MLproject file derived from the entry points' configs.

Every parameter is declared once, as a field of its step's config dataclass
(``cars_ml.params``); each entry point's parser and its MLproject block are derived from it.
``python entrypoints/_common.py`` rewrites MLproject from them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

# The entry points are run as scripts (`python entrypoints/train.py`); make the project root
# importable when the package is not installed in editable mode.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN CPU kernels on by default only on some CPUs, yet they train faster
# on the others too (docs/performance.md, "CPU kernels"). It must be set before TensorFlow is
# imported; a user's own value wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

_CREDENTIAL_FIX = (
    "pass the URL without it and put the password in PGPASSWORD (or the driver's password file, "
    "such as ~/.pgpass; MLFLOW_TRACKING_PASSWORD for a tracking server), and rotate this "
    "password: it has been exposed"
)


class _Parser(argparse.ArgumentParser):
    """Refuses any argument that carries a password (see :func:`refuse_credentials`)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        refuse_credentials(parsed)
        return parsed, extra


def parser(entry) -> argparse.ArgumentParser:
    """The parser of ``entry`` (a ``cars_ml.params.Entry``), which refuses passwords."""
    return entry.parser(_Parser)


def refuse_credentials(namespace: argparse.Namespace) -> None:
    """Raise ``ValueError`` when an argument holds a password; delete the run that logged it.

    ``mlflow run`` logs every parameter, as typed, on the run it creates before the entry point
    starts, so redacting it later is too late and the only safe answer is to refuse it. Under
    ``mlflow run`` (``MLFLOW_RUN_ID`` set) that run is deleted, so no visible run holds the
    password, and the command that purges it for good is printed.
    """
    from cars_ml.tracking.redaction import has_credentials, redact

    for name, value in vars(namespace).items():
        if isinstance(value, str) and has_credentials(value):
            _discard_mlflow_run()
            raise ValueError(
                f"{name}={redact(value)} holds a password, and parameters are stored in plain "
                f"text (`mlflow run` logs them before any code of ours runs): {_CREDENTIAL_FIX}."
            )


def _discard_mlflow_run() -> None:
    """Have the run ``mlflow run`` created deleted once it ends; print how to purge it.

    A detached ``cars_ml.tracking.discard`` process does the deletion: ``mlflow run`` writes the
    run's status after this process exits and fails on a run that is already deleted.
    """
    import subprocess

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from cars_ml.tracking.redaction import redact

    uri = redact(os.environ.get("MLFLOW_TRACKING_URI", "") or "./mlruns")
    if uri.startswith(("http://", "https://")):
        what = (
            "deleted as soon as `mlflow run` marks it failed. A tracking server cannot purge "
            "over HTTP: purge it for good on the server's host with `mlflow gc "
            f"--backend-store-uri <its database URL> --run-ids {run_id}` (with "
            f"MLFLOW_TRACKING_URI={uri} set, so artifacts go too)"
        )
    else:
        what = (
            "deleted and purged from the store for good as soon as `mlflow run` marks it "
            f"failed (if that fails, `mlflow gc --backend-store-uri {uri} --run-ids {run_id}`)"
        )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Its own session, so Ctrl-C or a SIGTERM to `mlflow run` does not stop the deletion. The
    # tracking URI travels in the environment, never on a command line that `ps` shows.
    subprocess.Popen(
        [sys.executable, "-m", "cars_ml.tracking.discard", run_id],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    print(
        f"note: MLflow run {run_id} holds the password in its parameters (`mlflow run` logged "
        f"them); it is {what}.",
        file=sys.stderr,
    )


def setup_logging() -> None:
    """Configure logging once, in the process that runs an entry point (never at import)."""
    logging.basicConfig(
        level=os.environ.get("CARS_ML_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (``kill``, Kubernetes)."""


def _raise_terminated(signum, frame) -> None:
    # A second SIGTERM while the first is being handled kills the process outright (the default
    # action), so a stuck clean-up can still be stopped without SIGKILL.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated(f"received signal {signal.Signals(signum).name}")


def install_sigterm_handler() -> None:
    """Turn SIGTERM into ``KeyboardInterrupt`` so runs end KILLED instead of staying RUNNING.

    Python's default action for SIGTERM ends the process at once: no ``finally`` block runs,
    so the MLflow run would stay RUNNING forever and an Optuna trial would wait for its
    heartbeat to go stale. Raising ``KeyboardInterrupt`` lets ``tracking.start_run`` end the run
    KILLED and Optuna mark the trial FAIL, exactly as Ctrl-C does.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)


def run_main(main) -> None:
    """Run ``main()``; user errors (ValueError, ...) become one clear line and exit code 2.

    SIGTERM and Ctrl-C end the active MLflow run KILLED and exit with 143 and 130 (the shell's
    128 + signal number) after one line on stderr, not a traceback.
    """
    setup_logging()
    install_sigterm_handler()
    try:
        main()
    except (ValueError, ConnectionError, FileNotFoundError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print(
            "error: terminated by SIGTERM; an active MLflow run was ended KILLED.", file=sys.stderr
        )
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        print("error: interrupted; an active MLflow run was ended KILLED.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


# The order of MLproject's entry points: the pipeline, then its steps, then the tools.
ENTRY_POINTS = (
    "main",
    "prepare_data",
    "train",
    "distill",
    "tune",
    "promote",
    "serve",
    "predict",
    "benchmark",
)


def mlproject() -> str:
    """MLproject's text, rendered from every entry point's ``ENTRY``."""
    import importlib

    from cars_ml.params import mlproject as render

    return render([importlib.import_module(name).ENTRY for name in ENTRY_POINTS])


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "MLproject")
    with open(path, "w", encoding="utf-8") as out:
        out.write(mlproject())
    print(f"wrote {path}")
