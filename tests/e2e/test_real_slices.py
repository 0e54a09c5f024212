"""Fine-grained evaluation on real Stanford Cars names: a train run on the low-res images in
``../shared/data`` (skipped without them) logs the make and body-type slices and the confused
pairs. A minute or two on a CPU, so ``slow``."""

from __future__ import annotations

import mlflow
import pytest
from e2e_utils import run_entry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_real_train_run_logs_make_and_body_type_slices_and_confused_pairs(sub_env, shared_data):
    root = shared_data / "stanford_cars_lowres"
    run_entry(
        "train",
        "--data",
        str(root),
        "--weights",
        "none",
        "--max_classes",
        "8",
        "--crop_to_bbox",
        "false",
        "--image_size",
        "48",
        "--epochs",
        "2",
        "--fine_tune_epochs",
        "0",
        "--register",
        "false",
        "--export_tflite",
        "false",
        env=sub_env,
        timeout=900,
    )
    (run,) = mlflow.search_runs(filter_string="tags.step = 'train'", output_format="list")
    metrics = run.data.metrics
    for name in ("test_f1_macro_make", "test_f1_macro_body_type"):
        assert 0.0 <= metrics[name] <= 1.0, name
    makes = [k for k in metrics if k.startswith("slice_make_") and k.endswith("_f1_macro")]
    bodies = [k for k in metrics if k.startswith("slice_body_type_") and k.endswith("_accuracy")]
    assert makes and bodies, sorted(metrics)
    assert "=" in run.data.tags["worst_slices"]
    client = mlflow.MlflowClient()
    files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/slices.csv",
        "evaluation/confused_pairs.csv",
        "evaluation/per_class_train_counts.csv",
    } <= files
    # Two epochs from scratch on 8 classes: mistakes, so the figure is there too.
    assert "evaluation/confused_pairs.png" in files
    assert len(client.get_run(run.info.run_id).inputs.dataset_inputs) == 3
