"""How a promotion decision is shown: a printable table and a plot of F1 against latency.

Pure presentation: takes a ``Decision`` and returns text or a matplotlib ``Figure`` (built
without pyplot, so no display backend is touched).
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

from cars_ml.promotion.policy import Budgets, Decision


def _role(row: pd.Series, decision: Decision) -> str:
    roles = []
    if row["version"] == decision.champion:
        roles.append("champion")
    if row["version"] == decision.challenger:
        roles.append("challenger" if decision.action != "rollback" else "rollback target")
    return ", ".join(roles)


def format_table(decision: Decision, budgets: Budgets) -> str:
    """A readable candidate table (one line per version) followed by the decision."""
    table = decision.table
    latency = (
        ["device_latency_ms", "device_latency_source"] if budgets.device else ["latency_ms_p95"]
    )
    columns = ["version", "backbone", decision.metric, *latency, budgets.size_metric]
    columns += ["int8_f1_drop", "eligible", "fail_reasons"]
    view = table[[c for c in columns if c in table.columns]].copy()
    view.insert(1, "role", [_role(row, decision) for _, row in table.iterrows()])
    with pd.option_context("display.max_colwidth", 80, "display.width", 200):
        # Reasons read better left-aligned; pandas right-aligns every column.
        width = max((len(str(x)) for x in view["fail_reasons"]), default=0)
        text = view.to_string(
            index=False,
            na_rep="-",
            float_format=lambda x: f"{x:.4g}",
            formatters={"fail_reasons": lambda x: str(x).ljust(width)},
        )
    moved = f"champion: {decision.champion or '-'} -> {decision.new_champion or '-'}"
    if decision.dry_run and decision.action in ("promote", "rollback"):
        moved = (
            f"champion: {decision.champion or '-'} -> {decision.challenger}, not applied: dry run"
        )
    return f"{text}\n\nDecision: {decision.action.upper()} ({moved})\n{decision.reason}"


def _num(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def _latencies(row: pd.Series, budgets: Budgets) -> tuple[float, float]:
    """(p50, p95) on the axis: this host's, or the device's when a device decides (an
    estimate has no spread: both are the estimate)."""
    if not budgets.device:
        return _num(row.get("latency_ms_p50")), _num(row.get("latency_ms_p95"))
    p95 = _num(row.get("device_latency_ms"))
    p50 = _num(row.get(budgets.device_column.replace("_p95", "_p50")))
    return (p50 if not math.isnan(p50) else p95), p95


def candidates_figure(decision: Decision, budgets: Budgets) -> Figure:
    """``metric`` against latency p50 (a bar reaches to p95), point area by size.

    The latency is this host's, or with a device the one measured there (a hollow point is an
    estimate). Eligible versions are green, the others grey; the champion after the decision is
    ringed in red and the latency budget (which applies to p95) is a dashed line.
    """
    table = decision.table
    fig = Figure(figsize=(8, 5.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    plotted = 0
    sizes = [_num(v) for v in table.get(budgets.size_metric, pd.Series(dtype=float))]
    biggest = max((s for s in sizes if not math.isnan(s)), default=1.0) or 1.0
    for i, (_, row) in enumerate(table.iterrows()):
        size = sizes[i] if i < len(sizes) and not math.isnan(sizes[i]) else biggest / 4
        plotted += _plot_version(ax, row, decision, budgets, 60 + 900 * size / biggest)
    _latency_budget_line(ax, budgets)
    where = f"on {budgets.device} ({budgets.device_precision}; hollow = estimate)"
    ax.set_xlabel(f"latency ms p50 {where if budgets.device else 'on this host'} (bar to p95)")
    ax.set_ylabel(decision.metric)
    skipped = len(table) - plotted
    note = f"; {skipped} version(s) lack latency or {decision.metric}" if skipped else ""
    ax.set_title(
        f"Promotion candidates: {decision.action} -> v{decision.new_champion or '-'}\n"
        f"green = within budgets, area ~ {budgets.size_metric}{note}",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _plot_version(ax, row, decision: Decision, budgets: Budgets, area: float) -> bool:
    """One version's point and p95 bar; False when it lacks latency or the metric."""
    (x, p95), y = _latencies(row, budgets), _num(row.get(decision.metric))
    if math.isnan(x) or math.isnan(y):
        return False
    color = "tab:green" if row["eligible"] else "tab:gray"
    if not math.isnan(p95) and p95 > x:
        ax.plot([x, p95], [y, y], color=color, linewidth=1.5, alpha=0.6)
    is_champion = row["version"] == decision.new_champion
    estimate = row.get("device_latency_source") == "estimate"
    ax.scatter(
        [x],
        [y],
        s=area,
        color="white" if estimate else color,
        alpha=0.7,
        edgecolors="tab:red" if is_champion else "black",
        linewidths=3 if is_champion else 0.5,
        zorder=3,
    )
    label = f"v{row['version']} {row.get('backbone') or ''}".strip()
    ax.annotate(
        label + (" (champion)" if is_champion else ""),
        (x, y),
        textcoords="offset points",
        xytext=(8, 6),
        fontsize=8,
    )
    return True


def _latency_budget_line(ax, budgets: Budgets) -> None:
    limit, limit_name = budgets.max_latency_ms, "max_latency_ms"
    if budgets.device:
        limit, limit_name = budgets.max_device_latency_ms, "max_device_latency_ms"
    if limit is None:
        return
    ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1)
    ax.annotate(
        f"{limit_name} {limit:g} (p95)",
        (limit, 0.02),
        xycoords=("data", "axes fraction"),
        rotation=90,
        fontsize=8,
        color="tab:red",
        xytext=(-12, 0),
        textcoords="offset points",
    )
