"""Fine-grained evaluation: metrics by make and body type, and the classes a model confuses.

Stanford Cars class names carry make, model, body type and year ("Audi TTS Coupe 2012"), so one
macro-F1 over 196 classes hides where a model fails. :func:`class_groups` reads the groupings
from the names (for other datasets a ``slices.csv`` mapping class to group does it, or slices
are skipped); :func:`slice_metrics` scores each slice and the coarser tasks (is the make right
even when the exact model is not?). Plain numpy and pandas in, numbers and tables out.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd

# Makes of more than one word in Stanford Cars; every other make is the first word.
MULTI_WORD_MAKES = ("AM General", "Aston Martin", "Land Rover")
# The body type is the word before the year; pickups end in "Cab" ("Crew Cab", "SuperCab").
BODY_TYPES = ("Sedan", "SUV", "Convertible", "Coupe", "Hatchback", "Van", "Wagon", "Minivan")
OTHER = "Other"
GROUPINGS = ("make", "body_type")
_YEAR = re.compile(r"^(?P<rest>.+) (?P<year>(19|20)\d\d)$")
# Share of class names that must end in a year for the names to count as Stanford Cars-like.
MIN_PARSED = 0.9
WORST_SLICES = 5


def make_of(name: str) -> str:
    for make in MULTI_WORD_MAKES:
        if name.startswith(make + " "):
            return make
    return name.split(" ", 1)[0]


def body_type_of(name: str) -> str:
    match = _YEAR.match(name)
    word = (match.group("rest") if match else name).rsplit(" ", 1)[-1]
    if word.endswith("Cab"):
        return "Pickup"
    return word if word in BODY_TYPES else OTHER


def class_groups(
    class_names: list[str], slices_csv: str | Path | None = None
) -> dict[str, list[str]]:
    """Grouping name -> the group of each class, in class order; empty when none applies.

    ``slices_csv`` (columns ``class`` and one column per grouping) overrides the names.
    """
    if slices_csv:
        return read_slices_csv(slices_csv, class_names)
    parsed = sum(bool(_YEAR.match(str(n))) for n in class_names)
    if not class_names or parsed < MIN_PARSED * len(class_names):
        return {}
    names = [str(n) for n in class_names]
    return {"make": [make_of(n) for n in names], "body_type": [body_type_of(n) for n in names]}


def read_slices_csv(path: str | Path, class_names: list[str]) -> dict[str, list[str]]:
    """Read a ``class,<grouping>...`` CSV; every class needs a row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"slices file {path} does not exist; pass a CSV with a 'class' column.")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "class" not in rows[0] or len(rows[0]) < 2:
        raise ValueError(
            f"{path}: needs a header 'class,<grouping>[,<grouping>...]' and one row per class."
        )
    by_class = {row["class"]: row for row in rows}
    missing = [c for c in class_names if c not in by_class]
    if missing:
        raise ValueError(f"{path}: no row for {len(missing)} classes, e.g. {missing[:3]}.")
    columns = [c for c in rows[0] if c != "class"]
    return {
        _slug(column): [str(by_class[c][column]).strip() or OTHER for c in class_names]
        for column in columns
    }


def _slug(text: str) -> str:
    """A metric-name-safe form of a group name: lower case, [a-z0-9_-] only."""
    return re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_") or "none"


def slice_metric_name(grouping: str, group: str, measure: str) -> str:
    return f"slice_{grouping}_{_slug(group)}_{measure}"


def slice_metrics(
    labels: np.ndarray, preds: np.ndarray, groups: dict[str, list[str]], prefix: str = "test"
) -> tuple[dict[str, float], pd.DataFrame]:
    """Per-slice macro-F1 and accuracy, the coarse-task macro-F1 per grouping, and a table.

    Metrics: ``<prefix>_f1_macro_<grouping>`` (the task at the group's grain) and
    ``slice_<grouping>_<group>_f1_macro`` / ``_accuracy`` (the fine task on that slice's
    images). The table has one row per slice, worst F1 first.
    """
    from sklearn.metrics import f1_score  # Here: promotion imports this module, not sklearn.

    labels, preds = np.asarray(labels), np.asarray(preds)
    metrics: dict[str, float] = {}
    rows = []
    for grouping, of_class in groups.items():
        of_class = np.asarray(of_class, dtype=object)
        true_group, pred_group = of_class[labels], of_class[preds]
        metrics[f"{prefix}_f1_macro_{grouping}"] = float(
            f1_score(true_group, pred_group, average="macro", zero_division=0)
        )
        for group in sorted(set(true_group)):
            mask = true_group == group
            f1 = float(
                f1_score(
                    labels[mask],
                    preds[mask],
                    average="macro",
                    labels=np.unique(labels[mask]),
                    zero_division=0,
                )
            )
            accuracy = float(np.mean(labels[mask] == preds[mask]))
            group_right = float(np.mean(pred_group[mask] == group))
            metrics[slice_metric_name(grouping, group, "f1_macro")] = f1
            metrics[slice_metric_name(grouping, group, "accuracy")] = accuracy
            rows.append(
                {
                    "grouping": grouping,
                    "slice": group,
                    "images": int(mask.sum()),
                    "classes": int(len(np.unique(labels[mask]))),
                    "f1_macro": f1,
                    "accuracy": accuracy,
                    "group_right": group_right,
                }
            )
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(["f1_macro", "images"], ascending=[True, False])
    return metrics, table.reset_index(drop=True)


def worst_slices(table: pd.DataFrame, count: int = WORST_SLICES) -> str:
    """``make=Dodge 0.41; body_type=Van 0.52`` for the tag that names the weakest slices."""
    head = table.head(count)
    return "; ".join(f"{r.grouping}={r.slice} {r.f1_macro:.2f}" for r in head.itertuples())


def confused_pairs(
    labels: np.ndarray, preds: np.ndarray, class_names: list[str], top: int = 20
) -> pd.DataFrame:
    """The most frequent (true, predicted) mistakes, with the share of the true class's images."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    wrong = labels != preds
    if not wrong.any():
        return pd.DataFrame(columns=["true", "predicted", "count", "share_of_true"])
    pairs = pd.DataFrame({"t": labels[wrong], "p": preds[wrong]}).value_counts().head(top)
    support = np.bincount(labels, minlength=len(class_names))
    return pd.DataFrame(
        {
            "true": [class_names[t] for t, _ in pairs.index],
            "predicted": [class_names[p] for _, p in pairs.index],
            "count": pairs.to_numpy().astype(int),
            "share_of_true": [float(n / support[t]) for (t, _), n in pairs.items()],
        }
    )


def confused_pairs_figure(pairs: pd.DataFrame):
    """A horizontal bar chart of the most confused pairs (``true -> predicted``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.35 * max(len(pairs), 3) + 1))
    labels = [f"{t}  ->  {p}" for t, p in zip(pairs["true"], pairs["predicted"], strict=True)]
    ax.barh(range(len(pairs)), pairs["count"], color="tab:red")
    ax.set_yticks(range(len(pairs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test images")
    ax.set_title("Most confused class pairs (true -> predicted)")
    fig.tight_layout()
    return fig


def per_class_with_train_counts(report: pd.DataFrame, train_counts: np.ndarray) -> pd.DataFrame:
    """``evaluate.per_class_report`` plus the number of training images of each class."""
    table = report.copy()
    table["train_images"] = np.asarray(train_counts)[table["class_id"].to_numpy()]
    return table


def slice_regressions(
    challenger: dict[str, float], champion: dict[str, float], limit: float
) -> list[tuple[str, float]]:
    """Slices (``slice_*_f1_macro`` metrics both have) the challenger loses by more than
    ``limit``, largest loss first."""
    losses = []
    for name, old in champion.items():
        if not (name.startswith("slice_") and name.endswith("_f1_macro")):
            continue
        new = challenger.get(name)
        if new is not None and old - new > limit + 1e-9:
            losses.append((name, old - new))
    return sorted(losses, key=lambda item: -item[1])
