"""Classification metrics and figures: numpy in, numbers, tables and figures out (no MLflow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def _figure(**kwargs):
    # Agg keeps plotting headless; chosen here rather than at import so importing is side-effect free.
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(**kwargs)


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int = 5) -> float:
    """Fraction of samples whose true class is among the ``k`` most probable."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float(np.mean([label in row for label, row in zip(labels, top, strict=True)]))


def classification_metrics(labels: np.ndarray, probs: np.ndarray, prefix: str) -> dict[str, float]:
    """Macro/weighted F1, accuracy and top-5 accuracy under ``<prefix>_`` names."""
    if len(labels) == 0:
        raise ValueError(f"No {prefix} samples to evaluate: the {prefix} split is empty.")
    preds = probs.argmax(axis=1)
    labels_all = np.arange(probs.shape[1])
    return {
        f"{prefix}_f1_macro": float(
            f1_score(labels, preds, average="macro", labels=np.unique(labels), zero_division=0)
        ),
        f"{prefix}_f1_weighted": float(
            f1_score(labels, preds, average="weighted", labels=labels_all, zero_division=0)
        ),
        f"{prefix}_accuracy": float(accuracy_score(labels, preds)),
        f"{prefix}_top5_accuracy": top_k_accuracy(labels, probs, 5),
    }


def macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro F1 over the classes present in ``labels`` (the per-epoch validation score)."""
    preds = probs.argmax(axis=1)
    return float(
        f1_score(labels, preds, average="macro", labels=np.unique(labels), zero_division=0)
    )


def per_class_report(labels: np.ndarray, preds: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, worst F1 first."""
    idx = np.arange(len(class_names))
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=idx, zero_division=0)
    frame = pd.DataFrame(
        {
            "class_id": idx,
            "class_name": class_names,
            "precision": p,
            "recall": r,
            "f1": f,
            "support": s,
        }
    )
    return frame.sort_values(["f1", "support"], ascending=[True, False]).reset_index(drop=True)


def confusion_matrix_figure(labels: np.ndarray, preds: np.ndarray, class_names: list[str]):
    """A normalised confusion matrix; class names are shown when there are few enough to read."""
    n = len(class_names)
    cm = confusion_matrix(labels, preds, labels=np.arange(n)).astype(float)
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(4 + n * 0.35, 24)
    fig, ax = _figure(figsize=(size, size))
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised)")
    fig.tight_layout()
    return fig


def training_curves_figure(history: list[dict[str, float]]):
    """Loss and validation scores per epoch (the phase boundary shows as a dashed line)."""
    fig, (left, right) = _figure(ncols=2, figsize=(11, 4))
    epochs = [h["epoch"] for h in history]
    for key, ax in (("train_loss", left), ("val_loss", left)):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    for key in ("val_accuracy", "val_f1_macro"):
        right.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    phases = [h.get("phase") for h in history]
    for i in range(1, len(phases)):
        if phases[i] != phases[i - 1]:
            for ax in (left, right):
                ax.axvline(epochs[i] - 0.5, linestyle="--", color="grey")
    left.set_title("loss")
    right.set_title("validation")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    return fig


def cross_entropy(labels: np.ndarray, probs: np.ndarray, smoothing: float = 0.0) -> float:
    """Mean categorical cross-entropy with label smoothing, as Keras computes the loss."""
    n = probs.shape[1]
    target = np.full(probs.shape, smoothing / n)
    target[np.arange(len(labels)), labels] += 1.0 - smoothing
    return float(-(target * np.log(np.clip(probs, 1e-7, 1.0))).sum(axis=1).mean())
