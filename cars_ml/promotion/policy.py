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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cars_ml import (
    MIN_SERVING_CODE_VERSION,
    SERVING_CODE_TAG,
    serving_code_version,
)
from cars_ml.promotion.checks import device_latency, fmt, metric_value, not_measured, slice_guard

# Higher is better for every metric a promotion may rank by.
RANKING_METRICS = (
    "test_f1_macro",
    "test_f1_weighted",
    "test_accuracy",
    "test_top5_accuracy",
    "tflite_int8_test_f1_macro",
    "throughput_img_per_s",
)
SIZE_METRICS = ("model_size_mb", "tflite_int8_size_mb")
LATENCY_METRIC = "latency_ms_p95"
INT8_DROP_METRIC = "int8_f1_drop"
DEVICE_PRECISIONS = ("int8", "float32")
DEVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
# Float noise (0.83 - 0.82 = 0.00999...) must not turn "beats by 0.01" into "does not".
IMPROVEMENT_TOLERANCE = 1e-9
ACTIONS = ("promote", "keep", "none_eligible", "rollback")
TRAIN_HINT = (
    "train and register a model first: `mlflow run . -e train --env-manager local` "
    "(or `mlflow run . --env-manager local` for the whole pipeline)"
)


@dataclass(frozen=True)
class Budgets:
    """Edge budgets; ``None`` switches one off. Defaults suit a Raspberry Pi-class device.

    ``max_latency_ms`` bounds ``latency_ms_p95``; ``max_size_mb`` bounds ``size_metric``
    (``model_size_mb`` or ``tflite_int8_size_mb``); ``max_int8_f1_drop`` bounds
    ``int8_f1_drop`` (float test macro-F1 minus int8). With ``device`` (an edge agent's device
    name), ``max_device_latency_ms`` bounds the p95 measured there for ``device_precision``
    in place of ``max_latency_ms``; ``allow_estimates`` accepts the profile's estimate for a
    version not measured there.
    """

    max_latency_ms: float | None = 100.0
    max_size_mb: float | None = 50.0
    max_int8_f1_drop: float | None = 0.05
    size_metric: str = "model_size_mb"
    device: str | None = None
    max_device_latency_ms: float | None = 100.0
    device_precision: str = "int8"
    allow_estimates: bool = False

    def __post_init__(self) -> None:
        for name in ("max_latency_ms", "max_size_mb", "max_int8_f1_drop", "max_device_latency_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"{name} must be a number >= 0 (or None to switch it off), got {value!r}"
                )
        if self.size_metric not in SIZE_METRICS:
            raise ValueError(f"size_metric must be one of {SIZE_METRICS}, got {self.size_metric!r}")
        if self.device is not None and not DEVICE_NAME.match(self.device):
            raise ValueError(
                f"device must be an edge agent's device name (lower case letters, digits, '-' "
                f"and '_', at most 40), got {self.device!r}"
            )
        if self.device_precision not in DEVICE_PRECISIONS:
            raise ValueError(
                f"device_precision must be one of {DEVICE_PRECISIONS}, got {self.device_precision!r}"
            )

    @property
    def device_column(self) -> str:
        """The measured p95 the device budget reads (the edge agent's metric)."""
        return f"device_{self.device}_{self.device_precision}_latency_ms_p95"

    @property
    def estimate_column(self) -> str:
        return f"est_{self.device}_{self.device_precision}_latency_ms"

    def checks(self) -> list[tuple[str, str, str, float | None]]:
        """(check name, metric column, budget name, limit) for each budget."""
        latency = ("latency", LATENCY_METRIC, "max_latency_ms", self.max_latency_ms)
        if self.device:
            latency = (
                "device_latency",
                self.device_column,
                "max_device_latency_ms",
                self.max_device_latency_ms,
            )
        return [
            latency,
            ("size", self.size_metric, "max_size_mb", self.max_size_mb),
            ("int8_f1_drop", INT8_DROP_METRIC, "max_int8_f1_drop", self.max_int8_f1_drop),
        ]


@dataclass(frozen=True)
class PromotionConfig:
    """What ``promote`` does: rank by ``metric`` under ``budgets``, or roll back."""

    metric: str = "test_f1_macro"
    min_improvement: float = 0.0
    dry_run: bool = False
    rollback: bool = False
    # Let versions registered with serving code older than the minimum compete (and roll back).
    allow_old_serving_code: bool = False
    budgets: Budgets = field(default_factory=Budgets)
    # Largest macro-F1 loss on any slice against the champion (None = off).
    max_slice_regression: float | None = None

    def __post_init__(self) -> None:
        limit = self.max_slice_regression
        if limit is not None and not (math.isfinite(limit) and limit >= 0):
            raise ValueError(
                f"max_slice_regression must be a number >= 0 (or None to switch it off), "
                f"got {limit!r}"
            )
        if self.metric not in RANKING_METRICS:
            raise ValueError(
                f"metric must be one of {RANKING_METRICS} (higher is better), got {self.metric!r}"
            )
        if not (math.isfinite(self.min_improvement) and self.min_improvement >= 0):
            raise ValueError(f"min_improvement must be a number >= 0, got {self.min_improvement!r}")


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
    champ_row = next((r for r in rows if r["version"] == champion), None)
    table["rank"] = pd.array([None] * len(table), dtype="Int64")
    for rank, row in enumerate(eligible, start=1):
        table.loc[table["version"] == row["version"], "rank"] = rank
    challenger = eligible[0] if eligible else None
    table["is_champion"] = table["version"] == champion
    table["is_challenger"] = table["version"] == (challenger["version"] if challenger else None)

    improvement = None
    if challenger is None:
        stays = f"champion v{champion} stays" if champion else "no champion is set"
        action = "none_eligible"
        reason = f"No version of {len(rows)} passes the budgets; {stays}."
    elif champ_row is None:
        action = "promote"
        gone = (
            f"champion v{champion} is not in the registry"
            if champion
            else "there is no champion yet"
        )
        reason = f"Promote {_describe(challenger, metric)}: {gone}."
    elif challenger["version"] == champion:
        action = "keep"
        reason = (
            f"Keep champion {_describe(challenger, metric)}: it is still the best eligible version."
        )
    elif not champ_row["eligible"]:
        action = "promote"
        reason = (
            f"Promote {_describe(challenger, metric)}: champion v{champion} fails its budgets "
            f"({champ_row['fail_reasons']})."
        )
    else:
        improvement = (metric_value(challenger, metric) or 0.0) - (
            metric_value(champ_row, metric) or 0.0
        )
        gain = f"{metric} +{fmt(improvement)}"
        if improvement >= config.min_improvement - IMPROVEMENT_TOLERANCE:
            action = "promote"
            reason = (
                f"Promote {_describe(challenger, metric)}: it beats champion v{champion} by "
                f"{gain} (>= min_improvement {fmt(config.min_improvement)})."
            )
        else:
            action = "keep"
            reason = (
                f"Keep champion v{champion}: challenger {_describe(challenger, metric)} beats it "
                f"by only {gain} (< min_improvement {fmt(config.min_improvement)})."
            )
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
