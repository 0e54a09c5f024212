"""Optuna storage: default location, fail-fast connection checks, stale trials, best params."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from cars_ml import tracking
from cars_ml.tracking import redact, tracking_uri

log = logging.getLogger(__name__)

HEARTBEAT_S = 10
GRACE_S = 30
HEARTBEAT_ENV = "CARS_ML_OPTUNA_HEARTBEAT_S"
GRACE_ENV = "CARS_ML_OPTUNA_GRACE_S"


def _seconds(env: str, default: int) -> int:
    value = os.environ.get(env, "").strip()
    if not value:
        return default
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(
            f"{env}={value!r} must be a whole number of seconds >= 1; unset it for the default "
            f"of {default} s."
        )
    return seconds


def heartbeat_settings() -> tuple[int, int]:
    """``(heartbeat interval, grace period)`` in seconds for trial heartbeats.

    A running trial writes a heartbeat every interval; a trial whose last heartbeat is older than
    the grace period is failed (and retried) by the next worker that opens the study. Defaults
    10 s / 30 s; ``CARS_ML_OPTUNA_HEARTBEAT_S`` and ``CARS_ML_OPTUNA_GRACE_S`` override them
    (read on every call, so tests and operators can shorten them). The grace period must exceed
    the interval, or live trials would be failed between two heartbeats.
    """
    interval = _seconds(HEARTBEAT_ENV, HEARTBEAT_S)
    grace = _seconds(GRACE_ENV, GRACE_S)
    if grace <= interval:
        raise ValueError(
            f"{GRACE_ENV}={grace} must be greater than {HEARTBEAT_ENV}={interval}, or running "
            "trials would be failed between two heartbeats."
        )
    return interval, grace


class RetryAndCloseRuns(RetryHeartbeatStaleTrialCallback):
    """Retry a trial whose worker died (stale heartbeat) and close its MLflow runs as KILLED.

    Optuna calls this for every stale trial it fails, in whichever worker notices first.
    """

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        super().__call__(study, trial)
        close_dead_trial_runs([trial])


class ResilientRDBStorage(RDBStorage):
    """An ``RDBStorage`` whose trial heartbeat survives a dropped database connection.

    Optuna records heartbeats from a thread that dies on the first exception; a connection
    killed by a database restart or failover would silence a live trial, and after the grace
    period another worker would fail and re-run it while it still trains. SQLAlchemy discards
    the broken connection, so the next beat reconnects: a failed beat is only logged.
    """

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
            log.warning("Heartbeat of trial id %d not recorded (%s); retrying at the next beat",
                        trial_id, redact(str(exc.__cause__ or exc)).splitlines()[0])  # fmt: skip


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn a database failure in the middle of a study into one clear ``ConnectionError``."""
    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.DBAPIError) as exc:
        cause = redact(str(exc.__cause__ or exc)).strip().splitlines()
        raise ConnectionError(
            f"Lost the connection to Optuna storage {redact(url)} during the study "
            f"({cause[0] if cause else type(exc).__name__}). Completed trials are kept: run the "
            "same command again to resume; a trial left RUNNING is failed and retried once its "
            "heartbeat is older than the grace period."
        ) from exc


def close_dead_trial_runs(trials) -> list[str]:
    """End the RUNNING MLflow runs of failed trials, and their dead workers' parent runs."""
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials if "mlflow_run_id" in t.user_attrs]
    closed = tracking.close_stale_runs(run_ids)
    closed += tracking.close_stale_runs(tracking.running_parent_runs(closed))
    if closed:
        log.warning(
            "Closed %d MLflow run(s) left RUNNING by a dead worker: %s", len(closed), closed
        )
    return closed


def default_storage() -> str:
    """A SQLite file beside the tracking database (or ``./optuna.db``)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def open_storage(url: str | None) -> RDBStorage:
    """Open an RDB storage with heartbeats, so a killed worker's trial is failed and retried.

    Raises ``ValueError`` naming the (password-scrubbed) URL when it is malformed or unreachable.
    """
    url = url or default_storage()
    scheme = urlparse(url).scheme
    if not scheme or "://" not in url:
        raise ValueError(
            f"storage={redact(url)!r} is not a storage URL; use e.g. sqlite:///optuna.db or "
            "postgresql://user@host:5432/db (empty means a SQLite file beside the tracking DB)."
        )
    heartbeat_s, grace_s = heartbeat_settings()
    engine_kwargs = {"pool_pre_ping": True}
    if scheme.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
    error: Exception | None = None
    for attempt in range(3):
        try:
            return ResilientRDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                heartbeat_stale_trial_callback=RetryAndCloseRuns(max_retry=2),
            )
        except Exception as exc:  # SQLAlchemy raises many types; all mean "cannot use it".
            error = exc
            # Workers starting together race to create Optuna's tables; the loser retries.
            if isinstance(exc, ImportError) or "could not connect" in str(exc).lower():
                break
            log.info("Opening storage failed (attempt %d): %s; retrying", attempt + 1, exc)
            time.sleep(1.0 + attempt)
    raise ValueError(
        f"Cannot open Optuna storage {redact(url)}: {type(error).__name__}: "
        f"{redact(str(error)).splitlines()[0]}. Check the URL, that the database server "
        "runs and accepts connections, and that its driver (e.g. psycopg) is installed."
    ) from error


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best trial; in multi-objective studies the Pareto trial with the best first value."""
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise ValueError(
            f"Study {study.study_name!r} has no completed trial yet; run `tune` first "
            "(or more trials)."
        )
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])


def best_params(study_name: str, storage: str | None) -> dict:
    """Hyperparameters of a study's best trial: the sampled ones plus the pinned ones."""
    store = open_storage(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=store)
    except KeyError as exc:
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        raise ValueError(
            f"No study named {study_name!r} in {redact(storage or default_storage())}. "
            f"Known studies: {names or 'none'}; pass storage=<url> if it lives elsewhere."
        ) from exc
    trial = best_trial(study)
    return {**trial.user_attrs.get("pinned", {}), **trial.params}
