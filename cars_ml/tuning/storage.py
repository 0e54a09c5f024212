"""Optuna storage: default location, fail-fast connection checks, stale trials, best params."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
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


@contextlib.contextmanager
def deliberate_experimental() -> Iterator[None]:
    """Silence Optuna's ``ExperimentalWarning`` around the experimental APIs chosen on purpose
    (heartbeats, stale-trial retries, matplotlib plots), which would otherwise print one
    multi-line warning per worker and per backbone in the middle of the demo's progress."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _connection_lost(exc: optuna.exceptions.StorageInternalError) -> bool:
    """Whether a storage error came from a dropped connection (worth retrying) or bad data."""
    cause = exc.__cause__
    return isinstance(cause, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)


class ResilientRDBStorage(RDBStorage):
    """An ``RDBStorage`` whose trials survive a dropped database connection.

    A connection killed by a database restart or failover surfaces as one failed statement;
    SQLAlchemy then discards it, so the same call on a fresh connection succeeds. Writes that
    are idempotent (intermediate values, attributes, params, heartbeats) and reads are retried,
    so a live trial is neither failed by its own objective nor silenced: Optuna records
    heartbeats from a thread that dies on the first exception, and after the grace period
    another worker would fail and re-run a trial that still trains. Creating a trial is not
    retried: a lost acknowledgement could leave a duplicate trial behind.
    """

    RETRIES = 3

    def _retry(self, call, *args, **kwargs):
        for attempt in range(self.RETRIES + 1):
            try:
                return call(*args, **kwargs)
            except optuna.exceptions.StorageInternalError as exc:
                if attempt == self.RETRIES or not _connection_lost(exc):
                    raise
                log.warning(
                    "Optuna storage connection lost in %s (%s); retry %d of %d",
                    call.__name__,
                    _first_line(exc),
                    attempt + 1,
                    self.RETRIES,
                )
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")  # The loop either returns or raises.

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        return self._retry(super().get_trial, trial_id)

    # Optuna's cached storage calls these private methods directly (Optuna 5.0); the public
    # ``get_all_trials`` and ``set_trial_param`` go through them too.
    def _get_trials(self, study_id, states, included_trial_ids, trial_id_greater_than) -> list:
        return self._retry(
            super()._get_trials, study_id, states, included_trial_ids, trial_id_greater_than
        )

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self._retry(super()._get_stale_trial_ids, study_id)

    def _set_trial_param(self, trial_id, param_name, value, distribution, previous) -> None:
        # A repeated insert of the same param is an IntegrityError that Optuna ignores.
        self._retry(super()._set_trial_param, trial_id, param_name, value, distribution, previous)

    def set_trial_intermediate_value(self, trial_id: int, step: int, value: float) -> None:
        self._retry(super().set_trial_intermediate_value, trial_id, step, value)

    def set_trial_user_attr(self, trial_id: int, key: str, value) -> None:
        self._retry(super().set_trial_user_attr, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value) -> None:
        self._retry(super().set_trial_system_attr, trial_id, key, value)

    def set_trial_state_values(self, trial_id: int, state, values=None) -> bool:
        try:
            return self._retry(super().set_trial_state_values, trial_id, state, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            # The first attempt committed before its connection died: the retry finds the
            # trial already finished. That is success only if it finished the way we asked.
            if self.get_trial(trial_id).state == state:
                return True
            raise

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._retry(super().record_heartbeat, trial_id)
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
            # Never let the exception reach Optuna's heartbeat thread, which would die with it.
            log.warning(
                "Heartbeat of trial id %d not recorded (%s); retrying at the next beat",
                trial_id,
                _first_line(exc),
            )


def _first_line(exc: BaseException) -> str:
    text = redact(str(exc.__cause__ or exc)).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn a database failure in the middle of a study into one clear ``ConnectionError``."""
    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.DBAPIError) as exc:
        raise ConnectionError(
            f"Lost the connection to Optuna storage {redact(url)} during the study "
            f"({_first_line(exc)}). Completed trials are kept: run the "
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


# Words in the errors of workers racing to create Optuna's tables (PostgreSQL, SQLite).
_RACE_WORDS = ("already exists", "duplicate", "unique", "locked")


def _sqlite_folder(url: str) -> Path | None:
    """The folder of a SQLite database file, or None for an in-memory database."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database).expanduser().resolve().parent


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
    if scheme == "sqlite":
        folder = _sqlite_folder(url)
        if folder is not None and not folder.is_dir():
            raise ValueError(
                f"Cannot open Optuna storage {redact(url)}: the folder {folder} does not exist. "
                "Create it, or pass storage= with a path in an existing folder."
            )
    heartbeat_s, grace_s = heartbeat_settings()
    engine_kwargs = {"pool_pre_ping": True}
    if scheme.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
    error: Exception | None = None
    for attempt in range(3):
        try:
            with deliberate_experimental():
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
            # Anything else (refused connection, missing folder, bad password) will not heal
            # in a few seconds, so it fails at once.
            if not any(word in str(exc).lower() for word in _RACE_WORDS):
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


def with_study_params(cfg):
    """A ``TrainConfig`` with its hyperparameters replaced by the best ones of the finished study
    ``params_from`` (unchanged without one)."""
    from cars_ml.training.hparams import HParams

    if not cfg.params_from:
        return cfg
    best = best_params(cfg.params_from, cfg.storage or None)
    known = {k: v for k, v in best.items() if k in HParams.__dataclass_fields__}
    log.info("Training with the best params of study %r: %s", cfg.params_from, known)
    # A distillation study also searched how the student learns from its teacher.
    taught = {k: best[k] for k in ("temperature", "alpha") if cfg.teacher and k in best}
    return replace(cfg, hparams=replace(cfg.hparams, **known), **taught)
