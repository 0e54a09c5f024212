"""Optuna storage: default location, fail-fast connection checks, stale trials, best params."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from urllib.parse import urlparse

import optuna
from optuna.storages import RDBStorage, RetryFailedTrialCallback

from cars_ml.tracking import redact, tracking_uri

log = logging.getLogger(__name__)

HEARTBEAT_S = 10
GRACE_S = 30


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
    engine_kwargs = {"pool_pre_ping": True}
    if scheme.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
    error: Exception | None = None
    for attempt in range(3):
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                failed_trial_callback=RetryFailedTrialCallback(max_retry=2),
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
