"""The promotion checks beyond the plain budgets, and the value helpers the policy shares.

``device_latency`` is what a device budget reads (measured by the edge agent, or the profile's
estimate); ``slice_guard`` rules out versions that lose a slice against the champion. Pure:
rows and tables in, values and columns out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from cars_ml.training.slices import slice_regressions

if TYPE_CHECKING:
    from cars_ml.promotion.policy import Budgets


def metric_value(row: Mapping[str, Any], column: str) -> float | None:
    """A finite float from a row, or None when missing, empty or not a number."""
    raw = row.get(column)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def fmt(value: float) -> str:
    return str(float(round(value, 4)))


def device_latency(row: Mapping[str, Any], budgets: Budgets) -> tuple[float | None, str]:
    """The device p95 a version is judged by and where it came from: ``measured`` by the
    edge agent, ``estimate`` from the device's profile (only with ``allow_estimates``), or
    ``""`` when there is neither."""
    measured = metric_value(row, budgets.device_column)
    if measured is not None:
        return measured, "measured"
    estimate = metric_value(row, budgets.estimate_column) if budgets.allow_estimates else None
    return (estimate, "estimate") if estimate is not None else (None, "")


def not_measured(budgets: Budgets) -> str:
    reason = f"not measured on {budgets.device}: run the edge agent there"
    if budgets.allow_estimates:
        reason += f" (no estimate either: calibrate it with cars-ml-edge --device {budgets.device})"
    return reason


def _slice_label(metric: str) -> str:
    """``slice_make_audi_f1_macro`` -> ``make=audi`` (``body_type`` is the one grouping with an
    underscore; other groupings read up to the first one)."""
    core = metric.removeprefix("slice_").removesuffix("_f1_macro")
    grouping = "body_type" if core.startswith("body_type_") else core.split("_", 1)[0]
    return f"{grouping}={core[len(grouping) + 1 :]}"


def slice_guard(table: pd.DataFrame, champion: str | None, limit: float | None) -> None:
    """Add ``slice_pass`` / ``slice_reason``: versions losing > ``limit`` on a slice against the
    champion are ruled out (in place; ``eligible`` and ``fail_reasons`` follow)."""
    rows = table.to_dict("records")
    champ = next((r for r in rows if r["version"] == champion), None)
    reasons = [""] * len(rows)
    if limit is not None and champ is not None:
        old = {k: v for k in champ if (v := metric_value(champ, k)) is not None}
        for i, row in enumerate(rows):
            if row["version"] == champion:
                continue
            new = {k: v for k in row if (v := metric_value(row, k)) is not None}
            lost = slice_regressions(new, old, limit)
            if lost:
                name = lost[0][0]
                reasons[i] = (
                    f"slice {_slice_label(name)} f1 {fmt(new[name])} < champion v{champion} "
                    f"{fmt(old[name])} - {fmt(limit)}"
                    + (f" (and {len(lost) - 1} more slices)" if len(lost) > 1 else "")
                )
    table["slice_pass"] = [not r for r in reasons]
    table["slice_reason"] = reasons
    table["eligible"] = table["eligible"] & table["slice_pass"]
    table["fail_reasons"] = [
        "; ".join(x for x in (f, r) if x)
        for f, r in zip(table["fail_reasons"], reasons, strict=True)
    ]
