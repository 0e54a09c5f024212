"""The ``prepare_data`` step: validate a dataset and log its summary to MLflow."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from cars_ml import tracking
from cars_ml.data.loader import load_dataset
from cars_ml.data.report import class_count_table, sample_grid_figure
from cars_ml.data.types import DataConfig, DatasetSplits


def run_prepare_data(config: DataConfig) -> DatasetSplits:
    """Load and check the dataset, then log counts, provenance, a count table and samples.

    Metrics: ``num_classes``, ``num_images``, ``num_{train,val,test}_images``,
    ``num_skipped_images``. Params: ``DatasetSplits.params()`` (fingerprint, test split source)
    and the ``DataConfig`` fields. Artifacts: ``class_counts.csv/.html``, ``samples.png`` and
    ``skipped_images.txt`` when images were skipped.
    """
    tracking.check_tracking_server()
    splits = load_dataset(config)
    with tracking.start_run(run_name="prepare_data"):
        tracking.log_params({**splits.params(), **dataclasses.asdict(config)})
        tracking.log_metrics(splits.summary())
        tracking.log_table(class_count_table(splits), "class_counts")
        tracking.log_figure(sample_grid_figure(splits), "samples.png")
        if splits.skipped:
            with tempfile.TemporaryDirectory() as tmp:
                listing = Path(tmp) / "skipped_images.txt"
                listing.write_text("\n".join(splits.skipped) + "\n", encoding="utf-8")
                tracking.log_artifact(listing)
        run_id = tracking.active_run_id()
    _print_summary(splits, run_id)
    return splits


def _print_summary(splits: DatasetSplits, run_id: str | None) -> None:
    counts = splits.summary()
    print(
        f"Dataset {splits.name!r} ({splits.layout} at {splits.root}): "
        f"{counts['num_classes']} classes, {counts['num_images']} images "
        f"(train {counts['num_train_images']}, val {counts['num_val_images']}, "
        f"test {counts['num_test_images']} [{splits.test_source}]), "
        f"{counts['num_skipped_images']} skipped, {splits.bbox_fallbacks} uncropped boxes."
    )
    print(f"Fingerprint {splits.fingerprint}; MLflow run {run_id}.")
