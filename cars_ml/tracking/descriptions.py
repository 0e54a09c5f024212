"""What the registry page shows: the Markdown descriptions of the registered model and its
versions, written at registration and refreshed by every promote."""

from __future__ import annotations

import math
from typing import Any

from cars_ml import CHAMPION_ALIAS


def finite_float(text: Any) -> float:
    """``text`` as a float, NaN when it is not a finite number."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


_DESCRIBED = (
    ("test_f1_macro", "test macro-F1", "{:.4f}"),
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("int8_f1_drop", "int8 macro-F1 drop", "{:.4f}"),
    ("latency_ms_p95", "latency p95 (ms)", "{:.1f}"),
    ("model_size_mb", "size (MB)", "{:.1f}"),
)


def serve_command(model_name: str) -> str:
    return f"mlflow models serve -m models:/{model_name}@{CHAMPION_ALIAS} --env-manager local"


def version_description(row: dict[str, Any], tags: dict[str, str], champion: bool) -> str:
    """A version's Markdown: backbone, headline metrics, budgets passed or failed, teacher."""
    title = f"**{row.get('backbone') or tags.get('backbone') or 'unknown backbone'}**"
    if tags.get("teacher_backbone"):
        title += (
            f", distilled from **{tags['teacher_backbone']}** ({tags.get('distilled_from', '')})"
        )
    lines = [title + (" — the current **champion**" if champion else ""), ""]
    lines += ["| metric | value |", "|---|---|"]
    for key, label, fmt in _DESCRIBED:
        value = finite_float(row.get(key, tags.get(key)))
        lines.append(f"| {label} | {'n/a' if math.isnan(value) else fmt.format(value)} |")
    if "eligible" in row:
        verdict = (
            "passes every promotion budget"
            if row["eligible"]
            else f"fails the promotion budgets: {row.get('fail_reasons') or 'see the promote run'}"
        )
        lines += ["", f"Budgets (last promote run): {verdict}."]
    return "\n".join(lines)


def model_description(model_name: str, champion: str | None, champion_backbone: str) -> str:
    """The registered model's Markdown: what it is, its champion, how to serve it."""
    who = f"version {champion} ({champion_backbone})" if champion else "none yet"
    return "\n".join(
        [
            "Stanford Cars classifier (196 car models): one version per trained backbone or "
            "distilled student, each with its float32 and int8 TFLite files. The `champion` "
            "alias is the best version within the edge budgets (latency, size, int8 drop).",
            "",
            f"**Champion:** {who}.",
            "",
            "Serve it (base64 images in, label / class id / probability / top-k out):",
            "",
            f"```\n{serve_command(model_name)}\n```",
        ]
    )
