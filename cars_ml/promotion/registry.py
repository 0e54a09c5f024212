"""The registry as promotion reads it, and the stage kept in step with the alias.

Reads: the versions of a registered model, their metrics as one candidate table, the champion
and its history, who is moving it. ``moves`` writes the champion moves (alias, stage, audit
tags, history) on top of these.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cars_ml import CHAMPION_ALIAS, SERVING_CODE_TAG, serving_code_version, tracking
from cars_ml.schema import EDGE_HEADLINE, METRIC_SCHEMA
from cars_ml.tracking.descriptions import finite_float, model_description, version_description

log = logging.getLogger(__name__)

# Everything a train run logs except the validation score, plus the edge headline figures.
METRICS = (*METRIC_SCHEMA[1:], *EDGE_HEADLINE)
DEVICE_METRIC_PREFIXES = ("device_", "est_", "host_peak_")
SLICE_COARSE = ("test_f1_macro_make", "test_f1_macro_body_type")
HISTORY_TAG = "champion_history"
# Set on the version a rollback moved away from, so that the next promote does not bring it
# straight back; deleting the tag makes the version eligible again.
EXCLUDED_TAG = "promotion_excluded"
PRODUCTION, ARCHIVED = "Production", "Archived"


def _is_slice_metric(name: str) -> bool:
    """The slice F1s the guard compares and the coarse-task F1s (not the slice accuracies)."""
    return name in SLICE_COARSE or (name.startswith("slice_") and name.endswith("_f1_macro"))


def mlflow_client() -> MlflowClient:
    return MlflowClient()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def is_missing(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def list_versions(model_name: str) -> list[Any]:
    """Every version of ``model_name`` (all pages), oldest first; [] if the model is unknown."""
    client, versions, token = mlflow_client(), [], None
    # Quoted so that a name holding quotes still works; a loose match is narrowed to the name.
    clause, _ = tracking.filter_equals("name", model_name)
    while True:
        page = client.search_model_versions(clause, page_token=token)
        versions.extend(v for v in page if v.name == model_name)
        token = page.token
        if not token:
            break
    return sorted(versions, key=lambda v: int(v.version))


def candidate_table(model_name: str) -> pd.DataFrame:
    """One row per version: version, run_id, backbone, stage, and the training metrics.

    Metrics come from the version's run; a metric the run lacks (run deleted, older schema)
    falls back to a version tag of the same name, else NaN.
    """
    client, rows = mlflow_client(), []
    for mv in list_versions(model_name):
        metrics: dict[str, float] = {}
        params: dict[str, str] = {}
        if mv.run_id:
            try:
                run = client.get_run(mv.run_id)
                metrics, params = run.data.metrics, run.data.params
            except MlflowException as exc:
                log.warning("version %s: run %s unreadable (%s)", mv.version, mv.run_id, exc)
        row: dict[str, Any] = {
            "version": str(mv.version),
            "run_id": mv.run_id,
            "backbone": params.get("backbone") or mv.tags.get("backbone"),
            "stage": mv.current_stage,
            "excluded": mv.tags.get(EXCLUDED_TAG, ""),
            SERVING_CODE_TAG: serving_code_version(mv.tags),
        }
        for name in METRICS:
            row[name] = metrics[name] if name in metrics else finite_float(mv.tags.get(name))
        # What the edge agent measured on devices, the estimates for profiled devices and the
        # host peaks that estimates for devices profiled later are made from; and the
        # fine-grained slices the promote slice guard reads (NaN where a run has none).
        row.update(
            {
                k: v
                for k, v in metrics.items()
                if k.startswith(DEVICE_METRIC_PREFIXES) or _is_slice_metric(k)
            }
        )
        rows.append(row)
    columns = ["version", "run_id", "backbone", "stage", "excluded", SERVING_CODE_TAG, *METRICS]
    extra = sorted({k for r in rows for k in r} - set(columns))
    return pd.DataFrame(rows, columns=[*columns, *extra])


def current_champion(model_name: str) -> str | None:
    """The version the ``champion`` alias points at, or None."""
    try:
        aliases = mlflow_client().get_registered_model(model_name).aliases
    except MlflowException as exc:
        if is_missing(exc):
            return None
        raise
    version = aliases.get(CHAMPION_ALIAS)
    return None if version is None else str(version)


def champion_history(model_name: str) -> list[dict[str, Any]]:
    """The recorded champion moves (oldest first); [] when none was recorded."""
    try:
        raw = mlflow_client().get_registered_model(model_name).tags.get(HISTORY_TAG)
    except MlflowException as exc:
        if is_missing(exc):
            return []
        raise
    if not raw:
        return []
    try:
        history = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"Tag {HISTORY_TAG!r} of {model_name!r} is not valid JSON ({exc}); fix or delete it."
        ) from exc
    return history if isinstance(history, list) else []


def mover() -> str:
    """Who moves the champion: ``mlflow:<user>`` (``MLFLOW_TRACKING_USERNAME`` or the
    credentials file, the account a tracking server authenticates), else ``os:<user>@<host>``."""
    from mlflow.utils.credentials import read_mlflow_creds

    user = read_mlflow_creds().username
    if user:
        return f"mlflow:{user}"
    try:
        os_user = getpass.getuser()
    except (KeyError, OSError):  # No passwd entry for the uid (some containers).
        os_user = f"uid{os.getuid()}"
    return f"os:{os_user}@{socket.gethostname()}"


def _direct(write: Callable[..., Any], *args: Any) -> None:
    write(*args)


def set_stage(model_name: str, version: str, writes: Callable[..., None] = _direct) -> None:
    """Put ``version`` alone in Production (the others there archived); skip what is in place."""
    # The stage API is deprecated (FutureWarning) but users still read it: keep it in step.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # Archive the others one by one instead of `archive_existing_versions=True`: that query
        # compares the INTEGER version column with the version as received, which a tracking
        # server gets as a string over REST; on PostgreSQL with psycopg 3 (server-side binding)
        # it fails with `integer <> character varying` whatever the client sends. The promotion
        # lock makes the two steps one move.
        client, mine = mlflow_client(), None
        for other in list_versions(model_name):
            if str(other.version) == str(version):
                mine = other
            elif other.current_stage == PRODUCTION:
                writes(client.transition_model_version_stage, model_name, other.version, ARCHIVED)
        if mine is None or mine.current_stage != PRODUCTION:
            writes(client.transition_model_version_stage, model_name, str(version), PRODUCTION)


def sync_stage(model_name: str, version: str) -> bool:
    """Put the champion ``version`` in Production (others archived) if it is not; True if moved."""
    others = [v for v in list_versions(model_name) if v.current_stage == PRODUCTION]
    mine = mlflow_client().get_model_version(model_name, version)
    if mine.current_stage == PRODUCTION and all(v.version == mine.version for v in others):
        return False
    set_stage(model_name, version)
    return True


def version_exists(model_name: str, version: str) -> bool:
    try:
        mlflow_client().get_model_version(model_name, version)
    except MlflowException as exc:
        if is_missing(exc):
            return False
        raise
    return True


def describe_versions(model_name: str, table: pd.DataFrame, champion: str | None) -> None:
    """Write the Markdown descriptions of ``model_name`` and of every version in ``table``."""
    client = mlflow_client()
    rows = {str(r["version"]): r for r in table.to_dict("records")}
    backbone = ""
    for mv in list_versions(model_name):
        row = rows.get(str(mv.version), {})
        text = version_description(row, dict(mv.tags), str(mv.version) == str(champion))
        client.update_model_version(model_name, mv.version, description=text)
        if str(mv.version) == str(champion):
            backbone = row.get("backbone") or mv.tags.get("backbone", "")
    client.update_registered_model(
        model_name, description=model_description(model_name, champion, backbone)
    )
