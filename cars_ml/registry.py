"""The only module that moves the ``champion`` alias and the stages of registered versions.

The alias is the source of truth; the deprecated stage is kept in step (the champion is in
``Production``, the one it replaced ``Archived``). Every move leaves an audit trail: tags on
the version (``promoted_at``, ``promoted_from_version``, ``promotion_reason``,
``promotion_run_id``), tags on the replaced version (``replaced_at``, ``replaced_by_version``)
and a ``champion_history`` JSON list on the registered model, which ``rollback`` replays.
Callers hold ``cars_ml.promotion_lock.promotion_lock`` around read-decide-apply.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cars_ml import CHAMPION_ALIAS, tracking
from cars_ml.promote import RollbackPlan, decide_rollback
from cars_ml.schema import EDGE_HEADLINE, METRIC_SCHEMA

log = logging.getLogger(__name__)

# Everything a train run logs except the validation score, plus the edge headline figures.
METRICS = (*METRIC_SCHEMA[1:], *EDGE_HEADLINE)
HISTORY_TAG = "champion_history"
# Set on the version a rollback moved away from, so that the next promote does not bring it
# straight back; deleting the tag makes the version eligible again.
EXCLUDED_TAG = "promotion_excluded"
PRODUCTION, ARCHIVED = "Production", "Archived"
# Registered-model tag values are VARCHAR(5000) in MLflow's SQL schema: keep the newest events
# that fit. Older ones remain in the promote runs and the version tags.
_HISTORY_MAX_CHARS = 4900


def _client() -> MlflowClient:
    return MlflowClient()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _missing(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def list_versions(model_name: str) -> list[Any]:
    """Every version of ``model_name`` (all pages), oldest first; [] if the model is unknown."""
    client, versions, token = _client(), [], None
    # Quoted so that a name holding quotes still works; a loose match is narrowed to the name.
    clause, _ = tracking.filter_equals("name", model_name)
    while True:
        page = client.search_model_versions(clause, page_token=token)
        versions.extend(v for v in page if v.name == model_name)
        token = page.token
        if not token:
            break
    return sorted(versions, key=lambda v: int(v.version))


def _float(text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def candidate_table(model_name: str) -> pd.DataFrame:
    """One row per version: version, run_id, backbone, stage, and the training metrics.

    Metrics come from the version's run; a metric the run lacks (run deleted, older schema)
    falls back to a version tag of the same name, else NaN.
    """
    client, rows = _client(), []
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
        }
        for name in METRICS:
            row[name] = metrics[name] if name in metrics else _float(mv.tags.get(name))
        rows.append(row)
    columns = ["version", "run_id", "backbone", "stage", "excluded", *METRICS]
    return pd.DataFrame(rows, columns=columns)


def current_champion(model_name: str) -> str | None:
    """The version the ``champion`` alias points at, or None."""
    try:
        aliases = _client().get_registered_model(model_name).aliases
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise
    version = aliases.get(CHAMPION_ALIAS)
    return None if version is None else str(version)


def champion_history(model_name: str) -> list[dict[str, Any]]:
    """The recorded champion moves (oldest first); [] when none was recorded."""
    try:
        raw = _client().get_registered_model(model_name).tags.get(HISTORY_TAG)
    except MlflowException as exc:
        if _missing(exc):
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


def _set_stage(model_name: str, version: str) -> None:
    # The stage API is deprecated (FutureWarning) but users still read it: keep it in step.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # Archive the others one by one instead of `archive_existing_versions=True`: that query
        # compares the INTEGER version column with the version as received, which a tracking
        # server gets as a string over REST; on PostgreSQL with psycopg 3 (server-side binding)
        # it fails with `integer <> character varying` whatever the client sends. The promotion
        # lock makes the two steps one move.
        client = _client()
        for other in list_versions(model_name):
            if other.current_stage == PRODUCTION and str(other.version) != str(version):
                client.transition_model_version_stage(model_name, str(other.version), ARCHIVED)
        client.transition_model_version_stage(model_name, str(version), PRODUCTION)


def sync_stage(model_name: str, version: str) -> bool:
    """Put the champion ``version`` in Production (others archived) if it is not; True if moved."""
    others = [v for v in list_versions(model_name) if v.current_stage == PRODUCTION]
    mine = _client().get_model_version(model_name, version)
    if mine.current_stage == PRODUCTION and all(v.version == mine.version for v in others):
        return False
    _set_stage(model_name, version)
    return True


def _append_history(model_name: str, event: dict[str, Any]) -> None:
    history = [*champion_history(model_name), event]
    text = json.dumps(history, separators=(",", ":"))
    while len(text) > _HISTORY_MAX_CHARS and len(history) > 1:
        history = history[1:]
        text = json.dumps(history, separators=(",", ":"))
    _client().set_registered_model_tag(model_name, HISTORY_TAG, text)


def _move_champion(
    model_name: str,
    version: str,
    previous: str | None,
    reason: str,
    action: str,
    run_id: str | None,
) -> None:
    client, now, version = _client(), _now(), str(version)
    try:
        client.get_model_version(model_name, version)
    except MlflowException as exc:
        raise ValueError(f"{model_name!r} has no version {version!r}: nothing to move.") from exc
    # Alias first: it is what serving resolves, so it is the source of truth if we die midway.
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
    _set_stage(model_name, version)
    tags = {
        "promoted_at": now,
        "promoted_from_version": previous or "",
        "promotion_reason": tracking.redact(reason)[:4900],
        "promotion_run_id": run_id or "",
        "promotion_action": action,
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if EXCLUDED_TAG in client.get_model_version(model_name, version).tags:
        # Choosing the version again (a rollback to it) lifts an earlier exclusion.
        client.delete_model_version_tag(model_name, version, EXCLUDED_TAG)
    if previous and previous != version:
        client.set_model_version_tag(model_name, previous, "replaced_at", now)
        client.set_model_version_tag(model_name, previous, "replaced_by_version", version)
    event = {
        "action": action,
        "version": version,
        "previous": previous,
        "at": now,
        "run_id": run_id,
    }
    _append_history(model_name, event)
    log.info("%s: champion %s -> %s (%s)", model_name, previous, version, action)


def apply_promotion(
    model_name: str, version: str, reason: str, previous: str | None, run_id: str | None = None
) -> None:
    """Make ``version`` the champion: alias, Production stage, audit tags, history event.

    ``run_id`` defaults to the active (promote) run.
    """
    run_id = run_id or tracking.active_run_id()
    _move_champion(model_name, version, previous, reason, "promote", run_id)


def plan_rollback(model_name: str) -> RollbackPlan:
    """Where a rollback would move the champion (reads the registry, changes nothing)."""
    return decide_rollback(champion_history(model_name), current_champion(model_name))


def rollback(model_name: str, run_id: str | None = None) -> RollbackPlan:
    """Move the champion back to the previous one (alias and stage) with audit tags.

    The version moved away from is tagged ``promotion_excluded`` so ``promote`` skips it.
    """
    plan = plan_rollback(model_name)
    run_id = run_id or tracking.active_run_id()
    _move_champion(model_name, plan.target, plan.from_version, plan.reason, "rollback", run_id)
    if plan.from_version and plan.from_version != plan.target:
        note = (
            f"rolled back from champion at {_now()} (promote run {run_id}); delete this tag to "
            "make the version eligible again"
        )
        _client().set_model_version_tag(model_name, plan.from_version, EXCLUDED_TAG, note)
    return plan
