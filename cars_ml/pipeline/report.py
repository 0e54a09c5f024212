"""The pipeline's comparison of every backbone and student: table, plot, metrics and report."""

from __future__ import annotations

import pandas as pd

import cars_ml
from cars_ml import tracking

COMPARISON_COLUMNS = (
    "test_f1_macro",
    "val_f1_macro",
    "tflite_int8_test_f1_macro",
    "test_accuracy",
    "latency_ms_p50",
    "latency_ms_p95",
    "model_size_mb",
    "tflite_int8_size_mb",
    "int8_f1_drop",
    "int8_agreement",
    "num_params",
    "distill_gap",
)


SLICE_COLUMNS = ("test_f1_macro_make", "test_f1_macro_body_type")
# The comparison's name of the frozen-feature floor (tuning.floor): a baseline, not a model.
FLOOR_ROW = "floor-efficientnet_lite0"


def floor_row(floor: dict[str, float]) -> dict:
    """The comparison row of the frozen-feature floor: its validation and test macro-F1."""
    return {
        "backbone": FLOOR_ROW,
        "run_id": "",
        "model_version": None,
        "reused": False,
        "teacher": "",
        "teacher_version": "",
        **{c: floor.get(c) for c in COMPARISON_COLUMNS},
    }


def slice_table(rows) -> pd.DataFrame:
    """One row per backbone/version: the coarse-task F1s and the worst slice (its F1).

    ``rows`` carry ``backbone``, ``model_version`` and ``metrics`` (a train run's); a run
    without slices (names with no make or body type) shows empty cells.
    """
    out = []
    for r in rows:
        metrics = r["metrics"]
        per_slice = {
            k.removeprefix("slice_").removesuffix("_f1_macro"): v
            for k, v in metrics.items()
            if k.startswith("slice_") and k.endswith("_f1_macro")
        }
        worst = min(per_slice, key=per_slice.get) if per_slice else None
        out.append(
            {
                "backbone": r["backbone"],
                "model_version": r.get("model_version"),
                **{c: metrics.get(c) for c in SLICE_COLUMNS},
                "worst_slice": worst or "",
                "worst_slice_f1_macro": per_slice[worst] if worst else None,
            }
        )
    return pd.DataFrame(out)


def log_comparison(table: pd.DataFrame, slices: pd.DataFrame | None = None) -> None:
    tracking.log_table(table, "comparison")
    if slices is not None and len(slices):
        tracking.log_table(slices, "comparison_slices")
    for row in table.itertuples():
        tracking.log_metrics(
            {
                f"{row.backbone}_{c}": getattr(row, c)
                for c in ("test_f1_macro", "latency_ms_p50")
                if getattr(row, c) is not None
            }
        )
    tracking.log_figure(comparison_figure(table), "f1_vs_latency.png")


def comparison_figure(table: pd.DataFrame):
    """Test macro-F1 against batch-1 latency; point size by model size, champion ringed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    data = table.dropna(subset=["test_f1_macro", "latency_ms_p50"])
    sizes = 30 + 8 * data["model_size_mb"].fillna(1).astype(float)
    ax.scatter(data["latency_ms_p50"], data["test_f1_macro"], s=sizes, alpha=0.6)
    for row in data.itertuples():
        ax.annotate(
            row.backbone,
            (row.latency_ms_p50, row.test_f1_macro),
            fontsize=8,
            xytext=(5, 5),
            textcoords="offset points",
        )
    points = {row.backbone: (row.latency_ms_p50, row.test_f1_macro) for row in data.itertuples()}
    for row in data[data["teacher"].astype(bool)].itertuples():
        if row.teacher in points:  # A dashed arrow from each teacher to its student.
            ax.annotate(
                "",
                xy=points[row.backbone],
                xytext=points[row.teacher],
                arrowprops={"arrowstyle": "->", "linestyle": "--", "color": "grey"},
            )
    for row in table[table["backbone"] == FLOOR_ROW].itertuples():
        ax.axhline(row.test_f1_macro, linestyle=":", color="grey", label="frozen-feature floor")
    champ = data[data["champion"]]
    ax.scatter(
        champ["latency_ms_p50"],
        champ["test_f1_macro"],
        s=400,
        facecolors="none",
        edgecolors="red",
        linewidths=2,
        label="champion",
    )
    ax.set_xlabel("batch-1 latency p50 (ms)")
    ax.set_ylabel("test macro-F1")
    ax.set_title(
        "Accuracy against edge latency (point size = model MB; dashed: teacher -> student)"
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def print_report(
    table: pd.DataFrame, decision, wall: float, experiment_id: str, run_id: str
) -> None:
    cols = ["backbone", "model_version", *COMPARISON_COLUMNS, "teacher", "reused", "champion"]
    print("\n" + table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\n[pipeline] champion: version {decision.new_champion} ({decision.reason})")
    print(f"[pipeline] finished in {wall:.0f} s")
    uri = tracking.tracking_uri()
    links = tracking.ui_links(experiment_id, run_id, cars_ml.REGISTERED_MODEL_NAME)
    start = (
        ""
        if uri.startswith(("http://", "https://"))
        else (f"  mlflow ui --backend-store-uri {tracking.redact(uri)}  # then open:\n")
    )
    print(
        f"\nOpen the MLflow UI:\n{start}"
        f"  this pipeline run:        {tracking.redact(links['run'])}\n"
        f"  its runs, to compare:     {tracking.redact(links['children'])}\n"
        f"  the registered model:     {tracking.redact(links['model'])}\n"
        "Serve the champion:\n"
        f"  MLFLOW_TRACKING_URI={tracking.redact(uri)} mlflow models serve "
        f"-m models:/{cars_ml.REGISTERED_MODEL_NAME}@{cars_ml.CHAMPION_ALIAS} --env-manager local -p 5001",
        flush=True,
    )
