"""The promotion policy: a candidate table in, a decision out. Pure: no MLflow, no I/O.

Each registered version is one row (``version``, ``run_id``, ``backbone`` and the training
metrics). Edge budgets rule versions out, each with a human reason; the best ``metric`` among
the rest is the challenger (ties go to the lower ``latency_ms_p95``, then to the current
champion, then to the newest version). The challenger replaces the champion only if it beats it
by at least ``min_improvement``; a champion that itself fails a budget now (budgets tightened,
metrics re-measured) is replaced by any passing challenger. ``cars_ml.promotion.registry`` applies the
decision.

With ``device`` set, the latency budget applies to what the edge agent measured on that device
(``device_<name>_<precision>_latency_ms_p95``) instead of this host's Keras latency: a version not
measured there fails it ("not measured on <name>: run the edge agent there"), unless
``allow_estimates`` lets the estimate from the device's profile stand in, which the reason says.

The size budget applies to ``model_size_mb`` (the Keras model that the registry serves) by
default: it is the conservative choice, since the int8 file is about four times smaller. Set
``size_metric="tflite_int8_size_mb"`` when only the int8 file goes to the device.

``max_slice_regression`` (off by default) guards the fine-grained slices
(``slice_<grouping>_<group>_f1_macro``, see ``cars_ml.training.slices``): a version that loses
more than that on any slice against the current champion is ruled out like a budget failure,
with the slice named. The next eligible version may then be promoted if it beats the champion
(it passes the guard too); the decision's reason names the better versions the guard ruled out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cars_ml import (
    MIN_SERVING_CODE_VERSION,
    SERVING_CODE_TAG,
    serving_code_version,
)
from cars_ml.promotion.checks import device_latency, fmt, metric_value, not_measured, slice_guard
from cars_ml.promotion.config import (  # noqa: F401  (re-exported)
    DEVICE_NAME,
    DEVICE_PRECISIONS,
    INT8_DROP_METRIC,
    LATENCY_METRIC,
    RANKING_METRICS,
    SIZE_METRICS,
    Budgets,
    PromotionConfig,
)

# Float noise (0.83 - 0.82 = 0.00999...) must not turn "beats by 0.01" into "does not".
IMPROVEMENT_TOLERANCE = 1e-9
ACTIONS = ("promote", "keep", "none_eligible", "rollback")
TRAIN_HINT = (
    "train and register a model first: `mlflow run . -e train --env-manager local` "
    "(or `mlflow run . --env-manager local` for the whole pipeline)"
)


@dataclass(frozen=True, eq=False)
class Decision:
    """The outcome: ``action`` is promote, keep, none_eligible or rollback.

    ``champion`` is the champion before the decision, ``challenger`` the best eligible version
    (the rollback target for a rollback). ``table`` is the evaluated candidate table.
    """

    action: str
    reason: str
    challenger: str | None
    champion: str | None
    metric: str
    table: pd.DataFrame
    improvement: float | None = None
    dry_run: bool = False

    @property
    def new_champion(self) -> str | None:
        """The champion once the decision is applied (unchanged for a dry run)."""
        moves = self.action in ("promote", "rollback") and not self.dry_run
        return self.challenger if moves else self.champion

    @property
    def changes_registry(self) -> bool:
        return self.action in ("promote", "rollback") and not self.dry_run


def evaluate(candidates: pd.DataFrame, config: PromotionConfig) -> pd.DataFrame:
    """The candidate table plus ``<check>_pass`` / ``<check>_reason`` columns and ``eligible``.

    Checks: each budget, ``metric`` (the ranking metric must be present) and ``excluded`` (a
    non-empty ``excluded`` column, e.g. set when a rollback moved away from the version). A
    missing value fails the check that needs it with the reason ``"<metric> missing"``.
    """
    if "version" not in candidates.columns:
        raise ValueError("the candidate table needs a 'version' column (one row per model version)")
    table = candidates.copy().reset_index(drop=True)
    table["version"] = table["version"].astype(str)
    rows = table.to_dict("records")
    budgets = config.budgets
    if budgets.device:
        latencies = [device_latency(row, budgets) for row in rows]
        table["device"] = f"{budgets.device} ({budgets.device_precision})"
        table["device_latency_ms"] = [value for value, _ in latencies]
        table["device_latency_source"] = [source for _, source in latencies]
        rows = table.to_dict("records")
    checks = [*budgets.checks(), ("metric", config.metric, "", None)]
    all_reasons: list[list[str]] = [[] for _ in rows]
    for check, column, budget, limit in checks:
        passes, reasons = [], []
        for i, row in enumerate(rows):
            value = metric_value(row, column)
            if check == "device_latency":
                value = metric_value(row, "device_latency_ms")
            if check != "metric" and limit is None:
                ok, reason = True, ""
            elif value is None and check == "device_latency":
                ok, reason = False, not_measured(budgets)
            elif value is None:
                ok, reason = False, f"{column} missing"
            elif check != "metric" and value > limit:
                ok, reason = False, f"{column} {fmt(value)} > {budget} {fmt(limit)}"
                if check == "device_latency" and row["device_latency_source"] == "estimate":
                    reason = (
                        f"{budgets.estimate_column} {fmt(value)} > {budget} {fmt(limit)} "
                        f"(estimate: not measured on {budgets.device})"
                    )
            else:
                ok, reason = True, ""
            passes.append(ok)
            reasons.append(reason)
            if reason:
                all_reasons[i].append(reason)
        table[f"{check}_pass"] = passes
        table[f"{check}_reason"] = reasons
    _rule_out(table, rows, config, all_reasons)
    table["eligible"] = [not r for r in all_reasons]
    table["fail_reasons"] = ["; ".join(r) for r in all_reasons]
    return table


def _rule_out(
    table: pd.DataFrame, rows: list[dict], config: PromotionConfig, all_reasons: list[list[str]]
) -> None:
    """Add the reasons beyond the budgets: serving code older than the minimum, and an
    ``excluded`` tag (its own ``excluded_pass`` / ``excluded_reason`` columns)."""
    excluded = [row.get("excluded") for row in rows]
    excluded = [
        f"excluded: {x.strip()}" if isinstance(x, str) and x.strip() else "" for x in excluded
    ]
    for reasons, row, exclusion in zip(all_reasons, rows, excluded, strict=True):
        reasons.extend(r for r in (old_serving_code(row, config), exclusion) if r)
    table["excluded_pass"] = [not x for x in excluded]
    table["excluded_reason"] = excluded


def old_serving_code(row: Mapping[str, Any], config: PromotionConfig) -> str:
    """Why a version's serving code rules it out ("" when it is recent enough or allowed)."""
    found = serving_code_version(row)
    if found >= MIN_SERVING_CODE_VERSION or config.allow_old_serving_code:
        return ""
    return (
        f"{SERVING_CODE_TAG} {found} < {MIN_SERVING_CODE_VERSION} (its request guard lacks "
        "fixes; train it again, or allow_old_serving_code=true)"
    )


def _rank_key(row: Mapping[str, Any], metric: str, champion: str | None) -> tuple:
    # Ties go to the faster version: on the device when a device decides, else on this host.
    latency = metric_value(row, "device_latency_ms")
    latency = metric_value(row, LATENCY_METRIC) if latency is None else latency
    return (
        -(metric_value(row, metric) or 0.0),
        latency if latency is not None else math.inf,
        0 if row["version"] == champion else 1,
        -int(row["version"]) if row["version"].isdigit() else 0,
    )


def _describe(row: Mapping[str, Any], metric: str) -> str:
    latency = metric_value(row, LATENCY_METRIC)
    lat = f", {LATENCY_METRIC} {fmt(latency)}" if latency is not None else ""
    device = metric_value(row, "device_latency_ms")
    if device is not None:
        source = "estimated" if row.get("device_latency_source") == "estimate" else "measured"
        lat = f", p95 on {row['device']} {fmt(device)} ms {source}"
    return f"v{row['version']} ({metric} {fmt(metric_value(row, metric) or 0.0)}{lat})"


def decide(
    candidates: pd.DataFrame, current_champion_version: str | None, config: PromotionConfig
) -> Decision:
    """Choose the challenger and whether it replaces ``current_champion_version``."""
    if candidates is None or len(candidates) == 0:
        raise ValueError(f"No registered model versions to choose from: {TRAIN_HINT}.")
    champion = None if current_champion_version is None else str(current_champion_version)
    table = evaluate(candidates, config)
    slice_guard(table, champion, config.max_slice_regression)
    metric = config.metric
    rows = table.to_dict("records")
    eligible = sorted(
        (r for r in rows if r["eligible"]), key=lambda r: _rank_key(r, metric, champion)
    )
    table["rank"] = pd.array([None] * len(table), dtype="Int64")
    for rank, row in enumerate(eligible, start=1):
        table.loc[table["version"] == row["version"], "rank"] = rank
    challenger = eligible[0] if eligible else None
    table["is_champion"] = table["version"] == champion
    table["is_challenger"] = table["version"] == (challenger["version"] if challenger else None)
    champ_row = next((r for r in rows if r["version"] == champion), None)
    action, reason, improvement = _verdict(rows, challenger, champ_row, champion, config)
    guarded = _guarded_above(rows, challenger, metric, champion)
    if guarded:
        reason = f"{reason[:-1]}; the slice guard ruled out {guarded}."
    if config.dry_run:
        reason = f"{reason[:-1]} (dry run: registry unchanged)."
    return Decision(
        action=action,
        reason=reason,
        challenger=challenger["version"] if challenger else None,
        champion=champion,
        metric=metric,
        table=table,
        improvement=improvement,
        dry_run=config.dry_run,
    )


def _verdict(
    rows: list[dict], challenger, champ_row, champion: str | None, config: PromotionConfig
) -> tuple[str, str, float | None]:
    """``(action, reason, improvement)``: what happens to the champion, and why."""
    metric = config.metric
    if challenger is None:
        stays = f"champion v{champion} stays" if champion else "no champion is set"
        return "none_eligible", f"No version of {len(rows)} passes the budgets; {stays}.", None
    described = _describe(challenger, metric)
    if champ_row is None:
        gone = (
            f"champion v{champion} is not in the registry"
            if champion
            else "there is no champion yet"
        )
        return "promote", f"Promote {described}: {gone}.", None
    if challenger["version"] == champion:
        return "keep", f"Keep champion {described}: it is still the best eligible version.", None
    if not champ_row["eligible"]:
        fails = champ_row["fail_reasons"]
        return (
            "promote",
            f"Promote {described}: champion v{champion} fails its budgets ({fails}).",
            None,
        )
    improvement = (metric_value(challenger, metric) or 0.0) - (
        metric_value(champ_row, metric) or 0.0
    )
    gain, least = f"{metric} +{fmt(improvement)}", fmt(config.min_improvement)
    if improvement >= config.min_improvement - IMPROVEMENT_TOLERANCE:
        return (
            "promote",
            f"Promote {described}: it beats champion v{champion} by {gain} "
            f"(>= min_improvement {least}).",
            improvement,
        )
    return (
        "keep",
        f"Keep champion v{champion}: challenger {described} beats it by only {gain} "
        f"(< min_improvement {least}).",
        improvement,
    )


def _guarded_above(rows, challenger, metric: str, champion: str | None) -> str:
    """The versions the slice guard alone ruled out that rank above the chosen challenger."""
    bar = _rank_key(challenger, metric, champion) if challenger else None
    out = [
        f"v{r['version']} ({r['slice_reason']})"
        for r in sorted(rows, key=lambda r: _rank_key(r, metric, champion))
        if r["slice_reason"]
        and r["fail_reasons"] == r["slice_reason"]
        and (bar is None or _rank_key(r, metric, champion) < bar)
    ]
    return ", ".join(out)
