"""``prepare_data`` as a real process: metrics, params and artifacts land in MLflow."""

from __future__ import annotations

import csv

import mlflow
import pytest
from e2e_utils import run_entry
from mlflow import MlflowClient
from PIL import Image

pytestmark = pytest.mark.e2e

COUNTS = ("num_classes", "num_images", "num_train_images", "num_val_images", "num_test_images")


def _only_run(client: MlflowClient):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return runs[0]


def _artifacts(client, run_id):
    return {a.path for a in client.list_artifacts(run_id)}


def test_prepare_synthetic(sub_env, tmp_path):
    proc = run_entry("prepare_data", "--data", "synthetic", env=sub_env, timeout=300)
    assert "10 classes, 520 images" in proc.stdout
    client = MlflowClient()
    run = _only_run(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "prepare_data"
    metrics = run.data.metrics
    assert {k: metrics[k] for k in COUNTS} == {
        "num_classes": 10,
        "num_images": 520,
        "num_train_images": 340,
        "num_val_images": 60,
        "num_test_images": 120,
    }
    assert metrics["num_skipped_images"] == 0
    params = run.data.params
    assert len(params["dataset_fingerprint"]) == 64 and params["dataset_fingerprint"] in proc.stdout
    assert params["test_split"] == "official" and params["dataset"] == "synthetic"
    assert params["data"] == "synthetic" and params["seed"] == "42"
    assert {"class_counts.csv", "class_counts.html", "samples.png"} <= _artifacts(
        client, run.info.run_id
    )
    table = client.download_artifacts(run.info.run_id, "class_counts.csv", str(tmp_path))
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and rows[0]["class_name"] == "Synthetic Coupe 01"
    assert sum(int(r["total"]) for r in rows) == 520
    png = client.download_artifacts(run.info.run_id, "samples.png", str(tmp_path))
    assert Image.open(png).size[0] > 300


def test_prepare_real_lowres(sub_env, shared_data):
    root = shared_data / "stanford_cars_lowres"
    proc = run_entry("prepare_data", "--data", str(root), env=sub_env, timeout=300)
    assert "no labelled test set" in proc.stderr  # the held-out warning reaches the user
    run = _only_run(MlflowClient())
    assert run.data.metrics["num_classes"] == 196
    assert run.data.metrics["num_images"] == 4000
    assert run.data.metrics["num_test_images"] >= 196
    assert run.data.params["test_split"] == "held_out"
    assert run.data.params["dataset"] == "stanford_cars_lowres"


def test_resumes_the_run_mlflow_run_created(sub_env, tracking_uri):
    """Under ``mlflow run`` the params already hold the user's strings; they are kept."""
    with mlflow.start_run() as parent:
        mlflow.log_params({"data": "synthetic", "crop_to_bbox": "yes", "max_per_class": "5"})
    env = {**sub_env, "MLFLOW_RUN_ID": parent.info.run_id}
    args = ("--data", "synthetic", "--crop_to_bbox", "yes", "--max_per_class", "5")
    run_entry("prepare_data", *args, env=env, timeout=300)
    run = MlflowClient().get_run(parent.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["crop_to_bbox"] == "yes"
    assert run.data.metrics["num_images"] == 10 * 5 + 10 * 5


def test_bad_images_fail_clearly_or_are_skipped_and_listed(sub_env, tmp_path):
    root = tmp_path / "folder"
    for c in range(2):
        for i in range(5):
            path = root / f"class {c}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 16), (40 * i, 100 * c, 60)).save(path)
    (root / "class 1" / "4.jpg").write_bytes(b"broken")
    proc = run_entry("prepare_data", "--data", str(root), env=sub_env, check=False)
    assert proc.returncode == 2
    assert "error: Bad image" in proc.stderr and "skip_bad_images=true" in proc.stderr
    run_entry("prepare_data", "--data", str(root), "--skip_bad_images", "true", env=sub_env)
    client = MlflowClient()
    runs = client.search_runs(["0"], filter_string="attributes.status = 'FINISHED'")
    assert len(runs) == 1
    assert runs[0].data.metrics["num_skipped_images"] == 1
    assert "skipped_images.txt" in _artifacts(client, runs[0].info.run_id)
    missing = run_entry("prepare_data", "--data", str(tmp_path / "nope"), env=sub_env, check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
