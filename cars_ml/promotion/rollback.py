"""The rollback decision: where the champion goes back to, from the recorded history. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RollbackPlan:
    """Where a rollback moves the champion: ``target`` replaces ``from_version``."""

    target: str
    from_version: str | None
    reason: str


def champion_stack(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Replay ``champion_history`` events: a promotion pushes, a rollback pops.

    Each event has ``action`` ("promote" or "rollback"), ``version`` (the new champion) and
    ``previous`` (the champion it replaced, or None).
    """
    stack: list[str] = []
    for event in history:
        version = str(event["version"])
        previous = event.get("previous")
        if event.get("action") == "rollback":
            if stack:
                stack.pop()
        elif not stack and previous is not None:
            # History was trimmed or started after a champion existed: seed it.
            stack.append(str(previous))
        if not stack or stack[-1] != version:
            stack.append(version)
    return stack


def decide_rollback(
    history: Sequence[Mapping[str, Any]], current_champion: str | None = None
) -> RollbackPlan:
    """The champion before the current one, from the recorded history.

    If the ``champion`` alias was moved outside ``promote`` (it differs from the last recorded
    champion), the rollback restores the last recorded champion.
    """
    stack = champion_stack(history)
    current = None if current_champion is None else str(current_champion)
    if not stack:
        raise ValueError(
            "Nothing to roll back to: the registered model has no champion_history (no promotion "
            "was recorded). Run `mlflow run . -e promote --env-manager local` first."
        )
    if current != stack[-1]:
        return RollbackPlan(
            stack[-1],
            current,
            f"Roll back to v{stack[-1]}, the last champion recorded by promote "
            f"(the alias points at {'v' + current if current else 'nothing'}).",
        )
    if len(stack) < 2:
        raise ValueError(
            f"Nothing to roll back to: v{current} is the first champion recorded in "
            "champion_history. Promote another version first, or move the alias by hand."
        )
    return RollbackPlan(
        stack[-2], current, f"Roll back from v{current} to the previous champion v{stack[-2]}."
    )
