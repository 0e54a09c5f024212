"""The ``promote`` step: read the registry, decide under the promotion lock, apply, report.

The decision is made from a fresh read *after* the lock is taken, so of two promotes started
together the second sees the first one's champion (and usually keeps it): one champion, one
history event per real move. Before deciding, a promote finishes a champion move that an earlier
one left half done (``moves.finish_pending_move``). A rollback that finds an interrupted
rollback counts finishing it as its own rollback, so re-running an interrupted rollback goes back
one step, not two. A dry run takes no lock and changes nothing in the registry; it reports a
pending move and decides as if it were finished, as the next real run will; it still logs its
promote run with the table, the plot and the decision.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pandas as pd

from cars_ml import OLD_SERVING_CODE_FIX, REGISTERED_MODEL_NAME, tracking
from cars_ml.promotion import moves, registry
from cars_ml.promotion.lock import promotion_lock
from cars_ml.promotion.moves import Move
from cars_ml.promotion.policy import (
    TRAIN_HINT,
    Decision,
    PromotionConfig,
    decide,
    old_serving_code,
)

log = logging.getLogger(__name__)

PROMOTION_EXPERIMENT = "stanford-cars-promotion"


def _params(config: PromotionConfig, model_name: str) -> dict[str, Any]:
    # Prefixed: under `mlflow run` the entry point's own params are already logged verbatim
    # ("true", "0.05"), and MLflow refuses to log a param twice with another spelling.
    budgets = config.budgets
    return {
        "policy.model_name": model_name,
        "policy.metric": config.metric,
        "policy.min_improvement": config.min_improvement,
        "policy.max_latency_ms": budgets.max_latency_ms,
        "policy.max_size_mb": budgets.max_size_mb,
        "policy.size_metric": budgets.size_metric,
        "policy.max_int8_f1_drop": budgets.max_int8_f1_drop,
        "policy.device": budgets.device or "",
        "policy.max_device_latency_ms": budgets.max_device_latency_ms,
        "policy.device_precision": budgets.device_precision,
        "policy.allow_estimates": budgets.allow_estimates,
        "policy.dry_run": config.dry_run,
        "policy.rollback": config.rollback,
        "policy.allow_old_serving_code": config.allow_old_serving_code,
    }


def _rollback_decision(
    decision: Decision, config: PromotionConfig, model_name: str, pending: Move | None
) -> Decision:
    plan = moves.plan_rollback(model_name, pending)
    table = decision.table.copy()
    table["is_challenger"] = table["version"] == plan.target
    reason = plan.reason
    target = table[table["version"] == plan.target]
    old = old_serving_code(target.iloc[0].to_dict(), config) if len(target) else ""
    if old:
        raise ValueError(
            f"Rollback to v{plan.target} refused: {old}. Promote another version, or "
            f"{OLD_SERVING_CODE_FIX}."
        )
    if len(target) and not bool(target["eligible"].iloc[0]):
        reason = f"{reason[:-1]}; note: v{plan.target} fails budgets now ({target['fail_reasons'].iloc[0]})."
    if config.dry_run:
        reason = f"{reason[:-1]} (dry run: registry unchanged)."
    return replace(decision, action="rollback", reason=reason, challenger=plan.target, table=table)


def _finished_rollback_decision(decision: Decision, move: Move, dry_run: bool) -> Decision:
    """The rollback asked for is the interrupted one: finishing it is all there is to do."""
    table = decision.table.copy()
    table["is_challenger"] = table["version"] == move.target
    table["is_champion"] = table["version"] == move.source
    reason = (
        f"Roll back from v{move.source} to v{move.target}: the interrupted rollback is this one; "
        "run the rollback again to go back a further step."
    )
    if dry_run:
        reason = f"{reason[:-1]} (dry run: registry unchanged)."
    return replace(
        decision,
        action="rollback",
        reason=reason,
        challenger=move.target,
        champion=move.source,
        table=table,
    )


def decide_now(
    config: PromotionConfig,
    model_name: str = REGISTERED_MODEL_NAME,
    interrupted: moves.Recovery | None = None,
) -> Decision:
    """Read the registry and decide (promotion or rollback) without changing anything.

    ``interrupted`` is a half-done move: for a dry run the pending one, which is decided as if
    finished (the next real run finishes it first); for a real run the one it has just finished.
    """
    table = registry.candidate_table(model_name)
    if table.empty:
        raise ValueError(
            f"Registered model {model_name!r} has no versions in the registry at "
            f"{tracking.redact(tracking.tracking_uri())}: {TRAIN_HINT}."
        )
    if config.budgets.device and config.budgets.allow_estimates:
        table = _with_estimates(table, config.budgets.device)
    champion = registry.current_champion(model_name)
    move = interrupted.move if interrupted and interrupted.outcome != "undone" else None
    pending = move if config.dry_run else None
    if pending is not None:
        champion = pending.target
        if pending.action == "rollback" and pending.source:
            left = table["version"] == pending.source
            table.loc[left, "excluded"] = f"rolled back from champion (move {pending.id}, pending)"
    decision = decide(table, champion, config)
    if config.rollback and move is not None and move.action == "rollback":
        decision = _finished_rollback_decision(decision, move, config.dry_run)
    elif config.rollback:
        decision = _rollback_decision(decision, config, model_name, pending)
    if interrupted is not None:
        decision = replace(decision, reason=f"{interrupted.describe()} {decision.reason}")
    return decision


def _with_estimates(table, device: str):
    """Fill in ``est_<device>_*`` for versions trained before the device was calibrated, from
    their host latencies and host peaks and the device's profile (``measure/estimate.py``)."""
    from cars_ml.measure.estimate import estimate_latencies, profile_peaks

    profile = tracking.device_profiles().get(device)
    if not profile:
        return table
    table = table.copy()
    for index, row in table.iterrows():
        for name, value in estimate_latencies(
            row.to_dict(), {device: profile_peaks(profile)}
        ).items():
            if name not in table.columns or not pd.notna(table.at[index, name]):
                table.loc[index, name] = value
    return table


def _apply(decision: Decision, model_name: str, done: Move | None, guard) -> None:
    """Apply ``decision`` unless ``done`` (a finished interrupted rollback) already did."""
    if decision.action == "promote":
        moves.apply_promotion(
            model_name,
            decision.challenger,
            decision.reason,
            previous=decision.champion,
            guard=guard,
        )
    elif decision.action == "rollback" and done is not None and done.action == "rollback":
        return
    elif decision.action == "rollback":
        plan = moves.rollback(model_name, guard=guard)
        if plan.target != decision.challenger:  # impossible under the lock; fail loudly if not
            raise RuntimeError(f"rollback moved to v{plan.target}, decided v{decision.challenger}")
    elif decision.champion is not None and registry.sync_stage(model_name, decision.champion):
        log.info("champion v%s was not alone in Production: stage re-synced", decision.champion)


def _describe(model_name: str, decision: Decision) -> None:
    """Refresh the registry's Markdown descriptions; the move is done, so a failure only warns."""
    try:
        registry.describe_versions(model_name, decision.table, decision.new_champion)
    except tracking.MlflowException as exc:
        log.warning("registry descriptions of %s not updated: %s", model_name, exc.message)


def _report(
    decision: Decision, config: PromotionConfig, interrupted: moves.Recovery | None
) -> None:
    # Imported here: matplotlib is only needed once there is something to draw.
    from cars_ml.promotion.report import candidates_figure, format_table

    table = decision.table
    tracking.log_metrics(
        {
            "candidates": len(table),
            "eligible": int(table["eligible"].sum()),
            "improvement": decision.improvement,
        }
    )
    tracking.set_tags(
        {
            "decision": decision.action,
            "decision_reason": decision.reason,
            "champion_version": decision.new_champion or "",
            "previous_champion_version": decision.champion or "",
            "challenger_version": decision.challenger or "",
            "dry_run": str(decision.dry_run).lower(),
        }
    )
    if interrupted is not None:
        # A dry run only saw the interrupted move; a real run finished or undid it.
        key = "pending_move" if decision.dry_run else f"{interrupted.outcome}_move"
        tracking.set_tags({key: interrupted.move.to_json()})
    tracking.log_table(table, "candidates")
    tracking.log_figure(candidates_figure(decision, config.budgets), "candidates_plot.png")
    print(format_table(decision, config.budgets), flush=True)


def run_promote(
    config: PromotionConfig,
    model_name: str = REGISTERED_MODEL_NAME,
    *,
    experiment: str | None = PROMOTION_EXPERIMENT,
    lock_timeout_s: float = 120.0,
) -> Decision:
    """Decide (and unless ``dry_run`` apply) a promotion or rollback, in a ``promote`` run.

    Raises ValueError for an empty registry or nothing to roll back to, ConnectionError when
    the tracking server does not answer, TimeoutError when another promote holds the lock.
    """
    tracking.check_tracking_server()
    tracking.use_experiment(experiment)
    with tracking.start_run("promote", tags={"model_name": model_name, "step": "promote"}):
        tracking.log_params(_params(config, model_name))
        if config.dry_run:
            pending = moves.pending_move(model_name)
            interrupted = moves.Recovery(pending, "pending") if pending else None
            decision = decide_now(config, model_name, interrupted)
        else:
            with promotion_lock(model_name, timeout_s=lock_timeout_s) as lock:
                lock.verify()
                interrupted = moves.finish_pending_move(model_name, guard=lock.verify)
                # Decide from what the registry says now that no other promote can move it.
                decision = decide_now(config, model_name, interrupted)
                lock.verify()
                done = (
                    interrupted.move if interrupted and interrupted.outcome == "finished" else None
                )
                _apply(decision, model_name, done, guard=lock.verify)
                _describe(model_name, decision)
        log.info("promote %s: %s", model_name, decision.reason)
        _report(decision, config, interrupted)
    return decision
