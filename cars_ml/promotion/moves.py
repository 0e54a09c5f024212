"""The only module that moves the ``champion`` alias (and, through ``registry``, the stages).

The alias is the source of truth; the deprecated stage is kept in step (the champion is in
``Production``, the one it replaced ``Archived``). Every move leaves an audit trail: tags on
the version (``promoted_at``, ``promoted_from_version``, ``promotion_reason``,
``promotion_run_id``, ``promotion_action``, ``promoted_by``, ``promotion_move_id``), tags on
the replaced version (``replaced_at``, ``replaced_by_version``) and a ``champion_history`` JSON
list on the registered model, which ``rollback`` replays.

A move survives interruption (SIGKILL, eviction, a lost connection) at any write: its intent is
the registered-model tag ``champion_move_pending`` (from, to, action, who, when, id), written
before the first write and deleted after the last, and every write in between is idempotent.
``finish_pending_move`` completes such a move (or undoes it when its target version was deleted);
``promotion.run`` calls it under the lock before deciding. Callers hold
``cars_ml.promotion.lock.promotion_lock`` around finish-read-decide-apply.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cars_ml import CHAMPION_ALIAS, tracking
from cars_ml.promotion.registry import (
    EXCLUDED_TAG,
    HISTORY_TAG,
    champion_history,
    current_champion,
    is_missing,
    mlflow_client,
    mover,
    now,
    set_stage,
    version_exists,
)
from cars_ml.promotion.rollback import RollbackPlan, decide_rollback

log = logging.getLogger(__name__)

# The move in progress, written before its first write and deleted after its last: a promote
# that finds it finishes (or undoes) that move before deciding anything.
PENDING_TAG = "champion_move_pending"
MOVE_ACTIONS = ("promote", "rollback")
FAULT_ENV = "CARS_ML_FAULT_AFTER_WRITE"
_REASON_MAX_CHARS = 2000
# Registered-model tag values are VARCHAR(5000) in MLflow's SQL schema: keep the newest events
# that fit. Older ones remain in the promote runs and the version tags.
_HISTORY_MAX_CHARS = 4900


@dataclass(frozen=True)
class Move:
    """One champion move (``promote`` or ``rollback``) from ``source`` to ``target``.

    It is recorded as the registered-model tag ``champion_move_pending`` before the first write
    and cleared after the last, so a move found there was interrupted. ``at`` is written to
    every tag, which makes finishing a move write exactly what the first attempt would have.
    """

    id: str
    action: str
    target: str
    source: str | None
    by: str
    at: str
    run_id: str | None
    reason: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "action": self.action,
                "from": self.source,
                "to": self.target,
                "by": self.by,
                "at": self.at,
                "run_id": self.run_id,
                "reason": self.reason,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str, model_name: str) -> Move:
        try:
            data = json.loads(text)
            move = cls(
                id=str(data["id"]),
                action=str(data["action"]),
                target=str(data["to"]),
                source=None if data.get("from") is None else str(data["from"]),
                by=str(data.get("by") or "unknown"),
                at=str(data["at"]),
                run_id=data.get("run_id"),
                reason=str(data.get("reason") or ""),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"Tag {PENDING_TAG!r} of {model_name!r} is not a valid move record ({exc}): "
                "inspect the champion alias and champion_history, then delete the tag."
            ) from exc
        if move.action not in MOVE_ACTIONS:
            raise ValueError(
                f"Tag {PENDING_TAG!r} of {model_name!r} has action {move.action!r}, expected one "
                f"of {MOVE_ACTIONS}: inspect the registry, then delete the tag."
            )
        return move

    def describe(self) -> str:
        source = f"v{self.source}" if self.source else "no champion"
        return (
            f"{self.action} {source} -> v{self.target} (move {self.id} by {self.by} at {self.at})"
        )


@dataclass(frozen=True)
class Recovery:
    """An interrupted move and what became of it: ``finished`` or ``undone`` by
    ``finish_pending_move``, or still ``pending`` (what a dry run sees)."""

    move: Move
    outcome: str

    def describe(self) -> str:
        if self.outcome == "finished":
            return f"Finished the interrupted {self.move.describe()}."
        if self.outcome == "undone":
            return (
                f"Undid the interrupted {self.move.describe()}: v{self.move.target} no longer "
                "exists."
            )
        return (
            f"An interrupted {self.move.describe()} is pending; the next promote or rollback "
            "finishes it first."
        )


class _Writes:
    """Performs the registry writes of one move, each after ``guard`` (the lock's check).

    ``CARS_ML_FAULT_AFTER_WRITE=<n>`` kills the process with SIGKILL right after write ``n``:
    the crash tests use it to interrupt a move at every write. Only the move reads it.
    """

    def __init__(self, guard: Callable[[], None] | None) -> None:
        self.guard = guard
        self.count = 0
        raw = os.environ.get(FAULT_ENV, "").strip()
        if raw and not raw.isdigit():
            raise ValueError(f"{FAULT_ENV} must be a whole number of writes, got {raw!r}")
        self.fault_after = int(raw) if raw else None

    def __call__(self, write: Callable[..., Any], *args: Any) -> None:
        if self.guard is not None:
            self.guard()
        write(*args)
        self.count += 1
        if self.count == self.fault_after:
            os.kill(os.getpid(), signal.SIGKILL)


def _set_tags(model_name: str, version: str, tags: dict[str, str], writes: _Writes) -> None:
    """Set the version tags that differ from ``tags`` (a finished move rewrites nothing)."""
    client = mlflow_client()
    current = client.get_model_version(model_name, version).tags
    for key, value in tags.items():
        if current.get(key) != value:
            writes(client.set_model_version_tag, model_name, version, key, value)


def _history_text(history: list[dict[str, Any]]) -> str:
    text = json.dumps(history, separators=(",", ":"))
    while len(text) > _HISTORY_MAX_CHARS and len(history) > 1:
        history = history[1:]
        text = json.dumps(history, separators=(",", ":"))
    return text


def _excluded_note(move: Move) -> str:
    return (
        f"rolled back from champion at {move.at} by {move.by} (move {move.id}, promote run "
        f"{move.run_id}); delete this tag to make the version eligible again"
    )


def _carry_out(model_name: str, move: Move, writes: _Writes) -> None:
    """Every write of ``move`` after its intent, each one idempotent, the intent cleared last.

    The order keeps each intermediate state readable even without the intent: a rollback first
    excludes the version it leaves (so nothing promotes it back), then the alias (what serving
    resolves) moves, then the stage, the audit tags, and the history event, which carries the
    move id so that finishing a move never records it twice.
    """
    client = mlflow_client()
    if move.action == "rollback" and move.source and move.source != move.target:
        _set_tags(model_name, move.source, {EXCLUDED_TAG: _excluded_note(move)}, writes)
    if current_champion(model_name) != move.target:
        writes(client.set_registered_model_alias, model_name, CHAMPION_ALIAS, move.target)
    set_stage(model_name, move.target, writes)
    tags = {
        "promoted_at": move.at,
        "promoted_from_version": move.source or "",
        "promotion_reason": move.reason,
        "promotion_run_id": move.run_id or "",
        "promotion_action": move.action,
        "promoted_by": move.by,
        "promotion_move_id": move.id,
    }
    _set_tags(model_name, move.target, tags, writes)
    if EXCLUDED_TAG in client.get_model_version(model_name, move.target).tags:
        # Choosing the version again (a rollback to it) lifts an earlier exclusion.
        writes(client.delete_model_version_tag, model_name, move.target, EXCLUDED_TAG)
    if move.source and move.source != move.target and version_exists(model_name, move.source):
        replaced = {"replaced_at": move.at, "replaced_by_version": move.target}
        _set_tags(model_name, move.source, replaced, writes)
    history = champion_history(model_name)
    if not any(event.get("id") == move.id for event in history):
        event = {
            "action": move.action,
            "version": move.target,
            "previous": move.source,
            "at": move.at,
            "by": move.by,
            "run_id": move.run_id,
            "id": move.id,
        }
        text = _history_text([*history, event])
        writes(client.set_registered_model_tag, model_name, HISTORY_TAG, text)
    writes(client.delete_registered_model_tag, model_name, PENDING_TAG)
    log.info("%s: %s", model_name, move.describe())


def _undo(model_name: str, move: Move, writes: _Writes) -> None:
    """Put the champion back where ``move`` found it (its target is gone), then clear it."""
    client = mlflow_client()
    if move.source and version_exists(model_name, move.source):
        if current_champion(model_name) != move.source:
            writes(client.set_registered_model_alias, model_name, CHAMPION_ALIAS, move.source)
        set_stage(model_name, move.source, writes)
        note = client.get_model_version(model_name, move.source).tags.get(EXCLUDED_TAG, "")
        if move.id in note:
            writes(client.delete_model_version_tag, model_name, move.source, EXCLUDED_TAG)
    elif current_champion(model_name) is not None:
        writes(client.delete_registered_model_alias, model_name, CHAMPION_ALIAS)
    writes(client.delete_registered_model_tag, model_name, PENDING_TAG)
    log.warning("%s: undid the interrupted %s", model_name, move.describe())


def pending_move(model_name: str) -> Move | None:
    """The move recorded in ``champion_move_pending``: one that was interrupted (or, without
    the promotion lock, one in progress); None when there is none."""
    try:
        raw = mlflow_client().get_registered_model(model_name).tags.get(PENDING_TAG)
    except tracking.MlflowException as exc:
        if is_missing(exc):
            return None
        raise
    return Move.from_json(raw, model_name) if raw else None


def finish_pending_move(
    model_name: str, guard: Callable[[], None] | None = None
) -> Recovery | None:
    """Finish (roll forward) an interrupted move, or undo it when its target is gone.

    Call it under the promotion lock, before deciding: it leaves the registry as if the
    interrupted move had completed (or never started). None when nothing was pending.
    """
    move = pending_move(model_name)
    if move is None:
        return None
    writes = _Writes(guard)
    if version_exists(model_name, move.target):
        _carry_out(model_name, move, writes)
        return Recovery(move, "finished")
    _undo(model_name, move, writes)
    return Recovery(move, "undone")


def _move_champion(
    model_name: str,
    action: str,
    version: str,
    previous: str | None,
    reason: str,
    run_id: str | None,
    guard: Callable[[], None] | None,
) -> Move:
    version = str(version)
    if not version_exists(model_name, version):
        raise ValueError(f"{model_name!r} has no version {version!r}: nothing to move.")
    pending = pending_move(model_name)
    if pending is not None:
        raise RuntimeError(
            f"{model_name!r} has an unfinished {pending.describe()}: promote runs finish it "
            "first (registry.finish_pending_move)."
        )
    move = Move(
        id=uuid.uuid4().hex[:12],
        action=action,
        target=version,
        source=None if previous is None else str(previous),
        by=mover(),
        at=now(),
        run_id=run_id,
        # The intent and the history share the model's tag budget (5000 characters each).
        reason=tracking.redact(reason)[:_REASON_MAX_CHARS],
    )
    writes = _Writes(guard)
    # The intent first: from here on, any interruption leaves a record of what to finish.
    writes(mlflow_client().set_registered_model_tag, model_name, PENDING_TAG, move.to_json())
    _carry_out(model_name, move, writes)
    return move


def apply_promotion(
    model_name: str,
    version: str,
    reason: str,
    previous: str | None,
    run_id: str | None = None,
    guard: Callable[[], None] | None = None,
) -> Move:
    """Make ``version`` the champion: alias, Production stage, audit tags, history event.

    ``run_id`` defaults to the active (promote) run; ``guard`` runs before every write (the
    promotion lock's ``check``).
    """
    run_id = run_id or tracking.active_run_id()
    return _move_champion(model_name, "promote", version, previous, reason, run_id, guard)


def plan_rollback(model_name: str, pending: Move | None = None) -> RollbackPlan:
    """Where a rollback would move the champion (reads the registry, changes nothing).

    With ``pending`` (an interrupted move a dry run has not finished), plan as if it had been.
    """
    history, champion = champion_history(model_name), current_champion(model_name)
    if pending is not None:
        if not any(event.get("id") == pending.id for event in history):
            event = {
                "action": pending.action,
                "version": pending.target,
                "previous": pending.source,
            }
            history = [*history, event]
        champion = pending.target
    return decide_rollback(history, champion)


def rollback(
    model_name: str, run_id: str | None = None, guard: Callable[[], None] | None = None
) -> RollbackPlan:
    """Move the champion back to the previous one (alias and stage) with audit tags.

    The version moved away from is tagged ``promotion_excluded`` so ``promote`` skips it.
    """
    plan = plan_rollback(model_name)
    run_id = run_id or tracking.active_run_id()
    _move_champion(
        model_name, "rollback", plan.target, plan.from_version, plan.reason, run_id, guard
    )
    return plan
